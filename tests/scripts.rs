//! The `ivado` binary running Rhai scripts: arguments, and errors that point at the script line.
use ivado_tests::{artifact_dir, run_ivado};
use std::path::Path;
use std::process::Command;

fn ivado(args: &[&str]) -> (bool, String, String) {
    ivado_logging(args, "warn")
}

fn ivado_logging(args: &[&str], log: &str) -> (bool, String, String) {
    run_ivado(args, log)
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

#[test]
fn scripts_receive_their_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(
        dir.path(),
        "args.rhai",
        "print(`args: ${ARGS.len()} ${ARGS[0]} ${ARGS[1]}`);\n",
    );
    let (ok, stdout, stderr) = ivado(&["run", &path, "alpha", "--beta"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "args: 2 alpha --beta");
}

#[test]
fn a_syntax_error_is_reported_at_its_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = script(dir.path(), "broken.rhai", "let a = 1;\nlet b = (a + ;\n");
    let (ok, _, stderr) = ivado(&["run", &path]);
    assert!(!ok);
    assert!(stderr.contains(&format!("{path}:2:")), "{stderr}");
}

#[test]
fn a_primitive_error_is_reported_at_the_calling_line() {
    let dir = tempfile::tempdir().unwrap();
    let body = "// a comment\nlet t = transform(\"CenterCrop\", #{ size: [32, 32] });\nlet m =   model(\"unet2d\", #{ detph: 3 });\n";
    let path = script(dir.path(), "bad_config.rhai", body);
    let (ok, _, stderr) = ivado(&["run", &path]);
    assert!(!ok);
    assert!(stderr.contains(&format!("{path}:3:11:")), "{stderr}");
    assert!(stderr.contains("unknown config key `detph`"), "{stderr}");
}

#[test]
fn an_error_inside_a_script_function_points_inside_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let body = "fn load(path) {\n    bids(path, #{ target_sufix: \"_seg\" })\n}\nload(\"/nonexistent\");\n";
    let path = script(dir.path(), "in_fn.rhai", body);
    let (ok, _, stderr) = ivado(&["run", &path]);
    assert!(!ok);
    assert!(stderr.contains(&format!("{path}:2:5:")), "{stderr}");
    assert!(
        stderr.contains("bids: unknown option `target_sufix`"),
        "{stderr}"
    );
}

#[test]
fn plugins_command_lists_name_version_kind_and_components() {
    let (ok, stdout, stderr) = ivado(&["plugins"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("unet 0.1.0  [architecture]"), "{stdout}");
    assert!(stdout.contains("transforms 0.1.0  [transform]"), "{stdout}");
    for component in ["unet2d", "CenterCrop", "NormalizeInstance", "Resample"] {
        assert!(
            stdout.contains(component),
            "{component} missing from:\n{stdout}"
        );
    }
}

#[test]
fn an_unknown_device_is_refused() {
    let output = Command::new(artifact_dir().join("ivado"))
        .args(["--device", "tpu", "plugins"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown device `tpu`"));
}

#[test]
fn plugin_messages_reach_the_host_log_and_script_panics_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let body = "set_device(\"cpu\");\nlet ok = model(\"panicky\", #{});\nlet boom = model(\"panicky\", #{ panic_in_build: true });\n";
    let path = script(dir.path(), "panics.rhai", body);
    let plugin = ivado_tests::fixture_library("panicky");
    let (ok, _, stderr) = ivado_logging(
        &["--plugin-dir", &plugin.display().to_string(), "run", &path],
        "info",
    );
    assert!(!ok, "{stderr}");
    // The plugin logs through the host's callback, tagged with its name.
    assert!(
        stderr.contains("building the panicky architecture"),
        "{stderr}"
    );
    assert!(
        stderr.contains("plugin=panicky") || stderr.contains("plugin: panicky"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{path}:3:12:")), "{stderr}");
    assert!(
        stderr.contains("plugin panicked: deliberate panic while building"),
        "{stderr}"
    );
}

#[test]
fn the_quickstart_demo_trains_segments_and_writes_its_outputs() {
    // The README's main job, shortened to 2 epochs: every promised output must appear.
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/quickstart.rhai");
    let (ok, stdout, stderr) = ivado(&[
        "run",
        &script.display().to_string(),
        &run.display().to_string(),
        "2",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("valid Dice").count(), 2, "{stdout}");
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    for file in [
        "model/model.safetensors",
        "model/ivado_model.json",
        "checkpoints/epoch-0002/optimizer.safetensors",
        "checkpoints/epoch-0002/state.json",
        "manifest.json",
        "evaluation.csv",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let predictions: Vec<_> = std::fs::read_dir(run.join("predictions"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(predictions.len(), 4, "{predictions:?}");
    assert!(
        predictions
            .iter()
            .all(|name| name.to_string_lossy().ends_with("_pred.nii.gz")),
        "{predictions:?}"
    );
    let evaluation = std::fs::read_to_string(run.join("evaluation.csv")).unwrap();
    assert_eq!(evaluation.lines().count(), 5, "{evaluation}");
}
