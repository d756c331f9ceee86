//! One multi-channel sample per subject from several contrast entries (ivadomed's `multichannel: true`):
//! contrasts stacked as input channels in `contrast_params.training_validation` order, K target suffixes as
//! K target channels, the ROI mask, and FiLM metadata (`metadata: "mri_params"`).
//!
//! Policies, with ivadomed's behaviour and where ours differs:
//! - a missing contrast: ivadomed drops the subject. [`MissingContrast::Skip`] does that (with a warning),
//!   [`MissingContrast::Error`] refuses the dataset, and [`MissingContrast::ZeroChannel`] (HeMIS-style
//!   training) keeps the subject with a zero channel and flags it in `missing_modalities`.
//! - a missing target among K: zeros for that class and a warning, as ivadomed; no target at all: the
//!   subject is skipped, as ivadomed skips it.
//! - a required ROI that is missing: the subject is skipped, as ivadomed skips it.
//! - targets are binarised at 0.5 unless `soft_gt`, which keeps them as they are.
//! - subjects are grouped by (subject, session); ivadomed groups by the file name's first entity only,
//!   which merges sessions.
//!
//! FiLM metadata follows ivadomed's `film.py` for what is read (FlipAngle, RepetitionTime, EchoTime and
//! Manufacturer, a comma-separated multi-echo value averaged, a subject lacking one of them skipped) and for
//! the manufacturer (ivadomed's categories Siemens 0, Philips 1, GE 2, anything else -1, one-hot over the
//! categories seen in training, unseen ones encoded as all zeros). The three numeric parameters are
//! standardised with the training set's mean and (population) standard deviation, where ivadomed bins them
//! into kernel-density clusters before one-hot encoding them. The fitted [`FilmEncoder`] serialises to JSON
//! so a model folder can carry it.
use crate::bids::BidsEntry;
use crate::pipeline::derive_seed;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{Kind, Tensor};

/// What to do when a subject lacks one of the contrasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingContrast {
    /// refuse: the dataset is incomplete
    Error,
    /// drop the subject with a warning (ivadomed)
    Skip,
    /// a zero channel, flagged in `missing_modalities` (HeMIS-style training)
    ZeroChannel,
}

/// How to assemble subjects.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelParams {
    /// Input contrasts in channel order (`contrast_params.training_validation`).
    pub contrasts: Vec<String>,
    /// Target suffixes (K classes), in the order of each entry's `targets`; empty: no target (inference).
    pub target_suffixes: Vec<String>,
    pub missing_contrast: MissingContrast,
    /// Keep targets soft instead of binarising them at 0.5.
    pub soft_gt: bool,
    /// Skip subjects without an ROI mask (ivadomed, when `roi_params.suffix` is set).
    pub require_roi: bool,
}

/// One subject's assembled tensors, on the loader's grid `[_, X, Y, Z]`.
#[derive(Debug)]
pub struct SubjectSample {
    pub subject: String,
    pub session: Option<String>,
    /// `[C, X, Y, Z]`, f32, channels in `ChannelParams::contrasts` order
    pub input: Tensor,
    /// `[C]`, f32: 1 where the contrast was missing and its channel is zeros
    pub missing_modalities: Tensor,
    /// `[K, X, Y, Z]`, f32, binary unless `soft_gt`
    pub target: Option<Tensor>,
    /// `[1, X, Y, Z]`, f32
    pub roi: Option<Tensor>,
    /// The entry of each channel (None where missing), for metadata.
    pub entries: Vec<Option<BidsEntry>>,
    /// What was filled in (missing classes or contrasts), also logged.
    pub warnings: Vec<String>,
}

/// A subject assembled, or skipped with the reason.
#[derive(Debug)]
pub enum Assembled {
    Sample(Box<SubjectSample>),
    Skipped { subject: String, reason: String },
}

/// Entries grouped by (subject, session), in the order the groups first appear.
pub fn group_by_subject(entries: &[BidsEntry]) -> Vec<Vec<&BidsEntry>> {
    let mut groups: Vec<Vec<&BidsEntry>> = Vec::new();
    for entry in entries {
        match groups
            .iter_mut()
            .find(|g| g[0].subject == entry.subject && g[0].session == entry.session)
        {
            Some(group) => group.push(entry),
            None => groups.push(vec![entry]),
        }
    }
    groups
}

fn display_name(entry: &BidsEntry) -> String {
    match &entry.session {
        Some(session) => format!("{}/{session}", entry.subject),
        None => entry.subject.clone(),
    }
}

/// Assembles one subject from its entries (one per contrast; other contrasts are ignored). `load` reads a
/// file into a canonical `[X, Y, Z]` tensor ([`load_canonical`] for NIfTI files).
pub fn assemble(
    params: &ChannelParams,
    subject_entries: &[&BidsEntry],
    load: &mut dyn FnMut(&Path) -> Result<Tensor>,
) -> Result<Assembled> {
    let Some(first) = subject_entries.first() else {
        bail!("no entries to assemble");
    };
    let name = display_name(first);
    ensure!(
        !params.contrasts.is_empty(),
        "no input contrasts are configured"
    );
    let skip = |reason: String| {
        tracing::warn!("skipping {name}: {reason}");
        Ok(Assembled::Skipped {
            subject: name.clone(),
            reason,
        })
    };
    let mut by_channel: Vec<Option<&BidsEntry>> = Vec::with_capacity(params.contrasts.len());
    for contrast in &params.contrasts {
        let matching: Vec<&&BidsEntry> = subject_entries
            .iter()
            .filter(|e| &e.contrast == contrast)
            .collect();
        ensure!(
            matching.len() <= 1,
            "{name} has {} {contrast} images ({}); one per contrast is expected",
            matching.len(),
            matching
                .iter()
                .map(|e| e.image.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        by_channel.push(matching.first().map(|e| **e));
    }
    let missing: Vec<&str> = params
        .contrasts
        .iter()
        .zip(&by_channel)
        .filter(|(_, e)| e.is_none())
        .map(|(c, _)| c.as_str())
        .collect();
    let mut warnings = Vec::new();
    if !missing.is_empty() {
        match params.missing_contrast {
            MissingContrast::Error => bail!("{name} has no {} image", missing.join(", ")),
            MissingContrast::Skip => return skip(format!("no {} image", missing.join(", "))),
            MissingContrast::ZeroChannel if missing.len() == params.contrasts.len() => {
                return skip("none of the contrasts is present".into())
            }
            MissingContrast::ZeroChannel => {
                let message = format!("{name}: no {} image, zero channel", missing.join(", "));
                tracing::warn!("{message}");
                warnings.push(message);
            }
        }
    }

    // Targets and ROI come from the first contrast (in channel order) that has them.
    let with_targets = by_channel
        .iter()
        .flatten()
        .find(|e| e.targets.iter().any(Option::is_some));
    let with_roi = by_channel.iter().flatten().find(|e| e.roi.is_some());
    if !params.target_suffixes.is_empty() {
        for entry in by_channel.iter().flatten() {
            ensure!(
                entry.targets.is_empty() || entry.targets.len() == params.target_suffixes.len(),
                "{} has {} target path(s) but {} target suffixes are configured",
                entry.image.display(),
                entry.targets.len(),
                params.target_suffixes.len()
            );
        }
        if with_targets.is_none() {
            return skip(format!(
                "no target ({}) for any of its images",
                params.target_suffixes.join(", ")
            ));
        }
    }
    if params.require_roi && with_roi.is_none() {
        return skip("no ROI mask".into());
    }

    let mut shape: Option<(Vec<i64>, String)> = None;
    let mut check_shape = |tensor: &Tensor, what: String| -> Result<()> {
        match &shape {
            None => shape = Some((tensor.size(), what)),
            Some((expected, reference)) => ensure!(
                &tensor.size() == expected,
                "{name}: {what} has shape {:?} but {reference} has {expected:?}; resample them to one grid",
                tensor.size()
            ),
        }
        Ok(())
    };
    let mut channels: Vec<Option<Tensor>> = Vec::with_capacity(by_channel.len());
    for entry in &by_channel {
        let tensor = match entry {
            Some(entry) => {
                let data = load(&entry.image)
                    .with_context(|| format!("reading {}", entry.image.display()))?
                    .f_to_kind(Kind::Float)?;
                ensure!(
                    data.dim() == 3,
                    "{}: expected a 3D volume, got shape {:?}",
                    entry.image.display(),
                    data.size()
                );
                check_shape(&data, format!("{} image", entry.contrast))?;
                Some(data)
            }
            None => None,
        };
        channels.push(tensor);
    }
    let Some(reference) = channels.iter().flatten().next() else {
        bail!("{name}: no image was loaded");
    };
    let grid = reference.size();
    let options = (Kind::Float, reference.device());
    let input_channels: Vec<Tensor> = channels
        .iter()
        .map(|c| match c {
            Some(t) => Ok(t.shallow_clone()),
            None => Ok(Tensor::f_zeros(grid.as_slice(), options)?),
        })
        .collect::<Result<_>>()?;
    let missing_flags: Vec<f32> = channels
        .iter()
        .map(|c| if c.is_none() { 1.0 } else { 0.0 })
        .collect();

    let target = match (params.target_suffixes.is_empty(), with_targets) {
        (false, Some(entry)) => {
            let mut classes = Vec::with_capacity(params.target_suffixes.len());
            for (suffix, path) in params.target_suffixes.iter().zip(&entry.targets) {
                let class = match path {
                    Some(path) => {
                        let data = load(path)
                            .with_context(|| format!("reading {}", path.display()))?
                            .f_to_kind(Kind::Float)?;
                        check_shape(&data, format!("target {suffix}"))?;
                        if params.soft_gt {
                            data
                        } else {
                            data.f_ge(0.5)?.f_to_kind(Kind::Float)?
                        }
                    }
                    None => {
                        let message = format!("{name}: no {suffix} target, zeros for that class");
                        tracing::warn!("{message}");
                        warnings.push(message);
                        Tensor::f_zeros(grid.as_slice(), options)?
                    }
                };
                classes.push(class);
            }
            Some(Tensor::f_stack(&classes, 0)?)
        }
        _ => None,
    };
    let roi = match with_roi.and_then(|e| e.roi.as_ref()) {
        Some(path) => {
            let data = load(path)
                .with_context(|| format!("reading {}", path.display()))?
                .f_to_kind(Kind::Float)?;
            check_shape(&data, "ROI".into())?;
            Some(data.f_unsqueeze(0)?)
        }
        None => None,
    };
    Ok(Assembled::Sample(Box::new(SubjectSample {
        subject: first.subject.clone(),
        session: first.session.clone(),
        input: Tensor::f_stack(&input_channels, 0)?,
        missing_modalities: Tensor::from_slice(&missing_flags),
        target,
        roi,
        entries: by_channel.iter().map(|e| e.cloned()).collect(),
        warnings,
    })))
}

/// A subject left out: (subject, reason).
pub type SkippedSubject = (String, String);

/// Every subject of `entries`: the samples, and the (subject, reason) of each one skipped.
pub fn assemble_all(
    params: &ChannelParams,
    entries: &[BidsEntry],
    load: &mut dyn FnMut(&Path) -> Result<Tensor>,
) -> Result<(Vec<SubjectSample>, Vec<SkippedSubject>)> {
    let mut samples = Vec::new();
    let mut skipped = Vec::new();
    for group in group_by_subject(entries) {
        match assemble(params, &group, load)? {
            Assembled::Sample(sample) => samples.push(*sample),
            Assembled::Skipped { subject, reason } => skipped.push((subject, reason)),
        }
    }
    Ok((samples, skipped))
}

/// Reads a NIfTI file as a canonical (RAS) `[X, Y, Z]` tensor.
pub fn load_canonical(path: &Path) -> Result<Tensor> {
    Ok(crate::volume::read_volume(path)?.data)
}

/// The four FiLM parameters of ivadomed's `metadata: "mri_params"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MriParams {
    pub flip_angle: f64,
    pub repetition_time: f64,
    pub echo_time: f64,
    pub manufacturer: String,
}

/// A numeric sidecar value: a number, or several (multi-echo "a,b,c" or a JSON list) averaged, as
/// ivadomed's `check_isMRIparam`.
fn mean_of(text: &str) -> Option<f64> {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    let values: Vec<f64> = inner
        .split(',')
        .map(|v| v.trim().parse::<f64>())
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

impl MriParams {
    pub const KEYS: [&'static str; 4] = ["FlipAngle", "RepetitionTime", "EchoTime", "Manufacturer"];

    /// The parameters from the entry's metadata, falling back to its JSON sidecar. A missing or unreadable
    /// key is an error naming the image and the key (ivadomed skips such a subject).
    pub fn from_entry(entry: &BidsEntry) -> Result<MriParams> {
        let sidecar: Option<serde_json::Map<String, serde_json::Value>> = match &entry.sidecar {
            Some(path) if Self::KEYS.iter().any(|k| !entry.metadata.contains_key(*k)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Some(
                    serde_json::from_str(&text)
                        .with_context(|| format!("{}: not a JSON object", path.display()))?,
                )
            }
            _ => None,
        };
        Self::from_lookup(&entry.image.display().to_string(), |key| {
            entry
                .metadata
                .get(key)
                .cloned()
                .or_else(|| sidecar.as_ref()?.get(key).map(value_text))
        })
    }

    /// The parameters from a JSON key/value map (an image's sidecar with command-line overrides, at
    /// inference). `source` names the image in errors.
    pub fn from_json_map(
        map: &std::collections::BTreeMap<String, serde_json::Value>,
        source: &str,
    ) -> Result<MriParams> {
        Self::from_lookup(source, |key| map.get(key).map(value_text))
    }

    fn from_lookup(source: &str, raw: impl Fn(&str) -> Option<String>) -> Result<MriParams> {
        let number = |key: &str| -> Result<f64> {
            let text = raw(key).with_context(|| format!("{source} has no {key}"))?;
            mean_of(&text).with_context(|| format!("{source}: {key} {text:?} is not a number"))
        };
        Ok(MriParams {
            flip_angle: number("FlipAngle")?,
            repetition_time: number("RepetitionTime")?,
            echo_time: number("EchoTime")?,
            manufacturer: raw("Manufacturer")
                .with_context(|| format!("{source} has no Manufacturer"))?,
        })
    }
}

/// A sidecar value as text: strings as they are, anything else (numbers, lists) as JSON.
fn value_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// ivadomed's manufacturer categories (`MANUFACTURER_CATEGORY`); anything else is -1.
pub fn manufacturer_code(manufacturer: &str) -> i64 {
    match manufacturer {
        "Siemens" => 0,
        "Philips" => 1,
        "GE" => 2,
        _ => -1,
    }
}

/// Mean and population standard deviation of one numeric parameter over the training set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Standardiser {
    pub name: String,
    pub mean: f64,
    pub std: f64,
}

impl Standardiser {
    fn fit(name: &str, values: &[f64]) -> Standardiser {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Standardiser {
            name: name.into(),
            mean,
            std: variance.sqrt(),
        }
    }

    /// `(value - mean) / std`; a constant training parameter only centres (std taken as 1, as
    /// scikit-learn's StandardScaler does).
    pub fn apply(&self, value: f64) -> f64 {
        let scale = if self.std > 0.0 { self.std } else { 1.0 };
        (value - self.mean) / scale
    }
}

/// The FiLM input encoder, fitted on the training set only: `[FlipAngle, RepetitionTime, EchoTime]`
/// standardised, then a one-hot of the manufacturer code over the codes seen in training (ascending).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FilmEncoder {
    pub numeric: Vec<Standardiser>,
    pub manufacturer_codes: Vec<i64>,
}

impl FilmEncoder {
    pub fn fit(train: &[MriParams]) -> Result<FilmEncoder> {
        ensure!(
            !train.is_empty(),
            "cannot fit the FiLM encoder on an empty training set"
        );
        let column = |f: fn(&MriParams) -> f64| train.iter().map(f).collect::<Vec<f64>>();
        let mut codes: Vec<i64> = train
            .iter()
            .map(|p| manufacturer_code(&p.manufacturer))
            .collect();
        codes.sort_unstable();
        codes.dedup();
        Ok(FilmEncoder {
            numeric: vec![
                Standardiser::fit("FlipAngle", &column(|p| p.flip_angle)),
                Standardiser::fit("RepetitionTime", &column(|p| p.repetition_time)),
                Standardiser::fit("EchoTime", &column(|p| p.echo_time)),
            ],
            manufacturer_codes: codes,
        })
    }

    /// Length of an encoded vector.
    pub fn len(&self) -> usize {
        self.numeric.len() + self.manufacturer_codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The FiLM input vector of `params`. A manufacturer code not seen in training encodes as all zeros.
    pub fn encode(&self, params: &MriParams) -> Vec<f32> {
        let values = [params.flip_angle, params.repetition_time, params.echo_time];
        let code = manufacturer_code(&params.manufacturer);
        self.numeric
            .iter()
            .zip(values)
            .map(|(s, v)| s.apply(v) as f32)
            .chain(
                self.manufacturer_codes
                    .iter()
                    .map(|&c| if c == code { 1.0 } else { 0.0 }),
            )
            .collect()
    }

    /// `[N, len()]` for a batch.
    pub fn encode_batch(&self, params: &[MriParams]) -> Tensor {
        let flat: Vec<f32> = params.iter().flat_map(|p| self.encode(p)).collect();
        Tensor::from_slice(&flat).reshape([params.len() as i64, self.len() as i64])
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "metadata": "mri_params",
            "numeric": self.numeric,
            "manufacturer_codes": self.manufacturer_codes,
        })
    }

    pub fn from_json(value: &serde_json::Value) -> Result<FilmEncoder> {
        let kind = value.get("metadata").and_then(|v| v.as_str());
        ensure!(
            kind == Some("mri_params"),
            "not a FiLM mri_params encoder (metadata = {kind:?})"
        );
        #[derive(Deserialize)]
        struct Stored {
            numeric: Vec<Standardiser>,
            manufacturer_codes: Vec<i64>,
        }
        let stored: Stored = serde_json::from_value(value.clone())
            .context("FiLM encoder: expected `numeric` and `manufacturer_codes`")?;
        Ok(FilmEncoder {
            numeric: stored.numeric,
            manufacturer_codes: stored.manufacturer_codes,
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(&self.to_json())? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(path: &Path) -> Result<FilmEncoder> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&serde_json::from_str(&text)?)
            .with_context(|| format!("{}", path.display()))
    }
}

/// The model folder section (`ivado_model.json`) that holds the fitted [`FilmEncoder`].
pub const METADATA_ENCODER_SECTION: &str = "metadata_encoder";

/// Whether a model takes FiLM metadata as its second input: a FiLM architecture, or any `film_layers` flag
/// switched on.
pub fn takes_film_metadata(architecture: &str, config: &serde_json::Value) -> bool {
    architecture.contains("film")
        || config["film_layers"]
            .as_array()
            .is_some_and(|layers| layers.iter().any(|l| l.as_f64().unwrap_or(0.0) != 0.0))
}

/// Refuses a model that cannot take `encoder`'s vectors: not FiLM-capable, or `n_metadata` differs from
/// the encoded length.
pub fn check_film_model(
    architecture: &str,
    config: &serde_json::Value,
    encoder: &FilmEncoder,
) -> Result<()> {
    ensure!(
        takes_film_metadata(architecture, config),
        "`metadata: \"mri_params\"` needs a FiLM model (e.g. film_unet), but {architecture} takes no \
         metadata input"
    );
    let expected = config["n_metadata"].as_i64();
    ensure!(
        expected == Some(encoder.len() as i64),
        "{architecture} takes n_metadata = {}, but the mri_params encoder fitted on the training set gives \
         {} values (FlipAngle, RepetitionTime, EchoTime and {} manufacturer(s) {:?}): set n_metadata to {}",
        expected.map_or("unset".to_owned(), |n| n.to_string()),
        encoder.len(),
        encoder.manufacturer_codes.len(),
        encoder.manufacturer_codes,
        encoder.len()
    );
    Ok(())
}

/// Every entry's FiLM parameters; the first entry lacking one is an error naming it and the key.
pub fn mri_params_of_entries(entries: &[BidsEntry]) -> Result<Vec<MriParams>> {
    entries
        .iter()
        .map(|entry| {
            MriParams::from_entry(entry).context("metadata \"mri_params\" needs FlipAngle, RepetitionTime, EchoTime and Manufacturer for every image")
        })
        .collect()
}

/// The FiLM parameters of each sample's entries (the first present channel's), or the reason a sample
/// cannot have them (ivadomed then skips it).
pub fn mri_params_of(sample: &SubjectSample) -> Result<MriParams> {
    let entry = sample
        .entries
        .iter()
        .flatten()
        .next()
        .context("the sample has no entry")?;
    MriParams::from_entry(entry)
}

/// The contrasts of a HeMIS model (`hemis_unet`, by name or as `plugin:hemis_unet`), in its channel order;
/// `None` for any other architecture. Its second input is the availability mask `[N, contrasts]`.
pub fn hemis_contrasts(architecture: &str, config: &serde_json::Value) -> Option<Vec<String>> {
    let name = architecture.rsplit(':').next().unwrap_or(architecture);
    if name != "hemis_unet" {
        return None;
    }
    Some(strings(&config["contrasts"]))
}

/// The strings of a JSON list (a list of contrast names); nothing for anything else.
pub fn strings(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// ivadomed's HeMIS curriculum (`missing_probability`, `missing_probability_growth`): during training each
/// contrast a sample has is dropped (its channel zeroed, 0 in the mask) with a probability that grows every
/// epoch, `p ** growth` after each one, so epoch `e` (from 1) drops with `p ** (growth ** (e - 1))`.
///
/// Every draw is a function of (run seed, epoch, sample index) alone, so a batch's mask does not depend on
/// the loader's workers or on what ran before it, and a resumed run draws the same masks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModalityDrops {
    /// Drop probability of the first epoch, in [0, 1).
    pub probability: f64,
    /// Exponent applied to the probability after each epoch; below 1 it grows.
    pub growth: f64,
}

/// Separates the drop draws from the other streams derived from the run seed (order, augmentation).
const DROP_STREAM: u64 = 0x4845_4D49_5300_0000;

impl ModalityDrops {
    /// Checks the ranges: ivadomed's `missing_probability` is a probability, and 1 would drop everything.
    pub fn new(probability: f64, growth: f64) -> Result<Self> {
        ensure!(
            (0.0..1.0).contains(&probability),
            "`missing_probability` must be in [0, 1), got {probability}"
        );
        ensure!(
            growth.is_finite() && growth > 0.0,
            "`missing_probability_growth` must be a positive number, got {growth}"
        );
        Ok(Self {
            probability,
            growth,
        })
    }

    /// The drop probability of `epoch` (counted from 1).
    pub fn probability_at(&self, epoch: usize) -> f64 {
        if self.probability == 0.0 {
            return 0.0;
        }
        let exponent = self.growth.powi(epoch.saturating_sub(1) as i32);
        self.probability.powf(exponent)
    }

    /// One sample's availability for `epoch`: `real` (1 present, 0 missing) with each present contrast
    /// dropped with [`ModalityDrops::probability_at`]. When every present contrast was drawn, one of them,
    /// chosen at random, is kept: the network needs at least one.
    pub fn sample_availability(
        &self,
        real: &[f32],
        seed: u64,
        epoch: usize,
        sample: u64,
    ) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let p = self.probability_at(epoch);
        let stream = derive_seed(derive_seed(seed ^ DROP_STREAM, epoch as u64), sample);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(stream);
        let mut available: Vec<f32> = real
            .iter()
            .map(|&flag| {
                // One draw per contrast, present or not, so a contrast's draw does not shift with the others.
                let dropped = rng.random::<f64>() < p;
                if flag != 0.0 && !dropped {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        if available.iter().all(|&a| a == 0.0) {
            let present: Vec<usize> = (0..real.len()).filter(|&c| real[c] != 0.0).collect();
            if !present.is_empty() {
                available[present[rng.random_range(0..present.len())]] = 1.0;
            }
        }
        available
    }

    /// The masks of a batch: `real` is the batch's `[B, C]` availability, `indices` the samples' indices in
    /// the training set (what seeds their draws).
    pub fn batch_availability(
        &self,
        real: &Tensor,
        indices: &[i64],
        seed: u64,
        epoch: usize,
    ) -> Result<Tensor> {
        let size = real.size();
        ensure!(
            size.len() == 2 && size[0] == indices.len() as i64,
            "availability {size:?} for a batch of {}",
            indices.len()
        );
        let flat = Vec::<f32>::try_from(
            real.f_to_device(tch::Device::Cpu)?
                .f_to_kind(Kind::Float)?
                .f_flatten(0, -1)?,
        )?;
        let width = size[1] as usize;
        let masks: Vec<f32> = indices
            .iter()
            .enumerate()
            .flat_map(|(row, &index)| {
                self.sample_availability(
                    &flat[row * width..(row + 1) * width],
                    seed,
                    epoch,
                    index as u64,
                )
            })
            .collect();
        Ok(Tensor::from_slice(&masks)
            .f_reshape(size.as_slice())?
            .f_to_device(real.device())?)
    }
}

/// `images` `[B, C, ...]` with the channels that `available` `[B, C]` marks missing set to zero, as
/// ivadomed feeds a dropped contrast.
pub fn zero_missing_channels(images: &Tensor, available: &Tensor) -> Result<Tensor> {
    let mut shape = available.size();
    shape.resize(images.dim(), 1);
    Ok(images.f_mul(
        &available
            .f_to_kind(images.kind())?
            .f_reshape(shape.as_slice())?,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::path::PathBuf;

    fn entry(subject: &str, contrast: &str, targets: &[Option<&str>]) -> BidsEntry {
        BidsEntry {
            subject: subject.into(),
            session: None,
            contrast: contrast.into(),
            image: PathBuf::from(format!("{subject}_{contrast}.nii.gz")),
            label: None,
            sidecar: None,
            metadata: BTreeMap::new(),
            targets: targets.iter().map(|t| t.map(PathBuf::from)).collect(),
            roi: None,
            ..Default::default()
        }
    }

    /// A loader over in-memory volumes `[2, 3, 1]` filled with one value per file.
    fn loader(files: &[(&str, Vec<f32>)]) -> impl FnMut(&Path) -> Result<Tensor> {
        let files: HashMap<PathBuf, Vec<f32>> = files
            .iter()
            .map(|(p, v)| (PathBuf::from(p), v.clone()))
            .collect();
        move |path: &Path| {
            let values = files
                .get(path)
                .with_context(|| format!("no test file {}", path.display()))?;
            Ok(Tensor::from_slice(values).reshape([2, 3, 1]))
        }
    }

    fn filled(value: f32) -> Vec<f32> {
        vec![value; 6]
    }

    fn params(contrasts: &[&str], suffixes: &[&str], missing: MissingContrast) -> ChannelParams {
        ChannelParams {
            contrasts: contrasts.iter().map(|s| s.to_string()).collect(),
            target_suffixes: suffixes.iter().map(|s| s.to_string()).collect(),
            missing_contrast: missing,
            soft_gt: false,
            require_roi: false,
        }
    }

    fn sample(result: Assembled) -> SubjectSample {
        match result {
            Assembled::Sample(sample) => *sample,
            Assembled::Skipped { subject, reason } => panic!("{subject} skipped: {reason}"),
        }
    }

    fn channel_means(t: &Tensor) -> Vec<f32> {
        Vec::try_from(t.mean_dim(&[1i64, 2, 3][..], false, Kind::Float)).unwrap()
    }

    #[test]
    fn contrasts_stack_in_the_configured_order() {
        let entries = [
            entry("sub-01", "T2w", &[Some("seg")]),
            entry("sub-01", "T1w", &[None]),
        ];
        let group: Vec<&BidsEntry> = entries.iter().collect();
        let mut load = loader(&[
            ("sub-01_T1w.nii.gz", filled(1.0)),
            ("sub-01_T2w.nii.gz", filled(2.0)),
            ("seg", filled(1.0)),
        ]);
        for (order, expected) in [(["T1w", "T2w"], [1.0, 2.0]), (["T2w", "T1w"], [2.0, 1.0])] {
            let p = params(&order, &["_seg-manual"], MissingContrast::Error);
            let s = sample(assemble(&p, &group, &mut load).unwrap());
            assert_eq!(s.input.size(), [2, 2, 3, 1]);
            assert_eq!(channel_means(&s.input), expected);
            assert_eq!(
                Vec::<f32>::try_from(&s.missing_modalities).unwrap(),
                [0.0, 0.0]
            );
            // The T2w entry carries the target whatever the channel order.
            assert_eq!(channel_means(s.target.as_ref().unwrap()), [1.0]);
            assert_eq!(
                s.entries
                    .iter()
                    .map(|e| e.as_ref().unwrap().contrast.clone())
                    .collect::<Vec<_>>(),
                order
            );
        }
    }

    #[test]
    fn missing_contrast_policies() {
        let entries = [entry("sub-02", "T1w", &[Some("seg")])];
        let group: Vec<&BidsEntry> = entries.iter().collect();
        let mut load = loader(&[("sub-02_T1w.nii.gz", filled(3.0)), ("seg", filled(1.0))]);
        let contrasts = ["T1w", "T2w"];

        let error = assemble(
            &params(&contrasts, &["_seg"], MissingContrast::Error),
            &group,
            &mut load,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(error, "sub-02 has no T2w image");

        match assemble(
            &params(&contrasts, &["_seg"], MissingContrast::Skip),
            &group,
            &mut load,
        )
        .unwrap()
        {
            Assembled::Skipped { subject, reason } => {
                assert_eq!(
                    (subject.as_str(), reason.as_str()),
                    ("sub-02", "no T2w image")
                )
            }
            Assembled::Sample(_) => panic!("a subject without T2w must be skipped"),
        }

        let hemis = params(&contrasts, &["_seg"], MissingContrast::ZeroChannel);
        let s = sample(assemble(&hemis, &group, &mut load).unwrap());
        assert_eq!(channel_means(&s.input), [3.0, 0.0]);
        assert_eq!(
            Vec::<f32>::try_from(&s.missing_modalities).unwrap(),
            [0.0, 1.0]
        );
        assert!(s.entries[1].is_none());
        assert_eq!(s.warnings, ["sub-02: no T2w image, zero channel"]);

        // Nothing to build a sample from, even for HeMIS.
        let only_flair = params(&["FLAIR"], &["_seg"], MissingContrast::ZeroChannel);
        assert!(matches!(
            assemble(&only_flair, &group, &mut load).unwrap(),
            Assembled::Skipped { .. }
        ));
    }

    #[test]
    fn k_class_targets_with_a_missing_class() {
        let entries = [entry("sub-03", "T2w", &[Some("cord"), None, Some("csf")])];
        let group: Vec<&BidsEntry> = entries.iter().collect();
        let mut load = loader(&[
            ("sub-03_T2w.nii.gz", filled(5.0)),
            ("cord", vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
            ("csf", vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
        ]);
        let p = params(
            &["T2w"],
            &["_cord", "_lesion", "_csf"],
            MissingContrast::Error,
        );
        let s = sample(assemble(&p, &group, &mut load).unwrap());
        let target = s.target.unwrap();
        assert_eq!(target.size(), [3, 2, 3, 1]);
        // Foreground voxels per class: 1, 0 (missing: zeros), 2.
        let sums: Vec<f32> =
            Vec::try_from(target.sum_dim_intlist(&[1i64, 2, 3][..], false, Kind::Float)).unwrap();
        assert_eq!(sums, [1.0, 0.0, 2.0]);
        assert_eq!(
            s.warnings,
            ["sub-03: no _lesion target, zeros for that class"]
        );

        let none = [entry("sub-04", "T2w", &[None, None, None])];
        let group: Vec<&BidsEntry> = none.iter().collect();
        match assemble(&p, &group, &mut load).unwrap() {
            Assembled::Skipped { reason, .. } => assert!(reason.contains("no target"), "{reason}"),
            Assembled::Sample(_) => panic!("a subject without any target must be skipped"),
        }
    }

    #[test]
    fn soft_targets_are_kept_or_binarised_at_one_half() {
        let entries = [entry("sub-05", "T2w", &[Some("soft")])];
        let group: Vec<&BidsEntry> = entries.iter().collect();
        let soft_values = vec![0.0, 0.3, 0.49, 0.5, 0.8, 1.0];
        let mut load = loader(&[
            ("sub-05_T2w.nii.gz", filled(1.0)),
            ("soft", soft_values.clone()),
        ]);
        let mut p = params(&["T2w"], &["_soft"], MissingContrast::Error);
        let hard = sample(assemble(&p, &group, &mut load).unwrap());
        let hard: Vec<f32> = Vec::try_from(hard.target.unwrap().flatten(0, -1)).unwrap();
        assert_eq!(hard, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        p.soft_gt = true;
        let soft = sample(assemble(&p, &group, &mut load).unwrap());
        let soft: Vec<f32> = Vec::try_from(soft.target.unwrap().flatten(0, -1)).unwrap();
        assert_eq!(soft, soft_values);
    }

    #[test]
    fn shapes_must_agree_and_subjects_group_by_session() {
        let mut t2 = entry("sub-06", "T2w", &[]);
        t2.image = PathBuf::from("big");
        let entries = [entry("sub-06", "T1w", &[]), t2];
        let group: Vec<&BidsEntry> = entries.iter().collect();
        let mut load = |path: &Path| -> Result<Tensor> {
            let shape = if path == Path::new("big") {
                [2, 3, 2]
            } else {
                [2, 3, 1]
            };
            Ok(Tensor::ones(shape, (Kind::Float, tch::Device::Cpu)))
        };
        let error = assemble(
            &params(&["T1w", "T2w"], &[], MissingContrast::Error),
            &group,
            &mut load,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("T2w image has shape [2, 3, 2]"), "{error}");

        let mut later = entry("sub-06", "T1w", &[]);
        later.session = Some("ses-02".into());
        let entries = [
            entry("sub-06", "T1w", &[]),
            later,
            entry("sub-07", "T1w", &[]),
        ];
        let sizes: Vec<usize> = group_by_subject(&entries).iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 1, 1]);
    }

    fn mri(fa: f64, tr: f64, te: f64, manufacturer: &str) -> MriParams {
        MriParams {
            flip_angle: fa,
            repetition_time: tr,
            echo_time: te,
            manufacturer: manufacturer.into(),
        }
    }

    #[test]
    fn film_encoding_uses_training_statistics_only() {
        // Training: FA 80 and 100 (mean 90, population std 10), TR 1 and 3 (mean 2, std 1), TE 0.01 and 0.03
        // (mean 0.02, std 0.01); manufacturers GE (code 2) and Siemens (code 0) -> one-hot order [0, 2].
        let train = [mri(80.0, 1.0, 0.01, "GE"), mri(100.0, 3.0, 0.03, "Siemens")];
        let encoder = FilmEncoder::fit(&train).unwrap();
        assert_eq!(encoder.manufacturer_codes, [0, 2]);
        assert_eq!(encoder.len(), 5);
        let close = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
        };
        // A validation subject far from the training values: (120 - 90) / 10 = 3, (2.5 - 2) / 1 = 0.5,
        // (0.02 - 0.02) / 0.01 = 0, Siemens -> [1, 0]. Statistics over train + this subject would give other
        // numbers (FA mean 100), so these show the subject did not leak into the fit.
        let validation = mri(120.0, 2.5, 0.02, "Siemens");
        let encoded = encoder.encode(&validation);
        assert!(close(&encoded, &[3.0, 0.5, 0.0, 1.0, 0.0]), "{encoded:?}");
        assert!(close(
            &encoder.encode(&train[0]),
            &[-1.0, -1.0, -1.0, 0.0, 1.0]
        ));
        // Philips was never seen in training: all-zero one-hot (scikit-learn's handle_unknown="ignore").
        let unseen = encoder.encode(&mri(90.0, 2.0, 0.02, "Philips"));
        assert!(close(&unseen, &[0.0, 0.0, 0.0, 0.0, 0.0]), "{unseen:?}");
        let batch = encoder.encode_batch(&[validation.clone(), train[1].clone()]);
        assert_eq!(batch.size(), [2, 5]);

        // A constant training parameter only centres.
        let constant =
            FilmEncoder::fit(&[mri(90.0, 2.0, 0.02, "Acme"), mri(90.0, 4.0, 0.02, "Acme")])
                .unwrap();
        assert_eq!(constant.manufacturer_codes, [-1]);
        assert!(close(
            &constant.encode(&mri(95.0, 4.0, 0.02, "Other")),
            &[5.0, 1.0, 0.0, 1.0]
        ));

        let dir = std::env::temp_dir().join(format!("ivado-film-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("film_encoder.json");
        encoder.save(&path).unwrap();
        let loaded = FilmEncoder::load(&path).unwrap();
        assert_eq!(loaded, encoder);
        assert_eq!(loaded.encode(&validation), encoded);
        std::fs::remove_dir_all(&dir).ok();
        assert!(FilmEncoder::from_json(&serde_json::json!({"metadata": "contrasts"})).is_err());
    }

    #[test]
    fn mri_params_read_from_metadata_or_sidecar() {
        let mut with_metadata = entry("sub-08", "T2w", &[]);
        for (key, value) in [
            ("FlipAngle", "90"),
            ("RepetitionTime", "2.5"),
            // multi-echo: averaged as ivadomed does
            ("EchoTime", "0.01, 0.03"),
            ("Manufacturer", "Philips"),
        ] {
            with_metadata.metadata.insert(key.into(), value.into());
        }
        let params = MriParams::from_entry(&with_metadata).unwrap();
        assert_eq!(params.flip_angle, 90.0);
        assert_eq!(params.repetition_time, 2.5);
        assert!((params.echo_time - 0.02).abs() < 1e-12);
        assert_eq!(params.manufacturer, "Philips");

        let dir = std::env::temp_dir().join(format!("ivado-mri-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sidecar = dir.join("sub-09_T2w.json");
        std::fs::write(
            &sidecar,
            r#"{"FlipAngle": 30, "RepetitionTime": 0.8, "EchoTime": [0.002, 0.004], "Manufacturer": "GE"}"#,
        )
        .unwrap();
        let mut with_sidecar = entry("sub-09", "T2w", &[]);
        with_sidecar.sidecar = Some(sidecar.clone());
        let params = MriParams::from_entry(&with_sidecar).unwrap();
        assert_eq!((params.flip_angle, params.repetition_time), (30.0, 0.8));
        assert!((params.echo_time - 0.003).abs() < 1e-12);
        assert_eq!(params.manufacturer, "GE");

        std::fs::write(
            &sidecar,
            r#"{"FlipAngle": 30, "RepetitionTime": 0.8, "Manufacturer": "GE"}"#,
        )
        .unwrap();
        let error = MriParams::from_entry(&with_sidecar)
            .unwrap_err()
            .to_string();
        assert!(error.contains("has no EchoTime"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
