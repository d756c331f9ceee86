//! TorchScript export of a plugin model by tracing, so a trained network can run in PyTorch or C++ without
//! ivado. The plugin's forward runs under libtorch's tracer (the plugin links the same libtorch, so its ops
//! are recorded like ours); the weights become constants of the traced graph.
use crate::model_folder::write_atomic;
use crate::plugin::PluginModel;
use anyhow::{anyhow, bail, Context, Result};
use ivado_sdk::Mode;
use std::path::Path;
use tch::{CModule, Kind, Tensor};

/// How the exported module compares with the plugin.
#[derive(Clone, Debug)]
pub struct ExportCheck {
    /// Largest absolute difference between the traced module and the plugin, over the example inputs and a
    /// second, independent draw of the same shapes.
    pub max_abs_difference: f64,
}

/// Largest difference allowed between the traced module and the plugin: both run the same kernels, so
/// anything above float rounding means tracing lost a branch.
pub const TOLERANCE: f64 = 1e-4;

/// Random example inputs, uniform in [0, 1): `shapes[0]` for the image batch, later shapes for extra inputs
/// (FiLM metadata, HeMIS availability masks). Drawn from their own generator so exporting leaves libtorch's
/// global RNG alone.
pub fn example_inputs(shapes: &[Vec<i64>], device: tch::Device, seed: u64) -> Vec<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    shapes
        .iter()
        .map(|shape| {
            let count: i64 = shape.iter().product();
            let values: Vec<f32> = (0..count).map(|_| rng.random::<f32>()).collect();
            Tensor::from_slice(&values)
                .reshape(shape.as_slice())
                .to_kind(Kind::Float)
                .to_device(device)
        })
        .collect()
}

/// Traces `model` in eval mode on inputs of `shapes`, writes the TorchScript module to `out` atomically,
/// reloads it and checks it reproduces the plugin's output on fresh inputs.
pub fn export(model: &PluginModel, shapes: &[Vec<i64>], out: &Path) -> Result<ExportCheck> {
    if shapes.is_empty() {
        bail!("TorchScript export needs at least one input shape");
    }
    let library = model.library();
    if library
        .architectures
        .iter()
        .any(|a| a.name == model.architecture && !a.traceable)
    {
        bail!(
            "`{}` (plugin `{}`) cannot be exported by tracing: its forward branches on input values (a trace would \
             record only one branch); use it through ivado",
            model.architecture,
            library.name
        );
    }
    let device = model
        .parameters
        .first()
        .map(|p| p.tensor.device())
        .unwrap_or(tch::Device::Cpu);
    let inputs = example_inputs(shapes, device, 0);
    let mut failure: Option<anyhow::Error> = None;
    // The tracer stores weights as constants, and refuses constants that require grad.
    for parameter in model.trainable() {
        let _ = parameter.tensor.set_requires_grad(false);
    }
    let module = tch::no_grad(|| {
        CModule::create_by_tracing(&model.architecture, "forward", &inputs, &mut |traced| {
            let borrowed: Vec<&Tensor> = traced.iter().collect();
            match model.forward(&borrowed, Mode::Eval) {
                Ok(output) => vec![output],
                Err(error) => {
                    failure = Some(error);
                    // The tracer needs an output; this one is discarded.
                    vec![traced[0].shallow_clone()]
                }
            }
        })
    });
    let saved = save(&model.architecture, module, failure, out);
    // Only now: the graph's constants are the parameters themselves until the module is written.
    for parameter in model.trainable() {
        let _ = parameter.tensor.set_requires_grad(true);
    }
    saved?;

    let reloaded = CModule::load_on_device(out, device)
        .map_err(|e| anyhow!("reloading {}: {e}", out.display()))?;
    let mut max_abs_difference = 0f64;
    for seed in [0, 1] {
        let inputs = example_inputs(shapes, device, seed);
        let borrowed: Vec<&Tensor> = inputs.iter().collect();
        let expected = tch::no_grad(|| model.forward(&borrowed, Mode::Eval))?;
        let actual = tch::no_grad(|| reloaded.forward_ts(&inputs))
            .map_err(|e| anyhow!("running the exported module: {e}"))?;
        if actual.size() != expected.size() {
            bail!(
                "the exported module gives shape {:?}, the plugin {:?}",
                actual.size(),
                expected.size()
            );
        }
        let difference = (actual - expected).abs().max().double_value(&[]);
        max_abs_difference = max_abs_difference.max(difference);
    }
    // NaN fails too.
    if max_abs_difference.is_nan() || max_abs_difference > TOLERANCE {
        bail!(
            "the traced `{}` differs from the plugin by {max_abs_difference:.3e} (> {TOLERANCE:e}): its forward \
             probably depends on data in a way tracing cannot record; it cannot be exported by tracing",
            model.architecture
        );
    }
    Ok(ExportCheck { max_abs_difference })
}

/// Writes the traced module to `out` atomically.
fn save(
    architecture: &str,
    module: Result<CModule, tch::TchError>,
    failure: Option<anyhow::Error>,
    out: &Path,
) -> Result<()> {
    if let Some(error) = failure {
        return Err(error.context(format!("tracing `{architecture}`")));
    }
    let module = module.map_err(|e| anyhow!("tracing `{}`: {e}", architecture))?;
    let directory = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory)
        .with_context(|| format!("creating {}", directory.display()))?;
    let staging = directory.join(format!(".ivado-export-{}.pt", std::process::id()));
    module
        .save(&staging)
        .map_err(|e| anyhow!("writing {}: {e}", staging.display()))?;
    let bytes = std::fs::read(&staging)?;
    std::fs::remove_file(&staging).ok();
    write_atomic(out, &bytes)
}

/// Parses `1,1,128,128` into a shape.
pub fn parse_shape(text: &str) -> Result<Vec<i64>> {
    text.split(',')
        .map(|part| {
            part.trim()
                .parse::<i64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    anyhow!("bad input shape `{text}`: expected positive integers like 1,1,128,128")
                })
        })
        .collect()
}
