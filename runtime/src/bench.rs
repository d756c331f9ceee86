//! `ivado bench arch`: forward + backward step time of each architecture plugin at ivadomed's default sizes,
//! measured through the plugin boundary exactly as training calls it.
use crate::plugin::{PluginModel, PluginRegistry};
use crate::torchscript::example_inputs;
use anyhow::{Context, Result};
use ivado_sdk::Mode;
use serde_json::{json, Value};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One architecture to time: its config and input shapes (image batch first, then extra inputs).
#[derive(Clone, Debug)]
pub struct ArchitectureCase {
    pub architecture: String,
    pub config: Value,
    pub inputs: Vec<Vec<i64>>,
}

/// ivadomed's default networks at the input sizes of its default configs (2D: 128x128 slices at batch 8;
/// 3D: 48x48x16 subvolumes at batch 2; classifiers on 128x128 slices; Countception on 64x64 patches).
pub fn default_cases() -> Vec<ArchitectureCase> {
    let case = |architecture: &str, config: Value, inputs: Vec<Vec<i64>>| ArchitectureCase {
        architecture: architecture.to_owned(),
        config,
        inputs,
    };
    vec![
        case("unet2d", json!({}), vec![vec![8, 1, 128, 128]]),
        case(
            "unet3d",
            json!({"n_filters": 16}),
            vec![vec![2, 1, 48, 48, 16]],
        ),
        case(
            "film_unet",
            json!({"n_metadata": 5, "film_layers": [1, 1, 1, 1, 1, 1, 1, 1]}),
            vec![vec![8, 1, 128, 128], vec![8, 5]],
        ),
        case(
            "hemis_unet",
            json!({"contrasts": ["T1w", "T2w", "T2star"]}),
            vec![vec![8, 3, 128, 128], vec![8, 3]],
        ),
        case(
            "modified3dunet",
            json!({"n_filters": 16}),
            vec![vec![2, 1, 48, 48, 16]],
        ),
        // Countception pads every input by 40 pixels and keeps full resolution throughout: 64x64 patches.
        case(
            "countception",
            json!({"in_channels": 3}),
            vec![vec![2, 3, 64, 64]],
        ),
        case("resnet18", json!({}), vec![vec![8, 1, 128, 128]]),
        case("densenet121", json!({}), vec![vec![8, 1, 128, 128]]),
    ]
}

/// Timing of one architecture.
#[derive(Clone, Debug)]
pub struct StepTiming {
    pub architecture: String,
    pub parameters: i64,
    pub inputs: Vec<Vec<i64>>,
    /// Median seconds per forward + backward step.
    pub median_seconds: f64,
    pub min_seconds: f64,
}

/// Inputs for a case: random images, and all-ones extra inputs (metadata, availability masks).
pub fn case_inputs(case: &ArchitectureCase, device: Device) -> Vec<Tensor> {
    let mut inputs = example_inputs(&case.inputs, device, 1);
    for extra in inputs.iter_mut().skip(1) {
        *extra = extra.ones_like();
    }
    inputs
}

/// One training step's worth of work: forward in train mode, a scalar loss, backward.
pub fn step(model: &PluginModel, inputs: &[Tensor]) -> Result<()> {
    let borrowed: Vec<&Tensor> = inputs.iter().collect();
    let output = model.forward(&borrowed, Mode::Train)?;
    output.square().mean(Kind::Float).backward();
    for parameter in model.trainable() {
        let mut gradient = parameter.tensor.grad();
        if gradient.defined() {
            let _ = gradient.zero_();
        }
    }
    Ok(())
}

/// Times `steps` steps after `warmup` untimed ones.
pub fn time_case(
    registry: &PluginRegistry,
    case: &ArchitectureCase,
    device: Device,
    warmup: usize,
    steps: usize,
) -> Result<StepTiming> {
    let model = registry
        .model(&case.architecture, &case.config, device)
        .with_context(|| format!("bench: creating `{}`", case.architecture))?;
    let inputs = case_inputs(case, device);
    for _ in 0..warmup {
        step(&model, &inputs)?;
    }
    let mut seconds = Vec::with_capacity(steps);
    for _ in 0..steps.max(1) {
        let started = Instant::now();
        step(&model, &inputs)?;
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        seconds.push(started.elapsed().as_secs_f64());
    }
    seconds.sort_by(f64::total_cmp);
    Ok(StepTiming {
        architecture: case.architecture.clone(),
        parameters: model.learnable_count(),
        inputs: case.inputs.clone(),
        median_seconds: seconds[seconds.len() / 2],
        min_seconds: seconds[0],
    })
}

/// How `bench train` runs a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    Fp32,
    ChannelsLast,
    Bf16,
}

impl StepMode {
    pub fn label(self) -> &'static str {
        match self {
            StepMode::Fp32 => "fp32",
            StepMode::ChannelsLast => "fp32 channels_last",
            StepMode::Bf16 => "bf16 autocast",
        }
    }
}

/// Median seconds of a full training step (forward, Dice loss, backward, Adam) of `case`'s architecture on a
/// random batch of its first input shape with a random binary target, as the training loop runs it.
pub fn time_training_step(
    registry: &PluginRegistry,
    case: &ArchitectureCase,
    mode: StepMode,
    device: Device,
    warmup: usize,
    steps: usize,
) -> Result<f64> {
    use crate::precision::{autocast, channels_last, to_channels_last, Precision};
    let model = registry.model(&case.architecture, &case.config, device)?;
    if mode == StepMode::ChannelsLast {
        to_channels_last(&model.parameters)?;
    }
    let parameters = model
        .trainable()
        .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
        .collect();
    let mut optimizer =
        crate::optim::Optimizer::from_config(&json!({"name": "Adam", "lr": 1e-3}), parameters)?;
    let loss = crate::losses::Loss::from_config(&json!({"name": "DiceLoss"}))?;
    let inputs = example_inputs(&case.inputs[..1], device, 3);
    let mut images = inputs[0].shallow_clone();
    if mode == StepMode::ChannelsLast {
        images = channels_last(&images)?;
    }
    let target = images.gt(0.5).to_kind(Kind::Float);
    let precision = if mode == StepMode::Bf16 {
        Precision::Bf16
    } else {
        Precision::Fp32
    };
    let mut run = || -> Result<()> {
        let predictions = autocast(precision, device, || model.forward(&[&images], Mode::Train))?
            .to_kind(Kind::Float);
        let value = loss.compute(&predictions, &target)?;
        optimizer.zero_grad()?;
        value.backward();
        optimizer.step()?;
        Ok(())
    };
    for _ in 0..warmup {
        run()?;
    }
    let mut seconds = Vec::with_capacity(steps);
    for _ in 0..steps.max(1) {
        let started = Instant::now();
        run()?;
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        seconds.push(started.elapsed().as_secs_f64());
    }
    seconds.sort_by(f64::total_cmp);
    Ok(seconds[seconds.len() / 2])
}
