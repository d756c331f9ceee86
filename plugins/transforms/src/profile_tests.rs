//! Per-step cost of the benchmarked augmentation pipeline (`ivado bench augment`), without the plugin boundary:
//! `cargo test --release -p ivado-plugin-transforms profile_ -- --ignored --nocapture`. Prints thread CPU time
//! per sample of each step on batches of 18 2D slices (1x128x128 + binary label) and 3D subvolumes
//! (1x48x48x16 + label). `IVADO_PROFILE_ROUNDS` sets the number of batches, `IVADO_PROFILE_BATCH` their size,
//! `IVADO_PROFILE_ONLY` a step name to run alone (for `perf`).
use crate::*;
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{self, Kind, Tensor};
use ivado_sdk::{Batch, Config, Sample, Transform};

fn build<T: Transform>(config: Value) -> T {
    let mut checked = Config::new(T::NAME, T::defaults(), config).unwrap();
    let transform = T::build(&mut checked).unwrap();
    checked.finish().unwrap();
    transform
}

/// `struct timespec` of 64-bit Linux.
#[repr(C)]
struct Timespec {
    seconds: i64,
    nanoseconds: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, now: *mut Timespec) -> i32;
}

/// CPU time of the calling thread (Linux's `CLOCK_THREAD_CPUTIME_ID`, 3), declared here rather than through the
/// `libc` crate so the plugin keeps its dependencies.
fn thread_cpu_seconds() -> f64 {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut now = Timespec {
        seconds: 0,
        nanoseconds: 0,
    };
    // SAFETY: `now` is a valid timespec to write into.
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut now) };
    now.seconds as f64 + now.nanoseconds as f64 * 1e-9
}

/// A phantom-like sample: a noisy disk image in [0, 1000] and its binary label.
fn sample(index: usize, shape: &[i64]) -> Sample {
    let mut full = vec![1];
    full.extend_from_slice(shape);
    tch::manual_seed(index as i64);
    let noise = Tensor::randn(full.as_slice(), (Kind::Float, tch::Device::Cpu));
    let mut coords = Vec::new();
    for (axis, &n) in shape.iter().enumerate() {
        let mut view = vec![1i64; shape.len() + 1];
        view[axis + 1] = n;
        let centre = (n as f64 - 1.0) / 2.0;
        coords.push(
            (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) - centre)
                .reshape(view.as_slice())
                .square(),
        );
    }
    let r2 = coords
        .into_iter()
        .reduce(|a, b| a + b)
        .unwrap()
        .expand(full.as_slice(), false);
    let label = r2.le(400.0).to_kind(Kind::Float);
    let image = &label * 800.0 + 100.0 + noise * 20.0;
    let mut s = Sample::new();
    s.insert("image", image.contiguous());
    s.insert("label", label.contiguous());
    s.set_spacing(&vec![1.0; shape.len()]);
    s
}

type Step = (&'static str, Box<dyn Fn(&mut Batch, &[u64])>);

fn steps() -> Vec<Step> {
    let affine: RandomAffine =
        build(json!({"degrees": 5.0, "scale": [0.1, 0.1], "translate": [0.03, 0.03]}));
    let elastic: ElasticTransform =
        build(json!({"alpha_range": [28.0, 30.0], "sigma_range": [3.5, 4.5], "p": 0.1}));
    let gamma: RandomGamma = build(json!({"log_gamma_range": [-3.0, 3.0], "p": 0.5}));
    let noise: AdditiveGaussianNoise = build(json!({"mean": 0.0, "std": 0.02}));
    vec![
        (
            "RandomAffine",
            Box::new(move |b, s| drop(affine.apply_batch(b, s).unwrap())),
        ),
        (
            "ElasticTransform",
            Box::new(move |b, s| drop(elastic.apply_batch(b, s).unwrap())),
        ),
        (
            "RandomGamma",
            Box::new(move |b, s| {
                // RandomGamma sees only the image, as in the benchmark's `applied_to`.
                let label = b.tensors.remove("label");
                drop(gamma.apply_batch(b, s).unwrap());
                b.tensors.extend(label.map(|l| ("label".to_string(), l)));
            }),
        ),
        (
            "AdditiveGaussianNoise",
            Box::new(move |b, s| drop(noise.apply_batch(b, s).unwrap())),
        ),
        (
            "NormalizeInstance",
            Box::new(|b, s| drop(NormalizeInstance.apply_batch(b, s).unwrap())),
        ),
    ]
}

fn profile(shape: &[i64]) {
    tch::set_num_threads(1);
    let rounds: usize = std::env::var("IVADO_PROFILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let only = std::env::var("IVADO_PROFILE_ONLY").ok();
    let size: usize = std::env::var("IVADO_PROFILE_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(18);
    let samples: Vec<Sample> = (0..16).map(|i| sample(i, shape)).collect();
    let steps = steps();
    let mut totals = vec![0.0; steps.len()];
    for round in 0..=rounds {
        let seeds: Vec<u64> = (0..size)
            .map(|i| (round * size + i) as u64 * 7919)
            .collect();
        let mut batch = Batch::stack(
            (0..size)
                .map(|i| {
                    let s = &samples[(round * size + i) % samples.len()];
                    Sample {
                        tensors: s
                            .tensors
                            .iter()
                            .map(|(n, t)| (n.clone(), t.shallow_clone()))
                            .collect(),
                        meta: s.meta.clone(),
                    }
                })
                .collect(),
        )
        .unwrap();
        for (index, (name, step)) in steps.iter().enumerate() {
            if only.as_deref().is_some_and(|o| o != *name) {
                continue;
            }
            let start = thread_cpu_seconds();
            step(&mut batch, &seeds);
            if round > 0 {
                totals[index] += thread_cpu_seconds() - start;
            }
        }
    }
    let per_sample: Vec<String> = steps
        .iter()
        .zip(&totals)
        .map(|((name, _), t)| format!("{name} {:.1}", t / (rounds * size) as f64 * 1e6))
        .collect();
    println!(
        "{shape:?} batches of {size}: us/sample {} = {:.1}",
        per_sample.join(", "),
        totals.iter().sum::<f64>() / (rounds * size) as f64 * 1e6
    );
}

#[test]
#[ignore = "profiling harness, prints timings"]
fn profile_bench_pipeline_2d() {
    profile(&[128, 128]);
}

#[test]
#[ignore = "profiling harness, prints timings"]
fn profile_bench_pipeline_3d() {
    profile(&[48, 48, 16]);
}

/// Rust `grid_sample` against libtorch's on a batch of 18 2-channel 3D (48x48x16) and 2D (128x128) inputs with a
/// slightly rotated grid: thread CPU us per sample.
#[test]
#[ignore = "profiling harness, prints timings"]
fn profile_grid_sample() {
    use crate::sampler::{grid_sample, Padding};
    tch::set_num_threads(1);
    for shape in [vec![48i64, 48, 16], vec![128, 128]] {
        let rank = shape.len();
        let mut input_shape = vec![18i64, 2];
        input_shape.extend_from_slice(&shape);
        let input = Tensor::rand(input_shape.as_slice(), (Kind::Float, tch::Device::Cpu));
        let theta: Vec<f32> = if rank == 3 {
            vec![
                0.99, -0.05, 0.0, 0.01, 0.05, 0.99, 0.0, -0.02, 0.0, 0.0, 1.0, 0.03,
            ]
        } else {
            vec![0.99, -0.05, 0.01, 0.05, 0.99, -0.02]
        };
        let theta = Tensor::from_slice(&theta)
            .reshape([1, rank as i64, rank as i64 + 1])
            .repeat([18, 1, 1]);
        let grid =
            Tensor::affine_grid_generator(&theta, input_shape.as_slice(), false).contiguous();
        let rounds = 20;
        let start = thread_cpu_seconds();
        for _ in 0..rounds {
            let _ = input.grid_sampler(&grid, 0, 0, false);
        }
        let torch = (thread_cpu_seconds() - start) / (rounds * 18) as f64 * 1e6;
        let (values, points) = (
            crate::cpu::f32_data(&input).unwrap(),
            crate::cpu::f32_data(&grid).unwrap(),
        );
        let start = thread_cpu_seconds();
        for _ in 0..rounds {
            let _ = match rank {
                2 => grid_sample::<2>(values, &input.size(), points, &grid.size(), Padding::Zeros),
                _ => grid_sample::<3>(values, &input.size(), points, &grid.size(), Padding::Zeros),
            }
            .unwrap();
        }
        let rust = (thread_cpu_seconds() - start) / (rounds * 18) as f64 * 1e6;
        println!("{shape:?}: libtorch {torch:.1} us/sample, Rust {rust:.1} us/sample");
    }
}
