//! Request signing against a real node: each attack gets its own error code, and a flood from
//! one key does not stop another.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use edgecoder::client::CoordinatorClient;
use edgecoder::clock::{now_ms, random_bytes};
use edgecoder::identity::Identity;
use edgecoder::security::httpsig::{self, Params, RequestParts};

/// A request signed by hand, so each field can be bent.
struct Crafted {
    method: reqwest::Method,
    url: String,
    headers: httpsig::SignatureHeaders,
    body: Vec<u8>,
}

fn craft(
    signer: &Identity,
    claimed: &Identity,
    method: &str,
    url: &str,
    body: &[u8],
    created: u64,
    expires: u64,
) -> Crafted {
    let u = reqwest::Url::parse(url).unwrap();
    let authority = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap());
    let headers = httpsig::sign(
        signer.signing_key(),
        &RequestParts {
            method,
            authority: &authority,
            path: u.path(),
            query: u.query(),
        },
        body,
        &Params {
            created,
            expires,
            nonce: random_bytes::<16>(),
            keyid: claimed.key_id(),
        },
    );
    Crafted {
        method: method.parse().unwrap(),
        url: url.to_string(),
        headers,
        body: body.to_vec(),
    }
}

impl Crafted {
    async fn send_to(&self, url: &str, body: &[u8]) -> (u16, String, Option<String>) {
        let resp = edgecoder::http::client_builder()
            .build()
            .unwrap()
            .request(self.method.clone(), url)
            .header("content-digest", &self.headers.content_digest)
            .header("signature-input", &self.headers.signature_input)
            .header("signature", &self.headers.signature)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let text = resp.text().await.unwrap();
        let code = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or(text);
        (status, code, retry)
    }

    async fn send(&self) -> (u16, String) {
        let (s, c, _) = self.send_to(&self.url, &self.body).await;
        (s, c)
    }
}

const PROBE: &[u8] = br#"{"kind":"probe","payload":{"echo":"sec"}}"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_is_rejected_with_its_own_code_and_replays_stay_rejected_after_restart() {
    let port = free_port().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start_in(tmp.path(), &["--coordinator-port", &port]);
    let me = Identity::load(&node.dir.join("identity.key")).unwrap();
    let base = node.coordinator();
    let tasks = format!("{base}/tasks");
    let now = now_ms() / 1000;

    // A good request works once...
    let good = craft(&me, &me, "POST", &tasks, PROBE, now, now + 30);
    assert_eq!(good.send().await.0, 201);
    // ...and never again.
    assert_eq!(good.send().await, (401, "replayed".into()));

    // Tampered body: the signature is fine, the digest is not.
    let t = craft(&me, &me, "POST", &tasks, PROBE, now, now + 30);
    let (s, code, _) = t
        .send_to(&tasks, br#"{"kind":"probe","payload":{"echo":"evil"}}"#)
        .await;
    assert_eq!((s, code.as_str()), (401, "digest_mismatch"));

    // Tampered path or query: the signature base differs.
    let t = craft(&me, &me, "POST", &tasks, PROBE, now, now + 30);
    let (s, code, _) = t.send_to(&format!("{base}/agents/register"), PROBE).await;
    assert_eq!((s, code.as_str()), (401, "bad_signature"));
    let t = craft(&me, &me, "GET", &tasks, b"", now, now + 30);
    let (s, code, _) = t.send_to(&format!("{tasks}?state=queued"), b"").await;
    assert_eq!((s, code.as_str()), (401, "bad_signature"));

    // Expired, and from the future.
    let old = craft(&me, &me, "POST", &tasks, PROBE, now - 600, now - 560);
    assert_eq!(old.send().await, (401, "signature_expired".into()));
    let future = craft(&me, &me, "POST", &tasks, PROBE, now + 600, now + 630);
    assert_eq!(future.send().await, (401, "signature_not_yet_valid".into()));
    let long = craft(&me, &me, "POST", &tasks, PROBE, now, now + 3600);
    assert_eq!(long.send().await, (401, "signature_window_too_long".into()));

    // A key the node does not know.
    let stranger = Identity::generate();
    let t = craft(&stranger, &stranger, "POST", &tasks, PROBE, now, now + 30);
    assert_eq!(t.send().await, (403, "unknown_key".into()));

    // Forged: claims the node's key, signed with another.
    let forged = craft(&stranger, &me, "POST", &tasks, PROBE, now, now + 30);
    assert_eq!(forged.send().await, (401, "bad_signature".into()));

    // Unsigned.
    let resp = edgecoder::http::client_builder()
        .build()
        .unwrap()
        .post(&tasks)
        .header("content-type", "application/json")
        .body(PROBE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.text().await.unwrap().contains("\"unsigned\""));

    // Counters show each rejection.
    let metrics = get(&format!("{base}/metrics")).unwrap().1;
    for code in [
        "replayed",
        "digest_mismatch",
        "bad_signature",
        "signature_expired",
        "signature_not_yet_valid",
        "signature_window_too_long",
        "unknown_key",
        "unsigned",
    ] {
        assert!(
            metrics.contains(&format!(
                "edgecoder_coordinator_auth_rejected_total{{code=\"{code}\"}}"
            )),
            "no counter for {code}: {metrics}"
        );
    }

    // Restart on the same address: the replay cache survived.
    let prepared = craft(&me, &me, "POST", &tasks, PROBE, now, now + 30);
    assert_eq!(prepared.send().await.0, 201);
    assert_eq!(node.terminate(), Some(0));
    node.restart();
    assert_eq!(node.coordinator(), base);
    assert_eq!(prepared.send().await, (401, "replayed".into()));
    assert_eq!(good.send().await, (401, "replayed".into()));
    // A fresh request from the same key is fine.
    let fresh = craft(
        &me,
        &me,
        "POST",
        &tasks,
        PROBE,
        now_ms() / 1000,
        now_ms() / 1000 + 30,
    );
    assert_eq!(fresh.send().await.0, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_key_is_throttled_while_another_key_works() {
    let flooder = Identity::generate();
    let keys = format!("coordinator.client_keys=[\"{}\"]", flooder.key_id());
    let node = Node::start(&[
        "--set",
        &keys,
        "--set",
        "security.per_key_rate=2",
        "--set",
        "security.per_key_burst=5",
    ]);
    let flood = CoordinatorClient::new(&node.coordinator(), Arc::new(flooder)).unwrap();
    let mut limited = 0;
    let mut retry_after = None;
    for _ in 0..30 {
        match flood.get::<serde_json::Value>("/tasks").await {
            Ok(_) => {}
            Err(edgecoder::client::ClientError::Api {
                status,
                code,
                retry_after: ra,
                ..
            }) => {
                assert_eq!(status.as_u16(), 429);
                assert_eq!(code, "rate_limited");
                limited += 1;
                retry_after = ra;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(limited >= 20, "only {limited} of 30 throttled");
    assert!(retry_after.is_some_and(|d| d >= Duration::from_secs(1)));
    // The node's own key has its own bucket (same limit): while the flooder is throttled, it
    // still gets its full burst of five requests through.
    let c = node.client();
    for _ in 0..3 {
        c.get::<serde_json::Value>("/tasks").await.unwrap();
    }
    let id = submit_probe(&c, serde_json::json!({})).await;
    assert_eq!(
        wait_result(&c, id).await.state,
        edgecoder::coordinator::model::TaskState::Succeeded
    );
    // A client key sees only its own tasks (after its bucket refills).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let theirs: serde_json::Value = flood.get("/tasks").await.unwrap();
    assert_eq!(
        theirs["tasks"].as_array().unwrap().len(),
        0,
        "client keys see only their own tasks"
    );
    let mine: serde_json::Value = c.get("/tasks").await.unwrap();
    assert_eq!(mine["tasks"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_address_is_throttled_before_authentication() {
    let node = Node::start(&[
        "--set",
        "security.per_ip_rate=5",
        "--set",
        "security.per_ip_burst=10",
    ]);
    let client = edgecoder::http::client_builder().build().unwrap();
    let mut codes = Vec::new();
    for _ in 0..40 {
        let r = client
            .get(format!("{}/health", node.url("ide")))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
    }
    assert!(
        codes.iter().filter(|c| **c == 429).count() >= 25,
        "{codes:?}"
    );
}
