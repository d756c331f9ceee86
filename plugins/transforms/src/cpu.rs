//! Direct access to the memory of contiguous float32 CPU tensors, for the hot loops of the training augmentations.
//!
//! Data loaders augment on the CPU, where a chain of small libtorch ops costs a full pass over memory (and an
//! allocation) per op plus dispatch overhead per call. The transforms below fuse such chains into one Rust loop when
//! every tensor involved is float32, contiguous and on the CPU; otherwise (GPU, other kinds) they keep their libtorch
//! ops. Both paths compute the same values. Inputs are only read: results always go to new tensors, since a
//! transform's input may share its storage with the caller's tensors.
use ivado_sdk::tch::{Device, Kind, Tensor};
use ivado_sdk::Result;

/// The values of `tensor` when it is a contiguous float32 CPU tensor.
pub fn f32_data(tensor: &Tensor) -> Option<&[f32]> {
    let usable = tensor.device() == Device::Cpu
        && tensor.kind() == Kind::Float
        && tensor.is_contiguous()
        && tensor.numel() > 0;
    if !usable {
        return None;
    }
    // SAFETY: a contiguous float32 CPU tensor holds `numel` floats from `data_ptr` (which includes the storage
    // offset); the slice borrows `tensor`, which keeps the storage alive, and is only read.
    Some(unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const f32, tensor.numel()) })
}

/// A new float32 CPU tensor of `shape`, whose every value `fill` writes.
pub fn new_f32(shape: &[i64], fill: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<Tensor> {
    let tensor = Tensor::f_empty(shape, (Kind::Float, Device::Cpu))?;
    let count = tensor.numel();
    if count > 0 {
        // SAFETY: the tensor was just allocated, contiguous, with `count` floats, and nothing else refers to it yet.
        let values =
            unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut f32, count) };
        fill(values)?;
    }
    Ok(tensor)
}

/// The values of a tensor this code just made with [`new_f32`] or `Tensor::empty` (contiguous float32 on the CPU),
/// to write.
///
/// # Safety
/// No other handle may refer to `tensor`'s storage while the slice lives.
pub unsafe fn fresh_f32_mut(tensor: &mut Tensor) -> &mut [f32] {
    assert!(
        tensor.device() == Device::Cpu && tensor.kind() == Kind::Float && tensor.is_contiguous(),
        "fresh_f32_mut needs a contiguous float32 CPU tensor"
    );
    let count = tensor.numel();
    if count == 0 {
        return &mut [];
    }
    // SAFETY: contiguous float32 storage of `count` values, which the caller guarantees nothing else refers to.
    unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut f32, count) }
}

/// Sum of `values` in float64, with 8 independent partial sums so the loop vectorises.
pub fn sum_f64(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(v);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// Sum of `(v - centre)²` over `values` in float64, vectorised as [`sum_f64`].
pub fn squared_deviations_f64(values: &[f32], centre: f64) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (f64::from(v) - centre).powi(2))
        .sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            let d = f64::from(v) - centre;
            *lane += d * d;
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// Whether every value is 0 or 1.
pub fn all_binary(values: &[f32]) -> bool {
    // Branch-free per chunk so the check vectorises; stops at the first chunk with another value.
    values.chunks(64).all(|chunk| {
        chunk
            .iter()
            .fold(true, |ok, &v| ok & ((v == 0.0) | (v == 1.0)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_contiguous_float_cpu_tensors() {
        let t = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([2, 3]);
        assert_eq!(f32_data(&t).unwrap(), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        // A column view is not contiguous; a narrowed row block is, and starts at its offset.
        assert!(f32_data(&t.transpose(0, 1)).is_none());
        assert_eq!(f32_data(&t.narrow(0, 1, 1)).unwrap(), &[3.0, 4.0, 5.0]);
        assert!(f32_data(&t.to_kind(Kind::Double)).is_none());
        let made = new_f32(&[2, 2], |out| {
            out.copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            Vec::<f32>::try_from(made.flatten(0, -1)).unwrap(),
            [1.0, 2.0, 3.0, 4.0]
        );
    }

    // 1..=13 sums to 91; deviations from 7 are -6..=6, whose squares sum to 2 * (1 + 4 + 9 + 16 + 25 + 36) = 182.
    #[test]
    fn float64_sums() {
        let values: Vec<f32> = (1..=13).map(|v| v as f32).collect();
        assert_eq!(sum_f64(&values), 91.0);
        assert_eq!(squared_deviations_f64(&values, 7.0), 182.0);
        assert!(all_binary(&[0.0, 1.0, 1.0]));
        assert!(!all_binary(&[0.0, 0.5]));
        let mut long = vec![1.0f32; 200];
        long[150] = 2.0;
        assert!(!all_binary(&long));
    }
}
