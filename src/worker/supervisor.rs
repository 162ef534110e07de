//! Node side of the worker: start it by re-executing our own binary, restart it when it dies,
//! stop it on shutdown.
//!
//! The child gets a clean environment (only `PATH`, the log settings and the locale pass), no
//! stdin, the node's stdout and stderr, and `PR_SET_PDEATHSIG` so it is killed if the node dies
//! without stopping it (kill -9). It never shares the node's LMDB environment: LMDB forbids
//! using an environment after `fork`, which is why this is an exec and not a fork.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::health::NodeHealth;

/// A worker that stayed up this long is considered healthy; its next failure restarts quickly.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Environment variables the worker inherits; everything else is cleared.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "RUST_LOG",
    "EDGECODER_LOG",
    "LANG",
    "LC_ALL",
    "NO_COLOR",
    "JOURNAL_STREAM",
    "TZ",
];

/// How to start and stop the worker.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The binary to run (our own).
    pub exe: PathBuf,
    /// Arguments after the binary (`worker ...`).
    pub args: Vec<String>,
    /// First restart delay.
    pub backoff_min: Duration,
    /// Largest restart delay.
    pub backoff_max: Duration,
    /// SIGTERM-to-SIGKILL grace on shutdown.
    pub stop_grace: Duration,
}

fn spawn_child(cfg: &SupervisorConfig) -> std::io::Result<Child> {
    let mut cmd = Command::new(&cfg.exe);
    cmd.args(&cfg.args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for k in PASSED_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    let parent = std::process::id();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The node may have died between fork and prctl; then nobody would signal us.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends SIGTERM, waits `grace`, then SIGKILLs.
pub async fn stop(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        #[allow(unsafe_code)]
        // SAFETY: kill has no memory-safety preconditions; the pid is our own live child.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!("worker.stop did not exit after SIGTERM; killing");
        let _ = child.kill().await;
    }
}

/// Keeps a worker running until `token` is cancelled.
pub async fn supervise(cfg: SupervisorConfig, health: Arc<NodeHealth>, token: CancellationToken) {
    let mut backoff = cfg.backoff_min;
    loop {
        let mut child = match spawn_child(&cfg) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, exe = %cfg.exe.display(), "worker.spawn failed");
                if sleep_or_cancel(crate::worker::jitter(backoff), &token).await {
                    return;
                }
                backoff = (backoff * 2).min(cfg.backoff_max);
                continue;
            }
        };
        let pid = child.id().unwrap_or(0);
        health.set_worker_pid(pid);
        tracing::info!(pid, "worker started");
        let started = Instant::now();
        tokio::select! {
            status = child.wait() => {
                health.set_worker_pid(0);
                health.set_worker_registered(false);
                match status {
                    Ok(s) => tracing::warn!(status = %s, "worker exited; restarting"),
                    Err(e) => tracing::warn!(error = %e, "worker wait failed; restarting"),
                }
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = cfg.backoff_min;
                }
                health.count_worker_restart();
                if sleep_or_cancel(crate::worker::jitter(backoff), &token).await {
                    return;
                }
                backoff = (backoff * 2).min(cfg.backoff_max);
            }
            _ = token.cancelled() => {
                stop(&mut child, cfg.stop_grace).await;
                health.set_worker_pid(0);
                health.set_worker_registered(false);
                tracing::info!("worker stopped");
                return;
            }
        }
    }
}

/// Sleeps; returns true if cancelled first.
async fn sleep_or_cancel(d: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = token.cancelled() => true,
    }
}
