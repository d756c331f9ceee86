//! An ordered list of plugin transforms applied to a sample, with the undo records that let inference bring
//! predictions back to native space.
use crate::plugin::{PluginRegistry, PluginTransform};
use anyhow::{Context, Result};
use ivado_sdk::Sample;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Clone, Default)]
pub struct Pipeline {
    pub steps: Vec<Arc<PluginTransform>>,
}

/// Per-step seeds derived from one sample seed (splitmix64), so each random step gets its own stream.
pub fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Pipeline {
    /// Rebuilds a pipeline from its saved description (`[{"name": ..., "config": {...}}, ...]`).
    pub fn from_specs(registry: &PluginRegistry, specs: &[Value]) -> Result<Self> {
        let steps = specs
            .iter()
            .map(|spec| {
                let name = spec
                    .get("name")
                    .and_then(Value::as_str)
                    .context("transform spec without a `name`")?;
                let config = spec.get("config").cloned().unwrap_or(Value::Null);
                Ok(Arc::new(registry.transform(name, &config)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { steps })
    }

    pub fn specs(&self) -> Vec<Value> {
        self.steps
            .iter()
            .map(|step| json!({"name": step.name, "config": step.config}))
            .collect()
    }

    /// Applies every step in order; returns the result and one undo record per step.
    pub fn apply(&self, mut sample: Sample, seed: u64) -> Result<(Sample, Vec<Value>)> {
        let mut records = Vec::with_capacity(self.steps.len());
        for (index, step) in self.steps.iter().enumerate() {
            let (next, record) = step.apply(&sample, derive_seed(seed, index as u64))?;
            sample = next;
            records.push(record);
        }
        Ok((sample, records))
    }

    /// Undoes every step in reverse order.
    pub fn undo(&self, mut sample: Sample, records: &[Value]) -> Result<Sample> {
        for (step, record) in self.steps.iter().zip(records).rev() {
            sample = step.undo(&sample, record)?;
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

    /// Swaps in a new version; batches already running keep the old one.
    pub fn replace(&self, pipeline: Pipeline) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(pipeline);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}
