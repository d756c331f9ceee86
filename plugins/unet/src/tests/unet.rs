use super::*;
use crate::{Unet2d, Unet3d};
use ivado_sdk::serde_json::json;
use ivado_sdk::tch::Reduction;

#[test]
fn unet2d_parameter_count_and_names_match_ivadomed() {
    // 4,837,249: sum(p.numel()) of ivadomed 2.9.10's Unet(in 1, out 1, depth 3, n_filters 64), 2D.
    let (vs, _) = build::<Unet2d>(json!({}));
    assert_eq!(trainable_count(&vs), 4_837_249);
    assert_eq!(
        shape_of(&vs, "encoder.down_path.3.conv1.weight"),
        [128, 64, 3, 3]
    );
    assert_eq!(
        // Level 2: 128 upsampled channels + the 64-channel skip.
        shape_of(&vs, "decoder.up_path.4.downconv.conv1.weight"),
        [64, 192, 3, 3]
    );
    assert_eq!(shape_of(&vs, "decoder.last_conv.weight"), [1, 64, 3, 3]);
    assert_eq!(
        shape_of(&vs, "encoder.conv_bottom.conv2_bn.running_var"),
        [256]
    );
}

#[test]
fn unet3d_parameter_count_matches_ivadomed() {
    // By hand from ivadomed's layer list, each Conv3d k=3 holding in*out*27 + out values and InstanceNorm3d
    // (affine=False) none: encoder 7,376 + 41,536 + 166,016, bottom 221,312, decoder 331,904 + 110,656 +
    // 27,680, last_conv 433; total 906,913 for Unet(in 1, out 1, depth 3, n_filters 16, is_2d=False).
    let (vs, _) = build::<Unet3d>(json!({"n_filters": 16}));
    assert_eq!(trainable_count(&vs), 906_913);
    assert_eq!(
        shape_of(&vs, "encoder.down_path.0.conv1.weight"),
        [16, 1, 3, 3, 3]
    );
    assert_eq!(
        shape_of(&vs, "decoder.up_path.2.downconv.conv1.weight"),
        [32, 96, 3, 3, 3]
    );
    assert!(
        running_stats(&vs).is_empty(),
        "InstanceNorm3d keeps no running statistics"
    );
}

#[test]
fn unet2d_forward_and_backward_on_two_sizes() {
    ivado_sdk::tch::manual_seed(1);
    let (vs, model) = build::<Unet2d>(json!({"n_filters": 4}));
    // 19x27 is not a multiple of 8: the decoder upsamples to each skip's own size.
    for shape in [[2, 1, 32, 32], [2, 1, 19, 27]] {
        let output = model.forward(&[randn(&shape)], Mode::Train).unwrap();
        assert_eq!(output.size(), shape);
        assert_finite_gradients(&vs, &output, |_| false);
    }
}

#[test]
fn unet2d_multiclass_drops_the_background() {
    let (_, model) = build::<Unet2d>(
        json!({"n_filters": 4, "depth": 2, "out_channels": 3, "final_activation": "softmax"}),
    );
    let output = model
        .forward(&[randn(&[2, 1, 16, 16])], Mode::Eval)
        .unwrap();
    assert_eq!(output.size(), [2, 2, 16, 16]);
    // Softmax over 3 channels with channel 0 removed: the 2 kept ones sum to less than 1 everywhere.
    let kept = output.sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    assert!(kept.max().double_value(&[]) < 1.0);
}

#[test]
fn unet3d_forward_and_backward_on_two_sizes() {
    ivado_sdk::tch::manual_seed(2);
    let (vs, model) = build::<Unet3d>(json!({"n_filters": 4}));
    for shape in [[2, 1, 16, 16, 16], [1, 1, 24, 16, 20]] {
        let output = model.forward(&[randn(&shape)], Mode::Train).unwrap();
        assert_eq!(output.size(), shape);
        assert_finite_gradients(&vs, &output, |_| false);
    }
    let (_, multiclass) = build::<Unet3d>(
        json!({"n_filters": 2, "depth": 2, "out_channels": 4, "final_activation": "softmax"}),
    );
    let output = multiclass
        .forward(&[randn(&[1, 1, 8, 12, 8])], Mode::Eval)
        .unwrap();
    assert_eq!(output.size(), [1, 3, 8, 12, 8]);
}

#[test]
fn unet2d_overfits_one_batch() {
    ivado_sdk::tch::manual_seed(3);
    let (vs, model) = build::<Unet2d>(json!({"n_filters": 8, "depth": 2, "dropout_rate": 0.0}));
    let target = blob(16, 2).repeat([2, 1, 1, 1]);
    let image = &target * 2.0 - 1.0 + randn(&[2, 1, 16, 16]);
    let (first, last) = overfit(&vs, 40, |mode| {
        dice_loss(
            &model.forward(&[image.shallow_clone()], mode).unwrap(),
            &target,
        )
    });
    assert!(last < 0.5 * first, "Dice loss went from {first} to {last}");
}

#[test]
fn unet3d_overfits_one_batch() {
    ivado_sdk::tch::manual_seed(4);
    let (vs, model) = build::<Unet3d>(json!({"n_filters": 4, "depth": 2, "dropout_rate": 0.0}));
    let target = blob(16, 3);
    let image = &target * 2.0 - 1.0 + randn(&[1, 1, 16, 16, 16]);
    let (first, last) = overfit(&vs, 40, |mode| {
        model
            .forward(&[image.shallow_clone()], mode)
            .unwrap()
            .binary_cross_entropy::<Tensor>(&target, None, Reduction::Mean)
    });
    assert!(last < 0.5 * first, "BCE went from {first} to {last}");
}

#[test]
fn unet2d_modes_control_dropout_and_batch_statistics() {
    ivado_sdk::tch::manual_seed(5);
    let (vs, model) = build::<Unet2d>(json!({"n_filters": 4, "depth": 2}));
    let x = randn(&[2, 1, 16, 16]);
    let run = |mode| model.forward(&[x.shallow_clone()], mode).unwrap();

    assert!(run(Mode::Eval).equal(&run(Mode::Eval)));
    assert!(max_abs_diff(&run(Mode::McDropout), &run(Mode::McDropout)) > 1e-6);

    let before = running_stats(&vs);
    assert_eq!(
        before.len(),
        2 * 2 * (2 + 1 + 2),
        "mean and var of 2 BNs per block"
    );
    let _ = run(Mode::McDropout);
    assert!(
        running_stats(&vs)
            .iter()
            .all(|(name, t)| t.equal(&before[name])),
        "MC dropout moved the running statistics"
    );
    let _ = run(Mode::Train);
    assert_train_moved_running_stats(&before, &running_stats(&vs));
}

#[test]
fn unet3d_modes_control_dropout() {
    ivado_sdk::tch::manual_seed(6);
    let (_, model) = build::<Unet3d>(json!({"n_filters": 2, "depth": 2}));
    let x = randn(&[1, 1, 8, 8, 8]);
    let run = |mode| model.forward(&[x.shallow_clone()], mode).unwrap();
    assert!(run(Mode::Eval).equal(&run(Mode::Eval)));
    assert!(max_abs_diff(&run(Mode::McDropout), &run(Mode::McDropout)) > 1e-6);
}

#[test]
fn config_and_input_errors_name_the_problem() {
    let error = build_error::<Unet3d>(json!({"detph": 2}));
    assert!(error.contains("unknown config key `detph`"), "{error}");
    let error = build_error::<Unet2d>(json!({"dropout_rate": 1.0}));
    assert!(
        error.contains("`dropout_rate` must be in [0, 1)"),
        "{error}"
    );
    let error = build_error::<Unet3d>(json!({"bn_momentum": -0.1}));
    assert!(error.contains("`bn_momentum`"), "{error}");
    let error = build_error::<Unet2d>(json!({"final_activation": "tanh"}));
    assert!(error.contains("`final_activation`"), "{error}");

    let (_, unet3d) = build::<Unet3d>(json!({"n_filters": 2, "depth": 1}));
    let error = unet3d
        .forward(&[randn(&[1, 1, 8, 8])], Mode::Eval)
        .unwrap_err()
        .0;
    assert!(error.contains("[N, C, D, H, W]"), "{error}");
    let error = unet3d
        .forward(&[randn(&[1, 2, 8, 8, 8])], Mode::Eval)
        .unwrap_err()
        .0;
    assert!(error.contains("built for 1 input channel"), "{error}");
}
