//! Inference overhead: tokens/s and time to first token through a real node's inference service
//! (`POST /generate` on :4302, signed, streamed NDJSON) against a direct in-process llama-cpp-2
//! loop on the same generated model in the same run; and the node's memory with the model loaded.
//!
//! Run: `cargo bench --bench inference` (release build; writes a ~150 MB F16 model with ~76 M
//! parameters to a temporary directory); `BENCH_THREADS=1` runs llama.cpp on one thread on both
//! sides. Figures go to docs/PERFORMANCE.md.

#[path = "../tests/common/gguf.rs"]
mod gguf;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgecoder::client::CoordinatorClient;
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

async fn service(client: &CoordinatorClient) -> Vec<Run> {
    let mut out = Vec::new();
    for _ in 0..ROUNDS {
        let req = GenerateRequest {
            model: "bench".into(),
            prompt: Some(PROMPT.into()),
            max_tokens: Some(TOKENS),
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
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        let mut first = None;
        let mut last = started;
        let mut tokens = 0u32;
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
                        tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32;
                        if std::env::var_os("BENCH_VERBOSE").is_some() {
                            eprintln!("engine timings {}", v["timings"]);
                        }
                    }
                    _ => {}
                }
            }
        }
        let first = first.expect("a token");
        out.push((
            first - started,
            f64::from(tokens.saturating_sub(1)) / (last - first).as_secs_f64().max(1e-9),
        ));
    }
    out
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
    let mut node = std::process::Command::new(env!("CARGO_BIN_EXE_edgecoder"))
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
            "log=\"warn\"",
        ])
        .env("EDGECODER_INFERENCE__AUTO_PULL", "false")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("node");
    let info = loop {
        if let Ok(i) = NodeInfo::read(&node_dir)
            && i.pid == node.id()
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
        CoordinatorClient::new(&format!("http://{}", info.inference), key).expect("client");
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
    let rss_loaded = rss_mib(node.id());

    // Alternate the two so both see the same machine conditions; warm up each first.
    let mut d_runs = Vec::new();
    let mut s_runs = Vec::new();
    let _ = direct(&backend, &model_path, threads);
    let _ = rt.block_on(service(&client));
    for _ in 0..3 {
        d_runs.extend(direct(&backend, &model_path, threads));
        s_runs.extend(rt.block_on(service(&client)));
    }
    let rss_after = rss_mib(node.id());
    let d_tps = median(d_runs.iter().map(|r| r.1).collect());
    let s_tps = median(s_runs.iter().map(|r| r.1).collect());
    let d_ttft = median(d_runs.iter().map(|r| r.0.as_secs_f64() * 1000.0).collect());
    let s_ttft = median(s_runs.iter().map(|r| r.0.as_secs_f64() * 1000.0).collect());
    println!(
        "threads {threads}, {TOKENS} tokens, greedy, {} runs each (median)",
        d_runs.len()
    );
    println!("direct llama-cpp-2 loop : {d_tps:7.1} tok/s   first token {d_ttft:6.2} ms");
    println!("through :4302 /generate : {s_tps:7.1} tok/s   first token {s_ttft:6.2} ms");
    println!("service/direct tokens/s : {:.1} %", s_tps / d_tps * 100.0);
    println!("added to first token    : {:.2} ms", s_ttft - d_ttft);
    println!(
        "node RSS with the model loaded: {rss_loaded:.1} MiB idle after load, {rss_after:.1} MiB after generating; model file {:.1} MiB (mmap)",
        size as f64 / (1 << 20) as f64
    );
    let _ = node.kill();
    let _ = node.wait();
}
