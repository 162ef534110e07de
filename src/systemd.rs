//! systemd notification protocol (`sd_notify`): READY, STOPPING, STATUS and the watchdog.
//!
//! When the service runs under systemd with `Type=notify`, `NOTIFY_SOCKET` names a datagram
//! socket (a path, or an abstract name starting with `@`). Without it every call is a no-op, so the
//! node behaves the same outside systemd. `WATCHDOG_USEC` (for our pid) sets the watchdog
//! interval; the node pings at half of it.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to systemd's notification socket, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        let target = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let addr = if let Some(name) = path.strip_prefix('@') {
                SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                SocketAddr::from_pathname(&path).ok()?
            };
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, addr))
        });
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|_| {
                std::env::var("WATCHDOG_PID")
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_none_or(|p| p == std::process::id())
            })
            .filter(|us| *us > 0)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// Sends one notification (e.g. `READY=1`); failures are logged, never fatal.
    pub fn notify(&self, msg: &str) {
        if let Some((sock, addr)) = &self.target
            && let Err(e) = sock.send_to_addr(msg.as_bytes(), addr)
        {
            tracing::warn!(error = %e, "systemd.notify failed");
        }
    }

    /// How often to send `WATCHDOG=1`, when the watchdog is enabled.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Whether a notification socket is configured.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }
}

/// Sends `WATCHDOG=1` every `every` for as long as `healthy` says the service makes progress,
/// until `stop`. A wedged service stops feeding the watchdog and systemd restarts it; the reason
/// is logged each time a ping is withheld.
pub async fn feed_watchdog<F, Fut>(
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
    mut healthy: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let n = Notifier::from_env();
    let mut t = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = t.tick() => {}
            _ = stop.cancelled() => return,
        }
        match healthy().await {
            Ok(()) => n.notify("WATCHDOG=1"),
            Err(why) => tracing::error!(%why, "watchdog not fed: no progress"),
        }
    }
}

/// Whether `store` commits an empty critical write within `within` (the watchdog's progress
/// check: a stuck writer thread or a full disk shows here).
pub async fn store_commits(store: &crate::store::Store, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(
            within,
            store.write(crate::store::Durability::Critical, |_, _| Ok(()))
        )
        .await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
            watchdog: Some(Duration::from_secs(10)),
        };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
    }

    #[test]
    fn no_socket_is_a_no_op() {
        let n = Notifier {
            target: None,
            watchdog: None,
        };
        n.notify("READY=1");
        assert!(!n.is_active());
        assert_eq!(n.watchdog_interval(), None);
    }
}
