//! ivadomed's training losses (`ivadomed/losses.py`) as host primitives, built from ivadomed's
//! `"loss": {"name": "...", <params>}` config object.
//!
//! Every loss takes the activated network output (probabilities) and a target of the same shape
//! `[N, C, ...spatial]` and returns a scalar to minimise. Only tensor ops are used, so a loss runs on the
//! prediction's device and is differentiable with respect to the prediction.
//!
//! Differences from ivadomed, each explained on the variant concerned:
//! - `GeneralizedDiceLoss`: the added background channel is `clamp(1 - Σ_c x_c, 0, 1)` rather than the
//!   indicator `Σ_c x_c == 0`; identical on hard masks, differentiable and meaningful on probabilities.
//! - `FocalTverskyLoss` (and `FocalLoss` with `gamma < 1`): `x^(1/gamma)` gets a zero gradient at `x = 0`
//!   instead of ivadomed's infinite one, and a rounding-negative `1 - Tversky index` counts as 0 instead of NaN.
//! - `AdapWingLoss`: no foreground weight map; ivadomed's map is always 1 (see the variant), so values agree.
//! - `BinaryCrossEntropyLoss`: computed from its formula rather than with `torch.nn.BCELoss`, same values.
//! - `LossCombination`: takes weights (default 1) and nested loss objects; ivadomed's `losses_list` /
//!   `params_list` form is also accepted.
//!
//! Besides ivadomed's losses, `{"name": "ScriptLoss", "path": ..., "function": ..., "source": ...}` is a loss
//! written in Rhai ([`ScriptLoss`]); it works wherever a loss config does, inside a `LossCombination` too.
use crate::script_transform::{ScriptRole, ScriptTensor, ScriptVersion};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// The config name of a loss written in Rhai.
pub const SCRIPT_LOSS: &str = "ScriptLoss";

/// A loss written in Rhai: `fn my_loss(prediction, target) { ... }` over the host tensor ops, returning a
/// scalar tensor. The ops are tch ops, so the result is on the prediction's autograd graph and training
/// differentiates through it. In the loss dialect `sum()`, `mean()`, `min()`, `max()` and `std()` return
/// scalar tensors (in transforms they return numbers), so that nothing drops off the graph by accident.
///
/// It holds only the source text; each thread compiles its own copy once (see `script_transform`), and
/// errors read `file:line:col: message` with the loss file's position.
#[derive(Clone)]
pub struct ScriptLoss(Arc<ScriptVersion>);

impl ScriptLoss {
    /// Compiles `source` (read from `path`, which errors name) and checks `function(prediction, target)`.
    pub fn compile(path: &Path, source: String, function: &str) -> Result<Self> {
        ScriptVersion::compile(path, source, ScriptRole::Loss, function, None).map(Self)
    }

    /// Reads and compiles a loss file.
    pub fn load(path: &Path, function: &str) -> Result<Self> {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read script loss {}", path.display()))?;
        Self::compile(path, source, function)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn function(&self) -> &str {
        self.0.function()
    }

    pub fn source(&self) -> &str {
        self.0.source()
    }

    /// The loss config, with the source text, so a manifest or model folder records the loss itself.
    pub fn config(&self) -> Value {
        json!({
            "name": SCRIPT_LOSS,
            "path": self.path().display().to_string(),
            "function": self.function(),
            "source": self.source(),
        })
    }

    /// Runs the function and checks it returned a scalar tensor that the prediction's gradient flows into.
    fn evaluate(&self, p: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (path, function) = (self.path().display(), self.function());
        let result = self.0.call_function(
            function,
            (
                ScriptTensor(p.shallow_clone()),
                ScriptTensor(t.shallow_clone()),
            ),
        )?;
        let type_name = result.type_name();
        let Some(ScriptTensor(value)) = result.try_cast::<ScriptTensor>() else {
            bail!("{path}: loss `{function}` must return a scalar Tensor, but it returned {type_name}");
        };
        if value.numel() != 1 || !value.is_floating_point() {
            bail!(
                "{path}: loss `{function}` must return a scalar floating-point Tensor, but it returned one of shape {:?} ({:?}); reduce it with sum() or mean()",
                value.size(),
                value.kind()
            );
        }
        if p.requires_grad() && !value.requires_grad() {
            bail!(
                "{path}: loss `{function}` does not depend differentiably on the prediction, so it cannot train \
                 (numbers from item(), comparison masks and detach() carry no gradient)"
            );
        }
        // The prediction's kind, as every other loss, so that a LossCombination can stack the parts.
        Ok(value.reshape([0i64; 0]).to_kind(p.kind()))
    }
}

impl PartialEq for ScriptLoss {
    fn eq(&self, other: &Self) -> bool {
        self.path() == other.path()
            && self.function() == other.function()
            && self.source() == other.source()
    }
}

impl std::fmt::Debug for ScriptLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ScriptLoss({}: {})",
            self.path().display(),
            self.function()
        )
    }
}

/// `config` with the `source` text filled in for every `ScriptLoss` that gives only a `path` (also inside a
/// `LossCombination`), so that what a run records is the loss it used, not a path to a file that may change.
pub fn with_script_sources(config: &Value) -> Result<Value> {
    Ok(match config {
        Value::Object(map) => {
            let mut map = map
                .iter()
                .map(|(key, value)| Ok((key.clone(), with_script_sources(value)?)))
                .collect::<Result<Map<String, Value>>>()?;
            if map.get("name").and_then(Value::as_str) == Some(SCRIPT_LOSS)
                && !map.contains_key("source")
            {
                if let Some(path) = map.get("path").and_then(Value::as_str) {
                    let source = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read script loss {path}"))?;
                    map.insert("source".into(), Value::String(source));
                }
            }
            Value::Object(map)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(with_script_sources)
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

/// `{"name": "ScriptLoss", "path": ..., "function": ..., "source": ...}`; without `source` the file is read.
fn script_loss_from_config(user: &Map<String, Value>) -> Result<Loss> {
    const KEYS: &[&str] = &["name", "path", "function", "source"];
    if let Some(unknown) = user.keys().find(|key| !KEYS.contains(&key.as_str())) {
        bail!("loss `{SCRIPT_LOSS}`: unknown parameter `{unknown}` (known parameters: path, function, source)");
    }
    let text = |key: &str| -> Result<Option<&str>> {
        match user.get(key) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => {
                bail!("loss `{SCRIPT_LOSS}`: parameter `{key}` must be a string, got {other}")
            }
        }
    };
    let path = text("path")?
        .ok_or_else(|| anyhow!("loss `{SCRIPT_LOSS}` needs a `path` (the Rhai file)"))?;
    let function = text("function")?.ok_or_else(|| {
        anyhow!(
            "loss `{SCRIPT_LOSS}` needs a `function` (the name of `fn name(prediction, target)`)"
        )
    })?;
    let loss = match text("source")? {
        Some(source) => ScriptLoss::compile(Path::new(path), source.to_owned(), function)?,
        None => ScriptLoss::load(Path::new(path), function)?,
    };
    Ok(Loss::Script(loss))
}

/// A configured ivadomed loss.
#[derive(Clone, Debug, PartialEq)]
pub enum Loss {
    /// `DiceLoss`: `-(2 Σ p·t + smooth) / (Σ p + Σ t + smooth)` over the whole batch, all channels together.
    /// In [-1, 0]; -1 for an empty prediction of an empty target.
    Dice { smooth: f64 },
    /// `MultiClassDiceLoss`: the mean over `classes_of_interest` (all channels when `None`) of the `DiceLoss`
    /// (smooth 1) of each channel.
    MultiClassDice {
        classes_of_interest: Option<Vec<usize>>,
    },
    /// `BinaryCrossEntropyLoss`: the mean of `-(t ln p + (1 - t) ln(1 - p))`, each log clamped at -100 as
    /// `torch.nn.BCELoss` does. Written out with tensor ops instead of calling libtorch's
    /// `binary_cross_entropy`, whose out-of-range check is a device-side assert on CUDA (it poisons the CUDA
    /// context). The values are the same; where a log is clamped (a prediction of exactly 0 with t > 0, or 1 with
    /// t < 1) that term's gradient is 0 here, where libtorch divides by max(p (1 - p), 1e-12).
    BinaryCrossEntropy,
    /// `FocalLoss` (Lin et al. 2017): with `p` clamped to `[eps, 1 - eps]`,
    /// `pt = p^t (1 - p)^(1 - t)`, `at = alpha t + (1 - alpha)(1 - t)`: the sum (ivadomed sums, it does not
    /// average) of `-at ln(pt) (1 - pt)^gamma` over every element.
    Focal { gamma: f64, alpha: f64, eps: f64 },
    /// `FocalDiceLoss` (Wong et al. 2018): `ln(max(focal, 1e-7)) - beta ln(max(dice, 1e-7))`, with `focal` the
    /// `FocalLoss` (gamma, alpha, eps 1e-7) and `dice` the positive Dice coefficient (smooth 1).
    FocalDice { beta: f64, gamma: f64, alpha: f64 },
    /// `GeneralizedDiceLoss` (Sudre et al. 2017): `-2 Σ w·|p·t| / max(Σ w·(|p| + |t|), epsilon)` where the
    /// sums `|.|` run over the spatial axes per item and channel, and `w = 1 / max(|t|², epsilon)` per item
    /// and channel.
    ///
    /// Difference: with `include_background`, ivadomed appends a background channel that is 1 exactly where
    /// every channel is 0. For a probability map that is almost never the case, so the predicted background
    /// is all 0 and gets no gradient. Here the background channel is `clamp(1 - Σ_c x_c, 0, 1)` for the
    /// prediction and the target alike, which equals ivadomed's on hard (0/1, one-hot or empty) masks, so its
    /// test values hold, and is the soft complement otherwise. ivadomed also builds the channel with
    /// `x.sum(1).expand_as(background)`, which raises for a batch of more than one ([N, ...] cannot expand to
    /// [N, 1, ...]; checked with libtorch 2.13); here any batch size works.
    GeneralizedDice {
        epsilon: f64,
        include_background: bool,
    },
    /// `TverskyLoss` (Salehi et al. 2017): minus the mean over channels of the Tversky index
    /// `(TP + smooth) / (TP + alpha FP + beta FN + smooth)`, with TP, FP, FN summed over batch and space.
    /// alpha = beta = 0.5 is the Dice loss.
    Tversky { alpha: f64, beta: f64, smooth: f64 },
    /// `FocalTverskyLoss` (Abraham & Khan 2019): the mean over channels of `(1 - TI)^(1 / gamma)`.
    ///
    /// Difference: for `gamma > 1` the derivative of `x^(1/gamma)` is infinite at `x = 0`, i.e. whenever a
    /// channel is predicted perfectly (an empty channel predicted empty, for one), and ivadomed's gradient
    /// there is inf or NaN. Here it is 0 (the loss is at its minimum), and a `1 - TI` that rounding makes
    /// slightly negative counts as 0 rather than giving NaN.
    FocalTversky {
        alpha: f64,
        beta: f64,
        gamma: f64,
        smooth: f64,
    },
    /// `L2loss`: `Σ (p - t)² / 2`.
    L2,
    /// `AdapWingLoss` (Wang et al. 2019), for heatmap regression, summed over all voxels: with `d = |t - p|`,
    /// `omega ln(1 + (d / epsilon)^(alpha - t))` where `d < theta`, else `A d - C`, with `A` and `C` making
    /// the two pieces meet smoothly at `d = theta`.
    ///
    /// Difference: the paper weights the loss by `1 + W·M`, `M` a dilated, thresholded target. ivadomed
    /// attempts this (with `omega` as W and a binary *opening* in place of the dilation), but it thresholds the
    /// boolean result of `binary_opening` against 51, so every voxel gets weight 1: the map is a no-op and
    /// ivadomed's values (and its test value 29.0147) are those of the unweighted loss. That unweighted loss is
    /// what is computed here. The nonlinear piece also gets a zero gradient at `d = 0` instead of a possibly
    /// infinite one when `alpha - t < 1`.
    AdapWing {
        theta: f64,
        alpha: f64,
        omega: f64,
        epsilon: f64,
    },
    /// `LossCombination`: `Σ weight_i · loss_i`. ivadomed sums its parts with weight 1; weights are an addition.
    Combination(Vec<(f64, Loss)>),
    /// `ScriptLoss`: a Rhai function (not in ivadomed).
    Script(ScriptLoss),
}

/// The loss names, in ivadomed's order (`training.get_loss_function`).
const NAMES: &[&str] = &[
    "DiceLoss",
    "FocalLoss",
    "GeneralizedDiceLoss",
    "FocalDiceLoss",
    "MultiClassDiceLoss",
    "BinaryCrossEntropyLoss",
    "TverskyLoss",
    "FocalTverskyLoss",
    "AdapWingLoss",
    "L2loss",
    "LossCombination",
];

/// A parameter default, kept as data so that `defaults` and `from_config` read the same table.
#[derive(Clone, Copy)]
enum ParameterDefault {
    Number(f64),
    Bool(bool),
    Null,
    EmptyList,
}

impl ParameterDefault {
    fn to_json(self) -> Value {
        match self {
            ParameterDefault::Number(x) => json!(x),
            ParameterDefault::Bool(b) => json!(b),
            ParameterDefault::Null => Value::Null,
            ParameterDefault::EmptyList => json!([]),
        }
    }
}

/// ivadomed's constructor defaults, by loss name.
fn parameter_table(name: &str) -> Option<&'static [(&'static str, ParameterDefault)]> {
    use ParameterDefault::*;
    Some(match name {
        "DiceLoss" => &[("smooth", Number(1.0))],
        "FocalLoss" => &[
            ("gamma", Number(2.0)),
            ("alpha", Number(0.25)),
            ("eps", Number(1e-7)),
        ],
        "GeneralizedDiceLoss" => &[
            ("epsilon", Number(1e-5)),
            ("include_background", Bool(true)),
        ],
        "FocalDiceLoss" => &[
            ("beta", Number(1.0)),
            ("gamma", Number(2.0)),
            ("alpha", Number(0.25)),
        ],
        "MultiClassDiceLoss" => &[("classes_of_interest", Null)],
        "BinaryCrossEntropyLoss" | "L2loss" => &[],
        "TverskyLoss" => &[
            ("alpha", Number(0.7)),
            ("beta", Number(0.3)),
            ("smooth", Number(1.0)),
        ],
        "FocalTverskyLoss" => &[
            ("alpha", Number(0.7)),
            ("beta", Number(0.3)),
            ("gamma", Number(1.33)),
            ("smooth", Number(1.0)),
        ],
        "AdapWingLoss" => &[
            ("theta", Number(0.5)),
            ("alpha", Number(2.1)),
            ("omega", Number(14.0)),
            ("epsilon", Number(1.0)),
        ],
        // `losses` has no useful default (at least one is required); `weights: null` means all 1.
        "LossCombination" => &[("losses", EmptyList), ("weights", Null)],
        _ => return None,
    })
}

/// ivadomed's form of LossCombination: `losses_list` (names) and `params_list` (null or params per loss).
const IVADOMED_COMBINATION_KEYS: &[&str] = &["losses_list", "params_list"];

/// The parameters of one loss config: user values over the table's defaults, unknown keys rejected up front.
struct Parameters<'a> {
    loss: &'static str,
    user: &'a Map<String, Value>,
    table: &'static [(&'static str, ParameterDefault)],
}

impl<'a> Parameters<'a> {
    fn new(loss: &'static str, user: &'a Map<String, Value>, also_known: &[&str]) -> Result<Self> {
        let table = parameter_table(loss).expect("every loss name has a parameter table");
        let known: Vec<&str> = table
            .iter()
            .map(|(key, _)| *key)
            .chain(also_known.iter().copied())
            .collect();
        if let Some(unknown) = user
            .keys()
            .find(|key| *key != "name" && !known.contains(&key.as_str()))
        {
            if known.is_empty() {
                bail!("loss `{loss}`: unknown parameter `{unknown}` ({loss} takes no parameters)");
            }
            bail!(
                "loss `{loss}`: unknown parameter `{unknown}` (known parameters: {})",
                known.join(", ")
            );
        }
        Ok(Self { loss, user, table })
    }

    fn value(&self, key: &str) -> Value {
        match self.user.get(key) {
            Some(value) => value.clone(),
            None => self
                .table
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, default)| default.to_json())
                .unwrap_or(Value::Null),
        }
    }

    fn error(&self, key: &str, expected: &str, got: &Value) -> anyhow::Error {
        anyhow!(
            "loss `{}`: parameter `{key}` must be {expected}, got {got}",
            self.loss
        )
    }

    /// A finite number accepted by `valid`, described by `expected` in the error.
    fn number(&self, key: &str, expected: &str, valid: impl Fn(f64) -> bool) -> Result<f64> {
        let value = self.value(key);
        match value.as_f64() {
            Some(x) if x.is_finite() && valid(x) => Ok(x),
            _ => Err(self.error(key, expected, &value)),
        }
    }

    fn bool(&self, key: &str) -> Result<bool> {
        let value = self.value(key);
        value
            .as_bool()
            .ok_or_else(|| self.error(key, "true or false", &value))
    }
}

impl Loss {
    /// ivadomed's `"loss": {"name": "...", <params>}` object. Unknown name -> error listing the known names;
    /// unknown parameter key -> error naming the key and the loss; wrong type/range -> error naming the key.
    pub fn from_config(config: &Value) -> Result<Loss> {
        let Some(user) = config.as_object() else {
            bail!("a loss config must be a JSON object such as {{\"name\": \"DiceLoss\"}}, got {config}");
        };
        let Some(name) = user.get("name") else {
            bail!(
                "loss config {config} has no `name` (known losses: {}, {SCRIPT_LOSS})",
                NAMES.join(", ")
            );
        };
        if name.as_str() == Some(SCRIPT_LOSS) {
            return script_loss_from_config(user);
        }
        let Some(name) = name
            .as_str()
            .and_then(|n| NAMES.iter().find(|known| **known == n))
        else {
            bail!(
                "unknown loss {name} (known losses: {}, {SCRIPT_LOSS})",
                NAMES.join(", ")
            );
        };
        let also_known: &[&str] = if *name == "LossCombination" {
            IVADOMED_COMBINATION_KEYS
        } else {
            &[]
        };
        let p = Parameters::new(name, user, also_known)?;
        let non_negative = |x: f64| x >= 0.0;
        let positive = |x: f64| x > 0.0;
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        Ok(match *name {
            "DiceLoss" => Loss::Dice {
                smooth: p.number("smooth", "a number >= 0", non_negative)?,
            },
            "MultiClassDiceLoss" => {
                let value = p.value("classes_of_interest");
                let classes = match &value {
                    Value::Null => None,
                    Value::Array(items) if !items.is_empty() => Some(
                        items
                            .iter()
                            .map(|item| item.as_u64().map(|c| c as usize))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| {
                                p.error(
                                    "classes_of_interest",
                                    "null or a non-empty list of channel indices",
                                    &value,
                                )
                            })?,
                    ),
                    _ => {
                        return Err(p.error(
                            "classes_of_interest",
                            "null or a non-empty list of channel indices",
                            &value,
                        ))
                    }
                };
                Loss::MultiClassDice {
                    classes_of_interest: classes,
                }
            }
            "BinaryCrossEntropyLoss" => Loss::BinaryCrossEntropy,
            "FocalLoss" => Loss::Focal {
                gamma: p.number("gamma", "a number >= 0", non_negative)?,
                alpha: p.number("alpha", "a number in [0, 1]", unit)?,
                eps: p.number("eps", "a number in (0, 0.5)", |x| x > 0.0 && x < 0.5)?,
            },
            "FocalDiceLoss" => Loss::FocalDice {
                beta: p.number("beta", "a number >= 0", non_negative)?,
                gamma: p.number("gamma", "a number >= 0", non_negative)?,
                alpha: p.number("alpha", "a number in [0, 1]", unit)?,
            },
            "GeneralizedDiceLoss" => Loss::GeneralizedDice {
                epsilon: p.number("epsilon", "a number > 0", positive)?,
                include_background: p.bool("include_background")?,
            },
            "TverskyLoss" => Loss::Tversky {
                alpha: p.number("alpha", "a number >= 0", non_negative)?,
                beta: p.number("beta", "a number >= 0", non_negative)?,
                smooth: p.number("smooth", "a number >= 0", non_negative)?,
            },
            "FocalTverskyLoss" => Loss::FocalTversky {
                alpha: p.number("alpha", "a number >= 0", non_negative)?,
                beta: p.number("beta", "a number >= 0", non_negative)?,
                gamma: p.number("gamma", "a number > 0", positive)?,
                smooth: p.number("smooth", "a number >= 0", non_negative)?,
            },
            "L2loss" => Loss::L2,
            "AdapWingLoss" => Loss::AdapWing {
                theta: p.number("theta", "a number > 0", positive)?,
                // Above 1 so that the exponent `alpha - t` stays positive for targets in [0, 1].
                alpha: p.number("alpha", "a number > 1", |x| x > 1.0)?,
                omega: p.number("omega", "a number > 0", positive)?,
                epsilon: p.number("epsilon", "a number > 0", positive)?,
            },
            "LossCombination" => Loss::Combination(combination_parts(&p)?),
            _ => unreachable!("every name in NAMES is handled"),
        })
    }

    /// Scalar loss to minimise. prediction: activated network output (probabilities), target: same shape
    /// `[N, C, ...spatial]` (2D or 3D). The target is converted to the prediction's kind.
    pub fn compute(&self, prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
        let (p_shape, t_shape) = (prediction.size(), target.size());
        if p_shape != t_shape {
            bail!(
                "{}: prediction shape {p_shape:?} and target shape {t_shape:?} differ",
                self.name()
            );
        }
        if p_shape.len() < 3 {
            bail!(
                "{}: expected [N, C, ...spatial] tensors, got shape {p_shape:?}",
                self.name()
            );
        }
        if !prediction.is_floating_point() {
            bail!(
                "{}: the prediction must be a floating-point tensor, got {:?}",
                self.name(),
                prediction.kind()
            );
        }
        if prediction.device() != target.device() {
            bail!(
                "{}: prediction is on {:?} but target is on {:?}",
                self.name(),
                prediction.device(),
                target.device()
            );
        }
        let target = target.to_kind(prediction.kind());
        self.evaluate(prediction, &target)
    }

    /// The loss names `from_config` knows, in ivadomed's order.
    pub fn names() -> &'static [&'static str] {
        NAMES
    }

    /// Every parameter of loss `name` with its default, or `None` for an unknown name.
    pub fn defaults(name: &str) -> Option<Value> {
        let table = parameter_table(name)?;
        Some(Value::Object(
            table
                .iter()
                .map(|(key, default)| (key.to_string(), default.to_json()))
                .collect(),
        ))
    }

    /// The ivadomed name of this loss.
    pub fn name(&self) -> &'static str {
        match self {
            Loss::Dice { .. } => "DiceLoss",
            Loss::MultiClassDice { .. } => "MultiClassDiceLoss",
            Loss::BinaryCrossEntropy => "BinaryCrossEntropyLoss",
            Loss::Focal { .. } => "FocalLoss",
            Loss::FocalDice { .. } => "FocalDiceLoss",
            Loss::GeneralizedDice { .. } => "GeneralizedDiceLoss",
            Loss::Tversky { .. } => "TverskyLoss",
            Loss::FocalTversky { .. } => "FocalTverskyLoss",
            Loss::L2 => "L2loss",
            Loss::AdapWing { .. } => "AdapWingLoss",
            Loss::Combination(_) => "LossCombination",
            Loss::Script(_) => SCRIPT_LOSS,
        }
    }

    /// `compute` after its checks: same shape, same device, target already in the prediction's kind.
    fn evaluate(&self, p: &Tensor, t: &Tensor) -> Result<Tensor> {
        let kind = p.kind();
        Ok(match self {
            Loss::Dice { smooth } => -dice_coefficient(p, t, *smooth),
            Loss::MultiClassDice {
                classes_of_interest,
            } => {
                let channels = p.size()[1];
                let per_channel = per_channel_sum(&(p * t), kind) * 2.0 + 1.0;
                let per_channel =
                    per_channel / (per_channel_sum(p, kind) + per_channel_sum(t, kind) + 1.0);
                let selected = match classes_of_interest {
                    None => per_channel,
                    Some(classes) => {
                        if let Some(bad) = classes.iter().find(|c| **c as i64 >= channels) {
                            bail!(
                                "MultiClassDiceLoss: class of interest {bad} is out of range for {channels} channels"
                            );
                        }
                        let index: Vec<i64> = classes.iter().map(|c| *c as i64).collect();
                        per_channel
                            .index_select(0, &Tensor::from_slice(&index).to_device(p.device()))
                    }
                };
                -selected.mean(kind)
            }
            Loss::BinaryCrossEntropy => {
                let terms = t * clamped_log(p) + complement(t) * clamped_log(&complement(p));
                -terms.mean(kind)
            }
            Loss::Focal { gamma, alpha, eps } => focal(p, t, *gamma, *alpha, *eps),
            Loss::FocalDice { beta, gamma, alpha } => {
                let focal = focal(p, t, *gamma, *alpha, 1e-7);
                let dice = dice_coefficient(p, t, 1.0);
                focal.clamp_min(1e-7).log() - dice.clamp_min(1e-7).log() * *beta
            }
            Loss::GeneralizedDice {
                epsilon,
                include_background,
            } => {
                let (p, t) = if *include_background {
                    (with_background(p), with_background(t))
                } else {
                    (p.shallow_clone(), t.shallow_clone())
                };
                let spatial: Vec<i64> = (2..p.dim() as i64).collect();
                let sum = |x: &Tensor| x.sum_dim_intlist(spatial.as_slice(), false, kind);
                // Weights depend on the target only; ivadomed detaches them too (it wraps them in a Parameter).
                let target_sum = sum(&t).detach();
                let weights = (&target_sum * &target_sum).clamp_min(*epsilon).reciprocal();
                let intersection = (sum(&(&p * &t)) * &weights).sum(kind);
                let union = (sum(&(&p + &t)) * &weights).sum(kind);
                intersection * -2.0 / union.clamp_min(*epsilon)
            }
            Loss::Tversky {
                alpha,
                beta,
                smooth,
            } => -tversky_index(p, t, *alpha, *beta, *smooth).mean(kind),
            Loss::FocalTversky {
                alpha,
                beta,
                gamma,
                smooth,
            } => {
                let index = tversky_index(p, t, *alpha, *beta, *smooth);
                pow_with_finite_gradient(&complement(&index), 1.0 / gamma).mean(kind)
            }
            Loss::L2 => (p - t).square().sum(kind) / 2.0,
            Loss::AdapWing {
                theta,
                alpha,
                omega,
                epsilon,
            } => {
                let exponent = t.neg() + *alpha;
                let ratio_log = (theta / epsilon).ln();
                // (theta / epsilon)^(alpha - t) and ^(alpha - t - 1), by exp(e ln r) since the base is a scalar.
                let ratio_pow = (&exponent * ratio_log).exp();
                let ratio_pow_minus_one = ((&exponent - 1.0) * ratio_log).exp();
                let a = (&ratio_pow + 1.0).reciprocal()
                    * &exponent
                    * ratio_pow_minus_one
                    * (omega / epsilon);
                let c = &a * *theta - (&ratio_pow + 1.0).log() * *omega;
                let difference = (t - p).abs();
                let linear = &a * &difference - c;
                let nonlinear =
                    (pow_tensor_with_finite_gradient(&(&difference / *epsilon), &exponent) + 1.0)
                        .log()
                        * *omega;
                nonlinear
                    .where_self(&difference.lt(*theta), &linear)
                    .sum(kind)
            }
            Loss::Combination(parts) => {
                let weighted = parts
                    .iter()
                    .map(|(weight, loss)| Ok(loss.evaluate(p, t)? * *weight))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&weighted, 0).sum(kind)
            }
            Loss::Script(script) => script.evaluate(p, t)?,
        })
    }
}

/// The parts of a LossCombination, from `losses` (+ `weights`) or ivadomed's `losses_list` (+ `params_list`).
fn combination_parts(p: &Parameters) -> Result<Vec<(f64, Loss)>> {
    let ivadomed_form = IVADOMED_COMBINATION_KEYS
        .iter()
        .any(|key| p.user.contains_key(*key));
    if ivadomed_form && p.user.contains_key("losses") {
        bail!("loss `LossCombination`: give either `losses` (with `weights`) or ivadomed's `losses_list` (with `params_list`), not both");
    }
    let losses: Vec<Loss> = if ivadomed_form {
        let names_value = p.user.get("losses_list").cloned().unwrap_or(Value::Null);
        let names = names_value
            .as_array()
            .filter(|names| !names.is_empty())
            .ok_or_else(|| {
                p.error(
                    "losses_list",
                    "a non-empty list of loss names",
                    &names_value,
                )
            })?;
        let params_value = p.user.get("params_list").cloned().unwrap_or(Value::Null);
        let params: Vec<Value> = match &params_value {
            Value::Null => vec![Value::Null; names.len()],
            Value::Array(items) if items.len() == names.len() => items.clone(),
            _ => {
                return Err(p.error(
                    "params_list",
                    &format!(
                        "null or a list of {} entries (null or parameters)",
                        names.len()
                    ),
                    &params_value,
                ))
            }
        };
        names
            .iter()
            .zip(params)
            .enumerate()
            .map(|(i, (name, params))| {
                let mut config = match params {
                    Value::Null => Map::new(),
                    Value::Object(map) => map,
                    other => {
                        return Err(p.error(
                            &format!("params_list[{i}]"),
                            "null or an object of parameters",
                            &other,
                        ))
                    }
                };
                config.insert("name".into(), name.clone());
                Loss::from_config(&Value::Object(config))
                    .with_context(|| format!("LossCombination losses_list[{i}]"))
            })
            .collect::<Result<_>>()?
    } else {
        let losses_value = p.value("losses");
        let configs = losses_value
            .as_array()
            .filter(|configs| !configs.is_empty())
            .ok_or_else(|| {
                p.error(
                    "losses",
                    "a non-empty list of loss objects such as {\"name\": \"DiceLoss\"}",
                    &losses_value,
                )
            })?;
        configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                Loss::from_config(config).with_context(|| format!("LossCombination losses[{i}]"))
            })
            .collect::<Result<_>>()?
    };
    let weights_value = p.value("weights");
    let weights = match &weights_value {
        Value::Null => vec![1.0; losses.len()],
        Value::Array(items) if items.len() == losses.len() => items
            .iter()
            .map(|w| w.as_f64().filter(|w| w.is_finite()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| p.error("weights", "a list of finite numbers", &weights_value))?,
        _ => {
            return Err(p.error(
                "weights",
                &format!("null or a list of {} numbers, one per loss", losses.len()),
                &weights_value,
            ))
        }
    };
    Ok(weights.into_iter().zip(losses).collect())
}

/// `1 - x`.
fn complement(x: &Tensor) -> Tensor {
    x.neg() + 1.0
}

/// The soft Dice coefficient `(2 Σ p·t + smooth) / (Σ p + Σ t + smooth)` over every element.
fn dice_coefficient(p: &Tensor, t: &Tensor, smooth: f64) -> Tensor {
    let kind = p.kind();
    ((p * t).sum(kind) * 2.0 + smooth) / (p.sum(kind) + t.sum(kind) + smooth)
}

/// Sums over every axis but the channel axis (1): one value per channel.
fn per_channel_sum(x: &Tensor, kind: Kind) -> Tensor {
    let axes: Vec<i64> = (0..x.dim() as i64).filter(|axis| *axis != 1).collect();
    x.sum_dim_intlist(axes.as_slice(), false, kind)
}

/// The Tversky index of each channel, summed over batch and space.
fn tversky_index(p: &Tensor, t: &Tensor, alpha: f64, beta: f64, smooth: f64) -> Tensor {
    let kind = p.kind();
    let true_positive = per_channel_sum(&(t * p), kind);
    let false_negative = per_channel_sum(&(t * complement(p)), kind);
    let false_positive = per_channel_sum(&(complement(t) * p), kind);
    (&true_positive + smooth)
        / (true_positive + false_positive * alpha + false_negative * beta + smooth)
}

/// ivadomed's FocalLoss, summed over every element.
fn focal(p: &Tensor, t: &Tensor, gamma: f64, alpha: f64, eps: f64) -> Tensor {
    let p = p.clamp(eps, 1.0 - eps);
    let log_pt = t * p.log() + complement(t) * complement(&p).log();
    let pt = log_pt.exp();
    let at = t * alpha + complement(t) * (1.0 - alpha);
    let focal = -at * log_pt * pow_with_finite_gradient(&complement(&pt), gamma);
    focal.sum(p.kind())
}

/// `ln x` clamped below at -100 as `torch.nn.BCELoss` does, with a finite (zero) gradient at `x <= 0`: the
/// log is taken of 1 there, so no 0/0 appears in the backward pass.
fn clamped_log(x: &Tensor) -> Tensor {
    let positive = x.gt(0.0);
    x.where_scalarother(&positive, 1.0)
        .log()
        .where_scalarother(&positive, -100.0)
        .clamp_min(-100.0)
}

/// `x^exponent` for `x >= 0` whose gradient stays finite at `x = 0`. For `0 < exponent < 1` the true
/// derivative there is infinite; the value 0 is the minimum, so the gradient is taken as 0, and `x <= 0`
/// (a rounding-negative `1 - index`) counts as 0.
fn pow_with_finite_gradient(x: &Tensor, exponent: f64) -> Tensor {
    if exponent == 0.0 || exponent >= 1.0 {
        return x.pow_tensor_scalar(exponent);
    }
    let positive = x.gt(0.0);
    x.where_scalarother(&positive, 1.0)
        .pow_tensor_scalar(exponent)
        .where_scalarother(&positive, 0.0)
}

/// `x^exponent` elementwise for `x >= 0` and positive exponents, 0 with gradient 0 where `x <= 0`.
fn pow_tensor_with_finite_gradient(x: &Tensor, exponent: &Tensor) -> Tensor {
    let positive = x.gt(0.0);
    x.where_scalarother(&positive, 1.0)
        .pow(exponent)
        .where_scalarother(&positive, 0.0)
}

/// `x` with a background channel `clamp(1 - Σ_c x_c, 0, 1)` appended on axis 1.
fn with_background(x: &Tensor) -> Tensor {
    let background =
        complement(&x.sum_dim_intlist([1i64].as_slice(), true, x.kind())).clamp(0.0, 1.0);
    Tensor::cat(&[x, &background], 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn loss(config: Value) -> Loss {
        Loss::from_config(&config).unwrap()
    }

    /// A float tensor of `shape` from row-major values.
    fn tensor(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values).reshape(shape)
    }

    /// A `[1, 1, 2, 2]` image, the shape of most of ivadomed's test cases.
    fn image(values: [f32; 4]) -> Tensor {
        tensor(&values, &[1, 1, 2, 2])
    }

    fn value(loss: &Loss, p: &Tensor, t: &Tensor) -> f64 {
        loss.compute(p, t).unwrap().double_value(&[])
    }

    fn assert_close(got: f64, expected: f64, tolerance: f64, what: &str) {
        assert!(
            (got - expected).abs() <= tolerance * expected.abs().max(1.0),
            "{what}: got {got}, expected {expected}"
        );
    }

    #[test]
    fn dice_matches_ivadomed_test_values() {
        // ivadomed test_diceloss.
        let dice = loss(json!({"name": "DiceLoss"}));
        let diagonal = image([1.0, 0.0, 0.0, 1.0]);
        let empty = image([0.0; 4]);
        assert_close(value(&dice, &diagonal, &diagonal), -1.0, 1e-6, "identical");
        assert_close(
            value(&dice, &empty, &diagonal),
            -1.0 / 3.0,
            1e-6,
            "empty vs diagonal",
        );
        assert_eq!(value(&dice, &empty, &empty), -1.0, "empty vs empty");
        // smooth 0, p = [1, 1, 0, 0], t = [1, 0, 0, 0]: -(2·1) / (2 + 1) = -2/3.
        let dice = loss(json!({"name": "DiceLoss", "smooth": 0}));
        let p = image([1.0, 1.0, 0.0, 0.0]);
        let t = image([1.0, 0.0, 0.0, 0.0]);
        assert_close(value(&dice, &p, &t), -2.0 / 3.0, 1e-6, "smooth 0");
    }

    #[test]
    fn multi_class_dice_matches_ivadomed_test_values() {
        // ivadomed test_multiclassdiceloss, in its order.
        let all = loss(json!({"name": "MultiClassDiceLoss"}));
        let volume = tensor(&[0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], &[1, 1, 2, 2, 2]);
        assert_close(value(&all, &volume, &volume), -1.0, 1e-6, "3D identical");
        let diagonal = image([1.0, 0.0, 0.0, 1.0]);
        let empty = image([0.0; 4]);
        assert_close(value(&all, &diagonal, &diagonal), -1.0, 1e-6, "identical");
        assert_close(
            value(&all, &empty, &diagonal),
            -1.0 / 3.0,
            1e-6,
            "empty vs diagonal",
        );
        assert_close(value(&all, &empty, &empty), -1.0, 1e-6, "empty vs empty");
        let p = tensor(&[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[1, 2, 2, 2]);
        let t = tensor(&[0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], &[1, 2, 2, 2]);
        assert_close(value(&all, &p, &t), -(1.0 + 0.5) / 2.0, 1e-6, "two classes");
        let t = tensor(&[0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0], &[1, 2, 2, 2]);
        let second = loss(json!({"name": "MultiClassDiceLoss", "classes_of_interest": [1]}));
        assert_close(value(&second, &p, &t), -1.0 / 3.0, 1e-6, "class 1 only");
        // A class index past the channel count is a compute error, not a panic.
        let third = loss(json!({"name": "MultiClassDiceLoss", "classes_of_interest": [2]}));
        let error = third.compute(&p, &t).unwrap_err().to_string();
        assert!(
            error.contains("class of interest 2") && error.contains("2 channels"),
            "{error}"
        );
    }

    #[test]
    fn generalized_dice_matches_ivadomed_test_values() {
        // ivadomed test_generalizeddiceloss, in its order.
        let with_bg = loss(json!({"name": "GeneralizedDiceLoss", "epsilon": 1e-5}));
        let without_bg = loss(json!({"name": "GeneralizedDiceLoss", "include_background": false}));
        let volume = tensor(&[0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], &[1, 1, 2, 2, 2]);
        assert_close(
            value(&with_bg, &volume, &volume),
            -1.0,
            1e-5,
            "3D identical",
        );
        let diagonal = image([1.0, 0.0, 0.0, 1.0]);
        let three = image([1.0, 0.0, 1.0, 1.0]);
        assert_close(
            value(&without_bg, &diagonal, &three),
            -0.8,
            1e-5,
            "no background",
        );
        assert_close(
            value(&with_bg, &diagonal, &three),
            -11.0 / 16.0,
            1e-5,
            "background",
        );
        assert_close(value(&with_bg, &three, &three), -1.0, 1e-5, "identical");
        let empty = image([0.0; 4]);
        let corner = image([1.0, 0.0, 0.0, 0.0]);
        assert_close(
            value(&with_bg, &empty, &corner),
            -3.0 / 8.0,
            1e-5,
            "empty, background",
        );
        assert_eq!(
            value(&without_bg, &empty, &corner),
            0.0,
            "empty, no background"
        );
        let p = tensor(&[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0], &[1, 2, 2, 2]);
        let t = tensor(&[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], &[1, 2, 2, 2]);
        assert_close(value(&with_bg, &p, &t), -18.0 / 23.0, 1e-5, "two classes");
        let batch = |x: &Tensor| Tensor::cat(&[x, x], 0);
        let (p, t) = (batch(&diagonal), batch(&three));
        assert_close(
            value(&without_bg, &p, &t),
            -0.8,
            1e-5,
            "batch, no background",
        );
        assert_close(
            value(&with_bg, &p, &t),
            -11.0 / 16.0,
            1e-5,
            "batch, background",
        );
    }

    #[test]
    fn generalized_dice_background_is_the_soft_complement() {
        // One channel, two pixels: p = [0.5, 0.5], t = [1, 0]. Background p = [0.5, 0.5], t = [0, 1].
        // Foreground: w = 1/1², p·t = 0.5, p + t = 2. Background: w = 1/1², p·t = 0.5, p + t = 2.
        // -2 (0.5 + 0.5) / (2 + 2) = -0.5. (ivadomed's indicator background p = [0, 0] would give -1/3.)
        let gdl = loss(json!({"name": "GeneralizedDiceLoss"}));
        let p = tensor(&[0.5, 0.5], &[1, 1, 2]);
        let t = tensor(&[1.0, 0.0], &[1, 1, 2]);
        assert_close(value(&gdl, &p, &t), -0.5, 1e-6, "soft background");
    }

    #[test]
    fn binary_cross_entropy_matches_hand_computed_values() {
        // p = [0.5, 0.9, 0.2, 0], t = [1, 1, 0, 1]: terms -ln 0.5, -ln 0.9, -ln 0.8 and, for p = 0 with t = 1,
        // BCELoss's clamp of ln 0 at -100; the mean of the four.
        let bce = loss(json!({"name": "BinaryCrossEntropyLoss"}));
        let p = image([0.5, 0.9, 0.2, 0.0]);
        let t = image([1.0, 1.0, 0.0, 1.0]);
        let expected = (-(0.5f64).ln() - (0.9f64).ln() - (0.8f64).ln() + 100.0) / 4.0;
        assert_close(value(&bce, &p, &t), expected, 1e-5, "bce");
    }

    #[test]
    fn focal_matches_hand_computed_values() {
        // gamma 2, alpha 0.25. Pixel 1: p 0.9, t 1 -> pt 0.9, at 0.25, 0.25·(-ln 0.9)·0.1².
        // Pixel 2: p 0.3, t 0 -> pt 0.7, at 0.75, 0.75·(-ln 0.7)·0.3². Sum, not mean.
        let focal = loss(json!({"name": "FocalLoss"}));
        let p = tensor(&[0.9, 0.3], &[1, 1, 2]);
        let t = tensor(&[1.0, 0.0], &[1, 1, 2]);
        let expected = 0.25 * -(0.9f64).ln() * 0.01 + 0.75 * -(0.7f64).ln() * 0.09;
        assert_close(value(&focal, &p, &t), expected, 1e-5, "focal");
        // gamma 0 is alpha-balanced cross-entropy: 0.25·(-ln 0.9) + 0.75·(-ln 0.7).
        let balanced = loss(json!({"name": "FocalLoss", "gamma": 0}));
        let expected = 0.25 * -(0.9f64).ln() + 0.75 * -(0.7f64).ln();
        assert_close(value(&balanced, &p, &t), expected, 1e-5, "gamma 0");
    }

    #[test]
    fn focal_dice_matches_ivadomed_test_values() {
        // ivadomed test_focaldiceloss. Identical inputs: the focal sum is ~1e-21, clamped to 1e-7, and the
        // Dice is 1, so the loss is ln(1e-7) = -16.1181.
        let focal_dice = loss(json!({"name": "FocalDiceLoss"}));
        let top = image([1.0, 1.0, 0.0, 0.0]);
        assert_close(value(&focal_dice, &top, &top), -16.1181, 1e-5, "identical");
        let l_shape = image([1.0, 0.0, 1.0, 1.0]);
        assert_close(value(&focal_dice, &top, &l_shape), 3.6897, 1e-4, "disjoint");
        let half = image([0.5; 4]);
        let soft = image([0.5, 1.0, 1.0, 1.0]);
        assert_close(value(&focal_dice, &half, &soft), -1.1619, 1e-4, "soft");
    }

    #[test]
    fn tversky_matches_ivadomed_test_values() {
        // ivadomed test_tverskyloss, in its order.
        let default = loss(json!({"name": "TverskyLoss"}));
        let swapped = loss(json!({"name": "TverskyLoss", "alpha": 0.3, "beta": 0.7}));
        let volume = tensor(&[0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], &[1, 1, 2, 2, 2]);
        assert_close(
            value(&default, &volume, &volume),
            -1.0,
            1e-6,
            "3D identical",
        );
        let diagonal = image([1.0, 0.0, 0.0, 1.0]);
        let empty = image([0.0; 4]);
        assert_close(
            value(&default, &diagonal, &diagonal),
            -1.0,
            1e-6,
            "identical",
        );
        // FN = 2: 1 / (0.3·2 + 1) = 0.625; with beta 0.7: 1 / 2.4 = 0.41667.
        assert_close(
            value(&default, &empty, &diagonal),
            -0.625,
            1e-6,
            "empty vs diagonal",
        );
        assert_close(
            value(&swapped, &empty, &diagonal),
            -1.0 / 2.4,
            1e-6,
            "beta 0.7",
        );
        let small_smooth =
            loss(json!({"name": "TverskyLoss", "alpha": 0.3, "beta": 0.7, "smooth": 0.01}));
        assert_close(
            value(&small_smooth, &empty, &diagonal),
            -0.01 / 1.41,
            1e-5,
            "smooth 0.01",
        );
        assert_close(
            value(&swapped, &empty, &empty),
            -1.0,
            1e-6,
            "empty vs empty",
        );
        let p = tensor(&[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[1, 2, 2, 2]);
        let t = tensor(&[0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], &[1, 2, 2, 2]);
        let expected = -(2.0 / 2.0 + 1.0 / 1.7) / 2.0;
        assert_close(value(&swapped, &p, &t), expected, 1e-6, "two classes");
    }

    #[test]
    fn focal_tversky_matches_ivadomed_test_values() {
        // ivadomed test_focaltverskyloss, in its order.
        let default = loss(json!({"name": "FocalTverskyLoss"}));
        let volume = tensor(&[0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], &[1, 1, 2, 2, 2]);
        assert_eq!(value(&default, &volume, &volume), 0.0, "3D identical");
        let diagonal = image([1.0, 0.0, 0.0, 1.0]);
        let empty = image([0.0; 4]);
        assert_eq!(value(&default, &diagonal, &diagonal), 0.0, "identical");
        // Tversky index 0.625 (see the Tversky test): (1 - 0.625)^(1/1.5) = 0.52002, and ^1 = 0.375.
        let gamma_1_5 = loss(json!({"name": "FocalTverskyLoss", "gamma": 1.5}));
        assert_close(
            value(&gamma_1_5, &empty, &diagonal),
            0.375f64.powf(1.0 / 1.5),
            1e-5,
            "gamma 1.5",
        );
        let gamma_1 = loss(json!({"name": "FocalTverskyLoss", "gamma": 1}));
        assert_close(value(&gamma_1, &empty, &diagonal), 0.375, 1e-6, "gamma 1");
        assert_eq!(value(&default, &empty, &empty), 0.0, "empty vs empty");
        let p = tensor(&[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], &[1, 2, 2, 2]);
        let t = tensor(&[0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], &[1, 2, 2, 2]);
        let expected = (0.0 + (1.0f64 - 1.0 / 1.3).powf(1.0 / 1.33)) / 2.0;
        assert_close(value(&default, &p, &t), expected, 1e-5, "two classes");
    }

    #[test]
    fn l2_matches_ivadomed_test_values() {
        // ivadomed test_L2loss, in its order.
        let l2 = loss(json!({"name": "L2loss"}));
        let volume = tensor(&[0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], &[1, 1, 2, 2, 2]);
        assert_eq!(value(&l2, &volume, &volume), 0.0);
        let diagonal = image([1.0, 0.0, 0.0, 1.0]);
        assert_eq!(value(&l2, &diagonal, &diagonal), 0.0);
        assert_close(
            value(&l2, &image([0.0; 4]), &diagonal),
            1.0,
            1e-6,
            "(1 + 1) / 2",
        );
        let (half, soft) = (image([0.5; 4]), image([0.5, 1.0, 1.0, 1.0]));
        assert_close(value(&l2, &half, &soft), 0.375, 1e-6, "3·0.25 / 2");
    }

    #[test]
    fn adapwing_matches_ivadomed_test_values() {
        // ivadomed test_adapwingloss, in its order.
        let default = loss(json!({"name": "AdapWingLoss"}));
        let top = image([1.0, 1.0, 0.0, 0.0]);
        let l_shape = image([1.0, 0.0, 1.0, 1.0]);
        assert_eq!(value(&default, &top, &top), 0.0, "identical");
        assert_close(value(&default, &top, &l_shape), 29.0147, 1e-5, "defaults");
        let omega_20 = loss(json!({"name": "AdapWingLoss", "omega": 20}));
        assert_close(value(&omega_20, &top, &l_shape), 41.4496, 1e-5, "omega 20");
        let epsilon_2 = loss(json!({"name": "AdapWingLoss", "epsilon": 2}));
        let (half, soft) = (image([0.5; 4]), image([0.5, 1.0, 1.0, 1.0]));
        assert_close(value(&epsilon_2, &half, &soft), 8.2703, 1e-4, "epsilon 2");
    }

    #[test]
    fn loss_combination_matches_ivadomed_test_values() {
        // ivadomed test_losscombination: DiceLoss + L2loss, written in both config forms.
        let ours = loss(
            json!({"name": "LossCombination", "losses": [{"name": "DiceLoss"}, {"name": "L2loss"}]}),
        );
        let ivadomed = loss(
            json!({"name": "LossCombination", "losses_list": ["DiceLoss", "L2loss"],
                                   "params_list": [null, null]}),
        );
        assert_eq!(ours, ivadomed);
        let top = image([1.0, 1.0, 0.0, 0.0]);
        let l_shape = image([1.0, 0.0, 1.0, 1.0]);
        assert_close(value(&ours, &top, &top), -1.0, 1e-6, "identical");
        assert_close(value(&ours, &top, &l_shape), 1.0, 1e-6, "-0.5 + 1.5");
        let (half, soft) = (image([0.5; 4]), image([0.5, 1.0, 1.0, 1.0]));
        assert_close(value(&ours, &half, &soft), -0.3173, 1e-3, "soft");
        // params_list entries reach their loss.
        let smooth_0 = loss(
            json!({"name": "LossCombination", "losses_list": ["DiceLoss"],
                                   "params_list": [{"smooth": 0}]}),
        );
        assert_eq!(
            smooth_0,
            Loss::Combination(vec![(1.0, Loss::Dice { smooth: 0.0 })])
        );
    }

    #[test]
    fn loss_combination_is_the_weighted_sum_of_its_parts() {
        let parts = [
            json!({"name": "DiceLoss", "smooth": 0.5}),
            json!({"name": "BinaryCrossEntropyLoss"}),
            json!({"name": "FocalTverskyLoss", "gamma": 2}),
            json!({"name": "GeneralizedDiceLoss", "include_background": false}),
        ];
        let weights = [1.0, 0.5, -2.0, 3.0];
        let combination =
            loss(json!({"name": "LossCombination", "losses": parts, "weights": weights}));
        let p = Tensor::rand([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let t = Tensor::rand([2, 3, 4, 5], (Kind::Float, Device::Cpu))
            .gt(0.5)
            .to_kind(Kind::Float);
        let expected: f64 = parts
            .iter()
            .zip(weights)
            .map(|(part, weight)| weight * value(&loss(part.clone()), &p, &t))
            .sum();
        assert_close(value(&combination, &p, &t), expected, 1e-5, "weighted sum");
    }

    /// One config of every loss, defaults except where a parameter is worth exercising.
    fn every_loss() -> Vec<Value> {
        let mut configs: Vec<Value> = NAMES
            .iter()
            .filter(|name| **name != "LossCombination")
            .map(|name| json!({"name": name}))
            .collect();
        configs.push(json!({"name": "FocalLoss", "gamma": 0.5}));
        configs.push(json!({"name": "GeneralizedDiceLoss", "include_background": false}));
        configs.push(json!({"name": "MultiClassDiceLoss", "classes_of_interest": [1]}));
        configs.push(json!({"name": "AdapWingLoss", "alpha": 1.5}));
        let all = configs.clone();
        configs.push(json!({"name": "LossCombination", "losses": all}));
        configs
    }

    #[test]
    fn every_loss_has_finite_gradients_on_all_zero_and_all_one_inputs() {
        for config in every_loss() {
            let loss = loss(config.clone());
            for shape in [[2i64, 2, 3, 3].as_slice(), [1, 2, 2, 3, 2].as_slice()] {
                for p_value in [0.0, 1.0] {
                    for t_value in [0.0, 1.0] {
                        let p = Tensor::full(shape, p_value, (Kind::Float, Device::Cpu))
                            .set_requires_grad(true);
                        let t = Tensor::full(shape, t_value, (Kind::Float, Device::Cpu));
                        let value = loss.compute(&p, &t).unwrap();
                        let case = format!("{config} shape {shape:?}, p {p_value}, t {t_value}");
                        assert!(value.double_value(&[]).is_finite(), "{case}: loss {value}");
                        value.backward();
                        let gradient = p.grad();
                        assert!(gradient.defined(), "{case}: no gradient");
                        assert!(
                            gradient.isfinite().all().int64_value(&[]) == 1,
                            "{case}: {gradient}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gradients_point_the_right_way() {
        // Raising the prediction where the target is 1 must lower every overlap loss: the gradient there is
        // negative. p = 0.5 everywhere, target 1 on the first of two pixels of a single channel.
        let mut p = tensor(&[0.5, 0.5], &[1, 1, 2]).set_requires_grad(true);
        let t = tensor(&[1.0, 0.0], &[1, 1, 2]);
        for name in NAMES.iter().filter(|name| **name != "LossCombination") {
            let loss = loss(json!({"name": name}));
            p.zero_grad();
            loss.compute(&p, &t).unwrap().backward();
            let gradient = p.grad();
            assert!(
                gradient.double_value(&[0, 0, 0]) < 0.0,
                "{name}: {gradient}"
            );
            assert!(
                gradient.double_value(&[0, 0, 1]) > 0.0,
                "{name}: {gradient}"
            );
        }
    }

    #[test]
    fn config_errors_name_the_problem() {
        let error = |config: Value| Loss::from_config(&config).unwrap_err();
        let message = |config: Value| format!("{:#}", error(config));

        let unknown_name = message(json!({"name": "DiceLos"}));
        assert!(
            unknown_name.contains("unknown loss \"DiceLos\""),
            "{unknown_name}"
        );
        for name in NAMES {
            assert!(unknown_name.contains(name), "{unknown_name}");
        }
        let unknown_key = message(json!({"name": "DiceLoss", "smoth": 1.0}));
        assert_eq!(
            unknown_key,
            "loss `DiceLoss`: unknown parameter `smoth` (known parameters: smooth)"
        );
        let no_parameters = message(json!({"name": "L2loss", "smooth": 1.0}));
        assert_eq!(
            no_parameters,
            "loss `L2loss`: unknown parameter `smooth` (L2loss takes no parameters)"
        );
        let wrong_type = message(json!({"name": "FocalLoss", "gamma": "2"}));
        assert_eq!(
            wrong_type,
            "loss `FocalLoss`: parameter `gamma` must be a number >= 0, got \"2\""
        );
        let out_of_range = message(json!({"name": "FocalLoss", "alpha": 1.5}));
        assert!(
            out_of_range.contains("`alpha` must be a number in [0, 1]"),
            "{out_of_range}"
        );
        let not_bool = message(json!({"name": "GeneralizedDiceLoss", "include_background": 1}));
        assert!(
            not_bool.contains("`include_background` must be true or false"),
            "{not_bool}"
        );
        let classes = message(json!({"name": "MultiClassDiceLoss", "classes_of_interest": [-1]}));
        assert!(classes.contains("`classes_of_interest`"), "{classes}");
        assert!(message(json!({"smooth": 1})).contains("has no `name`"));
        assert!(message(json!("DiceLoss")).contains("must be a JSON object"));

        // Errors inside a combination say which part.
        let nested = message(
            json!({"name": "LossCombination", "losses": [{"name": "DiceLoss"}, {"name": "Nope"}]}),
        );
        assert!(
            nested.starts_with("LossCombination losses[1]: unknown loss \"Nope\""),
            "{nested}"
        );
        let weights = message(
            json!({"name": "LossCombination", "losses": [{"name": "DiceLoss"}], "weights": [1, 2]}),
        );
        assert!(
            weights.contains("`weights` must be null or a list of 1 numbers"),
            "{weights}"
        );
        let empty = message(json!({"name": "LossCombination"}));
        assert!(
            empty.contains("`losses` must be a non-empty list"),
            "{empty}"
        );
        let both = message(
            json!({"name": "LossCombination", "losses": [{"name": "DiceLoss"}],
                                  "losses_list": ["DiceLoss"]}),
        );
        assert!(both.contains("not both"), "{both}");
        let params = message(
            json!({"name": "LossCombination", "losses_list": ["DiceLoss", "L2loss"],
                                    "params_list": [null]}),
        );
        assert!(
            params.contains("`params_list` must be null or a list of 2 entries"),
            "{params}"
        );
    }

    #[test]
    fn compute_errors_name_the_problem() {
        let dice = loss(json!({"name": "DiceLoss"}));
        let p = Tensor::zeros([1, 1, 2, 2], (Kind::Float, Device::Cpu));
        let mismatch = dice
            .compute(&p, &Tensor::zeros([1, 1, 2, 3], (Kind::Float, Device::Cpu)))
            .unwrap_err()
            .to_string();
        assert_eq!(
            mismatch,
            "DiceLoss: prediction shape [1, 1, 2, 2] and target shape [1, 1, 2, 3] differ"
        );
        let flat = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let too_flat = dice.compute(&flat, &flat).unwrap_err().to_string();
        assert!(too_flat.contains("[N, C, ...spatial]"), "{too_flat}");
        let integers = Tensor::zeros([1, 1, 2, 2], (Kind::Int64, Device::Cpu));
        let not_float = dice.compute(&integers, &integers).unwrap_err().to_string();
        assert!(not_float.contains("floating-point"), "{not_float}");
        // An integer target is converted to the prediction's kind.
        assert_eq!(dice.compute(&p, &integers).unwrap().double_value(&[]), -1.0);
    }

    #[test]
    fn defaults_list_every_parameter_and_match_from_config() {
        assert_eq!(Loss::names(), NAMES);
        assert!(Loss::defaults("Nope").is_none());
        for name in Loss::names() {
            let mut config = Loss::defaults(name).unwrap();
            config["name"] = json!(name);
            if *name == "LossCombination" {
                config["losses"] = json!([{"name": "DiceLoss"}]);
            }
            let parsed = Loss::from_config(&config).unwrap();
            assert_eq!(parsed.name(), *name);
            // Spelling out every default gives the same loss as leaving them all out.
            if *name != "LossCombination" {
                assert_eq!(parsed, loss(json!({"name": name})), "{name}");
            }
        }
        // ivadomed's constructor defaults.
        assert_eq!(
            loss(json!({"name": "FocalLoss"})),
            Loss::Focal {
                gamma: 2.0,
                alpha: 0.25,
                eps: 1e-7
            }
        );
        assert_eq!(
            loss(json!({"name": "FocalTverskyLoss"})),
            Loss::FocalTversky {
                alpha: 0.7,
                beta: 0.3,
                gamma: 1.33,
                smooth: 1.0
            }
        );
        assert_eq!(
            loss(json!({"name": "AdapWingLoss"})),
            Loss::AdapWing {
                theta: 0.5,
                alpha: 2.1,
                omega: 14.0,
                epsilon: 1.0
            }
        );
        assert_eq!(
            loss(json!({"name": "GeneralizedDiceLoss"})),
            Loss::GeneralizedDice {
                epsilon: 1e-5,
                include_background: true
            }
        );
        assert_eq!(
            Loss::defaults("FocalDiceLoss").unwrap(),
            json!({"beta": 1.0, "gamma": 2.0, "alpha": 0.25})
        );
    }
}
