//! The training loop: any loss, a host-owned optimizer and LR schedule, early stopping, mixup, gradient
//! clipping, balanced sampling, validation every epoch, best model folder, crash-safe checkpoints that resume
//! exactly, a metrics CSV, a run manifest and progress bars.
//!
//! Exact resume rests on one rule: everything random in an epoch is a function of (seed, epoch). The slice
//! order and augmentation draws derive their seeds from it, and libtorch's global RNG (dropout) is reseeded
//! from it at the start of every epoch. So a checkpoint only has to hold weights, optimizer and scheduler
//! state, early-stopping state and the history, and a run killed at any point repeats the interrupted epoch
//! bit for bit.
use crate::cache::{CachedSlices, CachedWindows, LazySamples};
use crate::channels::{zero_missing_channels, ModalityDrops};
use crate::data::SliceSet;
use crate::loader::{cached_batches, slice_batches, Loader, LoaderOptions};
use crate::losses::{with_script_sources, Loss};
use crate::metrics::Overlap;
use crate::model_folder::{self, sha256_file, write_atomic};
use crate::optim::Optimizer;
use crate::pipeline::{derive_seed, LivePipeline, Pipeline};
use crate::plugin::PluginModel;
use crate::precision::{autocast, channels_last, to_channels_last, Precision};
use crate::report::run::{qc_grid, qc_indices, EpochScalars, RunOutputs, QC_SLICES};
use crate::schedule::{Better, EarlyStopping, LrScheduler, StepUnit};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use ivado_sdk::Mode;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Run folder: gets `metrics.csv`, `manifest.json`, `model/` (best) and `checkpoints/`.
    pub out_dir: PathBuf,
    pub device: Device,
    /// Binarisation threshold for validation Dice.
    pub threshold: f64,
    /// Show progress bars (they are hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// ivadomed's `loss` object, e.g. `{"name": "DiceLoss"}`.
    pub loss: Value,
    /// `{"name": "Adam", "lr": 0.001, ...}` (see `optim::OptimizerConfig`).
    pub optimizer: Value,
    /// ivadomed's `scheduler` object; `None` keeps the optimizer's rate.
    pub scheduler: Option<Value>,
    /// Stop after this many epochs without a validation-loss improvement larger than `early_stopping_epsilon`.
    pub early_stopping_patience: Option<usize>,
    pub early_stopping_epsilon: f64,
    /// Mixup with λ ~ Beta(α, α) per batch (ivadomed's `mixup_alpha`).
    pub mixup_alpha: Option<f64>,
    /// Clip the total gradient norm to this value.
    pub gradient_clip: Option<f64>,
    /// Two-step class sampling: the first N epochs draw positive and negative slices equally often, the rest
    /// follow the data's own distribution.
    pub balanced_epochs: usize,
    /// Continue from the newest valid checkpoint in `out_dir/checkpoints` when there is one.
    pub resume: bool,
    /// How many checkpoints to keep (at least 2, so a corrupt newest one has a fallback).
    pub keep_checkpoints: usize,
    /// Anything else to record in the manifest (the script's own options, dataset description).
    pub manifest: Value,
    /// Forward-pass arithmetic: fp32, or bf16/fp16 autocast (the loss and the weights stay fp32).
    pub precision: Precision,
    /// Convolution weights and batches in the channels-last memory format (faster convolutions on CPU).
    pub channels_last: bool,
    /// Loader threads that build training batches while the step runs (PyTorch DataLoader's
    /// `num_workers`); 0 builds each batch in the training thread. Batches are identical either way.
    pub num_workers: usize,
    /// Most training batches built ahead of the step, over all workers.
    pub prefetch: usize,
    /// The fitted FiLM metadata encoder (`FilmEncoder::to_json`), written to every saved model folder's
    /// `metadata_encoder` section so that inference encodes images as training did.
    pub metadata_encoder: Option<Value>,
    /// HeMIS: contrasts dropped at random from the training batches (ivadomed's `missing_probability` and
    /// `missing_probability_growth`), on top of the contrasts really missing.
    pub modality_drops: Option<ModalityDrops>,
}

impl TrainConfig {
    /// The defaults ivadomed users expect: Dice loss, Adam at 1e-3, no schedule.
    pub fn new(out_dir: impl Into<PathBuf>, device: Device) -> Self {
        Self {
            epochs: 10,
            batch_size: 16,
            seed: 0,
            out_dir: out_dir.into(),
            device,
            threshold: 0.5,
            progress: false,
            loss: json!({"name": "DiceLoss"}),
            optimizer: json!({"name": "Adam", "lr": 1e-3}),
            scheduler: None,
            early_stopping_patience: None,
            early_stopping_epsilon: 0.001,
            mixup_alpha: None,
            gradient_clip: None,
            balanced_epochs: 0,
            resume: false,
            keep_checkpoints: 2,
            manifest: Value::Null,
            precision: Precision::Fp32,
            channels_last: false,
            num_workers: LoaderOptions::default().num_workers,
            prefetch: LoaderOptions::default().prefetch,
            metadata_encoder: None,
            modality_drops: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub valid_loss: f64,
    pub valid_dice: f64,
    pub learning_rate: f64,
    /// Wall time of the epoch's training and validation.
    pub seconds: f64,
    /// Wall time of the training batches alone (loading, augmentation, steps, progress).
    #[serde(default)]
    pub train_seconds: f64,
    /// Of `train_seconds`, the time the loop waited for a batch (0 when loading hides behind the steps).
    #[serde(default)]
    pub wait_seconds: f64,
}

#[derive(Clone, Debug)]
pub struct TrainReport {
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub best_dice: f64,
    /// The best model folder.
    pub model_dir: PathBuf,
    pub metrics_csv: PathBuf,
    /// The newest checkpoint (itself a model folder, plus optimizer and loop state).
    pub last_checkpoint: PathBuf,
    /// Early stopping ended the run before `epochs`.
    pub stopped_early: bool,
    /// The caller ended the run before `epochs` ([`Trainer::stop`]).
    pub stopped_by_caller: bool,
    /// The epoch training resumed after (0 for a fresh run).
    pub resumed_from: usize,
}

/// Mean loss and mean per-volume hard Dice of `model` over `set`, in eval mode.
pub fn evaluate(
    model: &PluginModel,
    set: &SliceSet,
    loss: &Loss,
    batch_size: usize,
    device: Device,
    threshold: f64,
    precision: Precision,
) -> Result<(f64, f64)> {
    let mut overlaps = vec![Overlap::default(); set.volumes.len()];
    let mut loss_sum = 0.0;
    let mut batches = 0usize;
    let indices: Vec<i64> = (0..set.len() as i64).collect();
    tch::no_grad(|| -> Result<()> {
        for chunk in indices.chunks(batch_size.max(1)) {
            let (images, labels) = set.batch(chunk, device);
            let metadata = second_input(set, chunk, device);
            let predictions = autocast(precision, device, || {
                model.forward(&model_inputs(&images, &metadata), Mode::Eval)
            })?
            .to_kind(Kind::Float);
            loss_sum += loss.compute(&predictions, &labels)?.double_value(&[]);
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

/// The model's second input for the samples `indices` of `set`, when it has one: the FiLM metadata, or the
/// HeMIS availability (the real one: random drops are for training batches only).
fn second_input(set: &SliceSet, indices: &[i64], device: Device) -> Option<Tensor> {
    set.metadata_batch(indices, device)
        .or_else(|| set.available_batch(indices, device))
}

/// The model's inputs: the images, then the FiLM metadata or HeMIS availability when the set has it.
fn model_inputs<'t>(images: &'t Tensor, metadata: &'t Option<Tensor>) -> Vec<&'t Tensor> {
    std::iter::once(images).chain(metadata.as_ref()).collect()
}

fn write_metrics(path: &Path, history: &[EpochRecord]) -> Result<()> {
    let mut csv = String::from(
        "epoch,train_loss,valid_loss,valid_dice,learning_rate,seconds,train_seconds,wait_seconds\n",
    );
    for r in history {
        csv.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{},{:.3},{:.3},{:.3}\n",
            r.epoch,
            r.train_loss,
            r.valid_loss,
            r.valid_dice,
            r.learning_rate,
            r.seconds,
            r.train_seconds,
            r.wait_seconds
        ));
    }
    write_atomic(path, csv.as_bytes())
}

/// libtorch's global RNG drives dropout; reseeding it per epoch makes each epoch's draws a function of
/// (seed, epoch) alone.
fn seed_epoch(seed: u64, epoch: usize) {
    tch::manual_seed((derive_seed(seed, 0xE90C_0000 + epoch as u64) >> 1) as i64);
}

/// Sum of squared gradient norms over the trainable parameters, then a uniform rescale when above `max_norm`
/// (PyTorch's `clip_grad_norm_` with the L2 norm). Returns the norm before clipping.
fn clip_gradients(model: &PluginModel, max_norm: f64) -> f64 {
    let gradients: Vec<Tensor> = model
        .trainable()
        .map(|p| p.tensor.grad())
        .filter(Tensor::defined)
        .collect();
    if gradients.is_empty() {
        return 0.0;
    }
    let total = tch::no_grad(|| {
        gradients
            .iter()
            .map(|g| g.square().sum(Kind::Float))
            .reduce(|a, b| a + b)
            .expect("non-empty")
            .sqrt()
            .double_value(&[])
    });
    let coefficient = max_norm / (total + 1e-6);
    if coefficient < 1.0 {
        tch::no_grad(|| {
            for gradient in &gradients {
                let _ = gradient.shallow_clone().f_mul_scalar_(coefficient);
            }
        });
    }
    total
}

/// ivadomed's mixup: λ ~ Beta(α, α), each image and label mixed with another of the same batch.
fn mixup(images: &Tensor, labels: &Tensor, alpha: f64, seed: u64) -> Result<(Tensor, Tensor)> {
    use rand::seq::SliceRandom;
    use rand_distr::{Beta, Distribution};
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let lambda = Beta::new(alpha, alpha)
        .with_context(|| format!("mixup_alpha must be positive, got {alpha}"))?
        .sample(&mut rng);
    let mut permutation: Vec<i64> = (0..images.size()[0]).collect();
    permutation.shuffle(&mut rng);
    let index = Tensor::from_slice(&permutation).to_device(images.device());
    let mix = |t: &Tensor| t * lambda + t.index_select(0, &index) * (1.0 - lambda);
    Ok((mix(images), mix(labels)))
}

/// The loop state that a checkpoint holds besides weights and optimizer tensors.
#[derive(serde::Serialize, serde::Deserialize)]
struct LoopState {
    epoch: usize,
    history: Vec<EpochRecord>,
    best_epoch: usize,
    best_dice: Option<f64>,
    optimizer: Value,
    scheduler: Option<Value>,
    early_stopping: Option<Value>,
    /// sha256 of each file of the checkpoint, checked before resuming.
    files: std::collections::BTreeMap<String, String>,
}

const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

fn checkpoint_name(epoch: usize) -> String {
    format!("epoch-{epoch:04}")
}

/// Completed checkpoints, newest first. Half-written ones (`*.partial`) are ignored.
fn checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let epoch = name.strip_prefix("epoch-")?.parse().ok()?;
            Some((epoch, entry.path()))
        })
        .collect();
    found.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    found
}

/// Reads a checkpoint's loop state after checking every file against its recorded sha256.
fn read_checkpoint(dir: &Path) -> Result<LoopState> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("reading {}", state_path.display()))?;
    let state: LoopState = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid checkpoint state", state_path.display()))?;
    for (file, expected) in &state.files {
        let actual = sha256_file(&dir.join(file))?;
        if &actual != expected {
            bail!(
                "{}: sha256 {actual} does not match the recorded {expected}",
                dir.join(file).display()
            );
        }
    }
    Ok(state)
}

/// A training input the trainer either borrows (from [`train`]'s caller) or co-owns (with a script's trainer
/// handle, which outlives the call that made it).
pub enum Held<'a, T> {
    Borrowed(&'a T),
    Shared(Rc<T>),
}

impl<T> std::ops::Deref for Held<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        match self {
            Held::Borrowed(value) => value,
            Held::Shared(value) => value,
        }
    }
}

impl<'a, T> From<&'a T> for Held<'a, T> {
    fn from(value: &'a T) -> Self {
        Held::Borrowed(value)
    }
}

impl<T> From<Rc<T>> for Held<'_, T> {
    fn from(value: Rc<T>) -> Self {
        Held::Shared(value)
    }
}

/// The training samples: every one in memory, or read lazily under a memory budget, through
/// [`CachedSlices`] (plain axial slices) or [`CachedWindows`] (any sampling).
pub enum TrainData<'a> {
    Memory(Held<'a, SliceSet>),
    Cached(Arc<dyn LazySamples>),
}

impl TrainData<'_> {
    pub fn len(&self) -> usize {
        match self {
            TrainData::Memory(set) => set.len(),
            TrainData::Cached(set) => set.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The FiLM metadata of the samples `indices` (`[B, M]`) on `device`; `None` when the set has none,
    /// which is always so on the lazy path (the cache is refused when FiLM metadata is asked for).
    pub fn metadata_batch(&self, indices: &[i64], device: Device) -> Option<Tensor> {
        match self {
            TrainData::Memory(set) => set.metadata_batch(indices, device),
            TrainData::Cached(_) => None,
        }
    }

    /// The HeMIS availability mask of the samples `indices` (`[B, C]`); `None` on the lazy path, which
    /// carries no mask (the cache is refused with a HeMIS model).
    pub fn available_batch(&self, indices: &[i64], device: Device) -> Option<Tensor> {
        match self {
            TrainData::Memory(set) => set.available_batch(indices, device),
            TrainData::Cached(_) => None,
        }
    }
}

impl<'a> From<&'a SliceSet> for TrainData<'a> {
    fn from(value: &'a SliceSet) -> Self {
        TrainData::Memory(Held::Borrowed(value))
    }
}

impl From<Rc<SliceSet>> for TrainData<'_> {
    fn from(value: Rc<SliceSet>) -> Self {
        TrainData::Memory(Held::Shared(value))
    }
}

impl From<Arc<CachedSlices>> for TrainData<'_> {
    fn from(value: Arc<CachedSlices>) -> Self {
        TrainData::Cached(value)
    }
}

impl From<Arc<CachedWindows>> for TrainData<'_> {
    fn from(value: Arc<CachedWindows>) -> Self {
        TrainData::Cached(value)
    }
}

/// Volumes whose slices a lazy epoch shuffles together: few enough that their prepared volumes stay in a
/// small memory budget, while batches still mix volumes.
const CACHED_SHUFFLE_WINDOW: usize = 2;

/// The sample indices of each training batch of `epoch` (counted from 1, as in metrics.csv): the seeded
/// shuffle, balanced sampling up to `balanced_epochs`, or the lazy set's windowed order, cut into batches.
/// Script loaders (`loader(...)` in script_data.rs) call it too, so they show the batches training takes.
pub fn epoch_batch_indices(
    train_set: &TrainData,
    seed: u64,
    epoch: usize,
    batch_size: usize,
    balanced_epochs: usize,
) -> Vec<Vec<i64>> {
    let order_seed = derive_seed(seed, epoch as u64);
    let order = match train_set {
        TrainData::Memory(set) if epoch <= balanced_epochs => set.balanced(order_seed),
        TrainData::Memory(set) => set.shuffled(order_seed),
        TrainData::Cached(set) => set.window_order(order_seed, CACHED_SHUFFLE_WINDOW),
    };
    order
        .chunks(batch_size.max(1))
        .map(<[i64]>::to_vec)
        .collect()
}

/// The loader of `epoch`'s training batches `batch_indices` (images, labels), augmented on the worker threads.
pub fn epoch_batches<'a>(
    train_set: &'a TrainData,
    augment: Option<&'a LivePipeline>,
    batch_indices: Vec<Vec<i64>>,
    seed: u64,
    epoch: usize,
    device: Device,
    options: LoaderOptions,
) -> Loader<'a, (Tensor, Tensor)> {
    match train_set {
        TrainData::Memory(set) => slice_batches(
            set,
            augment,
            batch_indices,
            seed,
            epoch as u64,
            device,
            options,
        ),
        TrainData::Cached(set) => cached_batches(
            Arc::clone(set),
            augment.cloned(),
            batch_indices,
            seed,
            epoch as u64,
            device,
            options,
        ),
    }
}

/// One 2D plane per sample for the QC grid: the first channel, and the middle Z slice of 3D samples.
fn qc_planes(t: &Tensor) -> Tensor {
    let first = t.narrow(1, 0, 1);
    if first.dim() == 5 {
        let depth = first.size()[4];
        first.select(4, depth / 2)
    } else {
        first
    }
}

/// One training run, epoch by epoch. [`train`] drives it to the end; a script can call
/// [`Trainer::run_epoch`] itself to act between epochs (`Trainer<'static>` with shared inputs).
pub struct Trainer<'a> {
    model: Held<'a, PluginModel>,
    pipeline: Held<'a, Pipeline>,
    train_set: TrainData<'a>,
    valid_set: Held<'a, SliceSet>,
    data: Value,
    /// Its `loss` has the source text of any script loss filled in (see `losses::with_script_sources`).
    config: TrainConfig,
    augment: Option<Held<'a, LivePipeline>>,
    loss: Loss,
    optimizer: Optimizer,
    scheduler: Option<LrScheduler>,
    early_stopping: Option<EarlyStopping>,
    history: Vec<EpochRecord>,
    best: Option<(usize, f64)>,
    stopped_early: bool,
    resumed_from: usize,
    /// The caller ended the run with [`Trainer::stop`].
    stopped_by_caller: bool,
    last_checkpoint: Option<PathBuf>,
    progress: MultiProgress,
    epoch_bar: ProgressBar,
    started: Instant,
    outputs: RunOutputs,
    /// Validation slices shown in the QC grid every epoch.
    qc_slices: Vec<i64>,
}

impl<'a> Trainer<'a> {
    /// Prepares a run: checks the data, builds loss, optimizer, scheduler and early stopping, resumes from a
    /// checkpoint when `config.resume` asks, and writes the manifest.
    pub fn new(
        model: impl Into<Held<'a, PluginModel>>,
        pipeline: impl Into<Held<'a, Pipeline>>,
        train_set: impl Into<TrainData<'a>>,
        valid_set: impl Into<Held<'a, SliceSet>>,
        data: Value,
        mut config: TrainConfig,
        augment: Option<Held<'a, LivePipeline>>,
    ) -> Result<Self> {
        let (model, pipeline) = (model.into(), pipeline.into());
        let (train_set, valid_set) = (train_set.into(), valid_set.into());
        crate::allocator::for_networks();
        if train_set.is_empty() || valid_set.is_empty() {
            bail!(
                "training needs slices in both sets (train {}, valid {})",
                train_set.len(),
                valid_set.len()
            );
        }
        if matches!(train_set, TrainData::Cached(_)) && config.balanced_epochs > 0 {
            // Balancing needs every slice's label up front, which a lazy set does not hold.
            bail!("balanced_epochs needs the training slices in memory: remove `cache` or `balanced_epochs`");
        }
        if matches!(train_set, TrainData::Cached(_)) && config.modality_drops.is_some() {
            // The availability mask of HeMIS training is built with the in-memory samples.
            bail!("a hemis_unet model trains on samples in memory: remove `cache`");
        }
        std::fs::create_dir_all(&config.out_dir)
            .with_context(|| format!("creating {}", config.out_dir.display()))?;
        config.loss = with_script_sources(&config.loss).context("training option `loss`")?;
        let loss = Loss::from_config(&config.loss).context("training option `loss`")?;
        config.precision.check(config.device)?;
        if config.channels_last {
            to_channels_last(&model.parameters)?;
        }
        let parameters = model
            .trainable()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect();
        let mut optimizer = Optimizer::from_config(&config.optimizer, parameters)
            .context("training option `optimizer`")?;
        let mut scheduler = match &config.scheduler {
            Some(value) => Some(
                LrScheduler::from_config(value, config.epochs as u64)
                    .context("training option `scheduler`")?,
            ),
            None => None,
        };
        if let Some(scheduler) = &scheduler {
            optimizer.set_lr(scheduler.lr());
        }
        let early_stopping = match config.early_stopping_patience {
            Some(patience) => Some(EarlyStopping::new(
                patience,
                config.early_stopping_epsilon,
                Better::Lower,
            )?),
            None => None,
        };
        let progress = if config.progress {
            MultiProgress::new()
        } else {
            MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
        };
        let epoch_bar = progress.add(ProgressBar::new(config.epochs as u64));
        epoch_bar.set_style(
            ProgressStyle::with_template("epochs [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        let outputs = RunOutputs::create(&config.out_dir)?;
        let qc_slices = qc_indices(&valid_set.positive(), QC_SLICES);
        let mut trainer = Self {
            model,
            pipeline,
            train_set,
            valid_set,
            data,
            config,
            augment,
            loss,
            optimizer,
            scheduler: None,
            early_stopping,
            history: Vec::new(),
            best: None,
            stopped_early: false,
            resumed_from: 0,
            stopped_by_caller: false,
            last_checkpoint: None,
            progress,
            epoch_bar,
            started: Instant::now(),
            outputs,
            qc_slices,
        };
        if trainer.config.resume {
            trainer.resume(&mut scheduler)?;
        }
        trainer.scheduler = scheduler;
        trainer.epoch_bar.set_position(trainer.history.len() as u64);
        trainer.write_manifest(None)?;
        Ok(trainer)
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.config.out_dir.join("checkpoints")
    }

    /// Restores the newest checkpoint whose files match their checksums, falling back to older ones.
    fn resume(&mut self, scheduler: &mut Option<LrScheduler>) -> Result<()> {
        for (epoch, dir) in checkpoints(&self.checkpoint_dir()) {
            let state = match read_checkpoint(&dir) {
                Ok(state) => state,
                Err(error) => {
                    tracing::warn!(
                        "checkpoint {} is unusable, trying the previous one: {error:#}",
                        dir.display()
                    );
                    continue;
                }
            };
            model_folder::load_weights(&self.model, &dir.join(model_folder::WEIGHTS_FILE))?;
            let tensors = Tensor::read_safetensors(dir.join(OPTIMIZER_FILE))
                .with_context(|| format!("reading {}", dir.join(OPTIMIZER_FILE).display()))?;
            self.optimizer
                .load_state(&tensors, &state.optimizer)
                .with_context(|| format!("restoring the optimizer from {}", dir.display()))?;
            if let (Some(scheduler), Some(saved)) = (scheduler.as_mut(), &state.scheduler) {
                scheduler.load_state(saved)?;
            }
            if let (Some(early), Some(saved)) =
                (self.early_stopping.as_mut(), &state.early_stopping)
            {
                early.load_state(saved)?;
            }
            self.history = state.history;
            self.best = state.best_dice.map(|dice| (state.best_epoch, dice));
            self.resumed_from = epoch;
            self.last_checkpoint = Some(dir.clone());
            self.stopped_early = self
                .early_stopping
                .as_ref()
                .is_some_and(EarlyStopping::should_stop);
            tracing::info!("resuming after epoch {epoch} from {}", dir.display());
            return Ok(());
        }
        Ok(())
    }

    /// The next epoch to run (1-based).
    pub fn next_epoch(&self) -> usize {
        self.history.len() + 1
    }

    /// All epochs ran, early stopping ended the run, or the caller stopped it.
    pub fn finished(&self) -> bool {
        self.stopped_early || self.stopped_by_caller || self.history.len() >= self.config.epochs
    }

    /// Early stopping ended the run before `epochs`.
    pub fn stopped_early(&self) -> bool {
        self.stopped_early
    }

    pub fn history(&self) -> &[EpochRecord] {
        &self.history
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Ends the run before `epochs` at the caller's request (a script's own stopping rule): no further epoch
    /// runs, and the manifest gets its final timing. The best model folder and checkpoints stay as written.
    pub fn stop(&mut self) -> Result<()> {
        if self.finished() {
            return Ok(());
        }
        self.stopped_by_caller = true;
        self.epoch_bar.finish_and_clear();
        self.write_manifest(Some(self.started.elapsed().as_secs_f64()))
    }

    /// Trains one epoch, validates, writes the metrics and checkpoints. Returns the epoch's record.
    pub fn run_epoch(&mut self) -> Result<EpochRecord> {
        if self.finished() {
            bail!(
                "training is finished after {} epochs ({}); no further epoch runs",
                self.history.len(),
                if self.stopped_early {
                    "early stopping"
                } else if self.stopped_by_caller {
                    "stopped by the caller"
                } else {
                    "all epochs ran"
                }
            );
        }
        // A copy, so the loop below can borrow the optimizer and scheduler mutably (a few small JSON values).
        let config = self.config.clone();
        let epoch = self.next_epoch();
        let started = Instant::now();
        seed_epoch(config.seed, epoch);
        let batch_size = config.batch_size.max(1);
        let order_seed = derive_seed(config.seed, epoch as u64);
        let batch_indices = epoch_batch_indices(
            &self.train_set,
            config.seed,
            epoch,
            batch_size,
            config.balanced_epochs,
        );
        let batches = batch_indices.len();
        let bar = self.progress.add(ProgressBar::new(batches as u64));
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} batches {msg} ({elapsed}<{eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", config.epochs));
        let mut loss_sum = 0.0;
        let mut wait_seconds = 0.0;
        // HeMIS: contrasts dropped at random this epoch (reported at its end).
        let mut dropped_channels = 0.0;
        let loader_options = LoaderOptions {
            num_workers: config.num_workers,
            prefetch: config.prefetch,
            worker_threads: 1,
        };
        let mut batches_of_epoch = epoch_batches(
            &self.train_set,
            self.augment.as_deref(),
            batch_indices.clone(),
            config.seed,
            epoch,
            config.device,
            loader_options,
        );
        for (batch_index, indices) in batch_indices.iter().enumerate() {
            let waited = Instant::now();
            let (mut images, mut labels) = batches_of_epoch
                .next()
                .context("the loader ended before the epoch's last batch")??;
            wait_seconds += waited.elapsed().as_secs_f64();
            // Metadata is per volume, so augmentation leaves it as it is (mixup too, as in ivadomed).
            let metadata = match (
                self.train_set.available_batch(indices, config.device),
                &config.modality_drops,
            ) {
                (Some(real), Some(drops)) => {
                    let available = drops.batch_availability(&real, indices, config.seed, epoch)?;
                    dropped_channels += real
                        .f_sub(&available)?
                        .f_sum(Kind::Float)?
                        .double_value(&[]);
                    images = zero_missing_channels(&images, &available)?;
                    Some(available)
                }
                (real, _) => self
                    .train_set
                    .metadata_batch(indices, config.device)
                    .or(real),
            };
            if let Some(alpha) = config.mixup_alpha {
                let seed = derive_seed(order_seed, 0x4D49_5855_0000 + batch_index as u64);
                (images, labels) = mixup(&images, &labels, alpha, seed)?;
            }
            if config.channels_last {
                images = channels_last(&images)?;
            }
            // Autocast covers the forward pass only; the loss and backward run in fp32, as torch.autocast
            // recommends.
            let predictions = autocast(config.precision, config.device, || {
                self.model
                    .forward(&model_inputs(&images, &metadata), Mode::Train)
            })?
            .to_kind(Kind::Float);
            let loss = self.loss.compute(&predictions, &labels)?;
            self.optimizer.zero_grad()?;
            loss.backward();
            if let Some(max_norm) = config.gradient_clip {
                clip_gradients(&self.model, max_norm);
            }
            self.optimizer.step()?;
            if let Some(scheduler) = self.scheduler.as_mut() {
                if scheduler.unit() == StepUnit::Batch {
                    self.optimizer.set_lr(scheduler.step());
                }
            }
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                bail!(
                    "training diverged at epoch {epoch}, batch {}: loss is {value}",
                    batch_index + 1
                );
            }
            loss_sum += value;
            bar.set_message(format!("loss {value:.4}  lr {:.2e}", self.optimizer.lr()));
            bar.inc(1);
        }
        drop(batches_of_epoch);
        if let Some(drops) = &config.modality_drops {
            tracing::info!(
                "epoch {epoch}: missing_probability {:.4}, {dropped_channels} contrast channel(s) dropped",
                drops.probability_at(epoch)
            );
        }
        bar.finish_and_clear();
        self.progress.remove(&bar);
        let train_seconds = started.elapsed().as_secs_f64();
        let learning_rate = self.optimizer.lr();
        if let Some(scheduler) = self.scheduler.as_mut() {
            if scheduler.unit() == StepUnit::Epoch {
                self.optimizer.set_lr(scheduler.step());
            }
        }
        let train_loss = loss_sum / batches.max(1) as f64;
        let (valid_loss, valid_dice) = evaluate(
            &self.model,
            &self.valid_set,
            &self.loss,
            batch_size,
            config.device,
            config.threshold,
            config.precision,
        )?;
        let record = EpochRecord {
            epoch,
            train_loss,
            valid_loss,
            valid_dice,
            learning_rate,
            seconds: started.elapsed().as_secs_f64(),
            train_seconds,
            wait_seconds,
        };
        let improved = self.best.is_none_or(|(_, dice)| valid_dice > dice);
        if let Some(early) = self.early_stopping.as_mut() {
            self.stopped_early = early.observe(valid_loss).stop;
        }
        self.progress.suspend(|| {
            println!(
                "epoch {epoch:>3}/{}  train loss {train_loss:+.4}  valid loss {valid_loss:+.4}  valid Dice {valid_dice:.4}{}  lr {learning_rate:.2e}  ({:.1} s)",
                config.epochs,
                if improved { " *" } else { "" },
                record.seconds
            )
        });
        self.history.push(record.clone());
        write_metrics(&config.out_dir.join("metrics.csv"), &self.history)?;
        self.write_outputs(&record)?;
        if improved {
            self.best = Some((epoch, valid_dice));
            let dir = config.out_dir.join("model");
            model_folder::save(
                &dir,
                &self.model,
                &self.pipeline,
                &self.data,
                &self.training_metadata("best", epoch),
            )?;
            self.write_sections(&dir)?;
        }
        self.checkpoint(epoch)?;
        if self.stopped_early {
            tracing::info!(
                "early stopping after epoch {epoch}: no validation-loss improvement above {} for {} epochs",
                config.early_stopping_epsilon,
                config.early_stopping_patience.unwrap_or(0)
            );
        }
        let (best_epoch, best_dice) = self.best.expect("set above");
        self.epoch_bar
            .set_message(format!("best Dice {best_dice:.4} (epoch {best_epoch})"));
        self.epoch_bar.inc(1);
        if self.finished() {
            self.epoch_bar.finish_and_clear();
            self.write_manifest(Some(self.started.elapsed().as_secs_f64()))?;
        }
        Ok(record)
    }

    /// TensorBoard scalars and QC images, the curves PNG and the QC grid of this epoch.
    fn write_outputs(&mut self, record: &EpochRecord) -> Result<()> {
        let qc = if self.qc_slices.is_empty() {
            None
        } else {
            let (images, labels) = self.valid_set.batch(&self.qc_slices, self.config.device);
            let metadata = second_input(&self.valid_set, &self.qc_slices, self.config.device);
            let predictions = tch::no_grad(|| {
                autocast(self.config.precision, self.config.device, || {
                    self.model
                        .forward(&model_inputs(&images, &metadata), Mode::Eval)
                })
            })?
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
            Some(qc_grid(
                &qc_planes(&images.to_device(Device::Cpu)),
                &qc_planes(&labels.to_device(Device::Cpu)),
                &qc_planes(&predictions),
            )?)
        };
        self.outputs.epoch(
            &EpochScalars {
                epoch: record.epoch,
                train_loss: record.train_loss,
                valid_loss: record.valid_loss,
                valid_dice: record.valid_dice,
                learning_rate: record.learning_rate,
            },
            qc.as_ref(),
        )
    }

    fn training_metadata(&self, kind: &str, epoch: usize) -> Value {
        let record = self.history.last();
        json!({
            "checkpoint": kind,
            "epoch": epoch,
            "seed": self.config.seed,
            "valid_dice": record.map(|r| r.valid_dice),
            "valid_loss": record.map(|r| r.valid_loss),
            "epochs": self.config.epochs,
            "batch_size": self.config.batch_size,
            "loss": self.config.loss,
            "optimizer": self.config.optimizer,
            "scheduler": self.config.scheduler,
            "optimizer_steps": self.optimizer.steps_taken(),
        })
    }

    /// Adds the optional model folder sections this run has (the FiLM metadata encoder, the inference
    /// tiling) to a saved folder.
    fn write_sections(&self, dir: &Path) -> Result<()> {
        if let Some(encoder) = &self.config.metadata_encoder {
            model_folder::set_section(dir, crate::channels::METADATA_ENCODER_SECTION, encoder)?;
        }
        if let Some(section) = inference_section(&self.data)? {
            model_folder::set_section(dir, crate::infer::INFERENCE_SECTION, &section)?;
        }
        Ok(())
    }

    /// Writes `checkpoints/epoch-NNNN` as a whole: every file goes into a `.partial` folder that is renamed
    /// into place once complete, so a crash leaves either the old set of checkpoints or the new one.
    fn checkpoint(&mut self, epoch: usize) -> Result<()> {
        let root = self.checkpoint_dir();
        let name = checkpoint_name(epoch);
        let partial = root.join(format!("{name}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .with_context(|| format!("removing {}", partial.display()))?;
        }
        model_folder::save(
            &partial,
            &self.model,
            &self.pipeline,
            &self.data,
            &self.training_metadata("last", epoch),
        )?;
        self.write_sections(&partial)?;
        model_folder::write_safetensors_atomic(
            &partial.join(OPTIMIZER_FILE),
            &self.optimizer.state(),
        )?;
        let mut files = std::collections::BTreeMap::new();
        for file in [
            model_folder::WEIGHTS_FILE,
            model_folder::CONFIG_FILE,
            OPTIMIZER_FILE,
        ] {
            files.insert(file.to_owned(), sha256_file(&partial.join(file))?);
        }
        let state = LoopState {
            epoch,
            history: self.history.clone(),
            best_epoch: self.best.map_or(0, |(e, _)| e),
            best_dice: self.best.map(|(_, d)| d),
            optimizer: self.optimizer.scalars(),
            scheduler: self.scheduler.as_ref().map(LrScheduler::state),
            early_stopping: self.early_stopping.as_ref().map(EarlyStopping::state),
            files,
        };
        write_atomic(
            &partial.join(STATE_FILE),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        let target = root.join(&name);
        if target.exists() {
            // Re-running an epoch after a resume from an older checkpoint.
            std::fs::remove_dir_all(&target)
                .with_context(|| format!("removing {}", target.display()))?;
        }
        std::fs::rename(&partial, &target)
            .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))?;
        for (_, old) in checkpoints(&root)
            .into_iter()
            .skip(self.config.keep_checkpoints.max(2))
        {
            std::fs::remove_dir_all(&old).ok();
        }
        self.last_checkpoint = Some(target);
        Ok(())
    }

    /// `manifest.json`: what a reader needs to reproduce or audit the run.
    fn write_manifest(&self, total_seconds: Option<f64>) -> Result<()> {
        let library = self.model.library();
        let git_revision = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        let manifest = json!({
            "ivado_version": env!("CARGO_PKG_VERSION"),
            "libtorch_version": ivado_sdk::abi::LIBTORCH_VERSION,
            "plugin": {"name": library.name, "version": library.version, "path": library.path},
            "architecture": self.model.architecture,
            "architecture_config": self.model.config,
            "parameters": self.model.learnable_count(),
            "seed": self.config.seed,
            "device": crate::device::describe(self.config.device),
            "threads": tch::get_num_threads(),
            "git_revision": git_revision,
            "training": {
                "epochs": self.config.epochs,
                "batch_size": self.config.batch_size,
                "loss": self.config.loss,
                "optimizer": self.config.optimizer,
                "scheduler": self.config.scheduler,
                "early_stopping_patience": self.config.early_stopping_patience,
                "early_stopping_epsilon": self.config.early_stopping_epsilon,
                "mixup_alpha": self.config.mixup_alpha,
                "gradient_clip": self.config.gradient_clip,
                "balanced_epochs": self.config.balanced_epochs,
                "precision": self.config.precision,
                "channels_last": self.config.channels_last,
                "num_workers": self.config.num_workers,
                "prefetch": self.config.prefetch,
            },
            "preprocess": self.pipeline.specs(),
            "augment": self.augment.as_ref().map(|live| live.current().specs()),
            "data": self.data,
            "slices": {"train": self.train_set.len(), "valid": self.valid_set.len()},
            "resumed_from_epoch": self.resumed_from,
            "stopped_by_caller": self.stopped_by_caller,
            "epoch_seconds": self.history.iter().map(|r| r.seconds).collect::<Vec<_>>(),
            "total_seconds": total_seconds,
            "script": self.config.manifest,
        });
        write_atomic(
            &self.config.out_dir.join("manifest.json"),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )
    }

    pub fn report(&self) -> Result<TrainReport> {
        let Some((best_epoch, best_dice)) = self.best else {
            bail!("no epoch has run yet");
        };
        Ok(TrainReport {
            history: self.history.clone(),
            best_epoch,
            best_dice,
            model_dir: self.config.out_dir.join("model"),
            metrics_csv: self.config.out_dir.join("metrics.csv"),
            last_checkpoint: self
                .last_checkpoint
                .clone()
                .unwrap_or_else(|| self.checkpoint_dir()),
            stopped_early: self.stopped_early,
            stopped_by_caller: self.stopped_by_caller,
            resumed_from: self.resumed_from,
        })
    }
}

/// Trains `model` on `train_set`, validating on `valid_set` after every epoch, until `config.epochs` or early
/// stopping. `data` describes the inputs (contrasts, split) for the model folder. `augment`, when given, is
/// applied to every training batch (one seeded draw per slice and epoch); it is read once per batch, so a
/// hot-reloaded version takes effect at the next batch.
pub fn train(
    model: &PluginModel,
    pipeline: &Pipeline,
    train_set: &SliceSet,
    valid_set: &SliceSet,
    data: &Value,
    config: &TrainConfig,
    augment: Option<&LivePipeline>,
) -> Result<TrainReport> {
    let mut trainer = Trainer::new(
        model,
        pipeline,
        train_set,
        valid_set,
        data.clone(),
        config.clone(),
        augment.map(Held::from),
    )?;
    while !trainer.finished() {
        trainer.run_epoch()?;
    }
    trainer.report()
}

/// Sets libtorch's global seed so weight initialisation repeats for the same seed.
pub fn seed_everything(seed: u64) {
    tch::manual_seed(seed as i64);
}

/// The model folder's `inference` section: the tiling that cuts the windows this run trained on (its
/// `data.sampling` record), so `ivado segment` sees volumes as the network did in training (a 3D U-Net
/// trained on subvolumes is segmented in subvolumes, not axial slices). `None` when the run recorded no
/// sampling.
fn inference_section(data: &Value) -> Result<Option<Value>> {
    let record = &data["sampling"];
    if record.is_null() {
        return Ok(None);
    }
    let sampling = if record["mode"] == "volume" {
        crate::infer::Sampling::Whole
    } else {
        let options = crate::data::SamplingOptions::from_json(record)
            .context("the run's `data.sampling` record")?;
        crate::infer::Sampling::from_training(&options.mode)
    };
    Ok(Some(sampling.to_section()))
}
