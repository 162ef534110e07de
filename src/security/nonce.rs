//! The replay cache: every (key id, nonce) accepted within its signature's lifetime.
//!
//! Kept in memory for the check and persisted in the store's `nonces` table so a restart does not
//! reopen the replay window. An entry lives until its signature's `expires` plus the allowed clock
//! skew; after that the signature itself is rejected as expired, so the entry is no longer needed.
//! The cache is bounded: when it is full of live entries, new requests are refused with
//! `nonce_cache_full` (503) instead of evicting entries whose replays would then pass.
//!
//! Stored keys start with the big-endian expiry, so inserts land at the right edge of the B-tree
//! and pruning removes a prefix from the left edge: a few pages touched per commit instead of one
//! random page per request (random keys cost about a 4 KiB page write each, CPU and flash).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use crate::identity::KeyId;
use crate::store::{Durability, Store, StoreError, WritePermit};

use super::httpsig::SigError;

type Entry = (KeyId, [u8; 16]);

#[derive(Default)]
struct Inner {
    live: HashMap<Entry, u64>,
    by_expiry: BTreeSet<(u64, Entry)>,
}

/// The replay cache.
pub struct NonceCache {
    inner: Mutex<Inner>,
    max: usize,
    store: Option<Store>,
}

impl std::fmt::Debug for NonceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceCache")
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// Stored key: expiry (8 bytes, big-endian) + key id (32) + nonce (16). The value is empty.
fn db_key(expires: u64, e: &Entry) -> [u8; 56] {
    let mut k = [0u8; 56];
    k[..8].copy_from_slice(&expires.to_be_bytes());
    k[8..40].copy_from_slice(&e.0.0);
    k[40..].copy_from_slice(&e.1);
    k
}

impl NonceCache {
    /// A cache backed by `store`, loaded with the unexpired nonces persisted there.
    ///
    /// # Errors
    /// Store read failures.
    pub fn load(store: Store, max: usize, now: u64) -> Result<Self, StoreError> {
        let rows: Vec<(Entry, u64)> = store.read(|r, t| {
            let mut rows = Vec::new();
            for item in t.nonces.iter(r)? {
                let (k, _) = item?;
                let (Ok(exp), Ok(key), Ok(nonce)) = (
                    <[u8; 8]>::try_from(k.get(..8).unwrap_or_default()),
                    <[u8; 32]>::try_from(k.get(8..40).unwrap_or_default()),
                    <[u8; 16]>::try_from(k.get(40..).unwrap_or_default()),
                ) else {
                    continue;
                };
                rows.push(((KeyId(key), nonce), u64::from_be_bytes(exp)));
            }
            Ok(rows)
        })?;
        let cache = NonceCache {
            inner: Mutex::new(Inner::default()),
            max,
            store: Some(store),
        };
        {
            let mut inner = cache.lock();
            for (e, exp) in rows {
                if exp >= now {
                    inner.live.insert(e, exp);
                    inner.by_expiry.insert((exp, e));
                }
            }
        }
        cache.prune(now);
        Ok(cache)
    }

    /// A memory-only cache (tests, and the CLI which never verifies).
    pub fn in_memory(max: usize) -> Self {
        NonceCache {
            inner: Mutex::new(Inner::default()),
            max,
            store: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a nonce if it is new. `permit` (when the cache is persistent) queues the durable
    /// write in the same order as the memory insert; the returned commit resolves once it is on disk.
    ///
    /// # Errors
    /// [`SigError::Replayed`] for a nonce seen before, [`SigError::NonceCacheFull`] when full.
    pub fn check_and_insert(
        &self,
        key: KeyId,
        nonce: [u8; 16],
        expires: u64,
        now: u64,
        permit: Option<WritePermit>,
    ) -> Result<Option<crate::store::Commit<()>>, SigError> {
        let e = (key, nonce);
        let mut inner = self.lock();
        if let Some(&exp) = inner.live.get(&e)
            && exp >= now
        {
            return Err(SigError::Replayed);
        }
        if inner.live.len() >= self.max {
            prune_locked(&mut inner, now);
            if inner.live.len() >= self.max {
                return Err(SigError::NonceCacheFull);
            }
        }
        inner.live.insert(e, expires);
        inner.by_expiry.insert((expires, e));
        let commit = permit.map(|p| {
            let k = db_key(expires, &e);
            p.send(Durability::Critical, move |txn, t| {
                t.nonces.put(txn, &k, &[])?;
                Ok(())
            })
        });
        Ok(commit)
    }

    /// Whether the cache persists entries (and so wants a write permit).
    pub fn is_persistent(&self) -> bool {
        self.store.is_some()
    }

    /// Drops expired entries from memory and the store. Returns how many were dropped.
    pub fn prune(&self, now: u64) -> usize {
        let removed = {
            let mut inner = self.lock();
            prune_locked(&mut inner, now)
        };
        if let Some(store) = &self.store {
            // Everything stored with an expiry before `now`, whether or not memory still had it.
            let end = now.to_be_bytes();
            store.write_bulk_detached(move |txn, t| {
                let range = (
                    std::ops::Bound::Unbounded,
                    std::ops::Bound::Excluded(&end[..]),
                );
                t.nonces.delete_range(txn, &range)?;
                Ok(())
            });
        }
        removed.len()
    }
}

fn prune_locked(inner: &mut Inner, now: u64) -> Vec<Entry> {
    let mut removed = Vec::new();
    while let Some(&(exp, e)) = inner.by_expiry.first() {
        if exp >= now {
            break;
        }
        inner.by_expiry.pop_first();
        if inner.live.get(&e) == Some(&exp) {
            inner.live.remove(&e);
        }
        removed.push(e);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use std::time::Duration;

    #[test]
    fn replay_and_capacity() {
        let c = NonceCache::in_memory(2);
        let k = KeyId([1; 32]);
        assert!(c.check_and_insert(k, [1; 16], 100, 10, None).is_ok());
        assert_eq!(
            c.check_and_insert(k, [1; 16], 100, 20, None).err(),
            Some(SigError::Replayed)
        );
        assert!(c.check_and_insert(k, [2; 16], 50, 20, None).is_ok());
        assert_eq!(
            c.check_and_insert(k, [3; 16], 100, 20, None).err(),
            Some(SigError::NonceCacheFull)
        );
        // Once the second entry expires there is room again.
        assert!(c.check_and_insert(k, [3; 16], 100, 60, None).is_ok());
        assert_eq!(c.len(), 2);
    }

    #[tokio::test]
    async fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            map_size: 8 << 20,
            max_batch: 16,
            bulk_flush_interval: Duration::from_millis(10),
        };
        let store = Store::open(dir.path(), &cfg).unwrap();
        let c = NonceCache::load(store.clone(), 100, 10).unwrap();
        let k = KeyId([9; 32]);
        let permit = store.reserve().await.unwrap();
        c.check_and_insert(k, [5; 16], 100, 10, Some(permit))
            .unwrap()
            .unwrap()
            .await
            .unwrap();
        let permit = store.reserve().await.unwrap();
        c.check_and_insert(k, [6; 16], 20, 10, Some(permit))
            .unwrap()
            .unwrap()
            .await
            .unwrap();
        drop(c);
        store.close().await;
        drop(store);
        let store = Store::open(dir.path(), &cfg).unwrap();
        let c = NonceCache::load(store.clone(), 100, 30).unwrap();
        assert_eq!(
            c.check_and_insert(k, [5; 16], 100, 30, None).err(),
            Some(SigError::Replayed)
        );
        // The expired one was pruned at load.
        assert_eq!(c.len(), 1);
        store.close().await;
    }
}
