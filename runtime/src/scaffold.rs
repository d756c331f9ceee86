//! `ivado new-plugin`: writes a plugin crate that builds against this SDK and libtorch, with a working
//! example architecture and its tests, so a new lab member starts from something that runs.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The SDK sources this binary was built from; a scaffold depends on them by path.
pub fn default_sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk")
}

/// The libtorch (torch package folder) the SDK was compiled against.
pub fn libtorch_dir() -> PathBuf {
    let lib = PathBuf::from(ivado_sdk::abi::LIBTORCH_LIB_DIR);
    lib.parent().map(Path::to_path_buf).unwrap_or(lib)
}

/// A plugin name is also a crate and library name: lower-case letters, digits and `_`, starting with a letter.
pub fn check_name(name: &str) -> Result<()> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        bail!(
            "plugin name `{name}`: use lower-case letters, digits and `_`, starting with a letter (e.g. `my_unet`)"
        );
    }
    Ok(())
}

/// Writes the crate into `dir` (which must not exist yet, or be empty). Returns the files written.
pub fn new_plugin(name: &str, dir: &Path, sdk_dir: &Path) -> Result<Vec<PathBuf>> {
    check_name(name)?;
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} already exists and is not empty; choose another --path",
            dir.display()
        );
    }
    let sdk_dir = sdk_dir.canonicalize().with_context(|| {
        format!(
            "the ivado SDK sources are not at {}; pass --sdk <path to ivado/sdk>",
            sdk_dir.display()
        )
    })?;
    if !sdk_dir.join("Cargo.toml").is_file() {
        bail!(
            "{} holds no Cargo.toml: pass --sdk <path to ivado/sdk>",
            sdk_dir.display()
        );
    }
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{sdk}}", &sdk_dir.display().to_string())
            .replace("{{libtorch}}", &libtorch_dir().display().to_string())
            .replace("{{libtorch_version}}", ivado_sdk::abi::LIBTORCH_VERSION)
    };
    let files = [
        ("Cargo.toml", CARGO_TOML),
        ("build.rs", BUILD_RS),
        (".cargo/config.toml", CARGO_CONFIG),
        (".gitignore", "/target\n"),
        ("README.md", README),
        ("src/lib.rs", LIB_RS),
    ];
    let mut written = Vec::new();
    for (relative, template) in files {
        let path = dir.join(relative);
        crate::model_folder::write_atomic(&path, fill(template).as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

const CARGO_TOML: &str = r#"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2021"
publish = false

# A standalone crate, not part of any enclosing workspace.
[workspace]

[lib]
# cdylib: the library ivado loads; rlib: lets the unit tests link it directly.
crate-type = ["cdylib", "rlib"]

[dependencies]
ivado-sdk = { path = "{{sdk}}" }
# Only for build.rs: torch-sys tells it where libtorch lives.
torch-sys = "0.26"

[profile.release]
incremental = true
"#;

const BUILD_RS: &str = r#"//! Gives the library and its test binary an rpath to libtorch, so they load without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let dir = std::path::PathBuf::from(&dir)
            .canonicalize()
            .unwrap_or_else(|_| dir.into());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
}
"#;

const CARGO_CONFIG: &str = r#"# The libtorch ivado was built with ({{libtorch_version}}). A plugin must use the same one: ivado refuses to
# load a plugin built against another libtorch, and says so.
[env]
LIBTORCH = "{{libtorch}}"
LIBTORCH_CXX11_ABI = "1"
"#;

const README: &str = r#"# {{name}}: an ivado plugin

Build it, then point ivado at the library:

    cargo build --release
    cargo test --release
    ivado --plugin-dir target/release plugins
    ivado --plugin-dir target/release run my_experiment.rhai

In a script: `model("{{name}}:tiny_fcn", #{n_filters: 8})`.
See ivado's docs/plugins.md for the ABI, config validation, logging, testing and rebuild errors.
"#;

const LIB_RS: &str = r#"//! {{name}}: an ivado architecture plugin. Replace `TinyFcn` with your network; keep the export at the end.
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{nn, nn::Module, nn::ModuleT, Tensor};
use ivado_sdk::{log, Architecture, Config, Mode, PluginError, Result};

/// Three 3x3 convolutions with batch-norm and dropout, sigmoid output: small enough to train in seconds.
pub struct TinyFcn {
    conv1: nn::Conv2D,
    norm1: nn::BatchNorm,
    conv2: nn::Conv2D,
    norm2: nn::BatchNorm,
    head: nn::Conv2D,
    dropout_rate: f64,
}

impl Architecture for TinyFcn {
    const NAME: &'static str = "tiny_fcn";
    const SUMMARY: &'static str = "three-convolution fully convolutional segmenter (scaffold example)";

    fn defaults() -> Value {
        json!({"in_channels": 1, "out_channels": 1, "n_filters": 16, "dropout_rate": 0.1})
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        // Every key is read here; a key the user passed but nobody read is reported as unknown.
        let in_channels = config.usize_in("in_channels", 1, 64)? as i64;
        let out_channels = config.usize_in("out_channels", 1, 64)? as i64;
        let n_filters = config.usize_in("n_filters", 1, 1024)? as i64;
        let dropout_rate = config.f64("dropout_rate")?;
        if !(0.0..1.0).contains(&dropout_rate) {
            return Err(PluginError(format!(
                "tiny_fcn: `dropout_rate` must be in [0, 1), got {dropout_rate}"
            )));
        }
        log::info(&format!("tiny_fcn: {in_channels} -> {n_filters} filters -> {out_channels}"));
        let conv = nn::ConvConfig { padding: 1, ..Default::default() };
        Ok(Self {
            conv1: nn::conv2d(&root / "conv1", in_channels, n_filters, 3, conv),
            norm1: nn::batch_norm2d(&root / "norm1", n_filters, Default::default()),
            conv2: nn::conv2d(&root / "conv2", n_filters, n_filters, 3, conv),
            norm2: nn::batch_norm2d(&root / "norm2", n_filters, Default::default()),
            head: nn::conv2d(&root / "head", n_filters, out_channels, 3, conv),
            dropout_rate,
        })
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        let x = &inputs[0];
        if x.dim() != 4 {
            return Err(PluginError(format!("tiny_fcn expects [N, C, H, W], got {:?}", x.size())));
        }
        let x = self.conv1.forward(x).relu();
        let x = self.norm1.forward_t(&x, mode.batch_statistics()).feature_dropout(self.dropout_rate, mode.dropout());
        let x = self.conv2.forward(&x).relu();
        let x = self.norm2.forward_t(&x, mode.batch_statistics()).feature_dropout(self.dropout_rate, mode.dropout());
        Ok(self.head.forward(&x).sigmoid())
    }
}

ivado_sdk::export_plugin! {
    name: "{{name}}",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [TinyFcn],
    transforms: [],
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivado_sdk::tch::{nn::OptimizerConfig, Device, Kind};

    fn build(config: Value) -> Result<(nn::VarStore, TinyFcn)> {
        ivado_sdk::testing::build_architecture::<TinyFcn>(config, Device::Cpu)
    }

    #[test]
    fn output_has_the_input_size() {
        let (_store, network) = build(json!({})).unwrap();
        let output = network.forward(&[Tensor::rand([2, 1, 20, 24], (Kind::Float, Device::Cpu))], Mode::Eval).unwrap();
        assert_eq!(output.size(), vec![2, 1, 20, 24]);
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        let error = build(json!({"n_filter": 8})).err().expect("a typo must be refused").to_string();
        assert!(error.contains("n_filter"), "{error}");
    }

    #[test]
    fn learns_a_square() {
        ivado_sdk::tch::manual_seed(0);
        let (store, network) = build(json!({"n_filters": 8, "dropout_rate": 0.0})).unwrap();
        // Target: a bright square in the input; the network only has to threshold.
        let image = Tensor::zeros([4, 1, 16, 16], (Kind::Float, Device::Cpu));
        let _ = image.narrow(2, 4, 8).narrow(3, 4, 8).fill_(1.0);
        let target = image.copy();
        let mut optimizer = nn::Adam::default().build(&store, 1e-2).unwrap();
        let loss = |n: &TinyFcn| n.forward(&[image.shallow_clone()], Mode::Train).unwrap().binary_cross_entropy::<Tensor>(&target, None, ivado_sdk::tch::Reduction::Mean);
        let first = loss(&network).double_value(&[]);
        for _ in 0..40 {
            optimizer.backward_step(&loss(&network));
        }
        let last = loss(&network).double_value(&[]);
        assert!(last < 0.5 * first, "loss {first} -> {last}");
    }
}
"#;
