//! Tensor operations for plugin authors whose ATen counterpart loses the input's memory format.
//!
//! On a CPU with native bf16 the host feeds networks channels-last batches (and converts their weights),
//! where oneDNN convolutions, pooling and interpolation are fastest. An operation that returns a contiguous
//! tensor switches every later layer to its slow contiguous kernel and costs a layout copy besides.
use crate::Result;
use tch::Tensor;

/// `InstanceNorm(affine=False, track_running_stats=False)`: each sample and channel normalised by its own
/// mean and biased variance, in every mode. ATen's `instance_norm` views the batch as one sample of N*C
/// channels, which needs a contiguous tensor, so on a channels-last one it copies in and out of that layout
/// (on the 3D U-Net in bf16, half the forward's time). A batch norm in training mode over a single sample
/// computes the same statistics and keeps the layout, so channels-last batches are normalised sample by sample.
pub fn instance_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let size = x.size();
    let channels_last = size.len() >= 3 && !x.is_contiguous() && x.stride()[1] == 1;
    if !channels_last {
        return Ok(x.f_instance_norm(None::<&Tensor>, None, None, None, true, 0.0, eps, true)?);
    }
    if x.requires_grad() {
        // Autograd does not record `out=` calls: normalise each sample and concatenate.
        let samples = (0..size[0])
            .map(|i| {
                x.f_narrow(0, i, 1)?.f_batch_norm(
                    None::<&Tensor>,
                    None,
                    None,
                    None,
                    true,
                    0.0,
                    eps,
                    true,
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        return Ok(Tensor::f_cat(&samples, 0)?);
    }
    // Inference: each sample's batch norm writes straight into its slice of one channels-last output.
    let out = x.f_empty_like()?;
    let statistics = (x.kind(), x.device());
    let (mean, invstd) = (
        Tensor::f_empty([size[1]], statistics)?,
        Tensor::f_empty([size[1]], statistics)?,
    );
    for i in 0..size[0] {
        // The returned handles alias `out` and the statistics.
        let _ = x.f_narrow(0, i, 1)?.f_native_batch_norm_out(
            &out.f_narrow(0, i, 1)?,
            &mean,
            &invstd,
            None::<&Tensor>,
            None,
            None,
            None,
            true,
            0.0,
            eps,
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Channels-last copy through a permute: [N, C, D, H, W] stored as [N, D, H, W, C].
    fn channels_last(x: &Tensor) -> Tensor {
        x.permute([0, 2, 3, 4, 1])
            .contiguous()
            .permute([0, 4, 1, 2, 3])
    }

    #[test]
    fn channels_last_instance_norm_matches_the_per_sample_formula_and_keeps_the_layout() {
        tch::manual_seed(3);
        let x = Tensor::randn([3, 4, 5, 6, 7], (Kind::Float, Device::Cpu)) * 3.0 + 1.5;
        let cl = channels_last(&x);
        assert_eq!(cl.stride()[1], 1);
        let y = instance_norm(&cl, 1e-5).unwrap();
        // Expected: (x - mean) / sqrt(biased var + eps) over each sample's and channel's spatial voxels.
        let mean = x.mean_dim([2, 3, 4].as_slice(), true, Kind::Float);
        let var = (&x - &mean)
            .square()
            .mean_dim([2, 3, 4].as_slice(), true, Kind::Float);
        let expected = (&x - &mean) / (var + 1e-5).sqrt();
        assert!(y.allclose(&expected, 1e-5, 1e-5, false));
        assert_eq!(y.stride()[1], 1, "the output stays channels-last");
        // The contiguous path is ATen's own and gives the same values.
        let contiguous = instance_norm(&x, 1e-5).unwrap();
        assert!(contiguous.is_contiguous());
        assert!(contiguous.allclose(&expected, 1e-5, 1e-5, false));
        // With autograd (training) the samples are concatenated instead: same values, gradients flow.
        let trained = cl.set_requires_grad(true);
        let y = instance_norm(&trained, 1e-5).unwrap();
        assert!(y.allclose(&expected, 1e-5, 1e-5, false));
        y.sum(Kind::Float).backward();
        // The normalised values sum to zero per channel whatever x is, so their gradient vanishes.
        assert!(trained.grad().abs().max().double_value(&[]) < 1e-3);
    }

    #[test]
    fn bf16_channels_last_instance_norm_stays_bf16_and_close_to_fp32() {
        tch::manual_seed(4);
        let x = Tensor::randn([2, 3, 4, 5, 6], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let expected = instance_norm(&x, 1e-5).unwrap();
        let y = instance_norm(&channels_last(&x).to_kind(Kind::BFloat16), 1e-5).unwrap();
        assert_eq!(y.kind(), Kind::BFloat16);
        assert_eq!(y.stride()[1], 1);
        // bf16 keeps 8 significant bits: normalised values near 3 are within 2^-6.
        let error = (y.to_kind(Kind::Float) - expected)
            .abs()
            .max()
            .double_value(&[]);
        assert!(error < 0.05, "bf16 error {error}");
    }
}
