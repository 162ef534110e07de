//! The node's shared health picture: what `/health` and `/status` report on every port.
//!
//! `node.rs` creates one [`NodeHealth`] and hands it to each service; the coordinator marks the
//! local worker registered, the supervisor records the worker's pid and restarts. Nothing here
//! does I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::identity::NodeId;

/// Shared, cheap-to-read node state.
#[derive(Debug)]
pub struct NodeHealth {
    /// This node's id.
    pub node_id: NodeId,
    started: Instant,
    worker_enabled: bool,
    worker_registered: AtomicBool,
    worker_pid: AtomicU32,
    worker_restarts: AtomicU64,
    stopping: AtomicBool,
    ports: Mutex<BTreeMap<&'static str, SocketAddr>>,
    /// Background loops and when each last completed a round (ms since the epoch).
    progress: Mutex<BTreeMap<&'static str, u64>>,
}

/// `GET /health` body.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HealthView {
    /// `ok` when fully operational, `starting` before the worker registered, `stopping` during
    /// shutdown.
    pub status: String,
    /// The service answering.
    pub service: String,
    /// Node id.
    pub node_id: String,
    /// Whether the node is fully operational (services up and the worker registered).
    pub operational: bool,
}

/// Worker part of `/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Whether the node runs a worker.
    pub enabled: bool,
    /// Whether it has registered with the coordinator.
    pub registered: bool,
    /// Its process id, when running.
    pub pid: Option<u32>,
    /// Times it was restarted after dying.
    pub restarts: u64,
}

impl NodeHealth {
    /// New health state.
    pub fn new(node_id: NodeId, worker_enabled: bool) -> Self {
        NodeHealth {
            node_id,
            started: Instant::now(),
            worker_enabled,
            worker_registered: AtomicBool::new(false),
            worker_pid: AtomicU32::new(0),
            worker_restarts: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            ports: Mutex::new(BTreeMap::new()),
            progress: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether the node is fully operational.
    pub fn operational(&self) -> bool {
        !self.stopping.load(Ordering::Relaxed)
            && (!self.worker_enabled || self.worker_registered.load(Ordering::Relaxed))
    }

    /// The `/health` answer for `service`.
    pub fn view(&self, service: &str) -> HealthView {
        let status = if self.stopping.load(Ordering::Relaxed) {
            "stopping"
        } else if self.operational() {
            "ok"
        } else {
            "starting"
        };
        HealthView {
            status: status.into(),
            service: service.into(),
            node_id: self.node_id.to_string(),
            operational: self.operational(),
        }
    }

    /// Records whether the local worker is registered.
    pub fn set_worker_registered(&self, yes: bool) {
        self.worker_registered.store(yes, Ordering::Relaxed);
    }

    /// Records the worker's pid (0 when not running).
    pub fn set_worker_pid(&self, pid: u32) {
        self.worker_pid.store(pid, Ordering::Relaxed);
    }

    /// Counts a worker restart.
    pub fn count_worker_restart(&self) {
        self.worker_restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks shutdown in progress.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Records where a service listens.
    pub fn set_port(&self, service: &'static str, addr: SocketAddr) {
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service, addr);
    }

    /// Where each service listens.
    pub fn ports(&self) -> BTreeMap<&'static str, SocketAddr> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records that background loop `name` completed a round; the systemd watchdog is only fed
    /// while every loop keeps doing so.
    pub fn mark_progress(&self, name: &'static str) {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, crate::clock::now_ms());
    }

    /// Loops that have not completed a round within `max_age_ms` of `now_ms`.
    pub fn stale_loops(&self, now_ms: u64, max_age_ms: u64) -> Vec<&'static str> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t)| now_ms.saturating_sub(**t) > max_age_ms)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Seconds since boot.
    pub fn uptime_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The worker's status.
    pub fn worker(&self) -> WorkerStatus {
        let pid = self.worker_pid.load(Ordering::Relaxed);
        WorkerStatus {
            enabled: self.worker_enabled,
            registered: self.worker_registered.load(Ordering::Relaxed),
            pid: (pid != 0).then_some(pid),
            restarts: self.worker_restarts.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operational_needs_the_worker_and_not_stopping() {
        let h = NodeHealth::new(NodeId([0; 16]), true);
        assert_eq!(h.view("x").status, "starting");
        h.set_worker_registered(true);
        assert!(h.operational());
        assert_eq!(h.view("x").status, "ok");
        h.set_stopping();
        assert!(!h.operational());
        assert_eq!(h.view("x").status, "stopping");
        let no_worker = NodeHealth::new(NodeId([0; 16]), false);
        assert!(no_worker.operational());
    }

    #[test]
    fn stale_loops_are_reported() {
        let h = NodeHealth::new(NodeId([0; 16]), false);
        h.mark_progress("a");
        let now = crate::clock::now_ms();
        assert!(h.stale_loops(now, 1000).is_empty());
        assert_eq!(h.stale_loops(now + 5000, 1000), vec!["a"]);
    }
}
