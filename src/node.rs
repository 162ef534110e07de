//! Boot and shutdown of a node: the only place that wires services together.
//!
//! Boot (DESIGN.md §4): lock the data directory, open the store, load or create the node key and
//! the local worker's key, build the services, bind all four listeners (failing fast, naming the
//! port, if one is taken), write `node.json` (pid and bound addresses, for the CLI and tests), start
//! serving, spawn the worker, start background loops, then tell systemd `READY=1` and start the
//! watchdog. `/health` says "ok" once the worker has registered.
//!
//! Shutdown on SIGTERM or SIGINT: `STOPPING=1`; stop accepting and give in-flight requests
//! `http.drain_timeout`; stop the worker (SIGTERM, `worker.stop_grace`, SIGKILL); stop background
//! loops; let the store writer commit its last batch; remove `node.json`; exit 0. A service task
//! that ends on its own is fatal: the node shuts down the same way and exits non-zero, so systemd
//! restarts it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::health::NodeHealth;
use crate::identity::{Identity, IdentityError};
use crate::metrics::ProcessMetrics;
use crate::security::ratelimit::RateLimits;
use crate::store::{Store, StoreError};
use crate::systemd::Notifier;
use crate::worker::supervisor::{SupervisorConfig, supervise};

/// How often the hardware is read again.
const HARDWARE_REFRESH: Duration = Duration::from_secs(30);

fn detect_hardware() -> crate::hw::HwInfo {
    crate::hw::detect(
        Path::new("/"),
        crate::hw::this_arch(),
        &crate::hw::nvml::NvmlProbe,
    )
}

/// How often idle rate-limit buckets are dropped.
const LIMITER_SWEEP: Duration = Duration::from_secs(60);

/// Boot and runtime failures.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Another process holds the data directory.
    #[error("data directory {0} is in use by another edgecoder node (see its node.json)")]
    Locked(PathBuf),
    /// File system trouble with the data directory.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key could not be loaded.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A listener could not be bound.
    #[error("{0}")]
    Bind(std::io::Error),
    /// The inference service could not start.
    #[error("inference: {0}")]
    Inference(String),
    /// A service stopped on its own.
    #[error("service {service} stopped unexpectedly: {reason}")]
    ServiceDied {
        /// Which.
        service: &'static str,
        /// Why.
        reason: String,
    },
}

/// Runtime information written to `<data_dir>/node.json` while the node runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node process id.
    pub pid: u32,
    /// Node id.
    pub node_id: String,
    /// Coordinator address.
    pub coordinator: SocketAddr,
    /// Inference address.
    pub inference: SocketAddr,
    /// Control plane address.
    pub control_plane: SocketAddr,
    /// IDE provider address.
    pub ide: SocketAddr,
    /// When the node started (ms since the epoch).
    pub started_ms: u64,
}

impl NodeInfo {
    /// Reads `node.json` from a data directory.
    ///
    /// # Errors
    /// Missing or unreadable file.
    pub fn read(data_dir: &Path) -> std::io::Result<NodeInfo> {
        let text = std::fs::read_to_string(data_dir.join("node.json"))?;
        serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// The URL clients on this machine use for the coordinator.
    pub fn coordinator_url(&self) -> String {
        format!("http://{}", local_addr(self.coordinator))
    }
}

/// Where a client on this machine reaches a listener: the wildcard address becomes loopback.
pub fn local_addr(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        let ip = match a.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, a.port())
    } else {
        a
    }
}

/// The node's key file in a data directory.
pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("identity.key")
}

/// The local worker's key file in a data directory.
pub fn worker_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("worker").join("agent.key")
}

/// Holds an exclusive lock on the data directory for the life of the node.
pub(crate) struct DirLock {
    // Held, never read: the flock lasts as long as the descriptor stays open.
    _file: std::fs::File,
}

pub(crate) fn lock_data_dir(dir: &Path) -> Result<DirLock, NodeError> {
    let io = |source| NodeError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("node.lock"))
        .map_err(io)?;
    use std::os::fd::AsRawFd;
    #[allow(unsafe_code)]
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(NodeError::Locked(dir.to_path_buf()));
    }
    Ok(DirLock { _file: f })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Runs a node until SIGTERM/SIGINT (or `stop` is cancelled). `exe` is the binary to run the
/// worker with (normally our own).
///
/// # Errors
/// Boot failures, or a service that stopped on its own.
pub async fn run(mut cfg: Config, exe: PathBuf, stop: CancellationToken) -> Result<(), NodeError> {
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let notifier = Notifier::from_env();
    let store = Store::open(&cfg.data_dir.join("store"), &cfg.store)?;
    let (identity, created) = Identity::load_or_create(&identity_path(&cfg.data_dir))?;
    if created {
        tracing::info!(node_id = %identity.node_id(), "node.boot created a new node identity");
    }
    let worker_key = if cfg.worker.enabled {
        let (k, _) = Identity::load_or_create(&worker_key_path(&cfg.data_dir))?;
        Some(k.key_id())
    } else {
        None
    };
    let health = Arc::new(NodeHealth::new(identity.node_id(), cfg.worker.enabled));
    let process = ProcessMetrics::new(Some(store.clone()));
    // What the box is: read once before the worker starts (it advertises the class), then
    // re-read on a timer (thermal throttling, memory taken by other processes).
    let hw = tokio::task::spawn_blocking(detect_hardware)
        .await
        .map_err(|e| NodeError::Inference(format!("hardware detection: {e}")))?;
    tracing::info!(
        board = %hw.board,
        model = %hw.model,
        class = ?hw.class,
        budget_mib = hw.capacity.model_memory_budget >> 20,
        slots = hw.capacity.slots,
        threads = hw.capacity.threads,
        "node.hardware detected"
    );
    for d in hw.degraded.iter().chain(hw.capacity.derated.iter()) {
        tracing::warn!(problem = %d, "node.hardware degraded");
    }
    let resource_class = hw.class;
    // Unset (0) inference sizes come from the capacity: slots from the memory budget, threads
    // from the physical cores (halved while the box throttles at boot).
    if cfg.inference.slots == 0 {
        cfg.inference.slots = hw.capacity.slots.clamp(1, 64);
    }
    if cfg.inference.threads == 0 {
        cfg.inference.threads = hw.capacity.threads.max(1);
    }
    *process
        .hardware()
        .write()
        .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(hw));
    let limits = Arc::new(RateLimits::from_config(&cfg.security));

    // Tokens: `services` stops background loops and long polls; `serve` stops accepting.
    let tracker = TaskTracker::new();
    let services = CancellationToken::new();
    let serve = CancellationToken::new();
    let worker_token = CancellationToken::new();

    // One replay cache for every signed port: a nonce is spent wherever it was first used.
    let nonces = Arc::new(crate::security::nonce::NonceCache::load(
        store.clone(),
        cfg.security.nonce_cache_max,
        crate::clock::now_ms() / 1000,
    )?);
    let mesh_slot = crate::mesh::service::MeshSlot::default();
    let identity = Arc::new(identity);
    let mut coordinator = crate::coordinator::spawn(
        &cfg,
        store.clone(),
        &identity,
        worker_key,
        health.clone(),
        process.clone(),
        limits.clone(),
        nonces.clone(),
        mesh_slot.clone(),
        services.clone(),
    )?;
    let mut coordinator_loops = std::mem::take(&mut coordinator.loops);
    let inference = crate::inference::spawn(
        &cfg,
        store.clone(),
        identity.key_id(),
        worker_key,
        nonces.clone(),
        health.clone(),
        process.clone(),
        limits.clone(),
        tracker.clone(),
        services.clone(),
    )
    .map_err(|e| NodeError::Inference(e.to_string()))?;
    let api_keys = crate::ide::keys::ApiKeys::load(store.clone())?;
    let ide = crate::ide::spawn(
        &cfg,
        api_keys.clone(),
        coordinator.state.clone(),
        inference.handle.clone(),
        health.clone(),
        process.clone(),
        limits.clone(),
        tracker.clone(),
        mesh_slot.clone(),
    )
    .await?;
    coordinator_loops.push(("inference.background", inference.task));
    let routers = [
        (
            "coordinator",
            cfg.addr(&cfg.coordinator.listen),
            coordinator.router,
        ),
        (
            "inference",
            cfg.addr(&cfg.inference.listen),
            inference.router,
        ),
        (
            "control_plane",
            cfg.addr(&cfg.control_plane),
            crate::control_plane::router(
                &cfg,
                store.clone(),
                identity.key_id(),
                nonces.clone(),
                api_keys.clone(),
                health.clone(),
                process.clone(),
                limits.clone(),
                mesh_slot.clone(),
            ),
        ),
        ("ide", cfg.addr(&cfg.ide.listen), ide),
    ];
    let mut bound: Vec<(&'static str, TcpListener, axum::Router)> = Vec::new();
    for (name, addr, router) in routers {
        let l = crate::http::bind(name, addr)
            .await
            .map_err(NodeError::Bind)?;
        let local = l.local_addr().map_err(NodeError::Bind)?;
        health.set_port(name, local);
        bound.push((name, l, router));
    }
    let ports = health.ports();
    let info = NodeInfo {
        pid: std::process::id(),
        node_id: identity.node_id().to_string(),
        coordinator: ports["coordinator"],
        inference: ports["inference"],
        control_plane: ports["control_plane"],
        ide: ports["ide"],
        started_ms: crate::clock::now_ms(),
    };
    let info_path = cfg.data_dir.join("node.json");
    write_atomic(
        &info_path,
        &serde_json::to_vec_pretty(&info).unwrap_or_default(),
    )
    .map_err(|source| NodeError::DataDir {
        path: info_path.clone(),
        source,
    })?;

    let mesh = if cfg.mesh.enabled {
        let url = crate::mesh::service::advertise_url(&cfg.mesh, info.coordinator);
        let m = crate::mesh::service::Mesh::start(
            &cfg.mesh,
            identity.clone(),
            url,
            coordinator.state.clone(),
            cfg.worker.heartbeat_interval,
            cfg.coordinator.agent_keys.clone(),
            process.hardware().clone(),
            tracker.clone(),
            services.clone(),
        )
        .map_err(|e| NodeError::Bind(std::io::Error::other(e)))?;
        let _ = mesh_slot.set(m.clone());
        Some(m)
    } else {
        None
    };

    // A service that stops while nobody asked it to is fatal.
    let (died_tx, mut died_rx) = tokio::sync::mpsc::channel::<(&'static str, String)>(8);
    let mut servers = Vec::new();
    for (name, listener, router) in bound {
        let token = serve.clone();
        let died = died_tx.clone();
        servers.push(tokio::spawn(async move {
            let r = crate::http::serve(listener, router, token.clone()).await;
            if !token.is_cancelled() {
                let reason = match r {
                    Ok(()) => "listener closed".to_string(),
                    Err(e) => e.to_string(),
                };
                let _ = died.send((name, reason)).await;
            }
        }));
    }

    // Background loops are as vital as listeners: one that ends before shutdown is fatal.
    for (name, fut) in coordinator_loops {
        let died = died_tx.clone();
        let token = services.clone();
        tracker.spawn(async move {
            fut.await;
            if !token.is_cancelled() {
                let _ = died.send((name, "loop ended".into())).await;
            }
        });
    }

    let supervisor = if cfg.worker.enabled {
        let args = vec![
            "worker".to_string(),
            "--coordinator".into(),
            info.coordinator_url(),
            "--key".into(),
            worker_key_path(&cfg.data_dir).display().to_string(),
            "--slots".into(),
            cfg.worker.slots.to_string(),
            "--inference".into(),
            format!("http://{}", local_addr(info.inference)),
            "--generation-slots".into(),
            (cfg.inference.slots as usize + cfg.inference.queue_depth).to_string(),
            "--parent-pid".into(),
            std::process::id().to_string(),
            "--log".into(),
            cfg.log.clone(),
            "--resource-class".into(),
            serde_json::to_value(resource_class)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "tiny".into()),
        ];
        let sc = SupervisorConfig {
            exe,
            args,
            backoff_min: cfg.worker.restart_backoff_min,
            backoff_max: cfg.worker.restart_backoff_max,
            stop_grace: cfg.worker.stop_grace,
        };
        let died = died_tx.clone();
        let token = worker_token.clone();
        let health = health.clone();
        Some(tokio::spawn(async move {
            supervise(sc, health, token.clone()).await;
            if !token.is_cancelled() {
                let _ = died
                    .send(("worker.supervisor", "supervisor ended".into()))
                    .await;
            }
        }))
    } else {
        None
    };

    {
        let slot = process.hardware().clone();
        let token = services.clone();
        tracker.spawn(async move {
            let mut t = tokio::time::interval(HARDWARE_REFRESH);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t.tick().await;
            loop {
                tokio::select! {
                    _ = t.tick() => {}
                    _ = token.cancelled() => return,
                }
                if let Ok(hw) = tokio::task::spawn_blocking(detect_hardware).await {
                    let before = crate::hw::current(&slot);
                    if before.as_ref().is_some_and(|b| b.class != hw.class || b.capacity.slots != hw.capacity.slots) {
                        tracing::warn!(class = ?hw.class, slots = hw.capacity.slots, derated = ?hw.capacity.derated, "node.hardware capacity changed");
                    }
                    *slot.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(hw));
                }
            }
        });
    }
    {
        let limits = limits.clone();
        let token = services.clone();
        tracker.spawn(async move {
            let mut t = tokio::time::interval(LIMITER_SWEEP);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = t.tick() => limits.retain_recent(),
                    _ = token.cancelled() => return,
                }
            }
        });
    }
    if let Some(every) = notifier.watchdog_interval() {
        // Fed only while the store commits and the reaper keeps ticking: a wedged node stops
        // feeding it and systemd restarts it.
        let token = services.clone();
        let store = store.clone();
        let health = health.clone();
        let max_age = (cfg.coordinator.agent_timeout + every * 2).as_millis() as u64;
        tracker.spawn(crate::systemd::feed_watchdog(every, token, move || {
            let store = store.clone();
            let health = health.clone();
            async move {
                if !crate::systemd::store_commits(&store, every).await {
                    return Err("the store does not commit".to_string());
                }
                let stale = health.stale_loops(crate::clock::now_ms(), max_age);
                if stale.is_empty() {
                    Ok(())
                } else {
                    Err(format!("background loops not ticking: {stale:?}"))
                }
            }
        }));
    }
    notifier.notify("READY=1");
    tracing::info!(
        node_id = %identity.node_id(),
        coordinator = %info.coordinator,
        inference = %info.inference,
        control_plane = %info.control_plane,
        ide = %info.ide,
        data_dir = %cfg.data_dir.display(),
        "node ready"
    );

    let mut outcome = Ok(());
    tokio::select! {
        _ = wait_for_signal() => tracing::info!("node.shutdown signal received"),
        _ = stop.cancelled() => tracing::info!("node.shutdown requested"),
        Some((service, reason)) = died_rx.recv() => {
            tracing::error!(service, %reason, "node.shutdown service died");
            outcome = Err(NodeError::ServiceDied { service, reason });
        }
    }

    notifier.notify("STOPPING=1");
    health.set_stopping();
    if let Some(m) = &mesh {
        m.leave().await;
    }
    services.cancel();
    serve.cancel();
    let drain = async {
        for s in servers {
            let _ = s.await;
        }
    };
    if tokio::time::timeout(cfg.http.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!("node.shutdown in-flight requests did not finish within http.drain_timeout");
    }
    worker_token.cancel();
    if let Some(s) = supervisor {
        let _ = s.await;
    }
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("node.shutdown background tasks did not stop in time");
    }
    store.close().await;
    let _ = std::fs::remove_file(&info_path);
    tracing::info!("node stopped");
    outcome
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the node can still be stopped by its token; wait forever here.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
