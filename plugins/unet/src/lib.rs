//! ivadomed's U-Net as an ivado architecture plugin.
//!
//! The layer layout, the order conv → ReLU → batch-norm → channel dropout, and the parameter names mirror
//! ivadomed's `Unet` (`ivadomed/models.py`), so the parameter count equals ivadomed's for the same settings and
//! a PyTorch `state_dict` maps key for key. ivadomed's `ModuleList`s hold `None` placeholders for FiLM layers
//! and max-pools between the conv blocks, which is why encoder blocks sit at indices 0, 3, 6, ... and decoder
//! blocks at 0, 2, 4, ...
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{nn, Tensor};
use ivado_sdk::{Architecture, Config, Mode, PluginError, Result};

/// Two 3x3 convolutions, each followed by ReLU, batch-norm and channel dropout (ivadomed's `DownConv`).
struct ConvBlock {
    conv1: nn::Conv2D,
    conv1_bn: nn::BatchNorm,
    conv2: nn::Conv2D,
    conv2_bn: nn::BatchNorm,
    dropout: f64,
}

impl ConvBlock {
    fn new(path: nn::Path, in_channels: i64, out_channels: i64, settings: &BlockSettings) -> Self {
        let conv = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let bn = nn::BatchNormConfig {
            momentum: settings.bn_momentum,
            ..Default::default()
        };
        Self {
            conv1: nn::conv2d(&path / "conv1", in_channels, out_channels, 3, conv),
            conv1_bn: nn::batch_norm2d(&path / "conv1_bn", out_channels, bn),
            conv2: nn::conv2d(&path / "conv2", out_channels, out_channels, 3, conv),
            conv2_bn: nn::batch_norm2d(&path / "conv2_bn", out_channels, bn),
            dropout: settings.dropout,
        }
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Tensor {
        use nn::{Module, ModuleT};
        let x = self.conv1.forward(x).relu();
        let x = self
            .conv1_bn
            .forward_t(&x, mode.batch_statistics())
            .feature_dropout(self.dropout, mode.dropout());
        let x = self.conv2.forward(&x).relu();
        self.conv2_bn
            .forward_t(&x, mode.batch_statistics())
            .feature_dropout(self.dropout, mode.dropout())
    }
}

struct BlockSettings {
    dropout: f64,
    bn_momentum: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FinalActivation {
    Sigmoid,
    Softmax,
    /// ReLU scaled so the maximum of the batch is 1 (ivadomed's `relu` option for soft targets).
    ReluNormalised,
    /// Raw logits.
    Identity,
}

/// ivadomed's 2D U-Net.
pub struct Unet2d {
    down: Vec<ConvBlock>,
    bottom: ConvBlock,
    up: Vec<ConvBlock>,
    last_conv: nn::Conv2D,
    out_channels: i64,
    activation: FinalActivation,
}

impl Architecture for Unet2d {
    const NAME: &'static str = "unet2d";
    const SUMMARY: &'static str =
        "ivadomed's 2D U-Net: conv-ReLU-BN-dropout blocks, max-pool down, bilinear up";

    fn defaults() -> Value {
        json!({
            "in_channels": 1,
            "out_channels": 1,
            "depth": 3,
            "n_filters": 64,
            "dropout_rate": 0.3,
            "bn_momentum": 0.1,
            "final_activation": "sigmoid",
        })
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let in_channels = config.usize_in("in_channels", 1, 1024)? as i64;
        let out_channels = config.usize_in("out_channels", 1, 1024)? as i64;
        let depth = config.usize_in("depth", 1, 8)?;
        let n_filters = config.usize_in("n_filters", 1, 4096)? as i64;
        let dropout = config.f64("dropout_rate")?;
        if !(0.0..1.0).contains(&dropout) {
            return Err(PluginError(format!(
                "unet2d: config key `dropout_rate` must be in [0, 1), got {dropout}"
            )));
        }
        // PyTorch's momentum convention: weight of the new batch statistic.
        let bn_momentum = config.f64("bn_momentum")?;
        if !(0.0..=1.0).contains(&bn_momentum) {
            return Err(PluginError(format!(
                "unet2d: config key `bn_momentum` must be in [0, 1], got {bn_momentum}"
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
        let settings = BlockSettings {
            dropout,
            bn_momentum,
        };

        let encoder = &root / "encoder";
        let mut down = Vec::with_capacity(depth);
        let mut channels = n_filters;
        down.push(ConvBlock::new(
            &encoder / "down_path" / 0,
            in_channels,
            channels,
            &settings,
        ));
        for level in 1..depth {
            down.push(ConvBlock::new(
                &encoder / "down_path" / (3 * level),
                channels,
                channels * 2,
                &settings,
            ));
            channels *= 2;
        }
        let bottom = ConvBlock::new(&encoder / "conv_bottom", channels, channels, &settings);

        let decoder = &root / "decoder";
        let mut up = Vec::with_capacity(depth);
        // Each decoder block sees the upsampled features concatenated with the skip connection.
        let mut in_features = n_filters << depth;
        up.push(ConvBlock::new(
            &decoder / "up_path" / 0 / "downconv",
            in_features,
            n_filters << (depth - 1),
            &settings,
        ));
        for level in 1..depth {
            in_features /= 2;
            let skip = n_filters << (depth - level - 1);
            up.push(ConvBlock::new(
                &decoder / "up_path" / (2 * level) / "downconv",
                in_features + skip,
                skip,
                &settings,
            ));
        }
        let last_conv = nn::conv2d(
            &decoder / "last_conv",
            in_features / 2,
            out_channels,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        );
        Ok(Self {
            down,
            bottom,
            up,
            last_conv,
            out_channels,
            activation,
        })
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        use nn::Module;
        let x = &inputs[0];
        let size = x.size();
        if size.len() != 4 {
            return Err(PluginError(format!(
                "unet2d expects a [N, C, H, W] batch, got shape {size:?}"
            )));
        }
        let expected_channels = self.down[0].conv1.ws.size()[1];
        if size[1] != expected_channels {
            return Err(PluginError(format!(
                "unet2d was built for {expected_channels} input channel(s), got a batch with {} ({size:?})",
                size[1]
            )));
        }
        let mut features = Vec::with_capacity(self.down.len());
        let mut x = x.shallow_clone();
        for block in &self.down {
            let skip = block.forward(&x, mode);
            x = skip.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
            features.push(skip);
        }
        x = self.bottom.forward(&x, mode);
        for (block, skip) in self.up.iter().zip(features.iter().rev()) {
            let skip_size = skip.size();
            let upsampled =
                x.f_upsample_bilinear2d([skip_size[2], skip_size[3]], true, None, None)?;
            x = block.forward(
                &Tensor::f_cat(&[upsampled, skip.shallow_clone()], 1)?,
                mode,
            );
        }
        let logits = self.last_conv.forward(&x);
        let predictions = match self.activation {
            FinalActivation::Sigmoid => logits.sigmoid(),
            FinalActivation::Softmax => logits.softmax(1, logits.kind()),
            FinalActivation::ReluNormalised => {
                let relu = logits.relu();
                let max = relu.max().clamp_min(1e-12);
                relu / max
            }
            FinalActivation::Identity => logits,
        };
        // ivadomed's multi-class convention: K classes are trained as K+1 outputs and the background is
        // dropped after the activation.
        Ok(if self.out_channels > 1 {
            predictions.narrow(1, 1, self.out_channels - 1)
        } else {
            predictions
        })
    }
}

ivado_sdk::export_plugin! {
    name: "unet",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [Unet2d],
    transforms: [],
}
