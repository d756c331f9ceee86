use super::*;
use crate::{FilmedUnet, Unet2d};
use ivado_sdk::serde_json::json;

/// The FiLM layers after the first one use the first one's `linear2.weight` (ivadomed's weight sharing),
/// so their own get no gradient. `first` is the path of the first FiLM layer switched on.
fn shared_away(first: &str) -> impl Fn(&str) -> bool + '_ {
    move |name: &str| name.ends_with("generator.linear2.weight") && !name.starts_with(first)
}

#[test]
fn film_unet_parameter_count_and_names_match_ivadomed() {
    // ivadomed's Unet(depth 3, n_filters 64) has 4,837,249 values. Each FiLMlayer(n_metadata 5, C) adds a
    // generator Linear(5, 64) + Linear(64, 16) + Linear(16, 2C) = 384 + 1,040 + 34C values. With all 8 on,
    // C = 64, 128, 256 (encoder), 256 (bottom), 256, 128, 64 (decoder), 1 (after last_conv, out_channel 1):
    // 8 * 1,424 + 34 * 1,153 = 50,594, so 4,887,843 in all.
    let (vs, _) =
        build::<FilmedUnet>(json!({"n_metadata": 5, "film_layers": [1, 1, 1, 1, 1, 1, 1, 1]}));
    assert_eq!(trainable_count(&vs), 4_887_843);
    assert_eq!(
        shape_of(&vs, "encoder.down_path.1.generator.linear1.weight"),
        [64, 5]
    );
    assert_eq!(
        shape_of(&vs, "encoder.film_bottom.generator.linear3.weight"),
        [512, 16]
    );
    assert_eq!(
        shape_of(&vs, "decoder.up_path.1.generator.linear3.weight"),
        [512, 16]
    );
    assert_eq!(
        shape_of(&vs, "decoder.up_path.5.generator.linear2.weight"),
        [16, 64]
    );
    assert_eq!(
        shape_of(&vs, "decoder.last_film.generator.linear3.weight"),
        [2, 16]
    );

    // With every FiLM layer off it is exactly ivadomed's Unet.
    let (vs, _) =
        build::<FilmedUnet>(json!({"n_metadata": 5, "film_layers": [0, 0, 0, 0, 0, 0, 0, 0]}));
    assert_eq!(trainable_count(&vs), 4_837_249);
}

#[test]
fn film_unet_forward_and_backward_on_two_sizes() {
    ivado_sdk::tch::manual_seed(11);
    let (vs, model) = build::<FilmedUnet>(
        json!({"n_filters": 4, "n_metadata": 3, "film_layers": [1, 1, 1, 1, 1, 1, 1, 1]}),
    );
    for shape in [[2, 1, 16, 16], [2, 1, 24, 20]] {
        let output = model
            .forward(&[randn(&shape), randn(&[2, 3])], Mode::Train)
            .unwrap();
        assert_eq!(output.size(), shape);
        assert_finite_gradients(&vs, &output, shared_away("encoder.down_path.1."));
    }
}

#[test]
fn film_unet_3d_keeps_the_volume_shape() {
    ivado_sdk::tch::manual_seed(12);
    let (vs, model) = build::<FilmedUnet>(json!({
        "is_2d": false, "n_filters": 2, "depth": 2, "n_metadata": 2, "film_layers": [1, 1, 1, 1, 1, 1]
    }));
    let output = model
        .forward(&[randn(&[1, 1, 8, 12, 8]), randn(&[1, 2])], Mode::Train)
        .unwrap();
    assert_eq!(output.size(), [1, 1, 8, 12, 8]);
    assert_finite_gradients(&vs, &output, shared_away("encoder.down_path.1."));
}

#[test]
fn film_layers_share_the_first_hidden_weight_as_ivadomed() {
    ivado_sdk::tch::manual_seed(13);
    // On: encoder level 1 (down_path.4) first, then decoder level 1 (up_path.3).
    let (vs, model) = build::<FilmedUnet>(json!({
        "n_filters": 4, "n_metadata": 2, "film_layers": [0, 1, 0, 0, 0, 1, 0, 0]
    }));
    let (x, metadata) = (randn(&[2, 1, 16, 16]), randn(&[2, 2]));
    let run = || {
        model
            .forward(&[x.shallow_clone(), metadata.shallow_clone()], Mode::Eval)
            .unwrap()
    };
    let first = "encoder.down_path.4.generator.linear2.weight";
    let later = "decoder.up_path.3.generator.linear2.weight";
    let variables = vs.variables();

    run().sum(Kind::Float).backward();
    assert!(variables[first].grad().defined());
    assert!(!variables[later].grad().defined(), "`{later}` is unused");
    assert!(variables["decoder.up_path.3.generator.linear2.bias"]
        .grad()
        .defined());

    // Changing the later layer's own hidden weight changes nothing; changing the shared one does.
    let reference = run();
    ivado_sdk::tch::no_grad(|| {
        let _ = variables[later].shallow_clone().fill_(5.0);
    });
    assert!(run().equal(&reference));
    ivado_sdk::tch::no_grad(|| {
        let _ = variables[first].shallow_clone().fill_(5.0);
    });
    assert!(max_abs_diff(&run(), &reference) > 1e-6);
}

#[test]
fn film_output_follows_the_metadata_only_when_a_film_layer_is_on() {
    ivado_sdk::tch::manual_seed(14);
    let x = randn(&[2, 1, 16, 16]);
    let (low, high) = (
        Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
        Tensor::full([2, 3], 3.0, (Kind::Float, Device::Cpu)),
    );
    let outputs = |model: &FilmedUnet| {
        let run = |metadata: &Tensor| {
            model
                .forward(&[x.shallow_clone(), metadata.shallow_clone()], Mode::Eval)
                .unwrap()
        };
        (run(&low), run(&high))
    };

    let (_, conditioned) = build::<FilmedUnet>(json!({
        "n_filters": 4, "n_metadata": 3, "film_layers": [0, 1, 0, 0, 0, 0, 0, 1]
    }));
    let (a, b) = outputs(&conditioned);
    assert!(max_abs_diff(&a, &b) > 1e-5, "the metadata had no effect");

    let (vs, unconditioned) = build::<FilmedUnet>(
        json!({"n_filters": 4, "n_metadata": 3, "film_layers": [0, 0, 0, 0, 0, 0, 0, 0]}),
    );
    let (a, b) = outputs(&unconditioned);
    assert!(a.equal(&b), "with FiLM off the metadata changed the output");
    // And it is then a plain U-Net: same parameter count as unet2d with the same settings.
    let (unet_vs, _) = build::<Unet2d>(json!({"n_filters": 4}));
    assert_eq!(trainable_count(&vs), trainable_count(&unet_vs));
}

#[test]
fn film_unet_overfits_one_batch() {
    ivado_sdk::tch::manual_seed(15);
    let (vs, model) = build::<FilmedUnet>(json!({
        "n_filters": 8, "depth": 2, "dropout_rate": 0.0, "n_metadata": 2, "film_layers": [1, 1, 1, 1, 1, 1]
    }));
    let target = blob(16, 2).repeat([2, 1, 1, 1]);
    let image = &target * 2.0 - 1.0 + randn(&[2, 1, 16, 16]);
    let metadata = Tensor::from_slice(&[0.0f32, 1.0, 1.0, 0.0]).view([2, 2]);
    let (first, last) = overfit(&vs, 40, |mode| {
        let inputs = [image.shallow_clone(), metadata.shallow_clone()];
        dice_loss(&model.forward(&inputs, mode).unwrap(), &target)
    });
    assert!(last < 0.5 * first, "Dice loss went from {first} to {last}");
}

#[test]
fn film_unet_modes_control_dropout_and_batch_statistics() {
    ivado_sdk::tch::manual_seed(16);
    let (vs, model) = build::<FilmedUnet>(json!({
        "n_filters": 4, "depth": 2, "n_metadata": 2, "film_layers": [1, 1, 1, 1, 1, 1]
    }));
    let inputs = [randn(&[2, 1, 16, 16]), randn(&[2, 2])];
    let run = |mode| model.forward(&inputs, mode).unwrap();
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
fn film_unet_rejects_missing_or_malformed_metadata() {
    let (_, model) = build::<FilmedUnet>(json!({"n_filters": 2, "depth": 1, "n_metadata": 3,
        "film_layers": [1, 0, 0, 0]}));
    let x = randn(&[2, 1, 8, 8]);
    let error = |inputs: &[Tensor]| model.forward(inputs, Mode::Eval).unwrap_err().0;

    let message = error(&[x.shallow_clone()]);
    assert!(message.contains("second input"), "{message}");
    let message = error(&[x.shallow_clone(), randn(&[2, 4])]);
    assert!(message.contains("[N, n_metadata] = [2, 3]"), "{message}");
    let message = error(&[x.shallow_clone(), randn(&[1, 3])]);
    assert!(message.contains("got shape [1, 3]"), "{message}");
    let message = error(&[x.shallow_clone(), randn(&[2, 3]).to_kind(Kind::Int64)]);
    assert!(message.contains("float"), "{message}");
}

#[test]
fn film_layers_config_is_checked_against_the_depth() {
    let error = build_error::<FilmedUnet>(json!({"depth": 2}));
    assert!(
        error.contains("`film_layers` must list 2 * depth + 2 = 6 flags"),
        "{error}"
    );
    let error = build_error::<FilmedUnet>(json!({"film_layers": [0, 2, 0, 0, 0, 0, 0, 0]}));
    assert!(
        error.contains("`film_layers` must hold only 0 or 1, got 2"),
        "{error}"
    );
    let error = build_error::<FilmedUnet>(json!({"n_metadata": 0}));
    assert!(error.contains("`n_metadata`"), "{error}");
}
