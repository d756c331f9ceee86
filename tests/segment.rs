//! Inference end to end: tiling, undoing the preprocessing and stitching reconstruct the input exactly through
//! an identity network; TTA, MC dropout and uncertainty outputs; a model trained here segments a real volume
//! whose header and voxel order the outputs keep.
use ivado_runtime::bids::BidsEntry;
use ivado_runtime::data::SliceSet;
use ivado_runtime::infer::{
    self, LoadedVolume, OutputTarget, Sampling, SegmentOptions, VolumeInput,
};
use ivado_runtime::model_folder::{self, LoadedModel};
use ivado_runtime::pipeline::{Phase, Pipeline};
use ivado_runtime::plugin::{PluginRegistry, SearchPath};
use ivado_runtime::precision::Precision;
use ivado_runtime::tiling::SliceAxis;
use ivado_runtime::train::{TrainConfig, TrainReport};
use ivado_sdk::Sample;
use ivado_tests::{
    artifact_dir, assert_same_geometry, crop_and_normalise, fixture_library,
    functional_testing_entries, nifti_voxels, run_ivado, shared_data, t2w_entry, train_small_model,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn registry() -> PluginRegistry {
    let mut registry = PluginRegistry::discover(&SearchPath {
        builtin: Some(artifact_dir()),
        extra: Vec::new(),
    });
    registry.add_file(&fixture_library("identity"));
    registry
}

fn image(subject: &str, contrast: &str) -> PathBuf {
    shared_data(&format!(
        "data_functional_testing/{subject}/anat/{subject}_{contrast}.nii.gz"
    ))
}

/// A model folder holding the identity network with `preprocess`, `postprocess` and the `inference`
/// section of `sampling`, saved under `dir` and loaded back.
fn identity_folder(
    registry: &PluginRegistry,
    dir: &Path,
    config: Value,
    preprocess: &[Value],
    postprocess: &[Value],
    sampling: &Sampling,
) -> LoadedModel {
    let model = registry.model("identity", &config, Device::Cpu).unwrap();
    let pipeline = Pipeline::from_specs(registry, preprocess).unwrap();
    let post = Pipeline::from_specs(registry, postprocess).unwrap();
    model_folder::save_with_postprocess(dir, &model, &pipeline, &post, &json!({}), &json!({}))
        .unwrap();
    model_folder::set_section(dir, "inference", &sampling.to_section()).unwrap();
    model_folder::load(dir, registry, Device::Cpu).unwrap()
}

fn max_abs_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A unet2d (`model_config`) trained with seed 1 for `epochs` in batches of `batch_size` on sub-unf01's T2w,
/// validated on sub-unf02's, cropped to 64x64 and normalised. Returns the run folder (deleted when dropped),
/// the report, the T2w entries and the registry.
fn unet2d_trained_on_unf01(
    epochs: usize,
    batch_size: usize,
    model_config: Value,
) -> (
    tempfile::TempDir,
    TrainReport,
    Vec<BidsEntry>,
    PluginRegistry,
) {
    let entries = functional_testing_entries(&["T2w"], &["_seg-manual"]);
    let registry = registry();
    let pipeline = crop_and_normalise(&registry, [64, 64]);
    let train_set = SliceSet::build(&[t2w_entry(&entries, "sub-unf01")], &pipeline, 0).unwrap();
    let valid_set = SliceSet::build(&[t2w_entry(&entries, "sub-unf02")], &pipeline, 0).unwrap();
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        epochs,
        batch_size,
        seed: 1,
        ..TrainConfig::new(out.path(), Device::Cpu)
    };
    let (_, report) = train_small_model(
        &registry,
        ("unet2d", model_config),
        &pipeline,
        (&train_set, &valid_set),
        &json!({}),
        &config,
        None,
    );
    (out, report, entries, registry)
}

fn one(path: PathBuf) -> VolumeInput {
    VolumeInput {
        channels: vec![path],
    }
}

#[test]
fn identity_tiles_stitch_back_into_the_input_volume() {
    // The real T2w volume is 131 x 141 x 16 and RPI on disk (so canonical order differs from file order);
    // none of the tile sizes below divides it. The identity network returns its input, CenterCrop to a size
    // larger than the tile only pads (its undo crops the padding away again), so the expected output is the
    // input volume itself, whatever the tiling, overlap and weighting.
    let registry = registry();
    let volume = infer::load_volume(&one(image("sub-unf01", "T2w"))).unwrap();
    let expected = volume.source.data.shallow_clone();
    let scale = expected.abs().max().double_value(&[]);
    let crop2d = |size: [i64; 2]| vec![json!({"name": "CenterCrop", "config": {"size": size}})];
    let crop3d = |size: [i64; 3]| vec![json!({"name": "CenterCrop", "config": {"size": size}})];
    let cases: Vec<(&str, Sampling, Vec<Value>)> = vec![
        (
            "sagittal slices",
            Sampling::Slices {
                axis: SliceAxis::Sagittal,
            },
            vec![],
        ),
        (
            "coronal slices, padded",
            Sampling::Slices {
                axis: SliceAxis::Coronal,
            },
            // (height, width) = (Z, X): coronal tiles are oriented as in training (sampling::plane_axes).
            crop2d([20, 150]),
        ),
        (
            "axial slices, padded",
            Sampling::Slices {
                axis: SliceAxis::Axial,
            },
            crop2d([160, 160]),
        ),
        (
            "axial 2D patches with overlap, padded",
            Sampling::Patches2d {
                axis: SliceAxis::Axial,
                length: [48, 40],
                stride: [20, 24],
            },
            crop2d([64, 64]),
        ),
        (
            "sagittal 2D patches with overlap",
            Sampling::Patches2d {
                axis: SliceAxis::Sagittal,
                // (height, width) = (Z, Y), as training orients sagittal slices.
                length: [12, 40],
                stride: [5, 17],
            },
            vec![],
        ),
        (
            "3D subvolumes with overlap, padded",
            Sampling::Subvolumes {
                length: [48, 40, 8],
                stride: [30, 25, 5],
            },
            crop3d([56, 48, 9]),
        ),
        ("whole volume", Sampling::Whole, crop3d([136, 144, 16])),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (index, (name, sampling, preprocess)) in cases.iter().enumerate() {
        let loaded = identity_folder(
            &registry,
            &dir.path().join(format!("model-{index}")),
            json!({}),
            preprocess,
            &[],
            sampling,
        );
        assert_eq!(
            &Sampling::from_model(&loaded.description).unwrap(),
            sampling
        );
        for gaussian in [false, true] {
            let options = SegmentOptions {
                gaussian,
                batch_size: 7,
                ..SegmentOptions::default()
            };
            let result = infer::segment_loaded(&loaded, &volume, &options).unwrap();
            assert_eq!(result.soft.size(), expected.size(), "{name}");
            let error = max_abs_difference(&result.soft, &expected);
            // Averaging k copies of x ((x + x + x) / 3, or w·x / w with Gaussian weights) is x up to f32
            // rounding: a few ulps of the largest value.
            let tolerance = scale * 1e-6;
            assert!(
                error <= tolerance,
                "{name} (gaussian {gaussian}): max error {error} > {tolerance}"
            );
        }
    }
}

#[test]
fn command_line_overrides_reach_the_tiling_and_the_output_keeps_header_and_voxel_order() {
    // An identity model folder recorded as axial slices, run through the CLI with --patch/--stride overrides
    // (3D subvolumes) and --soft: the soft map written to disk must hold the source's raw voxel values in the
    // source's own file order, with the source's header geometry.
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    identity_folder(
        &registry,
        &model_dir,
        json!({}),
        &[],
        &[],
        &Sampling::default(),
    );
    let source = image("sub-unf02", "T2w");
    let out = dir.path().join("out");
    let fixture = fixture_library("identity");
    let (ok, stdout, stderr) = run_ivado(
        &[
            "--plugin-dir",
            &fixture.display().to_string(),
            "segment",
            "--model",
            &model_dir.display().to_string(),
            &source.display().to_string(),
            "-o",
            &out.display().to_string(),
            "--soft",
            "--patch",
            "40,48,8",
            "--stride",
            "20,30,5",
            "--gaussian",
        ],
        "warn",
    );
    assert!(ok, "{stdout}\n{stderr}");
    let soft = out.join("sub-unf02_T2w_soft.nii.gz");
    let pred = out.join("sub-unf02_T2w_pred.nii.gz");
    assert!(stdout.contains(&soft.display().to_string()), "{stdout}");
    assert!(stdout.contains(&pred.display().to_string()), "{stdout}");
    for written in [&soft, &pred] {
        assert_same_geometry(written, &source, &written.display().to_string());
    }
    let (expected, got) = (nifti_voxels(&source), nifti_voxels(&soft));
    assert_eq!(expected.len(), got.len());
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = expected
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= scale * 1e-6,
        "voxel order or values changed: {worst}"
    );
    // The mask is the soft map thresholded at 0.5, voxel for voxel.
    let mask = nifti_voxels(&pred);
    assert!(expected
        .iter()
        .zip(&mask)
        .all(|(v, m)| *m == f32::from(u8::from(*v >= 0.5))));
}

#[test]
fn multi_contrast_volumes_are_checked_against_the_model_channels() {
    // Identity with 2 input channels returns 2 "classes": class 0 must be the T1w volume, class 1 the T2w one.
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let loaded = identity_folder(
        &registry,
        &dir.path().join("model"),
        json!({"in_channels": 2}),
        &[],
        &[],
        &Sampling::default(),
    );
    let (t1, t2) = (image("sub-unf01", "T1w"), image("sub-unf01", "T2w"));
    let argument = format!("{},{}", t1.display(), t2.display());
    let inputs = infer::expand_inputs(&[argument], &[], &loaded).unwrap();
    assert_eq!(
        inputs,
        vec![VolumeInput {
            channels: vec![t1.clone(), t2.clone()]
        }]
    );
    let volume = infer::load_volume(&inputs[0]).unwrap();
    let result = infer::segment_loaded(&loaded, &volume, &SegmentOptions::default()).unwrap();
    assert_eq!(result.soft.size()[0], 2);
    let t1_data = ivado_runtime::volume::read_volume(&t1).unwrap().data;
    assert_eq!(max_abs_difference(&result.soft.get(0), &t1_data), 0.0);
    assert_eq!(
        max_abs_difference(&result.soft.get(1), &volume.source.data),
        {
            let t2_data = ivado_runtime::volume::read_volume(&t2).unwrap().data;
            max_abs_difference(&t2_data, &volume.source.data)
        }
    );
    // Written as ivadomed's segment names them: <stem>_class-<k>_pred.
    let out = dir.path().join("out");
    let written = infer::segment_inputs(
        &loaded,
        &inputs,
        &OutputTarget::Folder(out.clone()),
        &SegmentOptions::default(),
    )
    .unwrap();
    assert_eq!(
        written,
        vec![vec![
            out.join("sub-unf01_T1w_class-0_pred.nii.gz"),
            out.join("sub-unf01_T1w_class-1_pred.nii.gz")
        ]]
    );
    // One channel for a two-channel model is refused with both counts.
    let single = infer::load_volume(&one(t1)).unwrap();
    let error = format!(
        "{:#}",
        infer::segment_loaded(&loaded, &single, &SegmentOptions::default())
            .err()
            .unwrap()
    );
    assert!(
        error.contains("1 channel(s) given but the model takes 2"),
        "{error}"
    );
}

#[test]
fn a_film_model_without_a_metadata_encoder_is_refused() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let model = registry
        .model(
            "film_unet",
            &json!({"depth": 2, "n_filters": 4, "n_metadata": 3, "film_layers": [0, 1, 0, 0, 0, 0]}),
            Device::Cpu,
        )
        .unwrap();
    model_folder::save(
        dir.path(),
        &model,
        &Pipeline::default(),
        &json!({}),
        &json!({}),
    )
    .unwrap();
    let loaded = model_folder::load(dir.path(), &registry, Device::Cpu).unwrap();
    let volume = infer::load_volume(&one(image("sub-unf01", "T2w"))).unwrap();
    let error = format!(
        "{:#}",
        infer::segment_loaded(&loaded, &volume, &SegmentOptions::default())
            .err()
            .unwrap()
    );
    assert!(
        error.contains("FiLM model") && error.contains("metadata_encoder"),
        "{error}"
    );
}

/// The T2w volume scaled into [0, 1], so identity outputs are probabilities.
fn unit_volume() -> LoadedVolume {
    let mut volume = infer::load_volume(&one(image("sub-unf01", "T2w"))).unwrap();
    let max = volume.image.max().double_value(&[]);
    volume.image = &volume.image / max;
    volume.source.data = &volume.source.data / max;
    volume
}

#[test]
fn test_time_augmentation_with_flips_gives_the_input_back_and_non_invertible_steps_are_refused() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let flip = json!({"name": "RandomReverse", "config": {}, "dataset_type": ["training"]});
    let loaded = identity_folder(
        &registry,
        &dir.path().join("flip"),
        json!({}),
        &[flip],
        &[],
        &Sampling::Patches2d {
            axis: SliceAxis::Axial,
            length: [64, 64],
            stride: [32, 32],
        },
    );
    // The flip is a training-only step: TTA runs it at inference, and across seeds it really flips.
    let tta = infer::tta_pipeline(&loaded.pipeline);
    let flipped_any = (0..8).any(|seed| {
        let mut sample = Sample::new();
        sample.insert(
            "image",
            Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu)),
        );
        let (_, records) = tta.apply_in(Phase::Testing, sample, seed).unwrap();
        records[0].as_ref().unwrap()["flipped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_bool() == Some(true))
    });
    assert!(flipped_any, "the TTA pipeline never flipped");
    let volume = unit_volume();
    let options = SegmentOptions {
        tta: 4,
        seed: 5,
        ..SegmentOptions::default()
    };
    let result = infer::segment_loaded(&loaded, &volume, &options).unwrap();
    assert_eq!(result.samples.len(), 4);
    for sample in &result.samples {
        // Each pass is the input again (up to the f32 rounding of averaging overlapping patches): every flip
        // was undone before stitching. A flip left in place would move values by up to 1.
        assert!(max_abs_difference(sample, &volume.source.data) < 1e-6);
    }
    assert!(max_abs_difference(&result.soft, &volume.source.data) < 1e-6);

    // ElasticTransform cannot be undone: TTA refuses it by name instead of leaving predictions warped.
    let elastic = json!({"name": "ElasticTransform", "config": {"alpha_range": [10.0, 20.0], "sigma_range": [3.0, 4.0], "p": 1.0}, "dataset_type": ["training"]});
    let loaded = identity_folder(
        &registry,
        &dir.path().join("elastic"),
        json!({}),
        &[elastic],
        &[],
        &Sampling::default(),
    );
    let error = format!(
        "{:#}",
        infer::segment_loaded(&loaded, &volume, &options)
            .err()
            .unwrap()
    );
    assert!(error.contains("ElasticTransform"), "{error}");
    assert!(error.contains("cannot be undone"), "{error}");
    // Without --tta the training-only step does not run, so the model segments fine.
    assert!(infer::segment_loaded(&loaded, &volume, &SegmentOptions::default()).is_ok());
}

#[test]
fn mc_dropout_passes_differ_eval_passes_do_not_and_uncertainty_maps_are_written_and_used() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    // Post-processing removes voxels whose voxel-wise entropy reaches 0.3: it must get the `_unc-vox` map.
    let post = json!({"name": "uncertainty", "config": {"thr": 0.3, "suffix": "_unc-vox.nii.gz"}});
    let loaded = identity_folder(
        &registry,
        &dir.path().join("model"),
        json!({"dropout_rate": 0.5}),
        &[],
        &[post],
        &Sampling::default(),
    );
    let volume = unit_volume();
    tch::manual_seed(11);
    let mc = SegmentOptions {
        mc_dropout: 3,
        ..SegmentOptions::default()
    };
    let result = infer::segment_loaded(&loaded, &volume, &mc).unwrap();
    assert_eq!(result.samples.len(), 3);
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        assert!(
            max_abs_difference(&result.samples[a], &result.samples[b]) > 0.1,
            "MC passes {a} and {b} are equal"
        );
    }
    // Eval passes (TTA with no augmentation in the pipeline) are identical, and equal to the input.
    let eval = SegmentOptions {
        tta: 3,
        ..SegmentOptions::default()
    };
    let result_eval = infer::segment_loaded(&loaded, &volume, &eval).unwrap();
    for sample in &result_eval.samples {
        assert_eq!(max_abs_difference(sample, &volume.source.data), 0.0);
    }

    // Written with ivadomed's names.
    let out = dir.path().join("out");
    let written = infer::write_outputs(
        &loaded.postprocess,
        &volume.source,
        &volume.input,
        &result,
        &OutputTarget::Folder(out.clone()),
        &mc,
    )
    .unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let stem = "sub-unf01_T2w";
    let expected: Vec<String> = [
        "_pred",
        "_soft",
        "_unc-vox",
        "_unc-iou",
        "_unc-cv",
        "_unc-avgUnc",
    ]
    .iter()
    .map(|suffix| format!("{stem}{suffix}.nii.gz"))
    .collect();
    assert_eq!(names, expected);
    // The soft map is the mean of the passes; the mask keeps soft >= 0.5 only where unc-vox < 0.3.
    let read = |suffix: &str| {
        ivado_runtime::volume::read_volume(&out.join(format!("{stem}{suffix}.nii.gz")))
            .unwrap()
            .data
    };
    let mean = Tensor::stack(&result.samples, 0).mean_dim(0, false, Kind::Float);
    assert!(max_abs_difference(&read("_soft"), &mean) < 1e-6);
    let (entropy, mask) = (read("_unc-vox"), read("_pred"));
    let expected_mask = mean
        .ge(0.5)
        .logical_and(&entropy.lt(0.3))
        .to_kind(Kind::Float);
    assert_eq!(max_abs_difference(&mask, &expected_mask), 0.0);
    let removed = mean
        .ge(0.5)
        .logical_and(&entropy.ge(0.3))
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert!(
        removed > 0,
        "the uncertainty step removed nothing: the test proves nothing"
    );

    // --no-uncertainty-maps: only the averaged mask, thresholded at 0.5 (no post-processing here).
    let mask_only = SegmentOptions {
        no_uncertainty_maps: true,
        ..mc.clone()
    };
    let bare = dir.path().join("bare");
    let written = infer::write_outputs(
        &Pipeline::default(),
        &volume.source,
        &volume.input,
        &result,
        &OutputTarget::Folder(bare.clone()),
        &mask_only,
    )
    .unwrap();
    assert_eq!(written, vec![bare.join(format!("{stem}_pred.nii.gz"))]);
    assert_eq!(std::fs::read_dir(&bare).unwrap().count(), 1);
    let bare_mask = ivado_runtime::volume::read_volume(&written[0])
        .unwrap()
        .data;
    let thresholded = mean.ge(0.5).to_kind(Kind::Float);
    assert_eq!(max_abs_difference(&bare_mask, &thresholded), 0.0);
    // A post-processing step that thresholds by an uncertainty map cannot run without the maps: the error
    // says why.
    let error = infer::write_outputs(
        &loaded.postprocess,
        &volume.source,
        &volume.input,
        &result,
        &OutputTarget::Folder(dir.path().join("refused")),
        &mask_only,
    )
    .unwrap_err();
    assert!(
        format!("{error:#}").contains("--no-uncertainty-maps"),
        "{error:#}"
    );
}

#[test]
fn a_model_trained_here_segments_a_real_volume_into_its_source_geometry() {
    let (out, report, entries, _) = unet2d_trained_on_unf01(
        2,
        8,
        json!({"depth": 2, "n_filters": 4, "dropout_rate": 0.3}),
    );
    // 2D patches within axial slices, recorded in the folder, with overlap.
    model_folder::set_section(
        &report.model_dir,
        "inference",
        &json!({"slice_axis": "axial", "length_2D": [64, 64], "stride_2D": [48, 48]}),
    )
    .unwrap();
    let source = t2w_entry(&entries, "sub-unf03").image;
    let predictions = out.path().join("predictions");
    let (ok, stdout, stderr) = run_ivado(
        &[
            "segment",
            "--model",
            &report.model_dir.display().to_string(),
            &source.display().to_string(),
            "-o",
            &predictions.display().to_string(),
            "--mc-dropout",
            "2",
        ],
        "warn",
    );
    assert!(ok, "{stdout}\n{stderr}");
    for suffix in [
        "_pred",
        "_soft",
        "_unc-vox",
        "_unc-iou",
        "_unc-cv",
        "_unc-avgUnc",
    ] {
        let path = predictions.join(format!("sub-unf03_T2w{suffix}.nii.gz"));
        assert!(path.is_file(), "{} missing:\n{stdout}", path.display());
        assert_same_geometry(&path, &source, suffix);
    }
    let mask = nifti_voxels(&predictions.join("sub-unf03_T2w_pred.nii.gz"));
    assert!(
        mask.iter().all(|&v| v == 0.0 || v == 1.0),
        "mask not binary"
    );

    // The same through Rhai with an options map, into one file.
    let script = out.path().join("segment.rhai");
    let target = out.path().join("rhai").join("sub-unf03_T2w_pred.nii.gz");
    std::fs::write(
        &script,
        format!(
            "let m = load_model({:?});\nlet files = segment(m, {:?}, #{{ out: {:?}, soft: true, batch_size: 4 }});\nprint(files.len());\n",
            report.model_dir.display().to_string(),
            source.display().to_string(),
            target.display().to_string()
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = run_ivado(&["run", &script.display().to_string()], "warn");
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "2", "mask and soft map: {stdout}");
    assert!(target.is_file());
    assert!(out.path().join("rhai/sub-unf03_T2w_soft.nii.gz").is_file());
    assert_same_geometry(&target, &source, "the Rhai output");
}

/// Hard Dice of two binary masks (1 when both are empty).
fn dice(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
    let overlap = (&a * &b).sum(Kind::Double).double_value(&[]);
    let total = a.sum(Kind::Double).double_value(&[]) + b.sum(Kind::Double).double_value(&[]);
    if total == 0.0 {
        1.0
    } else {
        2.0 * overlap / total
    }
}

/// bf16 (the default on a CPU with native bf16) is safe for segmentation: a model trained here segments a real
/// volume in fp32 and in bf16 into nearly the same mask and soft map, and the channels-last weights bf16
/// leaves behind do not change a later fp32 run.
#[test]
fn bf16_segments_a_real_volume_like_fp32() {
    let (_out, report, entries, registry) = unet2d_trained_on_unf01(
        6,
        4,
        json!({"depth": 2, "n_filters": 8, "dropout_rate": 0.0}),
    );
    let loaded = model_folder::load(&report.model_dir, &registry, Device::Cpu).unwrap();
    let volume = infer::load_volume(&one(t2w_entry(&entries, "sub-unf03").image)).unwrap();
    let run = |precision| {
        let options = SegmentOptions {
            precision: Some(precision),
            ..SegmentOptions::default()
        };
        let segmentation = infer::segment_loaded(&loaded, &volume, &options).unwrap();
        assert_eq!(segmentation.precision, precision);
        segmentation.soft
    };
    let fp32 = run(Precision::Fp32);
    let bf16 = run(Precision::Bf16);
    let fp32_again = run(Precision::Fp32);
    let (mask32, mask16) = (fp32.ge(0.5), bf16.ge(0.5));
    let voxels = mask32.sum(Kind::Int64).int64_value(&[]);
    // The comparison means something only if the model found the cord: a mask of tens of voxels per slice
    // (the cord is about 40 voxels per axial slice in these images), not empty, not everything.
    assert!(
        voxels > 100 && voxels < fp32.numel() as i64 / 10,
        "fp32 mask has {voxels} voxels"
    );
    // bf16 keeps 8 significant bits: activations differ by ~1e-2 relative, so only voxels whose fp32 soft
    // value lies within ~0.01 of the threshold can flip. Those sit on the mask's one-voxel boundary and are a
    // small fraction of it; a Dice of 0.98 allows 2% of the mask's voxels to flip.
    let agreement = dice(&mask32, &mask16);
    assert!(agreement >= 0.98, "Dice fp32 vs bf16 = {agreement}");
    let soft_gap = max_abs_difference(&fp32, &bf16);
    assert!(soft_gap < 0.1, "soft maps differ by up to {soft_gap}");
    let mean_gap = (&fp32 - &bf16).abs().mean(Kind::Double).double_value(&[]);
    assert!(mean_gap < 0.01, "soft maps differ by {mean_gap} on average");
    // Not vacuous: bf16 did compute in lower precision.
    assert!(soft_gap > 0.0, "bf16 gave exactly the fp32 map");
    // fp32 after bf16 (weights now channels-last) matches the first fp32 run to float rounding.
    let drift = max_abs_difference(&fp32, &fp32_again);
    assert!(drift < 1e-5, "fp32 changed by {drift} after a bf16 run");
}

/// Training records its tiling: a 3D U-Net trained on subvolumes writes `inference` with its length_3D and
/// stride_3D, and `ivado segment` without tiling flags cuts the same subvolumes as explicit --patch/--stride
/// (the same soft map), which axial slicing (the old default) could not (a 3D network refuses 2D slices).
#[test]
fn a_unet3d_trained_on_subvolumes_segments_in_subvolumes_by_default() {
    let root = shared_data("data_functional_testing");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let script = dir.path().join("train3d.rhai");
    std::fs::write(
        &script,
        format!(
            r#"
let data = bids("{root}", #{{ contrasts: ["T2w"], target_suffix: ["_seg-manual"] }});
let model = model("unet3d", #{{ n_filters: 4, depth: 2, dropout_rate: 0.0 }});
let report = train(model, #{{
    train: subset(data, ["sub-unf01"]), valid: subset(data, ["sub-unf02"]),
    preprocess: [transform("NormalizeInstance", #{{}})],
    length_3D: [32, 32, 16], stride_3D: [24, 24, 16],
    epochs: 1, batch_size: 4, num_workers: 0, out: "{out}"
}});
"#,
            root = root.display(),
            out = out.display()
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = run_ivado(&["run", script.to_str().unwrap()], "warn");
    assert!(ok, "{stdout}\n{stderr}");
    let model_dir = out.join("model");
    let saved: Value = serde_json::from_str(
        &std::fs::read_to_string(model_dir.join(model_folder::CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(
        saved["inference"],
        json!({"length_3D": [32, 32, 16], "stride_3D": [24, 24, 16]})
    );
    let source = image("sub-unf03", "T2w");
    let segment = |name: &str, flags: &[&str]| -> (PathBuf, String) {
        let target = dir.path().join(name).join("sub-unf03_T2w_pred.nii.gz");
        let model = model_dir.display().to_string();
        let (input, output) = (source.display().to_string(), target.display().to_string());
        let mut args = vec![
            "segment", "--model", &model, &input, "-o", &output, "--soft",
        ];
        args.extend_from_slice(flags);
        let (ok, stdout, stderr) = run_ivado(&args, "info");
        assert!(ok, "{name}: {stdout}\n{stderr}");
        (target.with_file_name("sub-unf03_T2w_soft.nii.gz"), stderr)
    };
    let (default_soft, log) = segment("default", &[]);
    // The log says which tiling and precision ran.
    assert!(
        log.contains(r#"tiling {"length_3D":[32,32,16],"stride_3D":[24,24,16]}"#),
        "{log}"
    );
    let auto = if ivado_runtime::precision::native_bf16(Device::Cpu) {
        "precision bf16 (auto: native bf16 on this device)"
    } else {
        "precision fp32 (auto: no native bf16 on this device)"
    };
    assert!(log.contains(auto), "{log}");
    let (explicit_soft, _) = segment("explicit", &["--patch", "32,32,16", "--stride", "24,24,16"]);
    let (a, b) = (nifti_voxels(&default_soft), nifti_voxels(&explicit_soft));
    assert_eq!(a.len(), 131 * 141 * 16);
    assert!(a == b, "the default tiling is not the recorded subvolumes");
    // Other subvolumes give another map (the comparison above can tell tilings apart).
    let (other_soft, _) = segment("other", &["--patch", "32,32,16", "--stride", "32,32,16"]);
    assert!(nifti_voxels(&other_soft) != a);
    // A precision pinned in the folder wins over auto, and the log says so.
    let mut pinned = saved["inference"].clone();
    pinned["precision"] = json!("fp32");
    model_folder::set_section(&model_dir, "inference", &pinned).unwrap();
    let (_, log) = segment("pinned", &[]);
    assert!(
        log.contains("precision fp32 (pinned by the model folder)"),
        "{log}"
    );
    // Axial slices, the default before training recorded its tiling, cannot feed a 3D network.
    let model = model_dir.display().to_string();
    let input = source.display().to_string();
    let output = dir.path().join("axial").display().to_string();
    let (ok, stdout, stderr) = run_ivado(
        &[
            "segment",
            "--model",
            &model,
            &input,
            "-o",
            &output,
            "--slice-axis",
            "axial",
        ],
        "warn",
    );
    assert!(!ok, "a 3D U-Net segmented axial slices:\n{stdout}");
    assert!(stderr.contains("segmenting"), "{stderr}");
}
