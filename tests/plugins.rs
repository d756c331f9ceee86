//! The plugin contract end to end: real `.so` files loaded through the host loader, every failure mode
//! reported as an error naming the file, and a plugin network checked against the same network computed here.
use ivado_runtime::plugin::{PluginLibrary, PluginRegistry, SearchPath};
use ivado_sdk::Mode;
use ivado_tests::{artifact_dir, fixture_library};
use serde_json::json;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

fn builtin() -> PluginRegistry {
    let registry = PluginRegistry::discover(&SearchPath::standard(&[]));
    assert!(
        registry.failures.is_empty(),
        "built-in plugins failed to load: {:?}",
        registry.failures
    );
    registry
}

fn load_error(path: &std::path::Path) -> String {
    match PluginLibrary::load(path) {
        Ok(library) => panic!(
            "{} loaded as plugin `{}`, expected an error",
            path.display(),
            library.name
        ),
        Err(error) => format!("{error:#}"),
    }
}

#[test]
fn builtin_plugins_are_loaded_from_their_shared_libraries_not_linked_in() {
    // Not linked in: before any plugin is loaded, this process has no `ivado_plugin_entry` symbol at all.
    let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"ivado_plugin_entry".as_ptr()) };
    assert!(
        symbol.is_null(),
        "the test binary itself exports ivado_plugin_entry: a plugin is linked in"
    );

    let registry = builtin();
    let names: Vec<&str> = registry.libraries.iter().map(|l| l.name.as_str()).collect();
    assert!(
        names.contains(&"unet") && names.contains(&"transforms"),
        "built-in plugins found: {names:?}"
    );
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for library in &registry.libraries {
        assert_eq!(library.path.parent().unwrap(), artifact_dir());
        assert_eq!(library.path.extension().unwrap(), "so");
        assert!(
            maps.contains(&*library.path.canonicalize().unwrap().to_string_lossy()),
            "{} is not mapped into the process",
            library.path.display()
        );
    }
    let unet = registry
        .libraries
        .iter()
        .find(|l| l.name == "unet")
        .unwrap();
    assert_eq!(unet.kind(), "architecture");
    assert_eq!(unet.architectures[0].name, "unet2d");
    assert_eq!(unet.architectures[0].defaults["depth"], 3);
}

#[test]
fn a_file_that_is_not_a_library_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libnotes.so");
    std::fs::write(&fake, "these are notes, not machine code").unwrap();
    let error = load_error(&fake);
    assert!(error.contains(&*fake.to_string_lossy()), "{error}");
    assert!(error.contains("not a loadable shared library"), "{error}");
}

#[test]
fn a_library_without_the_entry_symbol_is_not_a_plugin() {
    let path = fixture_library("not_a_plugin");
    let error = load_error(&path);
    assert!(error.contains(&*path.to_string_lossy()), "{error}");
    assert!(
        error.contains("not an ivado plugin: it does not export the symbol `ivado_plugin_entry`"),
        "{error}"
    );
}

#[test]
fn an_abi_version_mismatch_is_refused_with_what_to_rebuild() {
    let path = fixture_library("abi_mismatch");
    let error = load_error(&path);
    assert!(error.contains(&*path.to_string_lossy()), "{error}");
    assert!(error.contains("`from-the-future` 1.0.0"), "{error}");
    // The fixture claims the ABI after ours.
    let claimed = format!(
        "ABI mismatch: it was built against ivado-sdk 99.0.0 (plugin ABI v{})",
        ivado_sdk::abi::ABI_VERSION + 1
    );
    assert!(error.contains(&claimed), "{error}");
    assert!(
        error.contains("Rebuild the plugin against ivado-sdk"),
        "{error}"
    );
}

#[test]
fn a_libtorch_mismatch_is_refused_with_what_to_rebuild() {
    let path = fixture_library("torch_mismatch");
    let error = load_error(&path);
    assert!(error.contains(&*path.to_string_lossy()), "{error}");
    assert!(
        error.contains("libtorch mismatch: it was built against libtorch 1.13.1+cpu"),
        "{error}"
    );
    assert!(error.contains(ivado_sdk::abi::LIBTORCH_VERSION), "{error}");
    assert!(
        error.contains("rebuild the plugin with the same libtorch"),
        "{error}"
    );
}

#[test]
fn a_plugin_search_directory_reports_broken_files_and_keeps_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_library("abi_mismatch"),
        dir.path().join("libfuture.so"),
    )
    .unwrap();
    std::fs::copy(fixture_library("panicky"), dir.path().join("libpanicky.so")).unwrap();
    let search = SearchPath {
        builtin: None,
        extra: vec![dir.path().to_owned()],
    };
    let registry = PluginRegistry::discover(&search);
    assert_eq!(registry.libraries.len(), 1);
    assert_eq!(registry.libraries[0].name, "panicky");
    assert_eq!(registry.failures.len(), 1);
    assert!(registry.failures[0].1.contains("ABI mismatch"));
    // Asking for something nobody provides lists what exists and what failed.
    let error = registry
        .model("unet9d", &json!({}), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("no plugin provides the architecture `unet9d` (available: panicky:panicky)"),
        "{error}"
    );
    assert!(error.contains("libfuture.so"), "{error}");
}

#[test]
fn a_config_the_plugin_rejects_names_the_key_and_the_plugin() {
    let registry = builtin();
    let error = registry
        .model("unet2d", &json!({"depht": 4}), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("plugin `unet`"), "{error}");
    assert!(error.contains("libivado_plugin_unet.so"), "{error}");
    assert!(error.contains("unknown config key `depht`"), "{error}");
    let error = registry
        .model("unet2d", &json!({"final_activation": "tanh"}), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains(
            "`final_activation` must be one of [\"sigmoid\", \"softmax\", \"relu\", \"none\"]"
        ),
        "{error}"
    );
    let error = registry
        .transform("CenterCrop", &json!({"size": "big"}))
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("plugin `transforms`") && error.contains("size"),
        "{error}"
    );
}

#[test]
fn a_panicking_plugin_reports_the_panic_and_the_process_survives() {
    let library = PluginLibrary::load(&fixture_library("panicky")).unwrap();
    let mut registry = PluginRegistry::default();
    registry.libraries.push(Arc::clone(&library));

    let error = registry
        .model("panicky", &json!({"panic_in_build": true}), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("plugin panicked: deliberate panic while building"),
        "{error}"
    );

    let model = registry.model("panicky", &json!({}), Device::Cpu).unwrap();
    let input = Tensor::ones([2, 5], (Kind::Float, Device::Cpu));
    for _ in 0..2 {
        // A libtorch shape error inside the plugin: reported with its first line only, not the C++ backtrace.
        let error = model
            .forward(&[&input], Mode::Eval)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("plugin `panicky`") && error.contains("plugin panicked:"),
            "{error}"
        );
        assert!(
            error.contains("mat1 and mat2 shapes cannot be multiplied"),
            "{error}"
        );
        assert_eq!(error.lines().count(), 1, "{error}");
    }

    let transform = registry.transform("panicky_transform", &json!({})).unwrap();
    let mut sample = ivado_sdk::Sample::new();
    sample.insert(
        "image",
        Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu)),
    );
    let error = transform.apply(&sample, 42).err().unwrap().to_string();
    assert!(
        error.contains("plugin panicked: deliberate panic in apply (seed 42)"),
        "{error}"
    );
}

/// ivadomed's 2D U-Net written out here with plain tch ops, reading the plugin's parameters by their
/// PyTorch state_dict names: an independent computation of the same network (eval mode).
fn reference_unet(
    params: &std::collections::HashMap<String, Tensor>,
    x: &Tensor,
    depth: usize,
) -> Tensor {
    let block = |prefix: &str, x: &Tensor| -> Tensor {
        let mut x = x.shallow_clone();
        for conv in ["conv1", "conv2"] {
            let p = |suffix: &str| &params[&format!("{prefix}.{conv}{suffix}")];
            x = x
                .conv2d(p(".weight"), Some(p(".bias")), [1, 1], [1, 1], [1, 1], 1)
                .relu();
            x = x.batch_norm(
                Some(p("_bn.weight")),
                Some(p("_bn.bias")),
                Some(p("_bn.running_mean")),
                Some(p("_bn.running_var")),
                false,
                0.1,
                1e-5,
                false,
            );
        }
        x
    };
    let mut skips = Vec::new();
    let mut x = x.shallow_clone();
    for level in 0..depth {
        let skip = block(&format!("encoder.down_path.{}", 3 * level), &x);
        x = skip.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
        skips.push(skip);
    }
    x = block("encoder.conv_bottom", &x);
    for level in 0..depth {
        let skip = &skips[depth - 1 - level];
        let up = x.upsample_bilinear2d([skip.size()[2], skip.size()[3]], true, None, None);
        x = block(
            &format!("decoder.up_path.{}.downconv", 2 * level),
            &Tensor::cat(&[&up, skip], 1),
        );
    }
    x.conv2d(
        &params["decoder.last_conv.weight"],
        Some(&params["decoder.last_conv.bias"]),
        [1, 1],
        [1, 1],
        [1, 1],
        1,
    )
    .sigmoid()
}

#[test]
fn plugin_unet_matches_the_same_network_computed_directly() {
    tch::manual_seed(7);
    let registry = builtin();
    let model = registry
        .model("unet2d", &json!({"depth": 3, "n_filters": 8}), Device::Cpu)
        .unwrap();
    // Non-trivial batch-norm statistics, so eval mode actually uses them.
    tch::no_grad(|| {
        for p in model
            .parameters
            .iter()
            .filter(|p| p.name.ends_with("running_mean") || p.name.ends_with("running_var"))
        {
            let mut t = p.tensor.shallow_clone();
            t.copy_(&(Tensor::rand_like(&p.tensor) + 0.5));
        }
    });
    let params = model
        .parameters
        .iter()
        .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
        .collect();
    // 37x45 is not a multiple of 8: exercises the upsample-to-skip-size path.
    let input = Tensor::randn([2, 1, 37, 45], (Kind::Float, Device::Cpu));
    let from_plugin = tch::no_grad(|| model.forward(&[&input], Mode::Eval)).unwrap();
    let direct = tch::no_grad(|| reference_unet(&params, &input, 3));
    assert_eq!(from_plugin.size(), vec![2, 1, 37, 45]);
    let max_diff = (&from_plugin - &direct).abs().max().double_value(&[]);
    assert!(
        max_diff <= 1e-6,
        "plugin and direct outputs differ by {max_diff}"
    );
}

#[test]
fn unet_parameter_count_matches_ivadomed() {
    // 4,837,249: sum(p.numel()) of ivadomed 2.9.10's Unet(in 1, out 1, depth 3, n_filters 64), 2D.
    let registry = builtin();
    let model = registry.model("unet2d", &json!({}), Device::Cpu).unwrap();
    assert_eq!(model.parameter_count(), 4_837_249);
    assert!(model
        .parameters
        .iter()
        .any(|p| p.name == "encoder.down_path.0.conv1_bn.running_mean" && !p.trainable));
}

#[test]
fn multiclass_unet_drops_the_background_channel() {
    let registry = builtin();
    let model = registry
        .model(
            "unet2d",
            &json!({"out_channels": 3, "final_activation": "softmax", "n_filters": 4, "depth": 2}),
            Device::Cpu,
        )
        .unwrap();
    let output = tch::no_grad(|| {
        model.forward(
            &[&Tensor::randn([1, 1, 16, 16], (Kind::Float, Device::Cpu))],
            Mode::Eval,
        )
    })
    .unwrap();
    assert_eq!(output.size(), vec![1, 2, 16, 16]);
    // Softmax over 3 channels, background removed: the two kept channels sum to less than 1 everywhere.
    assert!(
        output
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            .max()
            .double_value(&[])
            < 1.0
    );
}
