//! ResNet-18 as ivadomed builds it (`ivadomed.models.resnet18`): torchvision's `ResNet(BasicBlock, [2, 2, 2, 2])`
//! with a one-channel 7x7 stem and a 2-class head. No dropout: neither torchvision nor ivadomed has one here.
use crate::{batch_norm, check_input, torch_default_linear, ClassifierOutput, ClassifierSettings};
use ivado_sdk::serde_json::Value;
use ivado_sdk::tch::{nn, Tensor};
use ivado_sdk::{Architecture, Config, Mode, Result};

/// Blocks per stage and the stage widths of ResNet-18.
const BLOCKS_PER_STAGE: [usize; 4] = [2, 2, 2, 2];
const STAGE_WIDTHS: [i64; 4] = [64, 128, 256, 512];

/// torchvision initialises every ResNet convolution with `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
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
            ws_init: nn::Init::Kaiming {
                dist: nn::init::NormalOrUniform::Normal,
                fan: nn::init::FanInOut::FanOut,
                non_linearity: nn::init::NonLinearity::ReLU,
            },
            ..Default::default()
        },
    )
}

/// torchvision's `BasicBlock`: two 3x3 convolutions with batch-norm, plus a shortcut that is a strided 1x1
/// convolution with batch-norm (`downsample.0`, `downsample.1`) wherever the shape changes.
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl BasicBlock {
    fn new(path: nn::Path, in_channels: i64, out_channels: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || in_channels != out_channels).then(|| {
            (
                conv(
                    &path / "downsample" / 0,
                    in_channels,
                    out_channels,
                    1,
                    stride,
                    0,
                ),
                batch_norm(&path / "downsample" / 1, out_channels),
            )
        });
        Self {
            conv1: conv(&path / "conv1", in_channels, out_channels, 3, stride, 1),
            bn1: batch_norm(&path / "bn1", out_channels),
            conv2: conv(&path / "conv2", out_channels, out_channels, 3, 1, 1),
            bn2: batch_norm(&path / "bn2", out_channels),
            downsample,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        use nn::{Module, ModuleT};
        let out = self.bn1.forward_t(&self.conv1.forward(x), train).f_relu()?;
        let out = self.bn2.forward_t(&self.conv2.forward(&out), train);
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x), train),
            None => x.shallow_clone(),
        };
        Ok(out.f_add(&shortcut)?.f_relu()?)
    }
}

/// ivadomed's ResNet-18 classifier.
pub struct ResNet18 {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    /// `layer1` .. `layer4`.
    stages: Vec<Vec<BasicBlock>>,
    fc: nn::Linear,
    in_channels: i64,
    output: ClassifierOutput,
}

impl Architecture for ResNet18 {
    const NAME: &'static str = "resnet18";
    const SUMMARY: &'static str =
        "ivadomed's ResNet-18 classifier: torchvision's layout, 1-channel stem, softmax head without background";

    fn defaults() -> Value {
        ClassifierSettings::defaults()
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let settings = ClassifierSettings::read(config)?;
        let mut channels = 64;
        let mut stages = Vec::with_capacity(STAGE_WIDTHS.len());
        for (index, (&width, &blocks)) in STAGE_WIDTHS.iter().zip(&BLOCKS_PER_STAGE).enumerate() {
            let stage_path = &root / format!("layer{}", index + 1);
            // Every stage but the first halves the resolution in its first block.
            let first_stride = if index == 0 { 1 } else { 2 };
            let mut stage = Vec::with_capacity(blocks);
            for block in 0..blocks {
                let stride = if block == 0 { first_stride } else { 1 };
                stage.push(BasicBlock::new(
                    &stage_path / block,
                    channels,
                    width,
                    stride,
                ));
                channels = width;
            }
            stages.push(stage);
        }
        Ok(Self {
            conv1: conv(&root / "conv1", settings.in_channels, 64, 7, 2, 3),
            bn1: batch_norm(&root / "bn1", 64),
            stages,
            // torchvision leaves the head at PyTorch's default initialisation.
            fc: {
                let bound = 1.0 / (channels as f64).sqrt();
                torch_default_linear(
                    &root / "fc",
                    channels,
                    settings.num_classes,
                    nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )
            },
            in_channels: settings.in_channels,
            output: settings.output,
        })
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        use nn::{Module, ModuleT};
        let x = inputs.first().ok_or_else(|| {
            ivado_sdk::PluginError("resnet18: forward needs an image batch".into())
        })?;
        check_input(Self::NAME, x, self.in_channels, 1)?;
        let train = mode.batch_statistics();
        let mut x = self
            .bn1
            .forward_t(&self.conv1.forward(x), train)
            .f_relu()?
            .f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        for block in self.stages.iter().flatten() {
            x = block.forward(&x, train)?;
        }
        let features = x.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?;
        self.output.apply(self.fc.forward(&features))
    }
}
