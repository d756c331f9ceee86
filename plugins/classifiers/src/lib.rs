//! ivadomed's image classifiers as ivado architecture plugins: `resnet18` and `densenet121`.
//!
//! ivadomed (`ivadomed/models.py`) takes torchvision's ResNet-18 and DenseNet-121 and changes two things: the
//! first convolution reads ONE channel instead of RGB, and the head has 2 classes instead of 1000, followed by
//! a softmax whose background column is dropped, so a 2-class model outputs `[N, 1]`: the probability of the
//! foreground class. Layer layout, initialisation and parameter names follow torchvision, so a PyTorch
//! `state_dict` (minus the `num_batches_tracked` counters) maps key for key.
use ivado_sdk::serde_json::Value;
use ivado_sdk::tch::{nn, Kind, Tensor};
use ivado_sdk::{Config, PluginError, Result};

mod densenet;
mod resnet;
#[cfg(test)]
mod tests;

pub use densenet::DenseNet121;
pub use resnet::ResNet18;

/// What the classifier head returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClassifierOutput {
    /// ivadomed: softmax over the classes, background (class 0) dropped, giving `num_classes - 1` columns.
    SoftmaxWithoutBackground,
    /// The raw `num_classes` logits, for a host that applies its own (numerically safer) log-softmax.
    Logits,
}

/// Settings shared by both classifiers.
struct ClassifierSettings {
    in_channels: i64,
    num_classes: i64,
    output: ClassifierOutput,
}

impl ClassifierSettings {
    fn read(config: &mut Config) -> Result<Self> {
        let in_channels = config.usize_in("in_channels", 1, 1024)? as i64;
        // One class would leave nothing after ivadomed drops the background column.
        let num_classes = config.usize_in("num_classes", 2, 100_000)? as i64;
        let output = match config
            .choice("final_activation", &["softmax", "none"])?
            .as_str()
        {
            "softmax" => ClassifierOutput::SoftmaxWithoutBackground,
            _ => ClassifierOutput::Logits,
        };
        Ok(Self {
            in_channels,
            num_classes,
            output,
        })
    }

    /// Default config entries, merged into each architecture's defaults.
    fn defaults() -> Value {
        ivado_sdk::serde_json::json!({
            "in_channels": 1,
            "num_classes": 2,
            "final_activation": "softmax",
        })
    }
}

impl ClassifierOutput {
    fn apply(self, logits: Tensor) -> Result<Tensor> {
        Ok(match self {
            ClassifierOutput::SoftmaxWithoutBackground => {
                let classes = logits.size()[1];
                logits
                    .f_softmax(1, Kind::Float)?
                    .f_narrow(1, 1, classes - 1)?
            }
            ClassifierOutput::Logits => logits,
        })
    }
}

/// Checks that `x` is a `[N, C, H, W]` batch with the channel count the network was built for and a spatial
/// size of at least `min_size`, so a bad input is a clear error rather than a libtorch shape failure deep inside.
fn check_input(name: &str, x: &Tensor, in_channels: i64, min_size: i64) -> Result<()> {
    let size = x.size();
    if size.len() != 4 {
        return Err(PluginError(format!(
            "{name} expects a [N, C, H, W] batch, got shape {size:?}"
        )));
    }
    if size[1] != in_channels {
        return Err(PluginError(format!(
            "{name} was built for {in_channels} input channel(s), got a batch with {} ({size:?})",
            size[1]
        )));
    }
    if size[2] < min_size || size[3] < min_size {
        return Err(PluginError(format!(
            "{name} needs images of at least {min_size}x{min_size} pixels, got {}x{}",
            size[2], size[3]
        )));
    }
    Ok(())
}

/// PyTorch's default `nn.Linear` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weights (tch's
/// default is a wider Kaiming uniform); the bias init is the caller's, because DenseNet zeroes it.
fn torch_default_linear(
    path: nn::Path,
    in_features: i64,
    out_features: i64,
    bias_init: nn::Init,
) -> nn::Linear {
    let bound = 1.0 / (in_features as f64).sqrt();
    nn::linear(
        path,
        in_features,
        out_features,
        nn::LinearConfig {
            ws_init: nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
            bs_init: Some(bias_init),
            bias: true,
        },
    )
}

/// A batch-norm layer with PyTorch's defaults (momentum 0.1, eps 1e-5, weight 1, bias 0). tch's default draws
/// the weight from U(0, 1) instead, hence the explicit init.
fn batch_norm(path: nn::Path, channels: i64) -> nn::BatchNorm {
    nn::batch_norm2d(
        path,
        channels,
        nn::BatchNormConfig {
            ws_init: nn::Init::Const(1.0),
            ..Default::default()
        },
    )
}

ivado_sdk::export_plugin! {
    name: "classifiers",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [ResNet18, DenseNet121],
    transforms: [],
}
