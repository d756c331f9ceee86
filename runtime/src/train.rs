//! The training loop: Dice loss, host-owned Adam, validation Dice every epoch, best and last model folders,
//! a metrics CSV, and progress bars.
use crate::data::SliceSet;
use crate::metrics::{dice_loss, Overlap};
use crate::model_folder::{self, write_atomic};
use crate::optim::Adam;
use crate::pipeline::{derive_seed, LivePipeline, Pipeline};
use crate::plugin::PluginModel;
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ivado_sdk::Mode;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Run folder: gets `metrics.csv`, `model/` (best) and `last/`.
    pub out_dir: PathBuf,
    pub device: Device,
    /// Binarisation threshold for validation Dice.
    pub threshold: f64,
    /// Show progress bars (they are hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub valid_loss: f64,
    pub valid_dice: f64,
    pub learning_rate: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug)]
pub struct TrainReport {
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub best_dice: f64,
    /// The best model folder.
    pub model_dir: PathBuf,
    pub metrics_csv: PathBuf,
}

/// Mean Dice loss and mean per-volume hard Dice of `model` over `set`, in eval mode.
pub fn evaluate(
    model: &PluginModel,
    set: &SliceSet,
    batch_size: usize,
    device: Device,
    threshold: f64,
) -> Result<(f64, f64)> {
    let mut overlaps = vec![Overlap::default(); set.volumes.len()];
    let mut loss_sum = 0.0;
    let mut batches = 0usize;
    let indices: Vec<i64> = (0..set.len() as i64).collect();
    tch::no_grad(|| -> Result<()> {
        for chunk in indices.chunks(batch_size.max(1)) {
            let (images, labels) = set.batch(chunk, device);
            let predictions = model.forward(&[&images], Mode::Eval)?;
            loss_sum += dice_loss(&predictions, &labels, 1.0).double_value(&[]);
            batches += 1;
            for (&index, overlap) in
                chunk
                    .iter()
                    .zip(Overlap::per_item(&predictions, &labels, threshold))
            {
                overlaps[set.volume_of_slice[index as usize]].add(overlap);
            }
        }
        Ok(())
    })?;
    let mean_dice = overlaps.iter().map(Overlap::dice).sum::<f64>() / overlaps.len().max(1) as f64;
    Ok((loss_sum / batches.max(1) as f64, mean_dice))
}

fn write_metrics(path: &std::path::Path, history: &[EpochRecord]) -> Result<()> {
    let mut csv = String::from("epoch,train_loss,valid_loss,valid_dice,learning_rate,seconds\n");
    for r in history {
        csv.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{},{:.3}\n",
            r.epoch, r.train_loss, r.valid_loss, r.valid_dice, r.learning_rate, r.seconds
        ));
    }
    write_atomic(path, csv.as_bytes())
}

/// Trains `model` on `train`, validating on `valid` after every epoch. `data` describes the inputs (contrasts,
/// slice axis) for the model folder. `augment`, when given, is applied to every training batch (one seeded draw
/// per slice and epoch); it is read once per batch, so a hot-reloaded version takes effect at the next batch.
pub fn train(
    model: &PluginModel,
    pipeline: &Pipeline,
    train: &SliceSet,
    valid: &SliceSet,
    data: &Value,
    config: &TrainConfig,
    augment: Option<&LivePipeline>,
) -> Result<TrainReport> {
    if train.is_empty() || valid.is_empty() {
        bail!(
            "training needs slices in both sets (train {}, valid {})",
            train.len(),
            valid.len()
        );
    }
    std::fs::create_dir_all(&config.out_dir)?;
    let parameters = model
        .trainable()
        .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
        .collect();
    let mut optimizer = Adam::new(parameters, config.learning_rate, config.weight_decay);
    let metrics_csv = config.out_dir.join("metrics.csv");
    let model_dir = config.out_dir.join("model");
    let last_dir = config.out_dir.join("last");
    let batch_size = config.batch_size.max(1);
    let batches_per_epoch = train.len().div_ceil(batch_size);

    let mut history: Vec<EpochRecord> = Vec::new();
    let mut best: Option<(usize, f64)> = None;
    let style = ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {pos}/{len} batches {msg} ({elapsed}<{eta})",
    )
    .expect("valid template")
    .progress_chars("=> ");
    for epoch in 1..=config.epochs {
        let started = Instant::now();
        let bar = if config.progress {
            ProgressBar::new(batches_per_epoch as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(style.clone());
        bar.set_prefix(format!("{epoch}/{}", config.epochs));
        let order = train.shuffled(derive_seed(config.seed, epoch as u64));
        let mut loss_sum = 0.0;
        for chunk in order.chunks(batch_size) {
            let (images, labels) = match augment {
                Some(live) => train.augmented_batch(
                    chunk,
                    &live.current(),
                    config.seed,
                    epoch as u64,
                    config.device,
                )?,
                None => train.batch(chunk, config.device),
            };
            let predictions = model.forward(&[&images], Mode::Train)?;
            let loss = dice_loss(&predictions, &labels, 1.0);
            optimizer.zero_grad()?;
            loss.backward();
            optimizer.step()?;
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                bail!("training diverged at epoch {epoch}: loss is {value}");
            }
            loss_sum += value;
            bar.set_message(format!("loss {value:.4}"));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let train_loss = loss_sum / batches_per_epoch as f64;
        let (valid_loss, valid_dice) =
            evaluate(model, valid, batch_size, config.device, config.threshold)?;
        let record = EpochRecord {
            epoch,
            train_loss,
            valid_loss,
            valid_dice,
            learning_rate: config.learning_rate,
            seconds: started.elapsed().as_secs_f64(),
        };
        let improved = best.is_none_or(|(_, dice)| valid_dice > dice);
        println!(
            "epoch {epoch:>3}/{}  train loss {train_loss:+.4}  valid loss {valid_loss:+.4}  valid Dice {valid_dice:.4}{}  ({:.1} s)",
            config.epochs,
            if improved { " *" } else { "" },
            record.seconds
        );
        history.push(record);
        write_metrics(&metrics_csv, &history)?;
        let training = |kind: &str| {
            json!({
                "checkpoint": kind, "epoch": epoch, "valid_dice": valid_dice, "seed": config.seed,
                "epochs": config.epochs, "batch_size": batch_size, "learning_rate": config.learning_rate,
                "loss": "dice", "optimizer": "adam", "optimizer_step": optimizer.step,
            })
        };
        if improved {
            best = Some((epoch, valid_dice));
            model_folder::save(&model_dir, model, pipeline, data, &training("best"))?;
        }
        model_folder::save(&last_dir, model, pipeline, data, &training("last"))?;
        model_folder::write_safetensors_atomic(
            &last_dir.join("optimizer.safetensors"),
            &optimizer.state(),
        )?;
    }
    let (best_epoch, best_dice) = best.expect("at least one epoch");
    Ok(TrainReport {
        history,
        best_epoch,
        best_dice,
        model_dir,
        metrics_csv,
    })
}

/// Sets libtorch's global seed so weight initialisation and dropout repeat for the same seed.
pub fn seed_everything(seed: u64) {
    tch::manual_seed(seed as i64);
}
