//! Model downloads from a local HTTP server: interrupted downloads resume, a wrong sha256 stores
//! nothing, a truncated file is never stored, and the CLI shows the finished model.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use common::gguf::{ModelSpec, build};
use edgecoder::config::StoreConfig;
use edgecoder::inference::api::PullEvent;
use edgecoder::inference::models::{ModelError, ModelStore};
use sha2::{Digest, Sha256};

#[derive(Clone)]
struct Served {
    bytes: Arc<Vec<u8>>,
    /// Cut the connection after this many body bytes on the first N requests.
    cut_requests: Arc<AtomicUsize>,
    cut_at: usize,
    /// Ranges asked for, in order.
    ranges: Arc<std::sync::Mutex<Vec<Option<String>>>>,
    /// Serve the file truncated (and claim that length) instead.
    truncate_to: Option<usize>,
    /// Wait this long before answering.
    delay: std::time::Duration,
}

async fn serve_file(State(s): State<Served>, headers: HeaderMap) -> Response {
    tokio::time::sleep(s.delay).await;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    s.ranges.lock().unwrap().push(range.clone());
    let full = match s.truncate_to {
        Some(n) => s.bytes[..n].to_vec(),
        None => s.bytes.to_vec(),
    };
    let len = full.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok())
        .unwrap_or(0);
    let body_bytes = full[start.min(len)..].to_vec();
    let cut = s.cut_requests.load(Ordering::SeqCst) > 0;
    let body = if cut {
        s.cut_requests.fetch_sub(1, Ordering::SeqCst);
        let part = Bytes::from(body_bytes[..s.cut_at.min(body_bytes.len())].to_vec());
        // Send part of the body, then fail: the connection is dropped mid-response.
        // (a pause first, so the part is on the wire before the failure)
        let stream = futures_util::stream::unfold(0u8, move |step| {
            let part = part.clone();
            async move {
                match step {
                    0 => Some((Ok(part), 1)),
                    1 => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        Some((
                            Err(std::io::Error::other("connection cut by the test server")),
                            2,
                        ))
                    }
                    _ => None,
                }
            }
        });
        Body::from_stream(stream)
    } else {
        Body::from(body_bytes.clone())
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, body_bytes.len().into());
    h.insert(header::ACCEPT_RANGES, "bytes".parse().unwrap());
    if start > 0 {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        resp.headers_mut().insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len - 1).parse().unwrap(),
        );
    }
    resp
}

async fn server(s: Served) -> String {
    let app = axum::Router::new()
        .route("/models/{file}", axum::routing::get(serve_file))
        .with_state(s);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn served(bytes: Vec<u8>) -> Served {
    Served {
        bytes: Arc::new(bytes),
        cut_requests: Arc::new(AtomicUsize::new(0)),
        cut_at: 0,
        ranges: Arc::new(std::sync::Mutex::new(Vec::new())),
        truncate_to: None,
        delay: std::time::Duration::ZERO,
    }
}

fn model_store(dir: &std::path::Path) -> ModelStore {
    let store = edgecoder::store::Store::open(
        &dir.join("store"),
        &StoreConfig {
            map_size: 64 << 20,
            max_batch: 64,
            bulk_flush_interval: std::time::Duration::from_millis(50),
        },
    )
    .unwrap();
    ModelStore::new(dir.join("models"), store).unwrap()
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir.join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_resumes_where_it_stopped() {
    let bytes = build(&ModelSpec::tiny());
    let mut s = served(bytes.clone());
    s.cut_requests = Arc::new(AtomicUsize::new(1));
    s.cut_at = bytes.len() / 3;
    let ranges = s.ranges.clone();
    let base = server(s).await;
    let dir = tempfile::tempdir().unwrap();
    let models = model_store(dir.path());
    let url = format!("{base}/models/tiny.gguf");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let first = models.pull(&url, Some(&sha(&bytes)), None, &tx).await;
    let kept = match first {
        Err(ModelError::Interrupted { done, .. }) => done,
        other => panic!("expected an interruption, got {other:?}"),
    };
    assert_eq!(kept as usize, bytes.len() / 3);
    assert!(models.get("tiny").unwrap().is_none(), "nothing stored yet");
    // Same pull again: asks for the rest only, and stores the whole, verified file.
    let rec = models
        .pull(&url, Some(&sha(&bytes)), None, &tx)
        .await
        .unwrap();
    assert_eq!(rec.name, "tiny");
    assert_eq!(rec.sha256, sha(&bytes));
    assert_eq!(rec.size as usize, bytes.len());
    assert_eq!(std::fs::read(models.path("tiny")).unwrap(), bytes);
    assert_eq!(
        *ranges.lock().unwrap(),
        vec![None, Some(format!("bytes={kept}-"))],
        "the second request resumed at the kept length"
    );
    drop(tx);
    let mut resumed = false;
    while let Some(ev) = rx.recv().await {
        if let PullEvent::Progress { resumed_from, .. } = ev {
            resumed |= resumed_from == kept;
        }
    }
    assert!(resumed, "progress reported the resume point");
    assert_eq!(
        leftovers(dir.path()),
        vec!["tiny.gguf".to_string()],
        "no partial or source files left"
    );
    assert_eq!(models.list().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sha256_or_a_truncated_file_stores_nothing() {
    let bytes = build(&ModelSpec::tiny());
    let base = server(served(bytes.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let models = model_store(dir.path());
    let (tx, _rx) = tokio::sync::mpsc::channel(1024);
    let wrong = "0".repeat(64);
    let err = models
        .pull(&format!("{base}/models/tiny.gguf"), Some(&wrong), None, &tx)
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::Sha256Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("nothing was stored"));
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    assert!(models.list().unwrap().is_empty());

    // A server that sends a cut-short file (with a matching length): the GGUF check catches it.
    let mut s = served(bytes.clone());
    s.truncate_to = Some(bytes.len() - 100);
    let base = server(s).await;
    let err = models
        .pull(&format!("{base}/models/short.gguf"), None, None, &tx)
        .await
        .unwrap_err();
    assert!(matches!(err, ModelError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    assert!(models.list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pulls_into_a_running_node() {
    let bytes = build(&ModelSpec::tiny());
    let base = server(served(bytes.clone())).await;
    let node = common::Node::start(&[]);
    let dir = node.dir.to_str().unwrap().to_string();
    let url = format!("{base}/models/Tiny-Coder.gguf");
    let digest = sha(&bytes);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::BIN)
            .args([
                "model",
                "pull",
                &url,
                "--sha256",
                &digest,
                "--data-dir",
                &dir,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "tiny-coder");
    assert_eq!(v["info"]["architecture"], "llama");
    let dir = node.dir.to_str().unwrap().to_string();
    let list = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::BIN)
            .args(["model", "list", "--data-dir", &dir])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("tiny-coder") && text.contains("llama"),
        "{text}"
    );
    // The same name again is refused without touching the stored model.
    let dir = node.dir.to_str().unwrap().to_string();
    let url = format!("{base}/models/Tiny-Coder.gguf");
    let again = tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::BIN)
            .args(["model", "pull", &url, "--data-dir", &dir])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("model_exists"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_boot_pulls_the_default_model_or_explains_how_to_add_one() {
    let bytes = build(&ModelSpec::tiny());
    let base = server(served(bytes.clone())).await;
    let node = common::Node::start(&[
        "--set",
        "inference.auto_pull=true",
        "--set",
        &format!("inference.default_model=\"{base}/models/mirror-default.gguf\""),
    ]);
    let key =
        Arc::new(edgecoder::identity::Identity::load(&node.dir.join("identity.key")).unwrap());
    let inf = edgecoder::client::CoordinatorClient::new(&node.url("inference"), key).unwrap();
    let mut installed = Vec::new();
    for _ in 0..200 {
        installed = inf
            .get::<Vec<edgecoder::inference::api::ModelView>>("/models")
            .await
            .unwrap();
        if !installed.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        installed.len(),
        1,
        "the default model was pulled on first boot"
    );
    assert_eq!(installed[0].name, "mirror-default");
    assert_eq!(installed[0].sha256.as_deref(), Some(sha(&bytes).as_str()));

    // No network: the node still runs, and says how to add a model.
    let offline = common::Node::start(&[
        "--set",
        "inference.auto_pull=true",
        "--set",
        "inference.default_model=\"http://127.0.0.1:1/models/unreachable.gguf\"",
    ]);
    let mut hint = None;
    for _ in 0..200 {
        let st = common::get_json(&format!("{}/status", offline.url("inference"))).unwrap();
        if let Some(h) = st["hint"].as_str() {
            hint = Some(h.to_string());
        }
        if offline.log().contains("could not be downloaded") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(hint.unwrap().contains("edgecoder model pull"));
    assert!(
        offline.log().contains("edgecoder model add"),
        "{}",
        offline.log()
    );
    assert_eq!(
        common::get_json(&format!("{}/health", offline.coordinator())).unwrap()["status"],
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_name_and_bad_requests_are_refused() {
    let bytes = build(&ModelSpec::tiny());
    let mut s = served(bytes.clone());
    s.delay = std::time::Duration::from_millis(500);
    let base = server(s).await;
    let dir = tempfile::tempdir().unwrap();
    let models = model_store(dir.path());
    let url = format!("{base}/models/slow.gguf");
    let (tx, _rx) = tokio::sync::mpsc::channel(1024);
    let (tx2, _rx2) = tokio::sync::mpsc::channel(1024);
    let first = models.pull(&url, None, None, &tx);
    let second = async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        models.pull(&url, None, None, &tx2).await
    };
    let (a, b) = tokio::join!(first, second);
    assert_eq!(a.unwrap().name, "slow");
    let err = b.unwrap_err();
    assert_eq!(err.code(), "model_busy", "{err}");
    // Malformed requests are the caller's error, not a download failure.
    let err = models
        .pull(&url, Some("abc"), Some("x"), &tx)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    let err = models
        .pull("ftp://example/x.gguf", None, Some("x"), &tx)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    let err = models
        .add_file(std::path::Path::new("/nonexistent/x.gguf"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    // A failed request before any byte leaves no bookkeeping files behind.
    let err = models
        .pull("http://127.0.0.1:1/models/gone.gguf", None, None, &tx)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "download_failed");
    assert_eq!(
        leftovers(dir.path()),
        vec!["slow.gguf".to_string()],
        "{:?}",
        leftovers(dir.path())
    );
}
