//! Local inference through the real llama.cpp on a generated GGUF model (random weights, SPM
//! vocabulary): determinism, stop strings, limits, streaming, cancellation, slots, back-pressure.
#![cfg(feature = "llama")]
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::gguf::{ModelSpec, write};
use edgecoder::inference::api::*;
use edgecoder::inference::engine::{
    EngineConfig, EngineError, LlamaEngine, Loaded, Prompt, Sampling,
};
use tokio_util::sync::CancellationToken;

fn engine(slots: u32, queue: usize) -> LlamaEngine {
    LlamaEngine::new(EngineConfig {
        // One thread per slot: tests run in parallel on two cores.
        threads: slots,
        slots,
        queue_depth: queue,
        context: 256,
        batch: 64,
        gpu_layers: 0,
    })
}

fn model(dir: &std::path::Path, e: &LlamaEngine, name: &str) -> Arc<Loaded> {
    let path = dir.join(format!("{name}.gguf"));
    write(&path, &ModelSpec::tiny());
    let info = edgecoder::inference::gguf::inspect(&path).unwrap();
    e.load(name, &path, info).unwrap()
}

fn greedy(max: u32, stop: &[&str]) -> Sampling {
    Sampling {
        max_tokens: max,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 1,
        stop: stop.iter().map(|s| s.to_string()).collect(),
    }
}

fn text(p: &str) -> Prompt {
    Prompt::Text {
        text: p.into(),
        special: false,
        add_bos: true,
    }
}

/// Collects a generation: the text pieces and the final event.
async fn collect(mut rx: tokio::sync::mpsc::Receiver<GenEvent>) -> (Vec<String>, GenEvent, u32) {
    let mut pieces = Vec::new();
    let mut prompt_tokens = 0;
    loop {
        match rx.recv().await.expect("a done event") {
            GenEvent::Start {
                prompt_tokens: p, ..
            } => prompt_tokens = p,
            GenEvent::Token { text } => pieces.push(text),
            end => return (pieces, end, prompt_tokens),
        }
    }
}

fn completion_tokens(e: &GenEvent) -> u32 {
    match e {
        GenEvent::Done { usage, .. } => usage.completion_tokens,
        other => panic!("expected done, got {other:?}"),
    }
}

fn finish(e: &GenEvent) -> FinishReason {
    match e {
        GenEvent::Done { finish_reason, .. } => *finish_reason,
        other => panic!("expected done, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_is_deterministic_and_respects_max_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1, 4);
    let m = model(dir.path(), &e, "tiny");
    let run = || async {
        collect(
            m.submit(
                text("hello world, the llama model"),
                greedy(16, &[]),
                CancellationToken::new(),
            )
            .unwrap(),
        )
        .await
    };
    let (a, end_a, prompt_tokens) = run().await;
    let (b, end_b, _) = run().await;
    assert_eq!(a, b, "same prompt, same greedy output");
    // The model says add_bos_token = false (ChatML style), so: six SPM pieces, no BOS.
    assert_eq!(prompt_tokens, 6);
    assert_eq!(completion_tokens(&end_a), 16);
    assert_eq!(finish(&end_a), FinishReason::Length);
    assert_eq!(completion_tokens(&end_b), 16);
    assert!(!a.concat().is_empty());
    // A different seed with sampling changes nothing about greedy, but sampling is seeded too.
    let sampled = |seed| {
        let m = m.clone();
        async move {
            let s = Sampling {
                temperature: 1.0,
                top_p: 0.95,
                top_k: 40,
                seed,
                ..greedy(12, &[])
            };
            collect(
                m.submit(text("hello"), s, CancellationToken::new())
                    .unwrap(),
            )
            .await
            .0
        }
    };
    assert_eq!(sampled(7).await, sampled(7).await, "same seed, same sample");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_generation_without_being_returned() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1, 4);
    let m = model(dir.path(), &e, "tiny");
    let (free, _, _) = collect(
        m.submit(text("def main"), greedy(24, &[]), CancellationToken::new())
            .unwrap(),
    )
    .await;
    let full = free.concat();
    // Pick a stop string from the middle of what the model says anyway.
    let chars: Vec<char> = full.chars().collect();
    assert!(
        chars.len() >= 6,
        "model output too short to test stops: {full:?}"
    );
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let (pieces, end, _) = collect(
        m.submit(
            text("def main"),
            greedy(24, &[&stop]),
            CancellationToken::new(),
        )
        .unwrap(),
    )
    .await;
    let stopped = pieces.concat();
    assert_eq!(finish(&end), FinishReason::Stop);
    assert!(
        !stopped.contains(&stop),
        "{stopped:?} contains the stop {stop:?}"
    );
    assert_eq!(
        stopped,
        full[..full.find(&stop).unwrap()],
        "the text before the first stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_order_and_cancellation_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1, 4);
    let m = model(dir.path(), &e, "tiny");
    let (all, _, _) = collect(
        m.submit(text("hello"), greedy(40, &[]), CancellationToken::new())
            .unwrap(),
    )
    .await;
    // The streamed pieces, in order, are the same text as the whole.
    let mut rx = m
        .submit(text("hello"), greedy(40, &[]), CancellationToken::new())
        .unwrap();
    let mut seen = String::new();
    let mut order = Vec::new();
    while let Some(ev) = rx.recv().await {
        order.push(match &ev {
            GenEvent::Start { .. } => 's',
            GenEvent::Token { text } => {
                seen.push_str(text);
                't'
            }
            GenEvent::Done { .. } => 'd',
            GenEvent::Error { .. } => 'e',
        });
    }
    assert_eq!(seen, all.concat());
    assert_eq!(order.first(), Some(&'s'));
    assert_eq!(order.last(), Some(&'d'));
    assert!(order[1..order.len() - 1].iter().all(|c| *c == 't'));

    // Cancel after the first token: the slot stops early and reports it.
    let cancel = CancellationToken::new();
    let mut rx = m
        .submit(text("hello"), greedy(200, &[]), cancel.clone())
        .unwrap();
    let mut tokens = 0;
    let end = loop {
        match rx.recv().await.unwrap() {
            GenEvent::Token { .. } => {
                tokens += 1;
                if tokens == 1 {
                    cancel.cancel();
                }
            }
            GenEvent::Start { .. } => {}
            other => break other,
        }
    };
    assert_eq!(finish(&end), FinishReason::Cancelled);
    assert!(completion_tokens(&end) < 200);
    // Dropping the receiver also stops it, and the slot is free for the next job.
    let rx = m
        .submit(text("hello"), greedy(200, &[]), CancellationToken::new())
        .unwrap();
    drop(rx);
    let (_, end, _) = collect(
        m.submit(text("hello"), greedy(3, &[]), CancellationToken::new())
            .unwrap(),
    )
    .await;
    assert_eq!(completion_tokens(&end), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_slots_run_two_requests_and_a_full_queue_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(2, 1);
    let m = model(dir.path(), &e, "tiny");
    // Two long generations hold both slots.
    let c1 = CancellationToken::new();
    let c2 = CancellationToken::new();
    let mut r1 = m
        .submit(text("hello"), greedy(200, &[]), c1.clone())
        .unwrap();
    let mut r2 = m
        .submit(text("world"), greedy(200, &[]), c2.clone())
        .unwrap();
    assert!(matches!(r1.recv().await, Some(GenEvent::Start { .. })));
    assert!(matches!(r2.recv().await, Some(GenEvent::Start { .. })));
    let st = m.status();
    assert_eq!((st.slots, st.busy), (2, 2), "both slots busy at once");
    // One may wait in the queue; the next is refused.
    let queued = m
        .submit(text("x"), greedy(2, &[]), CancellationToken::new())
        .unwrap();
    match m.submit(text("y"), greedy(2, &[]), CancellationToken::new()) {
        Err(EngineError::Busy {
            slots: 2, queue: 1, ..
        }) => {}
        other => panic!("expected Busy, got {other:?}"),
    }
    c1.cancel();
    c2.cancel();
    let (_, end, _) = collect(queued).await;
    assert_eq!(
        completion_tokens(&end),
        2,
        "the queued request ran once a slot freed"
    );
    drop((r1, r2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_templates_and_fill_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1, 4);
    let m = model(dir.path(), &e, "tiny");
    let msgs = vec![ChatMessage {
        role: "user".into(),
        content: "hello".into(),
    }];
    // The GGUF's ChatML template is one llama.cpp knows.
    let rendered = m.render_chat(&msgs).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    );
    let req = GenerateRequest {
        model: "tiny".into(),
        messages: Some(msgs.clone()),
        max_tokens: Some(4),
        temperature: Some(0.0),
        ..Default::default()
    };
    let (_, end, prompt_tokens) = collect(
        m.submit(
            m.prompt_for(&req).unwrap(),
            greedy(4, &[]),
            CancellationToken::new(),
        )
        .unwrap(),
    )
    .await;
    assert!(
        prompt_tokens >= 6,
        "control tokens parsed as single tokens: {prompt_tokens}"
    );
    assert!(matches!(end, GenEvent::Done { .. }));

    // A template llama.cpp does not know goes through minijinja.
    let mut spec = ModelSpec::tiny();
    spec.chat_template = Some(
        "{% for m in messages %}<<{{ m.role }}>>{{ m.content.strip() }}\n{% endfor %}<<assistant>>"
            .into(),
    );
    let path = dir.path().join("custom.gguf");
    write(&path, &spec);
    let custom = e
        .load(
            "custom",
            &path,
            edgecoder::inference::gguf::inspect(&path).unwrap(),
        )
        .unwrap();
    let msgs = vec![ChatMessage {
        role: "user".into(),
        content: " hi ".into(),
    }];
    assert_eq!(
        custom.render_chat(&msgs).unwrap(),
        "<<user>>hi\n<<assistant>>"
    );

    // Fill-in-the-middle uses the model's FIM tokens.
    let fim = GenerateRequest {
        model: "tiny".into(),
        prompt: Some("def sum(".into()),
        suffix: Some(")\n".into()),
        ..Default::default()
    };
    let p = m.prompt_for(&fim).unwrap();
    assert!(matches!(p, Prompt::Fim { .. }));
    let (_, end, _) = collect(
        m.submit(p, greedy(4, &[]), CancellationToken::new())
            .unwrap(),
    )
    .await;
    assert!(matches!(end, GenEvent::Done { .. }));
    // Editors that write their own FIM prompt send the control tokens as text: they are parsed
    // as the three FIM tokens (this ChatML model adds no BOS), not spelled out piece by piece.
    let raw = GenerateRequest {
        model: "tiny".into(),
        prompt: Some("<|fim_prefix|><|fim_suffix|><|fim_middle|>".into()),
        ..Default::default()
    };
    let (_, end, prompt_tokens) = collect(
        m.submit(
            m.prompt_for(&raw).unwrap(),
            greedy(2, &[]),
            CancellationToken::new(),
        )
        .unwrap(),
    )
    .await;
    assert!(matches!(end, GenEvent::Done { .. }));
    assert_eq!(prompt_tokens, 3);
    let mut no_fim = ModelSpec::tiny();
    no_fim.fim = false;
    let path = dir.path().join("nofim.gguf");
    write(&path, &no_fim);
    let plain = e
        .load(
            "nofim",
            &path,
            edgecoder::inference::gguf::inspect(&path).unwrap(),
        )
        .unwrap();
    assert!(matches!(
        plain.prompt_for(&fim),
        Err(EngineError::Prompt(_))
    ));
    let _ = Duration::ZERO;
}

/// End to end: a `chat` task submitted to a node streams token events and its result is the
/// same text as a direct generation with the same settings; cancelling a task stops generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_tasks_stream_tokens_and_match_direct_generation() {
    use edgecoder::client::CoordinatorClient;
    use edgecoder::coordinator::model::*;
    use edgecoder::identity::Identity;
    use futures_util::StreamExt;

    let node = common::Node::start(&[
        "--set",
        "inference.threads=1",
        "--set",
        "worker.heartbeat_interval=\"200ms\"",
        "--set",
        "coordinator.agent_timeout=\"3s\"",
    ]);
    let key = Arc::new(Identity::load(&node.dir.join("identity.key")).unwrap());
    let inf = CoordinatorClient::new(&node.url("inference"), key).unwrap();
    let file = node.dir.join("tiny-upload.gguf");
    write(&file, &ModelSpec::tiny());
    let _: ModelView = inf
        .post(
            "/models/add",
            &AddRequest {
                path: file.display().to_string(),
                name: Some("tiny".into()),
            },
        )
        .await
        .unwrap();
    let c = node.client();
    // The worker notices the new model at its next heartbeat and registers again with it.
    let mut advertised = false;
    for _ in 0..100 {
        let agents: Vec<AgentView> = c.get("/agents").await.unwrap();
        if agents
            .iter()
            .any(|a| a.live && a.capabilities.models.iter().any(|m| m == "tiny"))
        {
            advertised = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(advertised, "the worker advertises the new model");

    let payload = serde_json::json!({
        "messages": [{"role": "user", "content": "write a python function"}],
        "max_tokens": 24, "temperature": 0.0, "seed": 5
    });
    let direct = GenerateRequest {
        model: "tiny".into(),
        messages: Some(vec![ChatMessage {
            role: "user".into(),
            content: "write a python function".into(),
        }]),
        max_tokens: Some(24),
        temperature: Some(0.0),
        seed: Some(5),
        ..Default::default()
    };
    let direct: serde_json::Value = inf.post("/generate?stream=false", &direct).await.unwrap();
    let task = SubmitTask {
        kind: TaskKind::Chat,
        payload,
        requirements: Requirements {
            model: Some("tiny".into()),
            ..Default::default()
        },
        priority: 0,
        timeout: Some("60s".into()),
        max_attempts: None,
        idempotency_key: None,
    };
    let t: TaskView = c.post("/tasks", &task).await.unwrap();
    // Follow the event stream while it runs.
    let url = c.base().join(&format!("/tasks/{}/events", t.id)).unwrap();
    let resp = c
        .signed(
            reqwest::Method::GET,
            &url,
            Vec::new(),
            Duration::from_secs(60),
        )
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut streamed = String::new();
    let mut token_events = 0;
    'outer: while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            if frame.contains("event: end") {
                break 'outer;
            }
            if frame.contains("event: token") {
                let data = frame
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap();
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                streamed.push_str(v["data"]["text"].as_str().unwrap());
                token_events += 1;
            }
        }
    }
    let r = common::wait_result(&c, t.id).await;
    assert_eq!(r.state, TaskState::Succeeded, "{r:?}");
    let out = r.output.unwrap();
    assert!(token_events >= 1, "tokens arrived as events");
    assert_eq!(
        out["text"], direct["text"],
        "same text as direct generation"
    );
    assert_eq!(
        streamed,
        out["text"].as_str().unwrap(),
        "the events spell the result"
    );
    assert_eq!(
        out["usage"]["completion_tokens"],
        direct["usage"]["completion_tokens"]
    );

    // Cancelling a long generation stops it.
    let long = SubmitTask {
        payload: serde_json::json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100000, "temperature": 0.0}),
        ..task.clone()
    };
    let t: TaskView = c.post("/tasks", &long).await.unwrap();
    common::wait_task(&c, t.id, "running", |v| v.state == TaskState::Running).await;
    c.send::<(), TaskView>(
        reqwest::Method::DELETE,
        &format!("/tasks/{}", t.id),
        None,
        None,
    )
    .await
    .unwrap();
    let mut stopped = false;
    for _ in 0..200 {
        // The engine's slot itself saw the cancellation and stopped early.
        let st = common::get_json(&format!("{}/status", node.url("inference"))).unwrap();
        if st["loaded"][0]["throughput"]["cancelled"]
            .as_u64()
            .unwrap_or(0)
            >= 1
        {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(stopped, "the generation ended as cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_generations_all_progress_and_a_slow_reader_stalls_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(4, 4);
    let m = model(dir.path(), &e, "tiny");
    // A reader that takes nothing until the others are done: its sequence fills its event buffer
    // and pauses, the others carry on.
    let slow = m
        .submit(
            text("slow reader"),
            greedy(150, &[]),
            CancellationToken::new(),
        )
        .unwrap();
    let started = std::time::Instant::now();
    let mut readers = Vec::new();
    for p in ["alpha", "beta gamma", "delta epsilon zeta"] {
        let rx = m
            .submit(text(p), greedy(120, &[]), CancellationToken::new())
            .unwrap();
        readers.push(tokio::spawn(async move {
            let mut rx = rx;
            let mut first = None;
            let mut tokens = 0;
            loop {
                match rx.recv().await.expect("a done event") {
                    GenEvent::Start { .. } => {}
                    GenEvent::Token { .. } => {
                        tokens += 1;
                        first.get_or_insert_with(std::time::Instant::now);
                    }
                    end => return (first, std::time::Instant::now(), tokens, end),
                }
            }
        }));
    }
    let mut firsts = Vec::new();
    let mut ends = Vec::new();
    for r in readers {
        let (first, end_at, tokens, end) = r.await.unwrap();
        assert!(matches!(end, GenEvent::Done { .. }), "{end:?}");
        assert!(tokens > 0);
        firsts.push(first.unwrap());
        ends.push(end_at);
    }
    // Every generation had produced text before any of them finished: they ran together.
    let last_first = firsts.iter().max().unwrap();
    let first_end = ends.iter().min().unwrap();
    assert!(
        last_first < first_end,
        "first tokens at {:?}, first end at {:?}",
        firsts.iter().map(|t| *t - started).collect::<Vec<_>>(),
        *first_end - started
    );
    // The slow reader lost nothing while it was paused.
    let (pieces, end, _) = collect(slow).await;
    let n = completion_tokens(&end);
    assert!(n > 0);
    assert!(pieces.len() as u32 <= n && !pieces.is_empty());
    // Every sequence is handed back (just after the last event is delivered).
    for _ in 0..200 {
        if m.idle() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(m.idle(), "{:?}", m.status());
}
