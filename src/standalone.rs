//! What the separate deployments (`edgecoder anchor-proxy`, `edgecoder portal`) share: their
//! info file, and serving one port until SIGTERM with systemd's notifications, a watchdog fed
//! while the store commits, a periodic sweep, and a drained shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::systemd::Notifier;

/// How often the sweep runs.
const SWEEP: Duration = Duration::from_secs(60);

/// What a deployment's info file says: who it is and where it listens (for the CLI and tests).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The process id.
    pub pid: u32,
    /// The bound address.
    pub listen: SocketAddr,
}

impl ServiceInfo {
    /// Reads an info file.
    ///
    /// # Errors
    /// Missing or unreadable file.
    pub fn read(file: &Path) -> std::io::Result<ServiceInfo> {
        let text = std::fs::read_to_string(file)?;
        serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    fn write(&self, file: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, file)
    }
}

/// One deployment's serving loop.
#[derive(Debug)]
pub struct Deployment {
    /// Its name in logs (`portal`, `anchor_proxy`).
    pub name: &'static str,
    /// Where its info file goes.
    pub info_file: PathBuf,
    /// Its store: the watchdog is fed while it commits; closed at the end.
    pub store: Store,
    /// How long in-flight requests may finish at shutdown.
    pub drain: Duration,
}

impl Deployment {
    /// Serves `router` on `listener` until SIGTERM/SIGINT or `stop`, running `sweep` every minute.
    ///
    /// # Errors
    /// The info file cannot be written, or the server stopped on its own.
    pub async fn serve<F, Fut>(
        self,
        listener: TcpListener,
        router: Router,
        stop: CancellationToken,
        mut sweep: F,
    ) -> Result<(), String>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let name = self.name;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        ServiceInfo {
            pid: std::process::id(),
            listen: bound,
        }
        .write(&self.info_file)
        .map_err(|e| format!("{}: {e}", self.info_file.display()))?;
        let notifier = Notifier::from_env();
        let serve = CancellationToken::new();
        let mut server = tokio::spawn(crate::http::serve(listener, router, serve.clone()));
        let background = CancellationToken::new();
        let sweeper = {
            let token = background.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(SWEEP);
                t.tick().await;
                loop {
                    tokio::select! {
                        _ = t.tick() => sweep().await,
                        _ = token.cancelled() => return,
                    }
                }
            })
        };
        let watchdog = notifier.watchdog_interval().map(|every| {
            let store = self.store.clone();
            tokio::spawn(crate::systemd::feed_watchdog(
                every,
                background.clone(),
                move || {
                    let store = store.clone();
                    async move {
                        if crate::systemd::store_commits(&store, every).await {
                            Ok(())
                        } else {
                            Err("the store does not commit".to_string())
                        }
                    }
                },
            ))
        });
        notifier.notify("READY=1");
        tracing::info!(service = name, listen = %bound, "ready");

        let mut outcome = Ok(());
        let mut server_done = false;
        tokio::select! {
            _ = crate::node::wait_for_signal() => tracing::info!(service = name, "shutdown: signal received"),
            _ = stop.cancelled() => tracing::info!(service = name, "shutdown requested"),
            r = &mut server => {
                server_done = true;
                let reason = match r {
                    Ok(Ok(())) => "it returned".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                outcome = Err(format!("the HTTP server stopped unexpectedly: {reason}"));
            }
        }
        notifier.notify("STOPPING=1");
        serve.cancel();
        if !server_done && tokio::time::timeout(self.drain, &mut server).await.is_err() {
            tracing::warn!(
                service = name,
                "shutdown: in-flight requests did not finish in time; cutting them off"
            );
            server.abort();
        }
        background.cancel();
        let _ = sweeper.await;
        if let Some(w) = watchdog {
            let _ = w.await;
        }
        self.store.close().await;
        let _ = std::fs::remove_file(&self.info_file);
        tracing::info!(service = name, "stopped");
        outcome
    }
}
