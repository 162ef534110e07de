//! The control plane (:4303, bound to 127.0.0.1): the admin API.
//!
//! # What it owns
//! Today: IDE API key management (`POST /apikeys`, `GET /apikeys`, `DELETE /apikeys/{id}`), mesh
//! blacklist records (`POST /mesh/blacklist`, `GET /mesh/blacklist`) plus
//! `/health`, `/status` and `/metrics`. Manifests, approvals and the console arrive with the
//! control-plane work (see the project's issues).
//!
//! # Who calls it
//! Administrators on the box, with requests signed by the node's own key (the CLI does this).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::health::NodeHealth;
use crate::http::{ApiError, JsonBody};
use crate::ide::keys::ApiKeys;
use crate::identity::KeyId;
use crate::metrics::{Metrics, ProcessMetrics};
use crate::security::nonce::NonceCache;
use crate::security::ratelimit::RateLimits;
use crate::security::{KeyResolver, Role, Verifier, VerifierConfig};
use crate::store::Store;

/// Only the node's own key administers the node.
struct AdminKeys {
    node: KeyId,
}

impl KeyResolver for AdminKeys {
    fn resolve(&self, key: &KeyId) -> Option<Role> {
        (*key == self.node).then_some(Role::Node)
    }
}

/// `POST /apikeys`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A name to recognise the key by (an editor, a person).
    #[serde(default)]
    pub name: Option<String>,
}

async fn create_key(State(keys): State<ApiKeys>, JsonBody(req): JsonBody<CreateKey>) -> Response {
    let name = req.name.unwrap_or_else(|| "unnamed".into());
    match keys.create(&name).await {
        Ok(k) => (StatusCode::CREATED, Json(k)).into_response(),
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

async fn list_keys(State(keys): State<ApiKeys>) -> Json<Vec<crate::ide::keys::ApiKeyRecord>> {
    Json(keys.list())
}

async fn revoke_key(State(keys): State<ApiKeys>, Path(id): Path<String>) -> Response {
    match keys.revoke(&id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => ApiError::new(
            StatusCode::NOT_FOUND,
            "api_key_not_found",
            format!("no API key with id {id}"),
        )
        .into_response(),
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

/// `POST /mesh/blacklist`.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlacklistRequest {
    /// The node's key (base64url, as `/identity` and `/mesh/peers` show it).
    pub target: String,
    /// `bad_result`, `abuse` or `manual`.
    pub reason: crate::mesh::wire::BlacklistReason,
    /// The evidence (a message, a result, a note); only its SHA-256 is published.
    #[serde(default)]
    pub evidence: String,
}

async fn blacklist(
    State(mesh): State<crate::mesh::service::MeshSlot>,
    JsonBody(req): JsonBody<BlacklistRequest>,
) -> Response {
    let Some(m) = mesh.get() else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "mesh_disabled",
            "this node takes no part in a mesh",
        )
        .into_response();
    };
    let target = match KeyId::parse(&req.target) {
        Ok(k) => k,
        Err(e) => return ApiError::bad_request(format!("target: {e}")).into_response(),
    };
    match m.blacklist(target, req.reason, req.evidence.as_bytes()) {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_blacklist(State(mesh): State<crate::mesh::service::MeshSlot>) -> Response {
    match mesh.get() {
        Some(m) => Json(m.blacklist_view()).into_response(),
        None => Json(Vec::<serde_json::Value>::new()).into_response(),
    }
}

/// Builds the control-plane router.
#[allow(clippy::too_many_arguments)]
pub fn router(
    cfg: &Config,
    store: Store,
    node_key: KeyId,
    nonces: Arc<NonceCache>,
    keys: ApiKeys,
    health: Arc<NodeHealth>,
    process: Arc<ProcessMetrics>,
    limits: Arc<RateLimits>,
    mesh: crate::mesh::service::MeshSlot,
) -> Router {
    let verifier = Arc::new(Verifier::new(
        VerifierConfig {
            window: cfg.security.signature_window,
            skew: cfg.security.clock_skew,
            max_body: usize::try_from(cfg.http.max_body).unwrap_or(usize::MAX),
        },
        nonces,
        limits.clone(),
        Arc::new(AdminKeys { node: node_key }),
        Some(store),
    ));
    let mut registry = Registry::default();
    verifier.register_metrics(&mut registry, "edgecoder_control_plane_auth");
    let metrics = Metrics::new(registry, process);
    let admin = Router::new()
        .route("/apikeys", get(list_keys).post(create_key))
        .route("/apikeys/{id}", delete(revoke_key))
        .with_state(keys)
        .merge(
            Router::new()
                .route("/mesh/blacklist", get(list_blacklist).post(blacklist))
                .with_state(mesh),
        )
        .layer(axum::middleware::from_fn_with_state(
            verifier,
            crate::security::authenticate,
        ));
    crate::http::base_router(
        "control_plane",
        health,
        metrics,
        limits,
        Arc::new(|| serde_json::json!({})),
        admin,
    )
}
