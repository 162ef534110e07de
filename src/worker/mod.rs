//! The worker: registers with a coordinator, heartbeats, claims tasks, executes them, reports.
//!
//! # What it owns
//! The worker process (`edgecoder worker`), which talks to its coordinator over signed HTTP
//! exactly as a remote agent would, and the node-side [`supervisor`] that starts it by
//! re-executing the node's own binary and restarts it when it dies.
//!
//! # Protocol
//! 1. `POST /agents/register` with capabilities and the tasks still running (none for a fresh
//!    process, which makes the coordinator requeue whatever the previous process held);
//! 2. a claim loop: `POST /agents/claim?wait=` long-polls for up to the free slot count;
//! 3. a heartbeat every `heartbeat_interval` renews the leases of running tasks and returns
//!    tasks to stop;
//! 4. each task posts its events and then its result; a result is retried until the coordinator
//!    acknowledges it or says the lease is gone.
//!
//! An answer of `agent_not_registered` (the node restarted, or reaped this agent) starts again
//! at step 1, listing the tasks still running so their leases are kept.

mod generate;
pub mod probe;
pub mod supervisor;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{ClientError, CoordinatorClient};
use crate::coordinator::model::*;
use crate::identity::{Identity, IdentityError};

/// How long one claim long-poll waits on the coordinator.
const CLAIM_WAIT: Duration = Duration::from_secs(25);

/// Extra client-side time on top of `CLAIM_WAIT` before a poll counts as lost.
const CLAIM_SLACK: Duration = Duration::from_secs(10);

/// Backoff bounds when the coordinator cannot be reached.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Worker settings (from the command line).
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// Coordinator base URL.
    pub coordinator: String,
    /// Key file (created if missing).
    pub key_file: PathBuf,
    /// Tasks run at once.
    pub slots: u32,
    /// Exit when this process is no longer our parent (the node died).
    pub parent_pid: Option<u32>,
    /// The inference service that runs `chat` and `completion` tasks (none: probes only).
    pub inference: Option<String>,
    /// Generations sent to the inference service at once; more wait in the worker (their leases
    /// kept by heartbeats) instead of being refused as busy and retried at once.
    pub generation_slots: u32,
    /// The resource class it advertises (the node passes what its hardware detection derived).
    pub resource_class: ResourceClass,
}

/// Worker failures that end the process.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The coordinator refused registration for good (for example, the key is not admitted).
    #[error("registration refused: {0}")]
    Refused(ClientError),
    /// Client setup failed.
    #[error(transparent)]
    Client(ClientError),
}

struct Running {
    attempt: u32,
    cancel: CancellationToken,
}

struct Worker {
    client: CoordinatorClient,
    slots: u32,
    class: ResourceClass,
    /// One permit per slot; a running task holds one, and hands it to the task it is given
    /// when it reports (see `PostResult::next`).
    free: Arc<Semaphore>,
    /// The current registration session (for `next` claims).
    session: AtomicU64,
    agent: String,
    running: Mutex<HashMap<TaskId, Running>>,
    slot_freed: Notify,
    tasks: TaskTracker,
    parent_pid: Option<u32>,
    /// Signed client for the inference service, when there is one.
    inference: Option<CoordinatorClient>,
    /// The models advertised at the last registration.
    advertised: Mutex<Vec<String>>,
    /// Gate in front of the inference service (see `WorkerArgs::generation_slots`).
    generating: Arc<Semaphore>,
}

/// Runs the worker until `shutdown` is cancelled (then lets running tasks finish, up to `grace`).
///
/// # Errors
/// A key that cannot be loaded, or a coordinator that refuses this agent.
pub async fn run(
    args: WorkerArgs,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), WorkerError> {
    let (identity, created) = Identity::load_or_create(&args.key_file)?;
    if created {
        tracing::info!(key = %identity.key_id(), file = %args.key_file.display(), "worker created its key");
    }
    let agent = identity.key_id().to_string();
    let identity = Arc::new(identity);
    let client =
        CoordinatorClient::new(&args.coordinator, identity.clone()).map_err(WorkerError::Client)?;
    let inference = match &args.inference {
        Some(u) => Some(CoordinatorClient::new(u, identity).map_err(WorkerError::Client)?),
        None => None,
    };
    let slots = args.slots.max(1);
    let w = Arc::new(Worker {
        client,
        slots,
        class: args.resource_class,
        free: Arc::new(Semaphore::new(slots as usize)),
        session: AtomicU64::new(0),
        agent,
        running: Mutex::new(HashMap::new()),
        slot_freed: Notify::new(),
        tasks: TaskTracker::new(),
        parent_pid: args.parent_pid,
        inference,
        advertised: Mutex::new(Vec::new()),
        generating: Arc::new(Semaphore::new(args.generation_slots.max(1) as usize)),
    });
    let result = w.clone().session_loop(shutdown.clone()).await;
    // Stop taking work; give running tasks the grace period to report.
    w.tasks.close();
    if tokio::time::timeout(grace, w.tasks.wait()).await.is_err() {
        tracing::warn!("worker.stop running tasks did not finish within the grace period");
        for r in w.lock().values() {
            r.cancel.cancel();
        }
    }
    result
}

impl Worker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn running_list(&self) -> Vec<RunningTask> {
        self.lock()
            .iter()
            .map(|(id, r)| RunningTask {
                task: *id,
                attempt: r.attempt,
            })
            .collect()
    }

    fn parent_gone(&self) -> bool {
        #[allow(unsafe_code)]
        // SAFETY: getppid has no preconditions and cannot fail.
        let ppid = unsafe { libc::getppid() } as u32;
        self.parent_pid.is_some_and(|p| p != ppid)
    }

    async fn session_loop(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), WorkerError> {
        while !shutdown.is_cancelled() {
            let Some(reg) = self.register(&shutdown).await? else {
                return Ok(());
            };
            let session_end = shutdown.child_token();
            let hb = tokio::spawn(
                self.clone()
                    .heartbeat_loop(reg.clone(), session_end.clone()),
            );
            self.clone().claim_loop(&reg, &session_end).await;
            session_end.cancel();
            let _ = hb.await;
        }
        Ok(())
    }

    async fn register(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Registered>, WorkerError> {
        let mut backoff = RETRY_MIN;
        loop {
            let models = self.local_models().await;
            let mut kinds = vec![TaskKind::Probe];
            if !models.is_empty() {
                kinds.extend([TaskKind::Chat, TaskKind::Completion]);
            }
            *self.advertised.lock().unwrap_or_else(|p| p.into_inner()) = models.clone();
            let req = RegisterAgent {
                capabilities: Capabilities {
                    kinds,
                    models,
                    resource_class: self.class,
                    slots: self.slots,
                },
                running: self.running_list(),
            };
            match self
                .client
                .post::<_, Registered>("/agents/register", &req)
                .await
            {
                Ok(r) => {
                    tracing::info!(session = r.session, agent = %r.agent, "worker registered");
                    self.session.store(r.session, Ordering::Relaxed);
                    return Ok(Some(r));
                }
                Err(e @ ClientError::Api { status, .. })
                    if status == reqwest::StatusCode::FORBIDDEN
                        || status == reqwest::StatusCode::BAD_REQUEST =>
                {
                    return Err(WorkerError::Refused(e));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "worker.register retrying");
                }
            }
            if self.parent_gone() {
                tracing::warn!("worker.register parent process is gone; exiting");
                return Ok(None);
            }
            tokio::select! {
                _ = tokio::time::sleep(jitter(backoff)) => {}
                _ = shutdown.cancelled() => return Ok(None),
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    /// Names of the models the inference service offers (empty without one, or when it is down).
    async fn local_models(&self) -> Vec<String> {
        let Some(inf) = &self.inference else {
            return Vec::new();
        };
        match inf
            .get::<Vec<crate::inference::api::ModelView>>("/models")
            .await
        {
            Ok(list) => {
                let mut names: Vec<String> = list.into_iter().map(|m| m.name).collect();
                names.sort();
                names
            }
            Err(e) => {
                tracing::debug!(error = %e, "worker.models inference unavailable");
                Vec::new()
            }
        }
    }

    fn cancel_tasks(&self, ids: &[TaskId]) {
        let map = self.lock();
        for id in ids {
            if let Some(r) = map.get(id) {
                tracing::info!(task = %id, "worker.cancel stopping task");
                r.cancel.cancel();
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, reg: Registered, end: CancellationToken) {
        let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = end.cancelled() => return,
            }
            if self.parent_gone() {
                tracing::warn!("worker.heartbeat parent process is gone; exiting");
                end.cancel();
                return;
            }
            // Models added or removed since registration: register again to advertise them.
            let models = self.local_models().await;
            if models != *self.advertised.lock().unwrap_or_else(|p| p.into_inner()) {
                tracing::info!(
                    ?models,
                    "worker.heartbeat models changed; registering again"
                );
                end.cancel();
                return;
            }
            let hb = Heartbeat {
                session: reg.session,
                running: self.running_list(),
            };
            match self
                .client
                .post::<_, HeartbeatReply>("/agents/heartbeat", &hb)
                .await
            {
                Ok(reply) => self.cancel_tasks(&reply.cancel),
                Err(e) if e.code() == Some("agent_not_registered") => {
                    tracing::info!("worker.heartbeat session ended; registering again");
                    end.cancel();
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "worker.heartbeat failed"),
            }
        }
    }

    async fn claim_loop(self: Arc<Self>, reg: &Registered, end: &CancellationToken) {
        let mut backoff = RETRY_MIN;
        while !end.is_cancelled() {
            // Hold the free slots while asking for that many tasks, so reports handing their
            // slot on cannot push the worker past its slot count.
            let free = self.free.available_permits() as u32;
            let permits = match free {
                0 => None,
                n => self.free.clone().try_acquire_many_owned(n).ok(),
            };
            let free = permits.as_ref().map_or(0, |p| p.num_permits() as u32);
            let req = Claim {
                session: reg.session,
                max: free,
                task: None,
            };
            let path = format!("/agents/claim?wait={}s", CLAIM_WAIT.as_secs());
            let poll = self.client.send::<_, ClaimReply>(
                Method::POST,
                &path,
                Some(&req),
                Some(CLAIM_WAIT + CLAIM_SLACK),
            );
            let answer = if free == 0 {
                // Only waiting for cancellations: give up the poll as soon as a slot frees. No
                // task can be lost by dropping it, since it asked for none.
                tokio::select! {
                    a = poll => Some(a),
                    _ = self.slot_freed.notified() => None,
                    _ = end.cancelled() => return,
                }
            } else {
                tokio::select! {
                    a = poll => Some(a),
                    _ = end.cancelled() => return,
                }
            };
            let Some(answer) = answer else { continue };
            match answer {
                Ok(a) => {
                    backoff = RETRY_MIN;
                    self.cancel_tasks(&a.body.cancel);
                    let mut permits = permits;
                    for t in a.body.tasks {
                        let Some(one) = permits.as_mut().and_then(|p| p.split(1)) else {
                            tracing::warn!(task = %t.id, "worker.claim more tasks than asked for; leaving it to expire");
                            continue;
                        };
                        self.start(t, one);
                    }
                    // Unused permits go back when `permits` drops here.
                }
                Err(e) if e.code() == Some("agent_not_registered") => return,
                Err(e) => {
                    tracing::debug!(error = %e, "worker.claim failed");
                    if self.parent_gone() {
                        end.cancel();
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(jitter(backoff)) => {}
                        _ = end.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    fn start(self: &Arc<Self>, task: ClaimedTask, slot: OwnedSemaphorePermit) {
        let w = self.clone();
        self.tasks.spawn(async move {
            let mut next = Some(task);
            while let Some(task) = next.take() {
                let cancel = CancellationToken::new();
                w.lock().insert(
                    task.id,
                    Running {
                        attempt: task.attempt,
                        cancel: cancel.clone(),
                    },
                );
                let id = task.id;
                next = w.execute(task, cancel).await;
                w.lock().remove(&id);
            }
            drop(slot);
            // notify_one keeps a permit, so a poll that starts just after this still sees it.
            w.slot_freed.notify_one();
        });
    }

    /// Runs a task and reports it; returns the next task the coordinator handed over with the
    /// acknowledgement, if any.
    async fn execute(
        self: &Arc<Self>,
        task: ClaimedTask,
        cancel: CancellationToken,
    ) -> Option<ClaimedTask> {
        let host = TaskHost {
            worker: self.clone(),
            task: task.id,
            attempt: task.attempt,
            cancel: cancel.clone(),
        };
        let outcome = match task.kind {
            TaskKind::Probe => {
                probe::run(&task.payload, task.attempt, &self.agent, &host, &cancel).await
            }
            TaskKind::Chat | TaskKind::Completion => match &self.inference {
                Some(inf) => {
                    let permit = tokio::select! {
                        p = self.generating.clone().acquire_owned() => p.ok(),
                        _ = cancel.cancelled() => return None,
                    };
                    let out = generate::run(inf, &task, &host, &cancel).await;
                    drop(permit);
                    out
                }
                None => Some(ReportedOutcome::Failed {
                    error: "this worker has no inference service".into(),
                    retryable: true,
                }),
            },
            other => Some(ReportedOutcome::Failed {
                error: format!("this worker does not run {} tasks", other.as_str()),
                retryable: true,
            }),
        };
        let Some(outcome) = outcome else {
            tracing::debug!(task = %task.id, "worker.execute stopped without a result");
            return None;
        };
        self.report(task.id, task.attempt, outcome, &cancel).await
    }

    async fn report(
        &self,
        id: TaskId,
        attempt: u32,
        outcome: ReportedOutcome,
        cancel: &CancellationToken,
    ) -> Option<ClaimedTask> {
        let body = PostResult {
            attempt,
            outcome,
            next: Some(Claim {
                session: self.session.load(Ordering::Relaxed),
                max: 1,
                task: None,
            }),
        };
        let path = format!("/tasks/{id}/result");
        let mut backoff = RETRY_MIN;
        loop {
            match self.client.post::<_, ResultAccepted>(&path, &body).await {
                Ok(a) => {
                    self.cancel_tasks(&a.cancel);
                    return a.tasks.into_iter().next();
                }
                Err(ClientError::Api { status, code, .. })
                    if status.is_client_error() && status.as_u16() != 429 =>
                {
                    tracing::info!(task = %id, %code, "worker.report result not accepted");
                    return None;
                }
                Err(e) => tracing::debug!(task = %id, error = %e, "worker.report retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(jitter(backoff)) => {}
                _ = cancel.cancelled() => return None,
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }
}

/// What a running task can do: send events.
struct TaskHost {
    worker: Arc<Worker>,
    task: TaskId,
    attempt: u32,
    cancel: CancellationToken,
}

impl probe::ProbeHost for TaskHost {
    async fn emit(&self, events: Vec<NewEvent>) -> bool {
        let body = PostEvents {
            attempt: self.attempt,
            events,
        };
        let path = format!("/tasks/{}/events", self.task);
        match self
            .worker
            .client
            .post::<_, EventsAccepted>(&path, &body)
            .await
        {
            Ok(_) => true,
            Err(ClientError::Api { status, code, .. })
                if status.is_client_error() && status.as_u16() != 429 =>
            {
                tracing::info!(task = %self.task, %code, "worker.emit events refused; stopping task");
                self.cancel.cancel();
                false
            }
            // A lost event batch is not worth failing the task for.
            Err(e) => {
                tracing::debug!(task = %self.task, error = %e, "worker.emit failed");
                true
            }
        }
    }
}

/// A duration between half and all of `d`, so restarting agents do not retry in lockstep.
pub fn jitter(d: Duration) -> Duration {
    let r = u64::from_le_bytes(crate::clock::random_bytes::<8>());
    let half = d / 2;
    let extra_ns = if half.as_nanos() == 0 {
        0
    } else {
        r % (half.as_nanos() as u64).max(1)
    };
    half + Duration::from_nanos(extra_ns)
}
