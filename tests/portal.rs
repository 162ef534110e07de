//! The portal as a real process (`edgecoder portal`) driven over real HTTP by a software
//! WebAuthn authenticator (tests/common/authenticator.rs): accounts created and signed in to
//! with passkeys (ES256 and Ed25519), sessions by cookie and bearer token, and everything the
//! server must refuse (replayed ceremonies, forged signatures, another ceremony's challenge,
//! foreign origins and rp ids, missing user presence or verification, cloned authenticators,
//! duplicate credentials, cross-site requests).
#![allow(clippy::unwrap_used)]

#[path = "common/authenticator.rs"]
mod authenticator;
mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use authenticator::{Alg, Authenticator, FLAG_AT, FLAG_UP, FLAG_UV, b64, unb64};
use reqwest::Method;
use serde_json::{Value, json};

/// The origin pages are served from, as configured (not the port the test portal binds).
const ORIGIN: &str = "http://localhost:4310";
const RP_ID: &str = "localhost";
const COOKIE: &str = "edgecoder_portal_session";

/// A portal process in a temporary data directory.
struct Portal {
    dir: tempfile::TempDir,
    child: Child,
    url: String,
    args: Vec<String>,
    http: reqwest::Client,
}

fn spawn(dir: &Path, args: &[String]) -> Child {
    common::spawn_service(dir, args, &[])
}

fn wait_listening(dir: &Path, child: &mut Child) -> String {
    common::wait_service(dir, &edgecoder::portal::info_file(dir), child)
}

/// An HTTP answer: status, `Set-Cookie` headers and the body as JSON (Null when empty).
#[derive(Debug)]
struct Resp {
    status: u16,
    cookies: Vec<String>,
    body: Value,
}

impl Resp {
    /// Asserts an API error with this status and code.
    #[track_caller]
    fn refused(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.body["error"]["code"].as_str()),
            (status, Some(code)),
            "expected {status} {code}, got {} {}",
            self.status,
            self.body
        );
        assert!(
            self.body["error"]["message"].is_string(),
            "an error has a message: {}",
            self.body
        );
        assert!(
            self.cookies
                .iter()
                .all(|c| session_of(c).is_none_or(str::is_empty)),
            "a refusal sets no session cookie: {:?}",
            self.cookies
        );
    }

    #[track_caller]
    fn ok(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "{}", self.body);
        &self.body
    }
}

/// The session token a `Set-Cookie` value sets, if it is the session cookie.
fn session_of(set_cookie: &str) -> Option<&str> {
    let first = set_cookie.split(';').next()?.trim();
    first.strip_prefix(&format!("{COOKIE}=")[..])
}

/// How a request proves its session.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Cookie(&'a str),
    Bearer(&'a str),
}

/// A signed-in user: the user as the server shows it and the session token.
#[derive(Debug, Clone)]
struct Session {
    user: Value,
    token: String,
}

impl Portal {
    fn args(dir: &Path, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "portal".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
        ];
        for kv in [
            "portal.port=0".to_string(),
            format!("portal.rp_id={RP_ID}"),
            format!("portal.origins=[\"{ORIGIN}\"]"),
        ]
        .into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        {
            a.push("--set".into());
            a.push(kv);
        }
        a
    }

    fn start(extra: &[&str]) -> Portal {
        let dir = tempfile::tempdir().unwrap();
        let args = Portal::args(dir.path(), extra);
        let mut child = spawn(dir.path(), &args);
        let url = wait_listening(dir.path(), &mut child);
        Portal {
            dir,
            child,
            url,
            args,
            http: edgecoder::http::client_builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    fn kill9_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.dir.path(), &self.args);
        self.url = wait_listening(self.dir.path(), &mut self.child);
    }

    fn terminate(&mut self) -> Option<i32> {
        common::signal(self.child.id(), common::libc_sigterm());
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no exit within 30s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A request; `body` goes as JSON with `Content-Type: application/json`.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        auth: Auth<'_>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).unwrap());
        }
        match auth {
            Auth::None => {}
            Auth::Cookie(t) => req = req.header("cookie", format!("{COOKIE}={t}")),
            Auth::Bearer(t) => req = req.header("authorization", format!("Bearer {t}")),
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let cookies = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        let bytes = resp.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{path}: {status} with a body that is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Resp {
            status,
            cookies,
            body,
        }
    }

    async fn post(&self, path: &str, body: &Value, auth: Auth<'_>) -> Resp {
        self.send(Method::POST, path, Some(body), auth, &[]).await
    }

    async fn me(&self, auth: Auth<'_>) -> Resp {
        self.send(Method::GET, "/me", None, auth, &[]).await
    }

    /// Registration options for a new account; panics unless 200.
    async fn register_options(&self, username: &str) -> (String, Value) {
        let r = self
            .post(
                "/auth/register/options",
                &json!({"username": username, "display_name": display_name(username)}),
                Auth::None,
            )
            .await;
        let b = r.ok(200);
        (
            b["ceremony"].as_str().unwrap().to_string(),
            b["publicKey"].clone(),
        )
    }

    async fn register_verify(&self, ceremony: &str, credential: &Value, auth: Auth<'_>) -> Resp {
        self.post(
            "/auth/register/verify",
            &json!({"ceremony": ceremony, "credential": credential}),
            auth,
        )
        .await
    }

    /// Creates an account with a new passkey on `a`; checks the answer and its cookie.
    async fn register(&self, a: &mut Authenticator, username: &str) -> Session {
        let (ceremony, options) = self.register_options(username).await;
        let cred = a.create(&options, ORIGIN).unwrap();
        let r = self.register_verify(&ceremony, &cred, Auth::None).await;
        let s = signed_in(&r, 201);
        assert_eq!(s.user["username"], username);
        assert_eq!(s.user["display_name"], display_name(username));
        assert_eq!(s.user["id"], options["user"]["id"], "the user handle");
        s
    }

    /// Options to add a passkey to the account signed in with `token`; panics unless 200.
    async fn add_passkey_options(&self, token: &str) -> (String, Value) {
        let r = self
            .post("/auth/register/options", &json!({}), Auth::Cookie(token))
            .await;
        let b = r.ok(200);
        (
            b["ceremony"].as_str().unwrap().to_string(),
            b["publicKey"].clone(),
        )
    }

    /// Asserts that `name` has no account.
    async fn assert_no_account(&self, name: &str) {
        self.post(
            "/auth/login/options",
            &json!({"username": name}),
            Auth::None,
        )
        .await
        .refused(404, "user_not_found");
    }

    /// Ends the session `token`.
    async fn logout(&self, token: &str) -> Resp {
        self.send(Method::POST, "/auth/logout", None, Auth::Cookie(token), &[])
            .await
    }

    /// Login options (by user name, or discoverable with None); panics unless 200.
    async fn login_options(&self, username: Option<&str>) -> (String, Value) {
        let body = match username {
            Some(u) => json!({"username": u}),
            None => json!({}),
        };
        let r = self.post("/auth/login/options", &body, Auth::None).await;
        let b = r.ok(200);
        (
            b["ceremony"].as_str().unwrap().to_string(),
            b["publicKey"].clone(),
        )
    }

    async fn login_verify(&self, ceremony: &str, credential: &Value) -> Resp {
        self.post(
            "/auth/login/verify",
            &json!({"ceremony": ceremony, "credential": credential}),
            Auth::None,
        )
        .await
    }

    /// A login ceremony answered by `a`; the server's answer.
    async fn try_login(&self, a: &mut Authenticator, username: Option<&str>) -> Resp {
        let (ceremony, options) = self.login_options(username).await;
        let assertion = a.get(&options, ORIGIN).unwrap();
        self.login_verify(&ceremony, &assertion).await
    }

    /// Signs in with `a`; panics unless it works.
    async fn login(&self, a: &mut Authenticator, username: Option<&str>) -> Session {
        let r = self.try_login(a, username).await;
        signed_in(&r, 200)
    }

    /// `/me` for a session; panics unless 200.
    async fn whoami(&self, token: &str) -> Value {
        self.me(Auth::Bearer(token)).await.ok(200).clone()
    }
}

impl Drop for Portal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn display_name(username: &str) -> String {
    let mut c = username.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Checks a successful register/login answer: the status, the user, the session token and the
/// cookie that carries it.
#[track_caller]
fn signed_in(r: &Resp, status: u16) -> Session {
    let b = r.ok(status);
    let token = b["session"].as_str().expect("a session token").to_string();
    assert!(
        token.len() >= 22,
        "a session token of at least 128 bits: {token}"
    );
    let user = b["user"].clone();
    assert!(user["id"].as_str().is_some_and(|s| !s.is_empty()), "{user}");
    assert!(user["created_ms"].as_u64().is_some(), "{user}");
    let cookie = r
        .cookies
        .iter()
        .find(|c| session_of(c).is_some())
        .unwrap_or_else(|| panic!("no session cookie in {:?}", r.cookies));
    assert_eq!(session_of(cookie), Some(token.as_str()), "{cookie}");
    let attrs: Vec<String> = cookie
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    for want in ["httponly", "samesite=strict", "path=/"] {
        assert!(attrs.iter().any(|a| a == want), "{want} missing: {cookie}");
    }
    assert!(
        attrs.iter().any(|a| a
            .strip_prefix("max-age=")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|v| v > 0)),
        "a positive Max-Age: {cookie}"
    );
    Session { user, token }
}

/// A copy of a credential JSON with one base64url member of `response` changed by `f`.
fn tamper(cred: &Value, member: &str, f: impl FnOnce(&mut Vec<u8>)) -> Value {
    let mut out = cred.clone();
    let mut bytes = unb64(cred["response"][member].as_str().unwrap()).unwrap();
    f(&mut bytes);
    out["response"][member] = json!(b64(&bytes));
    out
}

fn cred_id(cred: &Value) -> String {
    cred["id"].as_str().unwrap().to_string()
}

/// The ids listed in `allowCredentials` or `excludeCredentials`.
fn listed(options: &Value, member: &str) -> Vec<String> {
    options[member]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|d| {
                    assert_eq!(d["type"], "public-key", "{d}");
                    d["id"].as_str().unwrap().to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_use_the_session_log_out_and_log_in_again() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);

    let r = portal
        .send(Method::GET, "/health", None, Auth::None, &[])
        .await;
    assert_eq!(r.ok(200)["service"], "portal");

    // The creation options are what a browser needs.
    let before = now_ms();
    let (ceremony, options) = portal.register_options("alice").await;
    assert!(!ceremony.is_empty());
    assert!(unb64(options["challenge"].as_str().unwrap()).unwrap().len() >= 16);
    assert_eq!(options["rp"]["id"], RP_ID);
    assert!(options["rp"]["name"].is_string());
    assert_eq!(options["user"]["name"], "alice");
    assert_eq!(options["user"]["displayName"], "Alice");
    assert!(
        !unb64(options["user"]["id"].as_str().unwrap())
            .unwrap()
            .is_empty()
    );
    let algs: Vec<i64> = options["pubKeyCredParams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["type"], "public-key");
            p["alg"].as_i64().unwrap()
        })
        .collect();
    assert!(algs.contains(&-7) && algs.contains(&-8), "{algs:?}");
    assert_eq!(options["attestation"], "none");
    assert_eq!(
        options["authenticatorSelection"]["userVerification"],
        "required"
    );
    assert_eq!(options["authenticatorSelection"]["residentKey"], "required");
    assert!(listed(&options, "excludeCredentials").is_empty());
    assert!(options["timeout"].as_u64().is_some_and(|t| t > 0));

    let cred = a.create(&options, ORIGIN).unwrap();
    let r = portal.register_verify(&ceremony, &cred, Auth::None).await;
    let alice = signed_in(&r, 201);
    assert_eq!(alice.user["username"], "alice");
    assert_eq!(alice.user["display_name"], "Alice");
    assert_eq!(alice.user["id"], options["user"]["id"]);
    let created = alice.user["created_ms"].as_u64().unwrap();
    assert!(
        created >= before - 1000 && created <= now_ms() + 1000,
        "{created}"
    );

    // The session works as a cookie and as a bearer token.
    for auth in [Auth::Cookie(&alice.token), Auth::Bearer(&alice.token)] {
        let me = portal.me(auth).await;
        let me = me.ok(200);
        assert_eq!(me["user"], alice.user);
        let passkeys = me["passkeys"].as_array().unwrap();
        assert_eq!(passkeys.len(), 1, "{me}");
        assert_eq!(passkeys[0]["id"], cred["id"]);
        assert_eq!(passkeys[0]["alg"], -7);
        assert!(passkeys[0]["created_ms"].as_u64().is_some());
        assert_eq!(passkeys[0]["sign_count"], 0);
    }
    // No session, a made-up one, or one under another cookie name: not signed in.
    portal.me(Auth::None).await.refused(401, "not_signed_in");
    portal
        .me(Auth::Bearer(&b64(&[0u8; 32])))
        .await
        .refused(401, "not_signed_in");
    portal
        .me(Auth::Cookie(&b64(&[0u8; 32])))
        .await
        .refused(401, "not_signed_in");
    portal
        .send(
            Method::GET,
            "/me",
            None,
            Auth::None,
            &[("cookie", &format!("other={}", alice.token))],
        )
        .await
        .refused(401, "not_signed_in");

    // Log out: 204, the cookie cleared, the token dead both ways.
    let r = portal
        .send(
            Method::POST,
            "/auth/logout",
            None,
            Auth::Cookie(&alice.token),
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let cleared = r
        .cookies
        .iter()
        .find(|c| session_of(c).is_some())
        .unwrap_or_else(|| panic!("logout clears the cookie: {:?}", r.cookies));
    let lower = cleared.to_ascii_lowercase();
    assert!(
        session_of(cleared) == Some("")
            && (lower.contains("max-age=0") || lower.contains("expires=thu, 01 jan 1970")),
        "{cleared}"
    );
    portal
        .me(Auth::Cookie(&alice.token))
        .await
        .refused(401, "not_signed_in");
    portal
        .me(Auth::Bearer(&alice.token))
        .await
        .refused(401, "not_signed_in");
    // Logging out again with the dead token: not signed in.
    portal
        .send(
            Method::POST,
            "/auth/logout",
            None,
            Auth::Bearer(&alice.token),
            &[],
        )
        .await
        .refused(401, "not_signed_in");

    // Log in by user name: the options name alice's passkey.
    let (ceremony, options) = portal.login_options(Some("alice")).await;
    assert_eq!(options["rpId"], RP_ID);
    assert_eq!(options["userVerification"], "required");
    assert_eq!(listed(&options, "allowCredentials"), vec![cred_id(&cred)]);
    assert!(unb64(options["challenge"].as_str().unwrap()).unwrap().len() >= 16);
    let assertion = a.get(&options, ORIGIN).unwrap();
    let again = signed_in(&portal.login_verify(&ceremony, &assertion).await, 200);
    assert_eq!(again.user, alice.user);
    assert_ne!(again.token, alice.token, "a new session");
    let me = portal.me(Auth::Cookie(&again.token)).await;
    let pk = &me.ok(200)["passkeys"][0];
    assert_eq!(pk["sign_count"], 1);
    assert!(
        pk["last_used_ms"].as_u64().is_some_and(|t| t >= created),
        "{pk}"
    );
    // The old token stays dead.
    portal
        .me(Auth::Bearer(&alice.token))
        .await
        .refused(401, "not_signed_in");

    // Bearer logout works too.
    let r = portal
        .send(
            Method::POST,
            "/auth/logout",
            None,
            Auth::Bearer(&again.token),
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    portal
        .me(Auth::Bearer(&again.token))
        .await
        .refused(401, "not_signed_in");

    // An unknown user has no login options.
    portal.assert_no_account("nobody").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discoverable_login_with_an_ed25519_passkey() {
    let portal = Portal::start(&[]);
    let mut alice_key = Authenticator::new(Alg::Es256);
    let mut bob_key = Authenticator::new(Alg::EdDsa);
    let alice = portal.register(&mut alice_key, "alice").await;
    let bob = portal.register(&mut bob_key, "bob").await;
    assert_ne!(alice.user["id"], bob.user["id"]);

    let me = portal.whoami(&bob.token).await;
    assert_eq!(me["passkeys"][0]["alg"], -8);
    assert_eq!(
        me["passkeys"][0]["id"],
        bob_key.credential_ids()[0].as_str()
    );

    // No user name: no allowCredentials; the passkey says who it is.
    let (ceremony, options) = portal.login_options(None).await;
    assert!(listed(&options, "allowCredentials").is_empty(), "{options}");
    assert_eq!(options["rpId"], RP_ID);
    let assertion = bob_key.get(&options, ORIGIN).unwrap();
    let s = signed_in(&portal.login_verify(&ceremony, &assertion).await, 200);
    assert_eq!(s.user, bob.user);
    assert_eq!(portal.whoami(&s.token).await["user"], bob.user);

    let s = portal.login(&mut alice_key, None).await;
    assert_eq!(s.user, alice.user);

    // Bob by user name with his Ed25519 key, twice (the counter grows).
    for _ in 0..2 {
        let s = portal.login(&mut bob_key, Some("bob")).await;
        assert_eq!(s.user, bob.user);
    }
    let me = portal.whoami(&bob.token).await;
    assert_eq!(me["passkeys"][0]["sign_count"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremonies_are_single_use() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);

    // Registration: a second answer to a used ceremony is refused (even a fresh credential).
    let (ceremony, options) = portal.register_options("alice").await;
    let cred = a.create(&options, ORIGIN).unwrap();
    signed_in(
        &portal.register_verify(&ceremony, &cred, Auth::None).await,
        201,
    );
    let mut other = Authenticator::new(Alg::Es256);
    let fresh = other.create(&options, ORIGIN).unwrap();
    portal
        .register_verify(&ceremony, &fresh, Auth::None)
        .await
        .refused(400, "ceremony_unknown");
    portal
        .register_verify(&ceremony, &cred, Auth::None)
        .await
        .refused(400, "ceremony_unknown");

    // Login: a replayed assertion is refused.
    let (ceremony, options) = portal.login_options(Some("alice")).await;
    let assertion = a.get(&options, ORIGIN).unwrap();
    signed_in(&portal.login_verify(&ceremony, &assertion).await, 200);
    portal
        .login_verify(&ceremony, &assertion)
        .await
        .refused(400, "ceremony_unknown");
    // Even re-signed by the authenticator (a fresh counter).
    let resigned = a.get(&options, ORIGIN).unwrap();
    portal
        .login_verify(&ceremony, &resigned)
        .await
        .refused(400, "ceremony_unknown");

    // A ceremony that never was; a registration ceremony used for a login and vice versa.
    portal
        .login_verify("no-such-ceremony", &resigned)
        .await
        .refused(400, "ceremony_unknown");
    portal
        .register_verify("no-such-ceremony", &fresh, Auth::None)
        .await
        .refused(400, "ceremony_unknown");
    let (reg_ceremony, _) = portal.register_options("carol").await;
    let (login_ceremony, options) = portal.login_options(Some("alice")).await;
    let assertion = a.get(&options, ORIGIN).unwrap();
    let r = portal.login_verify(&reg_ceremony, &assertion).await;
    assert!(
        matches!(r.status, 400 | 401) && r.body["error"]["code"].is_string(),
        "a registration ceremony does not sign in: {} {}",
        r.status,
        r.body
    );
    let r = portal
        .register_verify(&login_ceremony, &fresh, Auth::None)
        .await;
    assert!(
        r.status == 400 && r.body["error"]["code"].is_string(),
        "a login ceremony registers nothing: {} {}",
        r.status,
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremonies_expire() {
    let portal = Portal::start(&["portal.ceremony_timeout=10s"]);
    let mut a = Authenticator::new(Alg::Es256);
    portal.register(&mut a, "alice").await;
    let (reg, reg_options) = portal.register_options("bob").await;
    assert_eq!(reg_options["timeout"], 10_000);
    let (login, login_options) = portal.login_options(Some("alice")).await;
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let mut b = Authenticator::new(Alg::EdDsa);
    let cred = b.create(&reg_options, ORIGIN).unwrap();
    portal
        .register_verify(&reg, &cred, Auth::None)
        .await
        .refused(400, "ceremony_unknown");
    let assertion = a.get(&login_options, ORIGIN).unwrap();
    portal
        .login_verify(&login, &assertion)
        .await
        .refused(400, "ceremony_unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_altered_assertions_are_refused() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);
    let mut e = Authenticator::new(Alg::EdDsa);
    let alice = portal.register(&mut a, "alice").await;
    let bob = portal.register(&mut e, "bob").await;

    for (key, name) in [(&mut a, "alice"), (&mut e, "bob")] {
        // A flipped bit in the signature, in the middle of it (DER's r and s for ES256).
        let (ceremony, options) = portal.login_options(Some(name)).await;
        let good = key.get(&options, ORIGIN).unwrap();
        let forged = tamper(&good, "signature", |s| {
            let i = s.len() / 2;
            s[i] ^= 0x01;
        });
        portal
            .login_verify(&ceremony, &forged)
            .await
            .refused(401, "webauthn_invalid");

        // authenticatorData changed after signing (the counter).
        let (ceremony, options) = portal.login_options(Some(name)).await;
        let good = key.get(&options, ORIGIN).unwrap();
        let altered = tamper(&good, "authenticatorData", |d| d[36] ^= 0x80);
        portal
            .login_verify(&ceremony, &altered)
            .await
            .refused(401, "webauthn_invalid");

        // clientDataJSON changed after signing (same challenge and origin, other bytes).
        let (ceremony, options) = portal.login_options(Some(name)).await;
        let good = key.get(&options, ORIGIN).unwrap();
        let altered = tamper(&good, "clientDataJSON", |c| {
            let text = String::from_utf8(c.clone()).unwrap();
            *c = text
                .replace("\"crossOrigin\":false", "\"crossOrigin\":false ")
                .into_bytes();
        });
        portal
            .login_verify(&ceremony, &altered)
            .await
            .refused(401, "webauthn_invalid");
        // An empty signature.
        let (ceremony, options) = portal.login_options(Some(name)).await;
        let empty = tamper(&key.get(&options, ORIGIN).unwrap(), "signature", Vec::clear);
        let r = portal.login_verify(&ceremony, &empty).await;
        assert!(matches!(r.status, 400 | 401), "{} {}", r.status, r.body);
    }

    // Bob's passkey signing in with alice's user handle (which the signature does not cover):
    // refused (WebAuthn §7.2: the user handle must own the credential), never alice.
    let (ceremony, options) = portal.login_options(None).await;
    let good = e.get(&options, ORIGIN).unwrap();
    let mut other = good.clone();
    other["response"]["userHandle"] = alice.user["id"].clone();
    let r = portal.login_verify(&ceremony, &other).await;
    assert_ne!(r.body["user"], alice.user, "bob's passkey signed in alice");
    r.refused(401, "webauthn_invalid");

    // A passkey the portal never registered.
    let mut stranger = Authenticator::new(Alg::Es256);
    let (_, reg_options) = portal.register_options("mallory").await;
    stranger.create(&reg_options, ORIGIN).unwrap();
    let (ceremony, options) = portal.login_options(None).await;
    let assertion = stranger.get(&options, ORIGIN).unwrap();
    portal
        .login_verify(&ceremony, &assertion)
        .await
        .refused(401, "webauthn_invalid");

    // Bob's passkey answering a ceremony for alice (his browser ignored allowCredentials).
    let (ceremony, mut options) = portal.login_options(Some("alice")).await;
    options["allowCredentials"] = json!([]);
    let assertion = e.get(&options, ORIGIN).unwrap();
    portal
        .login_verify(&ceremony, &assertion)
        .await
        .refused(401, "webauthn_invalid");

    // After all that, genuine logins still work.
    assert_eq!(portal.login(&mut a, Some("alice")).await.user, alice.user);
    assert_eq!(portal.login(&mut e, Some("bob")).await.user, bob.user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_from_another_ceremony_is_refused() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);

    // Registration: answer ceremony 1 with the challenge of ceremony 2.
    let (first, _) = portal.register_options("alice").await;
    let (_, second_options) = portal.register_options("alice").await;
    let cred = a.create(&second_options, ORIGIN).unwrap();
    portal
        .register_verify(&first, &cred, Auth::None)
        .await
        .refused(400, "webauthn_invalid");

    let mut a = Authenticator::new(Alg::Es256);
    portal.register(&mut a, "alice").await;

    // Login: the same.
    let (first, _) = portal.login_options(Some("alice")).await;
    let (second, second_options) = portal.login_options(Some("alice")).await;
    let assertion = a.get(&second_options, ORIGIN).unwrap();
    portal
        .login_verify(&first, &assertion)
        .await
        .refused(401, "webauthn_invalid");
    // The right ceremony with a made-up challenge.
    let mut made_up = second_options.clone();
    made_up["challenge"] = json!(b64(&[0x55; 32]));
    let assertion = a.get(&made_up, ORIGIN).unwrap();
    portal
        .login_verify(&second, &assertion)
        .await
        .refused(401, "webauthn_invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_origin_or_rp_id_is_refused() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);

    // Registration from another origin (what a phishing page's browser would report).
    for origin in [
        "http://evil.example",
        "http://localhost:4311",
        "https://localhost:4310",
        "http://localhost:4310/",
    ] {
        let (ceremony, options) = portal.register_options("alice").await;
        let cred = a.create(&options, origin).unwrap();
        let r = portal.register_verify(&ceremony, &cred, Auth::None).await;
        r.refused(400, "webauthn_invalid");
        assert!(
            !r.body["error"]["message"].as_str().unwrap().is_empty(),
            "{origin}"
        );
    }
    // Registration for another rp id.
    let (ceremony, mut options) = portal.register_options("alice").await;
    options["rp"]["id"] = json!("evil.example");
    let cred = a.create(&options, ORIGIN).unwrap();
    portal
        .register_verify(&ceremony, &cred, Auth::None)
        .await
        .refused(400, "webauthn_invalid");
    // None of these created alice.
    portal.assert_no_account("alice").await;

    let mut a = Authenticator::new(Alg::Es256);
    let alice = portal.register(&mut a, "alice").await;

    // Login from another origin.
    for origin in ["http://evil.example", "http://localhost:9999"] {
        let (ceremony, options) = portal.login_options(Some("alice")).await;
        let assertion = a.get(&options, origin).unwrap();
        portal
            .login_verify(&ceremony, &assertion)
            .await
            .refused(401, "webauthn_invalid");
    }
    // Login with authenticator data made for another rp id.
    a.rp_id_override = Some("evil.example".into());
    let r = portal.try_login(&mut a, Some("alice")).await;
    r.refused(401, "webauthn_invalid");
    a.rp_id_override = None;
    assert_eq!(portal.login(&mut a, Some("alice")).await.user, alice.user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_presence_and_verification_are_required() {
    let portal = Portal::start(&[]);

    // Registration without UV, without UP, without AT; backed up (BS, 0x10) without being
    // backup-eligible (BE).
    for flags in [
        FLAG_UP | FLAG_AT,
        FLAG_UV | FLAG_AT,
        FLAG_UP | FLAG_UV,
        FLAG_UP | FLAG_UV | FLAG_AT | 0x10,
    ] {
        let mut a = Authenticator::new(Alg::Es256);
        a.flags_override = Some(flags);
        let (ceremony, options) = portal.register_options("alice").await;
        let cred = a.create(&options, ORIGIN).unwrap();
        let r = portal.register_verify(&ceremony, &cred, Auth::None).await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (400, Some("webauthn_invalid")),
            "flags {flags:#04x}: {}",
            r.body
        );
    }

    let mut a = Authenticator::new(Alg::Es256);
    let alice = portal.register(&mut a, "alice").await;
    // Login without UV, without UP.
    for flags in [FLAG_UP, FLAG_UV, 0] {
        a.flags_override = Some(flags);
        let r = portal.try_login(&mut a, Some("alice")).await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (401, Some("webauthn_invalid")),
            "flags {flags:#04x}: {}",
            r.body
        );
    }
    a.flags_override = None;
    assert_eq!(portal.login(&mut a, Some("alice")).await.user, alice.user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_registrations_are_refused() {
    let portal = Portal::start(&[]);

    // An algorithm the portal does not support (ES384's label on the key).
    let mut a = Authenticator::new(Alg::Es256);
    a.cose_alg_override = Some(-35);
    let (ceremony, options) = portal.register_options("alice").await;
    let cred = a.create(&options, ORIGIN).unwrap();
    portal
        .register_verify(&ceremony, &cred, Auth::None)
        .await
        .refused(400, "webauthn_invalid");
    // An Ed25519 key labelled ES256.
    let mut a = Authenticator::new(Alg::EdDsa);
    a.cose_alg_override = Some(-7);
    let (ceremony, options) = portal.register_options("alice").await;
    let cred = a.create(&options, ORIGIN).unwrap();
    portal
        .register_verify(&ceremony, &cred, Auth::None)
        .await
        .refused(400, "webauthn_invalid");

    // The wrong clientData type.
    let mut a = Authenticator::new(Alg::Es256);
    a.client_data_type_override = Some("webauthn.get".into());
    let (ceremony, options) = portal.register_options("alice").await;
    let cred = a.create(&options, ORIGIN).unwrap();
    portal
        .register_verify(&ceremony, &cred, Auth::None)
        .await
        .refused(400, "webauthn_invalid");

    // Not CBOR; CBOR of the wrong shape; authData cut short; clientData not JSON.
    let a = &mut Authenticator::new(Alg::Es256);
    type Mangle = fn(&mut Vec<u8>);
    let garbage: [(&str, Mangle); 4] = [
        ("attestationObject", |b| *b = vec![0xff, 0x00, 0x13]),
        ("attestationObject", |b| {
            *b = authenticator::cbor(&ciborium::Value::Integer(7.into()))
        }),
        ("attestationObject", |b| b.truncate(b.len() - 20)),
        ("clientDataJSON", |b| b.truncate(b.len() / 2)),
    ];
    for (member, f) in garbage {
        let (ceremony, options) = portal.register_options("alice").await;
        let cred = tamper(&a.create(&options, ORIGIN).unwrap(), member, f);
        portal
            .register_verify(&ceremony, &cred, Auth::None)
            .await
            .refused(400, "webauthn_invalid");
    }

    // A cross-origin ceremony (an iframe on another site), or a clientData challenge that is
    // not the ceremony's (registration's clientData is not signed: the server must read it).
    let a = &mut Authenticator::new(Alg::Es256);
    for (from, to) in [
        ("\"crossOrigin\":false", "\"crossOrigin\":true"),
        ("\"challenge\":\"", "\"challenge\":\"AAAA"),
    ] {
        let (ceremony, options) = portal.register_options("alice").await;
        let cred = tamper(
            &a.create(&options, ORIGIN).unwrap(),
            "clientDataJSON",
            |c| {
                let text = String::from_utf8(c.clone()).unwrap();
                assert!(text.contains(from), "{text}");
                *c = text.replacen(from, to, 1).into_bytes();
            },
        );
        portal
            .register_verify(&ceremony, &cred, Auth::None)
            .await
            .refused(400, "webauthn_invalid");
    }

    // Login: the wrong clientData type (signed as such).
    let mut a = Authenticator::new(Alg::Es256);
    portal.register(&mut a, "alice").await;
    a.client_data_type_override = Some("webauthn.create".into());
    portal
        .try_login(&mut a, Some("alice"))
        .await
        .refused(401, "webauthn_invalid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloned_authenticator_is_caught_by_its_counter() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);
    let alice = portal.register(&mut a, "alice").await;
    let id = a.credential_ids()[0].clone();
    portal.login(&mut a, Some("alice")).await; // counter 1
    portal.login(&mut a, Some("alice")).await; // counter 2
    assert_eq!(a.counter(&id), 2);

    // The clone reports 1, then 2 (equal to the stored one): both refused.
    for stale in [0, 1] {
        a.set_counter(&id, stale);
        portal
            .try_login(&mut a, Some("alice"))
            .await
            .refused(401, "counter_regressed");
    }
    // A refused login does not move the stored counter.
    let me = portal.whoami(&alice.token).await;
    assert_eq!(me["passkeys"][0]["sign_count"], 2);
    // Ahead of the stored counter: accepted.
    a.set_counter(&id, 10);
    let s = portal.login(&mut a, None).await;
    assert_eq!(s.user, alice.user);
    let me = portal.whoami(&alice.token).await;
    assert_eq!(me["passkeys"][0]["sign_count"], 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_that_stays_at_zero_is_accepted() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::EdDsa);
    a.counter_step = 0;
    let alice = portal.register(&mut a, "alice").await;
    for _ in 0..2 {
        assert_eq!(portal.login(&mut a, Some("alice")).await.user, alice.user);
    }
    assert_eq!(portal.login(&mut a, None).await.user, alice.user);
    let me = portal.whoami(&alice.token).await;
    assert_eq!(me["passkeys"][0]["sign_count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_names_are_checked_and_unique() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);
    portal.register(&mut a, "alice").await;
    portal
        .post(
            "/auth/register/options",
            &json!({"username": "alice", "display_name": "Another Alice"}),
            Auth::None,
        )
        .await
        .refused(409, "username_taken");

    let long = "x".repeat(65);
    for bad in [
        "", "Alice", "a b", "bob!", "ünï", "a/b", " alice", "alice\n", &long,
    ] {
        let r = portal
            .post(
                "/auth/register/options",
                &json!({"username": bad, "display_name": "X"}),
                Auth::None,
            )
            .await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (400, Some("invalid_username")),
            "{bad:?}: {}",
            r.body
        );
    }
    let longest = "x".repeat(64);
    for good in ["a", "a.b_c-9", "0", &longest] {
        let (ceremony, options) = portal.register_options(good).await;
        assert!(!ceremony.is_empty());
        assert_eq!(options["user"]["name"], good);
    }

    // Two ceremonies for the same free name: the first to finish gets it.
    let (c1, o1) = portal.register_options("carol").await;
    let (c2, o2) = portal.register_options("carol").await;
    let mut k1 = Authenticator::new(Alg::Es256);
    let mut k2 = Authenticator::new(Alg::Es256);
    let cred1 = k1.create(&o1, ORIGIN).unwrap();
    let cred2 = k2.create(&o2, ORIGIN).unwrap();
    signed_in(&portal.register_verify(&c1, &cred1, Auth::None).await, 201);
    portal
        .register_verify(&c2, &cred2, Auth::None)
        .await
        .refused(409, "username_taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_passkey_added_while_signed_in_signs_in_too() {
    let portal = Portal::start(&[]);
    let mut laptop = Authenticator::new(Alg::Es256);
    let mut phone = Authenticator::new(Alg::EdDsa);
    let alice = portal.register(&mut laptop, "alice").await;

    // Without a session and without a user name there is nothing to add to.
    let r = portal
        .post("/auth/register/options", &json!({}), Auth::None)
        .await;
    assert!(
        matches!(r.status, 400 | 401) && r.body["error"]["code"].is_string(),
        "{} {}",
        r.status,
        r.body
    );

    let (ceremony, options) = portal.add_passkey_options(&alice.token).await;
    assert_eq!(options["user"]["id"], alice.user["id"]);
    assert_eq!(options["user"]["name"], "alice");
    assert_eq!(
        listed(&options, "excludeCredentials"),
        laptop.credential_ids()
    );
    // The laptop already holds one: the browser refuses to make another.
    assert!(laptop.create(&options, ORIGIN).is_err());

    let cred = phone.create(&options, ORIGIN).unwrap();
    let r = portal
        .register_verify(&ceremony, &cred, Auth::Cookie(&alice.token))
        .await;
    let added = signed_in(&r, 201);
    assert_eq!(added.user, alice.user);

    let me = portal.whoami(&alice.token).await;
    let passkeys = me["passkeys"].as_array().unwrap();
    assert_eq!(passkeys.len(), 2, "{me}");
    let mut algs: Vec<i64> = passkeys
        .iter()
        .map(|p| p["alg"].as_i64().unwrap())
        .collect();
    algs.sort_unstable();
    assert_eq!(algs, vec![-8, -7]);

    // Both sign in, by user name (both listed) and discoverably.
    let (_, options) = portal.login_options(Some("alice")).await;
    let mut allowed = listed(&options, "allowCredentials");
    allowed.sort();
    let mut both = vec![
        laptop.credential_ids()[0].clone(),
        phone.credential_ids()[0].clone(),
    ];
    both.sort();
    assert_eq!(allowed, both);
    for key in [&mut laptop, &mut phone] {
        assert_eq!(portal.login(key, Some("alice")).await.user, alice.user);
        assert_eq!(portal.login(key, None).await.user, alice.user);
    }

    // Adding a passkey after logging out: not possible with the dead session.
    portal
        .send(
            Method::POST,
            "/auth/logout",
            None,
            Auth::Cookie(&alice.token),
            &[],
        )
        .await;
    let r = portal
        .post(
            "/auth/register/options",
            &json!({}),
            Auth::Cookie(&alice.token),
        )
        .await;
    assert!(matches!(r.status, 400 | 401), "{} {}", r.status, r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_credential_cannot_be_registered_twice() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);
    let alice = portal.register(&mut a, "alice").await;
    let id = a.credential_ids()[0].clone();

    // The same credential id for a new account.
    let (ceremony, options) = portal.register_options("carol").await;
    let cred = a.create_existing(&options, ORIGIN, &id).unwrap();
    assert_eq!(cred_id(&cred), id);
    portal
        .register_verify(&ceremony, &cred, Auth::None)
        .await
        .refused(409, "credential_exists");
    // No half-made account is left behind, and the name is still free.
    portal.assert_no_account("carol").await;
    portal.register_options("carol").await;

    // The same credential again for alice herself, ignoring excludeCredentials.
    let r = portal
        .post(
            "/auth/register/options",
            &json!({}),
            Auth::Cookie(&alice.token),
        )
        .await;
    let b = r.ok(200);
    let ceremony = b["ceremony"].as_str().unwrap().to_string();
    let mut options = b["publicKey"].clone();
    options
        .as_object_mut()
        .unwrap()
        .remove("excludeCredentials");
    let cred = a.create_existing(&options, ORIGIN, &id).unwrap();
    portal
        .register_verify(&ceremony, &cred, Auth::Cookie(&alice.token))
        .await
        .refused(409, "credential_exists");

    let me = portal.whoami(&alice.token).await;
    assert_eq!(me["passkeys"].as_array().unwrap().len(), 1, "{me}");
    assert_eq!(portal.login(&mut a, Some("alice")).await.user, alice.user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_passkeys_survive_a_kill_9() {
    let mut portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);
    let alice = portal.register(&mut a, "alice").await;
    let login = portal.login(&mut a, Some("alice")).await;
    let ended = portal.login(&mut a, None).await;
    let r = portal
        .send(
            Method::POST,
            "/auth/logout",
            None,
            Auth::Bearer(&ended.token),
            &[],
        )
        .await;
    assert_eq!(r.status, 204);

    portal.kill9_and_restart();

    for token in [&alice.token, &login.token] {
        let me = portal.me(Auth::Cookie(token)).await;
        assert_eq!(me.ok(200)["user"], alice.user);
    }
    portal
        .me(Auth::Bearer(&ended.token))
        .await
        .refused(401, "not_signed_in");
    let me = portal.whoami(&alice.token).await;
    assert_eq!(me["passkeys"][0]["sign_count"], 2);

    // The passkey still signs in, and the counter is still enforced.
    assert_eq!(portal.login(&mut a, Some("alice")).await.user, alice.user);
    let id = a.credential_ids()[0].clone();
    a.set_counter(&id, 1);
    portal
        .try_login(&mut a, None)
        .await
        .refused(401, "counter_regressed");
    // And the name is still taken.
    portal
        .post(
            "/auth/register/options",
            &json!({"username": "alice", "display_name": "A"}),
            Auth::None,
        )
        .await
        .refused(409, "username_taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_posts_are_refused() {
    let portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);
    let alice = portal.register(&mut a, "alice").await;
    let body = json!({"username": "bob", "display_name": "Bob"});

    for origin in ["http://evil.example", "null", "http://localhost:4311"] {
        let r = portal
            .send(
                Method::POST,
                "/auth/register/options",
                Some(&body),
                Auth::None,
                &[("origin", origin)],
            )
            .await;
        r.refused(403, "origin_not_allowed");
        // Logging a user out from another site is refused too, and the session lives on.
        let r = portal
            .send(
                Method::POST,
                "/auth/logout",
                None,
                Auth::Cookie(&alice.token),
                &[("origin", origin)],
            )
            .await;
        r.refused(403, "origin_not_allowed");
        portal.whoami(&alice.token).await;
    }
    // A login verify from another site with a valid assertion: refused, no session.
    let (ceremony, options) = portal.login_options(Some("alice")).await;
    let assertion = a.get(&options, ORIGIN).unwrap();
    portal
        .send(
            Method::POST,
            "/auth/login/verify",
            Some(&json!({"ceremony": ceremony, "credential": assertion})),
            Auth::None,
            &[("origin", "http://evil.example")],
        )
        .await
        .refused(403, "origin_not_allowed");

    // The allowed origin, or none at all, is fine.
    let r = portal
        .send(
            Method::POST,
            "/auth/register/options",
            Some(&body),
            Auth::None,
            &[("origin", ORIGIN)],
        )
        .await;
    r.ok(200);
    let r = portal
        .send(
            Method::POST,
            "/auth/register/options",
            Some(&body),
            Auth::None,
            &[],
        )
        .await;
    r.ok(200);

    // JSON sent as text/plain (what another site can send without CORS preflight): refused.
    let r = portal
        .http
        .post(format!("{}/auth/register/options", portal.url))
        .header("content-type", "text/plain")
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(status, 415, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_it_cleanly() {
    let mut portal = Portal::start(&[]);
    let mut a = Authenticator::new(Alg::Es256);
    let alice = portal.register(&mut a, "alice").await;
    assert_eq!(portal.terminate(), Some(0));
    // And it comes back with the session.
    portal.child = spawn(portal.dir.path(), &portal.args);
    portal.url = wait_listening(portal.dir.path(), &mut portal.child);
    assert_eq!(portal.whoami(&alice.token).await["user"], alice.user);
    assert_eq!(portal.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passkey_is_added_only_while_its_account_is_signed_in() {
    let portal = Portal::start(&[]);
    let mut laptop = Authenticator::new(Alg::Es256);
    let mut phone = Authenticator::new(Alg::EdDsa);
    let alice = portal.register(&mut laptop, "alice").await;
    let (ceremony, options) = portal.add_passkey_options(&alice.token).await;
    let cred = phone.create(&options, ORIGIN).unwrap();
    // Signed out between the options and the answer: the passkey is not added.
    portal.logout(&alice.token).await;
    portal
        .register_verify(&ceremony, &cred, Auth::Cookie(&alice.token))
        .await
        .refused(401, "not_signed_in");
    let again = portal.login(&mut laptop, Some("alice")).await;
    let me = portal.whoami(&again.token).await;
    assert_eq!(me["passkeys"].as_array().unwrap().len(), 1, "{me}");
    // Nor with another account's session.
    let mut bobs = Authenticator::new(Alg::Es256);
    let bob = portal.register(&mut bobs, "bob").await;
    let (ceremony, options) = portal.add_passkey_options(&again.token).await;
    let cred = phone.create(&options, ORIGIN).unwrap();
    portal
        .register_verify(&ceremony, &cred, Auth::Cookie(&bob.token))
        .await
        .refused(401, "not_signed_in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_fill_the_ceremony_table() {
    let portal = Portal::start(&[]);
    for i in 0..32 {
        let r = portal
            .post("/auth/login/options", &json!({}), Auth::None)
            .await;
        assert_eq!(r.status, 200, "ceremony {i}: {}", r.body);
    }
    let r = portal
        .post("/auth/login/options", &json!({}), Auth::None)
        .await;
    r.refused(429, "too_many_ceremonies");
    portal
        .post(
            "/auth/register/options",
            &json!({"username": "alice"}),
            Auth::None,
        )
        .await
        .refused(429, "too_many_ceremonies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_portal_sets_a_host_only_secure_cookie() {
    const SITE: &str = "https://portal.test";
    let portal = Portal::start(&[
        "portal.rp_id=portal.test",
        "portal.origins=[\"https://portal.test\"]",
    ]);
    let mut a = Authenticator::new(Alg::Es256);
    let (ceremony, options) = portal.register_options("alice").await;
    assert_eq!(options["rp"]["id"], "portal.test");
    let cred = a.create(&options, SITE).unwrap();
    let r = portal.register_verify(&ceremony, &cred, Auth::None).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let cookie = r
        .cookies
        .iter()
        .find(|c| c.starts_with("__Host-edgecoder_portal_session="))
        .unwrap_or_else(|| panic!("{:?}", r.cookies));
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Secure"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(!cookie.contains("Domain"), "{cookie}");
    let token = r.body["session"].as_str().unwrap();
    // The __Host- cookie is the session; the plain name is not read on an https portal.
    let me = portal
        .send(
            Method::GET,
            "/me",
            None,
            Auth::None,
            &[(
                "cookie",
                &format!("__Host-edgecoder_portal_session={token}"),
            )],
        )
        .await;
    assert_eq!(me.status, 200, "{}", me.body);
    portal
        .send(Method::GET, "/me", None, Auth::Cookie(token), &[])
        .await
        .refused(401, "not_signed_in");
}
