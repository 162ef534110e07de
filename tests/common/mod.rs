//! Test harness: starts the real `edgecoder` binary on port 0 with a temporary data directory and
//! talks to it over real HTTP.
#![allow(dead_code, clippy::unwrap_used)]

pub mod gguf;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgecoder::client::CoordinatorClient;
use edgecoder::coordinator::model::*;
use edgecoder::identity::Identity;
use edgecoder::node::NodeInfo;

pub const BIN: &str = env!("CARGO_BIN_EXE_edgecoder");

/// A node process under test.
pub struct Node {
    pub dir: PathBuf,
    pub child: Child,
    pub info: NodeInfo,
    pub extra: Vec<String>,
    pub _tmp: Option<tempfile::TempDir>,
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the `edgecoder` command line with `args`; panics with its stderr unless it succeeds.
pub fn cli<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> std::process::Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "edgecoder failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A plain blocking HTTP GET (safe to call from inside a tokio runtime): status and body.
pub fn get(url: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// GET returning JSON.
pub fn get_json(url: &str) -> Option<serde_json::Value> {
    get(url).and_then(|(_, b)| serde_json::from_str(&b).ok())
}

impl Node {
    /// Starts a node in a fresh temporary directory.
    pub fn start(extra: &[&str]) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut n = Node::start_in(&dir, extra);
        n._tmp = Some(tmp);
        n
    }

    /// Starts a node on an existing data directory (restarts).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Node {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = spawn(dir, &extra, &[]);
        let info = wait_ready(dir, &child);
        Node {
            dir: dir.to_path_buf(),
            child,
            info,
            extra,
            _tmp: None,
        }
    }

    pub fn url(&self, service: &str) -> String {
        let addr = match service {
            "coordinator" => self.info.coordinator,
            "inference" => self.info.inference,
            "control_plane" => self.info.control_plane,
            "ide" => self.info.ide,
            other => panic!("no service {other}"),
        };
        format!("http://{addr}")
    }

    pub fn coordinator(&self) -> String {
        self.url("coordinator")
    }

    /// A client signing with the node's own key.
    pub fn client(&self) -> CoordinatorClient {
        let id = Identity::load(&self.dir.join("identity.key")).unwrap();
        CoordinatorClient::new(&self.coordinator(), Arc::new(id)).unwrap()
    }

    pub fn status(&self) -> serde_json::Value {
        get_json(&format!("{}/status", self.coordinator())).expect("status answers")
    }

    pub fn worker_pid(&self) -> Option<u32> {
        self.status()["worker"]["pid"].as_u64().map(|p| p as u32)
    }

    /// Waits until the worker (re)registered with a pid other than `not`.
    pub fn wait_worker(&self, not: Option<u32>) -> u32 {
        wait_for("worker registration", Duration::from_secs(20), || {
            let s = self.status();
            let pid = s["worker"]["pid"].as_u64().map(|p| p as u32)?;
            (s["worker"]["registered"] == true && Some(pid) != not).then_some(pid)
        })
    }

    /// Starts the node again on the same directory with the same arguments (after it stopped).
    pub fn restart(&mut self) {
        let _ = self.child.wait();
        self.child = spawn(&self.dir, &self.extra, &[]);
        self.info = wait_ready(&self.dir, &self.child);
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        signal(self.child.id(), libc_sigterm());
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                panic!("node did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("test-node.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn libc_sigterm() -> i32 {
    15
}

pub fn signal(pid: u32, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; check its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.split_whitespace().nth(2).is_none_or(|st| st != "Z"),
        Err(_) => false,
    }
}

/// Loopback and port 0 for whatever `extra` does not set itself.
fn defaults(extra: &[String]) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (flag, value) in [
        ("--host", "127.0.0.1"),
        ("--coordinator-port", "0"),
        ("--inference-port", "0"),
        ("--control-plane-port", "0"),
        ("--ide-port", "0"),
    ] {
        if !extra.iter().any(|a| a == flag) {
            out.extend([flag, value]);
        }
    }
    out
}

pub fn spawn(dir: &Path, extra: &[String], env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("test-node.log"))
        .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .arg("--data-dir")
        .arg(dir)
        .args(defaults(extra))
        .args(extra)
        .env("NO_COLOR", "1")
        // Tests never download the default model.
        .env("EDGECODER_INFERENCE__AUTO_PULL", "false")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

pub fn wait_ready(dir: &Path, child: &Child) -> NodeInfo {
    let pid = child.id();
    let info = wait_for("node.json", Duration::from_secs(20), || {
        NodeInfo::read(dir).ok().filter(|i| i.pid == pid)
    });
    wait_for("operational", Duration::from_secs(20), || {
        let v = get_json(&format!("http://{}/health", info.coordinator))?;
        (v["operational"] == true).then_some(())
    });
    info
}

/// Submits a probe and returns its id.
pub async fn submit_probe(c: &CoordinatorClient, payload: serde_json::Value) -> TaskId {
    let v: TaskView = c.post("/tasks", &SubmitTask::probe(payload)).await.unwrap();
    v.id
}

/// Waits for a task's result.
pub async fn wait_result(c: &CoordinatorClient, id: TaskId) -> ResultView {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ans = c
            .send::<(), serde_json::Value>(
                reqwest::Method::GET,
                &format!("/tasks/{id}/result?wait=20s"),
                None,
                Some(Duration::from_secs(30)),
            )
            .await;
        match ans {
            Ok(a) if a.status == reqwest::StatusCode::OK => {
                return serde_json::from_value(a.body).unwrap();
            }
            Ok(_) => {}
            // The node may be restarting under the test.
            Err(e) if e.status().is_none() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("waiting for {id}: {e}"),
        }
        assert!(Instant::now() < deadline, "no result for {id} within 60s");
    }
}

/// Polls a task until `pred` holds.
pub async fn wait_task(
    c: &CoordinatorClient,
    id: TaskId,
    what: &str,
    pred: impl Fn(&TaskView) -> bool,
) -> TaskView {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: TaskView = c.get(&format!("/tasks/{id}")).await.unwrap();
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} never became {what}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a separate deployment (`edgecoder anchor-proxy ...`, `edgecoder portal ...`) with
/// `args`, its output appended to `<dir>/service.log`, `EDGECODER_CONFIG` unset.
pub fn spawn_service(dir: &Path, args: &[String], env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("service.log"))
        .unwrap();
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("EDGECODER_CONFIG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits until the deployment started by [`spawn_service`] in `dir` has written `info_file`
/// with its pid; returns its base URL. Panics with its log if it exits or takes 20 s.
pub fn wait_service(dir: &Path, info_file: &Path, child: &mut Child) -> String {
    let log = || std::fs::read_to_string(dir.join("service.log")).unwrap_or_default();
    let start = Instant::now();
    loop {
        if let Ok(i) = edgecoder::standalone::ServiceInfo::read(info_file)
            && i.pid == child.id()
        {
            return format!("http://{}", i.listen);
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("{} exited ({s}):\n{}", info_file.display(), log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} did not start:\n{}",
            info_file.display(),
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
