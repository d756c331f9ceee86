//! Layers shared by every U-Net variant, written once for 2D and 3D (ivadomed's `is_2d` switch).
use ivado_sdk::tch::{nn, Tensor};
use ivado_sdk::{Config, Mode, PluginError, Result};

/// Spatial dimensionality. ivadomed picks Conv2d/BatchNorm2d/Dropout2d/MaxPool2d/bilinear for 2D and
/// Conv3d/InstanceNorm3d/Dropout3d/MaxPool3d/trilinear for 3D.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dims {
    Two,
    Three,
}

impl Dims {
    pub(crate) fn spatial(self) -> usize {
        match self {
            Dims::Two => 2,
            Dims::Three => 3,
        }
    }

    /// The expected batch layout, for error messages.
    pub(crate) fn layout(self) -> &'static str {
        match self {
            Dims::Two => "[N, C, H, W]",
            Dims::Three => "[N, C, D, H, W]",
        }
    }

    /// A 3x3(x3) convolution with padding 1 (size-preserving), as every ivadomed U-Net convolution.
    pub(crate) fn conv(self, path: nn::Path, in_channels: i64, out_channels: i64) -> Conv {
        let config = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        match self {
            Dims::Two => Conv::Two(nn::conv2d(path, in_channels, out_channels, 3, config)),
            Dims::Three => Conv::Three(nn::conv3d(path, in_channels, out_channels, 3, config)),
        }
    }

    /// Max-pooling with kernel and stride 2 on every spatial axis.
    pub(crate) fn max_pool(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Dims::Two => x.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?,
            // `max_pool3d` is on autocast's fp32 list, so under bf16 autocast it would cast the skip to
            // fp32 and back; a maximum is exact in any precision. ATen's `max_pool3d` computes the indices
            // on a CPU anyway.
            Dims::Three => {
                x.f_max_pool3d_with_indices([2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], false)?
                    .0
            }
        })
    }

    /// (Bi|tri)linear interpolation with aligned corners to the spatial size of `like` (ivadomed's `UpConv`).
    pub(crate) fn upsample_to(self, x: &Tensor, like: &Tensor) -> Result<Tensor> {
        let size = like.size();
        let spatial = &size[2..];
        Ok(match self {
            Dims::Two => x.f_upsample_bilinear2d(spatial, true, None, None)?,
            Dims::Three => x.f_upsample_trilinear3d(spatial, true, None, None, None)?,
        })
    }

    /// Checks that `x` is a batch of this dimensionality with `channels` channels.
    pub(crate) fn check_batch(
        self,
        architecture: &str,
        x: &Tensor,
        channels: i64,
        what: &str,
    ) -> Result<()> {
        let size = x.size();
        if size.len() != self.spatial() + 2 {
            return Err(PluginError(format!(
                "{architecture} expects {what} as a {} batch, got shape {size:?}",
                self.layout()
            )));
        }
        if size[1] != channels {
            return Err(PluginError(format!(
                "{architecture} was built for {channels} input channel(s), got {what} with {} ({size:?})",
                size[1]
            )));
        }
        Ok(())
    }
}

/// A convolution of either dimensionality.
pub(crate) enum Conv {
    Two(nn::Conv2D),
    Three(nn::Conv3D),
}

impl Conv {
    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        use nn::Module;
        match self {
            Conv::Two(conv) => conv.forward(x),
            Conv::Three(conv) => conv.forward(x),
        }
    }

    pub(crate) fn in_channels(&self) -> i64 {
        match self {
            Conv::Two(conv) => conv.ws.size()[1],
            Conv::Three(conv) => conv.ws.size()[1],
        }
    }
}

/// ivadomed's normalisation after each convolution.
pub(crate) enum Norm {
    /// `BatchNorm2d(momentum=bn_momentum)`: learnable scale and shift, running statistics.
    Batch(nn::BatchNorm),
    /// `InstanceNorm3d(momentum=bn_momentum)` with PyTorch's defaults `affine=False` and
    /// `track_running_stats=False`: no parameters, no running statistics, so it always normalises each
    /// sample and channel by its own statistics, in every mode, and `bn_momentum` has no effect.
    Instance,
}

impl Norm {
    fn new(dims: Dims, path: nn::Path, channels: i64, bn_momentum: f64) -> Self {
        match dims {
            Dims::Two => Norm::Batch(nn::batch_norm2d(
                path,
                channels,
                nn::BatchNormConfig {
                    momentum: bn_momentum,
                    // PyTorch's BatchNorm starts as the identity (weight 1, bias 0); tch's default draws the
                    // weight uniformly in [0, 1].
                    ws_init: nn::Init::Const(1.0),
                    bs_init: nn::Init::Const(0.0),
                    ..Default::default()
                },
            )),
            Dims::Three => Norm::Instance,
        }
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        use nn::ModuleT;
        Ok(match self {
            Norm::Batch(bn) => bn.forward_t(x, mode.batch_statistics()),
            Norm::Instance => ivado_sdk::ops::instance_norm(x, 1e-5)?,
        })
    }
}

/// What every convolution block of one network shares.
pub(crate) struct BlockSettings {
    pub(crate) dims: Dims,
    pub(crate) dropout: f64,
    pub(crate) bn_momentum: f64,
}

/// Two 3x3(x3) convolutions, each followed by ReLU, normalisation and channel dropout (ivadomed's `DownConv`;
/// the decoder's `UpConv` holds one as `downconv`). Dropout2d/Dropout3d zero whole channels, which is
/// `feature_dropout` for either dimensionality.
pub(crate) struct ConvBlock {
    conv1: Conv,
    conv1_bn: Norm,
    conv2: Conv,
    conv2_bn: Norm,
    dropout: f64,
}

impl ConvBlock {
    pub(crate) fn new(
        path: nn::Path,
        in_channels: i64,
        out_channels: i64,
        settings: &BlockSettings,
    ) -> Self {
        let dims = settings.dims;
        Self {
            conv1: dims.conv(&path / "conv1", in_channels, out_channels),
            conv1_bn: Norm::new(dims, &path / "conv1_bn", out_channels, settings.bn_momentum),
            conv2: dims.conv(&path / "conv2", out_channels, out_channels),
            conv2_bn: Norm::new(dims, &path / "conv2_bn", out_channels, settings.bn_momentum),
            dropout: settings.dropout,
        }
    }

    pub(crate) fn in_channels(&self) -> i64 {
        self.conv1.in_channels()
    }

    pub(crate) fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let x = self.conv1.forward(x).relu();
        let x = self
            .conv1_bn
            .forward(&x, mode)?
            .f_feature_dropout(self.dropout, mode.dropout())?;
        let x = self.conv2.forward(&x).relu();
        Ok(self
            .conv2_bn
            .forward(&x, mode)?
            .f_feature_dropout(self.dropout, mode.dropout())?)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FinalActivation {
    Sigmoid,
    Softmax,
    /// ReLU scaled so the maximum of the batch is 1 (ivadomed's `relu` option for soft targets).
    ReluNormalised,
    /// Raw logits.
    Identity,
}

impl FinalActivation {
    /// Applies the activation, then ivadomed's multi-class convention: K classes are trained as K+1
    /// outputs and the background (channel 0) is dropped after the activation.
    pub(crate) fn apply(self, logits: Tensor) -> Result<Tensor> {
        let predictions = match self {
            FinalActivation::Sigmoid => logits.sigmoid(),
            FinalActivation::Softmax => logits.f_softmax(1, logits.kind())?,
            FinalActivation::ReluNormalised => {
                let relu = logits.relu();
                // An all-zero output stays zero, as ivadomed's `relu / max if max else relu`.
                let max = relu.max().clamp_min(1e-12);
                relu / max
            }
            FinalActivation::Identity => logits,
        };
        let channels = predictions.size()[1];
        Ok(if channels > 1 {
            predictions.f_narrow(1, 1, channels - 1)?
        } else {
            predictions
        })
    }
}

/// The options every U-Net variant reads, with ivadomed's names.
pub(crate) struct UnetOptions {
    pub(crate) in_channels: i64,
    pub(crate) out_channels: i64,
    pub(crate) depth: usize,
    pub(crate) n_filters: i64,
    pub(crate) activation: FinalActivation,
    pub(crate) dropout: f64,
    pub(crate) bn_momentum: f64,
}

impl UnetOptions {
    /// Reads the common keys. `in_channels` is skipped for HeMIS, whose encoders take one channel each.
    pub(crate) fn read(
        architecture: &str,
        config: &mut Config,
        with_in_channels: bool,
    ) -> Result<Self> {
        let in_channels = if with_in_channels {
            config.usize_in("in_channels", 1, 1024)? as i64
        } else {
            1
        };
        let out_channels = config.usize_in("out_channels", 1, 1024)? as i64;
        let depth = config.usize_in("depth", 1, 8)?;
        let n_filters = config.usize_in("n_filters", 1, 4096)? as i64;
        let dropout = config.f64("dropout_rate")?;
        if !(0.0..1.0).contains(&dropout) {
            return Err(PluginError(format!(
                "{architecture}: config key `dropout_rate` must be in [0, 1), got {dropout}"
            )));
        }
        // PyTorch's momentum convention: weight of the new batch statistic.
        let bn_momentum = config.f64("bn_momentum")?;
        if !(0.0..=1.0).contains(&bn_momentum) {
            return Err(PluginError(format!(
                "{architecture}: config key `bn_momentum` must be in [0, 1], got {bn_momentum}"
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
        Ok(Self {
            in_channels,
            out_channels,
            depth,
            n_filters,
            activation,
            dropout,
            bn_momentum,
        })
    }

    pub(crate) fn block_settings(&self, dims: Dims) -> BlockSettings {
        BlockSettings {
            dims,
            dropout: self.dropout,
            bn_momentum: self.bn_momentum,
        }
    }
}
