//! Device and dtype choices from the command line or a job.

use anyhow::bail;
use tch::{Device, Kind};

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let index = if s == "cuda" {
        0
    } else if let Some(n) = s.strip_prefix("cuda:") {
        n.parse::<usize>()
            .map_err(|_| anyhow::anyhow!("invalid device `{s}` (expected cpu, cuda or cuda:N)"))?
    } else {
        bail!("invalid device `{s}` (expected cpu, cuda or cuda:N)");
    };
    if !tch::Cuda::is_available() {
        bail!("device `{s}` requested but CUDA is not available to libtorch on this machine");
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        bail!("device `{s}` requested but only {count} CUDA device(s) are visible");
    }
    Ok(Device::Cuda(index))
}

/// The default device: the first GPU when libtorch sees one, else the CPU.
pub fn default_device() -> Device {
    if tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

/// `fp32`, `fp16` or `bf16`.
pub fn parse_dtype(s: &str) -> anyhow::Result<Kind> {
    Ok(match s.trim().to_ascii_lowercase().as_str() {
        "fp32" | "float32" | "f32" => Kind::Float,
        "fp16" | "float16" | "f16" | "half" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => bail!("invalid dtype `{other}` (expected fp32, fp16 or bf16)"),
    })
}

/// Half precision on CUDA, float32 on the CPU (where half-precision kernels are slow or absent).
pub fn default_dtype(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::Half
    } else {
        Kind::Float
    }
}

pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "fp32",
        Kind::Half => "fp16",
        Kind::BFloat16 => "bf16",
        _ => "other",
    }
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Waits for queued GPU work (timing boundaries only; never inside the step loop).
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}
