//! Hardware awareness: what the node stands on, and what it can take on.
//!
//! # What it owns
//! Reading the machine (`readers`: /proc, /sys, the device tree; `nvml`: NVIDIA GPUs through NVML,
//! loaded at run time), the board profiles (`board`, `board/*.toml` built in), and the derivation
//! of a resource class and a capacity (model memory budget, slots, threads, GPU layers, default
//! model) from both. The formulas and their reasoning are in `docs/hardware.md`.
//!
//! # Who calls it
//! `edgecoder hw`; the node at boot and on a timer (`/status`, `/metrics`, the worker's and the
//! mesh's advertised resource class). Every reader takes a root path, so tests run the whole
//! detection against fixture trees of real boards.

pub mod board;
pub mod nvml;
pub mod readers;

use std::path::Path;

use serde::{Deserialize, Serialize};

use self::board::{Board, GpuKind};
use self::readers::{Cpu, Memory, Thermal, Throttling};
use crate::coordinator::model::ResourceClass;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// VRAM kept free on a discrete GPU (CUDA context, scratch buffers).
const VRAM_HEADROOM: u64 = 512 * MIB;

/// Most generation slots a box gets.
const MAX_SLOTS: u32 = 8;

/// A GPU as the node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    /// Name.
    pub name: String,
    /// `nvml` (discrete) or `jetson` (integrated, shares system memory).
    pub kind: GpuKind,
    /// Memory (bytes); for Jetson, the system's.
    pub memory_total: u64,
    /// Free memory (bytes); for Jetson, the system's available memory.
    pub memory_free: u64,
    /// Utilisation, percent.
    pub utilisation_pct: f64,
    /// Temperature (°C), when known.
    pub temperature_c: Option<f64>,
    /// Power draw (W), when known.
    pub power_w: Option<f64>,
}

/// Finds GPUs. The real one is NVML; tests use a double.
pub trait GpuProbe {
    /// The GPUs, or why none could be read (no driver is not an error: an empty list).
    ///
    /// # Errors
    /// The driver is present but answering fails.
    fn gpus(&self) -> Result<Vec<Gpu>, String>;
}

/// No GPUs (boxes without NVML, tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGpu;

impl GpuProbe for NoGpu {
    fn gpus(&self) -> Result<Vec<Gpu>, String> {
        Ok(Vec::new())
    }
}

/// What the node can take on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Bytes available to model weights and KV cache (VRAM on a discrete GPU).
    pub model_memory_budget: u64,
    /// Generations to run at once.
    pub slots: u32,
    /// CPU threads for llama.cpp.
    pub threads: u32,
    /// Layers to offload to the GPU (999: all; 0: none).
    pub gpu_layers: u32,
    /// The largest catalog model it should run by default.
    pub default_model: String,
    /// Why capacity is lower than the hardware allows now (throttling, low memory, heat).
    pub derated: Vec<String>,
}

/// Everything `edgecoder hw` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HwInfo {
    /// Board profile name (`rpi5`, `x86_64-nvidia`).
    pub board: String,
    /// What the box says it is (device-tree model or DMI product), or the profile's description.
    pub model: String,
    /// CPU.
    pub cpu: Cpu,
    /// Memory.
    pub memory: Memory,
    /// Kernel page size (bytes).
    pub page_size: u64,
    /// Temperatures.
    pub thermal: Vec<Thermal>,
    /// Throttling.
    pub throttling: Throttling,
    /// GPUs.
    pub gpus: Vec<Gpu>,
    /// Resource class.
    pub class: ResourceClass,
    /// Capacity.
    pub capacity: Capacity,
    /// What is missing or wrong (unreadable files, kernel features, an unknown board).
    pub degraded: Vec<String>,
}

/// The latest detection, shared by the node's services (`/status`, `/metrics`, the mesh).
pub type HwSlot = std::sync::Arc<std::sync::RwLock<Option<std::sync::Arc<HwInfo>>>>;

/// The latest detection in a slot, if any.
pub fn current(slot: &HwSlot) -> Option<std::sync::Arc<HwInfo>> {
    slot.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Prometheus text for a detection.
pub fn render_metrics(info: &HwInfo, out: &mut String) {
    use std::fmt::Write;
    let gauge = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(
            out,
            "# HELP edgecoder_hw_{name} {help}\n# TYPE edgecoder_hw_{name} gauge"
        );
    };
    gauge(out, "memory_total_bytes", "Memory of the box.");
    let _ = writeln!(out, "edgecoder_hw_memory_total_bytes {}", info.memory.total);
    gauge(
        out,
        "memory_available_bytes",
        "Memory available without swapping.",
    );
    let _ = writeln!(
        out,
        "edgecoder_hw_memory_available_bytes {}",
        info.memory.available
    );
    gauge(out, "temperature_celsius", "Thermal zone temperatures.");
    for t in &info.thermal {
        let zone: String = t
            .zone
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        let _ = writeln!(
            out,
            "edgecoder_hw_temperature_celsius{{zone=\"{zone}\"}} {:.1}",
            t.celsius
        );
    }
    gauge(
        out,
        "throttled",
        "1 when the box runs below its capacity now (throttling, capped frequency, under-voltage).",
    );
    let _ = writeln!(
        out,
        "edgecoder_hw_throttled {}",
        u8::from(info.throttling.active())
    );
    gauge(out, "gpu_memory_free_bytes", "Free GPU memory.");
    for (i, g) in info.gpus.iter().enumerate() {
        let _ = writeln!(
            out,
            "edgecoder_hw_gpu_memory_free_bytes{{gpu=\"{i}\"}} {}",
            g.memory_free
        );
    }
    gauge(out, "gpu_utilisation_percent", "GPU utilisation.");
    for (i, g) in info.gpus.iter().enumerate() {
        let _ = writeln!(
            out,
            "edgecoder_hw_gpu_utilisation_percent{{gpu=\"{i}\"}} {:.1}",
            g.utilisation_pct
        );
    }
    gauge(
        out,
        "model_memory_budget_bytes",
        "Memory the capacity formulas leave for model weights and KV cache.",
    );
    let _ = writeln!(
        out,
        "edgecoder_hw_model_memory_budget_bytes {}",
        info.capacity.model_memory_budget
    );
    gauge(out, "slots", "Generations the box should run at once now.");
    let _ = writeln!(out, "edgecoder_hw_slots {}", info.capacity.slots);
    gauge(
        out,
        "resource_class",
        "Resource class: 0 tiny, 1 small, 2 medium, 3 large, 4 xlarge.",
    );
    let _ = writeln!(out, "edgecoder_hw_resource_class {}", info.class as u8);
}

/// The architecture of this build, as the kernel names it.
pub fn this_arch() -> &'static str {
    std::env::consts::ARCH
}

/// Reads the machine under `root` and derives class and capacity.
pub fn detect(root: &Path, arch: &str, gpus: &dyn GpuProbe) -> HwInfo {
    let mut problems = Vec::new();
    let cpu = readers::cpu(root, arch, &mut problems);
    let memory = readers::memory(root, &mut problems);
    let page_size = readers::page_size(root);
    let thermal = readers::thermal(root, &mut problems);
    let throttling = readers::throttling(root, &cpu, &mut problems);
    let model = readers::dt_model(root).or_else(|| readers::dmi_product(root));
    let compatible = readers::dt_compatible(root);
    let mut found = match gpus.gpus() {
        Ok(g) => g,
        Err(e) => {
            problems.push(format!("gpu: {e}"));
            Vec::new()
        }
    };
    let boards = match board::all() {
        Ok(b) => b,
        Err(e) => {
            problems.push(e);
            Vec::new()
        }
    };
    let has_nvml = found.iter().any(|g| g.kind == GpuKind::Nvml);
    let (profile, guess) = board::detect(&boards, model.as_deref(), &compatible, arch, has_nvml);
    problems.extend(guess);
    if profile.gpu == GpuKind::Jetson {
        match readers::jetson_gpu(root) {
            Some(j) => found.push(Gpu {
                name: format!("{} integrated GPU", profile.description),
                kind: GpuKind::Jetson,
                memory_total: memory.total,
                memory_free: memory.available,
                utilisation_pct: j.utilisation_pct,
                temperature_c: thermal
                    .iter()
                    .find(|t| t.zone.to_ascii_lowercase().starts_with("gpu"))
                    .map(|t| t.celsius),
                power_w: None,
            }),
            None => problems.push("gpu: Jetson GPU load not readable from sysfs".into()),
        }
    }
    problems.extend(board::check_kernel(
        &profile,
        root,
        &readers::cmdline(root),
        page_size,
    ));
    let (class, capacity) = derive(&profile, &cpu, &memory, &thermal, &throttling, &found);
    HwInfo {
        board: profile.name.clone(),
        model: model.unwrap_or_else(|| profile.description.clone()),
        cpu,
        memory,
        page_size,
        thermal,
        throttling,
        gpus: found,
        class,
        capacity,
        degraded: problems,
    }
}

/// The class and capacity formulas (docs/hardware.md explains each number).
pub fn derive(
    board: &Board,
    cpu: &Cpu,
    mem: &Memory,
    thermal: &[Thermal],
    throttling: &Throttling,
    gpus: &[Gpu],
) -> (ResourceClass, Capacity) {
    let mut derated = Vec::new();
    // System memory left for weights and KV cache: the OS keeps a headroom (a quarter of
    // memory, at least 512 MiB, at most the board's figure), and what other processes hold
    // now is not ours.
    let headroom = (mem.total / 4).clamp(512 * MIB, (board.os_headroom_mib * MIB).max(512 * MIB));
    let by_total = mem.total.saturating_sub(headroom);
    let by_available = mem.available.saturating_sub(headroom / 2);
    // Ordinary use (a few hundred MiB) is within the headroom; say so only when other
    // processes hold enough to cost the models a tenth of their room.
    if by_available < by_total / 10 * 9 {
        derated.push(format!(
            "memory: {} MiB available of {} MiB; budget follows what is free",
            mem.available / MIB,
            mem.total / MIB
        ));
    }
    let system_budget = by_total.min(by_available);
    let vram: u64 = gpus
        .iter()
        .filter(|g| g.kind == GpuKind::Nvml)
        .map(|g| g.memory_free.saturating_sub(VRAM_HEADROOM))
        .sum();
    let nvml = gpus.iter().any(|g| g.kind == GpuKind::Nvml);
    let jetson = gpus.iter().any(|g| g.kind == GpuKind::Jetson);
    let smallest = crate::inference::catalog::CATALOG[0].approx_size;
    // A discrete GPU holds the model when it has room for at least the smallest one.
    let (budget, on_gpu) = if nvml && vram >= smallest {
        (vram, true)
    } else {
        if nvml {
            derated.push(format!(
                "gpu: {} MiB free is too little for any model; running on the CPU",
                vram / MIB
            ));
        }
        (system_budget, jetson)
    };
    let class = if nvml && on_gpu && budget >= 40 * GIB {
        ResourceClass::Xlarge
    } else if on_gpu && budget >= 12 * GIB {
        ResourceClass::Large
    } else if (on_gpu && budget >= 5 * GIB) || (cpu.arch == "x86_64" && budget >= 10 * GIB) {
        ResourceClass::Medium
    } else if budget >= 3 * GIB {
        ResourceClass::Small
    } else {
        ResourceClass::Tiny
    };

    // The board's model for the class, stepping down until one fits with room for KV cache.
    let pick = |c: ResourceClass| {
        let m = &board.models;
        let named = match c {
            ResourceClass::Tiny => &m.tiny,
            ResourceClass::Small => &m.small,
            ResourceClass::Medium => &m.medium,
            ResourceClass::Large => &m.large,
            ResourceClass::Xlarge => &m.xlarge,
        };
        named
            .as_deref()
            .and_then(crate::inference::catalog::by_name)
            .unwrap_or_else(|| crate::inference::catalog::default_for(c))
    };
    let mut c = class;
    let mut model = pick(c);
    while model.approx_size * 5 / 4 > budget && c > ResourceClass::Tiny {
        c = match c {
            ResourceClass::Xlarge => ResourceClass::Large,
            ResourceClass::Large => ResourceClass::Medium,
            ResourceClass::Medium => ResourceClass::Small,
            _ => ResourceClass::Tiny,
        };
        model = pick(c);
    }

    // KV cache of one 4k-token sequence, roughly an eighth of a Q4 model's weights for the
    // Qwen2.5-Coder family (GQA); slots share what is left after the weights.
    let kv = (model.approx_size / 8).max(32 * MIB);
    let mut slots =
        (budget.saturating_sub(model.approx_size) / kv).clamp(1, MAX_SLOTS as u64) as u32;
    if !on_gpu {
        // On the CPU, batching past the core count buys little.
        slots = slots.min(cpu.physical.max(2));
    }
    let mut threads = cpu.physical.max(1);
    let hottest = thermal.iter().map(|t| t.celsius).fold(f64::MIN, f64::max);
    let hot = hottest >= board.thermal_limit_c - 5.0;
    if throttling.active() || hot {
        slots = (slots / 2).max(1);
        threads = (threads / 2).max(1);
        derated.push(if throttling.active() {
            format!("throttled now ({throttling:?}): half the slots and threads")
        } else {
            format!(
                "{hottest:.0} °C, within 5 °C of the {:.0} °C limit: half the slots and threads",
                board.thermal_limit_c
            )
        });
    }
    let gpu_layers = if on_gpu { 999 } else { 0 };
    (
        class,
        Capacity {
            model_memory_budget: budget,
            slots,
            threads,
            gpu_layers,
            default_model: model.name.to_string(),
            derated,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_memory_and_throttling_lower_capacity() {
        let boards = board::all().unwrap();
        let rpi5 = boards.iter().find(|b| b.name == "rpi5").unwrap();
        let cpu = Cpu {
            arch: "aarch64".into(),
            logical: 4,
            physical: 4,
            ..Cpu::default()
        };
        let idle = Memory {
            total: 8 * GIB,
            available: 7 * GIB,
        };
        let (class, cap) = derive(rpi5, &cpu, &idle, &[], &Throttling::default(), &[]);
        assert_eq!(class, ResourceClass::Small);
        assert!(cap.derated.is_empty(), "{:?}", cap.derated);
        let busy = Memory {
            total: 8 * GIB,
            available: 2 * GIB,
        };
        let (class2, cap2) = derive(rpi5, &cpu, &busy, &[], &Throttling::default(), &[]);
        assert!(cap2.model_memory_budget < cap.model_memory_budget);
        assert!(class2 < class, "{class2:?}");
        assert!(!cap2.derated.is_empty());
        let throttled = Throttling {
            throttled: true,
            ..Throttling::default()
        };
        let (_, cap3) = derive(rpi5, &cpu, &idle, &[], &throttled, &[]);
        assert!(cap3.slots < cap.slots || cap.slots == 1);
        assert_eq!(cap3.threads, 2);
        let hot = [Thermal {
            zone: "cpu-thermal".into(),
            celsius: 78.0,
        }];
        let (_, cap4) = derive(rpi5, &cpu, &idle, &hot, &Throttling::default(), &[]);
        assert_eq!(cap4.threads, 2, "{:?}", cap4.derated);
    }
}
