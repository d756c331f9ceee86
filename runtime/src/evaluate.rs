//! Evaluation of a folder of predictions against a BIDS dataset's labels, as ivadomed's `evaluate` and
//! `Evaluation3DMetrics` (`evaluation.py`), plus ivadomed's threshold analysis (`--thr-increment`,
//! `testing.threshold_analysis`).
//!
//! Predictions are found by name, as ivadomed writes them: `<image id>_pred.nii.gz` (one class), or
//! `<image id>_pred_class-<k>.nii.gz` for class `k` of a multi-class prediction (the files `ivado segment`
//! writes), and their soft counterparts `<image id>_pred_soft[_class-<k>].nii.gz`. The image id is the BIDS
//! image stem (`sub-01_T2w`, ivadomed's `subj_acq`), or `<subject>_<contrast>` when that names one image
//! of the dataset. Class `k` is compared with the label `derivatives/labels/<sub>[/<ses>]/anat/<image
//! stem><target suffix k>.nii[.gz]`. A prediction and its label must share the voxel grid
//! ([`check_alignment`]).
//!
//! [`evaluate_folder`] writes, in the output folder:
//! - `evaluation_3Dmetrics.csv` (ivadomed's name): one row per image, `image_id`, `subject`, `contrast`
//!   and the columns of [`metrics::image_metrics`]; NaN cells are empty, as pandas writes them;
//! - `evaluation_summary.csv`: mean, std, median, min and max of every metric column over the images,
//!   NaN-aware, with the count of valid (non-NaN) values;
//! - one painted lesion map per prediction file, `<prediction stem>_painted.nii.gz` (ivadomed's name),
//!   with the prediction's header: every lesion is painted by its detection outcome, [`TP_COLOUR`] (1) for a
//!   predicted lesion that counts as a detection, [`FP_COLOUR`] (2) for a false positive predicted lesion,
//!   [`FN_COLOUR`] (3) for a missed ground-truth lesion, 0 elsewhere;
//! - with a threshold sweep, `threshold_analysis.csv` and `threshold_analysis.png` (see
//!   [`threshold_analysis`]).
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::bids::{BidsEntry, BidsIndex, BidsQuery};
use crate::cascade;
use crate::metrics::{
    self, lesion_detection, remove_small_objects, LesionOptions, LesionOverlap, Mask,
    MetricsOptions, ObjectSize, OverlapCriterion, SizeBins, SizeUnit, VoxelCounts,
};
use crate::model_folder::write_atomic;
use crate::report::{curves, write_png, RgbImage};
use crate::volume::{read_label, read_volume, write_like, Affine, OutputType, Volume};
use ivado_sdk::components::Connectivity;

/// ivadomed's per-image metrics file name.
pub const METRICS_CSV: &str = "evaluation_3Dmetrics.csv";
pub const SUMMARY_CSV: &str = "evaluation_summary.csv";
pub const THRESHOLD_CSV: &str = "threshold_analysis.csv";
pub const THRESHOLD_PNG: &str = "threshold_analysis.png";

/// Painted-map value of a predicted lesion that counts as a detection (ivadomed's `TP_COLOUR`).
pub const TP_COLOUR: u8 = 1;
/// Painted-map value of a predicted lesion without enough ground-truth overlap (ivadomed's `FP_COLOUR`).
pub const FP_COLOUR: u8 = 2;
/// Painted-map value of a ground-truth lesion that was not detected (ivadomed's `FN_COLOUR`).
pub const FN_COLOUR: u8 = 3;

/// Colours of the threshold plot: matplotlib's `tab10` green, blue, orange, and red for the best threshold.
pub const PLOT_DICE_COLOUR: [u8; 3] = curves::VALID_DICE_COLOUR;
pub const PLOT_LTPR_COLOUR: [u8; 3] = curves::TRAIN_LOSS_COLOUR;
pub const PLOT_LFDR_COLOUR: [u8; 3] = curves::VALID_LOSS_COLOUR;
pub const PLOT_BEST_COLOUR: [u8; 3] = [214, 39, 40];
pub const PLOT_WIDTH: u32 = 900;
pub const PLOT_HEIGHT: u32 = 600;

/// Voxel positions (mm) may differ by this much between a prediction and its label without a warning:
/// float32 headers written by different tools round differently.
const AFFINE_TOLERANCE_MM: f64 = 1e-3;

/// What to do with a prediction whose label is missing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingLabelPolicy {
    /// Report it (a warning, and [`EvalReport::skipped`]) and evaluate the others.
    #[default]
    Skip,
    /// Stop with an error naming the label that was looked for.
    Fail,
}

impl MissingLabelPolicy {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "skip" => Ok(Self::Skip),
            "fail" => Ok(Self::Fail),
            other => bail!("missing-label policy must be `skip` or `fail`, got `{other}`"),
        }
    }
}

/// A sweep of binarisation thresholds (ivadomed's `--thr-increment`): `low + k * increment` for
/// `k = 1, 2, ...` while below `high`, so the default range (0, 1) with 0.1 gives ivadomed's 0.1..0.9.
#[derive(Clone, Debug, PartialEq)]
pub struct ThresholdSweep {
    pub increment: f64,
    pub low: f64,
    pub high: f64,
    /// Also average the lesion TPR and FDR per threshold.
    pub lesion_metrics: bool,
}

impl ThresholdSweep {
    pub fn new(increment: f64) -> Self {
        Self {
            increment,
            low: 0.0,
            high: 1.0,
            lesion_metrics: false,
        }
    }

    /// The thresholds of the sweep, rounded to 1e-9 so that `0.1 * 3` reads `0.3`.
    pub fn thresholds(&self) -> Result<Vec<f64>> {
        ensure!(
            self.increment.is_finite() && self.increment > 0.0,
            "threshold increment must be a positive number, got {}",
            self.increment
        );
        ensure!(
            self.low.is_finite() && self.high.is_finite() && self.low < self.high,
            "threshold range must be low < high, got [{}, {}]",
            self.low,
            self.high
        );
        let thresholds: Vec<f64> = (1..)
            .map(|k| ((self.low + k as f64 * self.increment) * 1e9).round() / 1e9)
            .take_while(|&t| t < self.high - 1e-12)
            .collect();
        ensure!(
            !thresholds.is_empty(),
            "increment {} leaves no threshold strictly inside ({}, {})",
            self.increment,
            self.low,
            self.high
        );
        Ok(thresholds)
    }
}

/// Options of [`evaluate_folder`].
#[derive(Clone, Debug, PartialEq)]
pub struct EvalOptions {
    /// Output folder; default: `results_eval` next to the predictions folder (ivadomed's layout,
    /// `<output>/pred_masks` and `<output>/results_eval`).
    pub out_dir: Option<PathBuf>,
    /// One label suffix per class, ivadomed's `target_suffix`; default `["_seg-manual"]`.
    pub target_suffixes: Vec<String>,
    /// Binarisation threshold and lesion-detection settings.
    pub metrics: MetricsOptions,
    pub missing_label: MissingLabelPolicy,
    /// Run a threshold analysis too.
    pub threshold_sweep: Option<ThresholdSweep>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            out_dir: None,
            target_suffixes: vec!["_seg-manual".to_string()],
            metrics: MetricsOptions::default(),
            missing_label: MissingLabelPolicy::Skip,
            threshold_sweep: None,
        }
    }
}

/// `vox` or `mm3`.
pub fn parse_size_unit(name: &str) -> Result<SizeUnit> {
    match name {
        "vox" => Ok(SizeUnit::Voxels),
        "mm3" => Ok(SizeUnit::Mm3),
        other => bail!("size unit must be `vox` or `mm3`, got `{other}`"),
    }
}

/// ivadomed's `overlap` parameter: `thr` with unit `vox`, `mm3` or `ratio`.
pub fn parse_overlap(value: f64, unit: &str) -> Result<OverlapCriterion> {
    ensure!(
        value.is_finite() && value >= 0.0,
        "overlap must be a non-negative number, got {value}"
    );
    match unit {
        "vox" => Ok(OverlapCriterion::Voxels(value)),
        "mm3" => Ok(OverlapCriterion::Mm3(value)),
        "ratio" => {
            ensure!(
                value <= 1.0,
                "an overlap ratio must be in [0, 1], got {value}"
            );
            Ok(OverlapCriterion::Ratio(value))
        }
        other => bail!("overlap unit must be `vox`, `mm3` or `ratio`, got `{other}`"),
    }
}

/// 6, 18 (ivadomed's) or 26.
pub fn parse_connectivity(neighbours: i64) -> Result<Connectivity> {
    match neighbours {
        6 => Ok(Connectivity::Six),
        18 => Ok(Connectivity::Eighteen),
        26 => Ok(Connectivity::TwentySix),
        other => bail!("connectivity must be 6, 18 or 26, got {other}"),
    }
}

fn normalize_suffix(suffix: &str) -> String {
    if suffix.starts_with('_') {
        suffix.to_string()
    } else {
        format!("_{suffix}")
    }
}

impl EvalOptions {
    /// Options from a JSON object (the Rhai options map). Keys: `out`, `target_suffix` (a string or a list,
    /// one per class), `threshold`, `overlap`, `overlap_unit` (`vox`, `mm3`, `ratio`), `target_size` (a list
    /// of bin bounds), `target_size_unit`, `remove_small`, `remove_small_unit`, `connectivity` (6, 18, 26),
    /// `missing_label` (`skip`, `fail`), `thr_increment`, `thr_range` (`[low, high]`),
    /// `thr_lesion_metrics`. Unknown keys are errors.
    pub fn from_json(options: &Value) -> Result<Self> {
        const KNOWN: [&str; 14] = [
            "out",
            "target_suffix",
            "threshold",
            "overlap",
            "overlap_unit",
            "target_size",
            "target_size_unit",
            "remove_small",
            "remove_small_unit",
            "connectivity",
            "missing_label",
            "thr_increment",
            "thr_range",
            "thr_lesion_metrics",
        ];
        let map = match options {
            Value::Object(map) => map.clone(),
            Value::Null => Default::default(),
            other => bail!("evaluation options must be a map, got {other}"),
        };
        for key in map.keys() {
            ensure!(
                KNOWN.contains(&key.as_str()),
                "unknown evaluation option `{key}` (known: {})",
                KNOWN.join(", ")
            );
        }
        let number = |key: &str| -> Result<Option<f64>> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(value) => value
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| anyhow!("option `{key}` must be a number, got {value}")),
            }
        };
        let string = |key: &str, default: &str| -> Result<String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(value) => bail!("option `{key}` must be a string, got {value}"),
            }
        };
        let numbers = |key: &str| -> Result<Option<Vec<f64>>> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_f64()
                            .ok_or_else(|| anyhow!("option `{key}` must hold numbers, got {v}"))
                    })
                    .collect::<Result<Vec<f64>>>()
                    .map(Some),
                Some(value) => bail!("option `{key}` must be a list of numbers, got {value}"),
            }
        };

        let mut options = EvalOptions::default();
        if let Some(out) = map.get("out") {
            let out = out
                .as_str()
                .ok_or_else(|| anyhow!("option `out` must be a path string, got {out}"))?;
            options.out_dir = Some(PathBuf::from(out));
        }
        match map.get("target_suffix") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => options.target_suffixes = vec![s.clone()],
            Some(Value::Array(items)) => {
                options.target_suffixes = items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            anyhow!("option `target_suffix` must hold strings, got {v}")
                        })
                    })
                    .collect::<Result<_>>()?;
            }
            Some(value) => bail!("option `target_suffix` must be a string or a list, got {value}"),
        }
        if let Some(threshold) = number("threshold")? {
            options.metrics.threshold = threshold;
        }
        let lesions = &mut options.metrics.lesions;
        if let Some(overlap) = number("overlap")? {
            lesions.overlap = parse_overlap(overlap, &string("overlap_unit", "vox")?)?;
        } else if map.contains_key("overlap_unit") {
            bail!("option `overlap_unit` needs `overlap`");
        }
        if let Some(bounds) = numbers("target_size")? {
            lesions.target_size = Some(SizeBins {
                thresholds: bounds,
                unit: parse_size_unit(&string("target_size_unit", "vox")?)?,
            });
        }
        if let Some(size) = number("remove_small")? {
            lesions.remove_small = Some(ObjectSize {
                value: size,
                unit: parse_size_unit(&string("remove_small_unit", "vox")?)?,
            });
        }
        if let Some(neighbours) = map.get("connectivity") {
            let neighbours = neighbours
                .as_i64()
                .ok_or_else(|| anyhow!("option `connectivity` must be 6, 18 or 26"))?;
            lesions.connectivity = parse_connectivity(neighbours)?;
        }
        options.missing_label = MissingLabelPolicy::parse(&string("missing_label", "skip")?)?;
        if let Some(increment) = number("thr_increment")? {
            let mut sweep = ThresholdSweep::new(increment);
            if let Some(range) = numbers("thr_range")? {
                let [low, high] = range[..] else {
                    bail!("option `thr_range` must be [low, high], got {range:?}");
                };
                (sweep.low, sweep.high) = (low, high);
            }
            sweep.lesion_metrics = match map.get("thr_lesion_metrics") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(value) => bail!("option `thr_lesion_metrics` must be a bool, got {value}"),
            };
            options.threshold_sweep = Some(sweep);
        } else if map.contains_key("thr_range") || map.contains_key("thr_lesion_metrics") {
            bail!("options `thr_range` and `thr_lesion_metrics` need `thr_increment`");
        }
        options.validate()?;
        Ok(options)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            !self.target_suffixes.is_empty(),
            "at least one target suffix is needed"
        );
        ensure!(
            self.target_suffixes
                .iter()
                .all(|s| !s.trim_matches('_').is_empty()),
            "target suffixes must not be empty: {:?}",
            self.target_suffixes
        );
        let threshold = self.metrics.threshold;
        ensure!(
            threshold.is_finite(),
            "threshold must be a number, got {threshold}"
        );
        if let Some(sweep) = &self.threshold_sweep {
            sweep.thresholds()?;
        }
        Ok(())
    }

    fn suffixes(&self) -> Vec<String> {
        self.target_suffixes
            .iter()
            .map(|s| normalize_suffix(s))
            .collect()
    }

    /// The output folder for `predictions_dir`.
    pub fn out_dir_for(&self, predictions_dir: &Path) -> PathBuf {
        match &self.out_dir {
            Some(dir) => dir.clone(),
            None => predictions_dir
                .parent()
                .unwrap_or(Path::new(""))
                .join("results_eval"),
        }
    }
}

/// The prediction files of one image: hard (binary) and soft maps, one file per class each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PredictionFiles {
    pub image_id: String,
    /// `_pred` files, class order; empty when only soft maps exist.
    pub hard: Vec<PathBuf>,
    /// `_pred_soft` files, class order; empty when there are none.
    pub soft: Vec<PathBuf>,
    /// Whether the files carry `_class-<k>` (several classes, or an explicit single class).
    pub per_class: bool,
}

impl PredictionFiles {
    pub fn classes(&self) -> usize {
        self.hard.len().max(self.soft.len())
    }
}

/// What a prediction file name says: image id, soft or not, class.
fn parse_prediction_name(name: &str) -> Option<(String, bool, Option<usize>)> {
    let stem = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))?;
    let (rest, class) = match stem.rsplit_once("_class-") {
        Some((rest, k)) if !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) => {
            (rest, Some(k.parse().ok()?))
        }
        _ => (stem, None),
    };
    let (id, soft) = if let Some(id) = rest.strip_suffix("_pred_soft") {
        (id, true)
    } else {
        (rest.strip_suffix("_pred")?, false)
    };
    (!id.is_empty()).then(|| (id.to_string(), soft, class))
}

/// Finds the prediction files of `dir`, grouped by image id (sorted). Errors on a folder without any,
/// on an image with both `_pred` and `_pred_class-<k>` files, and on a gap in its class numbers.
pub fn find_predictions(dir: &Path) -> Result<Vec<PredictionFiles>> {
    ensure!(
        dir.is_dir(),
        "predictions folder {} does not exist",
        dir.display()
    );
    // image id -> (soft?) -> class (None: no `_class-`) -> path
    type ByKind = BTreeMap<bool, BTreeMap<Option<usize>, PathBuf>>;
    let mut found: BTreeMap<String, ByKind> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        let Some((id, soft, class)) = parse_prediction_name(&name) else {
            continue;
        };
        let slot = found.entry(id).or_default().entry(soft).or_default();
        if let Some(previous) = slot.insert(class, entry.path()) {
            bail!(
                "two prediction files for the same image and class: {} and {}",
                previous.display(),
                entry.path().display()
            );
        }
    }
    ensure!(
        !found.is_empty(),
        "no predictions in {} (expected <image>_pred.nii.gz, <image>_pred_class-<k>.nii.gz or \
         <image>_pred_soft.nii.gz files)",
        dir.display()
    );
    let mut predictions = Vec::with_capacity(found.len());
    for (image_id, kinds) in found {
        let mut files = PredictionFiles {
            image_id: image_id.clone(),
            ..Default::default()
        };
        let mut per_class = BTreeSet::new();
        for (soft, classes) in kinds {
            let explicit = classes.keys().any(Option::is_some);
            if explicit && classes.contains_key(&None) {
                bail!(
                    "image {image_id} has both a single-class prediction and _class-<k> files in {}",
                    dir.display()
                );
            }
            for (expected, class) in classes.keys().enumerate() {
                if explicit && *class != Some(expected) {
                    bail!(
                        "image {image_id}: the class files in {} are not numbered 0, 1, ... (found {:?})",
                        dir.display(),
                        classes.keys().flatten().collect::<Vec<_>>()
                    );
                }
            }
            per_class.insert(explicit);
            let paths: Vec<PathBuf> = classes.into_values().collect();
            if soft {
                files.soft = paths;
            } else {
                files.hard = paths;
            }
        }
        if !files.hard.is_empty() && !files.soft.is_empty() && files.hard.len() != files.soft.len()
        {
            bail!(
                "image {image_id} has {} hard but {} soft class files in {}",
                files.hard.len(),
                files.soft.len(),
                dir.display()
            );
        }
        files.per_class = per_class.contains(&true);
        predictions.push(files);
    }
    Ok(predictions)
}

/// Where an image id's labels are: the BIDS subject, session and image stem, and the labels per class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMatch {
    pub subject: String,
    pub session: Option<String>,
    pub contrast: String,
    /// The image stem the label names are built from.
    pub stem: String,
    /// One per target suffix: the existing label file, or `None`.
    pub labels: Vec<Option<PathBuf>>,
    /// The paths looked for (`.nii.gz` variant), one per target suffix, for messages.
    pub expected: Vec<PathBuf>,
}

fn image_stem(entry: &BidsEntry) -> String {
    cascade::image_stem(&entry.image)
}

/// Matches image ids to BIDS entries: by image stem first, then by `<subject>_<contrast>` when that names
/// exactly one image, else (images missing from the raw folder) from the id's own entities, as ivadomed.
struct LabelResolver {
    labels_root: PathBuf,
    by_stem: BTreeMap<String, BidsEntry>,
    by_subject_contrast: BTreeMap<String, Vec<BidsEntry>>,
}

impl LabelResolver {
    fn new(bids_root: &Path) -> Result<Self> {
        let index = BidsIndex::scan(
            bids_root,
            &BidsQuery {
                target_suffix: "",
                contrasts: None,
            },
        )?;
        let mut by_stem = BTreeMap::new();
        let mut by_subject_contrast: BTreeMap<String, Vec<BidsEntry>> = BTreeMap::new();
        for entry in index.entries {
            by_subject_contrast
                .entry(format!("{}_{}", entry.subject, entry.contrast))
                .or_default()
                .push(entry.clone());
            by_stem.insert(image_stem(&entry), entry);
        }
        Ok(Self {
            labels_root: bids_root.join("derivatives").join("labels"),
            by_stem,
            by_subject_contrast,
        })
    }

    fn resolve(&self, image_id: &str, suffixes: &[String]) -> Result<LabelMatch> {
        let (subject, session, contrast, stem) = if let Some(entry) = self.by_stem.get(image_id) {
            (
                entry.subject.clone(),
                entry.session.clone(),
                entry.contrast.clone(),
                image_id.to_string(),
            )
        } else if let Some(entries) = self.by_subject_contrast.get(image_id) {
            let [entry] = &entries[..] else {
                bail!(
                    "prediction id {image_id} matches {} images ({}); name predictions after the image \
                     stem",
                    entries.len(),
                    entries
                        .iter()
                        .map(image_stem)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            (
                entry.subject.clone(),
                entry.session.clone(),
                entry.contrast.clone(),
                image_stem(entry),
            )
        } else {
            let parts: Vec<&str> = image_id.split('_').collect();
            ensure!(
                parts[0].starts_with("sub-") && parts.len() >= 2,
                "prediction id {image_id} is not a BIDS image name (<sub-XX>_..._<contrast>)"
            );
            (
                parts[0].to_string(),
                parts
                    .iter()
                    .find(|p| p.starts_with("ses-"))
                    .map(|s| s.to_string()),
                parts[parts.len() - 1].to_string(),
                image_id.to_string(),
            )
        };
        let mut dir = self.labels_root.join(&subject);
        if let Some(session) = &session {
            dir = dir.join(session);
        }
        let dir = dir.join("anat");
        let mut labels = Vec::with_capacity(suffixes.len());
        let mut expected = Vec::with_capacity(suffixes.len());
        for suffix in suffixes {
            let candidates =
                [".nii.gz", ".nii"].map(|ext| dir.join(format!("{stem}{suffix}{ext}")));
            labels.push(candidates.iter().find(|p| p.is_file()).cloned());
            expected.push(candidates[0].clone());
        }
        Ok(LabelMatch {
            subject,
            session,
            contrast,
            stem,
            labels,
            expected,
        })
    }
}

/// Largest distance (mm) between the world positions the two affines give the same voxel, over the corners
/// of `shape` (the distance is affine in the voxel index, so a corner holds the maximum).
fn grid_displacement_mm(a: &Affine, b: &Affine, shape: [usize; 3]) -> f64 {
    let mut largest = 0.0f64;
    for corner in 0..8 {
        let index: [f64; 3] = std::array::from_fn(|k| {
            if corner >> k & 1 == 1 {
                shape[k] as f64 - 1.0
            } else {
                0.0
            }
        });
        let squared: f64 = (0..3)
            .map(|row| {
                let world =
                    |m: &Affine| (0..3).map(|k| m[row][k] * index[k]).sum::<f64>() + m[row][3];
                (world(a) - world(b)).powi(2)
            })
            .sum();
        largest = largest.max(squared.sqrt());
    }
    largest
}

/// Errors unless `a` and `b` share the voxel grid: the same canonical shape, and affines that put every
/// voxel centre less than one voxel (the smallest spacing) from where the other puts it. Headers that
/// differ by more than 1e-3 mm but less than a voxel (labels saved with rounded sforms, as in ivadomed's own
/// test data) only give a warning: the voxels still correspond. The messages name both files.
pub fn check_alignment(a: &Volume, b: &Volume) -> Result<()> {
    if a.shape() != b.shape() {
        bail!(
            "{} has shape {:?} but {} has shape {:?} (canonical RAS order): they are not on the same \
             voxel grid",
            a.path.display(),
            a.shape(),
            b.path.display(),
            b.shape()
        );
    }
    let displacement = grid_displacement_mm(&a.affine, &b.affine, a.shape());
    let voxel = a
        .spacing
        .iter()
        .chain(&b.spacing)
        .copied()
        .fold(f64::INFINITY, f64::min);
    if displacement.is_nan() || displacement >= voxel {
        bail!(
            "{} and {} have the same shape but different affines, which put the same voxel up to \
             {displacement:.3} mm apart (voxel size {voxel:.3} mm): {:?} vs {:?}",
            a.path.display(),
            b.path.display(),
            a.affine,
            b.affine
        );
    }
    if displacement > AFFINE_TOLERANCE_MM {
        tracing::warn!(
            "{} and {} have slightly different affines (voxels up to {displacement:.3} mm apart, less than \
             the {voxel:.3} mm voxel size); evaluating them as one grid",
            a.path.display(),
            b.path.display()
        );
    }
    Ok(())
}

/// The lesions of one class painted by detection outcome ([`TP_COLOUR`], [`FP_COLOUR`], [`FN_COLOUR`]),
/// with the lesion counts behind them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaintedLesions {
    /// C-ordered `[X, Y, Z]`, like [`Mask`].
    pub labels: Vec<u8>,
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
}

/// Paints the lesions of a binarised prediction and ground truth the way ivadomed's `Evaluation3DMetrics`
/// does: missed ground-truth lesions first ([`FN_COLOUR`]), then every predicted lesion as [`TP_COLOUR`] or
/// [`FP_COLOUR`], which wins where a missed lesion and a predicted one share voxels. Small objects are
/// removed from both masks first when `options.remove_small` is set, as for the metrics. The outcomes are
/// [`LesionOverlap`]'s, so the painted map agrees with the CSV counts of [`metrics::lesion_detection`].
pub fn paint_lesions(
    prediction: &Mask,
    ground_truth: &Mask,
    spacing: [f64; 3],
    options: &LesionOptions,
) -> PaintedLesions {
    let overlap = LesionOverlap::of(prediction, ground_truth, spacing, options);
    let labels = overlap
        .predicted
        .labels
        .iter()
        .zip(&overlap.truth.labels)
        .map(|(&p, &t)| match (p, t) {
            (0, 0) => 0,
            (0, t) if !overlap.detected[t as usize - 1] => FN_COLOUR,
            (0, _) => 0,
            (p, _) if overlap.false_positive[p as usize - 1] => FP_COLOUR,
            _ => TP_COLOUR,
        })
        .collect();
    let false_positives = overlap.false_positive_count();
    PaintedLesions {
        labels,
        true_positives: overlap.predicted.count() - false_positives,
        false_positives,
        false_negatives: overlap.truth.count() - overlap.detected_count(),
    }
}

/// One evaluated image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageResult {
    pub image_id: String,
    pub subject: String,
    pub contrast: String,
    /// The files evaluated, class order (the `_pred` files, else the soft ones binarised).
    pub predictions: Vec<PathBuf>,
    /// The label per class; `None` for a class without one (evaluated against an empty mask, as ivadomed).
    pub labels: Vec<Option<PathBuf>>,
    /// ivadomed's metric columns (see [`metrics::image_metrics`]).
    pub metrics: BTreeMap<String, f64>,
    /// The painted lesion maps written, class order.
    pub painted: Vec<PathBuf>,
}

/// A prediction that was not evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedImage {
    pub image_id: String,
    pub reason: String,
}

/// NaN-aware statistics of one metric column over the images.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSummary {
    pub metric: String,
    pub mean: f64,
    /// Sample standard deviation (n - 1, as pandas); NaN with fewer than two valid values.
    pub std: f64,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Number of non-NaN values.
    pub count: usize,
}

/// Statistics of `values`, ignoring NaNs; all NaN (count 0) when nothing is left.
pub fn summarize(metric: &str, values: &[f64]) -> MetricSummary {
    let mut valid: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    valid.sort_by(f64::total_cmp);
    let n = valid.len();
    let mean = if n == 0 {
        f64::NAN
    } else {
        valid.iter().sum::<f64>() / n as f64
    };
    let std = if n < 2 {
        f64::NAN
    } else {
        (valid.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    };
    let median = match n {
        0 => f64::NAN,
        n if n % 2 == 1 => valid[n / 2],
        n => (valid[n / 2 - 1] + valid[n / 2]) / 2.0,
    };
    MetricSummary {
        metric: metric.to_string(),
        mean,
        std,
        median,
        min: valid.first().copied().unwrap_or(f64::NAN),
        max: valid.last().copied().unwrap_or(f64::NAN),
        count: n,
    }
}

/// One threshold of the sweep: means over the (image, class) pairs where a value is defined.
#[derive(Clone, Debug, PartialEq)]
pub struct ThresholdRow {
    pub threshold: f64,
    pub dice: f64,
    pub dice_count: usize,
    /// With `lesion_metrics`: mean lesion TPR and FDR, and their valid counts.
    pub ltpr: Option<(f64, usize)>,
    pub lfdr: Option<(f64, usize)>,
}

/// The outcome of a threshold analysis.
#[derive(Clone, Debug, PartialEq)]
pub struct ThresholdReport {
    pub rows: Vec<ThresholdRow>,
    /// The highest threshold reaching the best mean Dice (ivadomed's tie rule); `None` when no threshold
    /// has a defined Dice.
    pub best: Option<(f64, f64)>,
    /// Images used.
    pub images: Vec<String>,
    pub csv: PathBuf,
    pub png: PathBuf,
}

/// The outcome of [`evaluate_folder`].
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    pub out_dir: PathBuf,
    pub images: Vec<ImageResult>,
    pub skipped: Vec<SkippedImage>,
    /// Metric columns of the CSV, in ivadomed's order (per class: volumes, rvd, avd, dice, recall,
    /// precision, specificity, lesion counts, ltpr, lfdr, mse, then ours and the size bins).
    pub columns: Vec<String>,
    pub summary: Vec<MetricSummary>,
    pub metrics_csv: PathBuf,
    pub summary_csv: PathBuf,
    pub threshold: Option<ThresholdReport>,
}

impl EvalReport {
    pub fn summary_of(&self, metric: &str) -> Option<&MetricSummary> {
        self.summary.iter().find(|s| s.metric == metric)
    }
}

/// Rank of a metric's base name in ivadomed's `run_eval` order; ours and size bins come after.
fn column_key(name: &str) -> (usize, usize, String) {
    const ORDER: [&str; 16] = [
        "vol_pred",
        "vol_gt",
        "rvd",
        "avd",
        "dice",
        "recall",
        "precision",
        "specificity",
        "n_pred",
        "n_gt",
        "ltpr",
        "lfdr",
        "mse",
        "hausdorff_mm",
        "hd95_mm",
        "asd_mm",
    ];
    let (base, class) = match name.rsplit_once("_class") {
        Some((base, class)) => (base, class.parse().unwrap_or(usize::MAX)),
        None => (name, usize::MAX),
    };
    let rank = ORDER
        .iter()
        .position(|&known| known == base)
        .unwrap_or(ORDER.len());
    (class, rank, base.to_string())
}

/// A CSV cell: empty for NaN (as pandas writes it), Rust's shortest round-trip form otherwise.
fn cell(value: f64) -> String {
    if value.is_nan() {
        String::new()
    } else {
        format!("{value}")
    }
}

/// Quotes a text cell when it needs it.
fn text_cell(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// A volume of zeros on `like`'s grid, standing in for a missing class label.
fn zeros_like(like: &Volume) -> Tensor {
    Tensor::zeros_like(&like.data)
}

fn stack_classes(volumes: &[Tensor]) -> Tensor {
    if volumes.len() == 1 {
        volumes[0].shallow_clone()
    } else {
        Tensor::stack(volumes, 0)
    }
}

/// The painted map path of a prediction file: `<stem>_painted.nii.gz` in `out_dir`.
fn painted_path(prediction: &Path, out_dir: &Path) -> PathBuf {
    out_dir.join(format!(
        "{}_painted.nii.gz",
        cascade::image_stem(prediction)
    ))
}

/// Reads the ground truth of every class, checked against the prediction grid; a missing class label is
/// an empty mask.
fn read_labels(match_: &LabelMatch, predictions: &[Volume]) -> Result<Vec<Tensor>> {
    match_
        .labels
        .iter()
        .zip(predictions)
        .map(|(label, prediction)| match label {
            Some(path) => {
                let label = read_label(path, None)?;
                check_alignment(prediction, &label)?;
                Ok(label.data)
            }
            None => Ok(zeros_like(prediction)),
        })
        .collect()
}

fn read_predictions(paths: &[PathBuf]) -> Result<Vec<Volume>> {
    let volumes: Vec<Volume> = paths
        .iter()
        .map(|p| read_volume(p))
        .collect::<Result<_>>()?;
    for other in &volumes[1..] {
        check_alignment(&volumes[0], other)?;
    }
    Ok(volumes)
}

/// Evaluates one image: metrics row, painted maps.
fn evaluate_image(
    files: &PredictionFiles,
    match_: &LabelMatch,
    options: &MetricsOptions,
    out_dir: &Path,
) -> Result<ImageResult> {
    let paths = if files.hard.is_empty() {
        &files.soft
    } else {
        &files.hard
    };
    let predictions = read_predictions(paths)?;
    let truths = read_labels(match_, &predictions)?;
    let spacing = predictions[0].spacing;
    let prediction_data: Vec<Tensor> = predictions.iter().map(|v| v.data.shallow_clone()).collect();
    let row = metrics::image_metrics(
        &stack_classes(&prediction_data),
        &stack_classes(&truths),
        spacing,
        options,
    )
    .with_context(|| format!("evaluating {}", files.image_id))?;

    let mut painted = Vec::with_capacity(predictions.len());
    for (prediction, truth) in predictions.iter().zip(&truths) {
        let predicted = Mask::from_tensor(&prediction.data, options.threshold)?;
        let truth = Mask::from_tensor(truth, 0.5)?;
        let lesions = paint_lesions(&predicted, &truth, spacing, &options.lesions);
        let dims = predicted.dims().map(|d| d as i64);
        let values: Vec<f32> = lesions.labels.iter().map(|&v| v as f32).collect();
        let path = painted_path(&prediction.path, out_dir);
        write_like(
            prediction,
            &Tensor::from_slice(&values).reshape(dims),
            &path,
            OutputType::U8,
        )?;
        painted.push(path);
    }
    Ok(ImageResult {
        image_id: files.image_id.clone(),
        subject: match_.subject.clone(),
        contrast: match_.contrast.clone(),
        predictions: paths.clone(),
        labels: match_.labels.clone(),
        metrics: row,
        painted,
    })
}

/// A prediction with its labels.
type Matched = (PredictionFiles, LabelMatch);

/// Matches every prediction to its labels, applying the missing-label policy. Returns the evaluable
/// images and the skipped ones.
fn match_predictions(
    predictions: Vec<PredictionFiles>,
    bids_root: &Path,
    options: &EvalOptions,
) -> Result<(Vec<Matched>, Vec<SkippedImage>)> {
    let suffixes = options.suffixes();
    let resolver = LabelResolver::new(bids_root)?;
    let mut matched = Vec::new();
    let mut skipped = Vec::new();
    for files in predictions {
        let classes = files.classes();
        if classes != suffixes.len() {
            bail!(
                "prediction {} has {classes} class(es) but {} target suffix(es) were given ({}): give one \
                 suffix per class",
                files.image_id,
                suffixes.len(),
                suffixes.join(", ")
            );
        }
        let match_ = resolver.resolve(&files.image_id, &suffixes)?;
        if match_.labels.iter().all(Option::is_none) {
            let looked_for = match_
                .expected
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let reason = format!("no label found (looked for {looked_for}[.nii])");
            match options.missing_label {
                MissingLabelPolicy::Fail => {
                    bail!("prediction {}: {reason}", files.image_id)
                }
                MissingLabelPolicy::Skip => {
                    tracing::warn!(image = %files.image_id, "skipped: {reason}");
                    skipped.push(SkippedImage {
                        image_id: files.image_id.clone(),
                        reason,
                    });
                }
            }
            continue;
        }
        matched.push((files, match_));
    }
    Ok((matched, skipped))
}

/// The predictions of `predictions_dir` matched to their labels in `bids_root`, and those skipped; an error
/// when none has a label.
fn labelled_predictions(
    predictions_dir: &Path,
    bids_root: &Path,
    options: &EvalOptions,
) -> Result<(Vec<Matched>, Vec<SkippedImage>)> {
    let predictions = find_predictions(predictions_dir)?;
    let total = predictions.len();
    let (matched, skipped) = match_predictions(predictions, bids_root, options)?;
    ensure!(
        !matched.is_empty(),
        "none of the {total} predictions in {} has a label in {}",
        predictions_dir.display(),
        bids_root.display()
    );
    Ok((matched, skipped))
}

/// Evaluates every prediction in `predictions_dir` against the labels of `bids_root` and writes
/// `evaluation_3Dmetrics.csv`, `evaluation_summary.csv`, the painted lesion maps and, with a threshold
/// sweep, the threshold analysis (see the module documentation).
pub fn evaluate_folder(
    predictions_dir: &Path,
    bids_root: &Path,
    options: &EvalOptions,
) -> Result<EvalReport> {
    options.validate()?;
    let out_dir = options.out_dir_for(predictions_dir);
    let (matched, skipped) = labelled_predictions(predictions_dir, bids_root, options)?;
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;

    let mut images = Vec::with_capacity(matched.len());
    for (files, match_) in &matched {
        images.push(evaluate_image(files, match_, &options.metrics, &out_dir)?);
    }

    let mut columns: Vec<String> = images
        .iter()
        .flat_map(|image| image.metrics.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    columns.sort_by_key(|name| column_key(name));

    let mut csv = String::from("image_id,subject,contrast");
    for column in &columns {
        csv.push(',');
        csv.push_str(column);
    }
    csv.push('\n');
    for image in &images {
        let _ = write!(
            csv,
            "{},{},{}",
            text_cell(&image.image_id),
            text_cell(&image.subject),
            text_cell(&image.contrast)
        );
        for column in &columns {
            csv.push(',');
            csv.push_str(&cell(
                image.metrics.get(column).copied().unwrap_or(f64::NAN),
            ));
        }
        csv.push('\n');
    }
    let metrics_csv = out_dir.join(METRICS_CSV);
    write_atomic(&metrics_csv, csv.as_bytes())?;

    let summary: Vec<MetricSummary> = columns
        .iter()
        .map(|column| {
            let values: Vec<f64> = images
                .iter()
                .map(|image| image.metrics.get(column).copied().unwrap_or(f64::NAN))
                .collect();
            summarize(column, &values)
        })
        .collect();
    let mut text = String::from("metric,mean,std,median,min,max,count\n");
    for s in &summary {
        let _ = writeln!(
            text,
            "{},{},{},{},{},{},{}",
            s.metric,
            cell(s.mean),
            cell(s.std),
            cell(s.median),
            cell(s.min),
            cell(s.max),
            s.count
        );
    }
    let summary_csv = out_dir.join(SUMMARY_CSV);
    write_atomic(&summary_csv, text.as_bytes())?;

    let threshold = match &options.threshold_sweep {
        None => None,
        Some(sweep) => Some(sweep_thresholds(&matched, options, sweep, &out_dir)?),
    };
    Ok(EvalReport {
        out_dir,
        images,
        skipped,
        columns,
        summary,
        metrics_csv,
        summary_csv,
        threshold,
    })
}

/// ivadomed's threshold analysis on a folder of soft predictions: for every threshold of `sweep`, binarise
/// each soft prediction (`<image>_pred_soft[_class-<k>]` files, else the `_pred` files, which should then be
/// soft) and average the Dice over the (image, class) pairs, NaN-aware like ivadomed's `MetricManager`; with
/// `sweep.lesion_metrics`, also the lesion TPR and FDR. The best threshold is the highest one reaching the
/// best mean Dice (ivadomed keeps the last maximum). Writes `threshold_analysis.csv` and
/// `threshold_analysis.png` (Dice against threshold, the best marked) in `options`' output folder.
///
/// Images without a label follow `options.missing_label`.
pub fn threshold_analysis(
    predictions_dir: &Path,
    bids_root: &Path,
    options: &EvalOptions,
    sweep: &ThresholdSweep,
) -> Result<ThresholdReport> {
    options.validate()?;
    let out_dir = options.out_dir_for(predictions_dir);
    let (matched, _) = labelled_predictions(predictions_dir, bids_root, options)?;
    sweep_thresholds(&matched, options, sweep, &out_dir)
}

/// One (image, class) pair of the sweep, as flat values.
struct SoftPair {
    dims: [usize; 3],
    spacing: [f64; 3],
    soft: Vec<f32>,
    truth: Mask,
}

fn sweep_thresholds(
    matched: &[Matched],
    options: &EvalOptions,
    sweep: &ThresholdSweep,
    out_dir: &Path,
) -> Result<ThresholdReport> {
    let thresholds = sweep.thresholds()?;
    let lesions = &options.metrics.lesions;
    let mut pairs = Vec::new();
    let mut images = Vec::new();
    for (files, match_) in matched {
        let (paths, soft_files) = if files.soft.is_empty() {
            (&files.hard, false)
        } else {
            (&files.soft, true)
        };
        let predictions = read_predictions(paths)?;
        let truths = read_labels(match_, &predictions)?;
        for (prediction, truth) in predictions.iter().zip(&truths) {
            let values = Vec::<f32>::try_from(
                &prediction
                    .data
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Float)
                    .reshape([-1]),
            )?;
            if !soft_files && values.iter().all(|&v| v == 0.0 || v == 1.0) {
                tracing::warn!(
                    file = %prediction.path.display(),
                    "threshold analysis on a binary prediction: every threshold in (0, 1) gives the same \
                     mask (write <image>_pred_soft.nii.gz files for a meaningful sweep)"
                );
            }
            let mut truth = Mask::from_tensor(truth, 0.5)?;
            if let Some(size) = lesions.remove_small {
                truth = remove_small_objects(
                    &truth,
                    size.voxels(prediction.spacing),
                    lesions.connectivity,
                );
            }
            pairs.push(SoftPair {
                dims: prediction.shape(),
                spacing: prediction.spacing,
                soft: values,
                truth,
            });
        }
        images.push(files.image_id.clone());
    }

    let mut rows = Vec::with_capacity(thresholds.len());
    for &threshold in &thresholds {
        // Compared in f32, as libtorch compares a float tensor with a scalar (Mask::from_tensor).
        let cut = threshold as f32;
        let mut dice = Vec::with_capacity(pairs.len());
        let mut ltpr = Vec::new();
        let mut lfdr = Vec::new();
        for pair in &pairs {
            let mut predicted =
                Mask::new(pair.dims, pair.soft.iter().map(|&v| v >= cut).collect())?;
            if let Some(size) = lesions.remove_small {
                predicted = remove_small_objects(
                    &predicted,
                    size.voxels(pair.spacing),
                    lesions.connectivity,
                );
            }
            dice.push(VoxelCounts::of(&predicted, &pair.truth).dice());
            if sweep.lesion_metrics {
                let detection = lesion_detection(&predicted, &pair.truth, pair.spacing, lesions);
                ltpr.push(detection.ltpr());
                lfdr.push(detection.lfdr());
            }
        }
        let mean = |values: &[f64]| {
            let s = summarize("", values);
            (s.mean, s.count)
        };
        let (dice, dice_count) = mean(&dice);
        rows.push(ThresholdRow {
            threshold,
            dice,
            dice_count,
            ltpr: sweep.lesion_metrics.then(|| mean(&ltpr)),
            lfdr: sweep.lesion_metrics.then(|| mean(&lfdr)),
        });
    }
    let best = best_threshold(&rows);

    let mut csv = String::from("threshold,dice,dice_count");
    if sweep.lesion_metrics {
        csv.push_str(",ltpr,ltpr_count,lfdr,lfdr_count");
    }
    csv.push_str(",best\n");
    for row in &rows {
        let _ = write!(
            csv,
            "{},{},{}",
            row.threshold,
            cell(row.dice),
            row.dice_count
        );
        for (value, count) in [row.ltpr, row.lfdr].into_iter().flatten() {
            let _ = write!(csv, ",{},{count}", cell(value));
        }
        let is_best = best.is_some_and(|(t, _)| t == row.threshold);
        let _ = writeln!(csv, ",{}", u8::from(is_best));
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let csv_path = out_dir.join(THRESHOLD_CSV);
    write_atomic(&csv_path, csv.as_bytes())?;
    let png = out_dir.join(THRESHOLD_PNG);
    let image = render_threshold_plot(&rows, best, (sweep.low, sweep.high))?;
    write_png(&png, &image)?;
    Ok(ThresholdReport {
        rows,
        best,
        images,
        csv: csv_path,
        png,
    })
}

/// The highest threshold with the largest finite mean Dice, and that Dice.
fn best_threshold(rows: &[ThresholdRow]) -> Option<(f64, f64)> {
    let top = rows
        .iter()
        .map(|r| r.dice)
        .filter(|d| d.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    rows.iter()
        .rev()
        .find(|r| r.dice == top)
        .map(|r| (r.threshold, r.dice))
}

/// Runs of finite `(threshold, value)` points, split at NaNs so a gap is not bridged.
fn finite_runs(points: impl Iterator<Item = (f64, f64)>) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (x, y) in points {
        if y.is_finite() {
            runs.last_mut().expect("never empty").push((x, y));
        } else if !runs.last().expect("never empty").is_empty() {
            runs.push(Vec::new());
        }
    }
    runs.retain(|run| !run.is_empty());
    runs
}

/// Dice (and lesion TPR/FDR when present) against threshold, on a [0, 1] axis, with the best threshold
/// marked by a vertical line under the curves and a dot over them, in [`PLOT_BEST_COLOUR`].
pub fn render_threshold_plot(
    rows: &[ThresholdRow],
    best: Option<(f64, f64)>,
    range: (f64, f64),
) -> Result<RgbImage> {
    use plotters::prelude::*;
    curves::register_embedded_font()?;
    let font = curves::FONT_FAMILY;
    let rgb = |[r, g, b]: [u8; 3]| RGBColor(r, g, b);
    let caption = match best {
        Some((threshold, dice)) => {
            format!("Threshold analysis: best {threshold} (mean Dice {dice:.4})")
        }
        None => "Threshold analysis: no defined Dice".to_string(),
    };
    // Dice last, so that it is drawn over the lesion curves where they coincide.
    type Curve<'a> = (&'a str, [u8; 3], Vec<Vec<(f64, f64)>>);
    let mut series: Vec<Curve> = Vec::new();
    if rows.iter().any(|r| r.ltpr.is_some()) {
        series.push((
            "mean lesion TPR",
            PLOT_LTPR_COLOUR,
            finite_runs(
                rows.iter()
                    .map(|r| (r.threshold, r.ltpr.map_or(f64::NAN, |v| v.0))),
            ),
        ));
        series.push((
            "mean lesion FDR",
            PLOT_LFDR_COLOUR,
            finite_runs(
                rows.iter()
                    .map(|r| (r.threshold, r.lfdr.map_or(f64::NAN, |v| v.0))),
            ),
        ));
    }
    series.push((
        "mean Dice",
        PLOT_DICE_COLOUR,
        finite_runs(rows.iter().map(|r| (r.threshold, r.dice))),
    ));

    let mut buffer = vec![0u8; (PLOT_WIDTH * PLOT_HEIGHT * 3) as usize];
    {
        let root =
            BitMapBackend::with_buffer(&mut buffer, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow!("clearing the figure: {e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&caption, (font, 24))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(range.0..range.1, -0.02..1.02)
            .map_err(|e| anyhow!("building the threshold plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("threshold")
            .y_desc("score")
            .x_label_formatter(&|x| format!("{x:.2}"))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .label_style((font, 15))
            .axis_desc_style((font, 17))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| anyhow!("drawing the threshold plot axes: {e}"))?;
        if let Some((threshold, _)) = best {
            let style = rgb(PLOT_BEST_COLOUR).stroke_width(2);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(threshold, 0.0), (threshold, 1.0)],
                    style,
                )))
                .map_err(|e| anyhow!("drawing the best threshold: {e}"))?
                .label(format!("best threshold {threshold}"))
                .legend(move |(x, y)| Circle::new((x + 12, y), 5, style.filled()));
        }
        for (legend, colour, runs) in &series {
            let style = rgb(*colour).stroke_width(2);
            for (index, run) in runs.iter().enumerate() {
                let drawn = chart
                    .draw_series(LineSeries::new(run.iter().copied(), style).point_size(3))
                    .map_err(|e| anyhow!("drawing {legend}: {e}"))?;
                if index == 0 {
                    drawn
                        .label(*legend)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
                }
            }
        }
        if let Some((threshold, dice)) = best {
            chart
                .draw_series(std::iter::once(Circle::new(
                    (threshold, dice),
                    7,
                    rgb(PLOT_BEST_COLOUR).filled(),
                )))
                .map_err(|e| anyhow!("drawing the best threshold: {e}"))?;
        }
        chart
            .configure_series_labels()
            .label_font((font, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .draw()
            .map_err(|e| anyhow!("drawing the threshold plot legend: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("finishing the threshold plot: {e}"))?;
    }
    RgbImage::from_pixels(PLOT_WIDTH as usize, PLOT_HEIGHT as usize, buffer)
}

/// Metrics of one prediction file against one label file (the Rhai `evaluate`): ivadomed's row for
/// class 0, after checking that both share the voxel grid.
pub fn evaluate_pair(
    prediction: &Path,
    label: &Path,
    options: &MetricsOptions,
) -> Result<BTreeMap<String, f64>> {
    let prediction = read_volume(prediction)?;
    let label = read_label(label, None)?;
    check_alignment(&prediction, &label)?;
    metrics::image_metrics(&prediction.data, &label.data, prediction.spacing, options)
}

/// `evaluate(prediction, label)` for scripts: ivadomed's row (`dice_class0`, `vol_pred_class0`, ...), plus
/// `dice` (the class-0 Dice, but 1.0 when both masks are empty so that script averages stay finite;
/// `dice_class0` is NaN there, as in ivadomed's evaluation), `predicted_mm3` and `label_mm3`.
pub fn evaluate_pair_map(
    prediction: &Path,
    label: &Path,
    options: &MetricsOptions,
) -> Result<rhai::Map> {
    let row = evaluate_pair(prediction, label, options)?;
    let mut map = rhai::Map::new();
    for (key, value) in &row {
        map.insert(key.as_str().into(), (*value).into());
    }
    let dice = row.get("dice_class0").copied().unwrap_or(f64::NAN);
    let predicted = row.get("vol_pred_class0").copied().unwrap_or(f64::NAN);
    let truth = row.get("vol_gt_class0").copied().unwrap_or(f64::NAN);
    let both_empty = predicted == 0.0 && truth == 0.0;
    map.insert("dice".into(), (if both_empty { 1.0 } else { dice }).into());
    map.insert("predicted_mm3".into(), predicted.into());
    map.insert("label_mm3".into(), truth.into());
    Ok(map)
}

/// The report as a Rhai map: `metrics` (metric -> `#{mean, std, median, min, max, count}`), `images`
/// (count), `skipped` (image ids), `csv`, `summary_csv`, `out`, and with a threshold analysis
/// `best_threshold`, `best_dice`, `threshold_csv`, `threshold_png` (the best ones `()` when undefined).
pub fn report_map(report: &EvalReport) -> rhai::Map {
    use rhai::{Array, Dynamic, Map};
    let path = |p: &Path| Dynamic::from(p.display().to_string());
    let mut metrics = Map::new();
    for s in &report.summary {
        let mut entry = Map::new();
        entry.insert("mean".into(), s.mean.into());
        entry.insert("std".into(), s.std.into());
        entry.insert("median".into(), s.median.into());
        entry.insert("min".into(), s.min.into());
        entry.insert("max".into(), s.max.into());
        entry.insert("count".into(), (s.count as i64).into());
        metrics.insert(s.metric.as_str().into(), entry.into());
    }
    let mut map = Map::new();
    map.insert("metrics".into(), metrics.into());
    map.insert("images".into(), (report.images.len() as i64).into());
    let skipped: Array = report
        .skipped
        .iter()
        .map(|s| Dynamic::from(s.image_id.clone()))
        .collect();
    map.insert("skipped".into(), skipped.into());
    map.insert("csv".into(), path(&report.metrics_csv));
    map.insert("summary_csv".into(), path(&report.summary_csv));
    map.insert("out".into(), path(&report.out_dir));
    if let Some(threshold) = &report.threshold {
        let (best, dice) = match threshold.best {
            Some((t, d)) => (Dynamic::from(t), Dynamic::from(d)),
            None => (Dynamic::UNIT, Dynamic::UNIT),
        };
        map.insert("best_threshold".into(), best);
        map.insert("best_dice".into(), dice);
        map.insert("threshold_csv".into(), path(&threshold.csv));
        map.insert("threshold_png".into(), path(&threshold.png));
    }
    map
}

/// `ivado evaluate`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// Folder of predictions: <image>_pred.nii.gz, <image>_pred_class-<k>.nii.gz, <image>_pred_soft.nii.gz.
    #[arg(long, value_name = "DIR")]
    pub predictions: PathBuf,
    /// BIDS dataset whose derivatives/labels hold the ground truth.
    #[arg(long, value_name = "DIR")]
    pub bids: PathBuf,
    /// Output folder (default: results_eval next to the predictions folder).
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Label suffix; repeat it once per class for multi-class predictions.
    #[arg(long = "target-suffix", value_name = "SUFFIX", default_values_t = ["_seg-manual".to_string()])]
    pub target_suffixes: Vec<String>,
    /// Binarisation threshold of the predictions (voxel >= threshold).
    #[arg(long, default_value_t = 0.5)]
    pub threshold: f64,
    /// Run a threshold analysis from `increment` to 1 by `increment` (ivadomed's --thr-increment).
    #[arg(long = "thr-increment", value_name = "INCREMENT")]
    pub thr_increment: Option<f64>,
    /// Also average the lesion TPR and FDR per threshold in the threshold analysis.
    #[arg(long = "thr-lesion-metrics", requires = "thr_increment")]
    pub thr_lesion_metrics: bool,
    /// Overlap a ground-truth lesion needs to count as detected.
    #[arg(long, default_value_t = 3.0)]
    pub overlap: f64,
    /// Unit of --overlap: vox, mm3 or ratio (of the ground-truth lesion).
    #[arg(long = "overlap-unit", default_value = "vox")]
    pub overlap_unit: String,
    /// Lesion size bins (inclusive upper bounds), e.g. 20,50: per-bin lesion TPR/FDR columns.
    #[arg(long = "target-size", value_delimiter = ',', value_name = "BOUNDS")]
    pub target_size: Vec<f64>,
    /// Unit of --target-size: vox or mm3.
    #[arg(long = "target-size-unit", default_value = "vox")]
    pub target_size_unit: String,
    /// Remove objects smaller than this from predictions and labels before evaluating.
    #[arg(long = "remove-small", value_name = "SIZE")]
    pub remove_small: Option<f64>,
    /// Unit of --remove-small: vox or mm3.
    #[arg(long = "remove-small-unit", default_value = "vox")]
    pub remove_small_unit: String,
    /// Lesion connectivity: 6, 18 (ivadomed's) or 26.
    #[arg(long, default_value_t = 18)]
    pub connectivity: i64,
    /// A prediction without a label: skip (with a warning) or fail.
    #[arg(long = "missing-label", default_value = "skip")]
    pub missing_label: String,
}

impl EvaluateArgs {
    pub fn options(&self) -> Result<EvalOptions> {
        let options = EvalOptions {
            out_dir: self.output.clone(),
            target_suffixes: self.target_suffixes.clone(),
            metrics: MetricsOptions {
                threshold: self.threshold,
                lesions: LesionOptions {
                    connectivity: parse_connectivity(self.connectivity)?,
                    overlap: parse_overlap(self.overlap, &self.overlap_unit)?,
                    target_size: if self.target_size.is_empty() {
                        None
                    } else {
                        Some(SizeBins {
                            thresholds: self.target_size.clone(),
                            unit: parse_size_unit(&self.target_size_unit)?,
                        })
                    },
                    remove_small: match self.remove_small {
                        None => None,
                        Some(value) => Some(ObjectSize {
                            value,
                            unit: parse_size_unit(&self.remove_small_unit)?,
                        }),
                    },
                },
            },
            missing_label: MissingLabelPolicy::parse(&self.missing_label)?,
            threshold_sweep: self.thr_increment.map(|increment| ThresholdSweep {
                lesion_metrics: self.thr_lesion_metrics,
                ..ThresholdSweep::new(increment)
            }),
        };
        options.validate()?;
        Ok(options)
    }
}

/// Runs `ivado evaluate` and prints what it wrote.
pub fn evaluate_command(args: &EvaluateArgs) -> Result<()> {
    let report = evaluate_folder(&args.predictions, &args.bids, &args.options()?)?;
    for skipped in &report.skipped {
        println!("skipped {}: {}", skipped.image_id, skipped.reason);
    }
    let dice_columns: Vec<&String> = report
        .columns
        .iter()
        .filter(|c| c.starts_with("dice_class"))
        .collect();
    for image in &report.images {
        let scores: Vec<String> = dice_columns
            .iter()
            .map(|c| format!("{c} {:.4}", image.metrics[c.as_str()]))
            .collect();
        println!("{}: {}", image.image_id, scores.join("  "));
    }
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6}",
        "metric", "mean", "std", "median", "min", "max", "count"
    );
    for s in &report.summary {
        println!(
            "{:<24} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>6}",
            s.metric, s.mean, s.std, s.median, s.min, s.max, s.count
        );
    }
    println!(
        "evaluated {} image(s), skipped {}; wrote {} and {}",
        report.images.len(),
        report.skipped.len(),
        report.metrics_csv.display(),
        report.summary_csv.display()
    );
    if let Some(threshold) = &report.threshold {
        match threshold.best {
            Some((t, dice)) => println!("best threshold {t} (mean Dice {dice:.4})"),
            None => println!("no threshold gives a defined Dice"),
        }
        println!(
            "wrote {} and {}",
            threshold.csv.display(),
            threshold.png.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mask with `dims` and the voxels at `points` set.
    fn mask_with(dims: [usize; 3], points: impl IntoIterator<Item = [usize; 3]>) -> Mask {
        let mut voxels = vec![false; dims.iter().product()];
        for [x, y, z] in points {
            voxels[(x * dims[1] + y) * dims[2] + z] = true;
        }
        Mask::new(dims, voxels).unwrap()
    }

    fn cuboid(low: [usize; 3], high: [usize; 3]) -> impl Iterator<Item = [usize; 3]> {
        (low[0]..high[0]).flat_map(move |x| {
            (low[1]..high[1]).flat_map(move |y| (low[2]..high[2]).map(move |z| [x, y, z]))
        })
    }

    #[test]
    fn prediction_names_follow_ivadomed_and_ivado_segment() {
        assert_eq!(
            parse_prediction_name("sub-01_T2w_pred.nii.gz"),
            Some(("sub-01_T2w".into(), false, None))
        );
        assert_eq!(
            parse_prediction_name("sub-01_ses-02_acq-ax_T2w_pred_class-12.nii"),
            Some(("sub-01_ses-02_acq-ax_T2w".into(), false, Some(12)))
        );
        assert_eq!(
            parse_prediction_name("sub-01_T2w_pred_soft_class-0.nii.gz"),
            Some(("sub-01_T2w".into(), true, Some(0)))
        );
        for ignored in [
            "sub-01_T2w_pred_painted.nii.gz",
            "sub-01_T2w.nii.gz",
            "_pred.nii.gz",
            "sub-01_T2w_pred.json",
            "sub-01_T2w_pred_class-.nii.gz",
        ] {
            assert_eq!(parse_prediction_name(ignored), None, "{ignored}");
        }
    }

    #[test]
    fn grid_displacement_is_the_largest_corner_shift() {
        let identity: Affine = [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        // A pure translation (0.3, 0.4, 0) moves every voxel by 0.5 mm.
        let mut shifted = identity;
        (shifted[0][3], shifted[1][3]) = (0.3, 0.4);
        let shape = [11, 5, 3];
        assert!((grid_displacement_mm(&identity, &shifted, shape) - 0.5).abs() < 1e-12);
        // Spacing 1.01 instead of 1 along x: voxel 10 (the far corner) is 0.1 mm off.
        let mut stretched = identity;
        stretched[0][0] = 1.01;
        assert!((grid_displacement_mm(&identity, &stretched, shape) - 0.1).abs() < 1e-12);
        assert_eq!(grid_displacement_mm(&identity, &identity, shape), 0.0);
    }

    #[test]
    fn sweep_thresholds_match_numpy_arange_without_zero() {
        // np.arange(0, 1, 0.1)[1:] = 0.1 .. 0.9; 0.25 gives 0.25, 0.5, 0.75 (1.0 excluded).
        let tenths = ThresholdSweep::new(0.1).thresholds().unwrap();
        assert_eq!(tenths, vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]);
        assert_eq!(
            ThresholdSweep::new(0.25).thresholds().unwrap(),
            vec![0.25, 0.5, 0.75]
        );
        let narrow = ThresholdSweep {
            low: 0.3,
            high: 0.6,
            ..ThresholdSweep::new(0.1)
        };
        assert_eq!(narrow.thresholds().unwrap(), vec![0.4, 0.5]);
        assert!(ThresholdSweep::new(0.0).thresholds().is_err());
        assert!(ThresholdSweep::new(1.5).thresholds().is_err());
    }

    #[test]
    fn summary_ignores_nan_and_uses_the_sample_std() {
        // Valid values 1, 2, 4: mean 7/3, sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 21/9, median 2.
        let s = summarize("x", &[4.0, f64::NAN, 1.0, 2.0]);
        assert_eq!(s.count, 3);
        assert!((s.mean - 7.0 / 3.0).abs() < 1e-12);
        assert!((s.std - (21.0f64 / 9.0).sqrt()).abs() < 1e-12);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 4.0));
        // Even count: median of the middle two; one value: std undefined; none: all NaN.
        assert_eq!(summarize("x", &[3.0, 1.0, 2.0, 10.0]).median, 2.5);
        let one = summarize("x", &[5.0, f64::NAN]);
        assert_eq!((one.count, one.mean, one.median), (1, 5.0, 5.0));
        assert!(one.std.is_nan());
        let none = summarize("x", &[f64::NAN]);
        assert!(none.count == 0 && none.mean.is_nan() && none.min.is_nan());
    }

    #[test]
    fn columns_are_ordered_like_ivadomed_per_class() {
        let mut names: Vec<String> = [
            "dice_class1",
            "vol_pred_class0",
            "ltpr_0-10vox_class0",
            "hausdorff_mm_class0",
            "mse_class0",
            "dice_class0",
            "vol_gt_class0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        names.sort_by_key(|n| column_key(n));
        assert_eq!(
            names,
            [
                "vol_pred_class0",
                "vol_gt_class0",
                "dice_class0",
                "mse_class0",
                "hausdorff_mm_class0",
                "ltpr_0-10vox_class0",
                "dice_class1"
            ]
        );
    }

    /// The lesion layout of the metrics tests, plus a predicted lesion overlapping a missed one by two
    /// voxels, in `[24, 12, 12]`.
    fn layout() -> (Mask, Mask) {
        let dims = [24, 12, 12];
        let truth = mask_with(
            dims,
            cuboid([1, 1, 1], [4, 4, 4]) // G1: 27, fully predicted
                .chain(cuboid([6, 1, 1], [9, 4, 4])) // G2: 27, 2 voxels predicted
                .chain(cuboid([11, 1, 1], [13, 3, 3])) // G3: 8, nothing predicted
                .chain(cuboid([16, 1, 1], [18, 3, 3])), // G4: 8, fully predicted
        );
        let prediction = mask_with(
            dims,
            cuboid([1, 1, 1], [4, 4, 4])
                .chain([[6, 1, 1], [6, 1, 2]])
                .chain(cuboid([16, 1, 1], [18, 3, 3]))
                .chain(cuboid([1, 8, 8], [3, 10, 10])) // P5: 8, far from the truth
                .chain([[10, 8, 8]]), // P6: 1 voxel
        );
        (prediction, truth)
    }

    #[test]
    fn painted_lesions_follow_ivadomed_colours_and_agree_with_lesion_detection() {
        let (prediction, truth) = layout();
        let spacing = [1.0, 1.0, 2.0];
        let painted = paint_lesions(&prediction, &truth, spacing, &LesionOptions::default());
        let at = |x: usize, y: usize, z: usize| painted.labels[(x * 12 + y) * 12 + z];
        // Default 3-voxel overlap: G1, G4 detected (their predictions TP); G2's 2-voxel prediction is FP and
        // is painted over the missed G2, whose other 25 voxels are FN; G3 FN; P5, P6 FP.
        assert_eq!(at(2, 2, 2), TP_COLOUR);
        assert_eq!(at(16, 1, 1), TP_COLOUR);
        assert_eq!((at(6, 1, 1), at(6, 1, 2)), (FP_COLOUR, FP_COLOUR));
        assert_eq!((at(7, 2, 2), at(11, 1, 1)), (FN_COLOUR, FN_COLOUR));
        assert_eq!((at(1, 8, 8), at(10, 8, 8)), (FP_COLOUR, FP_COLOUR));
        assert_eq!(at(0, 0, 0), 0);
        let count = |v: u8| painted.labels.iter().filter(|&&l| l == v).count();
        assert_eq!(count(TP_COLOUR), 27 + 8);
        assert_eq!(count(FP_COLOUR), 2 + 8 + 1);
        assert_eq!(count(FN_COLOUR), 25 + 8);

        // The painted outcomes must be the CSV's: compare with metrics::lesion_detection under several
        // criteria, including ones where the rounding of the needed overlap matters.
        for options in [
            LesionOptions::default(),
            LesionOptions {
                overlap: OverlapCriterion::Mm3(5.0), // round(2.5) = 2 voxels: G2 detected
                ..LesionOptions::default()
            },
            LesionOptions {
                overlap: OverlapCriterion::Ratio(0.5),
                connectivity: Connectivity::TwentySix,
                ..LesionOptions::default()
            },
            LesionOptions {
                remove_small: Some(ObjectSize {
                    value: 2.0,
                    unit: SizeUnit::Voxels,
                }),
                ..LesionOptions::default()
            },
        ] {
            let painted = paint_lesions(&prediction, &truth, spacing, &options);
            let detection = lesion_detection(&prediction, &truth, spacing, &options);
            assert_eq!(
                (
                    painted.true_positives + painted.false_positives,
                    painted.false_positives,
                    painted.false_negatives
                ),
                (
                    detection.predicted_lesions,
                    detection.false_positives,
                    detection.missed
                ),
                "{options:?}"
            );
        }
        // With 2 mm3 (1 voxel) of overlap, G2 is detected and its prediction is a TP.
        let loose = LesionOptions {
            overlap: OverlapCriterion::Mm3(5.0),
            ..LesionOptions::default()
        };
        let painted = paint_lesions(&prediction, &truth, spacing, &loose);
        assert_eq!(painted.labels[(6 * 12 + 1) * 12 + 1], TP_COLOUR);
        assert_eq!(painted.labels[(7 * 12 + 2) * 12 + 2], 0);
    }

    #[test]
    fn options_from_json_parse_units_and_reject_unknown_keys() {
        let options = EvalOptions::from_json(&serde_json::json!({
            "target_suffix": ["_seg-manual", "lesion-manual"],
            "threshold": 0.3,
            "overlap": 0.25,
            "overlap_unit": "ratio",
            "target_size": [20, 50],
            "target_size_unit": "mm3",
            "remove_small": 2,
            "connectivity": 26,
            "missing_label": "fail",
            "thr_increment": 0.05,
            "thr_range": [0.0, 0.5],
            "thr_lesion_metrics": true,
        }))
        .unwrap();
        assert_eq!(options.suffixes(), ["_seg-manual", "_lesion-manual"]);
        assert_eq!(options.metrics.threshold, 0.3);
        let lesions = &options.metrics.lesions;
        assert_eq!(lesions.overlap, OverlapCriterion::Ratio(0.25));
        assert_eq!(lesions.connectivity, Connectivity::TwentySix);
        assert_eq!(
            lesions.target_size,
            Some(SizeBins {
                thresholds: vec![20.0, 50.0],
                unit: SizeUnit::Mm3
            })
        );
        assert_eq!(
            lesions.remove_small,
            Some(ObjectSize {
                value: 2.0,
                unit: SizeUnit::Voxels
            })
        );
        assert_eq!(options.missing_label, MissingLabelPolicy::Fail);
        let sweep = options.threshold_sweep.unwrap();
        assert_eq!((sweep.increment, sweep.low, sweep.high), (0.05, 0.0, 0.5));
        assert!(sweep.lesion_metrics);

        for bad in [
            serde_json::json!({"treshold": 0.5}),
            serde_json::json!({"overlap": 2, "overlap_unit": "voxels"}),
            serde_json::json!({"overlap": 1.5, "overlap_unit": "ratio"}),
            serde_json::json!({"connectivity": 8}),
            serde_json::json!({"missing_label": "ignore"}),
            serde_json::json!({"thr_range": [0, 1]}),
            serde_json::json!({"thr_increment": 0}),
            serde_json::json!({"target_suffix": []}),
        ] {
            assert!(EvalOptions::from_json(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            EvalOptions::from_json(&Value::Null).unwrap(),
            EvalOptions::default()
        );
    }
}
