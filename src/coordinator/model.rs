//! Task and agent types: the records the coordinator stores and the JSON its API speaks.
//!
//! Stored records ([`TaskRecord`], [`TaskResult`], [`TaskEvent`], [`AgentRecord`]) are postcard
//! with a version byte (see [`crate::store`]); because postcard cannot carry free-form JSON,
//! payloads and outputs are kept as JSON text and parsed again only when shown.
//! The JSON shapes clients see are the `*View` types and the request types; those are the wire
//! contract documented in `docs/api/coordinator.md`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::Ulid;
use crate::identity::KeyId;

/// A task id.
pub type TaskId = Ulid;

/// Most events accepted in one `POST /tasks/{id}/events`; senders split longer runs.
pub const MAX_EVENTS_PER_POST: usize = 1024;

/// What a task asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Chat completion through a model.
    Chat,
    /// Raw completion (prompt, optional suffix) through a model.
    Completion,
    /// Code generation with validation.
    Code,
    /// Sandboxed execution.
    Exec,
    /// Diagnostic task: echoes its payload, optionally waits or fails. For health checks and
    /// benchmarks.
    Probe,
}

impl TaskKind {
    /// The name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Chat => "chat",
            TaskKind::Completion => "completion",
            TaskKind::Code => "code",
            TaskKind::Exec => "exec",
            TaskKind::Probe => "probe",
        }
    }
}

impl std::str::FromStr for TaskKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "chat" => TaskKind::Chat,
            "completion" => TaskKind::Completion,
            "code" => TaskKind::Code,
            "exec" => TaskKind::Exec,
            "probe" => TaskKind::Probe,
            other => {
                return Err(format!(
                    "unknown task kind {other:?} (chat, completion, code, exec, probe)"
                ));
            }
        })
    }
}

/// Where a task is in its life. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for an agent.
    Queued,
    /// Granted to an agent that has not reported progress yet.
    Leased,
    /// The agent has reported progress.
    Running,
    /// Finished with output.
    Succeeded,
    /// Finished without output; the reasons are in `failures`.
    Failed,
    /// Cancelled by its requester.
    Cancelled,
    /// Its deadline passed before it finished.
    Expired,
}

impl TaskState {
    /// Whether the state is final.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::Expired
        )
    }

    /// The name used in JSON and queries.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Leased => "leased",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Expired => "expired",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "queued" => TaskState::Queued,
            "leased" => TaskState::Leased,
            "running" => TaskState::Running,
            "succeeded" => TaskState::Succeeded,
            "failed" => TaskState::Failed,
            "cancelled" => TaskState::Cancelled,
            "expired" => TaskState::Expired,
            other => return Err(format!("unknown task state {other:?}")),
        })
    }
}

/// Capacity tiers, smallest first; the hardware module derives a node's class.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum ResourceClass {
    /// Under 4 GiB for models; tiny models only.
    #[default]
    Tiny,
    /// Small boards (Pi 4/5 class).
    Small,
    /// Jetson Orin Nano, 16 GB mini-PCs.
    Medium,
    /// Discrete GPUs, Jetson AGX Orin.
    Large,
    /// Large GPUs.
    Xlarge,
}

/// What a task needs from the agent that runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    // No `skip_serializing_if` here: this struct is stored with postcard, a positional format in
    // which a skipped field shifts every later one (the round-trip property test catches it).
    /// A model name the agent must have.
    #[serde(default)]
    pub model: Option<String>,
    /// The smallest resource class that may run it.
    #[serde(default)]
    pub min_class: Option<ResourceClass>,
    /// Most tokens to generate, for model tasks.
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

/// What an agent can run; sent at registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Task kinds it executes.
    pub kinds: Vec<TaskKind>,
    /// Models it has.
    #[serde(default)]
    pub models: Vec<String>,
    /// Its resource class.
    #[serde(default)]
    pub resource_class: ResourceClass,
    /// Tasks it runs at once.
    pub slots: u32,
}

impl Capabilities {
    /// Whether an agent with these capabilities may run a task of `kind` needing `req`.
    pub fn matches(&self, kind: TaskKind, req: &Requirements) -> bool {
        self.kinds.contains(&kind)
            && req.model.as_ref().is_none_or(|m| self.models.contains(m))
            && req.min_class.is_none_or(|c| self.resource_class >= c)
    }
}

/// A lease: one agent's exclusive right to run one attempt of a task until `expires_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The agent.
    pub agent: KeyId,
    /// The agent's registration session; a restarted agent has a new one.
    pub session: u64,
    /// Which attempt this is (1-based).
    pub attempt: u32,
    /// When the lease lapses unless renewed.
    pub expires_ms: u64,
}

/// Why an attempt did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The attempt.
    pub attempt: u32,
    /// The agent that held it, if any.
    pub agent: Option<KeyId>,
    /// What happened.
    pub reason: String,
    /// When.
    pub at_ms: u64,
}

/// The stored task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Id (time-ordered).
    pub id: TaskId,
    /// Kind.
    pub kind: TaskKind,
    /// Key that submitted it; fairness and access are per requester.
    pub requester: KeyId,
    /// The requester's idempotency key, if it gave one.
    pub idempotency_key: Option<String>,
    /// What it needs.
    pub requirements: Requirements,
    /// Payload, as JSON text.
    pub payload: String,
    /// Higher runs first among one requester's tasks.
    pub priority: i32,
    /// Created, ms since the epoch.
    pub created_ms: u64,
    /// Last state change.
    pub updated_ms: u64,
    /// Past this the task expires.
    pub deadline_ms: u64,
    /// State.
    pub state: TaskState,
    /// Leases granted so far.
    pub attempts: u32,
    /// Leases it may get.
    pub max_attempts: u32,
    /// The current lease, when leased or running.
    pub lease: Option<Lease>,
    /// Why earlier attempts ended without success.
    pub failures: Vec<Failure>,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Output as JSON text.
    Succeeded {
        /// JSON text.
        output: String,
    },
    /// The final error.
    Failed {
        /// Message.
        error: String,
    },
    /// Cancelled by the requester.
    Cancelled,
    /// Deadline passed.
    Expired,
}

/// The stored result of a finished task; written exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task.
    pub task: TaskId,
    /// How it ended.
    pub outcome: Outcome,
    /// The attempt that ended it (0 if it never ran).
    pub attempt: u32,
    /// The agent that produced it, if any.
    pub agent: Option<KeyId>,
    /// When.
    pub finished_ms: u64,
}

/// Kinds of task events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A state change (written by the coordinator).
    State,
    /// A log line from the executor.
    Log,
    /// Generated text.
    Token,
    /// Progress information.
    Progress,
}

impl EventKind {
    /// The SSE event name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::State => "state",
            EventKind::Log => "log",
            EventKind::Token => "token",
            EventKind::Progress => "progress",
        }
    }
}

/// One event in a task's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// Position in the task's stream, from 1.
    pub seq: u32,
    /// When it was recorded.
    pub at_ms: u64,
    /// Kind.
    pub kind: EventKind,
    /// JSON text.
    pub data: String,
}

/// A registered agent, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its key.
    pub key: KeyId,
    /// What it said it can do.
    pub capabilities: Capabilities,
    /// When it (last) registered.
    pub registered_ms: u64,
    /// Whether it is this node's own worker.
    pub local: bool,
}

/// `POST /tasks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitTask {
    /// Kind.
    pub kind: TaskKind,
    /// Any JSON.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Needs.
    #[serde(default)]
    pub requirements: Requirements,
    /// -100..=100; default 0.
    #[serde(default)]
    pub priority: i32,
    /// Relative deadline such as "30s"; default `coordinator.default_deadline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Attempts allowed; default and maximum `coordinator.max_attempts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Resubmitting with the same key returns the first task instead of a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl SubmitTask {
    /// A `probe` task with this payload and every other field at its default.
    pub fn probe(payload: serde_json::Value) -> Self {
        SubmitTask {
            kind: TaskKind::Probe,
            payload,
            requirements: Requirements::default(),
            priority: 0,
            timeout: None,
            max_attempts: None,
            idempotency_key: None,
        }
    }
}

/// A lease as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    /// Agent key id.
    pub agent: KeyId,
    /// Attempt number.
    pub attempt: u32,
    /// Expiry, ms since the epoch.
    pub expires_ms: u64,
}

/// A failure as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureView {
    /// Attempt number.
    pub attempt: u32,
    /// Agent key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<KeyId>,
    /// Reason.
    pub reason: String,
    /// When.
    pub at_ms: u64,
}

/// A task as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    /// Id.
    pub id: TaskId,
    /// Kind.
    pub kind: TaskKind,
    /// State.
    pub state: TaskState,
    /// Requester key id.
    pub requester: KeyId,
    /// Priority.
    pub priority: i32,
    /// Requirements.
    pub requirements: Requirements,
    /// Payload.
    pub payload: serde_json::Value,
    /// Attempts so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Created.
    pub created_ms: u64,
    /// Updated.
    pub updated_ms: u64,
    /// Deadline.
    pub deadline_ms: u64,
    /// Current lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseView>,
    /// Earlier failures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<FailureView>,
    /// Idempotency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The result, when a `POST /tasks?wait=` saw the task finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultView>,
}

impl From<&TaskRecord> for TaskView {
    fn from(r: &TaskRecord) -> Self {
        TaskView {
            id: r.id,
            kind: r.kind,
            state: r.state,
            requester: r.requester,
            priority: r.priority,
            requirements: r.requirements.clone(),
            payload: serde_json::from_str(&r.payload).unwrap_or(serde_json::Value::Null),
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
            deadline_ms: r.deadline_ms,
            lease: r.lease.map(|l| LeaseView {
                agent: l.agent,
                attempt: l.attempt,
                expires_ms: l.expires_ms,
            }),
            failures: r
                .failures
                .iter()
                .map(|f| FailureView {
                    attempt: f.attempt,
                    agent: f.agent,
                    reason: f.reason.clone(),
                    at_ms: f.at_ms,
                })
                .collect(),
            idempotency_key: r.idempotency_key.clone(),
            result: None,
        }
    }
}

/// A result as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultView {
    /// Task id.
    pub task: TaskId,
    /// Final state.
    pub state: TaskState,
    /// Output, for succeeded tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<serde_json::Value>,
    /// Error, for failed tasks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The attempt that ended it.
    pub attempt: u32,
    /// The agent that produced it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<KeyId>,
    /// When it finished.
    pub finished_ms: u64,
}

impl From<&TaskResult> for ResultView {
    fn from(r: &TaskResult) -> Self {
        let (state, output, error) = match &r.outcome {
            Outcome::Succeeded { output } => (
                TaskState::Succeeded,
                Some(serde_json::from_str(output).unwrap_or(serde_json::Value::Null)),
                None,
            ),
            Outcome::Failed { error } => (TaskState::Failed, None, Some(error.clone())),
            Outcome::Cancelled => (TaskState::Cancelled, None, None),
            Outcome::Expired => (TaskState::Expired, None, None),
        };
        ResultView {
            task: r.task,
            state,
            output,
            error,
            attempt: r.attempt,
            agent: r.agent,
            finished_ms: r.finished_ms,
        }
    }
}

/// Answer of `GET /tasks/{id}/result` while the task is not finished (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingView {
    /// Task id.
    pub task: TaskId,
    /// Current state.
    pub state: TaskState,
}

/// An event as clients see it (also the SSE `data`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    /// Sequence number.
    pub seq: u32,
    /// Time.
    pub at_ms: u64,
    /// Kind.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// Data.
    pub data: serde_json::Value,
}

impl From<&TaskEvent> for EventView {
    fn from(e: &TaskEvent) -> Self {
        EventView {
            seq: e.seq,
            at_ms: e.at_ms,
            kind: e.kind,
            data: serde_json::from_str(&e.data).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// `GET /tasks` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskList {
    /// Tasks, oldest first.
    pub tasks: Vec<TaskView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<TaskId>,
}

/// `POST /agents/register`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterAgent {
    /// What it can run.
    pub capabilities: Capabilities,
    /// Tasks it is still running from before (a fresh process sends none); leases it held and
    /// does not list are released at once.
    #[serde(default)]
    pub running: Vec<RunningTask>,
}

/// A task an agent is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningTask {
    /// Task id.
    pub task: TaskId,
    /// Attempt number from the claim.
    pub attempt: u32,
}

/// Answer to registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The agent's id (its key id).
    pub agent: KeyId,
    /// Session number, sent with heartbeats and claims.
    pub session: u64,
    /// Heartbeat at least this often (ms).
    pub heartbeat_interval_ms: u64,
    /// Leases last this long without renewal (ms).
    pub lease_ttl_ms: u64,
}

/// `POST /agents/heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Session from registration.
    pub session: u64,
    /// Tasks running now; their leases are renewed.
    #[serde(default)]
    pub running: Vec<RunningTask>,
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HeartbeatReply {
    /// Leases renewed.
    pub renewed: u32,
    /// Tasks to stop now (cancelled, or the lease is no longer this agent's).
    pub cancel: Vec<TaskId>,
}

/// `POST /agents/claim`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// Session from registration.
    pub session: u64,
    /// Most tasks to take (free slots). 0 waits only for cancellations.
    pub max: u32,
    /// Only this task (a mesh peer claiming what it was offered); nothing is granted when it
    /// is no longer queued, and the claim never waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskId>,
}

/// A task handed to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimedTask {
    /// Task id.
    pub id: TaskId,
    /// Kind.
    pub kind: TaskKind,
    /// Attempt number: send it with events and the result.
    pub attempt: u32,
    /// Payload.
    pub payload: serde_json::Value,
    /// Requirements.
    pub requirements: Requirements,
    /// Lease expiry (renew by heartbeat).
    pub lease_expires_ms: u64,
    /// Task deadline.
    pub deadline_ms: u64,
}

/// Answer to a claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClaimReply {
    /// Tasks granted.
    pub tasks: Vec<ClaimedTask>,
    /// Tasks to stop now.
    pub cancel: Vec<TaskId>,
}

/// One event sent by an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// Kind (`state` is reserved to the coordinator).
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// Any JSON.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// `POST /tasks/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostEvents {
    /// Attempt number from the claim.
    pub attempt: u32,
    /// Events, in order.
    pub events: Vec<NewEvent>,
}

/// Answer to posted events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsAccepted {
    /// Sequence number of the last event stored.
    pub last_seq: u32,
}

/// How an attempt ended, as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReportedOutcome {
    /// Done.
    Succeeded {
        /// Any JSON.
        #[serde(default)]
        output: serde_json::Value,
    },
    /// Did not work.
    Failed {
        /// Message.
        error: String,
        /// Whether another attempt might succeed.
        #[serde(default)]
        retryable: bool,
    },
}

/// `POST /tasks/{id}/result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostResult {
    /// Attempt number from the claim.
    pub attempt: u32,
    /// Outcome.
    pub outcome: ReportedOutcome,
    /// Claim more work in the same round trip (without waiting): the slot this task used is
    /// free again. Saves a request and a commit per task for a busy agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Claim>,
}

/// Answer to a posted result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultAccepted {
    /// The task's state after the report.
    pub state: TaskState,
    /// Tasks granted through `next`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<ClaimedTask>,
    /// Tasks to stop now (with `next`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cancel: Vec<TaskId>,
}

/// An agent as `GET /agents` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    /// Key id.
    pub agent: KeyId,
    /// Whether it is registered and heartbeating now (false: known from an earlier session).
    pub live: bool,
    /// Whether this node's own worker.
    pub local: bool,
    /// Capabilities.
    pub capabilities: Capabilities,
    /// Session.
    pub session: u64,
    /// Registered.
    pub registered_ms: u64,
    /// Last heartbeat or claim.
    pub last_seen_ms: u64,
    /// Leases held.
    pub leases: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_kind() -> impl Strategy<Value = TaskKind> {
        prop_oneof![
            Just(TaskKind::Chat),
            Just(TaskKind::Completion),
            Just(TaskKind::Code),
            Just(TaskKind::Exec),
            Just(TaskKind::Probe)
        ]
    }

    fn arb_state() -> impl Strategy<Value = TaskState> {
        prop_oneof![
            Just(TaskState::Queued),
            Just(TaskState::Leased),
            Just(TaskState::Running),
            Just(TaskState::Succeeded),
            Just(TaskState::Failed),
            Just(TaskState::Cancelled),
            Just(TaskState::Expired)
        ]
    }

    prop_compose! {
        fn arb_record()(id in any::<u128>(), kind in arb_kind(), state in arb_state(), key in any::<[u8; 32]>(),
                        idem in proptest::option::of(".{0,20}"), model in proptest::option::of("[a-z0-9:.-]{1,20}"),
                        payload in ".{0,40}", priority in -100i32..=100, times in any::<(u64, u64, u64)>(),
                        attempts in 0u32..10, lease in proptest::option::of((any::<u64>(), 1u32..10, any::<u64>())),
                        failures in proptest::collection::vec((1u32..10, ".{0,20}", any::<u64>()), 0..3)) -> TaskRecord {
            TaskRecord {
                id: Ulid(id), kind, requester: KeyId(key), idempotency_key: idem,
                requirements: Requirements { model, min_class: Some(ResourceClass::Small), max_tokens: Some(7) },
                payload, priority, created_ms: times.0, updated_ms: times.1, deadline_ms: times.2, state, attempts,
                max_attempts: 3,
                lease: lease.map(|(s, a, e)| Lease { agent: KeyId(key), session: s, attempt: a, expires_ms: e }),
                failures: failures.into_iter().map(|(attempt, reason, at_ms)| Failure { attempt, agent: None, reason, at_ms }).collect(),
            }
        }
    }

    proptest! {
        #[test]
        fn task_record_round_trips(r in arb_record()) {
            let bytes = crate::store::encode(&r);
            let back: TaskRecord = crate::store::decode("tasks", &bytes).unwrap();
            prop_assert_eq!(back, r);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = crate::store::decode::<TaskRecord>("tasks", &bytes);
            let _ = crate::store::decode::<TaskResult>("results", &bytes);
            let _ = crate::store::decode::<TaskEvent>("task_events", &bytes);
        }

        #[test]
        fn result_and_event_round_trip(id in any::<u128>(), out in ".{0,40}", seq in any::<u32>(), at in any::<u64>()) {
            let r = TaskResult { task: Ulid(id), outcome: Outcome::Succeeded { output: out.clone() }, attempt: 2, agent: Some(KeyId([3; 32])), finished_ms: at };
            prop_assert_eq!(crate::store::decode::<TaskResult>("results", &crate::store::encode(&r)).unwrap(), r);
            let e = TaskEvent { seq, at_ms: at, kind: EventKind::Token, data: out };
            prop_assert_eq!(crate::store::decode::<TaskEvent>("task_events", &crate::store::encode(&e)).unwrap(), e);
        }

        #[test]
        fn submit_json_round_trips(kind in arb_kind(), priority in -100i32..=100, n in any::<i64>(), key in proptest::option::of("[a-z]{1,8}")) {
            let s = SubmitTask { kind, payload: serde_json::json!({"n": n}), requirements: Requirements::default(), priority,
                                 timeout: Some("5s".into()), max_attempts: Some(2), idempotency_key: key };
            let text = serde_json::to_string(&s).unwrap();
            let back: SubmitTask = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&s).unwrap());
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<SubmitTask>(r#"{"kind":"probe","colour":1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"));
        assert!(serde_json::from_str::<SubmitTask>(r#"{"kind":"nope"}"#).is_err());
    }

    #[test]
    fn capability_matching() {
        let caps = Capabilities {
            kinds: vec![TaskKind::Probe, TaskKind::Chat],
            models: vec!["qwen".into()],
            resource_class: ResourceClass::Medium,
            slots: 2,
        };
        assert!(caps.matches(TaskKind::Probe, &Requirements::default()));
        assert!(!caps.matches(TaskKind::Exec, &Requirements::default()));
        let need = |model: Option<&str>, class| Requirements {
            model: model.map(str::to_string),
            min_class: class,
            max_tokens: None,
        };
        assert!(caps.matches(TaskKind::Chat, &need(Some("qwen"), None)));
        assert!(!caps.matches(TaskKind::Chat, &need(Some("llama"), None)));
        assert!(caps.matches(TaskKind::Chat, &need(None, Some(ResourceClass::Small))));
        assert!(!caps.matches(TaskKind::Chat, &need(None, Some(ResourceClass::Large))));
    }
}
