//! Passkey (WebAuthn Level 2/3) verification for the portal: registration with `none`
//! attestation and authentication assertions, ES256 and EdDSA keys.
//!
//! Follows the relying-party steps of the WebAuthn specification (§7.1 "Registering a new
//! credential", §7.2 "Verifying an authentication assertion"): client data type, challenge and
//! origin; the RP ID hash; the user-present and user-verified flags; the credential's COSE key;
//! the signature over `authenticatorData || SHA-256(clientDataJSON)`; the signature counter.
//!
//! Off-spec, on purpose: the attestation statement is not verified whatever its format (the
//! portal asks for `attestation: "none"`, and browsers then send `none`); the portal trusts a
//! passkey because the user created it while signed up or signed in, not because of its maker.

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// COSE algorithm: ECDSA P-256 with SHA-256.
pub const ES256: i64 = -7;
/// COSE algorithm: Ed25519.
pub const EDDSA: i64 = -8;

/// Flag: the user was present.
pub const UP: u8 = 0x01;
/// Flag: the user was verified (PIN, biometrics).
pub const UV: u8 = 0x04;
/// Flag: the credential may be backed up (synced passkey).
pub const BE: u8 = 0x08;
/// Flag: the credential is backed up.
pub const BS: u8 = 0x10;
/// Flag: attested credential data follows.
pub const AT: u8 = 0x40;
/// Flag: extensions follow.
pub const ED: u8 = 0x80;

/// Why a ceremony's answer is refused; the message is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn bad(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// A credential's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// ECDSA P-256.
    Es256(p256::ecdsa::VerifyingKey),
    /// Ed25519.
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl PublicKey {
    /// The COSE algorithm number.
    pub fn alg(&self) -> i64 {
        match self {
            PublicKey::Es256(_) => ES256,
            PublicKey::Ed25519(_) => EDDSA,
        }
    }

    /// Bytes to store: SEC1 uncompressed point, or the Ed25519 key.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            PublicKey::Es256(k) => k.to_sec1_point(false).as_bytes().to_vec(),
            PublicKey::Ed25519(k) => k.as_bytes().to_vec(),
        }
    }

    /// The key back from [`PublicKey::alg`] and [`PublicKey::to_bytes`].
    ///
    /// # Errors
    /// Unknown algorithm or a malformed key.
    pub fn from_stored(alg: i64, bytes: &[u8]) -> Result<Self, Invalid> {
        match alg {
            ES256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
                .map(PublicKey::Es256)
                .map_err(|_| bad("stored ES256 key is malformed")),
            EDDSA => {
                let b: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| bad("stored Ed25519 key is not 32 bytes"))?;
                ed25519_dalek::VerifyingKey::from_bytes(&b)
                    .map(PublicKey::Ed25519)
                    .map_err(|_| bad("stored Ed25519 key is malformed"))
            }
            other => Err(bad(format!("unsupported algorithm {other}"))),
        }
    }

    /// Verifies `sig` over `msg` (ES256 signatures are DER-encoded, as authenticators send them).
    ///
    /// # Errors
    /// The signature does not verify or is malformed.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), Invalid> {
        match self {
            PublicKey::Es256(k) => {
                use p256::ecdsa::signature::Verifier;
                let s = p256::ecdsa::Signature::from_der(sig)
                    .map_err(|_| bad("the signature is not a DER ECDSA signature"))?;
                k.verify(msg, &s)
                    .map_err(|_| bad("the signature does not verify"))
            }
            PublicKey::Ed25519(k) => {
                let s = ed25519_dalek::Signature::from_slice(sig)
                    .map_err(|_| bad("the signature is not 64 bytes"))?;
                k.verify_strict(msg, &s)
                    .map_err(|_| bad("the signature does not verify"))
            }
        }
    }
}

/// Parses a COSE_Key (RFC 9052/9053) holding an ES256 or EdDSA public key.
///
/// # Errors
/// Not a map, an unsupported key type, algorithm or curve, or malformed coordinates.
pub fn parse_cose_key(v: &ciborium::Value) -> Result<PublicKey, Invalid> {
    let map = v.as_map().ok_or_else(|| bad("the COSE key is not a map"))?;
    let get = |label: i64| {
        map.iter()
            .find(|(k, _)| {
                k.as_integer()
                    .is_some_and(|i| i128::from(i) == i128::from(label))
            })
            .map(|(_, v)| v)
    };
    let int = |label: i64| -> Option<i128> { get(label)?.as_integer().map(i128::from) };
    let bytes = |label: i64| -> Option<&Vec<u8>> { get(label)?.as_bytes() };
    let kty = int(1).ok_or_else(|| bad("the COSE key has no kty"))?;
    let alg = int(3).ok_or_else(|| bad("the COSE key has no alg"))?;
    match (kty, alg) {
        (2, -7) => {
            if int(-1) != Some(1) {
                return Err(bad("ES256 key is not on P-256"));
            }
            let (x, y) = match (bytes(-2), bytes(-3)) {
                (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => (x, y),
                _ => return Err(bad("ES256 key coordinates are not 32 bytes each")),
            };
            let mut sec1 = Vec::with_capacity(65);
            sec1.push(0x04);
            sec1.extend_from_slice(x);
            sec1.extend_from_slice(y);
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                .map(PublicKey::Es256)
                .map_err(|_| bad("ES256 key is not a point on P-256"))
        }
        (1, -8) => {
            if int(-1) != Some(6) {
                return Err(bad("EdDSA key is not Ed25519"));
            }
            let x: [u8; 32] = bytes(-2)
                .and_then(|x| x.as_slice().try_into().ok())
                .ok_or_else(|| bad("Ed25519 key is not 32 bytes"))?;
            ed25519_dalek::VerifyingKey::from_bytes(&x)
                .map(PublicKey::Ed25519)
                .map_err(|_| bad("Ed25519 key is not a valid point"))
        }
        _ => Err(bad(format!(
            "unsupported key (kty {kty}, alg {alg}); the portal accepts ES256 (-7) and EdDSA (-8)"
        ))),
    }
}

/// `authenticatorData`, parsed.
#[derive(Debug, Clone)]
pub struct AuthData {
    /// SHA-256 of the RP ID the authenticator used.
    pub rp_id_hash: [u8; 32],
    /// Flags.
    pub flags: u8,
    /// Signature counter.
    pub sign_count: u32,
    /// The new credential (registration only).
    pub attested: Option<(Vec<u8>, PublicKey)>,
}

/// Parses `authenticatorData` (WebAuthn §6.1).
///
/// # Errors
/// Too short, inconsistent flags, or a malformed credential.
pub fn parse_auth_data(data: &[u8]) -> Result<AuthData, Invalid> {
    if data.len() < 37 {
        return Err(bad("authenticator data is shorter than 37 bytes"));
    }
    let mut rp_id_hash = [0u8; 32];
    rp_id_hash.copy_from_slice(&data[..32]);
    let flags = data[32];
    let sign_count = u32::from_be_bytes([data[33], data[34], data[35], data[36]]);
    let mut rest = &data[37..];
    let attested = if flags & AT != 0 {
        if rest.len() < 18 {
            return Err(bad("attested credential data is truncated"));
        }
        let len = usize::from(u16::from_be_bytes([rest[16], rest[17]]));
        rest = &rest[18..];
        if len == 0 || len > 1023 || rest.len() < len {
            return Err(bad("credential id length is out of range"));
        }
        let id = rest[..len].to_vec();
        rest = &rest[len..];
        let key: ciborium::Value = ciborium::from_reader(&mut rest)
            .map_err(|e| bad(format!("credential public key is not CBOR: {e}")))?;
        Some((id, parse_cose_key(&key)?))
    } else {
        None
    };
    if flags & ED != 0 {
        let _ext: ciborium::Value = ciborium::from_reader(&mut rest)
            .map_err(|e| bad(format!("extensions are not CBOR: {e}")))?;
    }
    if !rest.is_empty() {
        return Err(bad("authenticator data has trailing bytes"));
    }
    Ok(AuthData {
        rp_id_hash,
        flags,
        sign_count,
        attested,
    })
}

/// Pulls `authData` out of an attestation object (`{"fmt", "attStmt", "authData"}`).
///
/// # Errors
/// Not a CBOR map, or no `authData` byte string.
pub fn attestation_auth_data(obj: &[u8]) -> Result<Vec<u8>, Invalid> {
    let v: ciborium::Value = ciborium::from_reader(obj)
        .map_err(|e| bad(format!("attestation object is not CBOR: {e}")))?;
    let map = v
        .as_map()
        .ok_or_else(|| bad("attestation object is not a map"))?;
    let field = |name: &str| {
        map.iter()
            .find(|(k, _)| k.as_text() == Some(name))
            .map(|(_, v)| v)
    };
    if field("fmt").and_then(|f| f.as_text()).is_none() {
        return Err(bad("attestation object has no fmt"));
    }
    field("authData")
        .and_then(|a| a.as_bytes())
        .cloned()
        .ok_or_else(|| bad("attestation object has no authData"))
}

/// `clientDataJSON`'s fields that matter.
#[derive(Debug, Deserialize)]
struct ClientData {
    #[serde(rename = "type")]
    kind: String,
    challenge: String,
    origin: String,
    #[serde(default, rename = "crossOrigin")]
    cross_origin: Option<bool>,
}

/// What the relying party expects of an answer.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// `webauthn.create` or `webauthn.get`.
    pub kind: &'static str,
    /// The challenge sent.
    pub challenge: &'a [u8],
    /// Allowed origins (exact strings, e.g. `https://portal.example.com`).
    pub origins: &'a [String],
    /// The RP ID.
    pub rp_id: &'a str,
}

impl Expect<'_> {
    fn client_data(&self, raw: &[u8]) -> Result<(), Invalid> {
        use base64::Engine;
        let cd: ClientData = serde_json::from_slice(raw)
            .map_err(|e| bad(format!("clientDataJSON is not the expected JSON: {e}")))?;
        if cd.kind != self.kind {
            return Err(bad(format!(
                "client data type is {:?}, expected {:?}",
                cd.kind, self.kind
            )));
        }
        let got = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cd.challenge.trim_end_matches('='))
            .map_err(|_| bad("the challenge is not base64url"))?;
        if got != self.challenge {
            return Err(bad("the challenge is not the one this ceremony sent"));
        }
        if !self.origins.contains(&cd.origin) {
            return Err(bad(format!("origin {:?} is not allowed", cd.origin)));
        }
        if cd.cross_origin == Some(true) {
            return Err(bad("cross-origin ceremonies are not allowed"));
        }
        Ok(())
    }

    fn auth_data(&self, data: &[u8]) -> Result<AuthData, Invalid> {
        let a = parse_auth_data(data)?;
        if a.rp_id_hash != <[u8; 32]>::from(Sha256::digest(self.rp_id.as_bytes())) {
            return Err(bad(format!(
                "the authenticator answered for another RP ID than {:?}",
                self.rp_id
            )));
        }
        if a.flags & UP == 0 {
            return Err(bad("the user was not present (UP flag)"));
        }
        if a.flags & UV == 0 {
            return Err(bad("the user was not verified (UV flag)"));
        }
        if a.flags & BS != 0 && a.flags & BE == 0 {
            return Err(bad(
                "backed up (BS) but not backup-eligible (BE): inconsistent flags",
            ));
        }
        Ok(a)
    }

    /// Verifies a registration; returns the new credential's id, key and counter.
    ///
    /// # Errors
    /// Any check of §7.1 that fails.
    pub fn registration(
        &self,
        client_data: &[u8],
        attestation_object: &[u8],
    ) -> Result<(Vec<u8>, PublicKey, u32), Invalid> {
        self.client_data(client_data)?;
        let raw = attestation_auth_data(attestation_object)?;
        let a = self.auth_data(&raw)?;
        let (id, key) = a
            .attested
            .ok_or_else(|| bad("no attested credential data (AT flag)"))?;
        Ok((id, key, a.sign_count))
    }

    /// Verifies an assertion made with `key`; returns the new signature counter.
    ///
    /// # Errors
    /// Any check of §7.2 that fails.
    pub fn assertion(
        &self,
        client_data: &[u8],
        auth_data: &[u8],
        signature: &[u8],
        key: &PublicKey,
    ) -> Result<u32, Invalid> {
        self.client_data(client_data)?;
        let a = self.auth_data(auth_data)?;
        let mut msg = auth_data.to_vec();
        msg.extend_from_slice(&Sha256::digest(client_data));
        key.verify(&msg, signature)?;
        Ok(a.sign_count)
    }
}

/// Whether a signature counter shows a cloned authenticator: both non-zero and not increasing.
pub fn counter_regressed(stored: u32, new: u32) -> bool {
    (stored != 0 || new != 0) && new <= stored
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cose_es256(k: &p256::ecdsa::VerifyingKey) -> Vec<u8> {
        let p = k.to_sec1_point(false);
        let b = p.as_bytes();
        let v = ciborium::Value::Map(vec![
            (1.into(), 2.into()),
            (3.into(), (-7).into()),
            ((-1).into(), 1.into()),
            ((-2).into(), ciborium::Value::Bytes(b[1..33].to_vec())),
            ((-3).into(), ciborium::Value::Bytes(b[33..65].to_vec())),
        ]);
        let mut out = Vec::new();
        ciborium::into_writer(&v, &mut out).expect("cbor");
        out
    }

    fn auth_data(rp: &str, flags: u8, count: u32, cred: Option<(&[u8], &[u8])>) -> Vec<u8> {
        let mut d = Sha256::digest(rp.as_bytes()).to_vec();
        d.push(flags);
        d.extend_from_slice(&count.to_be_bytes());
        if let Some((id, key)) = cred {
            d.extend_from_slice(&[0u8; 16]);
            d.extend_from_slice(&(id.len() as u16).to_be_bytes());
            d.extend_from_slice(id);
            d.extend_from_slice(key);
        }
        d
    }

    #[test]
    fn counters_detect_clones_but_allow_authenticators_that_count_nothing() {
        assert!(!counter_regressed(0, 0));
        assert!(!counter_regressed(3, 4));
        assert!(counter_regressed(4, 4));
        assert!(counter_regressed(4, 2));
        assert!(counter_regressed(4, 0));
        assert!(!counter_regressed(0, 7));
    }

    #[test]
    fn authenticator_data_round_trips_and_rejects_garbage() {
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("key");
        let vk = *sk.verifying_key();
        let key = cose_es256(&vk);
        let d = auth_data("localhost", UP | UV | AT, 5, Some((b"cred", &key)));
        let a = parse_auth_data(&d).expect("parses");
        assert_eq!(a.sign_count, 5);
        let (id, k) = a.attested.expect("attested");
        assert_eq!(id, b"cred");
        assert_eq!(k, PublicKey::Es256(vk));
        // Round trip through storage.
        assert_eq!(
            PublicKey::from_stored(k.alg(), &k.to_bytes()).expect("stored"),
            k
        );

        assert!(parse_auth_data(&d[..30]).is_err());
        let mut trailing = d.clone();
        trailing.push(0);
        assert!(parse_auth_data(&trailing).is_err());
        let mut truncated = d.clone();
        truncated.truncate(d.len() - 3);
        assert!(parse_auth_data(&truncated).is_err());
    }

    #[test]
    fn unsupported_keys_are_named() {
        let rsa = ciborium::Value::Map(vec![(1.into(), 3.into()), (3.into(), (-257).into())]);
        let e = parse_cose_key(&rsa).unwrap_err();
        assert!(e.0.contains("-257"), "{e}");
        let off_curve = ciborium::Value::Map(vec![
            (1.into(), 2.into()),
            (3.into(), (-7).into()),
            ((-1).into(), 1.into()),
            ((-2).into(), ciborium::Value::Bytes(vec![1; 32])),
            ((-3).into(), ciborium::Value::Bytes(vec![2; 32])),
        ]);
        assert!(parse_cose_key(&off_curve).is_err());
    }

    #[test]
    fn an_es256_assertion_verifies_and_a_changed_byte_does_not() {
        use p256::ecdsa::signature::Signer;
        let sk = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).expect("key");
        let key = PublicKey::Es256(*sk.verifying_key());
        let origins = vec!["https://portal.example".to_string()];
        let challenge = [3u8; 32];
        let expect = Expect {
            kind: "webauthn.get",
            challenge: &challenge,
            origins: &origins,
            rp_id: "portal.example",
        };
        use base64::Engine;
        let cd = format!(
            r#"{{"type":"webauthn.get","challenge":"{}","origin":"https://portal.example","crossOrigin":false}}"#,
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(challenge)
        );
        let ad = auth_data("portal.example", UP | UV, 1, None);
        let mut msg = ad.clone();
        msg.extend_from_slice(&Sha256::digest(cd.as_bytes()));
        let sig: p256::ecdsa::Signature = sk.sign(&msg);
        let der = sig.to_der();
        assert_eq!(
            expect.assertion(cd.as_bytes(), &ad, der.as_bytes(), &key),
            Ok(1)
        );
        let mut other = ad.clone();
        other[36] = 2;
        assert!(
            expect
                .assertion(cd.as_bytes(), &other, der.as_bytes(), &key)
                .is_err()
        );
        let no_uv = auth_data("portal.example", UP, 1, None);
        assert!(
            expect
                .assertion(cd.as_bytes(), &no_uv, der.as_bytes(), &key)
                .is_err()
        );
        let wrong_rp = Expect {
            rp_id: "evil.example",
            ..expect.clone()
        };
        assert!(
            wrong_rp
                .assertion(cd.as_bytes(), &ad, der.as_bytes(), &key)
                .is_err()
        );
    }
}
