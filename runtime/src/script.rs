//! The Rhai surface: experiment scripts call these host primitives. Plugins never see Rhai; everything a
//! script can do is registered here.
//!
//! Errors from a primitive become Rhai runtime errors at the calling line, and [`run_file`] reports every
//! error as `file:line:col: message`.
use crate::bids::{BidsEntry, BidsIndex, BidsOptions};
use crate::data::SliceSet;
use crate::losses::ScriptLoss;
use crate::model_folder;
use crate::pipeline::{LivePipeline, Phase, Pipeline, Step, StepOptions, StepTransform};
use crate::plugin::{PluginModel, PluginRegistry};
use crate::script_transform::ScriptTransform;
use crate::split::{split_entries, DataTesting, SplitParams};
use crate::train::{seed_everything, EpochRecord, Held, TrainConfig, TrainReport, Trainer};
use crate::{evaluate, infer, metrics, phantom, transfer};
use anyhow::{anyhow, Context, Result};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, NativeCallContext, Position, Scope};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use tch::Device;

/// What scripts run against: the plugins found at start-up and the compute device.
pub struct ScriptContext {
    pub registry: PluginRegistry,
    /// Set from `--device`; a script may change it with `set_device(...)`.
    pub device: Cell<Device>,
    pub progress: bool,
    /// Set by `ivado watch` / `run --watch`: every augmentation pipeline `train` creates is hot-reloaded.
    pub watcher: Option<Arc<crate::watch::Watcher>>,
}

/// A set of BIDS entries (a dataset or one part of a split).
#[derive(Clone)]
pub struct Dataset {
    pub(crate) entries: Rc<Vec<BidsEntry>>,
}

/// A training run stepped by the script (`trainer(net, #{...})`).
#[derive(Clone)]
pub struct TrainerHandle(Rc<RefCell<Trainer<'static>>>);

/// A pipeline step: a plugin transform or a script transform, with its `applied_to`/`dataset_type`.
#[derive(Clone)]
pub struct TransformHandle(pub(crate) Step);

#[derive(Clone)]
pub struct ModelHandle(Rc<PluginModel>);

pub(crate) type ScriptResult<T> = std::result::Result<T, Box<EvalAltResult>>;

pub(crate) fn script_error(error: anyhow::Error) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        format!("{error:#}").into(),
        Position::NONE,
    ))
}

/// Reads option `key` of an options map, converting with `convert`; missing keys give `default`.
fn option<T>(
    options: &Map,
    key: &str,
    default: T,
    convert: impl FnOnce(&Dynamic) -> Option<T>,
) -> ScriptResult<T> {
    match options.get(key) {
        None => Ok(default),
        Some(value) => convert(value).ok_or_else(|| {
            script_error(anyhow!(
                "option `{key}` has the wrong type ({}): {value}",
                value.type_name()
            ))
        }),
    }
}

fn number(value: &Dynamic) -> Option<f64> {
    value
        .as_float()
        .ok()
        .or_else(|| value.as_int().ok().map(|i| i as f64))
}

fn integer(value: &Dynamic) -> Option<i64> {
    value.as_int().ok()
}

fn text(value: &Dynamic) -> Option<String> {
    value.clone().into_string().ok()
}

/// Rejects option keys a primitive does not know, so a typo is an error at its line, not a silent default.
pub(crate) fn check_keys(function: &str, options: &Map, known: &[&str]) -> ScriptResult<()> {
    for key in options.keys() {
        if !known.contains(&key.as_str()) {
            return Err(script_error(anyhow!(
                "{function}: unknown option `{key}` (known: {})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

pub(crate) fn to_json(value: &Dynamic) -> ScriptResult<serde_json::Value> {
    rhai::serde::from_dynamic(value)
        .map_err(|e| script_error(anyhow!("cannot convert to JSON: {e}")))
}

fn entry_map(entry: &BidsEntry) -> Map {
    let mut map = Map::new();
    map.insert("subject".into(), entry.subject.clone().into());
    map.insert("contrast".into(), entry.contrast.clone().into());
    map.insert("image".into(), entry.image.display().to_string().into());
    map.insert(
        "label".into(),
        entry
            .label
            .as_ref()
            .map(|l| Dynamic::from(l.display().to_string()))
            .unwrap_or(Dynamic::UNIT),
    );
    let optional =
        |value: &Option<String>| value.clone().map(Dynamic::from).unwrap_or(Dynamic::UNIT);
    map.insert("session".into(), optional(&entry.session));
    map.insert("sample".into(), optional(&entry.sample));
    map.insert(
        "targets".into(),
        entry
            .targets
            .iter()
            .map(|t| {
                t.as_ref()
                    .map(|p| Dynamic::from(p.display().to_string()))
                    .unwrap_or(Dynamic::UNIT)
            })
            .collect::<Array>()
            .into(),
    );
    map.insert(
        "roi".into(),
        entry
            .roi
            .as_ref()
            .map(|p| Dynamic::from(p.display().to_string()))
            .unwrap_or(Dynamic::UNIT),
    );
    map.insert(
        "metadata".into(),
        entry
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str().into(), Dynamic::from(v.clone())))
            .collect::<Map>()
            .into(),
    );
    map
}

pub(crate) fn transforms_of(array: &Array) -> ScriptResult<Pipeline> {
    let steps = array
        .iter()
        .map(|item| {
            item.clone()
                .try_cast::<TransformHandle>()
                .map(|t| t.0)
                .ok_or_else(|| {
                    script_error(anyhow!(
                        "`preprocess` and `augment` must be lists of transform(...) or script_transform(...) values"
                    ))
                })
        })
        .collect::<ScriptResult<crate::pipeline::Steps>>()?;
    Ok(Pipeline { steps })
}

fn dataset_option(options: &Map, key: &str) -> ScriptResult<Dataset> {
    options
        .get(key)
        .and_then(|v| v.clone().try_cast::<Dataset>())
        .ok_or_else(|| {
            script_error(anyhow!(
                "option `{key}` must be a dataset (from bids(...) or split(...))"
            ))
        })
}

/// `path`, when relative, taken from the folder of the calling script (the current directory when the script
/// has no file).
fn relative_to_caller(call: &NativeCallContext, path: &str) -> PathBuf {
    let file = PathBuf::from(path);
    match call
        .call_source()
        .and_then(|source| Path::new(source).parent())
    {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file,
    }
}

/// Builds a script step; `path` is relative to the folder of the script that calls `script_transform` (the
/// current directory when the script has no file).
fn script_transform_step(
    call: &NativeCallContext,
    path: &str,
    function: &str,
    mut options: Map,
) -> ScriptResult<TransformHandle> {
    check_keys(
        "script_transform",
        &options,
        &["undo", "applied_to", "dataset_type"],
    )?;
    let undo = match options.remove("undo") {
        None => None,
        Some(value) => Some(text(&value).ok_or_else(|| {
            script_error(anyhow!("script_transform: `undo` must be a function name"))
        })?),
    };
    let mut keyed = to_json(&Dynamic::from_map(options))?;
    let step_options = StepOptions::take_from(&mut keyed)
        .map_err(|e| script_error(e.context("script_transform")))?;
    let file = relative_to_caller(call, path);
    let transform =
        ScriptTransform::load(&file, function, undo.as_deref()).map_err(script_error)?;
    Ok(TransformHandle(Step {
        transform: StepTransform::Script(Arc::new(transform)),
        options: step_options,
    }))
}

/// The options `train` and `trainer` take.
const TRAIN_OPTIONS: &[&str] = &[
    "train",
    "valid",
    "preprocess",
    "augment",
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "seed",
    "out",
    "threshold",
    "loss",
    "optimizer",
    "scheduler",
    "early_stopping_patience",
    "early_stopping_epsilon",
    "mixup_alpha",
    "gradient_clip",
    "balanced_epochs",
    "resume",
    "keep_checkpoints",
    "precision",
    "channels_last",
    "test",
    "object_detection",
    "num_workers",
    "prefetch",
    "cache",
    // sampling (see `data::SamplingOptions::KEYS`)
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
    "metadata",
    // HeMIS (hemis_unet): ivadomed's HeMISUnet model params
    "missing_probability",
    "missing_probability_growth",
];

/// Reads `train`/`trainer` options (`function` names the primitive in errors), builds the slice sets and
/// returns the prepared run, which co-owns the model, pipelines and slice sets.
fn prepare_training(
    context: &ScriptContext,
    function: &str,
    model: ModelHandle,
    options: Map,
) -> ScriptResult<Trainer<'static>> {
    // `samples(...)`/`loader(...)` handles in `train`/`valid` become the dataset plus the flat keys they carry.
    let (options, handle_sampling) = crate::script_data::expand_handles(function, options)?;
    check_keys(function, &options, TRAIN_OPTIONS)?;
    let train_set = dataset_option(&options, "train")?;
    let valid_set = dataset_option(&options, "valid")?;
    let pipeline = match options.get("preprocess") {
        Some(value) => transforms_of(
            &value
                .clone()
                .into_array()
                .map_err(|_| script_error(anyhow!("`preprocess` must be a list")))?,
        )?,
        None => Pipeline::default(),
    };
    let augment = match options.get("augment") {
        Some(value) => Some(LivePipeline::new(transforms_of(
            &value
                .clone()
                .into_array()
                .map_err(|_| script_error(anyhow!("`augment` must be a list")))?,
        )?)),
        None => None,
    };
    let optimizer = match options.get("optimizer") {
        Some(value) => {
            if options.contains_key("learning_rate") || options.contains_key("weight_decay") {
                return Err(script_error(anyhow!(
                    "{function}: give `learning_rate`/`weight_decay` inside `optimizer` (as `lr`/`weight_decay`), not both"
                )));
            }
            to_json(value)?
        }
        None => json!({
            "name": "Adam",
            "lr": option(&options, "learning_rate", 1e-3, number)?,
            "weight_decay": option(&options, "weight_decay", 0.0, number)?,
        }),
    };
    let optional_number = |key: &str| -> ScriptResult<Option<f64>> {
        options
            .get(key)
            .map(|v| {
                number(v).ok_or_else(|| {
                    script_error(anyhow!("{function}: `{key}` must be a number, got {v}"))
                })
            })
            .transpose()
    };
    if let (Some(watcher), Some(live)) = (&context.watcher, &augment) {
        watcher.register("augment", live).map_err(script_error)?;
    }
    let early_stopping_patience = options
        .get("early_stopping_patience")
        .map(|v| {
            integer(v)
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    script_error(anyhow!(
                        "{function}: `early_stopping_patience` must be a positive integer, got {v}"
                    ))
                })
        })
        .transpose()?;
    let precision = option(&options, "precision", "fp32".to_owned(), text)?;
    let num_workers = match options.get("num_workers") {
        Some(value) => integer(value).filter(|&n| n >= 0).ok_or_else(|| {
            script_error(anyhow!(
                "{function}: `num_workers` must be a non-negative integer, got {value}"
            ))
        })? as usize,
        None => crate::loader::LoaderOptions::default().num_workers,
    };
    let metadata = match options.get("metadata") {
        None => None,
        Some(value) => match text(value).as_deref() {
            Some("mri_params") => Some("mri_params"),
            _ => {
                return Err(script_error(anyhow!(
                    "{function}: `metadata` must be \"mri_params\" (FiLM on FlipAngle, RepetitionTime, \
                     EchoTime and Manufacturer), got {value}"
                )))
            }
        },
    };
    let mut config = TrainConfig {
        epochs: option(&options, "epochs", 10, integer)?.max(1) as usize,
        batch_size: option(&options, "batch_size", 16, integer)?.max(1) as usize,
        seed: option(&options, "seed", 0, integer)? as u64,
        out_dir: PathBuf::from(option(&options, "out", "runs/experiment".to_owned(), text)?),
        device: context.device.get(),
        threshold: option(&options, "threshold", 0.5, number)?,
        progress: context.progress,
        loss: match options.get("loss") {
            Some(value) => to_json(value)?,
            None => json!({"name": "DiceLoss"}),
        },
        optimizer,
        scheduler: options.get("scheduler").map(to_json).transpose()?,
        early_stopping_patience,
        early_stopping_epsilon: option(&options, "early_stopping_epsilon", 0.001, number)?,
        mixup_alpha: optional_number("mixup_alpha")?,
        gradient_clip: optional_number("gradient_clip")?,
        balanced_epochs: option(&options, "balanced_epochs", 0, integer)?.max(0) as usize,
        resume: option(&options, "resume", false, |v| v.as_bool().ok())?,
        keep_checkpoints: option(&options, "keep_checkpoints", 2, integer)?.max(2) as usize,
        manifest: Value::Null,
        precision: crate::precision::Precision::parse(&precision).map_err(script_error)?,
        channels_last: option(&options, "channels_last", false, |v| v.as_bool().ok())?,
        num_workers,
        prefetch: match options.get("prefetch") {
            Some(value) => integer(value).filter(|&n| n > 0).ok_or_else(|| {
                script_error(anyhow!(
                    "{function}: `prefetch` must be a positive integer, got {value}"
                ))
            })? as usize,
            None => crate::loader::LoaderOptions::new(num_workers).prefetch,
        },
        metadata_encoder: None,
        modality_drops: None,
    };
    // The object-detection cascade trains on crops around the detected structure (see cascade.rs).
    let (train_set, valid_set, detection_stage) = match options.get("object_detection") {
        Some(value) => {
            let params = crate::cascade::ObjectDetection::from_json(&to_json(value)?)
                .map_err(|e| script_error(e.context(function.to_owned())))?;
            let crops = crate::cascade::prepare_training_crops(
                &context.registry,
                config.device,
                &params,
                &[&train_set.entries, &valid_set.entries],
                &config.out_dir,
            )
            .map_err(script_error)?;
            let [train, valid]: [Vec<BidsEntry>; 2] =
                crops.sets.try_into().expect("two sets in, two out");
            let dataset = |entries| Dataset {
                entries: Rc::new(entries),
            };
            (dataset(train), dataset(valid), Some(crops.stage))
        }
        None => (train_set, valid_set, None),
    };
    let mut sampling = match handle_sampling {
        Some(sampling) => sampling,
        None => {
            let mut sampling_json = serde_json::Map::new();
            for key in crate::data::SamplingOptions::KEYS {
                if let Some(value) = options.get(*key) {
                    sampling_json.insert((*key).to_owned(), to_json(value)?);
                }
            }
            crate::data::SamplingOptions::from_json(&Value::Object(sampling_json))
                .map_err(|e| script_error(e.context(function.to_owned())))?
        }
    };
    config.modality_drops = hemis_sampling(
        function,
        &model.0.architecture,
        &model.0.config,
        &options,
        metadata.is_some(),
        &mut sampling,
    )?;
    // Training slices in memory, or lazily from a volume cache under a byte budget.
    enum TrainSlices {
        Memory(SliceSet),
        Cached(Arc<dyn crate::cache::LazySamples>),
    }
    let mut train_slices = match options.get("cache") {
        Some(value) => {
            let cache = cache_options(function, &to_json(value)?)?;
            let set: Arc<dyn crate::cache::LazySamples> =
                if sampling.is_plain_axial(&train_set.entries) {
                    Arc::new(
                        crate::cache::CachedSlices::new(
                            train_set.entries.to_vec(),
                            Pipeline::default(),
                            pipeline.clone(),
                            Phase::Training,
                            &cache,
                        )
                        .map_err(script_error)?,
                    )
                } else {
                    Arc::new(
                        crate::cache::CachedWindows::new(
                            &train_set.entries,
                            pipeline.clone(),
                            Phase::Training,
                            config.seed,
                            &sampling,
                            &cache,
                        )
                        .map_err(script_error)?,
                    )
                };
            TrainSlices::Cached(set)
        }
        None => TrainSlices::Memory(
            SliceSet::build_sampled(
                Phase::Training,
                &train_set.entries,
                &pipeline,
                config.seed,
                &sampling,
            )
            .map_err(script_error)?,
        ),
    };
    let mut valid_slices = SliceSet::build_sampled(
        Phase::Validation,
        &valid_set.entries,
        &pipeline,
        config.seed,
        &sampling,
    )
    .map_err(script_error)?;
    if metadata.is_some() {
        // ivadomed's FiLM input: fitted on the training set only, then applied to both sets.
        let mut film = || -> anyhow::Result<Value> {
            use crate::channels::{check_film_model, mri_params_of_entries, FilmEncoder};
            let train_params = mri_params_of_entries(&train_set.entries)?;
            let encoder = FilmEncoder::fit(&train_params)?;
            check_film_model(&model.0.architecture, &model.0.config, &encoder)?;
            let valid_params = mri_params_of_entries(&valid_set.entries)?;
            let encode = |params: &[crate::channels::MriParams]| -> Vec<Vec<f32>> {
                params.iter().map(|p| encoder.encode(p)).collect()
            };
            let TrainSlices::Memory(train_memory) = &mut train_slices else {
                anyhow::bail!("`cache` does not carry FiLM metadata; train in memory (no `cache`)");
            };
            train_memory.set_metadata(&encode(&train_params))?;
            valid_slices.set_metadata(&encode(&valid_params))?;
            Ok(encoder.to_json())
        };
        config.metadata_encoder =
            Some(film().map_err(|e| script_error(e.context(format!("{function}: metadata"))))?);
    }
    let train_slices: crate::train::TrainData<'static> = match train_slices {
        TrainSlices::Memory(set) => Rc::new(set).into(),
        TrainSlices::Cached(set) => crate::train::TrainData::Cached(set),
    };
    println!(
        "training {} on {} ({} parameters): {} train samples, {} validation samples from {} volumes",
        model.0.architecture,
        crate::device::describe(config.device),
        model.0.parameter_count(),
        train_slices.len(),
        valid_slices.len(),
        valid_slices.volumes.len()
    );
    let contrasts: std::collections::BTreeSet<&str> = train_set
        .entries
        .iter()
        .map(|e| e.contrast.as_str())
        .collect();
    let subjects = |set: &Dataset| -> std::collections::BTreeSet<String> {
        set.entries.iter().map(|e| e.subject.clone()).collect()
    };
    let all_entries: Vec<_> = train_set
        .entries
        .iter()
        .chain(valid_set.entries.iter())
        .cloned()
        .collect();
    let sampling_record = sampling.to_json();
    let mut data = json!({
        "slice_axis": sampling_record.get("slice_axis").cloned().unwrap_or(Value::Null),
        "sampling": sampling_record,
        "contrasts": contrasts,
        "seed": config.seed,
        "dataset_fingerprint": model_folder::dataset_fingerprint(&all_entries),
        "split": {"train": subjects(&train_set), "valid": subjects(&valid_set)},
    });
    // `ivado test` / test_model read the held-out images from here.
    if options.contains_key("test") {
        crate::testing::record_test_split(&mut data, &dataset_option(&options, "test")?.entries);
    }
    if let Some(stage) = detection_stage {
        data["object_detection"] = stage;
    }
    if let Some(kind) = metadata {
        data["metadata"] = json!(kind);
    }
    Trainer::new(
        Rc::clone(&model.0),
        Rc::new(pipeline),
        train_slices,
        Rc::new(valid_slices),
        data,
        config,
        augment.map(|live| Held::Shared(Rc::new(live))),
    )
    .map_err(script_error)
}

/// A HeMIS model (`hemis_unet`) trains on one multi-channel sample per subject in the model's contrast
/// order, keeping subjects that lack a contrast (zero channel, 0 in the mask), with the random drops of
/// `missing_probability` / `missing_probability_growth` (ivadomed's defaults when absent: no drop, growth 1).
/// Those options are refused for other models.
fn hemis_sampling(
    function: &str,
    architecture: &str,
    config: &Value,
    options: &Map,
    film: bool,
    sampling: &mut crate::data::SamplingOptions,
) -> ScriptResult<Option<crate::channels::ModalityDrops>> {
    let number_of = |key: &str, default: f64| -> ScriptResult<f64> {
        options.get(key).map_or(Ok(default), |v| {
            number(v).ok_or_else(|| {
                script_error(anyhow!("{function}: `{key}` must be a number, got {v}"))
            })
        })
    };
    let Some(contrasts) = crate::channels::hemis_contrasts(architecture, config) else {
        if let Some(key) = ["missing_probability", "missing_probability_growth"]
            .into_iter()
            .find(|k| options.contains_key(*k))
        {
            return Err(script_error(anyhow!(
                "{function}: `{key}` applies to hemis_unet models only, not {architecture}"
            )));
        }
        return Ok(None);
    };
    if film {
        return Err(script_error(anyhow!(
            "{function}: hemis_unet takes the availability mask as its second input, not FiLM `metadata`"
        )));
    }
    if !sampling.contrasts.is_empty() && sampling.contrasts != contrasts {
        return Err(script_error(anyhow!(
            "{function}: `contrasts` {:?} differs from the model's contrasts {contrasts:?}, which set the \
             channel order of hemis_unet",
            sampling.contrasts
        )));
    }
    sampling.multichannel = true;
    sampling.contrasts = contrasts;
    sampling.missing_contrast = crate::channels::MissingContrast::ZeroChannel;
    let drops = crate::channels::ModalityDrops::new(
        number_of("missing_probability", 0.0)?,
        number_of("missing_probability_growth", 1.0)?,
    )
    .map_err(|e| script_error(e.context(function.to_owned())))?;
    Ok(Some(drops))
}

/// `cache: #{budget_mb: N, disk: "<dir>"}`: train on lazily read slices, holding at most N MiB of prepared
/// volumes in memory (default: no limit) and keeping prepared volumes in `disk` when given.
pub(crate) fn cache_options(
    function: &str,
    value: &Value,
) -> ScriptResult<crate::cache::CacheOptions> {
    let Some(map) = value.as_object() else {
        return Err(script_error(anyhow!(
            "{function}: `cache` must be a map like #{{budget_mb: 512, disk: \"cache\"}}"
        )));
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !["budget_mb", "disk"].contains(&k.as_str()))
    {
        return Err(script_error(anyhow!(
            "{function}: `cache` has no option `{unknown}` (known: budget_mb, disk)"
        )));
    }
    let memory_budget = match map.get("budget_mb") {
        None => usize::MAX,
        Some(budget) => {
            let megabytes = budget.as_f64().filter(|&b| b >= 0.0).ok_or_else(|| {
                script_error(anyhow!(
                    "{function}: `cache.budget_mb` must be a non-negative number, got {budget}"
                ))
            })?;
            (megabytes * 1024.0 * 1024.0) as usize
        }
    };
    let disk = match map.get("disk") {
        None => None,
        Some(Value::String(dir)) => Some(PathBuf::from(dir)),
        Some(other) => {
            return Err(script_error(anyhow!(
                "{function}: `cache.disk` must be a folder path, got {other}"
            )))
        }
    };
    Ok(crate::cache::CacheOptions {
        memory_budget,
        disk,
    })
}

/// One epoch's record as a script map.
fn record_map(record: &EpochRecord) -> Map {
    let mut map = Map::new();
    map.insert("epoch".into(), (record.epoch as i64).into());
    map.insert("train_loss".into(), record.train_loss.into());
    map.insert("valid_loss".into(), record.valid_loss.into());
    map.insert("valid_dice".into(), record.valid_dice.into());
    map.insert("learning_rate".into(), record.learning_rate.into());
    map.insert("seconds".into(), record.seconds.into());
    map
}

/// What `train` returns and `report()` gives.
fn report_map(report: &TrainReport) -> Map {
    let history: Array = report
        .history
        .iter()
        .map(|r| record_map(r).into())
        .collect();
    let mut result = Map::new();
    result.insert("best_dice".into(), report.best_dice.into());
    result.insert("best_epoch".into(), (report.best_epoch as i64).into());
    result.insert(
        "model_dir".into(),
        report.model_dir.display().to_string().into(),
    );
    result.insert(
        "metrics_csv".into(),
        report.metrics_csv.display().to_string().into(),
    );
    result.insert(
        "last_checkpoint".into(),
        report.last_checkpoint.display().to_string().into(),
    );
    result.insert("stopped_early".into(), report.stopped_early.into());
    result.insert("stopped_by_script".into(), report.stopped_by_caller.into());
    result.insert("resumed_from".into(), (report.resumed_from as i64).into());
    result.insert("history".into(), history.into());
    result
}

/// A model folder loaded once (network, weights and preprocessing) for repeated segmentation.
#[derive(Clone)]
pub struct TrainedModel(Rc<model_folder::LoadedModel>);

fn load_trained(context: &ScriptContext, model_dir: &str) -> ScriptResult<TrainedModel> {
    model_folder::load(
        Path::new(model_dir),
        &context.registry,
        context.device.get(),
    )
    .map(|loaded| TrainedModel(Rc::new(loaded)))
    .map_err(script_error)
}

/// Segments `image` and writes the binary mask to `out`; returns the path written.
fn segment_to_file(
    context: &ScriptContext,
    model: &TrainedModel,
    image: &str,
    out: &str,
) -> ScriptResult<String> {
    let device = context.device.get();
    // Through the detection stage when the model folder records one (object-detection cascade).
    let prediction = crate::cascade::segment(
        &model.0,
        None,
        &context.registry,
        Path::new(image),
        device,
        16,
    )
    .map_err(script_error)?;
    let (source, soft) = (prediction.source, prediction.soft);
    let written =
        infer::write_segmentation(&source, &soft, Path::new(out), 0.5).map_err(script_error)?;
    Ok(written[0].display().to_string())
}

/// Segments an image, a multi-contrast volume (`"a.nii.gz,b.nii.gz"`), a BIDS folder, a list file, or an
/// array of those, with the options of `ivado segment` as a map; returns every file written.
fn segment_with_options(
    context: &ScriptContext,
    model: &TrainedModel,
    images: &Dynamic,
    options: &Map,
) -> ScriptResult<Array> {
    let arguments: Vec<String> = if let Some(list) = images.clone().try_cast::<Array>() {
        list.iter()
            .map(|item| match item.clone().try_cast::<Array>() {
                Some(channels) => channels
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                None => item.to_string(),
            })
            .collect()
    } else {
        vec![images.to_string()]
    };
    let (options, target) = infer::options_from_json(
        &to_json(&Dynamic::from(options.clone()))?,
        context.device.get(),
    )
    .map_err(script_error)?;
    let inputs = infer::expand_inputs(&arguments, &[], &model.0).map_err(script_error)?;
    let written =
        infer::segment_inputs(&model.0, &inputs, &target, &options).map_err(script_error)?;
    Ok(written
        .into_iter()
        .flatten()
        .map(|path| Dynamic::from(path.display().to_string()))
        .collect())
}

/// Builds an engine with every primitive registered.
pub fn engine(context: Rc<ScriptContext>) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_expr_depths(128, 64);
    crate::script_data::register(&mut engine);

    engine.register_type_with_name::<Dataset>("Dataset");
    engine.register_get("len", |d: &mut Dataset| d.entries.len() as i64);
    engine.register_fn("len", |d: &mut Dataset| d.entries.len() as i64);
    engine.register_fn("entries", |d: &mut Dataset| -> Array {
        d.entries.iter().map(|e| entry_map(e).into()).collect()
    });
    engine.register_get("subjects", |d: &mut Dataset| -> Array {
        let mut subjects: Vec<String> = d.entries.iter().map(|e| e.subject.clone()).collect();
        subjects.dedup();
        subjects.into_iter().map(Dynamic::from).collect()
    });
    engine.register_fn("to_string", |d: &mut Dataset| {
        format!("Dataset({} images)", d.entries.len())
    });

    engine.register_type_with_name::<TransformHandle>("Transform");
    engine.register_fn("to_string", |t: &mut TransformHandle| {
        match &t.0.transform {
            StepTransform::Plugin(transform) => {
                format!("Transform({} {})", transform.name, transform.config)
            }
            StepTransform::Script(_) => format!("Transform({})", t.0.label()),
        }
    });

    engine.register_type_with_name::<ModelHandle>("Model");
    engine.register_get("parameter_count", |m: &mut ModelHandle| {
        m.0.parameter_count()
    });
    engine.register_get("architecture", |m: &mut ModelHandle| {
        m.0.architecture.clone()
    });
    engine.register_fn("to_string", |m: &mut ModelHandle| {
        format!(
            "Model({} from plugin `{}`, {} parameters)",
            m.0.architecture,
            m.0.library().name,
            m.0.parameter_count()
        )
    });

    engine.register_fn("seed", |seed: i64| seed_everything(seed as u64));

    {
        let context = Rc::clone(&context);
        engine.register_fn("device", move || {
            crate::device::describe(context.device.get())
        });
    }
    {
        let context = Rc::clone(&context);
        engine.register_fn("set_device", move |request: &str| -> ScriptResult<String> {
            let request: crate::device::DeviceRequest = request.parse().map_err(script_error)?;
            let device = crate::device::resolve(request).map_err(script_error)?;
            context.device.set(device);
            Ok(crate::device::describe(device))
        });
    }

    engine.register_fn(
        "phantom_dataset",
        |path: &str, options: Map| -> ScriptResult<String> {
            check_keys(
                "phantom_dataset",
                &options,
                &["subjects", "seed", "noise", "contrasts"],
            )?;
            let mut spec = phantom::PhantomSpec::default();
            spec.subjects =
                option(&options, "subjects", spec.subjects as i64, integer)?.max(1) as usize;
            spec.seed = option(&options, "seed", spec.seed as i64, integer)? as u64;
            spec.noise = option(&options, "noise", spec.noise, number)?;
            if let Some(contrasts) = options.get("contrasts") {
                spec.contrasts = contrasts
                    .clone()
                    .into_typed_array::<String>()
                    .map_err(|_| {
                        script_error(anyhow!("option `contrasts` must be a list of strings"))
                    })?;
            }
            let root = Path::new(path);
            if root.join("dataset_description.json").is_file() {
                tracing::info!("using the phantom dataset already at {path}");
            } else {
                let files = phantom::generate(root, &spec).map_err(script_error)?;
                tracing::info!("generated a phantom dataset at {path} ({files} files)");
            }
            Ok(path.to_owned())
        },
    );

    // `bids(path, #{...})`: `path` is one dataset root or a list of roots; the options are ivadomed's
    // loader_parameters (see `BidsOptions::from_json`). The dataset keeps the images that have a label.
    engine.register_fn(
        "bids",
        |path: Dynamic, options: Map| -> ScriptResult<Dataset> {
            check_keys("bids", &options, BidsOptions::KEYS)?;
            let roots: Vec<PathBuf> = match path.clone().into_typed_array::<String>() {
                Ok(roots) => roots.into_iter().map(PathBuf::from).collect(),
                Err(_) => vec![PathBuf::from(path.into_string().map_err(|_| {
                    script_error(anyhow!(
                        "bids: the path must be a string or a list of strings"
                    ))
                })?)],
            };
            let json = to_json(&Dynamic::from_map(options))?;
            let options =
                BidsOptions::from_json(&json).map_err(|e| script_error(e.context("bids")))?;
            let index = BidsIndex::build(&roots, &options).map_err(script_error)?;
            let labelled = |e: &BidsEntry| e.targets.iter().any(Option::is_some);
            let entries: Vec<BidsEntry> = index
                .entries
                .into_iter()
                .filter(|e| {
                    options.target_suffixes.is_empty()
                        || labelled(e)
                        || options.missing_label == crate::bids::MissingLabel::Keep
                })
                .collect();
            if entries.is_empty() {
                let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
                return Err(script_error(anyhow!(
                    "{}: no image selected (labels {:?})",
                    roots.join(", "),
                    options.target_suffixes
                )));
            }
            Ok(Dataset {
                entries: Rc::new(entries),
            })
        },
    );

    // The images of the given subjects, e.g. `subset(dataset, ["sub-unf01", "sub-unf02"])` for a fixed split.
    engine.register_fn(
        "subset",
        |dataset: Dataset, subjects: Array| -> ScriptResult<Dataset> {
            let subjects: Vec<String> = subjects
                .into_iter()
                .map(|s| {
                    s.into_string()
                        .map_err(|_| script_error(anyhow!("subset: subjects must be strings")))
                })
                .collect::<ScriptResult<_>>()?;
            if let Some(unknown) = subjects
                .iter()
                .find(|s| !dataset.entries.iter().any(|e| &e.subject == *s))
            {
                return Err(script_error(anyhow!(
                    "subset: no image of subject `{unknown}` in the dataset"
                )));
            }
            let entries: Vec<BidsEntry> = dataset
                .entries
                .iter()
                .filter(|e| subjects.contains(&e.subject))
                .cloned()
                .collect();
            Ok(Dataset {
                entries: Rc::new(entries),
            })
        },
    );

    // ivadomed's `split_dataset` options; `path_output` writes split_datasets.json there, `fname_split`
    // (relative to the script) reads a split back instead of drawing one.
    engine.register_fn(
        "split",
        |call: NativeCallContext, dataset: Dataset, options: Map| -> ScriptResult<Map> {
            check_keys(
                "split",
                &options,
                &[
                    "train_fraction",
                    "test_fraction",
                    "random_seed",
                    "split_method",
                    "data_testing",
                    "fname_split",
                    "path_output",
                ],
            )?;
            let defaults = SplitParams::default();
            let data_testing = match options.get("data_testing") {
                None => DataTesting::default(),
                Some(value) => {
                    let testing = value.clone().try_cast::<Map>().ok_or_else(|| {
                        script_error(anyhow!(
                            "split: `data_testing` must be a map #{{data_type: ..., data_value: [...]}}"
                        ))
                    })?;
                    check_keys("split: data_testing", &testing, &["data_type", "data_value"])?;
                    let data_type = match testing.get("data_type") {
                        None => None,
                        Some(v) if v.is_unit() => None,
                        Some(v) => Some(text(v).ok_or_else(|| {
                            script_error(anyhow!("split: `data_testing.data_type` must be a string"))
                        })?),
                    };
                    let data_value = match testing.get("data_value") {
                        None => Vec::new(),
                        Some(v) => v
                            .clone()
                            .into_typed_array::<Dynamic>()
                            .map_err(|_| {
                                script_error(anyhow!("split: `data_testing.data_value` must be a list"))
                            })?
                            .iter()
                            // Centre ids may be written as numbers in a script; tsv cells are text.
                            .map(|item| text(item).unwrap_or_else(|| item.to_string()))
                            .collect(),
                    };
                    DataTesting { data_type, data_value }
                }
            };
            let params = SplitParams {
                split_method: option(&options, "split_method", defaults.split_method, text)?,
                train_fraction: option(&options, "train_fraction", defaults.train_fraction, number)?,
                test_fraction: option(&options, "test_fraction", defaults.test_fraction, number)?,
                random_seed: option(&options, "random_seed", defaults.random_seed as i64, integer)?
                    .try_into()
                    .map_err(|_| script_error(anyhow!("split: `random_seed` must not be negative")))?,
                data_testing,
                fname_split: option(&options, "fname_split", None, |v| text(v).map(Some))?
                    .map(|path| relative_to_caller(&call, &path)),
            };
            let output = option(&options, "path_output", None, |v| text(v).map(Some))?
                .map(|path| relative_to_caller(&call, &path));
            let split = split_entries(&dataset.entries, &params, output.as_deref())
                .map_err(|e| script_error(e.context("split")))?;
            let mut map = Map::new();
            map.insert("train".into(), Dynamic::from(Dataset { entries: Rc::new(split.train) }));
            map.insert("valid".into(), Dynamic::from(Dataset { entries: Rc::new(split.valid) }));
            map.insert("test".into(), Dynamic::from(Dataset { entries: Rc::new(split.test) }));
            Ok(map)
        },
    );

    {
        let context = Rc::clone(&context);
        engine.register_fn(
            "transform",
            move |name: &str, options: Map| -> ScriptResult<TransformHandle> {
                let mut config = to_json(&Dynamic::from_map(options))?;
                let options = StepOptions::take_from(&mut config)
                    .map_err(|e| script_error(e.context(format!("transform `{name}`"))))?;
                let transform = context
                    .registry
                    .transform(name, &config)
                    .map_err(script_error)?;
                Ok(TransformHandle(Step {
                    transform: StepTransform::Plugin(Arc::new(transform)),
                    options,
                }))
            },
        );
    }

    // script_transform("preprocess.rhai", "my_step"[, #{undo: "my_step_undo", applied_to: [...], dataset_type: [...]}]):
    // a step running a Rhai function; a relative path is taken from the calling script's folder.
    engine.register_fn(
        "script_transform",
        |call: NativeCallContext, path: &str, function: &str| -> ScriptResult<TransformHandle> {
            script_transform_step(&call, path, function, Map::new())
        },
    );
    engine.register_fn(
        "script_transform",
        |call: NativeCallContext,
         path: &str,
         function: &str,
         options: Map|
         -> ScriptResult<TransformHandle> {
            script_transform_step(&call, path, function, options)
        },
    );

    {
        let context = Rc::clone(&context);
        engine.register_fn(
            "model",
            move |architecture: &str, options: Map| -> ScriptResult<ModelHandle> {
                let config = to_json(&Dynamic::from_map(options))?;
                let model = context
                    .registry
                    .model(architecture, &config, context.device.get())
                    .map_err(script_error)?;
                Ok(ModelHandle(Rc::new(model)))
            },
        );
    }

    {
        let context = Rc::clone(&context);
        engine.register_fn(
            "train",
            move |model: ModelHandle, options: Map| -> ScriptResult<Map> {
                let mut trainer = prepare_training(&context, "train", model, options)?;
                while !trainer.finished() {
                    trainer.run_epoch().map_err(script_error)?;
                }
                trainer
                    .report()
                    .map(|r| report_map(&r))
                    .map_err(script_error)
            },
        );
    }

    // Step by step: `let t = trainer(net, #{...}); while !t.finished { let r = t.run_epoch(); ... }`.
    engine.register_type_with_name::<TrainerHandle>("Trainer");
    {
        let context = Rc::clone(&context);
        engine.register_fn(
            "trainer",
            move |model: ModelHandle, options: Map| -> ScriptResult<TrainerHandle> {
                let trainer = prepare_training(&context, "trainer", model, options)?;
                Ok(TrainerHandle(Rc::new(RefCell::new(trainer))))
            },
        );
    }
    engine.register_fn("run_epoch", |t: &mut TrainerHandle| -> ScriptResult<Map> {
        let mut trainer = t.0.borrow_mut();
        let record = trainer.run_epoch().map_err(script_error)?;
        let mut map = record_map(&record);
        map.insert("stopped_early".into(), trainer.stopped_early().into());
        Ok(map)
    });
    engine.register_get("finished", |t: &mut TrainerHandle| t.0.borrow().finished());
    engine.register_get("history", |t: &mut TrainerHandle| -> Array {
        t.0.borrow()
            .history()
            .iter()
            .map(|r| record_map(r).into())
            .collect()
    });
    engine.register_get("next_epoch", |t: &mut TrainerHandle| {
        t.0.borrow().next_epoch() as i64
    });
    engine.register_get("epochs", |t: &mut TrainerHandle| {
        t.0.borrow().config().epochs as i64
    });
    engine.register_fn("report", |t: &mut TrainerHandle| -> ScriptResult<Map> {
        t.0.borrow()
            .report()
            .map(|r| report_map(&r))
            .map_err(script_error)
    });
    // The script's own stopping rule: no further epoch runs, and the manifest gets its final timing.
    engine.register_fn("stop", |t: &mut TrainerHandle| -> ScriptResult<()> {
        t.0.borrow_mut().stop().map_err(script_error)
    });
    engine.register_fn("to_string", |t: &mut TrainerHandle| {
        let trainer = t.0.borrow();
        format!(
            "Trainer({} of {} epochs run{})",
            trainer.history().len(),
            trainer.config().epochs,
            if trainer.finished() { ", finished" } else { "" }
        )
    });

    // script_loss("losses.rhai", "my_loss"): a loss config for `loss:` running `fn my_loss(prediction, target)`;
    // a relative path is taken from the calling script's folder.
    engine.register_fn(
        "script_loss",
        |call: NativeCallContext, path: &str, function: &str| -> ScriptResult<Map> {
            let loss = ScriptLoss::load(&relative_to_caller(&call, path), function)
                .map_err(script_error)?;
            rhai::serde::to_dynamic(loss.config())?
                .try_cast::<Map>()
                .ok_or_else(|| script_error(anyhow!("script_loss: the config is not a map")))
        },
    );

    engine.register_fn("summary", |m: &mut ModelHandle| transfer::summary(&m.0));

    {
        // Every architecture the loaded plugins offer, with its defaults: `for a in architectures() { print(a.name) }`.
        let context = Rc::clone(&context);
        engine.register_fn("architectures", move || -> Array {
            context
                .registry
                .libraries
                .iter()
                .flat_map(|library| {
                    library.architectures.iter().map(move |component| {
                        let mut map = Map::new();
                        map.insert("name".into(), component.name.clone().into());
                        map.insert("plugin".into(), library.name.clone().into());
                        map.insert("version".into(), library.version.clone().into());
                        map.insert("summary".into(), component.summary.clone().into());
                        let defaults =
                            rhai::serde::to_dynamic(&component.defaults).unwrap_or_default();
                        map.insert("defaults".into(), defaults);
                        Dynamic::from_map(map)
                    })
                })
                .collect()
        });
    }

    {
        // ivadomed's transfer learning: the model folder's network with its first layers frozen and, with
        // `reset`, the rest re-initialised; train it like any model.
        let context = Rc::clone(&context);
        engine.register_fn(
            "retrain",
            move |model_dir: &str, options: Map| -> ScriptResult<ModelHandle> {
                check_keys("retrain", &options, &["retrain_fraction", "reset"])?;
                let fraction = option(&options, "retrain_fraction", 1.0, number)?;
                let reset = option(&options, "reset", true, |v| v.as_bool().ok())?;
                let loaded = model_folder::load(
                    Path::new(model_dir),
                    &context.registry,
                    context.device.get(),
                )
                .map_err(script_error)?;
                let mut model = loaded.model;
                let fresh = if reset {
                    let qualified = format!("{}:{}", model.library().name, model.architecture);
                    Some(
                        context
                            .registry
                            .model(&qualified, &model.config, context.device.get())
                            .map_err(script_error)?,
                    )
                } else {
                    None
                };
                let plan = transfer::prepare_retrain(&mut model, fresh.as_ref(), fraction)
                    .map_err(script_error)?;
                println!(
                    "retrain {}: {} of {} layers frozen, {} {}",
                    model.architecture,
                    plan.frozen.len(),
                    plan.total_layers,
                    plan.retrained.len(),
                    if plan.reset {
                        "re-initialised"
                    } else {
                        "kept as trained"
                    }
                );
                Ok(ModelHandle(Rc::new(model)))
            },
        );
    }

    {
        // TorchScript export by tracing; returns the largest difference between the traced module and the plugin.
        let context = Rc::clone(&context);
        engine.register_fn("export_torchscript", move |model_dir: &str, out: &str, shapes: Array| -> ScriptResult<f64> {
            let shapes: Vec<Vec<i64>> = shapes
                .into_iter()
                .map(|shape| {
                    shape
                        .into_typed_array::<i64>()
                        .map_err(|_| script_error(anyhow!("export_torchscript: each shape must be a list of integers, e.g. [1, 1, 128, 128]")))
                })
                .collect::<ScriptResult<_>>()?;
            let loaded = model_folder::load(Path::new(model_dir), &context.registry, context.device.get()).map_err(script_error)?;
            let check = crate::torchscript::export(&loaded.model, &shapes, Path::new(out)).map_err(script_error)?;
            Ok(check.max_abs_difference)
        });
    }

    engine.register_type_with_name::<TrainedModel>("TrainedModel");
    engine.register_fn("summary", |m: &mut TrainedModel| {
        transfer::summary(&m.0.model)
    });
    {
        let context = Rc::clone(&context);
        engine.register_fn(
            "load_model",
            move |model_dir: &str| -> ScriptResult<TrainedModel> {
                load_trained(&context, model_dir)
            },
        );
    }
    {
        let context = Rc::clone(&context);
        engine.register_fn(
            "segment",
            move |model: TrainedModel, image: &str, out: &str| -> ScriptResult<String> {
                segment_to_file(&context, &model, image, out)
            },
        );
    }
    {
        let context = Rc::clone(&context);
        engine.register_fn(
            "segment",
            move |model: TrainedModel, images: Dynamic, options: Map| -> ScriptResult<Array> {
                segment_with_options(&context, &model, &images, &options)
            },
        );
    }
    {
        // Convenience for one-off calls; loops should call load_model once and pass the result.
        let context = Rc::clone(&context);
        engine.register_fn(
            "segment",
            move |model_dir: &str, image: &str, out: &str| -> ScriptResult<String> {
                segment_to_file(&context, &load_trained(&context, model_dir)?, image, out)
            },
        );
    }

    {
        // ivadomed's --test on a finished run: its recorded test split segmented, evaluated and drawn.
        let context = Rc::clone(&context);
        engine.register_fn(
            "test_model",
            move |run_dir: &str, options: Map| -> ScriptResult<Map> {
                let options = crate::testing::TestOptions::from_json(&to_json(&options.into())?)
                    .map_err(script_error)?;
                let report = crate::testing::test_run(
                    Path::new(run_dir),
                    &context.registry,
                    context.device.get(),
                    &options,
                )
                .map_err(script_error)?;
                print!("{}", crate::testing::summary_text(&report));
                Ok(crate::testing::report_map(&report))
            },
        );
    }

    // ivadomed's per-image row (dice_class0, vol_pred_class0, ltpr_class0, ...) plus `dice`, `predicted_mm3`
    // and `label_mm3`; the options map takes the metric keys of `evaluate_folder` (threshold, overlap, ...).
    engine.register_fn(
        "evaluate",
        |prediction: &str, label: &str| -> ScriptResult<Map> {
            evaluate::evaluate_pair_map(
                Path::new(prediction),
                Path::new(label),
                &metrics::MetricsOptions::default(),
            )
            .map_err(script_error)
        },
    );
    engine.register_fn(
        "evaluate",
        |prediction: &str, label: &str, options: Map| -> ScriptResult<Map> {
            let options = evaluate::EvalOptions::from_json(&to_json(&options.into())?)
                .map_err(script_error)?;
            evaluate::evaluate_pair_map(Path::new(prediction), Path::new(label), &options.metrics)
                .map_err(script_error)
        },
    );
    engine.register_fn(
        "evaluate_folder",
        |predictions: &str, bids_root: &str| -> ScriptResult<Map> {
            evaluate::evaluate_folder(
                Path::new(predictions),
                Path::new(bids_root),
                &evaluate::EvalOptions::default(),
            )
            .map(|report| evaluate::report_map(&report))
            .map_err(script_error)
        },
    );
    engine.register_fn(
        "evaluate_folder",
        |predictions: &str, bids_root: &str, options: Map| -> ScriptResult<Map> {
            let options = evaluate::EvalOptions::from_json(&to_json(&options.into())?)
                .map_err(script_error)?;
            evaluate::evaluate_folder(Path::new(predictions), Path::new(bids_root), &options)
                .map(|report| evaluate::report_map(&report))
                .map_err(script_error)
        },
    );

    engine.register_fn("write_csv", |path: &str, rows: Array| -> ScriptResult<()> {
        let rows: Vec<Map> = rows
            .into_iter()
            .filter_map(|r| r.try_cast::<Map>())
            .collect();
        let Some(first) = rows.first() else {
            return Err(script_error(anyhow!("write_csv: no rows")));
        };
        let columns: Vec<String> = first.keys().map(|k| k.to_string()).collect();
        let mut csv = columns.join(",") + "\n";
        for row in &rows {
            let cells: Vec<String> = columns
                .iter()
                .map(|c| {
                    row.get(c.as_str())
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                })
                .collect();
            csv.push_str(&(cells.join(",") + "\n"));
        }
        model_folder::write_atomic(Path::new(path), csv.as_bytes()).map_err(script_error)
    });

    engine.register_fn("file_name", |path: &str| -> String {
        Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    engine
}

/// The innermost error and its position: an error inside a script function is wrapped once per call level.
fn innermost(error: &EvalAltResult) -> (&EvalAltResult, Position) {
    let mut current = error;
    let mut position = error.position();
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, outer) = current {
        if !inner.position().is_none() {
            position = inner.position();
        } else if !outer.is_none() {
            position = *outer;
        }
        current = inner;
    }
    (current, position)
}

/// Formats a script error as `file:line:col: message`.
pub fn format_error(path: &Path, error: &EvalAltResult) -> String {
    let (inner, position) = innermost(error);
    let message = match inner {
        EvalAltResult::ErrorRuntime(value, _) => value.to_string(),
        other => {
            // Rhai appends " (line L, position C)" to its own messages; we print the position up front.
            let text = other.to_string();
            match text.rfind(" (line ") {
                Some(cut) => text[..cut].to_owned(),
                None => text,
            }
        }
    };
    match (position.line(), position.position()) {
        (Some(line), Some(column)) => format!("{}:{line}:{column}: {message}", path.display()),
        (Some(line), None) => format!("{}:{line}: {message}", path.display()),
        _ => format!("{}: {message}", path.display()),
    }
}

/// Compiles and runs a script file, with `ARGS` bound to `args` and `PARAMS` to an empty map.
pub fn run_file(path: &Path, args: &[String], context: ScriptContext) -> Result<()> {
    run_file_with_params(path, args, &serde_json::Map::new(), context)
}

/// Compiles and runs a script file, with `ARGS` bound to `args` and `PARAMS` to `params` (from
/// `--param key=value`; scripts read `PARAMS.lr ?? 0.001`).
pub fn run_file_with_params(
    path: &Path,
    args: &[String],
    params: &serde_json::Map<String, serde_json::Value>,
    context: ScriptContext,
) -> Result<()> {
    if !path.is_file() {
        return Err(anyhow!("script {} not found", path.display()));
    }
    let engine = engine(Rc::new(context));
    let ast = engine
        .compile_file(path.to_owned())
        .map_err(|e| anyhow!(format_error(path, &e)))?;
    let mut scope = Scope::new();
    let args: Array = args.iter().cloned().map(Dynamic::from).collect();
    scope.push_constant("ARGS", args);
    let params: Map = rhai::serde::to_dynamic(params)
        .ok()
        .and_then(|value| value.try_cast::<Map>())
        .ok_or_else(|| anyhow!("parameters cannot be given to a script: {params:?}"))?;
    scope.push_constant("PARAMS", params);
    engine
        .run_ast_with_scope(&mut scope, &ast)
        .map_err(|e| anyhow!(format_error(path, &e)))
        .context("script failed")?;
    Ok(())
}
