//! Shared helpers for the end-to-end tests in this crate.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ivado_runtime::bids::{BidsEntry, BidsIndex, BidsOptions};
use ivado_runtime::data::SliceSet;
use ivado_runtime::pipeline::{LivePipeline, Pipeline};
use ivado_runtime::plugin::{PluginModel, PluginRegistry, SearchPath};
use ivado_runtime::train::{seed_everything, train, TrainConfig, TrainReport};
use serde_json::{json, Value};
use tch::Device;

/// `target/<profile>`: where cargo put the plugin and fixture libraries next to the test binaries' `deps/`.
pub fn artifact_dir() -> PathBuf {
    ivado_runtime::plugin::builtin_plugin_dir().expect("cannot locate the cargo target directory")
}

/// A built test-fixture library, e.g. `fixture_library("panicky")` for `libivado_fixture_panicky.so`.
pub fn fixture_library(name: &str) -> PathBuf {
    let path = artifact_dir().join(format!("libivado_fixture_{name}.so"));
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`cargo build --release --workspace`)",
        path.display()
    );
    path
}

/// The real data shipped beside the repo (ivadomed's test datasets).
pub fn shared_data(relative: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    let path = root.join(relative);
    assert!(
        path.exists(),
        "{} is missing: the tests need ../shared/data next to the repository",
        path.display()
    );
    path
}

/// Runs the built `ivado` binary on the CPU without progress bars; returns (success, stdout, stderr).
/// `log` is the RUST_LOG filter.
pub fn run_ivado(args: &[&str], log: &str) -> (bool, String, String) {
    let output = Command::new(artifact_dir().join("ivado"))
        .args(["--device", "cpu", "--no-progress"])
        .args(args)
        .env("RUST_LOG", log)
        .output()
        .expect("run ivado");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

/// ivadomed's functional-testing dataset: 3 subjects, T1w, T2w and T2star, T2w volumes of 131 x 141 x 16.
pub fn functional_testing() -> PathBuf {
    shared_data("data_functional_testing")
}

/// data_functional_testing indexed with the given contrasts and target suffixes (ivadomed's names).
pub fn functional_testing_entries(contrasts: &[&str], targets: &[&str]) -> Vec<BidsEntry> {
    let options = BidsOptions::from_json(&json!({
        "contrasts": contrasts,
        "target_suffix": targets,
    }))
    .unwrap();
    BidsIndex::build(&[functional_testing()], &options)
        .unwrap()
        .entries
}

/// The T2w image of `subject` among `entries`.
pub fn t2w_entry(entries: &[BidsEntry], subject: &str) -> BidsEntry {
    entries
        .iter()
        .find(|e| e.subject == subject && e.contrast == "T2w")
        .unwrap_or_else(|| panic!("no T2w image of {subject}"))
        .clone()
}

/// The plugins built with the workspace.
pub fn builtin_registry() -> PluginRegistry {
    PluginRegistry::discover(&SearchPath::standard(&[]))
}

/// A pipeline of the transforms `(name, config)`, every one running in every phase.
pub fn transform_pipeline(registry: &PluginRegistry, steps: &[(&str, Value)]) -> Pipeline {
    Pipeline {
        steps: steps
            .iter()
            .map(|(name, config)| Arc::new(registry.transform(name, config).unwrap()))
            .collect(),
    }
}

/// CenterCrop to `size`, then NormalizeInstance: the preprocessing of most small training runs here.
pub fn crop_and_normalise(registry: &PluginRegistry, size: [i64; 2]) -> Pipeline {
    transform_pipeline(
        registry,
        &[
            ("CenterCrop", json!({ "size": size })),
            ("NormalizeInstance", json!({})),
        ],
    )
}

/// The small training runs here: `epochs` epochs of batches of 8, Adam at 3e-3, on the CPU.
pub fn small_train_config(out: &Path, epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 8,
        seed,
        optimizer: json!({"name": "Adam", "lr": 3e-3}),
        ..TrainConfig::new(out, Device::Cpu)
    }
}

/// Seeds libtorch with `config.seed`, makes the `(architecture, model config)` model on the CPU and trains it
/// on the `(train, valid)` sets as `config` says, `data` being recorded in the model folder. Returns the
/// trained model and the report.
pub fn train_small_model(
    registry: &PluginRegistry,
    (architecture, model_config): (&str, Value),
    preprocess: &Pipeline,
    (train_set, valid_set): (&SliceSet, &SliceSet),
    data: &Value,
    config: &TrainConfig,
    augment: Option<&LivePipeline>,
) -> (PluginModel, TrainReport) {
    seed_everything(config.seed);
    let model = registry
        .model(architecture, &model_config, Device::Cpu)
        .unwrap();
    let report = train(
        &model, preprocess, train_set, valid_set, data, config, augment,
    )
    .unwrap();
    (model, report)
}

/// The NIfTI header fields that place a volume in world space, as raw values: (dim, pixdim, sform_code,
/// qform_code, srow_x/y/z, quaternion and offsets, xyzt_units).
pub type NiftiGeometry = (Vec<u16>, Vec<f32>, i16, i16, Vec<f32>, Vec<f32>, u8);

pub fn nifti_geometry(path: &Path) -> NiftiGeometry {
    let header = nifti::NiftiHeader::from_file(path).unwrap();
    let mut srow = header.srow_x.to_vec();
    srow.extend(header.srow_y);
    srow.extend(header.srow_z);
    let quaternion = vec![
        header.quatern_b,
        header.quatern_c,
        header.quatern_d,
        header.quatern_x,
        header.quatern_y,
        header.quatern_z,
    ];
    (
        header.dim.to_vec(),
        header.pixdim.to_vec(),
        header.sform_code,
        header.qform_code,
        srow,
        quaternion,
        header.xyzt_units,
    )
}

/// Asserts that `written` has the shape and world placement of `source`, field by field on the raw headers;
/// `what` names the written file in a failure.
pub fn assert_same_geometry(written: &Path, source: &Path, what: &str) {
    let (src, got) = (nifti_geometry(source), nifti_geometry(written));
    assert_eq!(got.0, src.0, "{what}: dim");
    assert_eq!(got.1, src.1, "{what}: pixdim");
    assert_eq!((got.2, got.3), (src.2, src.3), "{what}: sform/qform codes");
    assert_eq!(got.4, src.4, "{what}: srow_x/y/z");
    assert_eq!(got.5, src.5, "{what}: quaternion and offsets");
    assert_eq!(got.6, src.6, "{what}: xyzt_units");
}

/// Raw voxel values of a NIfTI file in the file's own order.
pub fn nifti_voxels(path: &Path) -> Vec<f32> {
    let object = nifti::ReaderOptions::new().read_file(path).unwrap();
    let volume = nifti::NiftiObject::into_volume(object);
    let array = nifti::IntoNdArray::into_ndarray::<f32>(volume).unwrap();
    array.iter().copied().collect()
}
