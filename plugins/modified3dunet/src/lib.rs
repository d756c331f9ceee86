//! ivadomed's `Modified3DUNet` as an ivado architecture plugin.
//!
//! The 3D U-Net of Isensee et al. (2017) as ivadomed implements it (`ivadomed/models.py`, from
//! pykao/Modified-3D-UNet-Pytorch): a residual context path of five levels (stride-2 convolutions down), a
//! localization path that upsamples by nearest neighbour and concatenates the context features, and deep
//! supervision: 1x1x1 segmentation heads on the two levels above the output are upscaled and summed into the
//! final segmentation. Optional attention gates (Oktay et al. 2018) reweight the skip features of levels 2-4
//! with a gating signal from the bottom, and optional FiLM layers modulate features with subject metadata.
//!
//! Inputs: `inputs[0]` is the image batch [N, C, D, H, W], every spatial size a multiple of 16 (four stride-2
//! levels) and more than one voxel left at the bottom; with FiLM on, `inputs[1]` is the metadata [N, n_metadata].
//!
//! Behaviour kept from ivadomed on purpose:
//! - Normalisation is `InstanceNorm3d` without affine parameters or running statistics, so it always
//!   normalises each sample with its own statistics, whatever the mode; `bn_momentum` is accepted (ivadomed
//!   passes it to the instance norms, where it has no effect) and validated. Only the attention gates hold
//!   batch-norms (PyTorch default momentum 0.1, as in ivadomed); those follow `mode.batch_statistics()`.
//! - Levels 2-5 apply their `norm_lrelu_conv_cK` block twice with the same weights.
//! - Channel dropout (`Dropout3d`) once per context level, on when `mode.dropout()`.
//! - FiLM generators share `linear1.weight` and `linear2.weight`: ivadomed passes the first FiLM layer's
//!   weights to every later one, which replace their own. Here the later layers never create them, so the
//!   parameter list holds the tensors training actually updates.
//! - With more than one output channel the first (background) channel is dropped after the activation.
//! - Initialisation follows PyTorch's defaults (U(±1/sqrt(fan_in)) for conv and linear weights and biases) and
//!   ivadomed's `weights_init_kaiming` in the attention blocks.
//!
//! Parameter names mirror ivadomed's `state_dict` keys (`conv3d_c1_1.weight`, `norm_lrelu_conv_c2.2.weight`,
//! `attentionblock2.W.1.running_mean`, `film_layer1.generator.linear1.weight`, ...), the index being the
//! convolution's position in ivadomed's `nn.Sequential`.
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::nn::{self, ModuleT};
use ivado_sdk::tch::Tensor;
use ivado_sdk::{Architecture, Config, Mode, PluginError, Result};

/// Four stride-2 convolutions: every spatial size must be a multiple of 2^4 for the skip connections to line up.
const DOWNSAMPLING: i64 = 16;
/// ivadomed's FiLM layer slots: after context levels 1-4, at the bottom, after localization levels 0-3, and on
/// the final segmentation.
const FILM_SLOTS: usize = 10;
/// Hidden width of ivadomed's FiLM generator MLP (`n_hid`).
const FILM_HIDDEN: i64 = 64;
/// Instance-norm epsilon (PyTorch default).
const NORM_EPS: f64 = 1e-5;

/// How a layer's weights start.
#[derive(Clone, Copy)]
enum WeightInit {
    /// PyTorch's default for `Conv3d` and `Linear`: kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(fan_in)).
    TorchDefault,
    /// ivadomed's `weights_init_kaiming` (attention blocks): N(0, 2 / fan_in).
    KaimingNormal,
}

fn torch_bound(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A cubic-kernel 3D convolution with PyTorch's parameter names, creation order (weight, then bias) and init.
struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
    padding: i64,
}

impl Conv3d {
    #[allow(clippy::too_many_arguments)]
    fn new(
        path: nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
        bias: bool,
        init: WeightInit,
    ) -> Self {
        let fan_in = in_channels * kernel.pow(3);
        let weight_init = match init {
            WeightInit::TorchDefault => torch_bound(fan_in),
            WeightInit::KaimingNormal => nn::Init::Randn {
                mean: 0.0,
                stdev: (2.0 / fan_in as f64).sqrt(),
            },
        };
        let weight = path.var(
            "weight",
            &[out_channels, in_channels, kernel, kernel, kernel],
            weight_init,
        );
        // ivadomed's kaiming init leaves biases at PyTorch's default.
        let bias = bias.then(|| path.var("bias", &[out_channels], torch_bound(fan_in)));
        Self {
            weight,
            bias,
            stride,
            padding,
        }
    }

    /// Bias-free, stride 1: ivadomed's 3x3x3 (padding 1) and 1x1x1 (padding 0) convolutions.
    fn plain(path: nn::Path, in_channels: i64, out_channels: i64, kernel: i64) -> Self {
        Self::new(
            path,
            in_channels,
            out_channels,
            kernel,
            1,
            kernel / 2,
            false,
            WeightInit::TorchDefault,
        )
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_conv3d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride; 3],
            [self.padding; 3],
            [1; 3],
            1,
        )?)
    }
}

/// `InstanceNorm3d(affine=False, track_running_stats=False)`: per-sample, per-channel statistics in every mode.
fn instance_norm(x: &Tensor) -> Result<Tensor> {
    ivado_sdk::ops::instance_norm(x, NORM_EPS)
}

/// Instance norm then `LeakyReLU` (slope 0.01): ivadomed's `inorm3d_*` + `lrelu` pair.
fn norm_lrelu(x: &Tensor) -> Result<Tensor> {
    Ok(instance_norm(x)?.f_leaky_relu()?)
}

/// `Upsample(scale_factor=2, mode='nearest')`.
fn upscale(x: &Tensor) -> Result<Tensor> {
    let size = x.size();
    Ok(x.f_upsample_nearest3d([size[2] * 2, size[3] * 2, size[4] * 2], None, None, None)?)
}

fn spatial(x: &Tensor) -> Vec<i64> {
    x.size()[2..].to_vec()
}

/// Context levels 2-5: a stride-2 convolution, then a residual branch that runs `norm_lrelu_conv_cK`
/// (instance norm, LeakyReLU, 3x3x3 conv) twice with the same weights, channel dropout in between.
struct ContextLevel {
    down: Conv3d,
    norm_lrelu_conv: Conv3d,
}

impl ContextLevel {
    /// `between` runs after the stride-2 conv is created, where ivadomed creates the level's FiLM layer.
    fn new(
        root: &nn::Path,
        level: usize,
        in_channels: i64,
        out_channels: i64,
        between: impl FnOnce(),
    ) -> Self {
        let down = Conv3d::new(
            root / format!("conv3d_c{level}"),
            in_channels,
            out_channels,
            3,
            2,
            1,
            false,
            WeightInit::TorchDefault,
        );
        between();
        // Index 2 in ivadomed's Sequential(InstanceNorm3d, LeakyReLU, Conv3d).
        let norm_lrelu_conv = Conv3d::plain(
            root / format!("norm_lrelu_conv_c{level}") / 2,
            out_channels,
            out_channels,
            3,
        );
        Self {
            down,
            norm_lrelu_conv,
        }
    }

    fn forward(&self, x: &Tensor, dropout: f64, mode: Mode) -> Result<Tensor> {
        let residual = self.down.forward(x)?;
        let out = self.norm_lrelu_conv.forward(&norm_lrelu(&residual)?)?;
        let out = out.f_feature_dropout(dropout, mode.dropout())?;
        let out = self.norm_lrelu_conv.forward(&norm_lrelu(&out)?)?;
        Ok(out + residual)
    }
}

/// Localization levels 1-3: `conv_norm_lrelu_lK` (its output is the deep-supervision tap), a 1x1x1 conv that
/// halves the channels, then `norm_lrelu_upscale_conv_norm_lrelu_lK` up to the next resolution.
struct LocalizationLevel {
    conv_norm_lrelu: Conv3d,
    conv1x1: Conv3d,
    upscale_conv: Conv3d,
}

impl LocalizationLevel {
    /// `between` runs before the upsampling conv is created, where ivadomed creates the level's FiLM layer.
    fn new(root: &nn::Path, level: usize, channels: i64, between: impl FnOnce()) -> Self {
        let conv_norm_lrelu = Conv3d::plain(
            root / format!("conv_norm_lrelu_l{level}") / 0,
            channels,
            channels,
            3,
        );
        let conv1x1 = Conv3d::plain(root / format!("conv3d_l{level}"), channels, channels / 2, 1);
        between();
        // Index 3 in Sequential(InstanceNorm3d, LeakyReLU, Upsample, Conv3d, InstanceNorm3d, LeakyReLU).
        let upscale_conv = Conv3d::plain(
            root / format!("norm_lrelu_upscale_conv_norm_lrelu_l{level}") / 3,
            channels / 2,
            channels / 4,
            3,
        );
        Self {
            conv_norm_lrelu,
            conv1x1,
            upscale_conv,
        }
    }

    /// Returns (deep-supervision features, upsampled output).
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let tap = self
            .conv_norm_lrelu
            .forward(x)
            .and_then(|t| norm_lrelu(&t))?;
        let out = self.conv1x1.forward(&tap)?;
        let out = self.upscale_conv.forward(&upscale(&norm_lrelu(&out)?)?)?;
        Ok((tap, norm_lrelu(&out)?))
    }
}

/// Batch-norm as ivadomed's attention code builds it (PyTorch's default momentum 0.1, not `bn_momentum`).
fn attention_batch_norm(path: nn::Path, channels: i64, weight_init: nn::Init) -> nn::BatchNorm {
    nn::batch_norm3d(
        path,
        channels,
        nn::BatchNormConfig {
            momentum: 0.1,
            eps: 1e-5,
            ws_init: weight_init,
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        },
    )
}

/// ivadomed's `UnetGridGatingSignal3`: 1x1x1 conv (with bias), batch-norm, ReLU. Its `weights_init_kaiming` is
/// applied to the wrapping `Sequential` only, which matches no layer type, so PyTorch's default init stays.
struct GatingSignal {
    conv: Conv3d,
    norm: nn::BatchNorm,
}

impl GatingSignal {
    fn new(path: nn::Path, in_channels: i64, out_channels: i64) -> Self {
        let seq = &path / "conv1";
        Self {
            conv: Conv3d::new(
                &seq / 0,
                in_channels,
                out_channels,
                1,
                1,
                0,
                true,
                WeightInit::TorchDefault,
            ),
            norm: attention_batch_norm(&seq / 1, out_channels, nn::Init::Const(1.0)),
        }
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let out = self.conv.forward(x)?;
        Ok(self
            .norm
            .forward_t(&out, mode.batch_statistics())
            .f_relu()?)
    }
}

/// ivadomed's `GridAttentionBlockND` (concatenation mode, 3D, sub-sample factor 2): the skip features `x` are
/// reduced by a stride-2 `theta`, added to the gating signal's `phi` projection resized to match, and turned
/// into one sigmoid attention map (`psi`) that is resized back and multiplies `x`; `W` (1x1x1 conv +
/// batch-norm) projects the result.
struct AttentionGate {
    w_conv: Conv3d,
    w_norm: nn::BatchNorm,
    theta: Conv3d,
    phi: Conv3d,
    psi: Conv3d,
}

impl AttentionGate {
    fn new(path: nn::Path, in_channels: i64, gating_channels: i64, inter_channels: i64) -> Self {
        let kaiming = WeightInit::KaimingNormal;
        let w = &path / "W";
        Self {
            w_conv: Conv3d::new(&w / 0, in_channels, in_channels, 1, 1, 0, true, kaiming),
            // weights_init_kaiming: batch-norm weight N(1, 0.02), bias 0.
            w_norm: attention_batch_norm(
                &w / 1,
                in_channels,
                nn::Init::Randn {
                    mean: 1.0,
                    stdev: 0.02,
                },
            ),
            theta: Conv3d::new(
                &path / "theta",
                in_channels,
                inter_channels,
                2,
                2,
                0,
                false,
                kaiming,
            ),
            phi: Conv3d::new(
                &path / "phi",
                gating_channels,
                inter_channels,
                1,
                1,
                0,
                true,
                kaiming,
            ),
            psi: Conv3d::new(&path / "psi", inter_channels, 1, 1, 1, 0, true, kaiming),
        }
    }

    fn forward(&self, x: &Tensor, gating: &Tensor, mode: Mode) -> Result<Tensor> {
        let theta_x = self.theta.forward(x)?;
        let phi_g = self.phi.forward(gating)?.f_upsample_trilinear3d(
            spatial(&theta_x),
            true,
            None,
            None,
            None,
        )?;
        let attention = self
            .psi
            .forward(&(theta_x + phi_g).f_relu()?)?
            .f_sigmoid()?
            .f_upsample_trilinear3d(spatial(x), true, None, None, None)?;
        let gated = self.w_conv.forward(&(attention * x))?;
        Ok(self.w_norm.forward_t(&gated, mode.batch_statistics()))
    }
}

/// The gating signal and the gates on the skip features of context levels 2, 3 and 4.
struct Attention {
    gating: GatingSignal,
    gate2: AttentionGate,
    gate3: AttentionGate,
    gate4: AttentionGate,
}

/// A `Linear` layer whose weight may be another layer's (FiLM weight sharing).
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(path: nn::Path, in_features: i64, out_features: i64, shared: Option<&Tensor>) -> Self {
        let weight = match shared {
            Some(weight) => weight.shallow_clone(),
            None => path.var(
                "weight",
                &[out_features, in_features],
                torch_bound(in_features),
            ),
        };
        let bias = path.var("bias", &[out_features], torch_bound(in_features));
        Self { weight, bias }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, Some(&self.bias))?)
    }
}

/// ivadomed's `FiLMlayer`: an MLP (`FiLMgenerator`: linear-sigmoid x3) maps the metadata to one (gamma, beta)
/// pair per channel, and the features become gamma * x + beta.
struct FilmLayer {
    linear1: Linear,
    linear2: Linear,
    linear3: Linear,
    channels: i64,
}

impl FilmLayer {
    /// `shared`: the first FiLM layer's (linear1, linear2) weights, which every later layer uses.
    fn new(
        path: nn::Path,
        n_metadata: i64,
        channels: i64,
        shared: Option<(&Tensor, &Tensor)>,
    ) -> Self {
        let generator = &path / "generator";
        Self {
            linear1: Linear::new(
                &generator / "linear1",
                n_metadata,
                FILM_HIDDEN,
                shared.map(|s| s.0),
            ),
            linear2: Linear::new(
                &generator / "linear2",
                FILM_HIDDEN,
                FILM_HIDDEN / 4,
                shared.map(|s| s.1),
            ),
            linear3: Linear::new(&generator / "linear3", FILM_HIDDEN / 4, 2 * channels, None),
            channels,
        }
    }

    fn forward(&self, x: &Tensor, metadata: &Tensor) -> Result<Tensor> {
        let hidden = self.linear1.forward(metadata)?.f_sigmoid()?;
        let hidden = self.linear2.forward(&hidden)?.f_sigmoid()?;
        let params = self.linear3.forward(&hidden)?.f_sigmoid()?;
        let batch = params.size()[0];
        let gammas =
            params
                .f_narrow(1, 0, self.channels)?
                .f_view([batch, self.channels, 1, 1, 1])?;
        let betas = params.f_narrow(1, self.channels, self.channels)?.f_view([
            batch,
            self.channels,
            1,
            1,
            1,
        ])?;
        Ok(gammas * x + betas)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FinalActivation {
    Sigmoid,
    Softmax,
    /// ReLU divided by the batch maximum when that is positive (ivadomed's `relu`, for soft targets).
    ReluNormalised,
    /// Raw logits.
    Identity,
}

/// ivadomed's `Modified3DUNet`.
pub struct Modified3dUnet {
    in_channels: i64,
    out_channels: i64,
    dropout: f64,
    activation: FinalActivation,
    conv3d_c1_1: Conv3d,
    conv3d_c1_2: Conv3d,
    lrelu_conv_c1: Conv3d,
    /// Context levels 2, 3, 4, 5.
    context: Vec<ContextLevel>,
    /// The bottom's upsampling conv (`norm_lrelu_upscale_conv_norm_lrelu_l0.3`, or `upscale_conv_norm_lrelu_0.1`
    /// when FiLM slot 5 splits the block around its FiLM layer).
    upscale_conv_l0: Conv3d,
    conv3d_l0: Conv3d,
    attention: Option<Attention>,
    /// Localization levels 1, 2, 3.
    localization: Vec<LocalizationLevel>,
    conv_norm_lrelu_l4: Conv3d,
    conv3d_l4: Conv3d,
    ds2_1x1_conv3d: Conv3d,
    ds3_1x1_conv3d: Conv3d,
    /// FiLM slots 1-10 (ivadomed's `film_layer1` .. `film_layer10`).
    film: Vec<Option<FilmLayer>>,
    n_metadata: i64,
}

fn config_error(message: String) -> PluginError {
    PluginError(format!("modified3dunet: {message}"))
}

impl Architecture for Modified3dUnet {
    const NAME: &'static str = "modified3dunet";
    const SUMMARY: &'static str =
        "ivadomed's Modified3DUNet: residual 3D U-Net with instance norm, \
         deep supervision, optional attention gates and FiLM";

    fn defaults() -> Value {
        json!({
            "in_channels": 1,
            "out_channels": 1,
            "n_filters": 16,
            "attention": false,
            "dropout_rate": 0.3,
            "bn_momentum": 0.1,
            "final_activation": "sigmoid",
            // ivadomed's None: no metadata.
            "n_metadata": 0,
            // ivadomed's None: no FiLM. Otherwise 10 flags (0/1), one per FiLM slot.
            "film_layers": [],
        })
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let in_channels = config.usize_in("in_channels", 1, 1024)? as i64;
        let out_channels = config.usize_in("out_channels", 1, 1024)? as i64;
        let n = config.usize_in("n_filters", 1, 1024)? as i64;
        let attention = config.bool("attention")?;
        let dropout = config.f64("dropout_rate")?;
        if !(0.0..1.0).contains(&dropout) {
            return Err(config_error(format!(
                "config key `dropout_rate` must be in [0, 1), got {dropout}"
            )));
        }
        // Validated for compatibility with ivadomed configs; instance norm keeps no running statistics, so it
        // has no effect (as in ivadomed).
        let bn_momentum = config.f64("bn_momentum")?;
        if !(0.0..=1.0).contains(&bn_momentum) {
            return Err(config_error(format!(
                "config key `bn_momentum` must be in [0, 1], got {bn_momentum}"
            )));
        }
        let activation = match config
            .choice("final_activation", &["sigmoid", "softmax", "relu", "none"])?
            .as_str()
        {
            "sigmoid" => FinalActivation::Sigmoid,
            "softmax" => FinalActivation::Softmax,
            "relu" => FinalActivation::ReluNormalised,
            _ => FinalActivation::Identity,
        };
        let n_metadata = config.usize_in("n_metadata", 0, 1 << 20)? as i64;
        let film_flags = config.f64_list("film_layers")?;
        let film_on: Vec<bool> = match film_flags.len() {
            0 => vec![false; FILM_SLOTS],
            FILM_SLOTS => film_flags
                .iter()
                .map(|&flag| match flag {
                    0.0 => Ok(false),
                    1.0 => Ok(true),
                    other => Err(config_error(format!(
                        "config key `film_layers` must hold 0 or 1 flags, got {other}"
                    ))),
                })
                .collect::<Result<_>>()?,
            len => {
                return Err(config_error(format!(
                    "config key `film_layers` must be empty (no FiLM) or hold {FILM_SLOTS} flags, one per \
                     FiLM slot, got {len}"
                )))
            }
        };
        if film_on.iter().any(|&on| on) && n_metadata == 0 {
            return Err(config_error(
                "FiLM layers are on in `film_layers` but `n_metadata` is 0; set it to the length of the \
                 metadata vector"
                    .into(),
            ));
        }

        // Layers are created in ivadomed's `__init__` order so the parameter list follows the same order.
        let film_channels = [
            n,
            2 * n,
            4 * n,
            8 * n,
            16 * n,
            8 * n,
            4 * n,
            2 * n,
            n,
            out_channels,
        ];
        let mut film: Vec<Option<FilmLayer>> = (0..FILM_SLOTS).map(|_| None).collect();
        let make_film = |slot: usize, film: &mut Vec<Option<FilmLayer>>| {
            if !film_on[slot] {
                return;
            }
            let owner = film.iter().flatten().next();
            let shared = owner.map(|f| (&f.linear1.weight, &f.linear2.weight));
            let layer = FilmLayer::new(
                &root / format!("film_layer{}", slot + 1),
                n_metadata,
                film_channels[slot],
                shared,
            );
            film[slot] = Some(layer);
        };

        let conv3d_c1_1 = Conv3d::plain(&root / "conv3d_c1_1", in_channels, n, 3);
        make_film(0, &mut film);
        let conv3d_c1_2 = Conv3d::plain(&root / "conv3d_c1_2", n, n, 3);
        // Index 1 in Sequential(LeakyReLU, Conv3d).
        let lrelu_conv_c1 = Conv3d::plain(&root / "lrelu_conv_c1" / 1, n, n, 3);
        let mut context = Vec::with_capacity(4);
        for level in 2..=5usize {
            let channels = n << (level - 1);
            context.push(ContextLevel::new(
                &root,
                level,
                channels / 2,
                channels,
                || {
                    // Level 5 has no FiLM slot of its own: slot 5 sits after its normalisation.
                    if level < 5 {
                        make_film(level - 1, &mut film)
                    }
                },
            ));
        }
        let upscale_conv_l0 = if film_on[4] {
            make_film(4, &mut film);
            Conv3d::plain(&root / "upscale_conv_norm_lrelu_0" / 1, 16 * n, 8 * n, 3)
        } else {
            Conv3d::plain(
                &root / "norm_lrelu_upscale_conv_norm_lrelu_l0" / 3,
                16 * n,
                8 * n,
                3,
            )
        };
        let conv3d_l0 = Conv3d::plain(&root / "conv3d_l0", 8 * n, 8 * n, 1);
        make_film(5, &mut film);
        let attention = attention.then(|| Attention {
            gating: GatingSignal::new(&root / "gating", 16 * n, 8 * n),
            gate2: AttentionGate::new(&root / "attentionblock2", 2 * n, 8 * n, 2 * n),
            gate3: AttentionGate::new(&root / "attentionblock3", 4 * n, 8 * n, 4 * n),
            gate4: AttentionGate::new(&root / "attentionblock4", 8 * n, 8 * n, 8 * n),
        });
        let mut localization = Vec::with_capacity(3);
        for level in 1..=3usize {
            localization.push(LocalizationLevel::new(
                &root,
                level,
                n << (5 - level),
                || make_film(level + 5, &mut film),
            ));
        }
        let conv_norm_lrelu_l4 = Conv3d::plain(&root / "conv_norm_lrelu_l4" / 0, 2 * n, 2 * n, 3);
        let conv3d_l4 = Conv3d::plain(&root / "conv3d_l4", 2 * n, out_channels, 1);
        let ds2_1x1_conv3d = Conv3d::plain(&root / "ds2_1x1_conv3d", 8 * n, out_channels, 1);
        let ds3_1x1_conv3d = Conv3d::plain(&root / "ds3_1x1_conv3d", 4 * n, out_channels, 1);
        make_film(9, &mut film);

        Ok(Self {
            in_channels,
            out_channels,
            dropout,
            activation,
            conv3d_c1_1,
            conv3d_c1_2,
            lrelu_conv_c1,
            context,
            upscale_conv_l0,
            conv3d_l0,
            attention,
            localization,
            conv_norm_lrelu_l4,
            conv3d_l4,
            ds2_1x1_conv3d,
            ds3_1x1_conv3d,
            film,
            n_metadata,
        })
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        let x = inputs.first().ok_or_else(|| {
            PluginError("modified3dunet: forward needs the image batch as inputs[0]".into())
        })?;
        self.check_image(x)?;
        let metadata = self.metadata(inputs, x)?;
        let film = |slot: usize, x: Tensor| -> Result<Tensor> {
            match (&self.film[slot], &metadata) {
                (Some(layer), Some(metadata)) => layer.forward(&x, metadata),
                _ => Ok(x),
            }
        };

        // Context level 1: residual around conv-dropout-lrelu-conv.
        let residual = self.conv3d_c1_1.forward(x)?;
        let out = self.conv3d_c1_2.forward(&residual.f_leaky_relu()?)?;
        let out = out.f_feature_dropout(self.dropout, mode.dropout())?;
        let out = self.lrelu_conv_c1.forward(&out.f_leaky_relu()?)?;
        // ivadomed keeps level 1's skip features before the instance norm.
        let context_1 = (out + residual).f_leaky_relu()?;
        let mut out = film(0, norm_lrelu(&context_1)?)?;

        // Context levels 2-4 keep their normalised (and FiLM-modulated) output as skip features.
        let mut skips = Vec::with_capacity(3);
        for (index, level) in self.context[..3].iter().enumerate() {
            out = level.forward(&out, self.dropout, mode)?;
            out = film(index + 1, norm_lrelu(&out)?)?;
            skips.push(out.shallow_clone());
        }
        let mut out = self.context[3].forward(&out, self.dropout, mode)?;

        if let Some(attention) = &self.attention {
            out = norm_lrelu(&out)?;
            let gating = attention.gating.forward(&out, mode)?;
            skips[2] = attention.gate4.forward(&skips[2], &gating, mode)?;
            skips[1] = attention.gate3.forward(&skips[1], &gating, mode)?;
            skips[0] = attention.gate2.forward(&skips[0], &gating, mode)?;
        }

        // Localization level 0: back up to level 4's resolution.
        let out = film(4, norm_lrelu(&out)?)?;
        let out = norm_lrelu(&self.upscale_conv_l0.forward(&upscale(&out)?)?)?;
        let mut out = film(5, norm_lrelu(&self.conv3d_l0.forward(&out)?)?)?;

        // Localization levels 1-3; levels 2 and 3 feed the deep supervision.
        let mut taps = Vec::with_capacity(3);
        for (index, level) in self.localization.iter().enumerate() {
            let skip = &skips[2 - index];
            let (tap, up) = level.forward(&Tensor::f_cat(&[&out, skip], 1)?)?;
            taps.push(tap);
            out = film(index + 6, up)?;
        }

        // Level 4: full resolution, level 1's skip features first (ivadomed's concatenation order).
        let out = Tensor::f_cat(&[&context_1, &out], 1)?;
        let out = norm_lrelu(&self.conv_norm_lrelu_l4.forward(&out)?)?;
        let segmentation = self.conv3d_l4.forward(&out)?;
        let ds2 = self.ds2_1x1_conv3d.forward(&taps[1])?;
        let ds3 = self.ds3_1x1_conv3d.forward(&taps[2])?;
        let deep_supervision = upscale(&(upscale(&ds2)? + ds3))?;
        let logits = film(9, segmentation + deep_supervision)?;

        let predictions = match self.activation {
            FinalActivation::Sigmoid => logits.f_sigmoid()?,
            FinalActivation::Softmax => logits.f_softmax(1, logits.kind())?,
            FinalActivation::ReluNormalised => {
                let relu = logits.f_relu()?;
                let max = relu.f_max()?;
                if max.f_double_value(&[])? > 0.0 {
                    relu / max
                } else {
                    relu
                }
            }
            FinalActivation::Identity => logits,
        };
        // ivadomed's multi-class convention: K classes are trained as K+1 outputs and the background channel
        // is dropped after the activation.
        Ok(if self.out_channels > 1 {
            predictions.f_narrow(1, 1, self.out_channels - 1)?
        } else {
            predictions
        })
    }
}

impl Modified3dUnet {
    fn check_image(&self, x: &Tensor) -> Result<()> {
        let size = x.size();
        if size.len() != 5 {
            return Err(PluginError(format!(
                "modified3dunet expects a [N, C, D, H, W] batch, got shape {size:?}"
            )));
        }
        if size[1] != self.in_channels {
            return Err(PluginError(format!(
                "modified3dunet was built for {} input channel(s), got a batch with {} ({size:?})",
                self.in_channels, size[1]
            )));
        }
        let weight_kind = self.conv3d_c1_1.weight.kind();
        if x.kind() != weight_kind {
            return Err(PluginError(format!(
                "modified3dunet: the image batch is {:?} but the weights are {weight_kind:?}",
                x.kind()
            )));
        }
        if size[2..].iter().any(|&s| s % DOWNSAMPLING != 0) {
            return Err(PluginError(format!(
                "modified3dunet downsamples 4 times by 2: every spatial size must be a multiple of \
                 {DOWNSAMPLING}, got {:?}",
                &size[2..]
            )));
        }
        // PyTorch's instance norm refuses a single spatial element (its variance is undefined).
        let bottom: i64 = size[2..].iter().map(|s| s / DOWNSAMPLING).product();
        if bottom < 2 {
            return Err(PluginError(format!(
                "modified3dunet: spatial size {:?} leaves a single voxel at the bottom level, where instance \
                 norm needs more than one; use at least 32 along one axis",
                &size[2..]
            )));
        }
        Ok(())
    }

    /// `inputs[1]` as a [N, n_metadata] tensor of the image's kind, when FiLM is on.
    fn metadata(&self, inputs: &[Tensor], x: &Tensor) -> Result<Option<Tensor>> {
        if self.film.iter().all(Option::is_none) {
            return Ok(None);
        }
        let batch = x.size()[0];
        let metadata = inputs.get(1).ok_or_else(|| {
            PluginError(format!(
                "modified3dunet has FiLM layers: forward needs the metadata batch [N, {}] as inputs[1]",
                self.n_metadata
            ))
        })?;
        let size = metadata.size();
        if size != [batch, self.n_metadata] {
            return Err(PluginError(format!(
                "modified3dunet: the metadata batch (inputs[1]) must have shape [{batch}, {}], got {size:?}",
                self.n_metadata
            )));
        }
        Ok(Some(metadata.f_to_kind(x.kind())?.f_to_device(x.device())?))
    }
}

ivado_sdk::export_plugin! {
    name: "modified3dunet",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [Modified3dUnet],
    transforms: [],
}

#[cfg(test)]
mod tests;
