//! Augmentations depend on (seed, sample) only: the same draws with 1 or 4 libtorch threads, whether samples
//! are augmented one after another or on 4 threads at once, and whether they go through the pipeline one by one
//! or batched (one plugin call per step for the whole batch).
use ivado_runtime::pipeline::{derive_seed, Phase, Pipeline, UndoRecords};
use ivado_runtime::plugin::{PluginRegistry, SearchPath};
use ivado_sdk::{Batch, Sample};
use ivado_tests::artifact_dir;
use serde_json::json;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn registry() -> PluginRegistry {
    PluginRegistry::discover(&SearchPath {
        builtin: Some(artifact_dir()),
        extra: Vec::new(),
    })
}

fn augmentations() -> Pipeline {
    let registry = registry();
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

/// Every batched random transform (and the deterministic ones training uses), with ivadomed's keyed options:
/// spatial steps on image and label, intensity steps on the image, one step that only runs at validation.
fn every_transform() -> Pipeline {
    Pipeline::from_specs(
        &registry(),
        &[
            json!({"name": "RandomReverse", "config": {"applied_to": ["im", "gt"]}}),
            json!({"name": "RandomAffine", "config": {"degrees": 20.0, "translate": [0.1, 0.1], "scale": [0.2, 0.2], "applied_to": ["im", "gt"]}}),
            json!({"name": "ElasticTransform", "config": {"alpha_range": [20.0, 30.0], "sigma_range": [2.0, 3.0], "p": 0.5, "applied_to": ["im", "gt"]}}),
            json!({"name": "HistogramClipping", "config": {"min_percentile": 2.0, "max_percentile": 98.0}}),
            json!({"name": "RandomShiftIntensity", "config": {"shift_range": [-0.2, 0.2], "prob": 0.5}}),
            json!({"name": "RandomBiasField", "config": {"coefficients": 0.3, "order": 2, "p": 0.5}}),
            json!({"name": "RandomBlur", "config": {"sigma_range": [0.5, 1.5], "p": 0.5}}),
            json!({"name": "RandomGamma", "config": {"log_gamma_range": [-0.5, 0.5], "p": 0.5, "applied_to": ["im"]}}),
            json!({"name": "AdditiveGaussianNoise", "config": {"std": 0.05}}),
            json!({"name": "NormalizeInstance", "config": {"applied_to": ["im"], "dataset_type": ["validation"]}}),
            json!({"name": "NormalizeInstance", "config": {"applied_to": ["im"]}}),
        ],
    )
    .unwrap()
}

/// A 3D sample `[1, 16, 14, 8]` at 1 x 1 x 2 mm: a smooth image and a ball label whose centre moves with `index`.
fn sample_3d(index: i64) -> Sample {
    let axis = |n: i64, view: [i64; 3]| Tensor::arange(n, (Kind::Float, Device::Cpu)).view(view);
    let (z, y, x) = (
        axis(16, [16, 1, 1]),
        axis(14, [1, 14, 1]),
        axis(8, [1, 1, 8]),
    );
    let radius2 =
        (&z - (6.0 + index as f64)).square() + (&y - 7.0).square() + (&x - 4.0).square() * 4.0;
    let mut sample = Sample::new();
    sample.insert(
        "image",
        (&z * 0.05 + &y * 0.03 + &x * 0.1 + 1.0).unsqueeze(0),
    );
    sample.insert("label", radius2.le(16.0).to_kind(Kind::Float).unsqueeze(0));
    sample.set_spacing(&[1.0, 1.0, 2.0]);
    sample
}

fn copy(sample: &Sample) -> Sample {
    Sample {
        tensors: sample
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.copy()))
            .collect(),
        meta: sample.meta.clone(),
    }
}

/// The pipeline applied to `samples` as one batch, and to each alone.
fn batched_and_alone(
    pipeline: &Pipeline,
    samples: &[Sample],
    seeds: &[u64],
) -> (Vec<Sample>, Vec<UndoRecords>, Vec<(Sample, UndoRecords)>) {
    let batch = Batch::stack(samples.iter().map(copy).collect()).unwrap();
    let (batch, records) = pipeline.apply_batch(Phase::Training, batch, seeds).unwrap();
    let alone = samples
        .iter()
        .zip(seeds)
        .map(|(sample, &seed)| {
            pipeline
                .apply_in(Phase::Training, copy(sample), seed)
                .unwrap()
        })
        .collect();
    (batch.unstack().unwrap(), records, alone)
}

fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

// Through the plugin boundary, a batch of samples with seeds s_i comes out as each sample alone with s_i: same
// undo records (hence the same draws), same image and label, in 2D and 3D.
#[test]
fn batched_pipeline_equals_per_sample_in_2d_and_3d() {
    let pipeline = every_transform();
    for (dimensions, samples) in [
        ("2D", (0..6).map(sample).collect::<Vec<_>>()),
        ("3D", (0..5).map(sample_3d).collect::<Vec<_>>()),
    ] {
        let seeds: Vec<u64> = (0..samples.len() as u64)
            .map(|i| derive_seed(7, i))
            .collect();
        let (batched, records, alone) = batched_and_alone(&pipeline, &samples, &seeds);
        let mut elastic_applied = Vec::new();
        for (i, ((out, record), (single, single_record))) in
            batched.iter().zip(&records).zip(&alone).enumerate()
        {
            assert_eq!(
                record, single_record,
                "{dimensions} sample {i}: undo records"
            );
            // The validation-only step did not run; every other step did.
            assert_eq!(record[9], None, "{dimensions} sample {i}");
            assert!(record
                .iter()
                .enumerate()
                .all(|(k, r)| k == 9 || r.is_some()));
            elastic_applied.push(record[2].as_ref().unwrap()["applied"] == Value::Bool(true));
            let image = max_difference(out.get("image").unwrap(), single.get("image").unwrap());
            assert!(
                image < 1e-4,
                "{dimensions} sample {i}: image differs by {image}"
            );
            assert!(
                out.get("label")
                    .unwrap()
                    .equal(single.get("label").unwrap()),
                "{dimensions} sample {i}: label differs"
            );
        }
        assert!(
            elastic_applied.contains(&true) && elastic_applied.contains(&false),
            "{dimensions}: the batch mixes deformed and untouched samples: {elastic_applied:?}"
        );
    }
}

// Same seeds, same batch, bit for bit, with 1 and 2 libtorch threads; and labels stay binary.
#[test]
fn batched_augmentation_is_deterministic_across_thread_counts() {
    let pipeline = every_transform();
    let run = |threads: i32| -> Vec<(Tensor, Tensor)> {
        tch::set_num_threads(threads);
        let mut outputs = Vec::new();
        for samples in [
            (0..6).map(sample).collect::<Vec<_>>(),
            (0..4).map(sample_3d).collect::<Vec<_>>(),
        ] {
            let seeds: Vec<u64> = (0..samples.len() as u64)
                .map(|i| derive_seed(3, i))
                .collect();
            let (batch, _) = pipeline
                .apply_batch(Phase::Training, Batch::stack(samples).unwrap(), &seeds)
                .unwrap();
            outputs.push((
                batch.get("image").unwrap().copy(),
                batch.get("label").unwrap().copy(),
            ));
        }
        outputs
    };
    let one = run(1);
    let two = run(2);
    assert_identical(&one, &two, "batched, 1 vs 2 libtorch threads");
    for (_, label) in &one {
        let binary = label.eq(0.0).logical_or(&label.eq(1.0)).all();
        assert!(bool::try_from(binary).unwrap(), "label not binary");
    }
}

// One draw per sample goes to image, label and roi alike in a batch too. With image, label and roi all the same
// disc: the roi comes out equal to the label, and the image thresholded at 0.5 matches the label with Dice >= 0.95
// (they differ only on the edge, because the masks are re-thresholded after each step and the image is not).
// Independent draws would shift them by several voxels (alpha 25-35 mm on a radius-10 disc), far below that.
#[test]
fn batched_spatial_steps_keep_labels_aligned() {
    let pipeline = Pipeline::from_specs(
        &registry(),
        &[
            json!({"name": "RandomAffine", "config": {"degrees": 30.0, "translate": [0.1, 0.1], "scale": [0.2, 0.2]}}),
            json!({"name": "ElasticTransform", "config": {"alpha_range": [25.0, 35.0], "sigma_range": [3.0, 4.0], "p": 1.0}}),
        ],
    )
    .unwrap();
    let samples: Vec<Sample> = (0..6)
        .map(|i| {
            let mut s = sample(i);
            let disc = s.get("label").unwrap().shallow_clone();
            s.insert("image", disc.copy());
            s.insert("roi", disc);
            s
        })
        .collect();
    let seeds: Vec<u64> = (0..6).map(|i| derive_seed(11, i)).collect();
    let (batch, _) = pipeline
        .apply_batch(Phase::Training, Batch::stack(samples).unwrap(), &seeds)
        .unwrap();
    for (i, out) in batch.unstack().unwrap().iter().enumerate() {
        let label = out.get("label").unwrap();
        let image = out.get("image").unwrap().ge(0.5).to_kind(Kind::Float);
        let overlap = (label * &image).sum(Kind::Double).double_value(&[]);
        let total = (label.sum(Kind::Double) + image.sum(Kind::Double)).double_value(&[]);
        let dice = 2.0 * overlap / total;
        assert!(dice >= 0.95, "sample {i}: Dice {dice}");
        assert!(
            out.get("roi").unwrap().equal(label),
            "sample {i}: roi and label differ"
        );
        assert!(total > 200.0, "sample {i}: the disc survived ({total})");
    }
}

// A Rhai script step runs sample by sample inside a batched pipeline, on what its `applied_to` selects, and the
// batch comes out as the samples alone would.
#[test]
fn script_steps_run_per_sample_inside_a_batch() {
    let double = "fn double(sample) {\n    sample.image = sample.image * 2;\n    sample\n}\n";
    let pipeline = Pipeline::from_specs(
        &registry(),
        &[
            json!({"name": "RandomAffine", "config": {"degrees": 10.0, "scale": [0.1, 0.1]}}),
            json!({"script": {"path": "double.rhai", "function": "double", "source": double}, "applied_to": ["im"]}),
        ],
    )
    .unwrap();
    let samples: Vec<Sample> = (0..4).map(sample).collect();
    let seeds: Vec<u64> = (0..4).map(|i| derive_seed(5, i)).collect();
    let (batched, records, alone) = batched_and_alone(&pipeline, &samples, &seeds);
    for (i, ((out, record), (single, single_record))) in
        batched.iter().zip(&records).zip(&alone).enumerate()
    {
        assert_eq!(record, single_record, "sample {i}");
        assert_eq!(record[1], Some(Value::Null), "sample {i}: the script ran");
        assert!(
            out.get("image")
                .unwrap()
                .equal(single.get("image").unwrap()),
            "sample {i}"
        );
        assert!(
            out.get("label")
                .unwrap()
                .equal(single.get("label").unwrap()),
            "sample {i}"
        );
    }
    // The script doubled the warped image: the batch's image is twice what the affine step alone gives.
    let affine_only = Pipeline::from_specs(&registry(), &pipeline.specs()[..1]).unwrap();
    let (warped, _) = affine_only
        .apply_batch(
            Phase::Training,
            Batch::stack(samples.iter().map(copy).collect()).unwrap(),
            &seeds,
        )
        .unwrap();
    let doubled = Batch::stack(batched).unwrap();
    let difference = max_difference(
        doubled.get("image").unwrap(),
        &(warped.get("image").unwrap() * 2.0),
    );
    assert!(difference < 1e-6, "{difference}");
}
