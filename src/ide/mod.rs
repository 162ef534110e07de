//! The IDE provider (:4304): the OpenAI-compatible API for editors on the LAN.
//!
//! # What it owns
//! Today: its port, `/health`, `/status` and `/metrics`. The `/v1` API, API keys and CORS arrive
//! with the IDE work (see the project's issues).
//!
//! # Who calls it
//! IDEs and OpenAI clients on the LAN, with API keys.

use std::sync::Arc;

use axum::Router;
use prometheus_client::registry::Registry;

use crate::health::NodeHealth;
use crate::metrics::{Metrics, ProcessMetrics};
use crate::security::ratelimit::RateLimits;

/// Builds the IDE provider router.
pub fn router(
    health: Arc<NodeHealth>,
    process: Arc<ProcessMetrics>,
    limits: Arc<RateLimits>,
) -> Router {
    let metrics = Metrics::new(Registry::default(), process);
    crate::http::base_router(
        "ide",
        health,
        metrics,
        limits,
        Arc::new(|| serde_json::json!({})),
        Router::new(),
    )
}
