//! Device and dtype choices from the command line, the settings or a job: closed sets parsed
//! once (by clap, serde or [`FromStr`]) into [`DType`], [`DeviceSpec`] and [`OrAuto`].

use std::fmt;
use std::str::FromStr;

use anyhow::bail;
use serde::{Deserialize, Deserializer};
use tch::{Device, Kind};

/// The floating-point type the models run in: `fp32`, `fp16` or `bf16` (`float32`, `f32`,
/// `float16`, `f16`, `half`, `bfloat16` are accepted too, in any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DType {
    #[value(name = "fp32", aliases = ["float32", "f32"])]
    Fp32,
    #[value(name = "fp16", aliases = ["float16", "f16", "half"])]
    Fp16,
    #[value(name = "bf16", aliases = ["bfloat16"])]
    Bf16,
}

impl DType {
    /// libtorch's name for it.
    pub fn kind(self) -> Kind {
        match self {
            DType::Fp32 => Kind::Float,
            DType::Fp16 => Kind::Half,
            DType::Bf16 => Kind::BFloat16,
        }
    }

    /// Half precision on CUDA, float32 on the CPU (where half-precision kernels are slow or
    /// absent).
    pub fn default_for(device: Device) -> Self {
        if device.is_cuda() {
            DType::Fp16
        } else {
            DType::Fp32
        }
    }
}

impl FromStr for DType {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        <Self as clap::ValueEnum>::from_str(&s, true)
            .map_err(|_| anyhow::anyhow!("invalid dtype `{s}` (expected fp32, fp16 or bf16)"))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(dtype_name(self.kind()))
    }
}

/// A device as the user names it: `cpu`, `cuda` (the first GPU) or `cuda:N`. Parsing checks
/// the spelling only; [`DeviceSpec::device`] checks that libtorch sees the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// The libtorch device, when this machine has it.
    pub fn device(self) -> anyhow::Result<Device> {
        let index = match self {
            DeviceSpec::Cpu => return Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => i,
        };
        if !tch::Cuda::is_available() {
            bail!(
                "device `{self}` requested but CUDA is not available to libtorch on this machine"
            );
        }
        let count = tch::Cuda::device_count() as usize;
        if index >= count {
            bail!("device `{self}` requested but only {count} CUDA device(s) are visible");
        }
        Ok(Device::Cuda(index))
    }
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        let invalid = || anyhow::anyhow!("invalid device `{s}` (expected cpu, cuda or cuda:N)");
        match s.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| invalid()),
                None => Err(invalid()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A setting that is `auto` (chosen for the machine) or given (the worker's `device` and
/// `dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrAuto<T> {
    #[default]
    Auto,
    Given(T),
}

impl<T: FromStr<Err = anyhow::Error>> FromStr for OrAuto<T> {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        if s == "auto" {
            return Ok(OrAuto::Auto);
        }
        s.parse()
            .map(OrAuto::Given)
            .map_err(|e| anyhow::anyhow!("{e}, or auto"))
    }
}

impl OrAuto<DeviceSpec> {
    /// `auto`: the first GPU when libtorch sees one, else the CPU.
    pub fn resolve(self) -> anyhow::Result<Device> {
        match self {
            OrAuto::Auto => Ok(default_device()),
            OrAuto::Given(d) => d.device(),
        }
    }
}

impl OrAuto<DType> {
    /// `auto`: [`DType::default_for`] the device.
    pub fn resolve(self, device: Device) -> Kind {
        match self {
            OrAuto::Auto => DType::default_for(device).kind(),
            OrAuto::Given(d) => d.kind(),
        }
    }
}

/// Deserializes any of these types from its string form, the error naming the allowed values.
fn from_string<'de, D: Deserializer<'de>, T: FromStr<Err = anyhow::Error>>(
    d: D,
) -> Result<T, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(|e: anyhow::Error| serde::de::Error::custom(e))
}

impl<'de> Deserialize<'de> for DType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

impl<'de, T: FromStr<Err = anyhow::Error>> Deserialize<'de> for OrAuto<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_string(d)
    }
}

/// The default device: the first GPU when libtorch sees one, else the CPU.
pub fn default_device() -> Device {
    if tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

pub fn dtype_name(dtype: Kind) -> &'static str {
    match dtype {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_and_devices_parse_as_before() {
        assert_eq!(" FP16 ".parse::<DType>().unwrap(), DType::Fp16);
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::Bf16);
        assert!("fp8"
            .parse::<DType>()
            .unwrap_err()
            .to_string()
            .contains("fp32, fp16 or bf16"));
        assert_eq!("CUDA:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("tpu".parse::<DeviceSpec>().is_err() && "cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!(
            "cpu".parse::<DeviceSpec>().unwrap().device().unwrap(),
            Device::Cpu
        );
    }

    #[test]
    fn worker_settings_take_auto() {
        assert_eq!("auto".parse::<OrAuto<DType>>().unwrap(), OrAuto::Auto);
        assert_eq!(
            "cuda:2".parse::<OrAuto<DeviceSpec>>().unwrap(),
            OrAuto::Given(DeviceSpec::Cuda(2))
        );
        let e = "fp8".parse::<OrAuto<DType>>().unwrap_err().to_string();
        assert!(e.contains("fp16") && e.contains("auto"), "{e}");
        let d: OrAuto<DType> = serde_json::from_str("\"bf16\"").unwrap();
        assert_eq!(d.resolve(Device::Cpu), Kind::BFloat16);
        assert_eq!(OrAuto::<DType>::Auto.resolve(Device::Cpu), Kind::Float);
    }
}
