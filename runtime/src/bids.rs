//! BIDS indexing with the semantics of ivadomed's `BidsDataframe`.
//!
//! Layout handled: `root/sub-*/[ses-*/]<datatype>/<name><ext>` with datatype `anat`, `ct`, `micr` (or
//! `microscopy`) and extensions `.nii`, `.nii.gz`, `.png`, `.tif`, `.tiff` (`.ome.tif[f]`). Entities (subject,
//! session, sample, run, acquisition, ...) come from the filename; the suffix is the contrast.
//!
//! Labels live under `root/derivatives/labels/<sub>[/<ses>]/<datatype>/<image stem><suffix><ext>`, one per
//! target suffix (and an optional ROI suffix). They are matched only by that exact path, so a label file sitting
//! in another subject's folder is never used (it is reported with a warning), and a label whose image does not
//! exist is reported too.
//!
//! Metadata merges, in ivadomed's order: JSON sidecars (with BIDS inheritance: a sidecar higher in the tree,
//! or with fewer entities, applies to every file whose entities it names, and a closer one overrides it),
//! `participants.tsv`, `samples.tsv`, `sub-*/sub-*_sessions.tsv` and every `*_scans.tsv`. As with pandas'
//! merges in ivadomed, a column that a later table brings again is kept under `<name>_x` for the earlier one.
//!
//! The index can be written as ivadomed's `bids_dataframe.csv`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// ivadomed's name for the index table it writes in the output folder.
pub const INDEX_FILE_NAME: &str = "bids_dataframe.csv";

/// Folders (BIDS datatypes) searched for images.
const DATATYPES: &[&str] = &["anat", "ct", "micr", "microscopy"];

/// Image file extensions recognised, longest first so `.nii.gz` wins over `.gz`-less matches.
const IMAGE_EXTENSIONS: &[&str] = &[
    ".ome.tiff",
    ".ome.tif",
    ".nii.gz",
    ".tiff",
    ".nii",
    ".png",
    ".tif",
];

/// ivadomed's default `extensions` when none are given.
const DEFAULT_EXTENSIONS: &[&str] = &[".nii", ".nii.gz"];

/// Label extensions, in the order they are looked up.
const LABEL_EXTENSIONS: &[&str] = &[".nii.gz", ".nii", ".png", ".tif", ".tiff"];

/// Values pandas reads as missing (NaN) in a TSV file.
const TSV_MISSING: &[&str] = &[
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
];

/// The index: every selected image, sorted by image path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BidsIndex {
    /// the first root
    pub root: PathBuf,
    /// every dataset root indexed, in the order given
    pub roots: Vec<PathBuf>,
    pub entries: Vec<BidsEntry>,
    /// table columns after `path` and `filename`, in ivadomed's order (entities and metadata; columns empty
    /// for every entry are left out)
    pub columns: Vec<String>,
}

/// One image.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BidsEntry {
    /// subject folder name, e.g. "sub-unf01"
    pub subject: String,
    /// session folder name, e.g. "ses-01"
    pub session: Option<String>,
    /// filename suffix, e.g. "T2w"
    pub contrast: String,
    pub image: PathBuf,
    /// the first target: derivatives/labels/<sub>[/<ses>]/<datatype>/<image stem><first target suffix><ext>
    pub label: Option<PathBuf>,
    /// <image stem>.json next to the image
    pub sidecar: Option<PathBuf>,
    /// metadata columns of ivadomed's table for this file (participants.tsv, samples.tsv, sessions.tsv,
    /// scans.tsv, inherited JSON sidecars), values rendered as strings
    pub metadata: BTreeMap<String, String>,
    /// "sample-data5"
    pub sample: Option<String>,
    /// "run-1"
    pub run: Option<String>,
    /// "acq-hi"
    pub acquisition: Option<String>,
    /// "anat", "ct", "micr"
    pub datatype: String,
    /// ".nii.gz", ".png", ...
    pub extension: String,
    /// ivadomed's entity columns for this file: subject ("unf01"), session ("01"), sample, run ("1"),
    /// acquisition, datatype, extension, suffix, and any other filename entity
    pub entities: BTreeMap<String, String>,
    /// one label per target suffix, in the order given
    pub targets: Vec<Option<PathBuf>>,
    /// the ROI label (`roi_suffix`)
    pub roi: Option<PathBuf>,
}

impl BidsEntry {
    /// The value of one of ivadomed's table columns for this image (an entity or a metadata column).
    pub fn column(&self, name: &str) -> Option<&str> {
        self.metadata
            .get(name)
            .or_else(|| self.entities.get(name))
            .map(String::as_str)
    }

    /// The image file name, e.g. "sub-unf01_T1w.nii.gz".
    pub fn filename(&self) -> String {
        file_name(&self.image)
    }
}

/// What to index (the simple form: one target suffix, an optional contrast list; every image is kept, with
/// or without a label).
#[derive(Debug, Clone, Copy)]
pub struct BidsQuery<'a> {
    /// label suffix appended to the image stem, e.g. "_seg-manual" (a missing leading `_` is added);
    /// empty: no labels are looked up
    pub target_suffix: &'a str,
    /// keep only these contrasts (filename suffixes); `None`: all
    pub contrasts: Option<&'a [String]>,
}

/// What happens to an image without its required label(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingLabel {
    /// left out of the index, with a warning naming the file (ivadomed's behaviour)
    #[default]
    Skip,
    /// indexing fails, naming the file
    Error,
    /// kept without a label, silently
    Keep,
}

impl MissingLabel {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "skip" => Ok(Self::Skip),
            "error" => Ok(Self::Error),
            "keep" => Ok(Self::Keep),
            other => bail!("missing_label must be \"skip\", \"error\" or \"keep\", got {other:?}"),
        }
    }
}

/// Keep at most `n` subjects whose metadata column `metadata` equals `value` (ivadomed's `subject_selection`).
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectSelection {
    pub n: usize,
    pub metadata: String,
    pub value: String,
}

/// Everything ivadomed's `loader_parameters` say about indexing.
#[derive(Debug, Clone, PartialEq)]
pub struct BidsOptions {
    /// label suffixes (a missing leading `_` is added); empty: no labels are looked up
    pub target_suffixes: Vec<String>,
    /// ROI label suffix; when set, an image needs it too
    pub roi_suffix: Option<String>,
    /// `contrast_params.contrast_lst`: contrasts (filename suffixes) to index; empty: all
    pub contrasts: Vec<String>,
    /// `contrast_params.training_validation`: contrasts of the training and validation sets
    pub training_validation: Vec<String>,
    /// `contrast_params.testing`: contrasts of the test set
    pub testing: Vec<String>,
    /// file extensions to index (images and labels); empty: `.nii` and `.nii.gz`
    pub extensions: Vec<String>,
    pub missing_label: MissingLabel,
    /// keep only the subjects these select (the union over the list); empty: all subjects
    pub subject_selection: Vec<SubjectSelection>,
    /// `contrast_params.balance`: contrast -> fraction of its images to keep
    pub balance: BTreeMap<String, f64>,
    /// seeds subject_selection and balance
    pub seed: u64,
    /// write `bids_dataframe.csv` in this folder (before subject_selection and balance, as ivadomed)
    pub write_index: Option<PathBuf>,
}

impl Default for BidsOptions {
    fn default() -> Self {
        Self {
            target_suffixes: vec!["_seg-manual".to_owned()],
            roi_suffix: None,
            contrasts: Vec::new(),
            training_validation: Vec::new(),
            testing: Vec::new(),
            extensions: Vec::new(),
            missing_label: MissingLabel::Skip,
            subject_selection: Vec::new(),
            balance: BTreeMap::new(),
            seed: 6,
            write_index: None,
        }
    }
}

impl BidsOptions {
    /// The option keys `from_json` knows (the script `bids(path, #{...})` options).
    pub const KEYS: &'static [&'static str] = &[
        "target_suffix",
        "roi_suffix",
        "contrasts",
        "training_validation",
        "testing",
        "extensions",
        "subject_selection",
        "balance",
        "missing_label",
        "write_index",
        "random_seed",
    ];

    /// Options from a JSON object with the keys of `KEYS`: `target_suffix` (a string or a list; "" or [] for
    /// no labels), `roi_suffix`, `contrasts` / `training_validation` / `testing` / `extensions` (lists, or one
    /// string), `subject_selection` (`{n, metadata, value}`, a list of them, or ivadomed's form with equal-length
    /// lists), `balance` (`{contrast: fraction}`), `missing_label` ("skip", "error" or "keep"), `write_index` (a
    /// folder) and `random_seed`. Unknown keys and wrong types are errors naming the key.
    pub fn from_json(value: &serde_json::Value) -> Result<BidsOptions> {
        use serde_json::Value;
        let Value::Object(map) = value else {
            bail!("BIDS options must be an object, got {value}");
        };
        if let Some(unknown) = map.keys().find(|k| !Self::KEYS.contains(&k.as_str())) {
            bail!(
                "unknown option `{unknown}` (known: {})",
                Self::KEYS.join(", ")
            );
        }
        let strings = |key: &str, value: &Value| -> Result<Vec<String>> {
            match value {
                Value::String(s) if s.is_empty() => Ok(Vec::new()),
                Value::String(s) => Ok(vec![s.clone()]),
                Value::Array(items) => items
                    .iter()
                    .map(|item| {
                        item.as_str().map(str::to_owned).ok_or_else(|| {
                            anyhow!("option `{key}` must be a list of strings, got {item} in it")
                        })
                    })
                    .collect(),
                other => bail!("option `{key}` must be a string or a list of strings, got {other}"),
            }
        };
        let mut options = BidsOptions::default();
        for (key, value) in map {
            match key.as_str() {
                "target_suffix" => options.target_suffixes = strings(key, value)?,
                "roi_suffix" => options.roi_suffix = strings(key, value)?.into_iter().next(),
                "contrasts" => options.contrasts = strings(key, value)?,
                "training_validation" => options.training_validation = strings(key, value)?,
                "testing" => options.testing = strings(key, value)?,
                "extensions" => options.extensions = strings(key, value)?,
                "missing_label" => {
                    let text = value.as_str().ok_or_else(|| {
                        anyhow!("option `missing_label` must be a string, got {value}")
                    })?;
                    options.missing_label = MissingLabel::parse(text)?;
                }
                "write_index" => {
                    let text = value.as_str().ok_or_else(|| {
                        anyhow!("option `write_index` must be a folder path, got {value}")
                    })?;
                    options.write_index = Some(PathBuf::from(text));
                }
                "random_seed" => {
                    options.seed = value.as_u64().ok_or_else(|| {
                        anyhow!("option `random_seed` must be a non-negative integer, got {value}")
                    })?
                }
                "balance" => {
                    let Value::Object(fractions) = value else {
                        bail!(
                            "option `balance` must be a map of contrast to fraction, got {value}"
                        );
                    };
                    for (contrast, fraction) in fractions {
                        let fraction = fraction.as_f64().ok_or_else(|| {
                            anyhow!("option `balance`: the fraction of {contrast} must be a number, got {fraction}")
                        })?;
                        options.balance.insert(contrast.clone(), fraction);
                    }
                }
                "subject_selection" => options.subject_selection = subject_selection(value)?,
                _ => unreachable!("keys were checked"),
            }
        }
        Ok(options)
    }

    /// The contrasts indexed: `contrasts` plus `training_validation` plus `testing`; empty: all.
    fn indexed_contrasts(&self) -> BTreeSet<String> {
        self.contrasts
            .iter()
            .chain(&self.training_validation)
            .chain(&self.testing)
            .cloned()
            .collect()
    }

    fn extension_list(&self) -> Vec<String> {
        if self.extensions.is_empty() {
            DEFAULT_EXTENSIONS.iter().map(|e| e.to_string()).collect()
        } else {
            self.extensions
                .iter()
                .map(|e| {
                    if e.starts_with('.') {
                        e.clone()
                    } else {
                        format!(".{e}")
                    }
                })
                .collect()
        }
    }
}

impl BidsIndex {
    /// Scans `root` the simple way: every image of the wanted contrasts (NIfTI files), with the label of
    /// `query.target_suffix` when it exists. Errors when the root is missing, is not a directory, or holds no
    /// `sub-*` folder.
    pub fn scan(root: &Path, query: &BidsQuery) -> Result<BidsIndex> {
        let options = BidsOptions {
            target_suffixes: if query.target_suffix.is_empty() {
                Vec::new()
            } else {
                vec![query.target_suffix.to_owned()]
            },
            contrasts: query.contrasts.map(<[String]>::to_vec).unwrap_or_default(),
            missing_label: MissingLabel::Keep,
            ..BidsOptions::default()
        };
        // an explicit empty contrast list selects nothing here (ivadomed's empty list means "all")
        if query.contrasts.is_some_and(|c| c.is_empty()) {
            let mut index = Self::build(&[root.to_path_buf()], &options)?;
            index.entries.clear();
            index.columns.clear();
            return Ok(index);
        }
        Self::build(&[root.to_path_buf()], &options)
    }

    /// Indexes one or more BIDS datasets as ivadomed's `BidsDataframe` does, then applies `subject_selection`
    /// and `balance`. Errors when a root is missing, is not a directory or holds no `sub-*` folder, when a
    /// sidecar or TSV file is malformed (naming the file and the line), and, with `MissingLabel::Error`, when an
    /// image lacks its label.
    pub fn build(roots: &[PathBuf], options: &BidsOptions) -> Result<BidsIndex> {
        if roots.is_empty() {
            bail!("no BIDS root given");
        }
        let mut entries = Vec::new();
        let mut columns: Vec<String> = Vec::new();
        for root in roots {
            let (root_entries, root_columns) = index_root(root, options)?;
            if root_entries.is_empty() {
                tracing::warn!(root = %root.display(), "no image selected in this dataset");
            }
            entries.extend(root_entries);
            for column in root_columns {
                if !columns.contains(&column) {
                    columns.push(column);
                }
            }
        }
        entries.sort_by(|a, b| a.image.cmp(&b.image));
        check_contrasts_exist(roots, options, &entries)?;
        // as ivadomed, columns empty for every row are dropped
        columns.retain(|c| entries.iter().any(|e| e.column(c).is_some()));
        let mut index = BidsIndex {
            root: roots[0].clone(),
            roots: roots.to_vec(),
            entries,
            columns,
        };
        if let Some(dir) = &options.write_index {
            index.write_csv(dir)?;
        }
        index.select_subjects(&options.subject_selection, options.seed)?;
        index.balance_contrasts(&options.balance, options.seed)?;
        Ok(index)
    }

    /// Sorted unique subjects of the entries.
    pub fn subjects(&self) -> Vec<String> {
        let mut s: Vec<String> = self.entries.iter().map(|e| e.subject.clone()).collect();
        s.sort();
        s.dedup();
        s
    }

    /// Sorted unique contrasts of the entries.
    pub fn contrasts(&self) -> Vec<String> {
        let mut c: Vec<String> = self.entries.iter().map(|e| e.contrast.clone()).collect();
        c.sort();
        c.dedup();
        c
    }

    /// Entries that have a label.
    pub fn with_labels(&self) -> Vec<&BidsEntry> {
        self.entries.iter().filter(|e| e.label.is_some()).collect()
    }

    /// Entries of these contrasts (e.g. `training_validation` or `testing`); empty: all.
    pub fn with_contrasts(&self, contrasts: &[String]) -> Vec<&BidsEntry> {
        self.entries
            .iter()
            .filter(|e| contrasts.is_empty() || contrasts.contains(&e.contrast))
            .collect()
    }

    /// Entries grouped by (subject, session), e.g. to stack a subject's contrasts as channels.
    pub fn by_subject_session(&self) -> BTreeMap<(String, Option<String>), Vec<&BidsEntry>> {
        let mut groups: BTreeMap<(String, Option<String>), Vec<&BidsEntry>> = BTreeMap::new();
        for entry in &self.entries {
            groups
                .entry((entry.subject.clone(), entry.session.clone()))
                .or_default()
                .push(entry);
        }
        groups
    }

    /// Writes ivadomed's `bids_dataframe.csv` into `dir` (created if needed): columns `path`, `filename`, then
    /// `self.columns`; one row per image with its entities and metadata, and one row per label file with only
    /// `path` and `filename` (as pybids gives derivatives no entities). Rows are sorted by filename.
    pub fn write_csv(&self, dir: &Path) -> Result<PathBuf> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut rows: Vec<Vec<String>> = Vec::new();
        for entry in &self.entries {
            let mut row = vec![absolute(&entry.image), entry.filename()];
            row.extend(
                self.columns
                    .iter()
                    .map(|c| entry.column(c).unwrap_or("").to_owned()),
            );
            rows.push(row);
            let mut derivatives: Vec<&PathBuf> =
                entry.targets.iter().flatten().chain(&entry.roi).collect();
            derivatives.sort();
            derivatives.dedup();
            for derivative in derivatives {
                let mut row = vec![absolute(derivative), file_name(derivative)];
                row.resize(self.columns.len() + 2, String::new());
                rows.push(row);
            }
        }
        rows.sort_by(|a, b| (&a[1], &a[0]).cmp(&(&b[1], &b[0])));
        rows.dedup();
        let mut text = String::new();
        let header: Vec<&str> = ["path", "filename"]
            .into_iter()
            .chain(self.columns.iter().map(String::as_str))
            .collect();
        push_csv_line(&mut text, header.iter().copied());
        for row in &rows {
            push_csv_line(&mut text, row.iter().map(String::as_str));
        }
        let path = dir.join(INDEX_FILE_NAME);
        let partial = dir.join(format!(".{INDEX_FILE_NAME}.partial"));
        fs::write(&partial, text).with_context(|| format!("cannot write {}", partial.display()))?;
        fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))?;
        tracing::info!(file = %path.display(), rows = rows.len(), "wrote the BIDS index");
        Ok(path)
    }

    /// ivadomed's `subject_selection`: for each rule, at most `n` subjects (drawn with `seed` from the sorted
    /// subjects whose column equals the value) are kept; the result is the union over the rules.
    pub fn select_subjects(&mut self, rules: &[SubjectSelection], seed: u64) -> Result<()> {
        if rules.is_empty() {
            return Ok(());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut kept: BTreeSet<String> = BTreeSet::new();
        let mut matches = Vec::with_capacity(rules.len());
        for rule in rules {
            if !self
                .entries
                .iter()
                .any(|e| e.column(&rule.metadata).is_some())
            {
                bail!(
                    "subject_selection: no image has a metadata column `{}`",
                    rule.metadata
                );
            }
            let mut candidates: Vec<String> = self
                .entries
                .iter()
                .filter(|e| e.column(&rule.metadata) == Some(rule.value.as_str()))
                .map(|e| e.subject.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if candidates.len() < rule.n {
                tracing::warn!(
                    "subject_selection: only {} subject(s) have {} == {:?}, fewer than the {} asked for; keeping them all",
                    candidates.len(),
                    rule.metadata,
                    rule.value,
                    rule.n
                );
            }
            matches.push(format!(
                "{} == {:?}: {} subject(s) of the {} asked for",
                rule.metadata,
                rule.value,
                candidates.len(),
                rule.n
            ));
            candidates.shuffle(&mut rng);
            kept.extend(candidates.into_iter().take(rule.n));
        }
        // An empty index would only fail later, as an empty dataset far from its cause.
        if kept.is_empty() {
            bail!(
                "subject_selection kept no subject, so no image is left ({})",
                matches.join("; ")
            );
        }
        self.entries.retain(|e| kept.contains(&e.subject));
        Ok(())
    }

    /// ivadomed's `contrast_params.balance`: of the `tot` images of a contrast, the k-th kept is the one with
    /// k / tot <= fraction (so floor-like counts); which images are kept is drawn with `seed`.
    pub fn balance_contrasts(&mut self, balance: &BTreeMap<String, f64>, seed: u64) -> Result<()> {
        if balance.is_empty() {
            return Ok(());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut dropped: BTreeSet<PathBuf> = BTreeSet::new();
        for (contrast, &fraction) in balance {
            if !(0.0..=1.0).contains(&fraction) {
                bail!("balance: the fraction of {contrast} must be in [0, 1], got {fraction}");
            }
            let mut images: Vec<PathBuf> = self
                .entries
                .iter()
                .filter(|e| &e.contrast == contrast)
                .map(|e| e.image.clone())
                .collect();
            if images.is_empty() {
                tracing::warn!("balance: no image of contrast {contrast} in the index");
                continue;
            }
            let total = images.len();
            let keep = (1..=total)
                .filter(|&k| k as f64 / total as f64 <= fraction)
                .count();
            images.sort();
            images.shuffle(&mut rng);
            dropped.extend(images.into_iter().skip(keep));
        }
        self.entries.retain(|e| !dropped.contains(&e.image));
        Ok(())
    }
}

/// `subject_selection` rules from `{n, metadata, value}`, a list of those, or ivadomed's
/// `{n: [..], metadata: [..], value: [..]}`.
fn subject_selection(value: &serde_json::Value) -> Result<Vec<SubjectSelection>> {
    use serde_json::Value;
    let rule_error = |detail: String| anyhow!("option `subject_selection`: {detail}");
    match value {
        Value::Array(rules) => rules.iter().try_fold(Vec::new(), |mut all, rule| {
            all.extend(subject_selection(rule)?);
            Ok(all)
        }),
        Value::Object(map) => {
            if let Some(unknown) = map
                .keys()
                .find(|k| !["n", "metadata", "value"].contains(&k.as_str()))
            {
                return Err(rule_error(format!(
                    "unknown key `{unknown}` (known: n, metadata, value)"
                )));
            }
            let field = |name: &str| {
                map.get(name)
                    .ok_or_else(|| rule_error(format!("`{name}` is missing")))
            };
            let as_list = |v: &Value| match v {
                Value::Array(items) => items.clone(),
                other => vec![other.clone()],
            };
            let (ns, metadata, values) = (
                as_list(field("n")?),
                as_list(field("metadata")?),
                as_list(field("value")?),
            );
            if ns.len() != metadata.len() || ns.len() != values.len() {
                return Err(rule_error(
                    "n, metadata and value lists must have the same length".into(),
                ));
            }
            ns.iter()
                .zip(&metadata)
                .zip(&values)
                .map(|((n, m), v)| {
                    Ok(SubjectSelection {
                        n: n.as_u64().ok_or_else(|| {
                            rule_error(format!("`n` must be a non-negative integer, got {n}"))
                        })? as usize,
                        metadata: m
                            .as_str()
                            .ok_or_else(|| {
                                rule_error(format!("`metadata` must be a column name, got {m}"))
                            })?
                            .to_owned(),
                        value: render_json_cell(v)
                            .ok_or_else(|| rule_error("`value` must not be null".into()))?,
                    })
                })
                .collect()
        }
        other => Err(rule_error(format!("expected a map, got {other}"))),
    }
}

/// One image found on disk, with its filename parsed.
struct Found {
    path: PathBuf,
    subject_dir: String,
    session_dir: Option<String>,
    datatype: String,
    stem: String,
    extension: String,
    /// key-value entities in filename order, e.g. [("sub", "unf01"), ("ses", "01")]
    pairs: Vec<(String, String)>,
    suffix: String,
}

impl Found {
    fn filename(&self) -> String {
        format!("{}{}", self.stem, self.extension)
    }

    /// Raw (`<sub>[/<ses>]/<datatype>`) folder relative to a root.
    fn relative_dir(&self) -> PathBuf {
        let mut dir = PathBuf::from(&self.subject_dir);
        if let Some(session) = &self.session_dir {
            dir.push(session);
        }
        dir.join(&self.datatype)
    }

    /// ivadomed's entity columns.
    fn entity_columns(&self) -> BTreeMap<String, String> {
        let mut columns: BTreeMap<String, String> = self
            .pairs
            .iter()
            .map(|(key, value)| {
                let value = if key == "run" {
                    // pybids reads run as an integer: "run-01" is 1
                    value
                        .parse::<u64>()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| value.clone())
                } else {
                    value.clone()
                };
                (entity_column(key).to_owned(), value)
            })
            .collect();
        columns.insert("suffix".into(), self.suffix.clone());
        columns.insert("datatype".into(), self.datatype.clone());
        columns.insert("extension".into(), self.extension.clone());
        columns
    }

    fn entity(&self, key: &str) -> Option<String> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(k, v)| format!("{k}-{v}"))
    }
}

/// pybids' column name of a filename entity key.
fn entity_column(key: &str) -> &str {
    match key {
        "sub" => "subject",
        "ses" => "session",
        "acq" => "acquisition",
        "ce" => "ceagent",
        "rec" => "reconstruction",
        "dir" => "direction",
        "trc" => "tracer",
        "mod" => "modality",
        other => other,
    }
}

/// One dataset root: its selected entries and its table columns in ivadomed's order.
/// A requested contrast that no image of the datasets has is a typo or the wrong dataset: an error naming it and
/// the contrasts that exist. A contrast whose images were all skipped (missing labels) is only warned about.
fn check_contrasts_exist(
    roots: &[PathBuf],
    options: &BidsOptions,
    entries: &[BidsEntry],
) -> Result<()> {
    let absent: Vec<String> = options
        .indexed_contrasts()
        .into_iter()
        .filter(|c| !entries.iter().any(|e| &e.contrast == c))
        .collect();
    if absent.is_empty() {
        return Ok(());
    }
    let every = BidsOptions {
        contrasts: Vec::new(),
        training_validation: Vec::new(),
        testing: Vec::new(),
        missing_label: MissingLabel::Keep,
        write_index: None,
        ..options.clone()
    };
    let mut found = BTreeSet::new();
    for root in roots {
        let (all, _) = index_root(root, &every)?;
        found.extend(all.into_iter().map(|e| e.contrast));
    }
    let unknown: Vec<&String> = absent.iter().filter(|c| !found.contains(*c)).collect();
    if !unknown.is_empty() {
        let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        bail!(
            "unknown contrast {}: no image in {} has that suffix (contrasts there: {})",
            unknown
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", "),
            roots.join(", "),
            found.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    for contrast in absent {
        tracing::warn!(
            contrast,
            "every image of this contrast was skipped (see the warnings above)"
        );
    }
    Ok(())
}

fn index_root(root: &Path, options: &BidsOptions) -> Result<(Vec<BidsEntry>, Vec<String>)> {
    let meta = fs::metadata(root).with_context(|| {
        format!(
            "BIDS root {} does not exist or cannot be read",
            root.display()
        )
    })?;
    if !meta.is_dir() {
        bail!("BIDS root {} is not a directory", root.display());
    }
    let subjects = list_dirs(root, "sub-")?;
    if subjects.is_empty() {
        bail!(
            "BIDS root {} has no subject folders (sub-*)",
            root.display()
        );
    }
    let contrasts = options.indexed_contrasts();
    let extensions = options.extension_list();
    let found: Vec<Found> = find_images(root, &subjects)?
        .into_iter()
        .filter(|f| contrasts.is_empty() || contrasts.contains(&f.suffix))
        .filter(|f| {
            extensions
                .iter()
                .any(|e| f.filename().ends_with(e.as_str()))
        })
        .collect();

    let mut table = Table::from_sidecars(root, &found)?;
    table.merge_tsv_metadata(root, &found)?;

    let targets: Vec<String> = options
        .target_suffixes
        .iter()
        .map(|s| normalize_suffix(s))
        .collect();
    let roi = options.roi_suffix.as_deref().map(normalize_suffix);
    let labels_root = root.join("derivatives").join("labels");
    let label_extensions: Vec<&str> = LABEL_EXTENSIONS
        .iter()
        .copied()
        .filter(|e| extensions.iter().any(|allowed| allowed == e))
        .collect();
    let find_label = |image: &Found, suffix: &str| -> Option<PathBuf> {
        let dir = labels_root.join(image.relative_dir());
        label_extensions
            .iter()
            .map(|ext| dir.join(format!("{}{suffix}{ext}", image.stem)))
            .find(|p| p.is_file())
    };

    let mut entries = Vec::new();
    for (image, row) in found.iter().zip(table.rows) {
        let image_targets: Vec<Option<PathBuf>> =
            targets.iter().map(|s| find_label(image, s)).collect();
        let image_roi = roi.as_deref().and_then(|s| find_label(image, s));
        let has_target = targets.is_empty() || image_targets.iter().any(Option::is_some);
        let has_roi = roi.is_none() || image_roi.is_some();
        if !(has_target && has_roi) {
            let mut missing = Vec::new();
            if !has_target {
                missing.push(format!("a target label ({})", targets.join(" or ")));
            }
            if let (false, Some(roi)) = (has_roi, &roi) {
                missing.push(format!("its ROI label ({roi})"));
            }
            let looked_in = labels_root.join(image.relative_dir());
            match options.missing_label {
                MissingLabel::Keep => {}
                MissingLabel::Skip => {
                    tracing::warn!(
                        file = %image.path.display(),
                        "skipping image: it has no {} in {}",
                        missing.join(" and "),
                        looked_in.display()
                    );
                    continue;
                }
                MissingLabel::Error => bail!(
                    "image {} has no {} in {}",
                    image.path.display(),
                    missing.join(" and "),
                    looked_in.display()
                ),
            }
        } else if options.missing_label != MissingLabel::Keep {
            for (suffix, target) in targets.iter().zip(&image_targets) {
                if target.is_none() {
                    tracing::warn!(file = %image.path.display(), "image has no {suffix} label");
                }
            }
        }
        let entities = image.entity_columns();
        let metadata: BTreeMap<String, String> = row
            .into_iter()
            .filter(|(column, _)| !entities.contains_key(column))
            .collect();
        let sidecar =
            Some(image.path.with_file_name(format!("{}.json", image.stem))).filter(|p| p.is_file());
        entries.push(BidsEntry {
            subject: image.subject_dir.clone(),
            session: image.session_dir.clone(),
            contrast: image.suffix.clone(),
            image: image.path.clone(),
            label: image_targets.first().cloned().flatten(),
            sidecar,
            metadata,
            sample: image.entity("sample"),
            run: image.entity("run"),
            acquisition: image.entity("acq"),
            datatype: image.datatype.clone(),
            extension: image.extension.clone(),
            entities,
            targets: image_targets,
            roi: image_roi,
        });
    }
    if labels_root.is_dir() {
        let wanted: Vec<&str> = targets
            .iter()
            .map(String::as_str)
            .chain(roi.as_deref())
            .collect();
        check_label_tree(root, &labels_root, &wanted, &label_extensions)?;
    }
    Ok((entries, table.columns))
}

/// Every image under `root/<subject>/[ses-*/]<datatype>/`, sorted by path; files whose entities disagree with
/// their folders are skipped with a warning.
fn find_images(root: &Path, subjects: &[String]) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    for subject in subjects {
        let subject_dir = root.join(subject);
        let mut units = vec![(None, subject_dir.clone())];
        for session in list_dirs(&subject_dir, "ses-")? {
            let dir = subject_dir.join(&session);
            units.push((Some(session), dir));
        }
        for (session, unit_dir) in units {
            for datatype in DATATYPES {
                let dir = unit_dir.join(datatype);
                if !dir.is_dir() {
                    continue;
                }
                for path in list_image_files(&dir)? {
                    let name = file_name(&path);
                    let Some((stem, extension)) = split_extension(&name) else {
                        continue;
                    };
                    let Some((pairs, suffix)) =
                        check_entities(stem, subject, session.as_deref(), &path)
                    else {
                        continue;
                    };
                    out.push(Found {
                        path: path.clone(),
                        subject_dir: subject.clone(),
                        session_dir: session.clone(),
                        datatype: datatype.to_string(),
                        stem: stem.to_owned(),
                        extension: extension.to_owned(),
                        pairs,
                        suffix,
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// ivadomed's table for one root, one row per image (in `found` order), built up like its pandas merges.
struct Table {
    columns: Vec<String>,
    rows: Vec<BTreeMap<String, String>>,
}

impl Table {
    /// Entities and inherited sidecar metadata; columns sorted, as pybids' `to_df`.
    fn from_sidecars(root: &Path, found: &[Found]) -> Result<Table> {
        let mut sidecars = Sidecars::default();
        let mut rows = Vec::with_capacity(found.len());
        let mut columns = BTreeSet::new();
        for image in found {
            let mut row = image.entity_columns();
            for (key, value) in sidecars.inherited(root, image)? {
                if let Some(text) = render_json_cell(&value) {
                    row.insert(key, text);
                }
            }
            columns.extend(row.keys().cloned());
            rows.push(row);
        }
        Ok(Table {
            columns: columns.into_iter().collect(),
            rows,
        })
    }

    /// Adds columns as pandas' left merge with suffixes ("_x", None) does: an existing column that the new
    /// table brings again is renamed `<name>_x`.
    fn add_columns(&mut self, new_columns: &[String]) {
        for column in new_columns {
            if let Some(position) = self.columns.iter().position(|c| c == column) {
                let renamed = format!("{column}_x");
                self.columns[position] = renamed.clone();
                for row in &mut self.rows {
                    if let Some(value) = row.remove(column) {
                        row.insert(renamed.clone(), value);
                    }
                }
            }
            self.columns.push(column.clone());
        }
    }

    /// Merges `tsv`'s non-key columns (`columns`, in that order) into the rows `key_of` finds a TSV row for.
    fn merge(
        &mut self,
        tsv_rows: &[KeyedRow],
        columns: &[String],
        key_of: impl Fn(usize) -> Option<Vec<String>>,
    ) {
        self.add_columns(columns);
        let mut by_key: HashMap<&[String], &BTreeMap<String, String>> = HashMap::new();
        for (key, values) in tsv_rows {
            by_key.entry(key.as_slice()).or_insert(values);
        }
        for index in 0..self.rows.len() {
            let Some(key) = key_of(index) else { continue };
            if let Some(values) = by_key.get(key.as_slice()) {
                for (column, value) in values.iter() {
                    self.rows[index].insert(column.clone(), value.clone());
                }
            }
        }
    }

    /// participant_id and participants.tsv, sample_id and samples.tsv, sessions.tsv, scans.tsv, in ivadomed's
    /// order.
    fn merge_tsv_metadata(&mut self, root: &Path, found: &[Found]) -> Result<()> {
        self.add_columns(&["participant_id".to_owned()]);
        for (row, image) in self.rows.iter_mut().zip(found) {
            row.insert("participant_id".into(), image.subject_dir.clone());
        }

        let participants = root.join("participants.tsv");
        if participants.is_file() {
            let tsv = Tsv::read(&participants)?;
            // pybids orders the participant variables by name
            let mut columns = tsv.columns_except(&["participant_id", "suffix"]);
            columns.sort();
            let rows = tsv.keyed_rows(&["participant_id"], &columns)?;
            self.merge(&rows, &columns, |i| {
                Some(vec![found[i].subject_dir.clone()])
            });
        }

        if found.iter().any(|f| f.entity("sample").is_some()) {
            self.add_columns(&["sample_id".to_owned()]);
            for (row, image) in self.rows.iter_mut().zip(found) {
                if let Some(sample) = image.entity("sample") {
                    row.insert("sample_id".into(), sample);
                }
            }
            let samples = root.join("samples.tsv");
            if samples.is_file() {
                let tsv = Tsv::read(&samples)?;
                let columns = tsv.columns_except(&["participant_id", "sample_id"]);
                let rows = tsv.keyed_rows(&["participant_id", "sample_id"], &columns)?;
                self.merge(&rows, &columns, |i| {
                    Some(vec![
                        found[i].subject_dir.clone(),
                        found[i].entity("sample")?,
                    ])
                });
            }
        }

        let mut session_rows = Vec::new();
        let mut session_columns = BTreeSet::new();
        let mut any_sessions = false;
        for subject in list_dirs(root, "sub-")? {
            let path = root.join(&subject).join(format!("{subject}_sessions.tsv"));
            if !path.is_file() {
                continue;
            }
            any_sessions = true;
            let tsv = Tsv::read(&path)?;
            let columns = tsv.columns_except(&["session_id"]);
            for (key, values) in tsv.keyed_rows(&["session_id"], &columns)? {
                session_rows.push((vec![subject.clone(), key[0].clone()], values));
            }
            session_columns.extend(columns);
        }
        if any_sessions {
            // pybids orders the session variables by name
            let columns: Vec<String> = session_columns.into_iter().collect();
            self.merge(&session_rows, &columns, |i| {
                Some(vec![
                    found[i].subject_dir.clone(),
                    found[i].session_dir.clone()?,
                ])
            });
        }

        let mut scan_files = Vec::new();
        walk_files(root, &mut scan_files)?;
        scan_files.retain(|p| file_name(p).ends_with("scans.tsv"));
        scan_files.sort();
        if !scan_files.is_empty() {
            let mut scan_rows = Vec::new();
            let mut columns: Vec<String> = Vec::new();
            for path in &scan_files {
                let tsv = Tsv::read(path)?;
                let file_columns = tsv.columns_except(&["filename"]);
                for (key, values) in tsv.keyed_rows(&["filename"], &file_columns)? {
                    // scans.tsv names files relative to the session folder; ivadomed matches basenames
                    let base = key[0].rsplit('/').next().unwrap_or_default().to_owned();
                    scan_rows.push((vec![base], values));
                }
                for column in file_columns {
                    if !columns.contains(&column) {
                        columns.push(column);
                    }
                }
            }
            self.merge(&scan_rows, &columns, |i| Some(vec![found[i].filename()]));
        }
        Ok(())
    }
}

/// Parsed JSON sidecars, cached per file.
#[derive(Default)]
struct Sidecars {
    parsed: HashMap<PathBuf, serde_json::Map<String, serde_json::Value>>,
    /// per folder: its `.json` files with a parsable name, as (entities, suffix, path)
    listed: HashMap<PathBuf, Vec<SidecarName>>,
}

/// A sidecar file's entities, suffix and path.
type SidecarName = (Vec<(String, String)>, String, PathBuf);

impl Sidecars {
    /// The sidecar metadata that applies to `image`: every `.json` from the root down to the image's folder
    /// whose suffix is the image's and whose entities are all among the image's; closer folders, then files
    /// naming more entities, override.
    fn inherited(
        &mut self,
        root: &Path,
        image: &Found,
    ) -> Result<BTreeMap<String, serde_json::Value>> {
        let mut dirs = vec![root.to_path_buf(), root.join(&image.subject_dir)];
        if let Some(session) = &image.session_dir {
            dirs.push(root.join(&image.subject_dir).join(session));
        }
        dirs.push(root.join(image.relative_dir()));
        let mut merged = BTreeMap::new();
        for dir in dirs {
            let mut applicable: Vec<(usize, PathBuf)> = self
                .list(&dir)?
                .iter()
                .filter(|(pairs, suffix, _)| {
                    *suffix == image.suffix && pairs.iter().all(|p| image.pairs.contains(p))
                })
                .map(|(pairs, _, path)| (pairs.len(), path.clone()))
                .collect();
            applicable.sort();
            for (_, path) in applicable {
                for (key, value) in self.read(&path)? {
                    merged.insert(key.clone(), value.clone());
                }
            }
        }
        Ok(merged)
    }

    fn list(&mut self, dir: &Path) -> Result<&[SidecarName]> {
        if !self.listed.contains_key(dir) {
            let mut names = Vec::new();
            for entry in
                fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
            {
                let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let Some((pairs, suffix)) = name.strip_suffix(".json").and_then(parse_stem) else {
                    continue;
                };
                names.push((pairs, suffix, entry.path()));
            }
            self.listed.insert(dir.to_path_buf(), names);
        }
        Ok(&self.listed[dir])
    }

    fn read(&mut self, path: &Path) -> Result<&serde_json::Map<String, serde_json::Value>> {
        if !self.parsed.contains_key(path) {
            let text = fs::read_to_string(path)
                .with_context(|| format!("cannot read JSON sidecar {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow!("invalid JSON sidecar {}: {e}", path.display()))?;
            let serde_json::Value::Object(map) = value else {
                bail!(
                    "invalid JSON sidecar {}: the top level is not an object",
                    path.display()
                );
            };
            self.parsed.insert(path.to_path_buf(), map);
        }
        Ok(&self.parsed[path])
    }
}

/// A TSV row: its key values, and its non-missing cells by column.
type KeyedRow = (Vec<String>, BTreeMap<String, String>);

/// A tab-separated table read as pandas does: missing values (`n/a`, empty, ...) are absent.
struct Tsv {
    path: PathBuf,
    header: Vec<String>,
    rows: Vec<(usize, Vec<Option<String>>)>,
}

impl Tsv {
    fn read(path: &Path) -> Result<Tsv> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, line)| (i + 1, line.trim_end_matches('\r')))
            .filter(|(_, line)| !line.trim().is_empty());
        let Some((_, header)) = lines.next() else {
            bail!("{}: empty table (no header line)", path.display());
        };
        let header: Vec<String> = header.split('\t').map(|h| h.trim().to_owned()).collect();
        let mut rows = Vec::new();
        for (number, line) in lines {
            let fields: Vec<&str> = line.split('\t').collect();
            if fields.len() > header.len() {
                bail!(
                    "{}: line {number}: {} fields, but the header has {}",
                    path.display(),
                    fields.len(),
                    header.len()
                );
            }
            let mut values: Vec<Option<String>> = fields
                .iter()
                .map(|f| Some(f.to_string()).filter(|v| !TSV_MISSING.contains(&v.as_str())))
                .collect();
            values.resize(header.len(), None);
            rows.push((number, values));
        }
        Ok(Tsv {
            path: path.to_path_buf(),
            header,
            rows,
        })
    }

    fn columns_except(&self, keys: &[&str]) -> Vec<String> {
        self.header
            .iter()
            .filter(|h| !keys.contains(&h.as_str()))
            .cloned()
            .collect()
    }

    /// (key values, non-missing values of `columns`) per row; errors when a key column is absent or a key
    /// value is missing.
    fn keyed_rows(&self, keys: &[&str], columns: &[String]) -> Result<Vec<KeyedRow>> {
        let position = |name: &str| self.header.iter().position(|h| h == name);
        let key_positions = keys
            .iter()
            .map(|k| {
                position(k).ok_or_else(|| {
                    anyhow!(
                        "{}: no `{k}` column (header: {})",
                        self.path.display(),
                        self.header.join(", ")
                    )
                })
            })
            .collect::<Result<Vec<usize>>>()?;
        let mut out = Vec::new();
        for (number, values) in &self.rows {
            let key = key_positions
                .iter()
                .zip(keys)
                .map(|(&p, k)| {
                    values[p].clone().ok_or_else(|| {
                        anyhow!("{}: line {number}: no `{k}` value", self.path.display())
                    })
                })
                .collect::<Result<Vec<String>>>()?;
            let cells = columns
                .iter()
                .filter_map(|c| {
                    let p = position(c)?;
                    values[p].clone().map(|v| (c.clone(), v))
                })
                .collect();
            out.push((key, cells));
        }
        Ok(out)
    }
}

/// A JSON sidecar value as ivadomed's table shows it (Python's `str()` of the parsed value); `None` for null.
fn render_json_cell(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(python_repr(other)),
    }
}

/// Python's `repr()` of a value parsed by Python's `json` module.
fn python_repr(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (None, Some(u), _) => u.to_string(),
            (None, None, Some(f)) => python_float(f),
            _ => n.to_string(),
        },
        Value::String(s) => python_str_repr(s),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(python_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", python_str_repr(k), python_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Python's `repr()` of a float: the shortest round-trip digits, in exponent form below 1e-4 or from 1e16.
pub fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits, e.g. "-2.5e-6"
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific
        .split_once('e')
        .expect("`{:e}` always has an exponent");
    let exponent: i32 = exponent.parse().expect("integer exponent");
    let sign = if x < 0.0 { "-" } else { "" };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let count = digits.len() as i32;
    if (-4..16).contains(&exponent) {
        let body = if exponent >= 0 {
            let integer_digits = exponent + 1;
            if count <= integer_digits {
                format!(
                    "{digits}{}.0",
                    "0".repeat((integer_digits - count) as usize)
                )
            } else {
                let (integer, fraction) = digits.split_at(integer_digits as usize);
                format!("{integer}.{fraction}")
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exponent - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let mantissa = if rest.is_empty() {
            first.to_owned()
        } else {
            format!("{first}.{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exponent_sign}{:02}", exponent.abs())
    }
}

/// Python's `repr()` of a string: single quotes unless the text has a single quote and no double quote.
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Appends one CSV line, quoting as Python's csv module does by default (fields with a comma, a quote or a
/// line break).
fn push_csv_line<'a>(out: &mut String, fields: impl Iterator<Item = &'a str>) {
    let mut first = true;
    for field in fields {
        if !first {
            out.push(',');
        }
        first = false;
        if field.contains([',', '"', '\n', '\r']) {
            out.push('"');
            out.push_str(&field.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(field);
        }
    }
    out.push('\n');
}

/// The absolute form of `path` (as pybids lists files), without resolving links.
fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

fn normalize_suffix(suffix: &str) -> String {
    if suffix.is_empty() || suffix.starts_with('_') {
        suffix.to_string()
    } else {
        format!("_{suffix}")
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// "sub-01_T1w.nii.gz" -> ("sub-01_T1w", ".nii.gz"); None when not an image name.
fn split_extension(name: &str) -> Option<(&str, &'static str)> {
    IMAGE_EXTENSIONS.iter().find_map(|ext| {
        name.strip_suffix(ext)
            .filter(|stem| !stem.is_empty())
            .map(|stem| (stem, *ext))
    })
}

/// "sub-01_ses-02_T1w" -> ([("sub", "01"), ("ses", "02")], "T1w"); None when a part before the suffix is not
/// `key-value` or the suffix is missing.
fn parse_stem(stem: &str) -> Option<(Vec<(String, String)>, String)> {
    let parts: Vec<&str> = stem.split('_').collect();
    let (suffix, pairs) = parts.split_last()?;
    if suffix.is_empty() || suffix.contains('-') {
        return None;
    }
    let pairs = pairs
        .iter()
        .map(|part| {
            part.split_once('-')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((pairs, suffix.to_string()))
}

/// Parses an image name and checks its `sub-`/`ses-` entities against its folders; warns and returns None on a
/// mismatch or a name that is not `sub-<label>[_<key>-<value>]..._<suffix>`.
fn check_entities(
    stem: &str,
    subject: &str,
    session: Option<&str>,
    image: &Path,
) -> Option<(Vec<(String, String)>, String)> {
    let Some((pairs, suffix)) = parse_stem(stem).filter(|(pairs, _)| !pairs.is_empty()) else {
        tracing::warn!(file = %image.display(), "skipping image: its name is not sub-<label>[_<key>-<value>]..._<suffix>");
        return None;
    };
    let file_subject = format!("{}-{}", pairs[0].0, pairs[0].1);
    if pairs[0].0 != "sub" || file_subject != subject {
        tracing::warn!(
            file = %image.display(),
            "skipping image: its subject entity {file_subject:?} disagrees with its folder {subject}"
        );
        return None;
    }
    let file_session = pairs
        .iter()
        .find(|(k, _)| k == "ses")
        .map(|(_, v)| format!("ses-{v}"));
    if file_session.as_deref() != session {
        tracing::warn!(
            file = %image.display(),
            "skipping image: its session entity {file_session:?} disagrees with its folder {session:?}"
        );
        return None;
    }
    Some((pairs, suffix))
}

/// Sorted names of the non-hidden subdirectories of `dir` starting with `prefix`.
fn list_dirs(dir: &Path, prefix: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && entry.path().is_dir() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Sorted non-hidden image files (by extension) of `dir`.
fn list_image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !name.starts_with('.') && split_extension(&name).is_some() && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Every non-hidden file under `dir`, recursively.
fn walk_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            walk_files(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Warns about label files whose `sub-`/`ses-` entities do not match the folder they sit in (such files are
/// never matched to any image), and about labels of the wanted suffixes whose image does not exist.
fn check_label_tree(
    root: &Path,
    labels_root: &Path,
    suffixes: &[&str],
    extensions: &[&str],
) -> Result<()> {
    for subject in list_dirs(labels_root, "sub-")? {
        let subject_dir = labels_root.join(&subject);
        let mut units = vec![(None, PathBuf::from(&subject))];
        for session in list_dirs(&subject_dir, "ses-")? {
            let relative = PathBuf::from(&subject).join(&session);
            units.push((Some(session), relative));
        }
        for (session, relative) in units {
            for datatype in DATATYPES {
                let dir = labels_root.join(&relative).join(datatype);
                if !dir.is_dir() {
                    continue;
                }
                for label in list_image_files(&dir)? {
                    let name = file_name(&label);
                    let Some((stem, extension)) = split_extension(&name) else {
                        continue;
                    };
                    let parts: Vec<&str> = stem.split('_').collect();
                    let file_session = parts
                        .iter()
                        .skip(1)
                        .find(|p| p.starts_with("ses-"))
                        .copied();
                    if parts[0] != subject || file_session != session.as_deref() {
                        tracing::warn!(
                            file = %label.display(),
                            "misplaced label file: its name says {} but it is in folder {}; it is not matched to any image",
                            [Some(parts[0]), file_session].into_iter().flatten().collect::<Vec<_>>().join("/"),
                            [Some(subject.as_str()), session.as_deref()].into_iter().flatten().collect::<Vec<_>>().join("/"),
                        );
                        continue;
                    }
                    if !extensions.contains(&extension) {
                        continue;
                    }
                    let Some(image_stem) = suffixes.iter().find_map(|s| stem.strip_suffix(s))
                    else {
                        continue;
                    };
                    let image_dir = root.join(&relative).join(datatype);
                    let has_image = IMAGE_EXTENSIONS
                        .iter()
                        .any(|ext| image_dir.join(format!("{image_stem}{ext}")).is_file());
                    if !has_image {
                        tracing::warn!(
                            file = %label.display(),
                            "label without an image: no {}/{image_stem}.* exists; the label is not used",
                            image_dir.display()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_contrast_is_an_error_naming_it_and_the_contrasts_there() {
        let root = PathBuf::from(FUNC);
        let options = BidsOptions {
            contrasts: vec!["T2w".to_owned(), "T9w".to_owned()],
            ..BidsOptions::default()
        };
        let error = BidsIndex::build(&[root], &options).unwrap_err().to_string();
        assert!(error.contains("unknown contrast `T9w`"), "{error}");
        assert!(error.contains("T1w, T2star, T2w"), "{error}");
    }

    const FUNC: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/data_functional_testing"
    );
    const TESTING: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/data-testing"
    );

    fn query<'a>(contrasts: Option<&'a [String]>) -> BidsQuery<'a> {
        BidsQuery {
            target_suffix: "_seg-manual",
            contrasts,
        }
    }

    #[test]
    fn functional_testing_index() {
        let index = BidsIndex::scan(Path::new(FUNC), &query(None)).unwrap();
        assert_eq!(index.entries.len(), 9);
        assert_eq!(
            index.subjects(),
            vec!["sub-unf01", "sub-unf02", "sub-unf03"]
        );
        assert_eq!(index.contrasts(), vec!["T1w", "T2star", "T2w"]);
        assert_eq!(index.with_labels().len(), 8);
        for e in &index.entries {
            assert_eq!(e.session, None);
            let stem = format!("{}_{}", e.subject, e.contrast);
            assert_eq!(
                e.image,
                Path::new(FUNC)
                    .join(&e.subject)
                    .join("anat")
                    .join(format!("{stem}.nii.gz"))
            );
            assert_eq!(
                e.sidecar.as_deref(),
                Some(
                    Path::new(FUNC)
                        .join(&e.subject)
                        .join("anat")
                        .join(format!("{stem}.json"))
                        .as_path()
                )
            );
            if e.subject == "sub-unf02" && e.contrast == "T1w" {
                // upstream quirk: derivatives/labels/sub-unf02/anat/sub-unf01_T1w_seg-manual.nii.gz is not its label
                assert_eq!(e.label, None);
            } else {
                let expected = Path::new(FUNC)
                    .join("derivatives/labels")
                    .join(&e.subject)
                    .join("anat")
                    .join(format!("{stem}_seg-manual.nii.gz"));
                assert_eq!(e.label.as_deref(), Some(expected.as_path()), "{e:?}");
            }
        }
        // deterministic, sorted
        let again = BidsIndex::scan(Path::new(FUNC), &query(None)).unwrap();
        assert_eq!(again, index);
        let mut sorted = index.entries.clone();
        sorted.sort_by(|a, b| a.image.cmp(&b.image));
        assert_eq!(sorted, index.entries);
    }

    #[test]
    fn contrast_filter() {
        let wanted = vec!["T2w".to_string(), "T1w".to_string()];
        let index = BidsIndex::scan(Path::new(FUNC), &query(Some(&wanted))).unwrap();
        assert_eq!(index.entries.len(), 6);
        assert_eq!(index.contrasts(), vec!["T1w", "T2w"]);
        assert_eq!(index.with_labels().len(), 5);
        let none: Vec<String> = vec!["FLAIR".into()];
        let error = BidsIndex::scan(Path::new(FUNC), &query(Some(&none)))
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown contrast `FLAIR`"), "{error}");
        // other target suffixes, and the suffix without its leading underscore
        let lesion = BidsIndex::scan(
            Path::new(FUNC),
            &BidsQuery {
                target_suffix: "lesion-manual",
                contrasts: None,
            },
        )
        .unwrap();
        assert_eq!(lesion.with_labels().len(), 9);
        let no_target = BidsIndex::scan(
            Path::new(FUNC),
            &BidsQuery {
                target_suffix: "",
                contrasts: None,
            },
        )
        .unwrap();
        assert!(no_target.with_labels().is_empty());
    }

    /// df_ref.csv is ivadomed's expected BIDS table for data-testing (first column: filename). Its image rows
    /// with a `<stem>_seg-manual.nii.gz` row must be exactly the images our index labels, for the contrasts
    /// of those image rows (T1w and T2w: the table was made with those contrasts only, so sub-unf01_T2star,
    /// which also has a seg-manual label on disk, is not in it).
    #[test]
    fn matches_ivadomed_df_ref() {
        let csv = fs::read_to_string(Path::new(TESTING).join("df_ref.csv")).unwrap();
        let mut lines = csv.lines();
        assert!(lines.next().unwrap().starts_with("filename,"));
        let filenames: Vec<&str> = lines
            .filter_map(|l| l.split(',').next())
            .filter(|f| !f.is_empty())
            .collect();
        let images: Vec<&str> = filenames
            .iter()
            .copied()
            .filter(|f| f.ends_with(".nii.gz") && !f.contains("-manual"))
            .collect();
        let mut expected: Vec<String> = images
            .iter()
            .filter(|img| {
                let label = format!("{}_seg-manual.nii.gz", split_extension(img).unwrap().0);
                filenames.contains(&label.as_str())
            })
            .map(|s| s.to_string())
            .collect();
        expected.sort();
        assert_eq!(
            expected,
            vec!["sub-unf01_T1w.nii.gz", "sub-unf01_T2w.nii.gz"]
        );
        let mut contrasts: Vec<String> = images
            .iter()
            .map(|img| {
                split_extension(img)
                    .unwrap()
                    .0
                    .rsplit('_')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        contrasts.sort();
        contrasts.dedup();

        let index = BidsIndex::scan(Path::new(TESTING), &query(Some(&contrasts))).unwrap();
        let mut found: Vec<String> = index
            .with_labels()
            .iter()
            .map(|e| file_name(&e.image))
            .collect();
        found.sort();
        assert_eq!(found, expected);
        // all three subjects have T1w/T2w images; only sub-unf01 has seg-manual labels
        assert_eq!(
            index.subjects(),
            vec!["sub-unf01", "sub-unf02", "sub-unf03"]
        );
        assert_eq!(index.entries.len(), 6);
    }

    /// A `Write` into a shared buffer, to capture tracing output.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn warns_about_the_misplaced_label() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        let index = tracing::subscriber::with_default(subscriber, || {
            BidsIndex::scan(Path::new(FUNC), &query(None)).unwrap()
        });
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let misplaced = Path::new(FUNC)
            .join("derivatives/labels/sub-unf02/anat/sub-unf01_T1w_seg-manual.nii.gz");
        assert!(
            log.contains("misplaced label") && log.contains(&misplaced.display().to_string()),
            "{log}"
        );
        assert_eq!(log.matches("WARN").count(), 1, "{log}");
        assert!(index
            .entries
            .iter()
            .all(|e| e.label.as_deref() != Some(misplaced.as_path())));
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("ivado-bids-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sessions_mismatches_and_errors() {
        let root = temp_dir("layout");
        let touch = |rel: &str| {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            // sidecars must be valid JSON; image contents are never read
            let content: &[u8] = if rel.ends_with(".json") { b"{}" } else { b"x" };
            fs::write(p, content).unwrap();
        };
        touch("sub-a/ses-01/anat/sub-a_ses-01_T1w.nii.gz");
        touch("sub-a/ses-01/anat/sub-a_ses-01_T1w.json");
        touch("sub-a/ses-02/anat/sub-a_ses-02_acq-hi_T2w.nii");
        touch("sub-a/ses-02/anat/sub-b_ses-02_T2w.nii.gz"); // wrong subject entity: skipped
        touch("sub-a/ses-02/anat/sub-a_ses-01_T1w.nii.gz"); // wrong session entity: skipped
        touch("sub-a/ses-02/anat/.sub-a_ses-02_T1w.nii.gz"); // hidden: skipped
        touch("sub-b/anat/sub-b_T1w.nii.gz");
        touch("sub-b/anat/notes.txt");
        touch(".sub-hidden/anat/sub-hidden_T1w.nii.gz");
        touch("derivatives/labels/sub-a/ses-01/anat/sub-a_ses-01_T1w_seg-manual.nii.gz");
        touch("derivatives/labels/sub-a/ses-02/anat/sub-a_ses-02_acq-hi_T2w_seg-manual.nii");
        touch("derivatives/labels/sub-b/anat/sub-a_ses-01_T1w_seg-manual.nii.gz"); // misplaced
        touch("derivatives/sub-c/anat/sub-c_T1w.nii.gz");

        let index = BidsIndex::scan(&root, &query(None)).unwrap();
        let names: Vec<String> = index.entries.iter().map(|e| file_name(&e.image)).collect();
        assert_eq!(
            names,
            vec![
                "sub-a_ses-01_T1w.nii.gz",
                "sub-a_ses-02_acq-hi_T2w.nii",
                "sub-b_T1w.nii.gz"
            ]
        );
        let e = &index.entries;
        assert_eq!(e[0].session.as_deref(), Some("ses-01"));
        assert_eq!(e[0].contrast, "T1w");
        assert!(e[0].label.is_some() && e[0].sidecar.is_some());
        assert_eq!(e[1].contrast, "T2w");
        assert_eq!(
            e[1].label.as_deref(),
            Some(
                root.join(
                    "derivatives/labels/sub-a/ses-02/anat/sub-a_ses-02_acq-hi_T2w_seg-manual.nii"
                )
                .as_path()
            )
        );
        assert_eq!(e[1].sidecar, None);
        assert_eq!(e[2].session, None);
        assert_eq!(e[2].label, None);
        assert_eq!(index.subjects(), vec!["sub-a", "sub-b"]);

        // errors name the path
        let missing = root.join("nope");
        let msg = format!("{:#}", BidsIndex::scan(&missing, &query(None)).unwrap_err());
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        let file = root.join("sub-b/anat/notes.txt");
        let msg = format!("{:#}", BidsIndex::scan(&file, &query(None)).unwrap_err());
        assert!(
            msg.contains(&file.display().to_string()) && msg.contains("not a directory"),
            "{msg}"
        );
        let empty = root.join("empty");
        fs::create_dir_all(empty.join("anat")).unwrap();
        let msg = format!("{:#}", BidsIndex::scan(&empty, &query(None)).unwrap_err());
        assert!(
            msg.contains(&empty.display().to_string()) && msg.contains("no subject"),
            "{msg}"
        );
        let _ = fs::remove_dir_all(&root);
    }

    fn capture_warnings<T>(run: impl FnOnce() -> T) -> (T, String) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        let value = tracing::subscriber::with_default(subscriber, run);
        let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        (value, log)
    }

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    /// Expected strings are what CPython 3 prints for `repr(float)`.
    #[test]
    fn floats_render_as_python_repr() {
        let cases = [
            (9.3e-05, "9.3e-05"),
            (2.5e-06, "2.5e-06"),
            (0.00372, "0.00372"),
            (0.0001, "0.0001"),
            (1e-05, "1e-05"),
            (266.247, "266.247"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (1.5e300, "1.5e+300"),
            (-0.00523601, "-0.00523601"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-0.0, "-0.0"),
        ];
        for (value, expected) in cases {
            assert_eq!(python_float(value), expected, "{value:e}");
        }
        let value: serde_json::Value = serde_json::from_str(
            r#"["ORIGINAL", 0, 4.897e-12, -1, true, null, "it's", {"a": 1.5}]"#,
        )
        .unwrap();
        assert_eq!(
            python_repr(&value),
            r#"['ORIGINAL', 0, 4.897e-12, -1, True, None, "it's", {'a': 1.5}]"#
        );
        assert_eq!(
            render_json_cell(&serde_json::json!("12:33:7.032500")).as_deref(),
            Some("12:33:7.032500")
        );
        assert_eq!(render_json_cell(&serde_json::Value::Null), None);
    }

    #[test]
    fn filenames_parse_into_entities() {
        assert_eq!(
            split_extension("sub-rat3_ses-02_sample-data11_run-1_SEM.png"),
            Some(("sub-rat3_ses-02_sample-data11_run-1_SEM", ".png"))
        );
        assert_eq!(
            split_extension("a_SEM.ome.tif"),
            Some(("a_SEM", ".ome.tif"))
        );
        assert_eq!(split_extension("a_T1w.json"), None);
        let (pairs, suffix) =
            parse_stem("sub-rat3_ses-02_sample-data11_run-01_acq-hi_SEM").unwrap();
        assert_eq!(suffix, "SEM");
        assert_eq!(
            pairs,
            [
                ("sub", "rat3"),
                ("ses", "02"),
                ("sample", "data11"),
                ("run", "01"),
                ("acq", "hi")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(parse_stem("T1w"), Some((vec![], "T1w".to_owned())));
        assert_eq!(parse_stem("dataset_description"), None);
        assert_eq!(parse_stem("sub-01_seg-manual"), None);
    }

    /// A tree exercising inheritance and every TSV merge; expected values are read off the files written here.
    #[test]
    fn sidecar_inheritance_and_tsv_merges() {
        let root = temp_dir("merge");
        write(&root, "dataset_description.json", r#"{"Name": "x"}"#);
        write(
            &root,
            "T1w.json",
            r#"{"Manufacturer": "Root", "EchoTime": 0.01, "Flags": [true, null, "it's"]}"#,
        );
        write(
            &root,
            "participants.tsv",
            "participant_id\tsex\tage\nsub-a\tF\tn/a\nsub-b\tM\t30\n\n",
        );
        write(
            &root,
            "sub-a/sub-a_T1w.json",
            r#"{"Manufacturer": "SubjectLevel"}"#,
        );
        write(
            &root,
            "sub-a/sub-a_sessions.tsv",
            "session_id\tweight\tacq_time\nses-01\t70\t2000-01-01\n",
        );
        write(
            &root,
            "sub-a/ses-01/anat/sub-a_ses-01_run-1_T1w.nii.gz",
            "x",
        );
        write(
            &root,
            "sub-a/ses-01/anat/sub-a_ses-01_run-2_T1w.nii.gz",
            "x",
        );
        write(
            &root,
            "sub-a/ses-01/anat/sub-a_ses-01_T1w.json",
            r#"{"EchoTime": 0.02}"#,
        );
        write(
            &root,
            "sub-a/ses-01/anat/sub-a_ses-01_run-2_T1w.json",
            r#"{"EchoTime": 0.03}"#,
        );
        write(
            &root,
            "sub-a/ses-01/sub-a_ses-01_scans.tsv",
            "filename\tacq_time\nanat/sub-a_ses-01_run-2_T1w.nii.gz\t2000-01-01T10:00:00\n",
        );
        write(&root, "sub-b/anat/sub-b_T1w.nii.gz", "x");
        write(&root, "sub-b/anat/sub-b_T2w.nii.gz", "x");
        let out = root.join("out");
        let options = BidsOptions {
            target_suffixes: vec![],
            write_index: Some(out.clone()),
            ..BidsOptions::default()
        };
        let index = BidsIndex::build(std::slice::from_ref(&root), &options).unwrap();
        let names: Vec<String> = index.entries.iter().map(BidsEntry::filename).collect();
        assert_eq!(
            names,
            [
                "sub-a_ses-01_run-1_T1w.nii.gz",
                "sub-a_ses-01_run-2_T1w.nii.gz",
                "sub-b_T1w.nii.gz",
                "sub-b_T2w.nii.gz"
            ]
        );
        let meta = |i: usize| -> Vec<(&str, &str)> {
            index.entries[i]
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        };
        assert_eq!(
            meta(0),
            [
                ("EchoTime", "0.02"),
                ("Flags", r#"[True, None, "it's"]"#),
                ("Manufacturer", "SubjectLevel"),
                ("acq_time_x", "2000-01-01"),
                ("participant_id", "sub-a"),
                ("sex", "F"),
                ("weight", "70"),
            ]
        );
        assert_eq!(
            meta(1),
            [
                ("EchoTime", "0.03"),
                ("Flags", r#"[True, None, "it's"]"#),
                ("Manufacturer", "SubjectLevel"),
                ("acq_time", "2000-01-01T10:00:00"),
                ("acq_time_x", "2000-01-01"),
                ("participant_id", "sub-a"),
                ("sex", "F"),
                ("weight", "70"),
            ]
        );
        assert_eq!(
            meta(2),
            [
                ("EchoTime", "0.01"),
                ("Flags", r#"[True, None, "it's"]"#),
                ("Manufacturer", "Root"),
                ("age", "30"),
                ("participant_id", "sub-b"),
                ("sex", "M"),
            ]
        );
        assert_eq!(
            meta(3),
            [("age", "30"), ("participant_id", "sub-b"), ("sex", "M")]
        );
        let e = &index.entries[1];
        assert_eq!(e.run.as_deref(), Some("run-2"));
        assert_eq!(e.session.as_deref(), Some("ses-01"));
        assert_eq!(e.entities["run"], "2");
        assert_eq!(e.entities["session"], "01");
        assert_eq!(e.entities["subject"], "a");
        assert_eq!(e.datatype, "anat");
        assert_eq!(e.extension, ".nii.gz");
        assert!(e.sidecar.is_some() && index.entries[0].sidecar.is_none());

        // pybids sorts entities and sidecar keys together; then participants (sorted), sessions (sorted, its
        // acq_time renamed when scans.tsv brings another), scans (file order)
        assert_eq!(
            index.columns,
            [
                "EchoTime",
                "Flags",
                "Manufacturer",
                "datatype",
                "extension",
                "run",
                "session",
                "subject",
                "suffix",
                "participant_id",
                "age",
                "sex",
                "acq_time_x",
                "weight",
                "acq_time"
            ]
        );
        let csv = fs::read_to_string(out.join(INDEX_FILE_NAME)).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "path,filename,EchoTime,Flags,Manufacturer,datatype,extension,run,session,subject,suffix,participant_id,age,sex,acq_time_x,weight,acq_time");
        let run2 = root.join("sub-a/ses-01/anat/sub-a_ses-01_run-2_T1w.nii.gz");
        assert_eq!(
            lines[2],
            format!(
                "{},sub-a_ses-01_run-2_T1w.nii.gz,0.03,\"[True, None, \"\"it's\"\"]\",SubjectLevel,anat,.nii.gz,2,01,a,T1w,sub-a,,F,2000-01-01,70,2000-01-01T10:00:00",
                run2.display()
            )
        );
        assert_eq!(lines.len(), 5);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn malformed_sidecars_and_tables_name_the_file_and_line() {
        let root = temp_dir("malformed");
        write(&root, "sub-a/anat/sub-a_T1w.nii.gz", "x");
        let sidecar = root.join("sub-a/anat/sub-a_T1w.json");
        write(
            &root,
            "sub-a/anat/sub-a_T1w.json",
            "{\n  \"EchoTime\": 0.1,\n  oops\n}\n",
        );
        let options = BidsOptions {
            target_suffixes: vec![],
            ..BidsOptions::default()
        };
        let msg = format!(
            "{:#}",
            BidsIndex::build(std::slice::from_ref(&root), &options).unwrap_err()
        );
        assert!(
            msg.contains(&sidecar.display().to_string()) && msg.contains("line 3 column 3"),
            "{msg}"
        );
        write(&root, "sub-a/anat/sub-a_T1w.json", "[1, 2]");
        let msg = format!(
            "{:#}",
            BidsIndex::build(std::slice::from_ref(&root), &options).unwrap_err()
        );
        assert!(msg.contains("not an object"), "{msg}");
        write(&root, "sub-a/anat/sub-a_T1w.json", "{}");

        let participants = root.join("participants.tsv");
        write(
            &root,
            "participants.tsv",
            "participant_id\tsex\nsub-a\tF\nsub-b\tM\textra\n",
        );
        let msg = format!(
            "{:#}",
            BidsIndex::build(std::slice::from_ref(&root), &options).unwrap_err()
        );
        assert!(
            msg.contains(&participants.display().to_string()) && msg.contains("line 3"),
            "{msg}"
        );
        write(&root, "participants.tsv", "subject\tsex\nsub-a\tF\n");
        let msg = format!(
            "{:#}",
            BidsIndex::build(std::slice::from_ref(&root), &options).unwrap_err()
        );
        assert!(msg.contains("no `participant_id` column"), "{msg}");
        let _ = fs::remove_dir_all(&root);
    }

    /// sub-a has every label, sub-b only the lesion, sub-c none; sub-d's label has no image.
    fn label_tree(tag: &str) -> PathBuf {
        let root = temp_dir(tag);
        for s in ["a", "b", "c"] {
            write(&root, &format!("sub-{s}/anat/sub-{s}_T1w.nii.gz"), "x");
        }
        let labels = "derivatives/labels";
        for suffix in ["seg-manual", "lesion-manual", "roi"] {
            write(
                &root,
                &format!("{labels}/sub-a/anat/sub-a_T1w_{suffix}.nii.gz"),
                "x",
            );
        }
        write(
            &root,
            &format!("{labels}/sub-b/anat/sub-b_T1w_lesion-manual.nii"),
            "x",
        );
        write(
            &root,
            &format!("{labels}/sub-b/anat/sub-b_T1w_roi.nii.gz"),
            "x",
        );
        write(
            &root,
            &format!("{labels}/sub-d/anat/sub-d_T1w_seg-manual.nii.gz"),
            "x",
        );
        root
    }

    #[test]
    fn several_targets_roi_and_missing_label_policy() {
        let root = label_tree("labels");
        let options = BidsOptions {
            target_suffixes: vec!["_seg-manual".into(), "lesion-manual".into()],
            roi_suffix: Some("_roi".into()),
            ..BidsOptions::default()
        };
        let (index, log) =
            capture_warnings(|| BidsIndex::build(std::slice::from_ref(&root), &options).unwrap());
        let labels = root.join("derivatives/labels");
        let a = &index.entries[0];
        assert_eq!(a.subject, "sub-a");
        assert_eq!(
            a.targets,
            vec![
                Some(labels.join("sub-a/anat/sub-a_T1w_seg-manual.nii.gz")),
                Some(labels.join("sub-a/anat/sub-a_T1w_lesion-manual.nii.gz")),
            ]
        );
        assert_eq!(a.label, a.targets[0]);
        assert_eq!(a.roi, Some(labels.join("sub-a/anat/sub-a_T1w_roi.nii.gz")));
        // sub-b lacks its first target but has the second and the ROI: kept (as ivadomed), with a warning
        let b = &index.entries[1];
        assert_eq!(b.subject, "sub-b");
        assert_eq!(
            b.targets,
            vec![
                None,
                Some(labels.join("sub-b/anat/sub-b_T1w_lesion-manual.nii"))
            ]
        );
        assert_eq!(b.label, None);
        assert_eq!(index.entries.len(), 2, "sub-c has no label: skipped");
        let c_image = root.join("sub-c/anat/sub-c_T1w.nii.gz");
        let d_label = labels.join("sub-d/anat/sub-d_T1w_seg-manual.nii.gz");
        assert!(
            log.contains("skipping image") && log.contains(&c_image.display().to_string()),
            "{log}"
        );
        assert!(
            log.contains("image has no _seg-manual label")
                && log.contains(
                    &root
                        .join("sub-b/anat/sub-b_T1w.nii.gz")
                        .display()
                        .to_string()
                ),
            "{log}"
        );
        assert!(
            log.contains("label without an image") && log.contains(&d_label.display().to_string()),
            "{log}"
        );
        assert_eq!(log.matches("WARN").count(), 3, "{log}");

        // without the ROI's image for sub-a, sub-a is skipped (the ROI is required)
        fs::remove_file(labels.join("sub-a/anat/sub-a_T1w_roi.nii.gz")).unwrap();
        let index = BidsIndex::build(std::slice::from_ref(&root), &options).unwrap();
        assert_eq!(index.subjects(), ["sub-b"]);

        let strict = BidsOptions {
            missing_label: MissingLabel::Error,
            ..options.clone()
        };
        let msg = format!(
            "{:#}",
            BidsIndex::build(std::slice::from_ref(&root), &strict).unwrap_err()
        );
        assert!(
            msg.contains(
                &root
                    .join("sub-a/anat/sub-a_T1w.nii.gz")
                    .display()
                    .to_string()
            ) && msg.contains("ROI"),
            "{msg}"
        );
        let keep = BidsOptions {
            missing_label: MissingLabel::Keep,
            ..options
        };
        assert_eq!(
            BidsIndex::build(std::slice::from_ref(&root), &keep)
                .unwrap()
                .entries
                .len(),
            3
        );
        let _ = fs::remove_dir_all(&root);
    }

    /// Six subjects, three in group A; four T1w and four T2w images among them.
    fn selection_tree(tag: &str) -> PathBuf {
        let root = temp_dir(tag);
        let mut participants = String::from("participant_id\tgroup\n");
        for (i, group) in ["A", "B", "A", "B", "A", "B"].iter().enumerate() {
            participants.push_str(&format!("sub-{i}\t{group}\n"));
            write(&root, &format!("sub-{i}/anat/sub-{i}_T1w.nii.gz"), "x");
            if i < 4 {
                write(&root, &format!("sub-{i}/anat/sub-{i}_T2w.nii.gz"), "x");
            }
        }
        write(&root, "participants.tsv", &participants);
        root
    }

    #[test]
    fn subject_selection_is_seeded() {
        let root = selection_tree("select");
        let select = |n: usize, seed: u64| {
            let options = BidsOptions {
                target_suffixes: vec![],
                subject_selection: vec![SubjectSelection {
                    n,
                    metadata: "group".into(),
                    value: "A".into(),
                }],
                seed,
                ..BidsOptions::default()
            };
            BidsIndex::build(std::slice::from_ref(&root), &options)
                .unwrap()
                .subjects()
        };
        let group_a = ["sub-0", "sub-2", "sub-4"];
        let mut seen = BTreeSet::new();
        for seed in 0..8 {
            let chosen = select(2, seed);
            assert_eq!(chosen.len(), 2);
            assert!(
                chosen.iter().all(|s| group_a.contains(&s.as_str())),
                "{chosen:?}"
            );
            assert_eq!(select(2, seed), chosen, "same seed, same subjects");
            seen.insert(chosen);
        }
        assert!(seen.len() > 1, "the seed changes the draw: {seen:?}");
        // at most n: asking for more keeps every matching subject
        assert_eq!(select(10, 0), group_a);
        let options = BidsOptions {
            target_suffixes: vec![],
            subject_selection: vec![SubjectSelection {
                n: 1,
                metadata: "nope".into(),
                value: "A".into(),
            }],
            ..BidsOptions::default()
        };
        let msg = format!(
            "{:#}",
            BidsIndex::build(std::slice::from_ref(&root), &options).unwrap_err()
        );
        assert!(msg.contains("`nope`"), "{msg}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_subject_selection_matching_no_subject_is_an_error_saying_why() {
        let root = selection_tree("select-none");
        // selection_tree puts subjects in groups A and B only: group C matches none of them.
        let options = BidsOptions {
            target_suffixes: vec![],
            subject_selection: vec![SubjectSelection {
                n: 2,
                metadata: "group".into(),
                value: "C".into(),
            }],
            ..BidsOptions::default()
        };
        let msg = format!(
            "{:#}",
            BidsIndex::build(std::slice::from_ref(&root), &options).unwrap_err()
        );
        assert!(
            msg.contains("subject_selection kept no subject, so no image is left")
                && msg.contains("group == \"C\": 0 subject(s) of the 2 asked for"),
            "{msg}"
        );
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn balance_keeps_a_seeded_fraction_per_contrast() {
        let root = selection_tree("balance");
        let balanced = |fraction: f64, seed: u64| {
            let options = BidsOptions {
                target_suffixes: vec![],
                contrasts: vec!["T2w".into()],
                balance: BTreeMap::from([("T2w".to_owned(), fraction)]),
                seed,
                ..BidsOptions::default()
            };
            BidsIndex::build(std::slice::from_ref(&root), &options)
                .unwrap()
                .entries
                .iter()
                .map(|e| e.subject.clone())
                .collect::<Vec<_>>()
        };
        // ivadomed keeps the k-th of 4 images while k / 4 <= fraction: 2 for 0.5, 1 for 0.3, 4 for 1.0
        assert_eq!(balanced(0.5, 3).len(), 2);
        assert_eq!(balanced(0.3, 3).len(), 1);
        assert_eq!(balanced(1.0, 3).len(), 4);
        assert_eq!(balanced(0.0, 3).len(), 0);
        let mut seen = BTreeSet::new();
        for seed in 0..8 {
            let kept = balanced(0.5, seed);
            assert_eq!(balanced(0.5, seed), kept);
            seen.insert(kept);
        }
        assert!(seen.len() > 1, "{seen:?}");
        // contrasts without a balance entry are untouched
        let options = BidsOptions {
            target_suffixes: vec![],
            balance: BTreeMap::from([("T2w".to_owned(), 0.5)]),
            ..BidsOptions::default()
        };
        let index = BidsIndex::build(std::slice::from_ref(&root), &options).unwrap();
        assert_eq!(index.with_contrasts(&["T1w".into()]).len(), 6);
        assert_eq!(index.with_contrasts(&["T2w".into()]).len(), 2);
        assert_eq!(index.by_subject_session().len(), 6);
        let bad = BidsOptions {
            balance: BTreeMap::from([("T2w".to_owned(), 1.5)]),
            ..options
        };
        assert!(BidsIndex::build(std::slice::from_ref(&root), &bad).is_err());
        let _ = fs::remove_dir_all(&root);
    }
}
