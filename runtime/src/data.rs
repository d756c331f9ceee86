//! From an indexed BIDS dataset to batches: image/label pairs checked against each other, and windows (2D
//! slices along any axis, 2D patches, 3D subvolumes; see [`crate::sampling`]) of one- or multi-channel inputs
//! with K targets (see [`crate::channels`]) run through the preprocessing pipeline. Splits live in
//! [`crate::split`] (re-exported here).
use crate::bids::BidsEntry;
use crate::channels::{assemble, group_by_subject, Assembled, ChannelParams, MissingContrast};
use crate::pipeline::{derive_seed, Phase, Pipeline};
use crate::sampling::{plane_axes, select, Filters, SamplingMode};
use crate::tiling::SliceAxis;
use crate::volume::{read_image, read_label, Volume};
use anyhow::{bail, Context, Result};
use ivado_sdk::{Batch, Sample};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

pub use crate::split::{split_by_subject, Split};

/// Largest affine difference (mm) tolerated between an image and its label.
const AFFINE_TOLERANCE_MM: f64 = 1e-3;

/// Reads an image and its label, and checks they describe the same voxels.
pub fn load_pair(entry: &BidsEntry) -> Result<(Volume, Volume)> {
    let label_path = entry
        .label
        .as_ref()
        .with_context(|| format!("{}: no label found for this image", entry.image.display()))?;
    // the label shares its image's geometry, so it takes the image's sidecar (microscopy pixel size)
    let sidecar = entry.sidecar.as_deref();
    let image = read_image(&entry.image, sidecar)?;
    let label = read_label(label_path, sidecar)?;
    if image.data.size() != label.data.size() {
        bail!(
            "image {} has shape {:?} but its label {} has shape {:?}",
            entry.image.display(),
            image.reorientation.file_shape,
            label_path.display(),
            label.reorientation.file_shape
        );
    }
    let worst = image
        .affine
        .iter()
        .flatten()
        .zip(label.affine.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    // microscopy pixels are ~1e-4 mm: the tolerance is also at most 1% of the smallest voxel
    let smallest_voxel = image.spacing.iter().copied().fold(f64::INFINITY, f64::min);
    let tolerance = AFFINE_TOLERANCE_MM.min(0.01 * smallest_voxel);
    if worst > tolerance {
        bail!(
            "image {} and its label {} have different affines (largest difference {worst:.3e} mm, tolerance {tolerance:.1e} mm): they do not overlay",
            entry.image.display(),
            label_path.display()
        );
    }
    Ok((image, label))
}

/// The axial slices of one volume as samples: `image` `[1, X, Y]` plus `label` when given.
pub fn axial_samples(image: &Volume, label: Option<&Volume>) -> Vec<Sample> {
    let depth = image.data.size()[2];
    (0..depth)
        .map(|z| {
            let mut sample = Sample::new();
            sample.insert("image", image.data.select(2, z).unsqueeze(0));
            if let Some(label) = label {
                sample.insert("label", label.data.select(2, z).unsqueeze(0));
            }
            sample.set_spacing(&image.spacing[..2]);
            sample
        })
        .collect()
}

/// One entry's axial slices through `pipeline`'s `phase` steps: per slice, the `[1, H, W]` image, its binary
/// label and its spacing. Slice `z` of the `volume`-th entry is seeded by (`seed`, volume, z), which only
/// matters for a pipeline that is not deterministic.
pub fn preprocess_entry(
    entry: &BidsEntry,
    pipeline: &Pipeline,
    phase: Phase,
    seed: u64,
    volume: usize,
) -> Result<Vec<(Tensor, Tensor, Vec<f64>)>> {
    let (image, label) = load_pair(entry)?;
    axial_samples(&image, Some(&label))
        .into_iter()
        .enumerate()
        .map(|(z, sample)| {
            let sample_seed = derive_seed(seed, (volume as u64) << 20 | z as u64);
            let (sample, _) = pipeline
                .apply_in(phase, sample, sample_seed)
                .with_context(|| format!("preprocessing slice {z} of {}", entry.image.display()))?;
            Ok((
                sample.get("image")?.shallow_clone(),
                // Labels stay binary through nearest-neighbour resampling; threshold anyway for soft inputs.
                sample.get("label")?.ge(0.5).to_kind(Kind::Float),
                sample.spacing()?,
            ))
        })
        .collect()
}

/// How training samples are cut and assembled: ivadomed's loader_parameters `slice_axis`, `length_2D` /
/// `stride_2D`, `length_3D` / `stride_3D`, the slice, patch and ROI filters, `multichannel` and `soft_gt`.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    pub mode: SamplingMode,
    pub filters: Filters,
    /// One sample per subject with its contrasts stacked as channels, instead of one sample per image.
    pub multichannel: bool,
    /// Channel order for `multichannel`; empty: the contrasts in order of first appearance in the entries.
    pub contrasts: Vec<String>,
    /// Keep targets soft instead of binarising them at 0.5.
    pub soft_gt: bool,
    /// A subject lacking a contrast: skipped (ivadomed), or kept with a zero channel for HeMIS models, whose
    /// [`SliceSet::available`] then says which channels are real.
    pub missing_contrast: MissingContrast,
}

impl Default for SamplingOptions {
    /// ivadomed's default: every axial slice, one channel, no filter.
    fn default() -> Self {
        Self {
            mode: SamplingMode::Slices {
                axis: SliceAxis::Axial,
            },
            filters: Filters::default(),
            multichannel: false,
            contrasts: Vec::new(),
            soft_gt: false,
            missing_contrast: MissingContrast::Skip,
        }
    }
}

impl SamplingOptions {
    /// The sampling as recorded in a model folder (`data.sampling`), for inference to cut the same windows.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let axis_name = |axis: &SliceAxis| match axis {
            SliceAxis::Sagittal => "sagittal",
            SliceAxis::Coronal => "coronal",
            SliceAxis::Axial => "axial",
        };
        let mut value = match &self.mode {
            SamplingMode::Slices { axis } => json!({"mode": "2d", "slice_axis": axis_name(axis)}),
            SamplingMode::Patches2D {
                axis,
                length,
                stride,
            } => json!({
                "mode": "2d_patches", "slice_axis": axis_name(axis), "length_2D": length, "stride_2D": stride,
            }),
            SamplingMode::Subvolumes { length, stride } => {
                json!({"mode": "3d", "length_3D": length, "stride_3D": stride})
            }
            SamplingMode::Volume => json!({"mode": "volume"}),
        };
        value["multichannel"] = json!(self.multichannel);
        value["contrasts"] = json!(self.contrasts);
        value["soft_gt"] = json!(self.soft_gt);
        value
    }

    /// The keys [`SamplingOptions::from_json`] reads (ivadomed's loader_parameters names, plus `contrasts`
    /// for the channel order).
    pub const KEYS: &'static [&'static str] = &[
        "slice_axis",
        "length_2D",
        "stride_2D",
        "length_3D",
        "stride_3D",
        "slice_filter_params",
        "patch_filter_params",
        "roi_params",
        "multichannel",
        "contrasts",
        "soft_gt",
    ];

    /// Reads the [`SamplingOptions::KEYS`] of `options` (others are ignored): `length_3D` selects 3D
    /// subvolumes, a non-empty `length_2D` 2D patches (`stride_*` defaults to the length, no overlap), else
    /// whole 2D slices along `slice_axis` (default "axial").
    pub fn from_json(options: &serde_json::Value) -> Result<Self> {
        use serde_json::Value;
        let lengths = |key: &str, count: usize| -> Result<Option<Vec<i64>>> {
            match options.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(items)) if items.is_empty() => Ok(None),
                Some(Value::Array(items)) => {
                    let values: Option<Vec<i64>> = items.iter().map(Value::as_i64).collect();
                    match values {
                        Some(values) if values.len() == count && values.iter().all(|&v| v > 0) => {
                            Ok(Some(values))
                        }
                        _ => bail!(
                            "`{key}` must be a list of {count} positive integers, got {}",
                            items.len()
                        ),
                    }
                }
                Some(other) => {
                    bail!("`{key}` must be a list of {count} positive integers, got {other}")
                }
            }
        };
        let flag = |object: &Value, key: &str, context: &str| -> Result<bool> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => bail!("`{context}.{key}` must be true or false, got {other}"),
            }
        };
        let filter_flags = |key: &str| -> Result<[bool; 3]> {
            let Some(object) = options.get(key).filter(|v| !v.is_null()) else {
                return Ok([false; 3]);
            };
            let Some(map) = object.as_object() else {
                bail!("`{key}` must be a map, got {object}");
            };
            const FLAGS: [&str; 3] = [
                "filter_empty_mask",
                "filter_absent_class",
                "filter_empty_input",
            ];
            if let Some(unknown) = map.keys().find(|k| !FLAGS.contains(&k.as_str())) {
                bail!(
                    "`{key}` has no option `{unknown}` (known: {})",
                    FLAGS.join(", ")
                );
            }
            Ok([
                flag(object, FLAGS[0], key)?,
                flag(object, FLAGS[1], key)?,
                flag(object, FLAGS[2], key)?,
            ])
        };
        let axis = match options.get("slice_axis") {
            None | Some(Value::Null) => SliceAxis::Axial,
            Some(Value::String(name)) => SliceAxis::from_name(name)?,
            Some(other) => {
                bail!("`slice_axis` must be \"sagittal\", \"coronal\" or \"axial\", got {other}")
            }
        };
        let mode = match (lengths("length_2D", 2)?, lengths("length_3D", 3)?) {
            (Some(_), Some(_)) => {
                bail!("give `length_2D` (2D patches) or `length_3D` (3D subvolumes), not both")
            }
            (None, Some(length)) => {
                let stride = lengths("stride_3D", 3)?.unwrap_or_else(|| length.clone());
                SamplingMode::Subvolumes {
                    length: [length[0], length[1], length[2]],
                    stride: [stride[0], stride[1], stride[2]],
                }
            }
            (Some(length), None) => {
                let stride = lengths("stride_2D", 2)?.unwrap_or_else(|| length.clone());
                SamplingMode::Patches2D {
                    axis,
                    length: [length[0], length[1]],
                    stride: [stride[0], stride[1]],
                }
            }
            (None, None) => SamplingMode::Slices { axis },
        };
        let [empty_mask, absent_class, empty_input] = filter_flags("slice_filter_params")?;
        let [patch_empty_mask, patch_absent_class, patch_empty_input] =
            filter_flags("patch_filter_params")?;
        let slice_filter_roi = match options.get("roi_params").filter(|v| !v.is_null()) {
            None => None,
            Some(roi) => {
                let Some(map) = roi.as_object() else {
                    bail!("`roi_params` must be a map, got {roi}");
                };
                // The ROI files themselves come with the dataset (`bids(..., #{roi_suffix: ...})`).
                if let Some(unknown) = map
                    .keys()
                    .find(|k| !["suffix", "slice_filter_roi"].contains(&k.as_str()))
                {
                    bail!(
                        "`roi_params` has no option `{unknown}` (known: suffix, slice_filter_roi)"
                    );
                }
                match map.get("slice_filter_roi") {
                    None | Some(Value::Null) => None,
                    Some(value) => Some(value.as_i64().filter(|&v| v >= 0).with_context(|| {
                        format!("`roi_params.slice_filter_roi` must be a non-negative integer, got {value}")
                    })?),
                }
            }
        };
        let boolean = |key: &str| -> Result<bool> {
            match options.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => bail!("`{key}` must be true or false, got {other}"),
            }
        };
        let contrasts = match options.get("contrasts") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .context("`contrasts` must be a list of contrast names")?,
            Some(other) => bail!("`contrasts` must be a list of contrast names, got {other}"),
        };
        Ok(Self {
            mode,
            filters: Filters {
                slice: crate::sampling::SliceFilter {
                    filter_empty_mask: empty_mask,
                    filter_absent_class: absent_class,
                    filter_empty_input: empty_input,
                },
                patch: crate::sampling::PatchFilter {
                    filter_empty_mask: patch_empty_mask,
                    filter_absent_class: patch_absent_class,
                    filter_empty_input: patch_empty_input,
                },
                slice_filter_roi,
            },
            multichannel: boolean("multichannel")?,
            contrasts,
            soft_gt: boolean("soft_gt")?,
            missing_contrast: MissingContrast::Skip,
        })
    }

    /// Whether these options cut exactly what [`SliceSet::build_in`] cuts (axial slices of one image each, one
    /// binary target, no filter), so the original path can serve them.
    pub fn is_plain_axial(&self, entries: &[BidsEntry]) -> bool {
        *self == Self::default() && entries.iter().all(|e| e.targets.len() <= 1)
    }
}

/// An entry's target paths, the `label` standing in for entries indexed without a target list.
fn target_paths(entry: &BidsEntry) -> Vec<Option<std::path::PathBuf>> {
    if entry.targets.is_empty() {
        vec![entry.label.clone()]
    } else {
        entry.targets.clone()
    }
}

/// One sample's files for the window path: a subject's images (multichannel) or one image, with the channel
/// parameters it is assembled with.
#[derive(Clone, Debug)]
pub struct WindowGroup {
    pub entries: Vec<BidsEntry>,
    pub params: ChannelParams,
}

impl WindowGroup {
    /// Whether [`load_group`] skips this group (a channel contrast is missing: `MissingContrast::Skip`),
    /// decided from the entries alone.
    pub fn skipped(&self) -> bool {
        let channels: Vec<&BidsEntry> = self
            .params
            .contrasts
            .iter()
            .filter_map(|c| self.entries.iter().find(|e| &e.contrast == c))
            .collect();
        let missing = match self.params.missing_contrast {
            MissingContrast::Skip | MissingContrast::Error => {
                channels.len() < self.params.contrasts.len()
            }
            MissingContrast::ZeroChannel => channels.is_empty(),
        };
        missing
            || !channels
                .iter()
                .any(|e| e.targets.iter().any(Option::is_some))
            || (self.params.require_roi && !channels.iter().any(|e| e.roi.is_some()))
    }
}

/// The groups `options` cuts `entries` into, in order: one per subject (and session) with `multichannel`,
/// else one per image. Every entry gets its targets (the `label` standing in for an absent target list).
pub fn window_groups(entries: &[BidsEntry], options: &SamplingOptions) -> Result<Vec<WindowGroup>> {
    if entries.is_empty() {
        bail!("no images to load: the dataset split is empty");
    }
    let entries: Vec<BidsEntry> = entries
        .iter()
        .map(|e| BidsEntry {
            targets: target_paths(e),
            ..e.clone()
        })
        .collect();
    let classes = entries[0].targets.len();
    if let Some(other) = entries.iter().find(|e| e.targets.len() != classes) {
        bail!(
            "{} has {} targets but {} has {classes}: every image needs the same target suffixes",
            other.image.display(),
            other.targets.len(),
            entries[0].image.display()
        );
    }
    let groups: Vec<Vec<&BidsEntry>> = if options.multichannel {
        group_by_subject(&entries)
    } else {
        entries.iter().map(|e| vec![e]).collect()
    };
    let mut all_contrasts: Vec<String> = Vec::new();
    for entry in &entries {
        if !all_contrasts.contains(&entry.contrast) {
            all_contrasts.push(entry.contrast.clone());
        }
    }
    let channel_contrasts = if options.contrasts.is_empty() {
        all_contrasts
    } else {
        options.contrasts.clone()
    };
    Ok(groups
        .into_iter()
        .map(|group| WindowGroup {
            params: ChannelParams {
                contrasts: if options.multichannel {
                    channel_contrasts.clone()
                } else {
                    vec![group[0].contrast.clone()]
                },
                target_suffixes: (0..classes).map(|k| format!("target {k}")).collect(),
                missing_contrast: options.missing_contrast,
                soft_gt: options.soft_gt,
                require_roi: options.filters.slice_filter_roi.is_some(),
            },
            entries: group.into_iter().cloned().collect(),
        })
        .collect())
}

/// A group's volumes, assembled (see [`crate::channels::assemble`]).
pub struct LoadedGroup {
    /// `[C, X, Y, Z]`
    pub input: Tensor,
    /// `[K, X, Y, Z]`, binary unless `soft_gt`
    pub target: Tensor,
    /// `[1, X, Y, Z]`, when the ROI filter needs it
    pub roi: Option<Tensor>,
    /// The grid's spacing (X, Y, Z), from the first file read (channels.rs checks every file shares the grid).
    pub spacing: Vec<f64>,
    /// `[C]`: 1 for a contrast the group lacks (a zero channel, `MissingContrast::ZeroChannel`), else 0.
    pub missing_modalities: Tensor,
}

/// Reads and assembles `group`; `None` when it is skipped.
pub fn load_group(group: &WindowGroup) -> Result<Option<LoadedGroup>> {
    Ok(assemble_group(group)?.ok())
}

/// Reads and assembles `group`; `Err(reason)` when it is skipped (a contrast, label or ROI missing).
pub fn assemble_group(group: &WindowGroup) -> Result<std::result::Result<LoadedGroup, String>> {
    let mut volume_spacing: Option<Vec<f64>> = None;
    let mut load = |path: &std::path::Path| -> Result<Tensor> {
        let volume = crate::volume::read_volume(path)?;
        volume_spacing.get_or_insert(volume.spacing.to_vec());
        Ok(volume.data)
    };
    let members: Vec<&BidsEntry> = group.entries.iter().collect();
    let sample = match assemble(&group.params, &members, &mut load)? {
        Assembled::Sample(sample) => sample,
        Assembled::Skipped { reason, .. } => return Ok(Err(reason)),
    };
    let spacing = volume_spacing.context("no file was read")?;
    let target = sample
        .target
        .with_context(|| format!("{}: no target", group.entries[0].image.display()))?;
    Ok(Ok(LoadedGroup {
        input: sample.input,
        target,
        roi: sample.roi,
        spacing,
        missing_modalities: sample.missing_modalities,
    }))
}

/// Preprocessed `what` (slices, samples) stacked into one `[N, ...]` tensor; samples of different shapes are
/// an error that says how to make them agree.
pub fn stack_samples(images: &[Tensor], what: &str) -> Result<Tensor> {
    let Some(first) = images.first() else {
        bail!("no preprocessed {what} to stack");
    };
    if let Some(other) = images.iter().find(|t| t.size() != first.size()) {
        bail!(
            "preprocessed {what} differ in shape ({:?} vs {:?}); add a CenterCrop to the pipeline",
            first.size(),
            other.size()
        );
    }
    Ok(Tensor::stack(images, 0))
}

/// The pipeline seed of window `index` of the `volume`-th kept group.
pub fn window_seed(seed: u64, volume: usize, index: usize) -> u64 {
    derive_seed(seed, (volume as u64) << 20 | index as u64)
}

/// `window` of `group` through `pipeline`'s `phase` steps (seeded by `item_seed`): image, label (binarised
/// at 0.5 unless `soft_gt`) and spacing. `source` names the group in errors.
pub fn window_item(
    group: &LoadedGroup,
    window: &crate::sampling::Window,
    pipeline: &Pipeline,
    phase: Phase,
    item_seed: u64,
    soft_gt: bool,
    source: &BidsEntry,
) -> Result<(Tensor, Tensor, Vec<f64>)> {
    let mut item = Sample::new();
    // Copies, so nothing downstream aliases the group's volume (a cached group lends its memory).
    item.insert("image", window.extract(&group.input)?.copy());
    item.insert("label", window.extract(&group.target)?.copy());
    let window_spacing: Vec<f64> = match window.axis {
        Some(axis) => plane_axes(axis).iter().map(|&a| group.spacing[a]).collect(),
        None => group.spacing.clone(),
    };
    item.set_spacing(&window_spacing);
    let (item, _) = pipeline.apply_in(phase, item, item_seed).with_context(|| {
        format!(
            "preprocessing window {:?}+{:?} of {}",
            window.origin,
            window.extent,
            source.image.display()
        )
    })?;
    let label = item.get("label")?;
    Ok((
        item.get("image")?.shallow_clone(),
        if soft_gt {
            label.shallow_clone()
        } else {
            label.ge(0.5).to_kind(Kind::Float)
        },
        item.spacing()?,
    ))
}

/// Preprocessed 2D slices stacked into tensors, with the volume each slice came from.
pub struct SliceSet {
    /// `[N, 1, H, W]`
    pub images: Tensor,
    /// `[N, 1, H, W]`, binary
    pub labels: Tensor,
    /// Index into `volumes` per slice.
    pub volume_of_slice: Vec<usize>,
    /// Image path per volume.
    pub volumes: Vec<String>,
    /// Physical spacing of each slice after preprocessing (mm per axis), for augmentations that work in mm.
    pub spacing: Vec<Vec<f64>>,
    /// `[N, M]` FiLM metadata per slice (its volume's encoded vector), the model's second input; `None` for
    /// a model without FiLM.
    pub metadata: Option<Tensor>,
    /// `[N, C]` HeMIS availability per sample (1: the contrast was read, 0: a zero channel), the model's
    /// second input; `None` unless the sampling keeps subjects with a missing contrast.
    pub available: Option<Tensor>,
}

impl SliceSet {
    /// Loads every entry's axial slices through `pipeline`'s training-phase steps (run once: they must be
    /// deterministic).
    pub fn build(entries: &[BidsEntry], pipeline: &Pipeline, seed: u64) -> Result<Self> {
        Self::build_in(Phase::Training, entries, pipeline, seed)
    }

    /// [`SliceSet::build`] with the steps whose `dataset_type` includes `phase`.
    pub fn build_in(
        phase: Phase,
        entries: &[BidsEntry],
        pipeline: &Pipeline,
        seed: u64,
    ) -> Result<Self> {
        if entries.is_empty() {
            bail!("no images to load: the dataset split is empty");
        }
        let mut images = Vec::new();
        let mut labels = Vec::new();
        let mut volume_of_slice = Vec::new();
        let mut volumes = Vec::new();
        let mut spacing = Vec::new();
        for entry in entries {
            for (image, label, slice_spacing) in
                preprocess_entry(entry, pipeline, phase, seed, volumes.len())?
            {
                images.push(image);
                labels.push(label);
                spacing.push(slice_spacing);
                volume_of_slice.push(volumes.len());
            }
            volumes.push(entry.image.display().to_string());
        }
        Ok(Self {
            images: stack_samples(&images, "slices")?,
            labels: Tensor::stack(&labels, 0),
            volume_of_slice,
            volumes,
            spacing,
            metadata: None,
            available: None,
        })
    }

    /// Gives every slice its volume's FiLM vector: `per_volume[v]` for the slices of `volumes[v]`.
    pub fn set_metadata(&mut self, per_volume: &[Vec<f32>]) -> Result<()> {
        if per_volume.len() != self.volumes.len() {
            bail!(
                "{} metadata vectors for {} volumes",
                per_volume.len(),
                self.volumes.len()
            );
        }
        let width = per_volume.first().map_or(0, Vec::len);
        let flat: Vec<f32> = self
            .volume_of_slice
            .iter()
            .flat_map(|&v| per_volume[v].iter().copied())
            .collect();
        self.metadata = Some(Tensor::from_slice(&flat).reshape([self.len() as i64, width as i64]));
        Ok(())
    }

    /// The FiLM metadata of the slices `indices` (`[B, M]`) on `device`, when the set has any.
    pub fn metadata_batch(&self, indices: &[i64], device: Device) -> Option<Tensor> {
        self.metadata.as_ref().map(|metadata| {
            metadata
                .index_select(0, &Tensor::from_slice(indices))
                .to_device(device)
        })
    }

    /// The HeMIS availability of the samples `indices` (`[B, C]`) on `device`, when the set has it.
    pub fn available_batch(&self, indices: &[i64], device: Device) -> Option<Tensor> {
        self.available.as_ref().map(|available| {
            available
                .index_select(0, &Tensor::from_slice(indices))
                .to_device(device)
        })
    }

    /// Loads `entries` cut as `options` says: `images` `[N, C, ...]` and `labels` `[N, K, ...]` where `...` is
    /// (height, width) for the 2D modes and (X, Y, Z) for 3D subvolumes. Each window goes through `pipeline`'s
    /// `phase` steps. Plain axial slicing takes the [`SliceSet::build_in`] path.
    pub fn build_sampled(
        phase: Phase,
        entries: &[BidsEntry],
        pipeline: &Pipeline,
        seed: u64,
        options: &SamplingOptions,
    ) -> Result<Self> {
        if options.is_plain_axial(entries) {
            Self::build_in(phase, entries, pipeline, seed)
        } else {
            Self::build_windows(phase, entries, pipeline, seed, options)
        }
    }

    /// [`SliceSet::build_sampled`] always through channels.rs and sampling.rs (for any options).
    pub fn build_windows(
        phase: Phase,
        entries: &[BidsEntry],
        pipeline: &Pipeline,
        seed: u64,
        options: &SamplingOptions,
    ) -> Result<Self> {
        let training = phase == Phase::Training;
        let mut images = Vec::new();
        let mut labels = Vec::new();
        let mut volume_of_slice = Vec::new();
        let mut volumes = Vec::new();
        let mut spacing = Vec::new();
        let mut available: Vec<Tensor> = Vec::new();
        for group in window_groups(entries, options)? {
            let Some(loaded) = load_group(&group)? else {
                continue;
            };
            let windows = select(
                &options.mode,
                &loaded.input,
                Some(&loaded.target),
                loaded.roi.as_ref(),
                &options.filters,
                training,
            )?;
            let volume = volumes.len();
            for (index, window) in windows.iter().enumerate() {
                let (image, label, item_spacing) = window_item(
                    &loaded,
                    window,
                    pipeline,
                    phase,
                    window_seed(seed, volume, index),
                    options.soft_gt,
                    &group.entries[0],
                )?;
                images.push(image);
                labels.push(label);
                spacing.push(item_spacing);
                volume_of_slice.push(volume);
                available.push(loaded.missing_modalities.f_neg()?.f_add_scalar(1.0)?);
            }
            volumes.push(group.entries[0].image.display().to_string());
        }
        if images.is_empty() {
            bail!("no sample left to train on: every subject was skipped or every window filtered out");
        }
        Ok(Self {
            images: stack_samples(&images, "samples")?,
            labels: Tensor::stack(&labels, 0),
            volume_of_slice,
            volumes,
            spacing,
            metadata: None,
            available: (options.missing_contrast == MissingContrast::ZeroChannel)
                .then(|| Tensor::stack(&available, 0)),
        })
    }

    /// Another handle on the same slices (tensor storage is shared, not copied), for a loader worker:
    /// tensors are `Send` but not `Sync`, so each thread needs its own handles.
    pub fn share(&self) -> SliceSet {
        SliceSet {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            volume_of_slice: self.volume_of_slice.clone(),
            volumes: self.volumes.clone(),
            spacing: self.spacing.clone(),
            metadata: self.metadata.as_ref().map(Tensor::shallow_clone),
            available: self.available.as_ref().map(Tensor::shallow_clone),
        }
    }

    pub fn len(&self) -> usize {
        self.volume_of_slice.len()
    }

    pub fn is_empty(&self) -> bool {
        self.volume_of_slice.is_empty()
    }

    /// Slice indices in a seeded random order.
    pub fn shuffled(&self, seed: u64) -> Vec<i64> {
        let mut order: Vec<i64> = (0..self.len() as i64).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        order
    }

    /// Whether each slice's label has any foreground.
    pub fn positive(&self) -> Vec<bool> {
        let sums =
            self.labels
                .flatten(1, -1)
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
        Vec::<f32>::try_from(&sums)
            .unwrap_or_default()
            .into_iter()
            .map(|sum| sum > 0.0)
            .collect()
    }

    /// As many slice indices as the set holds, drawn with replacement so that slices with and without
    /// foreground come up equally often (ivadomed's balanced sampler). Falls back to a shuffle when one of the
    /// two kinds is absent.
    pub fn balanced(&self, seed: u64) -> Vec<i64> {
        use rand::Rng;
        let positive = self.positive();
        let (with, without): (Vec<i64>, Vec<i64>) =
            (0..self.len() as i64).partition(|&i| positive[i as usize]);
        if with.is_empty() || without.is_empty() {
            return self.shuffled(seed);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..self.len())
            .map(|_| {
                let pool = if rng.random_bool(0.5) {
                    &with
                } else {
                    &without
                };
                pool[rng.random_range(0..pool.len())]
            })
            .collect()
    }

    /// One batch through a random augmentation pipeline, on `device`. Each slice gets one draw, seeded by
    /// (run seed, epoch, slice index), applied to its image and label alike, so a batch is the same whatever
    /// else ran before it. Labels are binarised again after the spatial transforms.
    pub fn augmented_batch(
        &self,
        indices: &[i64],
        augment: &Pipeline,
        seed: u64,
        epoch: u64,
        device: Device,
    ) -> Result<(Tensor, Tensor)> {
        self.augmented_batch_as(indices, indices, augment, seed, epoch, device)
    }

    /// [`SliceSet::augmented_batch`] where slice `indices[i]` draws as sample `seed_ids[i]` of the epoch: a
    /// lazily loaded batch (whose slices are `0..B` of a small set) draws as the same samples of the whole set.
    pub fn augmented_batch_as(
        &self,
        indices: &[i64],
        seed_ids: &[i64],
        augment: &Pipeline,
        seed: u64,
        epoch: u64,
        device: Device,
    ) -> Result<(Tensor, Tensor)> {
        if seed_ids.len() != indices.len() {
            bail!(
                "{} seed ids for a batch of {} slices",
                seed_ids.len(),
                indices.len()
            );
        }
        let epoch_seed = derive_seed(seed, epoch);
        if indices.is_empty() {
            bail!("cannot augment an empty batch");
        }
        // The whole batch goes through each step at once (one plugin call per step); every slice still draws
        // only from its own seed.
        let index = Tensor::from_slice(indices);
        let mut batch = Batch {
            tensors: Default::default(),
            metas: Vec::with_capacity(indices.len()),
        };
        batch.insert("image", self.images.index_select(0, &index));
        batch.insert("label", self.labels.index_select(0, &index));
        for &slice in indices {
            let mut meta = Sample::new();
            meta.set_spacing(&self.spacing[slice as usize]);
            batch.metas.push(meta.meta);
        }
        let seeds: Vec<u64> = seed_ids
            .iter()
            .map(|&slice| derive_seed(epoch_seed, slice as u64))
            .collect();
        let (batch, _) = augment
            .apply_batch(Phase::Training, batch, &seeds)
            .with_context(|| {
                let mut volumes: Vec<&str> = indices
                    .iter()
                    .map(|&slice| self.volumes[self.volume_of_slice[slice as usize]].as_str())
                    .collect();
                volumes.dedup();
                format!("augmenting a batch of slices of {}", volumes.join(", "))
            })?;
        let images = batch.get("image")?;
        let labels = batch.get("label")?;
        // Inputs have C channels and targets K: each keeps its own shape.
        for (name, before, after) in [
            ("image", self.images.size(), images.size()),
            ("label", self.labels.size(), labels.size()),
        ] {
            if after[1..] != before[1..] {
                bail!(
                    "the augmentation pipeline changed {name} shapes ({:?} vs {:?}); spatial augmentations must keep the shape",
                    &before[1..],
                    &after[1..]
                );
            }
        }
        Ok((
            images.to_device(device),
            labels.ge(0.5).to_kind(Kind::Float).to_device(device),
        ))
    }

    /// One batch on `device`.
    pub fn batch(&self, indices: &[i64], device: Device) -> (Tensor, Tensor) {
        let index = Tensor::from_slice(indices);
        (
            self.images.index_select(0, &index).to_device(device),
            self.labels.index_select(0, &index).to_device(device),
        )
    }
}
