//! Training and segmentation through the runtime's primitives, on ivadomed's real spinal-cord test data and on
//! generated phantoms.
use ivado_runtime::bids::{BidsIndex, BidsQuery};
use ivado_runtime::data::SliceSet;
use ivado_runtime::pipeline::{LivePipeline, Pipeline};
use ivado_runtime::plugin::PluginRegistry;
use ivado_runtime::{infer, model_folder, phantom};
use ivado_tests::{
    assert_same_geometry, builtin_registry, functional_testing_entries, nifti_voxels,
    small_train_config, t2w_entry, train_small_model, transform_pipeline,
};
use serde_json::json;
use std::path::Path;
use tch::Device;

/// libtorch's random generator is process-global: tests that seed it must not interleave.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pipeline(registry: &PluginRegistry, crop: i64) -> Pipeline {
    transform_pipeline(
        registry,
        &[
            ("Resample", json!({"spacing": [1.0, 1.0]})),
            ("CenterCrop", json!({"size": [crop, crop]})),
            ("NormalizeInstance", json!({})),
        ],
    )
}

#[test]
fn training_on_spinal_cord_data_lowers_the_loss_and_the_segmentation_overlays_its_source() {
    let _rng = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let entries = functional_testing_entries(&["T2w"], &["_seg-manual"]);
    let registry = builtin_registry();
    let pipeline = pipeline(&registry, 64);
    let train_set = SliceSet::build(
        &[
            t2w_entry(&entries, "sub-unf01"),
            t2w_entry(&entries, "sub-unf02"),
        ],
        &pipeline,
        0,
    )
    .unwrap();
    let valid_set = SliceSet::build(&[t2w_entry(&entries, "sub-unf03")], &pipeline, 0).unwrap();
    assert_eq!(
        (train_set.len(), valid_set.len()),
        (32, 16),
        "16 axial slices per volume"
    );

    let out = tempfile::tempdir().unwrap();
    let (_, report) = train_small_model(
        &registry,
        (
            "unet2d",
            json!({"depth": 2, "n_filters": 8, "dropout_rate": 0.0}),
        ),
        &pipeline,
        (&train_set, &valid_set),
        &json!({}),
        &small_train_config(out.path(), 5, 3),
        None,
    );
    let losses: Vec<f64> = report.history.iter().map(|r| r.train_loss).collect();
    assert!(
        losses.last().unwrap() < &(losses[0] - 0.05),
        "training loss did not fall: {losses:?}"
    );

    // The metrics CSV has a header and one row per epoch; the best model folder has weights and description.
    let csv = std::fs::read_to_string(&report.metrics_csv).unwrap();
    assert_eq!(csv.lines().count(), 6);
    assert!(csv.starts_with("epoch,train_loss,valid_loss,valid_dice"));
    assert!(report.model_dir.join(model_folder::WEIGHTS_FILE).is_file());
    assert!(report.last_checkpoint.ends_with("checkpoints/epoch-0005"));
    assert!(report
        .last_checkpoint
        .join("optimizer.safetensors")
        .is_file());
    assert!(out.path().join("manifest.json").is_file());

    // Segment the validation subject from the model folder alone, and write it next to nothing else.
    let loaded = model_folder::load(&report.model_dir, &registry, Device::Cpu).unwrap();
    let source_path = t2w_entry(&entries, "sub-unf03").image;
    let (source, soft) = infer::segment_volume(&loaded, &source_path, Device::Cpu, 8).unwrap();
    let prediction_path = out.path().join("sub-unf03_T2w_pred.nii.gz");
    infer::write_segmentation(&source, &soft, &prediction_path, 0.5).unwrap();

    // Same shape and world placement as the source, compared field by field on the raw headers.
    assert_same_geometry(&prediction_path, &source_path, "prediction");
    let values = nifti_voxels(&prediction_path);
    assert!(
        values.iter().all(|&v| v == 0.0 || v == 1.0),
        "the mask is not binary"
    );
}

/// One epoch on a generated phantom with random augmentations (affine, elastic, gamma, noise), returning the
/// weights file's bytes.
fn train_phantom_once(data: &Path, out: &Path, seed: u64) -> Vec<u8> {
    let registry = builtin_registry();
    let index = BidsIndex::scan(
        data,
        &BidsQuery {
            target_suffix: "_seg-manual",
            contrasts: None,
        },
    )
    .unwrap();
    let split = ivado_runtime::data::split_by_subject(&index.entries, 0.25, 0.0, seed).unwrap();
    let pipeline = pipeline(&registry, 32);
    let train_set = SliceSet::build(&split.train, &pipeline, seed).unwrap();
    let valid_set = SliceSet::build(&split.valid, &pipeline, seed).unwrap();
    let augment = LivePipeline::new(
        Pipeline::from_specs(
            &registry,
            &[
                json!({"name": "RandomAffine", "config": {"degrees": 10.0, "translate": [0.05, 0.05], "scale": [0.1, 0.1]}}),
                json!({"name": "ElasticTransform", "config": {"alpha_range": [10.0, 20.0], "sigma_range": [3.0, 4.0], "p": 0.5}}),
                json!({"name": "RandomGamma", "config": {"log_gamma_range": [-0.3, 0.3], "p": 0.5}}),
                json!({"name": "AdditiveGaussianNoise", "config": {"std": 0.05}}),
            ],
        )
        .unwrap(),
    );
    let (_, report) = train_small_model(
        &registry,
        ("unet2d", json!({"depth": 2, "n_filters": 4})),
        &pipeline,
        (&train_set, &valid_set),
        &json!({}),
        &small_train_config(out, 1, seed),
        Some(&augment),
    );
    assert!(report.model_dir.is_dir());
    std::fs::read(report.last_checkpoint.join(model_folder::WEIGHTS_FILE)).unwrap()
}

#[test]
fn the_same_seed_gives_bit_identical_weights() {
    let _rng = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let data = tempfile::tempdir().unwrap();
    let spec = phantom::PhantomSpec {
        subjects: 4,
        shape: [40, 40, 6],
        ..Default::default()
    };
    phantom::generate(data.path(), &spec).unwrap();
    let runs: Vec<Vec<u8>> = [7, 7, 8]
        .iter()
        .map(|&seed| train_phantom_once(data.path(), tempfile::tempdir().unwrap().path(), seed))
        .collect();
    assert!(
        runs[0] == runs[1],
        "two runs with seed 7 gave different weights"
    );
    assert!(
        runs[0] != runs[2],
        "seeds 7 and 8 gave identical weights: the seed is not used"
    );
}
