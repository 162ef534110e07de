//! The node's durable state: one LMDB environment (through heed) and the single thread that writes it.
//!
//! # What it owns
//! The environment under `<data_dir>/store`, its named tables ([`Tables`]) and the writer thread.
//! Services hold a cheap [`Store`] handle; none of them opens a write transaction itself.
//!
//! # Writes
//! Every write is a closure sent to the writer thread over a bounded queue. The writer takes
//! whatever is waiting (up to `store.max_batch`), runs each closure in its own nested transaction
//! (so one failing operation does not undo its neighbours), commits the batch once, and only then
//! tells each caller it is done. Concurrent writers therefore share one `fsync` (group commit):
//! durability costs latency, not throughput.
//!
//! Two durability classes ([`Durability`]):
//! * **Critical** writes (task accepted, lease granted, result stored, nonce) commit as soon as
//!   the writer reaches them; the caller's future resolves after the commit is on disk.
//! * **Bulk** writes (streamed task events, telemetry) wait up to `store.bulk_flush_interval`, or
//!   until a critical write or a full batch comes, to save flash wear. A crash may lose up to that
//!   interval of bulk writes and nothing else.
//!
//! Callers that need their write ordered relative to in-memory state take a [`WritePermit`] first
//! ([`Store::reserve`]), mutate memory, send under their own lock, and await the [`Commit`] after
//! releasing it: the write queue is then in the same order as the memory changes.
//!
//! # Reads
//! [`Store::read`] runs a closure in a short read transaction on the calling thread (point reads,
//! microseconds); [`Store::read_blocking`] moves larger scans to tokio's blocking pool. No transaction
//! is ever held across an `.await`.
//!
//! # Encoding
//! Values are postcard with a leading format-version byte ([`encode`], [`decode`]); integer keys are
//! big-endian so byte order is numeric order.

mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use heed::types::Bytes;
use heed::{Database, Env, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::config::StoreConfig;

/// The schema this build writes; a store written by a newer build is refused, not misread.
pub const SCHEMA_VERSION: u32 = 1;

/// Queue depth in front of the writer thread. Large enough to absorb a burst of thousands of
/// requests while a commit is in flight; beyond it writers wait (backpressure), they are not
/// dropped.
const WRITE_QUEUE_DEPTH: usize = 8192;

/// Named databases. Keys and values are raw bytes; the owning module encodes them.
#[derive(Clone, Copy, Debug)]
pub struct Tables {
    /// Task records by task id (16-byte ULID).
    pub tasks: Database<Bytes, Bytes>,
    /// Ids of tasks not yet finished, so boot does not scan every task ever run.
    pub active: Database<Bytes, Bytes>,
    /// Task events by task id + big-endian sequence number.
    pub task_events: Database<Bytes, Bytes>,
    /// Task results by task id.
    pub results: Database<Bytes, Bytes>,
    /// Idempotency keys: requester key id + client key -> task id and request hash.
    pub idempotency: Database<Bytes, Bytes>,
    /// Registered agents by key id.
    pub agents: Database<Bytes, Bytes>,
    /// Mesh peers.
    pub peers: Database<Bytes, Bytes>,
    /// Seen request nonces: key id + nonce -> expiry.
    pub nonces: Database<Bytes, Bytes>,
    /// Credit ledger entries.
    pub ledger: Database<Bytes, Bytes>,
    /// Applied control-plane manifests and version high-water marks.
    pub manifests: Database<Bytes, Bytes>,
    /// Blacklist chain records.
    pub blacklist: Database<Bytes, Bytes>,
    /// Installed models.
    pub models: Database<Bytes, Bytes>,
    /// Small named values (schema version, counters).
    pub kv: Database<Bytes, Bytes>,
    /// IDE API keys: sha256 of the key -> record (the key itself is never stored).
    pub api_keys: Database<Bytes, Bytes>,
    /// Anchor proxy: anchored data -> the transaction that carries it (only the proxy writes it).
    pub anchors: Database<Bytes, Bytes>,
    /// Portal: user id -> account.
    pub portal_users: Database<Bytes, Bytes>,
    /// Portal: user name -> user id.
    pub portal_usernames: Database<Bytes, Bytes>,
    /// Portal: passkey credential id -> its public key, owner and counter.
    pub portal_credentials: Database<Bytes, Bytes>,
    /// Portal: SHA-256 of a session token -> session.
    pub portal_sessions: Database<Bytes, Bytes>,
}

const TABLE_COUNT: u32 = 19;

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// LMDB reported an error.
    #[error("storage error: {0}")]
    Lmdb(#[from] heed::Error),
    /// The database is full; raise `store.map_size`.
    #[error("the database is full (store.map_size = {map_size} bytes); raise store.map_size")]
    Full {
        /// The configured map size.
        map_size: u64,
    },
    /// A stored value could not be decoded.
    #[error("stored value in {table} is unreadable: {reason}")]
    Decode {
        /// Which table.
        table: &'static str,
        /// Why.
        reason: String,
    },
    /// The store was written by a newer build.
    #[error(
        "the store at {path} has schema version {found}; this build understands up to {SCHEMA_VERSION}"
    )]
    SchemaTooNew {
        /// Store directory.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// Creating the directory or similar.
    #[error("store directory {path}: {source}")]
    Io {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The writer has stopped (shutdown in progress, or it failed).
    #[error("the store is closed")]
    Closed,
}

/// When a write must reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Commit now; the caller learns of success only after the data is on disk.
    Critical,
    /// May wait for a batch (at most `store.bulk_flush_interval`).
    Bulk,
}

type Completion = Box<dyn FnOnce(Result<(), Arc<StoreError>>) + Send>;
type Op = Box<dyn FnOnce(&mut RwTxn<'_>, &Tables) -> (bool, Completion) + Send>;

enum Message {
    Write {
        durability: Durability,
        op: Op,
        _permit: OwnedSemaphorePermit,
    },
    Shutdown(oneshot::Sender<()>),
}

/// Counters kept by the writer thread.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Write operations applied.
    pub ops: AtomicU64,
    /// Operations that failed (their nested transaction was aborted).
    pub failed_ops: AtomicU64,
    /// Total time spent in commits, microseconds.
    pub commit_micros: AtomicU64,
    /// Largest batch seen.
    pub max_batch: AtomicU64,
}

struct Inner {
    env: Env<WithoutTls>,
    tables: Tables,
    tx: std::sync::mpsc::Sender<Message>,
    capacity: Arc<Semaphore>,
    stats: Arc<StoreStats>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    map_size: u64,
    path: PathBuf,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// The runtime memory page size (16 KiB on the Raspberry Pi 5 kernel, 4 KiB on most others).
#[allow(unsafe_code)]
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; a negative answer means "unknown".
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).ok().filter(|v| *v > 0).unwrap_or(4096)
}

/// Rounds `size` up to a whole number of pages; LMDB requires it.
pub fn round_to_page(size: u64, page: u64) -> u64 {
    size.div_ceil(page).saturating_mul(page)
}

impl Store {
    /// Opens (creating if needed) the store under `dir` and starts its writer thread.
    ///
    /// # Errors
    /// The directory cannot be created, LMDB cannot open it, or it was written by a newer build.
    pub fn open(dir: &Path, cfg: &StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let page = page_size();
        let map_size = round_to_page(cfg.map_size, page);
        let map_usize = usize::try_from(map_size).unwrap_or(usize::MAX);
        let mut opts = EnvOpenOptions::new().read_txn_without_tls();
        opts.map_size(map_usize)
            .max_dbs(TABLE_COUNT + 3)
            .max_readers(254);
        #[allow(unsafe_code)]
        // SAFETY: heed requires that the environment is not opened twice in one process and that it
        // is not used after fork(). The node opens the store once at boot; the worker is a separate
        // exec'd process that never opens it.
        let env = unsafe { opts.open(dir)? };
        // Readers left behind by a process killed mid-read keep pages from being reused.
        let stale = env.clear_stale_readers()?;
        if stale > 0 {
            tracing::info!(stale, "store.open cleared stale readers");
        }
        let mut wtxn = env.write_txn()?;
        let mk = |w: &mut RwTxn<'_>, name: &str| env.create_database::<Bytes, Bytes>(w, Some(name));
        let tables = Tables {
            tasks: mk(&mut wtxn, "tasks")?,
            active: mk(&mut wtxn, "active")?,
            task_events: mk(&mut wtxn, "task_events")?,
            results: mk(&mut wtxn, "results")?,
            idempotency: mk(&mut wtxn, "idempotency")?,
            agents: mk(&mut wtxn, "agents")?,
            peers: mk(&mut wtxn, "peers")?,
            nonces: mk(&mut wtxn, "nonces")?,
            ledger: mk(&mut wtxn, "ledger")?,
            manifests: mk(&mut wtxn, "manifests")?,
            blacklist: mk(&mut wtxn, "blacklist")?,
            models: mk(&mut wtxn, "models")?,
            kv: mk(&mut wtxn, "kv")?,
            api_keys: mk(&mut wtxn, "api_keys")?,
            anchors: mk(&mut wtxn, "anchors")?,
            portal_users: mk(&mut wtxn, "portal_users")?,
            portal_usernames: mk(&mut wtxn, "portal_usernames")?,
            portal_credentials: mk(&mut wtxn, "portal_credentials")?,
            portal_sessions: mk(&mut wtxn, "portal_sessions")?,
        };
        match tables.kv.get(&wtxn, b"schema_version")? {
            Some(v) => {
                let found =
                    v.try_into()
                        .map(u32::from_be_bytes)
                        .map_err(|_| StoreError::Decode {
                            table: "kv",
                            reason: "schema_version is not 4 bytes".into(),
                        })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew {
                        path: dir.to_path_buf(),
                        found,
                    });
                }
            }
            None => tables
                .kv
                .put(&mut wtxn, b"schema_version", &SCHEMA_VERSION.to_be_bytes())?,
        }
        wtxn.commit()?;

        let (tx, rx) = std::sync::mpsc::channel();
        let stats = Arc::new(StoreStats::default());
        let w = writer::Writer {
            env: env.clone(),
            tables,
            rx,
            max_batch: cfg.max_batch.max(1),
            bulk_interval: cfg.bulk_flush_interval,
            stats: stats.clone(),
            map_size,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || w.run())
            .map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                env,
                tables,
                tx,
                capacity: Arc::new(Semaphore::new(WRITE_QUEUE_DEPTH)),
                stats,
                writer: Mutex::new(Some(handle)),
                map_size,
                path: dir.to_path_buf(),
            }),
        })
    }

    /// The tables (for read closures).
    pub fn tables(&self) -> &Tables {
        &self.inner.tables
    }

    /// Writer statistics.
    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    /// Bytes of the map in use and the map size.
    pub fn usage(&self) -> (u64, u64) {
        let info = self.inner.env.info();
        let stat = self.inner.env.stat();
        let used = (info.last_page_number as u64 + 1) * u64::from(stat.page_size);
        (used, self.inner.map_size)
    }

    /// Waits for room in the write queue. Take the permit before locking in-memory state, then
    /// [`WritePermit::send`] under the lock, so the queue order equals the memory order.
    ///
    /// # Errors
    /// [`StoreError::Closed`] after shutdown.
    pub async fn reserve(&self) -> Result<WritePermit, StoreError> {
        let permit = self
            .inner
            .capacity
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(WritePermit {
            store: self.clone(),
            permit,
        })
    }

    /// Sends one write and waits for it to be committed (critical) or accepted into a batch that
    /// will be committed (bulk; the returned future still resolves only after the commit).
    ///
    /// # Errors
    /// The operation's own error, a failed commit, or a closed store.
    pub async fn write<R, F>(&self, durability: Durability, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut RwTxn<'_>, &Tables) -> Result<R, StoreError> + Send + 'static,
    {
        self.reserve().await?.send(durability, f).await
    }

    /// Sends a bulk write without waiting for it; a failure is logged.
    ///
    /// Returns `false` if the write queue is full (the write is dropped and counted), which only
    /// happens when the disk cannot keep up with telemetry-class writes.
    pub fn write_bulk_detached<F>(&self, f: F) -> bool
    where
        F: FnOnce(&mut RwTxn<'_>, &Tables) -> Result<(), StoreError> + Send + 'static,
    {
        let Ok(permit) = self.inner.capacity.clone().try_acquire_owned() else {
            return false;
        };
        let wp = WritePermit {
            store: self.clone(),
            permit,
        };
        let commit = wp.send(Durability::Bulk, f);
        drop(commit);
        true
    }

    /// Runs `f` in a read transaction on this thread. For point reads only; use
    /// [`Store::read_blocking`] for scans.
    ///
    /// # Errors
    /// The closure's error or LMDB's.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&RoTxn<'_, WithoutTls>, &Tables) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let rtxn = self.inner.env.read_txn()?;
        f(&rtxn, &self.inner.tables)
    }

    /// Runs `f` in a read transaction on tokio's blocking pool.
    ///
    /// # Errors
    /// The closure's error or LMDB's.
    pub async fn read_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&RoTxn<'_, WithoutTls>, &Tables) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read(f))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Commits everything queued, stops the writer thread and waits for it.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(Message::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
        self.inner.capacity.close();
        let handle = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

/// Room reserved in the write queue; see [`Store::reserve`].
pub struct WritePermit {
    store: Store,
    permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for WritePermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WritePermit")
    }
}

impl WritePermit {
    /// Queues the write (never blocks) and returns a future for its commit.
    pub fn send<R, F>(self, durability: Durability, f: F) -> Commit<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut RwTxn<'_>, &Tables) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, StoreError>>();
        let op: Op = Box::new(move |txn, tables| match f(txn, tables) {
            Ok(r) => (
                true,
                Box::new(move |committed: Result<(), Arc<StoreError>>| {
                    let _ = tx.send(committed.map(|()| r).map_err(shared_error));
                }),
            ),
            Err(e) => (
                false,
                Box::new(move |_| {
                    let _ = tx.send(Err(e));
                }),
            ),
        });
        let sent = self.store.inner.tx.send(Message::Write {
            durability,
            op,
            _permit: self.permit,
        });
        Commit {
            rx: if sent.is_ok() { Some(rx) } else { None },
        }
    }
}

fn shared_error(e: Arc<StoreError>) -> StoreError {
    match &*e {
        StoreError::Full { map_size } => StoreError::Full {
            map_size: *map_size,
        },
        StoreError::Closed => StoreError::Closed,
        other => StoreError::Decode {
            table: "commit",
            reason: other.to_string(),
        },
    }
}

/// Resolves when a queued write has been committed.
#[must_use = "a write is only known to be durable once its Commit resolves"]
pub struct Commit<R> {
    rx: Option<oneshot::Receiver<Result<R, StoreError>>>,
}

impl<R> std::fmt::Debug for Commit<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Commit")
    }
}

impl<R> std::future::Future for Commit<R> {
    type Output = Result<R, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.rx.as_mut() {
            None => std::task::Poll::Ready(Err(StoreError::Closed)),
            Some(rx) => std::pin::Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(StoreError::Closed))),
        }
    }
}

/// Format version written in front of every postcard value.
pub const VALUE_VERSION: u8 = 1;

/// Encodes a value as a version byte followed by postcard.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let out = vec![VALUE_VERSION];
    // postcard only fails for types serde cannot describe without a length (never ours) or
    // a writer that fails (a Vec never does).
    match postcard::to_extend(v, out) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "store.encode failed");
            vec![VALUE_VERSION]
        }
    }
}

/// Decodes a value written by [`encode`].
///
/// # Errors
/// [`StoreError::Decode`] for an unknown version or malformed bytes.
pub fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&VALUE_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|e| StoreError::Decode {
                table,
                reason: e.to_string(),
            })
        }
        Some((v, _)) => Err(StoreError::Decode {
            table,
            reason: format!("unknown value version {v}"),
        }),
        None => Err(StoreError::Decode {
            table,
            reason: "empty value".into(),
        }),
    }
}

/// How long writes wait, worst case, for a bulk batch; exposed for docs and tests.
pub fn bulk_window(cfg: &StoreConfig) -> Duration {
    cfg.bulk_flush_interval
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn cfg() -> StoreConfig {
        StoreConfig {
            map_size: 8 << 20,
            max_batch: 64,
            bulk_flush_interval: Duration::from_millis(50),
        }
    }

    #[test]
    fn map_size_rounds_to_pages() {
        assert_eq!(round_to_page(1, 4096), 4096);
        assert_eq!(round_to_page(4096, 4096), 4096);
        assert_eq!(round_to_page(1_000_000, 16384), 1_015_808);
        assert_eq!(round_to_page(1_000_000, 16384) % 16384, 0);
        assert!(page_size() >= 4096);
    }

    #[tokio::test]
    async fn critical_writes_are_durable_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &cfg()).unwrap();
        let mut waits = Vec::new();
        for i in 0u32..200 {
            let s = store.clone();
            waits.push(tokio::spawn(async move {
                s.write(Durability::Critical, move |txn, t| {
                    t.kv.put(txn, &i.to_be_bytes(), &encode(&i))?;
                    Ok(i)
                })
                .await
            }));
        }
        for (i, w) in waits.into_iter().enumerate() {
            assert_eq!(w.await.unwrap().unwrap(), i as u32);
        }
        let n = store.read(|r, t| Ok(t.kv.len(r)?)).unwrap();
        assert_eq!(n, 201, "200 values plus the schema version");
        let commits = store.stats().commits.load(Ordering::Relaxed);
        assert!(
            commits <= 200,
            "group commit never needs more commits than writes"
        );
        store.close().await;
        drop(store);
        // Reopen: everything is there.
        let store = Store::open(dir.path(), &cfg()).unwrap();
        let v: u32 = store
            .read(|r, t| decode("kv", t.kv.get(r, &7u32.to_be_bytes())?.unwrap_or_default()))
            .unwrap();
        assert_eq!(v, 7);
        store.close().await;
    }

    #[tokio::test]
    async fn a_failing_op_does_not_undo_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &cfg()).unwrap();
        let a = store
            .reserve()
            .await
            .unwrap()
            .send(Durability::Critical, |txn, t| {
                t.kv.put(txn, b"a", b"1")?;
                Ok(())
            });
        let b = store
            .reserve()
            .await
            .unwrap()
            .send(Durability::Critical, |txn, t| {
                t.kv.put(txn, b"b", b"1")?;
                Err::<(), _>(StoreError::Decode {
                    table: "kv",
                    reason: "refused".into(),
                })
            });
        let c = store
            .reserve()
            .await
            .unwrap()
            .send(Durability::Critical, |txn, t| {
                t.kv.put(txn, b"c", b"1")?;
                Ok(())
            });
        a.await.unwrap();
        assert!(b.await.is_err());
        c.await.unwrap();
        let (has_a, has_b, has_c) = store
            .read(|r, t| {
                Ok((
                    t.kv.get(r, b"a")?.is_some(),
                    t.kv.get(r, b"b")?.is_some(),
                    t.kv.get(r, b"c")?.is_some(),
                ))
            })
            .unwrap();
        assert!(has_a && !has_b && has_c);
        store.close().await;
    }

    #[tokio::test]
    async fn bulk_writes_flush_on_timer_and_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &cfg()).unwrap();
        assert!(store.write_bulk_detached(|txn, t| {
            t.kv.put(txn, b"bulk", b"1")?;
            Ok(())
        }));
        // The awaited form resolves once the timer flushes the batch.
        store
            .write(Durability::Bulk, |txn, t| {
                t.kv.put(txn, b"bulk2", b"1")?;
                Ok(())
            })
            .await
            .unwrap();
        assert!(
            store
                .read(|r, t| Ok(t.kv.get(r, b"bulk")?.is_some()))
                .unwrap()
        );
        assert!(store.write_bulk_detached(|txn, t| {
            t.kv.put(txn, b"bulk3", b"1")?;
            Ok(())
        }));
        store.close().await;
        drop(store);
        let store = Store::open(dir.path(), &cfg()).unwrap();
        assert!(
            store
                .read(|r, t| Ok(t.kv.get(r, b"bulk3")?.is_some()))
                .unwrap()
        );
        store.close().await;
    }

    #[test]
    fn values_carry_a_version() {
        let bytes = encode(&(1u32, "x".to_string()));
        assert_eq!(bytes[0], VALUE_VERSION);
        let back: (u32, String) = decode("kv", &bytes).unwrap();
        assert_eq!(back, (1, "x".into()));
        assert!(decode::<u32>("kv", &[]).is_err());
        assert!(decode::<u32>("kv", &[9, 1]).is_err());
        assert!(decode::<(u32, String)>("kv", &[1, 5]).is_err());
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &cfg()).unwrap();
        store
            .write(Durability::Critical, |txn, t| {
                t.kv.put(txn, b"schema_version", &99u32.to_be_bytes())?;
                Ok(())
            })
            .await
            .unwrap();
        store.close().await;
        drop(store);
        assert!(matches!(
            Store::open(dir.path(), &cfg()),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }
}
