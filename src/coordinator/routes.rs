//! Coordinator HTTP handlers: extract, call [`CoordinatorState`], map errors. Nothing else.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;

use super::error::CoordinatorError;
use super::model::*;
use super::state::{CoordinatorState, CursorItem, EventCursor, ResultWait};
use crate::health::NodeHealth;
use crate::http::{ApiError, JsonBody, QueryParams as Query};
use crate::security::{Auth, Role};

/// State for the handlers.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// The coordinator.
    pub state: CoordinatorState,
    /// Node health.
    pub health: Arc<NodeHealth>,
    /// This node's public identity.
    pub identity: Arc<IdentityView>,
    /// The mesh, once started.
    pub mesh: crate::mesh::service::MeshSlot,
    /// Process figures and the latest hardware detection.
    pub process: Arc<crate::metrics::ProcessMetrics>,
}

/// `GET /identity`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct IdentityView {
    /// Node id.
    pub node_id: String,
    /// ed25519 public key (base64url), the `keyid` of the node's signatures.
    pub ed25519: String,
    /// x25519 public key (base64url) for envelopes addressed to this node.
    pub x25519: String,
    /// Software version.
    pub version: String,
    /// How to join the mesh through this node (absent when it takes no part in one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::mesh::service::MeshIdentity>,
}

fn parse_id(s: &str) -> Result<TaskId, ApiError> {
    s.parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_task_id", format!("{e}")))
}

fn parse_wait(w: Option<&str>) -> Result<Duration, ApiError> {
    match w {
        None => Ok(Duration::ZERO),
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| ApiError::bad_request(format!("wait {w:?}: {e} (use e.g. \"30s\")"))),
    }
}

/// `POST /tasks[?wait=]`. With `wait`, the answer also carries the result if the task finishes
/// within it (one round trip for callers that would wait anyway).
pub async fn submit(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    headers: HeaderMap,
    Query(q): Query<WaitQuery>,
    JsonBody(mut req): JsonBody<SubmitTask>,
) -> Result<Response, Response> {
    let wait = parse_wait(q.wait.as_deref()).map_err(IntoResponse::into_response)?;
    if let Some(h) = headers.get("idempotency-key") {
        let k = h
            .to_str()
            .map_err(|_| ApiError::bad_request("Idempotency-Key must be text").into_response())?;
        match &req.idempotency_key {
            Some(body_key) if body_key != k => {
                return Err(ApiError::bad_request(
                    "Idempotency-Key header and idempotency_key field differ",
                )
                .into_response());
            }
            _ => req.idempotency_key = Some(k.to_string()),
        }
    }
    let (mut view, created) = ctx
        .state
        .submit(&p, req)
        .await
        .map_err(IntoResponse::into_response)?;
    if !wait.is_zero() {
        let done = match ctx.state.result(&p, view.id, wait).await {
            Ok(ResultWait::Done(r)) => Some(r),
            Ok(ResultWait::Pending(_)) => None,
            Err(e) => return Err(e.into_response()),
        };
        // The task as it is now (attempts, timestamps), with the result when there is one.
        view = ctx
            .state
            .get(&p, view.id)
            .await
            .map_err(IntoResponse::into_response)?;
        view.result = done;
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// Query of `GET /tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /tasks`.
pub async fn list(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    Query(q): Query<ListQuery>,
) -> Result<Json<TaskList>, Response> {
    let state = q
        .state
        .as_deref()
        .map(str::parse::<TaskState>)
        .transpose()
        .map_err(|e| ApiError::bad_request(e).into_response())?;
    let after = q
        .after
        .as_deref()
        .map(parse_id)
        .transpose()
        .map_err(IntoResponse::into_response)?;
    ctx.state
        .list(&p, state, after, q.limit.unwrap_or(100))
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

/// `GET /tasks/{id}`.
pub async fn get(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, Response> {
    let id = parse_id(&id).map_err(IntoResponse::into_response)?;
    ctx.state
        .get(&p, id)
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

/// Query with an optional `wait`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    wait: Option<String>,
}

/// `GET /tasks/{id}/result?wait=`.
pub async fn result(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Response, Response> {
    let id = parse_id(&id).map_err(IntoResponse::into_response)?;
    let wait = parse_wait(q.wait.as_deref()).map_err(IntoResponse::into_response)?;
    match ctx.state.result(&p, id, wait).await {
        Ok(ResultWait::Done(r)) => Ok((StatusCode::OK, Json(r)).into_response()),
        Ok(ResultWait::Pending(pv)) => Ok((StatusCode::ACCEPTED, Json(pv)).into_response()),
        Err(e) => Err(e.into_response()),
    }
}

/// `DELETE /tasks/{id}`.
pub async fn cancel(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, Response> {
    let id = parse_id(&id).map_err(IntoResponse::into_response)?;
    ctx.state
        .cancel(&p, id)
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

/// Query of the events stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    after: Option<u32>,
}

/// `GET /tasks/{id}/events`: Server-Sent Events. Each event's `id` is its sequence number, so a
/// client that reconnects with `Last-Event-ID` resumes where it stopped. The stream ends with an
/// `end` event once the task has finished.
pub async fn events(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let id = parse_id(&id).map_err(IntoResponse::into_response)?;
    let after = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(v) => v.trim().parse::<u32>().map_err(|_| {
            ApiError::bad_request("Last-Event-ID must be an event sequence number").into_response()
        })?,
        None => q.after.unwrap_or(0),
    };
    let cursor = EventCursor::open(&ctx.state, &p, id, after)
        .await
        .map_err(IntoResponse::into_response)?;
    let stream = EventStream {
        cursor,
        state: ctx.state.clone(),
        principal: p,
        ended: false,
        final_state: None,
    };
    Ok(
        Sse::new(futures_util::stream::unfold(stream, EventStream::next))
            .keep_alive(KeepAlive::default()),
    )
}

struct EventStream {
    cursor: EventCursor,
    state: CoordinatorState,
    principal: crate::security::Principal,
    ended: bool,
    /// The state named by the last state event sent.
    final_state: Option<String>,
}

impl EventStream {
    fn cursor_id(&self) -> TaskId {
        self.cursor.task()
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        if self.ended {
            return None;
        }
        match self.cursor.next().await {
            CursorItem::Event(ev) => {
                if ev.kind == EventKind::State
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&ev.data)
                {
                    self.final_state = v["state"].as_str().map(str::to_string);
                }
                Some((Ok(sse_event(&ev)), self))
            }
            // The node is stopping: end the stream without `end`; the client resumes from its
            // Last-Event-ID once the node is back.
            CursorItem::Shutdown => None,
            CursorItem::End => {
                self.ended = true;
                let state = match self.final_state.take() {
                    Some(s) => s,
                    // Resumed after the last state event: ask for the state.
                    None => self
                        .state
                        .get(&self.principal, self.cursor_id())
                        .await
                        .map(|v| v.state.as_str().to_string())
                        .unwrap_or_else(|_| "unknown".into()),
                };
                let end = Event::default()
                    .event("end")
                    .data(serde_json::json!({ "state": state }).to_string());
                Some((Ok(end), self))
            }
        }
    }
}

fn sse_event(ev: &TaskEvent) -> Event {
    let view = EventView::from(ev);
    Event::default()
        .id(ev.seq.to_string())
        .event(ev.kind.as_str())
        .data(serde_json::to_string(&view).unwrap_or_default())
}

/// `POST /agents/register`.
pub async fn register(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    JsonBody(req): JsonBody<RegisterAgent>,
) -> Result<Json<Registered>, CoordinatorError> {
    ctx.state.register(&p, req).await.map(Json)
}

/// `POST /agents/heartbeat`.
pub async fn heartbeat(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    JsonBody(req): JsonBody<Heartbeat>,
) -> Result<Json<HeartbeatReply>, CoordinatorError> {
    ctx.state.heartbeat(&p, &req).map(Json)
}

/// `POST /agents/claim?wait=`.
pub async fn claim(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    Query(q): Query<WaitQuery>,
    JsonBody(req): JsonBody<Claim>,
) -> Result<Json<ClaimReply>, Response> {
    let wait = parse_wait(q.wait.as_deref()).map_err(IntoResponse::into_response)?;
    // A mesh peer claims only a task this node offered to it, one at a time, and only once its
    // capability record (and so the key its payload is sealed to) is known.
    // Decided once, at authentication: the role says whether this agent is a mesh peer.
    let peer = ctx.mesh.get().filter(|_| p.role == Role::Peer);
    if let Some(mesh) = peer {
        let offered = req.task.is_some_and(|id| mesh.was_offered(&p.key, id));
        if !offered || req.max != 1 {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not_offered",
                "a mesh peer claims only a task offered to it, with max 1",
            )
            .into_response());
        }
        if !mesh.has_caps(&p.key) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "peer_unknown",
                "no capability record (and so no encryption key) for this peer yet",
            )
            .into_response());
        }
    }
    let mut reply = ctx
        .state
        .claim(&p, &req, wait)
        .await
        .map_err(IntoResponse::into_response)?;
    // A mesh peer gets each payload sealed to its X25519 key.
    if let Some(mesh) = peer {
        for t in &mut reply.tasks {
            t.payload = mesh
                .seal_for(
                    &p.key,
                    &seal_context("payload", t.id, t.attempt),
                    &t.payload,
                )
                .map_err(IntoResponse::into_response)?;
        }
    }
    Ok(Json(reply))
}

/// What a sealed value is bound to: its purpose, task and attempt.
pub fn seal_context(purpose: &str, task: TaskId, attempt: u32) -> String {
    format!("{purpose}:{task}:{attempt}")
}

/// `GET /agents`.
pub async fn agents(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
) -> Result<Json<Vec<AgentView>>, CoordinatorError> {
    if p.role != Role::Node {
        return Err(CoordinatorError::Forbidden("list agents"));
    }
    Ok(Json(ctx.state.agents()))
}

/// `POST /tasks/{id}/events`.
pub async fn post_events(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    Path(id): Path<String>,
    JsonBody(mut req): JsonBody<PostEvents>,
) -> Result<Json<EventsAccepted>, Response> {
    let id = parse_id(&id).map_err(IntoResponse::into_response)?;
    // A mesh peer's events arrive sealed to this node.
    if let Some(mesh) = ctx.mesh.get().filter(|_| p.role == Role::Peer) {
        let aad = seal_context("event", id, req.attempt);
        for e in &mut req.events {
            e.data = mesh
                .open_sealed(&aad, &e.data)
                .map_err(IntoResponse::into_response)?;
        }
    }
    ctx.state
        .post_events(&p, id, req)
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

/// `POST /tasks/{id}/result`.
pub async fn post_result(
    State(ctx): State<Ctx>,
    Auth(p): Auth,
    Path(id): Path<String>,
    JsonBody(mut req): JsonBody<PostResult>,
) -> Result<Json<ResultAccepted>, Response> {
    let id = parse_id(&id).map_err(IntoResponse::into_response)?;
    // A mesh peer's result arrives sealed to this node: the output, or the error text.
    if let Some(mesh) = ctx.mesh.get().filter(|_| p.role == Role::Peer) {
        let aad = seal_context("result", id, req.attempt);
        match &mut req.outcome {
            ReportedOutcome::Succeeded { output } => {
                *output = mesh
                    .open_sealed(&aad, output)
                    .map_err(IntoResponse::into_response)?;
            }
            ReportedOutcome::Failed { error, .. } => {
                let sealed: serde_json::Value = serde_json::from_str(error).map_err(|_| {
                    ApiError::bad_request("a mesh peer's error must be sealed").into_response()
                })?;
                let opened = mesh
                    .open_sealed(&aad, &sealed)
                    .map_err(IntoResponse::into_response)?;
                *error = opened.as_str().unwrap_or_default().to_string();
            }
        }
    }
    ctx.state
        .post_result(&p, id, req)
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

/// `GET /health`.
pub async fn health(State(ctx): State<Ctx>) -> Json<crate::health::HealthView> {
    Json(ctx.health.view("coordinator"))
}

/// `GET /status`.
pub async fn status(State(ctx): State<Ctx>) -> Json<serde_json::Value> {
    let (counts, agents) = ctx.state.counts();
    Json(serde_json::json!({
        "service": "coordinator",
        "node_id": ctx.health.node_id.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": ctx.health.uptime_secs(),
        "operational": ctx.health.operational(),
        "queue": counts,
        "agents": agents,
        "worker": ctx.health.worker(),
        "ports": ctx.health.ports(),
        "hardware": crate::hw::current(ctx.process.hardware()).as_deref(),
    }))
}

/// `GET /identity`.
pub async fn identity(State(ctx): State<Ctx>) -> Json<IdentityView> {
    let mut v = (*ctx.identity).clone();
    v.mesh = ctx.mesh.get().map(crate::mesh::service::Mesh::identity);
    Json(v)
}
