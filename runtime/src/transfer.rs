//! Transfer learning as in ivadomed's `retrain_fraction` / `reset`: freeze the first layers of a trained
//! model, optionally re-initialise the rest, and fine-tune.
//!
//! A "layer" is what ivadomed counts: a module that owns learnable parameters (a convolution, a norm with
//! affine weights, a linear map), in the order the architecture created them. Plugins list their tensors in
//! creation order, and a layer's tensors share a module path (`encoder.down_path.0.conv1.weight` and
//! `.bias` belong to `encoder.down_path.0.conv1`), so the host needs nothing architecture specific.
use crate::plugin::PluginModel;
use anyhow::{bail, Result};

/// One layer: its module path and the indices of its tensors (parameters and buffers) in
/// `PluginModel::parameters`.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub module: String,
    pub tensors: Vec<usize>,
    /// Number of learnable values.
    pub parameter_count: i64,
}

fn module_of(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(module, _)| module)
}

/// The model's layers in creation order. Buffers join the layer of their module; a module with buffers only
/// (e.g. a norm without affine weights) is not a layer, as in ivadomed.
pub fn layers(model: &PluginModel) -> Vec<Layer> {
    let mut layers: Vec<Layer> = Vec::new();
    for (index, tensor) in model.parameters.iter().enumerate() {
        if !tensor.trainable && !tensor.frozen {
            continue;
        }
        let module = module_of(&tensor.name);
        match layers.iter_mut().find(|layer| layer.module == module) {
            Some(layer) => {
                layer.tensors.push(index);
                layer.parameter_count += tensor.tensor.numel() as i64;
            }
            None => layers.push(Layer {
                module: module.to_owned(),
                tensors: vec![index],
                parameter_count: tensor.tensor.numel() as i64,
            }),
        }
    }
    for (index, tensor) in model.parameters.iter().enumerate() {
        if tensor.trainable || tensor.frozen {
            continue;
        }
        if let Some(layer) = layers
            .iter_mut()
            .find(|layer| layer.module == module_of(&tensor.name))
        {
            layer.tensors.push(index);
        }
    }
    layers
}

/// What [`prepare_retrain`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrainPlan {
    pub total_layers: usize,
    /// Module paths of the frozen layers (the first ones).
    pub frozen: Vec<String>,
    /// Module paths of the layers left to train (re-initialised if `reset`).
    pub retrained: Vec<String>,
    pub reset: bool,
}

/// Freezes the first `round(n_layers * (1 - retrain_fraction))` layers of `model` (ivadomed's rounding) so
/// the optimizer never sees them, and, with `reset`, copies the remaining layers from `fresh`, a newly
/// initialised instance of the same architecture and config.
pub fn prepare_retrain(
    model: &mut PluginModel,
    fresh: Option<&PluginModel>,
    retrain_fraction: f64,
) -> Result<RetrainPlan> {
    if !(0.0..=1.0).contains(&retrain_fraction) {
        bail!("retrain_fraction must be in [0, 1], got {retrain_fraction}");
    }
    let layers = layers(model);
    let n_freeze = ((layers.len() as f64) * (1.0 - retrain_fraction)).round() as usize;
    if let Some(fresh) = fresh {
        if fresh.architecture != model.architecture
            || fresh.parameters.len() != model.parameters.len()
        {
            bail!(
                "cannot reset `{}` from a fresh `{}`: they have different parameters",
                model.architecture,
                fresh.architecture
            );
        }
    }
    tch::no_grad(|| -> Result<()> {
        for layer in &layers[..n_freeze] {
            for &index in &layer.tensors {
                let tensor = &mut model.parameters[index];
                if tensor.trainable {
                    tensor.trainable = false;
                    tensor.frozen = true;
                    let _ = tensor.tensor.set_requires_grad(false);
                }
            }
        }
        if let Some(fresh) = fresh {
            for layer in &layers[n_freeze..] {
                for &index in &layer.tensors {
                    let target = &model.parameters[index];
                    let source = &fresh.parameters[index];
                    if source.name != target.name || source.tensor.size() != target.tensor.size() {
                        bail!(
                            "cannot reset `{}`: the fresh model has `{}` {:?} where the trained one has {:?}",
                            target.name,
                            source.name,
                            source.tensor.size(),
                            target.tensor.size()
                        );
                    }
                    target
                        .tensor
                        .shallow_clone()
                        .f_copy_(&source.tensor.to_device(target.tensor.device()))?;
                }
            }
        }
        Ok(())
    })?;
    Ok(RetrainPlan {
        total_layers: layers.len(),
        frozen: layers[..n_freeze]
            .iter()
            .map(|l| l.module.clone())
            .collect(),
        retrained: layers[n_freeze..]
            .iter()
            .map(|l| l.module.clone())
            .collect(),
        reset: fresh.is_some(),
    })
}

/// A layer-by-layer table (module, shapes, learnable count) with totals, for `summary(model)`.
pub fn summary(model: &PluginModel) -> String {
    let layers = layers(model);
    let width = layers
        .iter()
        .map(|l| l.module.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut text = format!(
        "{} (plugin {} {})\n{:<width$}  {:>12}  {:>8}  shapes\n",
        model.architecture,
        model.library().name,
        model.library().version,
        "layer",
        "parameters",
        "trainable"
    );
    for layer in &layers {
        let shapes: Vec<String> = layer
            .tensors
            .iter()
            .filter(|&&i| model.parameters[i].trainable || model.parameters[i].frozen)
            .map(|&i| {
                let p = &model.parameters[i];
                format!(
                    "{}{:?}",
                    p.name.rsplit('.').next().unwrap_or(""),
                    p.tensor.size()
                )
            })
            .collect();
        let trainable = layer.tensors.iter().any(|&i| model.parameters[i].trainable);
        text.push_str(&format!(
            "{:<width$}  {:>12}  {:>8}  {}\n",
            layer.module,
            layer.parameter_count,
            if trainable { "yes" } else { "frozen" },
            shapes.join(" ")
        ));
    }
    let total: i64 = layers.iter().map(|l| l.parameter_count).sum();
    text.push_str(&format!(
        "{} layers, {} parameters ({} trainable)\n",
        layers.len(),
        total,
        model.parameter_count()
    ));
    text
}
