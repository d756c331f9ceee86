//! Separable Gaussian filtering with libtorch convolutions, following scipy's `gaussian_filter` (which ivadomed
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

/// Convolves `tensor` along axis `dim` with the odd-length, symmetric `kernel`.
pub fn convolve_axis(tensor: &Tensor, dim: i64, kernel: &[f64], border: Border) -> Result<Tensor> {
    if kernel.len() <= 1 {
        return Ok(tensor.shallow_clone());
    }
    if kernel.len().is_multiple_of(2) {
        return Err(PluginError::new("convolve_axis needs an odd-length kernel"));
    }
    let kind = tensor.f_kind()?;
    let device = tensor.device();
    let radius = (kernel.len() / 2) as i64;
    let moved = tensor.f_movedim([dim], [-1])?.f_contiguous()?;
    let moved_shape = moved.size();
    let len = *moved_shape.last().unwrap_or(&1);
    let rows = moved.f_reshape([-1, 1, len])?;
    let weight = Tensor::f_from_slice(kernel)?
        .f_to_kind(kind)?
        .f_to_device(device)?
        .f_reshape([1, 1, kernel.len() as i64])?;
    let filtered = match border {
        Border::Zero => rows.f_conv1d(&weight, None::<Tensor>, [1], [radius], [1], 1)?,
        Border::Symmetric => {
            let index: Vec<i64> = (-radius..len + radius)
                .map(|i| symmetric_index(i, len))
                .collect();
            let index = Tensor::f_from_slice(&index)?.f_to_device(device)?;
            rows.f_index_select(2, &index)?
                .f_conv1d(&weight, None::<Tensor>, [1], [0], [1], 1)?
        }
    };
    Ok(filtered
        .f_reshape(moved_shape.as_slice())?
        .f_movedim([-1], [dim])?)
}

/// Gaussian-filters the trailing `sigmas.len()` axes of a float tensor, `sigmas[k]` in samples along axis k.
pub fn gaussian_filter(tensor: &Tensor, sigmas: &[f64], border: Border) -> Result<Tensor> {
    let kind = tensor.f_kind()?;
    if !matches!(kind, Kind::Float | Kind::Double) {
        return Err(PluginError(format!(
            "Gaussian filtering needs a float32 or float64 tensor, got {kind:?}"
        )));
    }
    let rank = sigmas.len() as i64;
    let dims = tensor.dim() as i64;
    let mut out = tensor.shallow_clone();
    for (axis, &sigma) in sigmas.iter().enumerate() {
        out = convolve_axis(
            &out,
            dims - rank + axis as i64,
            &gaussian_kernel(sigma),
            border,
        )?;
    }
    Ok(out)
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
        let row = Tensor::from_slice(&[3.0f64, 6.0, 9.0]).reshape([1, 3]);
        let third = 1.0 / 3.0;
        let zero = convolve_axis(&row, 1, &[third; 3], Border::Zero).unwrap();
        let symmetric = convolve_axis(&row, 1, &[third; 3], Border::Symmetric).unwrap();
        let values = |t: &Tensor| Vec::<f64>::try_from(t.flatten(0, -1)).unwrap();
        for (got, want) in values(&zero).iter().zip([3.0, 6.0, 5.0]) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        for (got, want) in values(&symmetric).iter().zip([4.0, 6.0, 8.0]) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        // Filtering along the middle axis of a 3D tensor keeps the shape.
        let volume = Tensor::ones([2, 5, 3], (Kind::Float, Device::Cpu));
        let smoothed = gaussian_filter(&volume, &[1.0, 0.5], Border::Symmetric).unwrap();
        assert_eq!(smoothed.size(), vec![2, 5, 3]);
        assert!(f64::try_from((smoothed - 1.0).abs().max()).unwrap() < 1e-6);
    }
}
