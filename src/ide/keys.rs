//! IDE API keys: created on first boot and by the control plane, stored hashed.
//!
//! A key is `ec-` followed by 43 characters of base64url (256 random bits). Only its SHA-256 is
//! stored (table `api_keys`), with a short id, a name and the first characters for recognising it
//! in listings; the key itself is shown once, when it is created. Lookups hit an in-memory map
//! loaded at boot, so checking a request's key costs one hash.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::store::{Durability, Store, StoreError, decode, encode};

/// Prefix of every key, so a leaked one is recognisable.
pub const KEY_PREFIX: &str = "ec-";

/// A stored key (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApiKeyRecord {
    /// Short id used to revoke it.
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// The key's first characters, for recognising it.
    pub prefix: String,
    /// When it was created.
    pub created_ms: u64,
}

/// A key just created: the only time its text is available.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NewApiKey {
    /// The key to give to the IDE.
    pub key: String,
    /// Its record.
    #[serde(flatten)]
    pub record: ApiKeyRecord,
}

/// The key store.
#[derive(Clone, Debug)]
pub struct ApiKeys {
    store: Store,
    by_hash: Arc<RwLock<HashMap<[u8; 32], ApiKeyRecord>>>,
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// Loads the stored keys.
    ///
    /// # Errors
    /// Store failures.
    pub fn load(store: Store) -> Result<Self, StoreError> {
        let map = store.read(|r, t| {
            let mut m = HashMap::new();
            for item in t.api_keys.iter(r)? {
                let (k, v) = item?;
                let Ok(h) = <[u8; 32]>::try_from(k) else {
                    continue;
                };
                m.insert(h, decode::<ApiKeyRecord>("api_keys", v)?);
            }
            Ok(m)
        })?;
        Ok(ApiKeys {
            store,
            by_hash: Arc::new(RwLock::new(map)),
        })
    }

    /// The record of a presented key, if it is valid. Also returns the key's hash, which
    /// identifies the caller (requester of its tasks, rate-limit bucket).
    pub fn check(&self, key: &str) -> Option<([u8; 32], ApiKeyRecord)> {
        if !key.starts_with(KEY_PREFIX) || key.len() > 128 {
            return None;
        }
        let h = hash(key);
        self.by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&h)
            .map(|r| (h, r.clone()))
    }

    /// Every key's record, oldest first.
    pub fn list(&self) -> Vec<ApiKeyRecord> {
        let mut v: Vec<ApiKeyRecord> = self
            .by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|r| (r.created_ms, r.id.clone()));
        v
    }

    /// Whether no key exists.
    pub fn is_empty(&self) -> bool {
        self.by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Creates a key (durably) and returns it; its text is not kept.
    ///
    /// # Errors
    /// Store failures.
    pub async fn create(&self, name: &str) -> Result<NewApiKey, StoreError> {
        let key = format!(
            "{KEY_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(crate::clock::random_bytes::<32>())
        );
        let id: String = crate::clock::random_bytes::<4>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let record = ApiKeyRecord {
            id,
            name: name.chars().take(64).collect(),
            prefix: key.chars().take(10).collect(),
            created_ms: crate::clock::now_ms(),
        };
        let h = hash(&key);
        let value = encode(&record);
        self.store
            .write(Durability::Critical, move |txn, t| {
                t.api_keys.put(txn, &h, &value)?;
                Ok(())
            })
            .await?;
        self.by_hash
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(h, record.clone());
        Ok(NewApiKey { key, record })
    }

    /// Revokes the key with `id`; returns whether it existed. Requests with it fail at once.
    ///
    /// # Errors
    /// Store failures.
    pub async fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let found = self
            .by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(_, r)| r.id == id)
            .map(|(h, _)| *h);
        let Some(h) = found else { return Ok(false) };
        self.by_hash
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&h);
        self.store
            .write(Durability::Critical, move |txn, t| {
                t.api_keys.delete(txn, &h)?;
                Ok(())
            })
            .await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;

    #[tokio::test]
    async fn keys_are_hashed_checked_listed_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            map_size: 8 << 20,
            max_batch: 16,
            bulk_flush_interval: std::time::Duration::from_millis(10),
        };
        let store = Store::open(dir.path(), &cfg).unwrap();
        let keys = ApiKeys::load(store.clone()).unwrap();
        assert!(keys.is_empty());
        let k = keys.create("laptop").await.unwrap();
        assert!(k.key.starts_with("ec-") && k.key.len() == 46);
        assert!(keys.check(&k.key).is_some());
        assert!(keys.check("ec-wrong").is_none());
        assert!(keys.check(&k.key[..45]).is_none());
        // The key's text is not in the store, only its hash.
        let raw = std::fs::read(dir.path().join("data.mdb")).unwrap();
        assert!(!raw.windows(k.key.len()).any(|w| w == k.key.as_bytes()));
        // Survives a reload.
        let again = ApiKeys::load(store.clone()).unwrap();
        assert_eq!(again.list(), vec![k.record.clone()]);
        assert!(keys.revoke(&k.record.id).await.unwrap());
        assert!(!keys.revoke(&k.record.id).await.unwrap());
        assert!(keys.check(&k.key).is_none());
        assert!(ApiKeys::load(store.clone()).unwrap().is_empty());
        store.close().await;
    }
}
