//! ivadomed's post-processing as an ivado transform plugin.
//!
//! Every step rewrites the sample tensor `prediction` (soft or binary, `[C, X, Y, Z]` or `[C, H, W]`; the
//! spatial rank is taken from `meta.spacing`, which gives mm per spatial axis) and leaves the rest of the sample
//! alone. Steps keep the prediction's shape and dtype, are deterministic (the seed is unused) and record `null`:
//! their undo is a no-op. The host applies them in the order the user lists them, and the order matters (e.g.
//! `fill_holes` before `keep_largest_object` can keep a filled ring that the other order drops).
//!
//! Voxel-wise steps ([`BinarizePrediction`], [`BinarizeMaxpooling`], [`RemoveNoise`], [`MaskPredictions`],
//! [`Uncertainty`]) run as tensor ops where the prediction lives. Object steps ([`KeepLargestObject`],
//! [`KeepLargestObjectPerSlice`], [`FillHoles`], [`RemoveSmall`]) label connected components per class on the host
//! with `ivado_sdk::components`. Names, parameters and defaults follow ivadomed's `Postprocessing` class and
//! `postprocessing.py`; each step's doc says where it deliberately differs.

mod layout;
mod objects;
#[cfg(test)]
mod testing;
mod voxelwise;

pub use layout::{Layout, PREDICTION};
pub use objects::{
    FillHoles, KeepLargest, KeepLargestObject, KeepLargestObjectPerSlice, RemoveSmall, SizeUnit,
};
pub use voxelwise::{
    BinarizeMaxpooling, BinarizePrediction, MaskPredictions, RemoveNoise, Uncertainty,
};

ivado_sdk::export_plugin! {
    name: "postprocess",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [],
    transforms: [
        BinarizePrediction,
        BinarizeMaxpooling,
        KeepLargestObject,
        KeepLargest,
        KeepLargestObjectPerSlice,
        FillHoles,
        RemoveNoise,
        RemoveSmall,
        MaskPredictions,
        Uncertainty,
    ],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build, try_build, values};
    use ivado_sdk::serde_json::{json, Value};
    use ivado_sdk::tch::{Kind, Tensor};
    use ivado_sdk::{Result, Sample, Transform};

    /// Builds the step called `name` as the host would and applies it.
    fn apply_named(name: &str, config: Value, sample: &mut Sample) -> Result<Value> {
        fn run<T: Transform>(config: Value, sample: &mut Sample) -> Result<Value> {
            try_build::<T>(config)?.apply(sample, 0)
        }
        match name {
            BinarizePrediction::NAME => run::<BinarizePrediction>(config, sample),
            BinarizeMaxpooling::NAME => run::<BinarizeMaxpooling>(config, sample),
            KeepLargestObject::NAME => run::<KeepLargestObject>(config, sample),
            KeepLargest::NAME => run::<KeepLargest>(config, sample),
            KeepLargestObjectPerSlice::NAME => run::<KeepLargestObjectPerSlice>(config, sample),
            FillHoles::NAME => run::<FillHoles>(config, sample),
            RemoveNoise::NAME => run::<RemoveNoise>(config, sample),
            RemoveSmall::NAME => run::<RemoveSmall>(config, sample),
            MaskPredictions::NAME => run::<MaskPredictions>(config, sample),
            Uncertainty::NAME => run::<Uncertainty>(config, sample),
            other => panic!("no step {other}"),
        }
    }

    /// Applies `steps` in the order given, as the host does.
    fn apply_in_order(steps: &[(&str, Value)], prediction: &Tensor) -> Tensor {
        let mut sample = Sample::new();
        sample.insert(PREDICTION, prediction.shallow_clone());
        sample.set_spacing(&[1.0, 1.0]);
        for (name, config) in steps {
            let record = apply_named(name, config.clone(), &mut sample).unwrap();
            assert!(record.is_null(), "{name} records nothing");
        }
        sample.get(PREDICTION).unwrap().shallow_clone()
    }

    fn grid(rows: &[&str]) -> Tensor {
        let data: Vec<f32> = rows
            .iter()
            .flat_map(|row| row.chars().map(|c| if c == '#' { 1.0 } else { 0.0 }))
            .collect();
        Tensor::from_slice(&data).reshape([1, rows.len() as i64, rows[0].len() as i64])
    }

    #[test]
    fn steps_apply_in_the_order_given() {
        // A 4 x 4 ring (12 voxels, 16 once its 2 x 2 hole is filled) and a separate 2 x 7 bar (14 voxels).
        let prediction = grid(&[
            "..............",
            ".####.#######.",
            ".#..#.#######.",
            ".#..#.........",
            ".####.........",
            "..............",
        ]);
        // Largest first: the bar (14) beats the ring (12); filling then finds no hole. Only the bar remains.
        let largest_then_fill = apply_in_order(
            &[
                ("keep_largest_object", json!({})),
                ("fill_holes", json!({})),
            ],
            &prediction,
        );
        let bar = grid(&[
            "..............",
            "......#######.",
            "......#######.",
            "..............",
            "..............",
            "..............",
        ]);
        assert_eq!(values(&largest_then_fill), values(&bar));
        // Fill first: the ring becomes a 16-voxel square, which then beats the bar. Only the square remains.
        let fill_then_largest = apply_in_order(
            &[
                ("fill_holes", json!({})),
                ("keep_largest_object", json!({})),
            ],
            &prediction,
        );
        let square = grid(&[
            "..............",
            ".####.........",
            ".####.........",
            ".####.........",
            ".####.........",
            "..............",
        ]);
        assert_eq!(values(&fill_then_largest), values(&square));
    }

    #[test]
    fn every_step_keeps_shape_and_dtype_and_touches_only_the_prediction() {
        // A soft f64 [2, 4, 4, 3] prediction, with a mask and an uncertainty map beside it.
        let prediction = Tensor::arange(96, (Kind::Double, ivado_sdk::tch::Device::Cpu))
            .remainder(7)
            .divide_scalar(6.0)
            .reshape([2, 4, 4, 3]);
        let image = Tensor::ones([1, 4, 4, 3], (Kind::Float, ivado_sdk::tch::Device::Cpu));
        let steps = [
            ("binarize_prediction", json!({"thr": 0.5})),
            ("binarize_maxpooling", json!({})),
            ("keep_largest_object", json!({})),
            ("keep_largest", json!({})),
            ("keep_largest_object_per_slice", json!({"axis": 1})),
            ("fill_holes", json!({})),
            ("remove_noise", json!({"thr": 0.2})),
            ("remove_small", json!({"unit": "mm3", "thr": [2, 5]})),
            ("mask_predictions", json!({"mask": "image"})),
            (
                "uncertainty",
                json!({"thr": 0.5, "suffix": "_unc-vox.nii.gz"}),
            ),
        ];
        for (name, config) in steps {
            let mut sample = Sample::new();
            sample.insert(PREDICTION, prediction.shallow_clone());
            sample.insert("image", image.shallow_clone());
            sample.insert("unc-vox", prediction.shallow_clone());
            sample.set_spacing(&[1.0, 0.5, 2.0]);
            apply_named(name, config, &mut sample).unwrap();
            let out = sample.get(PREDICTION).unwrap();
            assert_eq!(out.size(), vec![2, 4, 4, 3], "{name}");
            assert_eq!(out.kind(), Kind::Double, "{name}");
            assert!(sample.get("image").unwrap().equal(&image), "{name}");
            assert!(sample.get("unc-vox").unwrap().equal(&prediction), "{name}");
            // Every output value is either 0, 1 or the input's own value at that voxel.
            let (got, was) = (values(out), values(&prediction));
            assert!(
                got.iter()
                    .zip(&was)
                    .all(|(&g, &w)| g == 0.0 || g == 1.0 || g == w),
                "{name}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected_by_name_and_defaults_build() {
        fn check<T: Transform>() {
            build::<T>(json!({}));
            let error = try_build::<T>(json!({"thershold": 1})).err().unwrap().0;
            assert!(
                error.contains(T::NAME) && error.contains("unknown config key `thershold`"),
                "{error}"
            );
        }
        check::<BinarizePrediction>();
        check::<BinarizeMaxpooling>();
        check::<KeepLargestObject>();
        check::<KeepLargest>();
        check::<KeepLargestObjectPerSlice>();
        check::<FillHoles>();
        check::<RemoveNoise>();
        check::<RemoveSmall>();
        check::<MaskPredictions>();
        check::<Uncertainty>();
    }
}
