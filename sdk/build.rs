//! Records which libtorch this copy of the SDK was compiled against, so a host and a plugin built against
//! different libtorch builds can be told apart at load time (their tensor handles are not interchangeable).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib_dir = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default();
    let lib_dir = PathBuf::from(lib_dir);
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    let version_py = lib_dir.parent().map(|torch| torch.join("version.py"));
    let version = version_py
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("__version__ = ")
                    .map(|v| v.trim_matches(['\'', '"']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned());
    if let Some(path) = version_py {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rustc-env=IVADO_LIBTORCH_VERSION={version}");
    println!("cargo:rustc-env=IVADO_LIBTORCH_LIB={}", lib_dir.display());
    // The SDK's own unit-test binary links libtorch too; torch-sys gives it no rpath.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
}
