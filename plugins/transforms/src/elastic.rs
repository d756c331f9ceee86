//! ivadomed's `ElasticTransform`.
use crate::filters::{gaussian_filter_rows, Border};
use crate::random::{chance, probability_key, range_key, seeded, uniform, uniform_values};
use crate::warp::{batch_frame, convert_grid, displacement_grids, warp_batch, Outside};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{Kind, Tensor};
use ivado_sdk::{
    apply_as_batch, check_seeds, Batch, Config, PluginError, Result, Sample, Transform,
};
use std::collections::BTreeMap;

/// A random elastic deformation (Simard et al. 2003), applied with probability `p`.
///
/// As in ivadomed, `alpha` and `sigma` are drawn uniformly from `alpha_range` and `sigma_range`; each axis gets a
/// displacement field of uniform noise in `[-1, 1)`, Gaussian-smoothed with `sigma` (zero border) and multiplied by
/// `alpha`; every voxel then reads its input at its own position plus the displacement, linearly, mirroring past the
/// edges (scipy's `reflect`).
///
/// Differences from ivadomed, on purpose:
/// - ONE displacement field per sample for every tensor. ivadomed draws a new field for the image and for the label,
///   so they no longer match; here image, label, roi and prediction stay aligned.
/// - `sigma` and `alpha` are in millimetres: the smoothing is `sigma / spacing[k]` voxels along axis k and a
///   displacement of `d` mm is `d / spacing[k]` voxels, so the deformation is isotropic in physical space. At 1 mm
///   isotropic spacing this is ivadomed's voxel-unit behaviour in 3D.
/// - 2D samples are deformed in 2D. ivadomed treats them as `[H, W, 1]` volumes and its zero-border smoothing
///   along the singleton axis scales the 2D displacements by the kernel's centre weight (about `0.4 / sigma`,
///   0.1 for sigma = 4); that shrink is not reproduced, so for the same `alpha` 2D deformations here are that much
///   stronger than ivadomed's.
///
/// Binary `label*`/`roi*` masks are interpolated linearly and thresholded at 0.5 (they stay binary), soft masks and
/// images linearly, integer tensors nearest. A deformation has no exact inverse, so `undo` always fails with an
/// error saying so, and the host refuses the transform in a test-time pipeline instead of silently skipping it.
pub struct ElasticTransform {
    alpha_range: (f64, f64),
    sigma_range: (f64, f64),
    p: f64,
}

impl ElasticTransform {
    pub fn new(alpha_range: (f64, f64), sigma_range: (f64, f64), p: f64) -> Result<Self> {
        if alpha_range.0 < 0.0 || sigma_range.0 < 0.0 {
            return Err(PluginError(format!(
                "{}: `alpha_range` and `sigma_range` must not be negative, got {alpha_range:?} and {sigma_range:?}",
                Self::NAME
            )));
        }
        Ok(Self {
            alpha_range,
            sigma_range,
            p,
        })
    }
}

impl Transform for ElasticTransform {
    const NAME: &'static str = "ElasticTransform";
    const SUMMARY: &'static str =
        "Random elastic deformation (mm), one field for all tensors; cannot be undone";

    fn defaults() -> Value {
        json!({"alpha_range": null, "sigma_range": null, "p": 0.1})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let alpha_range = range_key(config, Self::NAME, "alpha_range")?;
        let sigma_range = range_key(config, Self::NAME, "sigma_range")?;
        let p = probability_key(config, Self::NAME, "p")?;
        Self::new(alpha_range, sigma_range, p)
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    /// Each sample draws from its own seed whether it is deformed, its `alpha`, `sigma` and noise; the fields of
    /// the deformed samples are smoothed together (one batched product per axis, each with its own kernel) and
    /// those samples warped in one `grid_sample` per tensor. The others are left untouched.
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let frame = batch_frame(batch, Self::NAME)?;
        let rank = frame.rank;
        let voxels: i64 = frame.shape.iter().product();
        let mut records = Vec::with_capacity(seeds.len());
        let mut deformed: Vec<i64> = Vec::new();
        let mut noise: Vec<f32> = Vec::new();
        let mut sigmas: Vec<Vec<f64>> = Vec::new();
        let mut scales: Vec<f64> = Vec::new();
        for (index, (&seed, spacing)) in seeds.iter().zip(&frame.spacings).enumerate() {
            let mut rng = seeded(seed);
            if !chance(&mut rng, self.p) {
                records.push(json!({"applied": false}));
                continue;
            }
            let alpha = uniform(&mut rng, self.alpha_range.0, self.alpha_range.1);
            let sigma = uniform(&mut rng, self.sigma_range.0, self.sigma_range.1);
            // One field of uniform noise in [-1, 1) per axis, drawn after alpha and sigma.
            noise.extend(uniform_values(&mut rng, rank as i64 * voxels));
            // Smoothing sigma in voxels per axis, the same for every displacement component of the sample.
            let per_axis: Vec<f64> = spacing.iter().map(|s| sigma / s).collect();
            sigmas.extend(std::iter::repeat_n(per_axis, rank));
            // alpha * smoothed noise is a displacement in mm; divide by the spacing of its axis for voxels.
            scales.extend(spacing.iter().map(|s| alpha / s));
            deformed.push(index as i64);
            records.push(json!({"applied": true, "alpha": alpha, "sigma": sigma}));
        }
        if deformed.is_empty() {
            return Ok(records);
        }
        let count = deformed.len() as i64;
        let mut rows_shape = vec![count * rank as i64];
        rows_shape.extend_from_slice(&frame.shape);
        // float32 throughout: the displacements need far less than float32's precision.
        let fields = Tensor::f_from_slice(&noise)?
            .f_reshape(rows_shape.as_slice())?
            .f_to_device(frame.device)?;
        let smoothed = gaussian_filter_rows(&fields, &sigmas, Border::Zero)?;
        let mut scale_shape = vec![count * rank as i64];
        scale_shape.resize(rank + 1, 1);
        let scale = Tensor::f_from_slice(&scales)?
            .f_to_kind(Kind::Float)?
            .f_reshape(scale_shape.as_slice())?
            .f_to_device(frame.device)?;
        let mut field_shape = vec![count, rank as i64];
        field_shape.extend_from_slice(&frame.shape);
        let displacement = smoothed.f_mul(&scale)?.f_reshape(field_shape.as_slice())?;
        let grid = displacement_grids(&displacement)?;
        let grid_in =
            |work, device| convert_grid(&grid, &frame.shape, Outside::Reflect, work, device);
        if deformed.len() == batch.len() {
            warp_batch(&mut batch.tensors, rank, &grid_in)?;
            return Ok(records);
        }
        let rows = Tensor::f_from_slice(&deformed)?.f_to_device(frame.device)?;
        let mut subset: BTreeMap<String, Tensor> = BTreeMap::new();
        for (name, tensor) in &batch.tensors {
            subset.insert(name.clone(), tensor.f_index_select(0, &rows)?);
        }
        warp_batch(&mut subset, rank, &grid_in)?;
        for (name, warped) in subset {
            let tensor = batch.get(&name)?;
            let merged = tensor.f_index_copy(0, &rows, &warped)?;
            batch.insert(name, merged);
        }
        Ok(records)
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Err(PluginError(format!(
            "{} cannot be undone: a random elastic deformation has no exact inverse; leave it out of pipelines \
             whose predictions are brought back to the input space",
            Self::NAME
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivado_sdk::tch::Device;

    fn elastic(config: Value) -> ElasticTransform {
        let mut config =
            Config::new("ElasticTransform", ElasticTransform::defaults(), config).unwrap();
        let transform = ElasticTransform::build(&mut config).unwrap();
        config.finish().unwrap();
        transform
    }

    fn values(tensor: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&tensor.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    /// A binary phantom: a ring plus a bar, so the deformation has edges to move, on `shape` (2D or 3D).
    fn phantom(shape: &[i64]) -> Tensor {
        let total: i64 = shape.iter().product();
        let data: Vec<f32> = (0..total)
            .map(|flat| {
                let (mut rest, mut r2) = (flat, 0.0);
                let mut last = 0;
                for (axis, &n) in shape.iter().enumerate().rev() {
                    let index = rest % n;
                    rest /= n;
                    if axis == shape.len() - 1 {
                        last = index;
                    }
                    r2 += (index as f64 - (n as f64 - 1.0) / 2.0).powi(2);
                }
                let ring = (16.0..=64.0).contains(&r2);
                let bar = (2..4).contains(&last);
                f32::from(u8::from(ring || bar))
            })
            .collect();
        let mut full = vec![1];
        full.extend_from_slice(shape);
        Tensor::from_slice(&data).reshape(full.as_slice())
    }

    fn dice(a: &[f64], b: &[f64]) -> f64 {
        let overlap: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        2.0 * overlap / (a.iter().sum::<f64>() + b.iter().sum::<f64>())
    }

    // The label and the image are the same phantom; with one shared field the warped label equals the warped
    // image thresholded at 0.5 (Dice 1), while ivadomed's two independent fields would not match.
    #[test]
    fn one_field_keeps_image_and_label_aligned_in_2d_and_3d() {
        let transform =
            elastic(json!({"alpha_range": [120, 150], "sigma_range": [3, 4], "p": 1.0}));
        for (shape, spacing) in [
            (vec![40i64, 36], vec![1.0, 1.0]),
            (vec![12i64, 20, 20], vec![2.0, 1.0, 1.0]),
        ] {
            let image = phantom(&shape);
            let mut s = Sample::new();
            s.insert("image", image.shallow_clone());
            s.insert("label", image.shallow_clone());
            s.set_spacing(&spacing);
            let record = transform.apply(&mut s, 21).unwrap();
            assert_eq!(record["applied"], json!(true));
            let warped_image = values(&s.get("image").unwrap().ge(0.5).to_kind(Kind::Double));
            let warped_label = values(s.get("label").unwrap());
            assert!(warped_label.iter().all(|&v| v == 0.0 || v == 1.0));
            let moved = warped_label
                .iter()
                .zip(values(&image))
                .filter(|(a, b)| a != &b)
                .count();
            assert!(
                moved > 20,
                "{shape:?}: the deformation moved only {moved} voxels"
            );
            let score = dice(&warped_label, &warped_image);
            assert!(score >= 0.99, "{shape:?}: Dice {score}");
        }
    }

    #[test]
    fn undo_is_refused_with_a_clear_error() {
        let transform = elastic(json!({"alpha_range": [1, 2], "sigma_range": [3, 4]}));
        let mut s = Sample::new();
        s.insert(
            "prediction",
            Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu)),
        );
        let error = transform
            .undo(&mut s, &json!({"applied": true}))
            .unwrap_err()
            .0;
        assert!(error.contains("cannot be undone"), "{error}");
    }

    #[test]
    fn seeds_and_probability() {
        let transform = elastic(json!({"alpha_range": [50, 80], "sigma_range": [2, 3], "p": 1.0}));
        let image = phantom(&[24, 24]);
        let run = |transform: &ElasticTransform, seed: u64| {
            let mut s = Sample::new();
            s.insert("image", image.shallow_clone());
            s.set_spacing(&[1.0, 1.0]);
            let record = transform.apply(&mut s, seed).unwrap();
            (record, values(s.get("image").unwrap()))
        };
        assert_eq!(run(&transform, 3), run(&transform, 3));
        assert_ne!(run(&transform, 3).1, run(&transform, 4).1);
        // p = 0: never applied, the sample is untouched.
        let never = elastic(json!({"alpha_range": [50, 80], "sigma_range": [2, 3], "p": 0.0}));
        let (record, out) = run(&never, 3);
        assert_eq!(record, json!({"applied": false}));
        assert_eq!(out, values(&image));
        // Missing required ranges are named.
        let mut config =
            Config::new("ElasticTransform", ElasticTransform::defaults(), json!({})).unwrap();
        let error = ElasticTransform::build(&mut config).err().unwrap().0;
        assert!(error.contains("alpha_range"), "{error}");
    }
}
