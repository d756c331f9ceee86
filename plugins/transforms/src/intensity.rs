//! ivadomed's intensity transforms: `RandomShiftIntensity`, `AdditiveGaussianNoise`, `HistogramClipping`,
//! `RandomGamma`, `RandomBiasField` and `RandomBlur`.
//!
//! They change only the tensor named `image`, leave a sample without one untouched, return a `null` record and undo
//! as a no-op (a prediction carries no intensity change to revert). ivadomed runs them on each contrast (channel)
//! separately, drawing the random parameters anew for each; so do these: channel c of `image` `[C, ...]` gets its
//! own draws, in channel order from the one seeded stream. Integer images come out as float32.
use crate::cpu::{f32_data, new_f32};
use crate::filters::{gaussian_filter_rows, Border};
use crate::geometry::is_float;
use crate::random::{
    chance, fill_normal, non_negative_key, normal, normal_values, probability_key, range_key,
    seeded, uniform,
};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{Device, Kind, Tensor};
use ivado_sdk::{
    apply_as_batch, check_seeds, Batch, Config, PluginError, Result, Sample, Transform,
};

/// The kind an intensity transform writes: the image's own float kind, else float32.
fn output_kind(image: &Tensor) -> Result<Kind> {
    let kind = image.f_kind()?;
    Ok(if is_float(kind) { kind } else { Kind::Float })
}

/// The batch's `image` (`[B, C, ...]`), checked to be channels-first with at least one spatial axis per sample,
/// and its channel count; `None` when the batch has no image.
fn batch_image<'a>(batch: &'a Batch, who: &str) -> Result<Option<(&'a Tensor, i64)>> {
    let Some(image) = batch.tensors.get("image") else {
        return Ok(None);
    };
    let shape = image.size();
    if shape.len() < 3 || image.numel() == 0 {
        return Err(PluginError(format!(
            "{who}: `image` must be a non-empty [C, ...] tensor, got shape {:?}",
            shape.get(1..).unwrap_or_default()
        )));
    }
    Ok(Some((image, shape[1])))
}

/// `[B, C, 1, 1, ...]` tensor of per-(sample, channel) values (`values[b * C + c]`) for broadcasting against a
/// `dims`-dimensional batch image.
fn per_channel(
    values: &[f64],
    channels: i64,
    dims: usize,
    kind: Kind,
    device: Device,
) -> Result<Tensor> {
    let mut shape = vec![values.len() as i64 / channels.max(1), channels];
    shape.resize(dims, 1);
    Ok(Tensor::f_from_slice(values)?
        .f_reshape(shape.as_slice())?
        .f_to_kind(kind)?
        .f_to_device(device)?)
}

/// Replaces the (sample, channel) rows `rows` (`b * C + c`) of `image` (`[B, C, ...]`) by `change` of them (a
/// `[rows, ...]` tensor in the output kind), keeping the others; the image comes back in its output kind.
fn change_rows(
    image: &Tensor,
    rows: &[i64],
    change: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let kind = output_kind(image)?;
    let shape = image.size();
    let mut flat_shape = vec![shape[0] * shape[1]];
    flat_shape.extend_from_slice(&shape[2..]);
    let flat = image.f_to_kind(kind)?.f_reshape(flat_shape.as_slice())?;
    if rows.is_empty() {
        return Ok(flat.f_reshape(shape.as_slice())?);
    }
    let index = Tensor::f_from_slice(rows)?.f_to_device(image.device())?;
    let changed = change(&flat.f_index_select(0, &index)?)?.f_to_kind(kind)?;
    Ok(flat
        .f_index_copy(0, &index, &changed)?
        .f_reshape(shape.as_slice())?)
}

/// `[rows, 1, 1, ...]` tensor of per-row values for broadcasting against `dims`-dimensional rows.
fn per_row(values: &[f64], dims: usize, kind: Kind, device: Device) -> Result<Tensor> {
    let mut shape = vec![values.len() as i64];
    shape.resize(dims, 1);
    Ok(Tensor::f_from_slice(values)?
        .f_reshape(shape.as_slice())?
        .f_to_kind(kind)?
        .f_to_device(device)?)
}

/// ivadomed's `RandomShiftIntensity`: with probability `prob`, adds an offset uniform in `shift_range`.
pub struct RandomShiftIntensity {
    shift_range: (f64, f64),
    prob: f64,
}

impl Transform for RandomShiftIntensity {
    const NAME: &'static str = "RandomShiftIntensity";
    const SUMMARY: &'static str =
        "With probability `prob`, adds to each image channel an offset uniform in `shift_range`";

    fn defaults() -> Value {
        json!({"shift_range": null, "prob": 0.1})
    }

    fn build(config: &mut Config) -> Result<Self> {
        Ok(Self {
            shift_range: range_key(config, Self::NAME, "shift_range")?,
            prob: probability_key(config, Self::NAME, "prob")?,
        })
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        let records = vec![Value::Null; seeds.len()];
        let Some((image, channels)) = batch_image(batch, Self::NAME)? else {
            return Ok(records);
        };
        let mut offsets = Vec::with_capacity(seeds.len() * channels as usize);
        for &seed in seeds {
            let mut rng = seeded(seed);
            for _ in 0..channels {
                offsets.push(if chance(&mut rng, self.prob) {
                    uniform(&mut rng, self.shift_range.0, self.shift_range.1)
                } else {
                    0.0
                });
            }
        }
        let kind = output_kind(image)?;
        let shifted = image.f_to_kind(kind)?.f_add(&per_channel(
            &offsets,
            channels,
            image.dim(),
            kind,
            image.device(),
        )?)?;
        batch.insert("image", shifted);
        Ok(records)
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// ivadomed's `AdditiveGaussianNoise`: adds N(`mean`, `std`²) noise to every voxel (always applied).
pub struct AdditiveGaussianNoise {
    mean: f64,
    std: f64,
}

impl Transform for AdditiveGaussianNoise {
    const NAME: &'static str = "AdditiveGaussianNoise";
    const SUMMARY: &'static str = "Adds Gaussian noise N(mean, std²) to every image voxel";

    fn defaults() -> Value {
        json!({"mean": 0.0, "std": 0.01})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let mean = config.f64("mean")?;
        if !mean.is_finite() {
            return Err(PluginError(format!(
                "{}: `mean` must be finite",
                Self::NAME
            )));
        }
        Ok(Self {
            mean,
            std: non_negative_key(config, Self::NAME, "std")?,
        })
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    /// Each sample's noise comes from its own seed; the batch's noise is added in one op.
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        let records = vec![Value::Null; seeds.len()];
        let Some((image, _)) = batch_image(batch, Self::NAME)? else {
            return Ok(records);
        };
        let per_sample = image.numel() as i64 / seeds.len() as i64;
        if let Some(pixels) = f32_data(image) {
            // Fused on the CPU: each value is x + (mean + std z), as the libtorch path below adds float32 noise.
            let normal = normal(self.mean, self.std)?;
            let noisy = new_f32(&image.size(), |out| {
                for ((target, source), &seed) in out
                    .chunks_exact_mut(per_sample as usize)
                    .zip(pixels.chunks_exact(per_sample as usize))
                    .zip(seeds)
                {
                    fill_normal(&mut seeded(seed), &normal, target);
                    for (t, &x) in target.iter_mut().zip(source) {
                        *t += x;
                    }
                }
                Ok(())
            })?;
            batch.insert("image", noisy);
            return Ok(records);
        }
        let mut values = Vec::with_capacity(image.numel());
        for &seed in seeds {
            // ivadomed draws the noise as float32 too.
            values.extend(normal_values(
                &mut seeded(seed),
                self.mean,
                self.std,
                per_sample,
            )?);
        }
        let noise = Tensor::f_from_slice(&values)?
            .f_reshape(image.size().as_slice())?
            .f_to_device(image.device())?;
        let kind = output_kind(image)?;
        let noisy = image.f_to_kind(kind)?.f_add(&noise.f_to_kind(kind)?)?;
        batch.insert("image", noisy);
        Ok(records)
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// ivadomed's `HistogramClipping`: clips each image channel to its `min_percentile` and `max_percentile`
/// percentiles (in 0..=100, numpy's default linear interpolation between order statistics).
pub struct HistogramClipping {
    min_percentile: f64,
    max_percentile: f64,
}

/// numpy's linear interpolation between neighbouring order statistics `a` and `b` at fraction `t`, computed from
/// the nearer end as numpy's `_lerp` does.
fn numpy_lerp(a: f64, b: f64, t: f64) -> f64 {
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

/// Where percentile `q` of `count` sorted values falls: the lower neighbour's index and the fraction past it.
fn percentile_position(count: i64, q: f64) -> (i64, f64) {
    let position = q / 100.0 * (count - 1) as f64;
    let below = (position.floor() as i64).clamp(0, count - 1);
    (below, position - below as f64)
}

impl Transform for HistogramClipping {
    const NAME: &'static str = "HistogramClipping";
    const SUMMARY: &'static str =
        "Clips each image channel between its min_percentile and max_percentile percentiles";

    fn defaults() -> Value {
        json!({"min_percentile": 5.0, "max_percentile": 95.0})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let min_percentile = config.f64("min_percentile")?;
        let max_percentile = config.f64("max_percentile")?;
        if !(0.0 <= min_percentile && min_percentile <= max_percentile && max_percentile <= 100.0) {
            return Err(PluginError(format!(
                "{}: need 0 <= min_percentile <= max_percentile <= 100, got {min_percentile} and {max_percentile}",
                Self::NAME
            )));
        }
        Ok(Self {
            min_percentile,
            max_percentile,
        })
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    /// All channels of all samples are sorted in one op; each gets its own limits.
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        let records = vec![Value::Null; seeds.len()];
        let Some((image, channels)) = batch_image(batch, Self::NAME)? else {
            return Ok(records);
        };
        let kind = output_kind(image)?;
        let rows = image.size()[0] * channels;
        let flat = image.f_to_kind(kind)?.f_reshape([rows, -1])?;
        let count = flat.size()[1];
        let (sorted, _) = flat.f_sort(1, false)?;
        // Only the two neighbouring order statistics of each percentile come back to the host.
        let (low_at, low_t) = percentile_position(count, self.min_percentile);
        let (high_at, high_t) = percentile_position(count, self.max_percentile);
        let picks = [
            low_at,
            (low_at + 1).min(count - 1),
            high_at,
            (high_at + 1).min(count - 1),
        ];
        let index = Tensor::f_from_slice(&picks)?.f_to_device(image.device())?;
        let order_stats = Vec::<f64>::try_from(
            &sorted
                .f_index_select(1, &index)?
                .f_to_kind(Kind::Double)?
                .f_to_device(Device::Cpu)?
                .f_reshape([-1])?,
        )?;
        let lows: Vec<f64> = order_stats
            .chunks(4)
            .map(|stats| numpy_lerp(stats[0], stats[1], low_t))
            .collect();
        let highs: Vec<f64> = order_stats
            .chunks(4)
            .map(|stats| numpy_lerp(stats[2], stats[3], high_t))
            .collect();
        let dims = image.dim();
        let device = image.device();
        let clipped = image
            .f_to_kind(kind)?
            .f_clamp_min_tensor(&per_channel(&lows, channels, dims, kind, device)?)?
            .f_clamp_max_tensor(&per_channel(&highs, channels, dims, kind, device)?)?;
        batch.insert("image", clipped);
        Ok(records)
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// ivadomed's `RandomGamma`: with probability `p`, `x -> sign(x) |x|^gamma` with `log(gamma)` uniform in
/// `log_gamma_range`; overflow to ±inf becomes the dtype's largest finite value (numpy's `nan_to_num`).
pub struct RandomGamma {
    log_gamma_range: (f64, f64),
    p: f64,
}

impl Transform for RandomGamma {
    const NAME: &'static str = "RandomGamma";
    const SUMMARY: &'static str =
        "With probability p, sign(x)|x|^gamma per image channel, log(gamma) uniform in log_gamma_range";

    fn defaults() -> Value {
        json!({"log_gamma_range": null, "p": 0.5})
    }

    fn build(config: &mut Config) -> Result<Self> {
        Ok(Self {
            log_gamma_range: range_key(config, Self::NAME, "log_gamma_range")?,
            p: probability_key(config, Self::NAME, "p")?,
        })
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    /// Draws per sample and channel from the sample's seed; the channels drawn to change are powered together.
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        let records = vec![Value::Null; seeds.len()];
        let Some((image, channels)) = batch_image(batch, Self::NAME)? else {
            return Ok(records);
        };
        let mut rows = Vec::new();
        let mut gammas = Vec::new();
        for (b, &seed) in seeds.iter().enumerate() {
            let mut rng = seeded(seed);
            for c in 0..channels {
                if chance(&mut rng, self.p) {
                    rows.push(b as i64 * channels + c);
                    gammas.push(
                        uniform(&mut rng, self.log_gamma_range.0, self.log_gamma_range.1).exp(),
                    );
                }
            }
        }
        if let Some(pixels) = f32_data(image) {
            let out = gamma_f32(image, pixels, channels, &rows, &gammas)?;
            batch.insert("image", out);
            return Ok(records);
        }
        let out = change_rows(image, &rows, |selected| {
            let gamma = per_row(
                &gammas,
                selected.dim(),
                selected.f_kind()?,
                selected.device(),
            )?;
            Ok(selected
                .f_abs()?
                .f_pow(&gamma)?
                .f_mul(&selected.f_sign()?)?
                .f_nan_to_num(None, None, None)?)
        })?;
        batch.insert("image", out);
        Ok(records)
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// The float32 CPU path of [`RandomGamma`]: `|x|^gamma` of the chosen rows in one libtorch `pow` (its vectorised
/// kernel), then one loop that writes the new image: unchanged rows copied, chosen rows given `x`'s sign and
/// overflow clamped as `nan_to_num` does (NaN to 0, ±inf to the largest finite float).
fn gamma_f32(
    image: &Tensor,
    pixels: &[f32],
    channels: i64,
    rows: &[i64],
    gammas: &[f64],
) -> Result<Tensor> {
    let shape = image.size();
    let length = pixels.len() / (shape[0] * channels) as usize;
    let powered = if rows.is_empty() {
        None
    } else {
        let flat = image.f_reshape([shape[0] * channels, -1])?;
        let index = Tensor::f_from_slice(rows)?;
        let exponents = Tensor::f_from_slice(gammas)?
            .f_to_kind(Kind::Float)?
            .f_reshape([-1, 1])?;
        Some(
            flat.f_index_select(0, &index)?
                .f_abs()?
                .f_pow(&exponents)?
                .f_contiguous()?,
        )
    };
    let magnitudes = powered.as_ref().and_then(f32_data).unwrap_or_default();
    new_f32(&shape, |out| {
        out.copy_from_slice(pixels);
        for (&row, magnitude) in rows.iter().zip(magnitudes.chunks_exact(length)) {
            let start = row as usize * length;
            let target = &mut out[start..start + length];
            for (t, &m) in target.iter_mut().zip(magnitude) {
                let signed = m.copysign(*t);
                *t = if signed.is_nan() {
                    0.0
                } else {
                    signed.clamp(-f32::MAX, f32::MAX)
                };
            }
        }
        Ok(())
    })
}

/// ivadomed's `RandomBiasField` (torchio's): with probability `p`, multiplies the channel by
/// `exp(sum c_ijk x^i y^j z^k)` over `i + j + k <= order`, each coefficient uniform in `[-coefficients,
/// coefficients]` (or in `[a, b]` for a list), with coordinates running from -1 to 1 across each axis (voxel
/// centres). ivadomed decides with probability `p` and then calls torchio's transform with `p` again, applying it
/// with probability p²; here it is applied with probability `p`.
pub struct RandomBiasField {
    coefficients: (f64, f64),
    order: usize,
    p: f64,
}

/// Largest accepted polynomial order (torchio's default is 3).
const MAX_ORDER: usize = 10;

impl RandomBiasField {
    /// The monomials `x^i y^j (z^k)` with `i + j (+ k) <= order` on `shape` (2D or 3D), one row of voxels per
    /// term in torchio's coefficient order (x outer, then y, then z), in float64: `coefficients @ basis` is the
    /// log of the field. Coordinates run from -1 to 1 across each axis (voxel centres), 0 on a one-voxel axis.
    pub fn basis(shape: &[i64], order: usize, device: Device) -> Result<Tensor> {
        let rank = shape.len();
        let mut axes = Vec::with_capacity(rank);
        for (k, &n) in shape.iter().enumerate() {
            let half = (n as f64 - 1.0) / 2.0;
            let coords: Vec<f64> = (0..n)
                .map(|i| {
                    if half > 0.0 {
                        (i as f64 - half) / half
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut view = vec![1i64; rank];
            view[k] = n;
            axes.push(
                Tensor::f_from_slice(&coords)?
                    .f_reshape(view.as_slice())?
                    .f_to_device(device)?,
            );
        }
        let mut terms = Vec::new();
        let mut add_term = |powers: &[usize]| -> Result<()> {
            let mut term = Tensor::f_ones(shape, (Kind::Double, device))?;
            for (axis, &power) in axes.iter().zip(powers) {
                term = term.f_mul(&axis.f_pow_tensor_scalar(power as f64)?)?;
            }
            terms.push(term.f_reshape([-1])?);
            Ok(())
        };
        for x in 0..=order {
            for y in 0..=order - x {
                if rank == 2 {
                    add_term(&[x, y])?;
                } else {
                    for z in 0..=order - x - y {
                        add_term(&[x, y, z])?;
                    }
                }
            }
        }
        Ok(Tensor::f_stack(&terms, 0)?)
    }

    /// How many coefficients a polynomial of `order` has in `rank` dimensions.
    pub fn term_count(order: usize, rank: usize) -> usize {
        (0..=order)
            .map(|x| {
                (0..=order - x)
                    .map(|y| if rank == 2 { 1 } else { order - x - y + 1 })
                    .sum::<usize>()
            })
            .sum()
    }
}

impl Transform for RandomBiasField {
    const NAME: &'static str = "RandomBiasField";
    const SUMMARY: &'static str =
        "With probability p, multiplies each image channel by a random smooth polynomial bias field";

    fn defaults() -> Value {
        json!({"coefficients": null, "order": null, "p": 0.5})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let coefficients = match config.f64("coefficients") {
            Ok(max) if max >= 0.0 && max.is_finite() => (-max, max),
            Ok(max) => {
                return Err(PluginError(format!(
                    "{}: `coefficients` as a single number must be non-negative, got {max}",
                    Self::NAME
                )))
            }
            Err(_) => match config.f64_list("coefficients").ok().as_deref() {
                Some([low, high]) if low <= high && low.is_finite() && high.is_finite() => {
                    (*low, *high)
                }
                _ => {
                    return Err(PluginError(format!(
                        "{}: `coefficients` must be a number n (range [-n, n]) or a list [low, high]; it has no \
                         default",
                        Self::NAME
                    )))
                }
            },
        };
        let order = config.usize_in("order", 0, MAX_ORDER).map_err(|e| {
            PluginError(format!(
                "{e} ({} needs `order`; it has no default)",
                Self::NAME
            ))
        })?;
        Ok(Self {
            coefficients,
            order,
            p: probability_key(config, Self::NAME, "p")?,
        })
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    /// Draws per sample and channel from the sample's seed; the fields of every channel drawn to change come from
    /// one product of their coefficients with the shared monomial basis.
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        let records = vec![Value::Null; seeds.len()];
        let Some(image) = batch.tensors.get("image") else {
            return Ok(records);
        };
        let shape = image.size();
        let rank = shape.len().saturating_sub(2);
        if !(rank == 2 || rank == 3) {
            return Err(PluginError(format!(
                "{}: `image` must be [C, H, W] or [C, D, H, W], got {:?}",
                Self::NAME,
                shape.get(1..).unwrap_or_default()
            )));
        }
        let Some((image, channels)) = batch_image(batch, Self::NAME)? else {
            return Ok(records);
        };
        let terms = Self::term_count(self.order, rank);
        let mut rows = Vec::new();
        let mut coefficients = Vec::new();
        for (b, &seed) in seeds.iter().enumerate() {
            let mut rng = seeded(seed);
            for c in 0..channels {
                if chance(&mut rng, self.p) {
                    rows.push(b as i64 * channels + c);
                    coefficients.extend(
                        (0..terms)
                            .map(|_| uniform(&mut rng, self.coefficients.0, self.coefficients.1)),
                    );
                }
            }
        }
        let spatial = &shape[2..];
        let out = change_rows(image, &rows, |selected| {
            let basis = Self::basis(spatial, self.order, selected.device())?;
            let coefficients = Tensor::f_from_slice(&coefficients)?
                .f_reshape([rows.len() as i64, terms as i64])?
                .f_to_device(selected.device())?;
            // torchio multiplies by the field cast to float32.
            let fields = coefficients
                .f_matmul(&basis)?
                .f_exp()?
                .f_to_kind(Kind::Float)?
                .f_reshape(selected.size().as_slice())?;
            Ok(selected.f_mul(&fields)?)
        })?;
        batch.insert("image", out);
        Ok(records)
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// ivadomed's `RandomBlur`: with probability `p`, a Gaussian blur with sigma uniform in `sigma_range`. Sigma is in
/// millimetres here and becomes `sigma / spacing[k]` voxels along axis k (ivadomed applies it in voxels, the same
/// at 1 mm isotropic spacing); the border is mirrored (scipy's default `reflect`).
pub struct RandomBlur {
    sigma_range: (f64, f64),
    p: f64,
}

impl Transform for RandomBlur {
    const NAME: &'static str = "RandomBlur";
    const SUMMARY: &'static str =
        "With probability p, Gaussian-blurs each image channel, sigma (mm) uniform in sigma_range";

    fn defaults() -> Value {
        json!({"sigma_range": null, "p": 0.5})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let sigma_range = range_key(config, Self::NAME, "sigma_range")?;
        if sigma_range.0 < 0.0 {
            return Err(PluginError(format!(
                "{}: `sigma_range` must not be negative, got {sigma_range:?}",
                Self::NAME
            )));
        }
        Ok(Self {
            sigma_range,
            p: probability_key(config, Self::NAME, "p")?,
        })
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    /// Draws per sample and channel from the sample's seed; every channel drawn to blur is filtered in one
    /// batched product per axis, each with its own kernel.
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        let records = vec![Value::Null; seeds.len()];
        let Some((image, channels)) = batch_image(batch, Self::NAME)? else {
            return Ok(records);
        };
        let rank = image.dim() - 2;
        let spacings = batch.checked_spacings(rank, Self::NAME)?;
        let mut rows = Vec::new();
        let mut sigmas = Vec::new();
        for (b, (&seed, spacing)) in seeds.iter().zip(&spacings).enumerate() {
            let mut rng = seeded(seed);
            for c in 0..channels {
                if chance(&mut rng, self.p) {
                    let sigma = uniform(&mut rng, self.sigma_range.0, self.sigma_range.1);
                    rows.push(b as i64 * channels + c);
                    sigmas.push(spacing.iter().map(|s| sigma / s).collect::<Vec<f64>>());
                }
            }
        }
        let out = change_rows(image, &rows, |selected| {
            let work = if selected.f_kind()? == Kind::Double {
                Kind::Double
            } else {
                Kind::Float
            };
            gaussian_filter_rows(&selected.f_to_kind(work)?, &sigmas, Border::Symmetric)
        })?;
        batch.insert("image", out);
        Ok(records)
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build<T: Transform>(config: Value) -> T {
        let mut checked = Config::new(T::NAME, T::defaults(), config).unwrap();
        let transform = T::build(&mut checked).unwrap();
        checked.finish().unwrap();
        transform
    }

    fn values(tensor: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&tensor.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn image_sample(image: Tensor) -> Sample {
        let mut sample = Sample::new();
        let spacing = vec![1.0; image.dim() - 1];
        sample.insert("image", image);
        sample.set_spacing(&spacing);
        sample
    }

    /// Applies `transform` to a copy of `image` with `seed` and returns the new image values.
    fn run<T: Transform>(transform: &T, image: &Tensor, seed: u64) -> Vec<f64> {
        let mut sample = image_sample(image.shallow_clone());
        sample.insert("label", Tensor::ones([1, 1], (Kind::Float, Device::Cpu)));
        let record = transform.apply(&mut sample, seed).unwrap();
        assert!(
            record.is_null(),
            "intensity transforms return a null record"
        );
        assert_eq!(
            values(sample.get("label").unwrap()),
            vec![1.0],
            "only the image changes"
        );
        transform.undo(&mut sample, &record).unwrap();
        values(sample.get("image").unwrap())
    }

    fn mean_std(values: &[f64]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    // Offsets of a zero image over 400 seeds. With prob 1 they are uniform on [2, 3): mean 2.5 (its standard
    // error is 0.289 / 20 = 0.014). With prob 0.3, about 30% of draws shift (standard error 0.023).
    #[test]
    fn shift_intensity_statistics() {
        let zero = Tensor::zeros([2, 1, 1], (Kind::Float, Device::Cpu));
        let always: RandomShiftIntensity = build(json!({"shift_range": [2, 3], "prob": 1.0}));
        let mut offsets = Vec::new();
        let mut channels_differ = false;
        for seed in 0..400 {
            let out = run(&always, &zero, seed);
            assert!(out.iter().all(|&v| (2.0..3.0).contains(&v)), "{out:?}");
            channels_differ |= out[0] != out[1];
            offsets.push(out[0]);
        }
        assert!(channels_differ, "each channel draws its own offset");
        let (mean, _) = mean_std(&offsets);
        assert!((mean - 2.5).abs() < 0.05, "mean offset {mean}");
        assert_eq!(run(&always, &zero, 5), run(&always, &zero, 5));
        assert_ne!(run(&always, &zero, 5), run(&always, &zero, 6));

        let sometimes: RandomShiftIntensity = build(json!({"shift_range": [2, 3], "prob": 0.3}));
        let shifted = (0..400)
            .filter(|&seed| run(&sometimes, &zero, seed)[0] != 0.0)
            .count() as f64
            / 400.0;
        assert!((shifted - 0.3).abs() < 0.08, "shifted fraction {shifted}");
    }

    // 64 x 64 = 4096 draws of N(0.5, 0.2²): the sample mean is within 4 standard errors (0.2 / 64 each) and the
    // sample std within 0.01 of 0.2.
    #[test]
    fn gaussian_noise_statistics() {
        let noise: AdditiveGaussianNoise = build(json!({"mean": 0.5, "std": 0.2}));
        let image = Tensor::full([1, 64, 64], 10.0, (Kind::Float, Device::Cpu));
        let out = run(&noise, &image, 1);
        let added: Vec<f64> = out.iter().map(|v| v - 10.0).collect();
        let (mean, std) = mean_std(&added);
        assert!((mean - 0.5).abs() < 4.0 * 0.2 / 64.0, "mean {mean}");
        assert!((std - 0.2).abs() < 0.01, "std {std}");
        assert_eq!(run(&noise, &image, 1), out);
        assert_ne!(run(&noise, &image, 2), out);
        // Defaults are ivadomed's: mean 0, std 0.01.
        let default: AdditiveGaussianNoise = build(json!({}));
        assert_eq!((default.mean, default.std), (0.0, 0.01));
    }

    // numpy.percentile([1..10], 5) = 1 + 0.45 = 1.45 (position 0.05 * 9 = 0.45); percentile 95 sits at position
    // 8.55, 9 + 0.55 = 9.55. Channel 1 holds ten times channel 0, so its limits are 14.5 and 95.5.
    #[test]
    fn histogram_clipping_uses_numpy_percentiles_per_channel() {
        let order = [7.0, 1.0, 10.0, 4.0, 2.0, 9.0, 3.0, 8.0, 6.0, 5.0];
        let mut data: Vec<f64> = order.to_vec();
        data.extend(order.iter().map(|v| v * 10.0));
        let image = Tensor::from_slice(&data)
            .reshape([2, 2, 5])
            .to_kind(Kind::Float);
        let clip: HistogramClipping = build(json!({}));
        let out = run(&clip, &image, 0);
        for (k, &v) in order.iter().enumerate() {
            let want0 = v.clamp(1.45, 9.55);
            let want1 = (v * 10.0).clamp(14.5, 95.5);
            assert!((out[k] - want0).abs() < 1e-5, "{out:?}");
            assert!((out[10 + k] - want1).abs() < 1e-4, "{out:?}");
        }
        let mut config = Config::new(
            "HistogramClipping",
            HistogramClipping::defaults(),
            json!({"min_percentile": 60, "max_percentile": 40}),
        )
        .unwrap();
        assert!(HistogramClipping::build(&mut config).is_err());
    }

    #[test]
    fn gamma_known_answer_and_statistics() {
        // log gamma fixed at ln 2: x -> sign(x) x².
        let square: RandomGamma = build(
            json!({"log_gamma_range": [std::f64::consts::LN_2, std::f64::consts::LN_2], "p": 1.0}),
        );
        let input: [f64; 6] = [-2.0, -0.5, 0.0, 0.5, 3.0, 1e30];
        let image = Tensor::from_slice(&input)
            .reshape([1, 2, 3])
            .to_kind(Kind::Float);
        let out = run(&square, &image, 0);
        for (got, x) in out.iter().take(5).zip(input) {
            let want = x.signum() * x * x;
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
        // (1e30)² overflows float32 and becomes its largest finite value, as numpy's nan_to_num does.
        assert_eq!(out[5], f32::MAX as f64);

        // p = 0.5, log gamma uniform on [-0.5, 0.5]: for the image value 2, log2(out) = gamma, so ln(log2(out))
        // recovers log gamma: about half the seeds apply it, with mean log gamma near 0 (standard error 0.02).
        let random: RandomGamma = build(json!({"log_gamma_range": [-0.5, 0.5], "p": 0.5}));
        let two = Tensor::full([1, 1, 1], 2.0, (Kind::Float, Device::Cpu));
        let mut logs = Vec::new();
        for seed in 0..400 {
            let out = run(&random, &two, seed)[0];
            if out != 2.0 {
                let log_gamma = out.log2().ln();
                assert!((-0.5001..=0.5001).contains(&log_gamma), "{log_gamma}");
                logs.push(log_gamma);
            }
        }
        let applied = logs.len() as f64 / 400.0;
        assert!((applied - 0.5).abs() < 0.08, "applied fraction {applied}");
        let (mean, _) = mean_std(&logs);
        assert!(mean.abs() < 0.07, "mean log gamma {mean}");
    }

    // With every coefficient fixed at c (range [c, c]), the order-1 2D field is exp(c (1 + u + v)), and the order-2
    // 3D field exp(c * sum over a+b+d <= 2 of u^a v^b w^d), with u, v, w running from -1 to 1 across each axis.
    #[test]
    fn bias_field_known_answers() {
        let order1: RandomBiasField =
            build(json!({"coefficients": [0.2, 0.2], "order": 1, "p": 1.0}));
        let ones = Tensor::ones([1, 5, 3], (Kind::Float, Device::Cpu));
        let out = run(&order1, &ones, 3);
        for i in 0..5 {
            for j in 0..3 {
                let (u, v) = ((i as f64 - 2.0) / 2.0, j as f64 - 1.0);
                let want = (0.2 * (1.0 + u + v)).exp();
                assert!(
                    (out[i * 3 + j] - want).abs() < 1e-6,
                    "({i},{j}) {} vs {want}",
                    out[i * 3 + j]
                );
            }
        }
        let order2: RandomBiasField =
            build(json!({"coefficients": [0.1, 0.1], "order": 2, "p": 1.0}));
        assert_eq!(RandomBiasField::term_count(2, 3), 10);
        assert_eq!(RandomBiasField::term_count(3, 3), 20);
        assert_eq!(RandomBiasField::term_count(3, 2), 10);
        let volume = Tensor::full([1, 3, 4, 2], 2.0, (Kind::Float, Device::Cpu));
        let out = run(&order2, &volume, 3);
        for z in 0..3 {
            for y in 0..4 {
                for x in 0..2 {
                    let (u, v, w) = (z as f64 - 1.0, (y as f64 - 1.5) / 1.5, x as f64 - 0.5);
                    let w = w / 0.5;
                    let mut poly = 0.0;
                    for a in 0..=2i32 {
                        for b in 0..=2 - a {
                            for d in 0..=2 - a - b {
                                poly += u.powi(a) * v.powi(b) * w.powi(d);
                            }
                        }
                    }
                    let want = 2.0 * (0.1 * poly).exp();
                    let got = out[(z * 4 + y) * 2 + x];
                    assert!((got - want).abs() < 1e-5, "({z},{y},{x}) {got} vs {want}");
                }
            }
        }
        let random: RandomBiasField = build(json!({"coefficients": 0.5, "order": 3, "p": 1.0}));
        let a = run(&random, &ones, 1);
        assert_eq!(a, run(&random, &ones, 1));
        assert_ne!(a, run(&random, &ones, 2));
        // 10 coefficients in (-0.5, 0.5) and |monomials| <= 1 bound the log field by 5.
        assert!(a.iter().all(|v| v.ln().abs() < 5.0));
    }

    // A unit impulse blurred with sigma 4 mm on 2 x 1 mm voxels spreads 2 voxels (std) along H and 4 along W:
    // the output is the product of the two 1D kernels, keeps its mass, and its second moments are sigma² in voxels.
    #[test]
    fn blur_sigma_is_in_millimetres() {
        let n = 41i64;
        let mut impulse = vec![0.0f32; (n * n) as usize];
        impulse[(20 * n + 20) as usize] = 1.0;
        let image = Tensor::from_slice(&impulse).reshape([1, n, n]);
        let blur: RandomBlur = build(json!({"sigma_range": [4, 4], "p": 1.0}));
        let mut s = image_sample(image.shallow_clone());
        s.set_spacing(&[2.0, 1.0]);
        blur.apply(&mut s, 0).unwrap();
        let out = values(s.get("image").unwrap());
        let mass: f64 = out.iter().sum();
        assert!((mass - 1.0).abs() < 1e-5, "mass {mass}");
        let (mut var_h, mut var_w) = (0.0, 0.0);
        for i in 0..n {
            for j in 0..n {
                let v = out[(i * n + j) as usize];
                var_h += v * ((i - 20) as f64).powi(2);
                var_w += v * ((j - 20) as f64).powi(2);
            }
        }
        assert!((var_h - 4.0).abs() < 0.04, "variance along H {var_h}");
        assert!((var_w - 16.0).abs() < 0.16, "variance along W {var_w}");
        // Separable: out[i, j] * out[20, 20] = out[i, 20] * out[20, j].
        let at = |i: i64, j: i64| out[(i * n + j) as usize];
        assert!((at(18, 25) * at(20, 20) - at(18, 20) * at(20, 25)).abs() < 1e-9);

        // A constant image stays constant (mirrored border), and seeds decide sigma.
        let random: RandomBlur = build(json!({"sigma_range": [0.5, 3], "p": 1.0}));
        let constant = Tensor::full([1, 6, 6, 6], 3.0, (Kind::Float, Device::Cpu));
        assert!(run(&random, &constant, 4)
            .iter()
            .all(|v| (v - 3.0).abs() < 1e-5));
        let a = run(&random, &image, 4);
        assert_eq!(a, run(&random, &image, 4));
        assert_ne!(a, run(&random, &image, 5));
    }

    #[test]
    fn required_keys_and_missing_image() {
        for (name, error) in [
            (
                "RandomShiftIntensity",
                RandomShiftIntensity::build(
                    &mut Config::new("x", RandomShiftIntensity::defaults(), json!({})).unwrap(),
                )
                .err(),
            ),
            (
                "RandomGamma",
                RandomGamma::build(
                    &mut Config::new("x", RandomGamma::defaults(), json!({})).unwrap(),
                )
                .err(),
            ),
            (
                "RandomBlur",
                RandomBlur::build(
                    &mut Config::new("x", RandomBlur::defaults(), json!({})).unwrap(),
                )
                .err(),
            ),
            (
                "RandomBiasField",
                RandomBiasField::build(
                    &mut Config::new("x", RandomBiasField::defaults(), json!({})).unwrap(),
                )
                .err(),
            ),
        ] {
            let error = error
                .unwrap_or_else(|| panic!("{name} built without its required keys"))
                .0;
            assert!(error.contains("no default"), "{name}: {error}");
        }
        let mut sample = Sample::new();
        sample.insert(
            "prediction",
            Tensor::ones([1, 2, 2], (Kind::Float, Device::Cpu)),
        );
        let noise: AdditiveGaussianNoise = build(json!({}));
        assert!(noise.apply(&mut sample, 0).unwrap().is_null());
        assert_eq!(values(sample.get("prediction").unwrap()), vec![1.0; 4]);
    }
}
