//! Mixed precision and memory format: bf16/fp16 autocast regions (CPU and CUDA) and channels-last weights.
use anyhow::{bail, Result};
use tch::{Device, Tensor};

extern "C" {
    fn ivado_autocast_set(device: i32, enabled: bool, bf16: bool) -> bool;
    fn ivado_autocast_clear_cache();
    fn ivado_to_channels_last(tensor: *const torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
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

    pub fn check(self, device: Device) -> Result<()> {
        if self == Self::Fp16 && device == Device::Cpu {
            bail!("fp16 autocast needs CUDA; on the CPU use bf16");
        }
        Ok(())
    }
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
    fn channels_last_puts_channels_innermost_with_the_same_values() {
        let x = Tensor::rand([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let y = channels_last(&x).unwrap();
        // NHWC in memory: the channel stride is 1, the width stride is C.
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(y.equal(&x));
        let volume = Tensor::rand([1, 2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert_eq!(channels_last(&volume).unwrap().stride()[1], 1);
        assert!(Precision::Fp16.check(Device::Cpu).is_err());
        assert_eq!(Precision::parse("bf16").unwrap(), Precision::Bf16);
    }
}
