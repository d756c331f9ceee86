use super::*;
use ivado_sdk::tch::nn::OptimizerConfig;
use ivado_sdk::tch::{self, Device, Kind};

fn build(overrides: Value) -> (nn::VarStore, Modified3dUnet) {
    // The test harness already runs one test per core; libtorch's own thread pool on top oversubscribes the
    // cores and, on a loaded machine, makes these tiny convolutions ten times slower.
    tch::set_num_threads(1);
    let store = nn::VarStore::new(Device::Cpu);
    let mut config =
        Config::new(Modified3dUnet::NAME, Modified3dUnet::defaults(), overrides).unwrap();
    let network = Modified3dUnet::build(&mut config, store.root()).unwrap();
    config.finish().unwrap();
    (store, network)
}

fn build_error(overrides: Value) -> String {
    let store = nn::VarStore::new(Device::Cpu);
    let mut config = match Config::new(Modified3dUnet::NAME, Modified3dUnet::defaults(), overrides)
    {
        Ok(config) => config,
        Err(error) => return error.0,
    };
    match Modified3dUnet::build(&mut config, store.root()) {
        Ok(_) => config.finish().expect_err("config was accepted").0,
        Err(error) => error.0,
    }
}

fn parameter_count(store: &nn::VarStore) -> i64 {
    store
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

/// Trainable parameter names in creation order (tch keeps trainable tensors in creation order, names by map).
fn trainable_names(store: &nn::VarStore) -> Vec<String> {
    let named = store.variables();
    store
        .trainable_variables()
        .iter()
        .map(|parameter| {
            named
                .iter()
                .find(|(_, t)| t.data_ptr() == parameter.data_ptr())
                .map(|(name, _)| name.clone())
                .unwrap()
        })
        .collect()
}

fn image(shape: [i64; 5]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Every trainable parameter has a gradient that is finite and not all zero.
fn assert_gradients_reach_everything(store: &nn::VarStore) {
    for (name, tensor) in store.variables() {
        if !tensor.requires_grad() {
            continue;
        }
        let grad = tensor.grad();
        assert!(grad.defined(), "{name} has no gradient");
        assert!(
            bool::try_from(grad.isfinite().all()).unwrap(),
            "{name} has a non-finite gradient"
        );
        assert!(
            grad.abs().sum(Kind::Double).double_value(&[]) > 0.0,
            "{name} has an all-zero gradient"
        );
    }
}

#[test]
fn parameter_count_matches_ivadomed() {
    // ivadomed's Modified3DUNet(in_channel=1, out_channel=1, n_filters=16): 7,124,112 parameters.
    let (store, _) = build(json!({}));
    assert_eq!(parameter_count(&store), 7_124_112);
}

#[test]
fn parameter_count_with_attention_matches_the_layer_shapes() {
    // Attention adds to the 7,124,112 of the plain network (n_filters 16, so 16n = 256, 8n = 128):
    //   gating.conv1.0 (1x1x1 conv 256 -> 128, bias) 256*128 + 128 = 32,896; gating.conv1.1 (batch-norm 128)
    //   weight + bias 256: 33,152.
    //   attentionblock2 (in 32, gating 128, inter 32): W.0 32*32 + 32 = 1,056; W.1 2*32 = 64;
    //   theta (2x2x2, no bias) 32*32*8 = 8,192; phi 128*32 + 32 = 4,128; psi 32 + 1 = 33: 13,473.
    //   attentionblock3 (in 64, inter 64): 4,160 + 128 + 32,768 + 8,256 + 65 = 45,377.
    //   attentionblock4 (in 128, inter 128): 16,512 + 256 + 131,072 + 16,512 + 129 = 164,481.
    //   33,152 + 13,473 + 45,377 + 164,481 = 256,483, so 7,124,112 + 256,483 = 7,380,595.
    // Batch-norm running statistics are buffers, not parameters.
    let (store, _) = build(json!({"attention": true}));
    assert_eq!(parameter_count(&store), 7_380_595);
    assert_eq!(
        store.variables().len() - store.trainable_variables().len(),
        8,
        "4 batch-norms, each with running_mean and running_var"
    );
}

#[test]
fn parameter_names_and_order_mirror_ivadomed_state_dict() {
    // ivadomed's state_dict keys for the default network, in registration order (its instance norms have no
    // affine parameters and no running statistics, so only convolution weights appear).
    let mut expected = vec![
        "conv3d_c1_1.weight".to_string(),
        "conv3d_c1_2.weight".into(),
        "lrelu_conv_c1.1.weight".into(),
    ];
    for level in 2..=5 {
        expected.push(format!("conv3d_c{level}.weight"));
        expected.push(format!("norm_lrelu_conv_c{level}.2.weight"));
    }
    expected.push("norm_lrelu_upscale_conv_norm_lrelu_l0.3.weight".into());
    expected.push("conv3d_l0.weight".into());
    for level in 1..=3 {
        expected.push(format!("conv_norm_lrelu_l{level}.0.weight"));
        expected.push(format!("conv3d_l{level}.weight"));
        expected.push(format!(
            "norm_lrelu_upscale_conv_norm_lrelu_l{level}.3.weight"
        ));
    }
    for name in [
        "conv_norm_lrelu_l4.0.weight",
        "conv3d_l4.weight",
        "ds2_1x1_conv3d.weight",
        "ds3_1x1_conv3d.weight",
    ] {
        expected.push(name.into());
    }
    let (store, _) = build(json!({"n_filters": 4}));
    assert_eq!(trainable_names(&store), expected);

    let (store, _) = build(json!({"n_filters": 4, "attention": true}));
    let names: Vec<String> = store.variables().into_keys().collect();
    for name in [
        "gating.conv1.0.weight",
        "gating.conv1.0.bias",
        "gating.conv1.1.running_var",
        "attentionblock2.W.0.bias",
        "attentionblock3.W.1.running_mean",
        "attentionblock4.theta.weight",
        "attentionblock4.phi.bias",
        "attentionblock2.psi.weight",
    ] {
        assert!(names.iter().any(|n| n == name), "missing {name}");
    }
    // theta has no bias in ivadomed.
    assert!(!names.iter().any(|n| n == "attentionblock2.theta.bias"));
}

#[test]
fn film_parameter_count_and_weight_sharing() {
    let plain = build(json!({"n_filters": 4})).0;
    let (store, _) = build(json!({
        "n_filters": 4,
        "n_metadata": 3,
        "film_layers": [1, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    }));
    // film_layer1 (4 channels) owns the shared weights: linear1 3*64 + 64 = 256, linear2 64*16 + 16 = 1,040,
    // linear3 16*(2*4) + 8 = 136: 1,432. film_layer10 (1 channel) reuses linear1/linear2 weights and adds
    // their biases 64 + 16 plus linear3 16*2 + 2 = 34: 114. Together 1,546.
    assert_eq!(parameter_count(&store), parameter_count(&plain) + 1_546);
    let names: Vec<String> = store.variables().into_keys().collect();
    assert!(names.contains(&"film_layer1.generator.linear1.weight".to_string()));
    assert!(names.contains(&"film_layer10.generator.linear1.bias".to_string()));
    assert!(!names.contains(&"film_layer10.generator.linear1.weight".to_string()));
    assert!(!names.contains(&"film_layer10.generator.linear2.weight".to_string()));
}

#[test]
fn forward_and_backward_on_two_input_sizes() {
    tch::manual_seed(0);
    // Single class: one sigmoid channel.
    let (store, network) = build(json!({"n_filters": 4}));
    let x = image([2, 1, 32, 32, 16]);
    let y = network.forward(&[x], Mode::Train).unwrap();
    assert_eq!(y.size(), [2, 1, 32, 32, 16]);
    assert!(y.min().double_value(&[]) > 0.0 && y.max().double_value(&[]) < 1.0);
    y.mean(Kind::Float).backward();
    assert_gradients_reach_everything(&store);

    // Two input channels, 3 outputs: ivadomed drops the background, leaving 2 channels.
    let (store, network) = build(json!({
        "n_filters": 4, "in_channels": 2, "out_channels": 3, "final_activation": "softmax",
    }));
    let x = image([1, 2, 16, 32, 48]);
    let y = network.forward(&[x], Mode::Train).unwrap();
    assert_eq!(y.size(), [1, 2, 16, 32, 48]);
    // Softmax over 3 channels with the background removed: the two kept sum to less than 1.
    assert!(
        y.sum_dim_intlist(1, false, Kind::Float)
            .max()
            .double_value(&[])
            < 1.0
    );
    (y * image([1, 2, 16, 32, 48])).mean(Kind::Float).backward();
    assert_gradients_reach_everything(&store);
}

/// 1 - ivadomed's soft Dice (smooth 1).
fn dice_loss(prediction: &Tensor, target: &Tensor) -> Tensor {
    let intersection = (prediction * target).sum(Kind::Float);
    let dice =
        (intersection * 2.0 + 1.0) / (prediction.sum(Kind::Float) + target.sum(Kind::Float) + 1.0);
    1.0 - dice
}

/// A ball of radius 7 in a [1, 1, 32, 32, 16] volume: about 8% of the voxels.
fn ball_target() -> Tensor {
    let axis =
        |n: i64, centre: f64| (Tensor::arange(n, (Kind::Float, Device::Cpu)) - centre).square();
    let d = axis(32, 15.5).view([32, 1, 1]);
    let h = axis(32, 15.5).view([1, 32, 1]);
    let w = axis(16, 7.5).view([1, 1, 16]);
    (d + h + w)
        .le(49.0)
        .to_kind(Kind::Float)
        .view([1, 1, 32, 32, 16])
}

#[test]
fn overfits_one_batch() {
    tch::manual_seed(1);
    let (store, network) = build(json!({"n_filters": 4, "dropout_rate": 0.0}));
    let target = ball_target();
    // A noisy image of the mask: learnable, but not by thresholding the input alone.
    let x = &target * 2.0 - 1.0 + image([1, 1, 32, 32, 16]) * 0.8;
    let eval_loss = || {
        tch::no_grad(|| {
            dice_loss(
                &network.forward(&[x.shallow_clone()], Mode::Eval).unwrap(),
                &target,
            )
        })
        .double_value(&[])
    };
    let initial = eval_loss();
    let mut optimizer = nn::Adam::default().build(&store, 1e-2).unwrap();
    for _ in 0..40 {
        let prediction = network.forward(&[x.shallow_clone()], Mode::Train).unwrap();
        optimizer.backward_step(&dice_loss(&prediction, &target));
    }
    let trained = eval_loss();
    assert!(
        trained < 0.5 * initial,
        "dice loss went from {initial} to {trained}"
    );
}

#[test]
fn attention_gates_forward_backward_and_use_batch_statistics_only_in_train() {
    tch::manual_seed(2);
    let (store, network) = build(json!({"n_filters": 4, "attention": true}));
    let running_mean =
        |store: &nn::VarStore| store.variables()["attentionblock4.W.1.running_mean"].copy();
    let x = image([2, 1, 32, 32, 16]);

    let before = running_mean(&store);
    let eval = network.forward(&[x.shallow_clone()], Mode::Eval).unwrap();
    assert_eq!(max_abs_diff(&before, &running_mean(&store)), 0.0);
    let mc = network
        .forward(&[x.shallow_clone()], Mode::McDropout)
        .unwrap();
    assert_eq!(max_abs_diff(&before, &running_mean(&store)), 0.0);
    assert!(max_abs_diff(&eval, &mc) > 0.0);

    let y = network.forward(&[x.shallow_clone()], Mode::Train).unwrap();
    assert_eq!(y.size(), [2, 1, 32, 32, 16]);
    assert!(max_abs_diff(&before, &running_mean(&store)) > 0.0);
    y.mean(Kind::Float).backward();
    assert_gradients_reach_everything(&store);

    // A 48-voxel axis: theta's stride-2 output and the gating signal differ in size, the resizes must follow.
    let y = network
        .forward(&[image([1, 1, 48, 32, 16])], Mode::Train)
        .unwrap();
    assert_eq!(y.size(), [1, 1, 48, 32, 16]);
}

#[test]
fn film_modulates_with_metadata() {
    tch::manual_seed(3);
    let (store, network) = build(json!({
        "n_filters": 4, "n_metadata": 3, "film_layers": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    }));
    let names: Vec<String> = store.variables().into_keys().collect();
    // Slot 5 splits ivadomed's bottom block around the FiLM layer, which renames the conv.
    assert!(names.contains(&"upscale_conv_norm_lrelu_0.1.weight".to_string()));
    assert!(!names.contains(&"norm_lrelu_upscale_conv_norm_lrelu_l0.3.weight".to_string()));

    let x = image([2, 1, 32, 32, 16]);
    let metadata = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0]).view([2, 3]);
    let other = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 0.0, 0.0, 1.0]).view([2, 3]);
    let first = network
        .forward(&[x.shallow_clone(), metadata.shallow_clone()], Mode::Eval)
        .unwrap();
    let again = network
        .forward(&[x.shallow_clone(), metadata.shallow_clone()], Mode::Eval)
        .unwrap();
    let changed = network
        .forward(&[x.shallow_clone(), other], Mode::Eval)
        .unwrap();
    assert_eq!(max_abs_diff(&first, &again), 0.0);
    assert!(max_abs_diff(&first, &changed) > 1e-6);

    let y = network
        .forward(&[x.shallow_clone(), metadata.shallow_clone()], Mode::Train)
        .unwrap();
    y.mean(Kind::Float).backward();
    assert_gradients_reach_everything(&store);

    let missing = network
        .forward(&[x.shallow_clone()], Mode::Eval)
        .unwrap_err()
        .0;
    assert!(
        missing.contains("inputs[1]") && missing.contains("[N, 3]"),
        "{missing}"
    );
    let wrong = network
        .forward(
            &[x, Tensor::zeros([2, 4], (Kind::Float, Device::Cpu))],
            Mode::Eval,
        )
        .unwrap_err()
        .0;
    assert!(
        wrong.contains("[2, 3]") && wrong.contains("[2, 4]"),
        "{wrong}"
    );
}

#[test]
fn mc_dropout_passes_differ_and_eval_passes_are_identical() {
    tch::manual_seed(4);
    let (_, network) = build(json!({"n_filters": 4}));
    let x = image([1, 1, 32, 32, 16]);
    let run = |mode| network.forward(&[x.shallow_clone()], mode).unwrap();
    assert_eq!(max_abs_diff(&run(Mode::Eval), &run(Mode::Eval)), 0.0);
    assert!(max_abs_diff(&run(Mode::McDropout), &run(Mode::McDropout)) > 1e-6);
}

#[test]
fn instance_norm_ignores_the_mode() {
    // ivadomed normalises with InstanceNorm3d (no running statistics): without dropout or attention, Train
    // and Eval compute the same function.
    tch::manual_seed(5);
    let (_, network) = build(json!({"n_filters": 4, "dropout_rate": 0.0}));
    let x = image([2, 1, 32, 32, 16]);
    let train = network.forward(&[x.shallow_clone()], Mode::Train).unwrap();
    let eval = network.forward(&[x], Mode::Eval).unwrap();
    assert!(max_abs_diff(&train, &eval) < 1e-6);
}

#[test]
fn final_activations_apply_to_the_same_logits() {
    let x = image([1, 1, 32, 32, 16]);
    // One set of weights copied into every variant (the seed is process-global and tests run in parallel, so
    // seeding cannot promise identical weights): only the activation differs.
    let run = |overrides: Value, weights: &nn::VarStore| {
        let (mut store, network) = build(overrides);
        store.copy(weights).unwrap();
        network.forward(&[x.shallow_clone()], Mode::Eval).unwrap()
    };
    let (weights, _) = build(json!({"n_filters": 4}));
    let logits = run(
        json!({"n_filters": 4, "final_activation": "none"}),
        &weights,
    );
    let sigmoid = run(json!({"n_filters": 4}), &weights);
    assert!(max_abs_diff(&sigmoid, &logits.sigmoid()) < 1e-6);
    let relu = run(
        json!({"n_filters": 4, "final_activation": "relu"}),
        &weights,
    );
    let expected = logits.relu() / logits.relu().max();
    assert!(max_abs_diff(&relu, &expected) < 1e-6);

    // Three outputs: the kept channels are classes 1 and 2 of a softmax over all three, so
    // log(p1) - log(p2) = logit1 - logit2, and they sum to less than 1.
    let (weights, _) = build(json!({"n_filters": 4, "out_channels": 3}));
    let logits = run(
        json!({"n_filters": 4, "out_channels": 3, "final_activation": "none"}),
        &weights,
    );
    let softmax = run(
        json!({"n_filters": 4, "out_channels": 3, "final_activation": "softmax"}),
        &weights,
    );
    assert_eq!(logits.size(), [1, 2, 32, 32, 16]);
    let log_ratio = softmax.select(1, 0).log() - softmax.select(1, 1).log();
    let expected = logits.select(1, 0) - logits.select(1, 1);
    assert!(max_abs_diff(&log_ratio, &expected) < 1e-4);
    assert!(
        softmax
            .sum_dim_intlist(1, false, Kind::Float)
            .max()
            .double_value(&[])
            < 1.0
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (_, network) = build(json!({"n_filters": 4}));
    let error = |x: Tensor| network.forward(&[x], Mode::Eval).unwrap_err().0;
    assert!(error(image([1, 1, 32, 32, 24])).contains("multiple of 16"));
    assert!(error(image([1, 1, 16, 16, 16])).contains("single voxel"));
    assert!(error(image([1, 2, 32, 32, 16])).contains("1 input channel"));
    assert!(
        error(Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu)))
            .contains("[N, C, D, H, W]")
    );
    assert!(error(Tensor::zeros(
        [1, 1, 32, 32, 16],
        (Kind::Double, Device::Cpu)
    ))
    .contains("Double"));
    assert!(network
        .forward(&[], Mode::Eval)
        .unwrap_err()
        .0
        .contains("inputs[0]"));
}

#[test]
fn bad_configs_are_clear_errors() {
    let cases = [
        (json!({"film_layers": [1, 0, 0]}), "hold 10 flags"),
        (
            json!({"film_layers": [2, 0, 0, 0, 0, 0, 0, 0, 0, 0]}),
            "0 or 1",
        ),
        (
            json!({"film_layers": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]}),
            "`n_metadata` is 0",
        ),
        (json!({"dropout_rate": 1.0}), "`dropout_rate`"),
        (json!({"bn_momentum": 2.0}), "`bn_momentum`"),
        (json!({"final_activation": "tanh"}), "`final_activation`"),
        (json!({"n_filter": 8}), "unknown config key `n_filter`"),
    ];
    for (overrides, expected) in cases {
        let error = build_error(overrides.clone());
        assert!(error.contains(expected), "{overrides}: {error}");
    }
}
