//! Post-processing steps that look at one voxel at a time: thresholds, class max-pooling and masks. They run
//! as tensor ops on the prediction's device.
use crate::layout::{companion, finite, no_record, prediction, PREDICTION};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{Kind, Tensor};
use ivado_sdk::{Config, PluginError, Result, Sample, Transform};

/// ivadomed's `binarize_prediction`: voxels `>= thr` become 1, the others 0 (`threshold_predictions`). A
/// negative `thr` keeps the soft prediction, as ivadomed's `-1` does.
pub struct BinarizePrediction {
    thr: f64,
}

impl BinarizePrediction {
    pub fn binarize(&self, prediction: &Tensor) -> Result<Tensor> {
        if self.thr < 0.0 {
            return Ok(prediction.shallow_clone());
        }
        Ok(prediction.f_ge(self.thr)?.f_to_kind(prediction.f_kind()?)?)
    }
}

impl Transform for BinarizePrediction {
    const NAME: &'static str = "binarize_prediction";
    const SUMMARY: &'static str =
        "prediction >= thr becomes 1, the rest 0; thr < 0 keeps the soft prediction";

    fn defaults() -> Value {
        json!({"thr": 0.5})
    }

    fn build(config: &mut Config) -> Result<Self> {
        Ok(Self {
            thr: finite(config, "thr", Self::NAME)?,
        })
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let binary = self.binarize(sample.get(PREDICTION)?)?;
        sample.insert(PREDICTION, binary);
        Ok(no_record())
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// ivadomed's `binarize_maxpooling`: per voxel, the class with the largest prediction becomes 1 and the others
/// 0. As in ivadomed the prediction holds no background channel, so an implicit background `1 - sum(classes)`
/// competes too: where it wins, every class is 0. Ties go to the first candidate, background first (numpy's
/// `argmax`). Classes are the leading axis (`[C, *spatial]`); a prediction without one is a single class.
pub struct BinarizeMaxpooling;

impl BinarizeMaxpooling {
    pub fn binarize(&self, prediction: &Tensor, rank: usize) -> Result<Tensor> {
        let shape = prediction.size();
        let classes = match shape.len() - rank {
            0 => prediction.f_unsqueeze(0)?,
            1 => prediction.shallow_clone(),
            _ => {
                return Err(PluginError(format!(
                "{}: `{PREDICTION}` must be [C, *spatial] with one class axis, got shape {shape:?}",
                Self::NAME
            )))
            }
        };
        // Double, and the background built by successive subtraction, as ivadomed does in float64, so that
        // near-ties fall the same way.
        let classes = classes.f_to_kind(Kind::Double)?;
        let count = classes.size()[0];
        let mut background = Tensor::f_ones_like(&classes.f_get(0)?)?;
        for class in 0..count {
            background = background.f_sub(&classes.f_get(class)?)?;
        }
        let candidates = Tensor::f_cat(&[background.f_unsqueeze(0)?, classes], 0)?;
        let winner = candidates.f_argmax(0, true)?;
        let mut index_shape = vec![count];
        index_shape.extend(std::iter::repeat_n(1, rank));
        let class_index = Tensor::f_arange_start(1, count + 1, (Kind::Int64, prediction.device()))?
            .f_reshape(index_shape.as_slice())?;
        Ok(winner
            .f_eq_tensor(&class_index)?
            .f_to_kind(prediction.f_kind()?)?
            .f_reshape(shape.as_slice())?)
    }
}

impl Transform for BinarizeMaxpooling {
    const NAME: &'static str = "binarize_maxpooling";
    const SUMMARY: &'static str =
        "Per voxel the class with the max prediction (implicit background 1 - sum included) becomes 1, others 0";

    fn defaults() -> Value {
        json!({})
    }

    fn build(_config: &mut Config) -> Result<Self> {
        Ok(Self)
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let (prediction, layout) = prediction(sample, Self::NAME)?;
        let binary = self.binarize(prediction, layout.rank)?;
        sample.insert(PREDICTION, binary);
        Ok(no_record())
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// ivadomed's `remove_noise`: prediction values not above `thr` are set to 0 (ivadomed keeps `> thr`), the
/// others are kept as they are. A negative `thr` disables the step (ivadomed's `-1`).
pub struct RemoveNoise {
    thr: f64,
}

impl Transform for RemoveNoise {
    const NAME: &'static str = "remove_noise";
    const SUMMARY: &'static str = "Sets prediction values <= thr to 0; thr < 0 disables it";

    fn defaults() -> Value {
        json!({"thr": -1})
    }

    fn build(config: &mut Config) -> Result<Self> {
        Ok(Self {
            thr: finite(config, "thr", Self::NAME)?,
        })
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        if self.thr < 0.0 {
            return Ok(no_record());
        }
        let prediction = sample.get(PREDICTION)?;
        let kept = crate::layout::keep_only(prediction, &prediction.f_gt(self.thr)?)?;
        sample.insert(PREDICTION, kept);
        Ok(no_record())
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// ivadomed's `mask_predictions`: the prediction times a binary mask held in the sample under the name `mask`
/// (e.g. `"roi"`), which sets everything outside the mask to 0. The mask must be binary, as ivadomed asserts,
/// and have the prediction's spatial shape; it may lack the class axis or have size 1 there.
pub struct MaskPredictions {
    mask: String,
}

impl Transform for MaskPredictions {
    const NAME: &'static str = "mask_predictions";
    const SUMMARY: &'static str =
        "Multiplies the prediction by the binary mask tensor named `mask` (e.g. an ROI)";

    fn defaults() -> Value {
        json!({"mask": "mask"})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let mask = config.string("mask")?;
        if mask.is_empty() {
            return Err(PluginError(format!(
                "{}: `mask` must name a sample tensor",
                Self::NAME
            )));
        }
        Ok(Self { mask })
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let (prediction, layout) = prediction(sample, Self::NAME)?;
        let mask = companion(sample, &self.mask, &layout, Self::NAME)?;
        let binary = mask
            .f_eq(0.0)?
            .f_logical_or(&mask.f_eq(1.0)?)?
            .f_all()?
            .f_int64_value(&[])?
            != 0;
        if !binary {
            return Err(PluginError(format!(
                "{}: `{}` must hold only 0 and 1",
                Self::NAME,
                self.mask
            )));
        }
        let masked = crate::layout::keep_only(prediction, &mask.f_ne(0.0)?)?;
        sample.insert(PREDICTION, masked);
        Ok(no_record())
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// ivadomed's `uncertainty` post-processing: removes the most uncertain predictions with an uncertainty map
/// held in the sample. `suffix` names the map as ivadomed names its files, with or without the leading `_` and
/// the `.nii.gz` extension: `unc-vox` (voxel-wise entropy), `unc-avgUnc`, `unc-cv` (structure-wise: every voxel
/// of a structure holds the structure's value, so a whole structure goes at once), `unc-iou` or `soft`.
///
/// The prediction is kept where the map is below `thr`, except for `unc-iou` and `soft`, which measure
/// confidence rather than uncertainty: there it is kept where the map is above `thr`. Ties are removed (ivadomed
/// compares strictly). A negative `thr` disables the step. The map must have the prediction's spatial shape.
pub struct Uncertainty {
    thr: f64,
    map: String,
}

impl Uncertainty {
    /// The sample tensor an ivadomed uncertainty-file suffix names: `_unc-vox.nii.gz` -> `unc-vox`.
    pub fn map_name(suffix: &str) -> String {
        let name = suffix.strip_prefix('_').unwrap_or(suffix);
        let name = name
            .strip_suffix(".nii.gz")
            .or_else(|| name.strip_suffix(".nii"))
            .unwrap_or(name);
        name.to_owned()
    }

    /// Whether high values of the map mean a reliable prediction (IoU across Monte-Carlo samples, their mean).
    fn higher_is_confident(&self) -> bool {
        self.map == "unc-iou" || self.map == "soft"
    }
}

impl Transform for Uncertainty {
    const NAME: &'static str = "uncertainty";
    const SUMMARY: &'static str =
        "Removes predictions whose uncertainty map (tensor named by `suffix`) is beyond thr; thr < 0 disables it";

    fn defaults() -> Value {
        json!({"thr": -1, "suffix": "unc-vox"})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let thr = finite(config, "thr", Self::NAME)?;
        let map = Self::map_name(&config.string("suffix")?);
        if map.is_empty() {
            return Err(PluginError(format!(
                "{}: `suffix` must name an uncertainty map, e.g. \"unc-vox\"",
                Self::NAME
            )));
        }
        Ok(Self { thr, map })
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        if self.thr < 0.0 {
            return Ok(no_record());
        }
        let (prediction, layout) = prediction(sample, Self::NAME)?;
        let map = companion(sample, &self.map, &layout, Self::NAME)?;
        let keep = if self.higher_is_confident() {
            map.f_gt(self.thr)?
        } else {
            map.f_lt(self.thr)?
        };
        let kept = crate::layout::keep_only(prediction, &keep)?;
        sample.insert(PREDICTION, kept);
        Ok(no_record())
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build, values};

    fn sample_with(prediction: Tensor) -> Sample {
        let mut sample = Sample::new();
        sample.insert(PREDICTION, prediction);
        sample
    }

    #[test]
    fn binarize_prediction_thresholds_at_thr_inclusive_and_negative_keeps_soft() {
        let soft = [0.0f32, 0.2, 0.5, 0.49, 0.9, 1.0];
        let prediction = Tensor::from_slice(&soft).reshape([1, 1, 2, 3]);
        let mut sample = sample_with(prediction.shallow_clone());
        sample.set_spacing(&[1.0, 1.0, 1.0]);
        let record = build::<BinarizePrediction>(json!({"thr": 0.5}))
            .apply(&mut sample, 0)
            .unwrap();
        assert!(record.is_null());
        let out = sample.get(PREDICTION).unwrap();
        assert_eq!(out.kind(), Kind::Float);
        assert_eq!(out.size(), vec![1, 1, 2, 3]);
        // >= 0.5 -> 1: 0.5, 0.9 and 1.0.
        assert_eq!(values(out), vec![0.0, 0.0, 1.0, 0.0, 1.0, 1.0]);

        let mut sample = sample_with(prediction.shallow_clone());
        build::<BinarizePrediction>(json!({"thr": -1}))
            .apply(&mut sample, 0)
            .unwrap();
        assert!(sample.get(PREDICTION).unwrap().equal(&prediction));
    }

    #[test]
    fn binarize_maxpooling_three_classes_with_implicit_background() {
        // Four voxels of a [3, 2, 2] prediction (classes 0, 1, 2 per voxel listed below). Background is
        // 1 - sum, worked out by hand:
        //   voxel 0: (0.6, 0.3, 0.1) -> bg 0.0 -> class 0 wins.
        //   voxel 1: (0.1, 0.2, 0.7) -> bg 0.0 -> class 2 wins.
        //   voxel 2: (0.1, 0.1, 0.2) -> bg 0.6 -> background wins: all classes 0.
        //   voxel 3: (0.3, 0.4, 0.3) -> bg 0.0 -> class 1 wins.
        let per_voxel = [
            [0.6f32, 0.3, 0.1],
            [0.1, 0.2, 0.7],
            [0.1, 0.1, 0.2],
            [0.3, 0.4, 0.3],
        ];
        let mut channels_first = vec![0.0f32; 12];
        for (voxel, classes) in per_voxel.iter().enumerate() {
            for (class, &p) in classes.iter().enumerate() {
                channels_first[class * 4 + voxel] = p;
            }
        }
        let prediction = Tensor::from_slice(&channels_first).reshape([3, 2, 2]);
        let mut sample = sample_with(prediction);
        sample.set_spacing(&[1.0, 1.0]);
        build::<BinarizeMaxpooling>(json!({}))
            .apply(&mut sample, 0)
            .unwrap();
        let out = sample.get(PREDICTION).unwrap();
        assert_eq!(out.kind(), Kind::Float);
        assert_eq!(out.size(), vec![3, 2, 2]);
        #[rustfmt::skip]
        let expected = vec![
            1.0, 0.0, 0.0, 0.0, // class 0: voxel 0
            0.0, 0.0, 0.0, 1.0, // class 1: voxel 3
            0.0, 1.0, 0.0, 0.0, // class 2: voxel 1
        ];
        assert_eq!(values(out), expected);
    }

    #[test]
    fn binarize_maxpooling_single_class_is_a_half_threshold_with_ties_to_background() {
        // One class: it wins where p > 1 - p, i.e. p > 0.5; at exactly 0.5 background ties and wins (first).
        let prediction = Tensor::from_slice(&[0.2f32, 0.5, 0.75, 1.0]).reshape([1, 2, 2]);
        let mut sample = sample_with(prediction);
        build::<BinarizeMaxpooling>(json!({}))
            .apply(&mut sample, 0)
            .unwrap();
        assert_eq!(
            values(sample.get(PREDICTION).unwrap()),
            vec![0.0, 0.0, 1.0, 1.0]
        );
    }

    #[test]
    fn remove_noise_zeroes_values_not_above_thr() {
        let prediction = Tensor::from_slice(&[0.05f32, 0.1, 0.3, 0.9]).reshape([1, 2, 2]);
        let mut sample = sample_with(prediction.shallow_clone());
        build::<RemoveNoise>(json!({"thr": 0.1}))
            .apply(&mut sample, 0)
            .unwrap();
        // 0.05 and 0.1 (not > 0.1) go; soft values above stay as they are.
        assert_eq!(
            values(sample.get(PREDICTION).unwrap()),
            vec![0.0, 0.0, 0.3f32 as f64, 0.9f32 as f64]
        );
        let mut sample = sample_with(prediction.shallow_clone());
        build::<RemoveNoise>(json!({}))
            .apply(&mut sample, 0)
            .unwrap();
        assert!(sample.get(PREDICTION).unwrap().equal(&prediction));
    }

    #[test]
    fn mask_predictions_multiplies_by_a_broadcast_roi() {
        // Two classes on a 2 x 3 grid; the ROI has no class axis and keeps the middle column and (1, 0).
        #[rustfmt::skip]
        let prediction = Tensor::from_slice(&[
            0.9f32, 0.8, 0.7,
            0.6, 0.5, 0.4,
            1.0, 1.0, 1.0,
            0.0, 1.0, 1.0,
        ]).reshape([2, 2, 3]);
        #[rustfmt::skip]
        let roi = Tensor::from_slice(&[
            0.0f32, 1.0, 0.0,
            1.0, 1.0, 0.0,
        ]).reshape([2, 3]);
        let mut sample = sample_with(prediction);
        sample.insert("roi", roi);
        sample.set_spacing(&[1.0, 1.0]);
        build::<MaskPredictions>(json!({"mask": "roi"}))
            .apply(&mut sample, 0)
            .unwrap();
        let out = sample.get(PREDICTION).unwrap();
        assert_eq!(out.size(), vec![2, 2, 3]);
        #[rustfmt::skip]
        let expected = vec![
            0.0, 0.8f32 as f64, 0.0,
            0.6f32 as f64, 0.5, 0.0,
            0.0, 1.0, 0.0,
            0.0, 1.0, 0.0,
        ];
        assert_eq!(values(out), expected);
        // The default mask name is `mask`; a missing tensor and a non-binary mask are errors.
        let missing = build::<MaskPredictions>(json!({}))
            .apply(&mut sample, 0)
            .unwrap_err()
            .0;
        assert!(missing.contains("`mask`"), "{missing}");
        sample.insert(
            "mask",
            Tensor::full([2, 3], 0.5, (Kind::Float, ivado_sdk::tch::Device::Cpu)),
        );
        let soft = build::<MaskPredictions>(json!({}))
            .apply(&mut sample, 0)
            .unwrap_err()
            .0;
        assert!(soft.contains("only 0 and 1"), "{soft}");
        sample.insert(
            "mask",
            Tensor::ones([3, 2], (Kind::Float, ivado_sdk::tch::Device::Cpu)),
        );
        let shape = build::<MaskPredictions>(json!({}))
            .apply(&mut sample, 0)
            .unwrap_err()
            .0;
        assert!(shape.contains("does not match"), "{shape}");
    }

    #[test]
    fn uncertainty_threshold_removes_uncertain_voxels_and_structures() {
        // A binary prediction on a 1 x 6 strip: two structures, voxels 0-1 and 3-5.
        let prediction = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 1.0, 1.0, 1.0]).reshape([1, 1, 6]);
        // Voxel-wise entropy: keep where < 0.3, so voxel 1 (0.5) and voxel 4 (0.3, a tie) go.
        let unc_vox = Tensor::from_slice(&[0.1f32, 0.5, 0.9, 0.0, 0.3, 0.2]).reshape([1, 1, 6]);
        // Structure-wise coefficient of variation: each structure holds one value (0.1 and 0.4).
        let unc_cv = Tensor::from_slice(&[0.1f32, 0.1, 0.0, 0.4, 0.4, 0.4]).reshape([1, 1, 6]);
        // Structure-wise IoU: confidence, high is good; the first structure (0.2) is below 0.3 and goes.
        let unc_iou = Tensor::from_slice(&[0.2f32, 0.2, 0.0, 0.8, 0.8, 0.8]).reshape([1, 1, 6]);
        let run = |config: Value| {
            let mut sample = sample_with(prediction.shallow_clone());
            sample.insert("unc-vox", unc_vox.shallow_clone());
            sample.insert("unc-cv", unc_cv.shallow_clone());
            sample.insert("unc-iou", unc_iou.shallow_clone());
            sample.set_spacing(&[1.0, 1.0]);
            build::<Uncertainty>(config).apply(&mut sample, 0).unwrap();
            values(sample.get(PREDICTION).unwrap())
        };
        assert_eq!(
            run(json!({"thr": 0.3, "suffix": "unc-vox"})),
            vec![1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
        );
        // ivadomed's file-suffix spelling names the same map.
        assert_eq!(
            run(json!({"thr": 0.3, "suffix": "_unc-cv.nii.gz"})),
            vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(
            run(json!({"thr": 0.3, "suffix": "unc-iou"})),
            vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
        );
        // Disabled by default (thr -1): nothing changes, even without the map.
        let mut sample = sample_with(prediction.shallow_clone());
        build::<Uncertainty>(json!({}))
            .apply(&mut sample, 0)
            .unwrap();
        assert!(sample.get(PREDICTION).unwrap().equal(&prediction));
        let error = build::<Uncertainty>(json!({"thr": 0.3}))
            .apply(&mut sample, 0)
            .unwrap_err()
            .0;
        assert!(error.contains("`unc-vox`"), "{error}");
    }
}
