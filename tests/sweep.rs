//! `ivado run --param`, `ivado sweep` (parallel runs, resume, failures, Slurm files, aggregation) and
//! `ivado compare`, end to end with the built binary. The sweep script does not train: it writes a
//! `metrics.csv` and an `evaluation.csv` whose values are simple functions of its parameters, so every
//! aggregate below is known in closed form.
use ivado_tests::{artifact_dir, run_ivado};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn ivado(args: &[&str]) -> (bool, String, String) {
    run_ivado(args, "warn")
}

/// Best validation Dice at epoch 2 of 3 (so the best, not the last, epoch must be picked); per-image test
/// Dice of six subjects. Every value is a multiple of 2^-5, exact in binary, so sums and means are exact.
const SCRIPT: &str = r#"
let out = PARAMS.out;
let depth = PARAMS.depth ?? 2;
let seed = PARAMS.seed ?? 0;
let fast = if (PARAMS.lr ?? 0.001) > 0.005 { 1.0 } else { 0.0 };
if depth == 99 { throw "depth 99 is not supported"; }
let best = 0.5 + to_float(depth) * 0.0625 + to_float(seed) * 0.03125 + fast * 0.125;
let epochs = [];
for (offset, i) in [-0.25, 0.0, -0.125] {
    epochs.push(#{ epoch: i + 1, train_loss: 0.5, valid_loss: 1.0 - best - offset, valid_dice: best + offset });
}
write_csv(`${out}/metrics.csv`, epochs);
let images = [];
for (weight, i) in [0.0625, -0.03125, 0.125, 0.1875, 0.0, 0.09375] {
    let dice = 0.25 + to_float(depth) * 0.0625 + to_float(seed) * 0.03125 + fast * weight;
    images.push(#{ subject: `sub-0${i + 1}`, contrast: "T2w", dice: dice });
}
write_csv(`${out}/evaluation.csv`, images);
print(`wrote ${out}`);
"#;

/// The per-subject weights of the fast learning rate in SCRIPT, and their mean.
const WEIGHTS: [f64; 6] = [0.0625, -0.03125, 0.125, 0.1875, 0.0, 0.09375];
const CONFIGURATIONS: [&str; 4] = [
    "lr=0.001_depth=2",
    "lr=0.001_depth=3",
    "lr=0.01_depth=2",
    "lr=0.01_depth=3",
];

fn mean_weight() -> f64 {
    WEIGHTS.iter().sum::<f64>() / WEIGHTS.len() as f64
}

fn best_valid(fast: bool, depth: i64, seed: f64) -> f64 {
    0.5 + depth as f64 * 0.0625 + seed * 0.03125 + if fast { 0.125 } else { 0.0 }
}

fn mean_test(fast: bool, depth: i64, seed: f64) -> f64 {
    0.25 + depth as f64 * 0.0625 + seed * 0.03125 + if fast { mean_weight() } else { 0.0 }
}

/// The (fast, depth) of a configuration name.
fn configuration(id: &str) -> (bool, i64) {
    (
        id.starts_with("lr=0.01_"),
        id[id.len() - 1..].parse().unwrap(),
    )
}

fn write_sweep(dir: &Path, name: &str, body: &str) -> String {
    std::fs::write(dir.join("sweep_script.rhai"), SCRIPT).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

const GRID_SWEEP: &str = r#"{"script": "sweep_script.rhai", "out": "runs/grid",
    "grid": {"lr": [0.001, 0.01], "depth": [2, 3]}, "seeds": [1, 2], "parallel": 2}"#;

/// Rows of a CSV without quoted fields, keyed by header.
fn read_table(path: &Path) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|line| {
            header
                .iter()
                .map(|h| h.to_string())
                .zip(line.split(',').map(String::from))
                .collect()
        })
        .collect()
}

fn number(row: &BTreeMap<String, String>, column: &str) -> f64 {
    row[column]
        .parse()
        .unwrap_or_else(|_| panic!("{column}: {:?}", row[column]))
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < 1e-12,
        "{what}: {actual} vs {expected}"
    );
}

#[test]
fn run_binds_params_with_their_types() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("params.rhai");
    std::fs::write(
        &script,
        "print(`${type_of(PARAMS.lr)} ${type_of(PARAMS.depth)} ${type_of(PARAMS.flag)} \
         ${type_of(PARAMS.name)} ${PARAMS.sizes[1]} ${PARAMS.missing ?? 0.5} ${ARGS}`);\n",
    )
    .unwrap();
    let script = script.display().to_string();
    let (ok, stdout, stderr) = ivado(&[
        "run",
        "--param",
        "lr=0.01",
        "--param",
        "depth=3",
        &script,
        "--param",
        "flag=true",
        "--param",
        "name=adam",
        "--param",
        "sizes=[64, 32]",
        "extra",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "f64 i64 bool string 32 0.5 [\"extra\"]");

    // Without --param, PARAMS is an empty map and defaults apply.
    let defaults = dir.path().join("defaults.rhai");
    std::fs::write(
        &defaults,
        "print(`${PARAMS.len()} ${PARAMS.lr ?? 0.001}`);\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = ivado(&["run", &defaults.display().to_string()]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "0 0.001");

    let (ok, _, stderr) = ivado(&["run", "--param", "lr", &script]);
    assert!(!ok);
    assert!(stderr.contains("expected KEY=VALUE"), "{stderr}");
}

fn modified_times(out: &Path) -> BTreeMap<String, std::time::SystemTime> {
    let mut times = BTreeMap::new();
    for id in CONFIGURATIONS {
        for seed in [1, 2] {
            let log = out.join(id).join(format!("seed-{seed}")).join("log.txt");
            times.insert(
                format!("{id}/seed-{seed}"),
                std::fs::metadata(&log).unwrap().modified().unwrap(),
            );
        }
    }
    times
}

#[test]
fn grid_sweep_runs_in_parallel_aggregates_resumes_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let sweep_file = write_sweep(dir.path(), "grid.json", GRID_SWEEP);
    let out = dir.path().join("runs/grid");

    let (ok, stdout, stderr) = ivado(&["sweep", &sweep_file]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("8 runs (4 configurations x 2 seeds)"),
        "{stdout}"
    );
    assert!(stdout.contains("running 8 (2 in parallel)"), "{stdout}");
    for id in CONFIGURATIONS {
        for seed in [1, 2] {
            let run = out.join(id).join(format!("seed-{seed}"));
            assert!(run.join("done.json").is_file(), "{}", run.display());
            let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
            assert!(log.contains(&format!("wrote {}", run.display())), "{log}");
        }
    }
    let done: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("lr=0.01_depth=3/seed-2/done.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["params"]["lr"], 0.01);
    assert_eq!(done["params"]["depth"], 3);
    assert_eq!(done["params"]["seed"], 2);

    // sweep.csv: one row per run, configurations in grid order, seeds inside.
    let rows = read_table(&out.join("sweep.csv"));
    assert_eq!(rows.len(), 8);
    for (index, row) in rows.iter().enumerate() {
        let id = CONFIGURATIONS[index / 2];
        let seed = (index % 2 + 1) as f64;
        let (fast, depth) = configuration(id);
        assert_eq!(row["config"], id);
        assert_eq!(row["lr"], if fast { "0.01" } else { "0.001" });
        assert_eq!(row["depth"], depth.to_string());
        assert_eq!(row["seed"], (index % 2 + 1).to_string());
        assert_eq!(row["status"], "done");
        assert_eq!(row["best_epoch"], "2");
        assert_eq!(row["folder"], format!("{id}/seed-{}", index % 2 + 1));
        assert_close(
            number(row, "best_valid_dice"),
            best_valid(fast, depth, seed),
            "best_valid_dice",
        );
        assert_close(
            number(row, "test_dice"),
            mean_test(fast, depth, seed),
            "test_dice",
        );
    }

    // summary.csv: seeds 1 and 2 average to 1.5; two values 0.03125 apart have sample std 0.03125 / sqrt(2).
    let summary = read_table(&out.join("summary.csv"));
    assert_eq!(summary.len(), 4);
    let spread = 0.03125 / 2f64.sqrt();
    for (row, id) in summary.iter().zip(CONFIGURATIONS) {
        let (fast, depth) = configuration(id);
        assert_eq!(row["config"], id);
        assert_eq!(row["n"], "2");
        assert_eq!(row["test_n"], "2");
        assert_close(
            number(row, "best_valid_dice_mean"),
            best_valid(fast, depth, 1.5),
            "valid mean",
        );
        assert_close(number(row, "best_valid_dice_std"), spread, "valid std");
        assert_close(
            number(row, "test_dice_mean"),
            mean_test(fast, depth, 1.5),
            "test mean",
        );
        assert_close(number(row, "test_dice_std"), spread, "test std");
    }

    // The printed summary is sorted by mean validation Dice, best first.
    let position = |id: &str| {
        stdout
            .lines()
            .position(|line| line.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("{id} not in\n{stdout}"))
    };
    let printed: Vec<usize> = [
        "lr=0.01_depth=3",
        "lr=0.01_depth=2",
        "lr=0.001_depth=3",
        "lr=0.001_depth=2",
    ]
    .map(position)
    .to_vec();
    assert!(printed.windows(2).all(|w| w[0] < w[1]), "{stdout}");

    // Re-running skips complete runs: only the one whose marker is gone runs again.
    std::fs::remove_file(out.join("lr=0.01_depth=3/seed-2/done.json")).unwrap();
    let before = modified_times(&out);
    let (ok, stdout, stderr) = ivado(&["sweep", &sweep_file]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("7 already complete"), "{stdout}");
    assert!(stdout.contains("running 1 "), "{stdout}");
    assert!(
        stdout.contains("[1/1] lr=0.01_depth=3/seed-2: done"),
        "{stdout}"
    );
    let after = modified_times(&out);
    for (run, time) in &before {
        assert_eq!(
            after[run] != *time,
            run == "lr=0.01_depth=3/seed-2",
            "{run}: only the unmarked run writes its log again"
        );
    }
    assert_eq!(read_table(&out.join("sweep.csv")), rows);

    // Configuration folders: per-image Dice averaged over the seeds; B - A is WEIGHTS per subject.
    // scipy.stats.wilcoxon(WEIGHTS) -> W 1.0, p 0.125 (exact; the zero is dropped);
    // scipy.stats.ttest_rel(B, A) -> t 2.213594362117866, p 0.07775208077043501.
    let a = out.join("lr=0.001_depth=2").display().to_string();
    let b = out.join("lr=0.01_depth=2").display().to_string();
    let (ok, stdout, stderr) = ivado(&["compare", &a, &b]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("(2 runs)"), "{stdout}");
    assert!(
        stdout.contains("paired images: 6 (only in A: 0, only in B: 0, without a Dice: 0)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("mean difference (B - A): {:+.6}", mean_weight())),
        "{stdout}"
    );
    assert!(
        stdout.contains("W = 1, p = 0.125000 (exact; 5 non-zero differences)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("t = 2.213594, df = 5, p = 0.077752"),
        "{stdout}"
    );

    // Run folders: seed 2 against seed 1 adds 0.03125 to every difference, so the second becomes zero.
    // scipy: wilcoxon -> W 0.0, p 0.0625; ttest_rel -> t 3.16227766016838, p 0.025031015818452945.
    let a = out.join("lr=0.001_depth=3/seed-1").display().to_string();
    let b = out.join("lr=0.01_depth=3/seed-2").display().to_string();
    let (ok, stdout, stderr) = ivado(&["compare", &a, &b]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("(1 run)"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "mean difference (B - A): {:+.6}",
            mean_weight() + 0.03125
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("W = 0, p = 0.062500 (exact; 5 non-zero differences)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("t = 3.162278, df = 5, p = 0.025031"),
        "{stdout}"
    );

    let (ok, _, stderr) = ivado(&["compare", &out.display().to_string(), &b]);
    assert!(!ok);
    assert!(stderr.contains("has no evaluation.csv"), "{stderr}");
}

#[test]
fn a_failed_run_is_reported_and_the_others_complete() {
    let dir = tempfile::tempdir().unwrap();
    let sweep_file = write_sweep(
        dir.path(),
        "failing.json",
        r#"{"script": "sweep_script.rhai", "out": "runs/failing", "grid": {"depth": [99, 2]},
            "seeds": [5], "parallel": 2}"#,
    );
    let out = dir.path().join("runs/failing");
    let (ok, stdout, stderr) = ivado(&["sweep", &sweep_file]);
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains("depth=99/seed-5: FAILED (exit code 1)"),
        "{stdout}"
    );
    assert!(stdout.contains("depth 99 is not supported"), "{stdout}");
    assert!(stderr.contains("1 of 2 runs failed"), "{stderr}");
    assert!(!out.join("depth=99/seed-5/done.json").exists());
    assert!(out.join("depth=2/seed-5/done.json").is_file());
    let rows = read_table(&out.join("sweep.csv"));
    assert_eq!(rows[0]["status"], "failed");
    assert_eq!(rows[0]["best_valid_dice"], "");
    assert_eq!(rows[1]["status"], "done");
    assert_close(
        number(&rows[1], "best_valid_dice"),
        best_valid(false, 2, 5.0),
        "valid",
    );
    let summary = read_table(&out.join("summary.csv"));
    assert_eq!(summary[0]["n"], "0");
    assert_eq!(summary[1]["n"], "1");
    // One run: no standard deviation.
    assert_eq!(summary[1]["best_valid_dice_std"], "");
}

#[test]
fn slurm_mode_writes_a_job_array_and_collect_aggregates_what_ran() {
    let dir = tempfile::tempdir().unwrap();
    let sweep_file = write_sweep(dir.path(), "grid.json", GRID_SWEEP);
    let base = dir.path().to_path_buf();
    let out = base.join("runs/grid");

    let (ok, stdout, stderr) = ivado(&["sweep", &sweep_file, "--slurm"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("8 of 8 runs pending"), "{stdout}");
    assert!(
        stdout.contains(&format!("sbatch {}", out.join("sweep.sbatch").display())),
        "{stdout}"
    );
    // Nothing ran.
    assert!(!out.join(CONFIGURATIONS[0]).exists());

    let executable: PathBuf = artifact_dir().join("ivado").canonicalize().unwrap();
    let jobs = std::fs::read_to_string(out.join("jobs.txt")).unwrap();
    let jobs: Vec<&str> = jobs.lines().collect();
    assert_eq!(jobs.len(), 8);
    for (index, job) in jobs.iter().enumerate() {
        let id = CONFIGURATIONS[index / 2];
        let seed = index % 2 + 1;
        let (fast, depth) = configuration(id);
        let expected = format!(
            "{} --no-progress --device cpu run --param lr={} --param depth={depth} --param seed={seed} \
             --param out={}/{id}/seed-{seed} {}/sweep_script.rhai",
            executable.display(),
            if fast { "0.01" } else { "0.001" },
            out.display(),
            base.display()
        );
        assert_eq!(*job, expected);
    }
    let sbatch = std::fs::read_to_string(out.join("sweep.sbatch")).unwrap();
    assert!(sbatch.starts_with("#!/bin/bash\n"), "{sbatch}");
    assert!(sbatch.contains("\n#SBATCH --array=0-7%2\n"), "{sbatch}");
    assert!(
        sbatch.contains(&format!(
            "\n#SBATCH --output={}/slurm-%A_%a.out\n",
            out.display()
        )),
        "{sbatch}"
    );
    assert!(
        sbatch.contains("line=$((SLURM_ARRAY_TASK_ID + 1))"),
        "{sbatch}"
    );
    assert!(
        sbatch.contains(&format!(
            "sed -n \"${{line}}p\" {}",
            out.join("jobs.txt").display()
        )),
        "{sbatch}"
    );

    // Run array task 5 as Slurm would (line 6: lr=0.01_depth=2, seed 2), then collect.
    let task = Command::new("bash")
        .arg(out.join("sweep.sbatch"))
        .env("SLURM_ARRAY_TASK_ID", "5")
        .env("SLURM_ARRAY_JOB_ID", "77")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        task.status.success(),
        "{}",
        String::from_utf8_lossy(&task.stderr)
    );
    let done: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("lr=0.01_depth=2/seed-2/done.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(done["slurm_job"], "77_5");

    let (ok, stdout, stderr) = ivado(&["sweep", &sweep_file, "--collect"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("7 of 8 runs are not complete"), "{stdout}");
    let rows = read_table(&out.join("sweep.csv"));
    for (index, row) in rows.iter().enumerate() {
        if index == 5 {
            assert_eq!(row["status"], "done");
            assert_close(
                number(row, "best_valid_dice"),
                best_valid(true, 2, 2.0),
                "valid",
            );
            assert_close(number(row, "test_dice"), mean_test(true, 2, 2.0), "test");
        } else {
            assert_eq!(row["status"], "missing", "row {index}");
        }
    }
    let summary = read_table(&out.join("summary.csv"));
    let counts: Vec<&str> = summary.iter().map(|row| row["n"].as_str()).collect();
    assert_eq!(counts, ["0", "0", "1", "0"]);

    // A second --slurm lists only the runs still to do.
    let (ok, stdout, stderr) = ivado(&["sweep", &sweep_file, "--slurm"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("7 of 8 runs pending"), "{stdout}");
    let sbatch = std::fs::read_to_string(out.join("sweep.sbatch")).unwrap();
    assert!(sbatch.contains("\n#SBATCH --array=0-6%2\n"), "{sbatch}");
    let jobs = std::fs::read_to_string(out.join("jobs.txt")).unwrap();
    assert!(!jobs.contains("lr=0.01_depth=2/seed-2"), "{jobs}");
}
