//! Pipeline steps with ivadomed's `applied_to` / `dataset_type`, Rhai script transforms, and hot reload of
//! script and plugin steps while `ivado watch` trains.
use ivado_runtime::pipeline::{DataKind, Phase, Pipeline, Step, StepOptions, StepTransform, Steps};
use ivado_runtime::plugin::{PluginRegistry, SearchPath};
use ivado_runtime::script_transform::ScriptTransform;
use ivado_sdk::Sample;
use ivado_tests::{artifact_dir, fixture_library};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::Tensor;

fn registry() -> PluginRegistry {
    PluginRegistry::discover(&SearchPath::standard(&[]))
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A sample whose image is 1..=64 and label 101..=164, both `[1, 8, 8]`, spacing 1 mm.
fn sample() -> Sample {
    let mut sample = Sample::new();
    sample.insert(
        "image",
        Tensor::arange_start(1, 65, (tch::Kind::Float, tch::Device::Cpu)).view([1, 8, 8]),
    );
    sample.insert(
        "label",
        Tensor::arange_start(101, 165, (tch::Kind::Float, tch::Device::Cpu)).view([1, 8, 8]),
    );
    sample.set_spacing(&[1.0, 1.0]);
    sample
}

fn values(tensor: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(tensor.flatten(0, -1)).unwrap()
}

fn script_step(path: &Path, function: &str, undo: Option<&str>, options: StepOptions) -> Step {
    Step {
        transform: StepTransform::Script(Arc::new(
            ScriptTransform::load(path, function, undo).unwrap(),
        )),
        options,
    }
}

fn plugin_step(registry: &PluginRegistry, name: &str, config: serde_json::Value) -> Step {
    let mut config = config;
    let options = StepOptions::take_from(&mut config).unwrap();
    Step {
        transform: StepTransform::Plugin(Arc::new(registry.transform(name, &config).unwrap())),
        options,
    }
}

fn pipeline(steps: Vec<Step>) -> Pipeline {
    Pipeline {
        steps: Steps(steps),
    }
}

const DOUBLE: &str = "// doubles every image voxel\nfn double(sample) {\n    sample.image = sample.image * 2;\n    sample\n}\n\nfn halve(sample) {\n    sample.prediction = sample.prediction / 2;\n    sample\n}\n";

#[test]
fn a_script_step_doubles_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "double.rhai", DOUBLE);
    let steps = pipeline(vec![script_step(
        &path,
        "double",
        None,
        StepOptions::default(),
    )]);
    let (out, records) = steps.apply_in(Phase::Training, sample(), 0).unwrap();
    // Expected: 2 * (1..=64), written out independently of any tensor op.
    let expected: Vec<f32> = (1..=64).map(|v| 2.0 * v as f32).collect();
    assert_eq!(values(out.get("image").unwrap()), expected);
    assert_eq!(
        values(out.get("label").unwrap()),
        (101..=164).map(|v| v as f32).collect::<Vec<_>>()
    );
    assert_eq!(records, vec![Some(serde_json::Value::Null)]);
}

#[test]
fn script_steps_round_trip_through_specs_with_their_source_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "double.rhai", DOUBLE);
    let registry = registry();
    let original = pipeline(vec![
        plugin_step(
            &registry,
            "CenterCrop",
            json!({"size": [4, 4], "dataset_type": ["training", "testing"]}),
        ),
        script_step(
            &path,
            "double",
            Some("halve"),
            StepOptions {
                applied_to: vec![DataKind::Image],
                ..Default::default()
            },
        ),
    ]);
    let specs = original.specs();
    assert_eq!(
        specs[0],
        json!({"name": "CenterCrop", "config": {"size": [4, 4]}, "dataset_type": ["training", "testing"]})
    );
    assert_eq!(specs[1]["script"]["source"], json!(DOUBLE));
    assert_eq!(specs[1]["script"]["function"], json!("double"));
    assert_eq!(specs[1]["script"]["undo"], json!("halve"));
    assert_eq!(specs[1]["applied_to"], json!(["im"]));
    // ivadomed's config files put the keyed options inside the transform's parameters; both forms load.
    let inside = Pipeline::from_specs(
        &registry,
        &[json!({"name": "CenterCrop", "config": {"size": [4, 4], "dataset_type": ["testing", "training"]}})],
    )
    .unwrap();
    assert_eq!(inside.specs()[0], specs[0]);
    // The model folder must not need the file: rebuild after deleting it.
    std::fs::remove_file(&path).unwrap();
    let rebuilt = Pipeline::from_specs(&registry, &specs).unwrap();
    assert_eq!(rebuilt.specs(), specs);
    let (a, _) = original.apply_in(Phase::Testing, sample(), 3).unwrap();
    let (b, _) = rebuilt.apply_in(Phase::Testing, sample(), 3).unwrap();
    assert_eq!(
        values(a.get("image").unwrap()),
        values(b.get("image").unwrap())
    );
    // Centre 4x4 of the 8x8 image starts at (2, 2): values (r * 8 + c + 1) * 2 for r, c in 2..6.
    let expected: Vec<f32> = (2..6)
        .flat_map(|r| (2..6).map(move |c| 2.0 * (r * 8 + c + 1) as f32))
        .collect();
    assert_eq!(values(b.get("image").unwrap()), expected);
}

#[test]
fn a_syntax_error_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "broken.rhai",
        "fn step(sample) {\n    let x = (1 + ;\n    sample\n}\n",
    );
    let error = format!(
        "{:#}",
        ScriptTransform::load(&path, "step", None).err().unwrap()
    );
    assert!(
        error.starts_with(&format!("{}:2:", path.display())),
        "{error}"
    );
    // A runtime error inside the function points into it too (line 3, where the unknown function is called).
    let path = write(dir.path(), "fails.rhai", "fn step(sample) {\n    let x = sample.image;\n    sample.image = no_such(x);\n    sample\n}\n");
    let steps = pipeline(vec![script_step(
        &path,
        "step",
        None,
        StepOptions::default(),
    )]);
    let error = format!("{:#}", steps.apply(sample(), 0).err().unwrap());
    assert!(
        error.contains(&format!("{}:3:20:", path.display())),
        "{error}"
    );
    assert!(error.contains("no_such"), "{error}");
    let error = format!(
        "{:#}",
        ScriptTransform::load(&path, "missing", None).err().unwrap()
    );
    assert!(error.contains("no function `missing(sample)`"), "{error}");
}

#[test]
fn applied_to_limits_a_step_to_the_selected_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "double.rhai",
        "fn double_label(sample) {\n    sample.label = sample.label * 2;\n    sample\n}\n",
    );
    let registry = registry();
    let steps = pipeline(vec![
        plugin_step(
            &registry,
            "CenterCrop",
            json!({"size": [4, 4], "applied_to": ["im"]}),
        ),
        script_step(
            &path,
            "double_label",
            None,
            StepOptions {
                applied_to: vec![DataKind::Label],
                ..Default::default()
            },
        ),
    ]);
    let (out, records) = steps.apply_in(Phase::Validation, sample(), 0).unwrap();
    assert_eq!(out.get("image").unwrap().size(), vec![1, 4, 4]);
    // The crop did not touch the label; the script doubled it (and saw no image to change).
    assert_eq!(out.get("label").unwrap().size(), vec![1, 8, 8]);
    assert_eq!(
        values(out.get("label").unwrap()),
        (101..=164).map(|v| 2.0 * v as f32).collect::<Vec<_>>()
    );
    assert!(records.iter().all(Option::is_some));
    // A step that sees nothing present does not run: only an image at inference, step applied to gt only.
    let mut image_only = Sample::new();
    image_only.insert(
        "image",
        Tensor::ones([1, 8, 8], (tch::Kind::Float, tch::Device::Cpu)),
    );
    let (_, records) = steps.apply_in(Phase::Testing, image_only, 0).unwrap();
    assert!(records[0].is_some());
    assert_eq!(records[1], None);
}

#[test]
fn dataset_type_selects_phases_and_undo_reverses_only_what_ran() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "double.rhai", DOUBLE);
    let registry = registry();
    let steps = pipeline(vec![
        // Intensity-only script: applies to images, so a prediction never needs it undone.
        script_step(
            &path,
            "double",
            None,
            StepOptions {
                applied_to: vec![DataKind::Image],
                ..Default::default()
            },
        ),
        plugin_step(
            &registry,
            "CenterCrop",
            json!({"size": [2, 2], "dataset_type": ["training"]}),
        ),
        plugin_step(&registry, "CenterCrop", json!({"size": [6, 6]})),
    ]);
    let (training, _) = steps.apply_in(Phase::Training, sample(), 0).unwrap();
    assert_eq!(training.get("image").unwrap().size(), vec![1, 6, 6]);
    assert_eq!(training.get("label").unwrap().size(), vec![1, 6, 6]);
    let (testing, records) = steps.apply_in(Phase::Testing, sample(), 0).unwrap();
    assert_eq!(
        records.iter().map(Option::is_some).collect::<Vec<_>>(),
        vec![true, false, true]
    );
    // The training-only 2x2 crop did not run: the 6x6 centre (offset 1) of 2 * (1..=64).
    let expected: Vec<f32> = (1..7)
        .flat_map(|r| (1..7).map(move |c| 2.0 * (r * 8 + c + 1) as f32))
        .collect();
    assert_eq!(values(testing.get("image").unwrap()), expected);

    // Undo on a prediction of ones: only the 6x6 crop is reversed (zero padding back to 8x8, ones at rows and
    // columns 1..7); the script step ran on images only and the 2x2 crop never ran.
    let mut prediction = Sample {
        tensors: Default::default(),
        meta: testing.meta.clone(),
    };
    prediction.insert(
        "prediction",
        Tensor::ones([1, 6, 6], (tch::Kind::Float, tch::Device::Cpu)),
    );
    let restored = steps.undo(prediction, &records).unwrap();
    let expected: Vec<f32> = (0..8)
        .flat_map(|r| {
            (0..8).map(move |c| {
                if (1..7).contains(&r) && (1..7).contains(&c) {
                    1.0
                } else {
                    0.0
                }
            })
        })
        .collect();
    assert_eq!(values(restored.get("prediction").unwrap()), expected);
}

#[test]
fn an_applied_step_that_cannot_be_undone_fails_inference_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "double.rhai", DOUBLE);
    let registry = registry();
    let elastic = json!({"alpha_range": [1.0, 2.0], "sigma_range": [3.0, 4.0], "p": 1.0});
    let prediction = || {
        let mut s = Sample::new();
        s.insert(
            "prediction",
            Tensor::ones([1, 8, 8], (tch::Kind::Float, tch::Device::Cpu)),
        );
        s.set_spacing(&[1.0, 1.0]);
        s
    };
    let steps = pipeline(vec![plugin_step(
        &registry,
        "ElasticTransform",
        elastic.clone(),
    )]);
    let (_, records) = steps.apply_in(Phase::Testing, sample(), 0).unwrap();
    let error = format!("{:#}", steps.undo(prediction(), &records).err().unwrap());
    assert!(
        error.contains("step 1 `ElasticTransform` was applied to this image and cannot be undone"),
        "{error}"
    );
    // Training-only, it never runs at inference and nothing needs undoing.
    let mut training_only = elastic.clone();
    training_only["dataset_type"] = json!(["training"]);
    let steps = pipeline(vec![plugin_step(
        &registry,
        "ElasticTransform",
        training_only,
    )]);
    let (_, records) = steps.apply_in(Phase::Testing, sample(), 0).unwrap();
    assert_eq!(records, vec![None]);
    assert!(steps.undo(prediction(), &records).is_ok());

    // A script step on labels without an undo function is refused by name; with one, it is undone.
    let steps = pipeline(vec![script_step(
        &path,
        "double",
        None,
        StepOptions::default(),
    )]);
    let (_, records) = steps.apply_in(Phase::Testing, sample(), 0).unwrap();
    let error = format!("{:#}", steps.undo(prediction(), &records).err().unwrap());
    assert!(error.contains("step 1 script `double`"), "{error}");
    assert!(error.contains("has no undo function"), "{error}");
    let steps = pipeline(vec![script_step(
        &path,
        "double",
        Some("halve"),
        StepOptions::default(),
    )]);
    let (_, records) = steps.apply_in(Phase::Testing, sample(), 0).unwrap();
    let restored = steps.undo(prediction(), &records).unwrap();
    assert_eq!(values(restored.get("prediction").unwrap()), vec![0.5; 64]);
}

/// Lines a child writes to one stream, collected by a thread as they come.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(stream: impl std::io::Read + Send + 'static) -> Self {
        let lines = Lines::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                sink.0.lock().unwrap().push(line);
            }
        });
        lines
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until `count` lines from index `from` on satisfy `matches`; returns the index of the last one.
    fn wait_for(
        &self,
        from: usize,
        count: usize,
        what: &str,
        matches: impl Fn(&str) -> bool,
        other: &Lines,
    ) -> usize {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            {
                let lines = self.0.lock().unwrap();
                let found: Vec<usize> = (from..lines.len())
                    .filter(|&i| matches(&lines[i]))
                    .collect();
                if found.len() >= count {
                    return found[count - 1];
                }
            }
            if Instant::now() > deadline {
                let own = self.snapshot();
                let tail = |lines: &[String]| lines[lines.len().saturating_sub(30)..].join("\n");
                panic!(
                    "timed out waiting for {what}\n--- this stream (last lines) ---\n{}\n--- other stream ---\n{}",
                    tail(&own),
                    tail(&other.snapshot())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Kills the child however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Replaces `path` the way editors and build tools do: write a temporary file, rename it over the original.
fn replace_by_rename(path: &Path, bytes: &[u8]) {
    let temporary = path.with_extension("tmp-save");
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

fn scale_script(factor: &str) -> String {
    // Prints the ratio of the image sums after and before scaling, so each line shows what the step did.
    format!(
        "fn mark(sample) {{\n    let before = sample.image.sum();\n    sample.image = sample.image * {factor};\n    print(`scale ${{sample.image.sum() / before}}`);\n    sample\n}}\n"
    )
}

#[test]
fn watch_swaps_edited_scripts_and_rebuilt_plugins_between_batches() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let library = plugins.join("libreload_mark.so");
    std::fs::copy(fixture_library("reload_v1"), &library).unwrap();
    let preprocess = write(dir.path(), "preprocess.rhai", &scale_script("1"));
    let experiment = write(
        dir.path(),
        "train.rhai",
        r#"let out = ARGS[0];
let data = phantom_dataset(out + "/data", #{ subjects: 2, seed: 1, contrasts: ["T2w"] });
let dataset = bids(data, #{ target_suffix: "_seg-manual", contrasts: ["T2w"] });
let parts = split(dataset, #{ train_fraction: 0.5, test_fraction: 0.0, random_seed: 1 });
let net = model("unet2d", #{ depth: 2, n_filters: 4 });
train(net, #{
    train: parts.train, valid: parts.valid,
    preprocess: [transform("CenterCrop", #{ size: [16, 16] })],
    augment: [script_transform("preprocess.rhai", "mark"), transform("reload_mark:ReloadMark", #{ factor: 1.5 })],
    epochs: 100000, batch_size: 8, seed: 1, out: out + "/run",
});
"#,
    );
    let mut child = Command::new(artifact_dir().join("ivado"))
        .args(["--device", "cpu", "--no-progress", "--plugin-dir"])
        .arg(&plugins)
        .arg("watch")
        .arg(&experiment)
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ivado watch");
    let stdout = Lines::collect(child.stdout.take().unwrap());
    let stderr = Lines::collect(child.stderr.take().unwrap());
    let _running = Running(child);

    // Version 1 of both steps runs: the script keeps the image (ratio 1), the plugin scales it by 1.5.
    stdout.wait_for(0, 20, "`scale 1.0` lines", |l| l == "scale 1.0", &stderr);
    stdout.wait_for(
        0,
        20,
        "`plugin v1 ratio 1.500` lines",
        |l| l == "plugin v1 ratio 1.500",
        &stderr,
    );

    // Edit the script as an editor does; the next batches double the image.
    replace_by_rename(&preprocess, scale_script("2").as_bytes());
    let first_v2 = stdout.wait_for(0, 1, "`scale 2.0`", |l| l == "scale 2.0", &stderr);
    stdout.wait_for(
        first_v2,
        20,
        "more `scale 2.0` lines",
        |l| l == "scale 2.0",
        &stderr,
    );
    stderr.wait_for(
        0,
        1,
        "the reload log",
        |l| l.contains("reloaded") && l.contains("preprocess.rhai") && l.contains("script `mark`"),
        &stdout,
    );

    // A syntax error (line 2) is reported with its position, and version 2 keeps running.
    replace_by_rename(
        &preprocess,
        b"fn mark(sample) {\n    let before = sample.image.sum(;\n    sample\n}\n",
    );
    let position = format!("{}:2:", preprocess.display());
    stderr.wait_for(
        0,
        1,
        "the syntax error with its line",
        |l| l.contains(&position),
        &stdout,
    );
    stderr.wait_for(
        0,
        1,
        "the keep-running notice",
        |l| l.contains("was not reloaded: the previous version keeps running"),
        &stdout,
    );
    let after_error = stdout.len();
    stdout.wait_for(
        after_error,
        20,
        "`scale 2.0` after the syntax error",
        |l| l == "scale 2.0",
        &stderr,
    );

    // A rebuilt plugin (the v2 fixture) renamed over the library: loaded from a private copy, same config
    // (factor 1.5), new behaviour (x2).
    replace_by_rename(
        &library,
        &std::fs::read(fixture_library("reload_v2")).unwrap(),
    );
    let first_plugin_v2 = stdout.wait_for(
        0,
        1,
        "`plugin v2 ratio 3.000`",
        |l| l == "plugin v2 ratio 3.000",
        &stderr,
    );
    stdout.wait_for(
        first_plugin_v2,
        20,
        "more plugin v2 lines",
        |l| l == "plugin v2 ratio 3.000",
        &stderr,
    );
    stderr.wait_for(
        0,
        1,
        "the plugin reload log",
        |l| {
            l.contains("reloaded")
                && l.contains("libreload_mark.so (plugin `reload_mark` 2.0.0)")
                && l.contains("`ReloadMark`")
        },
        &stdout,
    );

    // A corrupt library is refused with the loader's error; v2 keeps running.
    replace_by_rename(&library, b"this is not a shared library");
    stderr.wait_for(
        0,
        1,
        "the corrupt library error",
        |l| l.contains("not a loadable shared library"),
        &stdout,
    );
    let after_corrupt = stdout.len();
    stdout.wait_for(
        after_corrupt,
        20,
        "plugin v2 lines after the corrupt library",
        |l| l == "plugin v2 ratio 3.000",
        &stderr,
    );

    // Swaps land between batches: once a new version printed, the old one never runs again.
    let lines = stdout.snapshot();
    assert!(
        !lines[first_v2..].iter().any(|l| l == "scale 1.0"),
        "script v1 ran after v2"
    );
    assert!(
        !lines[first_plugin_v2..]
            .iter()
            .any(|l| l.starts_with("plugin v1")),
        "plugin v1 ran after v2"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("epoch ")),
        "no epoch finished"
    );
    assert!(
        !stderr.snapshot().iter().any(|l| l.starts_with("error:")),
        "the run failed: {:?}",
        stderr.snapshot()
    );
}
