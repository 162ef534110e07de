//! The coordinator (:4301): the durable task queue, the agent registry, and (later) the mesh
//! endpoints.
//!
//! # What it owns
//! Tasks, their events and results, and registered agents ([`state::CoordinatorState`]); the
//! background loop that expires leases and deadlines and reaps agents that stopped
//! heartbeating; the request verifier in front of every route that has a caller.
//!
//! # Who calls it
//! Agents (the local worker included) and clients over signed HTTP (see `docs/api/coordinator.md`);
//! `node.rs` calls [`spawn`] once. Other services get a [`state::CoordinatorState`] handle.

mod error;
pub mod model;
pub mod queue;
mod routes;
pub mod state;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

pub use self::error::CoordinatorError;
pub use self::routes::{IdentityView, seal_context};
use self::state::{CoordinatorState, StateConfig};
use crate::config::Config;
use crate::health::NodeHealth;
use crate::identity::{Identity, KeyId};
use crate::metrics::{Metrics, ProcessMetrics};
use crate::security::nonce::NonceCache;
use crate::security::ratelimit::RateLimits;
use crate::security::{KeyResolver, Role, Verifier, VerifierConfig};
use crate::store::{Store, StoreError};

/// How often expired replay-cache entries are swept (idle rate-limit buckets: see `node.rs`).
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Name under which the reaper reports progress to the watchdog.
pub const REAPER_LOOP: &str = "coordinator.reaper";

/// How often finished tasks past their retention are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Keys the coordinator knows: its node, admitted agents, allowed clients.
#[derive(Debug)]
pub struct CoordinatorKeys {
    node: KeyId,
    agents: HashSet<KeyId>,
    clients: HashSet<KeyId>,
    /// Live mesh members act as agents: they claim the tasks this node offers them.
    mesh: crate::mesh::service::MeshSlot,
}

impl KeyResolver for CoordinatorKeys {
    fn resolve(&self, key: &KeyId) -> Option<Role> {
        if *key == self.node {
            Some(Role::Node)
        } else if self.agents.contains(key) {
            Some(Role::Agent)
        } else if self.clients.contains(key) {
            Some(Role::Client)
        } else if self.mesh.get().is_some_and(|m| m.is_peer(key)) {
            Some(Role::Peer)
        } else {
            None
        }
    }
}

/// A background loop the caller must run (and treat as fatal if it ends before shutdown).
pub type Loop = (
    &'static str,
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
);

/// A built coordinator.
pub struct Coordinator {
    /// Handle to its state.
    pub state: CoordinatorState,
    /// Its routes.
    pub router: Router,
    /// Its request verifier (for counters).
    pub verifier: Arc<Verifier>,
    /// Its background loops; each returns only when `token` is cancelled.
    pub loops: Vec<Loop>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Builds the coordinator and restores its queue from the store. Its background loops are
/// returned for the caller to run; they stop when `token` is cancelled.
///
/// # Errors
/// Store failures while restoring.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    cfg: &Config,
    store: Store,
    identity: &Identity,
    local_worker: Option<KeyId>,
    health: Arc<NodeHealth>,
    process: Arc<ProcessMetrics>,
    limits: Arc<RateLimits>,
    nonces: Arc<NonceCache>,
    mesh: crate::mesh::service::MeshSlot,
    token: CancellationToken,
) -> Result<Coordinator, StoreError> {
    let state = CoordinatorState::load(
        StateConfig {
            coordinator: cfg.coordinator.clone(),
            heartbeat_interval: cfg.worker.heartbeat_interval,
        },
        store.clone(),
        health.clone(),
        local_worker,
        token.clone(),
    )?;
    let mut agents: HashSet<KeyId> = cfg.coordinator.agent_keys.iter().copied().collect();
    agents.extend(local_worker);
    let keys = CoordinatorKeys {
        node: identity.key_id(),
        agents,
        clients: cfg.coordinator.client_keys.iter().copied().collect(),
        mesh: mesh.clone(),
    };
    let verifier = Arc::new(Verifier::new(
        VerifierConfig {
            window: cfg.security.signature_window,
            skew: cfg.security.clock_skew,
            max_body: usize::try_from(cfg.http.max_body).unwrap_or(usize::MAX),
        },
        nonces,
        limits.clone(),
        Arc::new(keys),
        Some(store),
    ));
    let mut registry = Registry::default();
    state.register_metrics(&mut registry);
    verifier.register_metrics(&mut registry, "edgecoder_coordinator_auth");
    let metrics = Metrics::new(registry, process.clone());

    let health_for_reaper = health.clone();
    let ctx = routes::Ctx {
        state: state.clone(),
        health,
        identity: Arc::new(IdentityView {
            node_id: identity.node_id().to_string(),
            ed25519: identity.key_id().to_string(),
            x25519: URL_SAFE_NO_PAD.encode(identity.x25519_public().as_bytes()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            mesh: None,
        }),
        mesh: mesh.clone(),
        process: process.clone(),
    };

    let signed = Router::new()
        .route("/tasks", post(routes::submit).get(routes::list))
        .route("/tasks/{id}", get(routes::get).delete(routes::cancel))
        .route("/tasks/{id}/events", post(routes::post_events))
        .route(
            "/tasks/{id}/result",
            post(routes::post_result).get(routes::result),
        )
        .route("/agents/register", post(routes::register))
        .route("/agents/heartbeat", post(routes::heartbeat))
        .route("/agents/claim", post(routes::claim))
        .route("/agents", get(routes::agents))
        .layer(axum::middleware::from_fn_with_state(
            crate::http::TimeLimit {
                base: cfg.http.request_timeout,
                max_wait: cfg.coordinator.max_wait,
            },
            crate::http::time_limit,
        ))
        // Event streams last as long as their task; keep-alives detect dead clients.
        .route("/tasks/{id}/events", get(routes::events))
        .layer(axum::middleware::from_fn_with_state(
            verifier.clone(),
            crate::security::authenticate,
        ));
    let metrics_state = state.clone();
    let open = Router::new()
        .route("/health", get(routes::health))
        .route("/status", get(routes::status))
        .route("/identity", get(routes::identity))
        .route(
            "/metrics",
            get(move || {
                metrics_state.refresh_gauges();
                crate::http::metrics_handler(axum::extract::State(metrics.clone()))
            }),
        );
    let router = signed
        .merge(open)
        .with_state(ctx)
        .merge(crate::mesh::service::router(mesh))
        .fallback(crate::http::not_found_fallback)
        .method_not_allowed_fallback(crate::http::method_not_allowed_fallback)
        .layer(axum::middleware::from_fn_with_state(
            limits,
            crate::http::limit_by_ip,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            usize::try_from(cfg.http.max_body).unwrap_or(usize::MAX),
        ));

    let agent_check = (cfg.coordinator.agent_timeout / 3).max(Duration::from_millis(100));
    let loops: Vec<Loop> = vec![
        (
            REAPER_LOOP,
            Box::pin(reaper(
                state.clone(),
                health_for_reaper,
                agent_check,
                token.clone(),
            )),
        ),
        (
            "coordinator.sweeper",
            Box::pin(sweeper(state.clone(), verifier.clone(), token)),
        ),
    ];
    Ok(Coordinator {
        state,
        router,
        verifier,
        loops,
    })
}

/// Expires leases and deadlines when they lapse and reaps silent agents; sleeps until the next
/// thing is due, so an idle node wakes only every `agent_check`.
async fn reaper(
    state: CoordinatorState,
    health: Arc<NodeHealth>,
    agent_check: Duration,
    token: CancellationToken,
) {
    loop {
        let next = match state.tick().await {
            Ok(n) => {
                health.mark_progress(REAPER_LOOP);
                n
            }
            Err(e) => {
                tracing::error!(error = %e, "coordinator.reaper tick failed");
                None
            }
        };
        let now = crate::clock::now_ms();
        let until_next = next.map_or(agent_check, |t| {
            Duration::from_millis(t.saturating_sub(now))
        });
        let sleep = until_next.clamp(Duration::from_millis(5), agent_check);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = token.cancelled() => return,
        }
    }
}

async fn sweeper(state: CoordinatorState, verifier: Arc<Verifier>, token: CancellationToken) {
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since_purge = PURGE_INTERVAL;
    loop {
        tokio::select! {
            _ = sweep.tick() => {}
            _ = token.cancelled() => return,
        }
        verifier.nonces().prune(crate::clock::now_ms() / 1000);
        since_purge += SWEEP_INTERVAL;
        if since_purge >= PURGE_INTERVAL {
            since_purge = Duration::ZERO;
            match state.purge_old().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    tasks = n,
                    "coordinator.purge removed finished tasks past retention"
                ),
                Err(e) => tracing::warn!(error = %e, "coordinator.purge failed"),
            }
        }
    }
}
