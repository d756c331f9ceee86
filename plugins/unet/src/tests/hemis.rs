use super::*;
use crate::hemis::{fuse, EncodedContrast};
use crate::HemisUnet;
use ivado_sdk::serde_json::json;

fn mask(rows: &[[f32; 3]]) -> Tensor {
    Tensor::from_slice(rows.concat().as_slice()).view([rows.len() as i64, 3])
}

#[test]
fn hemis_parameter_count_and_names_match_ivadomed() {
    // By hand from ivadomed's layers: each contrast's Encoder(in 1, depth 3, n_filters 64) is the Unet
    // encoder, 2,327,232 values; the hemis=True Decoder takes twice the channels from below and from each
    // skip (mean and variance maps): UpConv(1024, 256) 2,950,656 + UpConv(512, 128) 738,048 +
    // UpConv(256, 64) 184,704 + last_conv 577 = 3,873,985. 3 * 2,327,232 + 3,873,985 = 10,855,681.
    let (vs, _) = build::<HemisUnet>(json!({}));
    assert_eq!(trainable_count(&vs), 10_855_681);
    assert_eq!(
        shape_of(&vs, "Encoder_mod.Encoder_T1w.down_path.0.conv1.weight"),
        [64, 1, 3, 3]
    );
    assert_eq!(
        shape_of(&vs, "Encoder_mod.Encoder_T2star.conv_bottom.conv2.weight"),
        [256, 256, 3, 3]
    );
    assert_eq!(
        shape_of(&vs, "decoder.up_path.0.downconv.conv1.weight"),
        [256, 1024, 3, 3]
    );
    assert_eq!(
        shape_of(&vs, "decoder.up_path.2.downconv.conv1.weight"),
        [128, 512, 3, 3]
    );
    assert_eq!(shape_of(&vs, "decoder.last_conv.weight"), [1, 64, 3, 3]);
}

#[test]
fn abstraction_is_mean_and_unbiased_variance_over_available_contrasts() {
    // Three contrasts, three samples, one channel of one pixel, values chosen by hand:
    // sample 0 has contrasts 0 and 1 (1, 3): mean 2, variance ((1-2)² + (3-2)²) / 1 = 2;
    // sample 1 has contrast 0 only (5): mean 5, variance 0;
    // sample 2 has all three (1, 2, 6): mean 3, variance (4 + 1 + 9) / 2 = 7.
    let features = |rows: &[i64], values: &[f32]| EncodedContrast {
        rows: Tensor::from_slice(rows),
        count: rows.len() as i64,
        features: vec![Tensor::from_slice(values).view([rows.len() as i64, 1, 1, 1])],
    };
    let encoded = [
        features(&[0, 1, 2], &[1.0, 5.0, 1.0]),
        features(&[0, 2], &[3.0, 2.0]),
        features(&[2], &[6.0]),
    ];
    let fused = fuse(&encoded, 0, 3, Kind::Float).unwrap();
    let expected = Tensor::from_slice(&[2.0f32, 2.0, 5.0, 0.0, 3.0, 7.0]).view([3, 2, 1, 1]);
    assert!(
        max_abs_diff(&fused, &expected) < 1e-6,
        "{:?}",
        Vec::<f32>::try_from(&fused.flatten(0, -1)).unwrap()
    );
}

#[test]
fn hemis_forward_and_backward_on_two_sizes() {
    ivado_sdk::tch::manual_seed(21);
    let (vs, model) = build::<HemisUnet>(json!({"n_filters": 4}));
    let output = model
        .forward(&[randn(&[2, 3, 16, 16])], Mode::Train)
        .unwrap();
    assert_eq!(output.size(), [2, 1, 16, 16]);
    assert_finite_gradients(&vs, &output, |_| false);

    let availability = mask(&[[1., 0., 0.], [0., 1., 1.], [1., 1., 1.]]);
    let output = model
        .forward(&[randn(&[3, 3, 24, 20]), availability], Mode::Train)
        .unwrap();
    assert_eq!(output.size(), [3, 1, 24, 20]);
    assert_finite_gradients(&vs, &output, |_| false);
}

#[test]
fn hemis_trains_and_predicts_with_one_or_two_contrasts_missing() {
    ivado_sdk::tch::manual_seed(22);
    let (vs, model) = build::<HemisUnet>(json!({"n_filters": 4, "depth": 2}));
    let mut optimizer = nn::Adam::default().build(&vs, 1e-2).unwrap();
    let target = blob(16, 2).repeat([2, 1, 1, 1]);
    let cases = [
        ("one missing", [[1., 1., 0.], [0., 1., 1.]]),
        ("two missing", [[1., 0., 0.], [0., 0., 1.]]),
        // T2w and T2star absent from the whole batch: their encoders do not run.
        ("two missing in every sample", [[1., 0., 0.], [1., 0., 0.]]),
    ];
    for (case, rows) in cases {
        let inputs = [randn(&[2, 3, 16, 16]), mask(&rows)];
        let loss = dice_loss(&model.forward(&inputs, Mode::Train).unwrap(), &target);
        assert!(all_finite(&loss), "{case}: loss {loss:?}");
        optimizer.backward_step(&loss);
        assert!(
            vs.trainable_variables().iter().all(all_finite),
            "{case}: a parameter became non-finite"
        );
        let prediction = model.forward(&inputs, Mode::Eval).unwrap();
        assert_eq!(prediction.size(), [2, 1, 16, 16], "{case}");
        assert!(all_finite(&prediction), "{case}");
    }
}

#[test]
fn prediction_ignores_the_values_of_missing_contrasts() {
    ivado_sdk::tch::manual_seed(23);
    let (_, model) = build::<HemisUnet>(json!({"n_filters": 4, "depth": 2, "dropout_rate": 0.0}));
    // Sample 0 lacks T2w; sample 1 has only T2w.
    let availability = mask(&[[1., 0., 1.], [0., 1., 0.]]);
    let x = randn(&[2, 3, 16, 16]);
    let garbage = x.copy();
    ivado_sdk::tch::no_grad(|| {
        let _ = garbage.get(0).get(1).fill_(f64::NAN);
        garbage.get(1).get(0).copy_(&(randn(&[16, 16]) * 100.0));
        let _ = garbage.get(1).get(2).fill_(f64::INFINITY);
    });
    // Eval as asked; Train too, since each encoder sees only the samples that have its contrast.
    for mode in [Mode::Eval, Mode::Train] {
        let clean = model
            .forward(&[x.shallow_clone(), availability.shallow_clone()], mode)
            .unwrap();
        let dirty = model
            .forward(
                &[garbage.shallow_clone(), availability.shallow_clone()],
                mode,
            )
            .unwrap();
        assert!(all_finite(&dirty), "{mode:?}");
        assert!(clean.equal(&dirty), "{mode:?}: missing channels leaked in");
    }
    // And a contrast that is present does matter.
    let changed = x.copy();
    ivado_sdk::tch::no_grad(|| {
        let _ = changed.get(0).get(0).fill_(3.0);
    });
    let run = |x: &Tensor| {
        model
            .forward(
                &[x.shallow_clone(), availability.shallow_clone()],
                Mode::Eval,
            )
            .unwrap()
    };
    assert!(max_abs_diff(&run(&x).get(0), &run(&changed).get(0)) > 1e-6);
}

#[test]
fn no_mask_means_every_contrast_is_present() {
    ivado_sdk::tch::manual_seed(24);
    let (_, model) = build::<HemisUnet>(json!({"n_filters": 2, "depth": 1}));
    let x = randn(&[2, 3, 8, 8]);
    let run = |inputs: &[Tensor]| model.forward(inputs, Mode::Eval).unwrap();
    let without = run(&[x.shallow_clone()]);
    let ones = run(&[x.shallow_clone(), mask(&[[1., 1., 1.], [1., 1., 1.]])]);
    assert!(without.equal(&ones));
    // Any non-zero flag counts as present.
    let nonzero = run(&[x.shallow_clone(), mask(&[[0.3, 2., 1.], [1., 0.7, 1.]])]);
    assert!(without.equal(&nonzero));
    let missing = run(&[x, mask(&[[1., 0., 1.], [1., 1., 1.]])]);
    assert!(!without.get(0).equal(&missing.get(0)));
}

#[test]
fn hemis_overfits_one_batch() {
    ivado_sdk::tch::manual_seed(25);
    let (vs, model) = build::<HemisUnet>(json!({"n_filters": 4, "depth": 2, "dropout_rate": 0.0}));
    let target = blob(16, 2).repeat([2, 1, 1, 1]);
    let image = (&target * 2.0 - 1.0).repeat([1, 3, 1, 1]) + randn(&[2, 3, 16, 16]);
    let availability = mask(&[[1., 1., 1.], [1., 0., 1.]]);
    let (first, last) = overfit(&vs, 40, |mode| {
        let inputs = [image.shallow_clone(), availability.shallow_clone()];
        dice_loss(&model.forward(&inputs, mode).unwrap(), &target)
    });
    assert!(last < 0.5 * first, "Dice loss went from {first} to {last}");
}

#[test]
fn hemis_modes_control_dropout_and_batch_statistics() {
    ivado_sdk::tch::manual_seed(26);
    let (vs, model) = build::<HemisUnet>(json!({"n_filters": 4, "depth": 2}));
    let x = randn(&[2, 3, 16, 16]);
    let run = |mode| model.forward(&[x.shallow_clone()], mode).unwrap();
    assert!(run(Mode::Eval).equal(&run(Mode::Eval)));
    assert!(max_abs_diff(&run(Mode::McDropout), &run(Mode::McDropout)) > 1e-6);

    let before = running_stats(&vs);
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
fn hemis_rejects_bad_masks_inputs_and_contrast_lists() {
    let (_, model) = build::<HemisUnet>(json!({"n_filters": 2, "depth": 1}));
    let x = randn(&[2, 3, 8, 8]);
    let error = |inputs: &[Tensor]| model.forward(inputs, Mode::Eval).unwrap_err().0;

    let message = error(&[x.shallow_clone(), mask(&[[1., 1., 0.], [0., 0., 0.]])]);
    assert!(
        message.contains("sample 1 of the batch has none of the contrasts"),
        "{message}"
    );
    let message = error(&[x.shallow_clone(), mask(&[[1., 1., 0.]])]);
    assert!(message.contains("[N, n_contrasts] = [2, 3]"), "{message}");
    let message = error(&[x.shallow_clone(), mask(&[[1., f32::NAN, 0.], [1., 1., 1.]])]);
    assert!(
        message.contains("must be 1 (present) or 0 (missing), got NaN"),
        "{message}"
    );
    let message = error(&[randn(&[2, 2, 8, 8])]);
    assert!(message.contains("built for 3 input channel"), "{message}");

    let message = build_error::<HemisUnet>(json!({"contrasts": ["T1w", "T1w"]}));
    assert!(message.contains("names \"T1w\" twice"), "{message}");
    let message = build_error::<HemisUnet>(json!({"contrasts": ["acq.T1w"]}));
    assert!(message.contains("no '.'"), "{message}");
    let message = build_error::<HemisUnet>(json!({"contrasts": []}));
    assert!(message.contains("at least one contrast"), "{message}");
    let message = build_error::<HemisUnet>(json!({"in_channels": 3}));
    assert!(
        message.contains("unknown config key `in_channels`"),
        "{message}"
    );
}
