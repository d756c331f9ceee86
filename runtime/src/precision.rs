//! Mixed precision and memory format: bf16/fp16 autocast regions (CPU and CUDA) and channels-last weights.
use anyhow::{bail, Result};
use tch::{Device, Tensor};

extern "C" {
    fn ivado_autocast_set(device: i32, enabled: bool, bf16: bool) -> bool;
    fn ivado_autocast_clear_cache();
    fn ivado_to_channels_last(tensor: *const torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
    fn ivado_inference_mode_begin() -> *mut std::ffi::c_void;
    fn ivado_inference_mode_end(guard: *mut std::ffi::c_void);
    fn ivado_cuda_bf16_supported() -> bool;
}

/// Arithmetic precision of the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// bf16 autocast: matmuls and convolutions in bfloat16, reductions and the loss in fp32. CPU and CUDA.
    Bf16,
    /// fp16 autocast: CUDA only.
    Fp16,
}

impl Precision {
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "fp32" | "float32" => Self::Fp32,
            "bf16" | "bfloat16" => Self::Bf16,
            "fp16" | "float16" | "half" => Self::Fp16,
            other => bail!("unknown precision `{other}`: use fp32, bf16 or fp16"),
        })
    }

    /// Parses `--precision`: `auto` is `None` (chosen by [`resolve`]), anything else a fixed precision.
    pub fn parse_request(text: &str) -> Result<Option<Self>> {
        if text == "auto" {
            return Ok(None);
        }
        Self::parse(text).map(Some).map_err(|_| {
            anyhow::anyhow!("unknown precision `{text}`: use auto, fp32, bf16 or fp16")
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
            Self::Fp16 => "fp16",
        }
    }

    pub fn check(self, device: Device) -> Result<()> {
        if self == Self::Fp16 && device == Device::Cpu {
            bail!("fp16 autocast needs CUDA; on the CPU use bf16");
        }
        Ok(())
    }
}

/// Whether `device` computes bf16 convolutions natively: a CPU with AVX512-BF16 or AMX-BF16 (oneDNN's fast
/// bf16 kernels; elsewhere bf16 is emulated and slower than fp32), or a CUDA device of compute capability 8+.
pub fn native_bf16(device: Device) -> bool {
    match device {
        Device::Cpu => {
            static CPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *CPU.get_or_init(|| {
                std::fs::read_to_string("/proc/cpuinfo")
                    .is_ok_and(|text| cpu_has_native_bf16(&text))
            })
        }
        // SAFETY: a query without arguments; false without CUDA.
        Device::Cuda(_) => unsafe { ivado_cuda_bf16_supported() },
        _ => false,
    }
}

/// Whether a /proc/cpuinfo text lists a native bf16 instruction set in its `flags`.
fn cpu_has_native_bf16(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .any(|flag| flag == "avx512_bf16" || flag == "amx_bf16")
}

/// Where the precision of a forward came from, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrecisionSource {
    /// `--precision` (or the script's `precision`).
    Requested,
    /// The model folder's `inference.precision`.
    ModelFolder,
    /// `auto`: bf16 where the device has native bf16, else fp32.
    Hardware,
}

/// The precision to run: the request if any, else the model folder's pinned one, else bf16 on a device with
/// native bf16 and fp32 elsewhere. Checked against the device.
pub fn resolve(
    requested: Option<Precision>,
    pinned: Option<Precision>,
    device: Device,
) -> Result<(Precision, PrecisionSource)> {
    let chosen = match (requested, pinned) {
        (Some(precision), _) => (precision, PrecisionSource::Requested),
        (None, Some(precision)) => (precision, PrecisionSource::ModelFolder),
        (None, None) if native_bf16(device) => (Precision::Bf16, PrecisionSource::Hardware),
        (None, None) => (Precision::Fp32, PrecisionSource::Hardware),
    };
    chosen.0.check(device)?;
    Ok(chosen)
}

/// Runs `f` in libtorch's inference mode (`c10::InferenceMode`): no autograd state is recorded or checked,
/// which is cheaper than `no_grad`. Tensors made inside are inference tensors: outside the region they can be
/// read and used in functional ops, but not modified in place (copy them first).
pub fn inference_mode<T>(f: impl FnOnce() -> T) -> T {
    struct Guard(*mut std::ffi::c_void);
    impl Drop for Guard {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: the guard was made by begin on this thread and is ended once, innermost first.
                unsafe { ivado_inference_mode_end(self.0) }
            }
        }
    }
    // SAFETY: allocates a thread-local RAII guard; null only if libtorch threw, then this is plain no_grad.
    let guard = Guard(unsafe { ivado_inference_mode_begin() });
    if guard.0.is_null() {
        return tch::no_grad(f);
    }
    f()
}

/// Runs `f` with autocast on for `device` in `precision` (nothing for fp32), restoring the previous state.
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    if precision == Precision::Fp32 {
        return f();
    }
    let code = if device == Device::Cpu { 0 } else { 1 };
    let bf16 = precision == Precision::Bf16;
    // SAFETY: plain libtorch state toggles, no pointers.
    let previous = unsafe { ivado_autocast_set(code, true, bf16) };
    let result = f();
    unsafe {
        ivado_autocast_set(code, previous, bf16);
        if !previous {
            ivado_autocast_clear_cache();
        }
    }
    result
}

/// A channels-last copy of a 4D or 5D tensor (other ranks come back unchanged).
pub fn channels_last(tensor: &Tensor) -> Result<Tensor> {
    if !(4..=5).contains(&tensor.dim()) {
        return Ok(tensor.shallow_clone());
    }
    // SAFETY: the handle is valid for the call; the result is a new owned tensor or null.
    let converted = unsafe { ivado_to_channels_last(tensor.as_ptr()) };
    if converted.is_null() {
        bail!(
            "cannot convert a {:?} tensor to channels-last",
            tensor.size()
        );
    }
    Ok(unsafe { Tensor::from_ptr(converted) })
}

/// Converts every 4D (2D convolution) or 5D weight to the channels-last memory format in place. `set_data`
/// swaps the storage under the same tensor implementation, which the plugin's handle shares, so the plugin's
/// convolutions see the new layout.
pub fn to_channels_last(parameters: &[crate::plugin::NamedTensor]) -> Result<()> {
    tch::no_grad(|| {
        for parameter in parameters
            .iter()
            .filter(|p| (4..=5).contains(&p.tensor.dim()))
        {
            let converted = channels_last(&parameter.tensor)?;
            parameter.tensor.shallow_clone().set_data(&converted);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn bf16_autocast_runs_convolutions_in_bfloat16_on_the_cpu_and_restores_fp32() {
        let x = Tensor::rand([1, 2, 8, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::rand([3, 2, 3, 3], (Kind::Float, Device::Cpu));
        let conv = || x.conv2d(&w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        assert_eq!(conv().kind(), Kind::Float);
        let inside = autocast(Precision::Bf16, Device::Cpu, conv);
        assert_eq!(inside.kind(), Kind::BFloat16);
        // bf16 keeps 8 bits of mantissa: close to fp32, not equal.
        let difference = (inside.to_kind(Kind::Float) - conv())
            .abs()
            .max()
            .double_value(&[]);
        assert!(difference > 0.0 && difference < 0.1, "{difference}");
        assert_eq!(conv().kind(), Kind::Float, "autocast must be off again");
        assert_eq!(
            autocast(Precision::Fp32, Device::Cpu, conv).kind(),
            Kind::Float
        );
    }

    #[test]
    fn native_bf16_reads_the_cpu_flags_and_auto_defers_to_requests_and_pinned_precisions() {
        let with = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n";
        let amx = "flags\t\t: fpu amx_bf16 amx_tile\n";
        // `avx512_bf16x` is not the flag, and a flag outside the `flags` line does not count.
        let without = "model name\t: avx512_bf16 chip\nflags\t\t: fpu avx512f avx512_bf16x\n";
        assert!(cpu_has_native_bf16(with));
        assert!(cpu_has_native_bf16(amx));
        assert!(!cpu_has_native_bf16(without));
        let cpu = Device::Cpu;
        assert_eq!(
            resolve(Some(Precision::Fp32), Some(Precision::Bf16), cpu).unwrap(),
            (Precision::Fp32, PrecisionSource::Requested)
        );
        assert_eq!(
            resolve(None, Some(Precision::Fp32), cpu).unwrap(),
            (Precision::Fp32, PrecisionSource::ModelFolder)
        );
        let expected = if native_bf16(cpu) {
            Precision::Bf16
        } else {
            Precision::Fp32
        };
        assert_eq!(
            resolve(None, None, cpu).unwrap(),
            (expected, PrecisionSource::Hardware)
        );
        assert!(resolve(None, Some(Precision::Fp16), cpu).is_err());
        assert_eq!(Precision::parse_request("auto").unwrap(), None);
        assert_eq!(
            Precision::parse_request("bf16").unwrap(),
            Some(Precision::Bf16)
        );
        assert!(Precision::parse_request("fp8").is_err());
    }

    #[test]
    fn inference_mode_computes_without_gradients_and_its_results_copy_out() {
        let w = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = inference_mode(|| &w * 2.0);
        assert!(!y.requires_grad() && y.is_inference());
        // A copy made outside the region is an ordinary tensor that can be modified in place.
        let mut copy = y.copy();
        assert!(!copy.is_inference());
        let _ = copy.g_add_scalar_(1.0);
        assert_eq!(Vec::<f32>::try_from(&copy).unwrap(), vec![3.0; 3]);
        // The region ended: autograd records again.
        assert!((&w * 2.0).requires_grad());
    }

    #[test]
    fn channels_last_puts_channels_innermost_with_the_same_values() {
        let x = Tensor::rand([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let y = channels_last(&x).unwrap();
        // NHWC in memory: the channel stride is 1, the width stride is C.
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(y.equal(&x));
        let volume = Tensor::rand([1, 2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert_eq!(channels_last(&volume).unwrap().stride()[1], 1);
        // One channel: the plain strides are ambiguous, and oneDNN would run the plain layout; the strides
        // become the channels-last ones ([N, 1, H, W] -> (H W, 1, W, 1)) over the same values.
        let single = Tensor::rand([2, 1, 4, 5], (Kind::Float, Device::Cpu));
        let converted = channels_last(&single).unwrap();
        assert_eq!(converted.stride(), vec![20, 1, 5, 1]);
        assert!(converted.equal(&single));
        let single = Tensor::rand([2, 1, 3, 4, 5], (Kind::Float, Device::Cpu));
        let converted = channels_last(&single).unwrap();
        assert_eq!(converted.stride(), vec![60, 1, 20, 5, 1]);
        assert!(converted.equal(&single));
        assert!(Precision::Fp16.check(Device::Cpu).is_err());
        assert_eq!(Precision::parse("bf16").unwrap(), Precision::Bf16);
    }
}
