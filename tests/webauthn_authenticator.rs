//! The test authenticator (tests/common/authenticator.rs) checked against WebAuthn's formats
//! with independent parsing: the attestation object is CBOR with the fields "none" attestation
//! has, authenticatorData has the documented layout, the COSE key is the credential's public
//! key, and assertion signatures verify with p256 and ed25519-dalek over
//! authenticatorData || SHA-256(clientDataJSON).
#![allow(clippy::unwrap_used)]

#[path = "common/authenticator.rs"]
mod authenticator;

use authenticator::{Alg, Authenticator, b64, sha256, unb64};
use ciborium::Value as Cbor;
use serde_json::{Value, json};

const ORIGIN: &str = "http://localhost:4310";
const RP: &str = "localhost";

fn creation(challenge: &[u8], user: &[u8], exclude: &[&str]) -> Value {
    json!({
        "challenge": b64(challenge),
        "rp": {"id": RP, "name": "EdgeCoder"},
        "user": {"id": b64(user), "name": "alice", "displayName": "Alice"},
        "pubKeyCredParams": [{"type": "public-key", "alg": -8}, {"type": "public-key", "alg": -7}],
        "timeout": 60000,
        "attestation": "none",
        "authenticatorSelection": {"residentKey": "required", "userVerification": "required"},
        "excludeCredentials": exclude.iter().map(|id| json!({"type": "public-key", "id": id})).collect::<Vec<_>>(),
    })
}

fn request(challenge: &[u8], allow: &[&str]) -> Value {
    json!({
        "challenge": b64(challenge),
        "rpId": RP,
        "timeout": 60000,
        "userVerification": "required",
        "allowCredentials": allow.iter().map(|id| json!({"type": "public-key", "id": id})).collect::<Vec<_>>(),
    })
}

fn text(s: &str) -> Cbor {
    Cbor::Text(s.into())
}

fn int(i: i64) -> Cbor {
    Cbor::Integer(i.into())
}

fn map_get<'a>(m: &'a Cbor, k: &Cbor) -> Option<&'a Cbor> {
    m.as_map()?.iter().find(|(key, _)| key == k).map(|(_, v)| v)
}

fn bytes(v: Option<&Cbor>) -> Vec<u8> {
    v.and_then(Cbor::as_bytes).expect("a byte string").to_vec()
}

/// What a registration response carries, parsed without the authenticator's help.
struct Parsed {
    client_data: Value,
    rp_id_hash: Vec<u8>,
    flags: u8,
    sign_count: u32,
    aaguid: Vec<u8>,
    credential_id: Vec<u8>,
    cose_key: Cbor,
}

fn parse_registration(cred: &Value) -> Parsed {
    assert_eq!(cred["type"], "public-key");
    assert_eq!(cred["id"], cred["rawId"]);
    assert_eq!(cred["response"]["transports"], json!(["internal"]));
    assert_eq!(cred["clientExtensionResults"], json!({}));
    assert_eq!(cred["authenticatorAttachment"], "platform");
    let client_data: Value = serde_json::from_slice(
        &unb64(cred["response"]["clientDataJSON"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let att = unb64(cred["response"]["attestationObject"].as_str().unwrap()).unwrap();
    let att: Cbor = ciborium::from_reader(att.as_slice()).unwrap();
    let entries = att.as_map().expect("the attestation object is a map");
    assert_eq!(entries.len(), 3, "{att:?}");
    assert_eq!(map_get(&att, &text("fmt")), Some(&text("none")));
    assert_eq!(
        map_get(&att, &text("attStmt")),
        Some(&Cbor::Map(Vec::new())),
        "attStmt is an empty map"
    );
    let auth = bytes(map_get(&att, &text("authData")));

    assert!(
        auth.len() > 37 + 16 + 2,
        "authData too short: {}",
        auth.len()
    );
    let rp_id_hash = auth[..32].to_vec();
    let flags = auth[32];
    let sign_count = u32::from_be_bytes(auth[33..37].try_into().unwrap());
    let aaguid = auth[37..53].to_vec();
    let id_len = usize::from(u16::from_be_bytes(auth[53..55].try_into().unwrap()));
    let credential_id = auth[55..55 + id_len].to_vec();
    let mut rest = &auth[55 + id_len..];
    let cose_key: Cbor = ciborium::from_reader(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes after the COSE key: {rest:?}");
    Parsed {
        client_data,
        rp_id_hash,
        flags,
        sign_count,
        aaguid,
        credential_id,
        cose_key,
    }
}

/// Verifies an assertion with the COSE key of the registration, independently of the
/// authenticator; returns authenticatorData.
fn verify_assertion(assertion: &Value, cose_key: &Cbor) -> Result<Vec<u8>, String> {
    let r = &assertion["response"];
    let client_data = unb64(r["clientDataJSON"].as_str().unwrap()).unwrap();
    let auth = unb64(r["authenticatorData"].as_str().unwrap()).unwrap();
    let sig = unb64(r["signature"].as_str().unwrap()).unwrap();
    let mut msg = auth.clone();
    msg.extend_from_slice(&sha256(&client_data));
    let alg = map_get(cose_key, &int(3))
        .and_then(Cbor::as_integer)
        .unwrap();
    let alg = i64::try_from(alg).unwrap();
    match alg {
        -7 => {
            use p256::ecdsa::signature::Verifier;
            let mut sec1 = vec![4u8];
            sec1.extend(bytes(map_get(cose_key, &int(-2))));
            sec1.extend(bytes(map_get(cose_key, &int(-3))));
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).unwrap();
            let sig = p256::ecdsa::Signature::from_der(&sig).map_err(|e| e.to_string())?;
            key.verify(&msg, &sig).map_err(|e| e.to_string())?;
        }
        -8 => {
            use ed25519_dalek::Verifier;
            let x: [u8; 32] = bytes(map_get(cose_key, &int(-2))).try_into().unwrap();
            let key = ed25519_dalek::VerifyingKey::from_bytes(&x).unwrap();
            let sig: [u8; 64] = sig.as_slice().try_into().map_err(|_| "length")?;
            key.verify(&msg, &ed25519_dalek::Signature::from_bytes(&sig))
                .map_err(|e| e.to_string())?;
        }
        other => panic!("alg {other}"),
    }
    Ok(auth)
}

#[test]
fn es256_registration_is_well_formed_and_assertions_verify_with_p256() {
    let mut a = Authenticator::new(Alg::Es256);
    let challenge = [7u8; 32];
    let cred = a
        .create(&creation(&challenge, b"user-1", &[]), ORIGIN)
        .unwrap();
    let p = parse_registration(&cred);

    assert_eq!(
        p.client_data,
        json!({"type": "webauthn.create", "challenge": b64(&challenge), "origin": ORIGIN, "crossOrigin": false})
    );
    assert_eq!(p.rp_id_hash, sha256(RP.as_bytes()));
    assert_eq!(p.flags, 0x01 | 0x04 | 0x08 | 0x10 | 0x40, "UP UV BE BS AT");
    assert_eq!(p.sign_count, 0);
    assert_eq!(p.aaguid, [0u8; 16]);
    assert_eq!(b64(&p.credential_id), cred["id"].as_str().unwrap());
    assert_eq!(a.credential_ids(), vec![b64(&p.credential_id)]);
    // ES256 COSE key: the first alg of pubKeyCredParams it supports (-8 is listed first).
    let key = p.cose_key.as_map().unwrap();
    assert_eq!(key.len(), 5);
    assert_eq!(map_get(&p.cose_key, &int(1)), Some(&int(2)), "kty EC2");
    assert_eq!(map_get(&p.cose_key, &int(3)), Some(&int(-7)), "alg ES256");
    assert_eq!(map_get(&p.cose_key, &int(-1)), Some(&int(1)), "crv P-256");
    assert_eq!(bytes(map_get(&p.cose_key, &int(-2))).len(), 32);
    assert_eq!(bytes(map_get(&p.cose_key, &int(-3))).len(), 32);

    let challenge = [9u8; 32];
    let id = b64(&p.credential_id);
    let got = a.get(&request(&challenge, &[&id]), ORIGIN).unwrap();
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["rawId"], id.as_str());
    assert_eq!(got["type"], "public-key");
    assert_eq!(got["response"]["userHandle"], b64(b"user-1"));
    let client_data: Value = serde_json::from_slice(
        &unb64(got["response"]["clientDataJSON"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(
        client_data,
        json!({"type": "webauthn.get", "challenge": b64(&challenge), "origin": ORIGIN, "crossOrigin": false})
    );
    let auth = verify_assertion(&got, &p.cose_key).unwrap();
    assert_eq!(auth.len(), 37, "no attested data in an assertion");
    assert_eq!(auth[..32], sha256(RP.as_bytes()));
    assert_eq!(auth[32], 0x01 | 0x04 | 0x08 | 0x10);
    assert_eq!(u32::from_be_bytes(auth[33..37].try_into().unwrap()), 1);

    // The counter grows by one per assertion.
    let got = a.get(&request(&challenge, &[&id]), ORIGIN).unwrap();
    let auth = verify_assertion(&got, &p.cose_key).unwrap();
    assert_eq!(u32::from_be_bytes(auth[33..37].try_into().unwrap()), 2);
    assert_eq!(a.counter(&id), 2);

    // A flipped byte of the signature no longer verifies.
    let mut tampered = got.clone();
    let mut sig = unb64(got["response"]["signature"].as_str().unwrap()).unwrap();
    let last = sig.len() - 1;
    sig[last] ^= 1;
    tampered["response"]["signature"] = json!(b64(&sig));
    assert!(verify_assertion(&tampered, &p.cose_key).is_err());
}

#[test]
fn eddsa_registration_is_well_formed_and_assertions_verify_with_ed25519_dalek() {
    let mut a = Authenticator::new(Alg::EdDsa);
    let cred = a.create(&creation(&[1; 32], b"bob", &[]), ORIGIN).unwrap();
    let p = parse_registration(&cred);
    assert_eq!(p.cose_key.as_map().unwrap().len(), 4);
    assert_eq!(map_get(&p.cose_key, &int(1)), Some(&int(1)), "kty OKP");
    assert_eq!(map_get(&p.cose_key, &int(3)), Some(&int(-8)), "alg EdDSA");
    assert_eq!(map_get(&p.cose_key, &int(-1)), Some(&int(6)), "crv Ed25519");

    // Discoverable: no allowCredentials.
    let got = a.get(&request(&[2; 32], &[]), ORIGIN).unwrap();
    assert_eq!(got["id"], cred["id"]);
    assert_eq!(got["response"]["userHandle"], b64(b"bob"));
    let sig = unb64(got["response"]["signature"].as_str().unwrap()).unwrap();
    assert_eq!(sig.len(), 64, "raw Ed25519 signature");
    verify_assertion(&got, &p.cose_key).unwrap();

    let mut tampered = got.clone();
    let mut auth = unb64(got["response"]["authenticatorData"].as_str().unwrap()).unwrap();
    auth[36] ^= 1; // the counter
    tampered["response"]["authenticatorData"] = json!(b64(&auth));
    assert!(verify_assertion(&tampered, &p.cose_key).is_err());
}

#[test]
fn honours_exclude_and_allow_lists_rp_ids_and_algorithms() {
    let mut a = Authenticator::new(Alg::Es256);
    let first = a.create(&creation(&[1; 32], b"u1", &[]), ORIGIN).unwrap();
    let first_id = first["id"].as_str().unwrap().to_string();

    // excludeCredentials naming a credential it holds: refused, nothing created.
    let err = a
        .create(&creation(&[2; 32], b"u2", &[&first_id]), ORIGIN)
        .unwrap_err();
    assert!(err.contains("InvalidStateError"), "{err}");
    assert_eq!(a.credential_ids().len(), 1);
    // Excluding someone else's credential is fine.
    let second = a
        .create(&creation(&[2; 32], b"u2", &[&b64(b"other")]), ORIGIN)
        .unwrap();
    let second_id = second["id"].as_str().unwrap().to_string();
    assert_ne!(first_id, second_id);
    assert_eq!(
        a.credential_ids(),
        vec![first_id.clone(), second_id.clone()]
    );

    // allowCredentials picks; an unknown one fails; none picks the newest.
    let got = a.get(&request(&[3; 32], &[&first_id]), ORIGIN).unwrap();
    assert_eq!(got["id"], first_id.as_str());
    assert!(a.get(&request(&[3; 32], &[&b64(b"nope")]), ORIGIN).is_err());
    let got = a.get(&request(&[3; 32], &[]), ORIGIN).unwrap();
    assert_eq!(got["id"], second_id.as_str());

    // Another rp id: no credential.
    let mut other = request(&[3; 32], &[]);
    other["rpId"] = json!("evil.example");
    assert!(a.get(&other, ORIGIN).is_err());

    // The rp id of the options goes into authData.
    let mut opts = creation(&[4; 32], b"u3", &[]);
    opts["rp"]["id"] = json!("evil.example");
    let p = parse_registration(&a.create(&opts, ORIGIN).unwrap());
    assert_eq!(p.rp_id_hash, sha256(b"evil.example"));

    // An algorithm it does not support.
    let mut opts = creation(&[5; 32], b"u4", &[]);
    opts["pubKeyCredParams"] = json!([{"type": "public-key", "alg": -8}]);
    let err = a.create(&opts, ORIGIN).unwrap_err();
    assert!(err.contains("NotSupportedError"), "{err}");
}

#[test]
fn misbehaviour_knobs_do_what_they_say() {
    let mut a = Authenticator::new(Alg::Es256);
    a.flags_override = Some(0x01 | 0x40);
    a.rp_id_override = Some("evil.example".into());
    a.cose_alg_override = Some(-35);
    let cred = a.create(&creation(&[1; 32], b"u", &[]), ORIGIN).unwrap();
    let p = parse_registration(&cred);
    assert_eq!(p.flags, 0x41);
    assert_eq!(p.rp_id_hash, sha256(b"evil.example"));
    assert_eq!(map_get(&p.cose_key, &int(3)), Some(&int(-35)));
    let id = cred["id"].as_str().unwrap().to_string();

    // create_existing: the same id and key again.
    a.cose_alg_override = None;
    let again = a
        .create_existing(&creation(&[2; 32], b"v", &[&id]), ORIGIN, &id)
        .unwrap();
    let q = parse_registration(&again);
    assert_eq!(again["id"], id.as_str());
    assert_eq!(
        map_get(&q.cose_key, &int(-2)),
        map_get(&p.cose_key, &int(-2))
    );

    // Counter: step 0 stays 0; set_counter rewinds.
    a.flags_override = None;
    a.rp_id_override = None;
    a.counter_step = 0;
    for _ in 0..2 {
        let got = a.get(&request(&[3; 32], &[]), ORIGIN).unwrap();
        let auth = verify_assertion(&got, &q.cose_key).unwrap();
        assert_eq!(auth[33..37], [0, 0, 0, 0]);
    }
    a.counter_step = 1;
    a.set_counter(&id, 41);
    let got = a.get(&request(&[3; 32], &[]), ORIGIN).unwrap();
    let auth = verify_assertion(&got, &q.cose_key).unwrap();
    assert_eq!(u32::from_be_bytes(auth[33..37].try_into().unwrap()), 42);

    // The clientData type.
    a.client_data_type_override = Some("webauthn.create".into());
    let got = a.get(&request(&[4; 32], &[]), ORIGIN).unwrap();
    verify_assertion(&got, &q.cose_key).unwrap();
    let client_data: Value = serde_json::from_slice(
        &unb64(got["response"]["clientDataJSON"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(client_data["type"], "webauthn.create");
}
