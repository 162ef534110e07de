//! The coordinator's state: the queue, live agents and event watchers behind one short lock, and
//! the rules that keep them and the store in step.
//!
//! Every mutation follows the same sequence: reserve room in the store's write queue, take the
//! lock, apply the change in memory, queue its write (so the write queue is in memory order),
//! release the lock, then wait for the commit before answering. Readers of memory may see a
//! change a few hundred microseconds before it is durable; nobody is *told* of a change (no 2xx,
//! no result) before it is. Streamed task events are the exception by design: they are bulk
//! writes, streamed live and stored within `store.bulk_flush_interval`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use heed::RwTxn;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::error::CoordinatorError;
use super::model::*;
use super::queue::{Queue, QueueConfig, QueueCounts, QueueError, Transition};
use crate::clock::{Ulid, add_ms, now_ms};
use crate::config::CoordinatorConfig;
use crate::health::NodeHealth;
use crate::identity::KeyId;
use crate::security::{Principal, Role};
use crate::store::{Commit, Durability, Store, StoreError, Tables, WritePermit, decode, encode};

/// Events of an unfinished task kept in memory for late subscribers. Older events are read from
/// the store after a barrier that commits any still-batched ones.
const RECENT_EVENTS: usize = 4096;

/// Capacity of a task's live event channel; a subscriber that falls further behind catches up
/// from the in-memory history or the store.
const LIVE_EVENTS: usize = 256;

/// Longest idempotency key accepted.
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// Most tasks returned by one `GET /tasks`.
pub const MAX_LIST: usize = 1000;

/// Idempotency keys of tasks a node runs for another node start with this; they are never
/// offered on to further peers.
pub const MESH_KEY_PREFIX: &str = "mesh:";

/// Finished tasks deleted per purge transaction.
const PURGE_BATCH: usize = 1000;

/// Most task records examined by one `GET /tasks` (filters can make pages sparse).
const LIST_SCAN_LIMIT: usize = 100_000;

/// Coordinator settings the state needs.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// The coordinator section of the config.
    pub coordinator: CoordinatorConfig,
    /// How often agents should heartbeat.
    pub heartbeat_interval: Duration,
}

struct Watch {
    next_seq: u32,
    recent: VecDeque<TaskEvent>,
    live: Option<broadcast::Sender<TaskEvent>>,
    done: Option<watch::Sender<bool>>,
}

impl Watch {
    fn new(next_seq: u32) -> Self {
        Watch {
            next_seq,
            recent: VecDeque::new(),
            live: None,
            done: None,
        }
    }
}

struct AgentEntry {
    record: AgentRecord,
    session: u64,
    last_seen_ms: u64,
    signal: Arc<Notify>,
}

struct Core {
    queue: Queue,
    agents: HashMap<KeyId, AgentEntry>,
    /// Every agent that ever registered (the `agents` table), live or not.
    known_agents: HashMap<KeyId, AgentRecord>,
    watches: HashMap<TaskId, Watch>,
    /// Idempotency keys of unfinished tasks: their store records may not be committed yet.
    idempotency: HashMap<(KeyId, String), (TaskId, [u8; 16])>,
    next_session: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Default)]
struct Metrics {
    submitted: Counter,
    finished: Family<StateLabel, Counter>,
    claimed: Counter,
    requeued: Counter,
    events: Counter,
    queued: Gauge,
    leased: Gauge,
    running: Gauge,
    agents: Gauge,
}

struct Shared {
    cfg: StateConfig,
    store: Store,
    core: Mutex<Core>,
    work: Notify,
    health: Arc<NodeHealth>,
    local_worker: Option<KeyId>,
    metrics: Metrics,
    shutdown: CancellationToken,
}

/// The coordinator's state; cheap to clone.
#[derive(Clone)]
pub struct CoordinatorState(Arc<Shared>);

impl std::fmt::Debug for CoordinatorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoordinatorState")
    }
}

/// Store writes produced under the lock, encoded there, applied by the writer thread.
#[derive(Default)]
struct Batch {
    puts: Vec<(Table, Vec<u8>, Vec<u8>)>,
    deletes: Vec<(Table, Vec<u8>)>,
    /// Result waiters of tasks this batch finishes; told only once the batch is committed.
    finished: Vec<watch::Sender<bool>>,
}

/// A queued batch: its commit, and who to tell when it is durable.
#[must_use = "a change is only durable once `done` resolves"]
struct Pending {
    commit: Commit<()>,
    finished: Vec<watch::Sender<bool>>,
}

impl Pending {
    /// Waits for the commit, then wakes the result waiters of the tasks it finished.
    async fn done(self) -> Result<(), StoreError> {
        self.commit.await?;
        for f in self.finished {
            let _ = f.send(true);
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Table {
    Tasks,
    Active,
    Events,
    Results,
    Idempotency,
    Agents,
}

impl Batch {
    fn apply(self, txn: &mut RwTxn<'_>, t: &Tables) -> Result<(), StoreError> {
        let db = |w: Table| match w {
            Table::Tasks => t.tasks,
            Table::Active => t.active,
            Table::Events => t.task_events,
            Table::Results => t.results,
            Table::Idempotency => t.idempotency,
            Table::Agents => t.agents,
        };
        for (w, k) in &self.deletes {
            db(*w).delete(txn, k)?;
        }
        for (w, k, v) in &self.puts {
            db(*w).put(txn, k, v)?;
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

fn event_key(task: TaskId, seq: u32) -> Vec<u8> {
    let mut k = task.to_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn idem_key(requester: &KeyId, key: &str) -> Vec<u8> {
    let mut k = requester.0.to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

/// What an idempotency record stores: the task and a hash of the request it answered.
#[derive(serde::Serialize, serde::Deserialize)]
struct IdemRecord {
    task: TaskId,
    request_hash: [u8; 16],
}

fn request_hash(req: &SubmitTask) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(req.kind.as_str());
    h.update([0]);
    h.update(serde_json::to_vec(&req.payload).unwrap_or_default());
    h.update([0]);
    h.update(serde_json::to_vec(&req.requirements).unwrap_or_default());
    h.update(req.priority.to_be_bytes());
    h.update(req.timeout.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(req.max_attempts.unwrap_or(0).to_be_bytes());
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// The outcome of waiting for a result.
#[derive(Debug)]
pub enum ResultWait {
    /// Finished.
    Done(ResultView),
    /// Not finished within the wait.
    Pending(PendingView),
}

/// A live subscription to a task's events.
#[derive(Debug)]
pub struct Subscription {
    /// Events already recorded (after the requested sequence number).
    pub backlog: Vec<TaskEvent>,
    /// Live events, until the task finishes; `None` if it already has.
    pub live: Option<broadcast::Receiver<TaskEvent>>,
}

impl CoordinatorState {
    /// Builds the state and restores unfinished tasks from the store.
    ///
    /// # Errors
    /// Store failures.
    pub fn load(
        cfg: StateConfig,
        store: Store,
        health: Arc<NodeHealth>,
        local_worker: Option<KeyId>,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let mut queue = Queue::new(QueueConfig {
            lease_ttl_ms: cfg.coordinator.lease_ttl.as_millis() as u64,
            max_active: cfg.coordinator.max_active_tasks,
        });
        let mut watches = HashMap::new();
        let known_agents = store.read(|r, t| {
            let mut out = HashMap::new();
            for item in t.agents.iter(r)? {
                let (_, v) = item?;
                let rec: AgentRecord = decode("agents", v)?;
                out.insert(rec.key, rec);
            }
            Ok(out)
        })?;
        let restored = store.read(|r, t| {
            let mut out = Vec::new();
            for item in t.active.iter(r)? {
                let (k, _) = item?;
                let Some(v) = t.tasks.get(r, k)? else {
                    continue;
                };
                let rec: TaskRecord = decode("tasks", v)?;
                let last = t
                    .task_events
                    .get_lower_than_or_equal_to(r, &event_key(rec.id, u32::MAX))?
                    .and_then(|(k, _)| {
                        (k.len() == 20 && k[..16] == rec.id.to_bytes())
                            .then(|| u32::from_be_bytes([k[16], k[17], k[18], k[19]]))
                    })
                    .unwrap_or(0);
                out.push((rec, last));
            }
            Ok(out)
        })?;
        let n = restored.len();
        let now = now_ms();
        for (rec, last_seq) in restored {
            watches.insert(rec.id, Watch::new(last_seq + 1));
            queue.restore(rec, now);
        }
        if n > 0 {
            tracing::info!(tasks = n, "coordinator.restore unfinished tasks reloaded");
        }
        Ok(CoordinatorState(Arc::new(Shared {
            cfg,
            store,
            core: Mutex::new(Core {
                queue,
                agents: HashMap::new(),
                known_agents,
                watches,
                idempotency: HashMap::new(),
                next_session: now_ms() << 12,
            }),
            work: Notify::new(),
            health,
            local_worker,
            metrics: Metrics::default(),
            shutdown,
        })))
    }

    /// Cancelled when the node starts shutting down (streams and long polls end on it).
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.0.shutdown
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.0.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the coordinator's metrics.
    pub fn register_metrics(&self, reg: &mut Registry) {
        let m = &self.0.metrics;
        reg.register(
            "edgecoder_coordinator_tasks_submitted",
            "Tasks accepted",
            m.submitted.clone(),
        );
        reg.register(
            "edgecoder_coordinator_tasks_finished",
            "Tasks that reached a final state, by state",
            m.finished.clone(),
        );
        reg.register(
            "edgecoder_coordinator_leases_granted",
            "Leases granted to agents",
            m.claimed.clone(),
        );
        reg.register(
            "edgecoder_coordinator_tasks_requeued",
            "Attempts that ended without a result and went back to the queue",
            m.requeued.clone(),
        );
        reg.register(
            "edgecoder_coordinator_task_events",
            "Task events posted by agents (state changes not included)",
            m.events.clone(),
        );
        reg.register(
            "edgecoder_coordinator_tasks_queued",
            "Tasks waiting for an agent",
            m.queued.clone(),
        );
        reg.register(
            "edgecoder_coordinator_tasks_leased",
            "Tasks leased, not yet running",
            m.leased.clone(),
        );
        reg.register(
            "edgecoder_coordinator_tasks_running",
            "Tasks running",
            m.running.clone(),
        );
        reg.register(
            "edgecoder_coordinator_agents",
            "Live registered agents",
            m.agents.clone(),
        );
    }

    /// Updates the gauges (called before metrics are rendered).
    pub fn refresh_gauges(&self) {
        let (c, agents) = {
            let core = self.lock();
            (core.queue.counts(), core.agents.len())
        };
        let m = &self.0.metrics;
        m.queued.set(c.queued as i64);
        m.leased.set(c.leased as i64);
        m.running.set(c.running as i64);
        m.agents.set(agents as i64);
    }

    /// Queue counts and live agents.
    pub fn counts(&self) -> (QueueCounts, usize) {
        let core = self.lock();
        (core.queue.counts(), core.agents.len())
    }

    /// Turns transitions into store writes and live events. Called with the lock held.
    fn record(&self, core: &mut Core, transitions: &[Transition], batch: &mut Batch) {
        let now = now_ms();
        for t in transitions {
            let rec = &t.record;
            let id = rec.id;
            let key = id.to_bytes().to_vec();
            batch.puts.push((Table::Tasks, key.clone(), encode(rec)));
            let m = &self.0.metrics;
            match t.from {
                None => {
                    m.submitted.inc();
                }
                Some(TaskState::Queued) if rec.state == TaskState::Leased => {
                    m.claimed.inc();
                }
                _ => {}
            }
            if rec.state == TaskState::Queued && t.from.is_some() {
                m.requeued.inc();
            }
            let mut data = serde_json::json!({
                "state": rec.state,
                "attempt": rec.attempts,
            });
            if let Some(f) = t.from {
                data["from"] = serde_json::json!(f);
            }
            if let Some(l) = rec.lease {
                data["agent"] = serde_json::json!(l.agent);
            }
            if let Some(r) = &t.reason {
                data["reason"] = serde_json::json!(r);
            }
            let w = core.watches.entry(id).or_insert_with(|| Watch::new(1));
            let ev = TaskEvent {
                seq: w.next_seq,
                at_ms: now,
                kind: EventKind::State,
                data: data.to_string(),
            };
            w.next_seq += 1;
            batch
                .puts
                .push((Table::Events, event_key(id, ev.seq), encode(&ev)));
            push_event(w, ev);
            match &t.result {
                Some(result) => {
                    m.finished
                        .get_or_create(&StateLabel {
                            state: rec.state.as_str(),
                        })
                        .inc();
                    batch
                        .puts
                        .push((Table::Results, key.clone(), encode(result)));
                    batch.deletes.push((Table::Active, key));
                    if let Some(w) = core.watches.remove(&id) {
                        // Dropping the live sender ends every stream after its last event.
                        // Result waiters are woken after the commit (see `Pending`); if that
                        // never comes, the dropped sender wakes them and they re-read the store.
                        batch.finished.extend(w.done);
                    }
                    if let Some(k) = &rec.idempotency_key {
                        core.idempotency.remove(&(rec.requester, k.clone()));
                    }
                }
                None => {
                    if t.from.is_none() {
                        batch.puts.push((Table::Active, key, Vec::new()));
                    }
                }
            }
        }
    }

    fn send(&self, permit: WritePermit, durability: Durability, mut batch: Batch) -> Pending {
        let finished = std::mem::take(&mut batch.finished);
        Pending {
            commit: permit.send(durability, move |txn, t| batch.apply(txn, t)),
            finished,
        }
    }

    fn visible(p: &Principal, rec_requester: &KeyId) -> bool {
        p.role == Role::Node || p.key == *rec_requester
    }

    /// `POST /tasks`. Returns the task and whether it was created now (false: an idempotent
    /// repeat).
    ///
    /// # Errors
    /// Validation, idempotency conflicts, a full queue, storage.
    pub async fn submit(
        &self,
        p: &Principal,
        req: SubmitTask,
    ) -> Result<(TaskView, bool), CoordinatorError> {
        let c = &self.0.cfg.coordinator;
        if !(-100..=100).contains(&req.priority) {
            return Err(CoordinatorError::Invalid(
                "priority must be between -100 and 100".into(),
            ));
        }
        let timeout = match &req.timeout {
            None => c.default_deadline,
            Some(t) => humantime::parse_duration(t)
                .map_err(|e| CoordinatorError::Invalid(format!("timeout {t:?}: {e}")))?,
        };
        if timeout.is_zero() || timeout > c.max_deadline {
            return Err(CoordinatorError::Invalid(format!(
                "timeout must be between 1ms and {}",
                humantime::format_duration(c.max_deadline)
            )));
        }
        let max_attempts = req.max_attempts.unwrap_or(c.max_attempts);
        if max_attempts == 0 || max_attempts > c.max_attempts {
            return Err(CoordinatorError::Invalid(format!(
                "max_attempts must be between 1 and {}",
                c.max_attempts
            )));
        }
        if let Some(k) = &req.idempotency_key
            && (k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY)
        {
            return Err(CoordinatorError::Invalid(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
        if req
            .requirements
            .model
            .as_ref()
            .is_some_and(|m| m.len() > 256)
        {
            return Err(CoordinatorError::Invalid(
                "requirements.model is too long".into(),
            ));
        }
        let hash = request_hash(&req);
        let now = now_ms();
        let rec = TaskRecord {
            id: Ulid::generate(),
            kind: req.kind,
            requester: p.key,
            idempotency_key: req.idempotency_key.clone(),
            requirements: req.requirements.clone(),
            payload: req.payload.to_string(),
            priority: req.priority,
            created_ms: now,
            updated_ms: now,
            deadline_ms: add_ms(now, timeout),
            state: TaskState::Queued,
            attempts: 0,
            max_attempts,
            lease: None,
            failures: Vec::new(),
        };
        let permit = self.0.store.reserve().await?;
        let outcome = {
            let mut core = self.lock();
            let existing = match &req.idempotency_key {
                Some(k) => self.find_idempotent(&core, &p.key, k)?,
                None => None,
            };
            match existing {
                Some((id, stored_hash)) => Err((id, stored_hash)),
                None => Ok(self.submit_locked(&mut core, p, rec, &req, hash, permit)?),
            }
        };
        match outcome {
            Ok((commit, view)) => {
                self.0.work.notify_waiters();
                commit.done().await?;
                Ok((view, true))
            }
            Err((id, stored_hash)) => {
                if stored_hash != hash {
                    return Err(CoordinatorError::IdempotencyConflict(
                        req.idempotency_key.unwrap_or_default(),
                    ));
                }
                Ok((self.get(p, id).await?, false))
            }
        }
    }

    fn submit_locked(
        &self,
        core: &mut Core,
        p: &Principal,
        rec: TaskRecord,
        req: &SubmitTask,
        hash: [u8; 16],
        permit: WritePermit,
    ) -> Result<(Pending, TaskView), CoordinatorError> {
        {
            let t = core.queue.submit(rec)?;
            let mut batch = Batch::default();
            if let Some(k) = &req.idempotency_key {
                core.idempotency
                    .insert((p.key, k.clone()), (t.record.id, hash));
                batch.puts.push((
                    Table::Idempotency,
                    idem_key(&p.key, k),
                    encode(&IdemRecord {
                        task: t.record.id,
                        request_hash: hash,
                    }),
                ));
            }
            let view = TaskView::from(&t.record);
            self.record(core, std::slice::from_ref(&t), &mut batch);
            Ok((self.send(permit, Durability::Critical, batch), view))
        }
    }

    /// Looks an idempotency key up in memory, then in the store. Returns the task and the hash of
    /// the request that created it. Called with the lock held on purpose: a point read takes
    /// microseconds, and doing it outside the lock would let a concurrent submission with the same
    /// key slip between the read and the insert.
    fn find_idempotent(
        &self,
        core: &Core,
        requester: &KeyId,
        key: &str,
    ) -> Result<Option<(TaskId, [u8; 16])>, StoreError> {
        if let Some(hit) = core.idempotency.get(&(*requester, key.to_string())) {
            return Ok(Some(*hit));
        }
        let k = idem_key(requester, key);
        self.0.store.read(|r, t| match t.idempotency.get(r, &k)? {
            Some(v) => {
                let rec: IdemRecord = decode("idempotency", v)?;
                Ok(Some((rec.task, rec.request_hash)))
            }
            None => Ok(None),
        })
    }

    /// `GET /tasks/{id}`.
    ///
    /// # Errors
    /// Not found (also for tasks the caller may not see), storage.
    pub async fn get(&self, p: &Principal, id: TaskId) -> Result<TaskView, CoordinatorError> {
        if let Some(rec) = self.lock().queue.get(&id) {
            if Self::visible(p, &rec.requester) {
                return Ok(TaskView::from(rec));
            }
            return Err(CoordinatorError::TaskNotFound(id));
        }
        let rec = self.read_record(id)?;
        match rec {
            Some(r) if Self::visible(p, &r.requester) => Ok(TaskView::from(&r)),
            _ => Err(CoordinatorError::TaskNotFound(id)),
        }
    }

    fn read_record(&self, id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.0
            .store
            .read(|r, t| match t.tasks.get(r, &id.to_bytes())? {
                Some(v) => Ok(Some(decode("tasks", v)?)),
                None => Ok(None),
            })
    }

    fn read_result(&self, id: TaskId) -> Result<Option<TaskResult>, StoreError> {
        self.0
            .store
            .read(|r, t| match t.results.get(r, &id.to_bytes())? {
                Some(v) => Ok(Some(decode("results", v)?)),
                None => Ok(None),
            })
    }

    /// Waits until every write queued so far is committed.
    async fn barrier(&self) -> Result<(), StoreError> {
        self.0
            .store
            .write(Durability::Critical, |_, _| Ok(()))
            .await
    }

    /// `GET /tasks?state=&after=&limit=`.
    ///
    /// # Errors
    /// Storage.
    pub async fn list(
        &self,
        p: &Principal,
        state: Option<TaskState>,
        after: Option<TaskId>,
        limit: usize,
    ) -> Result<TaskList, CoordinatorError> {
        let limit = limit.clamp(1, MAX_LIST);
        let principal = *p;
        // Filters apply to the committed state; unfinished tasks are then shown as memory has
        // them (a change may be a commit ahead of the filter).
        let (mut tasks, resume): (Vec<TaskRecord>, Option<TaskId>) = self
            .0
            .store
            .read_blocking(move |r, t| {
                let start = after.map(|a| a.to_bytes().to_vec());
                let range = match &start {
                    Some(s) => (
                        std::ops::Bound::Excluded(&s[..]),
                        std::ops::Bound::Unbounded,
                    ),
                    None => (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded),
                };
                let mut out = Vec::new();
                let mut last_scanned = None;
                for (scanned, item) in t.tasks.range(r, &range)?.enumerate() {
                    if scanned >= LIST_SCAN_LIMIT {
                        // A sparse filter: hand back where to continue instead of scanning on.
                        return Ok((out, last_scanned));
                    }
                    let (_, v) = item?;
                    let rec: TaskRecord = decode("tasks", v)?;
                    last_scanned = Some(rec.id);
                    if Self::visible(&principal, &rec.requester)
                        && state.is_none_or(|s| rec.state == s)
                    {
                        out.push(rec);
                        if out.len() > limit {
                            break;
                        }
                    }
                }
                Ok((out, None))
            })
            .await?;
        {
            let core = self.lock();
            for rec in &mut tasks {
                if let Some(live) = core.queue.get(&rec.id) {
                    *rec = live.clone();
                }
            }
        }
        let next = if tasks.len() > limit {
            tasks.truncate(limit);
            tasks.last().map(|t| t.id)
        } else {
            resume
        };
        Ok(TaskList {
            tasks: tasks.iter().map(TaskView::from).collect(),
            next,
        })
    }

    /// `GET /tasks/{id}/result?wait=`.
    ///
    /// # Errors
    /// Not found, storage.
    pub async fn result(
        &self,
        p: &Principal,
        id: TaskId,
        wait: Duration,
    ) -> Result<ResultWait, CoordinatorError> {
        let deadline = tokio::time::Instant::now() + wait.min(self.0.cfg.coordinator.max_wait);
        loop {
            let rx = {
                let mut core = self.lock();
                match core.queue.get(&id) {
                    Some(rec) => {
                        if !Self::visible(p, &rec.requester) {
                            return Err(CoordinatorError::TaskNotFound(id));
                        }
                        let state = rec.state;
                        let w = core.watches.entry(id).or_insert_with(|| Watch::new(1));
                        let done = w.done.get_or_insert_with(|| watch::channel(false).0);
                        Some((done.subscribe(), state))
                    }
                    None => None,
                }
            };
            let Some((mut rx, state)) = rx else {
                return self.finished_result(p, id).await.map(ResultWait::Done);
            };
            tokio::select! {
                _ = rx.changed() => continue,
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(ResultWait::Pending(PendingView { task: id, state }));
                }
                _ = self.0.shutdown.cancelled() => {
                    return Ok(ResultWait::Pending(PendingView { task: id, state }));
                }
            }
        }
    }

    async fn finished_result(
        &self,
        p: &Principal,
        id: TaskId,
    ) -> Result<ResultView, CoordinatorError> {
        let mut result = self.read_result(id)?;
        if result.is_none() {
            // Finished in memory a moment ago; wait for its commit.
            self.barrier().await?;
            result = self.read_result(id)?;
        }
        let rec = self.read_record(id)?;
        match (rec, result) {
            (Some(rec), Some(res)) if Self::visible(p, &rec.requester) => {
                Ok(ResultView::from(&res))
            }
            _ => Err(CoordinatorError::TaskNotFound(id)),
        }
    }

    /// `DELETE /tasks/{id}`.
    ///
    /// # Errors
    /// Not found, invalid transition (already finished), storage.
    pub async fn cancel(&self, p: &Principal, id: TaskId) -> Result<TaskView, CoordinatorError> {
        let permit = self.0.store.reserve().await?;
        let res = {
            let mut core = self.lock();
            match core.queue.get(&id) {
                Some(rec) if Self::visible(p, &rec.requester) => {
                    let (t, agent) = core.queue.cancel(id, now_ms())?;
                    let mut batch = Batch::default();
                    self.record(&mut core, std::slice::from_ref(&t), &mut batch);
                    if let Some(a) = agent
                        && let Some(entry) = core.agents.get(&a)
                    {
                        entry.signal.notify_waiters();
                    }
                    Some((
                        TaskView::from(&t.record),
                        self.send(permit, Durability::Critical, batch),
                    ))
                }
                Some(_) => return Err(CoordinatorError::TaskNotFound(id)),
                None => None,
            }
        };
        match res {
            Some((view, commit)) => {
                commit.done().await?;
                Ok(view)
            }
            None => {
                let view = self.get(p, id).await?;
                Err(CoordinatorError::InvalidTransition {
                    task: id,
                    state: view.state,
                    action: "cancel",
                })
            }
        }
    }

    /// Subscribes to a task's events after `after`.
    ///
    /// # Errors
    /// Not found, storage.
    pub async fn subscribe(
        &self,
        p: &Principal,
        id: TaskId,
        after: u32,
    ) -> Result<Subscription, CoordinatorError> {
        // (backlog from memory, or None to read the store; live receiver) for unfinished tasks.
        type Live = (Option<Vec<TaskEvent>>, broadcast::Receiver<TaskEvent>);
        let active: Option<Result<Live, CoordinatorError>> = {
            let mut core = self.lock();
            match core.queue.get(&id).map(|r| r.requester) {
                Some(requester) if !Self::visible(p, &requester) => {
                    Some(Err(CoordinatorError::TaskNotFound(id)))
                }
                Some(_) => {
                    let w = core.watches.entry(id).or_insert_with(|| Watch::new(1));
                    let oldest = w.recent.front().map_or(w.next_seq, |e| e.seq);
                    let backlog = (after + 1 >= oldest)
                        .then(|| w.recent.iter().filter(|e| e.seq > after).cloned().collect());
                    let live = w
                        .live
                        .get_or_insert_with(|| broadcast::channel(LIVE_EVENTS).0)
                        .subscribe();
                    Some(Ok((backlog, live)))
                }
                None => None,
            }
        };
        if let Some(active) = active {
            let (backlog, live) = active?;
            let backlog = match backlog {
                Some(b) => b,
                // The requested start is older than memory holds: flush pending bulk writes (a
                // barrier commits everything queued before it), read the store, then follow.
                None => {
                    self.barrier().await?;
                    self.read_events(id, after).await?
                }
            };
            return Ok(Subscription {
                backlog,
                live: Some(live),
            });
        }
        let rec = self.read_record(id)?;
        match rec {
            Some(r) if Self::visible(p, &r.requester) => {}
            _ => return Err(CoordinatorError::TaskNotFound(id)),
        }
        self.barrier().await?;
        Ok(Subscription {
            backlog: self.read_events(id, after).await?,
            live: None,
        })
    }

    /// Events of `id` after `after`, from the store.
    ///
    /// # Errors
    /// Storage.
    pub async fn read_events(&self, id: TaskId, after: u32) -> Result<Vec<TaskEvent>, StoreError> {
        self.0
            .store
            .read_blocking(move |r, t| {
                let start = event_key(id, after.saturating_add(1));
                let end = event_key(id, u32::MAX);
                let range = (
                    std::ops::Bound::Included(&start[..]),
                    std::ops::Bound::Included(&end[..]),
                );
                let mut out = Vec::new();
                if after == u32::MAX {
                    return Ok(out);
                }
                for item in t.task_events.range(r, &range)? {
                    let (_, v) = item?;
                    out.push(decode("task_events", v)?);
                }
                Ok(out)
            })
            .await
    }

    /// The agent's entry, checked against its session.
    fn agent_entry<'c>(
        core: &'c mut Core,
        p: &Principal,
        session: u64,
    ) -> Result<&'c mut AgentEntry, CoordinatorError> {
        match core.agents.get_mut(&p.key) {
            Some(e) if e.session == session => Ok(e),
            _ => Err(CoordinatorError::AgentNotRegistered),
        }
    }

    fn require_agent(p: &Principal) -> Result<(), CoordinatorError> {
        if matches!(p.role, Role::Agent | Role::Peer) {
            Ok(())
        } else {
            Err(CoordinatorError::Forbidden("act as an agent"))
        }
    }

    /// `POST /agents/register`.
    ///
    /// # Errors
    /// Not an agent key, invalid capabilities, storage.
    pub async fn register(
        &self,
        p: &Principal,
        req: RegisterAgent,
    ) -> Result<Registered, CoordinatorError> {
        Self::require_agent(p)?;
        let caps = req.capabilities;
        if caps.kinds.is_empty() || caps.slots == 0 || caps.slots > 4096 {
            return Err(CoordinatorError::Invalid(
                "capabilities need at least one kind and 1 to 4096 slots".into(),
            ));
        }
        if caps.models.len() > 256 || caps.models.iter().any(|m| m.len() > 256) {
            return Err(CoordinatorError::Invalid(
                "too many or too long model names".into(),
            ));
        }
        let local = self.0.local_worker == Some(p.key);
        let now = now_ms();
        let permit = self.0.store.reserve().await?;
        let (session, commit) = {
            let mut core = self.lock();
            let transitions =
                core.queue
                    .release_agent(&p.key, &req.running, "agent restarted", now);
            core.next_session += 1;
            let session = core.next_session;
            let record = AgentRecord {
                key: p.key,
                capabilities: caps,
                registered_ms: now,
                local,
            };
            let mut batch = Batch::default();
            batch
                .puts
                .push((Table::Agents, p.key.0.to_vec(), encode(&record)));
            self.record(&mut core, &transitions, &mut batch);
            let signal = core
                .agents
                .get(&p.key)
                .map(|e| e.signal.clone())
                .unwrap_or_default();
            // A previous session's pending claim must stop waiting.
            signal.notify_waiters();
            core.known_agents.insert(p.key, record.clone());
            core.agents.insert(
                p.key,
                AgentEntry {
                    record,
                    session,
                    last_seen_ms: now,
                    signal: Arc::new(Notify::new()),
                },
            );
            if !transitions.is_empty() {
                tracing::info!(agent = %p.key, released = transitions.len(), "coordinator.register released old leases");
            }
            (session, self.send(permit, Durability::Critical, batch))
        };
        self.0.work.notify_waiters();
        commit.done().await?;
        if local {
            self.0.health.set_worker_registered(true);
        }
        tracing::info!(agent = %p.key, session, local, "coordinator.register agent registered");
        Ok(Registered {
            agent: p.key,
            session,
            heartbeat_interval_ms: self.0.cfg.heartbeat_interval.as_millis() as u64,
            lease_ttl_ms: self.0.cfg.coordinator.lease_ttl.as_millis() as u64,
        })
    }

    /// `POST /agents/heartbeat`.
    ///
    /// # Errors
    /// Not registered.
    pub fn heartbeat(
        &self,
        p: &Principal,
        req: &Heartbeat,
    ) -> Result<HeartbeatReply, CoordinatorError> {
        Self::require_agent(p)?;
        let now = now_ms();
        let mut core = self.lock();
        Self::agent_entry(&mut core, p, req.session)?.last_seen_ms = now;
        let (renewed, cancel) = core.queue.renew(&p.key, &req.running, now);
        Ok(HeartbeatReply { renewed, cancel })
    }

    /// `POST /agents/claim?wait=`: waits up to `wait` for tasks (or cancellations).
    ///
    /// # Errors
    /// Not registered, storage.
    pub async fn claim(
        &self,
        p: &Principal,
        req: &Claim,
        wait: Duration,
    ) -> Result<ClaimReply, CoordinatorError> {
        Self::require_agent(p)?;
        let deadline = tokio::time::Instant::now() + wait.min(self.0.cfg.coordinator.max_wait);
        loop {
            let permit = self.0.store.reserve().await?;
            let work = self.0.work.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            let (signal, got) = {
                let mut core = self.lock();
                let now = now_ms();
                let signal = Self::agent_entry(&mut core, p, req.session)?.signal.clone();
                let mut batch = Batch::default();
                let reply = self.claim_locked(&mut core, p, req, now, &mut batch)?;
                if reply.tasks.is_empty() && reply.cancel.is_empty() && req.task.is_none() {
                    (signal, None)
                } else {
                    let commit = (!batch.puts.is_empty())
                        .then(|| self.send(permit, Durability::Critical, batch));
                    (signal, Some((reply, commit)))
                }
            };
            if let Some((reply, commit)) = got {
                if let Some(c) = commit {
                    c.done().await?;
                }
                return Ok(reply);
            }
            let signalled = signal.notified();
            tokio::pin!(signalled);
            signalled.as_mut().enable();
            // Re-check for cancellations queued between the unlock and enable.
            if self.lock().queue.has_cancellations(&p.key) {
                continue;
            }
            tokio::select! {
                _ = &mut work => {
                    // Let the submissions that woke us (and any right behind them) finish
                    // before claiming, so a busy node hands out tasks in batches.
                    tokio::task::yield_now().await;
                }
                _ = &mut signalled => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(ClaimReply::default()),
                _ = self.0.shutdown.cancelled() => return Ok(ClaimReply::default()),
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(ClaimReply::default());
            }
        }
    }

    /// Grants up to `req.max` tasks to the agent without waiting, and takes its pending
    /// cancellations. Called with the lock held; the grants go into `batch`.
    fn claim_locked(
        &self,
        core: &mut Core,
        p: &Principal,
        req: &Claim,
        now: u64,
        batch: &mut Batch,
    ) -> Result<ClaimReply, CoordinatorError> {
        let entry = Self::agent_entry(core, p, req.session)?;
        entry.last_seen_ms = now;
        let caps = entry.record.capabilities.clone();
        let cancel = core.queue.take_cancellations(&p.key);
        // Never more leases than the slots the agent registered with.
        let room = (caps.slots as usize).saturating_sub(core.queue.leases_of(&p.key));
        let granted = match req.task {
            Some(id) if room > 0 && req.max > 0 => core
                .queue
                .claim_task(id, p.key, req.session, &caps, now)
                .into_iter()
                .collect(),
            Some(_) => Vec::new(),
            None => core
                .queue
                .claim(p.key, req.session, &caps, (req.max as usize).min(room), now),
        };
        self.record(core, &granted, batch);
        let tasks = granted
            .iter()
            .map(|t| ClaimedTask {
                id: t.record.id,
                kind: t.record.kind,
                attempt: t.record.attempts,
                payload: serde_json::from_str(&t.record.payload).unwrap_or(serde_json::Value::Null),
                requirements: t.record.requirements.clone(),
                lease_expires_ms: t.record.lease.map_or(0, |l| l.expires_ms),
                deadline_ms: t.record.deadline_ms,
            })
            .collect();
        Ok(ClaimReply { tasks, cancel })
    }

    /// `POST /tasks/{id}/events`.
    ///
    /// # Errors
    /// Lease lost, invalid events, storage.
    pub async fn post_events(
        &self,
        p: &Principal,
        id: TaskId,
        req: PostEvents,
    ) -> Result<EventsAccepted, CoordinatorError> {
        Self::require_agent(p)?;
        if req.events.len() > MAX_EVENTS_PER_POST {
            return Err(CoordinatorError::Invalid(format!(
                "at most {MAX_EVENTS_PER_POST} events per post"
            )));
        }
        if req.events.iter().any(|e| e.kind == EventKind::State) {
            return Err(CoordinatorError::Invalid(
                "state events are written by the coordinator".into(),
            ));
        }
        let permit = self.0.store.reserve().await?;
        let now = now_ms();
        let (commit, last_seq, critical) = {
            let mut core = self.lock();
            let running = core
                .queue
                .mark_running(id, &p.key, req.attempt, now)
                .map_err(|e| match e {
                    QueueError::NotActive(task) => CoordinatorError::LeaseLost {
                        task,
                        attempt: req.attempt,
                    },
                    other => other.into(),
                })?;
            let mut batch = Batch::default();
            let critical = running.is_some();
            if let Some(t) = running {
                self.record(&mut core, std::slice::from_ref(&t), &mut batch);
            }
            let w = core.watches.entry(id).or_insert_with(|| Watch::new(1));
            for e in req.events {
                let ev = TaskEvent {
                    seq: w.next_seq,
                    at_ms: now,
                    kind: e.kind,
                    data: e.data.to_string(),
                };
                w.next_seq += 1;
                batch
                    .puts
                    .push((Table::Events, event_key(id, ev.seq), encode(&ev)));
                push_event(w, ev);
                self.0.metrics.events.inc();
            }
            let last_seq = w.next_seq - 1;
            let durability = if critical {
                Durability::Critical
            } else {
                Durability::Bulk
            };
            (self.send(permit, durability, batch), last_seq, critical)
        };
        if critical {
            commit.done().await?;
        } else {
            // Streamed events are bulk-class: stored with the next batch, not waited for.
            drop(commit);
        }
        Ok(EventsAccepted { last_seq })
    }

    /// `POST /tasks/{id}/result`.
    ///
    /// # Errors
    /// Lease lost, storage.
    pub async fn post_result(
        &self,
        p: &Principal,
        id: TaskId,
        req: PostResult,
    ) -> Result<ResultAccepted, CoordinatorError> {
        Self::require_agent(p)?;
        let permit = self.0.store.reserve().await?;
        let attempt = req.attempt;
        let res = {
            let mut core = self.lock();
            let now = now_ms();
            match core.queue.complete(id, &p.key, attempt, &req.outcome, now) {
                Ok(t) => {
                    let state = t.record.state;
                    let mut batch = Batch::default();
                    self.record(&mut core, std::slice::from_ref(&t), &mut batch);
                    if state == TaskState::Queued {
                        self.0.work.notify_waiters();
                    }
                    // The result stands even if the agent's session has ended; it just gets
                    // no new work that way.
                    let next = match &req.next {
                        Some(c) => self
                            .claim_locked(&mut core, p, c, now, &mut batch)
                            .unwrap_or_default(),
                        None => ClaimReply::default(),
                    };
                    Ok((state, next, self.send(permit, Durability::Critical, batch)))
                }
                Err(e) => Err(e),
            }
        };
        match res {
            Ok((state, next, commit)) => {
                commit.done().await?;
                Ok(ResultAccepted {
                    state,
                    tasks: next.tasks,
                    cancel: next.cancel,
                })
            }
            Err(QueueError::NotActive(_)) => {
                // A repeat of a report that already landed (the agent retried after a lost
                // answer) is acknowledged again; anything else lost its lease.
                self.barrier().await?;
                match self.read_result(id)? {
                    Some(r)
                        if r.agent == Some(p.key)
                            && r.attempt == attempt
                            && same_outcome(&r.outcome, &req.outcome) =>
                    {
                        let state = ResultView::from(&r).state;
                        Ok(ResultAccepted {
                            state,
                            tasks: Vec::new(),
                            cancel: Vec::new(),
                        })
                    }
                    // Finished some other way (cancelled, expired, another report).
                    _ => Err(CoordinatorError::LeaseLost { task: id, attempt }),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Resolves at the next submission or requeue (register by polling it before checking the
    /// queue, as with any `Notify`).
    pub fn work_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.work.notified()
    }

    /// Queued tasks worth offering to mesh peers: those no live agent of this node (`own`
    /// decides which agents count) can run, and those that waited `offer_after` for a free
    /// one. Tasks this node runs for other nodes (idempotency key `mesh:`) are never offered on,
    /// nor those `skip` rejects (filtered before `limit` applies, so they cannot starve others).
    pub fn offerable(
        &self,
        now: u64,
        offer_after_ms: u64,
        own: impl Fn(&KeyId, bool) -> bool,
        skip: impl Fn(&TaskRecord) -> bool,
        limit: usize,
    ) -> Vec<TaskRecord> {
        let core = self.lock();
        let caps: Vec<&Capabilities> = core
            .agents
            .values()
            .filter(|e| own(&e.record.key, e.record.local))
            .map(|e| &e.record.capabilities)
            .collect();
        let mut v: Vec<TaskRecord> = core
            .queue
            .queued()
            .filter(|r| r.deadline_ms > now)
            .filter(|r| {
                !r.idempotency_key
                    .as_deref()
                    .is_some_and(|k| k.starts_with(MESH_KEY_PREFIX))
            })
            .filter(|r| {
                !caps.iter().any(|c| c.matches(r.kind, &r.requirements))
                    || now.saturating_sub(r.updated_ms) >= offer_after_ms
            })
            .filter(|r| !skip(r))
            .cloned()
            .collect();
        v.sort_by_key(|r| r.id);
        v.truncate(limit);
        v
    }

    /// `GET /agents`: live agents, then agents known from earlier sessions.
    pub fn agents(&self) -> Vec<AgentView> {
        let core = self.lock();
        let mut v: Vec<AgentView> = core
            .agents
            .values()
            .map(|e| AgentView {
                agent: e.record.key,
                live: true,
                local: e.record.local,
                capabilities: e.record.capabilities.clone(),
                session: e.session,
                registered_ms: e.record.registered_ms,
                last_seen_ms: e.last_seen_ms,
                leases: core.queue.leases_of(&e.record.key) as u32,
            })
            .collect();
        v.sort_by_key(|a| a.registered_ms);
        let mut offline: Vec<AgentView> = core
            .known_agents
            .values()
            .filter(|r| !core.agents.contains_key(&r.key))
            .map(|r| AgentView {
                agent: r.key,
                live: false,
                local: r.local,
                capabilities: r.capabilities.clone(),
                session: 0,
                registered_ms: r.registered_ms,
                last_seen_ms: r.registered_ms,
                leases: core.queue.leases_of(&r.key) as u32,
            })
            .collect();
        offline.sort_by_key(|a| a.registered_ms);
        v.extend(offline);
        v
    }

    /// Expires lapsed leases and deadlines and reaps silent agents. Returns when to run next.
    ///
    /// # Errors
    /// Storage.
    pub async fn tick(&self) -> Result<Option<u64>, CoordinatorError> {
        let permit = self.0.store.reserve().await?;
        let now = now_ms();
        let timeout = self.0.cfg.coordinator.agent_timeout.as_millis() as u64;
        let (commit, next, requeued, local_reaped) = {
            let mut core = self.lock();
            let mut transitions = core.queue.expire(now);
            let silent: Vec<KeyId> = core
                .agents
                .values()
                .filter(|e| e.last_seen_ms.saturating_add(timeout) < now)
                .map(|e| e.record.key)
                .collect();
            let mut local_reaped = false;
            for key in silent {
                if let Some(e) = core.agents.remove(&key) {
                    e.signal.notify_waiters();
                    local_reaped |= e.record.local;
                    tracing::warn!(agent = %key, "coordinator.reap agent stopped sending heartbeats");
                }
                transitions.extend(core.queue.release_agent(
                    &key,
                    &[],
                    "agent stopped sending heartbeats",
                    now,
                ));
            }
            let requeued = transitions
                .iter()
                .any(|t| t.record.state == TaskState::Queued);
            let mut batch = Batch::default();
            self.record(&mut core, &transitions, &mut batch);
            let commit =
                (!batch.is_empty()).then(|| self.send(permit, Durability::Critical, batch));
            (commit, core.queue.next_wakeup(), requeued, local_reaped)
        };
        if local_reaped {
            self.0.health.set_worker_registered(false);
        }
        if requeued {
            self.0.work.notify_waiters();
        }
        if let Some(c) = commit {
            c.done().await?;
        }
        Ok(next)
    }

    /// Deletes finished tasks older than `coordinator.task_retention`, in batches of
    /// `PURGE_BATCH` until none are left. Returns how many were deleted.
    ///
    /// # Errors
    /// Storage.
    pub async fn purge_old(&self) -> Result<usize, CoordinatorError> {
        let mut total = 0;
        loop {
            let n = self.purge_batch().await?;
            total += n;
            if n < PURGE_BATCH || self.0.shutdown.is_cancelled() {
                return Ok(total);
            }
            // Let requests run between batches.
            tokio::task::yield_now().await;
        }
    }

    async fn purge_batch(&self) -> Result<usize, CoordinatorError> {
        let cutoff =
            now_ms().saturating_sub(self.0.cfg.coordinator.task_retention.as_millis() as u64);
        let victims: Vec<TaskRecord> = self
            .0
            .store
            .read_blocking(move |r, t| {
                let mut out = Vec::new();
                for item in t.tasks.iter(r)? {
                    let (k, v) = item?;
                    let Ok(id) = <[u8; 16]>::try_from(k) else {
                        continue;
                    };
                    if Ulid::from_bytes(id).timestamp_ms() >= cutoff || out.len() >= PURGE_BATCH {
                        break;
                    }
                    let rec: TaskRecord = decode("tasks", v)?;
                    if rec.state.is_terminal() {
                        out.push(rec);
                    }
                }
                Ok(out)
            })
            .await?;
        if victims.is_empty() {
            return Ok(0);
        }
        let n = victims.len();
        self.0
            .store
            .write(Durability::Bulk, move |txn, t| {
                for rec in &victims {
                    let key = rec.id.to_bytes();
                    t.tasks.delete(txn, &key)?;
                    t.results.delete(txn, &key)?;
                    let start = event_key(rec.id, 0);
                    let end = event_key(rec.id, u32::MAX);
                    let range = (
                        std::ops::Bound::Included(&start[..]),
                        std::ops::Bound::Included(&end[..]),
                    );
                    t.task_events.delete_range(txn, &range)?;
                    if let Some(k) = &rec.idempotency_key {
                        t.idempotency.delete(txn, &idem_key(&rec.requester, k))?;
                    }
                }
                Ok(())
            })
            .await?;
        Ok(n)
    }
}

/// Whether a stored outcome is what `reported` would have produced (an agent repeating a report
/// whose answer it lost).
fn same_outcome(stored: &Outcome, reported: &ReportedOutcome) -> bool {
    match (stored, reported) {
        (Outcome::Succeeded { output }, ReportedOutcome::Succeeded { output: o }) => {
            serde_json::from_str::<serde_json::Value>(output).is_ok_and(|v| v == *o)
        }
        (
            Outcome::Failed { error },
            ReportedOutcome::Failed {
                error: e,
                retryable: false,
            },
        ) => error == e,
        _ => false,
    }
}

fn push_event(w: &mut Watch, ev: TaskEvent) {
    if let Some(live) = &w.live {
        // No receivers is fine: nobody is watching.
        let _ = live.send(ev.clone());
    }
    if w.recent.len() >= RECENT_EVENTS {
        w.recent.pop_front();
    }
    w.recent.push_back(ev);
}

/// Follows a task's events in order: what is recorded, then live ones until the task finishes.
/// A reader that falls behind the live channel catches up from history without gaps.
#[derive(Debug)]
pub struct EventCursor {
    state: CoordinatorState,
    principal: Principal,
    id: TaskId,
    last: u32,
    backlog: VecDeque<TaskEvent>,
    live: Option<broadcast::Receiver<TaskEvent>>,
}

/// What [`EventCursor::next`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorItem {
    /// The next event.
    Event(TaskEvent),
    /// The task finished and every event was read.
    End,
    /// The node is shutting down; resume later from the last sequence number.
    Shutdown,
}

impl EventCursor {
    /// A cursor over `id`'s events after `after`.
    ///
    /// # Errors
    /// Not found, storage.
    pub async fn open(
        state: &CoordinatorState,
        p: &Principal,
        id: TaskId,
        after: u32,
    ) -> Result<Self, CoordinatorError> {
        let sub = state.subscribe(p, id, after).await?;
        Ok(EventCursor {
            state: state.clone(),
            principal: *p,
            id,
            last: after,
            backlog: sub.backlog.into(),
            live: sub.live,
        })
    }

    /// The task followed.
    pub fn task(&self) -> TaskId {
        self.id
    }

    /// Sequence number of the last event returned.
    pub fn last(&self) -> u32 {
        self.last
    }

    /// The next event, or why there is none.
    pub async fn next(&mut self) -> CursorItem {
        loop {
            if let Some(ev) = self.backlog.pop_front() {
                if ev.seq <= self.last {
                    continue;
                }
                self.last = ev.seq;
                return CursorItem::Event(ev);
            }
            let Some(live) = self.live.as_mut() else {
                return CursorItem::End;
            };
            let shutdown = self.state.shutdown_token().clone();
            let received = tokio::select! {
                r = live.recv() => r,
                _ = shutdown.cancelled() => return CursorItem::Shutdown,
            };
            match received {
                Ok(ev) => self.backlog.push_back(ev),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    match self
                        .state
                        .subscribe(&self.principal, self.id, self.last)
                        .await
                    {
                        Ok(Subscription { backlog, live }) => {
                            self.backlog = backlog.into();
                            self.live = live;
                        }
                        Err(_) => self.live = None,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => self.live = None,
            }
        }
    }
}
