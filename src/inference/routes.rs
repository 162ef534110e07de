//! Inference HTTP handlers.

use std::convert::Infallible;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::api::*;
use super::{Inference, InferenceError};
use crate::http::{JsonBody, QueryParams};
use crate::security::{Auth, Role};

fn ndjson<S>(stream: S) -> Response
where
    S: futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
{
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

fn line<T: serde::Serialize>(v: &T) -> Result<Bytes, Infallible> {
    let mut s = serde_json::to_vec(v).unwrap_or_default();
    s.push(b'\n');
    Ok(Bytes::from(s))
}

fn require_node(p: &crate::security::Principal) -> Result<(), Box<Response>> {
    if p.role == Role::Node {
        Ok(())
    } else {
        Err(Box::new(
            crate::http::ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "only the node's key may manage models",
            )
            .into_response(),
        ))
    }
}

/// `GET /models`.
pub async fn list(State(inf): State<Inference>, Auth(_): Auth) -> Json<Vec<ModelView>> {
    Json(inf.list().await)
}

/// `GET /models/{name}`.
pub async fn info(
    State(inf): State<Inference>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> Result<Json<ModelView>, InferenceError> {
    inf.list()
        .await
        .into_iter()
        .find(|m| m.name == name)
        .map(Json)
        .ok_or(InferenceError::ModelNotFound(name))
}

/// `DELETE /models/{name}`.
pub async fn remove(
    State(inf): State<Inference>,
    Auth(p): Auth,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = require_node(&p) {
        return *r;
    }
    inf.unload(&name);
    match inf.models().remove(&name).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => InferenceError::ModelNotFound(name).into_response(),
        Err(e) => InferenceError::from(e).into_response(),
    }
}

/// `POST /models/{name}/load`.
pub async fn load(
    State(inf): State<Inference>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> Response {
    match inf.load(&name).await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"loaded": name}))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /models/{name}/unload`.
pub async fn unload(
    State(inf): State<Inference>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> Json<serde_json::Value> {
    Json(serde_json::json!({"unloaded": inf.unload(&name)}))
}

/// `POST /models/add`.
pub async fn add(
    State(inf): State<Inference>,
    Auth(p): Auth,
    JsonBody(req): JsonBody<AddRequest>,
) -> Response {
    if let Err(r) = require_node(&p) {
        return *r;
    }
    match inf
        .models()
        .add_file(std::path::Path::new(&req.path), req.name.as_deref())
        .await
    {
        Ok(rec) => (
            StatusCode::CREATED,
            Json(ModelView {
                name: rec.name,
                backend: "llama".into(),
                loaded: false,
                size: Some(rec.size),
                info: Some(rec.info),
                sha256: Some(rec.sha256),
            }),
        )
            .into_response(),
        Err(e) => InferenceError::from(e).into_response(),
    }
}

/// `POST /models/pull`: NDJSON progress lines, ending with `done` or `error`. The download goes
/// on if the client disconnects (a second pull of the same name meanwhile gets `model_busy`;
/// once it finished, `model_exists`; after an interruption, pulling again resumes).
pub async fn pull(
    State(inf): State<Inference>,
    Auth(p): Auth,
    JsonBody(req): JsonBody<PullRequest>,
) -> Response {
    if let Err(r) = require_node(&p) {
        return *r;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<PullEvent>(32);
    let models = inf.models().clone();
    inf.0.tracker.spawn(async move {
        let url = match super::catalog::by_name(&req.url) {
            Some(e) => e.url.to_string(),
            None => req.url.clone(),
        };
        let name = req
            .name
            .clone()
            .or_else(|| super::catalog::by_name(&req.url).map(|e| e.name.to_string()));
        let res = models
            .pull(&url, req.sha256.as_deref(), name.as_deref(), &tx)
            .await;
        let last = match res {
            Ok(rec) => PullEvent::Done {
                model: Box::new(ModelView {
                    name: rec.name,
                    backend: "llama".into(),
                    loaded: false,
                    size: Some(rec.size),
                    info: Some(rec.info),
                    sha256: Some(rec.sha256),
                }),
            },
            Err(e) => PullEvent::Error {
                code: e.code().into(),
                message: e.to_string(),
            },
        };
        let _ = tx.send(last).await;
    });
    let stream = tokio_stream_from(rx).map(|ev| line(&ev));
    ndjson(stream)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Query of `POST /generate`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateQuery {
    stream: Option<bool>,
}

/// `POST /generate`: NDJSON events (default), or with `?stream=false` one JSON object with the
/// whole text. A client that disconnects stops the generation.
pub async fn generate(
    State(inf): State<Inference>,
    Auth(_): Auth,
    QueryParams(q): QueryParams<GenerateQuery>,
    JsonBody(req): JsonBody<GenerateRequest>,
) -> Response {
    let cancel = CancellationToken::new();
    let rx = match inf.generate(req, cancel.clone()).await {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    // Dropping the response body (client gone) drops the guard, which cancels the generation.
    let guard = cancel.drop_guard();
    if q.stream.unwrap_or(true) {
        let mut gen_rx = rx;
        let stream = futures_util::stream::poll_fn(move |cx| gen_rx.poll_recv(cx)).map(move |ev| {
            let _keep = &guard;
            line(&ev)
        });
        return ndjson(stream);
    }
    let mut rx = rx;
    let mut text = String::new();
    let mut last = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Token { text: t } => text.push_str(&t),
            GenEvent::Done { .. } | GenEvent::Error { .. } => last = Some(ev),
            GenEvent::Start { .. } => {}
        }
    }
    drop(guard);
    match last {
        Some(GenEvent::Done {
            finish_reason,
            usage,
            timings,
        }) => Json(serde_json::json!({
            "text": text,
            "finish_reason": finish_reason,
            "usage": usage,
            "timings": timings,
        }))
        .into_response(),
        Some(GenEvent::Error { code, message }) => {
            let code: &'static str = if code == "context_length_exceeded" {
                "context_length_exceeded"
            } else {
                "generation_failed"
            };
            crate::http::ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
                .into_response()
        }
        _ => crate::http::ApiError::new(
            StatusCode::BAD_GATEWAY,
            "generation_failed",
            "the backend ended without a result",
        )
        .into_response(),
    }
}
