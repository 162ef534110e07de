//! A software WebAuthn authenticator for tests: what `navigator.credentials.create` and
//! `navigator.credentials.get` hand a web page, built from the options a relying party sends,
//! with "none" attestation (WebAuthn Level 2/3). It holds its credentials (ES256 or Ed25519 keys)
//! in memory, keeps a signature counter per credential, and answers in the JSON that
//! `PublicKeyCredential.toJSON()` produces, so a test can post it to a server as a browser would.
//!
//! Not declared in `common/mod.rs`: a test that needs it includes it with
//! `#[path = "common/authenticator.rs"] mod authenticator;`.
//!
//! A few public fields make it misbehave on purpose (flags, counter, rp id, COSE algorithm), so
//! that tests can check that the server refuses what it must.
#![allow(dead_code, clippy::unwrap_used)]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ciborium::Value as Cbor;
use p256::ecdsa::signature::Signer as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// User present.
pub const FLAG_UP: u8 = 0x01;
/// User verified.
pub const FLAG_UV: u8 = 0x04;
/// Backup eligible.
pub const FLAG_BE: u8 = 0x08;
/// Backed up.
pub const FLAG_BS: u8 = 0x10;
/// Attested credential data included.
pub const FLAG_AT: u8 = 0x40;
/// Extension data included.
pub const FLAG_ED: u8 = 0x80;

/// COSE algorithm identifier of ES256 (ECDSA P-256 with SHA-256).
pub const COSE_ES256: i64 = -7;
/// COSE algorithm identifier of EdDSA (Ed25519 here).
pub const COSE_EDDSA: i64 = -8;

/// base64url without padding, as WebAuthn's JSON uses.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding.
pub fn unb64(s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| format!("not base64url ({e}): {s:?}"))
}

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The signature algorithms the authenticator can create credentials with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA on P-256 with SHA-256 (COSE -7), DER-encoded signatures.
    Es256,
    /// Ed25519 (COSE -8), raw 64-byte signatures.
    EdDsa,
}

impl Alg {
    /// The COSE algorithm identifier.
    pub fn cose(self) -> i64 {
        match self {
            Alg::Es256 => COSE_ES256,
            Alg::EdDsa => COSE_EDDSA,
        }
    }
}

enum Key {
    Es256(p256::ecdsa::SigningKey),
    EdDsa(ed25519_dalek::SigningKey),
}

impl Key {
    fn generate(alg: Alg) -> Key {
        match alg {
            Alg::Es256 => loop {
                // A random 32-byte string is a valid scalar except with negligible probability.
                if let Ok(k) = p256::ecdsa::SigningKey::from_slice(&random::<32>()) {
                    return Key::Es256(k);
                }
            },
            Alg::EdDsa => Key::EdDsa(ed25519_dalek::SigningKey::from_bytes(&random::<32>())),
        }
    }

    fn alg(&self) -> Alg {
        match self {
            Key::Es256(_) => Alg::Es256,
            Key::EdDsa(_) => Alg::EdDsa,
        }
    }

    /// The public key as a COSE_Key, with `alg` as its algorithm label.
    fn cose_key(&self, alg: i64) -> Cbor {
        let int = |i: i64| Cbor::Integer(i.into());
        match self {
            Key::Es256(k) => {
                let point = k.verifying_key().to_sec1_point(false);
                let bytes = point.as_bytes();
                // 0x04 || x || y
                assert_eq!(bytes.len(), 65);
                Cbor::Map(vec![
                    (int(1), int(2)),
                    (int(3), int(alg)),
                    (int(-1), int(1)),
                    (int(-2), Cbor::Bytes(bytes[1..33].to_vec())),
                    (int(-3), Cbor::Bytes(bytes[33..65].to_vec())),
                ])
            }
            Key::EdDsa(k) => Cbor::Map(vec![
                (int(1), int(1)),
                (int(3), int(alg)),
                (int(-1), int(6)),
                (int(-2), Cbor::Bytes(k.verifying_key().to_bytes().to_vec())),
            ]),
        }
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            Key::Es256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(msg);
                sig.to_der().as_bytes().to_vec()
            }
            Key::EdDsa(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(msg).to_bytes().to_vec()
            }
        }
    }
}

/// A credential the authenticator holds (a discoverable credential, a passkey).
struct Credential {
    id: Vec<u8>,
    key: Key,
    rp_id: String,
    user_handle: Vec<u8>,
    counter: u32,
}

/// A software authenticator holding passkeys for any number of relying parties.
pub struct Authenticator {
    alg: Alg,
    credentials: Vec<Credential>,
    /// The flags byte to put in authenticatorData instead of the honest one, verbatim (a create
    /// still appends the attested credential data whether or not the byte has AT).
    pub flags_override: Option<u8>,
    /// How much the signature counter grows with each assertion; 0 keeps it at 0 forever, as
    /// many passkey providers (synced passkeys) do. Default 1.
    pub counter_step: u32,
    /// The rp id whose SHA-256 goes into authenticatorData whatever the options or the
    /// credential say: authenticator data made for another site.
    pub rp_id_override: Option<String>,
    /// The COSE algorithm label to write into a new credential's public key instead of the
    /// real one (the key itself stays what it is).
    pub cose_alg_override: Option<i64>,
    /// The `type` to write into clientDataJSON instead of `webauthn.create` or `webauthn.get`
    /// (signed like the honest one).
    pub client_data_type_override: Option<String>,
}

/// Random bytes from the OS.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).unwrap();
    b
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("options lack a string {key:?}: {v}"))
}

/// The ids in a list of PublicKeyCredentialDescriptors (`excludeCredentials`,
/// `allowCredentials`); a missing list is empty.
fn descriptor_ids(list: Option<&Value>) -> Result<Vec<Vec<u8>>, String> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| format!("credential descriptors are not a list: {list}"))?;
    list.iter()
        .map(|d| {
            if d.get("type").and_then(Value::as_str) != Some("public-key") {
                return Err(format!("descriptor of type other than public-key: {d}"));
            }
            unb64(str_field(d, "id")?)
        })
        .collect()
}

/// The host of an origin (`https://example.com:8443` → `example.com`): the rp id a browser
/// uses when the options name none.
fn origin_host(origin: &str) -> String {
    let rest = origin.split_once("://").map_or(origin, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
        _ => host.to_string(),
    }
}

fn client_data(kind: &str, challenge: &str, origin: &str) -> Vec<u8> {
    // Built by hand to keep the member order browsers use.
    format!(
        "{{\"type\":{},\"challenge\":{},\"origin\":{},\"crossOrigin\":false}}",
        json!(kind),
        json!(challenge),
        json!(origin)
    )
    .into_bytes()
}

/// The CBOR encoding of a value.
pub fn cbor(v: &Cbor) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

impl Authenticator {
    /// An authenticator that creates credentials with `alg` (and supports no other algorithm).
    pub fn new(alg: Alg) -> Self {
        Authenticator {
            alg,
            credentials: Vec::new(),
            flags_override: None,
            counter_step: 1,
            rp_id_override: None,
            cose_alg_override: None,
            client_data_type_override: None,
        }
    }

    /// The algorithm new credentials get.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    fn flags(&self, base: u8) -> u8 {
        self.flags_override.unwrap_or(base)
    }

    fn client_data_type<'a>(&'a self, honest: &'a str) -> &'a str {
        self.client_data_type_override.as_deref().unwrap_or(honest)
    }

    fn rp_id_hash(&self, rp_id: &str) -> [u8; 32] {
        sha256(self.rp_id_override.as_deref().unwrap_or(rp_id).as_bytes())
    }

    /// Like `navigator.credentials.create({publicKey})` followed by `toJSON()`: honours `rp.id`
    /// (the origin's host when absent), `user.id`, `challenge` and `excludeCredentials` (an
    /// error if it holds one of them), and picks the first algorithm of `pubKeyCredParams` that
    /// it supports (an error if none).
    pub fn create(&mut self, public_key: &Value, origin: &str) -> Result<Value, String> {
        let rp_id = self.creation_rp_id(public_key, origin)?;
        let excluded = descriptor_ids(public_key.get("excludeCredentials"))?;
        if let Some(c) = self
            .credentials
            .iter()
            .find(|c| c.rp_id == rp_id && excluded.contains(&c.id))
        {
            return Err(format!(
                "InvalidStateError: the authenticator already holds excluded credential {}",
                b64(&c.id)
            ));
        }
        let params = public_key
            .get("pubKeyCredParams")
            .and_then(Value::as_array)
            .ok_or("options lack pubKeyCredParams")?;
        let supported = params.iter().any(|p| {
            p.get("type").and_then(Value::as_str) == Some("public-key")
                && p.get("alg").and_then(Value::as_i64) == Some(self.alg.cose())
        });
        if !supported {
            return Err(format!(
                "NotSupportedError: no algorithm the authenticator supports ({}) in {}",
                self.alg.cose(),
                Value::Array(params.clone())
            ));
        }
        let user = public_key.get("user").ok_or("options lack user")?;
        let user_handle = unb64(str_field(user, "id")?)?;
        let credential = Credential {
            id: random::<16>().to_vec(),
            key: Key::generate(self.alg),
            rp_id,
            user_handle,
            counter: 0,
        };
        let json = self.attest(&credential, public_key, origin)?;
        // Discoverable credentials: a new one for the same rp and user replaces the old one.
        self.credentials
            .retain(|c| !(c.rp_id == credential.rp_id && c.user_handle == credential.user_handle));
        self.credentials.push(credential);
        Ok(json)
    }

    /// A registration response for a credential the authenticator already holds (id `id_b64`,
    /// same key), as if it were new: what a replayed registration or a buggy authenticator
    /// sends. Ignores `excludeCredentials` and changes nothing the authenticator holds.
    pub fn create_existing(
        &mut self,
        public_key: &Value,
        origin: &str,
        id_b64: &str,
    ) -> Result<Value, String> {
        let id = unb64(id_b64)?;
        let credential = self
            .credentials
            .iter()
            .find(|c| c.id == id)
            .ok_or_else(|| format!("no credential {id_b64}"))?;
        self.attest(credential, public_key, origin)
    }

    fn creation_rp_id(&self, public_key: &Value, origin: &str) -> Result<String, String> {
        let rp = public_key.get("rp").ok_or("options lack rp")?;
        Ok(match rp.get("id").and_then(Value::as_str) {
            Some(id) => id.to_string(),
            None => origin_host(origin),
        })
    }

    fn attest(
        &self,
        credential: &Credential,
        public_key: &Value,
        origin: &str,
    ) -> Result<Value, String> {
        let challenge = str_field(public_key, "challenge")?;
        let rp_id = self.creation_rp_id(public_key, origin)?;
        let client_data = client_data(self.client_data_type("webauthn.create"), challenge, origin);

        let mut auth_data = Vec::new();
        auth_data.extend_from_slice(&self.rp_id_hash(&rp_id));
        auth_data.push(self.flags(FLAG_UP | FLAG_UV | FLAG_BE | FLAG_BS | FLAG_AT));
        auth_data.extend_from_slice(&credential.counter.to_be_bytes());
        auth_data.extend_from_slice(&[0u8; 16]); // aaguid
        let id_len = u16::try_from(credential.id.len()).unwrap();
        auth_data.extend_from_slice(&id_len.to_be_bytes());
        auth_data.extend_from_slice(&credential.id);
        let alg = self
            .cose_alg_override
            .unwrap_or(credential.key.alg().cose());
        auth_data.extend_from_slice(&cbor(&credential.key.cose_key(alg)));

        let attestation_object = cbor(&Cbor::Map(vec![
            (Cbor::Text("fmt".into()), Cbor::Text("none".into())),
            (Cbor::Text("attStmt".into()), Cbor::Map(Vec::new())),
            (Cbor::Text("authData".into()), Cbor::Bytes(auth_data)),
        ]));
        let id = b64(&credential.id);
        Ok(json!({
            "id": id,
            "rawId": id,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64(&client_data),
                "attestationObject": b64(&attestation_object),
                "transports": ["internal"],
            },
            "clientExtensionResults": {},
            "authenticatorAttachment": "platform",
        }))
    }

    /// Like `navigator.credentials.get({publicKey})` followed by `toJSON()`: honours `rpId`
    /// (the origin's host when absent), `challenge` and `allowCredentials`; with an empty or
    /// missing `allowCredentials` it picks the most recently created credential it holds for
    /// the rp id (a discoverable login). Each assertion first adds `counter_step` to the
    /// credential's counter, then reports it.
    pub fn get(&mut self, public_key: &Value, origin: &str) -> Result<Value, String> {
        let challenge = str_field(public_key, "challenge")?.to_string();
        let rp_id = match public_key.get("rpId").and_then(Value::as_str) {
            Some(id) => id.to_string(),
            None => origin_host(origin),
        };
        let allowed = descriptor_ids(public_key.get("allowCredentials"))?;
        let index = self
            .credentials
            .iter()
            .rposition(|c| c.rp_id == rp_id && (allowed.is_empty() || allowed.contains(&c.id)))
            .ok_or_else(|| {
                format!("NotAllowedError: no credential for rp id {rp_id:?} among {allowed:?}")
            })?;
        let flags = self.flags(FLAG_UP | FLAG_UV | FLAG_BE | FLAG_BS);
        let rp_id_hash = self.rp_id_hash(&rp_id);
        let step = self.counter_step;
        let kind = self.client_data_type("webauthn.get").to_string();
        let credential = &mut self.credentials[index];
        credential.counter = credential.counter.wrapping_add(step);

        let client_data = client_data(&kind, &challenge, origin);
        let mut auth_data = Vec::new();
        auth_data.extend_from_slice(&rp_id_hash);
        auth_data.push(flags);
        auth_data.extend_from_slice(&credential.counter.to_be_bytes());

        let mut signed = auth_data.clone();
        signed.extend_from_slice(&sha256(&client_data));
        let signature = credential.key.sign(&signed);
        let id = b64(&credential.id);
        Ok(json!({
            "id": id,
            "rawId": id,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64(&client_data),
                "authenticatorData": b64(&auth_data),
                "signature": b64(&signature),
                "userHandle": b64(&credential.user_handle),
            },
            "clientExtensionResults": {},
        }))
    }

    /// The ids (base64url) of the credentials it holds, oldest first.
    pub fn credential_ids(&self) -> Vec<String> {
        self.credentials.iter().map(|c| b64(&c.id)).collect()
    }

    /// Sets a credential's counter (the next assertion reports `value + counter_step`): a
    /// cloned authenticator that lags behind the original.
    pub fn set_counter(&mut self, id_b64: &str, value: u32) {
        let id = unb64(id_b64).unwrap();
        let c = self
            .credentials
            .iter_mut()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("no credential {id_b64}"));
        c.counter = value;
    }

    /// A credential's counter: what its last assertion reported.
    pub fn counter(&self, id_b64: &str) -> u32 {
        let id = unb64(id_b64).unwrap();
        self.credentials
            .iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("no credential {id_b64}"))
            .counter
    }
}
