//! The cost of the plugin boundary: the same U-Net, once linked into this binary as a Rust library and once
//! loaded from its cdylib through the C ABI (as `ivado` runs it), timed on identical weights and inputs.
//!
//!     cargo bench -p ivado-plugin-unet [-- steps]
//!
//! Prints, per configuration, the median forward+backward step time both ways and the difference. The tiny
//! configuration makes the per-call cost (handle wrapping, the table call, panic guard) visible in absolute
//! terms; the default-size ones show it relative to real work.
use ivado_plugin_unet::{Unet2d, Unet3d};
use ivado_runtime::plugin::{PluginModel, PluginRegistry, SearchPath};
use ivado_sdk::testing::build_architecture;
use ivado_sdk::{Architecture, Mode};
use serde_json::{json, Value};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Median seconds of `a` and of `b`, run alternately so both see the same machine load, and in alternating
/// order (a-b, then b-a) so neither always runs right after the other.
fn time_pair(steps: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    a(); // warm-up
    b();
    let (mut times_a, mut times_b) = (Vec::new(), Vec::new());
    let timed = |f: &mut dyn FnMut(), into: &mut Vec<f64>| {
        let started = Instant::now();
        f();
        into.push(started.elapsed().as_secs_f64());
    };
    for step in 0..steps {
        if step % 2 == 0 {
            timed(&mut a, &mut times_a);
            timed(&mut b, &mut times_b);
        } else {
            timed(&mut b, &mut times_b);
            timed(&mut a, &mut times_a);
        }
    }
    (median(times_a), median(times_b))
}

/// Forward in training mode, a scalar loss, backward, gradients cleared.
fn train_step(output: Tensor, parameters: &[Tensor]) {
    output.square().mean(Kind::Float).backward();
    for parameter in parameters {
        let mut gradient = parameter.grad();
        if gradient.defined() {
            let _ = gradient.zero_();
        }
    }
}

fn compare<A: Architecture>(
    registry: &PluginRegistry,
    label: &str,
    config: Value,
    input: &[i64],
    steps: usize,
) {
    let (store, direct) =
        build_architecture::<A>(config.clone(), Device::Cpu).expect("direct build");
    let plugin: PluginModel = registry
        .model(A::NAME, &config, Device::Cpu)
        .expect("plugin build");
    // Same weights both ways.
    let variables = store.variables();
    tch::no_grad(|| {
        for parameter in &plugin.parameters {
            parameter
                .tensor
                .shallow_clone()
                .copy_(&variables[&parameter.name]);
        }
    });
    let direct_parameters: Vec<Tensor> = store.trainable_variables();
    let plugin_parameters: Vec<Tensor> = plugin
        .trainable()
        .map(|p| p.tensor.shallow_clone())
        .collect();
    let x = Tensor::rand(input, (Kind::Float, Device::Cpu));

    let (direct_s, plugin_s) = time_pair(
        steps,
        || {
            train_step(
                direct.forward(&[x.shallow_clone()], Mode::Train).unwrap(),
                &direct_parameters,
            )
        },
        || {
            train_step(
                plugin.forward(&[&x], Mode::Train).unwrap(),
                &plugin_parameters,
            )
        },
    );
    let overhead = plugin_s - direct_s;
    println!(
        "{label:<34} {:<18} direct {:>10.6} s   plugin {:>10.6} s   boundary {:>+9.2} us ({:>+6.2}%)",
        format!("{input:?}"),
        direct_s,
        plugin_s,
        overhead * 1e6,
        100.0 * overhead / direct_s
    );
    drop(store);
}

fn main() {
    let steps: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    let registry = PluginRegistry::discover(&SearchPath::standard(&[]));
    assert!(
        !registry.libraries.is_empty(),
        "no plugins found: build the workspace first (cargo build --release --workspace)"
    );
    println!(
        "plugin boundary overhead, median of {steps} forward+backward steps, {} libtorch threads",
        tch::get_num_threads()
    );
    compare::<Unet2d>(
        &registry,
        "unet2d tiny (per-call cost)",
        json!({"depth": 1, "n_filters": 2}),
        &[1, 1, 8, 8],
        steps * 50,
    );
    compare::<Unet2d>(
        &registry,
        "unet2d ivadomed default",
        json!({}),
        &[8, 1, 128, 128],
        steps,
    );
    compare::<Unet3d>(
        &registry,
        "unet3d n_filters 16",
        json!({"n_filters": 16}),
        &[2, 1, 48, 48, 16],
        steps,
    );
}
