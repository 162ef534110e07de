//! The IDE provider (:4304): an OpenAI-compatible API for editors on the LAN.
//!
//! # What it owns
//! The `/v1` routes (`GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`),
//! API-key authentication (keys in [`keys::ApiKeys`], created on first boot and through the control
//! plane), CORS, and the translation between OpenAI's shapes and tasks.
//!
//! # How a request runs
//! Each request becomes a `chat` or `completion` task on the coordinator, submitted in process
//! with the API key as requester (so scheduling is fair between keys). The local worker runs it
//! when the node has the model and a free slot; otherwise it waits in the queue (and, with the
//! mesh, goes to a peer). Tokens come back as the task's events and are streamed to the client as
//! server-sent events. A client that disconnects cancels its task.
//!
//! # Who calls it
//! IDEs and OpenAI clients, with `Authorization: Bearer <key>`.

pub mod keys;
pub mod openai;
mod routes;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio_util::task::TaskTracker;
use tower_http::cors::{AllowOrigin, CorsLayer};

use self::keys::ApiKeys;
use crate::config::Config;
use crate::coordinator::state::CoordinatorState;
use crate::health::NodeHealth;
use crate::http::ApiError;
use crate::identity::KeyId;
use crate::inference::Inference;
use crate::metrics::{Metrics, ProcessMetrics};
use crate::security::ratelimit::RateLimits;
use crate::security::{Principal, Role};

/// The authenticated caller: its API key's hash stands in for a signing key.
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Principal);

#[derive(Default)]
struct IdeMetrics {
    requests: Counter,
    unauthorized: Counter,
    cancelled_by_disconnect: Counter,
}

/// State shared by the IDE handlers.
#[derive(Clone)]
pub struct Ctx {
    state: CoordinatorState,
    inference: Inference,
    keys: ApiKeys,
    limits: Arc<RateLimits>,
    tracker: TaskTracker,
    task_timeout: std::time::Duration,
    metrics: Arc<IdeMetrics>,
    mesh: crate::mesh::service::MeshSlot,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ide::Ctx")
    }
}

/// The key in `Authorization: Bearer`, `x-api-key` or `api-key`.
fn presented_key(req: &Request) -> Option<&str> {
    let h = req.headers();
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        return v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim);
    }
    ["x-api-key", "api-key"]
        .iter()
        .find_map(|n| h.get(*n).and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// Middleware: API-key authentication and the per-key rate limit.
async fn authenticate(State(ctx): State<Ctx>, mut req: Request, next: Next) -> Response {
    let Some((hash, _)) = presented_key(&req).and_then(|k| ctx.keys.check(k)) else {
        ctx.metrics.unauthorized.inc();
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "Incorrect or missing API key. Send `Authorization: Bearer <key>`; create a key with `edgecoder apikey create`.",
        )
        .into_response();
    };
    let key = KeyId(hash);
    if let Err(wait) = ctx.limits.check_key(&key) {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "Too many requests for this API key.",
        )
        .retry_after(wait)
        .into_response();
    }
    ctx.metrics.requests.inc();
    req.extensions_mut().insert(Caller(Principal {
        key,
        role: Role::Client,
    }));
    next.run(req).await
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-api-key"),
            header::HeaderName::from_static("api-key"),
            header::HeaderName::from_static("openai-organization"),
            header::HeaderName::from_static("openai-project"),
            header::HeaderName::from_static("x-stainless-os"),
            header::HeaderName::from_static("x-stainless-lang"),
            header::HeaderName::from_static("x-stainless-package-version"),
            header::HeaderName::from_static("x-stainless-runtime"),
            header::HeaderName::from_static("x-stainless-runtime-version"),
            header::HeaderName::from_static("x-stainless-arch"),
            header::HeaderName::from_static("x-stainless-retry-count"),
            header::HeaderName::from_static("x-stainless-timeout"),
        ])
        .max_age(std::time::Duration::from_secs(3600))
}

/// Builds the IDE provider. Creates the first API key (and logs it, once) when there is none.
///
/// # Errors
/// Store failures while reading or creating keys.
#[allow(clippy::too_many_arguments)]
pub async fn spawn(
    cfg: &Config,
    keys: ApiKeys,
    state: CoordinatorState,
    inference: Inference,
    health: Arc<NodeHealth>,
    process: Arc<ProcessMetrics>,
    limits: Arc<RateLimits>,
    tracker: TaskTracker,
    mesh: crate::mesh::service::MeshSlot,
) -> Result<Router, crate::store::StoreError> {
    if keys.is_empty() {
        let k = keys.create("default").await?;
        // Shown once: only its hash is kept. Visible at the default log level on purpose.
        tracing::warn!(
            api_key = %k.key,
            id = %k.record.id,
            "ide.first_boot created the IDE API key; it is shown only now. Configure editors with base URL http://<this box>:{}/v1 and this key; manage keys with `edgecoder apikey`",
            cfg.ide.listen.port
        );
    }
    let metrics = Arc::new(IdeMetrics::default());
    let mut registry = Registry::default();
    registry.register(
        "edgecoder_ide_requests",
        "Authenticated /v1 requests",
        metrics.requests.clone(),
    );
    registry.register(
        "edgecoder_ide_unauthorized",
        "Requests refused for a missing or wrong API key",
        metrics.unauthorized.clone(),
    );
    registry.register(
        "edgecoder_ide_cancelled_by_disconnect",
        "Tasks cancelled because their client went away",
        metrics.cancelled_by_disconnect.clone(),
    );
    let ctx = Ctx {
        state,
        inference,
        keys,
        limits: limits.clone(),
        tracker,
        task_timeout: cfg.ide.task_timeout,
        metrics,
        mesh,
    };
    let api = Router::new()
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{*id}", get(routes::model))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/completions", post(routes::completions))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            authenticate,
        ))
        .with_state(ctx)
        .layer(axum::extract::DefaultBodyLimit::max(
            usize::try_from(cfg.http.max_body).unwrap_or(usize::MAX),
        ));
    let metrics = Metrics::new(registry, process);
    let router = crate::http::base_router(
        "ide",
        health,
        metrics,
        limits,
        Arc::new(|| serde_json::json!({})),
        api,
    )
    .layer(cors(&cfg.ide.cors_origins));
    Ok(router)
}
