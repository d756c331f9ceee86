//! ivadomed's `NormalizeInstance`.
use crate::cpu::{f32_data, new_f32, squared_deviations_f64, sum_f64};
use crate::geometry::{is_float, record_floats};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{Device, Kind, Tensor};
use ivado_sdk::{
    apply_as_batch, check_seeds, Batch, Config, PluginError, Result, Sample, Transform,
};

/// Standardises `image` with its own statistics: `(x - mean) / std`, per channel over all its voxels.
///
/// ivadomed applies `NormalizeInstance` to each contrast (channel) separately and uses the population standard
/// deviation (numpy's default, `ddof = 0`); so does this. A constant channel, whose std is 0 (or negligible next
/// to its mean in float32), is only mean-subtracted instead of producing NaNs. Other tensors are left alone.
/// The record holds the per-channel means and divisors, so `undo` restores the intensities.
pub struct NormalizeInstance;

impl NormalizeInstance {
    /// Per-row (mean, divisor) of a `[R, ...]` tensor, computed in float64.
    fn statistics(rows: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
        let count = rows.size().first().copied().unwrap_or(1);
        let flat = rows.f_to_kind(Kind::Double)?.f_reshape([count, -1])?;
        // Population variance (correction 0) and mean in one pass.
        let (variance, mean) = flat.f_var_mean_correction(Some([1i64].as_slice()), 0, false)?;
        let means = Vec::<f64>::try_from(&mean.f_to_device(Device::Cpu)?)?;
        let variances = Vec::<f64>::try_from(&variance.f_to_device(Device::Cpu)?)?;
        let divisors = means
            .iter()
            .zip(&variances)
            .map(|(&m, &v)| Self::divisor(m, v))
            .collect();
        Ok((means, divisors))
    }

    /// What a channel of mean `mean` and variance `variance` is divided by: its std, or 1 for a constant channel.
    fn divisor(mean: f64, variance: f64) -> f64 {
        let std = variance.sqrt();
        if std.is_finite() && std > 1e-7 * mean.abs().max(1.0) {
            std
        } else {
            1.0
        }
    }

    /// The float32 CPU path of [`Transform::apply_batch`]: per row of `values` (`rows` equal rows), the mean and
    /// population variance in float64 (two passes, as exact as libtorch's float64 reduction), then
    /// `(x - mean) / divisor` in float32 as the libtorch path computes it, in one loop writing a new tensor.
    fn standardise_f32(
        values: &[f32],
        rows: usize,
        shape: &[i64],
    ) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
        let length = values.len() / rows;
        let mut means = Vec::with_capacity(rows);
        let mut divisors = Vec::with_capacity(rows);
        for row in values.chunks_exact(length) {
            let mean = sum_f64(row) / length as f64;
            let variance = squared_deviations_f64(row, mean) / length as f64;
            means.push(mean);
            divisors.push(Self::divisor(mean, variance));
        }
        let out = new_f32(shape, |out| {
            for ((target, row), (&mean, &divisor)) in out
                .chunks_exact_mut(length)
                .zip(values.chunks_exact(length))
                .zip(means.iter().zip(&divisors))
            {
                let (mean, divisor) = (mean as f32, divisor as f32);
                for (t, &v) in target.iter_mut().zip(row) {
                    *t = (v - mean) / divisor;
                }
            }
            Ok(())
        })?;
        Ok((out, means, divisors))
    }

    /// `[C, 1, 1, ...]` tensor of per-channel values, ready to broadcast against a `[C, ...]` tensor of `dims` axes.
    fn per_channel(values: &[f64], dims: usize, device: Device) -> Result<Tensor> {
        let mut shape = vec![values.len() as i64];
        shape.resize(dims.max(1), 1);
        Ok(Tensor::f_from_slice(values)?
            .f_reshape(shape.as_slice())?
            .f_to_device(device)?)
    }
}

impl Transform for NormalizeInstance {
    const NAME: &'static str = "NormalizeInstance";
    const SUMMARY: &'static str =
        "Standardises `image` per channel with its own mean and std (undoable)";

    fn defaults() -> Value {
        json!({})
    }

    fn build(_config: &mut Config) -> Result<Self> {
        Ok(Self)
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    /// Every channel of every sample gets its own statistics, all computed in one reduction.
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        let Some(image) = batch.tensors.get("image") else {
            return Ok(vec![Value::Null; seeds.len()]);
        };
        let shape = image.size();
        if shape.len() < 2 || image.numel() == 0 {
            return Err(PluginError(format!(
                "{}: `image` is empty (shape {:?})",
                Self::NAME,
                shape.get(1..).unwrap_or_default()
            )));
        }
        let (samples, channels) = (shape[0], shape[1]);
        let records = |means: &[f64], divisors: &[f64]| -> Vec<Value> {
            let channels = channels as usize;
            means
                .chunks(channels)
                .zip(divisors.chunks(channels))
                .map(|(mean, std)| json!({"mean": mean, "std": std}))
                .collect()
        };
        if let Some(values) = f32_data(image) {
            let (normalized, means, divisors) =
                Self::standardise_f32(values, (samples * channels) as usize, &shape)?;
            batch.insert("image", normalized);
            return Ok(records(&means, &divisors));
        }
        let (means, divisors) = Self::statistics(&image.f_reshape([samples * channels, -1])?)?;
        let kind = image.f_kind()?;
        let out_kind = if is_float(kind) { kind } else { Kind::Float };
        // float32 images are standardised in float32 (statistics from float64); others in float64.
        let work = if kind == Kind::Float {
            Kind::Float
        } else {
            Kind::Double
        };
        let device = image.device();
        let mut per_channel = vec![samples, channels];
        per_channel.resize(shape.len(), 1);
        let as_tensor = |values: &[f64]| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(values)?
                .f_reshape(per_channel.as_slice())?
                .f_to_kind(work)?
                .f_to_device(device)?)
        };
        let normalized = image
            .f_to_kind(work)?
            .f_sub(&as_tensor(&means)?)?
            .f_div(&as_tensor(&divisors)?)?
            .f_to_kind(out_kind)?;
        batch.insert("image", normalized);
        Ok(records(&means, &divisors))
    }

    fn undo(&self, sample: &mut Sample, record: &Value) -> Result<()> {
        if record.is_null() {
            return Ok(());
        }
        let Some(image) = sample.tensors.get("image") else {
            return Ok(());
        };
        let channels = image.size().first().copied().unwrap_or(0) as usize;
        let means = record_floats(record, "mean", channels, Self::NAME)?;
        let divisors = record_floats(record, "std", channels, Self::NAME)?;
        let (dims, device, kind) = (image.dim(), image.device(), image.f_kind()?);
        let restored = image
            .f_to_kind(Kind::Double)?
            .f_mul(&Self::per_channel(&divisors, dims, device)?)?
            .f_add(&Self::per_channel(&means, dims, device)?)?
            .f_to_kind(if is_float(kind) { kind } else { Kind::Float })?;
        sample.insert("image", restored);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(tensor: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&tensor.flatten(0, -1)).unwrap()
    }

    /// Mean and population std by plain f64 arithmetic, independent of libtorch.
    fn mean_std(values: &[f64]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn normalizes_each_channel_to_mean_0_std_1_and_undo_restores() {
        // Channel 0: 3 + 0.01 k^2 (skewed), channel 1: 100 - 7 k: different statistics per channel.
        let raw: Vec<f32> = (0..2 * 5 * 6)
            .map(|k| {
                if k < 30 {
                    3.0 + 0.01 * (k * k) as f32
                } else {
                    100.0 - 7.0 * k as f32
                }
            })
            .collect();
        let image = Tensor::from_slice(&raw).reshape([2, 5, 6]);
        let label = Tensor::ones([5, 6], (Kind::Float, Device::Cpu));
        let mut sample = Sample::new();
        sample.insert("image", image.shallow_clone());
        sample.insert("label", label.shallow_clone());
        let record = NormalizeInstance.apply(&mut sample, 1).unwrap();

        let raw64: Vec<f64> = raw.iter().map(|&v| v as f64).collect();
        let (m0, s0) = mean_std(&raw64[..30]);
        let (m1, s1) = mean_std(&raw64[30..]);
        let got = record["mean"].as_array().unwrap();
        assert!(
            (got[0].as_f64().unwrap() - m0).abs() < 1e-9
                && (got[1].as_f64().unwrap() - m1).abs() < 1e-9
        );
        let got = record["std"].as_array().unwrap();
        assert!(
            (got[0].as_f64().unwrap() - s0).abs() < 1e-9
                && (got[1].as_f64().unwrap() - s1).abs() < 1e-9
        );

        let out = values(sample.get("image").unwrap());
        for channel in out.chunks(30) {
            let (mean, std) = mean_std(channel);
            assert!(mean.abs() < 1e-6, "mean {mean}");
            assert!((std - 1.0).abs() < 1e-5, "std {std}");
        }
        assert!(
            sample.get("label").unwrap().equal(&label),
            "other tensors are untouched"
        );

        NormalizeInstance.undo(&mut sample, &record).unwrap();
        let back = sample.get("image").unwrap();
        assert_eq!(back.kind(), Kind::Float);
        let error = f64::try_from((back - &image).abs().max()).unwrap();
        assert!(error < 1e-5, "max undo error {error}");
    }

    // The fused float32 CPU path (contiguous image) and the libtorch path (the same image as a transposed,
    // non-contiguous view) give the same statistics and values.
    #[test]
    fn fused_cpu_path_equals_libtorch_path() {
        let contiguous = ((Tensor::arange(2 * 3 * 7 * 5, (Kind::Float, Device::Cpu)) * 0.37).sin()
            * 40.0
            + 900.0)
            .reshape([2, 3, 7, 5]);
        let transposed = contiguous.transpose(2, 3).contiguous().transpose(2, 3);
        assert!(!transposed.is_contiguous() && transposed.equal(&contiguous));
        let run = |image: &Tensor| {
            let mut batch = Batch {
                tensors: [("image".to_string(), image.shallow_clone())].into(),
                metas: vec![Default::default(); 2],
            };
            let records = NormalizeInstance.apply_batch(&mut batch, &[0, 1]).unwrap();
            (records, batch.get("image").unwrap().shallow_clone())
        };
        let (fused_records, fused) = run(&contiguous);
        let (torch_records, torch) = run(&transposed);
        for (a, b) in fused_records.iter().zip(&torch_records) {
            for key in ["mean", "std"] {
                for (x, y) in a[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(b[key].as_array().unwrap())
                {
                    let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                    assert!((x - y).abs() <= 1e-12 * y.abs(), "{key}: {x} vs {y}");
                }
            }
        }
        let difference = f64::try_from((fused - torch).abs().max()).unwrap();
        assert!(difference < 1e-6, "{difference}");
    }

    #[test]
    fn constant_3d_image_is_only_mean_subtracted_and_restored() {
        let image = Tensor::full([1, 3, 4, 5], 2.5, (Kind::Float, Device::Cpu));
        let mut sample = Sample::new();
        sample.insert("image", image.shallow_clone());
        let record = NormalizeInstance.apply(&mut sample, 0).unwrap();
        assert_eq!(record, json!({"mean": [2.5], "std": [1.0]}));
        assert!(values(sample.get("image").unwrap())
            .iter()
            .all(|&v| v == 0.0));
        NormalizeInstance.undo(&mut sample, &record).unwrap();
        assert!(sample.get("image").unwrap().equal(&image));
    }

    #[test]
    fn sample_without_image_is_a_no_op_and_config_takes_no_keys() {
        let mut sample = Sample::new();
        sample.insert(
            "prediction",
            Tensor::ones([1, 4, 4], (Kind::Float, Device::Cpu)),
        );
        let record = NormalizeInstance.apply(&mut sample, 0).unwrap();
        assert!(record.is_null());
        NormalizeInstance.undo(&mut sample, &record).unwrap();

        let mut config = Config::new(
            "NormalizeInstance",
            NormalizeInstance::defaults(),
            json!({"mean": 0}),
        )
        .unwrap();
        NormalizeInstance::build(&mut config).unwrap();
        assert!(config.finish().unwrap_err().0.contains("`mean`"));
    }
}
