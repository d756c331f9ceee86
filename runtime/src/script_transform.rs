//! Rhai script transforms: a pipeline step written as a Rhai function over a sample, using host tensor ops.
//!
//! ```rhai
//! // preprocess.rhai
//! fn clip_and_scale(sample) {
//!     sample.image = sample.image.clamp(0.0, 1.0) * 2.0;
//!     sample
//! }
//! ```
//! `script_transform("preprocess.rhai", "clip_and_scale")` in an experiment script makes it a step. The
//! function gets the sample and returns it; only the named function (and functions it calls) runs, never the
//! file's top-level statements.
//!
//! The same machinery compiles Rhai losses (`script_loss`, see `losses::ScriptLoss`): [`ScriptRole::Loss`]
//! functions take `(prediction, target)` and run on an engine whose whole-tensor reductions return tensors.
//!
//! Threads: a Rhai engine and AST are not `Send` (without Rhai's `sync` feature, which would also require
//! `Sync` tensors, and `tch::Tensor` is not). Rather than funnel every call through one engine thread, each
//! thread that runs a script step compiles the step's source once into a thread-local cache and calls it
//! there. Steps stay `Send + Sync` (they hold only the source text), loader threads run scripts in parallel
//! with no channel hop per sample, and compiling again (well under a millisecond for a small file) happens
//! once per thread and version. Cache entries die with their version.
use crate::script::format_error;
use anyhow::{anyhow, bail, Context, Result};
use ivado_sdk::Sample;
use rhai::{
    Array, CallFnOptions, Dynamic, Engine, EvalAltResult, Position, Scope, AST, FLOAT, INT,
};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use tch::{Kind, Tensor};

type ScriptResult<T> = std::result::Result<T, Box<EvalAltResult>>;

fn runtime_error(message: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        message.into().into(),
        Position::NONE,
    ))
}

/// libtorch errors carry a C++ backtrace after the first line.
fn tch_error(error: tch::TchError) -> Box<EvalAltResult> {
    let text = error.to_string();
    runtime_error(text.lines().next().unwrap_or_default().to_owned())
}

/// A tensor in a script. Cloning shares storage (every op returns a new tensor, none works in place).
pub struct ScriptTensor(pub Tensor);

impl Clone for ScriptTensor {
    fn clone(&self) -> Self {
        Self(self.0.shallow_clone())
    }
}

/// A sample in a script: named tensors, metadata and the step's seed.
pub struct ScriptSample {
    tensors: BTreeMap<String, Tensor>,
    meta: serde_json::Map<String, Value>,
    seed: u64,
}

impl Clone for ScriptSample {
    fn clone(&self) -> Self {
        Self {
            tensors: self
                .tensors
                .iter()
                .map(|(name, tensor)| (name.clone(), tensor.shallow_clone()))
                .collect(),
            meta: self.meta.clone(),
            seed: self.seed,
        }
    }
}

impl ScriptSample {
    fn new(sample: Sample, seed: u64) -> Self {
        Self {
            tensors: sample.tensors,
            meta: sample.meta,
            seed,
        }
    }

    fn into_sample(self) -> Sample {
        Sample {
            tensors: self.tensors,
            meta: self.meta,
        }
    }

    fn tensor(&self, name: &str) -> ScriptResult<ScriptTensor> {
        self.tensors
            .get(name)
            .map(|t| ScriptTensor(t.shallow_clone()))
            .ok_or_else(|| {
                let names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
                runtime_error(format!(
                    "the sample has no `{name}` (it has: {})",
                    names.join(", ")
                ))
            })
    }
}

/// A binary operand: a tensor or a number.
enum Operand {
    Tensor(Tensor),
    Scalar(f64),
}

impl Operand {
    fn of(value: &Dynamic) -> ScriptResult<Self> {
        if value.is::<ScriptTensor>() {
            Ok(Operand::Tensor(value.clone().cast::<ScriptTensor>().0))
        } else if let Ok(number) = value.as_float() {
            Ok(Operand::Scalar(number))
        } else if let Ok(number) = value.as_int() {
            Ok(Operand::Scalar(number as f64))
        } else {
            Err(runtime_error(format!(
                "expected a tensor or a number, got {}",
                value.type_name()
            )))
        }
    }

    /// A tensor shaped like `like` when a scalar.
    fn tensor_like(self, like: &Tensor) -> ScriptResult<Tensor> {
        match self {
            Operand::Tensor(t) => Ok(t),
            Operand::Scalar(s) => like.f_full_like(s).map_err(tch_error),
        }
    }
}

#[derive(Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Gt,
    Lt,
    Ge,
    Le,
}

impl Op {
    fn is_comparison(self) -> bool {
        matches!(self, Op::Gt | Op::Lt | Op::Ge | Op::Le)
    }
}

fn binary(op: Op, a: Operand, b: Operand) -> ScriptResult<ScriptTensor> {
    use Operand::{Scalar, Tensor as T};
    let result = match (a, b) {
        (T(a), T(b)) => match op {
            Op::Add => a.f_add(&b),
            Op::Sub => a.f_sub(&b),
            Op::Mul => a.f_mul(&b),
            Op::Div => a.f_div(&b),
            Op::Pow => a.f_pow(&b),
            Op::Gt => a.f_gt_tensor(&b),
            Op::Lt => a.f_lt_tensor(&b),
            Op::Ge => a.f_ge_tensor(&b),
            Op::Le => a.f_le_tensor(&b),
        },
        (T(a), Scalar(s)) => match op {
            Op::Add => a.f_add_scalar(s),
            Op::Sub => a.f_sub_scalar(s),
            Op::Mul => a.f_mul_scalar(s),
            Op::Div => a.f_div_scalar(s),
            Op::Pow => a.f_pow_tensor_scalar(s),
            Op::Gt => a.f_gt(s),
            Op::Lt => a.f_lt(s),
            Op::Ge => a.f_ge(s),
            Op::Le => a.f_le(s),
        },
        (Scalar(s), T(b)) => match op {
            Op::Add => b.f_add_scalar(s),
            Op::Sub => b.f_neg().and_then(|n| n.f_add_scalar(s)),
            Op::Mul => b.f_mul_scalar(s),
            Op::Div => b.f_full_like(s).and_then(|n| n.f_div(&b)),
            Op::Pow => Tensor::f_pow_scalar(s, &b),
            // s > b  <=>  b < s
            Op::Gt => b.f_lt(s),
            Op::Lt => b.f_gt(s),
            Op::Ge => b.f_le(s),
            Op::Le => b.f_ge(s),
        },
        (Scalar(_), Scalar(_)) => {
            return Err(runtime_error(
                "this tensor operation needs at least one tensor",
            ));
        }
    }
    .map_err(tch_error)?;
    if op.is_comparison() {
        // Masks as 0/1 floats, so they combine with arithmetic.
        return result
            .f_to_kind(Kind::Float)
            .map(ScriptTensor)
            .map_err(tch_error);
    }
    Ok(ScriptTensor(result))
}

fn unary(
    t: &mut ScriptTensor,
    f: impl FnOnce(&Tensor) -> std::result::Result<Tensor, tch::TchError>,
) -> ScriptResult<ScriptTensor> {
    f(&t.0).map(ScriptTensor).map_err(tch_error)
}

/// A whole-tensor reduction as a number, computed in double precision.
fn reduce(
    t: &mut ScriptTensor,
    what: &str,
    f: impl FnOnce(&Tensor) -> std::result::Result<Tensor, tch::TchError>,
) -> ScriptResult<FLOAT> {
    if t.0.numel() == 0 {
        return Err(runtime_error(format!("{what} of an empty tensor")));
    }
    let double = t.0.f_to_kind(Kind::Double).map_err(tch_error)?;
    f(&double)
        .and_then(|r| r.f_double_value(&[]))
        .map_err(tch_error)
}

/// Axes from a script list such as `[1, 2]`; negative axes count from the end, as in torch.
fn axes(list: &Array) -> ScriptResult<Vec<i64>> {
    list.iter()
        .map(|axis| axis.as_int().ok())
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| runtime_error("axes must be a list of integers, e.g. [2, 3]"))
}

/// The kind a sum or mean keeps: the tensor's own when floating point, else fp32.
fn reduction_kind(t: &Tensor) -> Kind {
    if t.is_floating_point() {
        t.kind()
    } else {
        Kind::Float
    }
}

/// A reduction over `dims` that stays a tensor (on the autograd graph).
fn reduce_axes(
    t: &ScriptTensor,
    dims: &Array,
    keepdim: bool,
    mean: bool,
) -> ScriptResult<ScriptTensor> {
    let dims = axes(dims)?;
    let kind = reduction_kind(&t.0);
    let result = if mean {
        t.0.f_mean_dim(dims.as_slice(), keepdim, kind)
    } else {
        t.0.f_sum_dim_intlist(dims.as_slice(), keepdim, kind)
    };
    result.map(ScriptTensor).map_err(tch_error)
}

fn spacing_array(meta: &serde_json::Map<String, Value>) -> Array {
    meta.get("spacing")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_f64)
                .map(Dynamic::from_float)
                .collect()
        })
        .unwrap_or_default()
}

/// Registers `Tensor` and `Sample` with their operations on `engine`.
pub fn register_tensor_api(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptTensor>("Tensor");
    engine.register_fn("to_string", |t: &mut ScriptTensor| {
        format!("Tensor({:?}, {:?})", t.0.size(), t.0.kind())
    });
    engine.register_fn("to_debug", |t: &mut ScriptTensor| {
        format!("Tensor({:?}, {:?})", t.0.size(), t.0.kind())
    });

    macro_rules! operator {
        ($name:literal, $op:expr) => {
            engine.register_fn($name, |a: ScriptTensor, b: ScriptTensor| {
                binary($op, Operand::Tensor(a.0), Operand::Tensor(b.0))
            });
            engine.register_fn($name, |a: ScriptTensor, b: FLOAT| {
                binary($op, Operand::Tensor(a.0), Operand::Scalar(b))
            });
            engine.register_fn($name, |a: ScriptTensor, b: INT| {
                binary($op, Operand::Tensor(a.0), Operand::Scalar(b as f64))
            });
            engine.register_fn($name, |a: FLOAT, b: ScriptTensor| {
                binary($op, Operand::Scalar(a), Operand::Tensor(b.0))
            });
            engine.register_fn($name, |a: INT, b: ScriptTensor| {
                binary($op, Operand::Scalar(a as f64), Operand::Tensor(b.0))
            });
        };
    }
    operator!("+", Op::Add);
    operator!("-", Op::Sub);
    operator!("*", Op::Mul);
    operator!("/", Op::Div);
    operator!("pow", Op::Pow);
    operator!("**", Op::Pow);
    operator!("gt", Op::Gt);
    operator!("lt", Op::Lt);
    operator!("ge", Op::Ge);
    operator!("le", Op::Le);
    // ivadomed binarises predictions with `> threshold`.
    operator!("threshold", Op::Gt);
    engine.register_fn("-", |t: &mut ScriptTensor| unary(t, Tensor::f_neg));

    engine.register_fn("abs", |t: &mut ScriptTensor| unary(t, Tensor::f_abs));
    engine.register_fn("sqrt", |t: &mut ScriptTensor| unary(t, Tensor::f_sqrt));
    engine.register_fn("exp", |t: &mut ScriptTensor| unary(t, Tensor::f_exp));
    engine.register_fn("log", |t: &mut ScriptTensor| unary(t, Tensor::f_log));
    engine.register_fn("sigmoid", |t: &mut ScriptTensor| {
        unary(t, Tensor::f_sigmoid)
    });
    engine.register_fn("square", |t: &mut ScriptTensor| unary(t, Tensor::f_square));
    engine.register_fn("reciprocal", |t: &mut ScriptTensor| {
        unary(t, Tensor::f_reciprocal)
    });
    engine.register_fn("log1p", |t: &mut ScriptTensor| unary(t, Tensor::f_log1p));
    engine.register_fn("softmax", |t: &mut ScriptTensor, dim: INT| {
        unary(t, |t| t.f_softmax(dim, reduction_kind(t)))
    });
    engine.register_fn("log_softmax", |t: &mut ScriptTensor, dim: INT| {
        unary(t, |t| t.f_log_softmax(dim, reduction_kind(t)))
    });
    // Cuts the autograd graph: a loss weight computed from the prediction but not trained through.
    engine.register_fn("detach", |t: &mut ScriptTensor| ScriptTensor(t.0.detach()));
    engine.register_fn("flatten", |t: &mut ScriptTensor| {
        unary(t, |t| t.f_flatten(0, -1))
    });
    engine.register_fn(
        "reshape",
        |t: &mut ScriptTensor, shape: Array| -> ScriptResult<ScriptTensor> {
            let shape = axes(&shape)?;
            unary(t, |t| t.f_reshape(shape.as_slice()))
        },
    );
    // `x.select(1, 0)`: channel 0 of an [N, C, ...] tensor, without the channel axis.
    engine.register_fn("select", |t: &mut ScriptTensor, dim: INT, index: INT| {
        unary(t, |t| t.f_select(dim, index))
    });
    engine.register_fn(
        "narrow",
        |t: &mut ScriptTensor, dim: INT, start: INT, length: INT| {
            unary(t, |t| t.f_narrow(dim, start, length))
        },
    );
    engine.register_fn("clamp_min", |t: &mut ScriptTensor, low: FLOAT| {
        unary(t, |t| t.f_clamp_min(low))
    });
    engine.register_fn("clamp_min", |t: &mut ScriptTensor, low: INT| {
        unary(t, |t| t.f_clamp_min(low))
    });
    engine.register_fn("clamp_max", |t: &mut ScriptTensor, high: FLOAT| {
        unary(t, |t| t.f_clamp_max(high))
    });
    engine.register_fn("clamp_max", |t: &mut ScriptTensor, high: INT| {
        unary(t, |t| t.f_clamp_max(high))
    });
    // Elementwise larger/smaller of a tensor and a tensor or number.
    engine.register_fn(
        "maximum",
        |t: &mut ScriptTensor, other: Dynamic| -> ScriptResult<ScriptTensor> {
            let other = Operand::of(&other)?.tensor_like(&t.0)?;
            unary(t, |t| t.f_maximum(&other))
        },
    );
    engine.register_fn(
        "minimum",
        |t: &mut ScriptTensor, other: Dynamic| -> ScriptResult<ScriptTensor> {
            let other = Operand::of(&other)?.tensor_like(&t.0)?;
            unary(t, |t| t.f_minimum(&other))
        },
    );
    engine.register_fn("to_float", |t: &mut ScriptTensor| {
        unary(t, |t| t.f_to_kind(Kind::Float))
    });
    engine.register_fn("zeros_like", |t: &mut ScriptTensor| {
        unary(t, Tensor::f_zeros_like)
    });
    engine.register_fn("ones_like", |t: &mut ScriptTensor| {
        unary(t, Tensor::f_ones_like)
    });
    engine.register_fn(
        "clamp",
        |t: &mut ScriptTensor, low: Dynamic, high: Dynamic| -> ScriptResult<ScriptTensor> {
            match (Operand::of(&low)?, Operand::of(&high)?) {
                (Operand::Scalar(low), Operand::Scalar(high)) => unary(t, |t| t.f_clamp(low, high)),
                (low, high) => {
                    let low = low.tensor_like(&t.0)?;
                    let high = high.tensor_like(&t.0)?;
                    unary(t, |t| t.f_clamp_tensor(Some(&low), Some(&high)))
                }
            }
        },
    );
    engine.register_fn(
        "where",
        |condition: ScriptTensor, a: Dynamic, b: Dynamic| -> ScriptResult<ScriptTensor> {
            let mask = condition.0.f_ne(0).map_err(tch_error)?;
            let like = condition.0.f_to_kind(Kind::Float).map_err(tch_error)?;
            let a = Operand::of(&a)?.tensor_like(&like)?;
            let b = Operand::of(&b)?.tensor_like(&like)?;
            a.f_where_self(&mask, &b)
                .map(ScriptTensor)
                .map_err(tch_error)
        },
    );

    engine.register_fn("sum", |t: &mut ScriptTensor| {
        reduce(t, "sum", |t| t.f_sum(Kind::Double))
    });
    engine.register_fn("mean", |t: &mut ScriptTensor| {
        reduce(t, "mean", |t| t.f_mean(Kind::Double))
    });
    engine.register_fn("min", |t: &mut ScriptTensor| {
        reduce(t, "min", Tensor::f_min)
    });
    engine.register_fn("max", |t: &mut ScriptTensor| {
        reduce(t, "max", Tensor::f_max)
    });
    // Population standard deviation (numpy's default), as ivadomed's NormalizeInstance uses.
    engine.register_fn("std", |t: &mut ScriptTensor| {
        reduce(t, "std", |t| {
            let centred = t.f_sub(&t.f_mean(Kind::Double)?)?;
            centred.f_square()?.f_mean(Kind::Double)?.f_sqrt()
        })
    });
    // Reductions over some axes stay tensors: `x.sum([2, 3])` sums the spatial axes of [N, C, H, W].
    engine.register_fn("sum", |t: &mut ScriptTensor, dims: Array| {
        reduce_axes(t, &dims, false, false)
    });
    engine.register_fn("sum", |t: &mut ScriptTensor, dims: Array, keepdim: bool| {
        reduce_axes(t, &dims, keepdim, false)
    });
    engine.register_fn("mean", |t: &mut ScriptTensor, dims: Array| {
        reduce_axes(t, &dims, false, true)
    });
    engine.register_fn(
        "mean",
        |t: &mut ScriptTensor, dims: Array, keepdim: bool| reduce_axes(t, &dims, keepdim, true),
    );
    // The number in a one-element tensor.
    engine.register_fn("item", |t: &mut ScriptTensor| -> ScriptResult<FLOAT> {
        if t.0.numel() != 1 {
            return Err(runtime_error(format!(
                "item() needs a tensor of one element, this one has shape {:?}",
                t.0.size()
            )));
        }
        t.0.f_to_kind(Kind::Double)
            .and_then(|d| d.f_reshape([1i64]))
            .and_then(|d| d.f_double_value(&[0]))
            .map_err(tch_error)
    });
    engine.register_fn("ndim", |t: &mut ScriptTensor| t.0.dim() as INT);
    engine.register_get("shape", |t: &mut ScriptTensor| -> Array {
        t.0.size().into_iter().map(Dynamic::from_int).collect()
    });
    engine.register_fn("shape", |t: &mut ScriptTensor| -> Array {
        t.0.size().into_iter().map(Dynamic::from_int).collect()
    });
    engine.register_fn("numel", |t: &mut ScriptTensor| t.0.numel() as INT);

    engine.register_type_with_name::<ScriptSample>("Sample");
    engine.register_fn("to_string", |s: &mut ScriptSample| {
        let names: Vec<&str> = s.tensors.keys().map(String::as_str).collect();
        format!("Sample({})", names.join(", "))
    });
    for name in ["image", "label", "roi", "prediction"] {
        engine.register_get(name, move |s: &mut ScriptSample| s.tensor(name));
        engine.register_set(name, move |s: &mut ScriptSample, t: ScriptTensor| {
            s.tensors.insert(name.to_owned(), t.0);
        });
    }
    engine.register_indexer_get(|s: &mut ScriptSample, name: &str| s.tensor(name));
    engine.register_indexer_set(|s: &mut ScriptSample, name: &str, t: ScriptTensor| {
        s.tensors.insert(name.to_owned(), t.0);
    });
    engine.register_fn("get", |s: &mut ScriptSample, name: &str| s.tensor(name));
    engine.register_fn(
        "set",
        |s: &mut ScriptSample, name: &str, t: ScriptTensor| {
            s.tensors.insert(name.to_owned(), t.0);
        },
    );
    engine.register_fn("has", |s: &mut ScriptSample, name: &str| {
        s.tensors.contains_key(name)
    });
    engine.register_fn("remove", |s: &mut ScriptSample, name: &str| {
        s.tensors.remove(name);
    });
    engine.register_get("names", |s: &mut ScriptSample| -> Array {
        s.tensors.keys().cloned().map(Dynamic::from).collect()
    });
    engine.register_get("spacing", |s: &mut ScriptSample| spacing_array(&s.meta));
    engine.register_set(
        "spacing",
        |s: &mut ScriptSample, spacing: Array| -> ScriptResult<()> {
            let values = spacing
                .iter()
                .map(|v| {
                    v.as_float()
                        .ok()
                        .or_else(|| v.as_int().ok().map(|i| i as f64))
                })
                .collect::<Option<Vec<f64>>>()
                .ok_or_else(|| runtime_error("spacing must be a list of numbers"))?;
            s.meta.insert("spacing".into(), json!(values));
            Ok(())
        },
    );
    // The step's seed, for scripts that draw random numbers: same seed, same draw.
    engine.register_get("seed", |s: &mut ScriptSample| s.seed as INT);
    engine.register_fn("uniform", |seed: INT, low: FLOAT, high: FLOAT| -> FLOAT {
        let bits = crate::pipeline::derive_seed(seed as u64, 0x5EED) >> 11;
        low + (high - low) * (bits as f64 / (1u64 << 53) as f64)
    });
    engine.register_fn("derive_seed", |seed: INT, stream: INT| -> INT {
        crate::pipeline::derive_seed(seed as u64, stream as u64) as INT
    });
}

/// What a script function is for, which decides its parameters and its engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScriptRole {
    /// A pipeline step: `fn step(sample)` returning the sample; reductions return numbers.
    Transform,
    /// A training loss: `fn loss(prediction, target)` returning a scalar tensor. Reductions return tensors
    /// so that the result stays on the autograd graph.
    Loss,
}

impl ScriptRole {
    fn parameters(self) -> &'static [&'static str] {
        match self {
            ScriptRole::Transform => &["sample"],
            ScriptRole::Loss => &["prediction", "target"],
        }
    }
}

/// Registers the loss dialect over [`register_tensor_api`]: whole-tensor reductions return scalar tensors
/// instead of numbers, so a loss written with them stays differentiable (`item()` gives the number).
pub fn register_loss_api(engine: &mut Engine) {
    fn whole(
        t: &mut ScriptTensor,
        what: &str,
        f: impl FnOnce(&Tensor) -> std::result::Result<Tensor, tch::TchError>,
    ) -> ScriptResult<ScriptTensor> {
        if t.0.numel() == 0 {
            return Err(runtime_error(format!("{what} of an empty tensor")));
        }
        unary(t, f)
    }
    // Registered after the number-returning versions with the same signature, so these replace them.
    engine.register_fn("sum", |t: &mut ScriptTensor| {
        whole(t, "sum", |t| t.f_sum(reduction_kind(t)))
    });
    engine.register_fn("mean", |t: &mut ScriptTensor| {
        whole(t, "mean", |t| t.f_mean(reduction_kind(t)))
    });
    engine.register_fn("min", |t: &mut ScriptTensor| whole(t, "min", Tensor::f_min));
    engine.register_fn("max", |t: &mut ScriptTensor| whole(t, "max", Tensor::f_max));
    engine.register_fn("std", |t: &mut ScriptTensor| {
        whole(t, "std", |t| {
            let kind = reduction_kind(t);
            let centred = t.f_sub(&t.f_mean(kind)?)?;
            centred.f_square()?.f_mean(kind)?.f_sqrt()
        })
    });
}

fn transform_engine() -> Engine {
    let mut engine = Engine::new();
    engine.set_max_expr_depths(128, 64);
    register_tensor_api(&mut engine);
    engine
}

fn loss_engine() -> Engine {
    let mut engine = transform_engine();
    register_loss_api(&mut engine);
    engine
}

/// One compiled version of a script function's source (a step with its optional undo, or a loss).
pub struct ScriptVersion {
    id: u64,
    path: PathBuf,
    source: String,
    role: ScriptRole,
    function: String,
    undo: Option<String>,
}

static NEXT_VERSION: AtomicU64 = AtomicU64::new(0);

/// A compiled AST of one version (by id), alive while the version is.
type CompiledEntry = (u64, Weak<ScriptVersion>, Rc<AST>);

thread_local! {
    static ENGINE: Rc<Engine> = Rc::new(transform_engine());
    static LOSS_ENGINE: Rc<Engine> = Rc::new(loss_engine());
    /// This thread's compiled ASTs, by version id; an entry goes when its version is dropped.
    static COMPILED: RefCell<Vec<CompiledEntry>> = const { RefCell::new(Vec::new()) };
}

impl ScriptVersion {
    /// Compiles `source` and checks the functions exist with the role's parameters. Errors read
    /// `file:line:col: ...`.
    pub fn compile(
        path: &Path,
        source: String,
        role: ScriptRole,
        function: &str,
        undo: Option<&str>,
    ) -> Result<Arc<Self>> {
        let version = Arc::new(Self {
            id: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            path: path.to_owned(),
            source,
            role,
            function: function.to_owned(),
            undo: undo.map(str::to_owned),
        });
        version.compiled()?;
        Ok(version)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn function(&self) -> &str {
        &self.function
    }

    fn parse(&self, engine: &Engine) -> Result<AST> {
        let mut ast = engine
            .compile(&self.source)
            .map_err(|error| anyhow!(format_error(&self.path, &EvalAltResult::from(error))))?;
        ast.set_source(self.path.display().to_string());
        let parameters = self.role.parameters();
        for name in std::iter::once(&self.function).chain(&self.undo) {
            let found: Vec<usize> = ast
                .iter_functions()
                .filter(|f| f.name == name)
                .map(|f| f.params.len())
                .collect();
            if !found.contains(&parameters.len()) {
                let defined: Vec<String> = ast
                    .iter_functions()
                    .map(|f| format!("{}({})", f.name, f.params.join(", ")))
                    .collect();
                bail!(
                    "{}: no function `{name}({})` taking {} (defined: {})",
                    self.path.display(),
                    parameters.join(", "),
                    match parameters.len() {
                        1 => "one argument".to_owned(),
                        n => format!("{n} arguments"),
                    },
                    if defined.is_empty() {
                        "none".to_owned()
                    } else {
                        defined.join(", ")
                    }
                );
            }
        }
        Ok(ast)
    }

    /// This thread's engine and compiled AST for this version.
    fn compiled(self: &Arc<Self>) -> Result<(Rc<Engine>, Rc<AST>)> {
        let engine = match self.role {
            ScriptRole::Transform => ENGINE.with(Rc::clone),
            ScriptRole::Loss => LOSS_ENGINE.with(Rc::clone),
        };
        let cached = COMPILED.with(|cache| {
            cache
                .borrow()
                .iter()
                .find(|(id, ..)| *id == self.id)
                .map(|(.., ast)| Rc::clone(ast))
        });
        if let Some(ast) = cached {
            return Ok((engine, ast));
        }
        let ast = Rc::new(self.parse(&engine)?);
        COMPILED.with(|cache| {
            let mut cache = cache.borrow_mut();
            cache.retain(|(_, version, _)| version.strong_count() > 0);
            cache.push((self.id, Arc::downgrade(self), Rc::clone(&ast)));
        });
        Ok((engine, ast))
    }

    /// Calls `function` of this thread's compiled copy; errors read `file:line:col: ...`.
    pub fn call_function(
        self: &Arc<Self>,
        function: &str,
        arguments: impl rhai::FuncArgs,
    ) -> Result<Dynamic> {
        let (engine, ast) = self.compiled()?;
        engine
            .call_fn_with_options(
                CallFnOptions::new().eval_ast(false),
                &mut Scope::new(),
                &ast,
                function,
                arguments,
            )
            .map_err(|error| anyhow!(format_error(&self.path, &error)))
    }

    fn call(self: &Arc<Self>, function: &str, sample: Sample, seed: u64) -> Result<Sample> {
        let result = self.call_function(function, (ScriptSample::new(sample, seed),))?;
        if !result.is::<ScriptSample>() {
            bail!(
                "{}: `{function}` must return the sample (end the function with `sample`), but it returned {}",
                self.path.display(),
                result.type_name()
            );
        }
        Ok(result.cast::<ScriptSample>().into_sample())
    }
}

/// A script step. After a hot reload it also holds the version it replaced, which takes over if the new one
/// fails at run time, so a broken edit never stops a run that was working.
pub struct ScriptTransform {
    current: Arc<ScriptVersion>,
    fallback: Option<Arc<ScriptVersion>>,
    failed: AtomicBool,
}

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

impl ScriptTransform {
    /// Compiles `function` (and the optional `undo` function) from `source`, read from `path`.
    pub fn compile(
        path: &Path,
        source: String,
        function: &str,
        undo: Option<&str>,
    ) -> Result<Self> {
        Ok(Self {
            current: ScriptVersion::compile(path, source, ScriptRole::Transform, function, undo)?,
            fallback: None,
            failed: AtomicBool::new(false),
        })
    }

    /// Reads and compiles a script file.
    pub fn load(path: &Path, function: &str, undo: Option<&str>) -> Result<Self> {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read script transform {}", path.display()))?;
        Self::compile(path, source, function, undo)
    }

    /// A new version from edited source, with the same functions; the version running now becomes its fallback.
    pub fn reloaded(&self, source: String) -> Result<Self> {
        let running = self.running();
        Ok(Self {
            current: ScriptVersion::compile(
                &running.path,
                source,
                ScriptRole::Transform,
                &running.function,
                running.undo.as_deref(),
            )?,
            fallback: Some(Arc::clone(running)),
            failed: AtomicBool::new(false),
        })
    }

    /// Rebuilds from a spec written by [`ScriptTransform::spec`]: from the source text it holds, not the file.
    pub fn from_spec(spec: &Value) -> Result<Self> {
        let field = |key: &str| spec.get(key).and_then(Value::as_str);
        let path = field("path").context("script step spec without a `path`")?;
        let function = field("function").context("script step spec without a `function`")?;
        let source = field("source").context("script step spec without its `source` text")?;
        Self::compile(Path::new(path), source.to_owned(), function, field("undo"))
    }

    pub fn spec(&self) -> Value {
        let version = self.running();
        json!({
            "path": version.path.display().to_string(),
            "function": version.function,
            "undo": version.undo,
            "source": version.source,
        })
    }

    /// The version in use: the current one, or its fallback once the current one failed.
    fn running(&self) -> &Arc<ScriptVersion> {
        match &self.fallback {
            Some(fallback) if self.failed.load(Ordering::Relaxed) => fallback,
            _ => &self.current,
        }
    }

    pub fn function(&self) -> &str {
        &self.current.function
    }

    pub fn path(&self) -> &Path {
        &self.current.path
    }

    pub fn source(&self) -> &str {
        &self.running().source
    }

    /// Runs `function` on the sample (after a reload, falls back to the previous version if it fails).
    pub fn apply(&self, sample: Sample, seed: u64) -> Result<Sample> {
        let running = self.running();
        let Some(fallback) = self
            .fallback
            .as_ref()
            .filter(|_| Arc::ptr_eq(running, &self.current))
        else {
            return running.call(&running.function, sample, seed);
        };
        let copy = shallow_copy(&sample);
        match self.current.call(&self.current.function, sample, seed) {
            Ok(result) => Ok(result),
            Err(error) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        "{error:#}\nthe reloaded script step `{}` failed; the previous version keeps running until the next edit",
                        self.current.function
                    );
                }
                fallback.call(&fallback.function, copy, seed)
            }
        }
    }

    /// Runs the undo function, which brings a prediction back; without one, undoing is an error.
    pub fn undo(&self, sample: Sample) -> Result<Sample> {
        let running = self.running();
        let Some(undo) = &running.undo else {
            bail!(
                "script step `{}` ({}) has no undo function: pass #{{undo: \"<function>\"}} to script_transform, \
                 or, if it does not move voxels, restrict it to images with #{{applied_to: [\"im\"]}}",
                running.function,
                running.path.display()
            );
        };
        running.call(undo, sample, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(values: &[f32]) -> Sample {
        let mut sample = Sample::new();
        sample.insert("image", Tensor::from_slice(values).view([1, 1, -1]));
        sample.set_spacing(&[1.0, 2.0]);
        sample
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(tensor.flatten(0, -1)).unwrap()
    }

    fn error_of(result: Result<Sample>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(error) => format!("{error:#}"),
        }
    }

    fn run(source: &str, input: &[f32]) -> Result<Sample> {
        ScriptTransform::compile(Path::new("t.rhai"), source.into(), "step", None)?
            .apply(sample(input), 7)
    }

    #[test]
    fn arithmetic_with_numbers_and_tensors() {
        // Expected values worked by hand from the inputs.
        let source = "fn step(sample) { let x = sample.image; sample.image = 1 - x * 2.0 + x / 2 - (-x); sample }";
        let out = run(source, &[1.0, 2.0, 4.0]).unwrap();
        // 1 - 2x + x/2 + x = 1 - x/2
        assert_eq!(values(out.get("image").unwrap()), vec![0.5, 0.0, -1.0]);
        let source =
            "fn step(sample) { let x = sample.image; sample.image = x * x + 2.0 / x; sample }";
        let out = run(source, &[1.0, 2.0, 4.0]).unwrap();
        assert_eq!(values(out.get("image").unwrap()), vec![3.0, 5.0, 16.5]);
    }

    #[test]
    fn reductions_masks_and_elementwise_functions() {
        let source = r#"
            fn step(sample) {
                let x = sample.image;
                let stats = [x.sum(), x.mean(), x.min(), x.max()];
                sample.set("stats", x.zeros_like() + stats[0]);
                // std of [1, 2, 4]: squared deviations from 7/3 are 16/9, 1/9, 25/9, their mean 14/9.
                if (x.std() - (14.0 / 9.0).sqrt()).abs() > 1e-12 { throw `std ${x.std()}`; }
                sample.label = where(x.gt(2), x.clamp(0, 3), -1.0) + x.threshold(3.5) + x.lt(1.5);
                sample.roi = x.pow(2).sqrt().log().exp().abs().sigmoid().to_float();
                if stats != [7.0, 7.0 / 3.0, 1.0, 4.0] { throw `stats ${stats}`; }
                sample
            }"#;
        let out = run(source, &[1.0, 2.0, 4.0]).unwrap();
        // where(x > 2, clamp(x, 0, 3), -1) = [-1, -1, 3]; + (x > 3.5) = [0, 0, 1]; + (x < 1.5) = [1, 0, 0]
        assert_eq!(values(out.get("label").unwrap()), vec![0.0, -1.0, 4.0]);
        let expected: Vec<f32> = [1.0f32, 2.0, 4.0]
            .iter()
            .map(|x| 1.0 / (1.0 + (-x).exp()))
            .collect();
        let got = values(out.get("roi").unwrap());
        assert!(
            got.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-6),
            "{got:?}"
        );
        assert_eq!(values(out.get("stats").unwrap()), vec![7.0; 3]);
    }

    #[test]
    fn sample_accessors() {
        let source = r#"
            fn step(sample) {
                if sample.shape != () { }
                if sample.image.shape != [1, 1, 1] { throw "shape"; }
                if sample.spacing != [1.0, 2.0] { throw "spacing"; }
                if sample.seed != 7 { throw "seed"; }
                if sample.has("label") || !sample.has("image") { throw "has"; }
                sample.spacing = [0.5, 4];
                sample["label"] = sample["image"] * 0;
                sample
            }"#;
        let error = error_of(run(source, &[1.0]));
        // `sample.shape` does not exist: the error points at line 3, column 20.
        assert!(error.starts_with("t.rhai:3:"), "{error}");
        let out = run(&source.replace("if sample.shape != () { }", ""), &[1.0]).unwrap();
        assert_eq!(out.spacing().unwrap(), vec![0.5, 4.0]);
        assert_eq!(values(out.get("label").unwrap()), vec![0.0]);
    }

    #[test]
    fn missing_function_and_wrong_return_are_reported() {
        let error = ScriptTransform::compile(
            Path::new("a.rhai"),
            "fn other(s) { s }".into(),
            "step",
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(error.contains("no function `step(sample)`"), "{error}");
        assert!(error.contains("other(s)"), "{error}");
        let error = error_of(run("fn step(sample) { 1 }", &[1.0]));
        assert!(error.contains("must return the sample"), "{error}");
        let error = error_of(run(
            "fn step(sample) {\n  sample.image + sample.nothing\n}",
            &[1.0],
        ));
        assert!(error.starts_with("t.rhai:2:"), "{error}");
        let error = error_of(run(
            "fn step(sample) {\n  let t = sample.image;\n  t + t.zeros_like().shape\n}",
            &[1.0],
        ));
        assert!(error.starts_with("t.rhai:3:"), "{error}");
    }

    #[test]
    fn axis_reductions_and_loss_ops() {
        // Expected values worked by hand from x = [[1, 2], [3, 4]] (shape [1, 2, 2]).
        let source = r#"
            fn step(sample) {
                let x = sample.image;
                if x.sum([2]).shape != [1, 2] || x.sum([1], true).shape != [1, 1, 2] { throw "shapes"; }
                sample.set("rows", x.sum([2]));
                sample.set("columns", x.mean([-2]));
                sample.set("powers", (x ** 2 - x.square()) + x.reciprocal() * x);
                sample.set("bounds", x.maximum(2).minimum(3.0) + x.clamp_min(3).clamp_max(3.5));
                sample.set("soft", x.select(1, 0).softmax(-1).log() - x.select(1, 0).log_softmax(-1));
                sample.set("first_row", x.narrow(1, 0, 1).reshape([2]).flatten().log1p().detach());
                if x.sum() != 10.0 || x.narrow(2, 1, 1).sum([1, 2]).item() != 6.0 { throw "numbers"; }
                if x.ndim() != 3 { throw "ndim"; }
                sample
            }"#;
        let mut input = Sample::new();
        input.insert(
            "image",
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([1, 2, 2]),
        );
        let out = ScriptTransform::compile(Path::new("t.rhai"), source.into(), "step", None)
            .unwrap()
            .apply(input, 0)
            .unwrap();
        assert_eq!(values(out.get("rows").unwrap()), vec![3.0, 7.0]);
        assert_eq!(values(out.get("columns").unwrap()), vec![2.0, 3.0]);
        assert_eq!(values(out.get("powers").unwrap()), vec![1.0; 4]);
        // max(x, 2) then min(.., 3): [2, 2, 3, 3]; clamp to [3, 3.5]: [3, 3, 3, 3.5].
        assert_eq!(values(out.get("bounds").unwrap()), vec![5.0, 5.0, 6.0, 6.5]);
        let soft = values(out.get("soft").unwrap());
        assert!(soft.iter().all(|v| v.abs() < 1e-6), "{soft:?}");
        let first_row = values(out.get("first_row").unwrap());
        assert!((first_row[0] - 2f32.ln()).abs() < 1e-6 && (first_row[1] - 3f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn in_the_loss_dialect_whole_reductions_are_differentiable_tensors() {
        let source = "fn loss(prediction, target) {\n  let d = prediction - target;\n  d.square().sum() + d.abs().mean() * 0 + d.max() * 0 + d.min() * 0 + d.std() * 0\n}";
        let loss = ScriptVersion::compile(
            Path::new("l.rhai"),
            source.into(),
            ScriptRole::Loss,
            "loss",
            None,
        )
        .unwrap();
        let prediction = Tensor::from_slice(&[1.0f32, 3.0]).set_requires_grad(true);
        let target = Tensor::from_slice(&[0.0f32, 1.0]);
        let result = loss
            .call_function(
                "loss",
                (
                    ScriptTensor(prediction.shallow_clone()),
                    ScriptTensor(target),
                ),
            )
            .unwrap()
            .cast::<ScriptTensor>()
            .0;
        // Σ (p - t)² = 1 + 4; its gradient 2 (p - t) = [2, 4].
        assert_eq!(result.double_value(&[]), 5.0);
        result.backward();
        assert_eq!(values(&prediction.grad()), vec![2.0, 4.0]);
        // A transform of one parameter is not a loss.
        let error = ScriptVersion::compile(
            Path::new("l.rhai"),
            "fn loss(p) { p }".into(),
            ScriptRole::Loss,
            "loss",
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            error.contains("no function `loss(prediction, target)` taking 2 arguments"),
            "{error}"
        );
    }

    #[test]
    fn a_reloaded_version_that_fails_hands_over_to_the_previous_one() {
        let first = ScriptTransform::compile(
            Path::new("r.rhai"),
            "fn step(sample) { sample.image = sample.image * 2; sample }".into(),
            "step",
            None,
        )
        .unwrap();
        let second = first
            .reloaded(
                "fn step(sample) { sample.image = sample.image * sample.missing; sample }".into(),
            )
            .unwrap();
        let out = second.apply(sample(&[1.0, 3.0]), 0).unwrap();
        assert_eq!(values(out.get("image").unwrap()), vec![2.0, 6.0]);
        assert!(second.spec()["source"].as_str().unwrap().contains("* 2"));
        assert!(first
            .reloaded("fn step(sample) { sample.image = (; sample }".into())
            .is_err());
    }

    #[test]
    fn each_thread_compiles_its_own_copy() {
        let transform = Arc::new(
            ScriptTransform::compile(
                Path::new("p.rhai"),
                "fn step(sample) { sample.image = sample.image + 1; sample }".into(),
                "step",
                None,
            )
            .unwrap(),
        );
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let transform = Arc::clone(&transform);
                std::thread::spawn(move || {
                    let out = transform.apply(sample(&[i as f32]), 0).unwrap();
                    values(out.get("image").unwrap())[0]
                })
            })
            .collect();
        let results: Vec<f32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results, vec![1.0, 2.0, 3.0]);
    }
}
