//! DenseNet-121 as ivadomed builds it (`ivadomed.models.densenet121`): torchvision's DenseNet-BC with growth rate
//! 32, blocks of (6, 12, 24, 16) layers, 64 initial features and bottleneck factor 4, a one-channel 7x7 stem
//! and a 2-class head. Each dense layer ends with (element-wise) dropout at `dropout_rate` (torchvision's
//! `drop_rate`; ivadomed's default is 0, i.e. off).
use crate::{batch_norm, check_input, torch_default_linear, ClassifierOutput, ClassifierSettings};
use ivado_sdk::serde_json::Value;
use ivado_sdk::tch::{nn, Tensor};
use ivado_sdk::{Architecture, Config, Mode, PluginError, Result};

const GROWTH_RATE: i64 = 32;
const BLOCK_LAYERS: [i64; 4] = [6, 12, 24, 16];
const INITIAL_FEATURES: i64 = 64;
/// The 1x1 bottleneck of each dense layer widens to `BOTTLENECK_FACTOR * GROWTH_RATE` channels.
const BOTTLENECK_FACTOR: i64 = 4;
/// Smallest image side the network accepts: the stem divides by 4 and three transitions by 2 more each, and each
/// transition's 2x2 average pool needs at least 2 pixels. 29 -> conv0 15 -> pool0 8 -> 4 -> 2 -> 1, whereas 28
/// reaches 0 at the last transition.
const MIN_INPUT_SIZE: i64 = 29;

/// torchvision's DenseNet initialises every convolution with `kaiming_normal_` (fan-in, ReLU gain).
fn conv(
    path: nn::Path,
    in_channels: i64,
    out_channels: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
) -> nn::Conv2D {
    nn::conv2d(
        path,
        in_channels,
        out_channels,
        kernel,
        nn::ConvConfig {
            stride,
            padding,
            bias: false,
            ws_init: nn::init::DEFAULT_KAIMING_NORMAL,
            ..Default::default()
        },
    )
}

/// torchvision's `_DenseLayer`: BN-ReLU-1x1 conv (bottleneck), BN-ReLU-3x3 conv to `GROWTH_RATE` new channels.
struct DenseLayer {
    norm1: nn::BatchNorm,
    conv1: nn::Conv2D,
    norm2: nn::BatchNorm,
    conv2: nn::Conv2D,
}

impl DenseLayer {
    fn new(path: nn::Path, in_channels: i64) -> Self {
        let bottleneck = BOTTLENECK_FACTOR * GROWTH_RATE;
        Self {
            norm1: batch_norm(&path / "norm1", in_channels),
            conv1: conv(&path / "conv1", in_channels, bottleneck, 1, 1, 0),
            norm2: batch_norm(&path / "norm2", bottleneck),
            conv2: conv(&path / "conv2", bottleneck, GROWTH_RATE, 3, 1, 1),
        }
    }

    /// The new feature maps, computed from all earlier ones concatenated.
    fn forward(&self, earlier: &[Tensor], dropout: f64, mode: Mode) -> Result<Tensor> {
        use nn::{Module, ModuleT};
        let train = mode.batch_statistics();
        let x = Tensor::f_cat(earlier, 1)?;
        let x = self.norm1.forward_t(&x, train).f_relu()?;
        let x = self.conv1.forward(&x);
        let x = self.norm2.forward_t(&x, train).f_relu()?;
        let x = self.conv2.forward(&x);
        Ok(if dropout > 0.0 {
            x.f_dropout(dropout, mode.dropout())?
        } else {
            x
        })
    }
}

/// torchvision's `_Transition`: BN-ReLU-1x1 conv halving the channels, then 2x2 average pooling.
struct Transition {
    norm: nn::BatchNorm,
    conv: nn::Conv2D,
}

impl Transition {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        use nn::{Module, ModuleT};
        let x = self.norm.forward_t(x, train).f_relu()?;
        Ok(self
            .conv
            .forward(&x)
            .f_avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)?)
    }
}

/// ivadomed's DenseNet-121 classifier.
pub struct DenseNet121 {
    conv0: nn::Conv2D,
    norm0: nn::BatchNorm,
    /// `denseblock1` .. `denseblock4`.
    blocks: Vec<Vec<DenseLayer>>,
    /// `transition1` .. `transition3`, between consecutive blocks.
    transitions: Vec<Transition>,
    norm5: nn::BatchNorm,
    classifier: nn::Linear,
    dropout: f64,
    in_channels: i64,
    output: ClassifierOutput,
}

impl Architecture for DenseNet121 {
    const NAME: &'static str = "densenet121";
    const SUMMARY: &'static str =
        "ivadomed's DenseNet-121 classifier: torchvision's layout, 1-channel stem, softmax head without background";

    fn defaults() -> Value {
        let mut defaults = ClassifierSettings::defaults();
        defaults["dropout_rate"] = 0.0.into();
        defaults
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let settings = ClassifierSettings::read(config)?;
        let dropout = config.f64("dropout_rate")?;
        if !(0.0..1.0).contains(&dropout) {
            return Err(PluginError(format!(
                "densenet121: config key `dropout_rate` must be in [0, 1), got {dropout}"
            )));
        }
        let features = &root / "features";
        let conv0 = conv(
            &features / "conv0",
            settings.in_channels,
            INITIAL_FEATURES,
            7,
            2,
            3,
        );
        let norm0 = batch_norm(&features / "norm0", INITIAL_FEATURES);
        let mut channels = INITIAL_FEATURES;
        let mut blocks = Vec::with_capacity(BLOCK_LAYERS.len());
        let mut transitions = Vec::with_capacity(BLOCK_LAYERS.len() - 1);
        for (index, &layers) in BLOCK_LAYERS.iter().enumerate() {
            let block_path = &features / format!("denseblock{}", index + 1);
            let block = (0..layers)
                .map(|layer| {
                    DenseLayer::new(
                        &block_path / format!("denselayer{}", layer + 1),
                        channels + layer * GROWTH_RATE,
                    )
                })
                .collect();
            blocks.push(block);
            channels += layers * GROWTH_RATE;
            if index + 1 < BLOCK_LAYERS.len() {
                let path = &features / format!("transition{}", index + 1);
                transitions.push(Transition {
                    norm: batch_norm(&path / "norm", channels),
                    conv: conv(&path / "conv", channels, channels / 2, 1, 1, 0),
                });
                channels /= 2;
            }
        }
        let norm5 = batch_norm(&features / "norm5", channels);
        // torchvision zeroes the classifier bias and leaves its weight at PyTorch's default.
        let classifier = torch_default_linear(
            &root / "classifier",
            channels,
            settings.num_classes,
            nn::Init::Const(0.0),
        );
        Ok(Self {
            conv0,
            norm0,
            blocks,
            transitions,
            norm5,
            classifier,
            dropout,
            in_channels: settings.in_channels,
            output: settings.output,
        })
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        use nn::{Module, ModuleT};
        let x = inputs
            .first()
            .ok_or_else(|| PluginError("densenet121: forward needs an image batch".into()))?;
        check_input(Self::NAME, x, self.in_channels, MIN_INPUT_SIZE)?;
        let train = mode.batch_statistics();
        let mut x = self
            .norm0
            .forward_t(&self.conv0.forward(x), train)
            .f_relu()?
            .f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        for (index, block) in self.blocks.iter().enumerate() {
            let mut maps = vec![x];
            for layer in block {
                let new = layer.forward(&maps, self.dropout, mode)?;
                maps.push(new);
            }
            x = Tensor::f_cat(&maps, 1)?;
            if let Some(transition) = self.transitions.get(index) {
                x = transition.forward(&x, train)?;
            }
        }
        let features = self
            .norm5
            .forward_t(&x, train)
            .f_relu()?
            .f_adaptive_avg_pool2d([1, 1])?
            .f_flatten(1, -1)?;
        self.output.apply(self.classifier.forward(&features))
    }
}
