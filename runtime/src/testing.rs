//! `ivado test`: ivadomed's `--test` on a finished training run. The run's test split (recorded by
//! `train(..., #{test: ...})` as `data.test_images`, in `manifest.json` and in the model folder) is segmented
//! with the run's model folder (through its detection stage for a cascade, [`crate::cascade::segment`]), the
//! predictions are written as ivadomed names them, `pred_masks/<image stem>_pred.nii.gz` (`sub-01_T2w_pred`,
//! ivadomed's `<subject>_<contrast>` taken from the label name), evaluated into ivadomed's
//! `results_eval/evaluation_3Dmetrics.csv` ([`crate::evaluate::evaluate_folder`]), and drawn as QC overlays,
//! `test_qc/<image stem>.png` (a few axial slices with the label outline in green and the prediction's in
//! red).
//!
//! A multi-class prediction is written one file per class, `<image stem>_pred_class-<k>.nii.gz`, the names
//! `ivado segment` and `ivado evaluate` use; ivadomed writes one 4D file instead (see docs/differences.md).
use crate::bids::BidsEntry;
use crate::cascade;
use crate::evaluate::{self, EvalOptions, EvalReport};
use crate::infer;
use crate::model_folder;
use crate::plugin::PluginRegistry;
use crate::report::run::{qc_grid, qc_indices, QC_SLICES};
use crate::report::{write_png, RgbImage};
use crate::volume::{read_volume, Volume};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const PREDICTIONS_DIR: &str = "pred_masks";
pub const RESULTS_DIR: &str = "results_eval";
pub const QC_DIR: &str = "test_qc";

/// One image of a recorded test split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestImage {
    pub subject: String,
    pub session: Option<String>,
    pub contrast: String,
    pub image: PathBuf,
    pub label: Option<PathBuf>,
}

/// An absolute form of `path` when it exists (so a run can be tested from another directory).
fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// Records `test` as the run's test split in a training `data` description: `split.test` (subjects, next to
/// `train` and `valid`) and `test_images` (what [`recorded_test_images`] reads back).
pub fn record_test_split(data: &mut Value, test: &[BidsEntry]) {
    let subjects: BTreeSet<&str> = test.iter().map(|e| e.subject.as_str()).collect();
    let images: Vec<Value> = test
        .iter()
        .map(|e| {
            json!({
                "subject": e.subject,
                "session": e.session,
                "contrast": e.contrast,
                "image": absolute(&e.image),
                "label": e.label.as_deref().map(absolute),
            })
        })
        .collect();
    if !data["split"].is_object() {
        data["split"] = json!({});
    }
    data["split"]["test"] = json!(subjects);
    data["test_images"] = Value::Array(images);
}

fn parse_test_images(data: &Value, source: &Path) -> Result<Vec<TestImage>> {
    let Some(list) = data["test_images"].as_array() else {
        let split = &data["split"];
        if split.is_object() {
            bail!(
                "{}: the run recorded no test split (only {}); give train(...) the held-out set, e.g. \
                 `test: parts.test`, so `ivado test` knows what to test",
                source.display(),
                split
                    .as_object()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>().join(" and "))
                    .unwrap_or_default()
            );
        }
        bail!(
            "{}: the run recorded no data split; give train(...) the held-out set, e.g. `test: parts.test`",
            source.display()
        );
    };
    ensure!(
        !list.is_empty(),
        "{}: the run's test split is empty: there is nothing to test",
        source.display()
    );
    list.iter()
        .map(|item| {
            let text = |key: &str| item[key].as_str().map(str::to_owned);
            Ok(TestImage {
                subject: text("subject").context("a test image without `subject`")?,
                session: text("session"),
                contrast: text("contrast").context("a test image without `contrast`")?,
                image: text("image")
                    .map(PathBuf::from)
                    .context("a test image without `image`")?,
                label: text("label").map(PathBuf::from),
            })
        })
        .collect::<Result<_>>()
        .with_context(|| format!("{}: invalid `test_images`", source.display()))
}

/// The test split a run recorded: from `<run>/manifest.json`, else from the description of `<run>/model`
/// (or of `run` itself when it is a model folder). Refuses a run without a recorded test split.
pub fn recorded_test_images(run_dir: &Path) -> Result<Vec<TestImage>> {
    let manifest = run_dir.join("manifest.json");
    let candidates = [
        (manifest.clone(), "data"),
        (
            run_dir.join("model").join(model_folder::CONFIG_FILE),
            "data",
        ),
        (run_dir.join(model_folder::CONFIG_FILE), "data"),
    ];
    for (path, key) in &candidates {
        if path.is_file() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let value: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", path.display()))?;
            return parse_test_images(&value[*key], path);
        }
    }
    bail!(
        "{} is not a training run folder: it has no manifest.json and no model folder",
        run_dir.display()
    )
}

/// The BIDS root of an image `<root>/<subject>/[<session>/]anat/<file>`: the folder above the subject's.
pub fn bids_root_of(image: &TestImage) -> Result<PathBuf> {
    image
        .image
        .ancestors()
        .find(|dir| {
            dir.file_name()
                .is_some_and(|name| name == image.subject.as_str())
        })
        .and_then(Path::parent)
        .map(Path::to_owned)
        .with_context(|| {
            format!(
                "{} is not inside a `{}` folder of a BIDS dataset",
                image.image.display(),
                image.subject
            )
        })
}

/// The label suffixes of the test images (`_seg-manual` from `sub-01_T2w_seg-manual.nii.gz`).
fn label_suffixes(images: &[TestImage]) -> Result<Vec<String>> {
    let suffixes: BTreeSet<String> = images
        .iter()
        .filter_map(|image| {
            let label = cascade::image_stem(image.label.as_deref()?);
            label
                .strip_prefix(&cascade::image_stem(&image.image))
                .map(str::to_owned)
        })
        .filter(|suffix| !suffix.is_empty())
        .collect();
    match suffixes.len() {
        0 => bail!(
            "no test image has a label, so there is nothing to evaluate against; give --target-suffix"
        ),
        1 => Ok(suffixes.into_iter().collect()),
        _ => bail!(
            "the test labels have several suffixes ({}); give the one per class with --target-suffix",
            suffixes.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Options of [`test_run`].
#[derive(Clone, Debug, PartialEq)]
pub struct TestOptions {
    /// Model folder; default `<run>/model`.
    pub model: Option<PathBuf>,
    /// Output folder for `pred_masks/`, `results_eval/` and `test_qc/`; default the run folder.
    pub out: Option<PathBuf>,
    /// Binarisation threshold of the written predictions.
    pub threshold: f64,
    /// Label suffix per class; empty: taken from the recorded test labels.
    pub target_suffixes: Vec<String>,
    /// Slices per forward pass; `None`: [`infer::default_batch_size`] of the device.
    pub batch_size: Option<usize>,
}

impl Default for TestOptions {
    fn default() -> Self {
        Self {
            model: None,
            out: None,
            threshold: 0.5,
            target_suffixes: Vec::new(),
            batch_size: None,
        }
    }
}

impl TestOptions {
    /// Rhai's `test_model` options: `model`, `out`, `threshold`, `target_suffix` (a string or a list).
    pub fn from_json(options: &Value) -> Result<Self> {
        let mut parsed = TestOptions::default();
        let Some(map) = options.as_object() else {
            bail!("test_model: options must be a map, got {options}");
        };
        for (key, value) in map {
            match key.as_str() {
                "model" | "out" => {
                    let path = value
                        .as_str()
                        .map(PathBuf::from)
                        .with_context(|| format!("test_model: `{key}` must be a path"))?;
                    if key == "model" {
                        parsed.model = Some(path);
                    } else {
                        parsed.out = Some(path);
                    }
                }
                "threshold" => {
                    parsed.threshold = value
                        .as_f64()
                        .context("test_model: `threshold` must be a number")?
                }
                "batch_size" => {
                    parsed.batch_size = Some(
                        value
                            .as_u64()
                            .filter(|&n| n > 0)
                            .context("test_model: `batch_size` must be a positive integer")?
                            as usize,
                    )
                }
                "target_suffix" => {
                    parsed.target_suffixes = match value {
                        Value::String(s) => vec![s.clone()],
                        Value::Array(list) => list
                            .iter()
                            .map(|v| v.as_str().map(str::to_owned))
                            .collect::<Option<_>>()
                            .context("test_model: `target_suffix` must be strings")?,
                        _ => bail!("test_model: `target_suffix` must be a string or a list"),
                    }
                }
                other => bail!(
                    "test_model: unknown option `{other}` (known: model, out, threshold, batch_size, target_suffix)"
                ),
            }
        }
        Ok(parsed)
    }
}

/// What [`test_run`] did.
pub struct TestReport {
    pub out_dir: PathBuf,
    pub model_dir: PathBuf,
    /// Every prediction file written.
    pub predictions: Vec<PathBuf>,
    /// One QC picture per test image.
    pub qc: Vec<PathBuf>,
    pub evaluation: EvalReport,
}

/// Removes the prediction files a previous test left in `dir`, so the evaluation sees this run's only.
fn clear_predictions(dir: &Path) -> Result<()> {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in listing {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && name.contains("_pred") && name.contains(".nii") {
            std::fs::remove_file(entry.path()).with_context(|| {
                format!("removing the old prediction {}", entry.path().display())
            })?;
        }
    }
    Ok(())
}

/// A QC grid of up to [`QC_SLICES`] axial slices of `source` (spread over the slices where the label, else
/// the prediction, has foreground), with the label and prediction outlines.
pub fn qc_picture(
    source: &Volume,
    soft: &Tensor,
    label: Option<&Volume>,
    threshold: f64,
) -> Result<RgbImage> {
    // Classes are drawn together: a voxel of any class is foreground.
    let prediction = if soft.dim() == 4 {
        soft.amax([0].as_slice(), false)
    } else {
        soft.shallow_clone()
    };
    let prediction = prediction.ge(threshold).to_kind(Kind::Float);
    let label = match label {
        Some(label) if label.data.size() == source.data.size() => Some(label.data.gt(0.5)),
        Some(label) => {
            tracing::warn!(
                "QC of {}: the label {} has shape {:?}, the image {:?}; drawn without it",
                source.path.display(),
                label.path.display(),
                label.data.size(),
                source.data.size()
            );
            None
        }
        None => None,
    };
    let marked = label.as_ref().unwrap_or(&prediction);
    let positive: Vec<bool> = Vec::<i64>::try_from(
        &marked
            .to_kind(Kind::Float)
            .sum_dim_intlist([0, 1].as_slice(), false, Kind::Float)
            .gt(0.0)
            .to_kind(Kind::Int64),
    )?
    .into_iter()
    .map(|v| v != 0)
    .collect();
    let indices = Tensor::from_slice(&qc_indices(&positive, QC_SLICES));
    let slices = |volume: &Tensor| {
        volume
            .to_kind(Kind::Float)
            .index_select(2, &indices)
            .permute([2, 0, 1])
            .unsqueeze(1)
    };
    let label = label.unwrap_or_else(|| source.data.zeros_like());
    qc_grid(&slices(&source.data), &slices(&label), &slices(&prediction))
}

/// Tests the model folder of `run_dir` (or `options.model`) on the run's recorded test split.
pub fn test_run(
    run_dir: &Path,
    registry: &PluginRegistry,
    device: Device,
    options: &TestOptions,
) -> Result<TestReport> {
    let images = recorded_test_images(run_dir)?;
    let model_dir = options
        .model
        .clone()
        .unwrap_or_else(|| run_dir.join("model"));
    ensure!(
        model_dir.join(model_folder::CONFIG_FILE).is_file(),
        "{} is not a model folder (no {}); give one with --model",
        model_dir.display(),
        model_folder::CONFIG_FILE
    );
    let loaded = model_folder::load(&model_dir, registry, device)?;
    let target_suffixes = if options.target_suffixes.is_empty() {
        label_suffixes(&images)?
    } else {
        options.target_suffixes.clone()
    };
    let roots: BTreeSet<PathBuf> = images.iter().map(bids_root_of).collect::<Result<_>>()?;
    let bids_root = match roots.len() {
        1 => roots.into_iter().next().expect("one root"),
        _ => bail!(
            "the test images come from {} datasets ({}); test them one dataset at a time",
            roots.len(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let out_dir = options.out.clone().unwrap_or_else(|| run_dir.to_owned());
    let predictions_dir = out_dir.join(PREDICTIONS_DIR);
    let qc_dir = out_dir.join(QC_DIR);
    clear_predictions(&predictions_dir)?;
    std::fs::create_dir_all(&qc_dir).with_context(|| format!("creating {}", qc_dir.display()))?;
    let mut predictions = Vec::new();
    let mut qc = Vec::new();
    for (index, image) in images.iter().enumerate() {
        let stem = cascade::image_stem(&image.image);
        let result = cascade::segment(
            &loaded,
            Some(model_dir.as_path()),
            registry,
            &image.image,
            device,
            options
                .batch_size
                .unwrap_or_else(|| infer::default_batch_size(device)),
        )
        .with_context(|| format!("segmenting {}", image.image.display()))?;
        let written = infer::write_segmentation(
            &result.source,
            &result.soft,
            &predictions_dir.join(format!("{stem}_pred.nii.gz")),
            options.threshold,
        )?;
        let label = match &image.label {
            Some(path) if path.is_file() => Some(read_volume(path)?),
            _ => None,
        };
        let picture = qc_picture(
            &result.source,
            &result.soft,
            label.as_ref(),
            options.threshold,
        )?;
        let png = qc_dir.join(format!("{stem}.png"));
        write_png(&png, &picture)?;
        println!(
            "[{}/{}] {} -> {}",
            index + 1,
            images.len(),
            image.image.display(),
            written
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        predictions.extend(written);
        qc.push(png);
    }
    let evaluation = evaluate::evaluate_folder(
        &predictions_dir,
        &bids_root,
        &EvalOptions {
            out_dir: Some(out_dir.join(RESULTS_DIR)),
            target_suffixes,
            ..EvalOptions::default()
        },
    )?;
    Ok(TestReport {
        out_dir,
        model_dir,
        predictions,
        qc,
        evaluation,
    })
}

/// The metrics the summary prints (ivadomed's main ones), by column prefix.
const SUMMARY_METRICS: &[&str] = &[
    "dice_class",
    "precision_class",
    "recall_class",
    "specificity_class",
    "rvd_class",
    "avd_class",
    "ltpr_class",
    "lfdr_class",
    "hd95_mm_class",
];

/// The printed summary: one line per image (Dice per class) and mean, std, min, max of the main metrics.
pub fn summary_text(report: &TestReport) -> String {
    use std::fmt::Write as _;
    let evaluation = &report.evaluation;
    let mut text = String::new();
    let dice_columns: Vec<&String> = evaluation
        .columns
        .iter()
        .filter(|c| c.starts_with("dice_class"))
        .collect();
    for image in &evaluation.images {
        let scores: Vec<String> = dice_columns
            .iter()
            .map(|c| format!("{c} {:.4}", image.metrics[c.as_str()]))
            .collect();
        let _ = writeln!(text, "{}: {}", image.image_id, scores.join("  "));
    }
    for skipped in &evaluation.skipped {
        let _ = writeln!(
            text,
            "not evaluated {}: {}",
            skipped.image_id, skipped.reason
        );
    }
    let _ = writeln!(
        text,
        "{:<20} {:>10} {:>10} {:>10} {:>10} {:>6}",
        "metric", "mean", "std", "min", "max", "count"
    );
    for s in evaluation
        .summary
        .iter()
        .filter(|s| SUMMARY_METRICS.iter().any(|p| s.metric.starts_with(p)))
    {
        let _ = writeln!(
            text,
            "{:<20} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>6}",
            s.metric, s.mean, s.std, s.min, s.max, s.count
        );
    }
    if let Some(dice) = evaluation.summary_of("dice_class0") {
        let _ = writeln!(
            text,
            "mean Dice {:.4} over {} test image(s) (model {})",
            dice.mean,
            dice.count,
            report.model_dir.display()
        );
    }
    let _ = writeln!(
        text,
        "wrote {} prediction(s) in {}, {} and {}, QC in {}",
        report.predictions.len(),
        report.out_dir.join(PREDICTIONS_DIR).display(),
        evaluation.metrics_csv.display(),
        evaluation.summary_csv.display(),
        report.out_dir.join(QC_DIR).display()
    );
    text
}

/// The report as a Rhai map: the evaluation's map (see [`evaluate::report_map`]) plus `predictions`, `qc`,
/// `dice` (mean Dice of class 0, `()` when undefined) and `model`.
pub fn report_map(report: &TestReport) -> rhai::Map {
    use rhai::{Array, Dynamic};
    let paths = |list: &[PathBuf]| -> Array {
        list.iter()
            .map(|p| Dynamic::from(p.display().to_string()))
            .collect()
    };
    let mut map = evaluate::report_map(&report.evaluation);
    map.insert("predictions".into(), paths(&report.predictions).into());
    map.insert("qc".into(), paths(&report.qc).into());
    map.insert(
        "dice".into(),
        report
            .evaluation
            .summary_of("dice_class0")
            .map(|s| Dynamic::from(s.mean))
            .unwrap_or(Dynamic::UNIT),
    );
    map.insert(
        "model".into(),
        Dynamic::from(report.model_dir.display().to_string()),
    );
    map
}

/// `ivado test`.
#[derive(clap::Args, Debug, Clone)]
pub struct TestArgs {
    /// Training run folder (holds manifest.json and model/).
    pub run: PathBuf,
    /// Model folder to test instead of <run>/model (e.g. a checkpoint).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output folder for pred_masks/, results_eval/ and test_qc/ (default: the run folder).
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Binarisation threshold of the predictions.
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f64,
    /// Label suffix per class (default: the suffix of the recorded test labels); repeatable.
    #[arg(long = "target-suffix", value_name = "SUFFIX")]
    pub target_suffixes: Vec<String>,
    /// Slices per forward pass [default: 2 on a CPU, where small batches run faster; 16 on a GPU].
    #[arg(long)]
    pub batch_size: Option<usize>,
}

/// Runs `ivado test` and prints the summary.
pub fn test_command(args: &TestArgs, registry: &PluginRegistry, device: Device) -> Result<()> {
    let options = TestOptions {
        model: args.model.clone(),
        out: args.out.clone(),
        threshold: args.threshold,
        target_suffixes: args.target_suffixes.clone(),
        batch_size: args.batch_size.map(|n| n.max(1)),
    };
    let report = test_run(&args.run, registry, device, &options)?;
    print!("{}", summary_text(&report));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(subject: &str, image: &str, label: Option<&str>) -> TestImage {
        TestImage {
            subject: subject.into(),
            session: None,
            contrast: "T2w".into(),
            image: image.into(),
            label: label.map(PathBuf::from),
        }
    }

    #[test]
    fn bids_root_and_label_suffix() {
        let image = entry(
            "sub-01",
            "/data/ds/sub-01/ses-02/anat/sub-01_ses-02_T2w.nii.gz",
            Some("/data/ds/derivatives/labels/sub-01/ses-02/anat/sub-01_ses-02_T2w_seg-manual.nii.gz"),
        );
        assert_eq!(bids_root_of(&image).unwrap(), PathBuf::from("/data/ds"));
        assert_eq!(
            label_suffixes(std::slice::from_ref(&image)).unwrap(),
            vec!["_seg-manual"]
        );
        let other = entry(
            "sub-02",
            "/data/ds/sub-02/anat/sub-02_T2w.nii.gz",
            Some("/data/ds/derivatives/labels/sub-02/anat/sub-02_T2w_lesion-manual.nii.gz"),
        );
        assert!(label_suffixes(&[image, other]).is_err());
        assert!(label_suffixes(&[entry("sub-03", "/d/sub-03/anat/sub-03_T2w.nii", None)]).is_err());
        assert!(bids_root_of(&entry("sub-04", "/elsewhere/x.nii.gz", None)).is_err());
    }

    #[test]
    fn recorded_split_round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("ivado-testing-split-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A run whose manifest has only train and valid subjects is refused, naming what it has.
        std::fs::write(
            dir.join("manifest.json"),
            r#"{"data": {"split": {"train": ["sub-01"], "valid": ["sub-02"]}}}"#,
        )
        .unwrap();
        let error = format!("{:#}", recorded_test_images(&dir).unwrap_err());
        assert!(
            error.contains("no test split") && error.contains("train and valid"),
            "{error}"
        );
        std::fs::write(dir.join("manifest.json"), r#"{"data": {}}"#).unwrap();
        assert!(format!("{:#}", recorded_test_images(&dir).unwrap_err()).contains("no data split"));
        // Recorded, then read back.
        let mut data = json!({"split": {"train": ["sub-01"], "valid": ["sub-02"]}});
        let root =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/data_functional_testing");
        let index = crate::bids::BidsIndex::scan(
            &root,
            &crate::bids::BidsQuery {
                target_suffix: "_seg-manual",
                contrasts: Some(&["T1w".to_string()]),
            },
        )
        .unwrap();
        let entries: Vec<BidsEntry> = index
            .entries
            .into_iter()
            .filter(|e| e.subject == "sub-unf03")
            .collect();
        record_test_split(&mut data, &entries);
        assert_eq!(data["split"]["test"], json!(["sub-unf03"]));
        std::fs::write(dir.join("manifest.json"), json!({"data": data}).to_string()).unwrap();
        let images = recorded_test_images(&dir).unwrap();
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(
            images,
            vec![TestImage {
                subject: "sub-unf03".into(),
                session: None,
                contrast: "T1w".into(),
                image: canonical(&root.join("sub-unf03/anat/sub-unf03_T1w.nii.gz")),
                label: Some(canonical(&root.join(
                    "derivatives/labels/sub-unf03/anat/sub-unf03_T1w_seg-manual.nii.gz"
                ))),
            }]
        );
        assert_eq!(bids_root_of(&images[0]).unwrap(), canonical(&root));
        record_test_split(&mut data, &[]);
        std::fs::write(dir.join("manifest.json"), json!({"data": data}).to_string()).unwrap();
        assert!(format!("{:#}", recorded_test_images(&dir).unwrap_err()).contains("empty"));
        std::fs::remove_dir_all(&dir).ok();
        assert!(recorded_test_images(&dir).is_err());
    }

    #[test]
    fn rhai_options() {
        let options = TestOptions::from_json(
            &json!({"model": "m", "threshold": 0.3, "target_suffix": "_seg-manual"}),
        )
        .unwrap();
        assert_eq!(options.model, Some(PathBuf::from("m")));
        assert_eq!(options.threshold, 0.3);
        assert_eq!(options.target_suffixes, vec!["_seg-manual"]);
        assert!(TestOptions::from_json(&json!({"thresh": 0.3})).is_err());
    }
}
