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
    crate::allocator::for_networks();
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
    // As the training loop sets up its process.
    crate::allocator::for_networks();
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

/// A training epoch through the loader set against the bare step time of the same network.
#[derive(Clone, Debug)]
pub struct EpochTiming {
    pub batches: usize,
    pub batch_size: usize,
    pub workers: usize,
    /// Median bare training step (no loading), seconds.
    pub step_seconds: f64,
    /// Training part of the second epoch (the first warms libtorch up), seconds.
    pub train_seconds: f64,
    /// Of `train_seconds`, the time the loop waited for the loader.
    pub wait_seconds: f64,
}

impl EpochTiming {
    /// How much longer the epoch took than its steps alone, in percent.
    pub fn overhead_percent(&self) -> f64 {
        (self.train_seconds / (self.step_seconds * self.batches as f64) - 1.0) * 100.0
    }
}

impl std::fmt::Display for EpochTiming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch of {} batches of {} through the loader ({} workers): {:.2} s, bare steps {} x {:.3} s = {:.2} s: overhead {:+.1}% (waited {:.2} s for batches, {:.1}%)",
            self.batches,
            self.batch_size,
            self.workers,
            self.train_seconds,
            self.batches,
            self.step_seconds,
            self.step_seconds * self.batches as f64,
            self.overhead_percent(),
            self.wait_seconds,
            100.0 * self.wait_seconds / self.train_seconds.max(f64::MIN_POSITIVE)
        )
    }
}

/// Trains two epochs of `batches` batches of `case`'s architecture on augmented phantom slices (the
/// pipeline of `ivado bench loader`, through the trainer's loader with `workers` workers), then times the
/// bare step; compares the second epoch with the steps alone.
pub fn time_epoch(
    registry: &PluginRegistry,
    case: &ArchitectureCase,
    device: Device,
    batches: usize,
    workers: usize,
) -> Result<EpochTiming> {
    use crate::bench_loader::{augment_specs, BENCH_SEED};
    use crate::bids::{BidsIndex, BidsQuery};
    use crate::data::SliceSet;
    use crate::pipeline::LivePipeline;
    use crate::preview::pipeline_from_specs;
    use crate::train::{TrainConfig, Trainer};
    let shape = &case.inputs[0];
    let (batch_size, size) = (shape[0] as usize, shape[3]);
    let depth = 64usize;
    let slices = batches.max(1) * batch_size;
    let train_subjects = slices.div_ceil(depth);
    let scratch = crate::scratch::ScratchDir::new("bench-epoch")?;
    let data = scratch.path().join("data");
    crate::phantom::generate(
        &data,
        &crate::phantom::PhantomSpec {
            subjects: train_subjects + 1,
            // 0.5 mm in-plane, resampled to 0.75 mm: about 1.33 x size before the crop.
            shape: [2 * size as usize, 2 * size as usize, depth],
            spacing: [0.5, 0.5, 2.0],
            contrasts: vec!["T2w".into()],
            noise: 0.05,
            seed: BENCH_SEED,
        },
    )?;
    let query = BidsQuery {
        target_suffix: "_seg-manual",
        contrasts: None,
    };
    let mut entries = BidsIndex::scan(&data, &query)?.entries;
    entries.sort_by(|a, b| a.subject.cmp(&b.subject));
    let preprocess = pipeline_from_specs(
        registry,
        &[
            json!({"name": "Resample", "config": {"spacing": [0.75, 0.75]}}),
            json!({"name": "CenterCrop", "config": {"size": [size, size]}}),
        ],
    )?;
    let whole = SliceSet::build(&entries[..train_subjects], &preprocess, BENCH_SEED)?;
    // Exactly `batches` full batches.
    let train_set = SliceSet {
        images: whole.images.narrow(0, 0, slices as i64),
        labels: whole.labels.narrow(0, 0, slices as i64),
        volume_of_slice: whole.volume_of_slice[..slices].to_vec(),
        volumes: whole.volumes.clone(),
        spacing: whole.spacing[..slices].to_vec(),
        metadata: None,
        available: None,
    };
    let valid_set = SliceSet::build(&entries[train_subjects..], &preprocess, BENCH_SEED)?;
    let augment = LivePipeline::new(pipeline_from_specs(registry, &augment_specs())?);
    let model = registry.model(&case.architecture, &case.config, device)?;
    let config = TrainConfig {
        epochs: 2,
        batch_size,
        seed: BENCH_SEED,
        num_workers: workers,
        prefetch: 2 * workers.max(1),
        ..TrainConfig::new(scratch.path().join("run"), device)
    };
    let mut trainer = Trainer::new(
        &model,
        &preprocess,
        &train_set,
        &valid_set,
        json!({}),
        config,
        Some(crate::train::Held::Shared(std::rc::Rc::new(augment))),
    )?;
    trainer.run_epoch()?;
    let record = trainer.run_epoch()?;
    drop(trainer);
    let step_seconds = time_training_step(registry, case, StepMode::Fp32, device, 1, 3)?;
    Ok(EpochTiming {
        batches: batches.max(1),
        batch_size,
        workers,
        step_seconds,
        train_seconds: record.train_seconds,
        wait_seconds: record.wait_seconds,
    })
}
