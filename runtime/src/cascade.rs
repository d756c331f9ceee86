//! ivadomed's object-detection cascade (`object_detection_params`): a first model finds the structure, its
//! largest connected object gives a bounding box, the box is enlarged by a safety factor, and a second model
//! is trained on and run over the crops only.
//!
//! Boxes live in the canonical (RAS+) voxel grid of the image, which for axial slices is ivadomed's HWD
//! orientation, as `[x_min, x_max, y_min, y_max, z_min, z_max]` with exclusive maxima (ivadomed crops
//! `x_min:x_max`). [`adjust_box`] follows ivadomed's `adjust_bb_size` (including its quirk: the extent it
//! starts from is inclusive, so a factor of 1 leaves out the object's last voxel on each axis), then clamps
//! the box to the volume: ivadomed only clamps the lower end at 0 and pads past the upper end with zeros
//! (`CroppableArray`); here a crop never reaches outside the image (see docs/differences.md).
//!
//! Training ([`prepare_training_crops`]) runs the detection model over every image (or reads the boxes from a
//! given `bounding_box_dict.json`), writes the cropped image and label as NIfTI files with the affine of the
//! crop (the source affine shifted by the box origin), and hands back entries pointing at the crops, so the
//! rest of training is unchanged. The boxes go into `bounding_box_dict.json` in the run folder and in the
//! model folder, a copy of the detection model folder into `<model folder>/detection_model`, and the stage
//! into the model folder's description (`data.object_detection`).
//!
//! Inference ([`segment`]) on a model folder that records a stage: detection -> box -> crop -> second model
//! -> padded back to the source shape (zeros outside the box) -> the second model's post-processing, in the
//! source's grid.
use crate::bids::BidsEntry;
use crate::infer;
use crate::metrics::Mask;
use crate::model_folder::{self, write_atomic, LoadedModel};
use crate::plugin::PluginRegistry;
use crate::volume::{qform_affine, read_volume, write_like, Affine, OutputType, Volume};
use anyhow::{bail, ensure, Context, Result};
use ivado_sdk::components::Connectivity;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// ivadomed's name for the boxes file.
pub const BOUNDING_BOX_FILE: &str = "bounding_box_dict.json";
/// Where the copy of the detection model folder goes inside the second stage's model folder.
pub const DETECTION_DIR: &str = "detection_model";
/// Where training writes the crops, inside the run folder (a BIDS-like layout).
pub const CROPS_DIR: &str = "cascade_crops";
/// A detection voxel is foreground at or above this (ivadomed's `binarize_prediction` default).
pub const DETECTION_THRESHOLD: f64 = 0.5;

/// A box in canonical voxel indices: `min` inclusive, `max` exclusive, per axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundingBox {
    pub min: [usize; 3],
    pub max: [usize; 3],
}

impl BoundingBox {
    pub fn shape(&self) -> [usize; 3] {
        std::array::from_fn(|axis| self.max[axis] - self.min[axis])
    }

    /// ivadomed's list: `[x_min, x_max, y_min, y_max, z_min, z_max]`.
    pub fn to_ivadomed(&self) -> [i64; 6] {
        std::array::from_fn(|i| {
            let axis = i / 2;
            (if i % 2 == 0 {
                self.min[axis]
            } else {
                self.max[axis]
            }) as i64
        })
    }

    /// Reads ivadomed's six numbers; errors on negative values or an empty axis.
    pub fn from_ivadomed(values: &[i64]) -> Result<Self> {
        ensure!(
            values.len() == 6,
            "a bounding box has 6 numbers [x_min, x_max, y_min, y_max, z_min, z_max], got {values:?}"
        );
        ensure!(
            values.iter().all(|&v| v >= 0),
            "bounding box {values:?} has a negative coordinate"
        );
        let min = std::array::from_fn(|axis| values[2 * axis] as usize);
        let max = std::array::from_fn(|axis| values[2 * axis + 1] as usize);
        let bbox = BoundingBox { min, max };
        ensure!(
            (0..3).all(|axis| bbox.max[axis] > bbox.min[axis]),
            "bounding box {values:?} is empty along an axis"
        );
        Ok(bbox)
    }

    /// The box limited to a volume of `shape`, keeping at least one voxel per axis.
    pub fn clamped(&self, shape: [usize; 3]) -> BoundingBox {
        let min: [usize; 3] =
            std::array::from_fn(|axis| self.min[axis].min(shape[axis].saturating_sub(1)));
        let max = std::array::from_fn(|axis| self.max[axis].min(shape[axis]).max(min[axis] + 1));
        BoundingBox { min, max }
    }
}

/// Inclusive extent `(min, max)` per axis of the largest 6-connected object of `soft >= threshold`
/// (`[X, Y, Z]`), as ivadomed's `keep_largest_object` (scipy's default structure; the first object in scan
/// order wins a tie) followed by `get_bounding_boxes`. `None` when nothing reaches the threshold.
pub fn largest_object_extent(soft: &Tensor, threshold: f64) -> Result<Option<[(usize, usize); 3]>> {
    let mask = Mask::from_tensor(soft, threshold)?;
    let components = mask.components(Connectivity::Six);
    let Some(largest) = (0..components.count()).reduce(|best, k| {
        if components.sizes[k] > components.sizes[best] {
            k
        } else {
            best
        }
    }) else {
        return Ok(None);
    };
    let label = largest as u32 + 1;
    let [_, ny, nz] = components.dims;
    let mut extent = [(usize::MAX, 0usize); 3];
    for (index, _) in components
        .labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l == label)
    {
        let voxel = [index / (ny * nz), index / nz % ny, index % nz];
        for axis in 0..3 {
            extent[axis].0 = extent[axis].0.min(voxel[axis]);
            extent[axis].1 = extent[axis].1.max(voxel[axis]);
        }
    }
    Ok(Some(extent))
}

/// ivadomed's `adjust_bb_size` on an inclusive extent, then clamped to `shape`: per axis, with
/// `length = (max - min) * factor`, the box starts at `max(min - floor((length - (max - min)) / 2), 0)` and
/// is `floor(length)` voxels long.
pub fn adjust_box(extent: [(usize, usize); 3], factor: [f64; 3], shape: [usize; 3]) -> BoundingBox {
    let mut min = [0usize; 3];
    let mut max = [0usize; 3];
    for axis in 0..3 {
        let (low, high) = extent[axis];
        let span = (high - low) as f64;
        let length = span * factor[axis];
        let start = (low as f64 - ((length - span) / 2.0).floor())
            .max(0.0)
            .round();
        min[axis] = start as usize;
        max[axis] = (start + length).floor().max(0.0) as usize;
    }
    BoundingBox { min, max }.clamped(shape)
}

/// The box of a detection: largest object of `soft >= threshold` (`[X, Y, Z]`), enlarged by `factor` and
/// clamped to the volume. `None` when nothing was detected.
pub fn detection_box(
    soft: &Tensor,
    threshold: f64,
    factor: [f64; 3],
) -> Result<Option<BoundingBox>> {
    let size = soft.size();
    ensure!(
        size.len() == 3,
        "a detection must be one [X, Y, Z] map, got shape {size:?} (a detection model has one class)"
    );
    let shape = [size[0] as usize, size[1] as usize, size[2] as usize];
    Ok(largest_object_extent(soft, threshold)?.map(|extent| adjust_box(extent, factor, shape)))
}

/// Reads ivadomed's bounding-box file: `{"<image path>": [x_min, x_max, ...]}` (its older format, the one of
/// the shipped `bounding_box_dict.json`) or `{"<image path>": [[x_min, ...], ...]}` (one box per object; the
/// first is used, as ivadomed's loader does).
pub fn read_bounding_boxes(path: &Path) -> Result<BTreeMap<String, BoundingBox>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let Some(object) = value.as_object() else {
        bail!(
            "{}: expected an object mapping image paths to boxes",
            path.display()
        );
    };
    let numbers = |value: &Value| -> Option<Vec<i64>> {
        value
            .as_array()?
            .iter()
            .map(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f.round() as i64)))
            .collect()
    };
    let mut boxes = BTreeMap::new();
    for (image, value) in object {
        let list = match value.as_array().and_then(|a| a.first()) {
            Some(first) if first.is_array() => numbers(first),
            _ => numbers(value),
        };
        let Some(list) = list else {
            bail!(
                "{}: the box of {image} is not a list of numbers",
                path.display()
            );
        };
        let bbox = BoundingBox::from_ivadomed(&list)
            .with_context(|| format!("{}: the box of {image}", path.display()))?;
        boxes.insert(image.clone(), bbox);
    }
    Ok(boxes)
}

/// Writes boxes in ivadomed's format (`{"<image path>": [x_min, x_max, y_min, y_max, z_min, z_max]}`).
pub fn write_bounding_boxes(path: &Path, boxes: &BTreeMap<String, BoundingBox>) -> Result<()> {
    let map: serde_json::Map<String, Value> = boxes
        .iter()
        .map(|(image, bbox)| (image.clone(), json!(bbox.to_ivadomed())))
        .collect();
    write_atomic(
        path,
        serde_json::to_string_pretty(&Value::Object(map))?.as_bytes(),
    )
}

/// The box recorded for `image`: by exact path, else by a key naming the same file once both are made
/// absolute, else (with `by_file_name`, for files written on another machine, as ivadomed's keys are) by the
/// one key with the same file name.
pub fn lookup_box(
    boxes: &BTreeMap<String, BoundingBox>,
    image: &Path,
    by_file_name: bool,
) -> Option<BoundingBox> {
    if let Some(bbox) = boxes.get(&image.display().to_string()) {
        return Some(*bbox);
    }
    if let Ok(wanted) = std::fs::canonicalize(image) {
        let same = boxes
            .iter()
            .find(|(key, _)| std::fs::canonicalize(key.as_str()).is_ok_and(|k| k == wanted));
        if let Some((_, bbox)) = same {
            return Some(*bbox);
        }
    }
    if !by_file_name {
        return None;
    }
    let name = image.file_name()?;
    let mut same_name = boxes
        .iter()
        .filter(|(k, _)| Path::new(k.as_str()).file_name() == Some(name));
    match (same_name.next(), same_name.next()) {
        (Some((_, bbox)), None) => Some(*bbox),
        _ => None,
    }
}

/// The `[..., X, Y, Z]` tensor cut to the box (a view).
pub fn crop_tensor(tensor: &Tensor, bbox: &BoundingBox) -> Tensor {
    let offset = tensor.dim() as i64 - 3;
    let mut out = tensor.shallow_clone();
    for axis in 0..3 {
        out = out.narrow(
            offset + axis as i64,
            bbox.min[axis] as i64,
            (bbox.max[axis] - bbox.min[axis]) as i64,
        );
    }
    out
}

/// `crop` (`[..., x, y, z]`, the box's shape) placed at the box in a zero volume of `shape` (`[..., X, Y, Z]`).
pub fn pad_to(crop: &Tensor, bbox: &BoundingBox, shape: [usize; 3]) -> Result<Tensor> {
    let size = crop.size();
    ensure!(
        size.len() >= 3,
        "a crop needs at least 3 dims, got {size:?}"
    );
    let lead = &size[..size.len() - 3];
    let expected: Vec<i64> = bbox.shape().iter().map(|&d| d as i64).collect();
    ensure!(
        size[size.len() - 3..] == expected[..],
        "the prediction of the crop is {:?}, the box is {:?}",
        &size[size.len() - 3..],
        expected
    );
    let mut full_size = lead.to_vec();
    full_size.extend(shape.iter().map(|&d| d as i64));
    let full = Tensor::zeros(full_size.as_slice(), (crop.kind(), crop.device()));
    let mut window = crop_tensor(&full, bbox);
    window.copy_(crop);
    Ok(full)
}

/// `affine` with its origin moved to voxel `offset` (same axes and spacing).
fn shifted(affine: &Affine, offset: [usize; 3]) -> Affine {
    let mut out = *affine;
    for row in 0..3 {
        out[row][3] += (0..3)
            .map(|k| affine[row][k] * offset[k] as f64)
            .sum::<f64>();
    }
    out
}

/// The part of `source` inside the box, as a volume of its own: the data cut to the box, the affine shifted
/// by the box origin, and a header (dims, sform, qform) that describes exactly that, so [`write_like`] writes
/// it in the source's voxel order and orientation.
pub fn crop_volume(source: &Volume, bbox: &BoundingBox) -> Result<Volume> {
    let shape = source.shape();
    ensure!(
        (0..3).all(|a| bbox.min[a] < bbox.max[a] && bbox.max[a] <= shape[a]),
        "box {:?} does not fit in {} of shape {shape:?}",
        bbox.to_ivadomed(),
        source.path.display()
    );
    let mut reorientation = source.reorientation;
    let mut file_origin = [0usize; 3];
    for canonical in 0..3 {
        let axis = reorientation.perm[canonical];
        let length = bbox.max[canonical] - bbox.min[canonical];
        file_origin[axis] = if reorientation.flip[canonical] {
            reorientation.file_shape[axis] - bbox.max[canonical]
        } else {
            bbox.min[canonical]
        };
        reorientation.file_shape[axis] = length;
    }
    let mut header = source.header.clone();
    for axis in 0..3 {
        header.dim[axis + 1] = reorientation.file_shape[axis] as u16;
    }
    let (srow, qform) = (sform_of(&header), qform_affine(&header));
    let (srow, qform) = (shifted(&srow, file_origin), shifted(&qform, file_origin));
    if header.sform_code <= 0 && header.qform_code <= 0 {
        // Without either transform a reader falls back to a centred default affine, which a crop cannot
        // keep: record the source's geometry as an sform instead.
        let file_affine = shifted(&source.file_affine(), file_origin);
        set_sform(&mut header, &file_affine);
        header.sform_code = 1;
    } else {
        set_sform(&mut header, &srow);
    }
    header.quatern_x = qform[0][3] as f32;
    header.quatern_y = qform[1][3] as f32;
    header.quatern_z = qform[2][3] as f32;
    Ok(Volume {
        data: crop_tensor(&source.data, bbox).contiguous(),
        spacing: source.spacing,
        affine: shifted(&source.affine, bbox.min),
        reorientation,
        header,
        path: source.path.clone(),
    })
}

fn sform_of(header: &nifti::NiftiHeader) -> Affine {
    let row = |r: &[f32; 4]| [r[0] as f64, r[1] as f64, r[2] as f64, r[3] as f64];
    [
        row(&header.srow_x),
        row(&header.srow_y),
        row(&header.srow_z),
        [0.0, 0.0, 0.0, 1.0],
    ]
}

fn set_sform(header: &mut nifti::NiftiHeader, affine: &Affine) {
    let row = |r: &[f64; 4]| [r[0] as f32, r[1] as f32, r[2] as f32, r[3] as f32];
    header.srow_x = row(&affine[0]);
    header.srow_y = row(&affine[1]);
    header.srow_z = row(&affine[2]);
}

/// What a training run is told about the detection stage: ivadomed's `object_detection_params`
/// (`object_detection_path`, `safety_factor`), or Rhai's `object_detection: #{model, safety_factor,
/// bounding_boxes}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectDetection {
    /// The detection model folder.
    pub model: Option<PathBuf>,
    /// Multiplies each axis of the box around its centre (ivadomed's default `[1, 1, 1]`).
    pub safety_factor: [f64; 3],
    /// A `bounding_box_dict.json` to take boxes from instead of running the detection model.
    pub bounding_boxes: Option<PathBuf>,
}

fn safety_factor_of(value: Option<&Value>, context: &str) -> Result<[f64; 3]> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok([1.0; 3]);
    };
    let list: Option<Vec<f64>> = value
        .as_array()
        .map(|a| a.iter().map(Value::as_f64).collect())
        .unwrap_or(None);
    match list.as_deref() {
        Some(&[x, y, z]) if [x, y, z].iter().all(|f| f.is_finite() && *f > 0.0) => Ok([x, y, z]),
        _ => bail!("{context}: `safety_factor` must be three positive numbers, got {value}"),
    }
}

impl ObjectDetection {
    /// Rhai's `object_detection` option: `{model, safety_factor, bounding_boxes}`; at least one of `model`
    /// and `bounding_boxes`.
    pub fn from_json(options: &Value) -> Result<Self> {
        let Some(map) = options.as_object() else {
            bail!("object_detection: expected a map #{{model, safety_factor, bounding_boxes}}, got {options}");
        };
        for key in map.keys() {
            ensure!(
                ["model", "safety_factor", "bounding_boxes"].contains(&key.as_str()),
                "object_detection: unknown option `{key}` (known: model, safety_factor, bounding_boxes)"
            );
        }
        let path = |key: &str| -> Result<Option<PathBuf>> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(PathBuf::from(s))),
                Some(other) => bail!("object_detection: `{key}` must be a path, got {other}"),
            }
        };
        let detection = ObjectDetection {
            model: path("model")?,
            safety_factor: safety_factor_of(map.get("safety_factor"), "object_detection")?,
            bounding_boxes: path("bounding_boxes")?,
        };
        ensure!(
            detection.model.is_some() || detection.bounding_boxes.is_some(),
            "object_detection: give the detection `model` folder, a `bounding_boxes` file, or both"
        );
        Ok(detection)
    }

    /// ivadomed's config: `object_detection_params.object_detection_path` (null: no cascade) and
    /// `safety_factor`. `None` when the config has no detection stage.
    pub fn from_ivadomed_config(config: &Value) -> Result<Option<Self>> {
        let Some(params) = config
            .get("object_detection_params")
            .filter(|v| !v.is_null())
        else {
            return Ok(None);
        };
        let model = match params.get("object_detection_path") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => PathBuf::from(s),
            Some(other) => bail!(
                "object_detection_params.object_detection_path must be a path or null, got {other}"
            ),
        };
        Ok(Some(ObjectDetection {
            model: Some(model),
            safety_factor: safety_factor_of(
                params.get("safety_factor"),
                "object_detection_params",
            )?,
            bounding_boxes: None,
        }))
    }
}

/// The detection stage a model folder records in `data.object_detection`.
#[derive(Clone, Debug, PartialEq)]
pub struct DetectionStage {
    /// The detection model folder, resolved: the copy inside the model folder when it is there, else the
    /// folder training was given.
    pub model: Option<PathBuf>,
    pub safety_factor: [f64; 3],
    /// Boxes recorded at training time (the model folder's `bounding_box_dict.json`), used for an image the
    /// detection model cannot run on (no detection model recorded).
    pub bounding_boxes: Option<PathBuf>,
}

/// Reads `data.object_detection` of a model folder's description; `model_dir` (when known) resolves the
/// copied detection model and boxes file. `None` for a plain model.
pub fn detection_stage(
    model_dir: Option<&Path>,
    description: &Value,
) -> Result<Option<DetectionStage>> {
    let stage = &description["data"]["object_detection"];
    if stage.is_null() {
        return Ok(None);
    }
    let inside = |key: &str| -> Option<PathBuf> {
        let name = stage[key].as_str()?;
        let path = model_dir?.join(name);
        path.exists().then_some(path)
    };
    let absolute = |key: &str| -> Option<PathBuf> {
        let path = PathBuf::from(stage[key].as_str()?);
        path.exists().then_some(path)
    };
    let model = inside("model_folder").or_else(|| absolute("source"));
    let bounding_boxes = inside("bounding_boxes");
    if model.is_none() && bounding_boxes.is_none() {
        bail!(
            "the model folder{} records a detection stage, but neither its copy `{}` nor the original `{}` \
             exists, and it has no {BOUNDING_BOX_FILE}",
            model_dir
                .map(|d| format!(" {}", d.display()))
                .unwrap_or_default(),
            stage["model_folder"].as_str().unwrap_or(DETECTION_DIR),
            stage["source"].as_str().unwrap_or("?")
        );
    }
    Ok(Some(DetectionStage {
        model,
        safety_factor: safety_factor_of(Some(&stage["safety_factor"]), "data.object_detection")?,
        bounding_boxes,
    }))
}

/// One segmentation stage of a cascade: a soft prediction in the image's own grid, and the post-processing
/// that goes with it. [`ModelStage`] is the real one; tests put doubles in its place.
pub trait Stage {
    /// Soft prediction (`[X, Y, Z]` or `[K, X, Y, Z]`) of the image file, in its canonical grid.
    fn predict(&self, image: &Path) -> Result<(Volume, Tensor)>;
    /// Post-processing of a prediction in `source`'s grid.
    fn postprocess(&self, source: &Volume, soft: &Tensor) -> Result<Tensor>;
}

/// A model folder as a cascade stage.
pub struct ModelStage<'a> {
    pub model: &'a LoadedModel,
    pub device: Device,
    pub batch_size: usize,
}

impl Stage for ModelStage<'_> {
    fn predict(&self, image: &Path) -> Result<(Volume, Tensor)> {
        infer::segment_volume(self.model, image, self.device, self.batch_size)
    }

    fn postprocess(&self, source: &Volume, soft: &Tensor) -> Result<Tensor> {
        infer::postprocess(self.model, source, soft)
    }
}

/// The box of `image` from the detection stage: the detection's post-processed prediction, thresholded at
/// [`DETECTION_THRESHOLD`], its largest object enlarged by `safety_factor`. `None` when nothing was detected.
pub fn detect(
    detection: &dyn Stage,
    image: &Path,
    safety_factor: [f64; 3],
) -> Result<(Volume, Option<BoundingBox>)> {
    let (source, soft) = detection.predict(image)?;
    let soft = detection.postprocess(&source, &soft)?;
    let bbox = detection_box(&soft, DETECTION_THRESHOLD, safety_factor)
        .with_context(|| format!("detection on {}", image.display()))?;
    Ok((source, bbox))
}

/// A cascade's prediction in the source's grid, and the box the second stage saw.
pub struct CascadePrediction {
    pub source: Volume,
    /// Post-processed soft prediction, `[X, Y, Z]` or `[K, X, Y, Z]`, zero outside the box.
    pub soft: Tensor,
    /// `None` when the detection found nothing (the prediction is then all zeros).
    pub bbox: Option<BoundingBox>,
}

/// Where a box comes from at inference.
pub enum BoxSource<'a> {
    /// Run this detection stage on the image.
    Detection(&'a dyn Stage),
    /// A box recorded for the image (clamped to it).
    Given(BoundingBox),
}

/// The cascade on one image: box (detected or given) -> crop written to `scratch` -> `second` -> padded
/// back to full size -> `second`'s post-processing.
pub fn segment_with(
    boxes: BoxSource,
    second: &dyn Stage,
    image: &Path,
    safety_factor: [f64; 3],
    scratch: &Path,
) -> Result<CascadePrediction> {
    let (source, bbox) = match boxes {
        BoxSource::Detection(detection) => detect(detection, image, safety_factor)?,
        BoxSource::Given(bbox) => {
            let source = read_volume(image)?;
            let bbox = bbox.clamped(source.shape());
            (source, Some(bbox))
        }
    };
    let shape = source.shape();
    let Some(bbox) = bbox else {
        tracing::warn!(
            "{}: the detection found nothing; the prediction is empty",
            image.display()
        );
        let soft = source.data.zeros_like();
        return Ok(CascadePrediction {
            source,
            soft,
            bbox: None,
        });
    };
    let crop = crop_volume(&source, &bbox)?;
    std::fs::create_dir_all(scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let crop_path = scratch.join(format!("{}_crop.nii.gz", image_stem(image)));
    write_like(&crop, &crop.data, &crop_path, OutputType::F32)?;
    let (_, soft_crop) = second
        .predict(&crop_path)
        .with_context(|| format!("second stage on the crop of {}", image.display()))?;
    std::fs::remove_file(&crop_path).ok();
    let full = pad_to(&soft_crop, &bbox, shape)?;
    let soft = second.postprocess(&source, &full)?;
    Ok(CascadePrediction {
        source,
        soft,
        bbox: Some(bbox),
    })
}

/// The file name without `.nii.gz` / `.nii`.
pub fn image_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .unwrap_or(&name)
        .to_string()
}

/// Segments `image` with a loaded model folder: through its detection stage when it records one
/// ([`segment_with`]), else directly (segmentation, then post-processing). `model_dir` locates the copy of
/// the detection model; without it the path recorded at training time is used.
pub fn segment(
    model: &LoadedModel,
    model_dir: Option<&Path>,
    registry: &PluginRegistry,
    image: &Path,
    device: Device,
    batch_size: usize,
) -> Result<CascadePrediction> {
    let second = ModelStage {
        model,
        device,
        batch_size,
    };
    let Some(stage) = detection_stage(model_dir, &model.description)? else {
        let (source, soft) = second.predict(image)?;
        let soft = second.postprocess(&source, &soft)?;
        return Ok(CascadePrediction {
            source,
            soft,
            bbox: None,
        });
    };
    let scratch = crate::scratch::ScratchDir::new("cascade")?;
    // As ivadomed: a box recorded for the image (the boxes file covers the whole dataset) wins; other
    // images go through the detection model.
    let recorded = match &stage.bounding_boxes {
        Some(file) => read_bounding_boxes(file)?,
        None => BTreeMap::new(),
    };
    if let Some(bbox) = lookup_box(&recorded, image, false) {
        return segment_with(
            BoxSource::Given(bbox),
            &second,
            image,
            stage.safety_factor,
            scratch.path(),
        );
    }
    let Some(dir) = &stage.model else {
        bail!(
            "{}: no bounding box recorded for it and the model folder has no detection model to find one",
            image.display()
        );
    };
    let detection = model_folder::load(dir, registry, device)
        .with_context(|| format!("loading the detection model {}", dir.display()))?;
    let detection = ModelStage {
        model: &detection,
        device,
        batch_size,
    };
    segment_with(
        BoxSource::Detection(&detection),
        &second,
        image,
        stage.safety_factor,
        scratch.path(),
    )
}

/// What [`prepare_training_crops`] produced.
pub struct TrainingCrops {
    /// The entries of each input set, pointing at the crops (same order; images without a detection are
    /// left out, with a warning).
    pub sets: Vec<Vec<BidsEntry>>,
    /// Image path -> box, as written to `bounding_box_dict.json`: the given boxes, and the training images'.
    pub boxes: BTreeMap<String, BoundingBox>,
    /// `data.object_detection` for the model folder's description.
    pub stage: Value,
}

/// Copies the regular files of `from` into `to` (a model folder has no sub-folders to copy).
fn copy_folder_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).with_context(|| {
                format!("copying {} into {}", entry.path().display(), to.display())
            })?;
        }
    }
    Ok(())
}

/// The cascade's training step: a box per image (from `params.bounding_boxes` when it has one, else from
/// the detection model), image and label cropped to it and written under `<out_dir>/cascade_crops` (BIDS
/// layout, labels under `derivatives/labels`), the boxes to `<out_dir>/bounding_box_dict.json` and
/// `<out_dir>/model/bounding_box_dict.json`, and the detection model folder copied to
/// `<out_dir>/model/detection_model`.
pub fn prepare_training_crops(
    registry: &PluginRegistry,
    device: Device,
    params: &ObjectDetection,
    sets: &[&[BidsEntry]],
    out_dir: &Path,
) -> Result<TrainingCrops> {
    let given = match &params.bounding_boxes {
        Some(path) => read_bounding_boxes(path)?,
        None => BTreeMap::new(),
    };
    let detection = match &params.model {
        Some(dir) => Some(
            model_folder::load(dir, registry, device)
                .with_context(|| format!("loading the detection model {}", dir.display()))?,
        ),
        None => None,
    };
    let stage = detection.as_ref().map(|model| ModelStage {
        model,
        device,
        batch_size: 16,
    });
    let crops_root = out_dir.join(CROPS_DIR);
    // The given boxes are kept for the images not trained on (ivadomed's file covers the whole dataset, and
    // testing reads the test images' boxes from it).
    let mut boxes = given.clone();
    let mut out_sets = Vec::with_capacity(sets.len());
    for set in sets {
        let mut cropped = Vec::with_capacity(set.len());
        for entry in set.iter() {
            let key = entry.image.display().to_string();
            let (source, bbox) = match (lookup_box(&given, &entry.image, true), &stage) {
                (Some(bbox), _) => {
                    let source = read_volume(&entry.image)?;
                    let bbox = bbox.clamped(source.shape());
                    (source, Some(bbox))
                }
                (None, Some(stage)) => detect(stage, &entry.image, params.safety_factor)?,
                (None, None) => bail!(
                    "object_detection: {} has no box in {} and no detection model is given",
                    entry.image.display(),
                    params
                        .bounding_boxes
                        .as_deref()
                        .unwrap_or(Path::new("?"))
                        .display()
                ),
            };
            let Some(bbox) = bbox else {
                tracing::warn!(
                    "object_detection: nothing detected in {}; left out of training",
                    entry.image.display()
                );
                continue;
            };
            boxes.insert(key, bbox);
            let mut anat = crops_root.join(&entry.subject);
            let mut labels = crops_root
                .join("derivatives")
                .join("labels")
                .join(&entry.subject);
            if let Some(session) = &entry.session {
                anat = anat.join(session);
                labels = labels.join(session);
            }
            let (anat, labels) = (anat.join("anat"), labels.join("anat"));
            let file_name = |path: &Path| {
                path.file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_default()
            };
            let crop = crop_volume(&source, &bbox)?;
            let image_path = anat.join(file_name(&entry.image));
            write_like(&crop, &crop.data, &image_path, OutputType::F32)?;
            let mut new_entry = entry.clone();
            new_entry.image = image_path;
            // Every label of the image (all targets and the ROI) is cropped to the same box.
            let crop_label = |label_path: &PathBuf| -> Result<PathBuf> {
                let label = read_volume(label_path)?;
                crate::evaluate::check_alignment(&source, &label).with_context(|| {
                    format!(
                        "the label {} does not share the grid of {}",
                        label_path.display(),
                        entry.image.display()
                    )
                })?;
                let label_crop = crop_volume(&label, &bbox)?;
                let path = labels.join(file_name(label_path));
                write_like(&label_crop, &label_crop.data, &path, OutputType::F32)?;
                Ok(path)
            };
            new_entry.label = entry.label.as_ref().map(&crop_label).transpose()?;
            new_entry.targets = entry
                .targets
                .iter()
                .map(|target| match (target, &entry.label, &new_entry.label) {
                    (Some(t), Some(first), Some(cropped)) if t == first => {
                        Ok(Some(cropped.clone()))
                    }
                    (Some(t), _, _) => crop_label(t).map(Some),
                    (None, _, _) => Ok(None),
                })
                .collect::<Result<_>>()?;
            new_entry.roi = entry.roi.as_ref().map(&crop_label).transpose()?;
            cropped.push(new_entry);
        }
        out_sets.push(cropped);
    }
    let model_dir = out_dir.join("model");
    write_bounding_boxes(&out_dir.join(BOUNDING_BOX_FILE), &boxes)?;
    write_bounding_boxes(&model_dir.join(BOUNDING_BOX_FILE), &boxes)?;
    let source = match &params.model {
        Some(dir) => {
            copy_folder_files(dir, &model_dir.join(DETECTION_DIR))?;
            Some(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone()))
        }
        None => None,
    };
    let stage = json!({
        "model_folder": params.model.as_ref().map(|_| DETECTION_DIR),
        "source": source,
        "safety_factor": params.safety_factor,
        "bounding_boxes": BOUNDING_BOX_FILE,
        "threshold": DETECTION_THRESHOLD,
    });
    Ok(TrainingCrops {
        sets: out_sets,
        boxes,
        stage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// A `[X, Y, Z]` volume with ones on the given inclusive cuboids.
    fn volume_with(shape: [i64; 3], cuboids: &[([i64; 3], [i64; 3])]) -> Tensor {
        let volume = Tensor::zeros(shape, (Kind::Float, Device::Cpu));
        for (low, high) in cuboids {
            let _ = volume
                .narrow(0, low[0], high[0] - low[0] + 1)
                .narrow(1, low[1], high[1] - low[1] + 1)
                .narrow(2, low[2], high[2] - low[2] + 1)
                .fill_(1.0);
        }
        volume
    }

    #[test]
    fn the_largest_object_is_chosen() {
        // Three objects: 2x2x2 = 8 voxels, 3x3x3 = 27 voxels, 4x1x1 = 4 voxels; the 27-voxel one wins.
        let volume = volume_with(
            [20, 20, 10],
            &[
                ([1, 1, 1], [2, 2, 2]),
                ([10, 12, 4], [12, 14, 6]),
                ([15, 2, 8], [18, 2, 8]),
            ],
        );
        assert_eq!(
            largest_object_extent(&volume, 0.5).unwrap(),
            Some([(10, 12), (12, 14), (4, 6)])
        );
        // Touching only by an edge is not 6-connected: two 2-voxel objects and a 3-voxel one.
        let diagonal = volume_with(
            [6, 6, 3],
            &[
                ([0, 0, 0], [0, 1, 0]),
                ([1, 2, 0], [1, 3, 0]),
                ([4, 0, 0], [4, 2, 0]),
            ],
        );
        assert_eq!(
            largest_object_extent(&diagonal, 0.5).unwrap(),
            Some([(4, 4), (0, 2), (0, 0)])
        );
        assert_eq!(
            largest_object_extent(&Tensor::zeros([4, 4, 4], (Kind::Float, Device::Cpu)), 0.5)
                .unwrap(),
            None
        );
    }

    #[test]
    fn safety_factor_enlarges_around_the_centre_and_clamps() {
        // By hand from ivadomed's adjust_bb_size: extent (10, 19) with factor 2 -> span 9, length 18,
        // start 10 - floor(9 / 2) = 6, end 6 + 18 = 24.
        let bbox = adjust_box(
            [(10, 19), (10, 19), (3, 5)],
            [2.0, 1.5, 1.0],
            [100, 100, 50],
        );
        // y: span 9, length 13.5, start 10 - floor(4.5 / 2) = 8, end floor(8 + 13.5) = 21.
        // z: factor 1 keeps [3, 5) (ivadomed's exclusive use of the inclusive maximum).
        assert_eq!(bbox.to_ivadomed(), [6, 24, 8, 21, 3, 5]);
        // Near the edges: x starts at 2 - floor(6 / 2) = -1 -> 0 and runs 12 voxels -> [0, 12); y would end
        // at 30 - 3 + 12 = 39 but the volume has 32 voxels -> [27, 32).
        let bbox = adjust_box([(2, 8), (30, 31), (0, 0)], [2.0, 12.0, 3.0], [40, 32, 6]);
        // y: span 1, length 12, start 30 - floor(11 / 2) = 25, end 37 -> clamped to 32.
        // z: span 0 -> an empty box, kept one voxel thick.
        assert_eq!(bbox.to_ivadomed(), [0, 12, 25, 32, 0, 1]);
    }

    #[test]
    fn detection_box_of_a_volume() {
        let volume = volume_with(
            [30, 30, 8],
            &[([10, 10, 2], [19, 14, 5]), ([0, 0, 0], [0, 0, 0])],
        );
        let bbox = detection_box(&volume, 0.5, [2.0, 2.0, 1.0])
            .unwrap()
            .unwrap();
        // x: (10, 19) -> [6, 24); y: (10, 14) span 4 length 8 start 10 - 2 = 8 -> [8, 16); z: [2, 5).
        assert_eq!(bbox.to_ivadomed(), [6, 24, 8, 16, 2, 5]);
    }

    #[test]
    fn crop_and_pad_back() {
        let volume = Tensor::arange(4 * 5 * 6, (Kind::Float, Device::Cpu)).view([4, 5, 6]);
        let bbox = BoundingBox {
            min: [1, 2, 3],
            max: [3, 5, 6],
        };
        let crop = crop_tensor(&volume, &bbox);
        assert_eq!(crop.size(), vec![2, 3, 3]);
        // Voxel (0, 0, 0) of the crop is voxel (1, 2, 3) of the volume: 1 * 30 + 2 * 6 + 3 = 45.
        assert_eq!(crop.double_value(&[0, 0, 0]), 45.0);
        let full = pad_to(&crop, &bbox, [4, 5, 6]).unwrap();
        let inside = crop_tensor(&full, &bbox);
        assert!(inside.equal(&crop));
        // Everything outside is zero: the sum equals the crop's sum.
        assert_eq!(
            full.sum(Kind::Double).double_value(&[]),
            crop.sum(Kind::Double).double_value(&[])
        );
        let classes = Tensor::ones([2, 2, 3, 3], (Kind::Float, Device::Cpu));
        let padded = pad_to(&classes, &bbox, [4, 5, 6]).unwrap();
        assert_eq!(padded.size(), vec![2, 4, 5, 6]);
        assert_eq!(padded.sum(Kind::Double).double_value(&[]), 36.0);
        assert!(pad_to(&crop, &bbox, [4, 5, 7]).is_ok());
        assert!(pad_to(
            &Tensor::ones([2, 2, 2], (Kind::Float, Device::Cpu)),
            &bbox,
            [4, 5, 6]
        )
        .is_err());
    }

    #[test]
    fn box_conversions() {
        let bbox = BoundingBox::from_ivadomed(&[7, 386, 113, 231, 1, 16]).unwrap();
        assert_eq!(bbox.shape(), [379, 118, 15]);
        assert_eq!(
            bbox.clamped([131, 141, 16]).to_ivadomed(),
            [7, 131, 113, 141, 1, 16]
        );
        assert!(BoundingBox::from_ivadomed(&[1, 1, 0, 2, 0, 2]).is_err());
        assert!(BoundingBox::from_ivadomed(&[-1, 1, 0, 2, 0, 2]).is_err());
        assert!(BoundingBox::from_ivadomed(&[0, 1, 0, 2]).is_err());
    }

    #[test]
    fn object_detection_options() {
        let config: Value = serde_json::from_str(
            r#"{"object_detection_params": {"object_detection_path": "det", "safety_factor": [2.0, 2.0, 1.0]}}"#,
        )
        .unwrap();
        let parsed = ObjectDetection::from_ivadomed_config(&config)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.model, Some(PathBuf::from("det")));
        assert_eq!(parsed.safety_factor, [2.0, 2.0, 1.0]);
        let off = json!({"object_detection_params": {"object_detection_path": null}});
        assert_eq!(ObjectDetection::from_ivadomed_config(&off).unwrap(), None);
        assert_eq!(
            ObjectDetection::from_ivadomed_config(&json!({})).unwrap(),
            None
        );
        let rhai = ObjectDetection::from_json(&json!({"bounding_boxes": "b.json"})).unwrap();
        assert_eq!(rhai.safety_factor, [1.0; 3]);
        assert!(ObjectDetection::from_json(&json!({"safety_factor": [1, 1, 1]})).is_err());
        assert!(
            ObjectDetection::from_json(&json!({"model": "m", "safety_factor": [1, 1]})).is_err()
        );
        assert!(ObjectDetection::from_json(&json!({"model": "m", "factor": [1, 1, 1]})).is_err());
    }
}
