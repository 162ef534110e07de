//! Malformed and hostile GGUF files: each is rejected with a clear reason, and a node that is
//! handed them keeps serving.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::gguf::{ModelSpec, build};
use edgecoder::inference::gguf::inspect_reader;

fn valid() -> Vec<u8> {
    build(&ModelSpec::tiny())
}

fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not in the file", String::from_utf8_lossy(needle)))
}

/// Offset of the value type (u32) of metadata key `key`.
fn kv_type_at(bytes: &[u8], key: &str) -> usize {
    find(bytes, key.as_bytes()) + key.len()
}

fn set_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn set_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Sets a u32 metadata value.
fn kv_u32(mut b: Vec<u8>, key: &str, v: u32) -> Vec<u8> {
    let at = kv_type_at(&b, key) + 4;
    set_u32(&mut b, at, v);
    b
}

/// Renames a key or tensor in place (same length).
fn rename(mut b: Vec<u8>, from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = find(&b, from.as_bytes());
    b[at..at + to.len()].copy_from_slice(to.as_bytes());
    b
}

/// Offset just after a tensor's name in the tensor table (its n_dims).
fn tensor_at(bytes: &[u8], name: &str) -> usize {
    // Tensor names appear once, in the table (after the vocabulary, which has no dots).
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    find(bytes, &pat) + pat.len()
}

/// The hostile files: (name, bytes, a fragment of the expected error).
fn cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let v = valid();
    let len = v.len();
    let mut out: Vec<(&'static str, Vec<u8>, &'static str)> = vec![
        ("empty", vec![], "truncated"),
        ("three bytes", b"GGU".to_vec(), "truncated"),
        (
            "bad magic",
            [b"GGML".as_slice(), &v[4..]].concat(),
            "not a GGUF file",
        ),
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
            "not a GGUF file",
        ),
        ("truncated header", v[..12].to_vec(), "truncated"),
        ("truncated metadata", v[..1000].to_vec(), "truncated"),
        (
            "truncated tensor data (half)",
            v[..len / 2].to_vec(),
            "truncated",
        ),
        (
            "last byte missing",
            v[..len - 1].to_vec(),
            "truncated or damaged",
        ),
    ];
    let mut b = v.clone();
    set_u32(&mut b, 4, 1);
    out.push(("version 1", b, "unsupported GGUF version 1"));
    let mut b = v.clone();
    set_u32(&mut b, 4, 99);
    out.push(("version 99", b, "unsupported GGUF version 99"));
    let mut b = v.clone();
    set_u64(&mut b, 8, 1 << 60);
    out.push(("tensor count 2^60", b, "tensor count"));
    let mut b = v.clone();
    set_u64(&mut b, 16, 1 << 60);
    out.push(("metadata count 2^60", b, "metadata count"));
    let mut b = v.clone();
    set_u64(&mut b, 24, 1 << 62);
    out.push(("key length 2^62", b, "string length"));
    let mut b = v.clone();
    let at = kv_type_at(&b, "general.name") + 4;
    set_u64(&mut b, at, 1 << 40);
    out.push(("string value 1 TiB", b, "string length"));
    let mut b = v.clone();
    let at = kv_type_at(&b, "tokenizer.ggml.tokens") + 8;
    set_u64(&mut b, at, 1 << 40);
    out.push(("token array 2^40 long", b, "array length"));
    let mut b = v.clone();
    let at = kv_type_at(&b, "general.file_type");
    set_u32(&mut b, at, 99);
    out.push(("unknown value type", b, "unknown value type"));
    let mut b = v.clone();
    let at = kv_type_at(&b, "tokenizer.ggml.scores") + 4;
    set_u32(&mut b, at, 9);
    out.push(("nested array", b, "nested arrays"));
    let mut b = v.clone();
    let at = kv_type_at(&b, "tokenizer.ggml.add_bos_token") + 4;
    b[at] = 2;
    out.push(("bool value 2", b, "bool value"));
    out.push((
        "block_count 0 (aborts llama.cpp)",
        kv_u32(v.clone(), "llama.block_count", 0),
        "block_count",
    ));
    out.push((
        "head_count 0",
        kv_u32(v.clone(), "llama.attention.head_count", 0),
        "head_count",
    ));
    out.push((
        "head_count not dividing the width",
        kv_u32(v.clone(), "llama.attention.head_count", 5),
        "head_count",
    ));
    out.push((
        "kv heads not dividing heads",
        kv_u32(v.clone(), "llama.attention.head_count_kv", 3),
        "head_count_kv",
    ));
    out.push((
        "rope wider than a head",
        kv_u32(v.clone(), "llama.rope.dimension_count", 64),
        "rope.dimension_count",
    ));
    out.push((
        "context 0",
        kv_u32(v.clone(), "llama.context_length", 0),
        "context_length",
    ));
    out.push((
        "embedding 0",
        kv_u32(v.clone(), "llama.embedding_length", 0),
        "embedding_length",
    ));
    out.push((
        "alignment 33",
        kv_u32(v.clone(), "general.alignment", 33),
        "alignment",
    ));
    out.push((
        "bos outside the vocabulary",
        kv_u32(v.clone(), "tokenizer.ggml.bos_token_id", 99_999),
        "outside the vocabulary",
    ));
    out.push((
        "no architecture",
        rename(v.clone(), "general.architecture", "general.architectur_"),
        "general.architecture",
    ));
    out.push((
        "no token list",
        rename(v.clone(), "tokenizer.ggml.tokens", "tokenizer.ggml.token_"),
        "tokenizer.ggml.tokens",
    ));
    out.push((
        "no tokenizer model",
        rename(v.clone(), "tokenizer.ggml.model", "tokenizer.ggml.mode_"),
        "tokenizer.ggml.model",
    ));
    out.push((
        "duplicate key",
        rename(v.clone(), "llama.context_length", "general.architecture"),
        "duplicate metadata key",
    ));
    out.push((
        "duplicate tensor",
        rename(v.clone(), "blk.1.attn_q.weight", "blk.0.attn_q.weight"),
        "duplicate tensor",
    ));
    out.push((
        "no token embedding",
        rename(v.clone(), "token_embd.weight", "token_embx.weight"),
        "token_embd.weight is missing",
    ));
    let mut b = v.clone();
    let at = tensor_at(&b, "output_norm.weight");
    set_u32(&mut b, at, 5);
    out.push(("five dimensions", b, "dimensions"));
    let mut b = v.clone();
    let at = tensor_at(&b, "output_norm.weight") + 4 + 8;
    set_u32(&mut b, at, 200);
    out.push(("unknown tensor type", b, "unknown type"));
    let mut b = v.clone();
    let at = tensor_at(&b, "output.weight") + 4 + 16 + 4;
    let off = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    set_u64(&mut b, at, off + 1);
    out.push(("misaligned tensor", b, "not aligned"));
    let mut b = v.clone();
    let at = tensor_at(&b, "output.weight") + 4 + 16 + 4;
    set_u64(&mut b, at, 0);
    out.push(("overlapping tensors", b, "overlap"));
    let mut b = v.clone();
    let at = tensor_at(&b, "output.weight") + 4 + 16 + 4;
    set_u64(&mut b, at, 1 << 50);
    out.push(("tensor far outside the file", b, "truncated or damaged"));
    let mut b = v.clone();
    let at = tensor_at(&b, "token_embd.weight") + 4;
    set_u64(&mut b, at, 32);
    out.push((
        "embedding of the wrong shape",
        b,
        "token_embd.weight has shape",
    ));
    out
}

#[test]
fn every_hostile_file_is_rejected_with_its_reason() {
    let cases = cases();
    assert!(cases.len() >= 20, "the issue asks for at least 20 cases");
    for (name, bytes, expect) in cases {
        let err = inspect_reader(&bytes[..], bytes.len() as u64)
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"));
        let msg = err.to_string();
        assert!(
            msg.contains(expect),
            "{name}: {msg:?} does not mention {expect:?}"
        );
    }
    // And the untouched model passes.
    let v = valid();
    let info = inspect_reader(&v[..], v.len() as u64).unwrap();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.block_count, 2);
    assert!(info.has_fim);
    assert_eq!(
        info.chat_template.as_deref(),
        Some(common::gguf::CHATML_TEMPLATE)
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Any single flipped byte is either still a valid model or rejected; never a panic.
    #[test]
    fn flipped_bytes_never_panic(pos in 0usize..200_000, bit in 0u8..8) {
        let mut b = valid();
        let i = pos % b.len();
        b[i] ^= 1 << bit;
        let _ = inspect_reader(&b[..], b.len() as u64);
    }
}

/// Through a real node: each hostile file gets a 4xx naming the reason, files that pass our
/// checks but not llama.cpp's fail to load with a clear error, and the node keeps serving.
#[cfg(feature = "llama")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_hostile_models_and_keeps_serving() {
    use edgecoder::client::CoordinatorClient;
    use edgecoder::identity::Identity;
    use edgecoder::inference::api::{AddRequest, GenerateRequest, ModelView};
    use std::sync::Arc;

    let node = common::Node::start(&["--set", "inference.threads=1"]);
    let pid = node.child.id();
    let inf = CoordinatorClient::new(
        &node.url("inference"),
        Arc::new(Identity::load(&node.dir.join("identity.key")).unwrap()),
    )
    .unwrap();
    let files = tempfile::tempdir().unwrap();
    for (i, (name, bytes, expect)) in cases().into_iter().enumerate() {
        let path = files.path().join(format!("hostile-{i}.gguf"));
        std::fs::write(&path, &bytes).unwrap();
        let err = inf
            .post::<_, ModelView>(
                "/models/add",
                &AddRequest {
                    path: path.display().to_string(),
                    name: None,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(422), "{name}: {err}");
        assert_eq!(err.code(), Some("invalid_model"), "{name}");
        assert!(err.to_string().contains(expect), "{name}: {err}");
    }
    assert!(
        std::fs::read_dir(node.dir.join("models"))
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".gguf")),
        "nothing rejected was kept"
    );
    // Structurally valid, but llama.cpp refuses: a required tensor is missing.
    let broken = rename(valid(), "output_norm.weight", "output_norx.weight");
    let path = files.path().join("broken.gguf");
    std::fs::write(&path, &broken).unwrap();
    let added: ModelView = inf
        .post(
            "/models/add",
            &AddRequest {
                path: path.display().to_string(),
                name: Some("broken".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(added.name, "broken");
    let req = GenerateRequest {
        model: "broken".into(),
        prompt: Some("hello".into()),
        max_tokens: Some(2),
        ..Default::default()
    };
    let err = inf
        .post::<_, serde_json::Value>("/generate?stream=false", &req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("model_failed"), "{err}");
    // The node is the same process and still generates with a good model.
    let good = files.path().join("good.gguf");
    std::fs::write(&good, valid()).unwrap();
    inf.post::<_, ModelView>(
        "/models/add",
        &AddRequest {
            path: good.display().to_string(),
            name: Some("good".into()),
        },
    )
    .await
    .unwrap();
    let req = GenerateRequest {
        model: "good".into(),
        prompt: Some("hello".into()),
        max_tokens: Some(3),
        temperature: Some(0.0),
        ..Default::default()
    };
    let out: serde_json::Value = inf.post("/generate?stream=false", &req).await.unwrap();
    assert_eq!(out["usage"]["completion_tokens"], 3, "{out}");
    assert_eq!(node.child.id(), pid);
    assert!(common::pid_alive(pid));
}
