//! Separable Gaussian filtering as batched matrix products (one per axis, each row its own kernel), following scipy's `gaussian_filter` (which ivadomed
//! uses): kernel radius `int(4 * sigma + 0.5)`, weights `exp(-x² / 2σ²)` normalised to sum 1.
use ivado_sdk::tch::{Kind, Tensor};
use ivado_sdk::{PluginError, Result};

/// How values beyond the edge are filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Border {
    /// Zeros: scipy's `mode="constant", cval=0` (ivadomed's elastic displacement fields).
    Zero,
    /// Mirrored with the edge sample repeated (`d c b a | a b c d`): scipy's default `mode="reflect"`.
    Symmetric,
}

/// scipy's Gaussian kernel for `sigma` in samples, truncated at 4 sigma.
pub fn gaussian_kernel(sigma: f64) -> Vec<f64> {
    if sigma <= 0.0 {
        return vec![1.0];
    }
    let radius = (4.0 * sigma + 0.5) as i64;
    let weights: Vec<f64> = (-radius..=radius)
        .map(|x| (-0.5 * (x * x) as f64 / (sigma * sigma)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    weights.into_iter().map(|w| w / total).collect()
}

/// Index of the sample that position `index` (possibly outside `0..len`) reads under scipy's `reflect` mode.
pub fn symmetric_index(index: i64, len: i64) -> i64 {
    let period = 2 * len;
    let folded = index.rem_euclid(period);
    if folded < len {
        folded
    } else {
        period - 1 - folded
    }
}

/// The `n x n` matrix of a convolution with the odd-length, symmetric `kernel` along an axis of `n` samples,
/// borders included: `out[i] = sum_j matrix[i * n + j] * in[j]`. A matrix product with it is the convolution, so
/// samples with different kernels are filtered in one batched product.
pub fn convolution_matrix(kernel: &[f64], n: usize, border: Border) -> Vec<f64> {
    let radius = (kernel.len() / 2) as i64;
    let mut matrix = vec![0.0; n * n];
    for i in 0..n {
        for (tap, &weight) in kernel.iter().enumerate() {
            let position = i as i64 + tap as i64 - radius;
            let j = match border {
                Border::Zero if !(0..n as i64).contains(&position) => continue,
                Border::Zero => position,
                Border::Symmetric => symmetric_index(position, n as i64),
            };
            matrix[i * n + j as usize] += weight;
        }
    }
    matrix
}

/// Gaussian-filters each row of `tensor` (`[R, ...]`, float32 or float64) along its trailing `sigmas[r].len()`
/// axes, row `r` with its own `sigmas[r][k]` (in samples) along axis k: one batched matrix product per axis.
pub fn gaussian_filter_rows(
    tensor: &Tensor,
    sigmas: &[Vec<f64>],
    border: Border,
) -> Result<Tensor> {
    let kind = tensor.f_kind()?;
    if !matches!(kind, Kind::Float | Kind::Double) {
        return Err(PluginError(format!(
            "Gaussian filtering needs a float32 or float64 tensor, got {kind:?}"
        )));
    }
    let shape = tensor.size();
    let rows = shape.first().copied().unwrap_or(0);
    if rows as usize != sigmas.len() {
        return Err(PluginError(format!(
            "{} sigma lists for {rows} rows",
            sigmas.len()
        )));
    }
    let Some(rank) = sigmas.first().map(Vec::len) else {
        return Ok(tensor.shallow_clone());
    };
    let dims = shape.len();
    if dims < rank + 1 || sigmas.iter().any(|s| s.len() != rank) {
        return Err(PluginError(format!(
            "cannot filter {rank} trailing axes of a tensor of shape {shape:?}"
        )));
    }
    let device = tensor.device();
    let mut out = tensor.shallow_clone();
    for axis in 0..rank {
        let dim = (dims - rank + axis) as i64;
        let n = shape[dims - rank + axis] as usize;
        let kernels: Vec<Vec<f64>> = sigmas.iter().map(|s| gaussian_kernel(s[axis])).collect();
        if kernels.iter().all(|k| k.len() <= 1) {
            continue;
        }
        let mut matrices = Vec::with_capacity(sigmas.len() * n * n);
        for kernel in &kernels {
            matrices.extend(convolution_matrix(kernel, n, border));
        }
        // out[r, .., i] = sum_j M_r[i, j] in[r, .., j], i.e. in @ M_rᵀ on rows moved to the last axis.
        let matrices = Tensor::f_from_slice(&matrices)?
            .f_reshape([rows, n as i64, n as i64])?
            .f_transpose(1, 2)?
            .f_to_kind(kind)?
            .f_to_device(device)?;
        let moved = out.f_movedim([dim], [-1])?;
        let moved_shape = moved.size();
        let filtered = moved
            .f_reshape([rows, -1, n as i64])?
            .f_bmm(&matrices)?
            .f_reshape(moved_shape.as_slice())?;
        out = filtered.f_movedim([-1], [dim])?;
    }
    Ok(out.f_contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivado_sdk::tch::Device;

    // scipy.ndimage._gaussian_kernel1d(1.0, 0, 4): radius 4, weights exp(-x²/2) / sum; the centre weight
    // 1 / sum_{x=-4..4} exp(-x²/2) = 0.39894... (close to 1/sqrt(2 pi) = 0.398942).
    #[test]
    fn kernel_matches_scipy_radius_and_normalisation() {
        let kernel = gaussian_kernel(1.0);
        assert_eq!(kernel.len(), 9);
        assert!((kernel.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let total: f64 = (-4..=4).map(|x: i32| (-0.5 * (x * x) as f64).exp()).sum();
        assert!((kernel[4] - 1.0 / total).abs() < 1e-15);
        // sigma 0.3: int(1.2 + 0.5) = 1, so 3 taps.
        assert_eq!(gaussian_kernel(0.3).len(), 3);
        assert_eq!(gaussian_kernel(0.0), vec![1.0]);
    }

    // Symmetric (scipy "reflect") padding of [1, 2, 3] by 2: [2, 1 | 1, 2, 3 | 3, 2].
    #[test]
    fn symmetric_index_repeats_the_edge() {
        let padded: Vec<i64> = (-2..5).map(|i| symmetric_index(i, 3)).collect();
        assert_eq!(padded, vec![1, 0, 0, 1, 2, 2, 1]);
        assert_eq!(symmetric_index(-7, 1), 0);
    }

    // A box kernel [1/3, 1/3, 1/3] on [3, 6, 9]: zero border gives [3, 6, 5]; symmetric border gives [4, 6, 8].
    #[test]
    fn convolution_borders() {
        let third = 1.0 / 3.0;
        let apply = |border: Border| -> Vec<f64> {
            let m = convolution_matrix(&[third; 3], 3, border);
            (0..3)
                .map(|i| (0..3).map(|j| m[i * 3 + j] * [3.0, 6.0, 9.0][j]).sum())
                .collect()
        };
        for (got, want) in apply(Border::Zero).iter().zip([3.0, 6.0, 5.0]) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        for (got, want) in apply(Border::Symmetric).iter().zip([4.0, 6.0, 8.0]) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        // Filtering the trailing axes of a 3D tensor keeps the shape, and a constant stays constant (mirrored).
        let volume = Tensor::ones([2, 5, 3], (Kind::Float, Device::Cpu));
        let smoothed = gaussian_filter_rows(
            &volume,
            &[vec![1.0, 0.5], vec![0.7, 2.0]],
            Border::Symmetric,
        )
        .unwrap();
        assert_eq!(smoothed.size(), vec![2, 5, 3]);
        assert!(f64::try_from((smoothed - 1.0).abs().max()).unwrap() < 1e-6);
    }

    // Each row is filtered with its own sigma: row 0 with sigma 0 stays an impulse, row 1 (sigma 1) becomes
    // scipy's kernel for sigma 1 around the impulse (zero border, the kernel fits inside).
    #[test]
    fn rows_have_their_own_kernels() {
        let mut impulse = vec![0.0f64; 2 * 11];
        impulse[5] = 1.0;
        impulse[11 + 5] = 1.0;
        let rows = Tensor::from_slice(&impulse).reshape([2, 11]);
        let out = gaussian_filter_rows(&rows, &[vec![0.0], vec![1.0]], Border::Zero).unwrap();
        let out = Vec::<f64>::try_from(out.flatten(0, -1)).unwrap();
        assert_eq!(&out[..11], &impulse[..11]);
        let kernel = gaussian_kernel(1.0);
        for (k, weight) in kernel.iter().enumerate() {
            assert!((out[11 + 1 + k] - weight).abs() < 1e-15);
        }
    }
}
