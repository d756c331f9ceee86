//! The model folder: everything needed to run a trained model elsewhere (nnU-Net style). It holds
//! `model.safetensors` (weights and buffers, named like the PyTorch state_dict) and `ivado_model.json`: which
//! plugin (name and version) and architecture, its config, the preprocessing pipeline, how the model was
//! trained (dataset fingerprint, split, seed, metrics), and the sha256 of the weights file.
//!
//! Loading refuses, with a message saying what to do, a folder whose plugin is missing or has an incompatible
//! version, and weights whose checksum does not match.
use crate::pipeline::Pipeline;
use crate::plugin::{PluginModel, PluginRegistry};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "ivado_model.json";
pub const FORMAT: &str = "ivado-model-folder/2";

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// A sha256 over what identifies the data a model was trained on: each entry's subject, session, contrast,
/// and the names and sizes of its image and label files, in a fixed order. Two runs on the same files give the
/// same fingerprint wherever the dataset lives.
pub fn dataset_fingerprint(entries: &[crate::bids::BidsEntry]) -> String {
    use sha2::{Digest, Sha256};
    let describe = |path: &Path| {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{name}:{size}")
    };
    let mut lines: Vec<String> = entries
        .iter()
        .map(|e| {
            format!(
                "{}|{}|{}|{}|{}",
                e.subject,
                e.session.as_deref().unwrap_or(""),
                e.contrast,
                describe(&e.image),
                e.label.as_deref().map(describe).unwrap_or_default()
            )
        })
        .collect();
    lines.sort();
    let mut hasher = Sha256::new();
    for line in &lines {
        hasher.update(line.as_bytes());
        hasher.update(b"\n");
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Whether a model trained with plugin version `trained` can run on `installed`: semver compatibility
/// (same major version; for 0.x, same minor).
pub fn versions_compatible(trained: &str, installed: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> {
        v.split(['.', '-', '+'])
            .take(3)
            .map(|part| part.parse().unwrap_or(u64::MAX))
            .collect()
    };
    let (a, b) = (parse(trained), parse(installed));
    match (a.first(), b.first()) {
        (Some(0), Some(0)) => a.get(1) == b.get(1),
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a reader (or a
/// crash) never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let temporary = temporary_sibling(path);
    std::fs::write(&temporary, bytes)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))
}

/// Writes named tensors as safetensors (from CPU, whatever device they live on), atomically.
pub fn write_safetensors_atomic<S: AsRef<str>, T: std::borrow::Borrow<Tensor>>(
    path: &Path,
    tensors: &[(S, T)],
) -> Result<()> {
    let on_cpu: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(name, tensor)| {
            (
                name.as_ref(),
                tensor.borrow().detach().to_device(Device::Cpu).contiguous(),
            )
        })
        .collect();
    let temporary = temporary_sibling(path);
    Tensor::write_safetensors(&on_cpu, &temporary)
        .with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))
}

/// A unique temporary name next to `path`.
fn temporary_sibling(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{unique}", std::process::id()))
}

/// Saves weights and description into `dir`. `training` is free-form metadata (seed, epoch, Dice, ...).
pub fn save(
    dir: &Path,
    model: &PluginModel,
    pipeline: &Pipeline,
    data: &Value,
    training: &Value,
) -> Result<()> {
    save_with_postprocess(dir, model, pipeline, &Pipeline::default(), data, training)
}

/// [`save`], with the post-processing steps inference applies to the prediction in native space (in order).
pub fn save_with_postprocess(
    dir: &Path,
    model: &PluginModel,
    pipeline: &Pipeline,
    postprocess: &Pipeline,
    data: &Value,
    training: &Value,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating model folder {}", dir.display()))?;
    let weights: Vec<(&str, &Tensor)> = model
        .parameters
        .iter()
        .map(|p| (p.name.as_str(), &p.tensor))
        .collect();
    let weights_path = dir.join(WEIGHTS_FILE);
    write_safetensors_atomic(&weights_path, &weights)?;
    let library = model.library();
    let description = json!({
        "format": FORMAT,
        "ivado_version": env!("CARGO_PKG_VERSION"),
        "plugin": {
            "name": library.name,
            "version": library.version,
            "sdk_abi": ivado_sdk::abi::ABI_VERSION,
        },
        "weights_sha256": sha256_file(&weights_path)?,
        "architecture": model.architecture,
        "config": model.config,
        "preprocess": pipeline.specs(),
        "postprocess": postprocess.specs(),
        "data": data,
        "training": training,
    });
    write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&description)?.as_bytes(),
    )
}

/// Optional sections of `ivado_model.json` that can be added after saving without touching the weights:
/// `inference` (how the model sees a volume: `slice_axis`, `length_2D`/`stride_2D`, `length_3D`/`stride_3D`,
/// `whole_volume`; absent means axial slices) and `metadata_encoder` (how FiLM metadata is encoded).
pub const OPTIONAL_SECTIONS: [&str; 2] = ["inference", "metadata_encoder"];

/// Adds (or replaces) an optional section in a saved model folder's description, atomically.
pub fn set_section(dir: &Path, key: &str, value: &Value) -> Result<()> {
    if !OPTIONAL_SECTIONS.contains(&key) {
        bail!("`{key}` is not an optional model folder section (expected one of {OPTIONAL_SECTIONS:?})");
    }
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a model folder: cannot read {CONFIG_FILE}",
            dir.display()
        )
    })?;
    let mut description: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let Some(map) = description.as_object_mut() else {
        bail!("{}: not a JSON object", path.display());
    };
    map.insert(key.to_owned(), value.clone());
    write_atomic(
        &path,
        serde_json::to_string_pretty(&description)?.as_bytes(),
    )
}

/// A model folder brought back to life.
pub struct LoadedModel {
    pub model: PluginModel,
    pub pipeline: Pipeline,
    /// Applied to the prediction after the preprocessing was undone, in order.
    pub postprocess: Pipeline,
    pub description: Value,
}

/// Copies saved tensors into the model's parameters, checking names and shapes both ways.
pub fn load_weights(model: &PluginModel, path: &Path) -> Result<()> {
    let saved = Tensor::read_safetensors(path)
        .with_context(|| format!("reading weights {}", path.display()))?;
    let saved: std::collections::HashMap<String, Tensor> = saved.into_iter().collect();
    tch::no_grad(|| {
        for parameter in &model.parameters {
            let Some(value) = saved.get(&parameter.name) else {
                bail!(
                    "{}: no tensor `{}`: the weights belong to another architecture or config",
                    path.display(),
                    parameter.name
                );
            };
            if value.size() != parameter.tensor.size() {
                bail!(
                    "{}: `{}` has shape {:?}, the model expects {:?}",
                    path.display(),
                    parameter.name,
                    value.size(),
                    parameter.tensor.size()
                );
            }
            parameter.tensor.shallow_clone().f_copy_(value)?;
        }
        Ok(())
    })?;
    if let Some(extra) = saved
        .keys()
        .find(|name| !model.parameters.iter().any(|p| &p.name == *name))
    {
        bail!(
            "{}: unexpected tensor `{extra}`: the weights belong to another architecture or config",
            path.display()
        );
    }
    Ok(())
}

pub fn load(dir: &Path, registry: &PluginRegistry, device: Device) -> Result<LoadedModel> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "{} is not a model folder: cannot read {CONFIG_FILE}",
            dir.display()
        )
    })?;
    let description: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
    let format = description["format"].as_str().unwrap_or("none");
    if format != FORMAT {
        bail!(
            "{}: model folder format `{format}`, this ivado reads `{FORMAT}`; re-save the model with this version",
            config_path.display()
        );
    }
    let plugin = description["plugin"]["name"]
        .as_str()
        .with_context(|| format!("{}: missing `plugin.name`", config_path.display()))?;
    let wanted_version = description["plugin"]["version"]
        .as_str()
        .with_context(|| format!("{}: missing `plugin.version`", config_path.display()))?;
    let architecture = description["architecture"]
        .as_str()
        .with_context(|| format!("{}: missing `architecture`", config_path.display()))?;
    let Some(library) = registry.libraries.iter().find(|lib| lib.name == plugin) else {
        bail!(
            "{}: this model needs plugin `{plugin}` {wanted_version} (architecture `{architecture}`), which is not \
             installed; build it and pass its folder with --plugin-dir or IVADO_PLUGIN_PATH{}",
            dir.display(),
            registry.failure_note()
        );
    };
    if !versions_compatible(wanted_version, &library.version) {
        bail!(
            "{}: this model was trained with plugin `{plugin}` {wanted_version}, but {} {} is installed ({}); \
             install a compatible version of the plugin",
            dir.display(),
            plugin,
            library.version,
            library.path.display()
        );
    }
    if library.version != wanted_version {
        tracing::warn!(
            "{}: trained with plugin `{plugin}` {wanted_version}, running with compatible {}",
            dir.display(),
            library.version
        );
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let expected_sha = description["weights_sha256"]
        .as_str()
        .with_context(|| format!("{}: missing `weights_sha256`", config_path.display()))?;
    let actual_sha = sha256_file(&weights_path)?;
    if actual_sha != expected_sha {
        bail!(
            "{}: sha256 {actual_sha} does not match {expected_sha} recorded in {CONFIG_FILE}: the weights are \
             corrupted or were replaced",
            weights_path.display()
        );
    }
    let model = registry
        .model(
            &format!("{plugin}:{architecture}"),
            &description["config"],
            device,
        )
        .with_context(|| format!("loading model folder {}", dir.display()))?;
    load_weights(&model, &weights_path)?;
    let specs = description["preprocess"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let pipeline = Pipeline::from_specs(registry, &specs)
        .with_context(|| format!("loading model folder {}", dir.display()))?;
    let postprocess_specs = description["postprocess"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let postprocess = Pipeline::from_specs(registry, &postprocess_specs).with_context(|| {
        format!(
            "loading the post-processing of model folder {}",
            dir.display()
        )
    })?;
    Ok(LoadedModel {
        postprocess,
        model,
        pipeline,
        description,
    })
}

#[cfg(test)]
mod tests {
    use super::versions_compatible;

    #[test]
    fn semver_compatibility() {
        assert!(versions_compatible("0.1.0", "0.1.7"));
        assert!(!versions_compatible("0.1.0", "0.2.0"));
        assert!(versions_compatible("1.2.0", "1.9.1"));
        assert!(!versions_compatible("1.2.0", "2.0.0"));
        assert!(!versions_compatible("garbage", "1.0.0"));
    }
}
