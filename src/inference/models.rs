//! The model store: GGUF files under `<data_dir>/models`, with their sha256 and metadata in the
//! store's `models` table.
//!
//! A file enters the store only whole and valid: downloads land in a hidden `.partial` file
//! (resumed with an HTTP Range request after an interruption), are checked against the expected
//! sha256 and by the GGUF validator, synced, and only then renamed into place and recorded. A
//! rejected download leaves nothing behind. Local files are copied the same way.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::api::PullEvent;
use super::gguf::{self, GgufInfo};
use crate::store::{Durability, Store, StoreError, decode, encode};

/// Progress lines are sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// A stored model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelRecord {
    /// Name (also the file name, plus `.gguf`).
    pub name: String,
    /// sha256 of the file, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Where it came from (URL or path).
    pub source: String,
    /// When it was added.
    pub added_ms: u64,
    /// What the file holds.
    pub info: GgufInfo,
}

/// Model store failures; each has a stable code for the API.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The name is not usable as a file name.
    #[error(
        "model name {0:?} must be 1-128 characters of letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    BadName(String),
    /// No such model.
    #[error("no model named {0:?} (see `edgecoder model list`)")]
    NotFound(String),
    /// A model with that name exists.
    #[error("a model named {0:?} already exists; remove it first or pick another --name")]
    Exists(String),
    /// Another pull or add for that name is running.
    #[error("a pull or add of {0:?} is already running; wait for it to finish")]
    Busy(String),
    /// The request itself is wrong (a malformed hash, a file that does not exist).
    #[error("{0}")]
    BadRequest(String),
    /// The download's sha256 differs from the expected one.
    #[error("sha256 mismatch: expected {expected}, got {actual}; nothing was stored")]
    Sha256Mismatch {
        /// Expected.
        expected: String,
        /// Actual.
        actual: String,
    },
    /// The file is not a valid GGUF model.
    #[error("not a usable model: {0}; nothing was stored")]
    Invalid(#[from] gguf::GgufError),
    /// The server refused or failed.
    #[error("download failed: {0}")]
    Http(String),
    /// The connection dropped mid-download; the partial file is kept for a resume.
    #[error("download interrupted after {done} bytes: {reason}; run the same pull again to resume")]
    Interrupted {
        /// Bytes kept.
        done: u64,
        /// Why.
        reason: String,
    },
    /// Local file trouble.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ModelError {
    /// Stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ModelError::BadName(_) => "invalid_model_name",
            ModelError::NotFound(_) => "model_not_found",
            ModelError::Exists(_) => "model_exists",
            ModelError::Busy(_) => "model_busy",
            ModelError::BadRequest(_) => "invalid_request",
            ModelError::Sha256Mismatch { .. } => "sha256_mismatch",
            ModelError::Invalid(_) => "invalid_model",
            ModelError::Http(_) => "download_failed",
            ModelError::Interrupted { .. } => "download_interrupted",
            ModelError::Io { .. } => "io_error",
            ModelError::Store(_) => "storage_error",
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a model name.
///
/// # Errors
/// [`ModelError::BadName`].
pub fn check_name(name: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ModelError::BadName(name.to_string()))
    }
}

/// A name from a URL or path: its last segment without `.gguf`, lower-cased.
pub fn name_from(source: &str) -> String {
    let last = source
        .split(['?', '#'])
        .next()
        .unwrap_or(source)
        .rsplit('/')
        .next()
        .unwrap_or(source);
    let stem = last.strip_suffix(".gguf").unwrap_or(last);
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The store of GGUF files.
#[derive(Clone, Debug)]
pub struct ModelStore {
    dir: PathBuf,
    store: Store,
    /// Names with a pull or add in progress: two would write the same partial file.
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Holds a name in [`ModelStore::busy`] until dropped.
struct NameGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    name: String,
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

impl ModelStore {
    /// A model store in `dir`, recorded in `store`.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(dir: PathBuf, store: Store) -> Result<Self, ModelError> {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(ModelStore {
            dir,
            store,
            busy: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    fn claim_name(&self, name: &str) -> Result<NameGuard, ModelError> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(name.to_string()) {
            return Err(ModelError::Busy(name.to_string()));
        }
        Ok(NameGuard {
            busy: self.busy.clone(),
            name: name.to_string(),
        })
    }

    /// Path of a model's file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.gguf"))
    }

    fn partial(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.gguf.partial"))
    }

    /// Every stored model, by name.
    ///
    /// # Errors
    /// Store failures.
    pub fn list(&self) -> Result<Vec<ModelRecord>, ModelError> {
        Ok(self.store.read(|r, t| {
            let mut out = Vec::new();
            for item in t.models.iter(r)? {
                let (_, v) = item?;
                out.push(decode::<ModelRecord>("models", v)?);
            }
            Ok(out)
        })?)
    }

    /// One stored model.
    ///
    /// # Errors
    /// Store failures.
    pub fn get(&self, name: &str) -> Result<Option<ModelRecord>, ModelError> {
        Ok(self
            .store
            .read(|r, t| match t.models.get(r, name.as_bytes())? {
                Some(v) => Ok(Some(decode("models", v)?)),
                None => Ok(None),
            })?)
    }

    async fn record(&self, rec: ModelRecord) -> Result<ModelRecord, ModelError> {
        let value = encode(&rec);
        let key = rec.name.clone();
        self.store
            .write(Durability::Critical, move |txn, t| {
                t.models.put(txn, key.as_bytes(), &value)?;
                Ok(())
            })
            .await?;
        Ok(rec)
    }

    /// Removes a model's record and file. Returns whether it existed.
    ///
    /// # Errors
    /// Store or file failures.
    pub async fn remove(&self, name: &str) -> Result<bool, ModelError> {
        check_name(name)?;
        let key = name.to_string();
        let existed = self
            .store
            .write(Durability::Critical, move |txn, t| {
                Ok(t.models.delete(txn, key.as_bytes())?)
            })
            .await?;
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(existed),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Copies a local GGUF file into the store.
    ///
    /// # Errors
    /// Bad name, existing model, unreadable or invalid file.
    pub async fn add_file(
        &self,
        source: &Path,
        name: Option<&str>,
    ) -> Result<ModelRecord, ModelError> {
        let name = name.map_or_else(|| name_from(&source.to_string_lossy()), str::to_string);
        check_name(&name)?;
        let _guard = self.claim_name(&name)?;
        if self.get(&name)?.is_some() {
            return Err(ModelError::Exists(name));
        }
        if !source.is_file() {
            return Err(ModelError::BadRequest(format!(
                "{} is not a readable file on the node",
                source.display()
            )));
        }
        let src = source.to_path_buf();
        let partial = self.partial(&name);
        let part = partial.clone();
        // Copy and hash off the async runtime: model files are gigabytes.
        let sha = tokio::task::spawn_blocking(move || -> Result<String, ModelError> {
            let mut input = std::fs::File::open(&src).map_err(io(&src))?;
            let mut out = std::fs::File::create(&part).map_err(io(&part))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = input.read(&mut buf).map_err(io(&src))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io(&part))?;
            }
            out.sync_all().map_err(io(&part))?;
            Ok(hex(&h.finalize()))
        })
        .await
        .map_err(|e| ModelError::Http(e.to_string()))?;
        let sha = match sha {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        self.commit(&name, &partial, sha, source.display().to_string())
            .await
    }

    /// Validates a finished partial file, moves it into place and records it; on failure the
    /// partial file is removed.
    async fn commit(
        &self,
        name: &str,
        partial: &Path,
        sha256: String,
        source: String,
    ) -> Result<ModelRecord, ModelError> {
        let p = partial.to_path_buf();
        let info = tokio::task::spawn_blocking(move || gguf::inspect(&p))
            .await
            .map_err(|e| ModelError::Http(e.to_string()))?;
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                let _ = std::fs::remove_file(partial);
                return Err(ModelError::Invalid(e));
            }
        };
        let dest = self.path(name);
        std::fs::rename(partial, &dest).map_err(io(&dest))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        let size = info.file_size;
        self.record(ModelRecord {
            name: name.to_string(),
            sha256,
            size,
            source,
            added_ms: crate::clock::now_ms(),
            info,
        })
        .await
    }

    /// Downloads a GGUF file into the store, resuming a previous partial download of the same
    /// name, sending progress to `progress`.
    ///
    /// # Errors
    /// Bad name, existing model, HTTP failures (partial kept for resume), sha256 mismatch or an
    /// invalid file (nothing kept).
    pub async fn pull(
        &self,
        url: &str,
        expected_sha256: Option<&str>,
        name: Option<&str>,
        progress: &mpsc::Sender<PullEvent>,
    ) -> Result<ModelRecord, ModelError> {
        let name = name.map_or_else(|| name_from(url), str::to_string);
        check_name(&name)?;
        let expected = expected_sha256.map(str::to_ascii_lowercase);
        if let Some(e) = &expected
            && (e.len() != 64 || !e.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ModelError::BadRequest(
                "sha256 must be 64 hex characters".into(),
            ));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ModelError::BadRequest(format!(
                "{url:?} is neither an http(s) URL nor a catalog name"
            )));
        }
        let _guard = self.claim_name(&name)?;
        if self.get(&name)?.is_some() {
            return Err(ModelError::Exists(name));
        }
        let partial = self.partial(&name);
        let origin = self.dir.join(format!(".{name}.gguf.source"));
        // A partial download from another URL cannot be resumed.
        let same_source = std::fs::read_to_string(&origin).is_ok_and(|s| s == url);
        if !same_source {
            let _ = std::fs::remove_file(&partial);
            std::fs::write(&origin, url).map_err(io(&origin))?;
        }
        let mut have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        // Hash what is already there, so the final sha256 covers the whole file.
        let mut hasher = Sha256::new();
        if have > 0 {
            let p = partial.clone();
            hasher = tokio::task::spawn_blocking(move || -> Result<Sha256, ModelError> {
                let mut h = Sha256::new();
                let mut f = std::fs::File::open(&p).map_err(io(&p))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf).map_err(io(&p))?;
                    if n == 0 {
                        return Ok(h);
                    }
                    h.update(&buf[..n]);
                }
            })
            .await
            .map_err(|e| ModelError::Http(e.to_string()))??;
        }
        let client = crate::http::client_builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ModelError::Http(e.to_string()))?;
        let mut req = client.get(url);
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        // A failure before any byte arrived leaves nothing to resume.
        let forget = |e: ModelError| {
            if !partial.exists() {
                let _ = std::fs::remove_file(&origin);
            }
            e
        };
        let resp = req
            .send()
            .await
            .map_err(|e| forget(ModelError::Http(format!("{url}: {e}"))))?;
        let status = resp.status();
        let resumed_from = if status == reqwest::StatusCode::PARTIAL_CONTENT {
            let start = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start != Some(have) {
                let _ = std::fs::remove_file(&partial);
                return Err(ModelError::Http(format!(
                    "server resumed at {start:?}, not at byte {have}; run the pull again"
                )));
            }
            have
        } else if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
            // Everything was already downloaded.
            have
        } else if status.is_success() {
            // No range support (or a fresh download): start over.
            have = 0;
            hasher = Sha256::new();
            0
        } else {
            return Err(forget(ModelError::Http(format!("{url}: HTTP {status}"))));
        };
        let total = if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            Some(have)
        } else {
            resp.content_length().map(|n| n + resumed_from)
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed_from > 0)
            .truncate(resumed_from == 0)
            .open(&partial)
            .await
            .map_err(io(&partial))?;
        let mut done = have;
        let mut last = Instant::now() - PROGRESS_EVERY;
        let _ = progress
            .send(PullEvent::Progress {
                done,
                total,
                resumed_from,
            })
            .await;
        if status != reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            let mut body = resp.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = file.sync_all().await;
                        return Err(ModelError::Interrupted {
                            done,
                            reason: e.to_string(),
                        });
                    }
                };
                file.write_all(&chunk).await.map_err(io(&partial))?;
                hasher.update(&chunk);
                done += chunk.len() as u64;
                if last.elapsed() >= PROGRESS_EVERY {
                    last = Instant::now();
                    let _ = progress
                        .send(PullEvent::Progress {
                            done,
                            total,
                            resumed_from,
                        })
                        .await;
                }
            }
        }
        file.sync_all().await.map_err(io(&partial))?;
        drop(file);
        if let Some(t) = total
            && done < t
        {
            return Err(ModelError::Interrupted {
                done,
                reason: format!("the server sent {done} of {t} bytes"),
            });
        }
        let _ = progress
            .send(PullEvent::Progress {
                done,
                total,
                resumed_from,
            })
            .await;
        let _ = progress.send(PullEvent::Verifying).await;
        let actual = hex(&hasher.finalize());
        if let Some(e) = expected
            && e != actual
        {
            let _ = std::fs::remove_file(&partial);
            let _ = std::fs::remove_file(&origin);
            return Err(ModelError::Sha256Mismatch {
                expected: e,
                actual,
            });
        }
        let rec = self.commit(&name, &partial, actual, url.to_string()).await;
        let _ = std::fs::remove_file(&origin);
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("qwen2.5-coder-1.5b_q4").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(".hidden").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("a b").is_err());
        assert_eq!(
            name_from("https://h/x/Qwen2.5-Coder-1.5B-Q4_K_M.gguf?download=1"),
            "qwen2.5-coder-1.5b-q4_k_m"
        );
        assert_eq!(name_from("/tmp/My Model.gguf"), "my-model");
    }
}
