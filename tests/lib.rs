//! Shared helpers for the end-to-end tests in this crate.
use std::path::{Path, PathBuf};
use std::process::Command;

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
