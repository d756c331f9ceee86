//! Batched application equals per-sample application: for each transform with a native `apply_batch`, a batch
//! of samples (different contents, spacings, binary and soft labels) with seeds `s_i` gives, sample by sample,
//! what `apply` gives each sample alone with `s_i`, in 2D and 3D.
use crate::*;
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{Kind, Tensor};
use ivado_sdk::{Batch, Config, Sample, Transform};

fn build<T: Transform>(config: Value) -> T {
    let mut checked = Config::new(T::NAME, T::defaults(), config).unwrap();
    let transform = T::build(&mut checked).unwrap();
    checked.finish().unwrap();
    transform
}

/// Sample `index` of a test batch on `shape` (2D or 3D): a 2-channel smooth image that differs per sample, a
/// disk label (binary, except sample 1 whose label is soft) and a per-sample spacing.
fn sample(index: usize, shape: &[i64]) -> Sample {
    let total: i64 = shape.iter().product();
    let offset = index as f64 * 1.7;
    let mut image = Vec::with_capacity(2 * total as usize);
    let mut label = Vec::with_capacity(total as usize);
    for channel in 0..2 {
        for flat in 0..total {
            let (mut rest, mut r2, mut sum) = (flat, 0.0, 0.0);
            for &n in shape.iter().rev() {
                let i = (rest % n) as f64;
                rest /= n;
                r2 += (i - (n as f64 - 1.0) / 2.0 - offset * 0.3).powi(2);
                sum += i;
            }
            image.push(((sum * 0.37 + offset).sin() + 0.5 * channel as f64 + 1.5) as f32);
            if channel == 0 {
                let inside = f32::from(u8::from(r2 <= 16.0));
                label.push(if index == 1 { 0.3 * inside } else { inside });
            }
        }
    }
    let mut full = vec![2];
    full.extend_from_slice(shape);
    let mut one = vec![1];
    one.extend_from_slice(shape);
    let mut sample = Sample::new();
    sample.insert("image", Tensor::from_slice(&image).reshape(full.as_slice()));
    sample.insert("label", Tensor::from_slice(&label).reshape(one.as_slice()));
    let spacing: Vec<f64> = (0..shape.len())
        .map(|k| 1.0 + 0.25 * ((index + k) % 3) as f64)
        .collect();
    sample.set_spacing(&spacing);
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

/// Largest absolute difference between two tensors.
fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Applies `transform` to `count` samples batched and one by one, compares images, labels and records, and
/// returns the batched records.
fn batched_equals_single<T: Transform>(transform: &T, shape: &[i64], count: usize) -> Vec<Value> {
    let samples: Vec<Sample> = (0..count).map(|i| sample(i, shape)).collect();
    let seeds: Vec<u64> = (0..count as u64).map(|i| 1000 + 7 * i).collect();
    let mut batch = Batch::stack(samples.iter().map(copy).collect()).unwrap();
    let records = transform.apply_batch(&mut batch, &seeds).unwrap();
    assert_eq!(records.len(), count);
    let outputs = batch.unstack().unwrap();
    for (i, ((input, output), (&seed, record))) in samples
        .iter()
        .zip(&outputs)
        .zip(seeds.iter().zip(&records))
        .enumerate()
    {
        let mut alone = copy(input);
        let single_record = transform.apply(&mut alone, seed).unwrap();
        assert_eq!(&single_record, record, "{} sample {i}: record", T::NAME);
        assert_eq!(alone.meta, output.meta, "{} sample {i}: metadata", T::NAME);
        for name in ["image", "label"] {
            let (a, b) = (alone.get(name).unwrap(), output.get(name).unwrap());
            assert_eq!(a.kind(), b.kind(), "{} sample {i} {name}: kind", T::NAME);
            let difference = max_difference(a, b);
            assert!(
                difference < 1e-5,
                "{} {shape:?} sample {i} {name}: batched differs by {difference}",
                T::NAME
            );
        }
    }
    records
}

fn shapes() -> [Vec<i64>; 2] {
    [vec![20, 18], vec![10, 12, 9]]
}

#[test]
fn spatial_transforms_batched_equal_per_sample() {
    for shape in shapes() {
        let affine: RandomAffine =
            build(json!({"degrees": 20, "translate": [0.1, 0.1], "scale": [0.2, 0.2]}));
        batched_equals_single(&affine, &shape, 5);
        // p = 0.5: some samples are deformed and others not, in one batch.
        let elastic: ElasticTransform =
            build(json!({"alpha_range": [20, 40], "sigma_range": [2, 3], "p": 0.5}));
        let records = batched_equals_single(&elastic, &shape, 6);
        let applied: Vec<bool> = records
            .iter()
            .map(|r| r["applied"].as_bool().unwrap())
            .collect();
        assert!(
            applied.contains(&true) && applied.contains(&false),
            "{applied:?}"
        );
        let records = batched_equals_single(&RandomReverse, &shape, 6);
        let patterns: std::collections::BTreeSet<String> =
            records.iter().map(|r| r["flipped"].to_string()).collect();
        assert!(patterns.len() > 1, "{patterns:?}");
    }
}

#[test]
fn intensity_transforms_batched_equal_per_sample() {
    for shape in shapes() {
        let shift: RandomShiftIntensity = build(json!({"shift_range": [-1, 1], "prob": 0.5}));
        batched_equals_single(&shift, &shape, 5);
        let noise: AdditiveGaussianNoise = build(json!({"mean": 0.1, "std": 0.2}));
        batched_equals_single(&noise, &shape, 5);
        let gamma: RandomGamma = build(json!({"log_gamma_range": [-1, 1], "p": 0.5}));
        batched_equals_single(&gamma, &shape, 5);
        let bias: RandomBiasField = build(json!({"coefficients": 0.5, "order": 3, "p": 0.5}));
        batched_equals_single(&bias, &shape, 5);
        let blur: RandomBlur = build(json!({"sigma_range": [0.5, 2], "p": 0.5}));
        batched_equals_single(&blur, &shape, 5);
        let clipping: HistogramClipping = build(json!({}));
        batched_equals_single(&clipping, &shape, 4);
        let records = batched_equals_single(&NormalizeInstance, &shape, 4);
        assert_eq!(records[0]["mean"].as_array().unwrap().len(), 2);
    }
}

// A sample's result does not depend on its batch: sample 2 with seed s gives the same output in a batch of 3 and
// at position 0 of a batch of 1 (checked above) and at position 1 of another batch of 2.
#[test]
fn a_sample_does_not_depend_on_its_batch_neighbours() {
    let shape = [16i64, 16];
    let affine: RandomAffine = build(json!({"degrees": 30, "scale": [0.2, 0.2]}));
    let run = |indices: &[usize], seeds: &[u64]| -> Vec<Sample> {
        let mut batch = Batch::stack(indices.iter().map(|&i| sample(i, &shape)).collect()).unwrap();
        affine.apply_batch(&mut batch, seeds).unwrap();
        batch.unstack().unwrap()
    };
    let a = run(&[0, 1, 2], &[5, 6, 7]);
    let b = run(&[3, 2], &[9, 7]);
    assert!(a[2].get("image").unwrap().equal(b[1].get("image").unwrap()));
    assert!(a[2].get("label").unwrap().equal(b[1].get("label").unwrap()));
}

// Labels stay binary through the batched spatial transforms; the soft label (sample 1) stays soft.
#[test]
fn batched_spatial_transforms_keep_binary_labels_binary() {
    for shape in shapes() {
        let affine: RandomAffine = build(json!({"degrees": 25, "scale": [0.15, 0.15]}));
        let elastic: ElasticTransform =
            build(json!({"alpha_range": [30, 40], "sigma_range": [2, 3], "p": 1.0}));
        let mut batch = Batch::stack((0..4).map(|i| sample(i, &shape)).collect()).unwrap();
        let seeds = [1u64, 2, 3, 4];
        affine.apply_batch(&mut batch, &seeds).unwrap();
        elastic.apply_batch(&mut batch, &seeds).unwrap();
        for (i, sample) in batch.unstack().unwrap().iter().enumerate() {
            let label = sample.get("label").unwrap();
            let binary = bool::try_from(label.eq(0.0).logical_or(&label.eq(1.0)).all()).unwrap();
            assert_eq!(binary, i != 1, "{shape:?} sample {i}");
            assert!(label.sum(Kind::Double).double_value(&[]) > 0.0);
        }
    }
}

#[test]
fn seeds_must_match_the_batch() {
    let mut batch = Batch::stack(vec![sample(0, &[8, 8]), sample(1, &[8, 8])]).unwrap();
    let error = RandomGamma::build(
        &mut Config::new(
            "RandomGamma",
            RandomGamma::defaults(),
            json!({"log_gamma_range": [0, 1]}),
        )
        .unwrap(),
    )
    .unwrap()
    .apply_batch(&mut batch, &[1])
    .unwrap_err()
    .0;
    assert!(error.contains("2 samples needs as many seeds"), "{error}");
}

/// `tensor` as a non-contiguous view with the same values: the transforms' libtorch path, where a contiguous
/// float32 CPU tensor takes their fused CPU path.
fn strided(tensor: &Tensor) -> Tensor {
    let last = tensor.dim() as i64 - 1;
    let view = tensor
        .transpose(last - 1, last)
        .contiguous()
        .transpose(last - 1, last);
    assert!(!view.is_contiguous() && view.equal(tensor));
    view
}

/// Applies `transform` to the same batch held contiguously (fused CPU path) and as strided views (libtorch path)
/// and returns the largest difference of each tensor, after checking the records agree.
fn fused_against_libtorch<T: Transform>(transform: &T, shape: &[i64]) -> Vec<(String, f64)> {
    let samples: Vec<Sample> = (0..4).map(|i| sample(i, shape)).collect();
    let seeds = [11u64, 12, 13, 14];
    let mut fused = Batch::stack(samples).unwrap();
    let mut torch = Batch {
        tensors: fused
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), strided(t)))
            .collect(),
        metas: fused.metas.clone(),
    };
    let fused_records = transform.apply_batch(&mut fused, &seeds).unwrap();
    let torch_records = transform.apply_batch(&mut torch, &seeds).unwrap();
    assert_eq!(fused_records.len(), torch_records.len());
    fused
        .tensors
        .iter()
        .map(|(name, t)| {
            let other = torch.get(name).unwrap();
            assert_eq!(t.kind(), other.kind(), "{} {name}", T::NAME);
            (name.clone(), max_difference(t, other))
        })
        .collect()
}

// The fused CPU loops compute what the libtorch ops compute, on the same draws.
#[test]
fn fused_cpu_paths_equal_libtorch_paths() {
    for shape in shapes() {
        // Affine: positions straight from the matrix against the float32 grid's normalised coordinates, which
        // round them to about 1e-5 voxel; image values change by less than 1e-4 (gradients below 0.5 per voxel),
        // and the thresholded labels (and the soft one of sample 1) agree.
        let affine: RandomAffine =
            build(json!({"degrees": 20, "translate": [0.1, 0.1], "scale": [0.2, 0.2]}));
        for (name, difference) in fused_against_libtorch(&affine, &shape) {
            assert!(difference < 1e-4, "affine {shape:?} {name}: {difference}");
        }
        let noise: AdditiveGaussianNoise = build(json!({"mean": 0.1, "std": 0.2}));
        for (name, difference) in fused_against_libtorch(&noise, &shape) {
            assert!(difference < 1e-6, "noise {shape:?} {name}: {difference}");
        }
        // log gamma in [-3, 3] (ivadomed's documented range): powers from 0.05 to 20.
        let gamma: RandomGamma = build(json!({"log_gamma_range": [-3, 3], "p": 0.5}));
        for (name, difference) in fused_against_libtorch(&gamma, &shape) {
            assert!(difference < 1e-6, "gamma {shape:?} {name}: {difference}");
        }
        for (name, difference) in fused_against_libtorch(&NormalizeInstance, &shape) {
            assert!(
                difference < 1e-5,
                "normalize {shape:?} {name}: {difference}"
            );
        }
    }
}
