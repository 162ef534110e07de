//! Built-in catalog: the default coding model for each resource class.
//!
//! Qwen2.5-Coder instruct models in GGUF form, Q4_K_M quantisation, from the Qwen organisation on
//! Hugging Face. A box pulls the entry for its class on first boot when it has no model (see
//! `inference.auto_pull`); any entry can be pulled by name with `edgecoder model pull NAME`.
//! Downloads are checked by TLS and by the GGUF validator; pin a hash with `--sha256` when you
//! have one.

use crate::coordinator::model::ResourceClass;

/// One catalog entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CatalogEntry {
    /// Store name.
    pub name: &'static str,
    /// Download URL.
    pub url: &'static str,
    /// Approximate download size (bytes), for the progress bar and memory planning.
    pub approx_size: u64,
    /// The smallest class it is the default for.
    pub class: ResourceClass,
}

/// The catalog, smallest first.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "qwen2.5-coder-0.5b-instruct-q4_k_m",
        url: "https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        approx_size: 398 << 20,
        class: ResourceClass::Tiny,
    },
    CatalogEntry {
        name: "qwen2.5-coder-1.5b-instruct-q4_k_m",
        url: "https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        approx_size: 1_066 << 20,
        class: ResourceClass::Small,
    },
    CatalogEntry {
        name: "qwen2.5-coder-3b-instruct-q4_k_m",
        url: "https://huggingface.co/Qwen/Qwen2.5-Coder-3B-Instruct-GGUF/resolve/main/qwen2.5-coder-3b-instruct-q4_k_m.gguf",
        approx_size: 2_100 << 20,
        class: ResourceClass::Medium,
    },
    CatalogEntry {
        name: "qwen2.5-coder-7b-instruct-q4_k_m",
        url: "https://huggingface.co/Qwen/Qwen2.5-Coder-7B-Instruct-GGUF/resolve/main/qwen2.5-coder-7b-instruct-q4_k_m.gguf",
        approx_size: 4_680 << 20,
        class: ResourceClass::Large,
    },
    CatalogEntry {
        name: "qwen2.5-coder-14b-instruct-q4_k_m",
        url: "https://huggingface.co/Qwen/Qwen2.5-Coder-14B-Instruct-GGUF/resolve/main/qwen2.5-coder-14b-instruct-q4_k_m.gguf",
        approx_size: 8_990 << 20,
        class: ResourceClass::Xlarge,
    },
];

/// The default model for a class: the largest entry whose class is not above it.
pub fn default_for(class: ResourceClass) -> &'static CatalogEntry {
    CATALOG
        .iter()
        .rev()
        .find(|e| e.class <= class)
        .unwrap_or(&CATALOG[0])
}

/// An entry by name.
pub fn by_name(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}

/// A resource class from total memory alone, until hardware profiles refine it.
pub fn class_for_memory(total_bytes: u64) -> ResourceClass {
    const GIB: u64 = 1 << 30;
    match total_bytes {
        m if m >= 48 * GIB => ResourceClass::Xlarge,
        m if m >= 24 * GIB => ResourceClass::Large,
        m if m >= 12 * GIB => ResourceClass::Medium,
        m if m >= 6 * GIB => ResourceClass::Small,
        _ => ResourceClass::Tiny,
    }
}

/// Total memory from /proc/meminfo.
pub fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_grow_with_the_class() {
        assert_eq!(default_for(ResourceClass::Tiny).class, ResourceClass::Tiny);
        assert!(
            default_for(ResourceClass::Large).approx_size
                > default_for(ResourceClass::Small).approx_size
        );
        assert_eq!(class_for_memory(4 << 30), ResourceClass::Tiny);
        assert_eq!(class_for_memory(8 << 30), ResourceClass::Small);
        assert_eq!(class_for_memory(64 << 30), ResourceClass::Xlarge);
        assert!(by_name(CATALOG[1].name).is_some());
        for e in CATALOG {
            assert!(super::super::models::check_name(e.name).is_ok());
            assert!(e.url.starts_with("https://"));
        }
    }
}
