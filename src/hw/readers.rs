//! Readers of /proc, /sys and the device tree. Each takes the root of the tree (`/` on a real
//! box, a fixture directory in tests) and returns what it could read plus, for what it could not,
//! a reason; nothing here panics or fails the caller.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Reads a small text file under `root`; `None` when absent or unreadable.
pub fn read(root: &Path, rel: &str) -> Option<String> {
    let p = root.join(rel.trim_start_matches('/'));
    // Device-tree strings end in NUL.
    std::fs::read(&p).ok().map(|b| {
        String::from_utf8_lossy(&b)
            .trim_end_matches(['\0', '\n', ' '])
            .to_string()
    })
}

fn read_u64(root: &Path, rel: &str) -> Option<u64> {
    read(root, rel)?.trim().parse().ok()
}

/// CPU facts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    /// Architecture as the kernel names it (`aarch64`, `x86_64`).
    pub arch: String,
    /// Model name.
    pub model: String,
    /// Logical CPUs.
    pub logical: u32,
    /// Physical cores (logical CPUs without SMT siblings).
    pub physical: u32,
    /// Features that matter for llama.cpp: `avx`, `avx2`, `avx512f`, `fma`, `f16c`, `neon`
    /// (`asimd`), `dotprod` (`asimddp`), `i8mm`, `sve`.
    pub features: Vec<String>,
    /// Highest frequency any core may reach now (kHz; 0 unknown).
    pub max_khz: u64,
    /// Highest frequency the cores can reach at all (kHz; 0 unknown).
    pub hw_max_khz: u64,
}

const WANTED: &[(&str, &str)] = &[
    ("avx", "avx"),
    ("avx2", "avx2"),
    ("avx512f", "avx512f"),
    ("fma", "fma"),
    ("f16c", "f16c"),
    ("asimd", "neon"),
    ("asimddp", "dotprod"),
    ("i8mm", "i8mm"),
    ("sve", "sve"),
];

/// Parses `/proc/cpuinfo` (x86 and ARM layouts) and cpufreq limits.
pub fn cpu(root: &Path, arch: &str, problems: &mut Vec<String>) -> Cpu {
    let mut c = Cpu {
        arch: arch.to_string(),
        ..Cpu::default()
    };
    let Some(text) = read(root, "proc/cpuinfo") else {
        problems.push("cpu: /proc/cpuinfo unreadable".into());
        return c;
    };
    let mut cores = std::collections::HashSet::new();
    let mut flags = String::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => c.logical += 1,
            "model name" | "Model" | "Hardware" if c.model.is_empty() => c.model = v.to_string(),
            "flags" | "Features" if flags.is_empty() => flags = v.to_string(),
            "core id" => {
                cores.insert(v.to_string());
            }
            _ => {}
        }
    }
    // ARM cpuinfo has no model name per core: use the part as a fallback name.
    if c.model.is_empty() {
        c.model = text
            .lines()
            .find_map(|l| l.strip_prefix("CPU part"))
            .map(|v| format!("ARM part {}", v.trim_start_matches([':', ' ', '\t'])))
            .unwrap_or_default();
    }
    c.physical = if cores.is_empty() {
        c.logical
    } else {
        // x86: core ids repeat per package; hyperthreads share a core id.
        let sockets = text
            .lines()
            .filter_map(|l| l.strip_prefix("physical id"))
            .collect::<std::collections::HashSet<_>>()
            .len()
            .max(1);
        (cores.len() * sockets) as u32
    };
    let have: std::collections::HashSet<&str> = flags.split_whitespace().collect();
    c.features = WANTED
        .iter()
        .filter(|(k, _)| have.contains(k))
        .map(|(_, n)| n.to_string())
        .collect();
    for i in 0..c.logical {
        let base = format!("sys/devices/system/cpu/cpu{i}/cpufreq");
        if let Some(f) = read_u64(root, &format!("{base}/scaling_max_freq")) {
            c.max_khz = c.max_khz.max(f);
        }
        if let Some(f) = read_u64(root, &format!("{base}/cpuinfo_max_freq")) {
            c.hw_max_khz = c.hw_max_khz.max(f);
        }
    }
    if c.logical == 0 {
        problems.push("cpu: no processor entries in /proc/cpuinfo".into());
        c.logical = 1;
        c.physical = 1;
    }
    c
}

/// Memory from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// Total (bytes).
    pub total: u64,
    /// Available without swapping (bytes).
    pub available: u64,
}

/// Parses `/proc/meminfo`.
pub fn memory(root: &Path, problems: &mut Vec<String>) -> Memory {
    let Some(text) = read(root, "proc/meminfo") else {
        problems.push("memory: /proc/meminfo unreadable".into());
        return Memory::default();
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let total = field("MemTotal:");
    let available = field("MemAvailable:");
    if total.is_none() {
        problems.push("memory: MemTotal missing from /proc/meminfo".into());
    }
    if available.is_none() {
        problems.push("memory: MemAvailable missing; using MemFree".into());
    }
    Memory {
        total: total.unwrap_or(0),
        available: available.or_else(|| field("MemFree:")).unwrap_or(0),
    }
}

/// The kernel's page size: `KernelPageSize` of `/proc/self/smaps` under `root`, else (on the
/// real root) the running process's.
pub fn page_size(root: &Path) -> u64 {
    if let Some(kib) = read(root, "proc/self/smaps").and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("KernelPageSize:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    }) {
        return kib * 1024;
    }
    if root == Path::new("/") {
        #[allow(unsafe_code)]
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 {
            return p as u64;
        }
    }
    4096
}

/// One thermal zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thermal {
    /// Zone type (`cpu-thermal`, `GPU-therm`, `x86_pkg_temp`).
    pub zone: String,
    /// Degrees Celsius.
    pub celsius: f64,
}

/// Every readable `/sys/class/thermal/thermal_zone*`.
pub fn thermal(root: &Path, problems: &mut Vec<String>) -> Vec<Thermal> {
    let dir = root.join("sys/class/thermal");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("thermal_zone"))
        .collect();
    names.sort_by_key(|n| {
        n.trim_start_matches("thermal_zone")
            .parse::<u32>()
            .unwrap_or(0)
    });
    let mut out = Vec::new();
    for n in names {
        let zone = read(root, &format!("sys/class/thermal/{n}/type")).unwrap_or_else(|| n.clone());
        match read(root, &format!("sys/class/thermal/{n}/temp")).map(|t| t.trim().parse::<i64>()) {
            Some(Ok(milli)) => out.push(Thermal {
                zone,
                celsius: milli as f64 / 1000.0,
            }),
            Some(Err(_)) => problems.push(format!("thermal: {n}/temp is not a number")),
            None => {}
        }
    }
    out
}

/// The device-tree model string (Raspberry Pi, Jetson), if any.
pub fn dt_model(root: &Path) -> Option<String> {
    read(root, "proc/device-tree/model")
        .or_else(|| read(root, "sys/firmware/devicetree/base/model"))
        .filter(|s| !s.is_empty())
}

/// The device-tree `compatible` strings.
pub fn dt_compatible(root: &Path) -> Vec<String> {
    let raw = std::fs::read(root.join("proc/device-tree/compatible"))
        .or_else(|_| std::fs::read(root.join("sys/firmware/devicetree/base/compatible")))
        .unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).to_string())
        .collect()
}

/// DMI product name (x86 boxes).
pub fn dmi_product(root: &Path) -> Option<String> {
    read(root, "sys/class/dmi/id/product_name").filter(|s| !s.is_empty())
}

/// Throttling state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttling {
    /// Under-voltage now (Raspberry Pi).
    pub under_voltage: bool,
    /// Frequency capped now (Raspberry Pi firmware, or cpufreq below the hardware maximum).
    pub frequency_capped: bool,
    /// Throttled now (Raspberry Pi firmware).
    pub throttled: bool,
    /// Soft temperature limit active (Raspberry Pi firmware).
    pub soft_temp_limit: bool,
    /// Any of the above happened since boot (Raspberry Pi firmware).
    pub occurred_since_boot: bool,
}

impl Throttling {
    /// Whether the box runs below its capacity now.
    pub fn active(&self) -> bool {
        self.under_voltage || self.frequency_capped || self.throttled || self.soft_temp_limit
    }
}

/// Raspberry Pi firmware flags (`get_throttled`, the value `vcgencmd get_throttled` prints), and
/// cpufreq capping elsewhere.
pub fn throttling(root: &Path, cpu: &Cpu, problems: &mut Vec<String>) -> Throttling {
    let mut t = Throttling::default();
    if let Some(v) = read(root, "sys/devices/platform/soc/soc:firmware/get_throttled") {
        let v = v.trim().trim_start_matches("0x");
        match u32::from_str_radix(v, 16) {
            Ok(bits) => {
                t.under_voltage = bits & 0x1 != 0;
                t.frequency_capped = bits & 0x2 != 0;
                t.throttled = bits & 0x4 != 0;
                t.soft_temp_limit = bits & 0x8 != 0;
                t.occurred_since_boot = bits & 0xF_0000 != 0;
            }
            Err(_) => problems.push(format!("throttling: get_throttled {v:?} is not hex")),
        }
    }
    if cpu.hw_max_khz > 0 && cpu.max_khz > 0 && cpu.max_khz < cpu.hw_max_khz * 9 / 10 {
        t.frequency_capped = true;
    }
    t
}

/// The kernel command line.
pub fn cmdline(root: &Path) -> String {
    read(root, "proc/cmdline").unwrap_or_default()
}

/// Jetson's integrated GPU: load (per mille in sysfs) and current frequency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JetsonGpu {
    /// Utilisation, percent.
    pub utilisation_pct: f64,
    /// Current frequency (Hz), 0 unknown.
    pub freq_hz: u64,
}

/// Reads `/sys/devices/gpu.0/load` (or the Orin platform path) and its devfreq.
pub fn jetson_gpu(root: &Path) -> Option<JetsonGpu> {
    // JetPack 6 (Orin), JetPack 5 (Orin), older Jetsons.
    let load = [
        "sys/devices/platform/17000000.gpu/load",
        "sys/devices/17000000.ga10b/load",
        "sys/devices/gpu.0/load",
    ]
    .iter()
    .find_map(|p| read_u64(root, p))?;
    let freq = [
        "sys/class/devfreq/17000000.gpu/cur_freq",
        "sys/class/devfreq/17000000.ga10b/cur_freq",
    ]
    .iter()
    .find_map(|p| read_u64(root, p))
    .unwrap_or(0);
    Some(JetsonGpu {
        utilisation_pct: load as f64 / 10.0,
        freq_hz: freq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbled_or_missing_files_degrade_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut p = Vec::new();
        let c = cpu(root, "x86_64", &mut p);
        assert_eq!((c.logical, c.physical), (0, 0));
        let m = memory(root, &mut p);
        assert_eq!(m.total, 0);
        assert!(p.iter().any(|s| s.contains("cpuinfo")), "{p:?}");
        assert!(p.iter().any(|s| s.contains("meminfo")), "{p:?}");

        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(root.join("proc/cpuinfo"), "garbage\n\0\u{1}:::\n").unwrap();
        std::fs::write(root.join("proc/meminfo"), "MemTotal: lots kB\n").unwrap();
        let mut p = Vec::new();
        let c = cpu(root, "x86_64", &mut p);
        assert_eq!(c.logical, 1, "assumes one CPU");
        assert!(p.iter().any(|s| s.contains("no processor")), "{p:?}");
        let m = memory(root, &mut p);
        assert_eq!(m.total, 0);
        assert!(p.iter().any(|s| s.contains("MemTotal")), "{p:?}");
        std::fs::create_dir_all(root.join("sys/devices/platform/soc/soc:firmware")).unwrap();
        std::fs::write(
            root.join("sys/devices/platform/soc/soc:firmware/get_throttled"),
            "zz",
        )
        .unwrap();
        let t = throttling(root, &c, &mut p);
        assert!(!t.active());
        assert!(p.iter().any(|s| s.contains("get_throttled")), "{p:?}");
    }
}
