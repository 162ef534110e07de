//! Request authentication for the coordinator: signed requests, replay protection, rate limits.
//!
//! # What it owns
//! [`Verifier`] holds the replay cache, the limiters and a [`KeyResolver`] that says which keys
//! may call which port; [`authenticate`] is the axum middleware that applies it. Services put it
//! in front of every route that needs a caller; a handler reads the caller as a [`Principal`]
//! from the request extensions.
//!
//! # Order of checks (DESIGN.md §6)
//! 1. per-IP rate limit (in [`crate::http::limit_by_ip`], in front of this middleware);
//! 2. body size cap (413) — before anything is buffered beyond the limit;
//! 3. header profile, algorithm, tag and time window ([`httpsig::parse`]) — cheap, no key needed;
//! 4. key authorisation ([`KeyResolver`]) — unknown keys are refused before any curve arithmetic;
//! 5. `verify_strict` over the signature base, then the body digest ([`httpsig::verify`]);
//! 6. per-key rate limit (429);
//! 7. nonce check-and-insert; the nonce is persisted and the response waits for that commit.

pub mod httpsig;
pub mod nonce;
pub mod ratelimit;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::http::{ApiError, body_too_large};
use crate::identity::KeyId;
use crate::store::Store;

use self::httpsig::{ReceivedHeaders, RequestParts, SigError, TimePolicy};
use self::nonce::NonceCache;
use self::ratelimit::RateLimits;

/// What a verified key is allowed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The node's own identity (the CLI on the box, and the node itself).
    Node,
    /// A worker agent: registers, claims and reports tasks.
    Agent,
    /// A client allowed to submit and read its own tasks.
    Client,
    /// A mesh member acting as an agent of this coordinator: it may claim only tasks offered to
    /// it, and its payloads, events and results are sealed.
    Peer,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    /// The signing key.
    pub key: KeyId,
    /// What the key may do.
    pub role: Role,
}

/// Decides which keys are known, and as what.
pub trait KeyResolver: Send + Sync + 'static {
    /// The role of `key`, or `None` when it may not call this service.
    fn resolve(&self, key: &KeyId) -> Option<Role>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

/// Verification settings.
#[derive(Debug, Clone, Copy)]
pub struct VerifierConfig {
    /// Longest `expires - created`.
    pub window: Duration,
    /// Clock skew tolerated.
    pub skew: Duration,
    /// Largest body buffered for verification.
    pub max_body: usize,
}

/// The request verifier shared by a service's routes.
pub struct Verifier {
    cfg: VerifierConfig,
    nonces: Arc<NonceCache>,
    limits: Arc<RateLimits>,
    resolver: Arc<dyn KeyResolver>,
    store: Option<Store>,
    rejected: Family<CodeLabel, Counter>,
    accepted: Counter,
    rate_limited: Counter,
    skew_seen: AtomicU64,
    /// Decompressed public keys of authorised callers.
    keys: std::sync::Mutex<std::collections::HashMap<KeyId, ed25519_dalek::VerifyingKey>>,
}

/// Most decompressed keys cached; the cache only holds keys the resolver accepted, so it is
/// normally far smaller. When full it is simply cleared.
const KEY_CACHE_MAX: usize = 4096;

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier. `store`, when given, makes the nonce cache durable.
    pub fn new(
        cfg: VerifierConfig,
        nonces: Arc<NonceCache>,
        limits: Arc<RateLimits>,
        resolver: Arc<dyn KeyResolver>,
        store: Option<Store>,
    ) -> Self {
        Verifier {
            cfg,
            nonces,
            limits,
            resolver,
            store,
            rejected: Family::default(),
            accepted: Counter::default(),
            rate_limited: Counter::default(),
            skew_seen: AtomicU64::new(0),
            keys: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Registers this verifier's counters under `prefix` (e.g. `edgecoder_coordinator_auth`).
    pub fn register_metrics(&self, reg: &mut Registry, prefix: &str) {
        reg.register(
            format!("{prefix}_rejected"),
            "Signed requests rejected, by reason code",
            self.rejected.clone(),
        );
        reg.register(
            format!("{prefix}_accepted"),
            "Signed requests accepted",
            self.accepted.clone(),
        );
        reg.register(
            format!("{prefix}_rate_limited"),
            "Authenticated requests refused by the per-key limit",
            self.rate_limited.clone(),
        );
    }

    /// How many requests were rejected with `code`.
    pub fn rejected_count(&self, code: &'static str) -> u64 {
        self.rejected.get_or_create(&CodeLabel { code }).get()
    }

    /// The replay cache (for pruning).
    pub fn nonces(&self) -> &NonceCache {
        &self.nonces
    }

    fn verifying_key(&self, id: &KeyId) -> Result<ed25519_dalek::VerifyingKey, SigError> {
        let mut cache = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(id) {
            return Ok(*k);
        }
        let k = id.verifying_key().map_err(|_| SigError::UnknownKey)?;
        if cache.len() >= KEY_CACHE_MAX {
            cache.clear();
        }
        cache.insert(*id, k);
        Ok(k)
    }

    fn reject(&self, e: SigError) -> ApiError {
        self.rejected
            .get_or_create(&CodeLabel { code: e.code() })
            .inc();
        let status = match e {
            SigError::NonceCacheFull => StatusCode::SERVICE_UNAVAILABLE,
            SigError::UnknownKey => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        let err = ApiError::new(status, e.code(), e.to_string());
        if e == SigError::NonceCacheFull {
            err.retry_after(self.cfg.window)
        } else {
            err
        }
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Middleware: authenticates a signed request and adds its [`Principal`] to the extensions.
pub async fn authenticate(State(v): State<Arc<Verifier>>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    // Step 1: the body cap. A declared length over the cap is refused without reading.
    let declared = header_str(&parts.headers, header::CONTENT_LENGTH.as_str())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|n| n > v.cfg.max_body as u64) {
        return body_too_large().into_response();
    }
    let bytes = match to_bytes(body, v.cfg.max_body).await {
        Ok(b) => b,
        Err(_) => return body_too_large().into_response(),
    };
    let received = ReceivedHeaders {
        content_digest: header_str(&parts.headers, httpsig::CONTENT_DIGEST),
        signature_input: header_str(&parts.headers, httpsig::SIGNATURE_INPUT),
        signature: header_str(&parts.headers, httpsig::SIGNATURE),
    };
    let now = crate::clock::now_ms() / 1000;
    let time = TimePolicy {
        now,
        max_window: v.cfg.window.as_secs(),
        skew: v.cfg.skew.as_secs(),
    };
    // Step 3.
    let params = match httpsig::parse(&received, &time) {
        Ok(p) => p,
        Err(e) => return v.reject(e).into_response(),
    };
    v.skew_seen
        .fetch_max(params.created.saturating_sub(now), Ordering::Relaxed);
    // Step 4.
    let Some(role) = v.resolver.resolve(&params.keyid) else {
        return v.reject(SigError::UnknownKey).into_response();
    };
    // Step 5.
    let authority = header_str(&parts.headers, header::HOST.as_str())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let rp = RequestParts {
        method: parts.method.as_str(),
        authority,
        path: parts.uri.path(),
        query: parts.uri.query(),
    };
    let checked = v
        .verifying_key(&params.keyid)
        .and_then(|key| httpsig::verify_with(&received, &params, &key, &rp, &bytes));
    if let Err(e) = checked {
        return v.reject(e).into_response();
    }
    // Step 6.
    if let Err(wait) = v.limits.check_key(&params.keyid) {
        v.rate_limited.inc();
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests for this key",
        )
        .retry_after(wait)
        .into_response();
    }
    // Step 7.
    let permit = match &v.store {
        Some(s) if v.nonces.is_persistent() => match s.reserve().await {
            Ok(p) => Some(p),
            Err(e) => return ApiError::internal(&e).into_response(),
        },
        _ => None,
    };
    let expiry = params.expires.saturating_add(time.skew);
    let commit = match v
        .nonces
        .check_and_insert(params.keyid, params.nonce, expiry, now, permit)
    {
        Ok(c) => c,
        Err(e) => return v.reject(e).into_response(),
    };
    v.accepted.inc();
    parts.extensions.insert(Principal {
        key: params.keyid,
        role,
    });
    let req = Request::from_parts(parts, crate::http::body_from(bytes));
    let resp = next.run(req).await;
    // The nonce must be durable before the caller can act on the answer; the handler's own
    // writes were queued after it, so this is usually already resolved.
    if let Some(c) = commit
        && let Err(e) = c.await
    {
        return ApiError::internal(&e).into_response();
    }
    resp
}

/// Extracts the authenticated caller; a route behind [`authenticate`] always has one.
#[derive(Debug, Clone, Copy)]
pub struct Auth(pub Principal);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .copied()
            .map(Auth)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unsigned",
                    "request is not signed",
                )
            })
    }
}
