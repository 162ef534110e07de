//! The llama.cpp engine: loaded models, their slots, and generation on dedicated threads.
//!
//! # Threads, slots and batching
//! The llama.cpp backend is initialised once per process. Each loaded model has one generation
//! thread owning one llama context whose KV cache holds `slots` sequences of `context` tokens
//! each. The thread decodes every running sequence together, one token each per step, with the
//! prompts of newly admitted requests filling the rest of the batch (continuous batching): all
//! running generations progress every step and a request starts as soon as a sequence is free.
//! Generation never runs on the async runtime. When every sequence is busy and the queue holds
//! `queue_depth` jobs, [`Loaded::submit`] refuses with [`EngineError::Busy`] (the HTTP layer
//! answers 503 with Retry-After). The context uses the configured thread count (default:
//! physical cores), never llama.cpp's default of 4, which collapses on small boxes when threads
//! spin against each other.
//!
//! # Untrusted model files
//! Every file passes [`super::gguf::inspect`] before llama.cpp opens it (some malformed files
//! abort the process inside llama.cpp).
//!
//! # Cancellation
//! A job ends early when its token is cancelled or its event receiver is dropped (the HTTP client
//! went away): the generation thread checks both every step. A consumer that reads slowly pauses
//! only its own sequence.

use std::collections::{HashMap, VecDeque};
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
    /// Threads for a model's context (0: physical cores).
    pub threads: u32,
    /// Concurrent generations per model.
    pub slots: u32,
    /// Requests waiting for a slot before new ones are refused.
    pub queue_depth: usize,
    /// Context length per sequence (capped by the model's training context).
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
            // Control tokens in a raw prompt are parsed, as llama.cpp's server does: editors that
            // build their own fill-in-the-middle prompts (Continue, Tabby) send the model's FIM
            // tokens as text. The caller writes the whole prompt, so this crosses no boundary.
            return Ok(Prompt::Text {
                text: prompt.clone(),
                special: true,
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
        let threads = if self.cfg.threads == 0 {
            physical_cores()
        } else {
            self.cfg.threads
        } as i32;
        let n_ctx = self.cfg.context.min(model.n_ctx_train()).max(64);
        // Room for every sequence to have one job handed over plus the waiting queue.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(self.cfg.queue_depth + slots);
        let busy = Arc::new(AtomicUsize::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(Throughput::default()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let scheduler = Scheduler {
            model: model.clone(),
            rx,
            busy: busy.clone(),
            queued: queued.clone(),
            stats: stats.clone(),
            slots,
            n_ctx,
            // Every running sequence puts one token in each batch.
            n_batch: self.cfg.batch.max(32).max(slots as u32),
            threads,
            name: name.to_string(),
        };
        std::thread::Builder::new()
            .name(format!("llama-{name}"))
            .spawn(move || scheduler.run(backend, ready_tx))
            .map_err(|e| EngineError::Context {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
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
                    reason: "the generation thread ended".into(),
                });
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
            threads,
            context = n_ctx,
            ms = started.elapsed().as_millis() as u64,
            "inference.load"
        );
        Ok(loaded)
    }
}

/// A generation's state inside the scheduler.
enum Stage {
    /// Prompt tokens from this index on are still to be evaluated.
    Prompt(usize),
    /// The next token to feed back (sampled, not yet decoded).
    Decode(LlamaToken),
    /// Finished: the events in `pending` are all that is left.
    Finished,
}

/// One running generation: a sequence of the shared context.
struct Seq {
    id: i32,
    job: Job,
    tokens: Vec<LlamaToken>,
    /// Next KV position.
    pos: i32,
    stage: Stage,
    sampler: LlamaSampler,
    text: TextStream,
    max_new: usize,
    generated: u32,
    started: Instant,
    queue_ms: f64,
    first_token_at: Option<Instant>,
    /// Events the consumer has no room for yet; the sequence pauses until they are taken, so one
    /// slow reader never stalls the others.
    pending: VecDeque<GenEvent>,
    /// Index in the current batch whose logits belong to this sequence.
    logits_at: Option<i32>,
    /// Whether the current batch holds tokens of this sequence.
    in_batch: bool,
}

impl Seq {
    fn gone(&self) -> bool {
        self.job.cancel.is_cancelled() || self.job.tx.is_closed()
    }

    /// Hands pending events over; false when the consumer is gone.
    fn flush(&mut self) -> bool {
        while let Some(ev) = self.pending.pop_front() {
            match self.job.tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(back)) => {
                    self.pending.push_front(back);
                    return !self.job.cancel.is_cancelled();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }
}

/// A loaded model's generation thread: one llama.cpp context whose KV cache holds `slots`
/// sequences, decoded together (continuous batching).
///
/// Each step puts the next token of every running sequence, then prompt tokens of newly admitted
/// ones (up to the batch size), into one batch and decodes it once: every running generation
/// advances every step, a new request joins as soon as a sequence is free, and the model's
/// weights are read once per step for all of them, which is where CPU inference spends its time.
struct Scheduler {
    model: Arc<LlamaModel>,
    rx: Receiver<Job>,
    busy: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    stats: Arc<Mutex<Throughput>>,
    slots: usize,
    /// Context per sequence.
    n_ctx: u32,
    n_batch: u32,
    threads: i32,
    name: String,
}

impl Scheduler {
    fn run(
        self,
        backend: &'static LlamaBackend,
        ready: std::sync::mpsc::Sender<Result<(), String>>,
    ) {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.n_ctx * self.slots as u32))
            .with_n_seq_max(self.slots as u32)
            .with_kv_unified(false)
            .with_n_batch(self.n_batch)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads)
            .with_no_perf(true);
        let mut ctx = match self.model.new_context(backend, params) {
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
        let mut free: Vec<i32> = (0..self.slots as i32).rev().collect();
        let mut active: Vec<Seq> = Vec::new();
        let mut closed = false;
        loop {
            // Admit waiting jobs into free sequences; block only when nothing runs.
            while !closed && let Some(&id) = free.last() {
                let job = if active.is_empty() {
                    match self.rx.recv() {
                        Ok(j) => j,
                        Err(_) => {
                            closed = true;
                            break;
                        }
                    }
                } else {
                    match self.rx.try_recv() {
                        Ok(j) => j,
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                };
                self.queued.fetch_sub(1, Ordering::Relaxed);
                if let Some(seq) = self.admit(job, id) {
                    free.pop();
                    self.busy.fetch_add(1, Ordering::Relaxed);
                    active.push(seq);
                }
            }
            if active.is_empty() {
                if closed {
                    return;
                }
                continue;
            }

            // Deliver events, notice departures, retire finished sequences.
            active.retain_mut(|seq| {
                let alive = seq.flush() && !seq.gone();
                let finished = matches!(seq.stage, Stage::Finished);
                if !alive && !finished {
                    self.finish(seq, FinishReason::Cancelled);
                    let _ = seq.flush();
                }
                if alive && !(finished && seq.pending.is_empty()) {
                    return true;
                }
                let _ = ctx.clear_kv_cache_seq(Some(seq.id as u32), None, None);
                free.push(seq.id);
                // Lowest ids first: running sequences stay a compact run of ids.
                free.sort_unstable_by(|a, b| b.cmp(a));
                self.busy.fetch_sub(1, Ordering::Relaxed);
                false
            });

            // One batch: a token for every generating sequence; the rest of the room goes to
            // prompts waiting to be evaluated, first admitted first.
            let decoding = active
                .iter()
                .filter(|s| matches!(s.stage, Stage::Decode(_)) && s.pending.is_empty())
                .count();
            let mut room = (self.n_batch as usize).saturating_sub(decoding);
            let mut take = vec![0usize; active.len()];
            for (i, seq) in active.iter().enumerate() {
                if let Stage::Prompt(next) = seq.stage {
                    take[i] = room.min(seq.tokens.len() - next);
                    room -= take[i];
                }
            }
            // Tokens go in in sequence-id order: llama.cpp splits a batch over several sequences
            // into runs of consecutive ids, so any other order costs extra passes.
            let mut order: Vec<usize> = (0..active.len()).collect();
            order.sort_unstable_by_key(|&i| active[i].id);
            batch.clear();
            let mut failed = None;
            for i in order {
                let seq = &mut active[i];
                seq.logits_at = None;
                seq.in_batch = false;
                if failed.is_some() {
                    continue;
                }
                match seq.stage {
                    Stage::Decode(t) if seq.pending.is_empty() => {
                        if let Err(e) = batch.add(t, seq.pos, &[seq.id], true) {
                            failed = Some(e.to_string());
                            continue;
                        }
                        seq.logits_at = Some(batch.n_tokens() - 1);
                        seq.in_batch = true;
                        seq.pos += 1;
                    }
                    Stage::Prompt(next) if take[i] > 0 => {
                        for (j, t) in seq.tokens[next..next + take[i]].iter().enumerate() {
                            let last = next + j == seq.tokens.len() - 1;
                            seq.in_batch = true;
                            if let Err(e) = batch.add(*t, seq.pos, &[seq.id], last) {
                                failed = Some(e.to_string());
                                break;
                            }
                            seq.pos += 1;
                            if last {
                                seq.logits_at = Some(batch.n_tokens() - 1);
                            }
                        }
                        seq.stage = Stage::Prompt(next + take[i]);
                    }
                    _ => {}
                }
            }
            if batch.n_tokens() == 0 {
                // Every sequence waits on a slow reader.
                std::thread::sleep(std::time::Duration::from_millis(2));
                continue;
            }
            if let Some(e) = failed.or_else(|| ctx.decode(&mut batch).err().map(|e| e.to_string()))
            {
                tracing::warn!(model = %self.name, error = %e, "inference.decode failed");
                for seq in active.iter_mut().filter(|s| s.in_batch) {
                    seq.pending.push_back(GenEvent::Error {
                        code: "generation_failed".into(),
                        message: e.clone(),
                    });
                    seq.stage = Stage::Finished;
                }
                continue;
            }
            let vocab = self.model.vocab();
            for seq in active.iter_mut() {
                let Some(idx) = seq.logits_at else { continue };
                if let Stage::Prompt(next) = seq.stage {
                    debug_assert_eq!(next, seq.tokens.len());
                    seq.pending.push_back(GenEvent::Start {
                        model: self.name.clone(),
                        prompt_tokens: seq.tokens.len() as u32,
                    });
                    if seq.max_new == 0 {
                        self.finish(seq, FinishReason::Length);
                        continue;
                    }
                }
                // Samples and accepts.
                let t = seq.sampler.sample(&ctx, idx);
                if vocab.is_eog(t) {
                    self.finish(seq, FinishReason::Stop);
                    continue;
                }
                seq.generated += 1;
                seq.first_token_at.get_or_insert_with(Instant::now);
                let piece = vocab.token_to_piece(t, false, None);
                let pushed = seq.text.push(&piece);
                if !pushed.text.is_empty() {
                    seq.pending.push_back(GenEvent::Token { text: pushed.text });
                }
                if pushed.stopped {
                    self.finish(seq, FinishReason::Stop);
                } else if seq.generated as usize >= seq.max_new {
                    self.finish(seq, FinishReason::Length);
                } else {
                    seq.stage = Stage::Decode(t);
                }
            }
        }
    }

    /// Tokenises a job's prompt and sets up its sequence; answers and drops jobs that cannot run.
    fn admit(&self, job: Job, id: i32) -> Option<Seq> {
        // Cancelled while it waited in the queue: do not evaluate its prompt at all.
        if job.cancel.is_cancelled() || job.tx.is_closed() {
            return None;
        }
        let started = Instant::now();
        let queue_ms = (started - job.enqueued).as_secs_f64() * 1000.0;
        let refuse = |code: &str, message: String| {
            let _ = job.tx.try_send(GenEvent::Error {
                code: code.into(),
                message,
            });
        };
        let tokens = self.tokenize(&job.prompt);
        if tokens.is_empty() {
            refuse("generation_failed", "the prompt is empty".into());
            return None;
        }
        if tokens.len() >= self.n_ctx as usize {
            refuse(
                "context_length_exceeded",
                format!(
                    "the prompt is {} tokens; the context holds {}",
                    tokens.len(),
                    self.n_ctx
                ),
            );
            return None;
        }
        let s = &job.sampling;
        let sampler = if s.temperature <= 0.0 {
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
        let room = self.n_ctx as usize - tokens.len();
        Some(Seq {
            id,
            text: TextStream::new(&s.stop),
            max_new: (s.max_tokens as usize).min(room),
            sampler,
            job,
            tokens,
            pos: 0,
            stage: Stage::Prompt(0),
            generated: 0,
            started,
            queue_ms,
            first_token_at: None,
            pending: VecDeque::new(),
            logits_at: None,
            in_batch: false,
        })
    }

    fn tokenize(&self, prompt: &Prompt) -> Vec<LlamaToken> {
        let v = self.model.vocab();
        let bos = v.should_add_bos() && v.bos().0 >= 0;
        match prompt {
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
        }
    }

    /// Ends a sequence: the held-back text, the `done` event, the statistics.
    fn finish(&self, seq: &mut Seq, finish: FinishReason) {
        if finish != FinishReason::Cancelled {
            let rest = seq.text.finish();
            if !rest.is_empty() {
                seq.pending.push_back(GenEvent::Token { text: rest });
            }
        }
        let generated = seq.generated;
        let first_ms = seq
            .first_token_at
            .map_or(0.0, |t| (t - seq.job.enqueued).as_secs_f64() * 1000.0);
        let tps = match seq.first_token_at {
            Some(t) if generated > 1 => {
                f64::from(generated - 1) / t.elapsed().as_secs_f64().max(1e-9)
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
        seq.pending.push_back(GenEvent::Done {
            finish_reason: finish,
            usage: Usage {
                prompt_tokens: seq.tokens.len() as u32,
                completion_tokens: generated,
            },
            timings: Timings {
                queue_ms: seq.queue_ms,
                first_token_ms: first_ms,
                tokens_per_second: tps,
                total_ms: seq.started.elapsed().as_secs_f64() * 1000.0 + seq.queue_ms,
            },
        });
        seq.stage = Stage::Finished;
    }
}
