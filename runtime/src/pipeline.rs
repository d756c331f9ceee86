//! An ordered list of transform steps applied to a sample, with the undo records that let inference bring
//! predictions back to native space.
//!
//! A step is a plugin transform or a Rhai script transform, plus ivadomed's two keyed options, handled here
//! for every step so plugins never see them:
//! - `applied_to`: which tensors the step sees and changes, a subset of `im` (tensors named `image*`), `gt`
//!   (`label*`, and `prediction*`: predictions live in label space, as in ivadomed's undo with
//!   `data_type='gt'`) and `roi` (`roi*`). Tensors with other names are seen by every step. Default: all.
//! - `dataset_type`: in which phases the step runs, a subset of `training`, `validation` and `testing`.
//!   Default: all.
use crate::plugin::{PluginRegistry, PluginTransform};
use crate::script_transform::ScriptTransform;
use anyhow::{anyhow, bail, Context, Result};
use ivado_sdk::{Batch, Sample};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Which part of an experiment a sample belongs to; decides which steps run (ivadomed's `dataset_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Training,
    Validation,
    Testing,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Training, Phase::Validation, Phase::Testing];

    /// ivadomed's spelling in `dataset_type`.
    pub fn key(self) -> &'static str {
        match self {
            Phase::Training => "training",
            Phase::Validation => "validation",
            Phase::Testing => "testing",
        }
    }
}

/// The kinds of tensor `applied_to` selects (ivadomed's `im`, `gt`, `roi`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataKind {
    Image,
    Label,
    Roi,
}

impl DataKind {
    pub const ALL: [DataKind; 3] = [DataKind::Image, DataKind::Label, DataKind::Roi];

    pub fn key(self) -> &'static str {
        match self {
            DataKind::Image => "im",
            DataKind::Label => "gt",
            DataKind::Roi => "roi",
        }
    }

    /// The kind of a sample tensor, from its name; `None` for names no `applied_to` entry covers.
    pub fn of_tensor(name: &str) -> Option<Self> {
        if name.starts_with("image") {
            Some(DataKind::Image)
        } else if name.starts_with("label") || name.starts_with("prediction") {
            Some(DataKind::Label)
        } else if name.starts_with("roi") {
            Some(DataKind::Roi)
        } else {
            None
        }
    }
}

/// Parses a list of keys (`["im", "gt"]`) into the matching values; an empty or unknown entry is an error.
fn parse_keys<T: Copy + Ord>(
    option: &str,
    value: &Value,
    all: &[T],
    key: fn(T) -> &'static str,
) -> Result<Vec<T>> {
    let expected = all.iter().map(|&t| key(t)).collect::<Vec<_>>().join(", ");
    let items = match value {
        Value::String(single) => vec![Value::String(single.clone())],
        Value::Array(items) => items.clone(),
        other => {
            bail!("`{option}` must be a list of strings (a subset of {expected}), not {other}")
        }
    };
    let mut parsed = Vec::new();
    for item in &items {
        let text = item
            .as_str()
            .ok_or_else(|| anyhow!("`{option}` must be a list of strings, found {item}"))?;
        let found = all
            .iter()
            .copied()
            .find(|&t| key(t) == text)
            .ok_or_else(|| {
                anyhow!("`{option}`: unknown entry `{text}` (expected a subset of {expected})")
            })?;
        if !parsed.contains(&found) {
            parsed.push(found);
        }
    }
    if parsed.is_empty() {
        bail!("`{option}` is empty: the step would never run (expected a subset of {expected})");
    }
    parsed.sort();
    Ok(parsed)
}

/// The host-handled options of a step. The defaults (everything) select every tensor and every phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepOptions {
    pub applied_to: Vec<DataKind>,
    pub dataset_type: Vec<Phase>,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self {
            applied_to: DataKind::ALL.to_vec(),
            dataset_type: Phase::ALL.to_vec(),
        }
    }
}

impl StepOptions {
    pub const KEYS: [&'static str; 2] = ["applied_to", "dataset_type"];

    /// Takes `applied_to` and `dataset_type` out of `config` (a JSON object), so the rest can go to a plugin.
    pub fn take_from(config: &mut Value) -> Result<Self> {
        let mut options = Self::default();
        if let Value::Object(map) = config {
            if let Some(value) = map.remove("applied_to") {
                options.applied_to =
                    parse_keys("applied_to", &value, &DataKind::ALL, DataKind::key)?;
            }
            if let Some(value) = map.remove("dataset_type") {
                options.dataset_type = parse_keys("dataset_type", &value, &Phase::ALL, Phase::key)?;
            }
        }
        Ok(options)
    }

    pub fn runs_in(&self, phase: Phase) -> bool {
        self.dataset_type.contains(&phase)
    }

    /// Whether the step sees the tensor called `name`.
    pub fn sees(&self, name: &str) -> bool {
        DataKind::of_tensor(name).is_none_or(|kind| self.applied_to.contains(&kind))
    }

    /// Adds the non-default options to a spec object.
    fn write_to(&self, spec: &mut Map<String, Value>) {
        if self.applied_to != DataKind::ALL {
            let keys: Vec<&str> = self.applied_to.iter().map(|k| k.key()).collect();
            spec.insert("applied_to".into(), json!(keys));
        }
        if self.dataset_type != Phase::ALL {
            let keys: Vec<&str> = self.dataset_type.iter().map(|p| p.key()).collect();
            spec.insert("dataset_type".into(), json!(keys));
        }
    }
}

/// What a step runs.
#[derive(Clone)]
pub enum StepTransform {
    Plugin(Arc<PluginTransform>),
    Script(Arc<ScriptTransform>),
}

/// One pipeline step: a transform plus the options the host applies around it.
#[derive(Clone)]
pub struct Step {
    pub transform: StepTransform,
    pub options: StepOptions,
}

impl From<Arc<PluginTransform>> for Step {
    fn from(transform: Arc<PluginTransform>) -> Self {
        Self {
            transform: StepTransform::Plugin(transform),
            options: StepOptions::default(),
        }
    }
}

impl From<Arc<ScriptTransform>> for Step {
    fn from(transform: Arc<ScriptTransform>) -> Self {
        Self {
            transform: StepTransform::Script(transform),
            options: StepOptions::default(),
        }
    }
}

impl Step {
    /// How messages name the step: the plugin transform's name, or `script <function> (<file>)`.
    pub fn label(&self) -> String {
        match &self.transform {
            StepTransform::Plugin(transform) => format!("`{}`", transform.name),
            StepTransform::Script(script) => {
                format!(
                    "script `{}` ({})",
                    script.function(),
                    script.path().display()
                )
            }
        }
    }

    /// The saved description; [`Step::from_spec`] rebuilds the step from it.
    pub fn spec(&self) -> Value {
        let mut spec = match &self.transform {
            StepTransform::Plugin(transform) => {
                json!({"name": transform.name, "config": transform.config})
            }
            StepTransform::Script(script) => json!({"script": script.spec()}),
        };
        if let Value::Object(map) = &mut spec {
            self.options.write_to(map);
        }
        spec
    }

    /// Rebuilds a step from its spec. `applied_to`/`dataset_type` may sit beside `config` or, as in
    /// ivadomed's config files, inside it.
    pub fn from_spec(registry: &PluginRegistry, spec: &Value) -> Result<Self> {
        let mut outer = spec.clone();
        let mut options = StepOptions::take_from(&mut outer)?;
        if let Some(script) = spec.get("script") {
            let transform = ScriptTransform::from_spec(script)?;
            return Ok(Self {
                transform: StepTransform::Script(Arc::new(transform)),
                options,
            });
        }
        let name = spec
            .get("name")
            .and_then(Value::as_str)
            .context("transform spec without a `name` (or a `script`)")?;
        let mut config = spec.get("config").cloned().unwrap_or(Value::Null);
        if config
            .as_object()
            .is_some_and(|map| StepOptions::KEYS.iter().any(|key| map.contains_key(*key)))
        {
            options = StepOptions::take_from(&mut config)?;
        }
        Ok(Self {
            transform: StepTransform::Plugin(Arc::new(registry.transform(name, &config)?)),
            options,
        })
    }

    fn apply(&self, sample: Sample, seed: u64) -> Result<(Sample, Value)> {
        match &self.transform {
            StepTransform::Plugin(transform) => transform.apply(&sample, seed),
            StepTransform::Script(script) => Ok((script.apply(sample, seed)?, Value::Null)),
        }
    }

    /// Applies the step to a whole batch: in one plugin call for plugin transforms, sample by sample for
    /// script transforms (whose results must keep one layout to be stacked again).
    fn apply_batch(&self, batch: Batch, seeds: &[u64]) -> Result<(Batch, Vec<Value>)> {
        match &self.transform {
            StepTransform::Plugin(transform) => transform.apply_batch(&batch, seeds),
            StepTransform::Script(script) => {
                let samples = batch.unstack()?;
                let mut outputs = Vec::with_capacity(samples.len());
                for (sample, &seed) in samples.into_iter().zip(seeds) {
                    outputs.push(script.apply(sample, seed)?);
                }
                let count = outputs.len();
                let batch = Batch::stack(outputs).context(
                    "the script gave the samples of one batch different layouts, so they cannot be batched",
                )?;
                Ok((batch, vec![Value::Null; count]))
            }
        }
    }

    fn undo(&self, sample: Sample, record: &Value) -> Result<Sample> {
        match &self.transform {
            StepTransform::Plugin(transform) => transform.undo(&sample, record),
            StepTransform::Script(script) => script.undo(sample),
        }
    }
}

/// The steps of a pipeline. Collects from steps or, as before steps had options, from plugin transforms.
#[derive(Clone, Default)]
pub struct Steps(pub Vec<Step>);

impl std::ops::Deref for Steps {
    type Target = Vec<Step>;
    fn deref(&self) -> &Vec<Step> {
        &self.0
    }
}

impl std::ops::DerefMut for Steps {
    fn deref_mut(&mut self) -> &mut Vec<Step> {
        &mut self.0
    }
}

impl From<Vec<Step>> for Steps {
    fn from(steps: Vec<Step>) -> Self {
        Self(steps)
    }
}

impl FromIterator<Step> for Steps {
    fn from_iter<I: IntoIterator<Item = Step>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl FromIterator<Arc<PluginTransform>> for Steps {
    fn from_iter<I: IntoIterator<Item = Arc<PluginTransform>>>(iter: I) -> Self {
        Self(iter.into_iter().map(Step::from).collect())
    }
}

#[derive(Clone, Default)]
pub struct Pipeline {
    pub steps: Steps,
}

// A loader thread pool shares pipelines between threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Pipeline>();
};

/// One entry per step: the step's undo record, or `None` when the step did not run on this sample (not in this
/// phase, or none of the tensors it applies to were present).
pub type UndoRecords = Vec<Option<Value>>;

/// Per-step seeds derived from one sample seed (splitmix64), so each random step gets its own stream.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The tensors of a sample or batch by name.
type TensorMap = BTreeMap<String, tch::Tensor>;

/// Splits a sample's or a batch's tensors into those `options` lets a step see and the rest; the flag says
/// whether any seen tensor is data the step applies to (else the step does not run).
fn split_visible(tensors: TensorMap, options: &StepOptions) -> (TensorMap, TensorMap, bool) {
    let (visible, hidden): (TensorMap, TensorMap) = tensors
        .into_iter()
        .partition(|(name, _)| options.sees(name));
    let selected_any = visible
        .keys()
        .any(|name| DataKind::of_tensor(name).is_some());
    (visible, hidden, selected_any)
}

/// Whether samples can be stacked into one batch: same tensor names, shapes and kinds.
fn same_layout(samples: &[Sample]) -> bool {
    let Some(first) = samples.first() else {
        return true;
    };
    samples.iter().skip(1).all(|sample| {
        sample.tensors.len() == first.tensors.len()
            && sample
                .tensors
                .iter()
                .zip(&first.tensors)
                .all(|((name, a), (other, b))| {
                    name == other && a.size() == b.size() && a.kind() == b.kind()
                })
    })
}

impl Pipeline {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Rebuilds a pipeline from its saved description (`[{"name": ..., "config": {...}}, {"script": ...}]`).
    pub fn from_specs(registry: &PluginRegistry, specs: &[Value]) -> Result<Self> {
        let steps = specs
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                Step::from_spec(registry, spec)
                    .with_context(|| format!("preprocessing step {}", index + 1))
            })
            .collect::<Result<Steps>>()?;
        Ok(Self { steps })
    }

    pub fn specs(&self) -> Vec<Value> {
        self.steps.iter().map(Step::spec).collect()
    }

    /// Applies the steps that run in the training phase (augmentation, and what callers did before phases).
    pub fn apply(&self, sample: Sample, seed: u64) -> Result<(Sample, UndoRecords)> {
        self.apply_in(Phase::Training, sample, seed)
    }

    /// Applies, in order, every step whose `dataset_type` includes `phase`, each to the tensors its
    /// `applied_to` selects; returns the result and one undo record per step.
    pub fn apply_in(
        &self,
        phase: Phase,
        mut sample: Sample,
        seed: u64,
    ) -> Result<(Sample, UndoRecords)> {
        let mut records = Vec::with_capacity(self.steps.len());
        for (index, step) in self.steps.iter().enumerate() {
            if !step.options.runs_in(phase) {
                records.push(None);
                continue;
            }
            let (visible, hidden, selected_any) = split_visible(sample.tensors, &step.options);
            if !selected_any {
                // Nothing this step applies to (e.g. `applied_to: ["gt"]` at inference): it does not run.
                sample.tensors = visible.into_iter().chain(hidden).collect();
                records.push(None);
                continue;
            }
            let visible = Sample {
                tensors: visible,
                meta: sample.meta,
            };
            let (mut next, record) = step
                .apply(visible, derive_seed(seed, index as u64))
                .with_context(|| format!("step {} {}", index + 1, step.label()))?;
            next.tensors.extend(hidden);
            sample = next;
            records.push(Some(record));
        }
        Ok((sample, records))
    }

    /// [`Pipeline::apply_in`] for a whole batch (`[B, ...]` tensors, sample `i` seeded by `seeds[i]`): each step
    /// runs once on the batch, through the plugin's batched entry. A sample gets the same draws as
    /// [`Pipeline::apply_in`] gives it alone with its seed, whatever else is in the batch. Returns the batch and
    /// each sample's undo records.
    pub fn apply_batch(
        &self,
        phase: Phase,
        batch: Batch,
        seeds: &[u64],
    ) -> Result<(Batch, Vec<UndoRecords>)> {
        self.apply_batch_observed(phase, batch, seeds, &mut |_| {})
    }

    /// [`Pipeline::apply_batch`], calling `after_step(index)` as each step finishes (whether it ran or was
    /// skipped), so a profiler can attribute time to steps.
    pub fn apply_batch_observed(
        &self,
        phase: Phase,
        mut batch: Batch,
        seeds: &[u64],
        after_step: &mut dyn FnMut(usize),
    ) -> Result<(Batch, Vec<UndoRecords>)> {
        if seeds.len() != batch.len() {
            bail!(
                "a batch of {} samples needs as many seeds, got {}",
                batch.len(),
                seeds.len()
            );
        }
        let mut records: Vec<UndoRecords> = (0..batch.len())
            .map(|_| Vec::with_capacity(self.steps.len()))
            .collect();
        if batch.is_empty() {
            return Ok((batch, records));
        }
        for (index, step) in self.steps.iter().enumerate() {
            let (visible, hidden, selected_any) = if step.options.runs_in(phase) {
                split_visible(batch.tensors, &step.options)
            } else {
                (batch.tensors, BTreeMap::new(), false)
            };
            if !selected_any {
                batch.tensors = visible;
                batch.tensors.extend(hidden);
                records.iter_mut().for_each(|r| r.push(None));
                after_step(index);
                continue;
            }
            let visible = Batch {
                tensors: visible,
                metas: batch.metas,
            };
            let step_seeds: Vec<u64> = seeds
                .iter()
                .map(|&seed| derive_seed(seed, index as u64))
                .collect();
            let (mut next, step_records) = step
                .apply_batch(visible, &step_seeds)
                .with_context(|| format!("step {} {}", index + 1, step.label()))?;
            next.tensors.extend(hidden);
            batch = next;
            for (sample_records, record) in records.iter_mut().zip(step_records) {
                sample_records.push(Some(record));
            }
            after_step(index);
        }
        Ok((batch, records))
    }

    /// Applies the pipeline to several samples: batched ([`Pipeline::apply_batch`]) when they share one layout
    /// (tensor names, shapes and kinds), else one by one. Each sample gets the result it would get alone.
    pub fn apply_samples(
        &self,
        phase: Phase,
        samples: Vec<Sample>,
        seeds: &[u64],
    ) -> Result<Vec<(Sample, UndoRecords)>> {
        if seeds.len() != samples.len() {
            bail!(
                "{} samples need as many seeds, got {}",
                samples.len(),
                seeds.len()
            );
        }
        if !same_layout(&samples) {
            return samples
                .into_iter()
                .zip(seeds)
                .map(|(sample, &seed)| self.apply_in(phase, sample, seed))
                .collect();
        }
        let (batch, records) = self.apply_batch(phase, Batch::stack(samples)?, seeds)?;
        Ok(batch.unstack()?.into_iter().zip(records).collect())
    }

    /// Undoes, in reverse order, the steps that ran (per `records`) and that apply to label-space tensors:
    /// a prediction is undone like ivadomed's `gt`. A step that ran and cannot be undone is an error naming
    /// it, so a prediction is never left in the wrong space.
    pub fn undo(&self, mut sample: Sample, records: &[Option<Value>]) -> Result<Sample> {
        if records.len() != self.steps.len() {
            bail!(
                "{} undo records for a pipeline of {} steps",
                records.len(),
                self.steps.len()
            );
        }
        for (index, (step, record)) in self.steps.iter().zip(records).enumerate().rev() {
            let Some(record) = record else { continue };
            if !step.options.applied_to.contains(&DataKind::Label) {
                continue;
            }
            let (visible, hidden, _) = split_visible(sample.tensors, &step.options);
            let visible = Sample {
                tensors: visible,
                meta: sample.meta,
            };
            let mut restored = step.undo(visible, record).with_context(|| {
                format!(
                    "step {} {} was applied to this image and cannot be undone on its prediction",
                    index + 1,
                    step.label()
                )
            })?;
            restored.tensors.extend(hidden);
            sample = restored;
        }
        Ok(sample)
    }
}

/// A pipeline that can be replaced while a run uses it (hot reload). Readers take the current version once per
/// batch and keep it for that batch, so a swap lands between batches and a version stays alive while in use.
#[derive(Clone, Default)]
pub struct LivePipeline {
    current: Arc<RwLock<Arc<Pipeline>>>,
    generation: Arc<AtomicU64>,
}

impl LivePipeline {
    pub fn new(pipeline: Pipeline) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(pipeline))),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The version to use for the next batch.
    pub fn current(&self) -> Arc<Pipeline> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// How many times the pipeline was replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A handle that does not keep the pipeline alive (a watcher must not outlive the run using it).
    pub fn downgrade(&self) -> WeakLivePipeline {
        WeakLivePipeline {
            current: Arc::downgrade(&self.current),
            generation: Arc::downgrade(&self.generation),
        }
    }

    /// Swaps in a new version; batches already running keep the old one.
    pub fn replace(&self, pipeline: Pipeline) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(pipeline);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// See [`LivePipeline::downgrade`].
#[derive(Clone)]
pub struct WeakLivePipeline {
    current: std::sync::Weak<RwLock<Arc<Pipeline>>>,
    generation: std::sync::Weak<AtomicU64>,
}

impl WeakLivePipeline {
    /// The pipeline, while anything else still holds it.
    pub fn upgrade(&self) -> Option<LivePipeline> {
        Some(LivePipeline {
            current: self.current.upgrade()?,
            generation: self.generation.upgrade()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_options_are_stripped_and_parsed() {
        let mut config =
            json!({"size": [8, 8], "applied_to": ["gt", "im"], "dataset_type": "testing"});
        let options = StepOptions::take_from(&mut config).unwrap();
        assert_eq!(config, json!({"size": [8, 8]}));
        assert_eq!(options.applied_to, vec![DataKind::Image, DataKind::Label]);
        assert_eq!(options.dataset_type, vec![Phase::Testing]);
        assert!(options.sees("image") && options.sees("label") && options.sees("prediction"));
        assert!(!options.sees("roi"));
        assert!(
            options.sees("weights"),
            "unkinded tensors are seen by every step"
        );
        assert!(!options.runs_in(Phase::Training));
    }

    #[test]
    fn bad_keyed_options_are_refused() {
        let error = StepOptions::take_from(&mut json!({"applied_to": ["img"]}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown entry `img`"), "{error}");
        assert!(error.contains("im, gt, roi"), "{error}");
        let error = StepOptions::take_from(&mut json!({"dataset_type": []}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("is empty"), "{error}");
    }

    #[test]
    fn default_options_are_not_written_into_specs() {
        let mut spec = Map::new();
        StepOptions::default().write_to(&mut spec);
        assert!(spec.is_empty());
        let options = StepOptions {
            applied_to: vec![DataKind::Roi],
            dataset_type: vec![Phase::Training, Phase::Validation],
        };
        options.write_to(&mut spec);
        assert_eq!(
            Value::Object(spec),
            json!({"applied_to": ["roi"], "dataset_type": ["training", "validation"]})
        );
    }
}
