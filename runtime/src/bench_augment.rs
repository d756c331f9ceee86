//! `ivado bench augment`: samples per second of the full training augmentation pipeline (RandomAffine,
//! ElasticTransform, RandomGamma, AdditiveGaussianNoise, NormalizeInstance with the parameters of ivadomed's
//! default config and documentation examples), through the plugin boundary exactly as training applies it,
//! on 2D slices and 3D subvolumes of a generated phantom, with one worker thread and with several.
//!
//! Each case is timed twice: sample by sample (one plugin call per step and sample, as ivadomed's transforms
//! run), and batched (one plugin call per step for [`BENCH_BATCH`] samples, as training augments its batches;
//! each sample still draws from its own seed, so both modes do the same augmentations).
//!
//! Workers are threads that each augment whole samples or whole batches, as a data loader's workers do (ivadomed
//! uses PyTorch DataLoader workers); each runs libtorch with one intra-op thread, so the figures measure
//! sample-level parallelism rather than the splitting of one small tensor op over cores.
//!
//! Each row also gives the workers' thread CPU time per sample: when other processes take the cores, samples/s
//! falls but CPU time per sample does not, while contention between the workers themselves (a lock, a shared
//! pool) would raise it. A last section splits one worker's CPU time per sample between the steps.
use crate::data::axial_samples;
use crate::device;
use crate::phantom::{self, PhantomSpec};
use crate::pipeline::{derive_seed, Phase, Pipeline};
use crate::plugin::PluginRegistry;
use crate::preview::pipeline_from_specs;
use crate::volume::read_volume;
use anyhow::{anyhow, ensure, Context, Result};
use ivado_sdk::{Batch, Sample};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::time::Instant;
use tch::Device;

/// Seed of the phantom and of the per-sample draws; fixed so every run does the same work.
pub const BENCH_SEED: u64 = 20_240_601;
/// 2D slices: ivadomed's default `CenterCrop` size.
pub const SLICE_SHAPE: [i64; 3] = [1, 128, 128];
/// 3D subvolumes: the 48x48x16 patches `ivado bench arch` times the 3D networks on.
pub const SUBVOLUME_SHAPE: [i64; 4] = [1, 48, 48, 16];

/// The augmentation steps, in ivadomed's order: `RandomAffine` and `ElasticTransform` as in ivadomed's
/// `config.json` (on image and label, training only), `RandomGamma` and `AdditiveGaussianNoise` as in the
/// examples of ivadomed's configuration documentation, then `NormalizeInstance` on the image.
pub fn augmentation_specs() -> Vec<Value> {
    let spatial = json!(["im", "gt"]);
    let training = json!(["training"]);
    vec![
        json!({"name": "RandomAffine", "config": {
            "degrees": 5.0, "scale": [0.1, 0.1], "translate": [0.03, 0.03],
            "applied_to": spatial, "dataset_type": training}}),
        json!({"name": "ElasticTransform", "config": {
            "alpha_range": [28.0, 30.0], "sigma_range": [3.5, 4.5], "p": 0.1,
            "applied_to": spatial, "dataset_type": training}}),
        json!({"name": "RandomGamma", "config": {
            "log_gamma_range": [-3.0, 3.0], "p": 0.5,
            "applied_to": ["im"], "dataset_type": training}}),
        json!({"name": "AdditiveGaussianNoise", "config": {"mean": 0.0, "std": 0.02}}),
        json!({"name": "NormalizeInstance", "config": {"applied_to": ["im"]}}),
    ]
}

/// Samples per batch in the batched rows: ivadomed's default `batch_size` (its `config.json`).
pub const BENCH_BATCH: usize = 18;

/// How the samples go through the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AugmentMode {
    /// One sample at a time ([`Pipeline::apply_in`]).
    PerSample,
    /// Batches of this many samples ([`Pipeline::apply_batch`]).
    Batched(usize),
}

impl AugmentMode {
    pub fn label(self) -> String {
        match self {
            AugmentMode::PerSample => "per sample".into(),
            AugmentMode::Batched(size) => format!("batched ({size})"),
        }
    }
}

/// Samples of one kind to augment.
pub struct AugmentCase {
    /// Row label, e.g. `2D 1x128x128 + label`.
    pub name: String,
    pub samples: Vec<Sample>,
}

/// One timed row.
#[derive(Clone, Debug)]
pub struct AugmentTiming {
    pub case: String,
    pub mode: AugmentMode,
    pub threads: usize,
    pub samples: usize,
    /// Wall time of the whole row.
    pub seconds: f64,
    /// Mean time one worker spent on one sample.
    pub seconds_per_sample: f64,
    /// Mean thread CPU time of one sample (the workers' CPU time over the samples): unlike wall time, it does not
    /// grow when other processes take the cores, and it grows when the workers contend for something.
    pub cpu_seconds_per_sample: f64,
}

impl AugmentTiming {
    pub fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

fn shape_label(shape: &[i64]) -> String {
    shape
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join("x")
}

/// A copy of `sample` sharing its tensors' storage (tensors are `Send` but not `Sync`: each worker gets
/// its own handles).
fn shallow_copy(sample: &Sample) -> Sample {
    Sample {
        tensors: sample
            .tensors
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.shallow_clone()))
            .collect(),
        meta: sample.meta.clone(),
    }
}

/// The two cases, from one phantom subject (T2w, 128x128x16 voxels at 1x1x2 mm, with its cord label)
/// written to a scratch folder and read back as training reads images: the 16 axial slices, and the
/// centred 48x48x16 subvolume, on `device`.
pub fn phantom_cases(device: Device) -> Result<Vec<AugmentCase>> {
    let scratch = crate::scratch::ScratchDir::new("bench-augment")?;
    let spec = PhantomSpec {
        subjects: 1,
        shape: [
            SLICE_SHAPE[1] as usize,
            SLICE_SHAPE[2] as usize,
            SUBVOLUME_SHAPE[3] as usize,
        ],
        spacing: [1.0, 1.0, 2.0],
        contrasts: vec!["T2w".into()],
        noise: 0.05,
        seed: BENCH_SEED,
    };
    phantom::generate(scratch.path(), &spec).context("bench: generating the phantom")?;
    // The phantom's name for its only subject (numbered from 1, two digits at least).
    let id = "sub-ph01";
    let image = read_volume(
        &scratch
            .path()
            .join(id)
            .join("anat")
            .join(format!("{id}_T2w.nii.gz")),
    )?;
    let label = read_volume(
        &scratch
            .path()
            .join("derivatives/labels")
            .join(id)
            .join("anat")
            .join(format!("{id}_T2w_seg-manual.nii.gz")),
    )?;
    let on_device = |mut sample: Sample| -> Result<Sample> {
        for tensor in sample.tensors.values_mut() {
            *tensor = tensor.f_to_device(device)?;
        }
        Ok(sample)
    };
    let slices = axial_samples(&image, Some(&label))
        .into_iter()
        .map(on_device)
        .collect::<Result<Vec<_>>>()?;
    let crop = |data: &tch::Tensor| -> Result<tch::Tensor> {
        let mut cropped = data.shallow_clone();
        for axis in 0..2 {
            let size = cropped.size()[axis];
            let length = SUBVOLUME_SHAPE[axis + 1];
            cropped = cropped.f_narrow(axis as i64, (size - length) / 2, length)?;
        }
        Ok(cropped.f_contiguous()?.f_unsqueeze(0)?)
    };
    let mut subvolume = Sample::new();
    subvolume.insert("image", crop(&image.data)?);
    subvolume.insert("label", crop(&label.data)?);
    subvolume.set_spacing(&image.spacing);
    let subvolume = on_device(subvolume)?;
    let slice_shape = slices
        .first()
        .context("bench: no slices")?
        .get("image")?
        .size();
    ensure!(
        slice_shape == SLICE_SHAPE,
        "bench: phantom slices are {slice_shape:?}, not {SLICE_SHAPE:?}"
    );
    Ok(vec![
        AugmentCase {
            name: format!("2D {} + label", shape_label(&SLICE_SHAPE)),
            samples: slices,
        },
        AugmentCase {
            name: format!("3D {} + label", shape_label(&SUBVOLUME_SHAPE)),
            samples: vec![subvolume],
        },
    ])
}

/// CPU time the calling thread has used, in seconds: what a worker costs, whatever else the machine runs.
pub fn thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write into; the clock id is a constant the kernel knows.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if status != 0 {
        return 0.0;
    }
    now.tv_sec as f64 + now.tv_nsec as f64 * 1e-9
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Augments `count` samples (sample `i` is `samples[i % len]` with seed `derive_seed(seed, i)`) on
/// `threads` workers. Per sample, worker `w` takes every `threads`-th sample from `w`; batched, the samples are
/// cut into consecutive batches and worker `w` takes every `threads`-th batch from `w`. Returns the wall time, the
/// summed per-sample time and the workers' summed thread CPU time.
fn augment(
    pipeline: &Pipeline,
    samples: &[Sample],
    count: usize,
    threads: usize,
    mode: AugmentMode,
    seed: u64,
    device: Device,
) -> Result<(f64, f64, f64)> {
    let group = match mode {
        AugmentMode::PerSample => 1,
        AugmentMode::Batched(size) => size.max(1),
    };
    let groups: Vec<Vec<usize>> = (0..count)
        .collect::<Vec<_>>()
        .chunks(group)
        .map(<[usize]>::to_vec)
        .collect();
    let started = Instant::now();
    let (per_sample, cpu) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|worker| {
                let work: Vec<Vec<(u64, Sample)>> = groups
                    .iter()
                    .skip(worker)
                    .step_by(threads)
                    .map(|indices| {
                        indices
                            .iter()
                            .map(|&i| {
                                (
                                    derive_seed(seed, i as u64),
                                    shallow_copy(&samples[i % samples.len()]),
                                )
                            })
                            .collect()
                    })
                    .collect();
                scope.spawn(move || -> Result<(f64, f64)> {
                    tch::set_num_threads(1);
                    let cpu_start = thread_cpu_seconds();
                    let mut busy = 0.0;
                    for group in work {
                        let begun = Instant::now();
                        match mode {
                            AugmentMode::PerSample => {
                                for (sample_seed, sample) in group {
                                    let (augmented, _) =
                                        pipeline.apply_in(Phase::Training, sample, sample_seed)?;
                                    synchronize(device);
                                    drop(augmented);
                                }
                            }
                            AugmentMode::Batched(_) => {
                                let (seeds, group): (Vec<u64>, Vec<Sample>) =
                                    group.into_iter().unzip();
                                let (augmented, _) = pipeline.apply_batch(
                                    Phase::Training,
                                    Batch::stack(group)?,
                                    &seeds,
                                )?;
                                synchronize(device);
                                drop(augmented);
                            }
                        }
                        busy += begun.elapsed().as_secs_f64();
                    }
                    Ok((busy, thread_cpu_seconds() - cpu_start))
                })
            })
            .collect();
        workers
            .into_iter()
            .try_fold((0.0, 0.0), |(busy, cpu), worker| -> Result<(f64, f64)> {
                let (worker_busy, worker_cpu) = worker
                    .join()
                    .map_err(|_| anyhow!("an augmentation worker panicked"))??;
                Ok((busy + worker_busy, cpu + worker_cpu))
            })
    })?;
    synchronize(device);
    Ok((started.elapsed().as_secs_f64(), per_sample, cpu))
}

/// Times `steps` samples of `case` on `threads` workers, after `warmup` untimed samples on one worker.
pub fn time_case(
    pipeline: &Pipeline,
    case: &AugmentCase,
    threads: usize,
    mode: AugmentMode,
    warmup: usize,
    steps: usize,
    device: Device,
) -> Result<AugmentTiming> {
    ensure!(threads > 0, "bench: at least one thread");
    ensure!(
        !case.samples.is_empty(),
        "bench: {} has no samples",
        case.name
    );
    let steps = steps.max(1);
    // Warm-up draws come from another stream than the timed ones, which are the same for every row.
    augment(
        pipeline,
        &case.samples,
        warmup,
        1,
        mode,
        derive_seed(BENCH_SEED, u64::MAX),
        device,
    )
    .with_context(|| format!("bench: warming up on {}", case.name))?;
    let (seconds, busy, cpu) = augment(
        pipeline,
        &case.samples,
        steps,
        threads,
        mode,
        BENCH_SEED,
        device,
    )
    .with_context(|| format!("bench: augmenting {}", case.name))?;
    Ok(AugmentTiming {
        case: case.name.clone(),
        mode,
        threads,
        samples: steps,
        seconds,
        seconds_per_sample: busy / steps as f64,
        cpu_seconds_per_sample: cpu / steps as f64,
    })
}

/// Thread CPU time per sample of each step of `pipeline`, batched ([`BENCH_BATCH`] samples a batch) on one worker
/// thread with one libtorch thread, over `batches` batches of `case` after one untimed batch. A step's time
/// includes its plugin call (tensor hand-over, metadata and undo records).
pub fn profile_steps(
    pipeline: &Pipeline,
    case: &AugmentCase,
    batches: usize,
    device: Device,
) -> Result<Vec<f64>> {
    ensure!(
        !case.samples.is_empty(),
        "bench: {} has no samples",
        case.name
    );
    // Tensors are `Send` but not `Sync`: the worker gets its own handles, and stacks its batches itself.
    let sources: Vec<Sample> = case.samples.iter().map(shallow_copy).collect();
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<Vec<f64>> {
                tch::set_num_threads(1);
                let batch_of = |first: usize| -> Result<(Vec<u64>, Batch)> {
                    let (seeds, samples): (Vec<u64>, Vec<Sample>) = (first..first + BENCH_BATCH)
                        .map(|i| {
                            (
                                derive_seed(BENCH_SEED, i as u64),
                                shallow_copy(&sources[i % sources.len()]),
                            )
                        })
                        .unzip();
                    Ok((seeds, Batch::stack(samples)?))
                };
                let mut totals = vec![0.0; pipeline.steps.len()];
                for index in 0..=batches.max(1) {
                    let (seeds, batch) = batch_of(index * BENCH_BATCH)?;
                    let mut last = thread_cpu_seconds();
                    let mut spent = vec![0.0; totals.len()];
                    let (augmented, _) = pipeline.apply_batch_observed(
                        Phase::Training,
                        batch,
                        &seeds,
                        &mut |step| {
                            synchronize(device);
                            let now = thread_cpu_seconds();
                            spent[step] += now - last;
                            last = now;
                        },
                    )?;
                    drop(augmented);
                    // The first batch warms up.
                    if index > 0 {
                        totals.iter_mut().zip(spent).for_each(|(t, s)| *t += s);
                    }
                }
                let samples = (batches.max(1) * BENCH_BATCH) as f64;
                Ok(totals.into_iter().map(|t| t / samples).collect())
            })
            .join()
            .map_err(|_| anyhow!("the profiling worker panicked"))?
    })
}

/// The thread counts to time: 1 and `all` (once when they are equal).
pub fn thread_counts(all: usize) -> Vec<usize> {
    let mut counts = vec![1, all.max(1)];
    counts.dedup();
    counts
}

/// Runs the whole benchmark and returns the table, `bench arch` style.
pub fn run(
    registry: &PluginRegistry,
    device: Device,
    steps: usize,
    warmup: usize,
    threads: Option<usize>,
) -> Result<String> {
    let all = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    ensure!(all > 0, "--threads must be at least 1");
    let specs = augmentation_specs();
    let pipeline = pipeline_from_specs(registry, &specs)
        .context("bench: building the augmentation pipeline")?;
    let cases = phantom_cases(device)?;
    let names: Vec<&str> = specs.iter().filter_map(|s| s["name"].as_str()).collect();
    let mut table = String::new();
    writeln!(
        table,
        "augmentation ({}) on {}: {steps} samples per row after {warmup} warm-up; each worker thread \
         augments whole samples (per sample) or whole batches of {BENCH_BATCH} (batched) with 1 libtorch thread",
        names.join(" > "),
        device::describe(device),
    )?;
    writeln!(
        table,
        "{:<24} {:<14} {:>8} {:>12} {:>10} {:>14}",
        "case", "mode", "threads", "samples/s", "ms/sample", "CPU ms/sample"
    )?;
    for case in &cases {
        for mode in [AugmentMode::PerSample, AugmentMode::Batched(BENCH_BATCH)] {
            for &count in &thread_counts(all) {
                // Warm-up samples: at least one batch, so the batched rows start warm too.
                let warm = match mode {
                    AugmentMode::PerSample => warmup,
                    AugmentMode::Batched(size) => warmup.max(size),
                };
                let timing = time_case(&pipeline, case, count, mode, warm, steps, device)?;
                writeln!(
                    table,
                    "{:<24} {:<14} {:>8} {:>12.1} {:>10.3} {:>14.3}",
                    timing.case,
                    timing.mode.label(),
                    timing.threads,
                    timing.samples_per_second(),
                    timing.seconds_per_sample * 1e3,
                    timing.cpu_seconds_per_sample * 1e3
                )?;
            }
        }
    }
    writeln!(
        table,
        "thread CPU ms per sample by step, batched ({BENCH_BATCH}), 1 worker:"
    )?;
    for case in &cases {
        let batches = (steps / BENCH_BATCH).max(2);
        let per_step = profile_steps(&pipeline, case, batches, device)?;
        let parts: Vec<String> = names
            .iter()
            .zip(&per_step)
            .map(|(name, seconds)| format!("{name} {:.3}", seconds * 1e3))
            .collect();
        // Indented, so only the timed rows start with the case name.
        writeln!(
            table,
            "  {}: {} = {:.3}",
            case.name,
            parts.join(", "),
            per_step.iter().sum::<f64>() * 1e3
        )?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_counts_are_one_and_all() {
        assert_eq!(thread_counts(8), vec![1, 8]);
        assert_eq!(thread_counts(1), vec![1]);
        assert_eq!(thread_counts(0), vec![1]);
    }

    #[test]
    fn specs_are_ivadomeds_order_and_parameters() {
        let specs = augmentation_specs();
        let names: Vec<&str> = specs.iter().filter_map(|s| s["name"].as_str()).collect();
        assert_eq!(
            names,
            [
                "RandomAffine",
                "ElasticTransform",
                "RandomGamma",
                "AdditiveGaussianNoise",
                "NormalizeInstance"
            ]
        );
        // ivadomed/config/config.json: degrees 5, scale [0.1, 0.1], translate [0.03, 0.03]; elastic
        // alpha [28, 30], sigma [3.5, 4.5], p 0.1.
        assert_eq!(specs[0]["config"]["degrees"], json!(5.0));
        assert_eq!(specs[1]["config"]["p"], json!(0.1));
        assert_eq!(specs[3]["config"]["std"], json!(0.02));
    }

    #[test]
    fn phantom_cases_have_the_benchmarked_shapes() {
        let cases = phantom_cases(Device::Cpu).unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[0].samples.len(), 16, "one sample per axial slice");
        assert_eq!(
            cases[0].samples[0].get("label").unwrap().size(),
            SLICE_SHAPE
        );
        assert_eq!(
            cases[1].samples[0].get("label").unwrap().size(),
            SUBVOLUME_SHAPE
        );
        assert_eq!(cases[1].samples[0].spacing().unwrap(), vec![1.0, 1.0, 2.0]);
        // The centred subvolume holds the cord: its label has foreground.
        let foreground = cases[1].samples[0]
            .get("label")
            .unwrap()
            .sum(tch::Kind::Float)
            .double_value(&[]);
        assert!(foreground > 100.0, "{foreground} cord voxels");
    }
}
