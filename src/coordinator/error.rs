//! Coordinator errors and their HTTP mapping (one place, stable codes).

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::model::{TaskId, TaskState};
use super::queue::QueueError;
use crate::http::ApiError;
use crate::store::StoreError;

/// What can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// No such task (or not visible to this caller).
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    /// The action does not apply in the task's state.
    #[error("task {task} is {state}; cannot {action}")]
    InvalidTransition {
        /// Task.
        task: TaskId,
        /// State.
        state: TaskState,
        /// Action.
        action: &'static str,
    },
    /// The agent's lease is gone (expired, re-granted, or the task was cancelled).
    #[error("task {task}: lease for attempt {attempt} is no longer held by this agent")]
    LeaseLost {
        /// Task.
        task: TaskId,
        /// Attempt.
        attempt: u32,
    },
    /// The agent must register (again).
    #[error("agent is not registered (or its session ended); register again")]
    AgentNotRegistered,
    /// The caller's role does not allow this.
    #[error("this key may not {0}")]
    Forbidden(&'static str),
    /// The same idempotency key was used for a different request.
    #[error("idempotency key {0:?} was already used for a different request")]
    IdempotencyConflict(String),
    /// The request is well-formed JSON but not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Too many unfinished tasks.
    #[error("the queue is full ({0} unfinished tasks); retry later")]
    QueueFull(usize),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<QueueError> for CoordinatorError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::NotActive(t) => CoordinatorError::TaskNotFound(t),
            QueueError::LeaseLost { task, attempt } => {
                CoordinatorError::LeaseLost { task, attempt }
            }
            QueueError::Full { max } => CoordinatorError::QueueFull(max),
        }
    }
}

impl CoordinatorError {
    fn api(&self) -> ApiError {
        use CoordinatorError as E;
        let msg = self.to_string();
        match self {
            E::TaskNotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "task_not_found", msg),
            E::InvalidTransition { .. } => {
                ApiError::new(StatusCode::CONFLICT, "invalid_transition", msg)
            }
            E::LeaseLost { .. } => ApiError::new(StatusCode::CONFLICT, "lease_lost", msg),
            E::AgentNotRegistered => {
                ApiError::new(StatusCode::NOT_FOUND, "agent_not_registered", msg)
            }
            E::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", msg),
            E::IdempotencyConflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", msg)
            }
            E::Invalid(_) => ApiError::bad_request(msg),
            E::QueueFull(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_full", msg)
                .retry_after(Duration::from_secs(1)),
            E::Store(StoreError::Full { .. }) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "storage_full", msg)
            }
            E::Store(e) => ApiError::internal(e),
        }
    }
}

impl IntoResponse for CoordinatorError {
    fn into_response(self) -> Response {
        self.api().into_response()
    }
}
