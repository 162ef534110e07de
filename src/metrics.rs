//! Prometheus metrics: one registry per service plus process-wide figures on every port.
//!
//! Each service owns a `prometheus_client` [`Registry`] with its metrics (named
//! `edgecoder_<service>_<what>`); [`Metrics::render`] writes that registry followed by the
//! process figures (resident memory, uptime, store commits) in the OpenMetrics text format.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::registry::Registry;

use crate::store::Store;

/// Figures about the whole process, shared by every service's `/metrics`.
#[derive(Debug)]
pub struct ProcessMetrics {
    started: Instant,
    store: Option<Store>,
    hardware: crate::hw::HwSlot,
}

impl ProcessMetrics {
    /// Process metrics, with store figures when a store is given.
    pub fn new(store: Option<Store>) -> Arc<Self> {
        Arc::new(ProcessMetrics {
            started: Instant::now(),
            store,
            hardware: crate::hw::HwSlot::default(),
        })
    }

    /// The node's latest hardware detection (filled by the node; rendered with the metrics).
    pub fn hardware(&self) -> &crate::hw::HwSlot {
        &self.hardware
    }

    /// Seconds since the process started serving.
    pub fn uptime_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn render_into(&self, out: &mut String) {
        use std::fmt::Write;
        let rss = resident_bytes().unwrap_or(0);
        let _ = writeln!(
            out,
            "# HELP edgecoder_process_resident_bytes Resident memory of this process.\n# TYPE edgecoder_process_resident_bytes gauge\nedgecoder_process_resident_bytes {rss}"
        );
        let _ = writeln!(
            out,
            "# HELP edgecoder_process_uptime_seconds Time since the process started.\n# TYPE edgecoder_process_uptime_seconds gauge\nedgecoder_process_uptime_seconds {:.3}",
            self.uptime_secs()
        );
        if let Some(hw) = crate::hw::current(&self.hardware) {
            crate::hw::render_metrics(&hw, out);
        }
        if let Some(store) = &self.store {
            use std::sync::atomic::Ordering::Relaxed;
            let s = store.stats();
            let (used, map) = store.usage();
            for (name, help, kind, v) in [
                (
                    "store_commits",
                    "LMDB transactions committed",
                    "counter",
                    s.commits.load(Relaxed),
                ),
                (
                    "store_ops",
                    "Write operations applied",
                    "counter",
                    s.ops.load(Relaxed),
                ),
                (
                    "store_failed_ops",
                    "Write operations that failed and were rolled back",
                    "counter",
                    s.failed_ops.load(Relaxed),
                ),
                (
                    "store_commit_seconds",
                    "Time spent committing, summed",
                    "counter",
                    0,
                ),
                (
                    "store_used_bytes",
                    "Bytes of the LMDB map in use",
                    "gauge",
                    used,
                ),
                ("store_map_bytes", "Size of the LMDB map", "gauge", map),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP edgecoder_{name} {help}\n# TYPE edgecoder_{name} {kind}"
                );
                if name == "store_commit_seconds" {
                    let secs = s.commit_micros.load(Relaxed) as f64 / 1e6;
                    let _ = writeln!(out, "edgecoder_{name}_total {secs:.6}");
                } else if kind == "counter" {
                    let _ = writeln!(out, "edgecoder_{name}_total {v}");
                } else {
                    let _ = writeln!(out, "edgecoder_{name} {v}");
                }
            }
        }
    }
}

/// A service's metrics endpoint content.
pub struct Metrics {
    registry: Registry,
    process: Arc<ProcessMetrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Combines a service registry with the process figures.
    pub fn new(registry: Registry, process: Arc<ProcessMetrics>) -> Arc<Self> {
        Arc::new(Metrics { registry, process })
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "metrics.render failed");
        }
        self.process.render_into(&mut out);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// Resident set size of this process, from /proc/self/statm.
pub fn resident_bytes() -> Option<u64> {
    resident_bytes_of("self")
}

/// Resident set size of process `pid` (or "self").
pub fn resident_bytes_of(pid: &str) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * crate::store::page_size())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn renders_service_and_process_metrics() {
        let mut reg = Registry::default();
        let c: Counter = Counter::default();
        reg.register("edgecoder_test_things", "Things.", c.clone());
        c.inc();
        let m = Metrics::new(reg, ProcessMetrics::new(None));
        let text = m.render();
        assert!(text.contains("edgecoder_test_things_total 1"), "{text}");
        assert!(text.contains("edgecoder_process_resident_bytes "), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
        assert!(resident_bytes().unwrap() > 0);
    }
}
