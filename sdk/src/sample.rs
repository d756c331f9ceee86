use crate::{PluginError, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use tch::Tensor;

/// One training or inference sample: named tensors plus JSON metadata.
///
/// Names say what a tensor is, and transforms use them to pick interpolation: `image` (channels first,
/// `[C, H, W]` or `[C, D, H, W]`), `label` and `roi` (masks, resampled nearest), `prediction` (soft maps,
/// resampled linearly). Metadata holds at least `spacing`: the physical size of one element along each
/// spatial axis in mm, in the tensors' axis order.
pub struct Sample {
    pub tensors: BTreeMap<String, Tensor>,
    pub meta: Map<String, Value>,
}

impl Sample {
    pub fn new() -> Self {
        Self {
            tensors: BTreeMap::new(),
            meta: Map::new(),
        }
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| PluginError(format!("sample has no tensor named `{name}`")))
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Physical spacing from the metadata, one entry per spatial axis.
    pub fn spacing(&self) -> Result<Vec<f64>> {
        self.meta
            .get("spacing")
            .and_then(Value::as_array)
            .and_then(|items| items.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| PluginError::new("sample metadata has no numeric `spacing` list"))
    }

    /// The spacing, checked to have `rank` finite positive entries; errors start with `who`.
    pub fn checked_spacing(&self, rank: usize, who: &str) -> Result<Vec<f64>> {
        let spacing = self
            .spacing()
            .map_err(|e| PluginError(format!("{who}: {e}")))?;
        if spacing.len() != rank {
            return Err(PluginError(format!(
                "{who}: the sample is {rank}D but its spacing {spacing:?} has {} entries",
                spacing.len()
            )));
        }
        if let Some(bad) = spacing.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(PluginError(format!(
                "{who}: the sample's spacing {spacing:?} has a non-positive entry {bad}"
            )));
        }
        Ok(spacing)
    }

    pub fn set_spacing(&mut self, spacing: &[f64]) {
        self.meta
            .insert("spacing".into(), Value::from(spacing.to_vec()));
    }
}

impl Default for Sample {
    fn default() -> Self {
        Self::new()
    }
}
