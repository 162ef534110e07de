//! End-to-end encryption of task payloads, events and results between nodes.
//!
//! Sealed to a node's X25519 key (published in its capability record and `/identity`): a fresh
//! ephemeral X25519 key per message, HKDF-SHA256 over the shared secret (salted with both public
//! keys) to an AES-256-GCM key, and a random 96-bit nonce. A key is never used twice (each
//! message has its own ephemeral key), so no nonce is ever reused under one key. The associated
//! data binds a sealed blob to its purpose (`payload`, `event`, `result`), task and attempt, so
//! it cannot be replayed into another task.
//!
//! Layout: `ephemeral public key (32) || nonce (12) || ciphertext with tag`, base64url in JSON
//! as `{"sealed": "..."}`.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

const INFO: &[u8] = b"edgecoder/mesh/seal/v1";

/// Why a sealed blob could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not a sealed value.
    #[error("not a sealed value")]
    Malformed,
    /// Wrong key, wrong context, or altered.
    #[error("sealed value does not decrypt (wrong key or context, or tampered)")]
    Decrypt,
}

fn key(shared: &[u8; 32], eph: &[u8; 32], recipient: &[u8; 32]) -> Aes256Gcm {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut k = [0u8; 32];
    // 32 bytes is always a valid HKDF-SHA256 output length.
    let _ = hk.expand(INFO, &mut k);
    Aes256Gcm::new(&k.into())
}

/// Encrypts `plaintext` to `recipient`, bound to `aad`.
pub fn seal(recipient: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let eph = StaticSecret::from(crate::clock::random_bytes::<32>());
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(*recipient));
    let cipher = key(shared.as_bytes(), &eph_pub, recipient);
    let nonce = crate::clock::random_bytes::<12>();
    let ct = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_default();
    let mut out = Vec::with_capacity(44 + ct.len());
    out.extend_from_slice(&eph_pub);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Decrypts a blob sealed to `secret`'s public key with the same `aad`.
///
/// # Errors
/// Too short, or not decryptable with this key and context.
pub fn open(secret: &StaticSecret, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < 32 + 12 + 16 {
        return Err(SealError::Malformed);
    }
    let (eph, rest) = sealed.split_at(32);
    let (nonce, ct) = rest.split_at(12);
    let eph: [u8; 32] = eph.try_into().map_err(|_| SealError::Malformed)?;
    let nonce: [u8; 12] = nonce.try_into().map_err(|_| SealError::Malformed)?;
    let recipient = PublicKey::from(secret).to_bytes();
    let shared = secret.diffie_hellman(&PublicKey::from(eph));
    key(shared.as_bytes(), &eph, &recipient)
        .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
        .map_err(|_| SealError::Decrypt)
}

/// Seals a JSON value: `{"sealed": "<base64url>"}`.
pub fn seal_json(recipient: &[u8; 32], aad: &str, v: &serde_json::Value) -> serde_json::Value {
    let text = serde_json::to_vec(v).unwrap_or_default();
    serde_json::json!({ "sealed": URL_SAFE_NO_PAD.encode(seal(recipient, aad.as_bytes(), &text)) })
}

/// Opens a value made by [`seal_json`].
///
/// # Errors
/// Not of that shape, or not decryptable.
pub fn open_json(
    secret: &StaticSecret,
    aad: &str,
    v: &serde_json::Value,
) -> Result<serde_json::Value, SealError> {
    let s = v
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("sealed"))
        .and_then(|s| s.as_str())
        .ok_or(SealError::Malformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| SealError::Malformed)?;
    let plain = open(secret, aad.as_bytes(), &bytes)?;
    serde_json::from_slice(&plain).map_err(|_| SealError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_right_key_and_context() {
        let bob = StaticSecret::from([7u8; 32]);
        let bob_pub = PublicKey::from(&bob).to_bytes();
        let v = serde_json::json!({"prompt": "fn main() {", "n": 3});
        let s = seal_json(&bob_pub, "payload:T1:1", &v);
        assert_eq!(open_json(&bob, "payload:T1:1", &s).unwrap(), v);
        // Another task or attempt, another key: refused.
        assert_eq!(open_json(&bob, "payload:T1:2", &s), Err(SealError::Decrypt));
        let eve = StaticSecret::from([9u8; 32]);
        assert_eq!(open_json(&eve, "payload:T1:1", &s), Err(SealError::Decrypt));
        // Every flipped bit is detected.
        let raw = URL_SAFE_NO_PAD
            .decode(s["sealed"].as_str().unwrap())
            .unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x10;
            assert!(open(&bob, b"payload:T1:1", &bad).is_err(), "byte {i}");
        }
        assert_eq!(open(&bob, b"", &raw[..40]), Err(SealError::Malformed));
        assert_eq!(
            open_json(&bob, "x", &serde_json::json!({"prompt": 1})),
            Err(SealError::Malformed)
        );
    }

    #[test]
    fn two_seals_of_the_same_value_share_no_key_or_nonce() {
        let bob_pub = PublicKey::from(&StaticSecret::from([7u8; 32])).to_bytes();
        let a = seal(&bob_pub, b"", b"same");
        let b = seal(&bob_pub, b"", b"same");
        assert_ne!(a[..32], b[..32], "ephemeral keys differ");
        assert_ne!(a[32..44], b[32..44], "nonces differ");
        assert_ne!(a, b);
    }
}
