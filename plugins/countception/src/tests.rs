use super::*;
use ivado_sdk::tch::{nn::OptimizerConfig, Device, Kind, Reduction};

/// One libtorch thread per test: the harness already runs tests in parallel, and libtorch's OpenMP workers
/// spin-waiting on an oversubscribed 2-core machine made a training step about 25x slower (measured).
fn single_threaded() {
    ivado_sdk::tch::set_num_threads(1);
}

fn build(user: Value) -> Result<(nn::VarStore, Countception)> {
    single_threaded();
    let store = nn::VarStore::new(Device::Cpu);
    let mut config = Config::new(Countception::NAME, Countception::defaults(), user)?;
    let model = Countception::build(&mut config, store.root())?;
    config.finish()?;
    Ok((store, model))
}

/// ivadomed's layout at 1/8 of its channel widths, for the tests that train or run many passes: the full
/// network costs about 20 GMAC per forward pass even on a 1x1 image (its first convolution pads by 40 pixels).
fn build_narrow() -> (nn::VarStore, Countception) {
    single_threaded();
    let store = nn::VarStore::new(Device::Cpu);
    let model = Countception::new(&store.root(), 3, 1, 8);
    (store, model)
}

fn trainable_parameters(store: &nn::VarStore) -> (usize, i64) {
    let tensors = store.trainable_variables();
    let count = tensors.iter().map(|t| t.numel() as i64).sum();
    (tensors.len(), count)
}

fn shape_of(store: &nn::VarStore, name: &str) -> Vec<i64> {
    store
        .variables()
        .get(name)
        .unwrap_or_else(|| panic!("no parameter named {name}"))
        .size()
}

fn buffer(store: &nn::VarStore, name: &str) -> Tensor {
    store.variables()[name].copy()
}

/// A Gaussian blob (sigma 1 pixel, peak 1) at (`row`, `col`) on an `height` x `width` map: a keypoint heatmap.
fn heatmap(height: i64, width: i64, row: f64, col: f64) -> Tensor {
    let rows = Tensor::arange(height, (Kind::Float, Device::Cpu)).view([height, 1]);
    let cols = Tensor::arange(width, (Kind::Float, Device::Cpu)).view([1, width]);
    let squared_distance = (rows - row).square() + (cols - col).square();
    (squared_distance * -0.5).exp().view([1, 1, height, width])
}

#[test]
fn parameter_count_matches_ivadomed() {
    let (store, _) = build(json!({})).unwrap();
    // Each ConvBlock(in, out, k) holds in*out*k^2 + out (conv) + 2*out (batch-norm). Summing ivadomed's blocks:
    //   conv1 (3->64, k3) 1,920; simple1 (64; 16, 16) 117,952; simple2 (48; 16, 32) 169,968;
    //   conv2 (80->16, k14) 250,928; simple3 (16; 112, 48) 98,160; simple4 (208; 64, 32) 825,728;
    //   simple5 (128; 40, 40) 589,160; simple6 (120; 32, 96) 1,256,352; conv3 (224->32, k20) 2,867,296;
    //   conv4 (32->64, k10) 204,992; conv5 (64->32, k9) 165,984; conv6 (32->1, k20) 12,803
    // (a SimpleBlock(in; a, b) is ConvBlocks (in->a, k3), (in->b, k5), (in->b, k9)), total 6,561,195.
    // Tensors: 6 ConvBlocks + 6 SimpleBlocks x 3 = 24 blocks with 4 tensors each = 96.
    assert_eq!(trainable_parameters(&store), (96, 6_561_195));

    // One input channel saves 2*64*9 = 1,152; a second output channel adds 32*400 + 3 = 12,803.
    let (store, _) = build(json!({"in_channels": 1, "out_channels": 2})).unwrap();
    assert_eq!(trainable_parameters(&store).1, 6_561_195 - 1_152 + 12_803);
}

#[test]
fn parameter_names_and_shapes_follow_ivadomed() {
    let (store, _) = build(json!({})).unwrap();
    assert_eq!(shape_of(&store, "conv1.conv1.weight"), [64, 3, 3, 3]);
    assert_eq!(shape_of(&store, "conv1.conv1.bias"), [64]);
    assert_eq!(
        shape_of(&store, "simple1.conv3.conv1.weight"),
        [16, 64, 9, 9]
    );
    // simple2 reads simple1's 16 + 16 + 16 = 48 channels.
    assert_eq!(
        shape_of(&store, "simple2.conv2.conv1.weight"),
        [32, 48, 5, 5]
    );
    assert_eq!(shape_of(&store, "conv2.conv1.weight"), [16, 80, 14, 14]);
    assert_eq!(shape_of(&store, "simple4.conv1.batch_norm.weight"), [64]);
    assert_eq!(shape_of(&store, "conv3.conv1.weight"), [32, 224, 20, 20]);
    assert_eq!(shape_of(&store, "conv6.conv1.weight"), [1, 32, 20, 20]);
    assert_eq!(shape_of(&store, "conv6.batch_norm.running_var"), [1]);
}

#[test]
fn conv_block_is_conv_then_batch_norm_then_leaky_relu() {
    let store = nn::VarStore::new(Device::Cpu);
    let mut block = ConvBlock::new(store.root() / "block", 1, 1, 1, 0, FINAL_SLOPE);
    ivado_sdk::tch::no_grad(|| {
        let _ = block.conv1.ws.fill_(2.0);
        let _ = block.conv1.bs.as_mut().unwrap().fill_(1.0);
    });
    let x = Tensor::from_slice(&[-3.0f32, -0.5, 0.0, 4.0]).view([1, 1, 2, 2]);
    let y = block.forward(&x, false).unwrap();
    // Eval batch-norm with fresh statistics divides by sqrt(1 + 1e-5); conv gives 2x + 1 = -5, 0, 1, 9; the
    // LeakyReLU(0.3) scales the negative one: -1.5.
    let scale = (1.0f64 + 1e-5).sqrt();
    let expected = Tensor::from_slice(&[-1.5f32, 0.0, 1.0, 9.0]).view([1, 1, 2, 2]) / scale;
    assert!(
        y.allclose(&expected, 1e-6, 1e-6, false),
        "{y} vs {expected}"
    );
}

/// Forward in train mode on an input of `shape`, MSE backward, and checks the output shape, that every
/// parameter received a finite gradient and that the first convolution received a non-zero one.
fn check_forward_backward(store: &nn::VarStore, model: &Countception, shape: [i64; 4]) {
    let x = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let y = model.forward(&[x], Mode::Train).unwrap();
    // Output height and width equal the input's: the first conv adds 2*40 - 2 = 78 pixels and the rest remove
    // 2 (simple1) + 2 (simple2) + 13 (conv2) + 4*2 (simple3-6) + 19 (conv3) + 9 (conv4) + 8 (conv5)
    // + 17 (conv6: 20 - 1 - 2*1) = 78.
    assert_eq!(y.size(), [shape[0], 1, shape[2], shape[3]]);
    let target = Tensor::zeros_like(&y);
    y.mse_loss(&target, Reduction::Mean).backward();
    for (name, tensor) in store.variables() {
        if tensor.requires_grad() {
            let grad = tensor.grad();
            assert!(grad.defined(), "{name} has no gradient");
            assert!(
                grad.isfinite().all().int64_value(&[]) == 1,
                "{name} has a non-finite gradient"
            );
        }
    }
    // The gradient crosses the whole network, down to the first convolution.
    let stem = store.variables()["conv1.conv1.weight"].grad();
    assert!(stem.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    for parameter in store.trainable_variables() {
        let _ = parameter.grad().zero_();
    }
}

#[test]
fn forward_backward_keeps_the_input_size() {
    ivado_sdk::tch::manual_seed(1);
    let (store, model) = build_narrow();
    check_forward_backward(&store, &model, [1, 3, 4, 4]);
    check_forward_backward(&store, &model, [2, 3, 5, 7]);
}

#[test]
fn full_width_forward_backward() {
    ivado_sdk::tch::manual_seed(4);
    let (store, model) = build(json!({})).unwrap();
    check_forward_backward(&store, &model, [1, 3, 2, 3]);
}

/// Adam on one image and its keypoint heatmap; returns the first and last MSE.
fn fit_heatmap(store: &nn::VarStore, model: &Countception, steps: usize) -> (f64, f64) {
    let x = Tensor::randn([1, 3, 6, 6], (Kind::Float, Device::Cpu));
    let target = heatmap(6, 6, 2.0, 3.0);
    let mut optimizer = nn::Adam::default().build(store, 1e-3).unwrap();
    let mut first = None;
    let mut last = f64::NAN;
    for _ in 0..steps {
        let y = model.forward(&[x.shallow_clone()], Mode::Train).unwrap();
        let loss = y.mse_loss(&target, Reduction::Mean);
        last = loss.double_value(&[]);
        first.get_or_insert(last);
        optimizer.backward_step(&loss);
    }
    (first.unwrap(), last)
}

#[test]
fn overfits_one_heatmap() {
    ivado_sdk::tch::manual_seed(2);
    let (store, model) = build_narrow();
    let (first, last) = fit_heatmap(&store, &model, 40);
    assert!(
        last < 0.5 * first,
        "loss went from {first} to {last}, expected below half"
    );
}

/// The same at ivadomed's full width: minutes on two CPU cores, so only on request (`-- --ignored`).
#[test]
#[ignore = "minutes on two CPU cores"]
fn full_width_overfits_one_heatmap() {
    ivado_sdk::tch::manual_seed(2);
    let (store, model) = build(json!({})).unwrap();
    let (first, last) = fit_heatmap(&store, &model, 30);
    assert!(
        last < 0.5 * first,
        "loss went from {first} to {last}, expected below half"
    );
}

#[test]
fn modes_use_and_update_batch_norm_statistics_as_documented() {
    ivado_sdk::tch::manual_seed(3);
    let (store, model) = build_narrow();
    // Inputs far from the fresh running statistics (mean 0, variance 1), so an update is visible.
    let x = Tensor::randn([2, 3, 4, 4], (Kind::Float, Device::Cpu)) * 3.0 + 2.0;
    let first_before = buffer(&store, "conv1.batch_norm.running_mean");
    let last_before = buffer(&store, "conv6.batch_norm.running_var");

    let eval1 = model.forward(&[x.shallow_clone()], Mode::Eval).unwrap();
    let eval2 = model.forward(&[x.shallow_clone()], Mode::Eval).unwrap();
    assert!(eval1.equal(&eval2), "Eval must be deterministic");
    // No dropout in Count-ception: Monte-Carlo dropout runs exactly as Eval.
    let mc = model
        .forward(&[x.shallow_clone()], Mode::McDropout)
        .unwrap();
    assert!(mc.equal(&eval1));
    assert!(buffer(&store, "conv1.batch_norm.running_mean").equal(&first_before));
    assert!(buffer(&store, "conv6.batch_norm.running_var").equal(&last_before));

    let train = model.forward(&[x.shallow_clone()], Mode::Train).unwrap();
    assert!(!train.equal(&eval1));
    assert!(!buffer(&store, "conv1.batch_norm.running_mean").equal(&first_before));
    assert!(!buffer(&store, "conv6.batch_norm.running_var").equal(&last_before));
}

#[test]
fn config_is_validated() {
    let logits = build(json!({"use_logits": true})).err().unwrap().0;
    assert!(
        logits.contains("`use_logits: true` is not supported"),
        "{logits}"
    );
    let unknown = build(json!({"out_channel": 2})).err().unwrap().0;
    assert!(
        unknown.contains("unknown config key `out_channel`"),
        "{unknown}"
    );
    let (_, model) = build(json!({"in_channels": 1})).unwrap();
    let rgb = Tensor::zeros([1, 3, 4, 4], (Kind::Float, Device::Cpu));
    let error = model.forward(&[rgb], Mode::Eval).err().unwrap().0;
    assert!(error.contains("built for 1 input channel"), "{error}");
}
