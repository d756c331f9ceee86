//! `evaluate_folder`, `ivado evaluate` and the Rhai `evaluate_folder` / `evaluate`, end to end on NIfTI files
//! written here (hand-built lesion layouts with known answers) and on ivadomed's functional test data.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ivado_runtime::evaluate::{
    evaluate_folder, threshold_analysis, EvalOptions, MissingLabelPolicy, ThresholdSweep,
    FN_COLOUR, FP_COLOUR, METRICS_CSV, PLOT_BEST_COLOUR, PLOT_DICE_COLOUR, PLOT_HEIGHT, PLOT_WIDTH,
    SUMMARY_CSV, THRESHOLD_CSV, TP_COLOUR,
};
use ivado_runtime::report::decode_png;
use ivado_runtime::volume::{read_volume, write_like, OutputType, Reorientation, Volume};
use ivado_tests::{run_ivado, shared_data};
use nifti::NiftiHeader;
use tch::{Kind, Tensor};

/// A RAS volume of `dims` voxels with `spacing` (mm) and `origin`, every voxel `value(x, y, z)`, written
/// with the runtime's own writer.
fn write_volume(
    path: &Path,
    dims: [usize; 3],
    spacing: [f64; 3],
    origin: [f64; 3],
    datatype: OutputType,
    value: impl Fn([usize; 3]) -> f32,
) {
    let mut values = Vec::with_capacity(dims.iter().product());
    for x in 0..dims[0] {
        for y in 0..dims[1] {
            for z in 0..dims[2] {
                values.push(value([x, y, z]));
            }
        }
    }
    let row = |axis: usize| {
        let mut row = [0.0f32; 4];
        row[axis] = spacing[axis] as f32;
        row[3] = origin[axis] as f32;
        row
    };
    let header = NiftiHeader {
        dim: [
            3,
            dims[0] as u16,
            dims[1] as u16,
            dims[2] as u16,
            1,
            1,
            1,
            1,
        ],
        pixdim: [
            1.0,
            spacing[0] as f32,
            spacing[1] as f32,
            spacing[2] as f32,
            1.0,
            1.0,
            1.0,
            1.0,
        ],
        sform_code: 2,
        qform_code: 0,
        srow_x: row(0),
        srow_y: row(1),
        srow_z: row(2),
        xyzt_units: 2,
        ..NiftiHeader::default()
    };
    let mut affine = [[0.0; 4]; 4];
    for axis in 0..3 {
        affine[axis][axis] = spacing[axis];
        affine[axis][3] = origin[axis];
    }
    affine[3][3] = 1.0;
    let shape = dims.map(|d| d as i64);
    let reference = Volume {
        data: Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)),
        spacing,
        affine,
        reorientation: Reorientation {
            perm: [0, 1, 2],
            flip: [false; 3],
            file_shape: dims,
        },
        header,
        path: path.to_path_buf(),
    };
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_like(
        &reference,
        &Tensor::from_slice(&values).reshape(shape),
        path,
        datatype,
    )
    .unwrap();
}

/// Voxels within `radius2` (squared voxel distance) of `centre`: a digital sphere.
fn in_sphere(p: [usize; 3], centre: [usize; 3], radius2: i64) -> bool {
    (0..3)
        .map(|k| (p[k] as i64 - centre[k] as i64).pow(2))
        .sum::<i64>()
        <= radius2
}

fn count_sphere(radius2: i64) -> usize {
    let r = (radius2 as f64).sqrt() as i64 + 1;
    let mut n = 0;
    for x in -r..=r {
        for y in -r..=r {
            for z in -r..=r {
                if x * x + y * y + z * z <= radius2 {
                    n += 1;
                }
            }
        }
    }
    n
}

const DIMS: [usize; 3] = [32, 24, 20];
const SPACING: [f64; 3] = [1.0, 1.0, 2.0];
const ORIGIN: [f64; 3] = [-10.0, 5.0, 3.0];
const A: [usize; 3] = [8, 8, 8]; // radius 3: predicted exactly
const B: [usize; 3] = [22, 8, 8]; // radius 2: missed
const C: [usize; 3] = [8, 18, 12]; // radius 1: false positive

fn binary(on: bool) -> f32 {
    if on {
        1.0
    } else {
        0.0
    }
}

struct Layout {
    bids: PathBuf,
    predictions: PathBuf,
}

/// Four images: sub-01 (one lesion found, one missed, one false positive), sub-02 (perfect), sub-03
/// (empty prediction of an empty label), sub-04 (a prediction without a label).
fn hand_built(root: &Path) -> Layout {
    let bids = root.join("bids");
    let predictions = root.join("out").join("pred_masks");
    let label = |subject: &str| {
        bids.join(format!(
            "derivatives/labels/{subject}/anat/{subject}_T2w_seg-manual.nii.gz"
        ))
    };
    let prediction = |subject: &str| predictions.join(format!("{subject}_T2w_pred.nii.gz"));
    for subject in ["sub-01", "sub-02", "sub-03", "sub-04"] {
        let image = bids.join(format!("{subject}/anat/{subject}_T2w.nii.gz"));
        write_volume(&image, DIMS, SPACING, ORIGIN, OutputType::F32, |p| {
            (p[0] + p[1]) as f32
        });
    }
    write_volume(
        &label("sub-01"),
        DIMS,
        SPACING,
        ORIGIN,
        OutputType::U8,
        |p| binary(in_sphere(p, A, 9) || in_sphere(p, B, 4)),
    );
    write_volume(
        &prediction("sub-01"),
        DIMS,
        SPACING,
        ORIGIN,
        OutputType::U8,
        |p| binary(in_sphere(p, A, 9) || in_sphere(p, C, 1)),
    );
    for path in [label("sub-02"), prediction("sub-02")] {
        write_volume(&path, DIMS, SPACING, ORIGIN, OutputType::U8, |p| {
            binary(in_sphere(p, [10, 10, 10], 4))
        });
    }
    for path in [label("sub-03"), prediction("sub-03"), prediction("sub-04")] {
        write_volume(&path, DIMS, SPACING, ORIGIN, OutputType::U8, |_| 0.0);
    }
    Layout { bids, predictions }
}

/// Header and rows of a CSV, cells by column name.
fn read_csv(path: &Path) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), header.len(), "{line}");
            header
                .iter()
                .zip(cells)
                .map(|(h, c)| (h.to_string(), c.to_string()))
                .collect()
        })
        .collect()
}

fn number(row: &BTreeMap<String, String>, column: &str) -> f64 {
    let cell = row
        .get(column)
        .unwrap_or_else(|| panic!("no column {column}"));
    if cell.is_empty() {
        f64::NAN
    } else {
        cell.parse().unwrap()
    }
}

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < 1e-9,
        "{what}: {actual} != {expected}"
    );
}

/// Counts of each value of a label volume.
fn histogram(volume: &Volume) -> BTreeMap<i64, usize> {
    let values = Vec::<f32>::try_from(volume.data.reshape([-1])).unwrap();
    let mut counts = BTreeMap::new();
    for v in values {
        *counts.entry(v as i64).or_default() += 1;
    }
    counts
}

fn voxel(volume: &Volume, p: [usize; 3]) -> f64 {
    volume
        .data
        .double_value(&[p[0] as i64, p[1] as i64, p[2] as i64])
}

#[test]
fn evaluate_folder_writes_ivadomed_metrics_painted_maps_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let layout = hand_built(dir.path());
    // Independent voxel counts of the digital spheres (lattice points within radius r): 7, 33, 123.
    let (a, b, c) = (count_sphere(9), count_sphere(4), count_sphere(1));
    assert_eq!((a, b, c), (123, 33, 7));

    let report =
        evaluate_folder(&layout.predictions, &layout.bids, &EvalOptions::default()).unwrap();
    // Default output: results_eval next to pred_masks, as ivadomed's layout.
    let out = dir.path().join("out").join("results_eval");
    assert_eq!(report.out_dir, out);
    assert_eq!(report.metrics_csv, out.join(METRICS_CSV));
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].image_id, "sub-04_T2w");

    let rows = read_csv(&report.metrics_csv);
    let ids: Vec<&str> = rows.iter().map(|r| r["image_id"].as_str()).collect();
    assert_eq!(ids, ["sub-01_T2w", "sub-02_T2w", "sub-03_T2w"]);
    assert_eq!(
        (rows[0]["subject"].as_str(), rows[0]["contrast"].as_str()),
        ("sub-01", "T2w")
    );
    let header: Vec<&String> = rows[0].keys().collect();
    assert!(
        header.iter().any(|h| *h == "ltpr_class0") && header.iter().any(|h| *h == "hd95_mm_class0")
    );
    // The file's column order starts like ivadomed's.
    let first_line = std::fs::read_to_string(&report.metrics_csv).unwrap();
    assert!(
        first_line.starts_with(
            "image_id,subject,contrast,vol_pred_class0,vol_gt_class0,rvd_class0,avd_class0,dice_class0,"
        ),
        "{first_line}"
    );

    // sub-01 by hand: truth A + B = 123 + 33 = 156 voxels, prediction A + C = 123 + 7 = 130, overlap A = 123;
    // voxels are 2 mm3. Lesions: A detected, B missed, C false -> LTPR 1/2, LFDR 1/2.
    let one = &rows[0];
    assert_close(number(one, "vol_gt_class0"), 312.0, "vol_gt");
    assert_close(number(one, "vol_pred_class0"), 260.0, "vol_pred");
    assert_close(number(one, "dice_class0"), 246.0 / 286.0, "dice");
    assert_close(number(one, "rvd_class0"), 52.0 / 312.0, "rvd");
    assert_close(number(one, "avd_class0"), 52.0 / 312.0, "avd");
    assert_close(number(one, "recall_class0"), 123.0 / 156.0, "recall");
    assert_close(number(one, "precision_class0"), 123.0 / 130.0, "precision");
    // 32 * 24 * 20 = 15360 voxels; background 15360 - 156 - 7 true negatives of 15360 - 156.
    assert_close(
        number(one, "specificity_class0"),
        (15360.0 - 163.0) / (15360.0 - 156.0),
        "specificity",
    );
    assert_close(number(one, "mse_class0"), 40.0 / 15360.0, "mse");
    assert_eq!(
        (number(one, "n_pred_class0"), number(one, "n_gt_class0")),
        (2.0, 2.0)
    );
    assert_close(number(one, "ltpr_class0"), 0.5, "ltpr");
    assert_close(number(one, "lfdr_class0"), 0.5, "lfdr");
    // sub-02 is perfect; sub-03 has nothing to find: Dice and rates are undefined (empty cells).
    let two = &rows[1];
    assert_eq!(
        [
            number(two, "dice_class0"),
            number(two, "ltpr_class0"),
            number(two, "lfdr_class0"),
            number(two, "rvd_class0"),
            number(two, "hausdorff_mm_class0")
        ],
        [1.0, 1.0, 0.0, 0.0, 0.0]
    );
    let three = &rows[2];
    assert_eq!(three["dice_class0"], "");
    assert_eq!(three["ltpr_class0"], "");
    assert_eq!(number(three, "vol_gt_class0"), 0.0);

    // The painted map of sub-01: A (123) TP, C (7) FP, B (33) FN, with the prediction's geometry.
    let painted_path = out.join("sub-01_T2w_pred_painted.nii.gz");
    assert_eq!(report.images[0].painted, vec![painted_path.clone()]);
    let painted = read_volume(&painted_path).unwrap();
    let prediction = read_volume(&layout.predictions.join("sub-01_T2w_pred.nii.gz")).unwrap();
    assert_eq!(painted.affine, prediction.affine);
    assert_eq!(painted.header.datatype, 2, "uint8");
    let counts = histogram(&painted);
    assert_eq!(counts.get(&(TP_COLOUR as i64)), Some(&123));
    assert_eq!(counts.get(&(FP_COLOUR as i64)), Some(&7));
    assert_eq!(counts.get(&(FN_COLOUR as i64)), Some(&33));
    assert_eq!(counts.get(&0), Some(&(15360 - 163)));
    assert_eq!(voxel(&painted, A), TP_COLOUR as f64);
    assert_eq!(voxel(&painted, [A[0] + 3, A[1], A[2]]), TP_COLOUR as f64);
    assert_eq!(voxel(&painted, C), FP_COLOUR as f64);
    assert_eq!(voxel(&painted, B), FN_COLOUR as f64);
    assert_eq!(voxel(&painted, [B[0] + 2, B[1], B[2]]), FN_COLOUR as f64);
    assert_eq!(voxel(&painted, [0, 0, 0]), 0.0);
    // The perfect image paints only true positives.
    let painted = read_volume(&out.join("sub-02_T2w_pred_painted.nii.gz")).unwrap();
    assert_eq!(
        histogram(&painted),
        BTreeMap::from([(0, 15360 - 33), (TP_COLOUR as i64, 33)])
    );

    // Summary: Dice over the two images where it is defined (d1 = 246/286 and 1); volumes over all three.
    let summary = read_csv(&out.join(SUMMARY_CSV));
    let row = |metric: &str| {
        summary
            .iter()
            .find(|r| r["metric"] == metric)
            .unwrap_or_else(|| panic!("no summary of {metric}"))
    };
    let d1 = 246.0 / 286.0;
    let dice = row("dice_class0");
    assert_eq!(dice["count"], "2");
    assert_close(number(dice, "mean"), (d1 + 1.0) / 2.0, "mean dice");
    assert_close(number(dice, "std"), (1.0 - d1) / 2f64.sqrt(), "std dice");
    assert_close(number(dice, "median"), (d1 + 1.0) / 2.0, "median dice");
    assert_close(number(dice, "min"), d1, "min dice");
    assert_close(number(dice, "max"), 1.0, "max dice");
    // vol_gt: 312, 66, 0 mm3.
    let volumes = row("vol_gt_class0");
    assert_eq!(volumes["count"], "3");
    assert_close(number(volumes, "mean"), 126.0, "mean volume");
    assert_close(number(volumes, "median"), 66.0, "median volume");
    // LFDR: 0.5, 0 and undefined for sub-03.
    assert_eq!(row("lfdr_class0")["count"], "2");
    assert_eq!(
        report.summary_of("dice_class0").unwrap().count,
        2,
        "report agrees with the file"
    );
}

#[test]
fn a_missing_label_is_skipped_with_a_warning_or_fails() {
    let dir = tempfile::tempdir().unwrap();
    let layout = hand_built(dir.path());
    let expected_label = layout
        .bids
        .join("derivatives/labels/sub-04/anat/sub-04_T2w_seg-manual.nii.gz");

    let skip = evaluate_folder(&layout.predictions, &layout.bids, &EvalOptions::default()).unwrap();
    assert_eq!(skip.images.len(), 3);
    assert_eq!(skip.skipped.len(), 1);
    assert!(
        skip.skipped[0]
            .reason
            .contains(&expected_label.display().to_string()),
        "{}",
        skip.skipped[0].reason
    );
    let ids: Vec<String> = read_csv(&skip.metrics_csv)
        .iter()
        .map(|r| r["image_id"].clone())
        .collect();
    assert!(!ids.contains(&"sub-04_T2w".to_string()));

    let fail = EvalOptions {
        missing_label: MissingLabelPolicy::Fail,
        out_dir: Some(dir.path().join("fail")),
        ..EvalOptions::default()
    };
    let error = evaluate_folder(&layout.predictions, &layout.bids, &fail).unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("sub-04_T2w") && message.contains(&expected_label.display().to_string()),
        "{message}"
    );
    assert!(!dir.path().join("fail").join(METRICS_CSV).exists());

    // The CLI logs the warning and lists the skipped image; `--missing-label fail` exits with the error.
    let predictions = layout.predictions.display().to_string();
    let bids = layout.bids.display().to_string();
    let out = dir.path().join("cli");
    let out_arg = out.display().to_string();
    let (ok, stdout, stderr) = run_ivado(
        &[
            "evaluate",
            "--predictions",
            &predictions,
            "--bids",
            &bids,
            "-o",
            &out_arg,
        ],
        "warn",
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("sub-04_T2w") && stderr.contains("skipped"),
        "{stderr}"
    );
    assert!(stdout.contains("skipped sub-04_T2w"), "{stdout}");
    assert!(
        stdout.contains("evaluated 3 image(s), skipped 1"),
        "{stdout}"
    );
    assert!(out.join(METRICS_CSV).is_file() && out.join(SUMMARY_CSV).is_file());
    let (ok, _, stderr) = run_ivado(
        &[
            "evaluate",
            "--predictions",
            &predictions,
            "--bids",
            &bids,
            "-o",
            &out_arg,
            "--missing-label",
            "fail",
        ],
        "warn",
    );
    assert!(!ok);
    assert!(
        stderr.contains(&expected_label.display().to_string()),
        "{stderr}"
    );
}

#[test]
fn a_grid_mismatch_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let bids = dir.path().join("bids");
    let predictions = dir.path().join("pred");
    let image = bids.join("sub-01/anat/sub-01_T2w.nii.gz");
    write_volume(
        &image,
        [10, 10, 10],
        SPACING,
        ORIGIN,
        OutputType::F32,
        |_| 1.0,
    );
    let label = bids.join("derivatives/labels/sub-01/anat/sub-01_T2w_seg-manual.nii.gz");
    write_volume(
        &label,
        [10, 10, 12],
        SPACING,
        ORIGIN,
        OutputType::U8,
        |_| 1.0,
    );
    let prediction = predictions.join("sub-01_T2w_pred.nii.gz");
    write_volume(
        &prediction,
        [10, 10, 10],
        SPACING,
        ORIGIN,
        OutputType::U8,
        |_| 1.0,
    );

    let error = evaluate_folder(&predictions, &bids, &EvalOptions::default()).unwrap_err();
    let message = format!("{error:#}");
    for path in [&prediction, &label] {
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
    assert!(
        message.contains("[10, 10, 10]") && message.contains("[10, 10, 12]"),
        "{message}"
    );

    // Same shape, origin 2 mm away: an affine mismatch, also naming both files.
    write_volume(
        &label,
        [10, 10, 10],
        SPACING,
        [-8.0, 5.0, 3.0],
        OutputType::U8,
        |_| 1.0,
    );
    let message = format!(
        "{:#}",
        evaluate_folder(&predictions, &bids, &EvalOptions::default()).unwrap_err()
    );
    for path in [&prediction, &label] {
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
    assert!(message.contains("different affines"), "{message}");
}

/// Two soft predictions of a radius-3 sphere (123 voxels), each with a shell out to radius 4 (134 more):
/// sub-01 is 0.65 on the sphere and 0.35 on the shell, sub-02 0.45 and 0.25, 0.05 elsewhere.
fn soft_layout(root: &Path) -> Layout {
    let bids = root.join("bids");
    let predictions = root.join("run").join("pred_masks");
    let dims = [24, 24, 24];
    let centre = [10, 10, 10];
    for (subject, inside, shell) in [("sub-01", 0.65f32, 0.35f32), ("sub-02", 0.45, 0.25)] {
        write_volume(
            &bids.join(format!("{subject}/anat/{subject}_T1w.nii.gz")),
            dims,
            [1.0; 3],
            [0.0; 3],
            OutputType::F32,
            |_| 0.0,
        );
        write_volume(
            &bids.join(format!(
                "derivatives/labels/{subject}/anat/{subject}_T1w_seg-manual.nii.gz"
            )),
            dims,
            [1.0; 3],
            [0.0; 3],
            OutputType::U8,
            |p| binary(in_sphere(p, centre, 9)),
        );
        write_volume(
            &predictions.join(format!("{subject}_T1w_pred_soft.nii.gz")),
            dims,
            [1.0; 3],
            [0.0; 3],
            OutputType::F32,
            |p| {
                if in_sphere(p, centre, 9) {
                    inside
                } else if in_sphere(p, centre, 16) {
                    shell
                } else {
                    0.05
                }
            },
        );
    }
    Layout { bids, predictions }
}

#[test]
fn threshold_analysis_finds_the_threshold_known_by_construction() {
    let dir = tempfile::tempdir().unwrap();
    let layout = soft_layout(dir.path());
    let shell = count_sphere(16) - count_sphere(9);
    assert_eq!(shell, 134);
    // Dice with the shell included: 2 * 123 / (257 + 123).
    let with_shell = 246.0 / 380.0;
    // Per threshold, (sub-01, sub-02) Dice: 0.1-0.2 both include the shell; 0.3 only sub-01 does; 0.4
    // both are exactly the sphere; 0.5-0.6 sub-02 predicts nothing; 0.7-0.9 neither predicts anything.
    let expected_dice = [
        with_shell,
        with_shell,
        (with_shell + 1.0) / 2.0,
        1.0,
        0.5,
        0.5,
        0.0,
        0.0,
        0.0,
    ];
    let sweep = ThresholdSweep {
        lesion_metrics: true,
        ..ThresholdSweep::new(0.1)
    };
    let options = EvalOptions {
        out_dir: Some(dir.path().join("thr")),
        ..EvalOptions::default()
    };
    let report = threshold_analysis(&layout.predictions, &layout.bids, &options, &sweep).unwrap();
    assert_eq!(report.images, ["sub-01_T1w", "sub-02_T1w"]);
    assert_eq!(report.best, Some((0.4, 1.0)));
    let thresholds: Vec<f64> = report.rows.iter().map(|r| r.threshold).collect();
    assert_eq!(thresholds, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]);
    for (row, expected) in report.rows.iter().zip(expected_dice) {
        assert_close(row.dice, expected, &format!("dice at {}", row.threshold));
        assert_eq!(row.dice_count, 2);
    }
    // Lesion TPR: both spheres found up to 0.4, one at 0.5-0.6, none after. FDR: 0 while anything is
    // predicted (the one predicted lesion is right), undefined when nothing is.
    let ltpr: Vec<f64> = report.rows.iter().map(|r| r.ltpr.unwrap().0).collect();
    assert_eq!(ltpr, [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0]);
    let lfdr: Vec<(f64, usize)> = report.rows.iter().map(|r| r.lfdr.unwrap()).collect();
    assert_eq!(lfdr[4], (0.0, 1));
    assert!(lfdr[6].0.is_nan() && lfdr[6].1 == 0);

    // The CSV has the same values and marks the best row.
    let rows = read_csv(&report.csv);
    assert_eq!(rows.len(), 9);
    assert_eq!(report.csv, dir.path().join("thr").join(THRESHOLD_CSV));
    for (row, expected) in rows.iter().zip(expected_dice) {
        assert_close(number(row, "dice"), expected, "csv dice");
    }
    let best: Vec<&str> = rows.iter().map(|r| r["best"].as_str()).collect();
    assert_eq!(best, ["0", "0", "0", "1", "0", "0", "0", "0", "0"]);
    assert_eq!(rows[8]["lfdr"], "");

    // The plot decodes, and shows the Dice curve and the best-threshold marker.
    let image = decode_png(&std::fs::read(&report.png).unwrap()).unwrap();
    assert_eq!(
        (image.width, image.height),
        (PLOT_WIDTH as usize, PLOT_HEIGHT as usize)
    );
    let count = |colour: [u8; 3]| {
        image
            .pixels
            .chunks_exact(3)
            .filter(|p| *p == colour)
            .count()
    };
    assert!(count(PLOT_BEST_COLOUR) > 100, "{}", count(PLOT_BEST_COLOUR));
    assert!(count(PLOT_DICE_COLOUR) > 300, "{}", count(PLOT_DICE_COLOUR));

    // The same through `ivado evaluate --thr-increment`: soft predictions are evaluated at --threshold.
    let out = dir.path().join("cli");
    let (ok, stdout, stderr) = run_ivado(
        &[
            "evaluate",
            "--predictions",
            &layout.predictions.display().to_string(),
            "--bids",
            &layout.bids.display().to_string(),
            "-o",
            &out.display().to_string(),
            "--threshold",
            "0.4",
            "--thr-increment",
            "0.1",
        ],
        "warn",
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("best threshold 0.4 (mean Dice 1.0000)"),
        "{stdout}"
    );
    let rows = read_csv(&out.join(METRICS_CSV));
    assert_eq!(
        (
            number(&rows[0], "dice_class0"),
            number(&rows[1], "dice_class0")
        ),
        (1.0, 1.0)
    );
    assert!(out.join(THRESHOLD_CSV).is_file() && out.join("threshold_analysis.png").is_file());
}

/// Predictions written the way `ivado segment` writes them (with the raw image's header) from ivadomed's
/// labels: every score is perfect, which needs the image and label headers to agree.
#[test]
fn real_labels_as_predictions_score_perfectly() {
    let data = shared_data("data_functional_testing");
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let multi = dir.path().join("multi");
    let label = |subject: &str, contrast: &str, suffix: &str| {
        data.join(format!(
            "derivatives/labels/{subject}/anat/{subject}_{contrast}{suffix}.nii.gz"
        ))
    };
    let mut expected_voxels = BTreeMap::new();
    for subject in ["sub-unf01", "sub-unf02", "sub-unf03"] {
        let image =
            read_volume(&data.join(format!("{subject}/anat/{subject}_T2w.nii.gz"))).unwrap();
        let cord = read_volume(&label(subject, "T2w", "_seg-manual")).unwrap();
        let lesion = read_volume(&label(subject, "T2w", "_lesion-manual")).unwrap();
        let name = format!("{subject}_T2w_pred");
        write_like(
            &image,
            &cord.data,
            &single.join(format!("{name}.nii.gz")),
            OutputType::U8,
        )
        .unwrap();
        write_like(
            &image,
            &cord.data,
            &multi.join(format!("{name}_class-0.nii.gz")),
            OutputType::U8,
        )
        .unwrap();
        write_like(
            &image,
            &lesion.data,
            &multi.join(format!("{name}_class-1.nii.gz")),
            OutputType::U8,
        )
        .unwrap();
        let voxels = |v: &Volume| v.data.ge(0.5).sum(Kind::Int64).int64_value(&[]) as usize;
        expected_voxels.insert(subject, (voxels(&cord), voxels(&lesion)));
    }
    // sub-unf02's T1w has no correctly named cord label (its folder holds sub-unf01's): skipped.
    let t1 = read_volume(&data.join("sub-unf02/anat/sub-unf02_T1w.nii.gz")).unwrap();
    write_like(
        &t1,
        &t1.data.zeros_like(),
        &single.join("sub-unf02_T1w_pred.nii.gz"),
        OutputType::U8,
    )
    .unwrap();

    let report = evaluate_folder(
        &single,
        &data,
        &EvalOptions {
            out_dir: Some(dir.path().join("eval-single")),
            ..EvalOptions::default()
        },
    )
    .unwrap();
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].image_id, "sub-unf02_T1w");
    assert_eq!(report.images.len(), 3);
    for image in &report.images {
        assert_eq!(image.metrics["dice_class0"], 1.0, "{}", image.image_id);
        assert_eq!(
            image.metrics["hausdorff_mm_class0"], 0.0,
            "{}",
            image.image_id
        );
        let painted = read_volume(&image.painted[0]).unwrap();
        let (cord, _) = expected_voxels[image.subject.as_str()];
        assert_eq!(
            histogram(&painted)
                .get(&(TP_COLOUR as i64))
                .copied()
                .unwrap_or(0),
            cord,
            "{}",
            image.image_id
        );
    }

    // Two classes: cord and lesion, one target suffix each.
    let options = EvalOptions {
        out_dir: Some(dir.path().join("eval-multi")),
        target_suffixes: vec!["_seg-manual".into(), "_lesion-manual".into()],
        ..EvalOptions::default()
    };
    let report = evaluate_folder(&multi, &data, &options).unwrap();
    assert_eq!(report.images.len(), 3);
    for image in &report.images {
        let (_, lesion) = expected_voxels[image.subject.as_str()];
        assert_eq!(image.metrics["dice_class0"], 1.0);
        if lesion > 0 {
            assert_eq!(image.metrics["dice_class1"], 1.0, "{}", image.image_id);
            assert_eq!(image.metrics["ltpr_class1"], 1.0);
        } else {
            assert!(image.metrics["dice_class1"].is_nan());
        }
        assert_eq!(image.painted.len(), 2);
        assert!(
            image.painted[1].ends_with(format!("{}_pred_class-1_painted.nii.gz", image.image_id))
        );
    }
    assert!(expected_voxels.values().any(|&(_, lesion)| lesion > 0));
    // One suffix for two-class predictions is an error that says so.
    let message = format!(
        "{:#}",
        evaluate_folder(&multi, &data, &EvalOptions::default()).unwrap_err()
    );
    assert!(
        message.contains("2 class(es) but 1 target suffix"),
        "{message}"
    );
}

#[test]
fn rhai_evaluate_folder_and_evaluate_return_ivadomed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let layout = hand_built(dir.path());
    let script = dir.path().join("eval.rhai");
    let prediction = layout.predictions.join("sub-01_T2w_pred.nii.gz");
    let label = layout
        .bids
        .join("derivatives/labels/sub-01/anat/sub-01_T2w_seg-manual.nii.gz");
    let empty = layout.predictions.join("sub-03_T2w_pred.nii.gz");
    let empty_label = layout
        .bids
        .join("derivatives/labels/sub-03/anat/sub-03_T2w_seg-manual.nii.gz");
    std::fs::write(
        &script,
        format!(
            r#"
let summary = evaluate_folder("{pred}", "{bids}", #{{ out: "{out}", overlap: 200, overlap_unit: "mm3" }});
print(`images ${{summary.images}} skipped ${{summary.skipped}}`);
print(`dice count ${{summary.metrics.dice_class0.count}} max ${{summary.metrics.dice_class0.max}}`);
print(`ltpr mean ${{summary.metrics.ltpr_class0.mean}}`);
let row = evaluate("{prediction}", "{label}");
print(`pair ${{row.dice_class0 == row.dice}} ${{row.n_gt_class0}} ${{row.predicted_mm3}} ${{row.label_mm3}}`);
let strict = evaluate("{prediction}", "{label}", #{{ threshold: 2.0 }});
print(`strict ${{strict.dice}} ${{strict.vol_pred_class0}}`);
let empty = evaluate("{empty}", "{empty_label}");
print(`empty ${{empty.dice}} ${{empty.dice_class0}}`);
"#,
            pred = layout.predictions.display(),
            bids = layout.bids.display(),
            out = dir.path().join("rhai-out").display(),
            prediction = prediction.display(),
            label = label.display(),
            empty = empty.display(),
            empty_label = empty_label.display(),
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = run_ivado(&["run", &script.display().to_string()], "error");
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "images 3 skipped [\"sub-04_T2w\"]");
    assert_eq!(lines[1], "dice count 2 max 1.0");
    // 200 mm3 = 100 voxels of overlap: sub-01's A (123 voxels) is still found, sub-02's 33-voxel sphere is
    // not; sub-03 has no lesion. LTPR (1/2 + 0) / 2.
    assert_eq!(lines[2], "ltpr mean 0.25");
    assert_eq!(lines[3], "pair true 2.0 260.0 312.0");
    assert_eq!(lines[4], "strict 0.0 0.0");
    // Both empty: `dice` stays 1.0 for script averages, ivadomed's dice_class0 is NaN.
    assert_eq!(lines[5], "empty 1.0 NaN");
    assert!(dir.path().join("rhai-out").join(METRICS_CSV).is_file());
}
