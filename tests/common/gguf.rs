//! A small GGUF writer for tests and benchmarks: real llama-architecture models with random
//! weights and an SPM vocabulary that llama.cpp loads and runs.
//!
//! The vocabulary is `<unk> <s> </s>`, the 256 byte tokens `<0x00>`..`<0xFF>` (byte fallback),
//! optional control tokens (ChatML and fill-in-the-middle markers), then word pieces with the SPM
//! word marker `▁`. llama.cpp's SPM tokenizer merges pairwise, so every prefix of every piece is in
//! the vocabulary too. Weights come from a seeded splitmix64 generator, so a given configuration
//! always produces the same bytes.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

/// What to generate.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub n_embd: u32,
    pub n_layer: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_ff: u32,
    pub n_ctx: u32,
    pub seed: u64,
    pub f16: bool,
    /// Adds `<|im_start|>`/`<|im_end|>` and a ChatML `tokenizer.chat_template`.
    pub chatml: bool,
    /// A chat template to store instead of the ChatML one.
    pub chat_template: Option<String>,
    /// Adds `<|fim_prefix|>`, `<|fim_suffix|>`, `<|fim_middle|>` and their token-id keys.
    pub fim: bool,
    pub name: String,
}

impl ModelSpec {
    /// A tiny model (~150 k parameters) for functional tests.
    pub fn tiny() -> Self {
        ModelSpec {
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_ctx: 512,
            seed: 42,
            f16: false,
            chatml: true,
            chat_template: None,
            fim: true,
            name: "tiny-test".into(),
        }
    }

    /// A model large enough to be compute-bound (~76 M parameters, F16, ~150 MB).
    pub fn bench() -> Self {
        ModelSpec {
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_head_kv: 4,
            n_ff: 2048,
            n_ctx: 2048,
            seed: 7,
            f16: true,
            chatml: true,
            chat_template: None,
            fim: true,
            name: "bench-76m".into(),
        }
    }
}

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const WORDS: &[&str] = &[
    "hello",
    "world",
    "the",
    "llama",
    "model",
    "code",
    "fn",
    "main",
    "let",
    "return",
    "def",
    "print",
    "import",
    "class",
    "self",
    "true",
    "false",
    "if",
    "else",
    "for",
    "while",
    "in",
    "is",
    "a",
    "an",
    "and",
    "or",
    "not",
    "to",
    "of",
    "it",
    "that",
    "this",
    "with",
    "you",
    "are",
    "what",
    "how",
    "why",
    "user",
    "assistant",
    "system",
    "write",
    "function",
    "python",
    "rust",
    "sum",
    "list",
    "value",
    "x",
    "y",
    "z",
    "i",
    "j",
    "n",
    "data",
    "error",
    "ok",
    "none",
    "some",
    "int",
    "str",
    "string",
    "vec",
];

/// One vocabulary entry.
struct Tok {
    text: String,
    score: f32,
    kind: i32,
}

fn vocab(spec: &ModelSpec) -> (Vec<Tok>, Vec<(&'static str, u32)>) {
    let mut v = vec![
        Tok {
            text: "<unk>".into(),
            score: 0.0,
            kind: 2,
        },
        Tok {
            text: "<s>".into(),
            score: 0.0,
            kind: 3,
        },
        Tok {
            text: "</s>".into(),
            score: 0.0,
            kind: 3,
        },
    ];
    for b in 0..=255u32 {
        v.push(Tok {
            text: format!("<0x{b:02X}>"),
            score: 0.0,
            kind: 6,
        });
    }
    let mut ids = Vec::new();
    if spec.chatml {
        for t in ["<|im_start|>", "<|im_end|>"] {
            v.push(Tok {
                text: t.into(),
                score: 0.0,
                kind: 3,
            });
        }
    }
    if spec.fim {
        for (t, key) in [
            ("<|fim_prefix|>", "tokenizer.ggml.fim_pre_token_id"),
            ("<|fim_suffix|>", "tokenizer.ggml.fim_suf_token_id"),
            ("<|fim_middle|>", "tokenizer.ggml.fim_mid_token_id"),
        ] {
            ids.push((key, v.len() as u32));
            v.push(Tok {
                text: t.into(),
                score: 0.0,
                kind: 3,
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut pieces = Vec::new();
    for w in WORDS {
        for prefix in [format!("\u{2581}{w}"), w.to_string()] {
            let chars: Vec<char> = prefix.chars().collect();
            for end in 1..=chars.len() {
                let p: String = chars[..end].iter().collect();
                if seen.insert(p.clone()) {
                    pieces.push(p);
                }
            }
        }
    }
    for p in [",", ".", "(", ")", ":", "\n", "=", "+", "\u{2581}"] {
        if seen.insert(p.to_string()) {
            pieces.push(p.to_string());
        }
    }
    // Longer pieces merge first: SPM prefers the highest score.
    for p in pieces {
        let score = p.chars().count() as f32;
        v.push(Tok {
            text: p,
            score,
            kind: 1,
        });
    }
    (v, ids)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn normal(&mut self, std: f32) -> f32 {
        let u1 = ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
    }
}

fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let mant = b & 0x7f_ffff;
    if exp <= 0 {
        if exp < -10 {
            return sign;
        }
        let m = (mant | 0x80_0000) >> (1 - exp);
        let round = (m >> 12) & 1;
        return sign | ((m >> 13) + round) as u16;
    }
    if exp >= 31 {
        return sign | 0x7c00;
    }
    let mut h = (sign as u32) | ((exp as u32) << 10) | (mant >> 13);
    // Round to nearest even.
    let rest = mant & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && (h & 1) == 1) {
        h += 1;
    }
    h as u16
}

struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn kv_u32(&mut self, k: &str, v: u32) {
        self.str(k);
        self.u32(4);
        self.u32(v);
    }
    fn kv_f32(&mut self, k: &str, v: f32) {
        self.str(k);
        self.u32(6);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn kv_bool(&mut self, k: &str, v: bool) {
        self.str(k);
        self.u32(7);
        self.buf.push(u8::from(v));
    }
    fn kv_str(&mut self, k: &str, v: &str) {
        self.str(k);
        self.u32(8);
        self.str(v);
    }
}

/// A tensor to write: name, ggml dims (ne0 first), F32 norm or a matrix, and its std-dev.
struct T {
    name: String,
    dims: Vec<u64>,
    norm: bool,
    std: f32,
}

/// Builds the model bytes.
pub fn build(spec: &ModelSpec) -> Vec<u8> {
    let (vocab, fim_ids) = vocab(spec);
    let n_vocab = vocab.len() as u64;
    let e = u64::from(spec.n_embd);
    let kv_dim = e / u64::from(spec.n_head) * u64::from(spec.n_head_kv);
    let ff = u64::from(spec.n_ff);
    let mut tensors = vec![T {
        name: "token_embd.weight".into(),
        dims: vec![e, n_vocab],
        norm: false,
        std: 1.0,
    }];
    for i in 0..spec.n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        tensors.push(T {
            name: b("attn_norm.weight"),
            dims: vec![e],
            norm: true,
            std: 0.0,
        });
        tensors.push(T {
            name: b("attn_q.weight"),
            dims: vec![e, e],
            norm: false,
            std: 0.02,
        });
        tensors.push(T {
            name: b("attn_k.weight"),
            dims: vec![e, kv_dim],
            norm: false,
            std: 0.02,
        });
        tensors.push(T {
            name: b("attn_v.weight"),
            dims: vec![e, kv_dim],
            norm: false,
            std: 0.02,
        });
        tensors.push(T {
            name: b("attn_output.weight"),
            dims: vec![e, e],
            norm: false,
            std: 0.02,
        });
        tensors.push(T {
            name: b("ffn_norm.weight"),
            dims: vec![e],
            norm: true,
            std: 0.0,
        });
        tensors.push(T {
            name: b("ffn_gate.weight"),
            dims: vec![e, ff],
            norm: false,
            std: 0.02,
        });
        tensors.push(T {
            name: b("ffn_up.weight"),
            dims: vec![e, ff],
            norm: false,
            std: 0.02,
        });
        tensors.push(T {
            name: b("ffn_down.weight"),
            dims: vec![ff, e],
            norm: false,
            std: 0.02,
        });
    }
    tensors.push(T {
        name: "output_norm.weight".into(),
        dims: vec![e],
        norm: true,
        std: 0.0,
    });
    tensors.push(T {
        name: "output.weight".into(),
        dims: vec![e, n_vocab],
        norm: false,
        std: 0.5,
    });

    let mut w = Writer { buf: Vec::new() };
    w.buf.extend_from_slice(b"GGUF");
    w.u32(3);
    w.u64(tensors.len() as u64);
    let template = spec
        .chat_template
        .clone()
        .or_else(|| spec.chatml.then(|| CHATML_TEMPLATE.to_string()));
    let n_kv = 21 + fim_ids.len() as u64 + u64::from(template.is_some());
    w.u64(n_kv);
    w.kv_str("general.architecture", "llama");
    w.kv_str("general.name", &spec.name);
    w.kv_u32("general.file_type", if spec.f16 { 1 } else { 0 });
    w.kv_u32("general.alignment", 32);
    w.kv_u32("llama.context_length", spec.n_ctx);
    w.kv_u32("llama.embedding_length", spec.n_embd);
    w.kv_u32("llama.block_count", spec.n_layer);
    w.kv_u32("llama.feed_forward_length", spec.n_ff);
    w.kv_u32("llama.attention.head_count", spec.n_head);
    w.kv_u32("llama.attention.head_count_kv", spec.n_head_kv);
    w.kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.kv_u32("llama.rope.dimension_count", spec.n_embd / spec.n_head);
    w.kv_f32("llama.rope.freq_base", 10000.0);
    w.kv_str("tokenizer.ggml.model", "llama");
    // tokens
    w.str("tokenizer.ggml.tokens");
    w.u32(9);
    w.u32(8);
    w.u64(n_vocab);
    for t in &vocab {
        w.str(&t.text);
    }
    w.str("tokenizer.ggml.scores");
    w.u32(9);
    w.u32(6);
    w.u64(n_vocab);
    for t in &vocab {
        w.buf.extend_from_slice(&t.score.to_le_bytes());
    }
    w.str("tokenizer.ggml.token_type");
    w.u32(9);
    w.u32(5);
    w.u64(n_vocab);
    for t in &vocab {
        w.buf.extend_from_slice(&t.kind.to_le_bytes());
    }
    w.kv_u32("tokenizer.ggml.unknown_token_id", 0);
    w.kv_u32("tokenizer.ggml.bos_token_id", 1);
    w.kv_u32(
        "tokenizer.ggml.eos_token_id",
        if spec.chatml { 259 + 1 } else { 2 },
    );
    w.kv_bool("tokenizer.ggml.add_bos_token", !spec.chatml);
    for (k, id) in &fim_ids {
        w.kv_u32(k, *id);
    }
    if let Some(t) = &template {
        w.kv_str("tokenizer.chat_template", t);
    }
    // tensor infos
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in &tensors {
        w.str(&t.name);
        w.u32(t.dims.len() as u32);
        for d in &t.dims {
            w.u64(*d);
        }
        let f16 = spec.f16 && !t.norm;
        w.u32(if f16 { 1 } else { 0 });
        w.u64(offset);
        offsets.push(offset);
        let n: u64 = t.dims.iter().product();
        let size = n * if f16 { 2 } else { 4 };
        offset = (offset + size).div_ceil(32) * 32;
    }
    let pad = w.buf.len().div_ceil(32) * 32;
    w.buf.resize(pad, 0);
    let data_start = w.buf.len();
    let mut rng = Rng(spec.seed);
    for (t, off) in tensors.iter().zip(offsets) {
        w.buf.resize(data_start + off as usize, 0);
        let n: u64 = t.dims.iter().product();
        let f16 = spec.f16 && !t.norm;
        for _ in 0..n {
            let x = if t.norm { 1.0 } else { rng.normal(t.std) };
            if f16 {
                w.buf.extend_from_slice(&f16_bits(x).to_le_bytes());
            } else {
                w.buf.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    let end = w.buf.len().div_ceil(32) * 32;
    w.buf.resize(end, 0);
    w.buf
}

/// Writes a model file.
pub fn write(path: &Path, spec: &ModelSpec) {
    let bytes = build(spec);
    let mut f = std::fs::File::create(path).expect("create model file");
    f.write_all(&bytes).expect("write model file");
}
