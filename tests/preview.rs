//! `ivado preview-transforms` and `ivado bench augment`, run through the built binary on a generated phantom.
use ivado_runtime::phantom::{self, PhantomSpec};
use ivado_runtime::report::qc::{self, Plane, QcOptions};
use ivado_runtime::report::{decode_png, RgbImage};
use ivado_runtime::volume::read_volume;
use ivado_tests::run_ivado;
use serde_json::json;
use std::path::{Path, PathBuf};

/// One phantom subject of 40 x 32 x 6 voxels (x, y, z) with its cord label; returns (image, label).
fn phantom_pair(root: &Path) -> (PathBuf, PathBuf) {
    let spec = PhantomSpec {
        subjects: 1,
        shape: [40, 32, 6],
        spacing: [1.0, 1.0, 2.0],
        contrasts: vec!["T2w".into()],
        noise: 0.05,
        seed: 3,
    };
    phantom::generate(root, &spec).unwrap();
    (
        root.join("sub-ph01/anat/sub-ph01_T2w.nii.gz"),
        root.join("derivatives/labels/sub-ph01/anat/sub-ph01_T2w_seg-manual.nii.gz"),
    )
}

fn write_json(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// The `width` x `height` block of `sheet` whose top-left pixel is (`left`, `top`).
fn crop(sheet: &RgbImage, left: usize, top: usize, width: usize, height: usize) -> RgbImage {
    let mut pixels = Vec::with_capacity(width * height * 3);
    for y in top..top + height {
        let start = (y * sheet.width + left) * 3;
        pixels.extend_from_slice(&sheet.pixels[start..start + width * 3]);
    }
    RgbImage::from_pixels(width, height, pixels).unwrap()
}

/// Axial slice `z` of a volume as displayed: numpy's `rot90` of the `[X, Y]` slice, so `Y` rows (anterior at
/// the top) by `X` columns, row-major.
fn displayed_slice(path: &Path, z: i64) -> (Vec<f32>, usize, usize) {
    let volume = read_volume(path).unwrap();
    let slice = volume.data.select(2, z);
    let (nx, ny) = (slice.size()[0] as usize, slice.size()[1] as usize);
    let values = Vec::<f32>::try_from(&slice.contiguous().flatten(0, -1)).unwrap();
    // rot90 (counter-clockwise): display row i, column j shows voxel (x = j, y = ny - 1 - i).
    let mut rotated = vec![0.0; nx * ny];
    for i in 0..ny {
        for j in 0..nx {
            rotated[i * nx + j] = values[j * ny + (ny - 1 - i)];
        }
    }
    (rotated, ny, nx)
}

#[test]
fn preview_sheet_has_a_tile_per_draw_and_step_and_starts_with_the_original_slice() {
    let root = tempfile::tempdir().unwrap();
    let (image, label) = phantom_pair(&root.path().join("data"));
    let pipeline = root.path().join("pipeline.json");
    write_json(
        &pipeline,
        &json!([
            {"name": "RandomAffine", "config": {"degrees": 20.0, "translate": [0.05, 0.05]}},
            {"name": "ElasticTransform",
             "config": {"alpha_range": [28.0, 30.0], "sigma_range": [3.5, 4.5], "p": 1.0}},
            // Only at test time: no column.
            {"name": "CenterCrop", "config": {"size": [16, 16], "dataset_type": ["testing"]}},
            {"name": "RandomGamma", "config": {"log_gamma_range": [-1.0, 1.0], "p": 1.0, "applied_to": ["im"]}},
            {"name": "NormalizeInstance", "config": {"applied_to": ["im"]}},
        ]),
    );
    let out = root.path().join("out");
    let args = |out: &Path, seed: &str| -> Vec<String> {
        [
            "preview-transforms",
            "--config",
            pipeline.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--label",
            label.to_str().unwrap(),
            "-n",
            "3",
            "-o",
            out.to_str().unwrap(),
            "--seed",
            seed,
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |args: Vec<String>| {
        let borrowed: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, stderr) = run_ivado(&borrowed, "warn");
        assert!(ok, "preview failed:\n{stdout}\n{stderr}");
        stdout
    };
    let stdout = run(args(&out, "7"));
    assert!(
        stdout.contains(
            "axial slice 3, 3 draws x 5 columns: original, RandomAffine, ElasticTransform, RandomGamma, \
             NormalizeInstance"
        ),
        "{stdout}"
    );
    let png = out.join("preview_sub-ph01_T2w.png");
    let sheet = decode_png(&std::fs::read(&png).unwrap()).unwrap();

    // The displayed slice is 32 rows x 40 columns; the smallest integer factor that brings 40 to 256 is 7,
    // so tiles are 280 x 224 (every step keeps the shape). 5 columns and 3 rows with 4-pixel gutters, under a
    // 28-pixel title strip: 5 * 280 + 4 * 4 = 1416 wide, 28 + 3 * 224 + 2 * 4 = 708 high.
    assert_eq!(
        (qc::GRID_GAP, ivado_runtime::preview::TITLE_HEIGHT),
        (4, 28)
    );
    assert_eq!((sheet.width, sheet.height), (1416, 708));
    let tile = |row: usize, column: usize| crop(&sheet, column * 284, 28 + row * 228, 280, 224);

    // The first column of every row is the untransformed middle slice (6 / 2 = 3), rendered here straight
    // from the NIfTI files with the QC overlay at the same factor.
    let (values, height, width) = displayed_slice(&image, 3);
    let (mask, _, _) = displayed_slice(&label, 3);
    assert!(mask.iter().any(|&v| v > 0.5), "the slice crosses the cord");
    let expected = qc::render_overlay(
        Plane::new(&values, height, width).unwrap(),
        Some(Plane::new(&mask, height, width).unwrap()),
        None,
        &QcOptions {
            min_size: 280,
            ..QcOptions::default()
        },
    )
    .unwrap();
    assert_eq!((expected.width, expected.height), (280, 224));
    for row in 0..3 {
        assert!(
            tile(row, 0) == expected,
            "row {row}: the first column is not the original slice"
        );
        // The label contour is drawn in every column: the cord is inside the field of view throughout.
        for column in 0..5 {
            let green = tile(row, column)
                .pixels
                .chunks_exact(3)
                .filter(|p| *p == qc::LABEL_COLOUR)
                .count();
            assert!(
                green > 50,
                "row {row}, column {column}: {green} contour pixels"
            );
        }
    }
    // Random steps change the slice, and each draw differently.
    assert!(
        tile(0, 1) != expected,
        "RandomAffine left the slice untouched"
    );
    assert!(tile(0, 4) != tile(1, 4) && tile(1, 4) != tile(2, 4));

    // Same seed, same sheet; another seed, other draws but the same first column.
    let again = root.path().join("again");
    run(args(&again, "7"));
    assert_eq!(
        std::fs::read(again.join("preview_sub-ph01_T2w.png")).unwrap(),
        std::fs::read(&png).unwrap()
    );
    let other = root.path().join("other");
    run(args(&other, "8"));
    let other =
        decode_png(&std::fs::read(other.join("preview_sub-ph01_T2w.png")).unwrap()).unwrap();
    assert!(crop(&other, 0, 28, 280, 224) == expected);
    assert!(crop(&other, 4 * 284, 28, 280, 224) != tile(0, 4));
    let names: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(names.len(), 1, "only the PNG, no temporary file");
}

#[test]
fn preview_bad_pipeline_file_names_the_step() {
    let root = tempfile::tempdir().unwrap();
    let (image, _) = phantom_pair(&root.path().join("data"));
    let pipeline = root.path().join("bad.json");
    let preview = |pipeline: &Path| {
        run_ivado(
            &[
                "preview-transforms",
                "--config",
                pipeline.to_str().unwrap(),
                "--image",
                image.to_str().unwrap(),
                "-o",
                root.path().join("out").to_str().unwrap(),
            ],
            "warn",
        )
    };

    write_json(
        &pipeline,
        &json!([
            {"name": "NormalizeInstance", "config": {}},
            {"name": "RandomAffine", "config": {"degrees": 5.0, "bogus": 1}},
        ]),
    );
    let (ok, _, stderr) = preview(&pipeline);
    assert!(!ok);
    assert!(
        stderr.contains("bad.json") && stderr.contains("step 2 (`RandomAffine`)"),
        "{stderr}"
    );
    assert!(stderr.contains("bogus"), "{stderr}");

    // ivadomed's form: the entry is named by its position in `transformation` and its name.
    write_json(
        &pipeline,
        &json!({"transformation": {"CenterCrop": {"size": [16, 16]}, "RandomFlipp": {}}}),
    );
    let (ok, _, stderr) = preview(&pipeline);
    assert!(!ok);
    assert!(stderr.contains("step 2 (`RandomFlipp`)"), "{stderr}");
    assert!(
        !root.path().join("out").exists(),
        "nothing written on error"
    );
}

#[test]
fn bench_augment_prints_a_2d_and_a_3d_row_per_thread_count() {
    let (ok, stdout, stderr) = run_ivado(
        &[
            "bench",
            "augment",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--threads",
            "2",
        ],
        "warn",
    );
    assert!(ok, "bench failed:\n{stdout}\n{stderr}");
    // Rows: case (4 words), mode (2 words), threads, samples/s, ms/sample, CPU ms/sample.
    let rows: Vec<(String, usize, f64, f64)> = stdout
        .lines()
        .filter(|line| line.starts_with("2D ") || line.starts_with("3D "))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let n = fields.len();
            (
                fields[..n - 4].join(" "),
                fields[n - 4].parse().unwrap(),
                fields[n - 3].parse().unwrap(),
                fields[n - 2].parse().unwrap(),
            )
        })
        .collect();
    let cases: Vec<(&str, usize)> = rows.iter().map(|r| (r.0.as_str(), r.1)).collect();
    assert_eq!(
        cases,
        [
            ("2D 1x128x128 + label per sample", 1),
            ("2D 1x128x128 + label per sample", 2),
            ("2D 1x128x128 + label batched (18)", 1),
            ("2D 1x128x128 + label batched (18)", 2),
            ("3D 1x48x48x16 + label per sample", 1),
            ("3D 1x48x48x16 + label per sample", 2),
            ("3D 1x48x48x16 + label batched (18)", 1),
            ("3D 1x48x48x16 + label batched (18)", 2),
        ],
        "{stdout}"
    );
    for (case, threads, per_second, ms) in &rows {
        assert!(
            per_second.is_finite() && *per_second > 0.0 && ms.is_finite() && *ms > 0.0,
            "{case} x{threads}: {per_second} samples/s, {ms} ms/sample"
        );
    }
}
