//! The control plane (:4303, bound to 127.0.0.1): admin API, signed manifests, discovery, policy.
//!
//! # What it owns
//! Today: its port, `/health`, `/status` and `/metrics`. Manifests, approvals and the console
//! arrive with the control-plane work (see the project's issues).
//!
//! # Who calls it
//! Administrators, with signed requests or an admin token.

use std::sync::Arc;

use axum::Router;
use prometheus_client::registry::Registry;

use crate::health::NodeHealth;
use crate::metrics::{Metrics, ProcessMetrics};
use crate::security::ratelimit::RateLimits;

/// Builds the control-plane router.
pub fn router(
    health: Arc<NodeHealth>,
    process: Arc<ProcessMetrics>,
    limits: Arc<RateLimits>,
) -> Router {
    let metrics = Metrics::new(Registry::default(), process);
    crate::http::base_router(
        "control_plane",
        health,
        metrics,
        limits,
        Arc::new(|| serde_json::json!({})),
        Router::new(),
    )
}
