//! The Rhai data surface: `slices(...)`, `patches(...)`, `subvolumes(...)`, `volumes(...)` cut a dataset into
//! windows (a `Samples` handle), and `loader(...)` batches them (a `Loader` handle), with options named as in
//! ivadomed's `loader_parameters`. Both can be inspected before training (`len`, `describe`, `batch`,
//! `epoch`) and passed to `train`/`trainer` as `train:`/`valid:`.
//!
//! A handle is checked when it is made, so a bad key or value is an error at that line. In `train`, a handle
//! stands for the dataset plus the flat keys it carries ([`expand_handles`]); the run then goes through the
//! same code as the flat form, so both give the same batches and metrics. The loader's batches come from
//! [`crate::train::epoch_batch_indices`] and [`crate::train::epoch_batches`], which the training loop calls
//! too: what `batch(epoch, i)` summarises is what the model sees in that epoch (before mixup).
use crate::bids::BidsEntry;
use crate::data::{assemble_group, window_groups, SamplingOptions, SliceSet};
use crate::loader::LoaderOptions;
use crate::pipeline::{LivePipeline, Phase, Pipeline};
use crate::sampling::{select, Filters, SamplingMode, Window};
use crate::script::{
    cache_options, check_keys, script_error, to_json, transforms_of, Dataset, ScriptResult,
    TransformHandle,
};
use crate::train::{epoch_batch_indices, epoch_batches, TrainData};
use anyhow::{anyhow, bail, Context, Result};
use rhai::{Array, Dynamic, Engine, Map};
use serde_json::Value;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A dataset and how it is cut into windows (`slices(...)`, `patches(...)`, `subvolumes(...)`,
/// `volumes(...)`).
#[derive(Clone)]
pub struct Samples(Rc<SamplesInner>);

struct SamplesInner {
    dataset: Dataset,
    /// The primitive that made it, for messages.
    kind: &'static str,
    options: SamplingOptions,
    /// The windows of each image, counted once (it reads every volume).
    windows: RefCell<Option<Rc<Vec<ImageWindows>>>>,
}

/// The windows of one training sample (an image, or a subject's stacked contrasts with `multichannel`).
struct ImageWindows {
    image: String,
    subject: String,
    /// Canonical (X, Y, Z) voxels.
    shape: Vec<i64>,
    /// Every window before filtering.
    total: usize,
    /// The windows training keeps (slice, ROI and patch filters), in the order the loader builds them.
    kept: Vec<Window>,
    /// Windows validation keeps (the patch filter applies at training time only, as in ivadomed).
    kept_validation: usize,
    /// Why the subject was left out (a missing contrast or ROI), when it was.
    skipped: Option<String>,
}

impl Samples {
    fn windows(&self) -> Result<Rc<Vec<ImageWindows>>> {
        if let Some(windows) = self.0.windows.borrow().as_ref() {
            return Ok(Rc::clone(windows));
        }
        let windows = Rc::new(count_windows(&self.0.dataset.entries, &self.0.options)?);
        *self.0.windows.borrow_mut() = Some(Rc::clone(&windows));
        Ok(windows)
    }

    /// Training windows after filtering.
    fn len(&self) -> Result<usize> {
        Ok(self.windows()?.iter().map(|w| w.kept.len()).sum())
    }

    fn describe_mode(&self) -> String {
        match &self.0.options.mode {
            SamplingMode::Slices { .. } => format!("{} slices", self.axis_name()),
            SamplingMode::Patches2D { length, stride, .. } => format!(
                "{}x{} patches every {}x{} of {} slices",
                length[0],
                length[1],
                stride[0],
                stride[1],
                self.axis_name()
            ),
            SamplingMode::Subvolumes { length, stride } => format!(
                "{}x{}x{} subvolumes every {}x{}x{}",
                length[0], length[1], length[2], stride[0], stride[1], stride[2]
            ),
            SamplingMode::Volume => "whole volumes".into(),
        }
    }

    fn axis_name(&self) -> String {
        self.0.options.to_json()["slice_axis"]
            .as_str()
            .unwrap_or("axial")
            .to_owned()
    }
}

/// The groups training cuts ([`window_groups`]: one per image, or per subject with `multichannel`), with the
/// windows [`select`] keeps of each, or why the group is skipped.
fn count_windows(entries: &[BidsEntry], options: &SamplingOptions) -> Result<Vec<ImageWindows>> {
    let mut counted = Vec::new();
    for group in window_groups(entries, options)? {
        let image = group.entries[0].image.display().to_string();
        let subject = group.entries[0].subject.clone();
        let loaded = match assemble_group(&group)? {
            Ok(loaded) => loaded,
            Err(reason) => {
                counted.push(ImageWindows {
                    image,
                    subject,
                    shape: Vec::new(),
                    total: 0,
                    kept: Vec::new(),
                    kept_validation: 0,
                    skipped: Some(reason),
                });
                continue;
            }
        };
        let cut = |filters: &Filters, training: bool| {
            select(
                &options.mode,
                &loaded.input,
                Some(&loaded.target),
                loaded.roi.as_ref(),
                filters,
                training,
            )
            .with_context(|| format!("cutting {image}"))
        };
        counted.push(ImageWindows {
            total: cut(&Filters::default(), true)?.len(),
            kept_validation: cut(&options.filters, false)?.len(),
            kept: cut(&options.filters, true)?,
            shape: loaded.input.size()[1..].to_vec(),
            image,
            subject,
            skipped: None,
        });
    }
    Ok(counted)
}

/// The keys each sampling primitive takes (ivadomed's loader_parameters names).
const SLICE_KEYS: &[&str] = &[
    "slice_axis",
    "slice_filter_params",
    "roi_params",
    "multichannel",
    "contrasts",
    "soft_gt",
];
const PATCH_KEYS: &[&str] = &[
    "length_2D",
    "stride_2D",
    "slice_axis",
    "slice_filter_params",
    "patch_filter_params",
    "roi_params",
    "multichannel",
    "contrasts",
    "soft_gt",
];
// ivadomed never filters 3D samples, so the filters are not offered there.
const SUBVOLUME_KEYS: &[&str] = &[
    "length_3D",
    "stride_3D",
    "multichannel",
    "contrasts",
    "soft_gt",
];
const VOLUME_KEYS: &[&str] = &["multichannel", "contrasts", "soft_gt"];

fn make_samples(
    kind: &'static str,
    known: &[&str],
    required: Option<&str>,
    dataset: Dataset,
    options: Map,
) -> ScriptResult<Samples> {
    check_keys(kind, &options, known)?;
    if let Some(key) = required.filter(|key| !options.contains_key(*key)) {
        return Err(script_error(anyhow!("{kind}: `{key}` is required")));
    }
    let json = to_json(&Dynamic::from_map(options))?;
    let mut sampling =
        SamplingOptions::from_json(&json).map_err(|e| script_error(e.context(kind)))?;
    if kind == "volumes" {
        sampling.mode = SamplingMode::Volume;
    }
    Ok(Samples(Rc::new(SamplesInner {
        dataset,
        kind,
        options: sampling,
        windows: RefCell::new(None),
    })))
}

/// `loader(samples, #{...})`: how the training loop batches a [`Samples`] handle.
#[derive(Clone)]
pub struct LoaderHandle(Rc<LoaderInner>);

struct LoaderInner {
    samples: Samples,
    /// The `train` keys it sets, as the script gave them, for [`expand_handles`].
    given: Map,
    batch_size: usize,
    seed: u64,
    balanced_epochs: usize,
    loader: LoaderOptions,
    preprocess: Pipeline,
    augment: Option<LivePipeline>,
    cache: Option<crate::cache::CacheOptions>,
    /// The preprocessed training samples, built on first use.
    data: RefCell<Option<Rc<TrainData<'static>>>>,
}

/// The `train` keys a loader carries (the names `train` itself takes).
const LOADER_KEYS: &[&str] = &[
    "batch_size",
    "num_workers",
    "prefetch",
    "cache",
    "balanced_epochs",
    "preprocess",
    "augment",
    "seed",
];

fn make_loader(samples: Samples, options: Map) -> ScriptResult<LoaderHandle> {
    check_keys("loader", &options, LOADER_KEYS)?;
    let integer = |key: &str, default: i64, minimum: i64| -> ScriptResult<i64> {
        match options.get(key) {
            None => Ok(default),
            Some(value) => value
                .as_int()
                .ok()
                .filter(|&n| n >= minimum)
                .ok_or_else(|| {
                    script_error(anyhow!(
                        "loader: `{key}` must be an integer of at least {minimum}, got {value}"
                    ))
                }),
        }
    };
    let pipeline = |key: &str| -> ScriptResult<Option<Pipeline>> {
        options
            .get(key)
            .map(|value| {
                let list = value.clone().into_array().map_err(|_| {
                    script_error(anyhow!("loader: `{key}` must be a list of transforms"))
                })?;
                transforms_of(&list)
            })
            .transpose()
    };
    let num_workers = integer(
        "num_workers",
        LoaderOptions::default().num_workers as i64,
        0,
    )? as usize;
    let cache = options
        .get("cache")
        .map(|value| cache_options("loader", &to_json(value)?))
        .transpose()?;
    if cache.is_some() && samples.0.options != SamplingOptions::default() {
        return Err(script_error(anyhow!(
            "loader: `cache` serves plain axial slices only; cut the dataset with slices(dataset) and no options"
        )));
    }
    let balanced_epochs = integer("balanced_epochs", 0, 0)? as usize;
    if cache.is_some() && balanced_epochs > 0 {
        return Err(script_error(anyhow!(
            "loader: `balanced_epochs` needs the samples in memory: remove `cache` or `balanced_epochs`"
        )));
    }
    Ok(LoaderHandle(Rc::new(LoaderInner {
        batch_size: integer("batch_size", 16, 1)? as usize,
        seed: integer("seed", 0, 0)? as u64,
        balanced_epochs,
        loader: LoaderOptions {
            num_workers,
            prefetch: integer(
                "prefetch",
                LoaderOptions::new(num_workers).prefetch as i64,
                1,
            )? as usize,
            worker_threads: 1,
        },
        preprocess: pipeline("preprocess")?.unwrap_or_default(),
        augment: pipeline("augment")?.map(LivePipeline::new),
        cache,
        samples,
        given: options,
        data: RefCell::new(None),
    })))
}

impl LoaderHandle {
    /// The training samples as `train` builds them (same pipeline, seed and sampling).
    fn data(&self) -> Result<Rc<TrainData<'static>>> {
        if let Some(data) = self.0.data.borrow().as_ref() {
            return Ok(Rc::clone(data));
        }
        let entries = &self.0.samples.0.dataset.entries;
        let data: TrainData<'static> = match &self.0.cache {
            Some(cache) => TrainData::Cached(Arc::new(crate::cache::CachedSlices::new(
                entries.to_vec(),
                Pipeline::default(),
                self.0.preprocess.clone(),
                Phase::Training,
                cache,
            )?)),
            None => Rc::new(SliceSet::build_sampled(
                Phase::Training,
                entries,
                &self.0.preprocess,
                self.0.seed,
                &self.0.samples.0.options,
            )?)
            .into(),
        };
        let data = Rc::new(data);
        *self.0.data.borrow_mut() = Some(Rc::clone(&data));
        Ok(data)
    }

    fn len(&self) -> Result<usize> {
        Ok(self.0.samples.len()?.div_ceil(self.0.batch_size))
    }

    /// Summaries of the first `count` batches of `epoch` (counted from 1, as in metrics.csv), built by the
    /// training loop's own loader with this loader's workers.
    fn summaries(&self, epoch: i64, count: usize) -> Result<Array> {
        if epoch < 1 {
            bail!("epochs count from 1 (as in metrics.csv), got {epoch}");
        }
        let epoch = epoch as usize;
        let windows = self.0.samples.windows()?;
        // Sample index -> (image, window), in the order the set was built.
        let placed: Vec<(&str, &Window)> = windows
            .iter()
            .flat_map(|w| w.kept.iter().map(move |k| (w.image.as_str(), k)))
            .collect();
        let data = self.data()?;
        if data.len() != placed.len() {
            bail!(
                "the loader built {} samples but the sampling counts {}",
                data.len(),
                placed.len()
            );
        }
        let indices = epoch_batch_indices(
            &data,
            self.0.seed,
            epoch,
            self.0.batch_size,
            self.0.balanced_epochs,
        );
        let batches = epoch_batches(
            &data,
            self.0.augment.as_ref(),
            indices.clone(),
            self.0.seed,
            epoch,
            Device::Cpu,
            self.0.loader,
        );
        let mut summaries = Array::new();
        for (index, batch) in batches.take(count).enumerate() {
            let (images, labels) = batch?;
            summaries
                .push(batch_summary(index, &indices[index], &images, &labels, &placed)?.into());
        }
        Ok(summaries)
    }
}

fn shape_array(shape: &[i64]) -> Dynamic {
    shape
        .iter()
        .map(|&n| Dynamic::from(n))
        .collect::<Array>()
        .into()
}

fn file_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map_or_else(|| path.to_owned(), |n| n.to_string_lossy().into_owned())
}

/// What a batch holds: shapes, where each sample comes from, how much foreground, the intensity range.
fn batch_summary(
    index: usize,
    samples: &[i64],
    images: &Tensor,
    labels: &Tensor,
    placed: &[(&str, &Window)],
) -> Result<Map> {
    let scalar = |t: Tensor| -> Result<f64> { Ok(t.to_kind(Kind::Double).f_double_value(&[])?) };
    let positive: Vec<bool> =
        Vec::<f32>::try_from(labels.flatten(1, -1).amax([1i64].as_slice(), false))?
            .into_iter()
            .map(|m| m > 0.0)
            .collect();
    let positive_count = positive.iter().filter(|&&p| p).count();
    let mut windows = Array::new();
    for &sample in samples {
        let (image, window) = placed[sample as usize];
        let mut map = Map::new();
        map.insert("file".into(), file_name(image).into());
        map.insert("origin".into(), shape_array(&window.origin));
        map.insert("shape".into(), shape_array(&window.shape()));
        windows.push(map.into());
    }
    let mut map = Map::new();
    map.insert("index".into(), (index as i64).into());
    map.insert("size".into(), (samples.len() as i64).into());
    map.insert("shape".into(), shape_array(&images.size()));
    map.insert("label_shape".into(), shape_array(&labels.size()));
    map.insert(
        "samples".into(),
        samples
            .iter()
            .map(|&s| Dynamic::from(s))
            .collect::<Array>()
            .into(),
    );
    map.insert(
        "files".into(),
        samples
            .iter()
            .map(|&s| Dynamic::from(file_name(placed[s as usize].0)))
            .collect::<Array>()
            .into(),
    );
    map.insert("windows".into(), windows.into());
    map.insert("positive".into(), (positive_count as i64).into());
    map.insert(
        "positive_fraction".into(),
        (positive_count as f64 / samples.len() as f64).into(),
    );
    map.insert(
        "label_mean".into(),
        scalar(labels.mean(Kind::Double))?.into(),
    );
    map.insert("min".into(), scalar(images.min())?.into());
    map.insert("max".into(), scalar(images.max())?.into());
    map.insert("mean".into(), scalar(images.mean(Kind::Double))?.into());
    Ok(map)
}

fn describe(samples: &Samples) -> Result<Map> {
    let windows = samples.windows()?;
    let mut per_image = Array::new();
    let mut shapes: Vec<Vec<i64>> = Vec::new();
    for image in windows.iter() {
        let mut map = Map::new();
        map.insert("image".into(), file_name(&image.image).into());
        map.insert("subject".into(), image.subject.clone().into());
        map.insert("shape".into(), shape_array(&image.shape));
        let window = image.kept.first().map(Window::shape);
        map.insert(
            "window".into(),
            window.as_deref().map_or(Dynamic::UNIT, shape_array),
        );
        if let Some(window) = window.filter(|w| !shapes.contains(w)) {
            shapes.push(window);
        }
        map.insert("windows".into(), (image.total as i64).into());
        map.insert("kept".into(), (image.kept.len() as i64).into());
        map.insert(
            "kept_validation".into(),
            (image.kept_validation as i64).into(),
        );
        map.insert(
            "skipped".into(),
            image.skipped.clone().map_or(Dynamic::UNIT, Dynamic::from),
        );
        per_image.push(map.into());
    }
    let mut map = Map::new();
    map.insert("kind".into(), samples.0.kind.into());
    let sampling: Dynamic = rhai::serde::to_dynamic(samples.0.options.to_json())
        .map_err(|e| anyhow!("the sampling options as a map: {e}"))?;
    map.insert("sampling".into(), sampling);
    map.insert(
        "window".into(),
        match shapes.as_slice() {
            [one] => shape_array(one),
            _ => Dynamic::UNIT,
        },
    );
    map.insert(
        "window_shapes".into(),
        shapes
            .iter()
            .map(|s| shape_array(s))
            .collect::<Array>()
            .into(),
    );
    map.insert("images".into(), (windows.len() as i64).into());
    map.insert(
        "windows".into(),
        (windows.iter().map(|w| w.total).sum::<usize>() as i64).into(),
    );
    map.insert("count".into(), (samples.len()? as i64).into());
    map.insert(
        "count_validation".into(),
        (windows.iter().map(|w| w.kept_validation).sum::<usize>() as i64).into(),
    );
    map.insert("per_image".into(), per_image.into());
    Ok(map)
}

/// Compares two values of a loader key; transform lists by their specs (they hold plugin handles).
fn same_value(a: &Dynamic, b: &Dynamic) -> ScriptResult<bool> {
    let as_json = |value: &Dynamic| -> ScriptResult<Value> {
        match value.clone().try_cast::<Array>() {
            Some(list) if list.iter().any(|v| v.is::<TransformHandle>()) => {
                Ok(Value::Array(transforms_of(&list)?.specs()))
            }
            _ => to_json(value),
        }
    };
    Ok(as_json(a)? == as_json(b)?)
}

/// Replaces `samples`/`loader` handles in `train`/`valid` by their dataset and merges the `train` keys a
/// loader carries; returns the options and the handles' sampling (None when neither is a handle). Giving a
/// key both flat and through a handle is an error naming it, and so is a `valid` handle that cuts or batches
/// differently from the `train` one (one run has one sampling and one set of loader options).
pub(crate) fn expand_handles(
    function: &str,
    mut options: Map,
) -> ScriptResult<(Map, Option<SamplingOptions>)> {
    let mut sampling: Option<SamplingOptions> = None;
    let mut carried = Map::new();
    for role in ["train", "valid"] {
        let Some(value) = options.get(role).cloned() else {
            continue;
        };
        let (samples, keys) = if let Some(samples) = value.clone().try_cast::<Samples>() {
            (samples, Map::new())
        } else if let Some(loader) = value.try_cast::<LoaderHandle>() {
            (loader.0.samples.clone(), loader.0.given.clone())
        } else {
            continue;
        };
        if let Some(key) = SamplingOptions::KEYS
            .iter()
            .find(|key| options.contains_key(**key))
        {
            return Err(script_error(anyhow!(
                "{function}: `{key}` is given both flat and through the `{role}` handle ({}(...)); give it in the handle",
                samples.0.kind
            )));
        }
        match &sampling {
            Some(train) if *train != samples.0.options => {
                return Err(script_error(anyhow!(
                    "{function}: `{role}` is cut differently from `train` ({} vs {}); one run cuts both sets the same way",
                    samples.describe_mode(),
                    Samples(Rc::new(SamplesInner {
                        dataset: samples.0.dataset.clone(),
                        kind: samples.0.kind,
                        options: train.clone(),
                        windows: RefCell::new(None),
                    }))
                    .describe_mode()
                )))
            }
            Some(_) => {}
            None => sampling = Some(samples.0.options.clone()),
        }
        for (key, value) in keys {
            if options.contains_key(key.as_str()) {
                return Err(script_error(anyhow!(
                    "{function}: `{key}` is given both flat and through the `{role}` loader(...); give it in the loader"
                )));
            }
            match carried.get(key.as_str()) {
                Some(train_value) => {
                    if !same_value(train_value, &value)? {
                        return Err(script_error(anyhow!(
                            "{function}: the `valid` loader sets `{key}` to {value} but the `train` one to {train_value}; one run has one value"
                        )));
                    }
                }
                None if role == "valid" => {
                    return Err(script_error(anyhow!(
                        "{function}: the `valid` loader sets `{key}`, which only the `train` loader may set (validation takes the run's options)"
                    )));
                }
                None => {
                    carried.insert(key, value);
                }
            }
        }
        options.insert(role.into(), Dynamic::from(samples.0.dataset.clone()));
    }
    for (key, value) in carried {
        options.insert(key, value);
    }
    Ok((options, sampling))
}

/// Registers the handles and their primitives.
pub(crate) fn register(engine: &mut Engine) {
    engine.register_type_with_name::<Samples>("Samples");
    engine.register_fn(
        "slices",
        |dataset: Dataset, options: Map| -> ScriptResult<Samples> {
            make_samples("slices", SLICE_KEYS, None, dataset, options)
        },
    );
    engine.register_fn("slices", |dataset: Dataset| -> ScriptResult<Samples> {
        make_samples("slices", SLICE_KEYS, None, dataset, Map::new())
    });
    engine.register_fn(
        "patches",
        |dataset: Dataset, options: Map| -> ScriptResult<Samples> {
            make_samples("patches", PATCH_KEYS, Some("length_2D"), dataset, options)
        },
    );
    engine.register_fn(
        "subvolumes",
        |dataset: Dataset, options: Map| -> ScriptResult<Samples> {
            make_samples(
                "subvolumes",
                SUBVOLUME_KEYS,
                Some("length_3D"),
                dataset,
                options,
            )
        },
    );
    engine.register_fn(
        "volumes",
        |dataset: Dataset, options: Map| -> ScriptResult<Samples> {
            make_samples("volumes", VOLUME_KEYS, None, dataset, options)
        },
    );
    engine.register_fn("volumes", |dataset: Dataset| -> ScriptResult<Samples> {
        make_samples("volumes", VOLUME_KEYS, None, dataset, Map::new())
    });
    let samples_len =
        |s: &mut Samples| -> ScriptResult<i64> { s.len().map(|n| n as i64).map_err(script_error) };
    engine.register_get("len", samples_len);
    engine.register_fn("len", samples_len);
    engine.register_get("dataset", |s: &mut Samples| s.0.dataset.clone());
    engine.register_fn("describe", |s: &mut Samples| -> ScriptResult<Map> {
        describe(s).map_err(script_error)
    });
    // The window shape(s) and each image's grid, without the counts' detail.
    engine.register_fn("shapes", |s: &mut Samples| -> ScriptResult<Map> {
        let full = describe(s).map_err(script_error)?;
        let mut map = Map::new();
        for key in ["window", "window_shapes"] {
            map.insert(key.into(), full[key].clone());
        }
        let grids: Array = s
            .windows()
            .map_err(script_error)?
            .iter()
            .map(|w| shape_array(&w.shape))
            .collect();
        map.insert("images".into(), grids.into());
        Ok(map)
    });
    engine.register_fn("to_string", |s: &mut Samples| {
        format!(
            "Samples({} of {} images)",
            s.describe_mode(),
            s.0.dataset.entries.len()
        )
    });

    engine.register_type_with_name::<LoaderHandle>("Loader");
    engine.register_fn(
        "loader",
        |samples: Samples, options: Map| -> ScriptResult<LoaderHandle> {
            make_loader(samples, options)
        },
    );
    engine.register_fn("loader", |samples: Samples| -> ScriptResult<LoaderHandle> {
        make_loader(samples, Map::new())
    });
    let loader_len = |l: &mut LoaderHandle| -> ScriptResult<i64> {
        l.len().map(|n| n as i64).map_err(script_error)
    };
    engine.register_get("len", loader_len);
    engine.register_fn("len", loader_len);
    engine.register_get("samples", |l: &mut LoaderHandle| l.0.samples.clone());
    engine.register_get("batch_size", |l: &mut LoaderHandle| l.0.batch_size as i64);
    // `batch(epoch, i)` builds batches 0..=i of the epoch (a batch's draws do not depend on the others).
    engine.register_fn(
        "batch",
        |l: &mut LoaderHandle, epoch: i64, index: i64| -> ScriptResult<Map> {
            let batches = l.len().map_err(script_error)?;
            if index < 0 || index as usize >= batches {
                return Err(script_error(anyhow!(
                    "batch: index {index} is out of range (the loader has {batches} batches per epoch)"
                )));
            }
            let mut summaries = l
                .summaries(epoch, index as usize + 1)
                .map_err(script_error)?;
            Ok(summaries
                .pop()
                .and_then(|s| s.try_cast::<Map>())
                .expect("a summary per batch"))
        },
    );
    // `for b in loader.epoch(1) { ... }`: every batch of the epoch, in training order.
    engine.register_fn(
        "epoch",
        |l: &mut LoaderHandle, epoch: i64| -> ScriptResult<Array> {
            l.summaries(epoch, usize::MAX).map_err(script_error)
        },
    );
    engine.register_fn("to_string", |l: &mut LoaderHandle| {
        format!(
            "Loader(batches of {} from {} images, {}, {} workers)",
            l.0.batch_size,
            l.0.samples.0.dataset.entries.len(),
            l.0.samples.describe_mode(),
            l.0.loader.num_workers
        )
    });
}
