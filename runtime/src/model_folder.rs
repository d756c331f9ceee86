//! The model folder: everything needed to run a trained model elsewhere (nnU-Net style). It holds
//! `model.safetensors` (weights and buffers, named like the PyTorch state_dict) and `ivado_model.json` (which
//! plugin and architecture, its config, the preprocessing pipeline, and how the model was trained).
use crate::pipeline::Pipeline;
use crate::plugin::{PluginModel, PluginRegistry};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "ivado_model.json";

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
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating model folder {}", dir.display()))?;
    let weights: Vec<(&str, &Tensor)> = model
        .parameters
        .iter()
        .map(|p| (p.name.as_str(), &p.tensor))
        .collect();
    write_safetensors_atomic(&dir.join(WEIGHTS_FILE), &weights)?;
    let library = model.library();
    let description = json!({
        "format": "ivado-model-folder/1",
        "plugin": {"name": library.name, "version": library.version},
        "architecture": model.architecture,
        "config": model.config,
        "preprocess": pipeline.specs(),
        "data": data,
        "training": training,
    });
    write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&description)?.as_bytes(),
    )
}

/// A model folder brought back to life.
pub struct LoadedModel {
    pub model: PluginModel,
    pub pipeline: Pipeline,
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
    let plugin = description["plugin"]["name"].as_str().unwrap_or_default();
    let architecture = description["architecture"]
        .as_str()
        .with_context(|| format!("{}: missing `architecture`", config_path.display()))?;
    let qualified = if plugin.is_empty() {
        architecture.to_owned()
    } else {
        format!("{plugin}:{architecture}")
    };
    let model = registry
        .model(&qualified, &description["config"], device)
        .with_context(|| format!("loading model folder {}", dir.display()))?;
    let wanted_version = description["plugin"]["version"]
        .as_str()
        .unwrap_or_default();
    if !wanted_version.is_empty() && model.library().version != wanted_version {
        tracing::warn!(
            "{}: trained with plugin `{plugin}` {wanted_version}, running with {}",
            dir.display(),
            model.library().version
        );
    }
    load_weights(&model, &dir.join(WEIGHTS_FILE))?;
    let specs = description["preprocess"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let pipeline = Pipeline::from_specs(registry, &specs)
        .with_context(|| format!("loading model folder {}", dir.display()))?;
    Ok(LoadedModel {
        model,
        pipeline,
        description,
    })
}
