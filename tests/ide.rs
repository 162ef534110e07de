//! The OpenAI-compatible IDE API on :4304 against a real node serving a generated model: keys,
//! models, chat and completions (streamed and not), SSE framing, usage, stop strings, errors,
//! CORS, disconnects, and the official `openai` Python package.
#![cfg(feature = "llama")]
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::gguf::{ModelSpec, write};
use edgecoder::coordinator::model::*;
use futures_util::StreamExt;

/// A node with the tiny model installed and advertised by its worker, and an API key.
struct IdeNode {
    node: common::Node,
    key: String,
    base: String,
}

async fn ide_node(extra: &[&str]) -> IdeNode {
    let mut args = vec![
        "--set",
        "inference.threads=1",
        "--set",
        "worker.heartbeat_interval=\"200ms\"",
        "--set",
        "coordinator.agent_timeout=\"3s\"",
    ];
    args.extend_from_slice(extra);
    let node = common::Node::start(&args);
    let dir = node.dir.to_str().unwrap().to_string();
    let file = node.dir.join("tiny.gguf");
    write(&file, &ModelSpec::tiny());
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::BIN)
                .args(&args)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let out = run(vec![
        "model".into(),
        "add".into(),
        file.display().to_string(),
        "--name".into(),
        "tiny".into(),
        "--data-dir".into(),
        dir.clone(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(vec![
        "apikey".into(),
        "create".into(),
        "--name".into(),
        "test".into(),
        "--data-dir".into(),
        dir.clone(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("ec-"));
    // The first-boot key was logged once.
    assert!(
        node.log().contains("created the IDE API key"),
        "{}",
        node.log()
    );
    let c = node.client();
    for _ in 0..100 {
        let agents: Vec<AgentView> = c.get("/agents").await.unwrap();
        if agents
            .iter()
            .any(|a| a.live && a.capabilities.models.iter().any(|m| m == "tiny"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = format!("{}/v1", node.url("ide"));
    IdeNode { node, key, base }
}

fn http() -> reqwest::Client {
    edgecoder::http::client_builder().build().unwrap()
}

async fn post(n: &IdeNode, path: &str, body: serde_json::Value) -> reqwest::Response {
    http()
        .post(format!("{}{path}", n.base))
        .bearer_auth(&n.key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Reads an SSE response: the JSON of each `data:` line, and whether `[DONE]` closed it.
async fn sse(resp: reqwest::Response) -> (Vec<serde_json::Value>, bool) {
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut frames = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let data = frame
                .strip_prefix("data: ")
                .expect("every frame is one data line")
                .trim_end();
            if data == "[DONE]" {
                return (frames, true);
            }
            frames.push(serde_json::from_str(data).unwrap());
        }
    }
    (frames, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_speak_openais_protocol() {
    let n = ide_node(&[]).await;

    // Keys.
    let r = http()
        .get(format!("{}/models", n.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "authentication_error");
    assert_eq!(e["error"]["code"], "invalid_api_key");
    let r = http()
        .get(format!("{}/models", n.base))
        .bearer_auth("ec-not-a-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // Models.
    let r = http()
        .get(format!("{}/models", n.base))
        .bearer_auth(&n.key)
        .send()
        .await
        .unwrap();
    let models: serde_json::Value = r.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "tiny" && m["object"] == "model")
    );

    // Chat, not streamed.
    let ask = serde_json::json!({
        "model": "tiny", "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 12, "temperature": 0, "seed": 1
    });
    let r = post(&n, "/chat/completions", ask.clone()).await;
    assert_eq!(r.status().as_u16(), 200);
    let whole: serde_json::Value = r.json().await.unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let usage = &whole["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let finish = whole["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(finish == "length" || finish == "stop");

    // A `developer` message is a system message: the same prompt, the same text.
    let as_role = |role: &str| {
        serde_json::json!({
            "model": "tiny", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": role, "content": "be brief"}, {"role": "user", "content": "hello"}],
        })
    };
    let sys: serde_json::Value = post(&n, "/chat/completions", as_role("system"))
        .await
        .json()
        .await
        .unwrap();
    let dev: serde_json::Value = post(&n, "/chat/completions", as_role("developer"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dev["usage"]["prompt_tokens"], sys["usage"]["prompt_tokens"]);
    assert_eq!(
        dev["choices"][0]["message"]["content"],
        sys["choices"][0]["message"]["content"]
    );

    // Streamed with usage: role first, content deltas, a finish chunk, a usage chunk, [DONE].
    let mut streamed = ask.clone();
    streamed["stream"] = true.into();
    streamed["stream_options"] = serde_json::json!({"include_usage": true});
    let (frames, done) = sse(post(&n, "/chat/completions", streamed).await).await;
    assert!(done, "the stream ends with [DONE]");
    assert!(
        frames
            .iter()
            .all(|f| f["object"] == "chat.completion.chunk" && f["id"] == frames[0]["id"])
    );
    assert_eq!(frames[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = frames
        .iter()
        .filter_map(|f| f["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, text, "chunks reassemble to the non-streamed text");
    let finish_chunk = frames
        .iter()
        .find(|f| {
            f["choices"]
                .get(0)
                .is_some_and(|c| !c["finish_reason"].is_null())
        })
        .unwrap();
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], finish.as_str());
    let last = frames.last().unwrap();
    assert_eq!(last["choices"], serde_json::json!([]));
    assert_eq!(last["usage"], whole["usage"], "usage chunk matches");

    // Stop strings end the text before them.
    let chars: Vec<char> = text.chars().collect();
    if chars.len() >= 4 {
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let mut with_stop = ask.clone();
        with_stop["stop"] = serde_json::json!([stop.clone()]);
        let r: serde_json::Value = post(&n, "/chat/completions", with_stop)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            r["choices"][0]["message"]["content"].as_str().unwrap(),
            &text[..text.find(&stop).unwrap()]
        );
    }

    // Completions with a suffix use the model's FIM tokens; streamed as text_completion chunks.
    let fim = serde_json::json!({"model": "tiny", "prompt": "def add(x, y):", "suffix": "\n", "max_tokens": 6, "temperature": 0});
    let r: serde_json::Value = post(&n, "/completions", fim.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["object"], "text_completion");
    assert!(r["choices"][0]["text"].is_string());
    let mut fim_stream = fim.clone();
    fim_stream["stream"] = true.into();
    let (frames, done) = sse(post(&n, "/completions", fim_stream).await).await;
    assert!(done);
    let joined: String = frames
        .iter()
        .filter_map(|f| f["choices"].get(0)?["text"].as_str())
        .collect();
    assert_eq!(joined, r["choices"][0]["text"].as_str().unwrap());

    // Errors in OpenAI's shape.
    let r = post(
        &n,
        "/chat/completions",
        serde_json::json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status().as_u16(), 404);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        (e["error"]["code"].as_str(), e["error"]["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );
    let mut two = ask.clone();
    two["n"] = 2.into();
    let r = post(&n, "/chat/completions", two).await;
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["param"],
        "n"
    );
    let r = http()
        .post(format!("{}/chat/completions", n.base))
        .bearer_auth(&n.key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );
    let big = format!(
        "{{\"model\":\"tiny\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "a".repeat(2 << 20)
    );
    let r = http()
        .post(format!("{}/chat/completions", n.base))
        .bearer_auth(&n.key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);

    // Browsers: CORS preflight.
    let r = http()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/chat/completions", n.base),
        )
        .header("origin", "https://editor.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_task_and_revoked_keys_stop_working() {
    let n = ide_node(&[]).await;
    let ask = serde_json::json!({
        "model": "tiny", "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 100000, "temperature": 0, "stream": true
    });
    let resp = post(&n, "/chat/completions", ask).await;
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    drop(body);
    // The task behind it ends up cancelled.
    let c = n.node.client();
    let mut cancelled = false;
    for _ in 0..200 {
        let list: TaskList = c.get("/tasks?limit=10").await.unwrap();
        if list
            .tasks
            .iter()
            .any(|t| t.kind == TaskKind::Chat && t.state == TaskState::Cancelled)
        {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(cancelled, "the disconnected request's task was cancelled");
    let m = common::get(&format!("{}/metrics", n.node.url("ide")))
        .unwrap()
        .1;
    assert!(
        m.contains("edgecoder_ide_cancelled_by_disconnect_total 1"),
        "{m}"
    );

    // Revoke the key: it stops working at once.
    let dir = n.node.dir.to_str().unwrap().to_string();
    let list = std::process::Command::new(common::BIN)
        .args(["apikey", "list", "--json", "--data-dir", &dir])
        .output()
        .unwrap();
    let keys: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "test")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    common::cli(["apikey", "revoke", &id, "--data-dir", &dir]);
    let r = http()
        .get(format!("{}/models", n.base))
        .bearer_auth(&n.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

/// CI installs the official `openai` Python package (`.ci/setup`); this runs tests/openai_sdk.py
/// against a real node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_package_works() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "this test needs python3 with the openai package: `python3 -m pip install openai` (.ci/setup installs it)"
    );
    let n = ide_node(&["--set", "http.max_body=\"1MiB\""]).await;
    let stdout = run_sdk_checks(&n, "python3", "openai_sdk.py", None).await;
    assert!(stdout.contains("all openai SDK checks passed"));
}

/// Runs an SDK check script (tests/<script>) with `program` against the node; returns its stdout
/// and fails the test with both streams unless it succeeds.
async fn run_sdk_checks(
    n: &IdeNode,
    program: &'static str,
    script: &str,
    js_dir: Option<String>,
) -> String {
    let script = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let (base, key) = (n.base.clone(), n.key.clone());
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(program);
        cmd.arg(&script)
            .env("EC_BASE_URL", base)
            .env("EC_API_KEY", key)
            .env("EC_MODEL", "tiny");
        if let Some(d) = js_dir {
            cmd.env("OPENAI_JS_DIR", d);
        }
        cmd.output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} SDK checks failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_javascript_package_works() {
    let dir = std::env::var("OPENAI_JS_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/js-sdk").to_string());
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        node_ok
            && std::path::Path::new(&dir)
                .join("node_modules/openai")
                .is_dir(),
        "this test needs Node.js and the openai package in {dir}: \
         `npm install --prefix {dir} openai@6` (.ci/setup installs both)"
    );
    let n = ide_node(&[]).await;
    let stdout = run_sdk_checks(&n, "node", "openai_sdk.mjs", Some(dir)).await;
    assert!(stdout.contains("all openai JS SDK checks passed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_for_a_model_only_a_peer_has_streams_from_that_peer() {
    const FAST: [&str; 6] = [
        "--set",
        "mesh.probe_period=300ms",
        "--set",
        "mesh.suspect_timeout=1500ms",
        "--set",
        "mesh.sync_interval=1s",
    ];
    // A: no model at all.
    let a = common::Node::start(&FAST);
    let dir = a.dir.to_str().unwrap().to_string();
    let out = common::cli(["apikey", "create", "--name", "t", "--data-dir", &dir]);
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let base = format!("{}/v1", a.url("ide"));
    // C: the tiny model, joined to A.
    let bootstrap = format!("mesh.bootstrap_urls=[\"{}\"]", a.coordinator());
    let mut extra = FAST.to_vec();
    extra.extend(["--set", &bootstrap]);
    let c = ide_node(&extra).await;

    // A offers C's model once C's capabilities arrive.
    let mut listed = false;
    for _ in 0..200 {
        let v: serde_json::Value = http()
            .get(format!("{base}/models"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "tiny")
        {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed, "A lists the model its peer has");

    let resp = http()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(&key)
        .json(&serde_json::json!({
            "model": "tiny",
            "stream": true,
            "max_tokens": 12,
            "messages": [{"role": "user", "content": "write a function"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (frames, done) = sse(resp).await;
    assert!(done, "the stream ends with [DONE]");
    let text: String = frames
        .iter()
        .filter_map(|f| f["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty(), "{frames:?}");
    assert!(frames.len() > 2, "streamed in pieces: {frames:?}");
    // It ran on C (whose counter moves once A acknowledged the result).
    let mut stats = serde_json::Value::Null;
    for _ in 0..100 {
        stats = common::get_json(&format!("{}/mesh/stats", c.node.coordinator())).unwrap();
        if stats["remote_succeeded"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats["claims_won"], 1, "{stats}");
    assert_eq!(stats["remote_succeeded"], 1, "{stats}");
}
