//! ivadomed's Count-ception (`ivadomed.models.Countception`) as an ivado architecture plugin, for keypoint
//! heatmaps.
//!
//! Cohen et al., "Count-ception: Counting by fully convolutional redundant counting" (ICCV workshops 2017). The
//! network is fully convolutional: the first convolution pads the image by `PATCH_SIZE` = 40 pixels on every
//! side and every later convolution is unpadded (or under-padded), removing exactly the 78 pixels the padding
//! added beyond the first 3x3 kernel, so the output heatmap has the input's height and width. Every output
//! pixel thus sees a large patch around it, and every input pixel is counted by many outputs.
//!
//! Layer layout, padding, activations (LeakyReLU 0.01 inside, 0.3 at the end, no sigmoid), initialisation and
//! parameter names (`conv1.conv1.weight`, `simple1.conv2.batch_norm.bias`, ...) follow ivadomed, so the
//! parameter count equals ivadomed's and a PyTorch `state_dict` maps key for key.
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{nn, Tensor};
use ivado_sdk::{Architecture, Config, Mode, PluginError, Result};

#[cfg(test)]
mod tests;

/// Padding of the first convolution, ivadomed's `patch_size`.
const PATCH_SIZE: i64 = 40;
/// Negative slope of the LeakyReLU after every block but the last.
const INNER_SLOPE: f64 = 0.01;
/// Negative slope of the LeakyReLU after the last block (ivadomed's `final_activation`).
const FINAL_SLOPE: f64 = 0.3;

/// ivadomed's `ConvBlock`: convolution (with bias), batch-norm, LeakyReLU.
struct ConvBlock {
    conv1: nn::Conv2D,
    batch_norm: nn::BatchNorm,
    slope: f64,
}

impl ConvBlock {
    fn new(
        path: nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        padding: i64,
        slope: f64,
    ) -> Self {
        let fan_in = (in_channels * kernel * kernel) as f64;
        let fan_out = (out_channels * kernel * kernel) as f64;
        // ivadomed: xavier_uniform_ with gain calculate_gain('leaky_relu', 0.01) = sqrt(2 / (1 + 0.01^2)).
        let gain = (2.0 / (1.0 + INNER_SLOPE * INNER_SLOPE)).sqrt();
        let weight_bound = gain * (6.0 / (fan_in + fan_out)).sqrt();
        // The bias keeps PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bias_bound = 1.0 / fan_in.sqrt();
        Self {
            conv1: nn::conv2d(
                &path / "conv1",
                in_channels,
                out_channels,
                kernel,
                nn::ConvConfig {
                    padding,
                    ws_init: nn::Init::Uniform {
                        lo: -weight_bound,
                        up: weight_bound,
                    },
                    bs_init: nn::Init::Uniform {
                        lo: -bias_bound,
                        up: bias_bound,
                    },
                    ..Default::default()
                },
            ),
            // PyTorch's batch-norm starts at weight 1 (tch's default draws it from U(0, 1)).
            batch_norm: nn::batch_norm2d(
                &path / "batch_norm",
                out_channels,
                nn::BatchNormConfig {
                    ws_init: nn::Init::Const(1.0),
                    ..Default::default()
                },
            ),
            slope,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        use nn::{Module, ModuleT};
        let x = self.batch_norm.forward_t(&self.conv1.forward(x), train);
        // LeakyReLU with a slope below 1 is max(x, slope * x).
        Ok(x.f_maximum(&x.f_mul_scalar(self.slope)?)?)
    }
}

/// ivadomed's `SimpleBlock`, an inception module: 3x3, 5x5 and 9x9 convolution blocks side by side, padded 0,
/// 1 and 3 so that each shrinks the map by 2 pixels, concatenated along channels. (ivadomed's trailing
/// `MaxPool2d(1)` is the identity and is left out.)
struct SimpleBlock {
    conv1: ConvBlock,
    conv2: ConvBlock,
    conv3: ConvBlock,
}

impl SimpleBlock {
    fn new(path: nn::Path, in_channels: i64, out_3x3: i64, out_wide: i64) -> Self {
        Self {
            conv1: ConvBlock::new(&path / "conv1", in_channels, out_3x3, 3, 0, INNER_SLOPE),
            conv2: ConvBlock::new(&path / "conv2", in_channels, out_wide, 5, 1, INNER_SLOPE),
            conv3: ConvBlock::new(&path / "conv3", in_channels, out_wide, 9, 3, INNER_SLOPE),
        }
    }

    fn out_channels(&self) -> i64 {
        [&self.conv1, &self.conv2, &self.conv3]
            .iter()
            .map(|block| block.conv1.ws.size()[0])
            .sum()
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(Tensor::f_cat(
            &[
                self.conv1.forward(x, train)?,
                self.conv2.forward(x, train)?,
                self.conv3.forward(x, train)?,
            ],
            1,
        )?)
    }
}

/// ivadomed's Count-ception.
pub struct Countception {
    conv1: ConvBlock,
    /// `simple1`, `simple2`.
    simple_early: [SimpleBlock; 2],
    conv2: ConvBlock,
    /// `simple3` .. `simple6`.
    simple_late: [SimpleBlock; 4],
    conv3: ConvBlock,
    conv4: ConvBlock,
    conv5: ConvBlock,
    conv6: ConvBlock,
    in_channels: i64,
}

impl Countception {
    /// Builds the network with ivadomed's channel widths divided by `width_divisor` (1 = ivadomed; every width
    /// is a multiple of 8). Narrower copies keep the exact layout, kernels and paddings, and let the tests train
    /// one: at full width a forward pass costs about 20 GMAC whatever the image size, because of the 40-pixel
    /// padding.
    fn new(root: &nn::Path, in_channels: i64, out_channels: i64, width_divisor: i64) -> Self {
        let w = |channels: i64| channels / width_divisor;
        let conv1 = ConvBlock::new(
            root / "conv1",
            in_channels,
            w(64),
            3,
            PATCH_SIZE,
            INNER_SLOPE,
        );
        let simple1 = SimpleBlock::new(root / "simple1", w(64), w(16), w(16));
        let simple2 = SimpleBlock::new(root / "simple2", simple1.out_channels(), w(16), w(32));
        let conv2 = ConvBlock::new(
            root / "conv2",
            simple2.out_channels(),
            w(16),
            14,
            0,
            INNER_SLOPE,
        );
        let simple3 = SimpleBlock::new(root / "simple3", w(16), w(112), w(48));
        let simple4 = SimpleBlock::new(root / "simple4", simple3.out_channels(), w(64), w(32));
        let simple5 = SimpleBlock::new(root / "simple5", simple4.out_channels(), w(40), w(40));
        let simple6 = SimpleBlock::new(root / "simple6", simple5.out_channels(), w(32), w(96));
        let conv3 = ConvBlock::new(
            root / "conv3",
            simple6.out_channels(),
            w(32),
            20,
            0,
            INNER_SLOPE,
        );
        let conv4 = ConvBlock::new(root / "conv4", w(32), w(64), 10, 0, INNER_SLOPE);
        let conv5 = ConvBlock::new(root / "conv5", w(64), w(32), 9, 0, INNER_SLOPE);
        // The last block pads by 1, the only padded one after `conv1`.
        let conv6 = ConvBlock::new(root / "conv6", w(32), out_channels, 20, 1, FINAL_SLOPE);
        Self {
            conv1,
            simple_early: [simple1, simple2],
            conv2,
            simple_late: [simple3, simple4, simple5, simple6],
            conv3,
            conv4,
            conv5,
            conv6,
            in_channels,
        }
    }
}

impl Architecture for Countception {
    const NAME: &'static str = "countception";
    const SUMMARY: &'static str =
        "ivadomed's Count-ception: fully convolutional inception network for keypoint heatmaps, output size = input size";

    fn defaults() -> Value {
        json!({
            "in_channels": 3,
            "out_channels": 1,
            "use_logits": false,
            "logits_per_output": 12,
        })
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let in_channels = config.usize_in("in_channels", 1, 1024)? as i64;
        let out_channels = config.usize_in("out_channels", 1, 1024)? as i64;
        // Read so ivadomed configs carry over; it only matters for `use_logits`, refused below.
        config.usize_in("logits_per_output", 1, 4096)?;
        if config.bool("use_logits")? {
            // ivadomed's `use_logits` heads are 1x1 blocks on 64 channels, but `conv5` yields 32, and its forward
            // returns a list and calls a `_print` method that does not exist, so that branch cannot run there.
            return Err(PluginError(
                "countception: `use_logits: true` is not supported: ivadomed's logits heads expect 64 channels \
                 where the network has 32 and cannot run in ivadomed either; use the default `false`"
                    .into(),
            ));
        }

        Ok(Self::new(&root, in_channels, out_channels, 1))
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        let x = inputs
            .first()
            .ok_or_else(|| PluginError("countception: forward needs an image batch".into()))?;
        let size = x.size();
        if size.len() != 4 {
            return Err(PluginError(format!(
                "countception expects a [N, C, H, W] batch, got shape {size:?}"
            )));
        }
        if size[1] != self.in_channels {
            return Err(PluginError(format!(
                "countception was built for {} input channel(s), got a batch with {} ({size:?})",
                self.in_channels, size[1]
            )));
        }
        // No dropout anywhere; the mode only selects the batch-norm statistics.
        let train = mode.batch_statistics();
        let mut x = self.conv1.forward(x, train)?;
        for block in &self.simple_early {
            x = block.forward(&x, train)?;
        }
        x = self.conv2.forward(&x, train)?;
        for block in &self.simple_late {
            x = block.forward(&x, train)?;
        }
        for block in [&self.conv3, &self.conv4, &self.conv5, &self.conv6] {
            x = block.forward(&x, train)?;
        }
        Ok(x)
    }
}

ivado_sdk::export_plugin! {
    name: "countception",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [Countception],
    transforms: [],
}
