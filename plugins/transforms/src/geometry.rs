//! Shape checks, undo-record parsing and interpolation shared by the spatial transforms.
use ivado_sdk::serde_json::Value;
use ivado_sdk::tch::{Kind, Tensor};
use ivado_sdk::{Batch, PluginError, Result, Sample};

/// The spatial shape shared by every tensor of `sample`, whose trailing `rank` axes are spatial.
///
/// `image` must be channels-first with exactly one leading axis; other tensors may have any number of leading
/// axes (none, a channel axis, ...). Fails, naming the tensors, when spatial shapes disagree, and when the sample
/// holds no tensor at all.
pub fn spatial_shape(sample: &Sample, rank: usize, who: &str) -> Result<Vec<i64>> {
    shared_spatial_shape(
        sample
            .tensors
            .iter()
            .map(|(name, tensor)| (name.as_str(), tensor.size())),
        rank,
        who,
    )
}

/// [`spatial_shape`] of a batch (tensors `[B, ...]`): the spatial shape every sample shares. Messages show one
/// sample's shapes, without the batch axis.
pub fn batch_spatial_shape(batch: &Batch, rank: usize, who: &str) -> Result<Vec<i64>> {
    shared_spatial_shape(
        batch.tensors.iter().map(|(name, tensor)| {
            (
                name.as_str(),
                tensor.size().get(1..).unwrap_or_default().to_vec(),
            )
        }),
        rank,
        who,
    )
}

/// The last `rank` dims every `(name, shape)` shares, `image` being `[C, spatial...]`.
fn shared_spatial_shape<'a>(
    shapes: impl Iterator<Item = (&'a str, Vec<i64>)>,
    rank: usize,
    who: &str,
) -> Result<Vec<i64>> {
    let mut reference: Option<(&str, Vec<i64>)> = None;
    for (name, shape) in shapes {
        if name == "image" && shape.len() != rank + 1 {
            return Err(PluginError(format!(
                "{who}: configured for {rank}D, so `image` must have {} dims ([C, {}]), got shape {shape:?}",
                rank + 1,
                if rank == 2 { "H, W" } else { "D, H, W" }
            )));
        }
        if shape.len() < rank {
            return Err(PluginError(format!(
                "{who}: configured for {rank}D, but tensor `{name}` has shape {shape:?} with fewer than {rank} dims"
            )));
        }
        let spatial = shape[shape.len() - rank..].to_vec();
        match &reference {
            None => reference = Some((name, spatial)),
            Some((first, expected)) if *expected != spatial => {
                return Err(PluginError(format!(
                    "{who}: tensors disagree on the spatial shape: `{first}` has {expected:?}, `{name}` has {spatial:?}"
                )));
            }
            Some(_) => {}
        }
    }
    reference
        .map(|(_, shape)| shape)
        .ok_or_else(|| PluginError(format!("{who}: the sample has no tensors")))
}

/// Checks a configured rank-2 or rank-3 list.
pub fn check_rank(who: &str, key: &str, len: usize) -> Result<usize> {
    if len == 2 || len == 3 {
        Ok(len)
    } else {
        Err(PluginError(format!(
            "{who}: config key `{key}` must have 2 entries (2D) or 3 entries (3D), got {len}"
        )))
    }
}

fn record_field<'a>(record: &'a Value, key: &str, who: &str) -> Result<&'a Vec<Value>> {
    record
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| PluginError(format!("{who}: undo record has no `{key}` list: {record}")))
}

/// An integer list of the undo record, with `len` entries.
pub fn record_ints(record: &Value, key: &str, len: usize, who: &str) -> Result<Vec<i64>> {
    let items = record_field(record, key, who)?;
    let values: Option<Vec<i64>> = items.iter().map(Value::as_i64).collect();
    match values {
        Some(values) if values.len() == len => Ok(values),
        _ => Err(PluginError(format!(
            "{who}: undo record `{key}` must be {len} integers, got {}",
            Value::Array(items.clone())
        ))),
    }
}

/// A number list of the undo record, with `len` entries.
pub fn record_floats(record: &Value, key: &str, len: usize, who: &str) -> Result<Vec<f64>> {
    let items = record_field(record, key, who)?;
    let values: Option<Vec<f64>> = items.iter().map(Value::as_f64).collect();
    match values {
        Some(values) if values.len() == len => Ok(values),
        _ => Err(PluginError(format!(
            "{who}: undo record `{key}` must be {len} numbers, got {}",
            Value::Array(items.clone())
        ))),
    }
}

/// How a tensor is interpolated when resampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    /// Bi/trilinear, `align_corners = false`: images and soft predictions.
    Linear,
    /// Nearest neighbour (pixel-centre aligned, PyTorch's `nearest-exact`): masks, which must stay binary.
    Nearest,
    /// The closest libtorch has to scipy's order-2 spline, which ivadomed uses for images: bicubic in 2D (Keys
    /// kernel, `a = -0.75`), trilinear in 3D (libtorch has no tricubic). `align_corners = false`.
    Cubic,
}

pub fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// How `Resample` interpolates a tensor, by name: integer and boolean tensors nearest (their values must survive),
/// masks (`label*`, `roi*`) as `masks` says, images (`image*`) [`Interpolation::Cubic`] (ivadomed resamples images
/// with an order-2 spline), everything else (predictions, soft maps) linearly.
pub fn interpolation_for(name: &str, kind: Kind, masks: Interpolation) -> Interpolation {
    if !is_float(kind) {
        Interpolation::Nearest
    } else if name.starts_with("label") || name.starts_with("roi") {
        masks
    } else if name.starts_with("image") {
        Interpolation::Cubic
    } else {
        Interpolation::Linear
    }
}

/// Resizes the trailing `size.len()` spatial axes of `tensor` to `size`; leading axes are kept. The output
/// grid covers the same physical extent as the input (pixel centres aligned as with `align_corners = false`).
pub fn resize(tensor: &Tensor, size: &[i64], mode: Interpolation) -> Result<Tensor> {
    let shape = tensor.size();
    let rank = size.len();
    if shape.len() < rank {
        return Err(PluginError(format!(
            "cannot resize a tensor of shape {shape:?} to spatial size {size:?}"
        )));
    }
    let (leading, spatial) = shape.split_at(shape.len() - rank);
    if spatial == size {
        return Ok(tensor.shallow_clone());
    }
    let kind = tensor.f_kind()?;
    // Interpolate in float32 (or float64) whatever the stored type, and convert back: nearest values are
    // copied exactly, so integer and boolean masks survive the round trip.
    let work_kind = if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let channels: i64 = leading.iter().product();
    let mut batched: Vec<i64> = vec![1, channels];
    batched.extend_from_slice(spatial);
    let input = tensor.f_to_kind(work_kind)?.f_reshape(batched.as_slice())?;
    let output = match (mode, rank) {
        (Interpolation::Linear, 2) => input.f_upsample_bilinear2d(size, false, None, None)?,
        (Interpolation::Linear, 3) => {
            input.f_upsample_trilinear3d(size, false, None, None, None)?
        }
        (Interpolation::Cubic, 2) => input.f_upsample_bicubic2d(size, false, None, None)?,
        (Interpolation::Cubic, 3) => input.f_upsample_trilinear3d(size, false, None, None, None)?,
        (Interpolation::Nearest, 2) => {
            input.f_internal_upsample_nearest_exact2d(size, None, None)?
        }
        (Interpolation::Nearest, 3) => {
            input.f_internal_upsample_nearest_exact3d(size, None, None, None)?
        }
        _ => {
            return Err(PluginError(format!(
                "resampling supports 2D and 3D, got {rank} spatial axes"
            )))
        }
    };
    let mut out_shape = leading.to_vec();
    out_shape.extend_from_slice(size);
    Ok(output.f_reshape(out_shape.as_slice())?.f_to_kind(kind)?)
}
