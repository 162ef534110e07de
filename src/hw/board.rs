//! Board profiles (`board/*.toml`, built into the binary): what each supported board is, how
//! llama.cpp is built for it, its memory budgets, and the kernel features it needs.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Which GPU a board has for inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuKind {
    /// None usable.
    None,
    /// Jetson's integrated GPU (shares system memory; not visible to NVML).
    Jetson,
    /// A discrete NVIDIA GPU through NVML.
    Nvml,
}

/// A kernel feature, checked by the presence of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelPath {
    /// What it is.
    pub name: String,
    /// Path under the root (no leading slash).
    pub path: String,
}

/// What the kernel must provide.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelReq {
    /// Tokens the kernel command line must contain.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Files that must exist.
    #[serde(default)]
    pub paths: Vec<KernelPath>,
}

/// Default model (catalog name) per resource class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Models {
    /// Tiny.
    pub tiny: Option<String>,
    /// Small.
    pub small: Option<String>,
    /// Medium.
    pub medium: Option<String>,
    /// Large.
    pub large: Option<String>,
    /// Xlarge.
    pub xlarge: Option<String>,
}

/// One board profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Board {
    /// Short name (`rpi5`).
    pub name: String,
    /// Human name.
    pub description: String,
    /// Substrings of the device-tree model or `compatible` strings, or the DMI product name,
    /// that identify it.
    pub match_model: Vec<String>,
    /// Kernel architecture.
    pub arch: String,
    /// Rust target triple to build for it.
    pub target: String,
    /// The page size its usual kernel uses.
    pub page_size: u64,
    /// Its GPU.
    pub gpu: GpuKind,
    /// CMake flags for the llama.cpp build.
    pub llama_cmake: Vec<String>,
    /// CUDA architectures (empty without CUDA).
    pub cuda_arch: String,
    /// Memory left to the OS, the node and page cache (MiB).
    pub os_headroom_mib: u64,
    /// Suggested `store.map_size` (MiB).
    pub lmdb_map_size_mib: u64,
    /// Temperature at which it starts to throttle (°C).
    pub thermal_limit_c: f64,
    /// Kernel requirements.
    pub kernel: KernelReq,
    /// Default models by class.
    pub models: Models,
}

const PROFILES: &[(&str, &str)] = &[
    ("rpi4", include_str!("../../board/rpi4.toml")),
    ("rpi5", include_str!("../../board/rpi5.toml")),
    (
        "jetson-orin-nano",
        include_str!("../../board/jetson-orin-nano.toml"),
    ),
    (
        "jetson-agx-orin",
        include_str!("../../board/jetson-agx-orin.toml"),
    ),
    (
        "x86_64-generic",
        include_str!("../../board/x86_64-generic.toml"),
    ),
    (
        "x86_64-nvidia",
        include_str!("../../board/x86_64-nvidia.toml"),
    ),
];

/// Every built-in profile.
///
/// # Errors
/// A profile that does not parse (a build defect; tests parse them all).
pub fn all() -> Result<Vec<Board>, String> {
    PROFILES
        .iter()
        .map(|(name, text)| toml::from_str(text).map_err(|e| format!("board/{name}.toml: {e}")))
        .collect()
}

/// Picks the profile for what was read: a device-tree or DMI match first, then by architecture
/// and GPU. Returns the profile and, when it is only a guess, why.
pub fn detect(
    boards: &[Board],
    model: Option<&str>,
    compatible: &[String],
    arch: &str,
    has_nvml_gpu: bool,
) -> (Board, Option<String>) {
    let names: Vec<&str> = model
        .into_iter()
        .chain(compatible.iter().map(String::as_str))
        .collect();
    for b in boards {
        if b.match_model
            .iter()
            .any(|m| names.iter().any(|n| n.contains(m.as_str())))
        {
            return (b.clone(), None);
        }
    }
    let by_name = |n: &str| boards.iter().find(|b| b.name == n).cloned();
    let generic = if has_nvml_gpu {
        by_name("x86_64-nvidia")
    } else {
        by_name("x86_64-generic")
    };
    let Some(mut g) = generic else {
        return (
            fallback(arch),
            Some("no board profiles built in".to_string()),
        );
    };
    if arch == "x86_64" {
        return (g, None);
    }
    // An unknown board of another architecture: the generic profile with its own arch.
    g.name = format!("{arch}-generic");
    g.description = format!("unknown {arch} board");
    g.arch = arch.to_string();
    g.target = format!("{arch}-unknown-linux-gnu");
    g.llama_cmake = vec!["-DGGML_NATIVE=OFF".into()];
    let seen = model.unwrap_or("no device-tree model");
    (
        g,
        Some(format!(
            "board not recognised ({seen}); using generic {arch} defaults"
        )),
    )
}

fn fallback(arch: &str) -> Board {
    Board {
        name: format!("{arch}-generic"),
        description: format!("unknown {arch} board"),
        match_model: Vec::new(),
        arch: arch.to_string(),
        target: format!("{arch}-unknown-linux-gnu"),
        page_size: 4096,
        gpu: GpuKind::None,
        llama_cmake: Vec::new(),
        cuda_arch: String::new(),
        os_headroom_mib: 1024,
        lmdb_map_size_mib: 1024,
        thermal_limit_c: 85.0,
        kernel: KernelReq::default(),
        models: Models::default(),
    }
}

/// Checks the running kernel (under `root`) against a profile: missing command-line tokens and
/// missing feature files, each as a readable line.
pub fn check_kernel(board: &Board, root: &Path, cmdline: &str, page_size: u64) -> Vec<String> {
    let mut out = Vec::new();
    let tokens: Vec<&str> = cmdline.split_whitespace().collect();
    for want in &board.kernel.cmdline {
        if !tokens.contains(&want.as_str()) {
            out.push(format!(
                "kernel command line lacks {want:?} (add it to the boot command line, e.g. /boot/firmware/cmdline.txt)"
            ));
        }
    }
    for p in &board.kernel.paths {
        if !root.join(&p.path).exists() {
            out.push(format!(
                "kernel: {} not available (/{} missing)",
                p.name, p.path
            ));
        }
    }
    if page_size != board.page_size {
        out.push(format!(
            "page size is {} KiB; {} kernels usually use {} KiB (fine, noted for LMDB and llama.cpp builds)",
            page_size / 1024,
            board.description,
            board.page_size / 1024
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_parses_and_names_catalog_models() {
        let boards = all().unwrap();
        assert_eq!(boards.len(), 6);
        for b in &boards {
            for m in [
                &b.models.tiny,
                &b.models.small,
                &b.models.medium,
                &b.models.large,
                &b.models.xlarge,
            ]
            .into_iter()
            .flatten()
            {
                assert!(
                    crate::inference::catalog::by_name(m).is_some(),
                    "{}: {m} is not in the catalog",
                    b.name
                );
            }
            assert!(b.target.starts_with(&b.arch), "{}", b.name);
            assert_eq!(b.gpu == GpuKind::Jetson, b.cuda_arch == "87", "{}", b.name);
        }
    }

    #[test]
    fn boards_are_told_apart_by_their_device_tree_or_fall_back_by_arch() {
        let boards = all().unwrap();
        let pick = |m: Option<&str>, arch, nv| detect(&boards, m, &[], arch, nv).0.name;
        assert_eq!(
            pick(Some("Raspberry Pi 5 Model B Rev 1.0"), "aarch64", false),
            "rpi5"
        );
        assert_eq!(
            pick(Some("Raspberry Pi 4 Model B Rev 1.4"), "aarch64", false),
            "rpi4"
        );
        assert_eq!(
            pick(
                Some("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"),
                "aarch64",
                false
            ),
            "jetson-orin-nano"
        );
        assert_eq!(pick(None, "x86_64", true), "x86_64-nvidia");
        assert_eq!(pick(None, "x86_64", false), "x86_64-generic");
        let (b, why) = detect(&boards, Some("Pine64 RockPro64"), &[], "aarch64", false);
        assert_eq!(b.name, "aarch64-generic");
        assert!(why.unwrap().contains("RockPro64"));
    }
}
