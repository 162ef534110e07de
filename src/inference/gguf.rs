//! A bounds-checked GGUF reader: the gate every model file passes before llama.cpp sees it.
//!
//! llama.cpp trusts its input; some malformed files abort the whole process (`block_count = 0`
//! trips a `GGML_ASSERT`), others make it read out of bounds. [`inspect`] reads the header,
//! metadata and tensor table with explicit limits, checks that every tensor's data lies inside the
//! file (so a truncated download is caught), and checks the hyper-parameters llama.cpp divides or
//! indexes by. A file that passes is described by a [`GgufInfo`] (`edgecoder model info`).
//!
//! Format (little-endian), versions 2 and 3: `"GGUF"`, `u32 version`, `u64 tensor_count`,
//! `u64 kv_count`, the key/value pairs, the tensor infos, padding to `general.alignment`
//! (default 32), then tensor data.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// Most key/value pairs accepted (real models have a few dozen).
const MAX_KV: u64 = 4096;
/// Most tensors accepted (the largest public models have a few thousand).
const MAX_TENSORS: u64 = 65_536;
/// Longest key or tensor name.
const MAX_NAME: u64 = 65_535;
/// Longest string value (chat templates are tens of KiB).
const MAX_STRING: u64 = 16 << 20;
/// Most array elements (vocabularies reach a few hundred thousand entries).
const MAX_ARRAY: u64 = 16 << 20;
/// Most bytes of metadata read before giving up.
const MAX_METADATA: u64 = 512 << 20;
/// ggml's limit on tensor dimensions.
const MAX_DIMS: u32 = 4;

/// Why a file was rejected. The message names the problem precisely enough to act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    /// Reading failed.
    #[error("cannot read the model file: {0}")]
    Io(String),
    /// Not a GGUF file.
    #[error("not a GGUF file (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A GGUF version this reader does not support.
    #[error("unsupported GGUF version {0} (2 and 3 are supported)")]
    Version(u32),
    /// The file ends inside the header, metadata or tensor table.
    #[error("file is truncated: ends inside the {0}")]
    Truncated(&'static str),
    /// A count or length is beyond what any real model has.
    #[error("{what} is {value}, more than the limit of {limit}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Value found.
        value: u64,
        /// Limit.
        limit: u64,
    },
    /// Malformed structure.
    #[error("malformed GGUF: {0}")]
    Malformed(String),
    /// Tensor data lies outside the file: a truncated or damaged download.
    #[error(
        "tensor {name:?} needs bytes up to {end}, but the file has {file_len}: truncated or damaged"
    )]
    DataOutOfBounds {
        /// Tensor.
        name: String,
        /// End offset required.
        end: u64,
        /// File length.
        file_len: u64,
    },
    /// A required key is absent.
    #[error("missing metadata key {0}")]
    MissingKey(String),
    /// A key has the wrong type or an unusable value.
    #[error("metadata {key}: {reason}")]
    BadValue {
        /// Key.
        key: String,
        /// Why.
        reason: String,
    },
}

/// A metadata value (arrays keep only their element type and length, plus the values of small
/// numeric arrays and string arrays needed for checks).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U(u64),
    /// Any signed integer type.
    I(i64),
    /// f32 or f64.
    F(f64),
    /// bool.
    Bool(bool),
    /// string.
    Str(String),
    /// array.
    Array {
        /// Element type code.
        elem: u32,
        /// Number of elements.
        len: u64,
        /// Integer elements (for per-layer head counts), when the element type is an integer.
        ints: Vec<i64>,
    },
}

impl Value {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U(v) => Some(*v),
            Value::I(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
}

/// One tensor's table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name.
    pub name: String,
    /// Dimensions, `ne[0]` first.
    pub dims: Vec<u64>,
    /// ggml type code.
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// What a valid GGUF file holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GgufInfo {
    /// GGUF version.
    pub version: u32,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, if any.
    pub name: Option<String>,
    /// Parameters (sum of tensor elements).
    pub parameters: u64,
    /// Training context length.
    pub context_length: u64,
    /// Embedding width.
    pub embedding_length: u64,
    /// Layers.
    pub block_count: u64,
    /// Attention heads.
    pub head_count: u64,
    /// Key/value heads.
    pub head_count_kv: u64,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// Tokenizer model (`llama`, `gpt2`, ...).
    pub tokenizer: String,
    /// Quantisation, from `general.file_type` (`unknown` when the file does not say).
    pub quantization: String,
    /// `tokenizer.chat_template`, if any.
    pub chat_template: Option<String>,
    /// Whether the vocabulary has fill-in-the-middle tokens.
    pub has_fim: bool,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
    /// File size.
    pub file_size: u64,
    /// Number of tensors.
    pub tensors: u64,
}

/// (block size in elements, bytes per block) of a ggml type, or `None` for unknown types.
pub fn type_layout(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4
        _ => return None,
    })
}

/// The name llama.cpp gives a `general.file_type`.
pub fn file_type_name(ft: u64) -> String {
    match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        other => return format!("unknown({other})"),
    }
    .to_string()
}

/// A reader that counts bytes and refuses to go past the file or the metadata budget.
struct Cursor<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Cursor<R> {
    fn bytes(&mut self, n: u64, what: &'static str) -> Result<Vec<u8>, GgufError> {
        if self.pos.saturating_add(n) > self.len {
            return Err(GgufError::Truncated(what));
        }
        if self.pos.saturating_add(n) > MAX_METADATA {
            return Err(GgufError::TooLarge {
                what: "metadata size",
                value: self.pos.saturating_add(n),
                limit: MAX_METADATA,
            });
        }
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|_| GgufError::Truncated(what))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let v = self.bytes(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&v);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, limit: u64, what: &'static str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > limit {
            return Err(GgufError::TooLarge {
                what: "string length",
                value: n,
                limit,
            });
        }
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| GgufError::Malformed(format!("{what} is not UTF-8")))
    }

    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), GgufError> {
        // Read in chunks so a huge count cannot allocate a huge buffer.
        let mut left = n;
        while left > 0 {
            let step = left.min(1 << 20);
            self.bytes(step, what)?;
            left -= step;
        }
        Ok(())
    }
}

fn scalar_size(t: u32) -> Option<u64> {
    Some(match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

fn read_scalar<R: Read>(c: &mut Cursor<R>, t: u32) -> Result<Value, GgufError> {
    const W: &str = "metadata value";
    Ok(match t {
        0 => Value::U(u64::from(c.array::<1>(W)?[0])),
        1 => Value::I(i64::from(c.array::<1>(W)?[0] as i8)),
        2 => Value::U(u64::from(u16::from_le_bytes(c.array(W)?))),
        3 => Value::I(i64::from(i16::from_le_bytes(c.array(W)?))),
        4 => Value::U(u64::from(c.u32(W)?)),
        5 => Value::I(i64::from(i32::from_le_bytes(c.array(W)?))),
        6 => Value::F(f64::from(f32::from_le_bytes(c.array(W)?))),
        7 => match c.array::<1>(W)?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => return Err(GgufError::Malformed(format!("bool value {b}"))),
        },
        10 => Value::U(c.u64(W)?),
        11 => Value::I(i64::from_le_bytes(c.array(W)?)),
        12 => Value::F(f64::from_le_bytes(c.array(W)?)),
        other => return Err(GgufError::Malformed(format!("unknown value type {other}"))),
    })
}

fn read_value<R: Read>(c: &mut Cursor<R>, t: u32, key: &str) -> Result<Value, GgufError> {
    match t {
        8 => Ok(Value::Str(c.string(MAX_STRING, "metadata string")?)),
        9 => {
            let elem = c.u32("array type")?;
            let len = c.u64("array length")?;
            if len > MAX_ARRAY {
                return Err(GgufError::TooLarge {
                    what: "array length",
                    value: len,
                    limit: MAX_ARRAY,
                });
            }
            match elem {
                8 => {
                    // Strings: each needs at least its 8-byte length.
                    if len.saturating_mul(8) > c.len.saturating_sub(c.pos) {
                        return Err(GgufError::Truncated("string array"));
                    }
                    for _ in 0..len {
                        let n = c.u64("string array")?;
                        if n > MAX_STRING {
                            return Err(GgufError::TooLarge {
                                what: "string length",
                                value: n,
                                limit: MAX_STRING,
                            });
                        }
                        c.skip(n, "string array")?;
                    }
                    Ok(Value::Array {
                        elem,
                        len,
                        ints: Vec::new(),
                    })
                }
                9 => Err(GgufError::Malformed(format!(
                    "{key}: nested arrays are not supported"
                ))),
                _ => {
                    let size = scalar_size(elem).ok_or_else(|| {
                        GgufError::Malformed(format!("{key}: unknown array element type {elem}"))
                    })?;
                    let bytes = len.saturating_mul(size);
                    if bytes > c.len.saturating_sub(c.pos) {
                        return Err(GgufError::Truncated("metadata array"));
                    }
                    let keep_ints = len <= 4096 && matches!(elem, 0..=5 | 10 | 11);
                    let mut ints = Vec::new();
                    if keep_ints {
                        for _ in 0..len {
                            match read_scalar(c, elem)? {
                                Value::U(v) => ints.push(i64::try_from(v).unwrap_or(i64::MAX)),
                                Value::I(v) => ints.push(v),
                                _ => {}
                            }
                        }
                    } else {
                        c.skip(bytes, "metadata array")?;
                    }
                    Ok(Value::Array { elem, len, ints })
                }
            }
        }
        t => read_scalar(c, t),
    }
}

/// Reads and checks a GGUF file.
///
/// # Errors
/// A [`GgufError`] naming the first problem found.
pub fn inspect(path: &Path) -> Result<GgufInfo, GgufError> {
    let f = File::open(path).map_err(|e| GgufError::Io(e.to_string()))?;
    let len = f
        .metadata()
        .map_err(|e| GgufError::Io(e.to_string()))?
        .len();
    inspect_reader(BufReader::with_capacity(1 << 16, f), len)
}

/// [`inspect`] over any reader whose total length is `len`.
///
/// # Errors
/// A [`GgufError`] naming the first problem found.
pub fn inspect_reader<R: Read>(r: R, len: u64) -> Result<GgufInfo, GgufError> {
    let mut c = Cursor {
        inner: r,
        pos: 0,
        len,
    };
    let magic = c.array::<4>("header")?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic(magic));
    }
    let version = c.u32("header")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version(version));
    }
    let n_tensors = c.u64("header")?;
    let n_kv = c.u64("header")?;
    if n_tensors > MAX_TENSORS {
        return Err(GgufError::TooLarge {
            what: "tensor count",
            value: n_tensors,
            limit: MAX_TENSORS,
        });
    }
    if n_kv > MAX_KV {
        return Err(GgufError::TooLarge {
            what: "metadata count",
            value: n_kv,
            limit: MAX_KV,
        });
    }
    let mut kv: BTreeMap<String, Value> = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string(MAX_NAME, "metadata key")?;
        let t = c.u32("metadata type")?;
        let v = read_value(&mut c, t, &key)?;
        if kv.insert(key.clone(), v).is_some() {
            return Err(GgufError::Malformed(format!(
                "duplicate metadata key {key}"
            )));
        }
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for _ in 0..n_tensors {
        let name = c.string(MAX_NAME, "tensor table")?;
        if name.len() >= 64 {
            return Err(GgufError::Malformed(format!(
                "tensor name {name:?} is longer than 63 bytes"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(GgufError::Malformed(format!("duplicate tensor {name:?}")));
        }
        let n_dims = c.u32("tensor table")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Malformed(format!(
                "tensor {name:?} has {n_dims} dimensions"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64("tensor table")?;
            if d == 0 || d > (1 << 40) {
                return Err(GgufError::Malformed(format!(
                    "tensor {name:?} has dimension {d}"
                )));
            }
            dims.push(d);
        }
        let ggml_type = c.u32("tensor table")?;
        let offset = c.u64("tensor table")?;
        let (blk, bytes) = type_layout(ggml_type).ok_or_else(|| {
            GgufError::Malformed(format!("tensor {name:?} has unknown type {ggml_type}"))
        })?;
        if dims[0] % blk != 0 {
            return Err(GgufError::Malformed(format!(
                "tensor {name:?}: first dimension {} is not a multiple of its block size {blk}",
                dims[0]
            )));
        }
        let rows: u64 = dims[1..]
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))
            .unwrap_or(u64::MAX);
        let size = (dims[0] / blk)
            .checked_mul(bytes)
            .and_then(|r| r.checked_mul(rows))
            .ok_or_else(|| GgufError::Malformed(format!("tensor {name:?} size overflows")))?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            size,
        });
    }
    let alignment = match kv.get("general.alignment") {
        None => 32,
        Some(v) => {
            let a = v
                .as_u64()
                .ok_or_else(|| bad("general.alignment", "must be an unsigned integer"))?;
            if a == 0 || !a.is_power_of_two() || a > 1 << 20 {
                return Err(bad(
                    "general.alignment",
                    "must be a power of two up to 1 MiB",
                ));
            }
            a
        }
    };
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let mut tensor_bytes = 0u64;
    let mut params = 0u64;
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::Malformed(format!(
                "tensor {:?} offset {} is not aligned",
                t.name, t.offset
            )));
        }
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.size))
            .ok_or_else(|| GgufError::Malformed(format!("tensor {:?} offset overflows", t.name)))?;
        if end > len {
            return Err(GgufError::DataOutOfBounds {
                name: t.name.clone(),
                end,
                file_len: len,
            });
        }
        tensor_bytes = tensor_bytes.saturating_add(t.size);
        params = params.saturating_add(t.dims.iter().product::<u64>());
    }
    // Overlapping tensors would alias each other's data.
    let mut spans: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|t| (t.offset, t.offset + t.size, t.name.as_str()))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(GgufError::Malformed(format!(
                "tensors {:?} and {:?} overlap",
                w[0].2, w[1].2
            )));
        }
    }
    check_model(&kv, &tensors, version, params, tensor_bytes, len)
}

fn bad(key: &str, reason: &str) -> GgufError {
    GgufError::BadValue {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn get_u64(kv: &BTreeMap<String, Value>, key: &str) -> Result<u64, GgufError> {
    match kv.get(key) {
        None => Err(GgufError::MissingKey(key.to_string())),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad(key, "must be an unsigned integer")),
    }
}

/// A per-model count that may be one integer or one per layer (take the largest).
fn get_count(kv: &BTreeMap<String, Value>, key: &str) -> Result<Option<u64>, GgufError> {
    match kv.get(key) {
        None => Ok(None),
        Some(Value::Array { ints, len, .. }) if !ints.is_empty() && *len == ints.len() as u64 => {
            if ints.iter().any(|v| *v < 0) {
                return Err(bad(key, "must not be negative"));
            }
            Ok(ints.iter().copied().max().map(|v| v as u64))
        }
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(key, "must be an unsigned integer")),
    }
}

fn check_model(
    kv: &BTreeMap<String, Value>,
    tensors: &[TensorInfo],
    version: u32,
    parameters: u64,
    tensor_bytes: u64,
    file_size: u64,
) -> Result<GgufInfo, GgufError> {
    let arch = match kv.get("general.architecture") {
        Some(Value::Str(s)) if !s.is_empty() && s.len() < 64 => s.clone(),
        Some(_) => return Err(bad("general.architecture", "must be a short string")),
        None => return Err(GgufError::MissingKey("general.architecture".into())),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let block_count = get_u64(kv, &key("block_count"))?;
    if block_count == 0 || block_count > 4096 {
        // llama.cpp asserts n_layer > 0 and aborts the process otherwise.
        return Err(bad(&key("block_count"), "must be between 1 and 4096"));
    }
    let context_length = get_u64(kv, &key("context_length"))?;
    if context_length == 0 {
        return Err(bad(&key("context_length"), "must be positive"));
    }
    let embedding_length = get_u64(kv, &key("embedding_length"))?;
    if embedding_length == 0 || embedding_length > 1 << 20 {
        return Err(bad(
            &key("embedding_length"),
            "must be between 1 and 1048576",
        ));
    }
    let head_count = get_count(kv, &key("attention.head_count"))?
        .ok_or_else(|| GgufError::MissingKey(key("attention.head_count")))?;
    if head_count == 0 {
        return Err(bad(&key("attention.head_count"), "must be positive"));
    }
    let head_count_kv = get_count(kv, &key("attention.head_count_kv"))?.unwrap_or(head_count);
    if head_count_kv == 0 || head_count % head_count_kv != 0 {
        return Err(bad(
            &key("attention.head_count_kv"),
            "must be positive and divide the head count",
        ));
    }
    let explicit_head_dim = kv.contains_key(&key("attention.key_length"));
    if !explicit_head_dim && embedding_length % head_count != 0 {
        return Err(bad(
            &key("attention.head_count"),
            "must divide the embedding length",
        ));
    }
    if let Some(rope) = get_count(kv, &key("rope.dimension_count"))? {
        let head_dim = match get_count(kv, &key("attention.key_length"))? {
            Some(k) => k,
            None => embedding_length / head_count,
        };
        if rope == 0 || rope > head_dim {
            return Err(bad(
                &key("rope.dimension_count"),
                "must be between 1 and the head dimension",
            ));
        }
    }
    if let Some(Value::F(eps)) = kv.get(&key("attention.layer_norm_rms_epsilon"))
        && (!eps.is_finite() || *eps < 0.0)
    {
        return Err(bad(
            &key("attention.layer_norm_rms_epsilon"),
            "must be a finite non-negative number",
        ));
    }
    let tokenizer = match kv.get("tokenizer.ggml.model") {
        Some(Value::Str(s)) => s.clone(),
        Some(_) => return Err(bad("tokenizer.ggml.model", "must be a string")),
        None => return Err(GgufError::MissingKey("tokenizer.ggml.model".into())),
    };
    let vocab_size = match kv.get("tokenizer.ggml.tokens") {
        Some(Value::Array { elem: 8, len, .. }) if *len > 0 => *len,
        Some(_) => {
            return Err(bad(
                "tokenizer.ggml.tokens",
                "must be a non-empty array of strings",
            ));
        }
        None => return Err(GgufError::MissingKey("tokenizer.ggml.tokens".into())),
    };
    for (k, elem_ok) in [
        ("tokenizer.ggml.scores", 6u32),
        ("tokenizer.ggml.token_type", 5),
    ] {
        if let Some(v) = kv.get(k) {
            match v {
                Value::Array { elem, len, .. } if *elem == elem_ok && *len == vocab_size => {}
                _ => return Err(bad(k, "must be an array with one entry per token")),
            }
        }
    }
    if tokenizer == "gpt2" && !kv.contains_key("tokenizer.ggml.merges") {
        return Err(GgufError::MissingKey("tokenizer.ggml.merges".into()));
    }
    for k in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.fim_pre_token_id",
        "tokenizer.ggml.fim_suf_token_id",
        "tokenizer.ggml.fim_mid_token_id",
    ] {
        if let Some(v) = kv.get(k) {
            match v.as_u64() {
                Some(id) if id < vocab_size => {}
                // -1 (as u32 max) means "none" in some converters.
                Some(u64::MAX) | Some(0xFFFF_FFFF) => {}
                Some(id) => {
                    return Err(bad(
                        k,
                        &format!("token id {id} is outside the vocabulary of {vocab_size}"),
                    ));
                }
                None => return Err(bad(k, "must be an unsigned integer")),
            }
        }
    }
    let embd = tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .ok_or_else(|| GgufError::Malformed("tensor token_embd.weight is missing".into()))?;
    if embd.dims.len() < 2 || embd.dims[0] != embedding_length || embd.dims[1] != vocab_size {
        return Err(GgufError::Malformed(format!(
            "token_embd.weight has shape {:?}, expected [{embedding_length}, {vocab_size}]",
            embd.dims
        )));
    }
    let quantization = match kv.get("general.file_type").and_then(Value::as_u64) {
        Some(ft) => file_type_name(ft),
        None => "unknown".into(),
    };
    let chat_template = match kv.get("tokenizer.chat_template") {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    };
    let has_fim = kv.contains_key("tokenizer.ggml.fim_pre_token_id")
        && kv.contains_key("tokenizer.ggml.fim_suf_token_id");
    Ok(GgufInfo {
        version,
        architecture: arch,
        name: match kv.get("general.name") {
            Some(Value::Str(s)) => Some(s.clone()),
            _ => None,
        },
        parameters,
        context_length,
        embedding_length,
        block_count,
        head_count,
        head_count_kv,
        vocab_size,
        tokenizer,
        quantization,
        chat_template,
        has_fim,
        tensor_bytes,
        file_size,
        tensors: tensors.len() as u64,
    })
}
