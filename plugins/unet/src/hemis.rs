//! ivadomed's `HeMISUnet` (Havaei et al. 2016, "HeMIS: Hetero-Modal Image Segmentation"): one encoder per
//! contrast, a single decoder, and at every level an abstraction of the encoders' features by their mean and
//! variance over the contrasts available for each sample, so any subset of contrasts can be segmented.
use crate::blocks::{Dims, UnetOptions};
use crate::unet::{Decoder, Encoder};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{nn, Device, Kind, Tensor};
use ivado_sdk::{Architecture, Config, Mode, PluginError, Result};

/// `inputs[0]` is [N, n_contrasts, H, W], one channel per contrast in the order of `contrasts`;
/// `inputs[1]`, optional, is the availability mask [N, n_contrasts]: 1 present, 0 missing, all present when
/// absent. Any non-zero value counts as present, like a boolean mask built from numbers.
///
/// Differences from ivadomed, both for missing contrasts:
/// - ivadomed runs every encoder on the whole batch, missing samples included. Here each encoder sees only
///   the samples that have its contrast, so neither the prediction nor the batch-norm statistics of a
///   training batch depend on what a missing channel holds (zeros, noise or NaN).
/// - ivadomed takes `var(0)` (unbiased) over the available contrasts, which is NaN when only one is
///   available. Here that variance is 0, as the HeMIS paper defines it; with two or more it is the same
///   unbiased variance.
pub struct HemisUnet {
    contrasts: Vec<String>,
    /// One per contrast, under `Encoder_mod.Encoder_<contrast>` as ivadomed's `ModuleDict`.
    encoders: Vec<Encoder>,
    decoder: Decoder,
}

impl Architecture for HemisUnet {
    const NAME: &'static str = "hemis_unet";
    const SUMMARY: &'static str = "ivadomed's HeMISUnet: one encoder per contrast, mean/variance fusion \
         over the available ones (inputs [N, n_contrasts, H, W] and an optional mask [N, n_contrasts])";
    // Forward selects, per sample, the contrasts present: a trace would freeze one availability pattern.
    const TRACEABLE: bool = false;

    /// ivadomed's HeMISUnet fixes `n_filters` at 64 and the final activation at sigmoid; both are options
    /// here (defaulting to those) so that small variants can be built.
    fn defaults() -> Value {
        json!({
            "contrasts": ["T1w", "T2w", "T2star"],
            "out_channels": 1,
            "depth": 3,
            "n_filters": 64,
            "dropout_rate": 0.3,
            "bn_momentum": 0.1,
            "final_activation": "sigmoid",
        })
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let contrasts = config.string_list("contrasts")?;
        if contrasts.is_empty() {
            return Err(PluginError(format!(
                "{}: config key `contrasts` must name at least one contrast",
                Self::NAME
            )));
        }
        for (i, contrast) in contrasts.iter().enumerate() {
            if contrast.is_empty() || contrast.contains('.') {
                return Err(PluginError(format!(
                    "{}: config key `contrasts` holds {contrast:?}; names must be non-empty and \
                     contain no '.' (they name parameters)",
                    Self::NAME
                )));
            }
            if contrasts[..i].contains(contrast) {
                return Err(PluginError(format!(
                    "{}: config key `contrasts` names {contrast:?} twice",
                    Self::NAME
                )));
            }
        }
        // Each encoder takes the single channel of its contrast.
        let options = UnetOptions::read(Self::NAME, config, false)?;
        let settings = options.block_settings(Dims::Two);
        let encoders = contrasts
            .iter()
            .map(|contrast| {
                Encoder::new(
                    &(&root / "Encoder_mod" / format!("Encoder_{contrast}")),
                    1,
                    options.depth,
                    options.n_filters,
                    &settings,
                    None,
                )
            })
            .collect();
        let decoder = Decoder::new(
            &(&root / "decoder"),
            options.out_channels,
            options.depth,
            options.n_filters,
            2,
            &settings,
            options.activation,
            None,
        );
        Ok(Self {
            contrasts,
            encoders,
            decoder,
        })
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        let n_contrasts = self.contrasts.len() as i64;
        let x = inputs.first().ok_or_else(|| {
            PluginError(format!(
                "{} got no input; it needs an image batch [N, {n_contrasts}, H, W]",
                Self::NAME
            ))
        })?;
        Dims::Two.check_batch(
            Self::NAME,
            x,
            n_contrasts,
            &format!(
                "the image (one channel per contrast of {:?})",
                self.contrasts
            ),
        )?;
        let batch = x.size()[0];
        let available = self.availability(inputs.get(1), batch)?;

        // Per contrast: the batch rows that have it, and the encoder's features of those rows only.
        let device = x.device();
        let mut encoded = Vec::with_capacity(self.encoders.len());
        for (m, encoder) in self.encoders.iter().enumerate() {
            let rows: Vec<i64> = (0..batch).filter(|&n| available[n as usize][m]).collect();
            if rows.is_empty() {
                continue;
            }
            let index = Tensor::from_slice(&rows).to_device(device);
            let channel = x.f_narrow(1, m as i64, 1)?.f_index_select(0, &index)?;
            encoded.push(EncodedContrast {
                features: encoder.forward(&channel, None, &mut None, mode)?,
                count: rows.len() as i64,
                rows: index,
            });
        }

        let depth = self.decoder_depth();
        let mut fused = Vec::with_capacity(depth + 1);
        for level in 0..=depth {
            fused.push(fuse(&encoded, level, batch, x.kind())?);
        }
        self.decoder.forward(&fused, None, &mut None, mode)
    }
}

impl HemisUnet {
    fn decoder_depth(&self) -> usize {
        // Every encoder returns depth + 1 feature maps; all encoders share the depth.
        self.encoders[0].depth()
    }

    /// The availability mask as `[sample][contrast]` flags.
    fn availability(&self, mask: Option<&Tensor>, batch: i64) -> Result<Vec<Vec<bool>>> {
        let n_contrasts = self.contrasts.len();
        let Some(mask) = mask else {
            return Ok(vec![vec![true; n_contrasts]; batch as usize]);
        };
        let size = mask.size();
        if size != [batch, n_contrasts as i64] {
            return Err(PluginError(format!(
                "{}: the availability mask (second input) must be [N, n_contrasts] = [{batch}, \
                 {n_contrasts}], got shape {size:?}",
                Self::NAME
            )));
        }
        let values = Vec::<Vec<f64>>::try_from(&mask.f_to_device(Device::Cpu)?)?;
        let mut available = Vec::with_capacity(values.len());
        for (n, row) in values.iter().enumerate() {
            if let Some(v) = row.iter().find(|v| !v.is_finite()) {
                return Err(PluginError(format!(
                    "{}: the availability mask must be 1 (present) or 0 (missing), got {v} for \
                     sample {n}",
                    Self::NAME
                )));
            }
            if row.iter().all(|&v| v == 0.0) {
                return Err(PluginError(format!(
                    "{}: sample {n} of the batch has none of the contrasts {:?} available; at least \
                     one is needed",
                    Self::NAME,
                    self.contrasts
                )));
            }
            available.push(row.iter().map(|&v| v != 0.0).collect());
        }
        Ok(available)
    }
}

/// One contrast's encoder output for the batch rows that have the contrast.
pub(crate) struct EncodedContrast {
    /// The rows' indices in the batch, ascending (an Int64 tensor on the features' device).
    pub(crate) rows: Tensor,
    /// How many rows.
    pub(crate) count: i64,
    /// The encoder's `depth + 1` feature maps, one row each.
    pub(crate) features: Vec<Tensor>,
}

/// The HeMIS abstraction at one level: per sample, the mean and the variance of the features over the
/// contrasts it has, concatenated along channels ([N, 2F, ...], means first as ivadomed).
pub(crate) fn fuse(
    encoded: &[EncodedContrast],
    level: usize,
    batch: i64,
    kind: Kind,
) -> Result<Tensor> {
    // Scatter each contrast's features to full-batch size, zero (and weight 0) where it is missing.
    let mut scattered = Vec::with_capacity(encoded.len());
    let mut weights = Vec::with_capacity(encoded.len());
    for contrast in encoded {
        let features = &contrast.features[level];
        let options = (kind, features.device());
        let ones = Tensor::f_ones([contrast.count], options)?;
        if contrast.count == batch {
            scattered.push(features.shallow_clone());
            weights.push(ones);
        } else {
            let mut full_size = features.size();
            full_size[0] = batch;
            let zeros = Tensor::f_zeros(full_size.as_slice(), options)?;
            scattered.push(zeros.f_index_copy(0, &contrast.rows, features)?);
            let absent = Tensor::f_zeros([batch], options)?;
            weights.push(absent.f_index_copy(0, &contrast.rows, &ones)?);
        }
    }
    let stacked = Tensor::f_stack(&scattered, 0)?; // [M, N, F, ...]
    let mut weight_shape = vec![encoded.len() as i64, batch];
    weight_shape.resize(stacked.dim(), 1);
    let weights = Tensor::f_stack(&weights, 0)?.f_view(weight_shape.as_slice())?;
    let count = weights.f_sum_dim_intlist([0i64].as_slice(), false, kind)?; // [N, 1, ...]
    let mean = stacked.f_sum_dim_intlist([0i64].as_slice(), false, kind)? / &count;
    let deviation = (&stacked - &mean) * &weights;
    // Unbiased over the available contrasts, 0 when only one is available.
    let variance = deviation
        .square()
        .f_sum_dim_intlist([0i64].as_slice(), false, kind)?
        / (count - 1.0).clamp_min(1.0);
    Ok(Tensor::f_cat(&[mean, variance], 1)?)
}
