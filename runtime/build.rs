//! torch-sys gives the final binary no rpath; without one `ivado` fails at start with
//! "libtorch_cpu.so: cannot open shared object file". Point the rpath at the libtorch we built against.
//! Also compiles `src/autocast.cpp`, the libtorch calls tch does not expose (CPU autocast).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=src/autocast.cpp");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report where libtorch is (DEP_TCH_LIBTORCH_LIB)");
    };
    let dir = std::path::PathBuf::from(&dir)
        .canonicalize()
        .unwrap_or_else(|_| dir.into());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    let include = dir.join("../include");
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("src/autocast.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .warnings(false)
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        .compile("ivado_autocast");
}
