//! The portal (`edgecoder portal`, :4310): user accounts that sign in with passkeys, and
//! sessions. A separate deployment of the same binary (DESIGN.md §2).
//!
//! # What it owns
//! Its own store (`<data_dir>/portal/store`, tables `portal_users`, `portal_usernames`,
//! `portal_credentials`, `portal_sessions`); the passkey ceremonies in flight (in memory,
//! single use, `portal.ceremony_timeout`); WebAuthn verification ([`webauthn`]).
//!
//! # Routes
//! - `POST /auth/register/options`, `POST /auth/register/verify`: create an account with a
//!   passkey, or (signed in, no user name) add a passkey to one's account.
//! - `POST /auth/login/options`, `POST /auth/login/verify`: sign in with a passkey (by user
//!   name, or discoverable with none).
//! - `POST /auth/logout`, `GET /me`.
//! - `GET /` and `GET /portal.js`: a page that does all of the above in a browser.
//! - `GET /health`, `GET /metrics`.
//!
//! There are no passwords: an account is its passkeys. A session is a random 256-bit token in
//! an `HttpOnly; SameSite=Strict` cookie (or `Authorization: Bearer`), stored only as its
//! SHA-256. POSTs must be JSON (a cross-site form cannot send it) and an `Origin` header, when
//! present, must be one of `portal.origins`.

pub mod webauthn;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use self::webauthn::{Expect, PublicKey};
use crate::config::{Config, PortalConfig};
use crate::http::{ApiError, JsonBody};
use crate::metrics::{Metrics, ProcessMetrics};
use crate::security::ratelimit::RateLimits;
use crate::standalone::Deployment;
use crate::store::{Durability, Store, StoreError, decode, encode};

/// The session cookie's name on plain-http (localhost) portals.
pub const COOKIE: &str = "edgecoder_portal_session";
/// The session cookie's name when every origin is https: the `__Host-` prefix makes browsers
/// refuse it unless it is `Secure`, has no `Domain` and `Path=/`, so a sibling subdomain cannot
/// plant one.
pub const SECURE_COOKIE: &str = "__Host-edgecoder_portal_session";
/// The file, in the portal's directory, that says where it listens.
pub const INFO_FILE: &str = "portal.json";
/// Most passkey ceremonies in flight at once.
const MAX_CEREMONIES: usize = 10_000;
/// Most passkey ceremonies in flight from one IP address: one client cannot fill the table and
/// lock everyone else out.
const MAX_CEREMONIES_PER_IP: usize = 32;

/// Where a portal whose data directory is `data_dir` writes its [`ServiceInfo`](crate::standalone::ServiceInfo).
pub fn info_file(data_dir: &Path) -> PathBuf {
    state_dir(data_dir).join(INFO_FILE)
}

/// The portal's own directory under the data directory.
pub fn state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("portal")
}

/// An account.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserRecord {
    id: [u8; 16],
    username: String,
    display_name: String,
    created_ms: u64,
}

/// A passkey.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CredentialRecord {
    user: [u8; 16],
    alg: i64,
    key: Vec<u8>,
    sign_count: u32,
    created_ms: u64,
    last_used_ms: Option<u64>,
}

/// A session, stored under the SHA-256 of its token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionRecord {
    user: [u8; 16],
    created_ms: u64,
    expires_ms: u64,
}

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserView {
    /// The WebAuthn user handle, base64url.
    pub id: String,
    /// The user name.
    pub username: String,
    /// The name shown.
    pub display_name: String,
    /// When the account was created (ms since the epoch).
    pub created_ms: u64,
}

impl From<&UserRecord> for UserView {
    fn from(u: &UserRecord) -> Self {
        UserView {
            id: URL_SAFE_NO_PAD.encode(u.id),
            username: u.username.clone(),
            display_name: u.display_name.clone(),
            created_ms: u.created_ms,
        }
    }
}

/// A passkey as `/me` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasskeyView {
    /// Credential id, base64url.
    pub id: String,
    /// COSE algorithm (-7 ES256, -8 EdDSA).
    pub alg: i64,
    /// When it was registered.
    pub created_ms: u64,
    /// When it last signed in.
    pub last_used_ms: Option<u64>,
    /// The authenticator's signature counter.
    pub sign_count: u32,
}

#[derive(Debug, Clone)]
enum CeremonyKind {
    /// Create `user` (new when `new`), adding a passkey.
    Register { user: UserRecord, new: bool },
    /// Sign in; `allow` empty means any of the RP's credentials (discoverable).
    Login { allow: Vec<Vec<u8>> },
}

#[derive(Debug, Clone)]
struct Ceremony {
    kind: CeremonyKind,
    ip: std::net::IpAddr,
    challenge: [u8; 32],
    expires_ms: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    ceremony: &'static str,
    outcome: &'static str,
}

struct Portal {
    store: Store,
    cfg: PortalConfig,
    ceremonies: Mutex<HashMap<String, Ceremony>>,
    outcomes: Family<OutcomeLabel, Counter>,
    secure_cookie: bool,
}

type Shared = Arc<Portal>;

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS RNG failing is not something to continue past.
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut b).expect("the OS random number generator failed");
    b
}

fn err(status: StatusCode, code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::new(status, code, msg)
}

fn internal(e: &StoreError) -> ApiError {
    ApiError::internal(e)
}

fn b64(s: &str, what: &str) -> Result<Vec<u8>, ApiError> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| {
            err(
                StatusCode::BAD_REQUEST,
                "webauthn_invalid",
                format!("{what} is not base64url"),
            )
        })
}

fn valid_username(u: &str) -> bool {
    (1..=64).contains(&u.len())
        && u.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

impl Portal {
    fn count(&self, ceremony: &'static str, outcome: &'static str) {
        self.outcomes
            .get_or_create(&OutcomeLabel { ceremony, outcome })
            .inc();
    }

    fn start(
        &self,
        kind: CeremonyKind,
        ip: std::net::IpAddr,
    ) -> Result<(String, [u8; 32]), ApiError> {
        let now = crate::clock::now_ms();
        let mut c = self.ceremonies.lock().unwrap_or_else(|p| p.into_inner());
        c.retain(|_, v| v.expires_ms > now);
        if c.values().filter(|v| v.ip == ip).count() >= MAX_CEREMONIES_PER_IP {
            return Err(err(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_ceremonies",
                format!(
                    "{MAX_CEREMONIES_PER_IP} passkey ceremonies from this address are in progress; finish one or wait"
                ),
            )
            .retry_after(Duration::from_secs(10)));
        }
        if c.len() >= MAX_CEREMONIES {
            return Err(err(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many sign-ins in progress; try again shortly",
            )
            .retry_after(Duration::from_secs(5)));
        }
        let id = URL_SAFE_NO_PAD.encode(random::<16>());
        let challenge = random::<32>();
        c.insert(
            id.clone(),
            Ceremony {
                kind,
                ip,
                challenge,
                expires_ms: now + self.cfg.ceremony_timeout.as_millis() as u64,
            },
        );
        Ok((id, challenge))
    }

    /// Takes a ceremony out (single use).
    fn take(&self, id: &str) -> Result<Ceremony, ApiError> {
        let now = crate::clock::now_ms();
        let mut c = self.ceremonies.lock().unwrap_or_else(|p| p.into_inner());
        match c.remove(id) {
            Some(cer) if cer.expires_ms > now => Ok(cer),
            _ => Err(err(
                StatusCode::BAD_REQUEST,
                "ceremony_unknown",
                "no such ceremony: unknown, already used or expired; start again",
            )),
        }
    }

    fn expect<'a>(&'a self, kind: &'static str, challenge: &'a [u8]) -> Expect<'a> {
        Expect {
            kind,
            challenge,
            origins: &self.cfg.origins,
            rp_id: &self.cfg.rp_id,
        }
    }

    fn user(&self, id: &[u8]) -> Result<Option<UserRecord>, StoreError> {
        self.store.read(|txn, t| {
            t.portal_users
                .get(txn, id)?
                .map(|b| decode("portal_users", b))
                .transpose()
        })
    }

    fn user_by_name(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let id = self.store.read(|txn, t| {
            Ok(t.portal_usernames
                .get(txn, name.as_bytes())?
                .map(<[u8]>::to_vec))
        })?;
        match id {
            Some(id) => self.user(&id),
            None => Ok(None),
        }
    }

    fn credentials_of(
        &self,
        user: &[u8; 16],
    ) -> Result<Vec<(Vec<u8>, CredentialRecord)>, StoreError> {
        self.store.read(|txn, t| {
            let mut out = Vec::new();
            for item in t.portal_credentials.iter(txn)? {
                let (k, v) = item?;
                let c: CredentialRecord = decode("portal_credentials", v)?;
                if &c.user == user {
                    out.push((k.to_vec(), c));
                }
            }
            Ok(out)
        })
    }

    fn credential(&self, id: &[u8]) -> Result<Option<CredentialRecord>, StoreError> {
        self.store.read(|txn, t| {
            t.portal_credentials
                .get(txn, id)?
                .map(|b| decode("portal_credentials", b))
                .transpose()
        })
    }

    /// The signed-in user from the cookie or bearer token, with the token's hash.
    fn cookie_name(&self) -> &'static str {
        if self.secure_cookie {
            SECURE_COOKIE
        } else {
            COOKIE
        }
    }

    fn session(&self, headers: &HeaderMap) -> Result<(UserRecord, [u8; 32]), ApiError> {
        let not_signed_in = || err(StatusCode::UNAUTHORIZED, "not_signed_in", "sign in first");
        let token = session_token(headers, self.cookie_name()).ok_or_else(not_signed_in)?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let s: Option<SessionRecord> = self
            .store
            .read(|txn, t| {
                t.portal_sessions
                    .get(txn, &hash)?
                    .map(|b| decode("portal_sessions", b))
                    .transpose()
            })
            .map_err(|e| internal(&e))?;
        let s = s
            .filter(|s| s.expires_ms > crate::clock::now_ms())
            .ok_or_else(not_signed_in)?;
        let user = self
            .user(&s.user)
            .map_err(|e| internal(&e))?
            .ok_or_else(not_signed_in)?;
        Ok((user, hash))
    }

    /// Creates a session for `user`: the token and the `Set-Cookie` value.
    async fn new_session(&self, user: [u8; 16]) -> Result<(String, HeaderValue), ApiError> {
        let token = URL_SAFE_NO_PAD.encode(random::<32>());
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = crate::clock::now_ms();
        let rec = SessionRecord {
            user,
            created_ms: now,
            expires_ms: now + self.cfg.session_ttl.as_millis() as u64,
        };
        let value = encode(&rec);
        self.store
            .write(Durability::Critical, move |txn, t| {
                t.portal_sessions.put(txn, &hash, &value)?;
                Ok(())
            })
            .await
            .map_err(|e| internal(&e))?;
        let cookie = format!(
            "{}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
            self.cookie_name(),
            self.cfg.session_ttl.as_secs(),
            if self.secure_cookie { "; Secure" } else { "" }
        );
        let header = HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal(&e))?;
        Ok((token, header))
    }
}

/// The session token from `Authorization: Bearer` or the cookie `name`.
fn session_token(headers: &HeaderMap, name: &str) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return Some(t.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

/// `POST /auth/register/options`.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RegisterOptions {
    /// The new account's user name (omit when signed in, to add a passkey).
    #[serde(default)]
    pub username: Option<String>,
    /// The name shown (defaults to the user name).
    #[serde(default)]
    pub display_name: Option<String>,
}

/// `POST /auth/login/options`.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LoginOptions {
    /// The account; omit for a discoverable passkey (the authenticator offers its accounts).
    #[serde(default)]
    pub username: Option<String>,
}

/// `POST /auth/*/verify`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// The ceremony from the options.
    pub ceremony: String,
    /// The browser's `PublicKeyCredential.toJSON()`.
    pub credential: Value,
}

fn descriptor(id: &[u8]) -> Value {
    json!({"type": "public-key", "id": URL_SAFE_NO_PAD.encode(id)})
}

async fn register_options(
    State(p): State<Shared>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<RegisterOptions>,
) -> Result<Json<Value>, ApiError> {
    let (user, new, exclude) = match req.username {
        Some(name) => {
            if !valid_username(&name) {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_username",
                    "a user name is 1-64 characters of a-z, 0-9, '.', '_' and '-'",
                )
                .param("username"));
            }
            if p.user_by_name(&name).map_err(|e| internal(&e))?.is_some() {
                return Err(err(
                    StatusCode::CONFLICT,
                    "username_taken",
                    format!("{name:?} is taken; sign in to add a passkey to it"),
                ));
            }
            let display = req.display_name.unwrap_or_else(|| name.clone());
            if display.is_empty() || display.chars().count() > 100 {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "display_name must be 1-100 characters",
                )
                .param("display_name"));
            }
            let user = UserRecord {
                id: random(),
                username: name,
                display_name: display,
                created_ms: crate::clock::now_ms(),
            };
            (user, true, Vec::new())
        }
        None => {
            let (user, _) = p.session(&headers)?;
            let exclude = p
                .credentials_of(&user.id)
                .map_err(|e| internal(&e))?
                .into_iter()
                .map(|(id, _)| id)
                .collect::<Vec<_>>();
            (user, false, exclude)
        }
    };
    let public = json!({
        "rp": {"id": p.cfg.rp_id, "name": p.cfg.rp_name},
        "user": {
            "id": URL_SAFE_NO_PAD.encode(user.id),
            "name": user.username,
            "displayName": user.display_name,
        },
        "pubKeyCredParams": [
            {"type": "public-key", "alg": webauthn::EDDSA},
            {"type": "public-key", "alg": webauthn::ES256},
        ],
        "timeout": p.cfg.ceremony_timeout.as_millis() as u64,
        "attestation": "none",
        "authenticatorSelection": {"residentKey": "required", "userVerification": "required"},
        "excludeCredentials": exclude.iter().map(|i| descriptor(i)).collect::<Vec<_>>(),
    });
    let (id, challenge) = p.start(CeremonyKind::Register { user, new }, peer.ip())?;
    let mut public = public;
    public["challenge"] = Value::String(URL_SAFE_NO_PAD.encode(challenge));
    Ok(Json(json!({"ceremony": id, "publicKey": public})))
}

fn field<'a>(v: &'a Value, path: &[&str]) -> Result<&'a str, ApiError> {
    let mut cur = v;
    for k in path {
        cur = &cur[*k];
    }
    cur.as_str().ok_or_else(|| {
        err(
            StatusCode::BAD_REQUEST,
            "webauthn_invalid",
            format!("credential.{} is missing", path.join(".")),
        )
    })
}

/// `credential.response.<name>`, base64url-decoded.
fn response_bytes(credential: &Value, name: &str) -> Result<Vec<u8>, ApiError> {
    b64(field(credential, &["response", name])?, name)
}

fn signed_in(
    status: StatusCode,
    user: &UserRecord,
    token: String,
    cookie: HeaderValue,
) -> Response {
    let mut r = (
        status,
        Json(json!({"user": UserView::from(user), "session": token})),
    )
        .into_response();
    r.headers_mut().insert(header::SET_COOKIE, cookie);
    r
}

async fn register_verify(
    State(p): State<Shared>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<Verify>,
) -> Result<Response, ApiError> {
    let cer = p.take(&req.ceremony)?;
    let CeremonyKind::Register { user, new } = cer.kind else {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "ceremony_unknown",
            "this ceremony is a sign-in, not a registration",
        ));
    };
    // A passkey is added to an account only while that account is still signed in here: a
    // ceremony started before a sign-out (or from another account's session) does not count.
    if !new {
        let (current, _) = p.session(&headers)?;
        if current.id != user.id {
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "not_signed_in",
                "sign in to the account the passkey is for",
            ));
        }
    }
    let cd = response_bytes(&req.credential, "clientDataJSON")?;
    let att = response_bytes(&req.credential, "attestationObject")?;
    let (cred_id, key, count) = match p
        .expect("webauthn.create", &cer.challenge)
        .registration(&cd, &att)
    {
        Ok(v) => v,
        Err(e) => {
            p.count("register", "invalid");
            return Err(err(StatusCode::BAD_REQUEST, "webauthn_invalid", e.0));
        }
    };
    let now = crate::clock::now_ms();
    let cred = CredentialRecord {
        user: user.id,
        alg: key.alg(),
        key: key.to_bytes(),
        sign_count: count,
        created_ms: now,
        last_used_ms: None,
    };
    #[derive(Debug)]
    enum Conflict {
        Username,
        Credential,
    }
    let (u, c, uid, name, cid) = (
        encode(&user),
        encode(&cred),
        user.id,
        user.username.clone(),
        cred_id.clone(),
    );
    let outcome = p
        .store
        .write(Durability::Critical, move |txn, t| {
            if t.portal_credentials.get(txn, &cid)?.is_some() {
                return Ok(Err(Conflict::Credential));
            }
            if new {
                if t.portal_usernames.get(txn, name.as_bytes())?.is_some() {
                    return Ok(Err(Conflict::Username));
                }
                t.portal_usernames.put(txn, name.as_bytes(), &uid)?;
                t.portal_users.put(txn, &uid, &u)?;
            }
            t.portal_credentials.put(txn, &cid, &c)?;
            Ok(Ok(()))
        })
        .await
        .map_err(|e| internal(&e))?;
    match outcome {
        Ok(()) => {}
        Err(Conflict::Credential) => {
            p.count("register", "conflict");
            return Err(err(
                StatusCode::CONFLICT,
                "credential_exists",
                "this passkey is already registered",
            ));
        }
        Err(Conflict::Username) => {
            p.count("register", "conflict");
            return Err(err(
                StatusCode::CONFLICT,
                "username_taken",
                "the user name was taken while the passkey was being created",
            ));
        }
    }
    p.count("register", "ok");
    tracing::info!(user = %user.username, new, alg = key.alg(), "portal.passkey registered");
    let (token, cookie) = p.new_session(user.id).await?;
    Ok(signed_in(StatusCode::CREATED, &user, token, cookie))
}

async fn login_options(
    State(p): State<Shared>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    JsonBody(req): JsonBody<LoginOptions>,
) -> Result<Json<Value>, ApiError> {
    let allow = match req.username {
        Some(name) => {
            let user = p
                .user_by_name(&name)
                .map_err(|e| internal(&e))?
                .ok_or_else(|| {
                    err(
                        StatusCode::NOT_FOUND,
                        "user_not_found",
                        format!("no user {name:?}"),
                    )
                })?;
            p.credentials_of(&user.id)
                .map_err(|e| internal(&e))?
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        }
        None => Vec::new(),
    };
    let allow_json: Vec<Value> = allow.iter().map(|i| descriptor(i)).collect();
    let (id, challenge) = p.start(CeremonyKind::Login { allow }, peer.ip())?;
    Ok(Json(json!({
        "ceremony": id,
        "publicKey": {
            "challenge": URL_SAFE_NO_PAD.encode(challenge),
            "rpId": p.cfg.rp_id,
            "timeout": p.cfg.ceremony_timeout.as_millis() as u64,
            "userVerification": "required",
            "allowCredentials": allow_json,
        }
    })))
}

async fn login_verify(
    State(p): State<Shared>,
    JsonBody(req): JsonBody<Verify>,
) -> Result<Response, ApiError> {
    let cer = p.take(&req.ceremony)?;
    let CeremonyKind::Login { allow } = cer.kind else {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "ceremony_unknown",
            "this ceremony is a registration, not a sign-in",
        ));
    };
    let refuse = |p: &Portal, code: &'static str, msg: String| {
        p.count("login", "refused");
        err(StatusCode::UNAUTHORIZED, code, msg)
    };
    let cred_id = b64(field(&req.credential, &["rawId"])?, "rawId")?;
    if !allow.is_empty() && !allow.contains(&cred_id) {
        return Err(refuse(
            &p,
            "webauthn_invalid",
            "this passkey is not one the sign-in asked for".into(),
        ));
    }
    let cred = p
        .credential(&cred_id)
        .map_err(|e| internal(&e))?
        .ok_or_else(|| refuse(&p, "webauthn_invalid", "unknown passkey".into()))?;
    if let Some(h) = req.credential["response"]["userHandle"].as_str()
        && !h.is_empty()
        && b64(h, "userHandle")? != cred.user
    {
        return Err(refuse(
            &p,
            "webauthn_invalid",
            "the user handle does not match the passkey".into(),
        ));
    }
    let key = PublicKey::from_stored(cred.alg, &cred.key).map_err(|e| ApiError::internal(&e))?;
    let cd = response_bytes(&req.credential, "clientDataJSON")?;
    let ad = response_bytes(&req.credential, "authenticatorData")?;
    let sig = response_bytes(&req.credential, "signature")?;
    let count = p
        .expect("webauthn.get", &cer.challenge)
        .assertion(&cd, &ad, &sig, &key)
        .map_err(|e| refuse(&p, "webauthn_invalid", e.0))?;
    // Counter and last use, checked and written in one transaction (two sign-ins at once with
    // the same counter: only one gets through).
    let now = crate::clock::now_ms();
    let cid = cred_id.clone();
    let updated = p
        .store
        .write(Durability::Critical, move |txn, t| {
            let Some(bytes) = t.portal_credentials.get(txn, &cid)? else {
                return Ok(Err(false));
            };
            let mut c: CredentialRecord = decode("portal_credentials", bytes)?;
            if webauthn::counter_regressed(c.sign_count, count) {
                return Ok(Err(true));
            }
            c.sign_count = count;
            c.last_used_ms = Some(now);
            t.portal_credentials.put(txn, &cid, &encode(&c))?;
            Ok(Ok(c.user))
        })
        .await
        .map_err(|e| internal(&e))?;
    let user_id = match updated {
        Ok(u) => u,
        Err(true) => {
            tracing::warn!(
                credential = %URL_SAFE_NO_PAD.encode(&cred_id),
                stored = cred.sign_count,
                got = count,
                "portal.passkey counter went back: a cloned authenticator?"
            );
            return Err(refuse(
                &p,
                "counter_regressed",
                "this passkey's signature counter went back; it may have been cloned".into(),
            ));
        }
        Err(false) => return Err(refuse(&p, "webauthn_invalid", "unknown passkey".into())),
    };
    let user = p.user(&user_id).map_err(|e| internal(&e))?.ok_or_else(|| {
        refuse(
            &p,
            "webauthn_invalid",
            "the passkey's account is gone".into(),
        )
    })?;
    p.count("login", "ok");
    let (token, cookie) = p.new_session(user.id).await?;
    Ok(signed_in(StatusCode::OK, &user, token, cookie))
}

async fn logout(State(p): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    let (_, hash) = p.session(&headers)?;
    p.store
        .write(Durability::Critical, move |txn, t| {
            t.portal_sessions.delete(txn, &hash)?;
            Ok(())
        })
        .await
        .map_err(|e| internal(&e))?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    let clear = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        p.cookie_name(),
        if p.secure_cookie { "; Secure" } else { "" }
    );
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&clear).map_err(|e| ApiError::internal(&e))?,
    );
    Ok(r)
}

async fn me(State(p): State<Shared>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let (user, _) = p.session(&headers)?;
    let mut creds = p.credentials_of(&user.id).map_err(|e| internal(&e))?;
    creds.sort_by_key(|(_, c)| c.created_ms);
    let passkeys: Vec<PasskeyView> = creds
        .into_iter()
        .map(|(id, c)| PasskeyView {
            id: URL_SAFE_NO_PAD.encode(id),
            alg: c.alg,
            created_ms: c.created_ms,
            last_used_ms: c.last_used_ms,
            sign_count: c.sign_count,
        })
        .collect();
    Ok(Json(
        json!({"user": UserView::from(&user), "passkeys": passkeys}),
    ))
}

/// Refuses state-changing requests whose `Origin` is not one of `portal.origins`.
async fn check_origin(State(p): State<Shared>, req: Request, next: Next) -> Response {
    if req.method() != Method::GET
        && req.method() != Method::HEAD
        && let Some(o) = req.headers().get(header::ORIGIN)
        && !p.cfg.origins.iter().any(|a| o.as_bytes() == a.as_bytes())
    {
        return err(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "requests from this origin are not accepted (portal.origins)",
        )
        .into_response();
    }
    next.run(req).await
}

/// The page and its script, compiled in (no files to install, nothing to fetch from elsewhere).
const INDEX_HTML: &str = include_str!("static/index.html");
const PORTAL_JS: &str = include_str!("static/portal.js");

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Only our own script; no framing (clickjacking a passkey prompt), no referrer.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    page("text/javascript; charset=utf-8", PORTAL_JS)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok", "service": "portal", "version": env!("CARGO_PKG_VERSION")}))
}

/// Boot failures.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PortalError(String);

/// Runs the portal until SIGTERM/SIGINT or `stop`.
///
/// # Errors
/// The data directory is in use, the store cannot be opened, the port cannot be bound.
pub async fn run(cfg: Config, stop: CancellationToken) -> Result<(), PortalError> {
    let e = |e: &dyn std::fmt::Display| PortalError(e.to_string());
    let dir = state_dir(&cfg.data_dir);
    let _lock = crate::node::lock_data_dir(&dir).map_err(|x| e(&x))?;
    let store = Store::open(&dir.join("store"), &cfg.store).map_err(|x| e(&x))?;
    let outcomes = Family::<OutcomeLabel, Counter>::default();
    let mut registry = Registry::default();
    registry.register(
        "edgecoder_portal_ceremonies",
        "Passkey ceremonies by outcome",
        outcomes.clone(),
    );
    let metrics = Metrics::new(registry, ProcessMetrics::new(Some(store.clone())));
    let portal = Arc::new(Portal {
        store: store.clone(),
        secure_cookie: cfg.portal.origins.iter().all(|o| o.starts_with("https://")),
        cfg: cfg.portal.clone(),
        ceremonies: Mutex::new(HashMap::new()),
        outcomes,
    });
    let limits = Arc::new(RateLimits::from_config(&cfg.security));
    let router = Router::new()
        .route("/auth/register/options", post(register_options))
        .route("/auth/register/verify", post(register_verify))
        .route("/auth/login/options", post(login_options))
        .route("/auth/login/verify", post(login_verify))
        .route("/auth/logout", post(logout))
        .route("/me", get(me))
        .route("/health", get(health))
        .route("/", get(index))
        .route("/portal.js", get(script))
        .with_state(portal.clone())
        .route(
            "/metrics",
            get(crate::http::metrics_handler).with_state(metrics),
        )
        .fallback(crate::http::not_found_fallback)
        .method_not_allowed_fallback(crate::http::method_not_allowed_fallback)
        .layer(axum::middleware::from_fn_with_state(
            portal.clone(),
            check_origin,
        ))
        .layer(axum::middleware::from_fn_with_state(
            limits.clone(),
            crate::http::limit_by_ip,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024));

    let listener = crate::http::bind("portal", cfg.addr(&cfg.portal.listen))
        .await
        .map_err(|x| e(&x))?;
    tracing::info!(rp_id = %cfg.portal.rp_id, "portal.starting");
    let deployment = Deployment {
        name: "portal",
        info_file: dir.join(INFO_FILE),
        store: store.clone(),
        drain: cfg.http.drain_timeout,
    };
    deployment
        .serve(listener, router, stop, move || {
            // Expired sessions and idle rate-limit buckets.
            limits.retain_recent();
            let store = store.clone();
            async move {
                let now = crate::clock::now_ms();
                let r = store
                    .write(Durability::Bulk, move |txn, t| {
                        let mut expired = Vec::new();
                        for item in t.portal_sessions.iter(txn)? {
                            let (k, v) = item?;
                            let s: SessionRecord = decode("portal_sessions", v)?;
                            if s.expires_ms <= now {
                                expired.push(k.to_vec());
                            }
                        }
                        for k in expired {
                            t.portal_sessions.delete(txn, &k)?;
                        }
                        Ok(())
                    })
                    .await;
                if let Err(err) = r {
                    tracing::warn!(error = %err, "portal.sweep failed");
                }
            }
        })
        .await
        .map_err(PortalError)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_plain() {
        assert!(valid_username("alice"));
        assert!(valid_username("a.b_c-9"));
        assert!(!valid_username(""));
        assert!(!valid_username("Alice"));
        assert!(!valid_username("al ice"));
        assert!(!valid_username(&"a".repeat(65)));
    }

    #[test]
    fn the_session_comes_from_bearer_or_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(session_token(&h, COOKIE), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; edgecoder_portal_session=abc; x=y"),
        );
        assert_eq!(session_token(&h, COOKIE).as_deref(), Some("abc"));
        assert_eq!(session_token(&h, SECURE_COOKIE), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer xyz"),
        );
        assert_eq!(session_token(&h, COOKIE).as_deref(), Some("xyz"));
    }
}
