//! Inference end to end: tiling, undoing the preprocessing and stitching reconstruct the input exactly through
//! an identity network; TTA, MC dropout and uncertainty outputs; a model trained here segments a real volume
//! whose header and voxel order the outputs keep.
use ivado_runtime::data::SliceSet;
use ivado_runtime::infer::{
    self, LoadedVolume, OutputTarget, Sampling, SegmentOptions, VolumeInput,
};
use ivado_runtime::model_folder::{self, LoadedModel};
use ivado_runtime::pipeline::{Phase, Pipeline};
use ivado_runtime::plugin::{PluginRegistry, SearchPath};
use ivado_runtime::tiling::SliceAxis;
use ivado_runtime::train::TrainConfig;
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
            crop2d([150, 20]),
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
                length: [40, 12],
                stride: [17, 5],
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
}

#[test]
fn a_model_trained_here_segments_a_real_volume_into_its_source_geometry() {
    let entries = functional_testing_entries(&["T2w"], &["_seg-manual"]);
    let registry = registry();
    let pipeline = crop_and_normalise(&registry, [64, 64]);
    let train_set = SliceSet::build(&[t2w_entry(&entries, "sub-unf01")], &pipeline, 0).unwrap();
    let valid_set = SliceSet::build(&[t2w_entry(&entries, "sub-unf02")], &pipeline, 0).unwrap();
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        epochs: 2,
        batch_size: 8,
        seed: 1,
        ..TrainConfig::new(out.path(), Device::Cpu)
    };
    let (_, report) = train_small_model(
        &registry,
        (
            "unet2d",
            json!({"depth": 2, "n_filters": 4, "dropout_rate": 0.3}),
        ),
        &pipeline,
        (&train_set, &valid_set),
        &json!({}),
        &config,
        None,
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
