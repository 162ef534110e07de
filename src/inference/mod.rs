//! The inference service (:4302, bound to 127.0.0.1): the model store, local llama.cpp
//! generation, and an Ollama proxy.
//!
//! # What it owns
//! * [`models::ModelStore`]: GGUF files and their records; pulls and adds.
//! * the llama.cpp engine (`engine`, behind the `llama` feature): loaded models, slots, queues;
//! * an optional [`ollama::OllamaClient`] when `inference.ollama_url` is set;
//! * the routes: `GET /models`, `GET|DELETE /models/{name}`, `POST /models/{name}/load|unload`,
//!   `POST /models/pull` (NDJSON progress), `POST /models/add`, `POST /generate` (NDJSON events),
//!   plus `/health`, `/status`, `/metrics`.
//!
//! # Who calls it
//! Local services only, with signed requests: the node's own key (the CLI) and the local
//! worker's key. Other services in the process use the [`Inference`] handle directly.
//!
//! A request for a model in the local store runs on llama.cpp (loaded on first use, unloaded after
//! `inference.keep_alive` idle); any other name is looked up in Ollama.

pub mod api;
pub mod catalog;
#[cfg(feature = "llama")]
pub mod engine;
mod error;
pub mod gguf;
pub mod models;
pub mod ollama;
mod routes;
pub mod stream;
pub mod template;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::api::*;
pub use self::error::InferenceError;
use self::models::ModelStore;
use self::ollama::OllamaClient;
use crate::config::Config;
use crate::health::NodeHealth;
use crate::identity::KeyId;
use crate::metrics::{Metrics, ProcessMetrics};
use crate::security::ratelimit::RateLimits;
use crate::security::{KeyResolver, Role, Verifier};
use crate::store::Store;

/// How often idle models are checked for unloading.
const IDLE_CHECK: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenLabels {
    backend: &'static str,
    outcome: &'static str,
}

#[derive(Default)]
struct InferenceMetrics {
    generations: Family<GenLabels, Counter>,
    tokens: Counter,
    rejected_busy: Counter,
}

struct Inner {
    models: ModelStore,
    #[cfg(feature = "llama")]
    engine: engine::LlamaEngine,
    ollama: Option<OllamaClient>,
    #[cfg_attr(not(feature = "llama"), allow(dead_code))]
    max_loaded: usize,
    #[cfg_attr(not(feature = "llama"), allow(dead_code))]
    keep_alive: Duration,
    /// Loads are serialised: two requests for an unloaded model load it once.
    #[cfg_attr(not(feature = "llama"), allow(dead_code))]
    loading: tokio::sync::Mutex<()>,
    tracker: TaskTracker,
    metrics: InferenceMetrics,
}

/// Handle to the inference service; cheap to clone.
#[derive(Clone)]
pub struct Inference(Arc<Inner>);

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inference")
    }
}

impl Inference {
    /// The model store.
    pub fn models(&self) -> &ModelStore {
        &self.0.models
    }

    /// Every model any backend offers.
    pub async fn list(&self) -> Vec<ModelView> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        match self.0.models.list() {
            Ok(recs) => {
                for r in recs {
                    names.insert(r.name.clone());
                    out.push(ModelView {
                        loaded: self.is_loaded(&r.name),
                        name: r.name,
                        backend: "llama".into(),
                        size: Some(r.size),
                        info: Some(r.info),
                        sha256: Some(r.sha256),
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "inference.list store failed"),
        }
        if let Some(o) = &self.0.ollama {
            match o.models().await {
                Ok(ms) => {
                    for m in ms.into_iter().filter(|m| !names.contains(&m.name)) {
                        out.push(ModelView {
                            name: m.name,
                            backend: "ollama".into(),
                            loaded: false,
                            size: m.size,
                            info: None,
                            sha256: None,
                        });
                    }
                }
                Err(e) => tracing::debug!(error = %e, "inference.list ollama unavailable"),
            }
        }
        out
    }

    fn is_loaded(&self, name: &str) -> bool {
        #[cfg(feature = "llama")]
        {
            self.0.engine.get(name).is_some()
        }
        #[cfg(not(feature = "llama"))]
        {
            let _ = name;
            false
        }
    }

    /// Loads a stored model (no-op if loaded).
    ///
    /// # Errors
    /// Unknown model, invalid file, load failure, or no local backend.
    pub async fn load(&self, name: &str) -> Result<(), InferenceError> {
        #[cfg(feature = "llama")]
        {
            self.ensure_loaded(name).await.map(|_| ())
        }
        #[cfg(not(feature = "llama"))]
        {
            let _ = name;
            Err(InferenceError::NoLocalBackend)
        }
    }

    #[cfg(feature = "llama")]
    async fn ensure_loaded(&self, name: &str) -> Result<Arc<engine::Loaded>, InferenceError> {
        if let Some(m) = self.0.engine.get(name) {
            return Ok(m);
        }
        let rec = self
            .0
            .models
            .get(name)?
            .ok_or_else(|| InferenceError::ModelNotFound(name.to_string()))?;
        let _one = self.0.loading.lock().await;
        if let Some(m) = self.0.engine.get(name) {
            return Ok(m);
        }
        // Make room: unload the least recently used idle model.
        let loaded = self.0.engine.loaded();
        if loaded.len() >= self.0.max_loaded {
            let victim = loaded
                .iter()
                .filter(|m| m.idle())
                .max_by(|a, b| a.status().idle_secs.total_cmp(&b.status().idle_secs));
            match victim {
                Some(v) => {
                    self.0.engine.unload(&v.name);
                }
                None => {
                    return Err(InferenceError::Busy(format!(
                        "{} models are loaded and busy (inference.max_loaded_models)",
                        loaded.len()
                    )));
                }
            }
        }
        let path = self.0.models.path(name);
        let this = self.clone();
        let n = name.to_string();
        tokio::task::spawn_blocking(move || this.0.engine.load(&n, &path, rec.info))
            .await
            .map_err(|e| InferenceError::Engine(e.to_string()))?
            .map_err(InferenceError::from)
    }

    /// Unloads a model; returns whether it was loaded.
    pub fn unload(&self, name: &str) -> bool {
        #[cfg(feature = "llama")]
        {
            self.0.engine.unload(name)
        }
        #[cfg(not(feature = "llama"))]
        {
            let _ = name;
            false
        }
    }

    /// Starts a generation. The receiver yields `start`, `token`s, then `done` or `error`;
    /// dropping it (or cancelling) stops the generation.
    ///
    /// # Errors
    /// Invalid request, unknown model, busy model, backend failure.
    pub async fn generate(
        &self,
        req: GenerateRequest,
        cancel: CancellationToken,
    ) -> Result<Generation, InferenceError> {
        req.validate().map_err(InferenceError::Invalid)?;
        let local = self.0.models.get(&req.model)?.is_some();
        let (backend, rx) = if local {
            #[cfg(feature = "llama")]
            {
                let mut tries = 0;
                loop {
                    let loaded = self.ensure_loaded(&req.model).await?;
                    let prompt = loaded.prompt_for(&req)?;
                    let sampling = engine::Sampling::from_request(&req);
                    match loaded.submit(prompt, sampling, cancel.clone()) {
                        Ok(rx) => break ("llama", rx),
                        // Unloaded (idle timer, an unload call) between lookup and submit: load
                        // it again once rather than failing the request.
                        Err(engine::EngineError::Unloaded(_)) if tries == 0 => tries += 1,
                        Err(e) => {
                            if matches!(e, engine::EngineError::Busy { .. }) {
                                self.0.metrics.rejected_busy.inc();
                            }
                            return Err(e.into());
                        }
                    }
                }
            }
            #[cfg(not(feature = "llama"))]
            {
                let _ = cancel;
                return Err(InferenceError::NoLocalBackend);
            }
        } else if let Some(o) = &self.0.ollama {
            ("ollama", o.generate(&req, cancel).await?)
        } else {
            return Err(InferenceError::ModelNotFound(req.model.clone()));
        };
        Ok(Generation {
            rx,
            inference: self.clone(),
            backend,
            ended: false,
        })
    }

    fn record(&self, backend: &'static str, ev: &GenEvent) {
        let outcome = match ev {
            GenEvent::Done {
                finish_reason,
                usage,
                ..
            } => {
                self.0
                    .metrics
                    .tokens
                    .inc_by(u64::from(usage.completion_tokens));
                match finish_reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::Cancelled => "cancelled",
                }
            }
            GenEvent::Error { .. } => "error",
            _ => return,
        };
        self.0
            .metrics
            .generations
            .get_or_create(&GenLabels { backend, outcome })
            .inc();
    }

    /// What `/status` reports.
    pub fn status(&self) -> serde_json::Value {
        #[cfg(feature = "llama")]
        let loaded: Vec<serde_json::Value> = self
            .0
            .engine
            .loaded()
            .iter()
            .map(|m| serde_json::to_value(m.status()).unwrap_or_default())
            .collect();
        #[cfg(not(feature = "llama"))]
        let loaded: Vec<serde_json::Value> = Vec::new();
        let installed = self.0.models.list().map(|l| l.len()).unwrap_or(0);
        let mut backends = Vec::new();
        if cfg!(feature = "llama") {
            backends.push(serde_json::json!({"name": "llama"}));
        }
        if let Some(o) = &self.0.ollama {
            backends.push(serde_json::json!({"name": "ollama", "url": o.url()}));
        }
        let mut v = serde_json::json!({
            "backends": backends,
            "installed_models": installed,
            "loaded": loaded,
        });
        if installed == 0 && self.0.ollama.is_none() {
            v["hint"] =
                "no model installed: `edgecoder model pull URL` or `edgecoder model add FILE.gguf`"
                    .into();
        }
        v
    }

    /// Unloads models idle longer than `keep_alive`.
    pub fn unload_idle(&self) {
        #[cfg(feature = "llama")]
        for m in self.0.engine.loaded() {
            let st = m.status();
            if m.idle() && st.idle_secs >= self.0.keep_alive.as_secs_f64() {
                self.0.engine.unload(&m.name);
            }
        }
    }
}

/// A running generation: its events, counted into the metrics as they pass (no relay task, so a
/// token crosses one channel between the engine thread and its consumer).
#[derive(Debug)]
pub struct Generation {
    rx: mpsc::Receiver<GenEvent>,
    inference: Inference,
    backend: &'static str,
    ended: bool,
}

impl Generation {
    /// The next event; `None` after the last.
    pub async fn recv(&mut self) -> Option<GenEvent> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next event.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<GenEvent>> {
        let polled = self.rx.poll_recv(cx);
        if let std::task::Poll::Ready(Some(ev)) = &polled
            && !self.ended
            && matches!(ev, GenEvent::Done { .. } | GenEvent::Error { .. })
        {
            self.ended = true;
            self.inference.record(self.backend, ev);
        }
        polled
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // The consumer left before the end (client disconnected, task cancelled): the backend
        // stops on its own; count it as cancelled.
        if !self.ended {
            self.inference.record(
                self.backend,
                &GenEvent::Done {
                    finish_reason: FinishReason::Cancelled,
                    usage: Usage::default(),
                    timings: Timings::default(),
                },
            );
        }
    }
}

/// Keys allowed to call the inference service: the node (CLI) and its local worker.
struct InferenceKeys {
    node: KeyId,
    worker: Option<KeyId>,
}

impl KeyResolver for InferenceKeys {
    fn resolve(&self, key: &KeyId) -> Option<Role> {
        if *key == self.node {
            Some(Role::Node)
        } else if Some(*key) == self.worker {
            Some(Role::Agent)
        } else {
            None
        }
    }
}

/// A built inference service.
pub struct InferenceService {
    /// The handle.
    pub handle: Inference,
    /// Its routes.
    pub router: Router,
    /// Its background loop (idle unloading, first-boot pull); ends when `token` is cancelled.
    pub task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for InferenceService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InferenceService")
    }
}

/// Builds the inference service.
///
/// # Errors
/// The model directory cannot be created.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    cfg: &Config,
    store: Store,
    node_key: KeyId,
    worker_key: Option<KeyId>,
    nonces: Arc<crate::security::nonce::NonceCache>,
    health: Arc<NodeHealth>,
    process: Arc<ProcessMetrics>,
    limits: Arc<RateLimits>,
    tracker: TaskTracker,
    token: CancellationToken,
) -> Result<InferenceService, InferenceError> {
    let ic = &cfg.inference;
    let models = ModelStore::new(cfg.data_dir.join("models"), store.clone())?;
    let ollama = match &ic.ollama_url {
        Some(u) => Some(OllamaClient::new(u, tracker.clone())?),
        None => None,
    };
    let inner = Inner {
        models,
        #[cfg(feature = "llama")]
        engine: engine::LlamaEngine::new(engine::EngineConfig {
            threads: ic.threads,
            slots: ic.slots,
            queue_depth: ic.queue_depth,
            context: ic.context,
            batch: ic.batch,
            gpu_layers: ic.gpu_layers,
        }),
        ollama,
        max_loaded: ic.max_loaded_models,
        keep_alive: ic.keep_alive,
        loading: tokio::sync::Mutex::new(()),
        tracker,
        metrics: InferenceMetrics::default(),
    };
    let handle = Inference(Arc::new(inner));
    let verifier = Arc::new(Verifier::new(
        crate::security::VerifierConfig {
            window: cfg.security.signature_window,
            skew: cfg.security.clock_skew,
            max_body: usize::try_from(cfg.http.max_body).unwrap_or(usize::MAX),
        },
        nonces,
        limits.clone(),
        Arc::new(InferenceKeys {
            node: node_key,
            worker: worker_key,
        }),
        Some(store),
    ));
    let mut registry = Registry::default();
    let m = &handle.0.metrics;
    registry.register(
        "edgecoder_inference_generations",
        "Generations finished, by backend and outcome",
        m.generations.clone(),
    );
    registry.register(
        "edgecoder_inference_tokens",
        "Tokens generated",
        m.tokens.clone(),
    );
    registry.register(
        "edgecoder_inference_rejected_busy",
        "Requests refused because every slot and queue place was taken",
        m.rejected_busy.clone(),
    );
    verifier.register_metrics(&mut registry, "edgecoder_inference_auth");
    // The hardware detection's default model (the board's pick for its class, stepped down
    // until it fits the memory budget), for a first boot with nothing configured.
    let hw_default =
        crate::hw::current(process.hardware()).map(|h| h.capacity.default_model.clone());
    let metrics = Metrics::new(registry, process);
    let status_handle = handle.clone();
    let signed = Router::new()
        .route("/models", get(routes::list))
        .route("/models/{name}", get(routes::info).delete(routes::remove))
        .route("/models/{name}/load", post(routes::load))
        .route("/models/{name}/unload", post(routes::unload))
        .route("/models/add", post(routes::add))
        .route("/models/pull", post(routes::pull))
        .route("/generate", post(routes::generate))
        .with_state(handle.clone())
        .layer(axum::middleware::from_fn_with_state(
            verifier,
            crate::security::authenticate,
        ));
    // The per-IP limit and the JSON fallbacks wrap the signed routes too.
    let router = crate::http::base_router(
        "inference",
        health,
        metrics,
        limits,
        Arc::new(move || status_handle.status()),
        signed,
    );

    let bg = handle.clone();
    let auto_pull = ic.auto_pull && cfg!(feature = "llama");
    let default_model = ic.default_model.clone();
    let task = Box::pin(async move {
        if auto_pull {
            first_boot_pull(&bg, &default_model, hw_default.as_deref(), &token).await;
        }
        let mut t = tokio::time::interval(IDLE_CHECK);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = t.tick() => bg.unload_idle(),
                _ = token.cancelled() => return,
            }
        }
    });
    Ok(InferenceService {
        handle,
        router,
        task,
    })
}

/// On a box with no model, pulls the default model (`inference.default_model`, else the one the
/// hardware detection picked, else the catalog entry for its memory class), or says plainly how
/// to add one when that fails (no network, no space).
async fn first_boot_pull(
    inf: &Inference,
    default_model: &str,
    hw_default: Option<&str>,
    token: &CancellationToken,
) {
    match inf.models().list() {
        Ok(l) if l.is_empty() => {}
        _ => return,
    }
    let (url, name) = if default_model.is_empty() {
        let e = hw_default.and_then(catalog::by_name).unwrap_or_else(|| {
            catalog::default_for(catalog::class_for_memory(
                catalog::total_memory().unwrap_or(0),
            ))
        });
        (e.url.to_string(), Some(e.name.to_string()))
    } else if let Some(e) = catalog::by_name(default_model) {
        (e.url.to_string(), Some(e.name.to_string()))
    } else {
        (default_model.to_string(), None)
    };
    tracing::info!(url = %url, "inference.first_boot no model installed; pulling the default");
    let (tx, mut rx) = mpsc::channel(16);
    let pull = inf.models().pull(&url, None, name.as_deref(), &tx);
    let drain = async {
        while let Some(ev) = rx.recv().await {
            if let PullEvent::Progress {
                done,
                total: Some(t),
                ..
            } = ev
                && t > 0
                && done == t
            {
                tracing::info!(bytes = done, "inference.first_boot download complete");
            }
        }
    };
    let result = tokio::select! {
        r = pull => r,
        _ = drain => return,
        _ = token.cancelled() => return,
    };
    match result {
        Ok(rec) => tracing::info!(
            model = rec.name,
            size = rec.size,
            "inference.first_boot default model installed"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "inference.first_boot no model is installed and the default could not be downloaded; \
             the node runs without local models. Add one with `edgecoder model pull URL` or \
             `edgecoder model add FILE.gguf`"
        ),
    }
}
