//! IDE handlers: OpenAI requests in, tasks on the coordinator, OpenAI answers out.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::openai::*;
use super::{Caller, Ctx};
use crate::coordinator::model::{
    EventKind, Requirements, ResultView, SubmitTask, TaskId, TaskKind, TaskState,
};
use crate::coordinator::state::{CursorItem, EventCursor, ResultWait};
use crate::http::{ApiError, JsonBody};
use crate::security::Principal;

/// Frames buffered between the task's events and the client.
const SSE_BUFFER: usize = 64;

impl Ctx {
    /// Models a request can name: those live agents advertise, the local store's, and those
    /// the mesh's live nodes advertise (such a request runs on a peer).
    async fn available(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self
            .state
            .agents()
            .into_iter()
            .filter(|a| a.live)
            .flat_map(|a| a.capabilities.models)
            .collect();
        if let Ok(local) = self.inference.models().list() {
            names.extend(local.into_iter().map(|m| m.name));
        }
        if let Some(m) = self.mesh.get() {
            names.extend(m.peer_models());
        }
        names
    }
}

fn now_secs() -> u64 {
    crate::clock::now_ms() / 1000
}

fn model_entry(id: &str, created: u64) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": created, "owned_by": "edgecoder"})
}

/// `GET /v1/models`.
pub async fn models(State(ctx): State<Ctx>) -> Json<serde_json::Value> {
    let created = now_secs();
    let data: Vec<serde_json::Value> = ctx
        .available()
        .await
        .iter()
        .map(|m| model_entry(m, created))
        .collect();
    Json(serde_json::json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`.
pub async fn model(
    State(ctx): State<Ctx>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if ctx.available().await.contains(&id) {
        Ok(Json(model_entry(&id, now_secs())))
    } else {
        Err(model_not_found(&id))
    }
}

fn model_not_found(model: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!("The model `{model}` does not exist on this node or its mesh; see GET /v1/models."),
    )
    .param("model")
}

/// Which OpenAI object a request answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Object {
    Chat,
    Completion,
}

struct Job {
    object: Object,
    model: String,
    payload: serde_json::Value,
    stream: bool,
    include_usage: bool,
}

impl Common {
    /// Checks what this node does not support or OpenAI does not allow.
    fn check(&self) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad_request("Only n = 1 is supported.").param("n"));
        }
        if self.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(
                ApiError::bad_request("temperature must be between 0 and 2.").param("temperature"),
            );
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(ApiError::bad_request("top_p must be in (0, 1].").param("top_p"));
        }
        Ok(())
    }

    /// The job for a payload: sampling fields added as the generation payload wants them.
    fn job(
        &self,
        object: Object,
        model: &str,
        mut payload: serde_json::Map<String, serde_json::Value>,
        max_tokens: Option<u32>,
    ) -> Job {
        if let Some(m) = max_tokens {
            payload.insert("max_tokens".into(), m.into());
        }
        if let Some(t) = self.temperature {
            payload.insert("temperature".into(), t.into());
        }
        if let Some(p) = self.top_p {
            payload.insert("top_p".into(), p.into());
        }
        if let Some(s) = self.seed {
            // OpenAI seeds are 64-bit; the sampler takes 32.
            payload.insert("seed".into(), ((s as u64) & 0xFFFF_FFFF).into());
        }
        if let Some(s) = &self.stop {
            payload.insert("stop".into(), s.list().into());
        }
        Job {
            object,
            model: model.to_string(),
            payload: payload.into(),
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        }
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Response {
    let job = (|| {
        req.common.check()?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_request("messages must not be empty.").param("messages"));
        }
        let mut messages = Vec::new();
        for m in &req.messages {
            let content = match &m.content {
                Some(c) => c
                    .text()
                    .map_err(|e| ApiError::bad_request(e).param("messages"))?,
                None => String::new(),
            };
            // OpenAI's newer clients send instructions as `developer`; chat templates know
            // `system`.
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            messages.push(serde_json::json!({"role": role, "content": content}));
        }
        let mut payload = serde_json::Map::new();
        payload.insert("messages".into(), messages.into());
        let max = req.max_completion_tokens.or(req.max_tokens);
        Ok(req.common.job(Object::Chat, &req.model, payload, max))
    })();
    match job {
        Ok(job) => run(ctx, caller.0, job).await,
        Err(e) => e.into_response(),
    }
}

/// OpenAI's default `max_tokens` for `/v1/completions`.
const COMPLETION_DEFAULT_MAX_TOKENS: u32 = 16;

/// `POST /v1/completions` (with `suffix` for fill-in-the-middle).
pub async fn completions(
    State(ctx): State<Ctx>,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Response {
    let job = (|| {
        req.common.check()?;
        if req.echo == Some(true) {
            return Err(ApiError::bad_request("echo is not supported.").param("echo"));
        }
        let prompt = match &req.prompt {
            PromptInput::One(p) => p.clone(),
            PromptInput::Many(v) if v.len() == 1 => v[0].clone(),
            PromptInput::Many(_) => {
                return Err(
                    ApiError::bad_request("Only one prompt per request is supported.")
                        .param("prompt"),
                );
            }
        };
        let mut payload = serde_json::Map::new();
        payload.insert("prompt".into(), prompt.into());
        if let Some(s) = &req.suffix {
            payload.insert("suffix".into(), s.clone().into());
        }
        let max = req.max_tokens.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS);
        Ok(req
            .common
            .job(Object::Completion, &req.model, payload, Some(max)))
    })();
    match job {
        Ok(job) => run(ctx, caller.0, job).await,
        Err(e) => e.into_response(),
    }
}

/// Cancels the task when dropped while armed: the client went away before the answer.
struct CancelOnDrop {
    ctx: Ctx,
    principal: Principal,
    task: TaskId,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.ctx.metrics.cancelled_by_disconnect.inc();
        let state = self.ctx.state.clone();
        let (p, id) = (self.principal, self.task);
        self.ctx.tracker.spawn(async move {
            // Already finished is fine: nothing to stop.
            let _ = state.cancel(&p, id).await;
        });
    }
}

async fn run(ctx: Ctx, p: Principal, job: Job) -> Response {
    if !ctx.available().await.contains(&job.model) {
        return model_not_found(&job.model).into_response();
    }
    let kind = match job.object {
        Object::Chat => TaskKind::Chat,
        Object::Completion => TaskKind::Completion,
    };
    let submit = SubmitTask {
        kind,
        payload: job.payload.clone(),
        requirements: Requirements {
            model: Some(job.model.clone()),
            ..Default::default()
        },
        priority: 0,
        timeout: Some(format!("{}ms", ctx.task_timeout.as_millis())),
        max_attempts: None,
        idempotency_key: None,
    };
    let task = match ctx.state.submit(&p, submit).await {
        Ok((t, _)) => t,
        Err(e) => return e.into_response(),
    };
    let mut guard = CancelOnDrop {
        ctx: ctx.clone(),
        principal: p,
        task: task.id,
        armed: true,
    };
    let created = now_secs();
    let id = match job.object {
        Object::Chat => format!("chatcmpl-{}", task.id),
        Object::Completion => format!("cmpl-{}", task.id),
    };
    if job.stream {
        let cursor = match EventCursor::open(&ctx.state, &p, task.id, 0).await {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        };
        let (tx, rx) = mpsc::channel::<Bytes>(SSE_BUFFER);
        let header = Chunk {
            id,
            created,
            model: job.model.clone(),
            object: job.object,
        };
        // The stream task takes over cancelling on disconnect.
        guard.armed = false;
        let stream_guard = CancelOnDrop {
            ctx: ctx.clone(),
            principal: p,
            task: task.id,
            armed: true,
        };
        ctx.tracker.spawn(stream_task(
            ctx.clone(),
            stream_guard,
            cursor,
            tx,
            header,
            job.include_usage,
        ));
        let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        }));
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        return resp;
    }
    let waited = ctx.state.result(&p, task.id, ctx.task_timeout).await;
    let result = match waited {
        Ok(ResultWait::Done(r)) => r,
        Ok(ResultWait::Pending(_)) => {
            return ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "The request took longer than ide.task_timeout.",
            )
            .into_response();
        }
        Err(e) => return e.into_response(),
    };
    guard.armed = false;
    match outcome(&result) {
        Ok((text, finish, usage)) => {
            let choice = match job.object {
                Object::Chat => serde_json::json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": null},
                    "logprobs": null,
                    "finish_reason": finish,
                }),
                Object::Completion => serde_json::json!({
                    "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                }),
            };
            let object = match job.object {
                Object::Chat => "chat.completion",
                Object::Completion => "text_completion",
            };
            Json(serde_json::json!({
                "id": id,
                "object": object,
                "created": created,
                "model": job.model,
                "system_fingerprint": null,
                "choices": [choice],
                "usage": usage,
            }))
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The text, finish reason and usage of a finished task, or the error to answer with.
fn outcome(r: &ResultView) -> Result<(String, &'static str, OaUsage), ApiError> {
    match r.state {
        TaskState::Succeeded => {
            let out = r.output.clone().unwrap_or_default();
            let text = out["text"].as_str().unwrap_or_default().to_string();
            let finish = match out["finish_reason"].as_str() {
                Some("length") => "length",
                _ => "stop",
            };
            let prompt = out["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32;
            let completion = out["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32;
            Ok((
                text,
                finish,
                OaUsage {
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    total_tokens: prompt + completion,
                },
            ))
        }
        TaskState::Failed => Err(failure(r.error.as_deref().unwrap_or("generation failed"))),
        TaskState::Expired => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "The request took longer than ide.task_timeout.",
        )),
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "cancelled",
            "The request was cancelled.",
        )),
    }
}

/// Maps a task's final error (`code: message`, from the worker) to an answer.
fn failure(error: &str) -> ApiError {
    let (code, message) = error.split_once(": ").unwrap_or(("", error));
    let message = message.to_string();
    match code {
        "model_not_found" => {
            ApiError::new(StatusCode::NOT_FOUND, "model_not_found", message).param("model")
        }
        "invalid_request" => ApiError::bad_request(message),
        "context_length_exceeded" => {
            ApiError::new(StatusCode::BAD_REQUEST, "context_length_exceeded", message)
                .param("messages")
        }
        "busy" => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message)
            .retry_after(Duration::from_secs(1)),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generation_failed",
            error.to_string(),
        ),
    }
}

/// The fixed fields of every streamed chunk.
struct Chunk {
    id: String,
    created: u64,
    model: String,
    object: Object,
}

impl Chunk {
    fn frame(&self, choices: serde_json::Value, usage: Option<OaUsage>) -> Bytes {
        let object = match self.object {
            Object::Chat => "chat.completion.chunk",
            Object::Completion => "text_completion",
        };
        let mut v = serde_json::json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = serde_json::to_value(u).unwrap_or_default();
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn delta(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Bytes {
        let choice = match self.object {
            Object::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                serde_json::json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Object::Completion => serde_json::json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
        };
        self.frame(serde_json::json!([choice]), None)
    }
}

/// Reads the task's events and writes SSE frames until the task ends or the client leaves.
async fn stream_task(
    ctx: Ctx,
    mut guard: CancelOnDrop,
    mut cursor: EventCursor,
    tx: mpsc::Sender<Bytes>,
    c: Chunk,
    include_usage: bool,
) {
    if c.object == Object::Chat && tx.send(c.delta(Some(""), true, None)).await.is_err() {
        return;
    }
    loop {
        let item = tokio::select! {
            i = cursor.next() => i,
            // The client went away while the task waited or ran: the guard cancels it.
            _ = tx.closed() => return,
        };
        match item {
            CursorItem::Event(ev) if ev.kind == EventKind::Token => {
                let data: serde_json::Value = serde_json::from_str(&ev.data).unwrap_or_default();
                let Some(text) = data["text"].as_str() else {
                    continue;
                };
                if tx.send(c.delta(Some(text), false, None)).await.is_err() {
                    return;
                }
            }
            CursorItem::Event(_) => {}
            CursorItem::End => break,
            CursorItem::Shutdown => {
                let e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "The node is shutting down.",
                );
                let _ = tx.send(error_frame(&e)).await;
                return;
            }
        }
    }
    let result = match ctx
        .state
        .result(&guard.principal, guard.task, Duration::ZERO)
        .await
    {
        Ok(ResultWait::Done(r)) => r,
        _ => {
            let e = ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "generation_failed",
                "The task ended without a result.",
            );
            let _ = tx.send(error_frame(&e)).await;
            return;
        }
    };
    guard.armed = false;
    match outcome(&result) {
        Ok((_, finish, usage)) => {
            let _ = tx.send(c.delta(None, false, Some(finish))).await;
            if include_usage {
                let _ = tx.send(c.frame(serde_json::json!([]), Some(usage))).await;
            }
        }
        Err(e) => {
            let _ = tx.send(error_frame(&e)).await;
        }
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}

/// An error inside an event stream, as OpenAI sends it.
fn error_frame(e: &ApiError) -> Bytes {
    let body = serde_json::json!({"error": {"message": e.message, "type": e.kind(), "param": e.param, "code": e.code}});
    Bytes::from(format!("data: {body}\n\n"))
}
