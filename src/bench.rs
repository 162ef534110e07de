//! `edgecoder bench`: end-to-end measurements of a real node, reported in docs/PERFORMANCE.md.
//!
//! Every benchmark starts fresh node processes (this same binary) on loopback with port 0 and a
//! temporary data directory, and drives them over real HTTP with signed requests, exactly as
//! users do. Nothing here is used by the node itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::client::CoordinatorClient;
use crate::coordinator::model::{SubmitTask, TaskView};
use crate::identity::Identity;
use crate::node::NodeInfo;

/// A node started for a benchmark; killed and its directory removed on drop.
struct BenchNode {
    child: Child,
    /// Removed on drop, unless the directory is reused for restarts.
    remove: Option<PathBuf>,
    info: NodeInfo,
}

impl Drop for BenchNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.remove {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let n = u64::from_le_bytes(crate::clock::random_bytes::<8>());
    std::env::temp_dir().join(format!(
        "edgecoder-bench-{tag}-{}-{n:x}",
        std::process::id()
    ))
}

fn spawn_node(exe: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<Child> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.join("bench-node.log"))?;
    Ok(Command::new(exe)
        .arg("run")
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--host",
            "127.0.0.1",
            "--coordinator-port",
            "0",
            "--inference-port",
            "0",
        ])
        .args([
            "--control-plane-port",
            "0",
            "--ide-port",
            "0",
            "--set",
            "log=\"warn\"",
        ])
        .args(extra)
        // Benchmarks never download the default model.
        .env("EDGECODER_INFERENCE__AUTO_PULL", "false")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// A raw HTTP/1.1 GET over a fresh connection; the cheapest probe there is, so polling it
/// every millisecond measures the node, not the poller.
fn health_operational(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    if write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.contains("\"operational\":true")
}

/// Spawns a node and measures the time until `/health` reports it fully operational.
fn start_timed(exe: &Path, dir: &Path, keep_dir: bool) -> anyhow::Result<(BenchNode, Duration)> {
    start_with(exe, dir, keep_dir, &[])
}

fn start_with(
    exe: &Path,
    dir: &Path,
    keep_dir: bool,
    extra: &[&str],
) -> anyhow::Result<(BenchNode, Duration)> {
    let started = Instant::now();
    let child = spawn_node(exe, dir, extra)?;
    let pid = child.id();
    let mut node = None;
    while started.elapsed() < Duration::from_secs(30) {
        if node.is_none() {
            node = NodeInfo::read(dir).ok().filter(|i| i.pid == pid);
        }
        if let Some(info) = &node
            && health_operational(info.coordinator)
        {
            let took = started.elapsed();
            let info = info.clone();
            return Ok((
                BenchNode {
                    child,
                    remove: (!keep_dir).then(|| dir.to_path_buf()),
                    info,
                },
                took,
            ));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    bail!(
        "node in {} did not become operational within 30s",
        dir.display()
    )
}

fn stop(mut n: BenchNode) -> anyhow::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: kill on our own child's pid.
    unsafe {
        libc::kill(n.child.id() as libc::pid_t, libc::SIGTERM);
    }
    n.child.wait()?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Boot to fully operational: `runs` first boots (fresh directory: keys and store created) and
/// `runs` restarts of an existing directory.
///
/// # Errors
/// A node that does not start.
pub fn boot(exe: &Path, runs: usize) -> anyhow::Result<()> {
    let mut fresh = Vec::new();
    let mut warm = Vec::new();
    let dir = scratch_dir("boot");
    for i in 0..runs {
        let (n, t) = start_timed(exe, &dir.join(format!("fresh-{i}")), false)?;
        fresh.push(t);
        stop(n)?;
    }
    let keep = dir.join("warm");
    let (n, _) = start_timed(exe, &keep, true)?;
    stop(n)?;
    for _ in 0..runs {
        let (n, t) = start_timed(exe, &keep, true)?;
        warm.push(t);
        stop(n)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    fresh.sort();
    warm.sort();
    println!("boot to fully operational ({runs} runs each)");
    println!(
        "  first boot (creates keys and store): median {}  min {}  max {}",
        ms(percentile(&fresh, 0.5)),
        ms(fresh[0]),
        ms(fresh[fresh.len() - 1])
    );
    println!(
        "  restart (existing data directory):   median {}  min {}  max {}",
        ms(percentile(&warm, 0.5)),
        ms(warm[0]),
        ms(warm[warm.len() - 1])
    );
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Proportional set size: shared pages (the binary, libc) split between the processes that map
/// them, so node + worker adds up to what the pair really costs.
fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident memory of the node and its worker after `settle` of idling.
///
/// # Errors
/// A node that does not start.
pub fn idle(exe: &Path, settle: Duration) -> anyhow::Result<()> {
    let dir = scratch_dir("idle");
    let (n, _) = start_timed(exe, &dir, false)?;
    std::thread::sleep(settle);
    let status: serde_json::Value = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(n.info.coordinator)?;
        write!(
            s,
            "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        serde_json::from_str(body).context("status JSON")?
    };
    let worker = status["worker"]["pid"].as_u64().context("worker pid")? as u32;
    let node_kib = rss_kib(n.child.id()).context("node RSS")?;
    let worker_kib = rss_kib(worker).context("worker RSS")?;
    let node_pss = pss_kib(n.child.id()).unwrap_or(0);
    let worker_pss = pss_kib(worker).unwrap_or(0);
    let mib = |k: u64| k as f64 / 1024.0;
    println!("idle memory after {}s    RSS         PSS", settle.as_secs());
    println!(
        "  node           {:6.1} MiB  {:6.1} MiB",
        mib(node_kib),
        mib(node_pss)
    );
    println!(
        "  worker         {:6.1} MiB  {:6.1} MiB",
        mib(worker_kib),
        mib(worker_pss)
    );
    println!(
        "  total          {:6.1} MiB  {:6.1} MiB",
        mib(node_kib + worker_kib),
        mib(node_pss + worker_pss)
    );
    stop(n)
}

/// How a benchmark client gets its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `POST /tasks`, then `GET /tasks/{id}/result?wait=30s`: two requests per task.
    SubmitThenWait,
    /// `POST /tasks?wait=30s`: the answer carries the result, one request per task.
    SubmitAndWait,
}

/// End-to-end probe throughput and latency: `clients` concurrent loops of submit and wait for the
/// result, for `duration` after `warmup`, in each mode.
///
/// # Errors
/// A node that does not start, or requests that fail.
pub async fn throughput(
    exe: &Path,
    clients: &[usize],
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<()> {
    for mode in [Mode::SubmitThenWait, Mode::SubmitAndWait] {
        for &n in clients {
            throughput_one(exe, n, mode, duration, warmup).await?;
        }
    }
    Ok(())
}

async fn throughput_one(
    exe: &Path,
    n_clients: usize,
    mode: Mode,
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<()> {
    {
        let dir = scratch_dir("tput");
        let exe = exe.to_path_buf();
        let d2 = dir.clone();
        let (node, _) =
            tokio::task::spawn_blocking(move || start_timed(&exe, &d2, false)).await??;
        let id = Arc::new(Identity::load(&dir.join("identity.key"))?);
        let url = format!("http://{}", node.info.coordinator);
        let start_at = Instant::now() + warmup;
        let stop_at = start_at + duration;
        let mut handles = Vec::new();
        for _ in 0..n_clients {
            let client = CoordinatorClient::new(&url, id.clone())?;
            handles.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let req = SubmitTask::probe(serde_json::json!({"echo": 1}));
                while Instant::now() < stop_at {
                    let t0 = Instant::now();
                    let state = match mode {
                        Mode::SubmitThenWait => {
                            let task: TaskView = client.post("/tasks", &req).await?;
                            let path = format!("/tasks/{}/result?wait=30s", task.id);
                            let r: serde_json::Value = client.get(&path).await?;
                            r["state"].clone()
                        }
                        Mode::SubmitAndWait => {
                            let task: TaskView = client.post("/tasks?wait=30s", &req).await?;
                            serde_json::json!(task.result.map(|r| r.state))
                        }
                    };
                    if state != "succeeded" {
                        bail!("probe ended {state}");
                    }
                    if t0 >= start_at && Instant::now() <= stop_at {
                        lat.push(t0.elapsed());
                    }
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await??);
        }
        all.sort();
        let rate = all.len() as f64 / duration.as_secs_f64();
        println!(
            "probe end-to-end, {}, {n_clients} client{}: {:.0} tasks/s  p50 {}  p99 {}  ({} tasks in {}s)",
            match mode {
                Mode::SubmitThenWait => "submit + result?wait",
                Mode::SubmitAndWait => "submit?wait",
            },
            if n_clients == 1 { "" } else { "s" },
            rate,
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            all.len(),
            duration.as_secs()
        );
        tokio::task::spawn_blocking(move || stop(node)).await??;
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Added latency of a task run on a mesh peer: three real nodes on this machine. A has no
/// worker, so each probe submitted there is offered to B and C, claimed by one of them, run by
/// its worker and reported back; the baseline is the same probe submitted to B and run by its
/// own worker. `POST /tasks?wait=` per task, one at a time, the two kinds alternated.
///
/// # Errors
/// A node that does not start, a mesh that does not form, a probe that fails.
pub async fn mesh(exe: &Path, tasks: usize) -> anyhow::Result<()> {
    let fast = [
        "--set",
        "mesh.probe_period=\"500ms\"",
        "--set",
        "mesh.sync_interval=\"2s\"",
    ];
    let exe = exe.to_path_buf();
    let dir_a = scratch_dir("mesh-a");
    let (e, d) = (exe.clone(), dir_a.clone());
    let (a, _) = tokio::task::spawn_blocking(move || {
        let mut args = fast.to_vec();
        args.extend(["--set", "worker.enabled=false"]);
        start_with(&e, &d, false, &args)
    })
    .await??;
    let a_url = format!("http://{}", a.info.coordinator);
    let mut peers = Vec::new();
    for tag in ["mesh-b", "mesh-c"] {
        let dir = scratch_dir(tag);
        let (e, d, a_url) = (exe.clone(), dir.clone(), a_url.clone());
        let (n, _) = tokio::task::spawn_blocking(move || {
            let bootstrap = format!("mesh.bootstrap_urls=[\"{a_url}\"]");
            let mut args = fast.to_vec();
            args.extend(["--set", bootstrap.as_str()]);
            start_with(&e, &d, false, &args)
        })
        .await??;
        peers.push((n, dir));
    }
    let http = crate::http::client_builder().build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caps: Vec<crate::mesh::service::CapsView> = http
            .get(format!("{a_url}/mesh/capabilities"))
            .send()
            .await?
            .json()
            .await?;
        if caps.iter().filter(|c| c.free_slots > 0).count() >= 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the three nodes did not form a mesh within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a_client = CoordinatorClient::new(
        &a_url,
        Arc::new(Identity::load(&dir_a.join("identity.key"))?),
    )?;
    let b_dir = &peers[0].1;
    let b_client = CoordinatorClient::new(
        &format!("http://{}", peers[0].0.info.coordinator),
        Arc::new(Identity::load(&b_dir.join("identity.key"))?),
    )?;
    let req = SubmitTask::probe(serde_json::json!({"echo": 1}));
    let run = |c: &CoordinatorClient| {
        let c = c.clone();
        let req = req.clone();
        async move {
            let t0 = Instant::now();
            let task: TaskView = c.post("/tasks?wait=30s", &req).await?;
            let state = task.result.map(|r| r.state);
            if state != Some(crate::coordinator::model::TaskState::Succeeded) {
                bail!("probe ended {state:?}");
            }
            Ok::<_, anyhow::Error>(t0.elapsed())
        }
    };
    // Warm up both paths (connections, sessions with the origin).
    for _ in 0..10 {
        run(&a_client).await?;
        run(&b_client).await?;
    }
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for _ in 0..tasks {
        local.push(run(&b_client).await?);
        remote.push(run(&a_client).await?);
    }
    local.sort();
    remote.sort();
    let p = |v: &[Duration], q| percentile(v, q);
    println!(
        "probe run locally (submitted to B, B's worker):   p50 {}  p99 {}  ({tasks} tasks)",
        ms(p(&local, 0.5)),
        ms(p(&local, 0.99))
    );
    println!(
        "probe run on a peer (submitted to A, no worker):  p50 {}  p99 {}  ({tasks} tasks)",
        ms(p(&remote, 0.5)),
        ms(p(&remote, 0.99))
    );
    println!(
        "added by the mesh: p50 +{}  p99 +{}",
        ms(p(&remote, 0.5).saturating_sub(p(&local, 0.5))),
        ms(p(&remote, 0.99).saturating_sub(p(&local, 0.99)))
    );
    let stats: Vec<crate::mesh::service::MeshStats> = {
        let mut v = Vec::new();
        for (n, _) in &peers {
            v.push(
                http.get(format!("http://{}/mesh/stats", n.info.coordinator))
                    .send()
                    .await?
                    .json()
                    .await?,
            );
        }
        v
    };
    println!(
        "claims won by B and C: {} and {}; lost races: {}",
        stats[0].claims_won,
        stats[1].claims_won,
        stats[0].claims_lost + stats[1].claims_lost
    );
    drop(a);
    for (n, d) in peers {
        drop(n);
        let _ = std::fs::remove_dir_all(d);
    }
    let _ = std::fs::remove_dir_all(dir_a);
    Ok(())
}
