//! Unit tests of the four architectures, built directly into a `VarStore` (no plugin host).
mod film;
mod hemis;
mod unet;

use ivado_sdk::serde_json::Value;
use ivado_sdk::tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
use ivado_sdk::{Architecture, Config, Mode};
use std::collections::BTreeMap;

/// Builds `A` with `user` over its defaults, as the host does, including the unknown-key check.
fn build<A: Architecture>(user: Value) -> (nn::VarStore, A) {
    // One intra-op thread per test: the harness already runs tests in parallel, and these nets are tiny.
    ivado_sdk::tch::set_num_threads(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = try_build::<A>(&vs, user).unwrap_or_else(|e| panic!("{e}"));
    (vs, model)
}

fn try_build<A: Architecture>(vs: &nn::VarStore, user: Value) -> ivado_sdk::Result<A> {
    let mut config = Config::new(A::NAME, A::defaults(), user)?;
    let model = A::build(&mut config, vs.root())?;
    config.finish()?;
    Ok(model)
}

/// The error `A::build` (or the unknown-key check) gives for `user`.
fn build_error<A: Architecture>(user: Value) -> String {
    let vs = nn::VarStore::new(Device::Cpu);
    match try_build::<A>(&vs, user) {
        Ok(_) => panic!("{} built with an invalid config", A::NAME),
        Err(e) => e.0,
    }
}

/// What PyTorch's `sum(p.numel() for p in model.parameters())` counts: trainable values only, not the
/// batch-norm running statistics (buffers in PyTorch, untrained variables here).
fn trainable_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

fn shape_of(vs: &nn::VarStore, name: &str) -> Vec<i64> {
    vs.variables()
        .get(name)
        .unwrap_or_else(|| panic!("no parameter `{name}`"))
        .size()
}

/// Copies of the batch-norm running statistics, by name.
fn running_stats(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .filter(|(name, _)| name.ends_with("running_mean") || name.ends_with("running_var"))
        .map(|(name, t)| (name, t.copy()))
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn all_finite(t: &Tensor) -> bool {
    t.isfinite().all().int64_value(&[]) == 1
}

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

/// Backpropagates the mean output and checks that every trainable variable got a finite gradient, except
/// those `unused` names (e.g. FiLM generator weights replaced by the shared one).
fn assert_finite_gradients(vs: &nn::VarStore, output: &Tensor, unused: impl Fn(&str) -> bool) {
    for (_, t) in vs.variables() {
        if t.requires_grad() {
            let mut grad = t.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }
    output.mean(Kind::Float).backward();
    let mut checked = 0;
    for (name, t) in vs.variables() {
        if !t.requires_grad() {
            continue;
        }
        let grad = t.grad();
        if unused(&name) {
            continue;
        }
        assert!(grad.defined(), "no gradient for `{name}`");
        assert!(all_finite(&grad), "non-finite gradient for `{name}`");
        checked += 1;
    }
    assert!(checked > 0, "no trainable variable was checked");
}

/// Soft Dice loss, 1 - 2|P∩T| / (|P| + |T|), over the whole batch.
fn dice_loss(prediction: &Tensor, target: &Tensor) -> Tensor {
    let intersection = (prediction * target).sum(Kind::Float);
    let total = prediction.sum(Kind::Float) + target.sum(Kind::Float);
    1.0 - (2.0 * intersection + 1.0) / (total + 1.0)
}

/// A filled disc (2D, `dims == 2`) or ball (3D) of radius `side / 4` centred in a `side`-wide grid, as
/// [1, 1, side, ...]: a target mask with foreground and background.
fn blob(side: i64, dims: usize) -> Tensor {
    let squared =
        (Tensor::arange(side, (Kind::Float, Device::Cpu)) - (side as f64 - 1.0) / 2.0).square();
    // Sum of the squared centred coordinate along each axis, broadcast to the full grid.
    let mut distance = Tensor::zeros(vec![side; dims].as_slice(), (Kind::Float, Device::Cpu));
    for axis in 0..dims {
        let mut shape = vec![1i64; dims];
        shape[axis] = side;
        distance += squared.view(shape.as_slice());
    }
    let mask = distance
        .le((side as f64 / 4.0).powi(2))
        .to_kind(Kind::Float);
    mask.unsqueeze(0).unsqueeze(0)
}

/// Adam (lr 0.01) on one fixed batch: returns the loss before the first step and after the last one. The
/// callers' batch is a `blob` mask at ±1 under unit-variance Gaussian noise, and the mask is the target.
fn overfit(vs: &nn::VarStore, steps: usize, loss: impl Fn(Mode) -> Tensor) -> (f64, f64) {
    let mut optimizer = nn::Adam::default().build(vs, 1e-2).unwrap();
    let first = loss(Mode::Train).double_value(&[]);
    for _ in 0..steps {
        let value = loss(Mode::Train);
        optimizer.backward_step(&value);
    }
    let last = loss(Mode::Train).double_value(&[]);
    (first, last)
}

/// After a training pass every running variance has moved (a batch variance is never exactly the stored
/// one), and so have running means (a channel that is zero everywhere could keep its mean at 0, hence "some").
fn assert_train_moved_running_stats(
    before: &BTreeMap<String, Tensor>,
    after: &BTreeMap<String, Tensor>,
) {
    let moved = |name: &String| !after[name].equal(&before[name]);
    assert!(
        before
            .keys()
            .filter(|n| n.ends_with("running_var"))
            .all(moved),
        "training left a running variance in place"
    );
    assert!(
        before
            .keys()
            .filter(|n| n.ends_with("running_mean"))
            .any(moved),
        "training moved no running mean"
    );
}
