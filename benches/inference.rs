//! Inference overhead and concurrency against a real node on the same generated model in the
//! same run:
//! 1. tokens/s and time to first token of a direct in-process llama-cpp-2 loop, of the inference
//!    service (`POST /generate` on :4302, signed, streamed NDJSON) and of the IDE provider
//!    (`POST /v1/completions` on :4304, streamed SSE: a task through the coordinator, the worker
//!    and back), runs alternated;
//! 2. continuous batching: 1, 2, 4 and 10 concurrent streams on :4302, aggregate tokens/s;
//! 3. ten concurrent streaming IDE clients: every one's first token, rate and end;
//! 4. the node's memory with the model loaded.
//!
//! Run: `cargo bench --bench inference` (release build; writes a ~150 MB F16 model with ~76 M
//! parameters to a temporary directory); `BENCH_THREADS=1` runs llama.cpp on one thread on both
//! sides; `BENCH_SLOTS` sets the node's `inference.slots` (default 10; the ten-client run needs
//! room for ten). Figures go to docs/PERFORMANCE.md.

#[path = "../tests/common/gguf.rs"]
mod gguf;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgecoder::client::CoordinatorClient;
use edgecoder::coordinator::model::AgentView;
use edgecoder::identity::Identity;
use edgecoder::inference::api::{AddRequest, GenerateRequest, ModelView};
use edgecoder::node::NodeInfo;
use futures_util::StreamExt;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::sampling::LlamaSampler;

const PROMPT: &str = "def main ( ) : return the sum of a list of int values , and print it";
const TOKENS: u32 = 128;
const ROUNDS: usize = 5;
/// Sequences the node decodes together (enough for the ten-client run).
const SLOTS: usize = 10;
/// Tokens per stream in the concurrency runs.
const CONCURRENT_TOKENS: u32 = 64;

/// (time to first token, tokens per second after the first)
type Run = (Duration, f64);

fn direct(backend: &LlamaBackend, path: &Path, threads: i32) -> Vec<Run> {
    let model = LlamaModel::load_from_file(
        backend,
        path,
        &LlamaModelParams::default().with_n_gpu_layers(0),
    )
    .expect("load");
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(1024))
        .with_n_batch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(backend, params).expect("context");
    let vocab = model.vocab();
    let mut out = Vec::new();
    for _ in 0..ROUNDS {
        ctx.clear_kv_cache();
        let started = Instant::now();
        let toks = vocab.tokenize(PROMPT.as_bytes(), false, false);
        let mut batch = LlamaBatch::new(512, 1);
        for (i, t) in toks.iter().enumerate() {
            batch
                .add(*t, i as i32, &[0], i == toks.len() - 1)
                .expect("batch");
        }
        ctx.decode(&mut batch).expect("decode");
        let mut sampler = LlamaSampler::greedy();
        let mut first = None;
        let mut n = 0;
        let mut pos = toks.len() as i32;
        while n < TOKENS {
            let t = sampler.sample(&ctx, batch.n_tokens() - 1);
            sampler.accept(t);
            let _piece = vocab.token_to_piece(t, false, None);
            first.get_or_insert_with(Instant::now);
            n += 1;
            batch.clear();
            batch.add(t, pos, &[0], true).expect("batch");
            pos += 1;
            ctx.decode(&mut batch).expect("decode");
        }
        let first = first.expect("a token");
        out.push((
            first - started,
            f64::from(n - 1) / first.elapsed().as_secs_f64(),
        ));
    }
    out
}

/// Aggregate tokens/s of `n` sequences decoded together by a bare llama-cpp-2 loop, with the
/// node's context shape (`SLOTS` sequences of 1024 tokens): the ceiling for the scheduler.
fn direct_batched(backend: &LlamaBackend, model: &LlamaModel, threads: i32, n: usize) -> f64 {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(1024 * SLOTS as u32))
        .with_n_seq_max(SLOTS as u32)
        .with_kv_unified(false)
        .with_n_batch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(backend, params).expect("context");
    let vocab = model.vocab();
    let started = Instant::now();
    let mut batch = LlamaBatch::new(512, 1);
    let mut pos = Vec::new();
    for s in 0..n {
        let toks = vocab.tokenize(format!("{PROMPT} , variant {s}").as_bytes(), false, false);
        for (i, t) in toks.iter().enumerate() {
            batch
                .add(*t, i as i32, &[s as i32], i == toks.len() - 1)
                .expect("batch");
        }
        pos.push(toks.len() as i32);
    }
    ctx.decode(&mut batch).expect("decode");
    let mut samplers: Vec<_> = (0..n).map(|_| LlamaSampler::greedy()).collect();
    let mut idx: Vec<i32> = Vec::new();
    let mut acc = 0;
    for p in &pos {
        acc += *p;
        idx.push(acc - 1);
    }
    for _ in 0..CONCURRENT_TOKENS {
        let toks: Vec<_> = (0..n).map(|s| samplers[s].sample(&ctx, idx[s])).collect();
        batch.clear();
        for (s, t) in toks.iter().enumerate() {
            let _piece = vocab.token_to_piece(*t, false, None);
            batch.add(*t, pos[s], &[s as i32], true).expect("batch");
            pos[s] += 1;
            idx[s] = s as i32;
        }
        ctx.decode(&mut batch).expect("decode");
    }
    f64::from(CONCURRENT_TOKENS) * n as f64 / started.elapsed().as_secs_f64()
}

/// One stream's timeline: request sent, first token, last token, tokens generated.
#[derive(Clone, Copy)]
struct Stream {
    started: Instant,
    first: Instant,
    last: Instant,
    tokens: u32,
}

impl Stream {
    fn run(&self) -> Run {
        (
            self.first - self.started,
            f64::from(self.tokens.saturating_sub(1))
                / (self.last - self.first).as_secs_f64().max(1e-9),
        )
    }
}

/// One streamed `POST /generate` on :4302.
async fn generate_once(client: &CoordinatorClient, prompt: &str, tokens: u32) -> Stream {
    let req = GenerateRequest {
        model: "bench".into(),
        prompt: Some(prompt.into()),
        max_tokens: Some(tokens),
        temperature: Some(0.0),
        // No end-of-generation stop: random weights rarely emit it, and it must not cut runs short.
        ..Default::default()
    };
    let url = client.base().join("/generate").expect("url");
    let started = Instant::now();
    let resp = client
        .signed(
            reqwest::Method::POST,
            &url,
            serde_json::to_vec(&req).expect("json"),
            Duration::from_secs(600),
        )
        .send()
        .await
        .expect("generate");
    assert!(resp.status().is_success(), "generate: {}", resp.status());
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut first = None;
    let mut last = started;
    let mut n = 0u32;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.expect("stream"));
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let v: serde_json::Value = serde_json::from_slice(&line).expect("line");
            match v["type"].as_str() {
                Some("token") => {
                    first.get_or_insert_with(Instant::now);
                    last = Instant::now();
                }
                Some("done") => {
                    n = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32;
                    if std::env::var_os("BENCH_VERBOSE").is_some() {
                        eprintln!("engine timings {}", v["timings"]);
                    }
                }
                Some("error") => panic!("generation failed: {v}"),
                _ => {}
            }
        }
    }
    Stream {
        started,
        first: first.expect("a token"),
        last,
        tokens: n,
    }
}

/// One streamed `POST /v1/completions` on :4304 (usage in the last chunk).
async fn ide_once(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    prompt: &str,
    tokens: u32,
) -> Stream {
    let started = Instant::now();
    let resp = http
        .post(format!("{base}/v1/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({
            "model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .expect("completions");
    assert!(resp.status().is_success(), "completions: {}", resp.status());
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut first = None;
    let mut last = started;
    let mut n = 0u32;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.expect("stream"));
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buf.drain(..end + 2).collect();
            let data = std::str::from_utf8(&frame).expect("utf-8");
            let data = data.trim_end().strip_prefix("data: ").expect("data frame");
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data).expect("chunk");
            if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
            }
            if let Some(c) = v["usage"]["completion_tokens"].as_u64() {
                n = c as u32;
            }
        }
    }
    Stream {
        started,
        first: first.expect("a token"),
        last,
        tokens: n,
    }
}

/// `n` concurrent streams, each with its own prompt.
async fn concurrent<F, Fut>(n: usize, f: F) -> (Vec<Stream>, Duration)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Stream> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| tokio::spawn(f(format!("{PROMPT} , variant {i}"))))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("stream task"));
    }
    (out, started.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    // `cargo bench` passes harness flags such as --bench; nothing to configure.
    let dir = tempfile::tempdir().expect("tempdir");
    let model_path = dir.path().join("bench.gguf");
    let t0 = Instant::now();
    gguf::write(&model_path, &gguf::ModelSpec::bench());
    let size = std::fs::metadata(&model_path).expect("model").len();
    println!(
        "model: ~76 M parameters, {:.1} MiB, written in {:.1}s",
        size as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );

    // BENCH_THREADS sets llama.cpp's threads for both sides (default: every CPU).
    let threads = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
    let backend = LlamaBackend::init().expect("backend");
    let node_dir = dir.path().join("node");
    std::fs::create_dir_all(&node_dir).expect("node dir");
    let node = std::process::Command::new(env!("CARGO_BIN_EXE_edgecoder"))
        .args(["run", "--data-dir"])
        .arg(&node_dir)
        .args([
            "--host",
            "127.0.0.1",
            "--coordinator-port",
            "0",
            "--inference-port",
            "0",
        ])
        .args(["--control-plane-port", "0", "--ide-port", "0"])
        .args([
            "--set",
            &format!("inference.threads={threads}"),
            "--set",
            "inference.context=1024",
            "--set",
            &format!(
                "inference.slots={}",
                std::env::var("BENCH_SLOTS").unwrap_or(SLOTS.to_string())
            ),
            "--set",
            "worker.heartbeat_interval=\"200ms\"",
            "--set",
            "log=\"warn\"",
        ])
        .env("EDGECODER_INFERENCE__AUTO_PULL", "false")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("node");
    // Kill the node however this run ends (a failed assertion included).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let node = KillOnDrop(node);
    let node_pid = node.0.id();
    let info = loop {
        if let Ok(i) = NodeInfo::read(&node_dir)
            && i.pid == node_pid
        {
            break i;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let key = Arc::new(Identity::load(&node_dir.join("identity.key")).expect("key"));
    let client =
        CoordinatorClient::new(&format!("http://{}", info.inference), key.clone()).expect("client");
    rt.block_on(async {
        let _: ModelView = client
            .post(
                "/models/add",
                &AddRequest {
                    path: model_path.display().to_string(),
                    name: Some("bench".into()),
                },
            )
            .await
            .expect("add");
        let _: serde_json::Value = client
            .send::<(), serde_json::Value>(
                reqwest::Method::POST,
                "/models/bench/load",
                None,
                Some(Duration::from_secs(120)),
            )
            .await
            .expect("load")
            .body;
    });
    let rss_loaded = rss_mib(node_pid);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edgecoder"))
        .args(["apikey", "create", "--name", "bench", "--data-dir"])
        .arg(&node_dir)
        .output()
        .expect("apikey");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let api_key = String::from_utf8(out.stdout)
        .expect("key")
        .trim()
        .to_string();
    let ide_base = format!("http://{}", info.ide);
    let http = edgecoder::http::client_builder().build().expect("http");
    let coord = CoordinatorClient::new(&format!("http://{}", info.coordinator), key.clone())
        .expect("client");
    rt.block_on(async {
        // The worker advertises the model on its next heartbeat.
        for _ in 0..100 {
            let agents: Vec<AgentView> = coord.get("/agents").await.expect("agents");
            if agents
                .iter()
                .any(|a| a.live && a.capabilities.models.iter().any(|m| m == "bench"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the worker never advertised the model");
    });

    // Alternate the three so all see the same machine conditions; warm up each first.
    let service = |client: &CoordinatorClient| {
        rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..ROUNDS {
                v.push(generate_once(client, PROMPT, TOKENS).await.run());
            }
            v
        })
    };
    let ide = || {
        rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..ROUNDS {
                v.push(
                    ide_once(&http, &ide_base, &api_key, PROMPT, TOKENS)
                        .await
                        .run(),
                );
            }
            v
        })
    };
    let mut d_runs = Vec::new();
    let mut s_runs = Vec::new();
    let mut i_runs = Vec::new();
    let _ = direct(&backend, &model_path, threads);
    let _ = service(&client);
    let _ = ide();
    for _ in 0..3 {
        d_runs.extend(direct(&backend, &model_path, threads));
        s_runs.extend(service(&client));
        i_runs.extend(ide());
    }
    let rss_after = rss_mib(node_pid);
    let tps = |r: &[Run]| median(r.iter().map(|r| r.1).collect());
    let ttft = |r: &[Run]| median(r.iter().map(|r| r.0.as_secs_f64() * 1000.0).collect());
    let (d_tps, s_tps, i_tps) = (tps(&d_runs), tps(&s_runs), tps(&i_runs));
    let (d_ttft, s_ttft, i_ttft) = (ttft(&d_runs), ttft(&s_runs), ttft(&i_runs));
    println!(
        "threads {threads}, {TOKENS} tokens, greedy, {} runs each (median)",
        d_runs.len()
    );
    println!("direct llama-cpp-2 loop     : {d_tps:7.1} tok/s   first token {d_ttft:6.2} ms");
    println!("through :4302 /generate     : {s_tps:7.1} tok/s   first token {s_ttft:6.2} ms");
    println!("through :4304 /v1/completions: {i_tps:6.1} tok/s   first token {i_ttft:6.2} ms");
    println!(
        ":4302 vs direct             : {:5.1} % tokens/s, {:+.2} ms first token",
        s_tps / d_tps * 100.0,
        s_ttft - d_ttft
    );
    println!(
        ":4304 vs :4302              : {:5.1} % tokens/s, {:+.2} ms first token",
        i_tps / s_tps * 100.0,
        i_ttft - s_ttft
    );
    println!(
        "node RSS with the model loaded: {rss_loaded:.1} MiB idle after load, {rss_after:.1} MiB after generating; model file {:.1} MiB (mmap)",
        size as f64 / (1 << 20) as f64
    );

    // Continuous batching: aggregate rate of concurrent streams on :4302.
    println!("\nconcurrent streams on :4302, {CONCURRENT_TOKENS} tokens each ({SLOTS} sequences):");
    let mut single = 0.0;
    let bench_model = LlamaModel::load_from_file(
        &backend,
        &model_path,
        &LlamaModelParams::default().with_n_gpu_layers(0),
    )
    .expect("load");
    for n in [1usize, 2, 4, 10] {
        let bare = direct_batched(&backend, &bench_model, threads, n);
        let (streams, wall) = rt.block_on(concurrent(n, |p| {
            let client = client.clone();
            async move { generate_once(&client, &p, CONCURRENT_TOKENS).await }
        }));
        let total: u32 = streams.iter().map(|s| s.tokens).sum();
        let agg = f64::from(total) / wall.as_secs_f64();
        if n == 1 {
            single = agg;
        }
        let worst_ttft = streams
            .iter()
            .map(|s| (s.first - s.started).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max);
        println!(
            "  {n:2} streams: {agg:7.1} tok/s aggregate ({:.2}x one stream), slowest first token {worst_ttft:7.1} ms; bare llama-cpp-2 batch {bare:7.1} tok/s",
            agg / single
        );
    }

    // Ten IDE clients at once: all must progress, none may starve.
    let (streams, wall) = rt.block_on(concurrent(10, |p| {
        let (http, base, key) = (http.clone(), ide_base.clone(), api_key.clone());
        async move { ide_once(&http, &base, &key, &p, CONCURRENT_TOKENS).await }
    }));
    let last_first = streams.iter().map(|s| s.first).max().expect("streams");
    let first_end = streams.iter().map(|s| s.last).min().expect("streams");
    let ttfts: Vec<f64> = streams
        .iter()
        .map(|s| (s.first - s.started).as_secs_f64() * 1000.0)
        .collect();
    let rates: Vec<f64> = streams.iter().map(|s| s.run().1).collect();
    let total: u32 = streams.iter().map(|s| s.tokens).sum();
    println!("\nten concurrent streaming clients on :4304, {CONCURRENT_TOKENS} tokens each:");
    println!(
        "  completed {}/10, {total} tokens in {:.2} s ({:.1} tok/s aggregate)",
        streams.iter().filter(|s| s.tokens > 0).count(),
        wall.as_secs_f64(),
        f64::from(total) / wall.as_secs_f64()
    );
    println!(
        "  first token: fastest {:.1} ms, median {:.1} ms, slowest {:.1} ms",
        ttfts.iter().copied().fold(f64::MAX, f64::min),
        median(ttfts.clone()),
        ttfts.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "  per-client tok/s: slowest {:.1}, median {:.1}, fastest {:.1}",
        rates.iter().copied().fold(f64::MAX, f64::min),
        median(rates.clone()),
        rates.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "  every client had its first token before any client finished: {}",
        last_first < first_end
    );
    drop(node);
}
