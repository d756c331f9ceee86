//! `ivado preview-transforms` (ivadomed's `visualize_transforms`): what a transform pipeline does to one
//! axial slice, as one PNG. Each row is one random draw (its own seed); the first column is the slice as
//! loaded, then one column per step, showing the sample after that step and all the steps before it. The
//! label, when given, is drawn as a green contour over the image.
//!
//! The pipeline file is a JSON list of steps as a model folder stores them (`[{"name": ..., "config": {...}}]`,
//! script steps too), a model folder's `ivado_model.json` (its `preprocess` list), or an ivadomed config file
//! (its `transformation` object, `{"Name": {params}}` in order).
//!
//! Differences from ivadomed's script, on purpose: it draws `-n` random slices and writes one PNG per slice
//! and transform; here `-n` random draws of the same slice land in one sheet, so the spread of a random
//! transform is visible at a glance. Only steps that run in the training phase (`dataset_type`) get a
//! column, as ivadomed shows its training transforms.
use crate::bids::BidsEntry;
use crate::data::{axial_samples, load_pair};
use crate::pipeline::{derive_seed, Phase, Pipeline, Step, StepTransform, Steps};
use crate::plugin::PluginRegistry;
use crate::report::curves::{register_embedded_font, FONT_FAMILY};
use crate::report::qc::{self, Plane, QcOptions};
use crate::report::{write_png, RgbImage};
use crate::volume::read_volume;
use anyhow::{anyhow, bail, ensure, Context, Result};
use ivado_sdk::Sample;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Height of the strip of column titles above the tiles, in pixels.
pub const TITLE_HEIGHT: usize = 28;
/// Default minimum size of the original slice's tile (its longer side), in pixels.
pub const DEFAULT_TILE_SIZE: usize = 256;
/// Most draws one sheet holds.
pub const MAX_DRAWS: usize = 64;
/// Title of the first column.
pub const ORIGINAL_TITLE: &str = "original";

const TITLE_FONT_SIZE: f64 = 16.0;

/// What to preview.
#[derive(Clone, Debug)]
pub struct PreviewOptions {
    pub pipeline_file: PathBuf,
    pub image: PathBuf,
    pub label: Option<PathBuf>,
    /// Rows: random draws, each with its own seed.
    pub draws: usize,
    /// Axial slice index (canonical z); default: the middle slice.
    pub slice: Option<usize>,
    pub out_dir: PathBuf,
    pub seed: u64,
    /// The original slice is upscaled by the smallest integer factor that makes its longer side at least
    /// this many pixels; every tile uses that same factor, so a crop or a resampling shows as a size change.
    pub tile_size: usize,
}

/// The steps drawn for one row, with what each recorded (its undo record: the drawn angle, whether it ran).
#[derive(Clone, Debug)]
pub struct PreviewDraw {
    pub seed: u64,
    /// One entry per step column: its title and record (`null` when it did not run on this sample).
    pub records: Vec<(String, Value)>,
}

/// What [`preview_transforms`] wrote.
#[derive(Clone, Debug)]
pub struct PreviewOutput {
    pub path: PathBuf,
    pub slice: usize,
    /// Column titles, `original` first.
    pub columns: Vec<String>,
    pub draws: Vec<PreviewDraw>,
    /// Integer upscale factor of every tile.
    pub scale: usize,
}

/// The entries of a JSON object in file order (serde_json's `Map` sorts keys, which would reorder
/// ivadomed's `transformation` steps).
struct OrderedEntries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for OrderedEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = OrderedEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of transform names to parameters")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<OrderedEntries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(OrderedEntries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// An ivadomed config file; everything but `transformation` is ignored.
#[derive(Deserialize)]
struct IvadomedConfig {
    transformation: OrderedEntries,
}

/// One ivadomed `transformation` entry as a step spec; `None` for entries with nothing to do here.
/// `spatial_rank` is the number of spatial axes of the samples (ivadomed's `Resample` names its spacings
/// per axis: `hspace`, `wspace`, `dspace`).
pub fn ivadomed_step(name: &str, params: &Value, spatial_rank: usize) -> Result<Option<Value>> {
    match name {
        // A type conversion: ivado samples are tensors from the start.
        "NumpyToTensor" => Ok(None),
        "Resample" => {
            let mut config = params.clone();
            let map = config.as_object_mut().with_context(|| {
                format!("`Resample` parameters must be an object, got {params}")
            })?;
            if map.contains_key("spacing") {
                return Ok(Some(json!({"name": name, "config": config})));
            }
            let mut spacing = Vec::new();
            for key in ["hspace", "wspace", "dspace"]
                .into_iter()
                .take(spatial_rank)
            {
                let value = map.remove(key).with_context(|| {
                    format!("`Resample` needs `{key}` (ivadomed form) or `spacing`")
                })?;
                spacing.push(value);
            }
            for key in ["hspace", "wspace", "dspace"] {
                map.remove(key);
            }
            map.insert("spacing".into(), Value::Array(spacing));
            Ok(Some(json!({"name": name, "config": config})))
        }
        _ => Ok(Some(json!({"name": name, "config": params}))),
    }
}

/// The step specs of a pipeline file's text (see the module doc for the accepted forms).
pub fn pipeline_specs_from_str(text: &str, spatial_rank: usize) -> Result<Vec<Value>> {
    let value: Value = serde_json::from_str(text).context("not valid JSON")?;
    match value {
        Value::Array(steps) => Ok(steps),
        Value::Object(map) if map.contains_key("transformation") => {
            let config: IvadomedConfig = serde_json::from_str(text)
                .context("`transformation` must be an object of transform names to parameters")?;
            let mut specs = Vec::new();
            for (index, (name, params)) in config.transformation.0.iter().enumerate() {
                let spec = ivadomed_step(name, params, spatial_rank).with_context(|| {
                    format!("`transformation` entry {} (`{name}`)", index + 1)
                })?;
                specs.extend(spec);
            }
            Ok(specs)
        }
        Value::Object(map) if map.get("preprocess").is_some_and(Value::is_array) => {
            Ok(map["preprocess"].as_array().cloned().unwrap_or_default())
        }
        _ => bail!(
            "expected a JSON list of steps ([{{\"name\": ..., \"config\": {{...}}}}, ...]), a model folder's \
             ivado_model.json (`preprocess`) or an ivadomed config (`transformation`)"
        ),
    }
}

/// How an error names a step spec: its transform name, or `script`.
fn spec_name(spec: &Value) -> String {
    if let Some(name) = spec.get("name").and_then(Value::as_str) {
        format!("`{name}`")
    } else if spec.get("script").is_some() {
        "script".to_owned()
    } else {
        "unnamed".to_owned()
    }
}

/// Builds the pipeline of a spec list; an error names the step (number and transform) that failed.
pub fn pipeline_from_specs(registry: &PluginRegistry, specs: &[Value]) -> Result<Pipeline> {
    let steps = specs
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            Step::from_spec(registry, spec)
                .with_context(|| format!("step {} ({})", index + 1, spec_name(spec)))
        })
        .collect::<Result<Steps>>()?;
    Ok(Pipeline { steps })
}

/// Reads and builds a pipeline file for 2D slices.
pub fn read_pipeline_file(registry: &PluginRegistry, path: &Path) -> Result<Pipeline> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    pipeline_specs_from_str(&text, 2)
        .and_then(|specs| pipeline_from_specs(registry, &specs))
        .with_context(|| format!("pipeline file {}", path.display()))
}

/// A column title for a step.
pub fn step_title(step: &Step) -> String {
    match &step.transform {
        StepTransform::Plugin(transform) => transform.name.clone(),
        StepTransform::Script(script) => script.function().to_owned(),
    }
}

/// `IMG.nii.gz` -> `IMG`.
pub fn image_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".to_owned());
    for suffix in [".nii.gz", ".nii"] {
        if let Some(stem) = name.strip_suffix(suffix) {
            if !stem.is_empty() {
                return stem.to_owned();
            }
        }
    }
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or(name)
}

/// A 2D plane `[H, W]` of `tensor` on the CPU as f32: the first channel of an image, the union (maximum)
/// over the leading axes of a mask.
fn plane_of(tensor: &Tensor, name: &str, mask: bool) -> Result<(Vec<f32>, usize, usize)> {
    let size = tensor.size();
    ensure!(
        size.len() >= 2,
        "`{name}` has shape {size:?}; the preview shows 2D slices"
    );
    let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
    let flat = tensor
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_reshape([-1, h, w])?;
    let plane = if mask {
        flat.f_amax([0i64].as_slice(), false)?
    } else {
        ensure!(
            size.len() <= 3,
            "`{name}` has shape {size:?}: a 2D image is [C, H, W]; the preview shows 2D slices"
        );
        flat.f_get(0)?
    };
    let values = Vec::<f32>::try_from(&plane.f_contiguous()?.f_flatten(0, -1)?)
        .map_err(|e| anyhow!("reading `{name}`: {e}"))?;
    Ok((values, h as usize, w as usize))
}

/// Rotates a row-major `h` x `w` plane 90 degrees counter-clockwise (numpy's `rot90`, as ivadomed displays
/// slices): the result is `w` x `h`, `out[i][j] = in[j][w - 1 - i]`. For a canonical axial slice `[X, Y]`
/// this puts anterior at the top and the x axis left to right.
pub fn rot90(values: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(values.len());
    for i in 0..w {
        for j in 0..h {
            out.push(values[j * w + (w - 1 - i)]);
        }
    }
    out
}

/// The spatial size `(H, W)` of a sample's `image`.
fn image_size(sample: &Sample) -> Result<(usize, usize)> {
    let size = sample.get("image")?.size();
    ensure!(
        size.len() >= 2,
        "`image` has shape {size:?}; the preview shows 2D slices"
    );
    Ok((size[size.len() - 2] as usize, size[size.len() - 1] as usize))
}

/// One tile: the sample's image (windowed to its 1st-99th percentile) with the label contour, rotated for
/// display and upscaled by `scale`.
pub fn render_tile(sample: &Sample, scale: usize) -> Result<RgbImage> {
    let (image, h, w) = plane_of(sample.get("image")?, "image", false)?;
    let image = rot90(&image, h, w);
    let label = match sample.tensors.get("label") {
        Some(label) => {
            let (values, lh, lw) = plane_of(label, "label", true)?;
            ensure!(
                (lh, lw) == (h, w),
                "`label` is {lh}x{lw} but `image` is {h}x{w}"
            );
            Some(rot90(&values, h, w))
        }
        None => None,
    };
    let options = QcOptions {
        min_size: scale * h.max(w),
        ..QcOptions::default()
    };
    qc::render_overlay(
        Plane::new(&image, w, h)?,
        label
            .as_deref()
            .map(|values| Plane::new(values, w, h))
            .transpose()?,
        None,
        &options,
    )
}

/// A white strip `width` x [`TITLE_HEIGHT`] with each title centred over its span `(left, width)` in
/// pixels; titles too wide for their span are shortened with `…`.
fn title_strip(titles: &[String], spans: &[(usize, usize)], width: usize) -> Result<RgbImage> {
    register_embedded_font()?;
    let mut buffer = vec![0u8; width * TITLE_HEIGHT * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width as u32, TITLE_HEIGHT as u32))
            .into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow!("drawing the titles: {e}"))?;
        let style = TextStyle::from((FONT_FAMILY, TITLE_FONT_SIZE).into_font())
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center));
        for (title, &(left, span)) in titles.iter().zip(spans) {
            let fits = |text: &str| {
                root.estimate_text_size(text, &style)
                    .map(|(w, _)| (w as usize) + 4 <= span)
                    .unwrap_or(false)
            };
            let mut text = title.clone();
            if !fits(&text) {
                let mut kept: Vec<char> = title.chars().collect();
                while !kept.is_empty() {
                    kept.pop();
                    text = kept.iter().collect::<String>() + "…";
                    if fits(&text) {
                        break;
                    }
                }
            }
            let centre = left + span / 2;
            root.draw(&Text::new(
                text,
                (centre as i32, (TITLE_HEIGHT / 2) as i32),
                &style,
            ))
            .map_err(|e| anyhow!("drawing the title `{title}`: {e}"))?;
        }
        root.present()
            .map_err(|e| anyhow!("drawing the titles: {e}"))?;
    }
    RgbImage::from_pixels(width, TITLE_HEIGHT, buffer)
}

/// Stacks `top` over `bottom` (same width).
fn stack(top: &RgbImage, bottom: &RgbImage) -> Result<RgbImage> {
    ensure!(
        top.width == bottom.width,
        "stacking images of different widths"
    );
    let mut pixels = Vec::with_capacity(top.pixels.len() + bottom.pixels.len());
    pixels.extend_from_slice(&top.pixels);
    pixels.extend_from_slice(&bottom.pixels);
    RgbImage::from_pixels(top.width, top.height + bottom.height, pixels)
}

/// A copy of `sample` sharing its tensors' storage.
fn shallow_copy(sample: &Sample) -> Sample {
    Sample {
        tensors: sample
            .tensors
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.shallow_clone()))
            .collect(),
        meta: sample.meta.clone(),
    }
}

/// The rendered sheet for `sample` (a 2D slice with `image`, and `label` if any): `draws` rows, one column
/// for the sample as given and one per training-phase step, the step applied after all those before it.
/// Row `r` uses the sample seed `derive_seed(seed, r)`, and step `k` its usual per-step seed, so the last
/// column is exactly what training would produce with that sample seed.
pub fn render_sheet(
    pipeline: &Pipeline,
    sample: &Sample,
    draws: usize,
    seed: u64,
    tile_size: usize,
) -> Result<(RgbImage, Vec<String>, Vec<PreviewDraw>, usize)> {
    ensure!(
        (1..=MAX_DRAWS).contains(&draws),
        "the number of draws must be in 1..={MAX_DRAWS}, got {draws}"
    );
    let (h, w) = image_size(sample)?;
    // Displayed rotated: w rows, h columns.
    let scale = qc::upscale_factor(w, h, tile_size.max(1));
    let shown: Vec<usize> = (0..pipeline.steps.len())
        .filter(|&k| pipeline.steps[k].options.runs_in(Phase::Training))
        .collect();
    let mut columns = vec![ORIGINAL_TITLE.to_owned()];
    columns.extend(shown.iter().map(|&k| step_title(&pipeline.steps[k])));
    let original = render_tile(sample, scale).context("rendering the original slice")?;
    let mut tiles = Vec::with_capacity(draws * columns.len());
    let mut summaries = Vec::with_capacity(draws);
    for row in 0..draws {
        let draw_seed = derive_seed(seed, row as u64);
        tiles.push(original.clone());
        let mut records = Vec::with_capacity(shown.len());
        for &k in &shown {
            // Each column reruns the steps up to k with the same seed: per-step seeds depend only on the
            // sample seed and the step's position, so this is the sample after step k of the full pipeline.
            let prefix = Pipeline {
                steps: Steps(pipeline.steps[..=k].to_vec()),
            };
            let (after, step_records) = prefix
                .apply_in(Phase::Training, shallow_copy(sample), draw_seed)
                .with_context(|| format!("draw {} (seed {draw_seed})", row + 1))?;
            let title = step_title(&pipeline.steps[k]);
            tiles.push(render_tile(&after, scale).with_context(|| {
                format!(
                    "rendering draw {} after step {} (`{title}`)",
                    row + 1,
                    k + 1
                )
            })?);
            records.push((title, step_records[k].clone().unwrap_or(Value::Null)));
        }
        summaries.push(PreviewDraw {
            seed: draw_seed,
            records,
        });
    }
    let grid = qc::grid(&tiles, columns.len())?;
    // Tiles sit at the top-left of equal cells: centre each title over its column's first tile.
    let cell_width = tiles.iter().map(|t| t.width).max().unwrap_or(0);
    let spans: Vec<(usize, usize)> = tiles[..columns.len()]
        .iter()
        .enumerate()
        .map(|(column, tile)| (column * (cell_width + qc::GRID_GAP), tile.width))
        .collect();
    let titles = title_strip(&columns, &spans, grid.width)?;
    Ok((stack(&titles, &grid)?, columns, summaries, scale))
}

/// Loads the image (and label) and the pipeline file, renders the sheet for one axial slice, and writes
/// `<out_dir>/preview_<image stem>.png` atomically.
pub fn preview_transforms(
    registry: &PluginRegistry,
    options: &PreviewOptions,
    device: Device,
) -> Result<PreviewOutput> {
    let pipeline = read_pipeline_file(registry, &options.pipeline_file)?;
    let (image, label) = match &options.label {
        Some(label) => {
            let entry = BidsEntry {
                subject: String::new(),
                session: None,
                contrast: String::new(),
                image: options.image.clone(),
                label: Some(label.clone()),
                sidecar: None,
                metadata: Default::default(),
                targets: Vec::new(),
                roi: None,
            };
            let (image, label) = load_pair(&entry)?;
            (image, Some(label))
        }
        None => (read_volume(&options.image)?, None),
    };
    let depth = image.data.size()[2] as usize;
    let slice = options.slice.unwrap_or(depth / 2);
    ensure!(
        slice < depth,
        "--slice {slice} is outside {} (axial slices 0..{})",
        options.image.display(),
        depth - 1
    );
    let mut sample = axial_samples(&image, label.as_ref())
        .into_iter()
        .nth(slice)
        .context("no axial slice")?;
    for tensor in sample.tensors.values_mut() {
        *tensor = tensor.f_to_device(device)?;
    }
    let (sheet, columns, draws, scale) = render_sheet(
        &pipeline,
        &sample,
        options.draws,
        options.seed,
        options.tile_size,
    )?;
    let path = options
        .out_dir
        .join(format!("preview_{}.png", image_stem(&options.image)));
    write_png(&path, &sheet).with_context(|| format!("writing {}", path.display()))?;
    Ok(PreviewOutput {
        path,
        slice,
        columns,
        draws,
        scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ivadomed_transformation_keeps_file_order_and_converts_resample() {
        // Keys deliberately out of alphabetical order: a sorted map would put CenterCrop first.
        let text = r#"{"command": "train", "transformation": {
            "Resample": {"hspace": 0.75, "wspace": 0.5, "dspace": 1},
            "RandomAffine": {"degrees": 5, "applied_to": ["im", "gt"]},
            "NumpyToTensor": {},
            "CenterCrop": {"size": [128, 128]}
        }}"#;
        let specs = pipeline_specs_from_str(text, 2).unwrap();
        assert_eq!(
            specs,
            vec![
                json!({"name": "Resample", "config": {"spacing": [0.75, 0.5]}}),
                json!({"name": "RandomAffine", "config": {"degrees": 5, "applied_to": ["im", "gt"]}}),
                json!({"name": "CenterCrop", "config": {"size": [128, 128]}}),
            ]
        );
        let three = pipeline_specs_from_str(text, 3).unwrap();
        assert_eq!(three[0]["config"]["spacing"], json!([0.75, 0.5, 1]));
    }

    #[test]
    fn pipeline_files_in_list_and_model_folder_forms() {
        let list = r#"[{"name": "NormalizeInstance", "config": {}}]"#;
        assert_eq!(
            pipeline_specs_from_str(list, 2).unwrap(),
            vec![json!({"name": "NormalizeInstance", "config": {}})]
        );
        let model = r#"{"architecture": "unet2d", "preprocess": [{"name": "CenterCrop", "config": {"size": [8, 8]}}]}"#;
        assert_eq!(pipeline_specs_from_str(model, 2).unwrap().len(), 1);
        let error = pipeline_specs_from_str(r#"{"steps": []}"#, 2)
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected a JSON list of steps"), "{error}");
        let error = format!(
            "{:#}",
            pipeline_specs_from_str(r#"{"transformation": {"Resample": {"hspace": 1}}}"#, 2)
                .unwrap_err()
        );
        assert!(
            error.contains("entry 1 (`Resample`)") && error.contains("wspace"),
            "{error}"
        );
    }

    #[test]
    fn rot90_matches_numpy() {
        // numpy.rot90([[0, 1, 2], [3, 4, 5]]) == [[2, 5], [1, 4], [0, 3]].
        let values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(rot90(&values, 2, 3), vec![2.0, 5.0, 1.0, 4.0, 0.0, 3.0]);
    }

    #[test]
    fn image_stems_drop_nifti_suffixes() {
        assert_eq!(image_stem(Path::new("/d/sub-01_T2w.nii.gz")), "sub-01_T2w");
        assert_eq!(image_stem(Path::new("a.nii")), "a");
        assert_eq!(image_stem(Path::new("b.img")), "b");
    }

    #[test]
    fn title_strip_draws_dark_text_over_each_column() {
        let titles = vec!["original".to_owned(), "RandomAffine".to_owned()];
        let strip = title_strip(&titles, &[(0, 100), (104, 100)], 204).unwrap();
        assert_eq!((strip.width, strip.height), (204, TITLE_HEIGHT));
        // Dark glyph pixels lie within each column's cell and none fall in the gutter (x 100..104).
        let dark = |x: usize| (0..TITLE_HEIGHT).any(|y| strip.get(x, y).iter().all(|&c| c < 100));
        assert!((0..100).filter(|&x| dark(x)).count() > 20);
        assert!((104..204).filter(|&x| dark(x)).count() > 20);
        assert!(!(100..104).any(dark));
    }
}
