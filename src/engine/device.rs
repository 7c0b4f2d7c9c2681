//! Where a model runs: `--device` and `--dtype` become candle's device and weight dtype.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::usage(format!(
                "--device: {s:?} (expected auto, cpu, cuda or cuda:N)"
            ))
        };
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(bad),
        }
    }
}

/// Weight dtype; `Auto` is bf16 on CUDA and f32 on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    #[default]
    Auto,
    Bf16,
    F16,
    F32,
}

/// The device and dtype to load onto; `auto` is CUDA when built with it and present.
pub fn select(device: DeviceChoice, dtype: DTypeChoice) -> Result<(Device, DType)> {
    let device = match device {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| {
            Error::usage(format!(
                "--device cuda:{n}: not available ({e}) (expected a CUDA device and a binary built with --features cuda)"
            ))
        })?,
        DeviceChoice::Auto => Device::cuda_if_available(0).unwrap_or(Device::Cpu),
    };
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: candle runs everything on this device's one stream, where frees and copies
        // are stream-ordered, so the per-tensor events cudarc records for multi-stream use
        // (a few microseconds of host time per kernel argument) guard nothing here.
        unsafe { d.disable_event_tracking() };
    }
    let dtype = match dtype {
        DTypeChoice::Auto if device.is_cuda() => DType::BF16,
        DTypeChoice::Auto | DTypeChoice::F32 => DType::F32,
        DTypeChoice::Bf16 => DType::BF16,
        DTypeChoice::F16 => DType::F16,
    };
    Ok((device, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices() {
        assert_eq!(
            DeviceChoice::parse("cuda:1").unwrap(),
            DeviceChoice::Cuda(1)
        );
        assert_eq!(DeviceChoice::parse("cuda").unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(DeviceChoice::parse("cpu").unwrap(), DeviceChoice::Cpu);
        assert!(DeviceChoice::parse("gpu").is_err());
        assert!(DeviceChoice::parse("cuda:x").is_err());
    }
}
