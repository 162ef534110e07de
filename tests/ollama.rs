//! The Ollama backend against a test double that speaks Ollama's documented wire format:
//! `GET /api/tags`, and `POST /api/chat` / `POST /api/generate` streaming newline-delimited JSON
//! with `done: false` chunks and a final `done: true` line carrying `done_reason` and counts.
//! The double is named as one: it is not Ollama, it answers the way Ollama's API reference says.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use edgecoder::inference::api::*;
use edgecoder::inference::ollama::{OllamaClient, OllamaError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the double received, for assertions.
#[derive(Clone, Default)]
struct OllamaDouble {
    requests: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

const MODEL: &str = "qwen2.5-coder:0.5b";

async fn tags() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "models": [{
            "name": MODEL,
            "model": MODEL,
            "modified_at": "2026-11-01T10:00:00.000000000Z",
            "size": 397821319,
            "digest": "a8b0c51577010a279d933d14c2a8ab4b268079d44c5c8830c0a93900f1827c67",
            "details": {"parent_model": "", "format": "gguf", "family": "qwen2", "families": ["qwen2"],
                        "parameter_size": "494.03M", "quantization_level": "Q4_K_M"}
        }]
    }))
}

fn stream_lines(lines: Vec<serde_json::Value>) -> Response {
    let chunks: Vec<Result<Bytes, std::io::Error>> = lines
        .into_iter()
        .map(|l| Ok(Bytes::from(format!("{l}\n"))))
        .collect();
    let mut r = Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
    r.headers_mut()
        .insert("content-type", "application/x-ndjson".parse().unwrap());
    r
}

fn not_found(model: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"error": format!("model \"{model}\" not found, try pulling it first")})),
    )
        .into_response()
}

async fn chat(State(d): State<OllamaDouble>, Json(body): Json<serde_json::Value>) -> Response {
    d.requests
        .lock()
        .unwrap()
        .push(("/api/chat".into(), body.clone()));
    if body["model"] != MODEL {
        return not_found(body["model"].as_str().unwrap_or(""));
    }
    let words = ["Hel", "lo", " from", " the", " double"];
    let limit = body["options"]["num_predict"].as_u64().unwrap_or(100) as usize;
    let n = words.len().min(limit);
    let mut lines: Vec<serde_json::Value> = words[..n]
        .iter()
        .map(|w| {
            serde_json::json!({"model": MODEL, "created_at": "2026-11-25T10:00:00Z",
                "message": {"role": "assistant", "content": w}, "done": false})
        })
        .collect();
    lines.push(serde_json::json!({"model": MODEL, "created_at": "2026-11-25T10:00:01Z",
        "message": {"role": "assistant", "content": ""}, "done_reason": if n < words.len() { "length" } else { "stop" },
        "done": true, "total_duration": 5_000_000u64, "load_duration": 1_000_000u64, "prompt_eval_count": 12,
        "prompt_eval_duration": 1_000_000u64, "eval_count": n, "eval_duration": 2_000_000u64}));
    stream_lines(lines)
}

async fn generate(State(d): State<OllamaDouble>, Json(body): Json<serde_json::Value>) -> Response {
    d.requests
        .lock()
        .unwrap()
        .push(("/api/generate".into(), body.clone()));
    if body["model"] != MODEL {
        return not_found(body["model"].as_str().unwrap_or(""));
    }
    stream_lines(vec![
        serde_json::json!({"model": MODEL, "created_at": "2026-11-25T10:00:00Z", "response": "x + y", "done": false}),
        serde_json::json!({"model": MODEL, "created_at": "2026-11-25T10:00:00Z", "response": "", "done": true,
            "done_reason": "stop", "context": [1, 2, 3], "total_duration": 1000, "prompt_eval_count": 5,
            "eval_count": 1, "eval_duration": 1000}),
    ])
}

async fn start_double() -> (String, OllamaDouble) {
    let d = OllamaDouble::default();
    let app = axum::Router::new()
        .route("/api/tags", axum::routing::get(tags))
        .route("/api/chat", axum::routing::post(chat))
        .route("/api/generate", axum::routing::post(generate))
        .with_state(d.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), d)
}

async fn drain(mut rx: tokio::sync::mpsc::Receiver<GenEvent>) -> (String, GenEvent) {
    let mut text = String::new();
    loop {
        match rx.recv().await.unwrap() {
            GenEvent::Token { text: t } => text.push_str(&t),
            GenEvent::Start { .. } => {}
            end => return (text, end),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_ollamas_api() {
    let (url, double) = start_double().await;
    let c = OllamaClient::new(&url, TaskTracker::new()).unwrap();
    let models = c.models().await.unwrap();
    assert_eq!(models[0].name, MODEL);
    let req = GenerateRequest {
        model: MODEL.into(),
        messages: Some(vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }]),
        max_tokens: Some(3),
        temperature: Some(0.0),
        seed: Some(9),
        stop: vec!["\n".into()],
        ..Default::default()
    };
    let (text, end) = drain(c.generate(&req, CancellationToken::new()).await.unwrap()).await;
    assert_eq!(text, "Hello from");
    let GenEvent::Done {
        finish_reason,
        usage,
        ..
    } = end
    else {
        panic!("{end:?}")
    };
    assert_eq!(finish_reason, FinishReason::Length);
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (12, 3));
    // What went over the wire is Ollama's request shape.
    let (path, body) = double.requests.lock().unwrap()[0].clone();
    assert_eq!(path, "/api/chat");
    assert_eq!(body["stream"], true);
    assert_eq!(body["options"]["num_predict"], 3);
    assert_eq!(body["options"]["seed"], 9);
    assert_eq!(body["options"]["stop"], serde_json::json!(["\n"]));
    assert_eq!(body["messages"][0]["content"], "hi");

    let fim = GenerateRequest {
        model: MODEL.into(),
        prompt: Some("def add(x, y): return ".into()),
        suffix: Some("\n".into()),
        ..Default::default()
    };
    let (text, _) = drain(c.generate(&fim, CancellationToken::new()).await.unwrap()).await;
    assert_eq!(text, "x + y");
    assert_eq!(double.requests.lock().unwrap()[1].1["suffix"], "\n");
    assert!(
        double.requests.lock().unwrap()[1].1.get("raw").is_none(),
        "FIM uses Ollama's template"
    );
    let raw = GenerateRequest {
        model: MODEL.into(),
        prompt: Some("x =".into()),
        ..Default::default()
    };
    drain(c.generate(&raw, CancellationToken::new()).await.unwrap()).await;
    assert_eq!(
        double.requests.lock().unwrap()[2].1["raw"],
        true,
        "a plain prompt is sent raw"
    );

    let missing = GenerateRequest {
        model: "nope".into(),
        prompt: Some("x".into()),
        ..Default::default()
    };
    assert_eq!(
        c.generate(&missing, CancellationToken::new())
            .await
            .unwrap_err(),
        OllamaError::NotFound("nope".into())
    );
    let down = OllamaClient::new("http://127.0.0.1:1", TaskTracker::new()).unwrap();
    assert!(matches!(
        down.models().await,
        Err(OllamaError::Unreachable { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lists_and_proxies_ollama_models_and_runs_tasks_on_them() {
    use edgecoder::client::CoordinatorClient;
    use edgecoder::coordinator::model::*;
    use edgecoder::identity::Identity;

    let (url, _double) = start_double().await;
    let node = common::Node::start(&[
        "--set",
        &format!("inference.ollama_url=\"{url}\""),
        "--set",
        "worker.heartbeat_interval=\"200ms\"",
        "--set",
        "coordinator.agent_timeout=\"3s\"",
    ]);
    let key = Arc::new(Identity::load(&node.dir.join("identity.key")).unwrap());
    let inf = CoordinatorClient::new(&node.url("inference"), key).unwrap();
    let models: Vec<ModelView> = inf.get("/models").await.unwrap();
    assert!(
        models
            .iter()
            .any(|m| m.name == MODEL && m.backend == "ollama"),
        "{models:?}"
    );
    let req = GenerateRequest {
        model: MODEL.into(),
        messages: Some(vec![ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }]),
        ..Default::default()
    };
    let out: serde_json::Value = inf.post("/generate?stream=false", &req).await.unwrap();
    assert_eq!(out["text"], "Hello from the double");
    let wrong = inf
        .send::<(), serde_json::Value>(reqwest::Method::PUT, "/generate", None, None)
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Some("method_not_allowed"), "{wrong}");
    assert_eq!(out["finish_reason"], "stop");

    // A chat task for the Ollama model: the worker advertises it and runs it through :4302.
    let c = node.client();
    let agent_has_model = || async {
        let agents: Vec<AgentView> = c.get("/agents").await.unwrap();
        agents
            .iter()
            .any(|a| a.live && a.capabilities.models.iter().any(|m| m == MODEL))
    };
    for _ in 0..100 {
        if agent_has_model().await {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        agent_has_model().await,
        "the worker advertises the Ollama model"
    );
    let task = SubmitTask {
        kind: TaskKind::Chat,
        payload: serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
        requirements: Requirements {
            model: Some(MODEL.into()),
            ..Default::default()
        },
        priority: 0,
        timeout: Some("30s".into()),
        max_attempts: None,
        idempotency_key: None,
    };
    let t: TaskView = c.post("/tasks", &task).await.unwrap();
    let r = common::wait_result(&c, t.id).await;
    assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
    assert_eq!(r.output.as_ref().unwrap()["text"], "Hello from the double");
    assert_eq!(r.output.as_ref().unwrap()["model"], MODEL);
}
