//! ivadomed's `RandomReverse`.
use crate::geometry::{batch_spatial_shape, spatial_shape};
use crate::random::seeded;
use crate::warp::batch_rank;
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::Tensor;
use ivado_sdk::{
    apply_as_batch, check_seeds, Batch, Config, PluginError, Result, Sample, Transform,
};
use rand::Rng;

/// Flips each spatial axis with probability 0.5, the same axes for every tensor of the sample. The record lists
/// which axes were flipped (`{"flipped": [true, false, ...]}`, in axis order); `undo` flips them back. Takes no
/// config keys, like ivadomed's.
pub struct RandomReverse;

fn flip_all(sample: &mut Sample, flipped: &[bool]) -> Result<()> {
    let rank = flipped.len();
    for tensor in sample.tensors.values_mut() {
        let lead = tensor.dim() - rank;
        let dims: Vec<i64> = flipped
            .iter()
            .enumerate()
            .filter(|(_, &flip)| flip)
            .map(|(axis, _)| (lead + axis) as i64)
            .collect();
        if !dims.is_empty() {
            *tensor = tensor.f_flip(dims.as_slice())?;
        }
    }
    Ok(())
}

impl Transform for RandomReverse {
    const NAME: &'static str = "RandomReverse";
    const SUMMARY: &'static str =
        "Flips each spatial axis with probability 0.5, all tensors alike (undoable)";

    fn defaults() -> Value {
        json!({})
    }

    fn build(_config: &mut Config) -> Result<Self> {
        Ok(Self)
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    /// Samples drawing the same flips are flipped together (at most 8 groups, whatever the batch size).
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let rank = batch_rank(batch, Self::NAME)?;
        batch_spatial_shape(batch, rank, Self::NAME)?;
        let draws: Vec<Vec<bool>> = seeds
            .iter()
            .map(|&seed| {
                let mut rng = seeded(seed);
                (0..rank).map(|_| rng.random::<bool>()).collect()
            })
            .collect();
        let mut patterns: Vec<&Vec<bool>> = draws.iter().filter(|d| d.contains(&true)).collect();
        patterns.sort();
        patterns.dedup();
        for tensor in batch.tensors.values_mut() {
            let lead = tensor.dim() - rank;
            for &pattern in &patterns {
                let dims: Vec<i64> = pattern
                    .iter()
                    .enumerate()
                    .filter(|(_, &flip)| flip)
                    .map(|(axis, _)| (lead + axis) as i64)
                    .collect();
                let rows: Vec<i64> = (0..draws.len() as i64)
                    .filter(|&i| &draws[i as usize] == pattern)
                    .collect();
                *tensor = if rows.len() == draws.len() {
                    tensor.f_flip(dims.as_slice())?
                } else {
                    let index = Tensor::f_from_slice(&rows)?.f_to_device(tensor.device())?;
                    let flipped = tensor.f_index_select(0, &index)?.f_flip(dims.as_slice())?;
                    tensor.f_index_copy(0, &index, &flipped)?
                };
            }
        }
        Ok(draws
            .into_iter()
            .map(|flipped| json!({"flipped": flipped}))
            .collect())
    }

    fn undo(&self, sample: &mut Sample, record: &Value) -> Result<()> {
        let flipped: Option<Vec<bool>> = record
            .get("flipped")
            .and_then(Value::as_array)
            .and_then(|items| items.iter().map(Value::as_bool).collect());
        let flipped = match flipped {
            Some(flipped) if flipped.len() == 2 || flipped.len() == 3 => flipped,
            _ => {
                return Err(PluginError(format!(
                    "{}: undo record must be {{\"flipped\": [2 or 3 booleans]}}, got {record}",
                    Self::NAME
                )))
            }
        };
        if !sample.tensors.is_empty() {
            spatial_shape(sample, flipped.len(), Self::NAME)?;
        }
        flip_all(sample, &flipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivado_sdk::tch::{Device, Kind, Tensor};
    use std::collections::BTreeSet;

    #[test]
    fn flips_recorded_axes_of_every_tensor_and_undo_restores() {
        let image = Tensor::arange(2 * 3 * 4, (Kind::Float, Device::Cpu)).reshape([2, 3, 4]);
        let label = Tensor::arange(3 * 4, (Kind::Int64, Device::Cpu)).reshape([3, 4]);
        let mut patterns = BTreeSet::new();
        for seed in 0..16 {
            let mut s = Sample::new();
            s.insert("image", image.shallow_clone());
            s.insert("label", label.shallow_clone());
            let record = RandomReverse.apply(&mut s, seed).unwrap();
            let flipped: Vec<bool> = record["flipped"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_bool().unwrap())
                .collect();
            patterns.insert(flipped.clone());
            // Expected by index arithmetic: out[c, i, j] = in[c, i', j'] with i' = 2 - i if axis 0 flipped, etc.
            let out = Vec::<f64>::try_from(s.get("image").unwrap().flatten(0, -1)).unwrap();
            let lab = Vec::<i64>::try_from(s.get("label").unwrap().flatten(0, -1)).unwrap();
            for c in 0..2i64 {
                for i in 0..3i64 {
                    for j in 0..4i64 {
                        let si = if flipped[0] { 2 - i } else { i };
                        let sj = if flipped[1] { 3 - j } else { j };
                        assert_eq!(
                            out[((c * 3 + i) * 4 + j) as usize],
                            ((c * 3 + si) * 4 + sj) as f64
                        );
                        if c == 0 {
                            assert_eq!(lab[(i * 4 + j) as usize], si * 4 + sj);
                        }
                    }
                }
            }
            // Same seed, same flips.
            let mut again = Sample::new();
            again.insert("image", image.shallow_clone());
            assert_eq!(RandomReverse.apply(&mut again, seed).unwrap(), record);
            RandomReverse.undo(&mut s, &record).unwrap();
            assert!(s.get("image").unwrap().equal(&image));
            assert!(s.get("label").unwrap().equal(&label));
        }
        // Different seeds draw different flips: all four 2D patterns occur over 16 seeds.
        assert_eq!(patterns.len(), 4, "{patterns:?}");
    }

    #[test]
    fn three_d_and_bad_records() {
        let volume = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([1, 2, 3, 4]);
        let mut s = Sample::new();
        s.insert("image", volume.shallow_clone());
        let record = RandomReverse.apply(&mut s, 9).unwrap();
        assert_eq!(record["flipped"].as_array().unwrap().len(), 3);
        RandomReverse.undo(&mut s, &record).unwrap();
        assert!(s.get("image").unwrap().equal(&volume));
        let error = RandomReverse
            .undo(&mut s, &json!({"flipped": [true]}))
            .unwrap_err()
            .0;
        assert!(error.contains("flipped"), "{error}");
    }
}
