//! `lab_fcn`: a dilated fully convolutional segmenter, standing in for a network a lab brings itself.
//! Its receptive field grows with dilation instead of pooling, so the output keeps the input's size
//! for any input size.
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{nn, nn::Module, nn::ModuleT, Tensor};
use ivado_sdk::{log, Architecture, Config, Mode, PluginError, Result};

pub struct LabFcn {
    convolutions: Vec<(nn::Conv2D, nn::BatchNorm)>,
    head: nn::Conv2D,
    dropout_rate: f64,
}

impl Architecture for LabFcn {
    const NAME: &'static str = "lab_fcn";
    const SUMMARY: &'static str = "dilated fully convolutional segmenter (out-of-tree example)";

    fn defaults() -> Value {
        json!({"in_channels": 1, "n_filters": 8, "dilations": [1, 2, 4], "dropout_rate": 0.1})
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let in_channels = config.usize_in("in_channels", 1, 64)? as i64;
        let n_filters = config.usize_in("n_filters", 1, 512)? as i64;
        let dilations = config.f64_list("dilations")?;
        let dropout_rate = config.f64("dropout_rate")?;
        if dilations.is_empty() || dilations.iter().any(|d| *d < 1.0 || d.fract() != 0.0) {
            return Err(PluginError(format!(
                "lab_fcn: `dilations` must be positive integers, got {dilations:?}"
            )));
        }
        log::info(&format!("lab_fcn: dilations {dilations:?}"));
        let mut convolutions = Vec::new();
        let mut channels = in_channels;
        for (i, dilation) in dilations.iter().enumerate() {
            let dilation = *dilation as i64;
            let config = nn::ConvConfig {
                padding: dilation,
                dilation,
                ..Default::default()
            };
            convolutions.push((
                nn::conv2d(&root / "body" / i / "conv", channels, n_filters, 3, config),
                nn::batch_norm2d(&root / "body" / i / "norm", n_filters, Default::default()),
            ));
            channels = n_filters;
        }
        let head = nn::conv2d(&root / "head", channels, 1, 1, Default::default());
        Ok(Self {
            convolutions,
            head,
            dropout_rate,
        })
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        let mut x = inputs[0].shallow_clone();
        if x.dim() != 4 {
            return Err(PluginError(format!(
                "lab_fcn expects [N, C, H, W], got {:?}",
                x.size()
            )));
        }
        for (conv, norm) in &self.convolutions {
            x = norm
                .forward_t(&conv.forward(&x).relu(), mode.batch_statistics())
                .feature_dropout(self.dropout_rate, mode.dropout());
        }
        Ok(self.head.forward(&x).sigmoid())
    }
}

ivado_sdk::export_plugin! {
    name: "lab_models",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [LabFcn],
    transforms: [],
}
