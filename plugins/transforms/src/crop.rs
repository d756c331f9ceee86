//! ivadomed's `CenterCrop` and `ROICrop`.
use crate::geometry::{check_rank, record_ints, spatial_shape};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::Tensor;
use ivado_sdk::{Config, PluginError, Result, Sample, Transform};

/// Crops the centre of every tensor to `size` (`[h, w]` or `[d, h, w]`), zero-padding axes where the input is
/// smaller than the crop.
///
/// The crop starts at `round((in - out) / 2)` along each axis, rounding halves to even as ivadomed does (Python's
/// `round`), so an odd surplus of 3 starts the crop at 2, one of 5 at 2; a negative start means padding before the
/// data. Undo puts the crop back at the same place in a zero tensor of the original spatial shape: what was cut
/// away comes back as zeros.
pub struct CenterCrop {
    size: Vec<i64>,
}

/// Largest crop edge accepted from a config, to turn typos into errors instead of huge allocations.
const MAX_EDGE: f64 = 65_536.0;

/// Checks a crop size: 2 or 3 edges, each in `1..=MAX_EDGE`.
pub(crate) fn checked_size(who: &str, size: Vec<i64>) -> Result<Vec<i64>> {
    check_rank(who, "size", size.len())?;
    if let Some(bad) = size
        .iter()
        .find(|&&edge| edge < 1 || edge as f64 > MAX_EDGE)
    {
        return Err(PluginError(format!(
            "{who}: every `size` entry must be in 1..={MAX_EDGE}, got {bad}"
        )));
    }
    Ok(size)
}

/// Reads the `size` key: whole numbers only.
pub(crate) fn size_from_config(config: &mut Config, who: &str) -> Result<Vec<i64>> {
    let raw = config.f64_list("size")?;
    let mut size = Vec::with_capacity(raw.len());
    for edge in raw {
        if edge.fract() != 0.0 || !edge.is_finite() {
            return Err(PluginError(format!(
                "{who}: `size` entries must be whole numbers, got {edge}"
            )));
        }
        size.push(edge as i64);
    }
    checked_size(who, size)
}

impl CenterCrop {
    pub fn new(size: Vec<i64>) -> Result<Self> {
        Ok(Self {
            size: checked_size(Self::NAME, size)?,
        })
    }

    /// Where the crop starts along each axis, in input coordinates (negative: padding).
    pub fn offsets(input: &[i64], size: &[i64]) -> Vec<i64> {
        input
            .iter()
            .zip(size)
            .map(|(&i, &o)| ((i - o) as f64 / 2.0).round_ties_even() as i64)
            .collect()
    }
}

/// A zero tensor with `tensor`'s leading axes and spatial shape `out_spatial`, holding `tensor` placed so that its
/// element 0 lands at `shift` (per spatial axis) in the output; whatever falls outside is dropped.
pub(crate) fn embed(tensor: &Tensor, out_spatial: &[i64], shift: &[i64]) -> Result<Tensor> {
    let shape = tensor.size();
    let lead = shape.len() - out_spatial.len();
    let mut out_shape = shape[..lead].to_vec();
    out_shape.extend_from_slice(out_spatial);
    let out = Tensor::f_zeros(out_shape.as_slice(), (tensor.f_kind()?, tensor.device()))?;
    let mut source = tensor.shallow_clone();
    let mut target = out.shallow_clone();
    for (axis, (&out_len, &shift)) in out_spatial.iter().zip(shift).enumerate() {
        let dim = (lead + axis) as i64;
        let in_len = shape[lead + axis];
        let lo = shift.max(0);
        let hi = (shift + in_len).min(out_len);
        if hi <= lo {
            // No overlap along this axis: the result is all zeros.
            return Ok(out);
        }
        source = source.f_narrow(dim, lo - shift, hi - lo)?;
        target = target.f_narrow(dim, lo, hi - lo)?;
    }
    // `target` is a view into `out`.
    target.f_copy_(&source)?;
    Ok(out)
}

impl Transform for CenterCrop {
    const NAME: &'static str = "CenterCrop";
    const SUMMARY: &'static str =
        "Crops the centre to `size` ([h, w] or [d, h, w]), zero-padding smaller inputs";

    fn defaults() -> Value {
        json!({"size": [128, 128]})
    }

    fn build(config: &mut Config) -> Result<Self> {
        Self::new(size_from_config(config, Self::NAME)?)
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let input = spatial_shape(sample, self.size.len(), Self::NAME)?;
        let offsets = Self::offsets(&input, &self.size);
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

/// Undoes a crop recorded as `{"shape", "offsets", "size"}`: puts the tensors back at their offsets in zero tensors
/// of the original spatial shape.
pub(crate) fn undo_crop(who: &str, rank: usize, sample: &mut Sample, record: &Value) -> Result<()> {
    let original = record_ints(record, "shape", rank, who)?;
    let offsets = record_ints(record, "offsets", rank, who)?;
    let size = record_ints(record, "size", rank, who)?;
    if sample.tensors.is_empty() {
        return Ok(());
    }
    let current = spatial_shape(sample, rank, who)?;
    if current != size {
        return Err(PluginError(format!(
            "{who}: undo expects tensors of the cropped spatial shape {size:?}, got {current:?}"
        )));
    }
    for tensor in sample.tensors.values_mut() {
        *tensor = embed(tensor, &original, &offsets)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivado_sdk::tch::{Device, Kind};

    fn sample_with(name: &str, tensor: Tensor) -> Sample {
        let mut sample = Sample::new();
        sample.insert(name, tensor);
        sample.set_spacing(&[1.0, 1.0]);
        sample
    }

    fn values(tensor: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&tensor.flatten(0, -1)).unwrap()
    }

    // Expected values come from the arange formula value(c, i, j) = (c * H + i) * W + j evaluated by hand-written
    // index arithmetic below, and from the offsets worked out by hand: H 6 -> 4 starts at (6-4)/2 = 1, W 7 -> 4
    // starts at round(1.5) = 2 (ties to even, as Python's round in ivadomed).
    #[test]
    fn crop_then_undo_keeps_the_inside_and_zeroes_the_outside() {
        let (c, h, w) = (2i64, 6i64, 7i64);
        let image = Tensor::arange(c * h * w, (Kind::Float, Device::Cpu)).reshape([c, h, w]);
        let label = image.ge(40).to_kind(Kind::Uint8);
        let mut sample = sample_with("image", image);
        sample.insert("label", label.shallow_clone());
        let crop = CenterCrop::new(vec![4, 4]).unwrap();
        let record = crop.apply(&mut sample, 7).unwrap();
        assert_eq!(
            record,
            json!({"shape": [6, 7], "offsets": [1, 2], "size": [4, 4]})
        );

        let cropped = values(sample.get("image").unwrap());
        assert_eq!(sample.get("image").unwrap().size(), vec![2, 4, 4]);
        assert_eq!(sample.get("label").unwrap().size(), vec![2, 4, 4]);
        assert_eq!(sample.get("label").unwrap().kind(), Kind::Uint8);
        for ch in 0..2 {
            for i in 0..4 {
                for j in 0..4 {
                    let expected = ((ch * h + i + 1) * w + j + 2) as f64;
                    assert_eq!(cropped[((ch * 4 + i) * 4 + j) as usize], expected);
                }
            }
        }

        crop.undo(&mut sample, &record).unwrap();
        let restored = values(sample.get("image").unwrap());
        assert_eq!(sample.get("image").unwrap().size(), vec![2, 6, 7]);
        for ch in 0..c {
            for i in 0..h {
                for j in 0..w {
                    let inside = (1..5).contains(&i) && (2..6).contains(&j);
                    let expected = if inside {
                        ((ch * h + i) * w + j) as f64
                    } else {
                        0.0
                    };
                    assert_eq!(
                        restored[((ch * h + i) * w + j) as usize],
                        expected,
                        "at {ch},{i},{j}"
                    );
                }
            }
        }
        // The label comes back as the original inside the crop window.
        let label_back = sample.get("label").unwrap();
        assert_eq!(label_back.kind(), Kind::Uint8);
        let window = |t: &Tensor| t.narrow(1, 1, 4).narrow(2, 2, 4);
        assert!(window(label_back).equal(&window(&label)));
    }

    // Input 2x3 into a 4x6 crop: H starts at round(-1) = -1, W at round(-1.5) = -2 (ties to even), so the data
    // lands at rows 1..3 and columns 2..5 of the output, zeros elsewhere.
    #[test]
    fn crop_larger_than_input_pads_with_zeros_and_undo_recovers_input() {
        let image = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([1, 2, 3]) + 1.0;
        let mut sample = sample_with("image", image.shallow_clone());
        let crop = CenterCrop::new(vec![4, 6]).unwrap();
        let record = crop.apply(&mut sample, 0).unwrap();
        assert_eq!(record["offsets"], json!([-1, -2]));
        let out = values(sample.get("image").unwrap());
        for i in 0..4i64 {
            for j in 0..6i64 {
                let inside = (1..3).contains(&i) && (2..5).contains(&j);
                let expected = if inside {
                    ((i - 1) * 3 + (j - 2) + 1) as f64
                } else {
                    0.0
                };
                assert_eq!(out[(i * 6 + j) as usize], expected, "at {i},{j}");
            }
        }
        crop.undo(&mut sample, &record).unwrap();
        assert!(sample.get("image").unwrap().equal(&image));
    }

    // Mixed: pad along D (3 -> 5, start round(-1) = -1), crop along H (8 -> 4, start 2), keep W (5 -> 5).
    #[test]
    fn crop_3d_mixes_padding_and_cropping() {
        let (d, h, w) = (3i64, 8i64, 5i64);
        let image =
            Tensor::arange(d * h * w, (Kind::Double, Device::Cpu)).reshape([1, d, h, w]) + 1.0;
        let prediction = image.shallow_clone() * 0.5;
        let mut sample = sample_with("image", image.shallow_clone());
        sample.insert("prediction", prediction.reshape([d, h, w]));
        sample.set_spacing(&[2.0, 1.0, 1.0]);
        let crop = CenterCrop::new(vec![5, 4, 5]).unwrap();
        let record = crop.apply(&mut sample, 0).unwrap();
        assert_eq!(record["offsets"], json!([-1, 2, 0]));
        assert_eq!(sample.get("prediction").unwrap().size(), vec![5, 4, 5]);
        let out = values(sample.get("image").unwrap());
        for z in 0..5i64 {
            for i in 0..4i64 {
                for j in 0..5i64 {
                    let src_z = z - 1;
                    let expected = if (0..d).contains(&src_z) {
                        ((src_z * h + i + 2) * w + j + 1) as f64
                    } else {
                        0.0
                    };
                    assert_eq!(out[((z * 4 + i) * 5 + j) as usize], expected);
                }
            }
        }
        // Spacing is untouched by a crop.
        assert_eq!(sample.spacing().unwrap(), vec![2.0, 1.0, 1.0]);
        crop.undo(&mut sample, &record).unwrap();
        let back = sample.get("image").unwrap();
        assert_eq!(back.size(), vec![1, 3, 8, 5]);
        let rows = |t: &Tensor| t.narrow(-2, 2, 4);
        assert!(rows(back).equal(&rows(&image)));
        assert_eq!(
            f64::try_from(back.narrow(-2, 0, 2).abs().sum(Kind::Double)).unwrap(),
            0.0
        );
    }

    #[test]
    fn config_and_shape_errors_name_the_problem() {
        let mut config = Config::new(
            "CenterCrop",
            CenterCrop::defaults(),
            json!({"size": [64, 64, 32]}),
        )
        .unwrap();
        let crop = CenterCrop::build(&mut config).unwrap();
        config.finish().unwrap();
        assert_eq!(crop.size, vec![64, 64, 32]);

        let mut config = Config::new(
            "CenterCrop",
            CenterCrop::defaults(),
            json!({"szie": [64, 64]}),
        )
        .unwrap();
        CenterCrop::build(&mut config).unwrap();
        assert!(config.finish().unwrap_err().0.contains("`szie`"));

        for bad in [
            json!({"size": [64]}),
            json!({"size": [64, 0]}),
            json!({"size": [64.5, 64]}),
            json!({"size": "64"}),
        ] {
            let mut config =
                Config::new("CenterCrop", CenterCrop::defaults(), bad.clone()).unwrap();
            assert!(CenterCrop::build(&mut config).is_err(), "{bad}");
        }

        let crop = CenterCrop::new(vec![4, 4, 4]).unwrap();
        let mut sample = sample_with(
            "image",
            Tensor::zeros([1, 8, 8], (Kind::Float, Device::Cpu)),
        );
        let error = crop.apply(&mut sample, 0).unwrap_err().0;
        assert!(error.contains("must have 4 dims"), "{error}");

        let crop = CenterCrop::new(vec![4, 4]).unwrap();
        sample.insert(
            "label",
            Tensor::zeros([1, 8, 9], (Kind::Float, Device::Cpu)),
        );
        let error = crop.apply(&mut sample, 0).unwrap_err().0;
        assert!(error.contains("disagree"), "{error}");
    }
}
