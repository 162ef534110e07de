//! The llama.cpp engine: loaded models, their slots, and generation on dedicated threads.
//!
//! # Threads and slots
//! The llama.cpp backend is initialised once per process. Each loaded model has `slots` OS
//! threads; each owns one llama context (its own KV cache) and takes jobs from the model's
//! bounded queue, so generation never runs on the async runtime. When every slot is busy and the
//! queue holds `queue_depth` jobs, [`Loaded::submit`] refuses with [`EngineError::Busy`] (the
//! HTTP layer answers 503 with Retry-After). Threads per slot: the configured thread count
//! (default: physical cores) divided among the slots, never llama.cpp's default of 4, which
//! collapses on small boxes when threads spin against each other.
//!
//! # Untrusted model files
//! Every file passes [`super::gguf::inspect`] before llama.cpp opens it (some malformed files
//! abort the process inside llama.cpp).
//!
//! # Cancellation
//! A job ends early when its token is cancelled or its event receiver is dropped (the HTTP client
//! went away): the slot checks both between tokens.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::api::*;
use super::gguf::GgufInfo;
use super::stream::TextStream;

/// Events buffered between a slot and its consumer; a slow consumer slows the slot rather than
/// growing memory.
const EVENT_BUFFER: usize = 64;

/// Engine failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// llama.cpp's backend could not start.
    #[error("llama.cpp backend failed to initialise: {0}")]
    Backend(String),
    /// The file failed validation before llama.cpp saw it.
    #[error("model {name} rejected: {reason}")]
    Invalid {
        /// Model.
        name: String,
        /// Why.
        reason: String,
    },
    /// llama.cpp could not load the file.
    #[error("llama.cpp could not load {name} (see the log for its reason)")]
    Load {
        /// Model.
        name: String,
    },
    /// A context could not be created (usually memory).
    #[error("could not create a context for {name}: {reason}")]
    Context {
        /// Model.
        name: String,
        /// Why.
        reason: String,
    },
    /// Every slot is busy and the queue is full.
    #[error("model {name} is busy: {slots} slots and {queue} queued requests")]
    Busy {
        /// Model.
        name: String,
        /// Slots.
        slots: usize,
        /// Queue depth.
        queue: usize,
    },
    /// The prompt could not be built.
    #[error("{0}")]
    Prompt(String),
    /// The model was unloaded while the request waited.
    #[error("model {0} was unloaded")]
    Unloaded(String),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Threads in total for a model's slots (0: physical cores).
    pub threads: u32,
    /// Concurrent generations per model.
    pub slots: u32,
    /// Requests waiting for a slot before new ones are refused.
    pub queue_depth: usize,
    /// Context length per slot (capped by the model's training context).
    pub context: u32,
    /// Prompt tokens evaluated per decode call.
    pub batch: u32,
    /// Layers offloaded to a GPU (0 on CPU-only builds).
    pub gpu_layers: u32,
}

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// llama.cpp's backend, initialised on first use (once per process).
///
/// # Errors
/// The backend failed to start.
pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    BACKEND
        .get_or_init(|| {
            // Model-load failures are only explained in llama.cpp's log: route it to tracing.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Backend(e.clone()))
}

/// Physical CPU cores (distinct core ids per package), falling back to logical CPUs.
pub fn physical_cores() -> u32 {
    let mut seen = std::collections::HashSet::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu") {
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with("cpu")
                || !name[3..].chars().all(|c| c.is_ascii_digit())
                || name.len() == 3
            {
                continue;
            }
            let topo = e.path().join("topology");
            let core = std::fs::read_to_string(topo.join("core_id")).unwrap_or_default();
            let pkg = std::fs::read_to_string(topo.join("physical_package_id")).unwrap_or_default();
            if !core.is_empty() {
                seen.insert((pkg.trim().to_string(), core.trim().to_string()));
            }
        }
    }
    match seen.len() {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        n => n as u32,
    }
}

/// How a prompt is turned into tokens.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Text; `special` parses control tokens (templated chat), `add_bos` prepends BOS.
    Text {
        /// The text.
        text: String,
        /// Parse special tokens in it.
        special: bool,
        /// Prepend BOS (if the model uses one).
        add_bos: bool,
    },
    /// Fill-in-the-middle: the model's FIM tokens around prefix and suffix.
    Fim {
        /// Before the cursor.
        prefix: String,
        /// After the cursor.
        suffix: String,
    },
}

/// Sampling settings of one job.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// Most tokens.
    pub max_tokens: u32,
    /// Temperature (0: greedy).
    pub temperature: f32,
    /// Top-p.
    pub top_p: f32,
    /// Top-k (0: off).
    pub top_k: i32,
    /// Seed.
    pub seed: u32,
    /// Stop strings.
    pub stop: Vec<String>,
}

impl Sampling {
    /// Settings from a request, with defaults.
    pub fn from_request(r: &GenerateRequest) -> Self {
        Sampling {
            max_tokens: r.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: r.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: r.top_p.unwrap_or(DEFAULT_TOP_P),
            top_k: r.top_k.unwrap_or(DEFAULT_TOP_K),
            seed: r
                .seed
                .unwrap_or_else(|| u32::from_le_bytes(crate::clock::random_bytes::<4>())),
            stop: r.stop.clone(),
        }
    }
}

struct Job {
    prompt: Prompt,
    sampling: Sampling,
    tx: mpsc::Sender<GenEvent>,
    cancel: CancellationToken,
    enqueued: Instant,
}

/// Recent throughput of a model.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Throughput {
    /// Generations finished.
    pub generations: u64,
    /// Tokens generated.
    pub tokens: u64,
    /// Tokens per second of the last generation.
    pub last_tokens_per_second: f64,
    /// Generations that stopped early because they were cancelled or their consumer left.
    pub cancelled: u64,
}

/// A loaded model.
pub struct Loaded {
    /// Store name.
    pub name: String,
    /// What the file holds.
    pub info: GgufInfo,
    model: Arc<LlamaModel>,
    tx: Mutex<Option<SyncSender<Job>>>,
    slots: usize,
    queue_depth: usize,
    busy: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    stats: Arc<Mutex<Throughput>>,
    last_used: Mutex<Instant>,
    n_ctx: u32,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Status of a loaded model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedStatus {
    /// Name.
    pub name: String,
    /// Slots.
    pub slots: usize,
    /// Busy slots.
    pub busy: usize,
    /// Requests waiting.
    pub queued: usize,
    /// Context per slot.
    pub context: u32,
    /// Throughput.
    pub throughput: Throughput,
    /// Seconds since last use.
    pub idle_secs: f64,
}

/// Creating contexts from one model on several threads at once is unsound in llama.cpp (it
/// mutates the model); slots create theirs one at a time under this lock.
static CONTEXT_LOCK: Mutex<()> = Mutex::new(());

impl Loaded {
    /// Queues a generation. The receiver yields `start`, `token`s and `done` (or `error`).
    ///
    /// # Errors
    /// [`EngineError::Busy`] when the queue is full, [`EngineError::Unloaded`].
    pub fn submit(
        &self,
        prompt: Prompt,
        sampling: Sampling,
        cancel: CancellationToken,
    ) -> Result<mpsc::Receiver<GenEvent>, EngineError> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let job = Job {
            prompt,
            sampling,
            tx,
            cancel,
            enqueued: Instant::now(),
        };
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = guard.as_ref() else {
            return Err(EngineError::Unloaded(self.name.clone()));
        };
        // Waiting requests beyond what the free slots are about to take count against the queue.
        let free = self.slots.saturating_sub(self.busy.load(Ordering::Relaxed));
        if self.queued.load(Ordering::Relaxed) >= self.queue_depth + free {
            return Err(EngineError::Busy {
                name: self.name.clone(),
                slots: self.slots,
                queue: self.queue_depth,
            });
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        match sender.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                Err(EngineError::Busy {
                    name: self.name.clone(),
                    slots: self.slots,
                    queue: self.queue_depth,
                })
            }
            Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                Err(EngineError::Unloaded(self.name.clone()))
            }
        }
    }

    /// The prompt for a request: chat messages through the model's template, a raw prompt, or
    /// fill-in-the-middle.
    ///
    /// # Errors
    /// A template that cannot render, or FIM on a model without FIM tokens.
    pub fn prompt_for(&self, r: &GenerateRequest) -> Result<Prompt, EngineError> {
        if let Some(prompt) = &r.prompt {
            if let Some(suffix) = &r.suffix {
                let v = self.model.vocab();
                if v.fim_pre().0 < 0 || v.fim_suf().0 < 0 || v.fim_mid().0 < 0 {
                    return Err(EngineError::Prompt(format!(
                        "model {} has no fill-in-the-middle tokens",
                        self.name
                    )));
                }
                return Ok(Prompt::Fim {
                    prefix: prompt.clone(),
                    suffix: suffix.clone(),
                });
            }
            return Ok(Prompt::Text {
                text: prompt.clone(),
                special: false,
                add_bos: true,
            });
        }
        let messages = r.messages.as_deref().unwrap_or_default();
        let text = self.render_chat(messages)?;
        // A template that writes the BOS text itself must not get a second BOS token.
        let bos_text = self.token_text(self.model.vocab().bos());
        let add_bos = bos_text.is_empty() || !text.starts_with(&bos_text);
        Ok(Prompt::Text {
            text,
            special: true,
            add_bos,
        })
    }

    fn token_text(&self, t: LlamaToken) -> String {
        if t.0 < 0 {
            return String::new();
        }
        String::from_utf8_lossy(&self.model.vocab().token_to_piece(t, true, None)).into_owned()
    }

    /// Renders chat messages: llama.cpp's built-in templates where they match, minijinja for the
    /// model's own Jinja otherwise, ChatML when the model has no template.
    ///
    /// # Errors
    /// A template that does not render.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let Some(source) = self.info.chat_template.as_deref() else {
            return Ok(super::template::chatml(messages));
        };
        let builtin = (|| {
            let tmpl = LlamaChatTemplate::new(source).ok()?;
            let chat: Vec<LlamaChatMessage> = messages
                .iter()
                .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
                .collect::<Result<_, _>>()
                .ok()?;
            self.model.apply_chat_template(&tmpl, &chat, true).ok()
        })();
        if let Some(text) = builtin {
            return Ok(text);
        }
        let v = self.model.vocab();
        super::template::render(
            source,
            messages,
            &self.token_text(v.bos()),
            &self.token_text(v.eos()),
        )
        .map_err(|e| EngineError::Prompt(e.to_string()))
    }

    /// Current status.
    pub fn status(&self) -> LoadedStatus {
        LoadedStatus {
            name: self.name.clone(),
            slots: self.slots,
            busy: self.busy.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            context: self.n_ctx,
            throughput: *self.stats.lock().unwrap_or_else(|p| p.into_inner()),
            idle_secs: self
                .last_used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                .as_secs_f64(),
        }
    }

    /// Whether no request is running or waiting.
    pub fn idle(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0 && self.queued.load(Ordering::Relaxed) == 0
    }

    fn close(&self) {
        // Dropping the sender ends the slot threads once the queue drains.
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Loaded models, by name.
pub struct LlamaEngine {
    cfg: EngineConfig,
    models: Mutex<HashMap<String, Arc<Loaded>>>,
}

impl std::fmt::Debug for LlamaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaEngine")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl LlamaEngine {
    /// An engine with no model loaded.
    pub fn new(cfg: EngineConfig) -> Self {
        LlamaEngine {
            cfg,
            models: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Loaded>>> {
        self.models.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A loaded model.
    pub fn get(&self, name: &str) -> Option<Arc<Loaded>> {
        self.lock().get(name).cloned()
    }

    /// Names of loaded models.
    pub fn loaded(&self) -> Vec<Arc<Loaded>> {
        self.lock().values().cloned().collect()
    }

    /// Unloads a model (running requests finish first). Returns whether it was loaded.
    pub fn unload(&self, name: &str) -> bool {
        match self.lock().remove(name) {
            Some(m) => {
                m.close();
                tracing::info!(model = name, "inference.unload");
                true
            }
            None => false,
        }
    }

    /// Loads a model file that has passed validation. Blocking: call it off the async runtime.
    ///
    /// # Errors
    /// Backend, load and context failures.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        info: GgufInfo,
    ) -> Result<Arc<Loaded>, EngineError> {
        if let Some(m) = self.get(name) {
            return Ok(m);
        }
        // Re-check the file: it may have changed since it was stored.
        let fresh = super::gguf::inspect(path).map_err(|e| EngineError::Invalid {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
        if fresh.file_size != info.file_size {
            return Err(EngineError::Invalid {
                name: name.to_string(),
                reason: "the file changed since it was added".into(),
            });
        }
        let backend = backend()?;
        let started = Instant::now();
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(self.cfg.gpu_layers)
            .with_use_mmap(true);
        let model = LlamaModel::load_from_file(backend, path, &params).map_err(|e| {
            tracing::warn!(model = name, error = %e, "inference.load failed");
            EngineError::Load {
                name: name.to_string(),
            }
        })?;
        let model = Arc::new(model);
        let slots = self.cfg.slots.max(1) as usize;
        let total_threads = if self.cfg.threads == 0 {
            physical_cores()
        } else {
            self.cfg.threads
        };
        let per_slot = (total_threads as usize / slots).max(1) as i32;
        let n_ctx = self.cfg.context.min(model.n_ctx_train()).max(64);
        // Room for every slot to have one job handed over plus the waiting queue.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(self.cfg.queue_depth + slots);
        let rx = Arc::new(Mutex::new(rx));
        let busy = Arc::new(AtomicUsize::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(Throughput::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        for i in 0..slots {
            let slot = Slot {
                model: model.clone(),
                rx: rx.clone(),
                busy: busy.clone(),
                queued: queued.clone(),
                stats: stats.clone(),
                n_ctx,
                n_batch: self.cfg.batch.max(32),
                threads: per_slot,
                name: name.to_string(),
            };
            let ready = ready_tx.clone();
            std::thread::Builder::new()
                .name(format!("llama-{i}"))
                .spawn(move || slot.run(backend, ready))
                .map_err(|e| EngineError::Context {
                    name: name.to_string(),
                    reason: e.to_string(),
                })?;
        }
        drop(ready_tx);
        for _ in 0..slots {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => {
                    drop(tx);
                    return Err(EngineError::Context {
                        name: name.to_string(),
                        reason,
                    });
                }
                Err(_) => {
                    return Err(EngineError::Context {
                        name: name.to_string(),
                        reason: "slot thread ended".into(),
                    });
                }
            }
        }
        let loaded = Arc::new(Loaded {
            name: name.to_string(),
            info,
            model,
            tx: Mutex::new(Some(tx)),
            slots,
            queue_depth: self.cfg.queue_depth,
            busy,
            queued,
            stats,
            last_used: Mutex::new(Instant::now()),
            n_ctx,
        });
        self.lock().insert(name.to_string(), loaded.clone());
        tracing::info!(
            model = name,
            slots,
            threads_per_slot = per_slot,
            context = n_ctx,
            ms = started.elapsed().as_millis() as u64,
            "inference.load"
        );
        Ok(loaded)
    }
}

/// Hands an event to the consumer, waiting while its buffer is full but giving up when the job
/// is cancelled or the consumer is gone (a blocked `blocking_send` would never see the cancel).
fn send(job: &Job, mut ev: GenEvent) -> Result<(), ()> {
    loop {
        match job.tx.try_send(ev) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(()),
            Err(mpsc::error::TrySendError::Full(back)) => {
                if job.cancel.is_cancelled() {
                    return Err(());
                }
                ev = back;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }
}

struct Slot {
    model: Arc<LlamaModel>,
    rx: Arc<Mutex<Receiver<Job>>>,
    busy: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    stats: Arc<Mutex<Throughput>>,
    n_ctx: u32,
    n_batch: u32,
    threads: i32,
    name: String,
}

impl Slot {
    fn run(
        self,
        backend: &'static LlamaBackend,
        ready: std::sync::mpsc::Sender<Result<(), String>>,
    ) {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.n_ctx))
            .with_n_batch(self.n_batch)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads)
            .with_no_perf(true);
        let ctx = {
            let _one_at_a_time = CONTEXT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            self.model.new_context(backend, params)
        };
        let mut ctx = match ctx {
            Ok(c) => {
                let _ = ready.send(Ok(()));
                c
            }
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        drop(ready);
        let mut batch = LlamaBatch::new(self.n_batch as usize, 1);
        loop {
            let job = {
                let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
                rx.recv()
            };
            let Ok(job) = job else { return };
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.busy.fetch_add(1, Ordering::Relaxed);
            ctx.clear_kv_cache();
            let result = self.generate(&mut ctx, &mut batch, &job);
            if let Err(e) = result {
                let _ = send(
                    &job,
                    GenEvent::Error {
                        code: "generation_failed".into(),
                        message: e,
                    },
                );
            }
            self.busy.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<LlamaToken>, String> {
        let v = self.model.vocab();
        let bos = v.should_add_bos() && v.bos().0 >= 0;
        Ok(match prompt {
            Prompt::Text {
                text,
                special,
                add_bos,
            } => {
                let mut t = v.tokenize(text.as_bytes(), false, *special);
                if *add_bos && bos {
                    t.insert(0, v.bos());
                }
                t
            }
            Prompt::Fim { prefix, suffix } => {
                let mut t = Vec::new();
                if bos {
                    t.push(v.bos());
                }
                t.push(v.fim_pre());
                t.extend(v.tokenize(prefix.as_bytes(), false, false));
                t.push(v.fim_suf());
                t.extend(v.tokenize(suffix.as_bytes(), false, false));
                t.push(v.fim_mid());
                t
            }
        })
    }

    fn generate(
        &self,
        ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
        batch: &mut LlamaBatch<'_>,
        job: &Job,
    ) -> Result<(), String> {
        // Cancelled while it waited in the queue: do not evaluate its prompt at all.
        if job.cancel.is_cancelled() || job.tx.is_closed() {
            return Ok(());
        }
        let started = Instant::now();
        let queue_ms = (started - job.enqueued).as_secs_f64() * 1000.0;
        let tokens = self.tokenize(&job.prompt)?;
        if tokens.is_empty() {
            return Err("the prompt is empty".into());
        }
        if tokens.len() >= self.n_ctx as usize {
            let _ = send(
                job,
                GenEvent::Error {
                    code: "context_length_exceeded".into(),
                    message: format!(
                        "the prompt is {} tokens; the context holds {}",
                        tokens.len(),
                        self.n_ctx
                    ),
                },
            );
            return Ok(());
        }
        // Prompt evaluation, a batch at a time; logits only for the last token.
        let last = tokens.len() - 1;
        for (ci, chunk) in tokens.chunks(self.n_batch as usize).enumerate() {
            batch.clear();
            for (j, t) in chunk.iter().enumerate() {
                let pos = ci * self.n_batch as usize + j;
                batch
                    .add(*t, pos as i32, &[0], pos == last)
                    .map_err(|e| e.to_string())?;
            }
            ctx.decode(batch).map_err(|e| e.to_string())?;
            if job.cancel.is_cancelled() || job.tx.is_closed() {
                return Ok(());
            }
        }
        let start = GenEvent::Start {
            model: self.name.clone(),
            prompt_tokens: tokens.len() as u32,
        };
        if send(job, start).is_err() {
            return Ok(());
        }
        let s = &job.sampling;
        let mut sampler = if s.temperature <= 0.0 {
            LlamaSampler::greedy()
        } else {
            let mut chain = Vec::new();
            if s.top_k > 0 {
                chain.push(LlamaSampler::top_k(s.top_k));
            }
            chain.push(LlamaSampler::top_p(s.top_p, 1));
            chain.push(LlamaSampler::temp(s.temperature));
            chain.push(LlamaSampler::dist(s.seed));
            LlamaSampler::chain_simple(chain)
        };
        let vocab = self.model.vocab();
        let mut text = TextStream::new(&s.stop);
        let room = self.n_ctx as usize - tokens.len();
        let max_new = (s.max_tokens as usize).min(room);
        let start_pos = tokens.len() as i32;
        let mut generated = 0u32;
        let mut first_token_at = None;
        let mut finish = FinishReason::Length;
        for pos in (start_pos..).take(max_new) {
            if job.cancel.is_cancelled() || job.tx.is_closed() {
                finish = FinishReason::Cancelled;
                break;
            }
            let t = sampler.sample(ctx, batch.n_tokens() - 1);
            sampler.accept(t);
            if vocab.is_eog(t) {
                finish = FinishReason::Stop;
                break;
            }
            generated += 1;
            first_token_at.get_or_insert_with(Instant::now);
            let piece = vocab.token_to_piece(t, false, None);
            let pushed = text.push(&piece);
            if !pushed.text.is_empty() && send(job, GenEvent::Token { text: pushed.text }).is_err()
            {
                finish = FinishReason::Cancelled;
                break;
            }
            if pushed.stopped {
                finish = FinishReason::Stop;
                break;
            }
            batch.clear();
            batch.add(t, pos, &[0], true).map_err(|e| e.to_string())?;
            ctx.decode(batch).map_err(|e| e.to_string())?;
        }
        let rest = text.finish();
        if !rest.is_empty() && finish != FinishReason::Cancelled {
            let _ = send(job, GenEvent::Token { text: rest });
        }
        let total = started.elapsed();
        let first_ms = first_token_at.map_or(0.0, |t| (t - job.enqueued).as_secs_f64() * 1000.0);
        let tps = match first_token_at {
            Some(t) if generated > 1 => {
                (generated - 1) as f64 / t.elapsed().as_secs_f64().max(1e-9)
            }
            _ => 0.0,
        };
        {
            let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.generations += 1;
            st.tokens += u64::from(generated);
            if finish == FinishReason::Cancelled {
                st.cancelled += 1;
            }
            if generated > 1 {
                st.last_tokens_per_second = tps;
            }
        }
        let _ = send(
            job,
            GenEvent::Done {
                finish_reason: finish,
                usage: Usage {
                    prompt_tokens: tokens.len() as u32,
                    completion_tokens: generated,
                },
                timings: Timings {
                    queue_ms,
                    first_token_ms: first_ms,
                    tokens_per_second: tps,
                    total_ms: (total.as_secs_f64() * 1000.0) + queue_ms,
                },
            },
        );
        Ok(())
    }
}
