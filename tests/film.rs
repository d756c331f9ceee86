//! FiLM end to end on ivadomed's functional-testing data: a film_unet trained with `metadata: "mri_params"`
//! records the encoder fitted on its training set in the model folder, and `segment` (CLI and Rhai) encodes
//! an image's sidecar, or `--metadata` overrides, with it.
use ivado_tests::{run_ivado, shared_data};
use serde_json::Value;
use std::path::{Path, PathBuf};

const FILM_LAYERS: &str = "[1, 1, 1, 1, 1, 1]";

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

/// A script that trains a tiny film_unet for 2 epochs on sub-unf01/02 (`contrasts`), validating on sub-unf03,
/// and prints each training image as `train image <path>` and the best model folder as `model <dir>`.
fn training_script(model: &str, model_config: &str, contrasts: &str, metadata: &str) -> String {
    format!(
        r#"
let dataset = bids(ARGS[0], #{{ target_suffix: "_seg-manual", contrasts: {contrasts} }});
let train_set = subset(dataset, ["sub-unf01", "sub-unf02"]);
let valid_set = subset(dataset, ["sub-unf03"]);
for e in train_set.entries() {{ print(`train image ${{e.image}}`); }}
seed(3);
let result = train(model("{model}", {model_config}), #{{
    train: train_set,
    valid: valid_set,
    preprocess: [transform("CenterCrop", #{{ size: [96, 96] }}), transform("NormalizeInstance", #{{}})],
    epochs: 2,
    batch_size: 8,
    learning_rate: 0.003,
    metadata: {metadata},
    seed: 3,
    num_workers: 0,
    out: ARGS[1],
}});
print(`model ${{result.model_dir}}`);
"#
    )
}

/// The sidecar of a `.nii.gz` image.
fn sidecar_of(image: &str) -> Value {
    let path = image.strip_suffix(".nii.gz").unwrap().to_owned() + ".json";
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Mean and population standard deviation.
fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, variance.sqrt())
}

/// The soft prediction `ivado segment --soft` wrote into `dir`, as a flat vector.
fn soft_map(dir: &Path) -> Vec<f32> {
    let soft: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("_soft.nii.gz"))
        .collect();
    assert_eq!(soft.len(), 1, "one soft map expected in {}", dir.display());
    let data = ivado_runtime::volume::read_volume(&soft[0]).unwrap().data;
    Vec::<f32>::try_from(&data.flatten(0, -1)).unwrap()
}

fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_film_unet_trains_on_mri_params_and_segments_with_the_recorded_encoder() {
    let data = shared_data("data_functional_testing");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // FlipAngle, RepetitionTime, EchoTime, and one Manufacturer (all Siemens): n_metadata 4.
    let config = format!(
        "#{{ depth: 2, n_filters: 4, n_metadata: 4, film_layers: {FILM_LAYERS}, dropout_rate: 0.0 }}"
    );
    let body = training_script("film_unet", &config, r#"["T1w", "T2w"]"#, r#""mri_params""#);
    let path = script(dir.path(), "film.rhai", &body);
    let (ok, stdout, stderr) = run_ivado(
        &[
            "run",
            &path,
            &data.display().to_string(),
            &run.display().to_string(),
        ],
        "warn",
    );
    assert!(ok, "{stdout}\n{stderr}");
    let train_images: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("train image "))
        .collect();
    // Both contrasts train, so the metadata really varies (T1w: FA 9, TR 2, TE 0.00372; T2w: FA 120, TR 1.5,
    // TE 0.12).
    assert!(train_images.iter().any(|i| i.ends_with("_T1w.nii.gz")));
    assert!(train_images.iter().any(|i| i.ends_with("_T2w.nii.gz")));
    let model_dir = PathBuf::from(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("model "))
            .expect("the script prints the model folder"),
    );

    // The encoder in the folder holds the training set's statistics, recomputed here from the training
    // images' own sidecars (sub-unf03, the validation subject, must not count).
    let description: Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("ivado_model.json")).unwrap())
            .unwrap();
    let encoder = &description["metadata_encoder"];
    assert_eq!(encoder["metadata"], "mri_params");
    assert_eq!(encoder["manufacturer_codes"], serde_json::json!([0]));
    let sidecars: Vec<Value> = train_images.iter().map(|i| sidecar_of(i)).collect();
    for (index, key) in ["FlipAngle", "RepetitionTime", "EchoTime"]
        .iter()
        .enumerate()
    {
        let values: Vec<f64> = sidecars.iter().map(|s| s[key].as_f64().unwrap()).collect();
        let (mean, std) = mean_std(&values);
        let stored = &encoder["numeric"][index];
        assert_eq!(stored["name"], *key);
        let (stored_mean, stored_std) = (
            stored["mean"].as_f64().unwrap(),
            stored["std"].as_f64().unwrap(),
        );
        assert!(
            (stored_mean - mean).abs() <= 1e-9 * mean.abs().max(1.0),
            "{key}: {stored_mean} vs {mean}"
        );
        assert!(
            (stored_std - std).abs() <= 1e-9 * std.max(1.0),
            "{key}: {stored_std} vs {std}"
        );
        assert!(std > 0.0, "{key} varies between T1w and T2w");
    }
    // Every checkpoint is a model folder too, with the same encoder.
    let checkpoints = run.join("checkpoints");
    for checkpoint in std::fs::read_dir(&checkpoints).unwrap() {
        let checkpoint = checkpoint.unwrap().path();
        let saved: Value = serde_json::from_str(
            &std::fs::read_to_string(checkpoint.join("ivado_model.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(saved["metadata_encoder"], *encoder);
    }

    // Segment the validation T2w volume from its sidecar, then with FlipAngle overridden.
    let image = data.join("sub-unf03/anat/sub-unf03_T2w.nii.gz");
    let image = image.display().to_string();
    let model = model_dir.display().to_string();
    let segment = |out: &Path, extra: &[&str]| {
        let out = out.display().to_string();
        let mut args = vec!["segment", "--model", &model, "--soft", "-o", &out];
        args.extend_from_slice(extra);
        args.push(&image);
        run_ivado(&args, "warn")
    };
    let from_sidecar = dir.path().join("from_sidecar");
    let (ok, _, stderr) = segment(&from_sidecar, &[]);
    assert!(ok, "{stderr}");
    let same_angle = dir.path().join("same_angle");
    let (ok, _, stderr) = segment(&same_angle, &["--metadata", "FlipAngle=120"]);
    assert!(ok, "{stderr}");
    let other_angle = dir.path().join("other_angle");
    let (ok, _, stderr) = segment(&other_angle, &["--metadata", "FlipAngle=9"]);
    assert!(ok, "{stderr}");
    let (sidecar_soft, same_soft, other_soft) = (
        soft_map(&from_sidecar),
        soft_map(&same_angle),
        soft_map(&other_angle),
    );
    // The sidecar's FlipAngle is 120: overriding it with 120 changes nothing, bit for bit.
    assert_eq!(max_abs_difference(&sidecar_soft, &same_soft), 0.0);
    // FlipAngle 9 encodes differently ((9 - mean) / std instead of (120 - mean) / std) and every FiLM layer
    // sees it: the prediction moves.
    let moved = max_abs_difference(&sidecar_soft, &other_soft);
    assert!(
        moved > 1e-4,
        "FlipAngle did not change the output ({moved})"
    );

    // The Rhai `segment` takes the same override and gives the same prediction as the CLI.
    let rhai_out = dir.path().join("rhai");
    let rhai = script(
        dir.path(),
        "segment.rhai",
        &format!(
            "let m = load_model({model:?});\nsegment(m, {image:?}, #{{ out: {:?}, soft: true, metadata: #{{ FlipAngle: 9 }} }});\n",
            rhai_out.display().to_string()
        ),
    );
    let (ok, stdout, stderr) = run_ivado(&["run", &rhai], "warn");
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(max_abs_difference(&soft_map(&rhai_out), &other_soft), 0.0);

    // A missing key is named, with the way to give it.
    let bare = dir.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    let bare_image = bare.join("sub-unf03_T2w.nii.gz");
    std::fs::copy(&image, &bare_image).unwrap();
    let bare_image = bare_image.display().to_string();
    let (ok, _, stderr) = run_ivado(
        &[
            "segment",
            "--model",
            &model,
            "-o",
            &dir.path().join("bare_out").display().to_string(),
            "--metadata",
            "FlipAngle=90",
            &bare_image,
        ],
        "warn",
    );
    assert!(!ok);
    assert!(
        stderr.contains("has no RepetitionTime") && stderr.contains("--metadata"),
        "{stderr}"
    );

    // The same weights without the encoder section are refused: nothing says how to encode the metadata.
    let stripped = dir.path().join("stripped");
    std::fs::create_dir_all(&stripped).unwrap();
    for file in ["model.safetensors", "ivado_model.json"] {
        std::fs::copy(model_dir.join(file), stripped.join(file)).unwrap();
    }
    let mut without = description.clone();
    without.as_object_mut().unwrap().remove("metadata_encoder");
    std::fs::write(
        stripped.join("ivado_model.json"),
        serde_json::to_string_pretty(&without).unwrap(),
    )
    .unwrap();
    let (ok, _, stderr) = run_ivado(
        &[
            "segment",
            "--model",
            &stripped.display().to_string(),
            "-o",
            &dir.path().join("stripped_out").display().to_string(),
            &image,
        ],
        "warn",
    );
    assert!(!ok);
    assert!(
        stderr.contains("FiLM model") && stderr.contains("metadata_encoder"),
        "{stderr}"
    );
}

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs a training script that is expected to fail; returns its stderr.
fn failing_training(data: &Path, model: &str, config: &str, metadata: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let body = training_script(model, config, r#"["T2w"]"#, metadata);
    let path = script(dir.path(), "refused.rhai", &body);
    let (ok, stdout, stderr) = run_ivado(
        &[
            "run",
            &path,
            &data.display().to_string(),
            &dir.path().join("run").display().to_string(),
        ],
        "warn",
    );
    assert!(!ok, "training should have been refused:\n{stdout}");
    stderr
}

#[test]
fn mri_params_training_refuses_models_and_entries_that_do_not_fit() {
    let data = shared_data("data_functional_testing");
    // One manufacturer in training: 3 + 1 = 4 values, not 3.
    let config =
        format!("#{{ depth: 2, n_filters: 4, n_metadata: 3, film_layers: {FILM_LAYERS} }}");
    let error = failing_training(&data, "film_unet", &config, r#""mri_params""#);
    assert!(
        error.contains("n_metadata = 3") && error.contains("set n_metadata to 4"),
        "{error}"
    );
    // A model without a metadata input.
    let error = failing_training(
        &data,
        "unet2d",
        "#{ depth: 2, n_filters: 4 }",
        r#""mri_params""#,
    );
    assert!(error.contains("needs a FiLM model"), "{error}");
    // Only ivadomed's mri_params is known.
    let error = failing_training(
        &data,
        "unet2d",
        "#{ depth: 2, n_filters: 4 }",
        r#""contrasts""#,
    );
    assert!(
        error.contains("`metadata` must be \"mri_params\""),
        "{error}"
    );

    // A training image whose sidecar lacks EchoTime: refused, naming the image and the key.
    let copy = tempfile::tempdir().unwrap();
    copy_tree(&data, copy.path());
    let sidecar = copy.path().join("sub-unf02/anat/sub-unf02_T2w.json");
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(&sidecar).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("EchoTime");
    std::fs::write(&sidecar, serde_json::to_string(&json).unwrap()).unwrap();
    let config =
        format!("#{{ depth: 2, n_filters: 4, n_metadata: 4, film_layers: {FILM_LAYERS} }}");
    let error = failing_training(copy.path(), "film_unet", &config, r#""mri_params""#);
    assert!(
        error.contains("sub-unf02_T2w.nii.gz has no EchoTime"),
        "{error}"
    );
}
