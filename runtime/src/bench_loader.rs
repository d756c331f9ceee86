//! `ivado bench loader`: slices per second of 2D training-slice loading through the loader and the volume
//! caches, cold (first epoch: decoding the NIfTI files) and cached (second epoch), with one worker and with
//! one per core, and the peak resident memory with the cache budget on and off, for two dataset sizes.
//!
//! The pipeline, per slice: Resample to 0.75 mm in-plane (cached per volume), CenterCrop 128 x 128, then as
//! one batched augmentation RandomAffine (5 degrees, scale 0.1, translate 0.03), ElasticTransform (alpha
//! 28-30, sigma 3.5-4.5, p 0.1) and NormalizeInstance: ivadomed's reference pipeline, whose 230 slices/s the
//! report compares against.
//!
//! Each case runs in a child process (`--case`), so its peak RSS (`VmHWM`) is its own. A baseline child
//! only starts libtorch and the plugins; the report splits each case's peak RSS into that baseline, the
//! cache's own peak (its accounting) and the rest, the working set (decode buffers, batches in flight,
//! allocator slack). The dataset, a phantom of 256x256x64 voxels per subject, is generated once into a
//! folder named by its parameters under the data folder, and reused by later runs.
use crate::bids::{BidsEntry, BidsIndex, BidsQuery};
use crate::cache::{CacheOptions, CachedSlices};
use crate::loader::{cached_batches, LoaderOptions};
use crate::phantom::{self, PhantomSpec};
use crate::pipeline::{derive_seed, LivePipeline, Phase};
use crate::plugin::PluginRegistry;
use crate::preview::pipeline_from_specs;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

/// Seed of the phantom and of the draws.
pub const BENCH_SEED: u64 = 20_240_602;
/// Voxels per subject: 256x256 in-plane at 0.5 mm, 64 slices at 2 mm.
pub const SHAPE: [usize; 3] = [256, 256, 64];
const SPACING: [f64; 3] = [0.5, 0.5, 2.0];
/// ivadomed's reference when none is measured: 4.3 ms per 2D slice through this pipeline, 230 slices/s (the
/// issue's figure). scripts/ivadomed/loader_bench.py measures it; `--ivadomed` passes that in.
pub const IVADOMED_SLICES_PER_SECOND: f64 = 230.0;

/// The deterministic prefix cached per volume: ivadomed's default in-plane resampling (0.75 mm).
pub fn prefix_specs() -> Vec<Value> {
    vec![json!({"name": "Resample", "config": {"spacing": [0.75, 0.75]}})]
}

/// Run on every slice each time: the crop (cheap, so the cache holds the whole resampled slice).
pub fn rest_specs() -> Vec<Value> {
    vec![json!({"name": "CenterCrop", "config": {"size": [128, 128]}})]
}

/// Augmentation as in ivadomed's default `config.json`.
pub fn augment_specs() -> Vec<Value> {
    let spatial = json!(["im", "gt"]);
    vec![
        json!({"name": "RandomAffine", "config": {
            "degrees": 5.0, "scale": [0.1, 0.1], "translate": [0.03, 0.03], "applied_to": spatial}}),
        json!({"name": "ElasticTransform", "config": {
            "alpha_range": [28.0, 30.0], "sigma_range": [3.5, 4.5], "p": 0.1, "applied_to": spatial}}),
        json!({"name": "NormalizeInstance", "config": {"applied_to": ["im"]}}),
    ]
}

/// One measured configuration.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LoaderCase {
    pub subjects: usize,
    pub workers: usize,
    /// Memory budget of the volume cache in bytes; `None`: every volume stays in memory.
    pub budget: Option<usize>,
    /// Also keep prepared volumes on disk (a fresh folder per case), so the second epoch reads raw
    /// tensors for what the budget evicted.
    pub disk: bool,
    pub batch_size: usize,
    /// Volumes whose slices are shuffled together.
    pub window: usize,
}

/// What a case measured.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LoaderResult {
    pub case: LoaderCase,
    pub slices: usize,
    pub cold_slices_per_second: f64,
    pub cached_slices_per_second: f64,
    /// Slices per CPU-second of the process (user + system), which other load on the machine does not
    /// lower: the rate with one free core per CPU-second used.
    pub cold_slices_per_cpu_second: f64,
    pub cached_slices_per_cpu_second: f64,
    pub peak_rss_bytes: u64,
    pub cache_peak_bytes: usize,
    pub volumes_prepared: usize,
}

/// `VmHWM` of this process from `/proc/self/status`, in bytes.
pub fn peak_rss_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()?;
    Ok(kib * 1024)
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The phantom's folder under the data folder `root`, named by every parameter that shapes it, so a run with
/// other parameters never reuses it.
pub fn dataset_dir(root: &Path) -> PathBuf {
    root.join(format!(
        "phantom-{}x{}x{}-{}x{}x{}mm-seed{BENCH_SEED}-noise{NOISE}",
        SHAPE[0], SHAPE[1], SHAPE[2], SPACING[0], SPACING[1], SPACING[2]
    ))
}

/// Noise level of the phantom.
const NOISE: f64 = 0.05;

/// Generates the phantom under [`dataset_dir`] unless one of at least `subjects` subjects is already there.
pub fn ensure_dataset(root: &Path, subjects: usize) -> Result<()> {
    let root = &dataset_dir(root);
    let done = root.join(".complete");
    let have: Option<usize> = std::fs::read_to_string(&done)
        .ok()
        .and_then(|text| text.trim().parse().ok());
    if have.is_some_and(|have| have >= subjects) {
        return Ok(());
    }
    let started = Instant::now();
    eprintln!(
        "generating {subjects} phantom subjects of {SHAPE:?} in {} (once)...",
        root.display()
    );
    phantom::generate(
        root,
        &PhantomSpec {
            subjects,
            shape: SHAPE,
            spacing: SPACING,
            contrasts: vec!["T2w".into()],
            noise: NOISE,
            seed: BENCH_SEED,
        },
    )?;
    std::fs::write(&done, subjects.to_string())?;
    eprintln!("generated in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn first_subjects(root: &Path, subjects: usize) -> Result<Vec<BidsEntry>> {
    let root = &dataset_dir(root);
    let query = BidsQuery {
        target_suffix: "_seg-manual",
        contrasts: None,
    };
    let mut entries = BidsIndex::scan(root, &query)?.entries;
    entries.sort_by(|a, b| a.subject.cmp(&b.subject));
    entries.truncate(subjects);
    if entries.len() < subjects {
        bail!("{} holds only {} subjects", root.display(), entries.len());
    }
    Ok(entries)
}

/// Runs one case in this process: two epochs over every slice, the consumer dropping each batch.
pub fn run_case(registry: &PluginRegistry, data: &Path, case: &LoaderCase) -> Result<LoaderResult> {
    if case.subjects == 0 {
        // The baseline: libtorch and the plugins started (one small op), nothing loaded.
        crate::allocator::for_loading();
        let _ = tch::Tensor::ones([16], (tch::Kind::Float, Device::Cpu)).sum(tch::Kind::Float);
        return Ok(LoaderResult {
            case: case.clone(),
            slices: 0,
            cold_slices_per_second: 0.0,
            cached_slices_per_second: 0.0,
            cold_slices_per_cpu_second: 0.0,
            cached_slices_per_cpu_second: 0.0,
            peak_rss_bytes: peak_rss_bytes()?,
            cache_peak_bytes: 0,
            volumes_prepared: 0,
        });
    }
    let entries = first_subjects(data, case.subjects)?;
    let disk = case.disk.then(|| {
        std::env::temp_dir().join(format!("ivado-bench-loader-cache-{}", std::process::id()))
    });
    let set = std::sync::Arc::new(CachedSlices::new(
        entries,
        pipeline_from_specs(registry, &prefix_specs())?,
        pipeline_from_specs(registry, &rest_specs())?,
        Phase::Training,
        &CacheOptions {
            memory_budget: case.budget.unwrap_or(usize::MAX),
            disk: disk.clone(),
        },
    )?);
    let augment = LivePipeline::new(pipeline_from_specs(registry, &augment_specs())?);
    let mut rates = Vec::new();
    let mut cpu_rates = Vec::new();
    for epoch in 1..=2u64 {
        let order = set.window_order(derive_seed(BENCH_SEED, epoch), case.window);
        let batches = order.chunks(case.batch_size).map(<[i64]>::to_vec).collect();
        let started = Instant::now();
        let cpu_started = cpu_seconds();
        let loader = cached_batches(
            std::sync::Arc::clone(&set),
            Some(augment.clone()),
            batches,
            BENCH_SEED,
            epoch,
            Device::Cpu,
            LoaderOptions::new(case.workers),
        );
        for batch in loader {
            drop(batch?);
        }
        rates.push(set.len() as f64 / started.elapsed().as_secs_f64());
        cpu_rates.push(set.len() as f64 / (cpu_seconds() - cpu_started).max(1e-9));
    }
    let result = LoaderResult {
        case: case.clone(),
        slices: set.len(),
        cold_slices_per_second: rates[0],
        cached_slices_per_second: rates[1],
        cold_slices_per_cpu_second: cpu_rates[0],
        cached_slices_per_cpu_second: cpu_rates[1],
        peak_rss_bytes: peak_rss_bytes()?,
        cache_peak_bytes: set.memory().stats().peak_bytes,
        volumes_prepared: set.prepared(),
    };
    if let Some(disk) = disk {
        std::fs::remove_dir_all(disk).ok();
    }
    Ok(result)
}

/// Prefix of the line a child prints its result on.
const RESULT_LINE: &str = "bench-loader-result ";

/// The child process side of `--case`: runs it and prints the result line.
pub fn child(registry: &PluginRegistry, data: &Path, case_json: &str) -> Result<()> {
    tch::set_num_threads(1);
    let case: LoaderCase = serde_json::from_str(case_json)?;
    let result = run_case(registry, data, &case)?;
    println!("{RESULT_LINE}{}", serde_json::to_string(&result)?);
    Ok(())
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// Options of the whole bench.
#[derive(Clone, Debug)]
pub struct LoaderBench {
    pub data: PathBuf,
    pub subjects: usize,
    /// A second, larger dataset size for the memory comparison.
    pub more_subjects: usize,
    pub budget_mb: usize,
    pub batch_size: usize,
    pub window: usize,
    /// ivadomed's slices per second on this pipeline (one process), the reference of the ratio column.
    pub ivadomed_slices_per_second: f64,
}

/// Runs `case` in a child process of `exe` and reads its result line.
fn run_child(
    exe: &Path,
    global_args: &[String],
    data: &Path,
    case: &LoaderCase,
) -> Result<LoaderResult> {
    let output = std::process::Command::new(exe)
        .args(global_args)
        .args(["bench", "loader", "--data"])
        .arg(data)
        .args(["--case", &serde_json::to_string(case)?])
        .output()
        .context("running a bench case")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(line) = stdout.lines().find_map(|l| l.strip_prefix(RESULT_LINE)) else {
        bail!(
            "bench case {case:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    Ok(serde_json::from_str(line)?)
}

/// Runs every case in a child process of `exe` (this binary) and returns the report.
pub fn run(exe: &Path, global_args: &[String], bench: &LoaderBench) -> Result<String> {
    ensure_dataset(&bench.data, bench.subjects.max(bench.more_subjects))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let budget = bench.budget_mb * 1024 * 1024;
    let case = |subjects, workers, budget: Option<usize>| LoaderCase {
        subjects,
        workers,
        budget,
        disk: budget.is_some(),
        batch_size: bench.batch_size,
        window: bench.window,
    };
    let mut cases = Vec::new();
    for budget in [Some(budget), None] {
        for workers in [1, cores] {
            cases.push(case(bench.subjects, workers, budget));
        }
        cases.push(case(bench.more_subjects, cores, budget));
    }
    cases.dedup_by(|a, b| (a.subjects, a.workers, a.budget) == (b.subjects, b.workers, b.budget));
    let baseline = run_child(exe, global_args, &bench.data, &case(0, 1, None))?.peak_rss_bytes;
    let mut report = format!(
        "2D slice loading, per slice: Resample 0.75 mm (cached per volume) -> CenterCrop 128x128 -> RandomAffine\n\
         (5 deg, scale 0.1, translate 0.03) -> ElasticTransform (alpha 28-30, sigma 3.5-4.5, p 0.1) -> NormalizeInstance,\n\
         the last three batched; batches of {}, {SHAPE:?} phantom volumes, volume order shuffled then slices within\n\
         windows of {} volumes; each worker runs libtorch on 1 thread; {cores} cores. ivadomed: {} slices/s.\n\
         Rates per wall second, and per CPU-second of the case's process (what other load does not lower).\n\
         Peak RSS = baseline (libtorch + plugins, no data: {:.0} MiB) + cache peak (its own accounting) + working set.\n\
         {:>8} {:>7} {:>16} {:>10} {:>10} {:>12} {:>12} {:>10} {:>9} {:>9} {:>9}\n",
        bench.batch_size,
        bench.window,
        bench.ivadomed_slices_per_second,
        mib(baseline as f64),
        "subjects",
        "workers",
        "cache",
        "cold sl/s",
        "sl/CPU-s",
        "cached sl/s",
        "sl/CPU-s",
        "x ivadomed",
        "peak MiB",
        "cache MiB",
        "work MiB",
    );
    // Rows also go to stderr as they are measured: the whole bench takes minutes on a loaded machine.
    eprint!("{report}");
    let mut budgeted_peaks = Vec::new();
    for case in &cases {
        let result = run_child(exe, global_args, &bench.data, case)?;
        let cache = match case.budget {
            Some(budget) => format!("{} MiB + disk", budget / (1024 * 1024)),
            None => "unbounded".into(),
        };
        let working_set =
            result.peak_rss_bytes as f64 - baseline as f64 - result.cache_peak_bytes as f64;
        if case.budget.is_some() && case.workers == cores {
            budgeted_peaks.push((case.subjects, result.peak_rss_bytes));
        }
        let row = format!(
            "{:>8} {:>7} {:>16} {:>10.0} {:>10.0} {:>12.0} {:>12.0} {:>10.1} {:>9.0} {:>9.0} {:>9.0}\n",
            case.subjects,
            case.workers,
            cache,
            result.cold_slices_per_second,
            result.cold_slices_per_cpu_second,
            result.cached_slices_per_second,
            result.cached_slices_per_cpu_second,
            result.cached_slices_per_second / bench.ivadomed_slices_per_second,
            mib(result.peak_rss_bytes as f64),
            mib(result.cache_peak_bytes as f64),
            mib(working_set),
        );
        eprint!("{row}");
        report.push_str(&row);
    }
    if let [(few, few_peak), (many, many_peak)] = budgeted_peaks[..] {
        report.push_str(&format!(
            "With the {} MiB budget, peak RSS goes from {:.0} MiB ({few} subjects) to {:.0} MiB ({many} subjects): {:+.0} MiB.\n",
            bench.budget_mb,
            mib(few_peak as f64),
            mib(many_peak as f64),
            mib(many_peak as f64 - few_peak as f64),
        ));
    }
    Ok(report)
}
