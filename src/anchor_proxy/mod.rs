//! The anchor proxy (`edgecoder anchor-proxy`, :4311 on 127.0.0.1): the one process that holds
//! bitcoind credentials and a wallet, and writes hashes into Bitcoin's chain for coordinators.
//!
//! # What it owns
//! A store of its own (`<data_dir>/anchor-proxy/store`, table `anchors`) mapping anchored data to
//! the transaction that carries it; the JSON-RPC client to bitcoind ([`bitcoind`]); the checks
//! on the wallet's transaction and the once-only broadcast ([`anchors`]).
//!
//! # Who calls it
//! Coordinators, with requests signed by a key listed in `anchor_proxy.client_keys` (the same
//! RFC 9421 profile as every signed port, replays refused across restarts). `GET /health` and
//! `GET /metrics` need no signature.
//!
//! # Routes
//! - `POST /anchors` `{"data": "<hex, 1-80 bytes>"}`: 201 with the new anchor, 200 with the
//!   existing one when the same data was anchored before (no second transaction).
//! - `GET /anchors/{data}`: the anchor with its confirmations, 404 when unknown.
//! - `GET /health`: bitcoind reachable, on the configured chain, wallet loaded (200), else 503.

pub mod anchors;
pub mod bitcoind;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use self::anchors::{AnchorError, AnchorView, Anchors};
use self::bitcoind::{Auth, Bitcoind};
use crate::config::Config;
use crate::http::{ApiError, JsonBody};
use crate::identity::KeyId;
use crate::metrics::{Metrics, ProcessMetrics};
use crate::security::nonce::NonceCache;
use crate::security::ratelimit::RateLimits;
use crate::security::{KeyResolver, Principal, Role, Verifier, VerifierConfig};
use crate::standalone::Deployment;
use crate::store::Store;

/// How long `/health` waits for bitcoind.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The file, in the proxy's directory, that says where it listens (for the CLI and tests).
pub const INFO_FILE: &str = "anchor-proxy.json";

/// Boot failures.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A configuration problem found at boot (exit 78: restarting cannot help).
    #[error("{0}")]
    Config(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Where a proxy whose data directory is `data_dir` writes its [`ServiceInfo`](crate::standalone::ServiceInfo).
pub fn info_file(data_dir: &Path) -> PathBuf {
    state_dir(data_dir).join(INFO_FILE)
}

/// The proxy's own directory under the data directory, so that it can share a data directory
/// with a node without touching the node's store.
pub fn state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("anchor-proxy")
}

/// Only the configured coordinators may anchor.
struct ClientKeys(Vec<KeyId>);

impl KeyResolver for ClientKeys {
    fn resolve(&self, key: &KeyId) -> Option<Role> {
        self.0.contains(key).then_some(Role::Client)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone)]
struct AppState {
    anchors: Arc<Anchors>,
    outcomes: Family<OutcomeLabel, Counter>,
    wallet: String,
}

/// `POST /anchors`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnchorRequest {
    /// The bytes to anchor, hex (a checkpoint hash: 32 bytes; at most 80).
    pub data: String,
}

async fn post_anchor(
    State(s): State<AppState>,
    Extension(caller): Extension<Principal>,
    JsonBody(req): JsonBody<AnchorRequest>,
) -> Response {
    let data = match anchors::parse_data(&req.data) {
        Ok(d) => d,
        Err(e) => {
            s.outcomes
                .get_or_create(&OutcomeLabel { outcome: e.label() })
                .inc();
            return e.to_api().param("data").into_response();
        }
    };
    // Run to the end even if the caller goes away: a half-done anchor (funded, signed, not yet
    // recorded) must not be cut between two steps.
    let a = s.anchors.clone();
    let job = tokio::spawn(async move { a.anchor(data, caller.key).await });
    let outcome = match job.await {
        Ok(r) => r,
        Err(e) => return ApiError::internal(&e).into_response(),
    };
    match outcome {
        Ok((record, created)) => {
            let label = if created { "broadcast" } else { "existing" };
            s.outcomes
                .get_or_create(&OutcomeLabel { outcome: label })
                .inc();
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(AnchorView::from(&record))).into_response()
        }
        Err(e) => {
            s.outcomes
                .get_or_create(&OutcomeLabel { outcome: e.label() })
                .inc();
            if !matches!(e, AnchorError::RateLimited { .. } | AnchorError::BadData(_)) {
                tracing::warn!(error = %e, "anchor.failed");
            }
            e.to_api().into_response()
        }
    }
}

async fn get_anchor(State(s): State<AppState>, UrlPath(data): UrlPath<String>) -> Response {
    let data = match anchors::parse_data(&data) {
        Ok(d) => d,
        Err(e) => return e.to_api().into_response(),
    };
    match s.anchors.view(&data).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => ApiError::new(
            StatusCode::NOT_FOUND,
            "anchor_not_found",
            "no anchor carries this data",
        )
        .into_response(),
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

/// `GET /health`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProxyHealth {
    /// `ok`, or `unavailable` when bitcoind cannot take an anchor now.
    pub status: String,
    /// `anchor_proxy`.
    pub service: String,
    /// The chain configured (`anchor_proxy.network`).
    pub chain: String,
    /// bitcoind's block height, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<u64>,
    /// The wallet bitcoind reports, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wallet: Option<String>,
    /// What is wrong, when something is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// This build.
    pub version: String,
}

async fn health(State(s): State<AppState>) -> Response {
    let probe = async {
        let info = s
            .anchors
            .rpc()
            .chain_info()
            .await
            .map_err(|e| e.to_string())?;
        if info.initialblockdownload {
            return Err(format!(
                "bitcoind is still syncing (block {} of {}): the wallet's coins are not known yet",
                info.blocks, info.headers
            ));
        }
        if info.chain != s.anchors.chain() {
            return Err(format!(
                "bitcoind is on chain {:?}, this proxy is configured for {:?}",
                info.chain,
                s.anchors.chain()
            ));
        }
        let wallet = s.anchors.rpc().wallet_name().await.map_err(|e| {
            format!(
                "wallet {:?}: {e}",
                if s.wallet.is_empty() {
                    "(default)"
                } else {
                    &s.wallet
                }
            )
        })?;
        Ok::<_, String>((info, wallet))
    };
    let mut h = ProxyHealth {
        status: "ok".into(),
        service: "anchor_proxy".into(),
        chain: s.anchors.chain().into(),
        blocks: None,
        wallet: None,
        problem: None,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let result = tokio::time::timeout(HEALTH_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err("bitcoind did not answer within 5s".into()));
    match result {
        Ok((info, wallet)) => {
            h.blocks = Some(info.blocks);
            h.wallet = Some(wallet);
            Json(h).into_response()
        }
        Err(problem) => {
            h.status = "unavailable".into();
            h.problem = Some(problem);
            (StatusCode::SERVICE_UNAVAILABLE, Json(h)).into_response()
        }
    }
}

fn rpc_client(cfg: &Config) -> Result<Bitcoind, ProxyError> {
    let a = &cfg.anchor_proxy;
    let auth = match (&a.rpc_cookie_file, a.rpc_user.is_empty()) {
        (Some(p), _) => Auth::Cookie(p.clone()),
        (None, false) => Auth::UserPass(a.rpc_user.clone(), a.rpc_password.clone()),
        (None, true) => Auth::None,
    };
    Bitcoind::new(&a.rpc_url, &a.wallet, auth, a.rpc_timeout)
        .map_err(|e| ProxyError::Other(e.to_string()))
}

/// Runs the anchor proxy until SIGTERM/SIGINT or `stop`.
///
/// # Errors
/// [`ProxyError::Config`] for problems restarting cannot fix (no client keys, bitcoind on
/// another chain), [`ProxyError::Other`] for the rest.
pub async fn run(cfg: Config, stop: CancellationToken) -> Result<(), ProxyError> {
    let a = &cfg.anchor_proxy;
    if a.client_keys.is_empty() {
        return Err(ProxyError::Config(
            "anchor_proxy.client_keys is empty: no coordinator could anchor; add their keys (edgecoder keygen prints one)"
                .into(),
        ));
    }
    let network = bitcoin::Network::from_core_arg(&a.network)
        .map_err(|e| ProxyError::Config(format!("anchor_proxy.network: {e}")))?;
    let dir = state_dir(&cfg.data_dir);
    let _lock = crate::node::lock_data_dir(&dir).map_err(|e| ProxyError::Other(e.to_string()))?;
    let other = |e: &dyn std::fmt::Display| ProxyError::Other(e.to_string());
    let store = Store::open(&dir.join("store"), &cfg.store).map_err(|e| other(&e))?;
    let anchors = Arc::new(
        Anchors::new(
            store.clone(),
            rpc_client(&cfg)?,
            network,
            (a.fee_rate > 0).then_some(a.fee_rate),
            a.max_fee,
            a.max_per_hour,
        )
        .map_err(|e| other(&e))?,
    );
    // A bitcoind on the wrong chain is a configuration error; one that is down is not (it may
    // be starting too): requests wait for it.
    match anchors.check_chain().await {
        Ok(()) => tracing::info!(chain = anchors.chain(), "anchor_proxy.bitcoind reachable"),
        Err(e @ AnchorError::ChainMismatch { .. }) => {
            return Err(ProxyError::Config(e.to_string()));
        }
        Err(e) => tracing::warn!(error = %e, "anchor_proxy.bitcoind not reachable yet"),
    }

    let limits = Arc::new(RateLimits::from_config(&cfg.security));
    let nonces = Arc::new(
        NonceCache::load(
            store.clone(),
            cfg.security.nonce_cache_max,
            crate::clock::now_ms() / 1000,
        )
        .map_err(|e| other(&e))?,
    );
    let verifier = Arc::new(Verifier::new(
        VerifierConfig {
            window: cfg.security.signature_window,
            skew: cfg.security.clock_skew,
            max_body: usize::try_from(cfg.http.max_body).unwrap_or(usize::MAX),
        },
        nonces.clone(),
        limits.clone(),
        Arc::new(ClientKeys(a.client_keys.clone())),
        Some(store.clone()),
    ));
    let mut registry = Registry::default();
    verifier.register_metrics(&mut registry, "edgecoder_anchor_proxy_auth");
    let outcomes = Family::<OutcomeLabel, Counter>::default();
    registry.register(
        "edgecoder_anchor_proxy_requests",
        "Anchor requests by outcome",
        outcomes.clone(),
    );
    let metrics = Metrics::new(registry, ProcessMetrics::new(Some(store.clone())));
    let state = AppState {
        anchors,
        outcomes,
        wallet: a.wallet.clone(),
    };
    let signed = Router::new()
        .route("/anchors", post(post_anchor))
        .route("/anchors/{data}", get(get_anchor))
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            verifier,
            crate::security::authenticate,
        ));
    let router = Router::new()
        .route("/health", get(health).with_state(state))
        .route(
            "/metrics",
            get(crate::http::metrics_handler).with_state(metrics),
        )
        .merge(signed)
        .fallback(crate::http::not_found_fallback)
        .method_not_allowed_fallback(crate::http::method_not_allowed_fallback)
        .layer(axum::middleware::from_fn_with_state(
            limits.clone(),
            crate::http::limit_by_ip,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            usize::try_from(cfg.http.max_body).unwrap_or(usize::MAX),
        ));

    let listener = crate::http::bind("anchor_proxy", cfg.addr(&a.listen))
        .await
        .map_err(|e| other(&e))?;
    tracing::info!(chain = network.to_core_arg(), "anchor_proxy.starting");
    let deployment = Deployment {
        name: "anchor_proxy",
        info_file: dir.join(INFO_FILE),
        store,
        drain: cfg.http.drain_timeout,
    };
    deployment
        .serve(listener, router, stop, move || {
            limits.retain_recent();
            nonces.prune(crate::clock::now_ms() / 1000);
            std::future::ready(())
        })
        .await
        .map_err(ProxyError::Other)
}
