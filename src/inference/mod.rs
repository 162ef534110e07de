//! The inference service (:4302, bound to 127.0.0.1): model routing, local llama.cpp, an Ollama
//! proxy.
//!
//! # What it owns
//! Today: its port, `/health`, `/status` and `/metrics`. The backends, the model store and the
//! generation API arrive with the inference work (see the project's issues); until then
//! `/status` reports that no backend is configured, and the worker runs only `probe` tasks.
//!
//! # Who calls it
//! Local services only (the worker and the IDE provider); it is never exposed to the mesh.

pub mod gguf;

use std::sync::Arc;

use axum::Router;
use prometheus_client::registry::Registry;

use crate::health::NodeHealth;
use crate::metrics::{Metrics, ProcessMetrics};
use crate::security::ratelimit::RateLimits;

/// Builds the inference router.
pub fn router(
    health: Arc<NodeHealth>,
    process: Arc<ProcessMetrics>,
    limits: Arc<RateLimits>,
) -> Router {
    let metrics = Metrics::new(Registry::default(), process);
    crate::http::base_router(
        "inference",
        health,
        metrics,
        limits,
        Arc::new(|| serde_json::json!({ "backends": [], "models": [] })),
    )
}
