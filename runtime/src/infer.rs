//! Segmenting volumes with a model folder.
//!
//! A volume (one or more contrasts, channels first) is cut into tiles in its native canonical grid: 2D slices
//! along any axis, 2D patches within those slices, 3D subvolumes, or the whole volume ([`Sampling`], from the
//! model folder's `inference` section, overridable). Each tile goes through the model folder's preprocessing
//! (ivadomed transforms each slice or patch, not the volume), the network, and the preprocessing undone in
//! reverse order with the tile's records, which brings the prediction back to the tile's native shape. The
//! [`Stitcher`] then averages overlapping tiles (uniformly, as ivadomed, or with nnU-Net's Gaussian weights).
//!
//! Test-time augmentation (ivadomed's aleatoric uncertainty) runs the volume N times through the training
//! augmentations, each tile's draw undone before stitching; Monte-Carlo dropout (epistemic) runs it N times
//! with dropout on. The N stitched volumes are averaged, and the uncertainty maps of `uncertainty.rs` are
//! written with ivadomed's file names.
//!
//! [`segment_inputs`] segments many volumes: a reader thread loads the next volume while the current one
//! computes, and a writer thread post-processes and writes the previous one.
use crate::bids::{BidsIndex, BidsQuery};
use crate::channels::{FilmEncoder, MriParams};
use crate::model_folder::LoadedModel;
use crate::pipeline::{derive_seed, Phase, Pipeline};
use crate::precision::{autocast, inference_mode, Precision, PrecisionSource};
use crate::tiling::{SliceAxis, Stitcher, TileGrid, Weighting};
use crate::uncertainty;
use crate::volume::{read_volume, write_like, OutputType, Volume};
use anyhow::{anyhow, bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ivado_sdk::{Mode, Sample};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// How a volume is cut into the tiles the network sees.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// Whole 2D slices along `axis` (ivadomed's default, with `slice_axis`).
    Slices { axis: SliceAxis },
    /// 2D patches of `length` every `stride` pixels within each slice along `axis` (ivadomed's `length_2D`,
    /// `stride_2D`), as (height, width) of the slice oriented as in training ([`crate::sampling::plane_axes`]).
    Patches2d {
        axis: SliceAxis,
        length: [i64; 2],
        stride: [i64; 2],
    },
    /// 3D subvolumes (ivadomed's `length_3D`, `stride_3D`), in canonical [X, Y, Z] order.
    Subvolumes { length: [i64; 3], stride: [i64; 3] },
    /// The whole volume at once (a 3D model without subvolumes).
    Whole,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling::Slices {
            axis: SliceAxis::Axial,
        }
    }
}

/// The model folder key that records how the model was trained to see volumes.
pub const INFERENCE_SECTION: &str = "inference";

fn axis_name(axis: SliceAxis) -> &'static str {
    match axis {
        SliceAxis::Sagittal => "sagittal",
        SliceAxis::Coronal => "coronal",
        SliceAxis::Axial => "axial",
    }
}

fn parse_axis(value: &Value) -> Result<SliceAxis> {
    match value {
        Value::String(name) => SliceAxis::from_name(name),
        Value::Number(n) => SliceAxis::from_index(
            n.as_i64()
                .ok_or_else(|| anyhow!("slice_axis must be an integer, got {n}"))?,
        ),
        other => bail!("slice_axis must be a name or 0/1/2, got {other}"),
    }
}

fn int_list<const N: usize>(value: &Value, key: &str) -> Result<[i64; N]> {
    let items: Vec<i64> = value
        .as_array()
        .and_then(|items| items.iter().map(Value::as_i64).collect())
        .ok_or_else(|| anyhow!("`{key}` must be a list of {N} integers, got {value}"))?;
    items
        .try_into()
        .map_err(|items: Vec<i64>| anyhow!("`{key}` must have {N} entries, got {items:?}"))
}

impl Sampling {
    /// Reads the model folder's `inference` section (`slice_axis`, `length_2D`/`stride_2D`,
    /// `length_3D`/`stride_3D`, `whole_volume`, with ivadomed's key names). Without it: slices along the
    /// `data.slice_axis` training recorded, else axial, so older folders keep working.
    pub fn from_model(description: &Value) -> Result<Sampling> {
        let section = &description[INFERENCE_SECTION];
        let axis_value = if section.get("slice_axis").is_some() {
            &section["slice_axis"]
        } else {
            &description["data"]["slice_axis"]
        };
        let axis = if axis_value.is_null() {
            SliceAxis::Axial
        } else {
            parse_axis(axis_value).context("model folder `inference.slice_axis`")?
        };
        if section["whole_volume"].as_bool() == Some(true) {
            return Ok(Sampling::Whole);
        }
        if let Some(length) = section.get("length_3D").filter(|v| !v.is_null()) {
            let length = int_list::<3>(length, "length_3D")?;
            let stride = match section.get("stride_3D").filter(|v| !v.is_null()) {
                Some(stride) => int_list::<3>(stride, "stride_3D")?,
                None => length,
            };
            return Ok(Sampling::Subvolumes { length, stride });
        }
        if let Some(length) = section.get("length_2D").filter(|v| !v.is_null()) {
            let length = int_list::<2>(length, "length_2D")?;
            let stride = match section.get("stride_2D").filter(|v| !v.is_null()) {
                Some(stride) => int_list::<2>(stride, "stride_2D")?,
                None => length,
            };
            return Ok(Sampling::Patches2d {
                axis,
                length,
                stride,
            });
        }
        Ok(Sampling::Slices { axis })
    }

    /// The tiling that cuts the windows training cut with `mode` (what training records in the model folder's
    /// `inference` section).
    pub fn from_training(mode: &crate::sampling::SamplingMode) -> Sampling {
        use crate::sampling::SamplingMode;
        match mode {
            SamplingMode::Slices { axis } => Sampling::Slices { axis: *axis },
            SamplingMode::Patches2D {
                axis,
                length,
                stride,
            } => Sampling::Patches2d {
                axis: *axis,
                length: *length,
                stride: *stride,
            },
            SamplingMode::Subvolumes { length, stride } => Sampling::Subvolumes {
                length: *length,
                stride: *stride,
            },
            SamplingMode::Volume => Sampling::Whole,
        }
    }

    /// The `inference` section that [`Sampling::from_model`] reads back as `self`.
    pub fn to_section(&self) -> Value {
        match self {
            Sampling::Slices { axis } => serde_json::json!({"slice_axis": axis_name(*axis)}),
            Sampling::Patches2d {
                axis,
                length,
                stride,
            } => serde_json::json!({
                "slice_axis": axis_name(*axis), "length_2D": length, "stride_2D": stride
            }),
            Sampling::Subvolumes { length, stride } => {
                serde_json::json!({"length_3D": length, "stride_3D": stride})
            }
            Sampling::Whole => serde_json::json!({"whole_volume": true}),
        }
    }

    /// The slice axis of 2D sampling; `None` for 3D.
    pub fn slice_axis(&self) -> Option<SliceAxis> {
        match self {
            Sampling::Slices { axis } | Sampling::Patches2d { axis, .. } => Some(*axis),
            Sampling::Subvolumes { .. } | Sampling::Whole => None,
        }
    }

    /// The tile grid over a canonical [X, Y, Z] volume. 2D tiles are 1 voxel thick along the slice axis;
    /// 2D patch lengths are (height, width) of the oriented slice, as in training
    /// ([`crate::sampling::plane_axes`]).
    pub fn grid(&self, shape: [i64; 3]) -> Result<TileGrid> {
        let (tile, stride) = match self {
            Sampling::Slices { axis } => {
                let mut tile = shape;
                tile[axis.index() as usize] = 1;
                (tile, tile)
            }
            Sampling::Patches2d {
                axis,
                length,
                stride,
            } => {
                let mut tile = [1; 3];
                let mut step = [1; 3];
                for (k, a) in crate::sampling::plane_axes(*axis).into_iter().enumerate() {
                    tile[a] = length[k];
                    step[a] = stride[k];
                }
                (tile, step)
            }
            Sampling::Subvolumes { length, stride } => (*length, *stride),
            Sampling::Whole => (shape, shape),
        };
        TileGrid::new(&shape, &tile, &stride)
    }
}

/// Command-line / script overrides of the model folder's sampling.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingOverride {
    pub slice_axis: Option<SliceAxis>,
    /// 2 entries: 2D patches within slices; 3 entries: 3D subvolumes.
    pub patch: Option<Vec<i64>>,
    pub stride: Option<Vec<i64>>,
    pub whole_volume: bool,
}

impl SamplingOverride {
    /// `base` (the model folder's sampling) with the overrides applied. A stride without a patch changes the
    /// stride of the folder's patches; a patch without a stride tiles without overlap.
    pub fn apply(&self, base: &Sampling) -> Result<Sampling> {
        if self.whole_volume {
            return Ok(Sampling::Whole);
        }
        let axis = self
            .slice_axis
            .or(base.slice_axis())
            .unwrap_or(SliceAxis::Axial);
        let (length, stride): (Option<Vec<i64>>, Option<Vec<i64>>) = match (&self.patch, base) {
            (Some(patch), _) => (Some(patch.clone()), self.stride.clone()),
            (None, Sampling::Patches2d { length, stride, .. }) => (
                Some(length.to_vec()),
                Some(self.stride.clone().unwrap_or(stride.to_vec())),
            ),
            (None, Sampling::Subvolumes { length, stride }) if self.slice_axis.is_none() => (
                Some(length.to_vec()),
                Some(self.stride.clone().unwrap_or(stride.to_vec())),
            ),
            (None, _) => {
                ensure!(
                    self.stride.is_none(),
                    "--stride needs patches: give --patch, or use a model trained on patches"
                );
                if self.slice_axis.is_some() {
                    return Ok(Sampling::Slices { axis });
                }
                return Ok(base.clone());
            }
        };
        let length = length.unwrap_or_default();
        let stride = stride.unwrap_or_else(|| length.clone());
        ensure!(
            stride.len() == length.len(),
            "--stride {stride:?} must have as many entries as --patch {length:?}"
        );
        match length.len() {
            2 => Ok(Sampling::Patches2d {
                axis,
                length: [length[0], length[1]],
                stride: [stride[0], stride[1]],
            }),
            3 => {
                ensure!(
                    self.slice_axis.is_none(),
                    "--slice-axis applies to 2D models; 3D patches ({length:?}) have no slice axis"
                );
                Ok(Sampling::Subvolumes {
                    length: [length[0], length[1], length[2]],
                    stride: [stride[0], stride[1], stride[2]],
                })
            }
            n => bail!("--patch must have 2 (2D patches) or 3 (3D subvolumes) entries, got {n}"),
        }
    }
}

/// Parses `64,64` or `32x32x16` into integers.
pub fn parse_size_list(text: &str) -> Result<Vec<i64>> {
    text.split([',', 'x'])
        .map(|part| {
            part.trim()
                .parse::<i64>()
                .with_context(|| format!("`{text}`: `{part}` is not an integer"))
        })
        .collect()
}

/// Tiles per forward pass when none is asked for. On a CPU, small batches keep a layer's activations in
/// cache: `ivado bench segment`'s 2D U-Net on 64 slices of 256x256 took 5.3 s at batch 2 against 11.2 s at
/// 16 in bf16, and 19.5 s against 46 s in fp32 (2 threads; batch 1 was no faster than 2). A GPU wants larger
/// batches to fill its cores.
pub fn default_batch_size(device: Device) -> usize {
    match device {
        Device::Cpu => 2,
        _ => 16,
    }
}

/// How to segment.
#[derive(Clone, Debug)]
pub struct SegmentOptions {
    pub sampling: SamplingOverride,
    /// Gaussian (nnU-Net) instead of uniform (ivadomed) weighting of overlapping tiles.
    pub gaussian: bool,
    pub batch_size: usize,
    pub device: Device,
    /// The forward's precision; `None` (`auto`): the model folder's `inference.precision`, else bf16 where
    /// the device computes bf16 natively, else fp32 ([`crate::precision::resolve`]).
    pub precision: Option<Precision>,
    /// Keep the stitching buffers in host memory (each batch's output is copied back).
    pub stitch_on_cpu: bool,
    /// Test-time augmentation passes (0: none).
    pub tta: usize,
    /// Monte-Carlo dropout passes (0: none).
    pub mc_dropout: usize,
    /// Seed of the augmentation draws.
    pub seed: u64,
    /// Binarisation threshold of the written masks and of the uncertainty structures.
    pub threshold: f64,
    /// Also write the soft prediction (`_soft`).
    pub soft: bool,
    /// With TTA or MC dropout, write only the averaged mask: test-time augmentation for accuracy (as
    /// nnU-Net's mirroring), without ivadomed's `_soft` and `_unc-*` maps.
    pub no_uncertainty_maps: bool,
    /// FiLM metadata given on the command line, over the image's sidecar.
    pub metadata: BTreeMap<String, Value>,
    pub progress: bool,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingOverride::default(),
            gaussian: false,
            batch_size: default_batch_size(Device::Cpu),
            device: Device::Cpu,
            precision: None,
            stitch_on_cpu: false,
            tta: 0,
            mc_dropout: 0,
            seed: 0,
            threshold: 0.5,
            soft: false,
            no_uncertainty_maps: false,
            metadata: BTreeMap::new(),
            progress: false,
        }
    }
}

impl SegmentOptions {
    /// Number of passes over each volume: ivadomed runs one `n_it` for both kinds of uncertainty.
    pub fn passes(&self) -> Result<usize> {
        if self.tta > 0 && self.mc_dropout > 0 && self.tta != self.mc_dropout {
            bail!(
                "--tta {} and --mc-dropout {} differ: both run in the same passes (ivadomed's single n_it), give the same N",
                self.tta,
                self.mc_dropout
            );
        }
        Ok(self.tta.max(self.mc_dropout).max(1))
    }

    /// Whether the uncertainty maps are computed and written.
    pub fn uncertainty(&self) -> bool {
        (self.tta > 0 || self.mc_dropout > 0) && !self.no_uncertainty_maps
    }
}

/// The options a script passes as a map (`#{ out: "preds", tta: 4, patch: [64, 64], ... }`), with the
/// command line's names in snake case; unknown keys are refused. Returns the options and the output target
/// (`out`: a folder, or a mask file for one volume; default the current folder).
pub fn options_from_json(value: &Value, device: Device) -> Result<(SegmentOptions, OutputTarget)> {
    const KEYS: [&str; 17] = [
        "out",
        "threshold",
        "soft",
        "no_uncertainty_maps",
        "slice_axis",
        "patch",
        "stride",
        "whole_volume",
        "gaussian",
        "batch_size",
        "precision",
        "stitch_on_cpu",
        "tta",
        "mc_dropout",
        "seed",
        "metadata",
        "progress",
    ];
    let map = value
        .as_object()
        .ok_or_else(|| anyhow!("segment options must be a map, got {value}"))?;
    if let Some(unknown) = map.keys().find(|k| !KEYS.contains(&k.as_str())) {
        bail!(
            "segment: unknown option `{unknown}` (known: {})",
            KEYS.join(", ")
        );
    }
    let count = |key: &str, default: usize| -> Result<usize> {
        match map.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| anyhow!("segment: `{key}` must be a non-negative integer, got {v}")),
        }
    };
    let flag = |key: &str| -> Result<bool> {
        match map.get(key) {
            None => Ok(false),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| anyhow!("segment: `{key}` must be true or false, got {v}")),
        }
    };
    let sizes = |key: &str| -> Result<Option<Vec<i64>>> {
        match map.get(key) {
            None => Ok(None),
            Some(Value::String(text)) => parse_size_list(text).map(Some),
            Some(v) => v
                .as_array()
                .and_then(|items| items.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
                .map(Some)
                .ok_or_else(|| anyhow!("segment: `{key}` must be a list of integers, got {v}")),
        }
    };
    let precision = match map.get("precision") {
        None => None,
        Some(v) => Precision::parse_request(
            v.as_str()
                .ok_or_else(|| anyhow!("segment: `precision` must be a string"))?,
        )?,
    };
    if let Some(precision) = precision {
        precision.check(device)?;
    }
    let slice_axis = match map.get("slice_axis") {
        None => None,
        Some(v) => Some(parse_axis(v)?),
    };
    let metadata = match map.get("metadata") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => m.clone().into_iter().collect(),
        Some(v) => bail!("segment: `metadata` must be a map, got {v}"),
    };
    let options = SegmentOptions {
        sampling: SamplingOverride {
            slice_axis,
            patch: sizes("patch")?,
            stride: sizes("stride")?,
            whole_volume: flag("whole_volume")?,
        },
        gaussian: flag("gaussian")?,
        batch_size: count("batch_size", default_batch_size(device))?,
        device,
        precision,
        stitch_on_cpu: flag("stitch_on_cpu")?,
        tta: count("tta", 0)?,
        mc_dropout: count("mc_dropout", 0)?,
        seed: count("seed", 0)? as u64,
        threshold: map.get("threshold").and_then(Value::as_f64).unwrap_or(0.5),
        soft: flag("soft")?,
        no_uncertainty_maps: flag("no_uncertainty_maps")?,
        metadata,
        progress: flag("progress")?,
    };
    let out = map.get("out").and_then(Value::as_str).unwrap_or(".");
    Ok((options, OutputTarget::from_path(Path::new(out))))
}

/// Turns a libtorch out-of-memory error into a message that names the knobs that lower memory use.
pub fn explain_out_of_memory(error: anyhow::Error, options: &SegmentOptions) -> anyhow::Error {
    let text = format!("{error:#}");
    if !text.to_lowercase().contains("out of memory") {
        return error;
    }
    anyhow!(
        "out of memory on {:?}: lower --batch-size (now {}), use smaller tiles with --patch/--stride, or \
         --stitch-on-cpu to keep the stitched volume in host memory{}\n  cause: {text}",
        options.device,
        options.batch_size,
        if options.device.is_cuda() {
            ""
        } else {
            " (or free host memory)"
        }
    )
}

pub use crate::channels::METADATA_ENCODER_SECTION;

/// Whether the model takes FiLM metadata as its second input.
pub fn is_film(loaded: &LoadedModel) -> bool {
    crate::channels::takes_film_metadata(&loaded.model.architecture, &loaded.model.config)
}

/// Number of input channels the model expects (`in_channels`, or 1, ivadomed's default).
pub fn input_channels(loaded: &LoadedModel) -> i64 {
    if let Some(contrasts) = hemis_contrasts(loaded) {
        return contrasts.len() as i64;
    }
    ["in_channels", "in_channel"]
        .iter()
        .find_map(|key| loaded.model.config[key].as_i64())
        .unwrap_or(1)
}

/// The contrasts of a HeMIS model, in its channel order; `None` for other models.
pub fn hemis_contrasts(loaded: &LoadedModel) -> Option<Vec<String>> {
    crate::channels::hemis_contrasts(&loaded.model.architecture, &loaded.model.config)
}

/// An image's contrast: the BIDS suffix of its file name (`sub-01_T2w.nii.gz` is T2w).
fn contrast_of(path: &Path) -> String {
    let stem = crate::cascade::image_stem(path);
    stem.rsplit('_').next().unwrap_or(&stem).to_owned()
}

/// A HeMIS model takes any subset of its contrasts: each image goes to the channel of its contrast (its
/// file name's BIDS suffix), the others get a zero channel and a 0 in the availability mask. Returns the
/// `[C, X, Y, Z]` input and the `[C]` mask, or `None` for other models.
fn hemis_channels(loaded: &LoadedModel, volume: &LoadedVolume) -> Result<Option<(Tensor, Tensor)>> {
    let Some(contrasts) = hemis_contrasts(loaded) else {
        return Ok(None);
    };
    let mut slots: Vec<Option<Tensor>> = contrasts.iter().map(|_| None).collect();
    for (index, path) in volume.input.channels.iter().enumerate() {
        let contrast = contrast_of(path);
        let Some(slot) = contrasts.iter().position(|c| *c == contrast) else {
            bail!(
                "{}: contrast {contrast:?} is not one of the model's contrasts {contrasts:?} (the contrast \
                 is the file name's last `_` part, e.g. sub-01_T2w.nii.gz)",
                path.display()
            );
        };
        ensure!(
            slots[slot].is_none(),
            "two images of contrast {contrast} in one volume: {:?}",
            volume.input.channels
        );
        slots[slot] = Some(volume.image.f_get(index as i64)?);
    }
    let zeros = volume.image.f_get(0)?.f_zeros_like()?;
    let names = |present: bool| {
        contrasts
            .iter()
            .zip(&slots)
            .filter(|(_, slot)| slot.is_some() == present)
            .map(|(c, _)| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (used, missing) = (names(true), names(false));
    tracing::info!(
        "{}: HeMIS contrasts used: {used}; missing (zero channel): {}",
        volume.input.stem(),
        if missing.is_empty() { "none" } else { &missing }
    );
    let mask: Vec<f32> = slots
        .iter()
        .map(|s| f32::from(u8::from(s.is_some())))
        .collect();
    let channels: Vec<Tensor> = slots
        .into_iter()
        .map(|slot| slot.unwrap_or_else(|| zeros.shallow_clone()))
        .collect();
    Ok(Some((
        Tensor::f_stack(&channels, 0)?,
        Tensor::from_slice(&mask),
    )))
}

/// Reads `key=value` pairs (values parsed as JSON when they are, else kept as strings).
pub fn parse_metadata(pairs: &[String]) -> Result<BTreeMap<String, Value>> {
    pairs
        .iter()
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("--metadata `{pair}` must be KEY=VALUE"))?;
            let value = serde_json::from_str(value).unwrap_or(Value::String(value.to_owned()));
            Ok((key.to_owned(), value))
        })
        .collect()
}

/// One volume to segment: one image per channel, in the model's channel order.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeInput {
    pub channels: Vec<PathBuf>,
}

impl VolumeInput {
    /// The output name stem: the first channel's file name without `.nii[.gz]`.
    pub fn stem(&self) -> String {
        crate::cascade::image_stem(&self.channels[0])
    }
}

/// A volume read and checked: the first channel's header and geometry, and every channel stacked.
pub struct LoadedVolume {
    pub input: VolumeInput,
    pub source: Volume,
    /// [C, X, Y, Z] canonical, CPU f32.
    pub image: Tensor,
    /// The first channel's JSON sidecar, if any (FiLM metadata).
    pub sidecar: BTreeMap<String, Value>,
}

/// Largest affine difference (mm) tolerated between the channels of one volume.
const CHANNEL_AFFINE_TOLERANCE_MM: f64 = 1e-3;

/// Reads every channel of `input` and checks they share one voxel grid.
pub fn load_volume(input: &VolumeInput) -> Result<LoadedVolume> {
    ensure!(
        !input.channels.is_empty(),
        "a volume needs at least one image"
    );
    let source = read_volume(&input.channels[0])?;
    let mut data = vec![source.data.shallow_clone()];
    for path in &input.channels[1..] {
        let other = read_volume(path)?;
        ensure!(
            other.data.size() == source.data.size(),
            "channel {} has shape {:?} but {} has {:?}: the contrasts of one volume must share a grid",
            path.display(),
            other.reorientation.file_shape,
            source.path.display(),
            source.reorientation.file_shape
        );
        let worst = source
            .affine
            .iter()
            .flatten()
            .zip(other.affine.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        ensure!(
            worst <= CHANNEL_AFFINE_TOLERANCE_MM,
            "channel {} and {} have different affines (largest difference {worst:.4} mm): register them first",
            path.display(),
            source.path.display()
        );
        data.push(other.data);
    }
    let sidecar_path = {
        let stem = input.stem();
        input.channels[0].with_file_name(format!("{stem}.json"))
    };
    let sidecar = match std::fs::read_to_string(&sidecar_path) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => map.into_iter().collect(),
            _ => bail!("{}: not a JSON object", sidecar_path.display()),
        },
        Err(_) => BTreeMap::new(),
    };
    Ok(LoadedVolume {
        input: input.clone(),
        image: Tensor::stack(&data, 0),
        source,
        sidecar,
    })
}

/// What a volume's segmentation produced, in the source's canonical grid.
pub struct Segmentation {
    /// Mean soft prediction: `[X, Y, Z]` for one class, `[K, X, Y, Z]` for K.
    pub soft: Tensor,
    /// The N passes (TTA / MC dropout), same shapes as `soft`; one entry without uncertainty.
    pub samples: Vec<Tensor>,
    /// Where the compute time went, summed over the passes.
    pub times: StageTimes,
    /// The precision the forward ran in.
    pub precision: Precision,
}

/// Wall time of the compute stages of one volume's segmentation, summed over its passes.
#[derive(Clone, Copy, Debug, Default)]
pub struct StageTimes {
    /// Cutting tiles and running the preprocessing on each.
    pub preprocess: Duration,
    /// Stacking batches, the network, and the output back to f32.
    pub forward: Duration,
    /// Undoing the preprocessing on each predicted tile and adding it to the stitched volume.
    pub undo_stitch: Duration,
    /// Averaging the stitched volume, the passes, and copying the result out.
    pub finish: Duration,
}

impl StageTimes {
    pub fn add(&mut self, other: &StageTimes) {
        self.preprocess += other.preprocess;
        self.forward += other.forward;
        self.undo_stitch += other.undo_stitch;
        self.finish += other.finish;
    }
}

/// The model folder's pinned forward precision (`inference.precision`), if any.
pub fn pinned_precision(description: &Value) -> Result<Option<Precision>> {
    match &description[INFERENCE_SECTION]["precision"] {
        Value::Null => Ok(None),
        Value::String(text) => Precision::parse(text)
            .map(Some)
            .context("model folder `inference.precision`"),
        other => {
            bail!("model folder `inference.precision` must be fp32, bf16 or fp16, got {other}")
        }
    }
}

/// The precision `options` run `loaded` in, and why.
pub fn resolve_precision(
    loaded: &LoadedModel,
    options: &SegmentOptions,
) -> Result<(Precision, PrecisionSource)> {
    crate::precision::resolve(
        options.precision,
        pinned_precision(&loaded.description)?,
        options.device,
    )
}

/// The tiling `options` cut volumes with for `loaded`.
pub fn resolve_sampling(loaded: &LoadedModel, options: &SegmentOptions) -> Result<Sampling> {
    options
        .sampling
        .apply(&Sampling::from_model(&loaded.description)?)
}

/// One line for the log: the tiling and the precision, and where the precision came from.
pub fn describe_plan(loaded: &LoadedModel, options: &SegmentOptions) -> Result<String> {
    let sampling = resolve_sampling(loaded, options)?;
    let (precision, source) = resolve_precision(loaded, options)?;
    let why = match source {
        PrecisionSource::Requested => "requested",
        PrecisionSource::ModelFolder => "pinned by the model folder",
        PrecisionSource::Hardware if precision == Precision::Bf16 => {
            "auto: native bf16 on this device"
        }
        PrecisionSource::Hardware => "auto: no native bf16 on this device",
    };
    Ok(format!(
        "tiling {}, precision {} ({why})",
        sampling.to_section(),
        precision.name()
    ))
}

/// The pipeline test-time augmentation applies: every step that runs in training (ivadomed applies its
/// training transforms for aleatoric uncertainty) or in testing, set to run at inference.
pub fn tta_pipeline(pipeline: &Pipeline) -> Pipeline {
    let mut tta = pipeline.clone();
    for step in tta.steps.iter_mut() {
        let runs = step.options.runs_in(Phase::Training) || step.options.runs_in(Phase::Testing);
        step.options.dataset_type = vec![if runs {
            Phase::Testing
        } else {
            Phase::Validation
        }];
    }
    tta
}

/// The spacing a tile's sample carries: the in-plane spacings for 2D, all three for 3D.
fn tile_spacing(spacing: &[f64; 3], axis: Option<SliceAxis>) -> Vec<f64> {
    match axis {
        Some(axis) => (0..3)
            .filter(|&a| a != axis.index() as usize)
            .map(|a| spacing[a])
            .collect(),
        None => spacing.to_vec(),
    }
}

/// A tile through the preprocessing, waiting for the network.
struct PendingTile {
    index: usize,
    image: Tensor,
    meta: serde_json::Map<String, Value>,
    records: crate::pipeline::UndoRecords,
}

/// One pass over a volume: every tile preprocessed, predicted, undone and stitched.
struct Pass<'a> {
    loaded: &'a LoadedModel,
    pipeline: &'a Pipeline,
    grid: &'a TileGrid,
    axis: Option<SliceAxis>,
    spacing: Vec<f64>,
    metadata: Option<&'a Tensor>,
    options: &'a SegmentOptions,
    precision: Precision,
    /// Feed the network channels-last batches (its weights were converted too).
    channels_last: bool,
    mode: Mode,
    seed: u64,
    stitcher: Option<Stitcher>,
    progress: &'a ProgressBar,
    times: StageTimes,
}

/// Whether 2D tiles along `axis` are transposed to training's (height, width) orientation: after dropping
/// the slice axis the in-plane axes are in increasing order, training puts [`crate::sampling::plane_axes`]
/// first.
fn transposed(axis: SliceAxis) -> bool {
    let [height, width] = crate::sampling::plane_axes(axis);
    height > width
}

impl Pass<'_> {
    /// The stitched volume `[K, X, Y, Z]` and the time each stage took.
    fn run(mut self, volume: &Tensor) -> Result<(Tensor, StageTimes)> {
        let started = Instant::now();
        let tiles = self.grid.extract(volume)?;
        self.times.preprocess += started.elapsed();
        let batch_size = self.options.batch_size.max(1);
        let mut pending: Vec<PendingTile> = Vec::with_capacity(batch_size);
        for (index, tile) in tiles.iter().enumerate() {
            let started = Instant::now();
            let tile = match self.axis {
                Some(axis) if transposed(axis) => tile.select(1 + axis.index(), 0).transpose(1, 2),
                Some(axis) => tile.select(1 + axis.index(), 0),
                None => tile.shallow_clone(),
            };
            let mut sample = Sample::new();
            sample.insert("image", tile.contiguous());
            sample.set_spacing(&self.spacing);
            let (sample, records) = self
                .pipeline
                .apply_in(Phase::Testing, sample, derive_seed(self.seed, index as u64))
                .with_context(|| format!("preprocessing tile {index}"))?;
            let image = sample.get("image")?.shallow_clone();
            self.times.preprocess += started.elapsed();
            if pending
                .first()
                .is_some_and(|first| first.image.size() != image.size())
            {
                self.flush(&mut pending)?;
            }
            pending.push(PendingTile {
                index,
                image,
                meta: sample.meta,
                records,
            });
            if pending.len() == batch_size {
                self.flush(&mut pending)?;
            }
        }
        self.flush(&mut pending)?;
        let started = Instant::now();
        let stitcher = self.stitcher.context("the volume has no tiles")?;
        let stitched = stitcher.finish()?;
        self.times.finish += started.elapsed();
        Ok((stitched, self.times))
    }

    fn flush(&mut self, pending: &mut Vec<PendingTile>) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let device = self.options.device;
        let images: Vec<&Tensor> = pending.iter().map(|p| &p.image).collect();
        let batch = Tensor::f_stack(&images, 0)?.f_to_device(device)?;
        let batch = if self.channels_last {
            crate::precision::channels_last(&batch)?
        } else {
            batch
        };
        let count = pending.len() as i64;
        let metadata = match self.metadata {
            Some(vector) => Some(
                vector
                    .f_unsqueeze(0)?
                    .f_expand([count, vector.size()[0]], false)?
                    .f_to_device(device)?,
            ),
            None => None,
        };
        let mut inputs = vec![&batch];
        if let Some(metadata) = &metadata {
            inputs.push(metadata);
        }
        let (model, mode, precision) = (&self.loaded.model, self.mode, self.precision);
        let output = autocast(precision, device, || model.forward(&inputs, mode))?;
        let output = output.f_to_kind(Kind::Float)?;
        let output = if self.options.stitch_on_cpu {
            output.f_to_device(Device::Cpu)?
        } else {
            output
        };
        ensure!(
            output.size().first() == Some(&count),
            "the model returned {:?} for a batch of {count}",
            output.size()
        );
        self.times.forward += started.elapsed();
        let started = Instant::now();
        for (b, tile) in pending.drain(..).enumerate() {
            let mut sample = Sample {
                tensors: Default::default(),
                meta: tile.meta,
            };
            sample.insert("prediction", output.f_get(b as i64)?);
            let restored = self
                .pipeline
                .undo(sample, &tile.records)
                .with_context(|| format!("undoing the preprocessing on tile {}", tile.index))?;
            let prediction = restored.get("prediction")?.shallow_clone();
            let prediction = match self.axis {
                Some(axis) if transposed(axis) => prediction
                    .f_transpose(1, 2)?
                    .f_unsqueeze(1 + axis.index())?,
                Some(axis) => prediction.f_unsqueeze(1 + axis.index())?,
                None => prediction,
            };
            if self.stitcher.is_none() {
                let weighting = if self.options.gaussian {
                    Weighting::gaussian()
                } else {
                    Weighting::Uniform
                };
                self.stitcher = Some(Stitcher::new(self.grid, prediction.size()[0], weighting)?);
            }
            if let Some(stitcher) = self.stitcher.as_mut() {
                stitcher.add(tile.index, &prediction).with_context(|| {
                    format!(
                        "tile {}: the prediction after undoing the preprocessing does not fit the tile",
                        tile.index
                    )
                })?;
            }
            self.progress.inc(1);
        }
        self.times.undo_stitch += started.elapsed();
        Ok(())
    }
}

/// A progress bar for one volume (hidden unless `show`).
pub fn volume_progress(show: bool, total: u64, name: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} tiles {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(name.to_owned());
    bar
}

/// The FiLM input vector of an image: its sidecar with `overrides` (`--metadata key=value`) on top, read as
/// ivadomed's mri_params and encoded with the training set's encoder. A missing key names the way to give it.
pub fn encode_metadata(
    encoder: &FilmEncoder,
    sidecar: &BTreeMap<String, Value>,
    overrides: &BTreeMap<String, Value>,
) -> Result<Vec<f32>> {
    let mut metadata = sidecar.clone();
    metadata.extend(overrides.clone());
    let params = MriParams::from_json_map(&metadata, "the image").map_err(|e| {
        anyhow!("{e:#} (give it in the image's JSON sidecar or with --metadata KEY=VALUE)")
    })?;
    Ok(encoder.encode(&params))
}

/// The FiLM metadata vector for `volume`, or `None` for a model without FiLM.
fn metadata_vector(
    loaded: &LoadedModel,
    volume: &LoadedVolume,
    options: &SegmentOptions,
) -> Result<Option<Tensor>> {
    if !is_film(loaded) {
        return Ok(None);
    }
    let section = &loaded.description[METADATA_ENCODER_SECTION];
    if section.is_null() {
        bail!(
            "this is a FiLM model but its folder has no `{METADATA_ENCODER_SECTION}`: it cannot turn image \
             metadata into the network's input; re-save the model with the encoder used in training"
        );
    }
    let encoder = FilmEncoder::from_json(section)
        .with_context(|| format!("the model folder's `{METADATA_ENCODER_SECTION}`"))?;
    let encoded = encode_metadata(&encoder, &volume.sidecar, &options.metadata)
        .with_context(|| format!("encoding the metadata of {}", volume.source.path.display()))?;
    if let Some(expected) = loaded.model.config["n_metadata"].as_i64() {
        ensure!(
            encoded.len() as i64 == expected,
            "the metadata encoder gives {} values but the model takes n_metadata = {expected}",
            encoded.len()
        );
    }
    Ok(Some(Tensor::from_slice(&encoded)))
}

/// Segments a loaded volume: all passes, stitched and averaged, in the source's canonical grid.
pub fn segment_loaded(
    loaded: &LoadedModel,
    volume: &LoadedVolume,
    options: &SegmentOptions,
) -> Result<Segmentation> {
    crate::allocator::for_networks();
    // A HeMIS model's channels follow its contrasts, and its mask takes the metadata's place.
    let hemis = hemis_channels(loaded, volume)?;
    let input = hemis.as_ref().map_or(&volume.image, |(image, _)| image);
    let channels = input.size()[0];
    let expected = input_channels(loaded);
    ensure!(
        channels == expected,
        "{}: {channels} channel(s) given but the model takes {expected}; give one image per contrast, \
         comma-separated or with repeated --channel, in the training order",
        volume.source.path.display()
    );
    let passes = options.passes()?;
    let sampling = resolve_sampling(loaded, options)?;
    let (precision, _) = resolve_precision(loaded, options)?;
    // oneDNN's bf16 convolutions are fast on channels-last data only (measured: plain-layout bf16 is no
    // faster than fp32 for the 2D U-Net); fp32 gains nothing from it. The weights convert in place (same
    // values), once: converting already channels-last weights copies nothing.
    let channels_last = precision == Precision::Bf16 && options.device == Device::Cpu;
    if channels_last {
        crate::precision::to_channels_last(&loaded.model.parameters)?;
    }
    let shape = volume.source.data.size();
    let grid = sampling.grid([shape[0], shape[1], shape[2]])?;
    let axis = sampling.slice_axis();
    let metadata = match hemis.as_ref() {
        Some((_, mask)) => Some(mask.shallow_clone()),
        None => metadata_vector(loaded, volume, options)?,
    };
    let pipeline = if options.tta > 0 {
        tta_pipeline(&loaded.pipeline)
    } else {
        loaded.pipeline.clone()
    };
    let mode = if options.mc_dropout > 0 {
        Mode::McDropout
    } else {
        Mode::Eval
    };
    let keep_on_device = options.device.is_cuda() && !options.stitch_on_cpu;
    let image = if keep_on_device {
        input.to_device(options.device)
    } else {
        input.shallow_clone()
    };
    let progress = volume_progress(
        options.progress,
        (grid.len() * passes) as u64,
        &volume.input.stem(),
    );
    let mut samples = Vec::with_capacity(passes);
    let mut times = StageTimes::default();
    for pass in 0..passes {
        let pass_run = Pass {
            loaded,
            pipeline: &pipeline,
            grid: &grid,
            axis,
            spacing: tile_spacing(&volume.source.spacing, axis),
            metadata: metadata.as_ref(),
            options,
            precision,
            channels_last,
            mode,
            seed: derive_seed(options.seed, pass as u64),
            stitcher: None,
            progress: &progress,
            times: StageTimes::default(),
        };
        // The whole pass (preprocessing, forward, undo, stitching) records no autograd state.
        let (stitched, pass_times) = inference_mode(|| pass_run.run(&image))
            .map_err(|e| explain_out_of_memory(e, options))
        .with_context(|| {
            let what = if options.tta > 0 {
                " (test-time augmentation: every spatial training augmentation must be undoable)"
            } else {
                ""
            };
            format!(
                "segmenting {} (pass {} of {passes}){what}",
                volume.source.path.display(),
                pass + 1
            )
        })?;
        times.add(&pass_times);
        let started = Instant::now();
        // An ordinary tensor again (inference tensors cannot be modified in place, which post-processing
        // may do); on the CPU `to_device` is a no-op, so this copy is the only one.
        let stitched = stitched.f_to_device(Device::Cpu)?.copy();
        samples.push(if stitched.size()[0] == 1 {
            stitched.squeeze_dim(0)
        } else {
            stitched
        });
        times.finish += started.elapsed();
    }
    progress.finish_and_clear();
    let started = Instant::now();
    let soft = if samples.len() == 1 {
        samples[0].shallow_clone()
    } else {
        Tensor::stack(&samples, 0).mean_dim(0, false, Kind::Float)
    };
    times.finish += started.elapsed();
    Ok(Segmentation {
        soft,
        samples,
        times,
        precision,
    })
}

/// Soft prediction for `image_path` in the source's canonical grid: `[X, Y, Z]` for one class, `[K, X, Y, Z]`
/// for K classes; sampling as the model folder says.
pub fn segment_volume(
    loaded: &LoadedModel,
    image_path: &Path,
    device: Device,
    batch_size: usize,
) -> Result<(Volume, Tensor)> {
    let volume = load_volume(&VolumeInput {
        channels: vec![image_path.to_owned()],
    })?;
    let options = SegmentOptions {
        device,
        batch_size,
        ..SegmentOptions::default()
    };
    let segmentation = segment_loaded(loaded, &volume, &options)?;
    Ok((volume.source, segmentation.soft))
}

/// Applies the model folder's post-processing steps, in order, to a soft prediction in the source's grid
/// (`[X, Y, Z]` or `[K, X, Y, Z]`), with the source's voxel spacing (for thresholds in mm³).
pub fn postprocess(loaded: &LoadedModel, source: &Volume, soft: &Tensor) -> Result<Tensor> {
    postprocess_with_maps(&loaded.postprocess, source, soft, &[])
}

/// [`postprocess`] with named companion maps in the sample (`unc-vox`, `unc-iou`, `unc-cv`, `unc-avgUnc`,
/// `soft`: the names the `uncertainty` post-processing step looks up), shaped like `soft`.
pub fn postprocess_with_maps(
    steps: &Pipeline,
    source: &Volume,
    soft: &Tensor,
    maps: &[(String, Tensor)],
) -> Result<Tensor> {
    if steps.is_empty() {
        return Ok(soft.shallow_clone());
    }
    let single = soft.dim() == 3;
    let lift = |t: &Tensor| {
        if single {
            t.unsqueeze(0)
        } else {
            t.shallow_clone()
        }
    };
    let mut sample = Sample::new();
    sample.insert("prediction", lift(soft));
    for (name, map) in maps {
        sample.insert(name.clone(), lift(map));
    }
    sample.set_spacing(&source.spacing);
    let (sample, _) = steps.apply_in(Phase::Testing, sample, 0).with_context(|| {
        format!(
            "post-processing the prediction of {}",
            source.path.display()
        )
    })?;
    let prediction = sample.get("prediction")?.shallow_clone();
    Ok(if single {
        prediction.squeeze_dim(0)
    } else {
        prediction
    })
}

/// Writes a binary mask (`soft >= threshold`) with the source's header and affine, so it overlays the source in
/// any viewer. Multi-class predictions are written one file per class (`_class-<k>` before the extension).
pub fn write_segmentation(
    source: &Volume,
    soft: &Tensor,
    out: &Path,
    threshold: f64,
) -> Result<Vec<PathBuf>> {
    let binary = soft.ge(threshold).to_kind(Kind::Float);
    if binary.dim() == 3 {
        write_like(source, &binary, out, OutputType::U8)?;
        return Ok(vec![out.to_owned()]);
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, extension) = name.split_once('.').unwrap_or((&name, "nii.gz"));
    let mut written = Vec::new();
    for class in 0..binary.size()[0] {
        let path = out.with_file_name(format!("{stem}_class-{class}.{extension}"));
        write_like(source, &binary.get(class), &path, OutputType::U8)?;
        written.push(path);
    }
    Ok(written)
}

/// Where a volume's outputs go.
#[derive(Clone, Debug, PartialEq)]
pub enum OutputTarget {
    /// `<dir>/<stem>_pred.nii.gz` (and `_soft`, `_unc-*` beside it).
    Folder(PathBuf),
    /// This exact mask path (one volume); other outputs take its stem without `_pred`.
    File(PathBuf),
}

impl OutputTarget {
    /// A path ending in `.nii`/`.nii.gz` is a file, anything else a folder.
    pub fn from_path(path: &Path) -> Self {
        let name = path.to_string_lossy();
        if name.ends_with(".nii.gz") || name.ends_with(".nii") {
            OutputTarget::File(path.to_owned())
        } else {
            OutputTarget::Folder(path.to_owned())
        }
    }

    /// (folder, prefix): outputs are `<folder>/<prefix><suffix>.nii.gz`.
    fn prefix(&self, input: &VolumeInput) -> (PathBuf, String) {
        match self {
            OutputTarget::Folder(dir) => (dir.clone(), input.stem()),
            OutputTarget::File(path) => {
                let stem = crate::cascade::image_stem(path);
                let stem = stem.strip_suffix("_pred").unwrap_or(&stem).to_owned();
                let dir = path
                    .parent()
                    .map(Path::to_path_buf)
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or_else(|| PathBuf::from("."));
                (dir, stem)
            }
        }
    }
}

/// Writes one map per class: `<prefix><suffix>.nii.gz` for one class, `<prefix>_class-<k><suffix>.nii.gz`
/// for K (ivadomed's `segment` names: subject, `_class-<k>`, then the suffix).
/// The files of `map` (`[X, Y, Z]`, or `[K, X, Y, Z]`: one file per class), named
/// `<prefix><suffix>.nii.gz` or `<prefix>_class-<k><suffix>.nii.gz`.
fn per_class_files(
    map: &Tensor,
    dir: &Path,
    prefix: &str,
    suffix: &str,
    kind: OutputType,
) -> Vec<(Tensor, PathBuf, OutputType)> {
    if map.dim() == 3 {
        return vec![(
            map.shallow_clone(),
            dir.join(format!("{prefix}{suffix}.nii.gz")),
            kind,
        )];
    }
    (0..map.size()[0])
        .map(|class| {
            let path = dir.join(format!("{prefix}_class-{class}{suffix}.nii.gz"));
            (map.get(class), path, kind)
        })
        .collect()
}

/// Post-processes and writes one volume's outputs: the mask (`_pred`, or the exact file asked for), the soft
/// map with `soft` or uncertainty (`_soft`), and with TTA/MC the uncertainty maps (`_unc-vox`, `_unc-iou`,
/// `_unc-cv`, `_unc-avgUnc`), which the post-processing's `uncertainty` step can threshold by.
pub fn write_outputs(
    postprocess_steps: &Pipeline,
    source: &Volume,
    input: &VolumeInput,
    segmentation: &Segmentation,
    target: &OutputTarget,
    options: &SegmentOptions,
) -> Result<Vec<PathBuf>> {
    let (dir, prefix) = target.prefix(input);
    let mut written = Vec::new();
    let mut maps: Vec<(String, Tensor)> = Vec::new();
    let mut uncertainty_files: Vec<(&str, Tensor)> = Vec::new();
    if options.uncertainty() {
        let computed = if segmentation.soft.dim() == 3 {
            uncertainty::uncertainty_maps(
                &segmentation.samples,
                options.threshold,
                Default::default(),
            )?
        } else {
            uncertainty::multi_class_uncertainty_maps(
                &segmentation.samples,
                options.threshold,
                Default::default(),
            )?
        };
        for (suffix, map) in computed.suffixes() {
            if suffix == uncertainty::HARD_SUFFIX {
                continue;
            }
            maps.push((
                suffix.trim_start_matches('_').to_owned(),
                map.shallow_clone(),
            ));
            if suffix != uncertainty::SOFT_SUFFIX {
                uncertainty_files.push((suffix, map.shallow_clone()));
            }
        }
    }
    let processed = postprocess_with_maps(postprocess_steps, source, &segmentation.soft, &maps)
        .with_context(|| {
            if options.no_uncertainty_maps && options.tta.max(options.mc_dropout) > 0 {
                "post-processing without uncertainty maps (--no-uncertainty-maps): a step that thresholds by \
                 one needs them computed"
            } else {
                "post-processing"
            }
        })?;
    let binary = processed.ge(options.threshold).to_kind(Kind::Float);
    let mut files = Vec::new();
    match target {
        OutputTarget::File(path) => written.extend(write_segmentation(
            source,
            &processed,
            path,
            options.threshold,
        )?),
        OutputTarget::Folder(_) => files.extend(per_class_files(
            &binary,
            &dir,
            &prefix,
            uncertainty::HARD_SUFFIX,
            OutputType::U8,
        )),
    }
    if options.soft || options.uncertainty() {
        files.extend(per_class_files(
            &segmentation.soft,
            &dir,
            &prefix,
            uncertainty::SOFT_SUFFIX,
            OutputType::F32,
        ));
    }
    for (suffix, map) in uncertainty_files {
        files.extend(per_class_files(
            &map,
            &dir,
            &prefix,
            suffix,
            OutputType::F32,
        ));
    }
    if !files.is_empty() {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::volume::write_all_like(source, &files)?;
        written.extend(files.into_iter().map(|(_, path, _)| path));
    }
    Ok(written)
}

/// Expands command-line inputs into volumes. Each argument is an image, `a.nii.gz,b.nii.gz` (one volume, one
/// image per channel), a BIDS folder (every image; with a C-channel model, each subject/session's images of
/// the contrasts the model was trained on, in that order), or a text file listing one such entry per line.
/// `channels` (repeated `--channel`) adds one volume made of those images.
pub fn expand_inputs(
    arguments: &[String],
    channels: &[PathBuf],
    loaded: &LoadedModel,
) -> Result<Vec<VolumeInput>> {
    let mut inputs = Vec::new();
    if !channels.is_empty() {
        inputs.push(VolumeInput {
            channels: channels.to_vec(),
        });
    }
    for argument in arguments {
        expand_one(argument, loaded, &mut inputs, 0)?;
    }
    ensure!(
        !inputs.is_empty(),
        "nothing to segment: give an image, a BIDS folder or a list file"
    );
    Ok(inputs)
}

fn expand_one(
    argument: &str,
    loaded: &LoadedModel,
    inputs: &mut Vec<VolumeInput>,
    depth: usize,
) -> Result<()> {
    let path = Path::new(argument);
    if argument.contains(',') {
        inputs.push(VolumeInput {
            channels: argument
                .split(',')
                .map(|p| PathBuf::from(p.trim()))
                .collect(),
        });
    } else if path.is_dir() {
        inputs.extend(bids_inputs(path, loaded)?);
    } else if argument.ends_with(".nii") || argument.ends_with(".nii.gz") {
        inputs.push(VolumeInput {
            channels: vec![path.to_owned()],
        });
    } else if path.is_file() && depth == 0 {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the list file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let resolved: Vec<String> = line
                .split(',')
                .map(|p| {
                    let p = Path::new(p.trim());
                    if p.is_absolute() {
                        p.display().to_string()
                    } else {
                        base.join(p).display().to_string()
                    }
                })
                .collect();
            expand_one(&resolved.join(","), loaded, inputs, depth + 1)?;
        }
    } else {
        bail!("{argument}: not a NIfTI image, a BIDS folder or a list file");
    }
    Ok(())
}

fn bids_inputs(root: &Path, loaded: &LoadedModel) -> Result<Vec<VolumeInput>> {
    let channels = input_channels(loaded);
    let hemis = hemis_contrasts(loaded);
    let contrasts: Vec<String> = hemis
        .clone()
        .unwrap_or_else(|| crate::channels::strings(&loaded.description["data"]["contrasts"]));
    let index = BidsIndex::scan(
        root,
        &BidsQuery {
            target_suffix: "",
            contrasts: if contrasts.is_empty() {
                None
            } else {
                Some(&contrasts)
            },
        },
    )?;
    if channels == 1 {
        return Ok(index
            .entries
            .iter()
            .map(|e| VolumeInput {
                channels: vec![e.image.clone()],
            })
            .collect());
    }
    ensure!(
        contrasts.len() as i64 == channels,
        "the model takes {channels} channels but its folder records contrasts {contrasts:?}: give the images \
         per volume (a.nii.gz,b.nii.gz) instead of a BIDS folder"
    );
    let mut groups: BTreeMap<(String, Option<String>), BTreeMap<String, PathBuf>> = BTreeMap::new();
    for entry in &index.entries {
        groups
            .entry((entry.subject.clone(), entry.session.clone()))
            .or_default()
            .insert(entry.contrast.clone(), entry.image.clone());
    }
    let mut inputs = Vec::new();
    for ((subject, session), images) in groups {
        if hemis.is_some() {
            // Any subset of a HeMIS model's contrasts will do.
            inputs.push(VolumeInput {
                channels: contrasts
                    .iter()
                    .filter_map(|c| images.get(c).cloned())
                    .collect(),
            });
            continue;
        }
        let ordered: Option<Vec<PathBuf>> =
            contrasts.iter().map(|c| images.get(c).cloned()).collect();
        match ordered {
            Some(channels) => inputs.push(VolumeInput { channels }),
            None => tracing::warn!(
                "{subject}{}: missing some of the contrasts {contrasts:?}; skipped",
                session.map(|s| format!(" {s}")).unwrap_or_default()
            ),
        }
    }
    Ok(inputs)
}

/// Segments every input and writes its outputs. A reader thread loads the next volume while the current one
/// computes, and a writer thread post-processes and writes the previous one. Returns the files written, per
/// volume, in input order.
pub fn segment_inputs(
    loaded: &LoadedModel,
    inputs: &[VolumeInput],
    target: &OutputTarget,
    options: &SegmentOptions,
) -> Result<Vec<Vec<PathBuf>>> {
    if let OutputTarget::File(path) = target {
        ensure!(
            inputs.len() == 1,
            "{} is one file but {} volumes are to be segmented: give an output folder",
            path.display(),
            inputs.len()
        );
    }
    tracing::info!(
        "segmenting {} volume(s) with {}: {}",
        inputs.len(),
        loaded.model.architecture,
        describe_plan(loaded, options)?
    );
    let postprocess_steps = loaded.postprocess.clone();
    std::thread::scope(|scope| -> Result<Vec<Vec<PathBuf>>> {
        let (load_tx, load_rx) = std::sync::mpsc::sync_channel::<Result<LoadedVolume>>(1);
        let (write_tx, write_rx) = std::sync::mpsc::sync_channel::<(LoadedVolume, Segmentation)>(1);
        scope.spawn(move || {
            for input in inputs {
                let loaded =
                    load_volume(input).with_context(|| format!("loading {:?}", input.channels));
                if load_tx.send(loaded).is_err() {
                    break;
                }
            }
        });
        let steps = &postprocess_steps;
        let writer = scope.spawn(move || -> Result<Vec<Vec<PathBuf>>> {
            let mut all = Vec::new();
            for (volume, segmentation) in write_rx {
                all.push(write_outputs(
                    steps,
                    &volume.source,
                    &volume.input,
                    &segmentation,
                    target,
                    options,
                )?);
            }
            Ok(all)
        });
        let computed = (|| -> Result<()> {
            for volume in load_rx {
                let volume = volume?;
                let segmentation = segment_loaded(loaded, &volume, options)?;
                if write_tx.send((volume, segmentation)).is_err() {
                    // The writer stopped on an error; its result says why.
                    break;
                }
            }
            Ok(())
        })();
        drop(write_tx);
        let written = writer
            .join()
            .map_err(|_| anyhow!("the writer thread panicked"))?;
        computed?;
        written
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn out_of_memory_errors_name_the_knobs() {
        let options = SegmentOptions {
            batch_size: 32,
            ..SegmentOptions::default()
        };
        let error = anyhow!(
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"
        )
        .context("forward of `unet2d`");
        let message = format!("{:#}", explain_out_of_memory(error, &options));
        for knob in ["--batch-size (now 32)", "--patch", "--stitch-on-cpu"] {
            assert!(message.contains(knob), "{knob} missing from: {message}");
        }
        assert!(message.contains("Tried to allocate 2.00 GiB"), "{message}");
        // Other errors pass through untouched.
        let other = format!(
            "{:#}",
            explain_out_of_memory(anyhow!("shape mismatch"), &options)
        );
        assert_eq!(other, "shape mismatch");
    }

    #[test]
    fn sampling_reads_ivadomed_keys_and_defaults_to_axial_slices() {
        assert_eq!(
            Sampling::from_model(&json!({})).unwrap(),
            Sampling::Slices {
                axis: SliceAxis::Axial
            }
        );
        assert_eq!(
            Sampling::from_model(&json!({"data": {"slice_axis": "sagittal"}})).unwrap(),
            Sampling::Slices {
                axis: SliceAxis::Sagittal
            }
        );
        let patches = Sampling::from_model(&json!({"inference": {
            "slice_axis": 1, "length_2D": [32, 16], "stride_2D": [16, 8]}}))
        .unwrap();
        assert_eq!(
            patches,
            Sampling::Patches2d {
                axis: SliceAxis::Coronal,
                length: [32, 16],
                stride: [16, 8]
            }
        );
        let cubes = Sampling::Subvolumes {
            length: [8, 8, 4],
            stride: [4, 4, 4],
        };
        let section = json!({ "inference": cubes.to_section() });
        assert_eq!(Sampling::from_model(&section).unwrap(), cubes);
        // Overrides: a 2D patch on a slice model, a new stride, a 3D patch.
        let base = Sampling::default();
        let over = SamplingOverride {
            patch: Some(vec![16, 16]),
            stride: Some(vec![8, 8]),
            ..Default::default()
        };
        assert_eq!(
            over.apply(&base).unwrap(),
            Sampling::Patches2d {
                axis: SliceAxis::Axial,
                length: [16, 16],
                stride: [8, 8]
            }
        );
        let stride_only = SamplingOverride {
            stride: Some(vec![2, 2, 2]),
            ..Default::default()
        };
        assert_eq!(
            stride_only.apply(&cubes).unwrap(),
            Sampling::Subvolumes {
                length: [8, 8, 4],
                stride: [2, 2, 2]
            }
        );
        assert!(stride_only.apply(&base).is_err());
    }

    #[test]
    fn slice_and_patch_grids_have_the_expected_tiles() {
        // 10 x 12 x 5 volume. Sagittal slices: 10 tiles of 1 x 12 x 5.
        let grid = Sampling::Slices {
            axis: SliceAxis::Sagittal,
        }
        .grid([10, 12, 5])
        .unwrap();
        assert_eq!(grid.len(), 10);
        assert_eq!(grid.tile_shape(), &[1, 12, 5]);
        // Axial 2D patches 8 x 8 stride 4 on 10 x 12: x origins 0, 2 (flush) and y origins 0, 4 -> 2 x 2 per
        // slice, times 5 slices.
        let grid = Sampling::Patches2d {
            axis: SliceAxis::Axial,
            length: [8, 8],
            stride: [4, 4],
        }
        .grid([10, 12, 5])
        .unwrap();
        assert_eq!(grid.tiles_per_axis(), vec![2, 2, 5]);
        assert_eq!(grid.tile_shape(), &[8, 8, 1]);
    }

    #[test]
    fn metadata_is_encoded_with_the_training_encoder_and_overrides_win() {
        // Fitted on FA 80 / 100 (mean 90, population std 10), TR 1 / 3 (mean 2, std 1), TE 0.01 / 0.03
        // (mean 0.02, std 0.01), Siemens (code 0) and GE (code 2): vectors [fa, tr, te, siemens, ge].
        let mri = |fa: f64, tr: f64, te: f64, manufacturer: &str| MriParams {
            flip_angle: fa,
            repetition_time: tr,
            echo_time: te,
            manufacturer: manufacturer.into(),
        };
        let encoder =
            FilmEncoder::fit(&[mri(80.0, 1.0, 0.01, "GE"), mri(100.0, 3.0, 0.03, "Siemens")])
                .unwrap();
        let sidecar: BTreeMap<String, Value> = [
            ("FlipAngle".to_owned(), json!(120)),
            ("RepetitionTime".to_owned(), json!(2.5)),
            ("EchoTime".to_owned(), json!([0.01, 0.03])),
            ("Manufacturer".to_owned(), json!("Siemens")),
        ]
        .into();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        // (120 - 90) / 10 = 3, (2.5 - 2) / 1 = 0.5, multi-echo mean 0.02 -> 0, Siemens -> [1, 0].
        let encoded = encode_metadata(&encoder, &sidecar, &BTreeMap::new()).unwrap();
        assert!(close(&encoded, &[3.0, 0.5, 0.0, 1.0, 0.0]), "{encoded:?}");
        // --metadata FlipAngle=70 Manufacturer=GE over the sidecar: (70 - 90) / 10 = -2, GE -> [0, 1].
        let overrides = parse_metadata(&["FlipAngle=70".into(), "Manufacturer=GE".into()]).unwrap();
        let encoded = encode_metadata(&encoder, &sidecar, &overrides).unwrap();
        assert!(close(&encoded, &[-2.0, 0.5, 0.0, 0.0, 1.0]), "{encoded:?}");
        let mut lacking = sidecar.clone();
        lacking.remove("EchoTime");
        let error = encode_metadata(&encoder, &lacking, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("has no EchoTime") && error.contains("--metadata"),
            "{error}"
        );
        assert_eq!(
            parse_metadata(&["FlipAngle=30".into(), "Manufacturer=GE".into()]).unwrap()
                ["FlipAngle"],
            json!(30)
        );
    }
}
