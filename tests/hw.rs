//! Hardware detection against fixture trees of real boards (tests/fixtures/hw, written by
//! make.py), an NVML test double for the discrete GPU, and the real machine.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use edgecoder::coordinator::model::ResourceClass;
use edgecoder::hw::board::GpuKind;
use edgecoder::hw::{Gpu, GpuProbe, HwInfo, NoGpu, detect};

/// NVML test double: answers what NVML reports for the given GPUs.
struct FakeNvml(Vec<Gpu>);

impl GpuProbe for FakeNvml {
    fn gpus(&self) -> Result<Vec<Gpu>, String> {
        Ok(self.0.clone())
    }
}

/// NVML present but failing.
struct BrokenNvml;

impl GpuProbe for BrokenNvml {
    fn gpus(&self) -> Result<Vec<Gpu>, String> {
        Err("NVML device 0 memory: GPU is lost".into())
    }
}

fn rtx4060() -> Gpu {
    Gpu {
        name: "NVIDIA GeForce RTX 4060".into(),
        kind: GpuKind::Nvml,
        memory_total: 8_585_740_288,
        memory_free: 8_192_000_000,
        utilisation_pct: 3.0,
        temperature_c: Some(41.0),
        power_w: Some(11.5),
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hw")
        .join(name)
}

const GIB: u64 = 1 << 30;

fn check(
    info: &HwInfo,
    board: &str,
    class: ResourceClass,
    model: &str,
    gpu_layers: u32,
    budget_gib: (f64, f64),
) {
    assert_eq!(info.board, board, "{info:#?}");
    assert_eq!(info.class, class, "{info:#?}");
    let c = &info.capacity;
    assert_eq!(c.default_model, model, "{info:#?}");
    assert_eq!(c.gpu_layers, gpu_layers, "{info:#?}");
    let b = c.model_memory_budget as f64 / GIB as f64;
    assert!(
        b >= budget_gib.0 && b <= budget_gib.1,
        "budget {b:.2} GiB not in {budget_gib:?}"
    );
    assert!(c.slots >= 1 && c.slots <= 8);
    assert!(c.threads >= 1 && c.threads <= info.cpu.physical.max(1));
}

#[test]
fn raspberry_pi_4_with_4_gb_is_tiny() {
    let i = detect(&fixture("rpi4-4gb"), "aarch64", &NoGpu);
    check(
        &i,
        "rpi4",
        ResourceClass::Tiny,
        "qwen2.5-coder-0.5b-instruct-q4_k_m",
        0,
        (2.5, 3.0),
    );
    assert_eq!(i.model, "Raspberry Pi 4 Model B Rev 1.4");
    assert_eq!((i.cpu.logical, i.cpu.physical), (4, 4));
    assert_eq!(i.cpu.features, ["neon"]);
    assert_eq!(i.page_size, 4096);
    assert_eq!(i.capacity.threads, 4);
    assert!(!i.throttling.active());
    assert_eq!(i.thermal[0].zone, "cpu-thermal");
    assert!((i.thermal[0].celsius - 48.686).abs() < 1e-6);
    // Its cmdline disables memory cgroups: reported, with the fix.
    assert!(
        i.degraded
            .iter()
            .any(|d| d.contains("cgroup_enable=memory")),
        "{:?}",
        i.degraded
    );
}

#[test]
fn raspberry_pi_5_with_8_gb_is_small_with_16k_pages() {
    let i = detect(&fixture("rpi5-8gb"), "aarch64", &NoGpu);
    check(
        &i,
        "rpi5",
        ResourceClass::Small,
        "qwen2.5-coder-1.5b-instruct-q4_k_m",
        0,
        (6.0, 7.0),
    );
    assert_eq!(i.page_size, 16384);
    assert!(i.cpu.features.contains(&"dotprod".to_string()));
    assert_eq!(i.cpu.max_khz, 2_400_000);
    assert!(i.degraded.is_empty(), "{:?}", i.degraded);
}

#[test]
fn jetson_orin_nano_is_medium_on_its_integrated_gpu() {
    let i = detect(&fixture("jetson-orin-nano-8gb"), "aarch64", &NoGpu);
    check(
        &i,
        "jetson-orin-nano",
        ResourceClass::Medium,
        "qwen2.5-coder-3b-instruct-q4_k_m",
        999,
        (5.0, 6.0),
    );
    assert_eq!(i.gpus.len(), 1, "NVML sees nothing; sysfs does");
    let g = &i.gpus[0];
    assert_eq!(g.kind, GpuKind::Jetson);
    assert!((g.utilisation_pct - 12.0).abs() < 1e-9);
    assert_eq!(g.memory_total, i.memory.total, "shares system memory");
    assert_eq!(g.temperature_c, Some(44.062));
    assert_eq!(i.cpu.physical, 6);
    assert!(i.degraded.is_empty(), "{:?}", i.degraded);
}

#[test]
fn jetson_agx_orin_64_gb_is_large() {
    let i = detect(&fixture("jetson-agx-orin-64gb"), "aarch64", &NoGpu);
    check(
        &i,
        "jetson-agx-orin",
        ResourceClass::Large,
        "qwen2.5-coder-7b-instruct-q4_k_m",
        999,
        (50.0, 60.0),
    );
    assert_eq!(i.capacity.slots, 8);
    assert_eq!(i.capacity.threads, 12);
}

#[test]
fn a_mini_pc_with_an_rtx_4060_runs_models_in_vram() {
    let i = detect(
        &fixture("minipc-rtx4060"),
        "x86_64",
        &FakeNvml(vec![rtx4060()]),
    );
    check(
        &i,
        "x86_64-nvidia",
        ResourceClass::Medium,
        "qwen2.5-coder-3b-instruct-q4_k_m",
        999,
        (7.0, 7.2),
    );
    assert_eq!((i.cpu.logical, i.cpu.physical), (16, 8));
    for f in ["avx2", "avx512f", "fma", "f16c"] {
        assert!(i.cpu.features.contains(&f.to_string()), "{f}");
    }
    assert_eq!(i.model, "UM790 Pro");
    assert_eq!(i.gpus[0].name, "NVIDIA GeForce RTX 4060");
    // The same box without its GPU (driver gone) falls back to the CPU: a big memory budget, no
    // offload, the generic profile.
    let cpu_only = detect(&fixture("minipc-rtx4060"), "x86_64", &NoGpu);
    assert_eq!(cpu_only.board, "x86_64-generic");
    assert_eq!(cpu_only.capacity.gpu_layers, 0);
    // A GPU that another process filled: too little VRAM left, so the CPU it is, and it says so.
    let mut full = rtx4060();
    full.memory_free = 300 << 20;
    let i = detect(&fixture("minipc-rtx4060"), "x86_64", &FakeNvml(vec![full]));
    assert_eq!(i.capacity.gpu_layers, 0);
    assert!(
        i.capacity.derated.iter().any(|d| d.contains("too little")),
        "{:?}",
        i.capacity.derated
    );
    // NVML that fails is reported, not fatal.
    let i = detect(&fixture("minipc-rtx4060"), "x86_64", &BrokenNvml);
    assert!(
        i.degraded.iter().any(|d| d.contains("GPU is lost")),
        "{:?}",
        i.degraded
    );
}

#[test]
fn a_2_gb_box_without_gpu_is_tiny_and_reports_missing_kernel_features() {
    let i = detect(&fixture("x86-2gb"), "x86_64", &NoGpu);
    check(
        &i,
        "x86_64-generic",
        ResourceClass::Tiny,
        "qwen2.5-coder-0.5b-instruct-q4_k_m",
        0,
        (0.9, 1.5),
    );
    assert_eq!(i.capacity.threads, 2);
    assert!(
        i.degraded.iter().any(|d| d.contains("seccomp")),
        "{:?}",
        i.degraded
    );
}

/// Copies a fixture tree so a test can change files in it.
fn copy_tree(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

#[test]
fn throttling_heat_and_low_memory_lower_capacity() {
    let base = detect(&fixture("rpi5-8gb"), "aarch64", &NoGpu);
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("rpi5-8gb"), dir.path());
    // Firmware says: throttled and frequency capped now (vcgencmd get_throttled = 0x60006).
    let flags = dir
        .path()
        .join("sys/devices/platform/soc/soc:firmware/get_throttled");
    std::fs::write(&flags, "0x60006\n").unwrap();
    let t = detect(dir.path(), "aarch64", &NoGpu);
    assert!(t.throttling.throttled && t.throttling.frequency_capped);
    assert!(t.capacity.threads < base.capacity.threads);
    assert!(t.capacity.slots < base.capacity.slots);
    assert!(!t.capacity.derated.is_empty());
    std::fs::write(&flags, "0x0\n").unwrap();
    // Hot but not yet throttled (77 °C, the limit is 80 °C).
    std::fs::write(
        dir.path().join("sys/class/thermal/thermal_zone0/temp"),
        "77000\n",
    )
    .unwrap();
    let h = detect(dir.path(), "aarch64", &NoGpu);
    assert!(
        h.capacity.threads < base.capacity.threads,
        "{:?}",
        h.capacity
    );
    std::fs::write(
        dir.path().join("sys/class/thermal/thermal_zone0/temp"),
        "50000\n",
    )
    .unwrap();
    // cpufreq capped well below the hardware maximum counts as throttling too.
    for i in 0..4 {
        std::fs::write(
            dir.path().join(format!(
                "sys/devices/system/cpu/cpu{i}/cpufreq/scaling_max_freq"
            )),
            "1500000\n",
        )
        .unwrap();
    }
    assert!(
        detect(dir.path(), "aarch64", &NoGpu)
            .throttling
            .frequency_capped
    );
    // Another process holds most of the memory: a smaller budget, class and model.
    std::fs::write(
        dir.path().join("proc/meminfo"),
        "MemTotal:        8245632 kB\nMemFree:          500000 kB\nMemAvailable:    2100000 kB\n",
    )
    .unwrap();
    let m = detect(dir.path(), "aarch64", &NoGpu);
    assert!(m.capacity.model_memory_budget < base.capacity.model_memory_budget / 2);
    assert_eq!(m.class, ResourceClass::Tiny);
    assert_eq!(
        m.capacity.default_model,
        "qwen2.5-coder-0.5b-instruct-q4_k_m"
    );
}

#[test]
fn missing_and_garbled_files_degrade_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("jetson-orin-nano-8gb"), dir.path());
    std::fs::remove_file(dir.path().join("proc/meminfo")).unwrap();
    std::fs::write(
        dir.path().join("sys/class/thermal/thermal_zone1/temp"),
        "hot\n",
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("sys/devices/platform/17000000.gpu/load")).unwrap();
    let i = detect(dir.path(), "aarch64", &NoGpu);
    assert_eq!(i.board, "jetson-orin-nano");
    assert_eq!(i.class, ResourceClass::Tiny, "no memory known: the least");
    for want in [
        "meminfo",
        "thermal_zone1/temp is not a number",
        "Jetson GPU load",
        "GPU load (nvgpu)",
    ] {
        assert!(
            i.degraded.iter().any(|d| d.contains(want)),
            "{want}: {:?}",
            i.degraded
        );
    }
    // An empty tree: still an answer.
    let empty = tempfile::tempdir().unwrap();
    let i = detect(empty.path(), "riscv64", &NoGpu);
    assert_eq!(i.board, "riscv64-generic");
    assert!(!i.degraded.is_empty());
}

#[test]
fn edgecoder_hw_json_on_this_machine_is_sane() {
    let out = std::process::Command::new(common::BIN)
        .args(["hw", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cpu"]["arch"], std::env::consts::ARCH);
    let logical = v["cpu"]["logical"].as_u64().unwrap();
    // cpuinfo lists every online CPU; this process may be confined to fewer.
    let usable = std::thread::available_parallelism().unwrap().get() as u64;
    assert!(logical >= usable, "{logical} < {usable}");
    assert!(v["cpu"]["physical"].as_u64().unwrap() <= logical);
    let total = v["memory"]["total"].as_u64().unwrap();
    let avail = v["memory"]["available"].as_u64().unwrap();
    assert!(total > 256 << 20 && avail > 0 && avail <= total, "{v}");
    let page = v["page_size"].as_u64().unwrap();
    assert!(page.is_power_of_two() && page >= 4096);
    let budget = v["capacity"]["model_memory_budget"].as_u64().unwrap();
    assert!(budget < total);
    assert!(["tiny", "small", "medium", "large", "xlarge"].contains(&v["class"].as_str().unwrap()));
    assert!(v["capacity"]["slots"].as_u64().unwrap() >= 1);
    // The human summary prints too.
    let out = std::process::Command::new(common::BIN)
        .arg("hw")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("capacity"));
}

#[test]
fn the_node_reports_its_hardware_in_status_metrics_and_its_workers_class() {
    let node = common::Node::start(&[]);
    let status = node.status();
    let hw = &status["hardware"];
    assert!(hw["class"].is_string(), "{status}");
    let (_, metrics) = common::get(&format!("{}/metrics", node.coordinator())).unwrap();
    for m in [
        "edgecoder_hw_memory_available_bytes",
        "edgecoder_hw_model_memory_budget_bytes",
        "edgecoder_hw_slots",
        "edgecoder_hw_throttled 0",
    ] {
        assert!(metrics.contains(m), "{m} missing");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let agents: Vec<edgecoder::coordinator::model::AgentView> =
        rt.block_on(node.client().get("/agents")).unwrap();
    let worker = agents.iter().find(|a| a.local).unwrap();
    assert_eq!(
        serde_json::to_value(worker.capabilities.resource_class).unwrap(),
        hw["class"]
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_command_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = std::process::Command::new(common::BIN)
        .args(["hw", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    out.read_exact(&mut first).unwrap();
    drop(out);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
    // Either it finished writing before the pipe closed, or SIGPIPE ended it: never exit 101.
    assert_ne!(status.code(), Some(101), "{status:?}");
}
