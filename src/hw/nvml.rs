//! NVIDIA GPUs through NVML (`nvml-wrapper`). The library (`libnvidia-ml.so.1`) is loaded at run
//! time: a box without the driver simply has no NVML GPU. Jetson's integrated GPU is not visible
//! to NVML; `readers::jetson_gpu` covers it.

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;

use super::board::GpuKind;
use super::{Gpu, GpuProbe};

/// The real probe.
#[derive(Debug, Default, Clone, Copy)]
pub struct NvmlProbe;

impl GpuProbe for NvmlProbe {
    fn gpus(&self) -> Result<Vec<Gpu>, String> {
        // Loaded once per process (the node re-reads the hardware every 30 s). No library or no
        // driver: no NVML GPU, not a fault.
        static NVML: std::sync::OnceLock<Option<Nvml>> = std::sync::OnceLock::new();
        let Some(nvml) = NVML.get_or_init(|| Nvml::init().ok()) else {
            return Ok(Vec::new());
        };
        let n = nvml
            .device_count()
            .map_err(|e| format!("NVML device count: {e}"))?;
        let mut out = Vec::new();
        for i in 0..n {
            let d = nvml
                .device_by_index(i)
                .map_err(|e| format!("NVML device {i}: {e}"))?;
            let mem = d
                .memory_info()
                .map_err(|e| format!("NVML device {i} memory: {e}"))?;
            out.push(Gpu {
                name: d.name().unwrap_or_else(|_| format!("NVIDIA GPU {i}")),
                kind: GpuKind::Nvml,
                memory_total: mem.total,
                memory_free: mem.free,
                utilisation_pct: d.utilization_rates().map_or(0.0, |u| f64::from(u.gpu)),
                temperature_c: d.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
                power_w: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            });
        }
        Ok(out)
    }
}
