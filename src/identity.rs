//! Node and agent identities: an ed25519 signing key and an x25519 key, kept in one file.
//!
//! The file (`identity.key` in the data directory for the node, `worker/agent.key` for the local
//! worker) is created on first run with mode 0600 and written atomically (temporary file, fsync,
//! rename, fsync of the directory), so a power cut leaves either no key or a whole one. A key file
//! that other users can read is refused rather than used.
//!
//! Ids: a key's [`KeyId`] is its ed25519 public key in unpadded base64url (what request signatures
//! name as `keyid`); its [`NodeId`] is a short hash of that key for humans and URLs.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};

use crate::clock::random_bytes;

/// First line of an identity file; a different line means a format this build does not know.
const FILE_HEADER: &str = "edgecoder-identity-v1";

/// Domain tag hashed in front of the public key when deriving a node id, so the id can never
/// collide with a hash of the same key made for another purpose.
const NODE_ID_TAG: &[u8] = b"edgecoder/node-id/v1\0";

/// What can go wrong loading or creating an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading, writing or syncing the key file failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but is not a valid identity file.
    #[error("identity file {path} is malformed: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Group or other users may read the file.
    #[error(
        "identity file {path} has mode {mode:o}; a private key must not be readable by others (chmod 600)"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// A 32-character hex id derived from an ed25519 public key; stable for the life of the key.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId(pub [u8; 16]);

impl NodeId {
    /// Derives the id of a public key.
    pub fn of(key: &VerifyingKey) -> Self {
        let mut h = Sha256::new();
        h.update(NODE_ID_TAG);
        h.update(key.as_bytes());
        let digest = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        NodeId(id)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for NodeId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("a node id is 32 hex characters, got {s:?}"));
        }
        let mut id = [0u8; 16];
        for (i, out) in id.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(NodeId(id))
    }
}

/// An ed25519 public key as it appears in `keyid`: unpadded base64url of the 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    /// The key id of a public key.
    pub fn of(key: &VerifyingKey) -> Self {
        KeyId(key.to_bytes())
    }

    /// Parses the base64url form.
    ///
    /// # Errors
    /// When the text is not 32 bytes of unpadded base64url.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|e| format!("keyid is not base64url: {e}"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "keyid must encode 32 bytes".to_string())?;
        Ok(KeyId(arr))
    }

    /// The public key, if the bytes are a valid curve point.
    ///
    /// # Errors
    /// When the bytes are not a valid ed25519 public key.
    pub fn verifying_key(&self) -> Result<VerifyingKey, ed25519_dalek::SignatureError> {
        VerifyingKey::from_bytes(&self.0)
    }

    /// The node id derived from this key.
    pub fn node_id(&self) -> Option<NodeId> {
        self.verifying_key().ok().map(|k| NodeId::of(&k))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> serde::Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            KeyId::parse(&s).map_err(serde::de::Error::custom)
        } else {
            Ok(KeyId(<[u8; 32]>::deserialize(d)?))
        }
    }
}

/// A private identity: the signing key and the x25519 key for envelope encryption.
pub struct Identity {
    signing: SigningKey,
    x25519: StaticSecret,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Identity")
            .field("node_id", &self.node_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Self {
        Identity {
            signing: SigningKey::from_bytes(&random_bytes::<32>()),
            x25519: StaticSecret::from(random_bytes::<32>()),
        }
    }

    /// An identity from given secret bytes (the simulation derives them from its seed so that
    /// a run repeats exactly; real nodes use [`Identity::generate`]).
    pub fn from_secrets(ed25519: [u8; 32], x25519: [u8; 32]) -> Self {
        Identity {
            signing: SigningKey::from_bytes(&ed25519),
            x25519: StaticSecret::from(x25519),
        }
    }

    /// The ed25519 signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The x25519 secret used to open envelopes addressed to this node.
    pub fn x25519_secret(&self) -> &StaticSecret {
        &self.x25519
    }

    /// The public ed25519 key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The public x25519 key.
    pub fn x25519_public(&self) -> XPublicKey {
        XPublicKey::from(&self.x25519)
    }

    /// The key id (`keyid` in signatures).
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.verifying_key())
    }

    /// The node id.
    pub fn node_id(&self) -> NodeId {
        NodeId::of(&self.verifying_key())
    }

    /// Loads the identity at `path`, creating it (mode 0600, atomically) if the file does not exist.
    /// Returns the identity and whether it was created now.
    ///
    /// # Errors
    /// I/O failures, a malformed file, or a file readable by group or others.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), IdentityError> {
        match Self::load(path) {
            Ok(id) => Ok((id, false)),
            Err(IdentityError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let id = Self::generate();
                id.write_new(path)?;
                Ok((id, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Loads an existing identity file.
    ///
    /// # Errors
    /// I/O failures, a malformed file, or a file readable by group or others.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(io)?;
        Self::parse(&text).map_err(|reason| IdentityError::Malformed {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(FILE_HEADER) {
            return Err(format!("first line must be {FILE_HEADER:?}"));
        }
        let mut ed = None;
        let mut x = None;
        for line in lines {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| format!("line {line:?} is not `name:base64`"))?;
            let bytes: [u8; 32] = STANDARD
                .decode(v.trim())
                .map_err(|e| format!("{k}: {e}"))?
                .try_into()
                .map_err(|_| format!("{k}: must be 32 bytes"))?;
            match k {
                "ed25519" => ed = Some(bytes),
                "x25519" => x = Some(bytes),
                other => return Err(format!("unknown key kind {other:?}")),
            }
        }
        let ed = ed.ok_or("missing ed25519 line")?;
        let x = x.ok_or("missing x25519 line")?;
        Ok(Identity {
            signing: SigningKey::from_bytes(&ed),
            x25519: StaticSecret::from(x),
        })
    }

    fn write_new(&self, path: &Path) -> Result<(), IdentityError> {
        let io = |source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("key.tmp");
        // A leftover temporary file is from a crash during an earlier creation: nothing used it.
        let _ = fs::remove_file(&tmp);
        let body = format!(
            "{FILE_HEADER}\ned25519:{}\nx25519:{}\n",
            STANDARD.encode(self.signing.to_bytes()),
            STANDARD.encode(self.x25519.to_bytes())
        );
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(body.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        fs::rename(&tmp, path).map_err(io)?;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.key");
        let (a, created) = Identity::load_or_create(&path).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = Identity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.key_id(), b.key_id());
        assert_eq!(a.x25519_public().as_bytes(), b.x25519_public().as_bytes());
        assert_eq!(a.node_id().to_string().len(), 32);
        assert_eq!(a.node_id().to_string().parse::<NodeId>(), Ok(a.node_id()));
    }

    #[test]
    fn refuses_readable_or_malformed_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        Identity::load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::Permissions { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "edgecoder-identity-v1\ned25519:AAAA\n").unwrap();
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::Malformed { .. })
        ));
        fs::write(&path, "something else").unwrap();
        assert!(matches!(
            Identity::load(&path),
            Err(IdentityError::Malformed { .. })
        ));
    }

    #[test]
    fn key_id_round_trip() {
        let id = Identity::generate();
        let text = id.key_id().to_string();
        assert_eq!(text.len(), 43);
        assert_eq!(KeyId::parse(&text).unwrap(), id.key_id());
        assert_eq!(id.key_id().node_id(), Some(id.node_id()));
        assert!(KeyId::parse("not base64!").is_err());
        assert!(KeyId::parse("AAAA").is_err());
    }
}
