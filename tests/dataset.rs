//! Training sets cut every way ivadomed cuts them (2D slices on any axis, 2D patches, 3D subvolumes,
//! multichannel inputs, K targets, soft GT), checked voxel by voxel on a phantom, trained on real data, and
//! reproducible across libtorch threads and loader workers.
use anyhow::Result;
use ivado_runtime::bids::BidsEntry;
use ivado_runtime::data::{split_by_subject, SamplingOptions, SliceSet};
use ivado_runtime::loader::{slice_batches, LoaderOptions};
use ivado_runtime::pipeline::{LivePipeline, Phase, Pipeline};
use ivado_runtime::train::TrainConfig;
use ivado_runtime::volume::{read_volume, write_like, OutputType};
use ivado_tests::{
    builtin_registry, crop_and_normalise, functional_testing, functional_testing_entries,
    run_ivado, small_train_config, train_small_model, transform_pipeline,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// libtorch's random generator and thread count are process-global: tests that set them must not interleave.
static GLOBAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn options(value: serde_json::Value) -> SamplingOptions {
    SamplingOptions::from_json(&value).unwrap()
}

fn same(a: &(Tensor, Tensor), b: &(Tensor, Tensor)) -> bool {
    a.0.size() == b.0.size() && a.0.equal(&b.0) && a.1.equal(&b.1)
}

#[test]
fn plain_axial_slices_through_the_window_path_equal_the_original_batches() {
    let registry = builtin_registry();
    let entries: Vec<BidsEntry> = functional_testing_entries(&["T2w"], &["_seg-manual"]);
    assert_eq!(entries.len(), 3);
    let preprocess = transform_pipeline(
        &registry,
        &[
            ("Resample", json!({"spacing": [1.0, 1.0]})),
            ("CenterCrop", json!({"size": [64, 64]})),
            ("NormalizeInstance", json!({})),
        ],
    );
    let original = SliceSet::build_in(Phase::Training, &entries, &preprocess, 3).unwrap();
    let windows = SliceSet::build_windows(
        Phase::Training,
        &entries,
        &preprocess,
        3,
        &SamplingOptions::default(),
    )
    .unwrap();
    assert_eq!(original.images.size(), vec![48, 1, 64, 64]);
    assert!(original.images.equal(&windows.images));
    assert!(original.labels.equal(&windows.labels));
    assert_eq!(original.volume_of_slice, windows.volume_of_slice);
    assert_eq!(original.volumes, windows.volumes);
    assert_eq!(original.spacing, windows.spacing);
    // And so the batches the trainer gets: the first 3 of a seeded order.
    let chunks: Vec<Vec<i64>> = original
        .shuffled(9)
        .chunks(8)
        .take(3)
        .map(<[i64]>::to_vec)
        .collect();
    let batches = |set: &SliceSet| -> Vec<(Tensor, Tensor)> {
        slice_batches(
            set,
            None,
            chunks.clone(),
            1,
            1,
            Device::Cpu,
            LoaderOptions::new(0),
        )
        .collect::<Result<_>>()
        .unwrap()
    };
    for (a, b) in batches(&original).iter().zip(&batches(&windows)) {
        assert!(same(a, b));
    }
}

/// Voxel value of the phantom image at canonical (x, y, z): every voxel distinct, exact in f32.
fn phantom_value(x: i64, y: i64, z: i64) -> f32 {
    (x * 10_000 + y * 10 + z) as f32
}

/// A phantom subject written on the grid of the real sub-unf01 T2w (131 x 141 x 16): T1w = the value
/// above, T2w = its negative, a "cord" target of the voxels with x in 60..70 and a "lesion" target (soft,
/// 0.3) at x in 64..66, y in 70..72, z = 5.
fn write_phantom(dir: &Path) -> (Vec<BidsEntry>, [i64; 3]) {
    let reference =
        read_volume(&functional_testing().join("sub-unf01/anat/sub-unf01_T2w.nii.gz")).unwrap();
    let size = reference.data.size();
    let shape = [size[0], size[1], size[2]];
    let x = Tensor::arange(shape[0], (Kind::Float, Device::Cpu)).view([-1, 1, 1]);
    let y = Tensor::arange(shape[1], (Kind::Float, Device::Cpu)).view([1, -1, 1]);
    let z = Tensor::arange(shape[2], (Kind::Float, Device::Cpu)).view([1, 1, -1]);
    let value = (&x * 10_000.0 + &y * 10.0 + &z).expand(shape, false);
    let cord = x
        .ge(60.0)
        .logical_and(&x.lt(70.0))
        .to_kind(Kind::Float)
        .expand(shape, false);
    let lesion = (x.ge(64.0).logical_and(&x.lt(66.0)))
        .logical_and(&y.ge(70.0).logical_and(&y.lt(72.0)))
        .logical_and(&z.eq(5.0))
        .to_kind(Kind::Float)
        .expand(shape, false)
        * 0.3;
    let files = [
        ("t1.nii.gz", value.shallow_clone()),
        ("t2.nii.gz", -&value),
        ("cord.nii.gz", cord.contiguous()),
        ("lesion.nii.gz", lesion.contiguous()),
    ];
    for (name, data) in &files {
        write_like(&reference, data, &dir.join(name), OutputType::F32).unwrap();
    }
    let entry = |contrast: &str, image: &str| BidsEntry {
        subject: "sub-ph01".into(),
        contrast: contrast.into(),
        image: dir.join(image),
        label: Some(dir.join("cord.nii.gz")),
        targets: vec![
            Some(dir.join("cord.nii.gz")),
            Some(dir.join("lesion.nii.gz")),
        ],
        ..Default::default()
    };
    (
        vec![entry("T1w", "t1.nii.gz"), entry("T2w", "t2.nii.gz")],
        shape,
    )
}

#[test]
fn phantom_windows_hold_the_voxels_expected_from_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let (entries, [nx, ny, nz]) = write_phantom(dir.path());
    let empty = Pipeline::default();

    // Sagittal slices, T2w then T1w as channels, soft targets: slice i is x = i, (height, width) = (z, y).
    let sagittal = SliceSet::build_sampled(
        Phase::Training,
        &entries,
        &empty,
        0,
        &options(json!({"slice_axis": "sagittal", "multichannel": true, "contrasts": ["T2w", "T1w"], "soft_gt": true})),
    )
    .unwrap();
    assert_eq!(sagittal.images.size(), vec![nx, 2, nz, ny]);
    assert_eq!(sagittal.labels.size(), vec![nx, 2, nz, ny]);
    assert_eq!(
        sagittal.volumes.len(),
        1,
        "one multichannel sample per subject"
    );
    for &(i, h, w) in &[(0, 0, 0), (61, 5, 70), (130, 15, 140), (64, 5, 71)] {
        let expected = phantom_value(i, w, h);
        assert_eq!(
            sagittal.images.double_value(&[i, 0, h, w]) as f32,
            -expected
        );
        assert_eq!(sagittal.images.double_value(&[i, 1, h, w]) as f32, expected);
        let cord = if (60..70).contains(&i) { 1.0 } else { 0.0 };
        assert_eq!(sagittal.labels.double_value(&[i, 0, h, w]), cord);
        let lesion = if (64..66).contains(&i) && (70..72).contains(&w) && h == 5 {
            0.3
        } else {
            0.0
        };
        assert!((sagittal.labels.double_value(&[i, 1, h, w]) - lesion).abs() < 1e-6);
    }
    // Without soft_gt, the 0.3 lesion binarises to nothing.
    let hard = SliceSet::build_sampled(
        Phase::Training,
        &entries[..1],
        &empty,
        0,
        &options(json!({"slice_axis": "coronal"})),
    )
    .unwrap();
    assert_eq!(hard.images.size(), vec![ny, 1, nz, nx], "coronal: (z, x)");
    assert_eq!(hard.labels.size(), vec![ny, 2, nz, nx]);
    assert_eq!(
        hard.labels.select(1, 1).sum(Kind::Float).double_value(&[]),
        0.0
    );
    assert_eq!(
        hard.images.double_value(&[7, 0, 3, 100]) as f32,
        phantom_value(100, 7, 3)
    );

    // Slice filter: only the 10 sagittal slices through the cord have a non-empty mask.
    let filtered = SliceSet::build_sampled(
        Phase::Training,
        &entries[..1],
        &empty,
        0,
        &options(
            json!({"slice_axis": "sagittal", "slice_filter_params": {"filter_empty_mask": true}}),
        ),
    )
    .unwrap();
    assert_eq!(filtered.len(), 10);
    assert_eq!(
        filtered.images.double_value(&[0, 0, 2, 3]) as f32,
        phantom_value(60, 3, 2)
    );

    // ROI filter: the cord as ROI keeps the 10 sagittal slices with more than 0 ROI voxels; a subject
    // without ROI is skipped, as ivadomed skips it, which leaves nothing to train on.
    let with_roi: Vec<BidsEntry> = entries[..1]
        .iter()
        .map(|e| BidsEntry {
            roi: Some(dir.path().join("cord.nii.gz")),
            ..e.clone()
        })
        .collect();
    let roi_options = options(
        json!({"slice_axis": "sagittal", "roi_params": {"suffix": "_cord", "slice_filter_roi": 0}}),
    );
    let roi_filtered =
        SliceSet::build_sampled(Phase::Training, &with_roi, &empty, 0, &roi_options).unwrap();
    assert_eq!(roi_filtered.len(), 10);
    assert_eq!(
        roi_filtered.images.double_value(&[9, 0, 0, 0]) as f32,
        phantom_value(69, 0, 0)
    );
    let error = SliceSet::build_sampled(Phase::Training, &entries[..1], &empty, 0, &roi_options)
        .err()
        .unwrap();
    assert!(format!("{error:#}").contains("no sample left"), "{error:#}");

    // Patch filter, at training time only: of the 5 x 5 axial 32 x 32 patches per slice (x at 0, 32, 64, 96,
    // 99), those at x 32 and 64 hold cord voxels (x in 60..70): 2 x 5 per slice.
    let patch_options = options(json!({
        "length_2D": [32, 32], "stride_2D": [32, 32], "patch_filter_params": {"filter_empty_mask": true}
    }));
    let kept = |phase| {
        SliceSet::build_sampled(phase, &entries[..1], &empty, 0, &patch_options)
            .unwrap()
            .len() as i64
    };
    assert_eq!(kept(Phase::Training), nz * 10);
    assert_eq!(kept(Phase::Validation), nz * 25);

    // 3D subvolumes of 32 x 32 x 16 every 32 voxels: tiles at 0, 32, 64, 96 and one flush with the end
    // (131 - 32 = 99 along x, 141 - 32 = 109 along y), Z fastest, so subvolume 5 * 1 + 2 starts at (32, 64, 0).
    let subvolumes = SliceSet::build_sampled(
        Phase::Training,
        &entries[..1],
        &empty,
        0,
        &options(json!({"length_3D": [32, 32, 16], "stride_3D": [32, 32, 16]})),
    )
    .unwrap();
    assert_eq!(subvolumes.images.size(), vec![25, 1, 32, 32, 16]);
    assert_eq!(subvolumes.labels.size(), vec![25, 2, 32, 32, 16]);
    assert_eq!(
        subvolumes.images.double_value(&[7, 0, 1, 2, 3]) as f32,
        phantom_value(33, 66, 3)
    );
    assert_eq!(
        subvolumes.images.double_value(&[24, 0, 31, 31, 15]) as f32,
        phantom_value(130, 140, 15)
    );
    assert_eq!(subvolumes.spacing[0].len(), 3);

    // 2D axial patches of 64 x 64 every 64 voxels: 3 x 3 per slice (0, 64, 67 along x; 0, 64, 77 along y).
    let patches = SliceSet::build_sampled(
        Phase::Training,
        &entries[..1],
        &empty,
        0,
        &options(json!({"length_2D": [64, 64], "stride_2D": [64, 64]})),
    )
    .unwrap();
    assert_eq!(patches.images.size(), vec![nz * 9, 1, 64, 64]);
    // slice z = 2, patch (1, 2): origin (64, 77)
    assert_eq!(
        patches.images.double_value(&[2 * 9 + 5, 0, 1, 1]) as f32,
        phantom_value(65, 78, 2)
    );
}

#[test]
fn sampling_options_refuse_what_ivadomed_would_not_accept() {
    for (bad, message) in [
        (json!({"slice_axis": "oblique"}), "oblique"),
        (json!({"length_2D": [64]}), "length_2D"),
        (
            json!({"length_2D": [64, 64], "length_3D": [8, 8, 8]}),
            "not both",
        ),
        (
            json!({"slice_filter_params": {"filter_empty": true}}),
            "filter_empty",
        ),
        (
            json!({"roi_params": {"slice_filter_roi": -1}}),
            "slice_filter_roi",
        ),
    ] {
        let error = format!("{:#}", SamplingOptions::from_json(&bad).unwrap_err());
        assert!(error.contains(message), "{error}");
    }
    // ivadomed's empty length_2D means whole slices.
    assert_eq!(
        options(json!({"length_2D": [], "slice_axis": "axial"})),
        SamplingOptions::default()
    );
}

/// Trains `model` for `epochs` on `train`/`valid` sampled by `sampling`; returns the report and the model's
/// output on the first validation sample.
fn train_on(
    architecture: &str,
    model_config: serde_json::Value,
    entries: &[BidsEntry],
    preprocess: &Pipeline,
    sampling: &SamplingOptions,
    epochs: usize,
) -> (ivado_runtime::train::TrainReport, SliceSet, Tensor) {
    let registry = builtin_registry();
    let split = split_by_subject(entries, 0.34, 0.0, 2).unwrap();
    let train_set =
        SliceSet::build_sampled(Phase::Training, &split.train, preprocess, 5, sampling).unwrap();
    let valid_set =
        SliceSet::build_sampled(Phase::Validation, &split.valid, preprocess, 5, sampling).unwrap();
    let out = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        num_workers: 0,
        ..small_train_config(out.path(), epochs, 5)
    };
    let (model, report) = train_small_model(
        &registry,
        (architecture, model_config),
        preprocess,
        (&train_set, &valid_set),
        &json!({"sampling": sampling.to_json()}),
        &config,
        None,
    );
    let output = tch::no_grad(|| {
        model
            .forward(&[&valid_set.images.narrow(0, 0, 1)], ivado_sdk::Mode::Eval)
            .unwrap()
    });
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            report
                .model_dir
                .join(ivado_runtime::model_folder::CONFIG_FILE),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        saved["data"]["sampling"],
        sampling.to_json(),
        "the sampling is recorded in the model folder"
    );
    (report, valid_set, output)
}

fn assert_trained(report: &ivado_runtime::train::TrainReport, epochs: usize) {
    assert_eq!(report.history.len(), epochs);
    for record in &report.history {
        assert!(record.train_loss.is_finite() && record.valid_loss.is_finite());
        assert!((0.0..=1.0).contains(&record.valid_dice), "{record:?}");
    }
}

#[test]
fn a_tiny_3d_unet_trains_on_subvolumes_of_real_data() {
    let _global = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    let registry = builtin_registry();
    let preprocess = transform_pipeline(&registry, &[("NormalizeInstance", json!({}))]);
    let sampling = options(json!({"length_3D": [32, 32, 16], "stride_3D": [32, 32, 16]}));
    let (report, valid, output) = train_on(
        "unet3d",
        json!({"n_filters": 4, "depth": 2, "dropout_rate": 0.0}),
        &functional_testing_entries(&["T2w"], &["_seg-manual"]),
        &preprocess,
        &sampling,
        2,
    );
    assert_trained(&report, 2);
    // 5 x 5 x 1 tiles per 131 x 141 x 16 volume (0, 32, 64, 96 and one flush with the end per axis).
    let volumes = valid.volumes.len() as i64;
    assert_eq!(
        valid.images.size(),
        vec![25 * volumes, 1, 32, 32, 16],
        "25 subvolumes per validation volume"
    );
    assert_eq!(output.size(), vec![1, 1, 32, 32, 16]);
    // The first epoch's loss differs from the second's: the weights moved.
    assert_ne!(report.history[0].train_loss, report.history[1].train_loss);
}

#[test]
fn a_two_channel_t1w_t2w_model_trains() {
    let _global = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    let registry = builtin_registry();
    let preprocess = crop_and_normalise(&registry, [64, 64]);
    let sampling = options(json!({"multichannel": true, "contrasts": ["T1w", "T2w"]}));
    let (report, valid, output) = train_on(
        "unet2d",
        json!({"in_channels": 2, "n_filters": 4, "depth": 2, "dropout_rate": 0.0}),
        &functional_testing_entries(&["T1w", "T2w"], &["_seg-manual"]),
        &preprocess,
        &sampling,
        1,
    );
    assert_trained(&report, 1);
    assert_eq!(
        valid.images.size(),
        vec![16, 2, 64, 64],
        "one subject, 16 slices, 2 channels"
    );
    assert_eq!(valid.volumes.len(), 1);
    assert_eq!(output.size(), vec![1, 1, 64, 64]);
}

#[test]
fn two_targets_give_two_output_channels() {
    let _global = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    let registry = builtin_registry();
    let preprocess = crop_and_normalise(&registry, [64, 64]);
    let sampling = SamplingOptions::default();
    let entries = functional_testing_entries(&["T2w"], &["_seg-manual", "_lesion-manual"]);
    assert!(entries.iter().all(|e| e.targets.len() == 2));
    let (report, valid, output) = train_on(
        "unet2d",
        // ivadomed's convention: K targets are K + 1 outputs whose background (channel 0) the model drops.
        json!({"out_channels": 3, "n_filters": 4, "depth": 2, "dropout_rate": 0.0}),
        &entries,
        &preprocess,
        &sampling,
        1,
    );
    assert_trained(&report, 1);
    let volumes = valid.volumes.len() as i64;
    assert_eq!(
        valid.labels.size(),
        vec![16 * volumes, 2, 64, 64],
        "16 axial slices per volume"
    );
    assert_eq!(output.size(), vec![1, 2, 64, 64]);
    // The two target channels are the two label files (read independently here).
    let subject = &valid.volumes[0];
    let entry = entries
        .iter()
        .find(|e| &e.image.display().to_string() == subject)
        .unwrap();
    for (k, target) in entry.targets.iter().enumerate() {
        let label = read_volume(target.as_ref().unwrap())
            .unwrap()
            .data
            .ge(0.5)
            .to_kind(Kind::Float);
        // The label's voxel count in the 64 x 64 centre equals the target channel's. CenterCrop starts at
        // round((in - out) / 2), halves to even as ivadomed: 131 -> 34, 141 -> 38.
        assert_eq!(&label.size()[..2], &[131, 141]);
        let (ox, oy) = (34, 38);
        let expected = label
            .narrow(0, ox, 64)
            .narrow(1, oy, 64)
            .sum(Kind::Float)
            .double_value(&[]);
        // the first volume's 16 slices
        let got = valid
            .labels
            .narrow(0, 0, 16)
            .select(1, k as i64)
            .sum(Kind::Float)
            .double_value(&[]);
        assert_eq!(got, expected, "target {k}");
    }
}

#[test]
fn sagittal_slices_train() {
    let _global = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    let registry = builtin_registry();
    let preprocess = crop_and_normalise(&registry, [16, 128]);
    let sampling = options(
        json!({"slice_axis": "sagittal", "slice_filter_params": {"filter_empty_mask": true}}),
    );
    let (report, valid, output) = train_on(
        "unet2d",
        json!({"n_filters": 4, "depth": 2, "dropout_rate": 0.0}),
        &functional_testing_entries(&["T2w"], &["_seg-manual"]),
        &preprocess,
        &sampling,
        2,
    );
    assert_trained(&report, 2);
    assert_eq!(&valid.images.size()[1..], &[1, 16, 128]);
    // Only the sagittal slices that cut the cord: far fewer than the 131 of the volume.
    assert!(!valid.is_empty() && valid.len() < 40, "{}", valid.len());
    assert_eq!(output.size(), vec![1, 1, 16, 128]);
}

/// The first 3 batches of one epoch (seeded order, augmentation in 2D) with `threads` libtorch threads and
/// `workers` loader workers.
fn first_batches(
    set: &SliceSet,
    augment: Option<&LivePipeline>,
    threads: i32,
    workers: usize,
) -> Vec<(Tensor, Tensor)> {
    tch::set_num_threads(threads);
    let chunks: Vec<Vec<i64>> = set
        .shuffled(21)
        .chunks(4)
        .take(3)
        .map(<[i64]>::to_vec)
        .collect();
    slice_batches(
        set,
        augment,
        chunks,
        21,
        1,
        Device::Cpu,
        LoaderOptions::new(workers),
    )
    .collect::<Result<_>>()
    .unwrap()
}

#[test]
fn the_same_seed_gives_the_same_split_and_batches_whatever_the_threads_and_workers() {
    let _global = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    let threads_before = tch::get_num_threads();
    let registry = builtin_registry();
    let entries = functional_testing_entries(&["T1w", "T2w", "T2star"], &["_seg-manual"]);
    let split = split_by_subject(&entries, 0.34, 0.0, 8).unwrap();
    let again = split_by_subject(&entries, 0.34, 0.0, 8).unwrap();
    assert_eq!((&split.train, &split.valid), (&again.train, &again.valid));
    assert!(!split.train.is_empty() && !split.valid.is_empty());
    let crop = crop_and_normalise(&registry, [64, 64]);
    let augment = LivePipeline::new(transform_pipeline(
        &registry,
        &[
            (
                "RandomAffine",
                json!({"degrees": 10.0, "translate": [0.1, 0.1], "scale": [0.1, 0.1]}),
            ),
            ("AdditiveGaussianNoise", json!({"std": 0.05})),
        ],
    ));
    let slices = SliceSet::build_sampled(
        Phase::Training,
        &split.train,
        &crop,
        8,
        &SamplingOptions::default(),
    )
    .unwrap();
    let normalise = transform_pipeline(&registry, &[("NormalizeInstance", json!({}))]);
    let subvolumes = SliceSet::build_sampled(
        Phase::Training,
        &split.train,
        &normalise,
        8,
        &options(json!({"length_3D": [48, 48, 16], "stride_3D": [48, 48, 16]})),
    )
    .unwrap();
    for (name, set, augment) in [
        ("2D slices", &slices, Some(&augment)),
        ("3D subvolumes", &subvolumes, None),
    ] {
        let reference = first_batches(set, augment, 1, 1);
        assert_eq!(reference.len(), 3);
        for (threads, workers) in [(4, 1), (1, 4), (4, 4)] {
            let batches = first_batches(set, augment, threads, workers);
            for (index, (got, expected)) in batches.iter().zip(&reference).enumerate() {
                assert!(
                    same(got, expected),
                    "{name}: batch {index} differs with {threads} threads, {workers} workers"
                );
            }
        }
    }
    // Not vacuous: the 2D augmentation changed the batch.
    let plain = slices.batch(&slices.shuffled(21)[..4], Device::Cpu);
    assert!(!same(
        &first_batches(&slices, Some(&augment), 1, 0)[0],
        &plain
    ));
    tch::set_num_threads(threads_before);
}

/// A Rhai script with the new options trains and records its sampling; a lazy cached run trains too; unknown
/// and misplaced options are refused.
#[test]
fn train_options_from_a_script() {
    let dir = tempfile::tempdir().unwrap();
    let root = functional_testing();
    let script = |options: &str, out: &str| {
        format!(
            r#"
let data = bids("{root}", #{{ contrasts: ["T2w"], target_suffix: ["_seg-manual"] }});
let model = model("unet2d", #{{ n_filters: 4, depth: 2, dropout_rate: 0.0 }});
let report = train(model, #{{
    train: subset(data, ["sub-unf01", "sub-unf02"]), valid: subset(data, ["sub-unf03"]),
    preprocess: [transform("CenterCrop", #{{ size: [16, 128] }}), transform("NormalizeInstance", #{{}})],
    epochs: 1, batch_size: 8, num_workers: 0, out: "{out}", {options}
}});
"#,
            root = root.display(),
            out = out,
        )
    };
    let run = |name: &str, options: &str| -> (bool, String, String, PathBuf) {
        let out = dir.path().join(name);
        let path = dir.path().join(format!("{name}.rhai"));
        std::fs::write(&path, script(options, &out.display().to_string())).unwrap();
        let (ok, stdout, stderr) = run_ivado(&["run", path.to_str().unwrap()], "warn");
        (ok, stdout, stderr, out)
    };
    let (ok, stdout, stderr, out) = run(
        "sagittal",
        r#"slice_axis: "sagittal", slice_filter_params: #{ filter_empty_mask: true }"#,
    );
    assert!(ok, "{stdout}\n{stderr}");
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            out.join("model")
                .join(ivado_runtime::model_folder::CONFIG_FILE),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(saved["data"]["sampling"]["mode"], "2d");
    assert_eq!(saved["data"]["sampling"]["slice_axis"], "sagittal");
    assert_eq!(saved["data"]["slice_axis"], "sagittal");

    let cache_dir = dir.path().join("cache");
    let (ok, stdout, stderr, out) = run(
        "cached",
        &format!(
            r#"cache: #{{ budget_mb: 1, disk: "{}" }}"#,
            cache_dir.display()
        ),
    );
    assert!(ok, "{stdout}\n{stderr}");
    assert!(out.join("model").exists());
    assert!(
        std::fs::read_dir(&cache_dir).unwrap().count() >= 2,
        "prepared volumes were kept on disk"
    );

    // The lazy path serves any sampling: sagittal slices under a 1 MiB budget.
    let (ok, stdout, stderr, out) = run(
        "cached_sagittal",
        r#"cache: #{ budget_mb: 1 }, slice_axis: "sagittal""#,
    );
    assert!(ok, "{stdout}\n{stderr}");
    assert!(out.join("model").exists());

    for (name, options, message) in [
        ("unknown", "slice_axes: \"axial\"", "slice_axes"),
        (
            "both",
            "length_2D: [16, 16], length_3D: [16, 16, 16]",
            "not both",
        ),
        (
            "cache_balanced",
            "cache: #{ budget_mb: 1 }, balanced_epochs: 1",
            "balanced_epochs",
        ),
    ] {
        let (ok, stdout, stderr, _) = run(name, options);
        assert!(!ok, "{name} should fail:\n{stdout}");
        assert!(
            stderr.contains(message) || stdout.contains(message),
            "{name}: {stderr}"
        );
    }
}
