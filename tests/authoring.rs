//! Writing a plugin the way a lab does: outside the workspace, against the SDK only. The out-of-tree example
//! in tests/out_of_tree_plugin and a fresh `ivado new-plugin` scaffold are built with cargo, loaded with
//! --plugin-dir, and trained through a Rhai script.
use ivado_tests::{artifact_dir, run_ivado};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Both tests build into one target directory (so tch compiles once); cargo's lock would serialise them
/// anyway, this keeps their output apart.
static BUILD: Mutex<()> = Mutex::new(());

/// The workspace's own target directory: with the workspace's Cargo.lock the plugins resolve the same crate
/// versions, so cargo reuses the tch and SDK it already built instead of compiling them again.
fn out_of_tree_target() -> PathBuf {
    artifact_dir().join("..")
}

fn cargo(args: &[&str], manifest: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(args)
        .arg("--release")
        .arg("--manifest-path")
        .arg(manifest)
        .env("CARGO_TARGET_DIR", out_of_tree_target())
        .output()
        .expect("run cargo");
    assert!(
        output.status.success(),
        "cargo {args:?} {} failed:\n{}\n{}",
        manifest.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn an_out_of_tree_plugin_builds_loads_and_trains_from_a_script() {
    let _build = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("out_of_tree_plugin");
    cargo(&["build"], &example.join("Cargo.toml"));
    // The library file, not its folder: the folder also holds the test fixtures' broken plugins.
    let plugin_dir = out_of_tree_target().join("release/liblab_models.so");
    let plugin_dir = plugin_dir.to_str().unwrap();

    let (ok, stdout, stderr) = run_ivado(&["--plugin-dir", plugin_dir, "plugins"], "warn");
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("lab_models 0.3.1") && stdout.contains("lab_fcn"),
        "{stdout}"
    );

    let out = tempfile::tempdir().unwrap();
    let script = example.join("train_one_step.rhai");
    let (ok, stdout, stderr) = run_ivado(
        &[
            "--plugin-dir",
            plugin_dir,
            "run",
            script.to_str().unwrap(),
            out.path().to_str().unwrap(),
        ],
        "info",
    );
    assert!(ok, "{stdout}\n{stderr}");
    // Its log line came through the host's logger.
    assert!(stderr.contains("lab_fcn: dilations [1.0, 2.0]"), "{stderr}");
    // Two dilated 3x3 convolutions with 4 filters, their norms and a 1x1 head:
    // (1*9+1)*4 + 2*4 + (4*9+1)*4 + 2*4 + (4*1+1)*1 = 40 + 8 + 148 + 8 + 5 = 209.
    assert!(
        stdout.contains("5 layers, 209 parameters"),
        "summary: {stdout}"
    );
    assert!(stdout.contains("trained lab_fcn"), "{stdout}");
    let metrics = std::fs::read_to_string(out.path().join("run/metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    let description: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("run/model/ivado_model.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(description["plugin"]["name"], "lab_models");
    assert_eq!(description["plugin"]["version"], "0.3.1");
}

#[test]
fn new_plugin_scaffolds_a_crate_that_builds_and_passes_its_own_tests() {
    let _build = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let root = tempfile::tempdir().unwrap();
    let crate_dir = root.path().join("my_seg");
    let (ok, stdout, stderr) = run_ivado(
        &[
            "new-plugin",
            "my_seg",
            "--path",
            crate_dir.to_str().unwrap(),
        ],
        "warn",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("src/lib.rs"), "{stdout}");
    // Same dependency versions as the workspace, so the shared target directory's tch build is reused.
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"),
        crate_dir.join("Cargo.lock"),
    )
    .unwrap();
    cargo(&["test"], &crate_dir.join("Cargo.toml"));
    cargo(&["build"], &crate_dir.join("Cargo.toml"));

    let library = out_of_tree_target().join("release/libmy_seg.so");
    let (ok, stdout, stderr) = run_ivado(
        &["--plugin-dir", library.to_str().unwrap(), "plugins"],
        "warn",
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("my_seg 0.1.0") && stdout.contains("tiny_fcn"),
        "{stdout}"
    );

    let (ok, _, stderr) = run_ivado(
        &[
            "new-plugin",
            "My-Seg",
            "--path",
            root.path().join("bad").to_str().unwrap(),
        ],
        "warn",
    );
    assert!(!ok);
    assert!(stderr.contains("plugin name `My-Seg`"), "{stderr}");
    let (ok, _, stderr) = run_ivado(
        &[
            "new-plugin",
            "my_seg",
            "--path",
            crate_dir.to_str().unwrap(),
        ],
        "warn",
    );
    assert!(!ok, "scaffolding over an existing crate must be refused");
    assert!(stderr.contains("not empty"), "{stderr}");
}
