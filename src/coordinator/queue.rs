//! The task queue state machine, in memory and free of I/O.
//!
//! ```text
//! queued -> leased -> running -> succeeded | failed | cancelled | expired
//!   ^         |          |
//!   +---------+----------+   lease expired / agent gone / retryable failure, attempts left
//! ```
//! Every operation takes the current time and returns the [`Transition`]s it made; the caller
//! persists them (see `state.rs`) before answering anyone. Only unfinished tasks live here; a task
//! leaves the queue when it reaches a terminal state.
//!
//! Scheduling: agents take tasks round-robin across requesters (one task per requester per
//! pass, so a requester with ten thousand queued tasks cannot starve one with a single task),
//! within a requester by priority then age, and only tasks whose requirements the agent's
//! capabilities meet.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use super::model::{
    Capabilities, Failure, Lease, Outcome, ReportedOutcome, RunningTask, TaskId, TaskRecord,
    TaskResult, TaskState,
};
use crate::identity::KeyId;

/// How many queued tasks of one requester are examined for a capability match per claim. A
/// requester whose first tasks no agent can run does not make every claim scan its whole backlog.
const MATCH_SCAN_LIMIT: usize = 256;

/// Queue settings.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Lease length without renewal.
    pub lease_ttl_ms: u64,
    /// Most unfinished tasks.
    pub max_active: usize,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The task is not in the queue (finished, or never existed).
    #[error("task {0} is not active")]
    NotActive(TaskId),
    /// The caller does not hold the current lease (expired and re-granted, or another agent's).
    #[error("task {task} is not leased to this agent for attempt {attempt}")]
    LeaseLost {
        /// Task.
        task: TaskId,
        /// Attempt the caller named.
        attempt: u32,
    },
    /// Too many unfinished tasks.
    #[error("the queue is full ({max} unfinished tasks)")]
    Full {
        /// The limit.
        max: usize,
    },
}

/// One state change, with what must be stored for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The task after the change.
    pub record: TaskRecord,
    /// The state before (`None` for a new task).
    pub from: Option<TaskState>,
    /// Why, for state events.
    pub reason: Option<String>,
    /// The result, when the change is terminal.
    pub result: Option<TaskResult>,
}

/// Counts by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounts {
    /// Queued.
    pub queued: usize,
    /// Leased.
    pub leased: usize,
    /// Running.
    pub running: usize,
}

/// The queue.
#[derive(Debug)]
pub struct Queue {
    cfg: QueueConfig,
    active: HashMap<TaskId, TaskRecord>,
    ready: BTreeMap<KeyId, BTreeSet<(Reverse<i32>, TaskId)>>,
    cursor: Option<KeyId>,
    leases: BTreeSet<(u64, TaskId)>,
    deadlines: BTreeSet<(u64, TaskId)>,
    by_agent: HashMap<KeyId, BTreeSet<TaskId>>,
    pending_cancel: HashMap<KeyId, Vec<TaskId>>,
}

impl Queue {
    /// An empty queue.
    pub fn new(cfg: QueueConfig) -> Self {
        Queue {
            cfg,
            active: HashMap::new(),
            ready: BTreeMap::new(),
            cursor: None,
            leases: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            by_agent: HashMap::new(),
            pending_cancel: HashMap::new(),
        }
    }

    /// An unfinished task.
    pub fn get(&self, id: &TaskId) -> Option<&TaskRecord> {
        self.active.get(id)
    }

    /// Number of unfinished tasks.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// Whether there are no unfinished tasks.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Counts by state.
    pub fn counts(&self) -> QueueCounts {
        let queued = self.ready.values().map(BTreeSet::len).sum();
        let mut c = QueueCounts {
            queued,
            ..Default::default()
        };
        for ids in self.by_agent.values() {
            for id in ids {
                match self.active.get(id).map(|r| r.state) {
                    Some(TaskState::Leased) => c.leased += 1,
                    Some(TaskState::Running) => c.running += 1,
                    _ => {}
                }
            }
        }
        c
    }

    /// Leases held by `agent`.
    pub fn leases_of(&self, agent: &KeyId) -> usize {
        self.by_agent.get(agent).map_or(0, BTreeSet::len)
    }

    /// The earliest time something needs doing (a lease or deadline lapses).
    pub fn next_wakeup(&self) -> Option<u64> {
        let l = self.leases.first().map(|(t, _)| *t);
        let d = self.deadlines.first().map(|(t, _)| *t);
        match (l, d) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Puts a task loaded from the store back in its place (boot). Lease renewals are kept in
    /// memory only (a heartbeat must not cost a disk write), and an agent cannot renew while the
    /// node is down, so a restored lease gets a fresh `lease_ttl` from `now` (never past the
    /// deadline): a surviving agent has that long to register again and keep its work.
    pub fn restore(&mut self, mut rec: TaskRecord, now: u64) {
        if rec.state.is_terminal() {
            return;
        }
        if let Some(l) = rec.lease.as_mut() {
            let fresh = now
                .saturating_add(self.cfg.lease_ttl_ms)
                .min(rec.deadline_ms);
            l.expires_ms = l.expires_ms.max(fresh);
        }
        self.index(&rec);
        self.active.insert(rec.id, rec);
    }

    fn index(&mut self, rec: &TaskRecord) {
        self.deadlines.insert((rec.deadline_ms, rec.id));
        match (rec.state, rec.lease) {
            (TaskState::Queued, _) => {
                self.ready
                    .entry(rec.requester)
                    .or_default()
                    .insert((Reverse(rec.priority), rec.id));
            }
            (TaskState::Leased | TaskState::Running, Some(l)) => {
                self.leases.insert((l.expires_ms, rec.id));
                self.by_agent.entry(l.agent).or_default().insert(rec.id);
            }
            _ => {}
        }
    }

    fn unindex(&mut self, rec: &TaskRecord) {
        self.deadlines.remove(&(rec.deadline_ms, rec.id));
        if let Some(set) = self.ready.get_mut(&rec.requester) {
            set.remove(&(Reverse(rec.priority), rec.id));
            if set.is_empty() {
                self.ready.remove(&rec.requester);
            }
        }
        if let Some(l) = rec.lease {
            self.leases.remove(&(l.expires_ms, rec.id));
            if let Some(set) = self.by_agent.get_mut(&l.agent) {
                set.remove(&rec.id);
                if set.is_empty() {
                    self.by_agent.remove(&l.agent);
                }
            }
        }
    }

    /// Adds a new task (state `queued`).
    ///
    /// # Errors
    /// [`QueueError::Full`].
    pub fn submit(&mut self, rec: TaskRecord) -> Result<Transition, QueueError> {
        if self.active.len() >= self.cfg.max_active {
            return Err(QueueError::Full {
                max: self.cfg.max_active,
            });
        }
        debug_assert_eq!(rec.state, TaskState::Queued);
        self.index(&rec);
        self.active.insert(rec.id, rec.clone());
        Ok(Transition {
            record: rec,
            from: None,
            reason: None,
            result: None,
        })
    }

    /// Grants up to `max` tasks to an agent, fairly across requesters.
    pub fn claim(
        &mut self,
        agent: KeyId,
        session: u64,
        caps: &Capabilities,
        max: usize,
        now: u64,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        while out.len() < max {
            let rotation: Vec<KeyId> = match self.cursor {
                Some(c) => self
                    .ready
                    .range((Bound::Excluded(c), Bound::Unbounded))
                    .chain(self.ready.range(..=c))
                    .map(|(k, _)| *k)
                    .collect(),
                None => self.ready.keys().copied().collect(),
            };
            let mut progressed = false;
            for requester in rotation {
                if out.len() >= max {
                    break;
                }
                let Some(set) = self.ready.get(&requester) else {
                    continue;
                };
                let found = set
                    .iter()
                    .take(MATCH_SCAN_LIMIT)
                    .find(|(_, id)| {
                        self.active.get(id).is_some_and(|r| {
                            r.deadline_ms > now && caps.matches(r.kind, &r.requirements)
                        })
                    })
                    .copied();
                let Some((_, id)) = found else { continue };
                if let Some(t) = self.lease(id, agent, session, now) {
                    out.push(t);
                    self.cursor = Some(requester);
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        out
    }

    /// Grants one named task to an agent if it is queued, unexpired and matches (a mesh peer
    /// claiming an offer: of several racing for it, exactly one gets the lease).
    pub fn claim_task(
        &mut self,
        id: TaskId,
        agent: KeyId,
        session: u64,
        caps: &Capabilities,
        now: u64,
    ) -> Option<Transition> {
        let r = self.active.get(&id)?;
        if r.state != TaskState::Queued
            || r.deadline_ms <= now
            || !caps.matches(r.kind, &r.requirements)
        {
            return None;
        }
        self.lease(id, agent, session, now)
    }

    /// Queued tasks (no lease), in no particular order.
    pub fn queued(&self) -> impl Iterator<Item = &TaskRecord> {
        self.active
            .values()
            .filter(|r| r.state == TaskState::Queued)
    }

    fn lease(&mut self, id: TaskId, agent: KeyId, session: u64, now: u64) -> Option<Transition> {
        let mut rec = self.active.get(&id)?.clone();
        self.unindex(&rec);
        let from = rec.state;
        rec.attempts += 1;
        rec.state = TaskState::Leased;
        rec.updated_ms = now;
        rec.lease = Some(Lease {
            agent,
            session,
            attempt: rec.attempts,
            expires_ms: now
                .saturating_add(self.cfg.lease_ttl_ms)
                .min(rec.deadline_ms),
        });
        self.index(&rec);
        self.active.insert(id, rec.clone());
        Some(Transition {
            record: rec,
            from: Some(from),
            reason: None,
            result: None,
        })
    }

    /// Tasks cancelled while `agent` held them, not yet told to it.
    pub fn take_cancellations(&mut self, agent: &KeyId) -> Vec<TaskId> {
        self.pending_cancel.remove(agent).unwrap_or_default()
    }

    /// Whether `agent` has cancellations waiting.
    pub fn has_cancellations(&self, agent: &KeyId) -> bool {
        self.pending_cancel
            .get(agent)
            .is_some_and(|v| !v.is_empty())
    }

    /// Checks that `agent` holds the current lease on `task` for `attempt`.
    ///
    /// # Errors
    /// [`QueueError::NotActive`] or [`QueueError::LeaseLost`].
    pub fn check_lease(
        &self,
        task: TaskId,
        agent: &KeyId,
        attempt: u32,
    ) -> Result<&TaskRecord, QueueError> {
        let rec = self.active.get(&task).ok_or(QueueError::NotActive(task))?;
        match rec.lease {
            Some(l) if l.agent == *agent && l.attempt == attempt => Ok(rec),
            _ => Err(QueueError::LeaseLost { task, attempt }),
        }
    }

    /// Marks a leased task as running (the agent reported progress). No-op if already running.
    ///
    /// # Errors
    /// As [`Queue::check_lease`].
    pub fn mark_running(
        &mut self,
        task: TaskId,
        agent: &KeyId,
        attempt: u32,
        now: u64,
    ) -> Result<Option<Transition>, QueueError> {
        let rec = self.check_lease(task, agent, attempt)?;
        if rec.state != TaskState::Leased {
            return Ok(None);
        }
        let mut rec = rec.clone();
        rec.state = TaskState::Running;
        rec.updated_ms = now;
        self.active.insert(task, rec.clone());
        Ok(Some(Transition {
            record: rec,
            from: Some(TaskState::Leased),
            reason: None,
            result: None,
        }))
    }

    /// Renews the leases an agent reports running. Returns how many were renewed and which of the
    /// reported tasks the agent must stop (cancelled, finished, or leased to someone else now).
    pub fn renew(
        &mut self,
        agent: &KeyId,
        running: &[RunningTask],
        now: u64,
    ) -> (u32, Vec<TaskId>) {
        let mut renewed = 0;
        let mut stop = self.take_cancellations(agent);
        for rt in running {
            let Ok(rec) = self.check_lease(rt.task, agent, rt.attempt) else {
                if !stop.contains(&rt.task) {
                    stop.push(rt.task);
                }
                continue;
            };
            let mut rec = rec.clone();
            let Some(mut lease) = rec.lease else { continue };
            let new_expiry = now
                .saturating_add(self.cfg.lease_ttl_ms)
                .min(rec.deadline_ms);
            if new_expiry > lease.expires_ms {
                self.leases.remove(&(lease.expires_ms, rec.id));
                lease.expires_ms = new_expiry;
                rec.lease = Some(lease);
                self.leases.insert((new_expiry, rec.id));
                self.active.insert(rec.id, rec);
            }
            renewed += 1;
        }
        (renewed, stop)
    }

    /// Records an agent's report on its attempt.
    ///
    /// # Errors
    /// [`QueueError::NotActive`] (finished or unknown) or [`QueueError::LeaseLost`].
    pub fn complete(
        &mut self,
        task: TaskId,
        agent: &KeyId,
        attempt: u32,
        outcome: &ReportedOutcome,
        now: u64,
    ) -> Result<Transition, QueueError> {
        let rec = self.check_lease(task, agent, attempt)?.clone();
        match outcome {
            ReportedOutcome::Succeeded { output } => {
                let output = serde_json::to_string(output).unwrap_or_else(|_| "null".into());
                Ok(self.finish(
                    rec,
                    TaskState::Succeeded,
                    Outcome::Succeeded { output },
                    None,
                    now,
                ))
            }
            ReportedOutcome::Failed { error, retryable } => {
                let reason = format!("attempt failed: {error}");
                if *retryable {
                    Ok(self.retry_or_fail(rec, reason, now))
                } else {
                    let mut rec = rec;
                    rec.failures.push(Failure {
                        attempt,
                        agent: Some(*agent),
                        reason: reason.clone(),
                        at_ms: now,
                    });
                    Ok(self.finish(
                        rec,
                        TaskState::Failed,
                        Outcome::Failed {
                            error: error.clone(),
                        },
                        Some(reason),
                        now,
                    ))
                }
            }
        }
    }

    /// Cancels a task. Returns the transition and, if an agent was running it, that agent (which
    /// is also queued a cancellation notice).
    ///
    /// # Errors
    /// [`QueueError::NotActive`] for finished or unknown tasks.
    pub fn cancel(
        &mut self,
        task: TaskId,
        now: u64,
    ) -> Result<(Transition, Option<KeyId>), QueueError> {
        let rec = self
            .active
            .get(&task)
            .ok_or(QueueError::NotActive(task))?
            .clone();
        let agent = rec.lease.map(|l| l.agent);
        if let Some(a) = agent {
            self.pending_cancel.entry(a).or_default().push(task);
        }
        let t = self.finish(
            rec,
            TaskState::Cancelled,
            Outcome::Cancelled,
            Some("cancelled by requester".into()),
            now,
        );
        Ok((t, agent))
    }

    /// Releases every lease `agent` holds except those in `keep` (it restarted, or was reaped).
    pub fn release_agent(
        &mut self,
        agent: &KeyId,
        keep: &[RunningTask],
        reason: &str,
        now: u64,
    ) -> Vec<Transition> {
        let held: Vec<TaskId> = self
            .by_agent
            .get(agent)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        for id in held {
            let Some(rec) = self.active.get(&id).cloned() else {
                continue;
            };
            let kept = rec
                .lease
                .is_some_and(|l| keep.iter().any(|k| k.task == id && k.attempt == l.attempt));
            if !kept {
                out.push(self.lapse(rec, reason, now));
            }
        }
        self.pending_cancel.remove(agent);
        out
    }

    /// Handles every lease and deadline that has lapsed by `now`.
    pub fn expire(&mut self, now: u64) -> Vec<Transition> {
        let mut out = Vec::new();
        while let Some(&(t, id)) = self.leases.first() {
            if t > now {
                break;
            }
            let Some(rec) = self.active.get(&id).cloned() else {
                self.leases.pop_first();
                continue;
            };
            out.push(self.lapse(rec, "lease expired without a result", now));
        }
        let due: Vec<TaskId> = self
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= now)
            .map(|(_, id)| *id)
            .collect();
        for id in due {
            if let Some(rec) = self.active.get(&id).cloned() {
                out.push(self.finish(
                    rec,
                    TaskState::Expired,
                    Outcome::Expired,
                    Some("deadline passed".into()),
                    now,
                ));
            }
        }
        out
    }

    /// An attempt ended without a result: requeue, or fail/expire when nothing is left.
    fn lapse(&mut self, rec: TaskRecord, reason: &str, now: u64) -> Transition {
        let agent = rec.lease.map(|l| l.agent);
        if let Some(a) = agent
            && let Some(v) = self.pending_cancel.get_mut(&a)
        {
            v.retain(|t| *t != rec.id);
        }
        self.retry_or_fail(rec, reason.to_string(), now)
    }

    fn retry_or_fail(&mut self, mut rec: TaskRecord, reason: String, now: u64) -> Transition {
        rec.failures.push(Failure {
            attempt: rec.attempts,
            agent: rec.lease.map(|l| l.agent),
            reason: reason.clone(),
            at_ms: now,
        });
        if rec.deadline_ms <= now {
            return self.finish(rec, TaskState::Expired, Outcome::Expired, Some(reason), now);
        }
        if rec.attempts >= rec.max_attempts {
            let error = format!(
                "no attempt succeeded ({} of {}); last: {reason}",
                rec.attempts, rec.max_attempts
            );
            return self.finish(
                rec,
                TaskState::Failed,
                Outcome::Failed { error },
                Some(reason),
                now,
            );
        }
        let from = rec.state;
        self.unindex(&rec);
        rec.state = TaskState::Queued;
        rec.lease = None;
        rec.updated_ms = now;
        self.index(&rec);
        self.active.insert(rec.id, rec.clone());
        Transition {
            record: rec,
            from: Some(from),
            reason: Some(reason),
            result: None,
        }
    }

    fn finish(
        &mut self,
        mut rec: TaskRecord,
        state: TaskState,
        outcome: Outcome,
        reason: Option<String>,
        now: u64,
    ) -> Transition {
        self.unindex(&rec);
        self.active.remove(&rec.id);
        let from = rec.state;
        let lease = rec.lease.take();
        rec.state = state;
        rec.updated_ms = now;
        let result = TaskResult {
            task: rec.id,
            outcome,
            attempt: lease.map_or(rec.attempts, |l| l.attempt),
            agent: lease.map(|l| l.agent),
            finished_ms: now,
        };
        Transition {
            record: rec,
            from: Some(from),
            reason,
            result: Some(result),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Ulid;
    use crate::coordinator::model::{Requirements, TaskKind};

    const TTL: u64 = 30_000;

    fn q() -> Queue {
        Queue::new(QueueConfig {
            lease_ttl_ms: TTL,
            max_active: 1000,
        })
    }

    fn task(n: u128, requester: u8, priority: i32) -> TaskRecord {
        TaskRecord {
            id: Ulid(n),
            kind: TaskKind::Probe,
            requester: KeyId([requester; 32]),
            idempotency_key: None,
            requirements: Requirements::default(),
            payload: "{}".into(),
            priority,
            created_ms: 0,
            updated_ms: 0,
            deadline_ms: 1_000_000,
            state: TaskState::Queued,
            attempts: 0,
            max_attempts: 3,
            lease: None,
            failures: vec![],
        }
    }

    fn caps() -> Capabilities {
        Capabilities {
            kinds: vec![TaskKind::Probe],
            models: vec![],
            resource_class: Default::default(),
            slots: 4,
        }
    }

    const AGENT: KeyId = KeyId([200; 32]);

    #[test]
    fn claims_are_fair_across_requesters_then_by_priority() {
        let mut q = q();
        for i in 0..10 {
            q.submit(task(i, 1, 0)).unwrap();
        }
        q.submit(task(100, 2, 0)).unwrap();
        q.submit(task(101, 2, 5)).unwrap();
        let got = q.claim(AGENT, 1, &caps(), 4, 10);
        let ids: Vec<u128> = got.iter().map(|t| t.record.id.0).collect();
        // Requester 2's high-priority task comes in the first pass, then it alternates.
        assert_eq!(ids.len(), 4);
        assert!(ids.contains(&101) && ids.contains(&100), "{ids:?}");
        assert_eq!(ids.iter().filter(|i| **i < 10).count(), 2);
        assert!(
            got.iter()
                .all(|t| t.record.state == TaskState::Leased && t.record.attempts == 1)
        );
        let pos101 = ids.iter().position(|i| *i == 101).unwrap();
        let pos100 = ids.iter().position(|i| *i == 100).unwrap();
        assert!(pos101 < pos100, "higher priority first within a requester");
    }

    #[test]
    fn claims_respect_capabilities() {
        let mut q = q();
        let mut t = task(1, 1, 0);
        t.requirements.model = Some("big".into());
        q.submit(t).unwrap();
        q.submit(task(2, 1, 0)).unwrap();
        let got = q.claim(AGENT, 1, &caps(), 5, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].record.id.0, 2);
        let mut with_model = caps();
        with_model.models.push("big".into());
        let got = q.claim(KeyId([201; 32]), 1, &with_model, 5, 10);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].record.id.0, 1);
    }

    #[test]
    fn success_finishes_once() {
        let mut q = q();
        q.submit(task(1, 1, 0)).unwrap();
        q.claim(AGENT, 1, &caps(), 1, 10);
        q.mark_running(Ulid(1), &AGENT, 1, 11).unwrap().unwrap();
        let ok = ReportedOutcome::Succeeded {
            output: serde_json::json!({"x": 1}),
        };
        let t = q.complete(Ulid(1), &AGENT, 1, &ok, 12).unwrap();
        assert_eq!(t.record.state, TaskState::Succeeded);
        assert_eq!(t.from, Some(TaskState::Running));
        let r = t.result.unwrap();
        assert_eq!(
            r.outcome,
            Outcome::Succeeded {
                output: "{\"x\":1}".into()
            }
        );
        assert_eq!(r.attempt, 1);
        assert_eq!(
            q.complete(Ulid(1), &AGENT, 1, &ok, 13),
            Err(QueueError::NotActive(Ulid(1)))
        );
        assert!(q.is_empty());
    }

    #[test]
    fn expired_lease_requeues_then_fails_with_reasons() {
        let mut q = q();
        q.submit(task(1, 1, 0)).unwrap();
        let mut now = 0;
        for attempt in 1..=3 {
            let got = q.claim(AGENT, 1, &caps(), 1, now);
            assert_eq!(got.len(), 1, "attempt {attempt}");
            assert_eq!(got[0].record.attempts, attempt);
            now += TTL;
            let lapsed = q.expire(now);
            assert_eq!(lapsed.len(), 1);
            if attempt < 3 {
                assert_eq!(lapsed[0].record.state, TaskState::Queued);
                assert!(lapsed[0].result.is_none());
            } else {
                assert_eq!(lapsed[0].record.state, TaskState::Failed);
                assert_eq!(
                    lapsed[0].record.failures.len(),
                    3,
                    "{:?}",
                    lapsed[0].record.failures
                );
                let Some(TaskResult {
                    outcome: Outcome::Failed { error },
                    ..
                }) = &lapsed[0].result
                else {
                    panic!("expected a failure result")
                };
                assert!(error.contains("3 of 3"), "{error}");
            }
        }
        assert!(q.is_empty());
    }

    #[test]
    fn a_stale_attempt_cannot_report() {
        let mut q = q();
        q.submit(task(1, 1, 0)).unwrap();
        q.claim(AGENT, 1, &caps(), 1, 0);
        q.expire(TTL);
        let other = KeyId([7; 32]);
        q.claim(other, 1, &caps(), 1, TTL);
        let ok = ReportedOutcome::Succeeded {
            output: serde_json::Value::Null,
        };
        assert_eq!(
            q.complete(Ulid(1), &AGENT, 1, &ok, TTL + 1),
            Err(QueueError::LeaseLost {
                task: Ulid(1),
                attempt: 1
            })
        );
        assert!(q.complete(Ulid(1), &other, 2, &ok, TTL + 1).is_ok());
    }

    #[test]
    fn renewal_extends_leases_until_the_deadline() {
        let mut q = q();
        let mut t = task(1, 1, 0);
        t.deadline_ms = 50_000;
        q.submit(t).unwrap();
        let got = q.claim(AGENT, 1, &caps(), 1, 0);
        assert_eq!(got[0].record.lease.unwrap().expires_ms, TTL);
        let rt = [RunningTask {
            task: Ulid(1),
            attempt: 1,
        }];
        assert_eq!(q.renew(&AGENT, &rt, 20_000), (1, vec![]));
        assert_eq!(q.get(&Ulid(1)).unwrap().lease.unwrap().expires_ms, 50_000);
        assert!(q.expire(49_999).is_empty());
        let lapsed = q.expire(50_000);
        assert_eq!(lapsed[0].record.state, TaskState::Expired);
        // Unknown or foreign tasks are reported back for stopping.
        assert_eq!(q.renew(&AGENT, &rt, 50_001), (0, vec![Ulid(1)]));
    }

    #[test]
    fn cancel_notifies_the_agent() {
        let mut q = q();
        q.submit(task(1, 1, 0)).unwrap();
        q.submit(task(2, 1, 0)).unwrap();
        q.claim(AGENT, 1, &caps(), 1, 0);
        let (t, agent) = q.cancel(Ulid(1), 5).unwrap();
        assert_eq!(t.record.state, TaskState::Cancelled);
        assert_eq!(agent, Some(AGENT));
        assert!(q.has_cancellations(&AGENT));
        let (t2, agent2) = q.cancel(Ulid(2), 5).unwrap();
        assert_eq!(t2.from, Some(TaskState::Queued));
        assert_eq!(agent2, None);
        assert_eq!(q.take_cancellations(&AGENT), vec![Ulid(1)]);
        assert_eq!(
            q.cancel(Ulid(1), 6).err(),
            Some(QueueError::NotActive(Ulid(1)))
        );
        assert!(q.claim(AGENT, 1, &caps(), 5, 6).is_empty());
    }

    #[test]
    fn restarted_agent_releases_unlisted_leases() {
        let mut q = q();
        q.submit(task(1, 1, 0)).unwrap();
        q.submit(task(2, 1, 0)).unwrap();
        q.claim(AGENT, 1, &caps(), 2, 0);
        let keep = [RunningTask {
            task: Ulid(2),
            attempt: 1,
        }];
        let released = q.release_agent(&AGENT, &keep, "agent restarted", 10);
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].record.id, Ulid(1));
        assert_eq!(released[0].record.state, TaskState::Queued);
        assert_eq!(q.leases_of(&AGENT), 1);
        assert_eq!(
            q.counts(),
            QueueCounts {
                queued: 1,
                leased: 1,
                running: 0
            }
        );
    }

    #[test]
    fn retryable_failure_requeues_and_final_failure_keeps_the_error() {
        let mut q = q();
        q.submit(task(1, 1, 0)).unwrap();
        q.claim(AGENT, 1, &caps(), 1, 0);
        let retry = ReportedOutcome::Failed {
            error: "busy".into(),
            retryable: true,
        };
        let t = q.complete(Ulid(1), &AGENT, 1, &retry, 1).unwrap();
        assert_eq!(t.record.state, TaskState::Queued);
        q.claim(AGENT, 1, &caps(), 1, 2);
        let fatal = ReportedOutcome::Failed {
            error: "bad input".into(),
            retryable: false,
        };
        let t = q.complete(Ulid(1), &AGENT, 2, &fatal, 3).unwrap();
        assert_eq!(t.record.state, TaskState::Failed);
        assert_eq!(t.record.failures.len(), 2);
        assert_eq!(
            t.result.unwrap().outcome,
            Outcome::Failed {
                error: "bad input".into()
            }
        );
    }

    #[test]
    fn restored_leases_get_a_fresh_ttl() {
        let mut q1 = q();
        q1.submit(task(1, 1, 0)).unwrap();
        let granted = q1.claim(AGENT, 1, &caps(), 1, 0);
        let rec = granted[0].record.clone();
        assert_eq!(rec.lease.unwrap().expires_ms, TTL);
        // The node restarts long after the grant; the lease must not lapse at once.
        let mut q2 = q();
        q2.restore(rec, 100_000);
        assert!(q2.expire(100_001).is_empty());
        assert_eq!(
            q2.get(&Ulid(1)).unwrap().lease.unwrap().expires_ms,
            100_000 + TTL
        );
        assert_eq!(q2.expire(100_000 + TTL).len(), 1);
    }

    #[test]
    fn queued_tasks_expire_at_their_deadline_and_full_queue_refuses() {
        let mut q = Queue::new(QueueConfig {
            lease_ttl_ms: TTL,
            max_active: 2,
        });
        let mut t = task(1, 1, 0);
        t.deadline_ms = 100;
        q.submit(t).unwrap();
        q.submit(task(2, 1, 0)).unwrap();
        assert_eq!(
            q.submit(task(3, 1, 0)).err(),
            Some(QueueError::Full { max: 2 })
        );
        assert_eq!(q.next_wakeup(), Some(100));
        assert!(
            q.claim(AGENT, 1, &caps(), 1, 100)
                .iter()
                .all(|t| t.record.id != Ulid(1))
        );
        let e = q.expire(100);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].record.state, TaskState::Expired);
    }

    proptest::proptest! {
        /// Whatever sequence of operations runs, no task is leased twice at once, terminal tasks
        /// leave the queue, and the indexes agree with the records.
        #[test]
        fn invariants_hold_under_random_operations(ops in proptest::collection::vec((0u8..6, 0u128..8, 0u8..3), 1..200)) {
            let mut q = q();
            let agents = [KeyId([1; 32]), KeyId([2; 32]), KeyId([3; 32])];
            let mut now = 0u64;
            let mut next_id = 0u128;
            for (op, n, a) in ops {
                now += 1000;
                let agent = agents[a as usize];
                match op {
                    0 => { next_id += 1; let _ = q.submit(task(next_id, a, n as i32)); }
                    1 => { q.claim(agent, 1, &caps(), (n % 3) as usize + 1, now); }
                    2 => {
                        let id = Ulid(n + 1);
                        let attempt = q.get(&id).and_then(|r| r.lease).map_or(1, |l| l.attempt);
                        let _ = q.complete(id, &agent, attempt, &ReportedOutcome::Succeeded { output: serde_json::Value::Null }, now);
                    }
                    3 => { let _ = q.cancel(Ulid(n + 1), now); }
                    4 => { now += TTL / 2; q.expire(now); }
                    _ => { q.release_agent(&agent, &[], "restart", now); }
                }
                let mut leased = 0;
                for r in q.active.values() {
                    proptest::prop_assert!(!r.state.is_terminal());
                    match r.state {
                        TaskState::Queued => proptest::prop_assert!(r.lease.is_none()),
                        _ => { leased += 1; proptest::prop_assert!(r.lease.is_some()); }
                    }
                    proptest::prop_assert!(r.attempts <= r.max_attempts);
                }
                proptest::prop_assert_eq!(q.leases.len(), leased);
                let c = q.counts();
                proptest::prop_assert_eq!(c.queued + c.leased + c.running, q.active.len());
            }
        }
    }
}
