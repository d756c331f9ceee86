//! torch-sys gives the final binary no rpath; without one `ivado` fails at start with
//! "libtorch_cpu.so: cannot open shared object file". Point the rpath at the libtorch we built against.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let dir = std::path::PathBuf::from(&dir)
            .canonicalize()
            .unwrap_or_else(|_| dir.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
}
