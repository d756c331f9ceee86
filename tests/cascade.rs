//! The object-detection cascade (boxes, crops, inference through test doubles and through trained model
//! folders) and `ivado test` / Rhai `test_model`, end to end on ivadomed's functional-testing data.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ivado_runtime::cascade::{
    self, adjust_box, crop_tensor, crop_volume, largest_object_extent, lookup_box,
    read_bounding_boxes, segment_with, write_bounding_boxes, BoundingBox, BoxSource, Stage,
};
use ivado_runtime::report::decode_png;
use ivado_runtime::volume::{read_volume, write_like, Affine, OutputType, Volume};
use ivado_tests::{run_ivado, shared_data};
use tch::{Kind, Tensor};

const FUNCTIONAL: &str = "data_functional_testing";

fn image_path(subject: &str, contrast: &str) -> PathBuf {
    std::fs::canonicalize(shared_data(&format!(
        "{FUNCTIONAL}/{subject}/anat/{subject}_{contrast}.nii.gz"
    )))
    .unwrap()
}

fn label_path(subject: &str, contrast: &str) -> PathBuf {
    shared_data(&format!(
        "{FUNCTIONAL}/derivatives/labels/{subject}/anat/{subject}_{contrast}_seg-manual.nii.gz"
    ))
}

/// `affine` moved to voxel `offset`, computed directly: the new origin is `affine · [offset, 1]`.
fn expected_shift(affine: &Affine, offset: [usize; 3]) -> Affine {
    let mut out = *affine;
    for (row, out_row) in out.iter_mut().enumerate().take(3) {
        out_row[3] = affine[row][0] * offset[0] as f64
            + affine[row][1] * offset[1] as f64
            + affine[row][2] * offset[2] as f64
            + affine[row][3];
    }
    out
}

fn assert_affine_close(actual: &Affine, expected: &Affine, what: &str) {
    for row in 0..4 {
        for column in 0..4 {
            assert!(
                (actual[row][column] - expected[row][column]).abs() < 1e-3,
                "{what}: affine {actual:?} != {expected:?}"
            );
        }
    }
}

fn ones_on(shape: [i64; 3], low: [i64; 3], high: [i64; 3], value: f64) -> Tensor {
    let volume = Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu));
    let _ = volume
        .narrow(0, low[0], high[0] - low[0])
        .narrow(1, low[1], high[1] - low[1])
        .narrow(2, low[2], high[2] - low[2])
        .fill_(value);
    volume
}

#[test]
fn ivadomed_bounding_box_file_is_read_and_round_trips() {
    // ivadomed's own file: keys are paths on the machine that wrote it, values the flat six numbers.
    let boxes = read_bounding_boxes(&shared_data(&format!(
        "{FUNCTIONAL}/bounding_box_dict.json"
    )))
    .unwrap();
    assert_eq!(boxes.len(), 2);
    for key in [
        "testing_data/sub-unf01/anat/sub-unf01_T1w.nii.gz",
        "testing_data/sub-unf01/anat/sub-unf01_T2w.nii.gz",
    ] {
        assert_eq!(boxes[key].to_ivadomed(), [7, 386, 113, 231, 1, 16]);
    }
    // Matched to our copy of the image by file name (only when asked: inference matches paths only).
    let t2w = image_path("sub-unf01", "T2w");
    assert_eq!(
        lookup_box(&boxes, &t2w, true).map(|b| b.to_ivadomed()),
        Some([7, 386, 113, 231, 1, 16])
    );
    assert_eq!(lookup_box(&boxes, &t2w, false), None);
    assert_eq!(
        lookup_box(&boxes, &image_path("sub-unf02", "T2w"), true),
        None
    );

    let dir = tempfile::tempdir().unwrap();
    let written = dir.path().join("bounding_box_dict.json");
    write_bounding_boxes(&written, &boxes).unwrap();
    assert_eq!(read_bounding_boxes(&written).unwrap(), boxes);
    // The written text is ivadomed's format: a flat list per image.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&written).unwrap()).unwrap();
    assert_eq!(
        json["testing_data/sub-unf01/anat/sub-unf01_T1w.nii.gz"],
        serde_json::json!([7, 386, 113, 231, 1, 16])
    );
    // ivadomed's newer format (one list per object) reads its first box.
    let nested = dir.path().join("nested.json");
    std::fs::write(
        &nested,
        r#"{"a.nii.gz": [[1, 5, 2, 6, 0, 3], [9, 10, 9, 10, 9, 10]]}"#,
    )
    .unwrap();
    assert_eq!(
        read_bounding_boxes(&nested).unwrap()["a.nii.gz"].to_ivadomed(),
        [1, 5, 2, 6, 0, 3]
    );
    std::fs::write(&nested, r#"{"a.nii.gz": [1, 5, 2]}"#).unwrap();
    assert!(read_bounding_boxes(&nested).is_err());
}

#[test]
fn a_crop_keeps_the_geometry_and_pads_back() {
    // The functional-testing volumes are RPI: two of the three canonical axes are flipped from the file's.
    let source = read_volume(&image_path("sub-unf01", "T2w")).unwrap();
    assert_eq!(source.shape(), [131, 141, 16]);
    let bbox = BoundingBox {
        min: [20, 30, 3],
        max: [90, 100, 12],
    };
    let crop = crop_volume(&source, &bbox).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crop.nii.gz");
    write_like(&crop, &crop.data, &path, OutputType::F32).unwrap();
    let back = read_volume(&path).unwrap();
    assert_eq!(back.shape(), [70, 70, 9]);
    assert_eq!(back.file_axcodes(), source.file_axcodes());
    assert_affine_close(
        &back.affine,
        &expected_shift(&source.affine, [20, 30, 3]),
        "crop",
    );
    // Voxel (0, 0, 0) of the crop is voxel (20, 30, 3) of the source, and so on for every voxel.
    assert!(back.data.equal(
        &source
            .data
            .narrow(0, 20, 70)
            .narrow(1, 30, 70)
            .narrow(2, 3, 9)
    ));
    assert_eq!(
        back.data.double_value(&[0, 0, 0]),
        source.data.double_value(&[20, 30, 3])
    );
    // Padding back: the source's shape, the crop at the box, zeros elsewhere.
    let full = cascade::pad_to(&back.data, &bbox, source.shape()).unwrap();
    assert_eq!(full.size(), vec![131, 141, 16]);
    assert!(crop_tensor(&full, &bbox).equal(&back.data));
    let outside = &full.abs().sum(Kind::Double) - crop_tensor(&full, &bbox).abs().sum(Kind::Double);
    assert_eq!(outside.double_value(&[]), 0.0);
}

/// A stage that thresholds the image it reads: the detection "model" and the second stage of the cascade
/// test. Records what it saw.
struct Threshold {
    above: f64,
    seen: RefCell<Vec<(Vec<i64>, Affine, PathBuf)>>,
    postprocessed: RefCell<Vec<Vec<i64>>>,
}

impl Threshold {
    fn new(above: f64) -> Self {
        Self {
            above,
            seen: RefCell::new(Vec::new()),
            postprocessed: RefCell::new(Vec::new()),
        }
    }
}

impl Stage for Threshold {
    fn predict(&self, image: &Path) -> anyhow::Result<(Volume, Tensor)> {
        let volume = read_volume(image)?;
        self.seen
            .borrow_mut()
            .push((volume.data.size(), volume.affine, image.to_owned()));
        let soft = volume.data.gt(self.above).to_kind(Kind::Float);
        Ok((volume, soft))
    }

    fn postprocess(&self, _source: &Volume, soft: &Tensor) -> anyhow::Result<Tensor> {
        self.postprocessed.borrow_mut().push(soft.size());
        Ok(soft.shallow_clone())
    }
}

#[test]
fn the_cascade_crops_the_second_stage_input_and_places_its_prediction() {
    let reference = read_volume(&image_path("sub-unf01", "T2w")).unwrap();
    let shape = [131, 141, 16];
    // A bright cuboid (the structure) and a small bright blob far from it (which the second stage would
    // segment too, were it not outside the box).
    let cuboid = ones_on(shape, [40, 50, 4], [60, 80, 10], 100.0);
    let blob = ones_on(shape, [5, 5, 1], [7, 7, 2], 100.0);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("sub-x_T2w.nii.gz");
    write_like(&reference, &(&cuboid + &blob), &image, OutputType::F32).unwrap();
    let source_affine = read_volume(&image).unwrap().affine;

    let detection = Threshold::new(50.0);
    let second = Threshold::new(50.0);
    let scratch = dir.path().join("scratch");
    let result = segment_with(
        BoxSource::Detection(&detection),
        &second,
        &image,
        [1.5, 1.5, 2.0],
        &scratch,
    )
    .unwrap();
    // The box by hand (ivadomed's adjust_bb_size on the cuboid's inclusive extent (40..59, 50..79, 4..9)):
    // x: span 19, length 28.5, start 40 - floor(4.75) = 36, end floor(36 + 28.5) = 64;
    // y: span 29, length 43.5, start 50 - floor(7.25) = 43, end floor(43 + 43.5) = 86;
    // z: span 5, length 10, start 4 - floor(2.5) = 2, end 12.
    let bbox = result.bbox.expect("the cuboid is detected");
    assert_eq!(bbox.to_ivadomed(), [36, 64, 43, 86, 2, 12]);
    // The second stage saw the crop only, with the source affine shifted by the box origin.
    let seen = second.seen.borrow();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, vec![28, 43, 10]);
    assert_affine_close(
        &seen[0].1,
        &expected_shift(&source_affine, [36, 43, 2]),
        "crop",
    );
    assert!(!seen[0].2.exists(), "the crop file is scratch and removed");
    // Post-processing ran once, on the full-size prediction.
    assert_eq!(*second.postprocessed.borrow(), vec![vec![131, 141, 16]]);
    // The prediction: full size, exactly the cuboid (the blob is outside the box).
    assert_eq!(result.soft.size(), vec![131, 141, 16]);
    assert!(result.soft.equal(&cuboid.gt(0.0).to_kind(Kind::Float)));
    assert_eq!(result.soft.double_value(&[40, 50, 4]), 1.0);
    assert_eq!(result.soft.double_value(&[59, 79, 9]), 1.0);
    assert_eq!(result.soft.double_value(&[5, 5, 1]), 0.0);
    assert_eq!(result.source.shape(), [131, 141, 16]);

    // Nothing detected: an empty prediction of the source's shape, and the second stage is not run.
    let empty = dir.path().join("sub-y_T2w.nii.gz");
    write_like(
        &reference,
        &Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)),
        &empty,
        OutputType::F32,
    )
    .unwrap();
    let second = Threshold::new(50.0);
    let nothing = segment_with(
        BoxSource::Detection(&detection),
        &second,
        &empty,
        [1.0; 3],
        &scratch,
    )
    .unwrap();
    assert_eq!(nothing.bbox, None);
    assert_eq!(nothing.soft.size(), vec![131, 141, 16]);
    assert_eq!(nothing.soft.sum(Kind::Double).double_value(&[]), 0.0);
    assert!(second.seen.borrow().is_empty());

    // A given box is used as is (clamped to the volume).
    let second = Threshold::new(50.0);
    let given = segment_with(
        BoxSource::Given(BoundingBox {
            min: [0, 0, 0],
            max: [50, 200, 16],
        }),
        &second,
        &image,
        [1.0; 3],
        &scratch,
    )
    .unwrap();
    assert_eq!(given.bbox.unwrap().to_ivadomed(), [0, 50, 0, 141, 0, 16]);
    // Inside x < 50: the blob and the cuboid's x 40..49 part.
    let expected = (&cuboid + &blob).gt(0.0).to_kind(Kind::Float);
    let _ = expected.narrow(0, 50, 81).fill_(0.0);
    assert!(given.soft.equal(&expected));
}

/// A Rhai script file in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

/// Tiny, fast training options shared by the scripts below (Rhai map body).
const TINY: &str = r#"
    preprocess: [transform("CenterCrop", #{ size: [64, 64] }), transform("NormalizeInstance", #{})],
    epochs: 2,
    batch_size: 16,
    learning_rate: 0.003,
    seed: 3,
"#;

/// Dice of two binary volumes, counted voxel by voxel.
fn dice(prediction: &Tensor, label: &Tensor) -> f64 {
    let (p, l) = (prediction.gt(0.5), label.gt(0.5));
    let both = p.logical_and(&l).sum(Kind::Double).double_value(&[]);
    let total = p.sum(Kind::Double).double_value(&[]) + l.sum(Kind::Double).double_value(&[]);
    if total == 0.0 {
        f64::NAN
    } else {
        2.0 * both / total
    }
}

#[test]
fn ivado_test_segments_evaluates_and_draws_the_recorded_test_split() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(shared_data(FUNCTIONAL)).unwrap();
    let run = dir.path().join("run");
    let untested = dir.path().join("untested");
    let body = format!(
        r#"
let dataset = bids("{root}", #{{ target_suffix: "_seg-manual", contrasts: ["T1w", "T2w"] }});
let opts = #{{ {TINY} }};
let net = model("unet2d", #{{ depth: 2, n_filters: 4 }});
opts.train = subset(dataset, ["sub-unf01"]);
opts.valid = subset(dataset, ["sub-unf02"]);
opts.test = subset(dataset, ["sub-unf03"]);
opts.out = "{run}";
train(net, opts);
let r = test_model("{run}", #{{ out: "{run}/rhai_test" }});
print(`RHAI ${{r.images}} ${{r.dice}}`);
opts.remove("test");
opts.epochs = 1;
opts.out = "{untested}";
train(model("unet2d", #{{ depth: 2, n_filters: 4 }}), opts);
"#,
        root = root.display(),
        run = run.display(),
        untested = untested.display(),
    );
    let path = script(dir.path(), "train.rhai", &body);
    let (ok, script_stdout, stderr) = run_ivado(&["run", &path], "warn");
    assert!(ok, "{script_stdout}\n{stderr}");

    // The CLI on the same run.
    let (ok, stdout, stderr) = run_ivado(&["test", &run.display().to_string()], "warn");
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("mean Dice"), "{stdout}");

    // Predictions named as ivadomed names them, one per test image, nothing else.
    let predictions = run.join("pred_masks");
    let mut names: Vec<String> = std::fs::read_dir(&predictions)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_pred.nii.gz"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["sub-unf03_T1w_pred.nii.gz", "sub-unf03_T2w_pred.nii.gz"]
    );

    // ivadomed's CSV: one row per test image, its columns, and Dice equal to one counted here.
    let csv = std::fs::read_to_string(run.join("results_eval/evaluation_3Dmetrics.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(&header[..3], ["image_id", "subject", "contrast"]);
    for column in [
        "dice_class0",
        "vol_pred_class0",
        "vol_gt_class0",
        "precision_class0",
        "recall_class0",
    ] {
        assert!(header.contains(&column), "{column} missing from {header:?}");
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    let dice_column = header.iter().position(|c| *c == "dice_class0").unwrap();
    let mut mean = 0.0;
    for (row, contrast) in rows.iter().zip(["T1w", "T2w"]) {
        assert_eq!(row[0], format!("sub-unf03_{contrast}"));
        assert_eq!(row[1], "sub-unf03");
        assert_eq!(row[2], contrast);
        let prediction =
            read_volume(&predictions.join(format!("sub-unf03_{contrast}_pred.nii.gz"))).unwrap();
        let source = read_volume(&image_path("sub-unf03", contrast)).unwrap();
        assert_eq!(prediction.shape(), source.shape());
        assert_affine_close(&prediction.affine, &source.affine, "prediction");
        let label = read_volume(&label_path("sub-unf03", contrast)).unwrap();
        let counted = dice(&prediction.data, &label.data);
        let reported: f64 = row[dice_column].parse().unwrap_or(f64::NAN);
        assert!(
            (counted - reported).abs() < 1e-6 || (counted.is_nan() && reported.is_nan()),
            "{contrast}: CSV Dice {reported}, counted {counted}"
        );
        mean += counted / 2.0;
    }

    // QC overlays decode.
    for contrast in ["T1w", "T2w"] {
        let png = run.join(format!("test_qc/sub-unf03_{contrast}.png"));
        let picture = decode_png(&std::fs::read(&png).unwrap()).unwrap();
        assert!(picture.width >= 256 && picture.height >= 256, "{png:?}");
    }

    // Rhai's test_model gave the same numbers in its own folder.
    let line = stdout_line(&script_stdout, "RHAI");
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts[1], "2");
    let rhai_dice: f64 = parts[2].parse().unwrap();
    assert!(
        (rhai_dice - mean).abs() < 1e-6,
        "Rhai {rhai_dice}, counted {mean}"
    );
    assert!(run
        .join("rhai_test/results_eval/evaluation_3Dmetrics.csv")
        .is_file());

    // A run without a recorded test split is refused, saying why.
    let (ok, _, stderr) = run_ivado(&["test", &untested.display().to_string()], "warn");
    assert!(!ok);
    assert!(stderr.contains("no test split"), "{stderr}");
    // And a folder that is no run at all.
    let (ok, _, stderr) = run_ivado(&["test", &dir.path().display().to_string()], "warn");
    assert!(!ok);
    assert!(stderr.contains("not a training run folder"), "{stderr}");
}

fn stdout_line(text: &str, prefix: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix} in:\n{text}"))
        .to_owned()
}

#[test]
fn a_cascade_trains_on_crops_and_segments_at_full_size() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(shared_data(FUNCTIONAL)).unwrap();
    // Boxes for every subject, from the labels (the structure's largest object, factor [2, 2, 1]), with
    // absolute keys: ivadomed's file covers the whole dataset, test images included.
    let mut boxes = BTreeMap::new();
    for subject in ["sub-unf01", "sub-unf02", "sub-unf03"] {
        let label = read_volume(&label_path(subject, "T2w")).unwrap();
        let extent = largest_object_extent(&label.data, 0.5).unwrap().unwrap();
        let bbox = adjust_box(extent, [2.0, 2.0, 1.0], label.shape());
        boxes.insert(image_path(subject, "T2w").display().to_string(), bbox);
    }
    let boxes_file = dir.path().join("given_boxes.json");
    write_bounding_boxes(&boxes_file, &boxes).unwrap();
    let (detection_run, run) = (dir.path().join("detection"), dir.path().join("cascade"));
    let body = format!(
        r#"
let dataset = bids("{root}", #{{ target_suffix: "_seg-manual", contrasts: ["T2w"] }});
let opts = #{{ {TINY} }};
opts.train = subset(dataset, ["sub-unf01"]);
opts.valid = subset(dataset, ["sub-unf02"]);
opts.out = "{detection_run}";
train(model("unet2d", #{{ depth: 2, n_filters: 4 }}), opts);
opts.test = subset(dataset, ["sub-unf03"]);
opts.out = "{run}";
opts.object_detection = #{{ model: "{detection_run}/model", bounding_boxes: "{boxes_file}", safety_factor: [2.0, 2.0, 1.0] }};
train(model("unet2d", #{{ depth: 2, n_filters: 4 }}), opts);
"#,
        root = root.display(),
        detection_run = detection_run.display(),
        run = run.display(),
        boxes_file = boxes_file.display(),
    );
    let path = script(dir.path(), "cascade.rhai", &body);
    let (ok, stdout, stderr) = run_ivado(&["run", &path], "warn");
    assert!(ok, "{stdout}\n{stderr}");

    // The boxes, in the run folder and the model folder; the detection model copied; the stage recorded.
    assert_eq!(
        read_bounding_boxes(&run.join("bounding_box_dict.json")).unwrap(),
        boxes
    );
    assert_eq!(
        read_bounding_boxes(&run.join("model/bounding_box_dict.json")).unwrap(),
        boxes
    );
    assert!(run.join("model/detection_model/ivado_model.json").is_file());
    assert!(run
        .join("model/detection_model/model.safetensors")
        .is_file());
    let description: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("model/ivado_model.json")).unwrap())
            .unwrap();
    assert_eq!(
        description["data"]["object_detection"]["safety_factor"],
        serde_json::json!([2.0, 2.0, 1.0])
    );

    // The crops trained on: image and label cut to the box, with the shifted affine.
    let t2w = image_path("sub-unf01", "T2w");
    let bbox = boxes[&t2w.display().to_string()];
    let source = read_volume(&t2w).unwrap();
    let crop = read_volume(&run.join("cascade_crops/sub-unf01/anat/sub-unf01_T2w.nii.gz")).unwrap();
    let shape = bbox.shape();
    assert_eq!(crop.shape(), shape);
    assert_affine_close(
        &crop.affine,
        &expected_shift(&source.affine, bbox.min),
        "image crop",
    );
    assert!(crop.data.equal(&crop_tensor(&source.data, &bbox)));
    let label = read_volume(&label_path("sub-unf01", "T2w")).unwrap();
    let label_crop =
        read_volume(&run.join(
            "cascade_crops/derivatives/labels/sub-unf01/anat/sub-unf01_T2w_seg-manual.nii.gz",
        ))
        .unwrap();
    assert!(label_crop.data.equal(&crop_tensor(&label.data, &bbox)));

    // `ivado test`: the test image's box comes from the recorded boxes; the prediction is full size, in the
    // source's grid, and zero outside the box.
    let (ok, stdout, stderr) = run_ivado(&["test", &run.display().to_string()], "warn");
    assert!(ok, "{stdout}\n{stderr}");
    let test_image = image_path("sub-unf03", "T2w");
    let test_box = boxes[&test_image.display().to_string()];
    let prediction = read_volume(&run.join("pred_masks/sub-unf03_T2w_pred.nii.gz")).unwrap();
    let test_source = read_volume(&test_image).unwrap();
    assert_eq!(prediction.shape(), test_source.shape());
    assert_affine_close(&prediction.affine, &test_source.affine, "test prediction");
    let inside = crop_tensor(&prediction.data, &test_box)
        .sum(Kind::Double)
        .double_value(&[]);
    let total = prediction.data.sum(Kind::Double).double_value(&[]);
    assert_eq!(total, inside, "the prediction reaches outside the box");
    let csv = std::fs::read_to_string(run.join("results_eval/evaluation_3Dmetrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(
        csv.lines().nth(1).unwrap().starts_with("sub-unf03_T2w,"),
        "{csv}"
    );

    // `ivado segment` on the model folder: a recorded image goes through its box ...
    let out = dir.path().join("segmented_pred.nii.gz");
    let (ok, stdout, stderr) = run_ivado(
        &[
            "segment",
            "--model",
            &run.join("model").display().to_string(),
            &test_image.display().to_string(),
            "-o",
            &out.display().to_string(),
        ],
        "warn",
    );
    assert!(ok, "{stdout}\n{stderr}");
    let segmented = read_volume(&out).unwrap();
    assert!(
        segmented.data.equal(&prediction.data),
        "segment and test agree"
    );
    // ... and an image the boxes do not know goes through the detection model (the trained one): full size
    // in the source's grid, whatever it detects.
    let copy = dir.path().join("sub-new_T2w.nii.gz");
    std::fs::copy(&test_image, &copy).unwrap();
    let out = dir.path().join("new_pred.nii.gz");
    let (ok, stdout, stderr) = run_ivado(
        &[
            "segment",
            "--model",
            &run.join("model").display().to_string(),
            &copy.display().to_string(),
            "-o",
            &out.display().to_string(),
        ],
        "warn",
    );
    assert!(ok, "{stdout}\n{stderr}");
    let detected = read_volume(&out).unwrap();
    assert_eq!(detected.shape(), test_source.shape());
    assert_affine_close(&detected.affine, &test_source.affine, "detected prediction");
}
