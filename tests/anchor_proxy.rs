//! The anchor proxy as a real process (`edgecoder anchor-proxy`) in front of a double of Bitcoin
//! Core's JSON-RPC interface (tests/common/bitcoind.rs: real transactions, real signatures,
//! bitcoind's wire format; not bitcoind). Coordinators are played by signed clients.
#![allow(clippy::unwrap_used)]

mod common;
// Only the tests that need it compile the double (not every test binary through common/).
#[path = "common/bitcoind.rs"]
mod bitcoind;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::hex::DisplayHex;
use bitcoind::{BitcoindDouble, Fault};
use edgecoder::anchor_proxy::anchors::{AnchorState, AnchorView};
use edgecoder::anchor_proxy::{AnchorRequest, info_file};
use edgecoder::client::{ClientError, CoordinatorClient};
use edgecoder::identity::Identity;
use edgecoder::standalone::ServiceInfo;

const USER: &str = "anchor";
const PASSWORD: &str = "correct horse";
const WALLET: &str = "anchors";

/// An anchor proxy process and the coordinator key it trusts.
struct Proxy {
    dir: tempfile::TempDir,
    child: Child,
    url: String,
    args: Vec<String>,
    key: PathBuf,
}

fn proxy_args(dir: &Path, rpc_url: &str, key: &Identity, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "anchor-proxy".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--host".into(),
        "127.0.0.1".into(),
    ];
    for kv in [
        "anchor_proxy.port=0".to_string(),
        format!("anchor_proxy.rpc_url={rpc_url}"),
        format!("anchor_proxy.rpc_user={USER}"),
        format!("anchor_proxy.rpc_password={PASSWORD}"),
        format!("anchor_proxy.wallet={WALLET}"),
        "anchor_proxy.network=regtest".into(),
        format!("anchor_proxy.client_keys=[\"{}\"]", key.key_id()),
    ] {
        a.push("--set".into());
        a.push(kv);
    }
    for e in extra {
        a.push("--set".into());
        a.push((*e).into());
    }
    a
}

fn spawn(dir: &Path, args: &[String]) -> Child {
    common::spawn_service(dir, args, &[])
}

fn wait_listening(dir: &Path, child: &mut Child) -> String {
    common::wait_service(dir, &info_file(dir), child)
}

impl Proxy {
    fn start(double: &BitcoindDouble, extra: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("coordinator.key");
        let (id, _) = Identity::load_or_create(&key).unwrap();
        let args = proxy_args(dir.path(), &double.url, &id, extra);
        let mut child = spawn(dir.path(), &args);
        let url = wait_listening(dir.path(), &mut child);
        Proxy {
            dir,
            child,
            url,
            args,
            key,
        }
    }

    fn client(&self) -> CoordinatorClient {
        let (id, _) = Identity::load_or_create(&self.key).unwrap();
        CoordinatorClient::new(&self.url, Arc::new(id)).unwrap()
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
            assert!(start.elapsed() < Duration::from_secs(30), "no exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http() -> reqwest::Client {
    edgecoder::http::client_builder().build().unwrap()
}

async fn anchor(c: &CoordinatorClient, data: &[u8]) -> Result<AnchorView, ClientError> {
    c.post(
        "/anchors",
        &AnchorRequest {
            data: data.to_lower_hex_string(),
        },
    )
    .await
}

/// Status and code of a refused request.
fn refusal(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, code, .. } => (status.as_u16(), code),
        other => panic!("expected an API error, got {other}"),
    }
}

/// The transactions in the double's mempool that carry `data`.
fn carrying(double: &BitcoindDouble, data: &[u8]) -> Vec<bitcoin::Transaction> {
    let script = edgecoder::anchor_proxy::anchors::data_script(data).unwrap();
    double
        .mempool()
        .into_iter()
        .chain(double.confirmed())
        .filter(|t| t.output.iter().any(|o| o.script_pubkey == script))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anchors_data_once_and_reports_its_confirmations() {
    let double = BitcoindDouble::start(USER, PASSWORD, WALLET).await;
    let proxy = Proxy::start(&double, &[]);
    let c = proxy.client();
    let data = *b"checkpoint 0001 :: 32 bytes long";

    let v = anchor(&c, &data).await.unwrap();
    assert_eq!(v.state, AnchorState::Broadcast);
    assert_eq!(v.data, data.to_lower_hex_string());
    let txs = carrying(&double, &data);
    assert_eq!(txs.len(), 1, "exactly one transaction carries the data");
    assert_eq!(txs[0].compute_txid().to_string(), v.txid);
    assert_eq!(double.accepted(), 1);
    assert!(v.fee_sats > 0 && v.fee_sats <= 20_000, "{}", v.fee_sats);

    // The same data again: the same anchor, no second transaction, no second funding.
    let again = anchor(&c, &data).await.unwrap();
    assert_eq!(again.txid, v.txid);
    assert_eq!(double.accepted(), 1);
    assert_eq!(double.calls("fundrawtransaction"), 1);

    let seen: AnchorView = c
        .get(&format!("/anchors/{}", data.to_lower_hex_string()))
        .await
        .unwrap();
    assert_eq!(seen.confirmations, Some(0));
    double.mine(1);
    let seen: AnchorView = c
        .get(&format!("/anchors/{}", data.to_lower_hex_string()))
        .await
        .unwrap();
    assert_eq!(seen.confirmations, Some(1));
    assert!(seen.block_hash.is_some() && seen.block_height.is_some());

    // A second anchor spends the wallet's change: a chain of anchors keeps working.
    let second = [7u8; 32];
    let v2 = anchor(&c, &second).await.unwrap();
    assert_ne!(v2.txid, v.txid);
    assert_eq!(double.accepted(), 2);

    // The command line shows the same anchor.
    let out = common::cli([
        "anchor",
        "get",
        &data.to_lower_hex_string(),
        "--proxy",
        &proxy.url,
        "--key",
        proxy.key.to_str().unwrap(),
        "--json",
    ]);
    let shown: AnchorView = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown.txid, v.txid);
    assert_eq!(shown.confirmations, Some(1));
    let out = common::cli([
        "anchor",
        "submit",
        &[9u8; 32].to_lower_hex_string(),
        "--proxy",
        &proxy.url,
        "--key",
        proxy.key.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("txid "));
    assert_eq!(double.accepted(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_unsigned_unknown_and_malformed_requests() {
    let double = BitcoindDouble::start(USER, PASSWORD, WALLET).await;
    let proxy = Proxy::start(&double, &[]);

    let plain = http()
        .post(format!("{}/anchors", proxy.url))
        .json(&serde_json::json!({"data": "00"}))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 401);

    let stranger_key = proxy.dir.path().join("stranger.key");
    let (stranger, _) = Identity::load_or_create(&stranger_key).unwrap();
    let stranger = CoordinatorClient::new(&proxy.url, Arc::new(stranger)).unwrap();
    let (status, _) = refusal(anchor(&stranger, &[1; 32]).await.unwrap_err());
    assert_eq!(status, 403);

    let c = proxy.client();
    assert_eq!(
        refusal(anchor(&c, &[1; 81]).await.unwrap_err()),
        (400, "data_too_large".into())
    );
    let bad: Result<AnchorView, _> = c
        .post("/anchors", &AnchorRequest { data: "zz".into() })
        .await;
    assert_eq!(refusal(bad.unwrap_err()), (400, "invalid_data".into()));
    let raw: Result<serde_json::Value, _> = c
        .post("/anchors", &serde_json::json!({"data": "00", "extra": 1}))
        .await;
    assert_eq!(refusal(raw.unwrap_err()).0, 400);
    let missing: Result<AnchorView, _> = c.get(&format!("/anchors/{}", "ab".repeat(32))).await;
    assert_eq!(
        refusal(missing.unwrap_err()),
        (404, "anchor_not_found".into())
    );
    // Nothing reached the wallet.
    assert_eq!(double.calls("createrawtransaction"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_nothing_the_wallet_built_wrong() {
    let double = BitcoindDouble::start(USER, PASSWORD, WALLET).await;
    let proxy = Proxy::start(&double, &["anchor_proxy.max_fee=20000"]);
    let c = proxy.client();

    for (fault, code) in [
        (Fault::ForeignOutput, "wallet_tx_refused"),
        (Fault::TamperOnSign, "wallet_tx_refused"),
        (Fault::Fee(50_000), "fee_too_high"),
    ] {
        double.set_fault(Some(fault.clone()));
        let (status, got) = refusal(anchor(&c, &[3; 32]).await.unwrap_err());
        assert_eq!(got, code, "{fault:?}");
        assert!(status == 502 || status == 503, "{fault:?}: {status}");
        assert_eq!(double.calls("sendrawtransaction"), 0, "{fault:?}");
        assert!(double.mempool().is_empty());
    }
    // Nothing was recorded for the refused attempts: with an honest wallet the anchor is made.
    double.set_fault(None);
    let v = anchor(&c, &[3; 32]).await.unwrap();
    assert_eq!(v.state, AnchorState::Broadcast);
    assert_eq!(double.accepted(), 1);

    // An overloaded bitcoind is reported as such.
    double.set_fault(Some(Fault::Busy));
    let (status, code) = refusal(anchor(&c, &[4; 32]).await.unwrap_err());
    assert_eq!((status, code.as_str()), (502, "bitcoind_unavailable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broadcast_is_completed_with_the_same_transaction_after_a_crash() {
    let double = BitcoindDouble::start(USER, PASSWORD, WALLET).await;
    let mut proxy = Proxy::start(&double, &[]);
    let c = proxy.client();

    // bitcoind takes the transaction but the answer never arrives.
    double.set_fault(Some(Fault::DropAfterSend));
    let (status, code) = refusal(anchor(&c, &[5; 32]).await.unwrap_err());
    assert_eq!((status, code.as_str()), (502, "bitcoind_unavailable"));
    let in_pool = carrying(&double, &[5; 32]);
    assert_eq!(in_pool.len(), 1);

    // kill -9, restart: the stored transaction is sent again, not a new one.
    proxy.kill9_and_restart();
    let c = proxy.client();
    let v = anchor(&c, &[5; 32]).await.unwrap();
    assert_eq!(v.txid, in_pool[0].compute_txid().to_string());
    assert_eq!(v.state, AnchorState::Broadcast);
    assert_eq!(double.accepted(), 1);
    assert_eq!(double.calls("fundrawtransaction"), 1);

    // Dropped before bitcoind took it: the retry broadcasts that same signed transaction.
    double.set_fault(Some(Fault::DropBeforeSend));
    refusal(anchor(&c, &[6; 32]).await.unwrap_err());
    assert!(carrying(&double, &[6; 32]).is_empty());
    let v = anchor(&c, &[6; 32]).await.unwrap();
    let txs = carrying(&double, &[6; 32]);
    assert_eq!(txs.len(), 1);
    assert_eq!(txs[0].compute_txid().to_string(), v.txid);
    assert_eq!(double.calls("fundrawtransaction"), 2);

    // Once confirmed, a retry still answers with the anchor (bitcoind says "already in chain").
    double.mine(1);
    let v2 = anchor(&c, &[6; 32]).await.unwrap();
    assert_eq!(v2.txid, v.txid);

    assert_eq!(proxy.terminate(), Some(0));
    assert!(
        ServiceInfo::read(&info_file(proxy.dir.path())).is_err(),
        "anchor-proxy.json is removed at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_anchors_per_hour_across_restarts() {
    let double = BitcoindDouble::start(USER, PASSWORD, WALLET).await;
    let mut proxy = Proxy::start(&double, &["anchor_proxy.max_per_hour=2"]);
    let c = proxy.client();
    anchor(&c, &[1; 32]).await.unwrap();
    anchor(&c, &[2; 32]).await.unwrap();
    let err = anchor(&c, &[3; 32]).await.unwrap_err();
    let ClientError::Api {
        status,
        code,
        retry_after,
        ..
    } = err
    else {
        panic!("{err}")
    };
    assert_eq!((status.as_u16(), code.as_str()), (429, "rate_limited"));
    assert!(retry_after.is_some_and(|d| d > Duration::from_secs(3000)));
    // Existing anchors are still answered.
    anchor(&c, &[1; 32]).await.unwrap();
    // The count survives a restart.
    proxy.kill9_and_restart();
    let c = proxy.client();
    assert_eq!(refusal(anchor(&c, &[3; 32]).await.unwrap_err()).0, 429);
    assert_eq!(double.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_names_what_is_wrong_and_bad_settings_stop_the_start() {
    let double = BitcoindDouble::start(USER, PASSWORD, WALLET).await;
    let proxy = Proxy::start(&double, &[]);
    let h = http()
        .get(format!("{}/health", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    let h: serde_json::Value = h.json().await.unwrap();
    assert_eq!(h["chain"], "regtest");
    assert_eq!(h["wallet"], WALLET);
    assert!(h["blocks"].as_u64().is_some());
    let m = http()
        .get(format!("{}/metrics", proxy.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("edgecoder_anchor_proxy_auth"), "{m}");

    // Wrong password: the proxy starts (bitcoind might be reconfigured) but says why it fails.
    let wrong = Proxy::start(&double, &["anchor_proxy.rpc_password=wrong"]);
    let h = http()
        .get(format!("{}/health", wrong.url))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 503);
    let h: serde_json::Value = h.json().await.unwrap();
    assert!(
        h["problem"].as_str().unwrap().contains("credentials"),
        "{h}"
    );
    let (status, code) = refusal(anchor(&wrong.client(), &[1; 32]).await.unwrap_err());
    assert_eq!((status, code.as_str()), (502, "bitcoind_unavailable"));

    // bitcoind on another chain than configured: exit 78, saying so.
    double.set_chain("main");
    let dir = tempfile::tempdir().unwrap();
    let (id, _) = Identity::load_or_create(&dir.path().join("k")).unwrap();
    let out = Command::new(common::BIN)
        .args(proxy_args(dir.path(), &double.url, &id, &[]))
        .env_remove("EDGECODER_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"main\"") && err.contains("\"regtest\""),
        "{err}"
    );

    // No client keys: exit 78.
    let out = Command::new(common::BIN)
        .args([
            "anchor-proxy",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--set",
            "anchor_proxy.port=0",
        ])
        .env_remove("EDGECODER_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("client_keys"));

    // bitcoind gone: health says so.
    double.stop();
    let h = http()
        .get(format!("{}/health", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_it_is_ready_alive_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let double = BitcoindDouble::start(USER, PASSWORD, WALLET).await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (id, _) = Identity::load_or_create(&dir.path().join("k")).unwrap();
    let args = proxy_args(dir.path(), &double.url, &id, &[]);
    let mut child = common::spawn_service(
        dir.path(),
        &args,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let notifications = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !seen.iter().any(|m: &String| m == "WATCHDOG=1") {
            let n = sock.recv(&mut buf).expect("a notification");
            seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        (seen, sock)
    });
    let (seen, sock) = notifications.await.unwrap();
    assert_eq!(seen[0], "READY=1", "{seen:?}");
    wait_listening(dir.path(), &mut child);
    common::signal(child.id(), common::libc_sigterm());
    let stopping = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 256];
        loop {
            let n = sock.recv(&mut buf).expect("STOPPING=1 before exit");
            if &buf[..n] == b"STOPPING=1" {
                return;
            }
        }
    });
    stopping.await.unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// The stored transaction of an anchor, as `GET /anchors/{data}` shows it.
async fn stored_tx(c: &CoordinatorClient, data: &[u8]) -> bitcoin::Transaction {
    let v: AnchorView = c
        .get(&format!("/anchors/{}", data.to_lower_hex_string()))
        .await
        .unwrap();
    bitcoin::consensus::encode::deserialize_hex(&v.tx).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transaction_is_kept_while_it_could_still_confirm() {
    let double = BitcoindDouble::start(USER, PASSWORD, WALLET).await;
    let proxy = Proxy::start(&double, &[]);
    let c = proxy.client();

    // A temporary refusal (full mempool): the signed transaction is kept, not rebuilt.
    double.set_fault(Some(Fault::RejectSendOnce(
        -26,
        "mempool min fee not met, 141 < 1410".into(),
    )));
    let err = anchor(&c, &[8; 32]).await.unwrap_err();
    assert_eq!(refusal(err), (503, "broadcast_deferred".into()));
    let kept = stored_tx(&c, &[8; 32]).await;
    assert_eq!(double.accepted(), 0);
    let v = anchor(&c, &[8; 32]).await.unwrap();
    assert_eq!(v.txid, kept.compute_txid().to_string());
    assert_eq!(double.accepted(), 1);
    assert_eq!(double.calls("fundrawtransaction"), 1, "never funded twice");

    // Its coin spent by someone else before it got out: it can never confirm, so it is
    // forgotten and the next request builds a new one.
    double.set_fault(Some(Fault::DropBeforeSend));
    refusal(anchor(&c, &[9; 32]).await.unwrap_err());
    let doomed = stored_tx(&c, &[9; 32]).await;
    double.spend_elsewhere(doomed.input[0].previous_output);
    let (status, code) = refusal(anchor(&c, &[9; 32]).await.unwrap_err());
    assert_eq!((status, code.as_str()), (502, "broadcast_rejected"));
    assert!(double.calls("gettxout") >= 1);
    let v = anchor(&c, &[9; 32]).await.unwrap();
    assert_ne!(v.txid, doomed.compute_txid().to_string());
    assert_eq!(carrying(&double, &[9; 32]).len(), 1);
    assert_eq!(double.calls("fundrawtransaction"), 3);

    // A broadcast anchor that lost to a conflicting transaction is rebuilt on request.
    let lost = v.txid.parse::<bitcoin::Txid>().unwrap();
    double.conflict(lost, 2);
    let again = anchor(&c, &[9; 32]).await.unwrap();
    assert_ne!(again.txid, v.txid);
    assert_eq!(again.state, AnchorState::Broadcast);
    // And an anchor that did not is answered as it is, without a new transaction.
    let same = anchor(&c, &[9; 32]).await.unwrap();
    assert_eq!(same.txid, again.txid);
    assert_eq!(double.calls("fundrawtransaction"), 4);
}
