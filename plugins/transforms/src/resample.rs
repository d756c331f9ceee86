//! ivadomed's `Resample`.
use crate::geometry::{
    check_rank, interpolation_for, record_floats, record_ints, resize, spatial_shape, Interpolation,
};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::{Config, PluginError, Result, Sample, Transform};

/// Resamples every tensor to a target voxel spacing in mm (`[h, w]` or `[d, h, w]`, in tensor axis order).
///
/// The new size along each axis is `round(size * spacing / target)` (halves to even, as scipy's `zoom` that
/// ivadomed uses), at least 1. All interpolation uses `align_corners = false`:
/// - `image*`: ivadomed uses an order-2 spline, which libtorch lacks; the closest libtorch mode is used instead,
///   bicubic in 2D and trilinear in 3D (libtorch has no tricubic).
/// - `label*` / `roi*` float masks: `label_interpolation`, `"nearest"` (default: masks stay binary) or `"linear"`
///   (ivadomed's order 1 for ground truth, which gives soft borders).
/// - integer and boolean tensors: always nearest, so class indices survive.
/// - anything else (`prediction`, soft maps): bi/trilinear (ivadomed undoes with order 1 too).
///
/// The metadata `spacing` becomes the spacing actually reached, `spacing * size / new_size`, which differs from the
/// target when the extent is not a whole number of target voxels. Undo interpolates back to the original shape with
/// the same per-tensor rule and restores the original spacing.
pub struct Resample {
    spacing: Vec<f64>,
    masks: Interpolation,
}

/// Largest resampled edge, to turn a mistaken spacing into an error instead of a huge allocation.
const MAX_EDGE: f64 = 65_536.0;

impl Resample {
    pub fn new(spacing: Vec<f64>) -> Result<Self> {
        check_rank(Self::NAME, "spacing", spacing.len())?;
        if let Some(bad) = spacing.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(PluginError(format!(
                "{}: every `spacing` entry must be a positive number of mm, got {bad}",
                Self::NAME
            )));
        }
        Ok(Self {
            spacing,
            masks: Interpolation::Nearest,
        })
    }

    /// Masks (`label*`, `roi*`) resampled linearly (soft, as ivadomed) instead of nearest.
    pub fn with_linear_masks(mut self) -> Self {
        self.masks = Interpolation::Linear;
        self
    }

    /// Output size for `input` voxels at `spacing` resampled to `target`.
    pub fn output_size(input: &[i64], spacing: &[f64], target: &[f64]) -> Vec<i64> {
        input
            .iter()
            .zip(spacing.iter().zip(target))
            .map(|(&n, (&from, &to))| ((n as f64 * from / to).round_ties_even() as i64).max(1))
            .collect()
    }
}

impl Transform for Resample {
    const NAME: &'static str = "Resample";
    const SUMMARY: &'static str =
        "Resamples to a voxel spacing in mm: images bicubic (2D) / trilinear (3D), predictions linearly, masks nearest or linear (undoable)";

    fn defaults() -> Value {
        json!({"spacing": [1.0, 1.0], "label_interpolation": "nearest"})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let resample = Self::new(config.f64_list("spacing")?)?;
        Ok(
            match config
                .choice("label_interpolation", &["nearest", "linear"])?
                .as_str()
            {
                "linear" => resample.with_linear_masks(),
                _ => resample,
            },
        )
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let rank = self.spacing.len();
        let input = spatial_shape(sample, rank, Self::NAME)?;
        let spacing = sample
            .spacing()
            .map_err(|e| PluginError(format!("{}: {e}", Self::NAME)))?;
        if spacing.len() != rank {
            return Err(PluginError(format!(
                "{}: configured for {rank}D, but the sample's spacing {spacing:?} has {} entries",
                Self::NAME,
                spacing.len()
            )));
        }
        if let Some(bad) = spacing.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(PluginError(format!(
                "{}: the sample's spacing {spacing:?} has a non-positive entry {bad}",
                Self::NAME
            )));
        }
        let output = Self::output_size(&input, &spacing, &self.spacing);
        if let Some(bad) = output.iter().find(|&&n| n as f64 > MAX_EDGE) {
            return Err(PluginError(format!(
                "{}: resampling {input:?} voxels of {spacing:?} mm to {:?} mm would give an edge of {bad} voxels (limit {MAX_EDGE})",
                Self::NAME,
                self.spacing
            )));
        }
        for (name, tensor) in sample.tensors.iter_mut() {
            let mode = interpolation_for(name, tensor.f_kind()?, self.masks);
            *tensor = resize(tensor, &output, mode)?;
        }
        let reached: Vec<f64> = spacing
            .iter()
            .zip(input.iter().zip(&output))
            .map(|(&s, (&from, &to))| s * from as f64 / to as f64)
            .collect();
        sample.set_spacing(&reached);
        Ok(json!({"shape": input, "spacing": spacing}))
    }

    fn undo(&self, sample: &mut Sample, record: &Value) -> Result<()> {
        let rank = self.spacing.len();
        let original = record_ints(record, "shape", rank, Self::NAME)?;
        let spacing = record_floats(record, "spacing", rank, Self::NAME)?;
        if original.iter().any(|&n| n < 1 || n as f64 > MAX_EDGE) {
            return Err(PluginError(format!(
                "{}: undo record has an invalid shape {original:?}",
                Self::NAME
            )));
        }
        if !sample.tensors.is_empty() {
            spatial_shape(sample, rank, Self::NAME)?;
        }
        for (name, tensor) in sample.tensors.iter_mut() {
            let mode = interpolation_for(name, tensor.f_kind()?, self.masks);
            *tensor = resize(tensor, &original, mode)?;
        }
        sample.set_spacing(&spacing);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivado_sdk::tch::{Device, Kind, Tensor};

    fn values(tensor: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&tensor.flatten(0, -1)).unwrap()
    }

    fn max_abs(tensor: &Tensor) -> f64 {
        f64::try_from(tensor.abs().max()).unwrap()
    }

    /// A unit-height isotropic Gaussian of width `sigma` voxels centred on the grid, evaluated analytically at
    /// every voxel centre of `shape` (row-major).
    fn blob(shape: &[i64], sigma: f64) -> Tensor {
        let total: i64 = shape.iter().product();
        let mut data = Vec::with_capacity(total as usize);
        for flat in 0..total {
            let (mut rest, mut r2) = (flat, 0.0);
            for &n in shape.iter().rev() {
                let index = rest % n;
                rest /= n;
                let centre = (n as f64 - 1.0) / 2.0;
                r2 += (index as f64 - centre).powi(2);
            }
            data.push((-r2 / (2.0 * sigma * sigma)).exp() as f32);
        }
        Tensor::from_slice(&data).reshape(shape)
    }

    fn sample(image: Tensor, spacing: &[f64]) -> Sample {
        let mut sample = Sample::new();
        sample.insert("image", image);
        sample.set_spacing(spacing);
        sample
    }

    #[test]
    fn downsampling_a_constant_image_by_two_stays_constant() {
        let mut s = sample(
            Tensor::full([2, 64, 48], 3.0, (Kind::Float, Device::Cpu)),
            &[1.0, 1.0],
        );
        s.insert("label", Tensor::ones([64, 48], (Kind::Uint8, Device::Cpu)));
        let resample = Resample::new(vec![2.0, 2.0]).unwrap();
        let record = resample.apply(&mut s, 3).unwrap();
        assert_eq!(record, json!({"shape": [64, 48], "spacing": [1.0, 1.0]}));
        let image = s.get("image").unwrap();
        assert_eq!(image.size(), vec![2, 32, 24]);
        assert!(max_abs(&(image - 3.0)) < 1e-6);
        assert_eq!(s.get("label").unwrap().size(), vec![32, 24]);
        assert_eq!(s.get("label").unwrap().kind(), Kind::Uint8);
        assert_eq!(s.spacing().unwrap(), vec![2.0, 2.0]);

        resample.undo(&mut s, &record).unwrap();
        assert_eq!(s.get("image").unwrap().size(), vec![2, 64, 48]);
        assert_eq!(s.spacing().unwrap(), vec![1.0, 1.0]);
    }

    // 65 voxels of 1 mm to 2 mm: 32.5 rounds to 32 (ties to even), so the reached spacing is 65 / 32 mm.
    #[test]
    fn reached_spacing_accounts_for_rounding() {
        let mut s = sample(
            Tensor::zeros([1, 65, 10], (Kind::Float, Device::Cpu)),
            &[1.0, 0.8],
        );
        Resample::new(vec![2.0, 1.6])
            .unwrap()
            .apply(&mut s, 0)
            .unwrap();
        assert_eq!(s.get("image").unwrap().size(), vec![1, 32, 5]);
        assert_eq!(s.spacing().unwrap(), vec![65.0 / 32.0, 1.6]);
    }

    // The upsampled blob is compared with the same Gaussian evaluated analytically at the new voxel centres (new
    // voxel q of 0.5 mm sits at old-voxel coordinate (q + 0.5) / 2 - 0.5), then the round trip with the original.
    #[test]
    fn smooth_image_survives_upsample_and_undo() {
        let original = blob(&[1, 64, 64], 6.0);
        let mut s = sample(original.shallow_clone(), &[1.0, 1.0]);
        s.insert("prediction", original.shallow_clone());
        let resample = Resample::new(vec![0.5, 0.5]).unwrap();
        let record = resample.apply(&mut s, 0).unwrap();
        let up = s.get("image").unwrap();
        assert_eq!(up.size(), vec![1, 128, 128]);
        assert_eq!(s.spacing().unwrap(), vec![0.5, 0.5]);
        let up_values = values(up);
        let mut worst: f64 = 0.0;
        for q in 0..128i64 {
            for r in 0..128i64 {
                let (y, x) = ((q as f64 + 0.5) / 2.0 - 0.5, (r as f64 + 0.5) / 2.0 - 0.5);
                let expected = (-((y - 31.5).powi(2) + (x - 31.5).powi(2)) / 72.0).exp();
                worst = worst.max((up_values[(q * 128 + r) as usize] - expected).abs());
            }
        }
        assert!(
            worst < 0.01,
            "upsampled blob off the analytic Gaussian by {worst}"
        );

        resample.undo(&mut s, &record).unwrap();
        assert_eq!(s.spacing().unwrap(), vec![1.0, 1.0]);
        for name in ["image", "prediction"] {
            let back = s.get(name).unwrap();
            assert_eq!(back.size(), vec![1, 64, 64]);
            let error = max_abs(&(back - &original));
            assert!(error < 0.02, "{name}: round-trip error {error}");
        }
    }

    /// A filled disk (1 inside radius `radius` voxels of the centre, else 0).
    fn disk(n: i64, radius: f64) -> Tensor {
        let centre = (n as f64 - 1.0) / 2.0;
        let data: Vec<f32> = (0..n * n)
            .map(|k| {
                let (i, j) = ((k / n) as f64 - centre, (k % n) as f64 - centre);
                if i * i + j * j <= radius * radius {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_slice(&data).reshape([1, n, n])
    }

    #[test]
    fn label_stays_binary_and_keeps_its_area() {
        let label = disk(64, 10.0);
        let mut s = sample(label.shallow_clone() * 5.0, &[1.0, 1.0]);
        s.insert("label", label.shallow_clone());
        s.insert("roi", label.to_kind(Kind::Bool));
        let resample = Resample::new(vec![0.7, 0.7]).unwrap();
        let record = resample.apply(&mut s, 0).unwrap();
        // 64 / 0.7 = 91.4 -> 91 voxels of 64 / 91 mm.
        let out = s.get("label").unwrap();
        assert_eq!(out.size(), vec![1, 91, 91]);
        let reached = 64.0 / 91.0;
        assert_eq!(s.spacing().unwrap(), vec![reached, reached]);
        let out_values = values(out);
        assert!(
            out_values.iter().all(|&v| v == 0.0 || v == 1.0),
            "label is not binary after resampling"
        );
        // Physical area of the disk, pi r^2 mm^2, within 5%.
        let area = out_values.iter().sum::<f64>() * reached * reached;
        let expected = std::f64::consts::PI * 100.0;
        assert!(
            (area / expected - 1.0).abs() < 0.05,
            "area {area} vs {expected}"
        );
        assert_eq!(s.get("roi").unwrap().kind(), Kind::Bool);
        // The image, interpolated linearly, does take intermediate values at the edge.
        assert!(values(s.get("image").unwrap())
            .iter()
            .any(|&v| v > 0.1 && v < 4.9));

        resample.undo(&mut s, &record).unwrap();
        let back = s.get("label").unwrap();
        let back_values = values(back);
        assert!(back_values.iter().all(|&v| v == 0.0 || v == 1.0));
        // Round-trip changes at most the boundary pixels: fewer than the disk's circumference 2 pi r.
        let changed = values(&back.ne_tensor(&label).to_kind(Kind::Float))
            .iter()
            .sum::<f64>();
        assert!(
            changed < 2.0 * std::f64::consts::PI * 10.0,
            "{changed} label pixels changed"
        );
    }

    #[test]
    fn resampling_3d_volumes() {
        // Constant volume, anisotropic 2 x 1 x 1 mm to 1 x 2 x 2 mm: 8 x 16 x 16 -> 16 x 8 x 8, still constant.
        let mut s = sample(
            Tensor::full([1, 8, 16, 16], -1.5, (Kind::Float, Device::Cpu)),
            &[2.0, 1.0, 1.0],
        );
        s.insert(
            "label",
            Tensor::ones([1, 8, 16, 16], (Kind::Float, Device::Cpu)),
        );
        let record = Resample::new(vec![1.0, 2.0, 2.0])
            .unwrap()
            .apply(&mut s, 0)
            .unwrap();
        assert_eq!(s.get("image").unwrap().size(), vec![1, 16, 8, 8]);
        assert!(max_abs(&(s.get("image").unwrap() + 1.5)) < 1e-6);
        assert_eq!(s.spacing().unwrap(), vec![1.0, 2.0, 2.0]);
        assert_eq!(record["shape"], json!([8, 16, 16]));

        // Smooth 3D blob 1 mm -> 0.5 mm -> back.
        let original = blob(&[1, 20, 24, 24], 5.0);
        let mut s = sample(original.shallow_clone(), &[1.0, 1.0, 1.0]);
        let label = original.gt(0.5).to_kind(Kind::Float);
        s.insert("label", label.shallow_clone());
        let resample = Resample::new(vec![0.5, 0.5, 0.5]).unwrap();
        let record = resample.apply(&mut s, 0).unwrap();
        assert_eq!(s.get("image").unwrap().size(), vec![1, 40, 48, 48]);
        assert!(values(s.get("label").unwrap())
            .iter()
            .all(|&v| v == 0.0 || v == 1.0));
        resample.undo(&mut s, &record).unwrap();
        let error = max_abs(&(s.get("image").unwrap() - &original));
        assert!(error < 0.02, "3D round-trip error {error}");
        // Exact 2x up then down with pixel-centre nearest gives the label back unchanged.
        assert!(s.get("label").unwrap().equal(&label));
        assert_eq!(s.spacing().unwrap(), vec![1.0, 1.0, 1.0]);
    }

    // An impulse upsampled 2x: bicubic (Keys, a = -0.75) rings below zero next to the peak, linear never does.
    // So a 2D `image` shows negative lobes, the `prediction` (linear) none, a 3D `image` (trilinear) none; with
    // `label_interpolation: "linear"` the label takes soft values, with the default it stays binary.
    #[test]
    fn images_bicubic_in_2d_trilinear_in_3d_and_masks_as_configured() {
        let mut impulse = vec![0.0f32; 64];
        impulse[3 * 8 + 3] = 1.0;
        let impulse = Tensor::from_slice(&impulse).reshape([1, 8, 8]);
        let build = |config: Value| {
            let mut config = Config::new("Resample", Resample::defaults(), config).unwrap();
            let resample = Resample::build(&mut config).unwrap();
            config.finish().unwrap();
            resample
        };
        let min = |t: &Tensor| f64::try_from(t.min()).unwrap();
        for (config, soft_label) in [
            (
                json!({"spacing": [0.5, 0.5], "label_interpolation": "linear"}),
                true,
            ),
            (json!({"spacing": [0.5, 0.5]}), false),
        ] {
            let mut s = sample(impulse.shallow_clone(), &[1.0, 1.0]);
            s.insert("prediction", impulse.shallow_clone());
            s.insert("label", impulse.shallow_clone());
            build(config).apply(&mut s, 0).unwrap();
            assert!(min(s.get("image").unwrap()) < -0.01, "bicubic rings");
            assert!(min(s.get("prediction").unwrap()) >= 0.0, "linear does not");
            let label = values(s.get("label").unwrap());
            let soft = label.iter().any(|&v| v > 0.0 && v < 1.0);
            assert_eq!(soft, soft_label);
        }
        let volume = impulse.reshape([1, 1, 8, 8]).repeat([1, 4, 1, 1]);
        let mut s = sample(volume, &[1.0, 1.0, 1.0]);
        Resample::new(vec![0.5, 0.5, 0.5])
            .unwrap()
            .apply(&mut s, 0)
            .unwrap();
        assert!(min(s.get("image").unwrap()) >= 0.0, "trilinear in 3D");

        let mut config = Config::new(
            "Resample",
            Resample::defaults(),
            json!({"label_interpolation": "cubic"}),
        )
        .unwrap();
        assert!(Resample::build(&mut config).is_err());
    }

    #[test]
    fn errors_name_the_problem() {
        for bad in [
            json!({"spacing": [1.0]}),
            json!({"spacing": [1.0, 0.0]}),
            json!({"spacing": [1.0, -2.0, 1.0]}),
        ] {
            let mut config = Config::new("Resample", Resample::defaults(), bad.clone()).unwrap();
            assert!(Resample::build(&mut config).is_err(), "{bad}");
        }
        let mut config = Config::new(
            "Resample",
            Resample::defaults(),
            json!({"spacing": [0.5, 0.5, 2]}),
        )
        .unwrap();
        let resample = Resample::build(&mut config).unwrap();
        config.finish().unwrap();

        let mut s = Sample::new();
        s.insert(
            "image",
            Tensor::zeros([1, 4, 4, 4], (Kind::Float, Device::Cpu)),
        );
        assert!(resample.apply(&mut s, 0).unwrap_err().0.contains("spacing"));
        s.set_spacing(&[1.0, 1.0]);
        let error = resample.apply(&mut s, 0).unwrap_err().0;
        assert!(error.contains("has 2 entries"), "{error}");
        s.set_spacing(&[1.0, 1.0, 1.0]);
        resample.apply(&mut s, 0).unwrap();
        s.set_spacing(&[1.0, 1.0, 1.0]);
        let error = Resample::new(vec![1e-6, 1.0, 1.0])
            .unwrap()
            .apply(&mut s, 0)
            .unwrap_err()
            .0;
        assert!(error.contains("limit"), "{error}");
    }
}
