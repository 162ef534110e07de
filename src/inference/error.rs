//! Inference errors and their HTTP mapping.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::models::ModelError;
use super::ollama::OllamaError;
use crate::http::ApiError;

/// What can go wrong in the inference service.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No backend has the model.
    #[error("no model named {0:?}; see GET /models, or add one with `edgecoder model pull`")]
    ModelNotFound(String),
    /// Every slot is busy and the queue is full.
    #[error("{0}")]
    Busy(String),
    /// The model could not be loaded or run.
    #[error("{0}")]
    Engine(String),
    /// The model store failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The Ollama backend failed.
    #[error(transparent)]
    Ollama(#[from] OllamaError),
    /// This build has no local inference.
    #[error("this build has no llama.cpp backend (built without the `llama` feature)")]
    NoLocalBackend,
}

#[cfg(feature = "llama")]
impl From<super::engine::EngineError> for InferenceError {
    fn from(e: super::engine::EngineError) -> Self {
        use super::engine::EngineError as E;
        match e {
            E::Busy { .. } => InferenceError::Busy(e.to_string()),
            // A template that does not render is the model file's fault, not the request's.
            E::Prompt(m) if m.starts_with("chat template") => InferenceError::Engine(m),
            E::Prompt(m) => InferenceError::Invalid(m),
            other => InferenceError::Engine(other.to_string()),
        }
    }
}

impl InferenceError {
    /// The error as the API shows it.
    pub fn api(&self) -> ApiError {
        let msg = self.to_string();
        match self {
            InferenceError::Invalid(_) => ApiError::bad_request(msg),
            InferenceError::ModelNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "model_not_found", msg)
            }
            InferenceError::Busy(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", msg)
                .retry_after(Duration::from_secs(1)),
            InferenceError::Engine(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "model_failed", msg)
            }
            InferenceError::Model(e) => {
                let status = match e {
                    ModelError::NotFound(_) => StatusCode::NOT_FOUND,
                    ModelError::Exists(_) | ModelError::Busy(_) => StatusCode::CONFLICT,
                    ModelError::BadRequest(_) => StatusCode::BAD_REQUEST,
                    ModelError::BadName(_)
                    | ModelError::Sha256Mismatch { .. }
                    | ModelError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    ModelError::Http(_) | ModelError::Interrupted { .. } => StatusCode::BAD_GATEWAY,
                    ModelError::Io { .. } | ModelError::Store(_) => {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                };
                ApiError::new(status, e.code(), msg)
            }
            InferenceError::Ollama(OllamaError::NotFound(_)) => {
                ApiError::new(StatusCode::NOT_FOUND, "model_not_found", msg)
            }
            InferenceError::Ollama(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "backend_failed", msg)
            }
            InferenceError::NoLocalBackend => {
                ApiError::new(StatusCode::NOT_IMPLEMENTED, "no_local_backend", msg)
            }
        }
    }
}

impl IntoResponse for InferenceError {
    fn into_response(self) -> Response {
        self.api().into_response()
    }
}
