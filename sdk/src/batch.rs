use crate::{PluginError, Result, Sample, Transform};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use tch::Tensor;

/// Several samples of the same layout, stacked: every tensor is `[B, ...]` (sample `i` is index `i` of the first
/// axis), and each sample keeps its own metadata (its spacing may differ from the others').
///
/// A batch goes through a transform in one call ([`Transform::apply_batch`]), so per-call costs (the plugin
/// boundary, libtorch's per-op overhead) are paid once per batch rather than once per sample.
pub struct Batch {
    pub tensors: BTreeMap<String, Tensor>,
    pub metas: Vec<Map<String, Value>>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.metas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| PluginError(format!("batch has no tensor named `{name}`")))
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// A batch of one sample: each tensor gains a leading axis of 1 (a view, no copy).
    pub fn of_one(sample: Sample) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for (name, tensor) in sample.tensors {
            tensors.insert(name, tensor.f_unsqueeze(0)?);
        }
        Ok(Self {
            tensors,
            metas: vec![sample.meta],
        })
    }

    /// Stacks samples that have the same tensor names, and per name the same shape and kind. Fails, saying what
    /// differs, otherwise.
    pub fn stack(samples: Vec<Sample>) -> Result<Self> {
        let Some(first) = samples.first() else {
            return Ok(Self {
                tensors: BTreeMap::new(),
                metas: Vec::new(),
            });
        };
        let layout: Vec<(String, Vec<i64>, tch::Kind)> = first
            .tensors
            .iter()
            .map(|(name, t)| Ok((name.clone(), t.size(), t.f_kind()?)))
            .collect::<Result<_>>()?;
        for (index, sample) in samples.iter().enumerate().skip(1) {
            let same = sample.tensors.len() == layout.len()
                && sample
                    .tensors
                    .iter()
                    .zip(&layout)
                    .all(|((name, t), (n, s, k))| name == n && &t.size() == s && t.kind() == *k);
            if !same {
                let describe = |s: &Sample| -> Vec<String> {
                    s.tensors
                        .iter()
                        .map(|(n, t)| format!("{n} {:?} {:?}", t.size(), t.kind()))
                        .collect()
                };
                return Err(PluginError(format!(
                    "cannot batch samples of different layouts: sample 0 has {:?}, sample {index} has {:?}",
                    describe(first),
                    describe(sample)
                )));
            }
        }
        let mut tensors = BTreeMap::new();
        for (name, _, _) in &layout {
            let parts: Vec<&Tensor> = samples.iter().map(|s| &s.tensors[name]).collect();
            tensors.insert(name.clone(), Tensor::f_stack(&parts, 0)?);
        }
        Ok(Self {
            tensors,
            metas: samples.into_iter().map(|s| s.meta).collect(),
        })
    }

    /// Sample `index` as a view into the batch's tensors.
    pub fn sample(&self, index: usize) -> Result<Sample> {
        let mut tensors = BTreeMap::new();
        for (name, tensor) in &self.tensors {
            tensors.insert(name.clone(), tensor.f_select(0, index as i64)?);
        }
        let meta = self.metas.get(index).cloned().ok_or_else(|| {
            PluginError(format!(
                "sample {index} of a batch of {} samples",
                self.len()
            ))
        })?;
        Ok(Sample { tensors, meta })
    }

    /// The samples, each a view into the batch's tensors.
    pub fn unstack(self) -> Result<Vec<Sample>> {
        let mut samples = Vec::with_capacity(self.len());
        for (index, meta) in self.metas.into_iter().enumerate() {
            let mut tensors = BTreeMap::new();
            for (name, tensor) in &self.tensors {
                tensors.insert(name.clone(), tensor.f_select(0, index as i64)?);
            }
            samples.push(Sample { tensors, meta });
        }
        Ok(samples)
    }

    /// The only sample of a batch of one.
    pub fn into_one(self) -> Result<Sample> {
        if self.len() != 1 {
            return Err(PluginError(format!(
                "expected a batch of one sample, got {}",
                self.len()
            )));
        }
        let mut samples = self.unstack()?;
        Ok(samples.remove(0))
    }

    /// Sample `index`'s metadata as a [`Sample`] without tensors, for the metadata helpers of [`Sample`].
    fn meta_sample(&self, index: usize) -> Sample {
        Sample {
            tensors: BTreeMap::new(),
            meta: self.metas[index].clone(),
        }
    }

    /// Each sample's spacing, checked as [`Sample::checked_spacing`] does.
    pub fn checked_spacings(&self, rank: usize, who: &str) -> Result<Vec<Vec<f64>>> {
        (0..self.len())
            .map(|index| self.meta_sample(index).checked_spacing(rank, who))
            .collect()
    }
}

/// What [`Transform::apply_batch`] does unless a transform overrides it: [`Transform::apply`] on each sample with
/// its seed, then the results stacked again. Fails if the samples come out with different layouts.
pub fn apply_each<T: Transform + ?Sized>(
    transform: &T,
    batch: &mut Batch,
    seeds: &[u64],
) -> Result<Vec<Value>> {
    check_seeds(batch, seeds)?;
    let samples = std::mem::replace(
        batch,
        Batch {
            tensors: BTreeMap::new(),
            metas: Vec::new(),
        },
    )
    .unstack()?;
    let mut records = Vec::with_capacity(samples.len());
    let mut outputs = Vec::with_capacity(samples.len());
    for (mut sample, &seed) in samples.into_iter().zip(seeds) {
        records.push(transform.apply(&mut sample, seed)?);
        outputs.push(sample);
    }
    *batch = Batch::stack(outputs).map_err(|e| {
        PluginError(format!(
            "{}: {e} (the transform gave samples of one batch different shapes)",
            T::NAME
        ))
    })?;
    Ok(records)
}

/// [`Transform::apply`] through a transform's batched path, as a batch of one: for transforms whose
/// [`Transform::apply_batch`] is the real implementation, so both paths run the same code.
pub fn apply_as_batch<T: Transform + ?Sized>(
    transform: &T,
    sample: &mut Sample,
    seed: u64,
) -> Result<Value> {
    let taken = std::mem::take(sample);
    let mut batch = Batch::of_one(taken)?;
    let mut records = transform.apply_batch(&mut batch, &[seed])?;
    *sample = batch.into_one()?;
    records
        .pop()
        .ok_or_else(|| PluginError(format!("{}: no undo record for the sample", T::NAME)))
}

/// Checks there is one seed per sample.
pub fn check_seeds(batch: &Batch, seeds: &[u64]) -> Result<()> {
    if seeds.len() == batch.len() {
        Ok(())
    } else {
        Err(PluginError(format!(
            "a batch of {} samples needs as many seeds, got {}",
            batch.len(),
            seeds.len()
        )))
    }
}
