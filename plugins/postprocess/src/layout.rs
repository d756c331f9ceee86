//! Where the prediction's classes and spatial axes are, and the moves between device tensors and the host-side
//! boolean volumes that connected-component labelling works on.
use ivado_sdk::serde_json::Value;
use ivado_sdk::tch::{Device, Kind, Tensor};
use ivado_sdk::{Config, PluginError, Result, Sample};

/// The sample tensor every post-processing step rewrites.
pub const PREDICTION: &str = "prediction";

/// How a prediction tensor splits into classes and spatial axes.
///
/// The trailing `rank` axes are spatial; the axes before them (usually one class axis, possibly none) are
/// flattened into `channels`, each of which is processed as its own binary volume. A 2D `[H, W]` image is seen
/// as the volume `[H, W, 1]`, so 3D neighbourhoods reduce to their in-plane part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub shape: Vec<i64>,
    pub rank: usize,
    pub channels: usize,
    pub dims: [usize; 3],
}

impl Layout {
    /// The layout of `prediction` in `sample`. The spatial rank comes from `meta.spacing` (one entry per spatial
    /// axis) when the sample has one, else from `image` (`[C, *spatial]`), else from the prediction itself taken
    /// as channels-first (`[C, X, Y, Z]` or `[C, H, W]`).
    pub fn of(sample: &Sample, prediction: &Tensor, who: &str) -> Result<Self> {
        let shape = prediction.size();
        let rank = if sample.meta.contains_key("spacing") {
            sample
                .spacing()
                .map_err(|e| PluginError(format!("{who}: {e}")))?
                .len()
        } else if let Some(image) = sample.tensors.get("image") {
            image.dim().saturating_sub(1)
        } else {
            shape.len().saturating_sub(1)
        };
        if rank != 2 && rank != 3 {
            return Err(PluginError(format!(
                "{who}: samples must be 2D or 3D, got {rank} spatial axes (prediction shape {shape:?})"
            )));
        }
        if shape.len() < rank {
            return Err(PluginError(format!(
                "{who}: the sample is {rank}D but `{PREDICTION}` has shape {shape:?}"
            )));
        }
        let lead = shape.len() - rank;
        let channels = shape[..lead].iter().product::<i64>() as usize;
        let spatial: Vec<usize> = shape[lead..].iter().map(|&n| n as usize).collect();
        let dims = if rank == 3 {
            [spatial[0], spatial[1], spatial[2]]
        } else {
            [spatial[0], spatial[1], 1]
        };
        Ok(Self {
            shape,
            rank,
            channels,
            dims,
        })
    }

    /// Voxels in one channel.
    pub fn voxels(&self) -> usize {
        self.dims.iter().product()
    }

    /// The spatial part of the shape.
    pub fn spatial(&self) -> &[i64] {
        &self.shape[self.shape.len() - self.rank..]
    }
}

/// The sample's prediction and its layout.
pub fn prediction<'a>(sample: &'a Sample, who: &str) -> Result<(&'a Tensor, Layout)> {
    let prediction = sample
        .get(PREDICTION)
        .map_err(|e| PluginError(format!("{who}: {e}")))?;
    let layout = Layout::of(sample, prediction, who)?;
    Ok((prediction, layout))
}

/// A boolean tensor as a flat host vector in C order: channel by channel, each an `[X, Y, Z]` volume.
pub fn host_mask(mask: &Tensor) -> Result<Vec<bool>> {
    let flat = mask
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Bool)?
        .f_reshape([-1])?;
    Ok(Vec::<bool>::try_from(&flat)?)
}

/// `mask` (flat, C order) as a 0/1 tensor of `like`'s shape, kind and device.
pub fn mask_like(mask: &[bool], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(mask)?
        .f_reshape(like.size().as_slice())?
        .f_to_device(like.device())?
        .f_to_kind(like.f_kind()?)?)
}

/// `prediction` with every voxel outside `keep` set to 0, same shape and kind.
pub fn keep_only(prediction: &Tensor, keep: &Tensor) -> Result<Tensor> {
    let kind = prediction.f_kind()?;
    let keep = keep.f_to_device(prediction.device())?.f_to_kind(kind)?;
    Ok(prediction.f_mul(&keep)?.f_to_kind(kind)?)
}

/// Runs `per_channel` on each channel's `[X, Y, Z]` slice of a flat host mask and concatenates the results.
pub fn map_channels(
    mask: &[bool],
    layout: &Layout,
    mut per_channel: impl FnMut(&[bool]) -> Vec<bool>,
) -> Vec<bool> {
    let voxels = layout.voxels();
    let mut out = Vec::with_capacity(mask.len());
    for channel in 0..layout.channels {
        out.extend(per_channel(&mask[channel * voxels..(channel + 1) * voxels]));
    }
    out
}

/// Another sample tensor that multiplies the prediction (a mask, an uncertainty map), on the prediction's
/// device. It must have the prediction's spatial shape, and leading axes that broadcast against the
/// prediction's (equal, 1, or absent).
pub fn companion(sample: &Sample, name: &str, layout: &Layout, who: &str) -> Result<Tensor> {
    let tensor = sample
        .get(name)
        .map_err(|e| PluginError(format!("{who}: {e}")))?;
    let shape = tensor.size();
    let fits = shape.len() >= layout.rank
        && shape.len() <= layout.shape.len()
        && shape[shape.len() - layout.rank..] == *layout.spatial()
        && shape
            .iter()
            .rev()
            .zip(layout.shape.iter().rev())
            .all(|(&have, &want)| have == want || have == 1);
    if !fits {
        return Err(PluginError(format!(
            "{who}: `{name}` has shape {shape:?}, which does not match `{PREDICTION}` {:?}",
            layout.shape
        )));
    }
    let device = sample.get(PREDICTION)?.device();
    Ok(tensor.f_to_device(device)?)
}

/// A threshold read from the config: any finite number.
pub fn finite(config: &mut Config, key: &str, who: &str) -> Result<f64> {
    let value = config.f64(key)?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(PluginError(format!(
            "{who}: `{key}` must be finite, got {value}"
        )))
    }
}

/// The undo record of every step: post-processing changes values only, nothing to undo.
pub fn no_record() -> Value {
    Value::Null
}
