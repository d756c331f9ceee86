//! The Rhai data surface (`slices`, `patches`, `subvolumes`, `volumes`, `loader`) through the `ivado`
//! binary, on ivadomed's functional-testing data (three subjects' T2w volumes, 131 x 141 x 16, with
//! `_seg-manual` cord labels).
use ivado_tests::{run_ivado, shared_data};
use std::path::{Path, PathBuf};

const SUBJECTS: [&str; 3] = ["sub-unf01", "sub-unf02", "sub-unf03"];

fn bids_root() -> String {
    shared_data("data_functional_testing").display().to_string()
}

/// Writes `body` as `dir/name` and runs it with the data folder as `ARGS[0]`.
fn run_script(dir: &Path, name: &str, body: &str) -> (bool, String, String) {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    run_ivado(&["run", path.to_str().unwrap(), &bids_root()], "warn")
}

/// The values the script printed as `RESULT key=value`, in order.
fn results(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("RESULT "))
        .map(|line| {
            let (key, value) = line.split_once('=').expect("RESULT key=value");
            (key.to_owned(), value.to_owned())
        })
        .collect()
}

fn result(stdout: &str, key: &str) -> String {
    results(stdout)
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no RESULT {key} in:\n{stdout}"))
        .1
}

fn label_path(subject: &str) -> PathBuf {
    shared_data(&format!(
        "data_functional_testing/derivatives/labels/{subject}/anat/{subject}_T2w_seg-manual.nii.gz"
    ))
}

/// A label file's shape (file order) and its voxels in ndarray's order (last axis fastest).
fn read_label(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let object = nifti::ReaderOptions::new().read_file(path).unwrap();
    let volume = nifti::NiftiObject::into_volume(object);
    let array = nifti::IntoNdArray::into_ndarray::<f32>(volume).unwrap();
    (array.shape().to_vec(), array.iter().copied().collect())
}

/// Tiles of `length` every `stride` voxels plus one flush with the end over `size` voxels (tiling.rs's rule,
/// which covers the volume exactly): ceil((size - length) / stride) + 1.
fn tiles(size: usize, length: usize, stride: usize) -> usize {
    (size - length).div_ceil(stride) + 1
}

/// Axial `length` x `length` patches every `stride` voxels whose label has a non-zero voxel. Tiles start at
/// the RAS origin, so the file's axes whose affine diagonal is negative are read backwards (each axis is
/// checked to be the closest to its world axis; these files are tilted by about 9 degrees about X).
fn patches_with_foreground(path: &Path, length: usize, stride: usize) -> usize {
    let header = nifti::NiftiHeader::from_file(path).unwrap();
    let rows = [header.srow_x, header.srow_y, header.srow_z];
    for (i, row) in rows.iter().enumerate() {
        let norm = row[..3].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(
            row[i].abs() > 0.9 * norm,
            "{} is not near axis-aligned",
            path.display()
        );
    }
    let flipped = [rows[0][0] < 0.0, rows[1][1] < 0.0];
    let (shape, voxels) = read_label(path);
    let (nx, ny, nz) = (shape[0], shape[1], shape[2]);
    let starts = |size: usize| -> Vec<usize> {
        let mut starts: Vec<usize> = (0..size - length).step_by(stride).collect();
        starts.push(size - length);
        starts
    };
    let mut count = 0;
    for z in 0..nz {
        for &x0 in &starts(nx) {
            for &y0 in &starts(ny) {
                let found = (x0..x0 + length).any(|x| {
                    (y0..y0 + length).any(|y| {
                        let fx = if flipped[0] { nx - 1 - x } else { x };
                        let fy = if flipped[1] { ny - 1 - y } else { y };
                        voxels[(fx * ny + fy) * nz + z] > 0.0
                    })
                });
                count += usize::from(found);
            }
        }
    }
    count
}

const COUNT_SCRIPT: &str = r#"
let ds = bids(ARGS[0], #{ target_suffix: "_seg-manual", contrasts: ["T2w"] });
let all_slices = slices(ds);
print(`RESULT slices=${all_slices.len}`);
let cord_slices = slices(ds, #{ slice_filter_params: #{ filter_empty_mask: true } });
print(`RESULT cord_slices=${cord_slices.len}`);
let d = cord_slices.describe();
print(`RESULT cord_windows=${d.windows}`);
print(`RESULT cord_window=${d.window}`);
let p = patches(ds, #{ length_2D: [32, 32], stride_2D: [24, 24] });
print(`RESULT patches=${p.len}`);
print(`RESULT patch_window=${p.shapes().window}`);
let cp = patches(ds, #{ length_2D: [32, 32], stride_2D: [24, 24], patch_filter_params: #{ filter_empty_mask: true } });
print(`RESULT cord_patches=${cp.len}`);
print(`RESULT cord_patches_validation=${cp.describe().count_validation}`);
let v = subvolumes(ds, #{ length_3D: [48, 48, 16], stride_3D: [40, 48, 16] });
print(`RESULT subvolumes=${v.len}`);
print(`RESULT volumes=${volumes(ds).len}`);
let sagittal = slices(ds, #{ slice_axis: "sagittal" });
print(`RESULT sagittal=${sagittal.len}`);
print(`RESULT sagittal_window=${sagittal.describe().window}`);
let l = loader(p, #{ batch_size: 50, num_workers: 0 });
print(`RESULT loader_len=${l.len}`);
"#;

#[test]
fn window_counts_equal_independent_counts_from_the_nifti_files() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = run_script(dir.path(), "count.rhai", COUNT_SCRIPT);
    assert!(ok, "{stdout}\n{stderr}");
    // Counted here from the label files: every volume is 131 x 141 x 16 (RPI, so reorienting to RAS flips X
    // and Y but keeps each axis' length), and a slice is kept when its label has a non-zero voxel.
    let mut cord_slices = 0;
    for subject in SUBJECTS {
        let (shape, voxels) = read_label(&label_path(subject));
        assert_eq!(shape, [131, 141, 16]);
        let mut has_cord = [false; 16];
        for (i, value) in voxels.iter().enumerate() {
            if *value > 0.0 {
                has_cord[i % 16] = true;
            }
        }
        cord_slices += has_cord.iter().filter(|&&c| c).count();
    }
    let images = SUBJECTS.len();
    assert_eq!(result(&stdout, "slices"), (images * 16).to_string());
    assert_eq!(result(&stdout, "cord_slices"), cord_slices.to_string());
    // Patches with cord: the patch filter keeps only those whose label patch has a non-zero voxel.
    let cord_patches: usize = SUBJECTS
        .iter()
        .map(|subject| patches_with_foreground(&label_path(subject), 32, 24))
        .sum();
    assert_eq!(result(&stdout, "cord_patches"), cord_patches.to_string());
    assert!(cord_patches > 0 && cord_patches < images * 16 * 36);
    // The patch filter applies at training time only (as in ivadomed): validation keeps every patch.
    assert_eq!(
        result(&stdout, "cord_patches_validation"),
        (images * 16 * 36).to_string()
    );
    assert_eq!(result(&stdout, "cord_windows"), (images * 16).to_string());
    assert_eq!(result(&stdout, "cord_window"), "[131, 141]");
    // 2D patches of 32 every 24 voxels in each of the 16 axial slices: 6 x 6 per slice.
    let per_slice = tiles(131, 32, 24) * tiles(141, 32, 24);
    assert_eq!(per_slice, 36);
    assert_eq!(
        result(&stdout, "patches"),
        (images * 16 * per_slice).to_string()
    );
    assert_eq!(result(&stdout, "patch_window"), "[32, 32]");
    // 3D subvolumes 48 x 48 x 16 every (40, 48, 16): 4 x 3 x 1 per volume.
    let per_volume = tiles(131, 48, 40) * tiles(141, 48, 48) * tiles(16, 16, 16);
    assert_eq!(per_volume, 12);
    assert_eq!(
        result(&stdout, "subvolumes"),
        (images * per_volume).to_string()
    );
    assert_eq!(result(&stdout, "volumes"), images.to_string());
    // Sagittal slices: one per X, (height, width) = (Z, Y) as ivadomed orients them.
    assert_eq!(result(&stdout, "sagittal"), (images * 131).to_string());
    assert_eq!(result(&stdout, "sagittal_window"), "[16, 141]");
    assert_eq!(
        result(&stdout, "loader_len"),
        (images * 16 * per_slice).div_ceil(50).to_string()
    );
}

/// Prints every batch summary of epochs 1 and 2 of a loader with `workers` workers and seed `seed`, and
/// batch 1 of epoch 2 alone.
fn batch_script(workers: usize, seed: u64) -> String {
    format!(
        r#"
let ds = bids(ARGS[0], #{{ target_suffix: "_seg-manual", contrasts: ["T2w"] }});
let train_set = subset(ds, ["sub-unf01", "sub-unf02"]);
let p = patches(train_set, #{{ length_2D: [64, 64], stride_2D: [64, 64],
                             slice_filter_params: #{{ filter_empty_mask: true }} }});
let l = loader(p, #{{ batch_size: 16, num_workers: {workers}, seed: {seed},
                     preprocess: [transform("NormalizeInstance", #{{}})],
                     augment: [transform("RandomAffine", #{{ degrees: 10.0, translate: [0.1, 0.1] }})] }});
print(`RESULT batches=${{l.len}}`);
for e in [1, 2] {{
    for b in l.epoch(e) {{
        print(`RESULT epoch${{e}}=${{b}}`);
    }}
}}
print(`RESULT single=${{l.batch(2, 1)}}`);
"#
    )
}

#[test]
fn batch_summaries_depend_on_the_seed_only_not_on_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let run = |workers: usize, seed: u64| {
        let (ok, stdout, stderr) = run_script(
            dir.path(),
            &format!("batches_{workers}_{seed}.rhai"),
            &batch_script(workers, seed),
        );
        assert!(ok, "{stdout}\n{stderr}");
        results(&stdout)
    };
    let one = run(1, 5);
    let again = run(1, 5);
    let two = run(2, 5);
    let other_seed = run(2, 6);
    assert_eq!(one, again);
    assert_eq!(one, two);
    let epoch = |rows: &[(String, String)], key: &str| -> Vec<String> {
        rows.iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let batches: usize = epoch(&one, "batches")[0].parse().unwrap();
    let first = epoch(&one, "epoch1");
    assert_eq!(first.len(), batches);
    // Every batch holds 16 samples but the last, each [1, 64, 64], with where it came from.
    assert!(
        first[0].contains("\"shape\": [16, 1, 64, 64]"),
        "{}",
        first[0]
    );
    assert!(first[0].contains("sub-unf0"), "{}", first[0]);
    // Epochs draw their own order and augmentation; `batch(2, 1)` is the second batch of epoch 2.
    assert_ne!(first, epoch(&one, "epoch2"));
    assert_eq!(epoch(&one, "single")[0], epoch(&one, "epoch2")[1]);
    // Another seed, another order.
    assert_ne!(first, epoch(&other_seed, "epoch1"));
}

#[test]
fn a_cached_loader_summarises_the_lazy_batches() {
    let dir = tempfile::tempdir().unwrap();
    let script = |workers: usize| {
        format!(
            r#"
let ds = bids(ARGS[0], #{{ target_suffix: "_seg-manual", contrasts: ["T2w"] }});
let l = loader(slices(subset(ds, ["sub-unf01", "sub-unf02"])), #{{ batch_size: 8, num_workers: {workers},
    cache: #{{ budget_mb: 1 }}, preprocess: [transform("CenterCrop", #{{ size: [64, 64] }})] }});
print(`RESULT batches=${{l.len}}`);
for b in l.epoch(1) {{ print(`RESULT batch=${{b.samples}} ${{b.files}} ${{b.shape}}`); }}
"#
        )
    };
    let run = |workers: usize| {
        let (ok, stdout, stderr) = run_script(dir.path(), "cached.rhai", &script(workers));
        assert!(ok, "{stdout}\n{stderr}");
        results(&stdout)
    };
    let two = run(2);
    assert_eq!(two, run(0));
    // 32 axial slices (16 per volume) in batches of 8.
    assert_eq!(two[0].1, "4");
    let mut seen = Vec::new();
    for (_, batch) in &two[1..] {
        let (samples, rest) = batch.split_once("] ").unwrap();
        let samples: Vec<usize> = samples
            .trim_start_matches('[')
            .split(", ")
            .map(|n| n.parse().unwrap())
            .collect();
        // Slices 0..16 are sub-unf01's, 16..32 sub-unf02's (the dataset's order).
        let files: Vec<&str> = rest.split('"').filter(|t| t.starts_with("sub-")).collect();
        assert_eq!(files.len(), samples.len());
        for (sample, file) in samples.iter().zip(&files) {
            let subject = if *sample < 16 {
                "sub-unf01"
            } else {
                "sub-unf02"
            };
            assert!(file.starts_with(subject), "{sample} {file}");
        }
        assert!(
            rest.ends_with(&format!("[{}, 1, 64, 64]", samples.len())),
            "{rest}"
        );
        seen.extend(samples);
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..32).collect::<Vec<_>>(),
        "every slice once per epoch"
    );
}

/// Trains a small U-Net for two epochs on one subject's 64 x 64 patches, once with handles and once with flat
/// keys.
const TRAIN_SCRIPT: &str = r#"
let ds = bids(ARGS[0], #{ target_suffix: "_seg-manual", contrasts: ["T2w"] });
let train_set = subset(ds, ["sub-unf01"]);
let valid_set = subset(ds, ["sub-unf03"]);
let out = ARGS[1];
let cut = #{ length_2D: [64, 64], stride_2D: [64, 64], slice_filter_params: #{ filter_empty_mask: true } };
let preprocess = [transform("NormalizeInstance", #{})];
let augment = [transform("RandomAffine", #{ degrees: 10.0, translate: [0.1, 0.1] })];
let net = #{ depth: 2, n_filters: 4 };

seed(1);
let handles = train(model("unet2d", net), #{
    train: loader(patches(train_set, cut), #{ batch_size: 16, num_workers: 2, seed: 4,
                                              preprocess: preprocess, augment: augment }),
    valid: patches(valid_set, cut),
    epochs: 2, out: `${out}/handles`,
});
seed(1);
let flat = train(model("unet2d", net), #{
    train: train_set, valid: valid_set,
    length_2D: [64, 64], stride_2D: [64, 64], slice_filter_params: #{ filter_empty_mask: true },
    batch_size: 16, num_workers: 1, seed: 4, preprocess: preprocess, augment: augment,
    epochs: 2, out: `${out}/flat`,
});
print(`RESULT done=${handles.best_dice} ${flat.best_dice}`);
"#;

/// metrics.csv without its timing columns (wall-clock seconds differ between runs).
fn metrics_without_timing(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !header[i].contains("second") && !header[i].contains("time"))
        .collect();
    std::iter::once(header.join(","))
        .chain(lines.map(str::to_owned))
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            keep.iter().map(|&i| cells[i].to_owned()).collect()
        })
        .collect()
}

#[test]
fn training_with_handles_gives_the_metrics_of_the_flat_keys() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("train.rhai");
    std::fs::write(&script, TRAIN_SCRIPT).unwrap();
    let out = dir.path().join("runs");
    let (ok, stdout, stderr) = run_ivado(
        &[
            "run",
            script.to_str().unwrap(),
            &bids_root(),
            out.to_str().unwrap(),
        ],
        "warn",
    );
    assert!(ok, "{stdout}\n{stderr}");
    let handles = metrics_without_timing(&out.join("handles/metrics.csv"));
    let flat = metrics_without_timing(&out.join("flat/metrics.csv"));
    assert_eq!(handles.len(), 3, "a header and two epochs: {handles:?}");
    // Losses and Dice as written (full precision text), so equal means bit-identical.
    assert_eq!(handles, flat);
    let manifest = |run: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(out.join(run).join("model/ivado_model.json")).unwrap(),
        )
        .unwrap()
    };
    // The weights too, byte for byte.
    let weights = |run: &str| std::fs::read(out.join(run).join("model/model.safetensors")).unwrap();
    assert!(weights("handles") == weights("flat"));
    assert_eq!(
        manifest("handles")["data"]["sampling"],
        manifest("flat")["data"]["sampling"]
    );
}

/// Runs a one-line-per-statement script and returns its error output.
fn failing(body: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = run_script(dir.path(), "bad.rhai", body);
    assert!(!ok, "the script should fail:\n{stdout}");
    stderr
}

const PREAMBLE: &str = "let ds = bids(ARGS[0], #{ target_suffix: \"_seg-manual\", contrasts: [\"T2w\"] });\nlet net = model(\"unet2d\", #{ depth: 2, n_filters: 4 });\n";

#[test]
fn bad_keys_and_values_are_errors_naming_the_key_and_the_line() {
    let cases: [(&str, &str, &[&str]); 7] = [
        (
            "let p = patches(ds, #{ length_2d: [32, 32] });",
            "bad.rhai:3:",
            &["patches: unknown option `length_2d`", "length_2D"],
        ),
        (
            "let p = patches(ds, #{ stride_2D: [32, 32] });",
            "bad.rhai:3:",
            &["patches: `length_2D` is required"],
        ),
        (
            "let s = subvolumes(ds, #{ length_3D: [32, 32] });",
            "bad.rhai:3:",
            &["`length_3D` must be a list of 3 positive integers"],
        ),
        (
            "let s = slices(ds, #{ slice_filter_params: #{ filter_empty_mask: true } });\nlet l = loader(s, #{ batch_size: 0 });",
            "bad.rhai:4:",
            &["loader: `batch_size` must be an integer of at least 1"],
        ),
        (
            "let s = slices(ds);\nlet l = loader(s, #{ shuffle: true });",
            "bad.rhai:4:",
            &["loader: unknown option `shuffle`"],
        ),
        (
            "let s = slices(ds);\n\ntrain(net, #{ train: loader(s, #{ batch_size: 4 }), valid: ds, batch_size: 8 });",
            "bad.rhai:5:",
            &["train: `batch_size` is given both flat and through the `train` loader(...)"],
        ),
        (
            "let s = slices(ds);\ntrain(net, #{ train: s, valid: ds, slice_axis: \"coronal\" });",
            "bad.rhai:4:",
            &["train: `slice_axis` is given both flat and through the `train` handle (slices(...))"],
        ),
    ];
    for (statement, position, messages) in cases {
        let stderr = failing(&format!("{PREAMBLE}{statement}\n"));
        assert!(stderr.contains(position), "{statement}: {stderr}");
        for message in messages {
            assert!(stderr.contains(message), "{statement}: {stderr}");
        }
    }
    // A valid loader may repeat the train loader's settings, not add its own.
    let stderr = failing(&format!(
        "{PREAMBLE}let s = slices(ds);\ntrainer(net, #{{ train: loader(s, #{{ batch_size: 4 }}),\n  valid: loader(s, #{{ batch_size: 4, num_workers: 0 }}) }});\n"
    ));
    assert!(stderr.contains("bad.rhai:4:"), "{stderr}");
    assert!(
        stderr.contains(
            "the `valid` loader sets `num_workers`, which only the `train` loader may set"
        ),
        "{stderr}"
    );
    // A valid handle cut differently from the train one.
    let stderr = failing(&format!(
        "{PREAMBLE}let a = slices(ds);\nlet b = slices(ds, #{{ slice_axis: \"coronal\" }});\ntrainer(net, #{{ train: a, valid: b }});\n"
    ));
    assert!(stderr.contains("bad.rhai:5:"), "{stderr}");
    assert!(
        stderr.contains("`valid` is cut differently from `train` (coronal slices vs axial slices)"),
        "{stderr}"
    );
}
