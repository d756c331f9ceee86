//! ivadomed's `Clahe`: scikit-image's `equalize_adapthist` (contrast-limited adaptive histogram equalisation).
use crate::random::non_negative_key;
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{Device, Kind, Tensor};
use ivado_sdk::{Config, PluginError, Result, Sample, Transform};

/// Grey levels the image is quantised to (scikit-image's `NR_OF_GRAY`).
const GREY_LEVELS: i64 = 1 << 14;
/// Histogram bins (scikit-image's default `nbins`, which ivadomed keeps).
const BINS: i64 = 256;
/// Grey levels per bin: `1 + NR_OF_GRAY // nbins`.
const BIN_WIDTH: i64 = 1 + GREY_LEVELS / BINS;

/// Contrast-limited adaptive histogram equalisation of each `image` channel, as scikit-image's
/// `equalize_adapthist(x, kernel_size, clip_limit)` that ivadomed calls: the channel is stretched to 2^14 grey levels,
/// each `kernel_size` contextual region gets a 256-bin histogram clipped at `clip_limit * region size` counts (at
/// least 1; the excess is redistributed) and turned into an equalising map, every pixel is mapped by bilinear
/// interpolation of its four nearest regions' maps, and the result is stretched to [0, 1] (ivadomed's output range).
///
/// `kernel_size` is `[h, w]` in pixels and the equalisation is 2D: a 3D image `[C, D, H, W]` is equalised slice by
/// slice along D (ivadomed would run scikit-image's 3D variant with a 3-entry kernel), with the grey-level stretch
/// before and after taken over the whole channel so slices stay comparable. Two further deliberate differences:
/// the input is stretched from its own min/max (scikit-image's `img_as_uint` first rejects float images outside
/// [-1, 1] and clips negatives), and a constant channel, which has no contrast to equalise, is left unchanged.
///
/// The histograms are built on the tensor's device; the small per-region clipping and mapping (256 bins per region)
/// runs on the host. `clip_limit` defaults to ivadomed's 3.0, which exceeds 1 and so never clips (plain adaptive
/// equalisation). Touches only `image`; the record is `null` and undo is a no-op.
pub struct Clahe {
    clip_limit: f64,
    kernel: [i64; 2],
}

/// numpy `mode="reflect"` source index of padded position `index` on an axis of `len` (edge not repeated).
fn reflect_index(index: i64, len: i64) -> i64 {
    if len == 1 {
        return 0;
    }
    let period = 2 * (len - 1);
    let folded = index.rem_euclid(period);
    if folded < len {
        folded
    } else {
        period - folded
    }
}

/// scikit-image's `clip_histogram`: clips bins at `limit` and redistributes the excess evenly, then in strides.
fn clip_histogram(hist: &mut [i64], limit: i64) {
    let bins = hist.len() as i64;
    let mut excess: i64 = hist.iter().filter(|&&h| h > limit).map(|h| h - limit).sum();
    for h in hist.iter_mut() {
        if *h > limit {
            *h = limit;
        }
    }
    let increment = excess / bins;
    let upper = limit - increment;
    for h in hist.iter_mut() {
        if *h < upper {
            *h += increment;
            excess -= increment;
        }
    }
    for h in hist.iter_mut() {
        if *h >= upper && *h < limit {
            excess -= limit - *h;
            *h = limit;
        }
    }
    while excess > 0 {
        let before = excess;
        for start in 0..hist.len() {
            let under = hist.iter().filter(|&&h| h < limit).count() as i64;
            let step = (under / excess).max(1) as usize;
            for h in hist.iter_mut().skip(start).step_by(step) {
                if *h < limit {
                    *h += 1;
                    excess -= 1;
                }
            }
            if excess <= 0 {
                break;
            }
        }
        if before == excess {
            break;
        }
    }
}

/// scikit-image's `map_histogram`: the cumulative histogram scaled to the grey range, truncated to integers.
fn map_histogram(hist: &[i64], pixels: i64) -> Vec<f64> {
    let scale = (GREY_LEVELS - 1) as f64 / pixels as f64;
    let mut total = 0i64;
    hist.iter()
        .map(|&h| {
            total += h;
            (total as f64 * scale).min((GREY_LEVELS - 1) as f64).trunc()
        })
        .collect()
}

/// Per pixel row (or column) of an axis of `len` pixels with regions of `kernel`: the two neighbouring regions'
/// indices among `regions` and the interpolation weight of the second one.
fn axis_neighbours(len: i64, kernel: i64, regions: i64) -> (Vec<i64>, Vec<i64>, Vec<f64>) {
    let (mut first, mut second, mut weight) = (Vec::new(), Vec::new(), Vec::new());
    for pixel in 0..len {
        let padded = pixel + kernel / 2;
        let block = padded / kernel;
        first.push((block - 1).clamp(0, regions - 1));
        second.push(block.clamp(0, regions - 1));
        weight.push((padded % kernel) as f64 / kernel as f64);
    }
    (first, second, weight)
}

fn int_tensor(values: &[i64], shape: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?
        .f_reshape(shape)?
        .f_to_device(device)?)
}

fn float_tensor(values: &[f64], shape: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?
        .f_reshape(shape)?
        .f_to_device(device)?)
}

impl Clahe {
    pub fn new(clip_limit: f64, kernel: [i64; 2]) -> Result<Self> {
        if kernel.iter().any(|&k| !(1..=4096).contains(&k)) {
            return Err(PluginError(format!(
                "{}: `kernel_size` entries must be in 1..=4096, got {kernel:?}",
                Self::NAME
            )));
        }
        Ok(Self { clip_limit, kernel })
    }

    /// Equalises `slices` (`[S, H, W]`, float64) whose grey levels already span `0..GREY_LEVELS`, returning the
    /// float32 result before the final stretch (integers in `0..GREY_LEVELS`).
    fn equalise(&self, levels: &Tensor) -> Result<Tensor> {
        let size = levels.size();
        let (slices, height, width) = (size[0], size[1], size[2]);
        let device = levels.device();
        let [ky, kx] = self.kernel;
        let bins = levels.f_div_scalar_mode(BIN_WIDTH, "floor")?;
        let (rows, cols) = ((height + ky - 1) / ky, (width + kx - 1) / kx);

        // Histograms of the contextual regions: the image mirrored (numpy "reflect") to whole regions.
        let row_index: Vec<i64> = (0..rows * ky).map(|i| reflect_index(i, height)).collect();
        let col_index: Vec<i64> = (0..cols * kx).map(|i| reflect_index(i, width)).collect();
        let regions = slices * rows * cols;
        let region_bins = bins
            .f_index_select(1, &int_tensor(&row_index, &[-1], device)?)?
            .f_index_select(2, &int_tensor(&col_index, &[-1], device)?)?
            .f_reshape([slices, rows, ky, cols, kx])?
            .f_permute([0, 1, 3, 2, 4])?
            .f_reshape([regions, ky * kx])?;
        let flat = Tensor::f_arange(regions, (Kind::Int64, device))?
            .f_unsqueeze(1)?
            .f_mul_scalar(BINS)?
            .f_add(&region_bins)?
            .f_reshape([-1])?;
        let counts = flat.f_bincount(None::<Tensor>, regions * BINS)?;
        let counts = Vec::<i64>::try_from(&counts.f_to_device(Device::Cpu)?)?;

        let pixels = ky * kx;
        let limit = if self.clip_limit > 0.0 {
            ((self.clip_limit * pixels as f64) as i64).max(1)
        } else {
            pixels
        };
        let mut maps = Vec::with_capacity(counts.len());
        for hist in counts.chunks(BINS as usize) {
            let mut hist = hist.to_vec();
            clip_histogram(&mut hist, limit);
            maps.extend(map_histogram(&hist, pixels));
        }
        let maps = float_tensor(&maps, &[-1], device)?;

        // Bilinear interpolation between the four nearest regions' maps, summed in float32 like scikit-image.
        let (row_a, row_b, row_w) = axis_neighbours(height, ky, rows);
        let (col_a, col_b, col_w) = axis_neighbours(width, kx, cols);
        let slice_base = Tensor::f_arange(slices, (Kind::Int64, device))?
            .f_mul_scalar(rows)?
            .f_reshape([slices, 1, 1])?;
        let row_weight = float_tensor(&row_w, &[1, height, 1], device)?;
        let col_weight = float_tensor(&col_w, &[1, 1, width], device)?;
        let mut result = Tensor::f_zeros([slices, height, width], (Kind::Float, device))?;
        for (row_region, row_factor) in [
            (&row_a, row_weight.f_neg()?.f_add_scalar(1.0)?),
            (&row_b, row_weight.shallow_clone()),
        ] {
            for (col_region, col_factor) in [
                (&col_a, col_weight.f_neg()?.f_add_scalar(1.0)?),
                (&col_b, col_weight.shallow_clone()),
            ] {
                let region = slice_base
                    .f_add(&int_tensor(row_region, &[1, height, 1], device)?)?
                    .f_mul_scalar(cols)?
                    .f_add(&int_tensor(col_region, &[1, 1, width], device)?)?;
                let index = region.f_mul_scalar(BINS)?.f_add(&bins)?;
                let mapped = maps.f_take(&index)?;
                let term = mapped.f_mul(&col_factor.f_mul(&row_factor)?)?;
                result = result.f_add(&term.f_to_kind(Kind::Float)?)?;
            }
        }
        // scikit-image stores the result as unsigned integers: truncation.
        Ok(result.f_trunc()?)
    }

    /// Equalises one channel (`[H, W]` or `[D, H, W]`); `None` for a constant channel.
    fn equalise_channel(&self, channel: &Tensor) -> Result<Option<Tensor>> {
        let shape = channel.size();
        let values = channel.f_to_kind(Kind::Double)?;
        let low = f64::try_from(&values.f_min()?)?;
        let high = f64::try_from(&values.f_max()?)?;
        if high <= low || !low.is_finite() || !high.is_finite() {
            return Ok(None);
        }
        let (height, width) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let levels = values
            .f_sub_scalar(low)?
            .f_div_scalar(high - low)?
            .f_mul_scalar((GREY_LEVELS - 1) as f64)?
            .f_round()?
            .f_to_kind(Kind::Int64)?
            .f_reshape([-1, height, width])?;
        let equalised = self.equalise(&levels)?.f_to_kind(Kind::Double)?;
        let out_low = f64::try_from(&equalised.f_min()?)?;
        let out_high = f64::try_from(&equalised.f_max()?)?;
        let stretched = if out_high > out_low {
            equalised
                .f_sub_scalar(out_low)?
                .f_div_scalar(out_high - out_low)?
        } else {
            // scikit-image's rescale_intensity of a constant result clips it into [0, 1].
            equalised.f_clamp(0.0, 1.0)?
        };
        Ok(Some(stretched.f_reshape(shape.as_slice())?))
    }
}

impl Transform for Clahe {
    const NAME: &'static str = "Clahe";
    const SUMMARY: &'static str =
        "Contrast-limited adaptive histogram equalisation of each image channel (per 2D slice), output in [0, 1]";

    fn defaults() -> Value {
        json!({"clip_limit": 3.0, "kernel_size": [8, 8]})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let clip_limit = non_negative_key(config, Self::NAME, "clip_limit")?;
        let kernel = config.f64_list("kernel_size")?;
        match kernel.as_slice() {
            [h, w] if h.fract() == 0.0 && w.fract() == 0.0 => Self::new(clip_limit, [*h as i64, *w as i64]),
            _ => Err(PluginError(format!(
                "{}: `kernel_size` must be two whole numbers [h, w] (2D regions; 3D images are equalised per slice), \
                 got {kernel:?}",
                Self::NAME
            ))),
        }
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let Some(image) = sample.tensors.get("image") else {
            return Ok(Value::Null);
        };
        let shape = image.size();
        if !(shape.len() == 3 || shape.len() == 4) || image.numel() == 0 {
            return Err(PluginError(format!(
                "{}: `image` must be a non-empty [C, H, W] or [C, D, H, W] tensor, got {shape:?}",
                Self::NAME
            )));
        }
        let kind = image.f_kind()?;
        let out_kind = if crate::geometry::is_float(kind) {
            kind
        } else {
            Kind::Float
        };
        let mut channels = Vec::with_capacity(shape[0] as usize);
        for c in 0..shape[0] {
            let channel = image.f_select(0, c)?;
            channels.push(match self.equalise_channel(&channel)? {
                Some(equalised) => equalised.f_to_kind(out_kind)?,
                None => channel.f_to_kind(out_kind)?,
            });
        }
        sample.insert("image", Tensor::f_stack(&channels, 0)?);
        Ok(Value::Null)
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clahe(config: Value) -> Clahe {
        let mut config = Config::new("Clahe", Clahe::defaults(), config).unwrap();
        let transform = Clahe::build(&mut config).unwrap();
        config.finish().unwrap();
        transform
    }

    fn run(transform: &Clahe, image: &Tensor) -> Vec<f64> {
        let mut sample = Sample::new();
        sample.insert("image", image.shallow_clone());
        assert!(transform.apply(&mut sample, 0).unwrap().is_null());
        Vec::<f64>::try_from(
            &sample
                .get("image")
                .unwrap()
                .to_kind(Kind::Double)
                .flatten(0, -1),
        )
        .unwrap()
    }

    #[test]
    fn clip_histogram_redistributes_the_excess() {
        // [10, 0, 1, 2] at limit 4: excess 6, clipped [4, 0, 1, 2]; increment 6 // 4 = 1, upper 3: bins below 3
        // get +1 -> [4, 1, 2, 3], excess 3; bins in [3, 4) are topped up to 4 -> [4, 1, 2, 4], excess 2; then the
        // stride pass (under = 2 bins, step max(1, 2 // 2) = 1) adds 1 to bins 1 and 2 -> [4, 2, 3, 4].
        let mut hist = vec![10, 0, 1, 2];
        clip_histogram(&mut hist, 4);
        assert_eq!(hist, vec![4, 2, 3, 4]);
        assert_eq!(hist.iter().sum::<i64>(), 13);
        // Cumulative [4, 6, 9, 13] scaled by 16383 / 13 and truncated.
        let map = map_histogram(&hist, 13);
        assert_eq!(map, vec![5040.0, 7561.0, 11342.0, 16383.0]);
        assert_eq!(
            (0..6).map(|i| reflect_index(i, 3)).collect::<Vec<_>>(),
            vec![0, 1, 2, 1, 0, 1]
        );
    }

    /// Runs CLAHE on the float32 image `level / 16383` and compares with scikit-image's output.
    fn matches_reference(levels: &[u16], expected: &[f32], shape: [i64; 2], config: Value) {
        let data: Vec<f32> = levels
            .iter()
            .map(|&q| (q as f64 / 16383.0) as f32)
            .collect();
        let image = Tensor::from_slice(&data).reshape([1, shape[0], shape[1]]);
        let out = run(&clahe(config), &image);
        for (k, (got, want)) in out.iter().zip(expected).enumerate() {
            assert!(
                (got - *want as f64).abs() < 2e-6,
                "pixel {k}: {got} vs scikit-image {want}"
            );
        }
    }

    #[test]
    fn matches_scikit_image_with_clipping_and_with_ivadomed_defaults() {
        use crate::reference_data::*;
        // Kernel 4 x 3 with clip_limit 0.1: limit max(1, int(1.2)) = 1 count per bin, heavy redistribution.
        matches_reference(
            &CLIPPED_LEVELS,
            &CLIPPED_EXPECTED,
            [13, 11],
            json!({"kernel_size": [4, 3], "clip_limit": 0.1}),
        );
        // ivadomed's defaults: 8 x 8 regions, clip_limit 3.0 (no clipping), on a 12 x 17 image.
        matches_reference(&DEFAULTS_LEVELS, &DEFAULTS_EXPECTED, [12, 17], json!({}));
    }

    #[test]
    fn constant_image_and_constant_slice_stay_constant() {
        let transform = clahe(json!({}));
        let flat = Tensor::full([1, 20, 24], 0.7, (Kind::Float, Device::Cpu));
        assert!(run(&transform, &flat)
            .iter()
            .all(|&v| (v - 0.7).abs() < 1e-7));
        // A volume whose first slice is constant and second a ramp: the constant slice maps to one value.
        let mut data = vec![0.3f32; 16 * 16];
        data.extend((0..16 * 16).map(|k| (k % 16) as f32 / 15.0));
        let volume = Tensor::from_slice(&data).reshape([1, 2, 16, 16]);
        let out = run(&transform, &volume);
        let first = &out[..256];
        assert!(
            first.iter().all(|&v| v == first[0]),
            "constant slice changed: {first:?}"
        );
        assert!(out.iter().all(|&v| (0.0..=1.0).contains(&v)));
        // An image smaller than one region (3 x 2 under 8 x 8) is mirrored into whole regions.
        let tiny = Tensor::from_slice(&[0.0f32, 0.2, 0.4, 0.6, 0.8, 1.0]).reshape([1, 3, 2]);
        let out = run(&transform, &tiny);
        assert_eq!(out.len(), 6);
        assert!(out.iter().all(|&v| (0.0..=1.0).contains(&v)), "{out:?}");
    }

    // Two low-contrast bands: columns 0..32 ramp over [0, 0.05], columns 32..64 over [0.95, 1]. Global contrast
    // stretching would keep each band narrow; adaptive equalisation spreads each band's values over most of the
    // grey range, so the spread inside a band (away from the band edge) grows many times.
    #[test]
    fn low_contrast_ramps_gain_contrast() {
        let (h, w) = (32i64, 64i64);
        let data: Vec<f32> = (0..h * w)
            .map(|k| {
                let j = k % w;
                let t = (j % 32) as f32 / 31.0 * 0.05;
                if j < 32 {
                    t
                } else {
                    0.95 + t
                }
            })
            .collect();
        let image = Tensor::from_slice(&data).reshape([1, h, w]);
        let out = run(&clahe(json!({})), &image);
        let band = |values: &[f64]| -> f64 {
            let inner: Vec<f64> = (0..h)
                .flat_map(|i| (4..28).map(move |j| (i * w + j) as usize))
                .map(|k| values[k])
                .collect();
            let mean = inner.iter().sum::<f64>() / inner.len() as f64;
            (inner.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / inner.len() as f64).sqrt()
        };
        let input: Vec<f64> = data.iter().map(|&v| v as f64).collect();
        let (before, after) = (band(&input), band(&out));
        assert!(after > 5.0 * before, "band spread {before} -> {after}");
        let low = out.iter().cloned().fold(f64::INFINITY, f64::min);
        let high = out.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!((low, high), (0.0, 1.0));
    }

    #[test]
    fn config_checks() {
        for bad in [
            json!({"kernel_size": [8, 8, 8]}),
            json!({"kernel_size": [8.5, 8]}),
            json!({"kernel_size": [0, 8]}),
            json!({"clip_limit": -1}),
        ] {
            let mut config = Config::new("Clahe", Clahe::defaults(), bad.clone()).unwrap();
            assert!(Clahe::build(&mut config).is_err(), "{bad}");
        }
    }
}
