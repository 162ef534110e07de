//! The writer thread: the only code that opens write transactions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use heed::{Env, MdbError, WithoutTls};

use super::{Completion, Durability, Message, Op, StoreError, StoreStats, Tables};

pub(super) struct Writer {
    pub(super) env: Env<WithoutTls>,
    pub(super) tables: Tables,
    pub(super) rx: Receiver<Message>,
    pub(super) max_batch: usize,
    pub(super) bulk_interval: Duration,
    pub(super) stats: Arc<StoreStats>,
    pub(super) map_size: u64,
}

impl Writer {
    pub(super) fn run(self) {
        // Bulk writes waiting for a batch, and when the oldest arrived.
        let mut pending: Vec<Op> = Vec::new();
        let mut oldest: Option<Instant> = None;
        loop {
            let first = match oldest {
                None => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
                Some(t) => {
                    let wait = (t + self.bulk_interval).saturating_duration_since(Instant::now());
                    match self.rx.recv_timeout(wait) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => {
                            self.commit(std::mem::take(&mut pending));
                            oldest = None;
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let mut urgent = false;
            let mut shutdown = None;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Message::Write { durability, op, .. } => {
                        // The queue permit drops here: the slot is free as soon as the op is
                        // taken off the queue, before it commits.
                        urgent |= durability == Durability::Critical;
                        pending.push(op);
                        oldest.get_or_insert_with(Instant::now);
                    }
                    Message::Shutdown(done) => {
                        shutdown = Some(done);
                        break;
                    }
                }
                if pending.len() >= self.max_batch {
                    urgent = true;
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            if urgent || shutdown.is_some() {
                self.commit(std::mem::take(&mut pending));
                oldest = None;
            }
            if let Some(done) = shutdown {
                // Anything sent after the shutdown marker is answered "closed" when its
                // completion is dropped with the receiver.
                if let Err(e) = self.env.force_sync() {
                    tracing::error!(error = %e, "store.close sync failed");
                }
                let _ = done.send(());
                return;
            }
        }
        self.commit(pending);
    }

    fn commit(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let started = Instant::now();
        let n = ops.len();
        let mut completions: Vec<Completion> = Vec::with_capacity(n);
        let result = self.apply(ops, &mut completions);
        let shared = result.map_err(|e| Arc::new(self.classify(e)));
        if let Err(e) = &shared {
            tracing::error!(error = %e, ops = n, "store.commit failed");
        }
        for c in completions {
            c(shared.clone());
        }
        let s = &self.stats;
        s.commits.fetch_add(1, Ordering::Relaxed);
        s.ops.fetch_add(n as u64, Ordering::Relaxed);
        s.commit_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        s.max_batch.fetch_max(n as u64, Ordering::Relaxed);
    }

    fn apply(&self, ops: Vec<Op>, completions: &mut Vec<Completion>) -> Result<(), heed::Error> {
        // If a transaction cannot be opened, the ops are dropped unrun; dropping an op drops its
        // reply channel, which its caller sees as `StoreError::Closed`.
        let mut wtxn = self.env.write_txn()?;
        for op in ops {
            let mut nested = self.env.nested_write_txn(&mut wtxn)?;
            let tables = &self.tables;
            // A panicking operation is a bug, but it must not take the writer thread (and with it
            // every later write) down: its nested transaction is aborted and its caller told.
            let run =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(&mut nested, tables)));
            let Ok((ok, completion)) = run else {
                tracing::error!("store.write operation panicked; aborted");
                self.stats.failed_ops.fetch_add(1, Ordering::Relaxed);
                nested.abort();
                continue;
            };
            if ok {
                nested.commit()?;
            } else {
                self.stats.failed_ops.fetch_add(1, Ordering::Relaxed);
                nested.abort();
            }
            completions.push(completion);
        }
        wtxn.commit()
    }

    fn classify(&self, e: heed::Error) -> StoreError {
        match e {
            heed::Error::Mdb(MdbError::MapFull) => StoreError::Full {
                map_size: self.map_size,
            },
            other => StoreError::Lmdb(other),
        }
    }
}
