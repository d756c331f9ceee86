//! ivadomed's `DilateGT`: soft lesion borders on the ground truth.
use crate::geometry::{is_float, spatial_shape};
use crate::warp::sample_rank;
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{Device, Kind, Tensor};
use ivado_sdk::{Config, PluginError, Result, Sample, Transform};

/// Dilates every lesion of each `label*` tensor into a soft border, as ivadomed's `DilateGT`.
///
/// Per channel, the label is binarised at 0.5 and split into lesions (face-connected components, scipy's default
/// `label` structure). A lesion of `area` voxels is dilated `n = round(dilation_factor * sqrt(area))` times (Python's
/// round: halves to even) with the face-connected cross, and the voxels added by the j-th dilation get the value
/// `(n + 1 - j) / (n + 1)`: the lesion keeps 1 and the border fades linearly, so a voxel at city-block distance
/// `d <= n` from the lesion gets `1 - d / (n + 1)`. The lesions' maps are summed and clipped to [0, 1]. A channel
/// whose values sum to 0 is left as it is, and a `dilation_factor <= 0` leaves the label unchanged.
///
/// ivadomed's class is "randomly dilate", but its random-holes step is disabled in its code, so the transform is
/// deterministic (the seed is ignored). It changes ground truth only: the record is `null` and undo is a no-op.
/// Components, areas and bounding boxes are found with tensor ops on the label's device; each lesion is then
/// dilated inside its bounding box grown by `n`.
pub struct DilateGT {
    dilation_factor: f64,
}

/// `tensor` moved by one voxel along `dim` (`forward`: towards higher indices), zero/false filled.
fn shifted(tensor: &Tensor, dim: i64, forward: bool) -> Result<Tensor> {
    let len = tensor.size()[dim as usize];
    let out = tensor.f_zeros_like()?;
    if len > 1 {
        let (to, from) = if forward { (1, 0) } else { (0, 1) };
        out.f_narrow(dim, to, len - 1)?
            .f_copy_(&tensor.f_narrow(dim, from, len - 1)?)?;
    }
    Ok(out)
}

/// One binary dilation of a boolean tensor with the face-connected cross over the trailing `rank` axes.
fn dilate_once(mask: &Tensor, rank: usize) -> Result<Tensor> {
    let dims = mask.dim();
    let mut out = mask.shallow_clone();
    for axis in dims - rank..dims {
        for forward in [true, false] {
            out = out.f_logical_or(&shifted(mask, axis as i64, forward)?)?;
        }
    }
    Ok(out)
}

/// Face-connected component labels of a boolean `[N, *spatial]` mask (components never cross channels): every
/// foreground voxel ends with the largest flat index + 1 of its component, background with 0.
fn components(mask: &Tensor, rank: usize) -> Result<Tensor> {
    let size = mask.size();
    let total: i64 = size.iter().product();
    let foreground = mask.f_to_kind(Kind::Int64)?;
    let mut labels = Tensor::f_arange_start(1, total + 1, (Kind::Int64, mask.device()))?
        .f_reshape(size.as_slice())?
        .f_mul(&foreground)?;
    let dims = mask.dim();
    loop {
        let previous = labels.shallow_clone();
        for axis in dims - rank..dims {
            for forward in [true, false] {
                labels = labels
                    .f_maximum(&shifted(&labels, axis as i64, forward)?)?
                    .f_mul(&foreground)?;
            }
        }
        if labels.f_equal(&previous)? {
            return Ok(labels);
        }
    }
}

impl DilateGT {
    /// The soft dilation of one label tensor whose trailing `rank` axes are spatial.
    pub fn dilate(&self, label: &Tensor, rank: usize) -> Result<Tensor> {
        let shape = label.size();
        let kind = label.f_kind()?;
        let out_kind = if is_float(kind) { kind } else { Kind::Float };
        if self.dilation_factor <= 0.0 || label.numel() == 0 {
            return Ok(label.shallow_clone());
        }
        let device = label.device();
        let spatial = &shape[shape.len() - rank..];
        let mut batched = vec![-1];
        batched.extend_from_slice(spatial);
        let values = label
            .f_to_kind(Kind::Double)?
            .f_reshape(batched.as_slice())?;
        let mask = values.f_gt(0.5)?;
        let labels = components(&mask, rank)?;
        let (ids, inverse, counts) = labels.f_internal_unique2(true, true, true)?;
        let ids = Vec::<i64>::try_from(&ids.f_to_device(Device::Cpu)?)?;
        let counts = Vec::<i64>::try_from(&counts.f_to_device(Device::Cpu)?)?;
        // Index 0 of the sorted ids is the background when there is any.
        let first_object = usize::from(ids.first() == Some(&0));
        let objects = ids.len() - first_object;
        let soft = Tensor::f_zeros_like(&values)?;
        if objects > 0 {
            // Bounding boxes of all lesions at once: per-object min and max of the voxel coordinates.
            let coords = mask.f_nonzero()?;
            let width = coords.size()[1];
            let object_of = inverse
                .f_masked_select(&mask)?
                .f_sub_scalar(first_object as i64)?
                .f_unsqueeze(1)?
                .f_expand([-1, width], false)?;
            let lows = Tensor::f_full([objects as i64, width], i64::MAX, (Kind::Int64, device))?
                .f_internal_scatter_reduce(0, &object_of, &coords, "amin", true)?;
            let highs = Tensor::f_full([objects as i64, width], -1, (Kind::Int64, device))?
                .f_internal_scatter_reduce(0, &object_of, &coords, "amax", true)?;
            let lows = Vec::<i64>::try_from(&lows.f_to_device(Device::Cpu)?.f_reshape([-1])?)?;
            let highs = Vec::<i64>::try_from(&highs.f_to_device(Device::Cpu)?.f_reshape([-1])?)?;
            let width = width as usize;
            for object in 0..objects {
                let area = counts[object + first_object] as f64;
                let iterations = (self.dilation_factor * area.sqrt()).round_ties_even() as i64;
                let (low, high) = (
                    &lows[object * width..(object + 1) * width],
                    &highs[object * width..(object + 1) * width],
                );
                // Crop: the lesion's channel, and its box grown by the dilation reach.
                let mut region = inverse.f_narrow(0, low[0], 1)?;
                let mut target = soft.f_narrow(0, low[0], 1)?;
                for axis in 1..width {
                    let start = (low[axis] - iterations).max(0);
                    let end = (high[axis] + iterations).min(spatial[axis - 1] - 1);
                    region = region.f_narrow(axis as i64, start, end - start + 1)?;
                    target = target.f_narrow(axis as i64, start, end - start + 1)?;
                }
                let mut reached = region.f_eq((object + first_object) as i64)?;
                let mut lesion = reached.f_to_kind(Kind::Double)?;
                for step in 1..=iterations {
                    let grown = dilate_once(&reached, rank)?;
                    let added = grown.f_logical_and(&reached.f_logical_not()?)?;
                    let value = (iterations + 1 - step) as f64 / (iterations + 1) as f64;
                    lesion = lesion.f_add(&added.f_to_kind(Kind::Double)?.f_mul_scalar(value)?)?;
                    reached = grown;
                }
                // `target` is a view into `soft`.
                let _ = target.f_add_(&lesion)?;
            }
        }
        let soft = soft.f_clamp(0.0, 1.0)?;
        // Channels that sum to 0 are returned as they are, as ivadomed does.
        let mut sum_dims: Vec<i64> = (1..=rank as i64).collect();
        if sum_dims.is_empty() {
            sum_dims.push(0);
        }
        let empty = values
            .f_sum_dim_intlist(sum_dims.as_slice(), true, Kind::Double)?
            .f_eq(0.0)?;
        let result = values.f_where_self(&empty, &soft)?;
        Ok(result.f_reshape(shape.as_slice())?.f_to_kind(out_kind)?)
    }
}

impl Transform for DilateGT {
    const NAME: &'static str = "DilateGT";
    const SUMMARY: &'static str =
        "Soft lesion borders on label*: each lesion dilated round(factor * sqrt(area)) times with fading values";

    fn defaults() -> Value {
        json!({"dilation_factor": null})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let dilation_factor = config.f64("dilation_factor").map_err(|e| {
            PluginError(format!(
                "{e} ({} needs `dilation_factor`; it has no default)",
                Self::NAME
            ))
        })?;
        if !dilation_factor.is_finite() {
            return Err(PluginError(format!(
                "{}: `dilation_factor` must be finite, got {dilation_factor}",
                Self::NAME
            )));
        }
        Ok(Self { dilation_factor })
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        if !sample.tensors.keys().any(|name| name.starts_with("label")) {
            return Ok(Value::Null);
        }
        let rank = sample_rank(sample, Self::NAME)?;
        spatial_shape(sample, rank, Self::NAME)?;
        for (name, tensor) in sample.tensors.iter_mut() {
            if name.starts_with("label") {
                *tensor = self.dilate(tensor, rank)?;
            }
        }
        Ok(Value::Null)
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dilate_gt(factor: f64) -> DilateGT {
        let mut config = Config::new(
            "DilateGT",
            DilateGT::defaults(),
            json!({"dilation_factor": factor}),
        )
        .unwrap();
        let transform = DilateGT::build(&mut config).unwrap();
        config.finish().unwrap();
        transform
    }

    fn values(tensor: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&tensor.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    /// ivadomed's result by its formula, computed directly: for each lesion (given as its voxel list, the number
    /// of dilations `n` worked out by hand), a voxel at city-block distance d <= n adds 1 - d / (n + 1); the sum is
    /// clipped to 1.
    fn by_formula(shape: [i64; 2], lesions: &[(Vec<(i64, i64)>, i64)]) -> Vec<f64> {
        let mut out = Vec::new();
        for i in 0..shape[0] {
            for j in 0..shape[1] {
                let mut total: f64 = 0.0;
                for (voxels, n) in lesions {
                    let d = voxels
                        .iter()
                        .map(|&(a, b)| (a - i).abs() + (b - j).abs())
                        .min()
                        .unwrap();
                    if d <= *n {
                        total += 1.0 - d as f64 / (*n + 1) as f64;
                    }
                }
                out.push(total.min(1.0));
            }
        }
        out
    }

    fn square(top: i64, left: i64, side: i64) -> Vec<(i64, i64)> {
        (top..top + side)
            .flat_map(|i| (left..left + side).map(move |j| (i, j)))
            .collect()
    }

    #[test]
    fn ring_values_follow_ivadomeds_formula() {
        // A 3 x 3 lesion (area 9) at rows/cols 5..8, a single voxel at (6, 10) whose ring overlaps the square's,
        // and a single voxel in the corner (0, 0) whose ring is cut by the border.
        let shape = [14i64, 15];
        let lesions = [square(5, 5, 3), vec![(6, 10)], vec![(0, 0)]];
        let mut grid = vec![0.0f32; (shape[0] * shape[1]) as usize];
        for lesion in &lesions {
            for &(i, j) in lesion {
                grid[(i * shape[1] + j) as usize] = 1.0;
            }
        }
        let label = Tensor::from_slice(&grid).reshape([1, shape[0], shape[1]]);
        let image = Tensor::from_slice(&grid).reshape([1, shape[0], shape[1]]);
        for (factor, iterations) in [
            // factor 1: n = round(1 * 3) = 3 for the square, round(1 * 1) = 1 for single voxels.
            (1.0, [3, 1, 1]),
            // factor 0.5: round(1.5) = 2 (halves to even) for the square, round(0.5) = 0 for single voxels.
            (0.5, [2, 0, 0]),
        ] {
            let mut sample = Sample::new();
            sample.insert("image", image.shallow_clone());
            sample.insert("label", label.shallow_clone());
            let record = dilate_gt(factor).apply(&mut sample, 0).unwrap();
            assert!(record.is_null());
            let expected = by_formula(
                shape,
                &lesions.iter().cloned().zip(iterations).collect::<Vec<_>>(),
            );
            let got = values(sample.get("label").unwrap());
            for (k, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    (g - e).abs() < 1e-6,
                    "factor {factor}, voxel ({}, {}): {g} vs {e}",
                    k as i64 / shape[1],
                    k as i64 % shape[1]
                );
            }
            assert!(
                sample.get("image").unwrap().equal(&image),
                "the image is untouched"
            );
        }
        // Spot values worked by hand for factor 1: the square's ring at distance 1, 2, 3 is 3/4, 1/2, 1/4.
        let mut sample = Sample::new();
        sample.insert("label", label.shallow_clone());
        sample.set_spacing(&[1.0, 1.0]);
        dilate_gt(1.0).apply(&mut sample, 0).unwrap();
        let got = values(sample.get("label").unwrap());
        let at = |i: i64, j: i64| got[(i * shape[1] + j) as usize];
        assert_eq!(
            (at(4, 6), at(3, 6), at(2, 6), at(1, 6)),
            (0.75, 0.5, 0.25, 0.0)
        );
        // (5, 10): 1/4 from the square (distance 3) + 1/2 from the single voxel = 3/4; (6, 9): 1/2 + 1/2 -> 1.
        assert_eq!((at(5, 10), at(6, 9), at(6, 11)), (0.75, 1.0, 0.5));
        assert_eq!((at(0, 1), at(1, 1)), (0.5, 0.0));
    }

    // 20 lesions of a random mask, many touching each other's rings: the output of ivadomed's own algorithm (run
    // with scipy, see reference_data.rs).
    #[test]
    fn matches_ivadomed_on_a_random_mask() {
        use crate::reference_data::{DILATE_EXPECTED, DILATE_MASK};
        let label = Tensor::from_slice(&DILATE_MASK).reshape([1, 14, 13]);
        let got = values(&dilate_gt(0.7).dilate(&label, 2).unwrap());
        for (k, (g, e)) in got.iter().zip(DILATE_EXPECTED).enumerate() {
            assert!((g - e).abs() < 1e-6, "voxel {k}: {g} vs ivadomed {e}");
        }
    }

    // A 2 x 2 x 2 cube (area 8): n = round(0.5 * sqrt(8)) = round(1.41) = 1, so its 6-connected shell is 1/2 and
    // edge/corner neighbours (city-block distance 2 and 3) stay 0. A second channel that is all zero is kept.
    #[test]
    fn three_d_lesion_and_empty_channel() {
        let mut data = vec![0.0f64; 2 * 6 * 6 * 6];
        for z in 2..4 {
            for y in 2..4 {
                for x in 2..4 {
                    data[(z * 6 + y) * 6 + x] = 1.0;
                }
            }
        }
        let label = Tensor::from_slice(&data).reshape([2, 6, 6, 6]);
        let mut sample = Sample::new();
        sample.insert("label", label);
        sample.set_spacing(&[1.0, 1.0, 1.0]);
        dilate_gt(0.5).apply(&mut sample, 0).unwrap();
        let out = sample.get("label").unwrap();
        assert_eq!(out.kind(), Kind::Double);
        let got = values(out);
        let at = |z: usize, y: usize, x: usize| got[(z * 6 + y) * 6 + x];
        assert_eq!(
            (
                at(2, 2, 2),
                at(1, 2, 2),
                at(2, 2, 4),
                at(1, 1, 2),
                at(1, 1, 1)
            ),
            (1.0, 0.5, 0.5, 0.0, 0.0)
        );
        assert_eq!(
            got.iter().filter(|&&v| v == 0.5).count(),
            24,
            "6 faces x 4 voxels"
        );
        assert!(got[216..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn zero_factor_and_no_label_leave_the_sample_alone() {
        let label = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.0]).reshape([1, 2, 2]);
        let mut sample = Sample::new();
        sample.insert("label", label.shallow_clone());
        sample.set_spacing(&[1.0, 1.0]);
        dilate_gt(0.0).apply(&mut sample, 0).unwrap();
        assert!(sample.get("label").unwrap().equal(&label));
        let mut sample = Sample::new();
        sample.insert("roi", label.shallow_clone());
        dilate_gt(2.0).apply(&mut sample, 0).unwrap();
        assert!(sample.get("roi").unwrap().equal(&label));
        let mut config = Config::new("DilateGT", DilateGT::defaults(), json!({})).unwrap();
        assert!(DilateGT::build(&mut config)
            .err()
            .unwrap()
            .0
            .contains("no default"));
    }
}
