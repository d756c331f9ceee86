//! ivadomed's `ROICrop`.
use crate::crop::{embed, size_from_config, undo_crop};
use crate::geometry::spatial_shape;
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{Device, Kind};
use ivado_sdk::{Config, PluginError, Result, Sample, Transform};

/// Crops every tensor to `size` (`[h, w]` or `[d, h, w]`) around the centre of mass of the `roi` mask,
/// zero-padding where the window leaves the data.
///
/// As in ivadomed, the centre of mass is taken over the ROI cast to integers (`astype(int)`: values are truncated,
/// so 0.9 counts as 0), each coordinate is rounded (halves to even, Python's `round`), and the window starts at
/// `round(centre) - round(size / 2)`. Leading (channel) axes of the ROI are summed. An empty ROI is an error (in
/// ivadomed it fails on a NaN centre). Undo works as `CenterCrop`'s: the crop goes back at its place in a zero
/// tensor of the original shape.
pub struct ROICrop {
    size: Vec<i64>,
}

impl ROICrop {
    pub fn new(size: Vec<i64>) -> Result<Self> {
        Ok(Self {
            size: crate::crop::checked_size(Self::NAME, size)?,
        })
    }

    /// Centre of mass (voxel coordinates) of the integer-cast ROI.
    fn centre_of_mass(sample: &Sample, rank: usize) -> Result<Vec<f64>> {
        let roi = sample.get("roi").map_err(|_| {
            PluginError(format!(
                "{}: the sample has no `roi` tensor to centre the crop on",
                Self::NAME
            ))
        })?;
        let shape = roi.size();
        let spatial = &shape[shape.len() - rank..];
        let mut flat_shape = vec![-1];
        flat_shape.extend_from_slice(spatial);
        let weights = roi
            .f_to_kind(Kind::Double)?
            .f_trunc()?
            .f_reshape(flat_shape.as_slice())?
            .f_sum_dim_intlist([0i64].as_slice(), false, Kind::Double)?;
        let total = f64::try_from(&weights.f_sum(Kind::Double)?)?;
        if total == 0.0 || !total.is_finite() {
            return Err(PluginError(format!(
                "{}: the `roi` mask is empty (no voxel >= 1), so it has no centre to crop around",
                Self::NAME
            )));
        }
        let mut centre = Vec::with_capacity(rank);
        for axis in 0..rank {
            let others: Vec<i64> = (0..rank as i64).filter(|&a| a != axis as i64).collect();
            let profile = weights
                .f_sum_dim_intlist(others.as_slice(), false, Kind::Double)?
                .f_to_device(Device::Cpu)?;
            let profile = Vec::<f64>::try_from(&profile)?;
            let moment: f64 = profile
                .iter()
                .enumerate()
                .map(|(index, w)| index as f64 * w)
                .sum();
            centre.push(moment / total);
        }
        Ok(centre)
    }
}

impl Transform for ROICrop {
    const NAME: &'static str = "ROICrop";
    const SUMMARY: &'static str =
        "Crops `size` ([h, w] or [d, h, w]) around the ROI's centre of mass, zero-padding at the borders";

    fn defaults() -> Value {
        json!({"size": [128, 128]})
    }

    fn build(config: &mut Config) -> Result<Self> {
        Self::new(size_from_config(config, Self::NAME)?)
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let rank = self.size.len();
        let input = spatial_shape(sample, rank, Self::NAME)?;
        let centre = Self::centre_of_mass(sample, rank)?;
        let offsets: Vec<i64> = centre
            .iter()
            .zip(&self.size)
            .map(|(&c, &edge)| {
                c.round_ties_even() as i64 - (edge as f64 / 2.0).round_ties_even() as i64
            })
            .collect();
        let shift: Vec<i64> = offsets.iter().map(|o| -o).collect();
        for tensor in sample.tensors.values_mut() {
            *tensor = embed(tensor, &self.size, &shift)?;
        }
        Ok(json!({"shape": input, "offsets": offsets, "size": self.size}))
    }

    fn undo(&self, sample: &mut Sample, record: &Value) -> Result<()> {
        undo_crop(Self::NAME, self.size.len(), sample, record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivado_sdk::tch::Tensor;

    fn values(tensor: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&tensor.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    // ROI: rows 0..2, cols 10..12 of a 12 x 12 image: centre (0.5, 10.5) rounds (to even) to (0, 10). Size
    // [4, 5]: halves round(2) = 2 and round(2.5) = 2, so the window starts at (-2, 8): two zero rows on top and one
    // zero column past the right edge, with the ROI centre landing at (2, 2) of the crop.
    #[test]
    fn centres_on_the_roi_and_zero_pads_at_the_border() {
        let image = Tensor::arange(144, (Kind::Float, Device::Cpu)).reshape([1, 12, 12]) + 1.0;
        let mut roi = vec![0.0f32; 144];
        for (i, j) in [(0, 10), (0, 11), (1, 10), (1, 11)] {
            roi[i * 12 + j] = 1.0;
        }
        let roi = Tensor::from_slice(&roi).reshape([1, 12, 12]);
        let mut sample = Sample::new();
        sample.insert("image", image.shallow_clone());
        sample.insert("roi", roi.shallow_clone());
        let crop = ROICrop::new(vec![4, 5]).unwrap();
        let record = crop.apply(&mut sample, 0).unwrap();
        assert_eq!(
            record,
            json!({"shape": [12, 12], "offsets": [-2, 8], "size": [4, 5]})
        );
        let out = values(sample.get("image").unwrap());
        for i in 0..4i64 {
            for j in 0..5i64 {
                let (si, sj) = (i - 2, j + 8);
                let want = if si >= 0 && sj < 12 {
                    (si * 12 + sj + 1) as f64
                } else {
                    0.0
                };
                assert_eq!(out[(i * 5 + j) as usize], want, "at {i},{j}");
            }
        }
        let roi_out = values(sample.get("roi").unwrap());
        assert_eq!(roi_out[2 * 5 + 2], 1.0, "ROI centre at the crop centre");
        assert_eq!(roi_out.iter().sum::<f64>(), 4.0, "the whole ROI is inside");

        crop.undo(&mut sample, &record).unwrap();
        let back = sample.get("image").unwrap();
        assert_eq!(back.size(), vec![1, 12, 12]);
        let window = |t: &Tensor| t.narrow(1, 0, 2).narrow(2, 8, 4);
        assert!(window(back).equal(&window(&image)));
        assert_eq!(
            f64::try_from(back.sum(Kind::Double)).unwrap(),
            f64::try_from(window(&image).sum(Kind::Double)).unwrap()
        );
    }

    // ivadomed casts the ROI to int: the 0.9 voxel weighs nothing and the 1.7 voxel weighs 1, so the centre is
    // (1, 2, 3). Size 3 -> half round(1.5) = 2, so the window starts at (-1, 0, 1).
    #[test]
    fn three_d_uses_integer_cast_roi() {
        let mut roi = vec![0.0f32; 4 * 5 * 6];
        roi[(5 + 2) * 6 + 3] = 1.7;
        roi[(3 * 5 + 4) * 6 + 5] = 0.9;
        let mut sample = Sample::new();
        sample.insert(
            "image",
            Tensor::ones([2, 4, 5, 6], (Kind::Float, Device::Cpu)),
        );
        sample.insert("roi", Tensor::from_slice(&roi).reshape([4, 5, 6]));
        let record = ROICrop::new(vec![3, 3, 3])
            .unwrap()
            .apply(&mut sample, 0)
            .unwrap();
        assert_eq!(record["offsets"], json!([-1, 0, 1]));
        assert_eq!(sample.get("image").unwrap().size(), vec![2, 3, 3, 3]);
        // The first plane along D lies before the data: zeros.
        let image = sample.get("image").unwrap();
        assert_eq!(
            f64::try_from(image.narrow(1, 0, 1).sum(Kind::Double)).unwrap(),
            0.0
        );
        assert_eq!(
            f64::try_from(image.narrow(1, 1, 2).sum(Kind::Double)).unwrap(),
            36.0
        );
    }

    #[test]
    fn missing_or_empty_roi_is_an_error() {
        let crop = ROICrop::new(vec![2, 2]).unwrap();
        let mut sample = Sample::new();
        sample.insert("image", Tensor::ones([1, 4, 4], (Kind::Float, Device::Cpu)));
        assert!(crop
            .apply(&mut sample, 0)
            .unwrap_err()
            .0
            .contains("no `roi`"));
        sample.insert(
            "roi",
            Tensor::full([1, 4, 4], 0.5, (Kind::Float, Device::Cpu)),
        );
        assert!(crop.apply(&mut sample, 0).unwrap_err().0.contains("empty"));
        let mut config =
            Config::new("ROICrop", ROICrop::defaults(), json!({"size": [4, 0]})).unwrap();
        assert!(ROICrop::build(&mut config).is_err());
    }
}
