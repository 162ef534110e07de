//! HTTP plumbing shared by every port: the error body, JSON extraction with stable error codes,
//! the per-IP rate limit, request timeouts, `/metrics`, and serving with graceful shutdown.
//!
//! Services build their own routers; this module only holds what would otherwise be copied into
//! each of them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::security::ratelimit::RateLimits;

/// An error as every service returns it, in OpenAI's error shape so IDE clients parse it too:
/// `{"error": {"message": "...", "type": "...", "param": null, "code": "..."}}` with a status,
/// and `Retry-After` where waiting helps. `type` follows from the status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation; never internal details for unauthenticated callers.
    pub message: String,
    /// Seconds to wait before retrying, for 429 and 503.
    pub retry_after: Option<Duration>,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            param: None,
        }
    }

    /// Names the request field at fault.
    pub fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }

    /// OpenAI's error `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// Adds a Retry-After.
    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 500 `internal`: details go to the log, not to the caller.
    pub fn internal(err: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the node's log",
        )
    }
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

#[derive(serde::Serialize)]
struct ErrorInner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorBody {
            error: ErrorInner {
                message: &self.message,
                kind: self.kind(),
                param: self.param,
                code: self.code,
            },
        })
        .unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(d) = self.retry_after {
            // Round up: "retry after 0 seconds" would invite an immediate retry that fails again.
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                h.insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// A JSON body whose problems come back as [`ApiError`]s: 413 `body_too_large`, 400
/// `malformed_json` (not JSON at all), 400 `invalid_request` (JSON of the wrong shape, unknown
/// fields), 415 `unsupported_media_type`.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ct_ok = match req.headers().get(header::CONTENT_TYPE) {
            None => true,
            Some(v) => v
                .to_str()
                .map(|s| s.starts_with("application/json"))
                .unwrap_or(false),
        };
        if !ct_ok {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                body_too_large()
            } else {
                ApiError::bad_request(format!("could not read the body: {e}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Query parameters whose problems come back as 400 `invalid_request` in the common error shape
/// (axum's own extractor answers in plain text).
#[derive(Debug, Clone)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
    }
}

/// A fallback for known paths with the wrong method: 405 in the common error shape.
pub async fn method_not_allowed_fallback() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that method",
    )
}

/// Parses JSON with the same error mapping as [`JsonBody`].
///
/// # Errors
/// 400 `malformed_json` or `invalid_request`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("body is not valid JSON: {e}"),
            ),
            Category::Data => ApiError::bad_request(format!("invalid request: {e}")),
        }
    })
}

/// 413 `body_too_large`.
pub fn body_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        "request body is larger than http.max_body",
    )
}

/// Middleware: the pre-authentication per-IP rate limit. Uses the socket's peer address only;
/// forwarded-for headers are never trusted.
pub async fn limit_by_ip(
    State(limits): State<Arc<RateLimits>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    match limits.check_ip(peer.ip()) {
        Ok(()) => next.run(req).await,
        Err(wait) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests from this address",
        )
        .retry_after(wait)
        .into_response(),
    }
}

/// Time limits for requests: `base` for the work itself, plus whatever `wait=` the request asks
/// for (capped at `max_wait`), so long polls are bounded by their own wait and nothing else.
#[derive(Debug, Clone, Copy)]
pub struct TimeLimit {
    /// Limit for a request without `wait`.
    pub base: Duration,
    /// Largest `wait` honoured.
    pub max_wait: Duration,
}

/// The `wait=` query parameter of a request, if any and valid.
pub fn query_wait(query: Option<&str>) -> Option<Duration> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("wait="))
        .and_then(|v| humantime::parse_duration(v).ok())
}

/// Middleware: bounds the time a handler may take.
pub async fn time_limit(State(limit): State<TimeLimit>, req: Request, next: Next) -> Response {
    let wait = query_wait(req.uri().query())
        .unwrap_or_default()
        .min(limit.max_wait);
    match tokio::time::timeout(limit.base + wait, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the request took longer than http.request_timeout",
        )
        .retry_after(Duration::from_secs(1))
        .into_response(),
    }
}

/// `GET /metrics` for a service: its own registry plus process-wide figures.
pub async fn metrics_handler(State(m): State<Arc<Metrics>>) -> Response {
    let text = m.render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// A fallback for unknown paths, in the common error shape.
pub async fn not_found_fallback() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// Binds a listener with a clear error.
///
/// # Errors
/// The bind failure, naming the service and address.
pub async fn bind(service: &str, addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (is another edgecoder running? use --data-dir and ports, or --host, to run several)"
        } else {
            ""
        };
        std::io::Error::new(
            e.kind(),
            format!("{service}: cannot listen on {addr}: {e}{hint}"),
        )
    })
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and lets
/// in-flight requests finish.
///
/// # Errors
/// Accept-loop failures.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Without TCP_NODELAY a small streamed chunk (one token, one SSE event) can wait for the
    // peer's delayed ACK: measured here as ~15 ms added to the first token.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "http.serve could not set TCP_NODELAY");
        }
    });
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}

/// Wraps a body for re-insertion after a middleware buffered it.
pub fn body_from(bytes: Bytes) -> Body {
    Body::from(bytes)
}

/// The endpoints every port serves: `GET /health`, `GET /status` (the service's own JSON merged
/// with the node's common fields) and `GET /metrics`, merged with the service's own `routes`, all
/// behind the per-IP limit, with the JSON 404 and 405.
pub fn base_router(
    service: &'static str,
    health: Arc<crate::health::NodeHealth>,
    metrics: Arc<Metrics>,
    limits: Arc<RateLimits>,
    status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
    routes: Router,
) -> Router {
    use axum::routing::get;
    let h = health.clone();
    let health_route = get(move || {
        let h = h.clone();
        async move { axum::Json(h.view(service)) }
    });
    let status_route = get(move || {
        let health = health.clone();
        let status = status.clone();
        async move {
            let mut v = serde_json::json!({
                "service": service,
                "node_id": health.node_id.to_string(),
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_secs": health.uptime_secs(),
                "operational": health.operational(),
                "worker": health.worker(),
            });
            if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), status()) {
                obj.extend(extra);
            }
            axum::Json(v)
        }
    });
    Router::new()
        .route("/health", health_route)
        .route("/status", status_route)
        .route("/metrics", get(metrics_handler).with_state(metrics))
        .merge(routes)
        .fallback(not_found_fallback)
        .method_not_allowed_fallback(method_not_allowed_fallback)
        .layer(axum::middleware::from_fn_with_state(limits, limit_by_ip))
}

/// A reqwest client builder with TLS ready: installs ring as rustls' process-wide crypto provider
/// the first time (reqwest is built without a provider of its own to keep aws-lc out).
pub fn client_builder() -> reqwest::ClientBuilder {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        // Err means another provider was installed first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}
