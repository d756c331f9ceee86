//! Augmentations depend on (seed, sample) only: the same draws with 1 or 4 libtorch threads, and whether
//! samples are augmented one after another or on 4 threads at once.
use ivado_runtime::pipeline::{derive_seed, Pipeline};
use ivado_runtime::plugin::{PluginRegistry, SearchPath};
use ivado_sdk::Sample;
use ivado_tests::artifact_dir;
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn augmentations() -> Pipeline {
    let registry = PluginRegistry::discover(&SearchPath {
        builtin: Some(artifact_dir()),
        extra: Vec::new(),
    });
    Pipeline::from_specs(
        &registry,
        &[
            json!({"name": "RandomAffine", "config": {"degrees": 20.0, "translate": [0.1, 0.1], "scale": [0.2, 0.2]}}),
            json!({"name": "ElasticTransform", "config": {"alpha_range": [20.0, 30.0], "sigma_range": [3.0, 4.0], "p": 1.0}}),
            json!({"name": "RandomGamma", "config": {"log_gamma_range": [-0.5, 0.5], "p": 1.0}}),
            json!({"name": "AdditiveGaussianNoise", "config": {"std": 0.1}}),
            json!({"name": "NormalizeInstance", "config": {}}),
        ],
    )
    .unwrap()
}

/// A smooth image with a disc label; its content does not depend on any RNG.
fn sample(index: i64) -> Sample {
    let coords = Tensor::arange(64, (Kind::Float, Device::Cpu));
    let (y, x) = (coords.view([64, 1]), coords.view([1, 64]));
    let centre = 24.0 + index as f64;
    let radius2 = (&x - centre).square() + (&y - 32.0).square();
    let mut sample = Sample::new();
    sample.insert("image", (&x * 0.01 + &y * 0.02).unsqueeze(0));
    sample.insert("label", radius2.le(100.0).to_kind(Kind::Float).unsqueeze(0));
    sample.set_spacing(&[1.0, 1.0]);
    sample
}

fn augment_all(pipeline: &Pipeline, seed: u64) -> Vec<(Tensor, Tensor)> {
    (0..8)
        .map(|i| {
            let (out, _) = pipeline
                .apply(sample(i), derive_seed(seed, i as u64))
                .unwrap();
            (
                out.get("image").unwrap().copy(),
                out.get("label").unwrap().copy(),
            )
        })
        .collect()
}

fn assert_identical(a: &[(Tensor, Tensor)], b: &[(Tensor, Tensor)], what: &str) {
    for (i, ((image_a, label_a), (image_b, label_b))) in a.iter().zip(b).enumerate() {
        assert!(image_a.equal(image_b), "{what}: image {i} differs");
        assert!(label_a.equal(label_b), "{what}: label {i} differs");
    }
}

#[test]
fn augmentations_do_not_depend_on_thread_counts() {
    let pipeline = augmentations();
    tch::set_num_threads(1);
    let one = augment_all(&pipeline, 42);
    tch::set_num_threads(4);
    let four = augment_all(&pipeline, 42);
    assert_identical(&one, &four, "1 vs 4 libtorch threads");

    // Four loader threads, each taking every fourth sample, in whatever order the scheduler runs them.
    let parallel: Vec<(usize, (Tensor, Tensor))> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|worker| {
                let pipeline = &pipeline;
                scope.spawn(move || {
                    (worker..8)
                        .step_by(4)
                        .map(|i| {
                            let (out, _) = pipeline
                                .apply(sample(i as i64), derive_seed(42, i as u64))
                                .unwrap();
                            (
                                i,
                                (
                                    out.get("image").unwrap().copy(),
                                    out.get("label").unwrap().copy(),
                                ),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut parallel = parallel;
    parallel.sort_by_key(|(i, _)| *i);
    let parallel: Vec<(Tensor, Tensor)> = parallel.into_iter().map(|(_, pair)| pair).collect();
    assert_identical(&one, &parallel, "sequential vs 4 worker threads");

    // And the draws are real: another seed changes every sample, and labels stay binary.
    let other = augment_all(&pipeline, 43);
    for (i, ((a, label), (b, _))) in one.iter().zip(&other).enumerate() {
        assert!(!a.equal(b), "sample {i}: seed changed nothing");
        let binary = label.eq(0.0).logical_or(&label.eq(1.0)).all();
        assert!(
            bool::try_from(binary).unwrap(),
            "sample {i}: label not binary"
        );
    }
}
