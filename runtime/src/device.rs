//! Choosing the compute device, and making CUDA register.
//!
//! torch-sys links `libtorch_cuda.so` with `--as-needed`, so the linker drops it and CUDA never registers,
//! even on a GPU machine (tch-rs#980). We load it ourselves with `RTLD_GLOBAL` when a GPU is wanted, before
//! the first CUDA query, because libtorch caches the answer. On a CPU-only machine we skip it entirely: the
//! CUDA libraries cost ~400 MB of resident memory for nothing.
use anyhow::{bail, Result};
use std::str::FromStr;
use std::sync::OnceLock;
use tch::Device;

/// What the user asked for: `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    Cpu,
    Cuda(usize),
    #[default]
    Auto,
}

impl FromStr for DeviceRequest {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Ok(Self::Cuda(index)),
                _ => bail!("unknown device `{text}`: use cpu, cuda, cuda:N or auto"),
            },
        }
    }
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(index) => write!(f, "cuda:{index}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// An NVIDIA driver is installed, so loading the CUDA side of libtorch is worth it.
fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::path::Path::new("/dev/nvidia0").exists()
}

/// Loads `libtorch_cuda.so` globally, once. Returns whether it loaded.
fn register_cuda() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        let path = std::path::Path::new(ivado_sdk::abi::LIBTORCH_LIB_DIR).join("libtorch_cuda.so");
        let Ok(c_path) = std::ffi::CString::new(path.to_string_lossy().as_bytes()) else {
            return false;
        };
        // SAFETY: dlopen of libtorch's own CUDA library; the handle is deliberately never closed.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            let reason = unsafe { std::ffi::CStr::from_ptr(libc::dlerror()) }
                .to_string_lossy()
                .into_owned();
            tracing::warn!("could not load {}: {reason}", path.display());
            false
        } else {
            true
        }
    })
}

/// Resolves a request to a device, loading CUDA support if needed. Call before any other CUDA query.
pub fn resolve(request: DeviceRequest) -> Result<Device> {
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => {
            if nvidia_driver_present() && register_cuda() && tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Ok(Device::Cpu)
            }
        }
        DeviceRequest::Cuda(index) => {
            if !register_cuda() || !tch::Cuda::is_available() {
                bail!("device cuda:{index} requested, but CUDA is not available on this machine (use --device cpu or auto)");
            }
            let count = tch::Cuda::device_count() as usize;
            if index >= count {
                bail!("device cuda:{index} requested, but this machine has {count} CUDA device(s)");
            }
            Ok(Device::Cuda(index))
        }
    }
}

pub fn describe(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        _ => "cpu".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_rejects_others() {
        assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!(
            "AUTO".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Auto
        );
        assert_eq!(
            "cuda".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(3)
        );
        let error = "tpu".parse::<DeviceRequest>().unwrap_err().to_string();
        assert!(error.contains("unknown device `tpu`"), "{error}");
    }

    #[test]
    fn cpu_always_resolves() {
        assert_eq!(resolve(DeviceRequest::Cpu).unwrap(), Device::Cpu);
    }
}
