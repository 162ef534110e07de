//! Self-tests of the bitcoind double (tests/common/bitcoind.rs), over real HTTP with reqwest:
//! the wire format, the wallet flow create -> fund -> sign -> send, the chain's answers, and each
//! fault.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

// Only the tests that need it compile the double (not every test binary through common/).
#[path = "common/bitcoind.rs"]
mod bitcoind;

use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::{Transaction, Txid};
use bitcoind::{BitcoindDouble, Fault};
use serde_json::{Value, json};

const USER: &str = "__cookie__";
const PASS: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const WALLET: &str = "anchor";
const PAYLOAD: &str = "454443ff00112233445566778899aabbccddeeff";

/// reqwest with the crate's TLS provider installed (reqwest panics without one).
fn client() -> reqwest::Client {
    edgecoder::http::client_builder().build().unwrap()
}

async fn start() -> (BitcoindDouble, reqwest::Client) {
    (BitcoindDouble::start(USER, PASS, WALLET).await, client())
}

/// One call: HTTP status, raw body, parsed body.
async fn raw(c: &reqwest::Client, url: &str, method: &str, params: Value) -> (u16, String, Value) {
    let resp = c
        .post(url)
        .basic_auth(USER, Some(PASS))
        .json(&json!({"jsonrpc": "1.0", "id": "t", "method": method, "params": params}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    let v = serde_json::from_str(&body).unwrap();
    (status, body, v)
}

/// A call that must succeed: its result.
async fn ok(c: &reqwest::Client, url: &str, method: &str, params: Value) -> Value {
    let (status, body, v) = raw(c, url, method, params).await;
    assert_eq!(status, 200, "{method}: {body}");
    assert!(v["error"].is_null(), "{method}: {body}");
    v["result"].clone()
}

/// A call that must fail: (HTTP status, error code, message).
async fn fails(c: &reqwest::Client, url: &str, method: &str, params: Value) -> (u16, i64, String) {
    let (status, body, v) = raw(c, url, method, params).await;
    assert!(v["result"].is_null(), "{method}: {body}");
    let e = &v["error"];
    (
        status,
        e["code"].as_i64().unwrap(),
        e["message"].as_str().unwrap().to_string(),
    )
}

fn tx(hex: &Value) -> Transaction {
    deserialize_hex(hex.as_str().unwrap()).unwrap()
}

fn sats(btc: &Value) -> i64 {
    (btc.as_f64().unwrap() * 1e8).round() as i64
}

/// create (OP_RETURN payload) -> fund -> sign: the signed hex and the fund result.
async fn prepare(d: &BitcoindDouble, c: &reqwest::Client, payload: &str) -> (String, Value) {
    let w = d.wallet_url();
    let raw_hex = ok(
        c,
        &w,
        "createrawtransaction",
        json!([[], [{"data": payload}]]),
    )
    .await;
    let funded = ok(c, &w, "fundrawtransaction", json!([raw_hex])).await;
    let signed = ok(
        c,
        &w,
        "signrawtransactionwithwallet",
        json!([funded["hex"]]),
    )
    .await;
    assert_eq!(signed["complete"], true, "{signed}");
    (signed["hex"].as_str().unwrap().to_string(), funded)
}

#[tokio::test]
async fn auth_is_basic_and_refusals_have_empty_bodies() {
    let (d, c) = start().await;
    let body = json!({"jsonrpc": "1.0", "id": 1, "method": "getblockchaininfo", "params": []});
    for auth in [None, Some("wrong")] {
        let mut rb = c.post(&d.url).json(&body);
        if let Some(pw) = auth {
            rb = rb.basic_auth(USER, Some(pw));
        }
        let resp = rb.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        assert_eq!(
            resp.headers()["www-authenticate"].to_str().unwrap(),
            "Basic realm=\"jsonrpc\""
        );
        assert_eq!(resp.text().await.unwrap(), "");
    }
    let info = ok(&c, &d.url, "getblockchaininfo", json!([])).await;
    assert_eq!(info["chain"], "regtest");
    assert_eq!(info["blocks"], 200);
    assert_eq!(info["headers"], 200);
    assert_eq!(info["bestblockhash"].as_str().unwrap().len(), 64);
    assert_eq!(info["initialblockdownload"], false);
    assert_eq!(info["verificationprogress"], 1);
    d.set_chain("main");
    assert_eq!(
        ok(&c, &d.url, "getblockchaininfo", json!([])).await["chain"],
        "main"
    );
    // Both refused attempts and the two successful ones were counted.
    assert_eq!(d.calls("getblockchaininfo"), 4);
}

#[tokio::test]
async fn protocol_errors_match_core() {
    let (d, c) = start().await;
    let (status, body, _) = raw(&c, &d.url, "nosuchmethod", json!([])).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        "{\"result\":null,\"error\":{\"code\":-32601,\"message\":\"Method not found\"},\"id\":\"t\"}\n"
    );
    let resp = c
        .post(&d.url)
        .basic_auth(USER, Some(PASS))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 500);
    assert_eq!(
        resp.text().await.unwrap(),
        "{\"result\":null,\"error\":{\"code\":-32700,\"message\":\"Parse error\"},\"id\":null}\n"
    );
    let resp = c
        .post(&d.url)
        .basic_auth(USER, Some(PASS))
        .json(&json!({"id": 7, "params": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    // Wallet methods need the wallet's URI; another wallet's name is unknown.
    let (status, code, msg) = fails(&c, &d.url, "getwalletinfo", json!([])).await;
    assert_eq!((status, code), (500, -19));
    assert!(msg.starts_with("Wallet file not specified"), "{msg}");
    let other = format!("{}/wallet/other", d.url);
    let (_, code, msg) = fails(&c, &other, "getwalletinfo", json!([])).await;
    assert_eq!(code, -18);
    assert_eq!(msg, "Requested wallet does not exist or is not loaded");
    let info = ok(&c, &d.wallet_url(), "getwalletinfo", json!([])).await;
    assert_eq!(info["walletname"], WALLET);
    assert_eq!(sats(&info["balance"]), 76_000_000);
    assert_eq!(info["txcount"], 3);
    let (_, _, v) = raw(&c, &d.wallet_url(), "getwalletinfo", json!(null)).await;
    assert!(v["error"].is_null());
    // Amounts are printed as Core prints them.
    let (_, body, _) = raw(&c, &d.wallet_url(), "getwalletinfo", json!([])).await;
    assert!(body.contains("\"balance\":0.76000000,"), "{body}");
    // createrawtransaction's parameter errors.
    let w = d.wallet_url();
    let (_, code, msg) = fails(
        &c,
        &w,
        "createrawtransaction",
        json!([[], [{"data": "xyz"}]]),
    )
    .await;
    assert_eq!(
        (code, msg.as_str()),
        (-8, "Data must be hexadecimal string (not 'xyz')")
    );
    let two = json!([[], [{"data": "00"}, {"data": "01"}]]);
    let (_, code, msg) = fails(&c, &w, "createrawtransaction", two).await;
    assert_eq!(
        (code, msg.as_str()),
        (-8, "Invalid parameter, duplicate key: data")
    );
    let (_, code, msg) = fails(&c, &w, "getaddressinfo", json!(["bc1qnotanaddress"])).await;
    assert_eq!((code, msg.as_str()), (-5, "Invalid address"));
    let (_, code, _) = fails(&c, &w, "fundrawtransaction", json!(["zz"])).await;
    assert_eq!(code, -22);
}

#[tokio::test]
async fn anchor_flow_send_resend_mine_and_confirm() {
    let (d, c) = start().await;
    let w = d.wallet_url();
    // A 0-input transaction comes back in the legacy serialization, as Core writes it.
    let raw_hex = ok(
        &c,
        &w,
        "createrawtransaction",
        json!([[], [{"data": PAYLOAD}]]),
    )
    .await;
    let expected = format!("0200000000010000000000000000166a14{PAYLOAD}00000000");
    assert_eq!(raw_hex, expected);
    let funded = ok(
        &c,
        &w,
        "fundrawtransaction",
        json!([raw_hex, {"fee_rate": 10}]),
    )
    .await;
    let ftx = tx(&funded["hex"]);
    assert_eq!(ftx.input.len(), 1);
    assert_eq!(ftx.output.len(), 2);
    assert!(ftx.input[0].witness.is_empty());
    let changepos = funded["changepos"].as_i64().unwrap() as usize;
    let change = &ftx.output[changepos];
    assert!(change.script_pubkey.is_p2wpkh());
    let fee = sats(&funded["fee"]);
    assert_eq!(fee, 50_000_000 - change.value.to_sat() as i64);
    // Unsigned: no witness.
    let (_, code, msg) = fails(&c, &d.url, "sendrawtransaction", json!([funded["hex"]])).await;
    assert_eq!(code, -26);
    assert!(
        msg.contains("Witness program was passed an empty witness"),
        "{msg}"
    );

    let signed = ok(
        &c,
        &w,
        "signrawtransactionwithwallet",
        json!([funded["hex"]]),
    )
    .await;
    assert_eq!(signed["complete"], true);
    let stx = tx(&signed["hex"]);
    let witness = &stx.input[0].witness;
    assert_eq!(witness.len(), 2);
    let sig = witness.nth(0).unwrap();
    assert!((70..=72).contains(&sig.len()) && sig[sig.len() - 1] == 0x01);
    assert_eq!(witness.nth(1).unwrap().len(), 33);
    // fee_rate 10 sat/vB of the signed size.
    assert_eq!(fee, (10 * stx.vsize()) as i64);
    let op_return = stx
        .output
        .iter()
        .find(|o| o.script_pubkey.is_op_return())
        .unwrap();
    assert!(op_return.script_pubkey.to_hex_string().ends_with(PAYLOAD));

    // A fee rate over maxfeerate is refused; then the send goes through.
    let (_, code, msg) = fails(
        &c,
        &d.url,
        "sendrawtransaction",
        json!([signed["hex"], 0.00001]),
    )
    .await;
    assert_eq!(code, -25);
    assert!(msg.starts_with("Fee exceeds maximum"), "{msg}");
    let txid = ok(&c, &d.url, "sendrawtransaction", json!([signed["hex"]])).await;
    assert_eq!(txid.as_str().unwrap(), stx.compute_txid().to_string());
    assert_eq!(d.mempool().len(), 1);
    assert_eq!(d.accepted(), 1);
    // Sending it again: same txid, nothing new.
    let again = ok(&c, &w, "sendrawtransaction", json!([signed["hex"]])).await;
    assert_eq!(again, txid);
    assert_eq!(d.accepted(), 1);
    assert_eq!(d.calls("sendrawtransaction"), 4);

    let info = ok(&c, &w, "gettransaction", json!([txid])).await;
    assert_eq!(info["confirmations"], 0);
    assert_eq!(sats(&info["fee"]), -fee);
    assert_eq!(info["hex"], signed["hex"]);
    d.mine(1);
    assert!(d.mempool().is_empty());
    assert_eq!(d.confirmed().len(), 1);
    let info = ok(&c, &w, "gettransaction", json!([txid])).await;
    assert_eq!(info["confirmations"], 1);
    assert_eq!(info["blockheight"], 201);
    assert_eq!(info["blockhash"].as_str().unwrap().len(), 64);
    let (_, code, msg) = fails(&c, &d.url, "sendrawtransaction", json!([signed["hex"]])).await;
    assert_eq!(
        (code, msg.as_str()),
        (-27, "Transaction outputs already in utxo set")
    );
    let addr = ok(&c, &w, "getnewaddress", json!([])).await;
    let hashes = ok(&c, &w, "generatetoaddress", json!([2, addr])).await;
    assert_eq!(hashes.as_array().unwrap().len(), 2);
    assert_eq!(
        ok(&c, &w, "gettransaction", json!([txid])).await["confirmations"],
        3
    );
    let zero = "0".repeat(64);
    let (_, code, _) = fails(&c, &w, "gettransaction", json!([zero])).await;
    assert_eq!(code, -5);
}

#[tokio::test]
async fn double_spend_refused_and_change_chains() {
    let (d, c) = start().await;
    // Without lockUnspents both fundings pick the 0.5 BTC coin.
    let (first, _) = prepare(&d, &c, "01").await;
    let (second, _) = prepare(&d, &c, "02").await;
    assert_eq!(
        tx(&json!(first)).input[0].previous_output,
        tx(&json!(second)).input[0].previous_output
    );
    let sent = ok(&c, &d.url, "sendrawtransaction", json!([first])).await;
    let first_txid: Txid = sent.as_str().unwrap().parse().unwrap();
    let (_, code, msg) = fails(&c, &d.url, "sendrawtransaction", json!([second])).await;
    assert_eq!(
        (code, msg.as_str()),
        (-25, "bad-txns-inputs-missingorspent")
    );
    // The next funding spends the unconfirmed change, the wallet's largest coin now.
    let (third, _) = prepare(&d, &c, "03").await;
    assert_eq!(tx(&json!(third)).input[0].previous_output.txid, first_txid);
    ok(&c, &d.url, "sendrawtransaction", json!([third])).await;
    assert_eq!(d.mempool().len(), 2);
    // The change position is not always the same.
    let w = d.wallet_url();
    let raw_hex = ok(&c, &w, "createrawtransaction", json!([[], {"data": "04"}])).await;
    let a = ok(&c, &w, "fundrawtransaction", json!([raw_hex])).await;
    let b = ok(&c, &w, "fundrawtransaction", json!([raw_hex])).await;
    assert_ne!(a["changepos"], b["changepos"]);
}

#[tokio::test]
async fn faults_do_what_they_say() {
    let (d, c) = start().await;
    let w = d.wallet_url();
    let raw_hex = ok(
        &c,
        &w,
        "createrawtransaction",
        json!([[], [{"data": PAYLOAD}]]),
    )
    .await;

    d.set_fault(Some(Fault::ForeignOutput));
    let funded = ok(&c, &w, "fundrawtransaction", json!([raw_hex])).await;
    let ftx = tx(&funded["hex"]);
    assert_eq!(ftx.output.len(), 3);
    let mut foreign = 0;
    for out in ftx
        .output
        .iter()
        .filter(|o| !o.script_pubkey.is_op_return())
    {
        let address = bitcoin::Address::from_script(&out.script_pubkey, bitcoin::Network::Regtest)
            .unwrap()
            .to_string();
        let info = ok(&c, &w, "getaddressinfo", json!([address])).await;
        if info["ismine"] == false {
            foreign += 1;
            assert_eq!(out.value.to_sat(), 10_000);
        }
    }
    assert_eq!(foreign, 1);

    d.set_fault(Some(Fault::Fee(5_000)));
    let funded = ok(&c, &w, "fundrawtransaction", json!([raw_hex])).await;
    assert_eq!(sats(&funded["fee"]), 5_000);
    let out_sum: u64 = tx(&funded["hex"])
        .output
        .iter()
        .map(|o| o.value.to_sat())
        .sum();
    assert_eq!(50_000_000 - out_sum, 5_000);

    d.set_fault(Some(Fault::TamperOnSign));
    let funded = ok(&c, &w, "fundrawtransaction", json!([raw_hex])).await;
    let signed = ok(
        &c,
        &w,
        "signrawtransactionwithwallet",
        json!([funded["hex"]]),
    )
    .await;
    assert_eq!(signed["complete"], true);
    let find_data = |t: Transaction| {
        t.output
            .into_iter()
            .find(|o| o.script_pubkey.is_op_return())
            .unwrap()
            .script_pubkey
    };
    assert_ne!(find_data(tx(&funded["hex"])), find_data(tx(&signed["hex"])));

    d.set_fault(Some(Fault::Busy));
    let resp = c
        .post(&d.url)
        .basic_auth(USER, Some(PASS))
        .json(&json!({"id": 1, "method": "getblockchaininfo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.text().await.unwrap(), "Work queue depth exceeded");

    d.set_fault(None);
    let (signed, _) = prepare(&d, &c, PAYLOAD).await;
    let body =
        json!({"jsonrpc": "1.0", "id": 1, "method": "sendrawtransaction", "params": [signed]});
    d.set_fault(Some(Fault::DropBeforeSend));
    let sent = c
        .post(&d.url)
        .basic_auth(USER, Some(PASS))
        .json(&body)
        .send()
        .await;
    assert!(sent.is_err(), "{sent:?}");
    assert!(d.mempool().is_empty());
    d.set_fault(Some(Fault::DropAfterSend));
    let sent = c
        .post(&d.url)
        .basic_auth(USER, Some(PASS))
        .json(&body)
        .send()
        .await;
    assert!(sent.is_err(), "{sent:?}");
    assert_eq!(d.mempool().len(), 1);
    assert_eq!(d.accepted(), 1);
    // The fault cleared itself: a retry is answered, with the same txid.
    let txid = ok(&c, &d.url, "sendrawtransaction", json!([signed])).await;
    assert_eq!(
        txid.as_str().unwrap(),
        tx(&json!(signed)).compute_txid().to_string()
    );
    assert_eq!(d.accepted(), 1);
    assert_eq!(d.calls("sendrawtransaction"), 3);

    d.stop();
    let refused = client()
        .post(&d.url)
        .basic_auth(USER, Some(PASS))
        .json(&body)
        .send()
        .await;
    assert!(refused.unwrap_err().is_connect());
}

#[tokio::test]
async fn signatures_are_verified_and_v2_batches_work() {
    let (d, c) = start().await;
    let (signed, _) = prepare(&d, &c, PAYLOAD).await;
    // Changing the payload after signing breaks the BIP143 signature.
    let mut t = tx(&json!(signed));
    let i = t
        .output
        .iter()
        .position(|o| o.script_pubkey.is_op_return())
        .unwrap();
    let mut script = t.output[i].script_pubkey.to_bytes();
    *script.last_mut().unwrap() ^= 1;
    t.output[i].script_pubkey = bitcoin::ScriptBuf::from_bytes(script);
    let forged = bitcoin::consensus::encode::serialize_hex(&t);
    let (status, code, msg) = fails(&c, &d.url, "sendrawtransaction", json!([forged])).await;
    assert_eq!((status, code), (500, -26));
    assert_eq!(
        msg,
        "mandatory-script-verify-flag-failed (Signature must be zero for failed CHECK(MULTI)SIG operation)"
    );
    assert_eq!(d.accepted(), 0);

    // A JSON-RPC 2.0 batch with named parameters: HTTP 200, errors inside, no reply to the
    // notification.
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "sendrawtransaction", "params": {"hexstring": signed}},
        {"jsonrpc": "2.0", "id": 2, "method": "nosuchmethod"},
        {"jsonrpc": "2.0", "method": "getblockchaininfo"},
    ]);
    let resp = c
        .post(&d.url)
        .basic_auth(USER, Some(PASS))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.text().await.unwrap();
    let txid = tx(&json!(signed)).compute_txid();
    assert_eq!(
        body,
        format!(
            "[{{\"jsonrpc\":\"2.0\",\"result\":\"{txid}\",\"id\":1}},{{\"jsonrpc\":\"2.0\",\"error\":{{\"code\":-32601,\"message\":\"Method not found\"}},\"id\":2}}]\n"
        )
    );
    assert_eq!(d.accepted(), 1);
}

#[tokio::test]
async fn raw_http_looks_like_evhttp() {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (d, _) = start().await;
    let addr = d.url.trim_start_matches("http://").to_string();
    let body = r#"{"jsonrpc":"1.0","id":null,"method":"getblockchaininfo"}"#;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\nContent-Length: {}\r\n\r\n{body}GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (first, second) = out.split_at(out.find("HTTP/1.1 405").unwrap());
    assert!(
        first.starts_with("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: "),
        "{first}"
    );
    let (head, reply) = first.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains(&format!("\r\nContent-Length: {}", reply.len())),
        "{head}"
    );
    assert!(reply.starts_with("{\"result\":{\"chain\":\"regtest\",\"blocks\":200,"));
    assert!(
        reply.ends_with("},\"error\":null,\"id\":null}\n"),
        "{reply}"
    );
    assert!(
        second.ends_with("\r\n\r\nJSONRPC server handles only POST requests"),
        "{second}"
    );
}
