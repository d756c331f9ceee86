use super::*;
use ivado_sdk::serde_json::json;
use ivado_sdk::tch::{nn::OptimizerConfig, Device, Reduction};
use ivado_sdk::{Architecture, Mode};

/// One libtorch thread per test: the harness already runs tests in parallel, and libtorch's OpenMP workers
/// spin-waiting on an oversubscribed 2-core machine slow training steps down many times over.
fn single_threaded() {
    ivado_sdk::tch::set_num_threads(1);
}

/// Builds an architecture the way the host does: defaults merged under `user`, unknown keys rejected.
fn build<A: Architecture>(user: Value) -> Result<(nn::VarStore, A)> {
    single_threaded();
    let store = nn::VarStore::new(Device::Cpu);
    let mut config = Config::new(A::NAME, A::defaults(), user)?;
    let model = A::build(&mut config, store.root())?;
    config.finish()?;
    Ok((store, model))
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

/// Cross-entropy over 2 classes, written on ivadomed's output: the softmax column of class 1. With
/// p = P(class 1), the 2-class cross-entropy is -[y log p + (1 - y) log(1 - p)], i.e. binary cross-entropy on p.
fn two_class_cross_entropy(foreground: &Tensor, labels: &Tensor) -> Tensor {
    foreground.binary_cross_entropy::<Tensor>(labels, None, Reduction::Mean)
}

fn all_finite(t: &Tensor) -> bool {
    t.isfinite().all().int64_value(&[]) == 1
}

/// Forward in train mode, backward, and checks that every parameter received a finite gradient and that the
/// stem (farthest from the loss) received a non-zero one, i.e. the gradient crosses the whole network.
fn check_forward_backward<A: Architecture>(
    store: &nn::VarStore,
    model: &A,
    input_shape: [i64; 4],
    stem_weight: &str,
) {
    let batch = input_shape[0];
    let x = Tensor::randn(input_shape, (Kind::Float, Device::Cpu));
    let y = model.forward(&[x], Mode::Train).unwrap();
    // ivadomed's 2-class head: one softmax column per non-background class.
    assert_eq!(y.size(), vec![batch, 1], "input {input_shape:?}");
    let (min, max) = (y.min().double_value(&[]), y.max().double_value(&[]));
    assert!(0.0 < min && max < 1.0, "probabilities out of (0, 1): {y}");

    let labels = Tensor::from_slice(&[0.0f32, 1.0])
        .repeat([batch])
        .narrow(0, 0, batch)
        .view([batch, 1]);
    let loss = two_class_cross_entropy(&y, &labels);
    loss.backward();
    for (name, tensor) in store.variables() {
        if tensor.requires_grad() {
            let grad = tensor.grad();
            assert!(grad.defined(), "{name} has no gradient");
            assert!(all_finite(&grad), "{name} has a non-finite gradient");
        }
    }
    let stem_grad = store.variables()[stem_weight].grad();
    assert!(stem_grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    // Clear the gradients so the next call checks its own pass only.
    for parameter in store.trainable_variables() {
        let mut grad = parameter.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
}

/// Adam on one fixed batch: the network must memorise it.
fn check_overfits<A: Architecture>(store: &nn::VarStore, model: &A, input_side: i64) {
    let x = Tensor::randn([4, 1, input_side, input_side], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0.0f32, 1.0, 1.0, 0.0]).view([4, 1]);
    let mut optimizer = nn::Adam::default().build(store, 1e-3).unwrap();
    let mut first = None;
    let mut last = f64::NAN;
    for _ in 0..30 {
        let y = model.forward(&[x.shallow_clone()], Mode::Train).unwrap();
        let loss = two_class_cross_entropy(&y, &labels);
        last = loss.double_value(&[]);
        first.get_or_insert(last);
        optimizer.backward_step(&loss);
    }
    let first = first.unwrap();
    assert!(
        last < 0.5 * first,
        "loss went from {first} to {last}, expected below half"
    );
}

fn running_mean(store: &nn::VarStore, name: &str) -> Tensor {
    store.variables()[name].copy()
}

#[test]
fn resnet18_parameter_count_matches_ivadomed() {
    let (store, _) = build::<ResNet18>(json!({})).unwrap();
    // torchvision's resnet18 (RGB, 1000 classes) has 11,689,512 parameters. ivadomed's stem reads 1 channel
    // instead of 3: -2 * 64 * 7 * 7 = -6,272. Its head has 2 classes instead of 1000: -998 * (512 + 1) =
    // -511,974. 11,689,512 - 6,272 - 511,974 = 11,171,266.
    // Tensors: 20 convolutions (1 stem + 16 in blocks + 3 shortcuts), 20 batch-norms with weight and bias,
    // fc weight and bias: 20 + 40 + 2 = 62.
    assert_eq!(trainable_parameters(&store), (62, 11_171_266));
}

#[test]
fn densenet121_parameter_count_matches_ivadomed() {
    let (store, _) = build::<DenseNet121>(json!({})).unwrap();
    // torchvision's densenet121 (RGB, 1000 classes) has 7,978,856 parameters. 1-channel stem: -2 * 64 * 7 * 7 =
    // -6,272; 2-class head: -998 * (1024 + 1) = -1,022,950. 7,978,856 - 6,272 - 1,022,950 = 6,949,634.
    // Tensors: conv0 + norm0 (3), 58 dense layers x 6, 3 transitions x 3, norm5 (2), classifier (2) = 364.
    assert_eq!(trainable_parameters(&store), (364, 6_949_634));
}

#[test]
fn parameter_names_and_shapes_follow_torchvision() {
    let (resnet, _) = build::<ResNet18>(json!({})).unwrap();
    assert_eq!(shape_of(&resnet, "conv1.weight"), [64, 1, 7, 7]);
    assert_eq!(shape_of(&resnet, "layer1.1.conv2.weight"), [64, 64, 3, 3]);
    assert_eq!(
        shape_of(&resnet, "layer2.0.downsample.0.weight"),
        [128, 64, 1, 1]
    );
    assert_eq!(shape_of(&resnet, "layer4.1.bn2.running_var"), [512]);
    assert_eq!(shape_of(&resnet, "fc.weight"), [2, 512]);
    // layer1 keeps 64 channels at stride 1, so it has no shortcut convolution.
    assert!(!resnet
        .variables()
        .contains_key("layer1.0.downsample.0.weight"));

    let (densenet, _) = build::<DenseNet121>(json!({})).unwrap();
    assert_eq!(shape_of(&densenet, "features.conv0.weight"), [64, 1, 7, 7]);
    // Block 4 starts at 512 channels (1024 after block 3, halved); its 16th layer sees 512 + 15 * 32 = 992.
    assert_eq!(
        shape_of(&densenet, "features.denseblock4.denselayer16.norm1.weight"),
        [992]
    );
    assert_eq!(
        shape_of(&densenet, "features.denseblock4.denselayer16.conv1.weight"),
        [128, 992, 1, 1]
    );
    assert_eq!(
        shape_of(&densenet, "features.denseblock1.denselayer1.conv2.weight"),
        [32, 128, 3, 3]
    );
    // Block 1 ends at 64 + 6 * 32 = 256 channels; the transition halves them.
    assert_eq!(
        shape_of(&densenet, "features.transition1.conv.weight"),
        [128, 256, 1, 1]
    );
    assert_eq!(shape_of(&densenet, "features.norm5.running_mean"), [1024]);
    assert_eq!(shape_of(&densenet, "classifier.weight"), [2, 1024]);

    // PyTorch initialises batch-norm to the identity: weight 1, bias 0, running mean 0, running variance 1.
    for (store, prefix) in [(&resnet, "layer3.1.bn1"), (&densenet, "features.norm5")] {
        let value = |suffix: &str| store.variables()[&format!("{prefix}.{suffix}")].copy();
        for (suffix, expected) in [
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ] {
            let tensor = value(suffix);
            assert!(
                tensor.eq(expected).all().int64_value(&[]) == 1,
                "{prefix}.{suffix}: {tensor}"
            );
        }
    }
}

#[test]
fn resnet18_forward_backward_on_two_sizes() {
    ivado_sdk::tch::manual_seed(1);
    let (store, model) = build::<ResNet18>(json!({})).unwrap();
    check_forward_backward(&store, &model, [2, 1, 32, 32], "conv1.weight");
    // Non-square, not a multiple of 32: the adaptive pooling makes the head size-independent.
    check_forward_backward(&store, &model, [3, 1, 40, 24], "conv1.weight");
}

#[test]
fn densenet121_forward_backward_on_two_sizes() {
    ivado_sdk::tch::manual_seed(2);
    let (store, model) = build::<DenseNet121>(json!({"dropout_rate": 0.2})).unwrap();
    check_forward_backward(&store, &model, [2, 1, 32, 32], "features.conv0.weight");
    check_forward_backward(&store, &model, [2, 1, 48, 40], "features.conv0.weight");
}

#[test]
fn head_width_follows_num_classes_and_final_activation() {
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let (_, softmax) = build::<ResNet18>(json!({"in_channels": 3, "num_classes": 4})).unwrap();
    let probabilities = softmax.forward(&[x.shallow_clone()], Mode::Eval).unwrap();
    // 4 classes, background dropped: 3 columns, whose sum is 1 - P(background), so in (0, 1).
    assert_eq!(probabilities.size(), [2, 3]);
    let row_sums = probabilities.sum_dim_intlist(1, false, Kind::Float);
    assert!(row_sums.lt(1.0).all().int64_value(&[]) == 1);
    assert!(row_sums.gt(0.0).all().int64_value(&[]) == 1);

    let (_, logits) = build::<DenseNet121>(
        json!({"in_channels": 3, "num_classes": 4, "final_activation": "none"}),
    )
    .unwrap();
    assert_eq!(logits.forward(&[x], Mode::Eval).unwrap().size(), [2, 4]);
}

#[test]
fn resnet18_overfits_one_batch() {
    ivado_sdk::tch::manual_seed(3);
    let (store, model) = build::<ResNet18>(json!({})).unwrap();
    check_overfits(&store, &model, 32);
}

#[test]
fn densenet121_overfits_one_batch() {
    ivado_sdk::tch::manual_seed(4);
    let (store, model) = build::<DenseNet121>(json!({})).unwrap();
    check_overfits(&store, &model, 32);
}

#[test]
fn resnet18_modes_use_and_update_batch_norm_statistics_as_documented() {
    ivado_sdk::tch::manual_seed(5);
    let (store, model) = build::<ResNet18>(json!({})).unwrap();
    // Inputs far from the fresh running statistics (mean 0, variance 1), so an update is visible.
    let x = Tensor::randn([2, 1, 32, 32], (Kind::Float, Device::Cpu)) * 3.0 + 2.0;
    let before = running_mean(&store, "bn1.running_mean");

    let eval1 = model.forward(&[x.shallow_clone()], Mode::Eval).unwrap();
    let eval2 = model.forward(&[x.shallow_clone()], Mode::Eval).unwrap();
    assert!(eval1.equal(&eval2), "Eval must be deterministic");
    assert!(running_mean(&store, "bn1.running_mean").equal(&before));
    // ResNet has no dropout, so Monte-Carlo dropout is Eval: same output, statistics untouched.
    let mc = model
        .forward(&[x.shallow_clone()], Mode::McDropout)
        .unwrap();
    assert!(mc.equal(&eval1));
    assert!(running_mean(&store, "bn1.running_mean").equal(&before));

    // Train normalises with the batch's own statistics, far from the fresh running ones.
    let train = model.forward(&[x.shallow_clone()], Mode::Train).unwrap();
    assert!(!train.equal(&eval1));
    let after = running_mean(&store, "bn1.running_mean");
    assert!(
        !after.equal(&before),
        "Train must update running statistics"
    );
    let deepest = running_mean(&store, "layer4.1.bn2.running_mean");
    assert!(deepest.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn densenet121_modes_control_dropout_and_batch_norm() {
    ivado_sdk::tch::manual_seed(6);
    let (store, model) = build::<DenseNet121>(json!({"dropout_rate": 0.5})).unwrap();
    let x = Tensor::randn([2, 1, 32, 32], (Kind::Float, Device::Cpu)) * 3.0 + 2.0;
    let before = running_mean(&store, "features.norm0.running_mean");

    let eval1 = model.forward(&[x.shallow_clone()], Mode::Eval).unwrap();
    let eval2 = model.forward(&[x.shallow_clone()], Mode::Eval).unwrap();
    assert!(eval1.equal(&eval2), "Eval must be deterministic");

    // Monte-Carlo dropout: dropout on (two passes differ), batch-norm still on running statistics.
    let mc1 = model
        .forward(&[x.shallow_clone()], Mode::McDropout)
        .unwrap();
    let mc2 = model
        .forward(&[x.shallow_clone()], Mode::McDropout)
        .unwrap();
    assert!(!mc1.equal(&mc2), "McDropout must sample dropout masks");
    assert!(running_mean(&store, "features.norm0.running_mean").equal(&before));

    let train = model.forward(&[x.shallow_clone()], Mode::Train).unwrap();
    assert!(!train.equal(&eval1));
    let after = running_mean(&store, "features.norm0.running_mean");
    assert!(
        !after.equal(&before),
        "Train must update running statistics"
    );
    let after_eval = model.forward(&[x], Mode::Eval).unwrap();
    assert!(
        !after_eval.equal(&eval1),
        "Eval must use the updated statistics"
    );
}

#[test]
fn config_is_validated() {
    let unknown = build::<ResNet18>(json!({"dropout_rate": 0.1}))
        .err()
        .unwrap()
        .0;
    // ResNet has no dropout in ivadomed, so the key is unknown there.
    assert!(
        unknown.contains("unknown config key `dropout_rate`"),
        "{unknown}"
    );
    let one_class = build::<DenseNet121>(json!({"num_classes": 1}))
        .err()
        .unwrap()
        .0;
    assert!(one_class.contains("`num_classes`"), "{one_class}");
    let dropout = build::<DenseNet121>(json!({"dropout_rate": 1.0}))
        .err()
        .unwrap()
        .0;
    assert!(
        dropout.contains("`dropout_rate` must be in [0, 1)"),
        "{dropout}"
    );
}

#[test]
fn inputs_are_checked() {
    let (_, densenet) = build::<DenseNet121>(json!({})).unwrap();
    let smallest = Tensor::zeros([1, 1, 29, 29], (Kind::Float, Device::Cpu));
    assert_eq!(
        densenet.forward(&[smallest], Mode::Eval).unwrap().size(),
        [1, 1]
    );
    let too_small = Tensor::zeros([1, 1, 28, 40], (Kind::Float, Device::Cpu));
    let error = densenet.forward(&[too_small], Mode::Eval).err().unwrap().0;
    assert!(error.contains("at least 29x29"), "{error}");

    let (_, resnet) = build::<ResNet18>(json!({})).unwrap();
    let rgb = Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu));
    let error = resnet.forward(&[rgb], Mode::Eval).err().unwrap().0;
    assert!(error.contains("1 input channel"), "{error}");
}
