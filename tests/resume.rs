//! Crash safety: a training run killed with SIGKILL in the middle of an epoch resumes from its last
//! checkpoint and ends with exactly the weights of a run that was never interrupted; a corrupted newest
//! checkpoint is detected and the previous one is used, with a warning.
use ivado_runtime::model_folder::WEIGHTS_FILE;
use ivado_runtime::phantom;
use ivado_tests::{artifact_dir, run_ivado};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

/// Every stateful part of the loop is on: augmentation, dropout, mixup, clipping, AdamW, a cosine schedule and
/// early stopping, so each must be restored exactly for the weights to match.
const SCRIPT: &str = r#"
let out = ARGS[0];
seed(5);
let dataset = bids(ARGS[1], #{ target_suffix: "_seg-manual", contrasts: ["T2w"] });
let parts = split(dataset, #{ train_fraction: 0.5, test_fraction: 0.0, random_seed: 1 });
let net = model("unet2d", #{ depth: 2, n_filters: 8, dropout_rate: 0.3 });
let result = train(net, #{
    train: parts.train, valid: parts.valid, epochs: 6, batch_size: 4, seed: 9, out: out, resume: true,
    preprocess: [transform("CenterCrop", #{ size: [32, 32] }), transform("NormalizeInstance", #{})],
    augment: [transform("RandomAffine", #{ degrees: 10.0, translate: [0.1, 0.1], scale: [0.1, 0.1] }),
              transform("AdditiveGaussianNoise", #{ std: 0.05 })],
    optimizer: #{ name: "AdamW", lr: 0.003 },
    scheduler: #{ initial_lr: 0.003, lr_scheduler: #{ name: "CosineAnnealingLR" } },
    early_stopping_patience: 50, mixup_alpha: 0.4, gradient_clip: 1.0,
});
print(`resumed from ${result.resumed_from}; best Dice ${result.best_dice}`);
"#;

struct Fixture {
    _root: tempfile::TempDir,
    root: PathBuf,
    script: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().to_owned();
    let data = path.join("data");
    phantom::generate(
        &data,
        &phantom::PhantomSpec {
            subjects: 4,
            shape: [40, 40, 12],
            contrasts: vec!["T2w".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let script = path.join("train.rhai");
    std::fs::write(&script, SCRIPT).unwrap();
    Fixture {
        _root: root,
        root: path,
        script,
        data,
    }
}

fn run(fixture: &Fixture, out: &Path) -> (bool, String, String) {
    run_ivado(
        &[
            "run",
            fixture.script.to_str().unwrap(),
            out.to_str().unwrap(),
            fixture.data.to_str().unwrap(),
        ],
        "info",
    )
}

fn weights(checkpoint: &Path) -> Vec<(String, Tensor)> {
    let mut tensors = Tensor::read_safetensors(checkpoint.join(WEIGHTS_FILE)).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn assert_same_weights(a: &Path, b: &Path) {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{name} differs from the uninterrupted run");
    }
}

/// Validation Dice per epoch, from metrics.csv (timings differ between runs, scores must not).
fn dice_column(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| line.split(',').nth(3).unwrap().to_owned())
        .collect()
}

#[test]
fn a_run_killed_mid_epoch_resumes_to_the_same_weights_and_survives_a_corrupt_checkpoint() {
    let fixture = fixture();

    let reference = fixture.root.join("reference");
    let (ok, stdout, stderr) = run(&fixture, &reference);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("resumed from 0"), "{stdout}");
    let final_reference = reference.join("checkpoints/epoch-0006");

    // Kill the second run with SIGKILL as soon as its second checkpoint lands, i.e. early in epoch 3.
    let killed = fixture.root.join("killed");
    let mut child = Command::new(artifact_dir().join("ivado"))
        .args(["--device", "cpu", "--no-progress", "run"])
        .arg(&fixture.script)
        .arg(&killed)
        .arg(&fixture.data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !killed.join("checkpoints/epoch-0002").is_dir() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let epochs_done = dice_column(&killed).len();
    assert!(
        (2..6).contains(&epochs_done),
        "killed after {epochs_done} epochs"
    );

    let (ok, stdout, stderr) = run(&fixture, &killed);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("resuming after epoch {epochs_done}")),
        "{stderr}"
    );
    assert_same_weights(&killed.join("checkpoints/epoch-0006"), &final_reference);
    assert_eq!(dice_column(&killed), dice_column(&reference));

    // Corrupt the newest checkpoint's weights and ask for the same run again: the checkpoint is refused by
    // its checksum, epoch 5's is used, and epoch 6 is recomputed to the same weights.
    let newest = killed.join("checkpoints/epoch-0006").join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&newest, bytes).unwrap();
    let (ok, stdout, stderr) = run(&fixture, &killed);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("epoch-0006 is unusable") && stderr.contains("does not match"),
        "{stderr}"
    );
    assert!(stdout.contains("resumed from 5"), "{stdout}");
    assert_same_weights(&killed.join("checkpoints/epoch-0006"), &final_reference);
}

#[test]
fn checkpoints_are_complete_folders_and_only_the_newest_two_are_kept() {
    let fixture = fixture();
    let out = fixture.root.join("run");
    let (ok, stdout, stderr) = run(&fixture, &out);
    assert!(ok, "{stdout}\n{stderr}");
    let mut names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["epoch-0005", "epoch-0006"]);
    for file in [
        "model.safetensors",
        "ivado_model.json",
        "optimizer.safetensors",
        "state.json",
    ] {
        assert!(
            out.join("checkpoints/epoch-0006").join(file).is_file(),
            "{file}"
        );
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["seed"], 9);
    assert_eq!(manifest["training"]["optimizer"]["name"], "AdamW");
    assert_eq!(manifest["epoch_seconds"].as_array().unwrap().len(), 6);
    assert!(
        manifest["data"]["dataset_fingerprint"]
            .as_str()
            .unwrap()
            .len()
            == 64
    );

    // What a researcher reads: TensorBoard events whose every record passes its CRC checks (one file-version
    // record, then 4 scalars and 1 QC image per epoch), the curves, and a QC grid per epoch.
    let event_files: Vec<_> = std::fs::read_dir(out.join("tensorboard"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(event_files.len(), 1, "{event_files:?}");
    let events = ivado_runtime::report::tensorboard::read_events(&event_files[0]).unwrap();
    assert_eq!(events.len(), 1 + 6 * 5);
    let dice_scalars = events
        .iter()
        .flat_map(|e| &e.values)
        .filter(|v| v.tag == "Validation/Metrics/dice_score")
        .count();
    assert_eq!(dice_scalars, 6);
    assert!(out.join("training_curves.png").is_file());
    for epoch in 1..=6 {
        assert!(out.join(format!("qc/epoch-{epoch:04}.png")).is_file());
    }
}
