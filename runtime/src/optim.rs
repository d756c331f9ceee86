//! Optimizers owned by the host: Adam, AdamW and SGD with `torch.optim`'s update rules.
//!
//! Why not tch's optimizers: libtorch keeps their moment buffers out of reach, and training must resume
//! exactly after a kill. Here every state tensor is ours. [`Optimizer::state`] names them (ready for
//! safetensors), [`Optimizer::scalars`] gives the rest as JSON, and [`Optimizer::load_state`] puts both back.
//!
//! Each update is `torch.optim`'s single-tensor implementation (what PyTorch runs for CPU tensors by
//! default), written with the same libtorch kernels in the same order, so the results agree bit for bit; the
//! tests pin this against torch 2.13 on fp32 tensors of 6 and 1000 elements (libtorch's scalar and vectorised
//! loops). tch does not expose the scalar coefficient of `addcmul(.., value)`, `addcdiv(.., value)` and
//! `add(.., alpha)`. For the first two the tensor operand is multiplied by the coefficient first, which rounds
//! as the call does (libtorch also computes `value * tensor1` first). libtorch computes `add(.., alpha)` as one
//! fused multiply-add, a single rounding; `add_scaled` gets the same from `addcmul` with `alpha` as a 0-dim
//! tensor. On CUDA, PyTorch defaults to its multi-tensor (`foreach`) kernels, which round differently; these
//! are the single-tensor formulas on every device.
//!
//! As in PyTorch 2: `zero_grad` sets gradients to None, and a parameter without a gradient is skipped, state
//! and all. Adam counts steps per parameter, so a parameter that joins late gets its own bias correction.
use anyhow::{anyhow, bail, Context, Result};
use ivado_sdk::Config;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use tch::{COptimizer, Tensor};

/// The optimizer names [`OptimizerConfig::from_config`] accepts (any letter case).
pub const NAMES: &[&str] = &["Adam", "AdamW", "SGD"];

/// Hyperparameters of `torch.optim.Adam` (and of `AdamW`, with `decoupled_weight_decay`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Divide by the running maximum of the second moment (Reddi et al. 2018).
    pub amsgrad: bool,
    /// AdamW: weight decay shrinks the weights (`p *= 1 - lr * wd`) instead of joining the gradient as L2.
    pub decoupled_weight_decay: bool,
}

impl AdamConfig {
    /// `torch.optim.Adam`'s defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn adam(lr: f64) -> Self {
        Self {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            decoupled_weight_decay: false,
        }
    }

    /// `torch.optim.AdamW`'s defaults: Adam's, with a decoupled weight decay of 0.01.
    pub fn adamw(lr: f64) -> Self {
        Self {
            weight_decay: 0.01,
            decoupled_weight_decay: true,
            ..Self::adam(lr)
        }
    }

    fn name(&self) -> &'static str {
        if self.decoupled_weight_decay {
            "AdamW"
        } else {
            "Adam"
        }
    }

    /// PyTorch's constructor checks.
    fn validate(&self) -> Result<()> {
        let name = self.name();
        at_least(name, "lr", self.lr, 0.0)?;
        at_least(name, "eps", self.eps, 0.0)?;
        at_least(name, "weight_decay", self.weight_decay, 0.0)?;
        for (index, beta) in [self.betas.0, self.betas.1].into_iter().enumerate() {
            if !(0.0..1.0).contains(&beta) {
                bail!("{name}: betas[{index}] must be in [0, 1), got {beta}");
            }
        }
        Ok(())
    }
}

/// Hyperparameters of `torch.optim.SGD`.
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl SgdConfig {
    /// `torch.optim.SGD`'s defaults: plain gradient descent.
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }

    /// PyTorch's constructor checks.
    fn validate(&self) -> Result<()> {
        at_least("SGD", "lr", self.lr, 0.0)?;
        at_least("SGD", "momentum", self.momentum, 0.0)?;
        at_least("SGD", "weight_decay", self.weight_decay, 0.0)?;
        if !self.dampening.is_finite() {
            bail!(
                "SGD: dampening must be a finite number, got {}",
                self.dampening
            );
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            bail!(
                "SGD: nesterov needs momentum > 0 and dampening 0 (got momentum {}, dampening {})",
                self.momentum,
                self.dampening
            );
        }
        Ok(())
    }
}

fn at_least(optimizer: &str, key: &str, value: f64, minimum: f64) -> Result<()> {
    if !value.is_finite() || value < minimum {
        bail!("{optimizer}: `{key}` must be a finite number >= {minimum}, got {value}");
    }
    Ok(())
}

/// A configured optimizer, not yet bound to parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// Adam or AdamW.
    Adam(AdamConfig),
    Sgd(SgdConfig),
}

impl OptimizerConfig {
    /// Reads `{"name": "Adam", "lr": 1e-3, ...}` with PyTorch's parameter names and defaults:
    /// Adam and AdamW take `lr`, `betas`, `eps`, `weight_decay`, `amsgrad`; SGD takes `lr`, `momentum`,
    /// `dampening`, `weight_decay`, `nesterov`. A missing `name` means Adam, ivadomed's only optimizer.
    /// Unknown keys are errors that name the key.
    pub fn from_config(config: &Value) -> Result<Self> {
        let Some(user) = config.as_object() else {
            bail!("an optimizer config must be a JSON object such as {{\"name\": \"Adam\", \"lr\": 0.001}}, got {config}");
        };
        let name = match user.get("name") {
            None => "Adam",
            Some(name) => canonical_name(name)?,
        };
        let mut user = user.clone();
        user.remove("name");
        let mut config = Config::new(name, Self::defaults(name)?, Value::Object(user))?;
        let parsed = match name {
            "Adam" | "AdamW" => {
                let betas = config.f64_list("betas")?;
                let [beta1, beta2] = betas[..] else {
                    bail!("{name}: `betas` must be two numbers, got {betas:?}");
                };
                let adam = AdamConfig {
                    lr: config.f64("lr")?,
                    betas: (beta1, beta2),
                    eps: config.f64("eps")?,
                    weight_decay: config.f64("weight_decay")?,
                    amsgrad: config.bool("amsgrad")?,
                    decoupled_weight_decay: name == "AdamW",
                };
                adam.validate()?;
                OptimizerConfig::Adam(adam)
            }
            _ => {
                let sgd = SgdConfig {
                    lr: config.f64("lr")?,
                    momentum: config.f64("momentum")?,
                    dampening: config.f64("dampening")?,
                    weight_decay: config.f64("weight_decay")?,
                    nesterov: config.bool("nesterov")?,
                };
                sgd.validate()?;
                OptimizerConfig::Sgd(sgd)
            }
        };
        config.finish()?;
        Ok(parsed)
    }

    /// Every key of optimizer `name` with PyTorch's default (ivadomed's 1e-3 for `lr`).
    pub fn defaults(name: &str) -> Result<Value> {
        let adam = |config: AdamConfig| {
            json!({
                "lr": config.lr, "betas": [config.betas.0, config.betas.1], "eps": config.eps,
                "weight_decay": config.weight_decay, "amsgrad": config.amsgrad,
            })
        };
        Ok(match canonical_name(&Value::from(name))? {
            "Adam" => adam(AdamConfig::adam(1e-3)),
            "AdamW" => adam(AdamConfig::adamw(1e-3)),
            _ => {
                let sgd = SgdConfig::new(1e-3);
                json!({
                    "lr": sgd.lr, "momentum": sgd.momentum, "dampening": sgd.dampening,
                    "weight_decay": sgd.weight_decay, "nesterov": sgd.nesterov,
                })
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Adam(adam) => adam.name(),
            OptimizerConfig::Sgd(_) => "SGD",
        }
    }

    /// Binds the optimizer to named parameters (names must be unique: they key the saved state).
    pub fn build(&self, parameters: Vec<(String, Tensor)>) -> Result<Optimizer> {
        Ok(match self {
            OptimizerConfig::Adam(config) => {
                Optimizer::Adam(Adam::with_config(parameters, config)?)
            }
            OptimizerConfig::Sgd(config) => Optimizer::Sgd(Sgd::with_config(parameters, config)?),
        })
    }
}

fn canonical_name(name: &Value) -> Result<&'static str> {
    name.as_str()
        .and_then(|name| NAMES.iter().find(|known| known.eq_ignore_ascii_case(name)))
        .copied()
        .ok_or_else(|| anyhow!("unknown optimizer {name} (known: {})", NAMES.join(", ")))
}

/// Any of the host's optimizers.
pub enum Optimizer {
    /// Adam or AdamW.
    Adam(Adam),
    Sgd(Sgd),
}

impl Optimizer {
    /// [`OptimizerConfig::from_config`], then [`OptimizerConfig::build`].
    pub fn from_config(config: &Value, parameters: Vec<(String, Tensor)>) -> Result<Self> {
        OptimizerConfig::from_config(config)?.build(parameters)
    }

    /// `Adam`, `AdamW` or `SGD`.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Adam(adam) => adam.name(),
            Optimizer::Sgd(_) => "SGD",
        }
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        match self {
            Optimizer::Adam(adam) => adam.zero_grad(),
            Optimizer::Sgd(sgd) => sgd.zero_grad(),
        }
    }

    pub fn step(&mut self) -> Result<()> {
        match self {
            Optimizer::Adam(adam) => adam.step(),
            Optimizer::Sgd(sgd) => sgd.step(),
        }
    }

    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::Adam(adam) => adam.lr,
            Optimizer::Sgd(sgd) => sgd.lr,
        }
    }

    /// What a learning-rate scheduler calls before a step.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Optimizer::Adam(adam) => adam.lr = lr,
            Optimizer::Sgd(sgd) => sgd.lr = lr,
        }
    }

    /// How many times `step` ran.
    pub fn steps_taken(&self) -> i64 {
        match self {
            Optimizer::Adam(adam) => adam.step,
            Optimizer::Sgd(sgd) => sgd.step,
        }
    }

    /// The state tensors by name (`exp_avg.<parameter>`, `exp_avg_sq.<parameter>`,
    /// `max_exp_avg_sq.<parameter>`, `momentum_buffer.<parameter>`: PyTorch's state keys). They share
    /// storage with the live buffers, so write them out before the next step.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        match self {
            Optimizer::Adam(adam) => adam.state(),
            Optimizer::Sgd(sgd) => sgd.state(),
        }
    }

    /// The non-tensor state: name, hyperparameters, current learning rate, step counts.
    pub fn scalars(&self) -> Value {
        match self {
            Optimizer::Adam(adam) => adam.scalars(),
            Optimizer::Sgd(sgd) => sgd.scalars(),
        }
    }

    /// Restores what [`Optimizer::state`] and [`Optimizer::scalars`] saved. Fails, leaving the optimizer as it
    /// was, when the state belongs to another optimizer, other hyperparameters, or other parameters (a name
    /// or a shape differs, a tensor is missing or left over).
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], scalars: &Value) -> Result<()> {
        match self {
            Optimizer::Adam(adam) => adam.load_state(tensors, scalars),
            Optimizer::Sgd(sgd) => sgd.load_state(tensors, scalars),
        }
    }
}

/// Adam's buffers for one parameter, created at its first gradient as PyTorch does.
struct AdamSlot {
    step: i64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Option<Tensor>,
}

/// `torch.optim.Adam`, or `torch.optim.AdamW` when `decoupled_weight_decay` is set.
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    pub decoupled_weight_decay: bool,
    /// How many times `step` ran. Bias correction uses each parameter's own count, as PyTorch does.
    pub step: i64,
    parameters: Vec<(String, Tensor)>,
    slots: Vec<Option<AdamSlot>>,
    gradient_reset: Option<COptimizer>,
}

impl Adam {
    /// Adam with PyTorch's defaults (betas (0.9, 0.999), eps 1e-8) and L2 `weight_decay`.
    pub fn new(parameters: Vec<(String, Tensor)>, lr: f64, weight_decay: f64) -> Self {
        let config = AdamConfig {
            weight_decay,
            ..AdamConfig::adam(lr)
        };
        Self::unchecked(parameters, &config)
    }

    /// Checks the hyperparameters and that parameter names are unique.
    pub fn with_config(parameters: Vec<(String, Tensor)>, config: &AdamConfig) -> Result<Self> {
        config.validate()?;
        unique_names(config.name(), &parameters)?;
        Ok(Self::unchecked(parameters, config))
    }

    fn unchecked(parameters: Vec<(String, Tensor)>, config: &AdamConfig) -> Self {
        let slots = parameters.iter().map(|_| None).collect();
        Self {
            lr: config.lr,
            beta1: config.betas.0,
            beta2: config.betas.1,
            eps: config.eps,
            weight_decay: config.weight_decay,
            amsgrad: config.amsgrad,
            decoupled_weight_decay: config.decoupled_weight_decay,
            step: 0,
            parameters,
            slots,
            gradient_reset: None,
        }
    }

    fn name(&self) -> &'static str {
        if self.decoupled_weight_decay {
            "AdamW"
        } else {
            "Adam"
        }
    }

    /// Sets every gradient to None (PyTorch's `zero_grad()`), so parameters the next backward pass does not
    /// reach are left alone by the next step.
    pub fn zero_grad(&mut self) -> Result<()> {
        reset_gradients(&self.parameters, &mut self.gradient_reset)
    }

    /// One update of every parameter that has a gradient, as `torch.optim.Adam`'s `_single_tensor_adam`.
    pub fn step(&mut self) -> Result<()> {
        self.step += 1;
        let (lr, beta1, beta2, eps) = (self.lr, self.beta1, self.beta2, self.eps);
        let (weight_decay, decoupled, amsgrad) =
            (self.weight_decay, self.decoupled_weight_decay, self.amsgrad);
        tch::no_grad(|| {
            for ((_, parameter), slot) in self.parameters.iter_mut().zip(&mut self.slots) {
                let mut gradient = parameter.grad();
                if !gradient.defined() {
                    continue;
                }
                if slot.is_none() {
                    *slot = Some(AdamSlot {
                        step: 0,
                        exp_avg: parameter.f_zeros_like()?,
                        exp_avg_sq: parameter.f_zeros_like()?,
                        max_exp_avg_sq: if amsgrad {
                            Some(parameter.f_zeros_like()?)
                        } else {
                            None
                        },
                    });
                }
                let Some(slot) = slot else { continue };
                slot.step += 1;
                if weight_decay != 0.0 {
                    if decoupled {
                        let _ = parameter.f_mul_scalar_(1.0 - lr * weight_decay)?;
                    } else {
                        // grad.add(param, alpha=weight_decay)
                        gradient = add_scaled(&gradient, parameter, weight_decay)?;
                    }
                }
                let _ = slot.exp_avg.f_lerp_(&gradient, 1.0 - beta1)?;
                // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                let _ = slot.exp_avg_sq.f_mul_scalar_(beta2)?;
                let _ = slot
                    .exp_avg_sq
                    .f_addcmul_(&gradient.f_mul_scalar(1.0 - beta2)?, &gradient)?;
                // Python's `beta ** step` is C's pow on floats, hence powf rather than powi.
                let step = slot.step as f64;
                let bias_correction1 = 1.0 - beta1.powf(step);
                let bias_correction2 = 1.0 - beta2.powf(step);
                let step_size = lr / bias_correction1;
                let bias_correction2_sqrt = bias_correction2.sqrt();
                let second_moment = match &mut slot.max_exp_avg_sq {
                    Some(maximum) => {
                        let larger = maximum.f_maximum(&slot.exp_avg_sq)?;
                        maximum.f_copy_(&larger)?;
                        maximum.shallow_clone()
                    }
                    None => slot.exp_avg_sq.shallow_clone(),
                };
                let mut denominator = second_moment
                    .f_sqrt()?
                    .f_div_scalar(bias_correction2_sqrt)?;
                let _ = denominator.f_add_scalar_(eps)?;
                // param.addcdiv_(exp_avg, denom, value=-step_size)
                let _ =
                    parameter.f_addcdiv_(&slot.exp_avg.f_mul_scalar(-step_size)?, &denominator)?;
            }
            Ok(())
        })
    }

    /// See [`Optimizer::state`].
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = Vec::new();
        for ((name, _), slot) in self.parameters.iter().zip(&self.slots) {
            let Some(slot) = slot else { continue };
            state.push((format!("exp_avg.{name}"), slot.exp_avg.shallow_clone()));
            state.push((
                format!("exp_avg_sq.{name}"),
                slot.exp_avg_sq.shallow_clone(),
            ));
            if let Some(maximum) = &slot.max_exp_avg_sq {
                state.push((format!("max_exp_avg_sq.{name}"), maximum.shallow_clone()));
            }
        }
        state
    }

    /// See [`Optimizer::scalars`].
    pub fn scalars(&self) -> Value {
        let steps = step_counts(
            &self.parameters,
            self.slots.iter().map(|slot| slot.as_ref().map(|s| s.step)),
        );
        json!({
            "optimizer": self.name(),
            "lr": self.lr,
            "lr_bits": self.lr.to_bits(),
            "betas": [self.beta1, self.beta2],
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "amsgrad": self.amsgrad,
            "step": self.step,
            "steps": steps,
        })
    }

    /// See [`Optimizer::load_state`].
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], scalars: &Value) -> Result<()> {
        let saved = SavedScalars::new(self.name(), scalars)?;
        let betas = saved.get("betas")?;
        let betas = betas
            .as_array()
            .filter(|b| b.len() == 2)
            .ok_or_else(|| anyhow!("optimizer state: `betas` must be two numbers, got {betas}"))?;
        same_number("betas[0]", &betas[0], self.beta1)?;
        same_number("betas[1]", &betas[1], self.beta2)?;
        same_number("eps", saved.get("eps")?, self.eps)?;
        same_number(
            "weight_decay",
            saved.get("weight_decay")?,
            self.weight_decay,
        )?;
        same_flag("amsgrad", saved.get("amsgrad")?, self.amsgrad)?;
        let steps = saved.steps(&self.parameters)?;
        let mut pool = TensorPool::new(tensors);
        let mut slots = Vec::with_capacity(self.parameters.len());
        for ((name, parameter), step) in self.parameters.iter().zip(steps) {
            slots.push(match step {
                None => None,
                Some(step) => Some(AdamSlot {
                    step,
                    exp_avg: pool.take(&format!("exp_avg.{name}"), parameter)?,
                    exp_avg_sq: pool.take(&format!("exp_avg_sq.{name}"), parameter)?,
                    max_exp_avg_sq: if self.amsgrad {
                        Some(pool.take(&format!("max_exp_avg_sq.{name}"), parameter)?)
                    } else {
                        None
                    },
                }),
            });
        }
        pool.finish()?;
        let (lr, step) = (saved.lr()?, saved.step()?);
        self.lr = lr;
        self.step = step;
        self.slots = slots;
        Ok(())
    }
}

/// `torch.optim.SGD`: momentum, dampening, nesterov and L2 weight decay.
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// How many times `step` ran.
    pub step: i64,
    parameters: Vec<(String, Tensor)>,
    /// Updates per parameter; a parameter with a count has a momentum buffer when momentum is on.
    updates: Vec<i64>,
    momentum_buffers: Vec<Option<Tensor>>,
    gradient_reset: Option<COptimizer>,
}

impl Sgd {
    /// Checks the hyperparameters and that parameter names are unique.
    pub fn with_config(parameters: Vec<(String, Tensor)>, config: &SgdConfig) -> Result<Self> {
        config.validate()?;
        unique_names("SGD", &parameters)?;
        Ok(Self {
            lr: config.lr,
            momentum: config.momentum,
            dampening: config.dampening,
            weight_decay: config.weight_decay,
            nesterov: config.nesterov,
            step: 0,
            updates: vec![0; parameters.len()],
            momentum_buffers: parameters.iter().map(|_| None).collect(),
            parameters,
            gradient_reset: None,
        })
    }

    /// See [`Adam::zero_grad`].
    pub fn zero_grad(&mut self) -> Result<()> {
        reset_gradients(&self.parameters, &mut self.gradient_reset)
    }

    /// One update of every parameter that has a gradient, as `torch.optim.SGD`'s `_single_tensor_sgd`.
    pub fn step(&mut self) -> Result<()> {
        self.step += 1;
        let (lr, momentum, dampening) = (self.lr, self.momentum, self.dampening);
        let (weight_decay, nesterov) = (self.weight_decay, self.nesterov);
        tch::no_grad(|| {
            for (((_, parameter), buffer), updates) in self
                .parameters
                .iter_mut()
                .zip(&mut self.momentum_buffers)
                .zip(&mut self.updates)
            {
                let mut gradient = parameter.grad();
                if !gradient.defined() {
                    continue;
                }
                *updates += 1;
                if weight_decay != 0.0 {
                    // grad.add(param, alpha=weight_decay)
                    gradient = add_scaled(&gradient, parameter, weight_decay)?;
                }
                if momentum != 0.0 {
                    let velocity = match buffer {
                        // The first buffer is the gradient itself, without dampening.
                        None => buffer.insert(gradient.f_detach_copy()?),
                        Some(velocity) => {
                            // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                            let _ = velocity.f_mul_scalar_(momentum)?;
                            add_scaled_(velocity, &gradient, 1.0 - dampening)?;
                            velocity
                        }
                    };
                    gradient = if nesterov {
                        // grad.add(buf, alpha=momentum)
                        add_scaled(&gradient, velocity, momentum)?
                    } else {
                        velocity.shallow_clone()
                    };
                }
                // param.add_(grad, alpha=-lr)
                add_scaled_(parameter, &gradient, -lr)?;
            }
            Ok(())
        })
    }

    /// See [`Optimizer::state`].
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.parameters
            .iter()
            .zip(&self.momentum_buffers)
            .filter_map(|((name, _), buffer)| {
                buffer
                    .as_ref()
                    .map(|b| (format!("momentum_buffer.{name}"), b.shallow_clone()))
            })
            .collect()
    }

    /// See [`Optimizer::scalars`].
    pub fn scalars(&self) -> Value {
        let steps = step_counts(
            &self.parameters,
            self.updates.iter().map(|&n| (n > 0).then_some(n)),
        );
        json!({
            "optimizer": "SGD",
            "lr": self.lr,
            "lr_bits": self.lr.to_bits(),
            "momentum": self.momentum,
            "dampening": self.dampening,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
            "step": self.step,
            "steps": steps,
        })
    }

    /// See [`Optimizer::load_state`].
    pub fn load_state(&mut self, tensors: &[(String, Tensor)], scalars: &Value) -> Result<()> {
        let saved = SavedScalars::new("SGD", scalars)?;
        same_number("momentum", saved.get("momentum")?, self.momentum)?;
        same_number("dampening", saved.get("dampening")?, self.dampening)?;
        same_number(
            "weight_decay",
            saved.get("weight_decay")?,
            self.weight_decay,
        )?;
        same_flag("nesterov", saved.get("nesterov")?, self.nesterov)?;
        let steps = saved.steps(&self.parameters)?;
        let mut pool = TensorPool::new(tensors);
        let mut buffers = Vec::with_capacity(self.parameters.len());
        for ((name, parameter), step) in self.parameters.iter().zip(&steps) {
            buffers.push(if step.is_some() && self.momentum != 0.0 {
                Some(pool.take(&format!("momentum_buffer.{name}"), parameter)?)
            } else {
                None
            });
        }
        pool.finish()?;
        let (lr, step) = (saved.lr()?, saved.step()?);
        self.lr = lr;
        self.step = step;
        self.updates = steps.into_iter().map(|s| s.unwrap_or(0)).collect();
        self.momentum_buffers = buffers;
        Ok(())
    }
}

/// `base + alpha * other` as libtorch's `add(other, alpha=alpha)` computes it: one fused multiply-add, so one
/// rounding, in its scalar and vectorised loops alike. tch does not expose `alpha`, and a multiply then an add
/// would round twice; `addcmul` with `alpha` as a 0-dim tensor runs the same fused multiply-add.
fn add_scaled(base: &Tensor, other: &Tensor, alpha: f64) -> Result<Tensor, tch::TchError> {
    base.f_addcmul(
        other,
        &Tensor::f_scalar_tensor(alpha, (base.kind(), base.device()))?,
    )
}

/// In place, as `base.add_(other, alpha=alpha)`; see [`add_scaled`].
fn add_scaled_(base: &mut Tensor, other: &Tensor, alpha: f64) -> Result<(), tch::TchError> {
    let alpha = Tensor::f_scalar_tensor(alpha, (base.kind(), base.device()))?;
    let _ = base.f_addcmul_(other, &alpha)?;
    Ok(())
}

fn unique_names(optimizer: &str, parameters: &[(String, Tensor)]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for (name, _) in parameters {
        if !seen.insert(name.as_str()) {
            bail!("{optimizer}: parameter `{name}` is listed twice");
        }
    }
    Ok(())
}

/// Sets the gradients to None. tch can only zero them in place, but libtorch's own optimizer
/// `zero_grad()` resets them (set_to_none is its default), so a never-stepped one does it for us.
fn reset_gradients(parameters: &[(String, Tensor)], reset: &mut Option<COptimizer>) -> Result<()> {
    if reset.is_none() {
        let mut optimizer = COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false)?;
        for (_, parameter) in parameters {
            optimizer.add_parameters(parameter, 0)?;
        }
        *reset = Some(optimizer);
    }
    if let Some(optimizer) = reset {
        optimizer.zero_grad()?;
    }
    Ok(())
}

/// `{"<parameter>": count}` for the parameters that have state.
fn step_counts(
    parameters: &[(String, Tensor)],
    counts: impl Iterator<Item = Option<i64>>,
) -> Value {
    let map: Map<String, Value> = parameters
        .iter()
        .zip(counts)
        .filter_map(|((name, _), count)| count.map(|n| (name.clone(), Value::from(n))))
        .collect();
    Value::Object(map)
}

/// The saved scalars of one optimizer kind, read with errors that say what is wrong.
struct SavedScalars<'a> {
    scalars: &'a Map<String, Value>,
}

impl<'a> SavedScalars<'a> {
    fn new(expected: &str, scalars: &'a Value) -> Result<Self> {
        let Some(scalars) = scalars.as_object() else {
            bail!("optimizer state must be a JSON object, got {scalars}");
        };
        match scalars.get("optimizer").and_then(Value::as_str) {
            Some(name) if name == expected => Ok(Self { scalars }),
            Some(name) => {
                bail!("the optimizer state belongs to {name}, this optimizer is {expected}")
            }
            None => bail!("optimizer state has no `optimizer` name: not an optimizer state"),
        }
    }

    fn get(&self, key: &str) -> Result<&'a Value> {
        self.scalars
            .get(key)
            .ok_or_else(|| anyhow!("optimizer state has no `{key}`"))
    }

    /// Exact from `lr_bits` (JSON integers survive any parser; JSON decimals need not); `lr` otherwise.
    fn lr(&self) -> Result<f64> {
        if let Some(bits) = self.scalars.get("lr_bits") {
            let bits = bits.as_u64().ok_or_else(|| {
                anyhow!("optimizer state: `lr_bits` must be an integer, got {bits}")
            })?;
            return Ok(f64::from_bits(bits));
        }
        let lr = self.get("lr")?;
        lr.as_f64()
            .ok_or_else(|| anyhow!("optimizer state: `lr` must be a number, got {lr}"))
    }

    fn step(&self) -> Result<i64> {
        let step = self.get("step")?;
        step.as_i64()
            .filter(|s| *s >= 0)
            .ok_or_else(|| anyhow!("optimizer state: `step` must be an integer >= 0, got {step}"))
    }

    /// Per parameter, its update count if it has state.
    fn steps(&self, parameters: &[(String, Tensor)]) -> Result<Vec<Option<i64>>> {
        let steps = self.get("steps")?;
        let Some(steps) = steps.as_object() else {
            bail!("optimizer state: `steps` must be an object, got {steps}");
        };
        if let Some(unknown) = steps
            .keys()
            .find(|name| !parameters.iter().any(|(p, _)| p == *name))
        {
            bail!("optimizer state has parameter `{unknown}`, which this model does not have");
        }
        parameters
            .iter()
            .map(|(name, _)| match steps.get(name) {
                None => Ok(None),
                Some(count) => match count.as_i64() {
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => bail!("optimizer state: step count of `{name}` must be an integer > 0, got {count}"),
                },
            })
            .collect()
    }
}

/// Hyperparameters must match: resuming with other ones would not continue the same run.
fn same_number(key: &str, saved: &Value, current: f64) -> Result<()> {
    let Some(saved) = saved.as_f64() else {
        bail!("optimizer state: `{key}` must be a number, got {saved}");
    };
    // A relative tolerance, because a JSON decimal may come back one unit in the last place off.
    if (saved - current).abs() > 1e-12 * saved.abs().max(current.abs()) {
        bail!("the optimizer state was saved with {key} = {saved}, this optimizer has {current}");
    }
    Ok(())
}

fn same_flag(key: &str, saved: &Value, current: bool) -> Result<()> {
    match saved.as_bool() {
        Some(saved) if saved == current => Ok(()),
        Some(saved) => {
            bail!(
                "the optimizer state was saved with {key} = {saved}, this optimizer has {current}"
            )
        }
        None => bail!("optimizer state: `{key}` must be true or false, got {saved}"),
    }
}

/// Saved tensors by name; each is taken once, and any left over is an error.
struct TensorPool<'a> {
    tensors: HashMap<&'a str, &'a Tensor>,
}

impl<'a> TensorPool<'a> {
    fn new(tensors: &'a [(String, Tensor)]) -> Self {
        Self {
            tensors: tensors.iter().map(|(n, t)| (n.as_str(), t)).collect(),
        }
    }

    /// A copy of tensor `name`, on `like`'s device; its shape and dtype must be `like`'s.
    fn take(&mut self, name: &str, like: &Tensor) -> Result<Tensor> {
        let Some(saved) = self.tensors.remove(name) else {
            bail!("optimizer state has no tensor `{name}`");
        };
        if saved.size() != like.size() || saved.kind() != like.kind() {
            bail!(
                "optimizer state tensor `{name}` is {:?} {:?}, the parameter is {:?} {:?}",
                saved.kind(),
                saved.size(),
                like.kind(),
                like.size()
            );
        }
        tch::no_grad(|| {
            let mut copy = like.f_zeros_like()?;
            copy.f_copy_(saved)?;
            Ok::<Tensor, tch::TchError>(copy)
        })
        .with_context(|| format!("copying optimizer state tensor `{name}`"))
    }

    fn finish(self) -> Result<()> {
        let mut left: Vec<&str> = self.tensors.into_keys().collect();
        left.sort_unstable();
        match left.first() {
            None => Ok(()),
            Some(name) => bail!(
                "optimizer state has unexpected tensor `{name}`{}",
                if left.len() > 1 {
                    format!(" (and {} more)", left.len() - 1)
                } else {
                    String::new()
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Backpropagates `(w * g).sum()`, so that `w.grad` is exactly `g` (autograd multiplies g by 1).
    fn set_gradient(w: &Tensor, g: &[f32]) {
        (w * Tensor::from_slice(g)).sum(Kind::Float).backward();
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.detach().flatten(0, -1)).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        values(t).iter().map(|x| x.to_bits()).collect()
    }

    /// FNV-1a (64 bit) over the little-endian bytes of each value's bits.
    fn fingerprint(t: &Tensor) -> u64 {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for byte in bits(t).into_iter().flat_map(u32::to_le_bytes) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
        hash
    }

    /// Starting weights: six hand-picked ones, or `n` for the vectorised loops.
    fn start(n: usize) -> Vec<f32> {
        if n == 6 {
            return vec![1.0, -2.0, 3.0, 0.5, -0.25, 0.0];
        }
        (0..n)
            .map(|i| ((i * 31) % 97) as f32 / 32.0 - 1.5)
            .collect()
    }

    /// The gradient of step `k` (from 1): varied signs and sizes, a zero, all exact in f32.
    fn gradient(n: usize, k: usize) -> Vec<f32> {
        let kf = k as f32;
        if n == 6 {
            return vec![0.5 * kf, -1.25, 3.0 / kf, 0.0, 1e-3 * kf, -0.75 * kf];
        }
        (0..n)
            .map(|i| (((i * 7919 + k * 104729) % 1000) as f32 - 500.0) / 256.0)
            .collect()
    }

    fn run(optimizer: &mut Optimizer, w: &Tensor, steps: std::ops::RangeInclusive<usize>) {
        let n = w.numel();
        for k in steps {
            optimizer.zero_grad().unwrap();
            set_gradient(w, &gradient(n, k));
            optimizer.step().unwrap();
        }
    }

    fn fresh(config: &OptimizerConfig, n: usize) -> (Tensor, Optimizer) {
        let w = Tensor::from_slice(&start(n)).set_requires_grad(true);
        let optimizer = config.build(vec![("w".into(), w.shallow_clone())]).unwrap();
        (w, optimizer)
    }

    /// Each case's `torch.optim` call (torch 2.13) and what it gives after three steps of `gradient`:
    /// the bits of the six weights, and the `fingerprint` of the 1000 weights (which run through libtorch's
    /// vectorised loops and their tails). Generated with, for each case and n in (6, 1000):
    ///   w = torch.tensor(start(n), requires_grad=True); opt = torch.optim.<Name>([w], **kwargs)
    ///   for k in (1, 2, 3): opt.zero_grad(); (w * torch.tensor(gradient(n, k))).sum().backward(); opt.step()
    ///   w.detach().view(torch.int32)
    fn torch_cases() -> Vec<(&'static str, Value, [u32; 6], u64)> {
        vec![
            (
                "Adam(lr=0.1)",
                json!({"name": "Adam", "lr": 0.1}),
                [
                    0x3f352aa1, 0xbfd99999, 0x402e0bbc, 0x3f000000, 0xbf0ad53d, 0x3e95aac0,
                ],
                0x2c811a429565f20c,
            ),
            (
                "Adam(lr=0.05, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-3)",
                json!({"name": "Adam", "lr": 0.05, "weight_decay": 0.1, "betas": [0.8, 0.99], "eps": 1e-3}),
                [
                    0x3f59cd9e, 0xbfecd14d, 0x40370e50, 0x3eb56e2b, 0xbde438b4, 0x3e18226e,
                ],
                0xddf043007dd5fb1d,
            ),
            (
                "Adam(lr=0.1, amsgrad=True)",
                json!({"name": "Adam", "lr": 0.1, "amsgrad": true}),
                [
                    0x3f352aa1, 0xbfd99999, 0x402e0bbc, 0x3f000000, 0xbf0ad53d, 0x3e95aac0,
                ],
                0xf790baa0ca1d5698,
            ),
            (
                "AdamW(lr=0.1, weight_decay=0.3)",
                json!({"name": "AdamW", "lr": 0.1, "weight_decay": 0.3}),
                [
                    0x3f2110a7, 0xbfc46281, 0x401dd616, 0x3ee9a4f1, 0xbf02fd67, 0x3e912897,
                ],
                0xa8b256d6a1b2dda5,
            ),
            (
                "AdamW(lr=0.02, amsgrad=True)",
                json!({"name": "AdamW", "lr": 0.02, "amsgrad": true}),
                [
                    0x3f70e1ff, 0xbff82b01, 0x403c4b75, 0x3effd8b1, 0xbe9dd9b0, 0x3d6f6b2a,
                ],
                0xa7a087cdc9f985af,
            ),
            (
                "SGD(lr=0.1)",
                json!({"name": "SGD", "lr": 0.1}),
                [
                    0x3f333333, 0xbfd00000, 0x401ccccd, 0x3f000000, 0xbe804ea4, 0x3ee66667,
                ],
                0x99474b0af6cd820a,
            ),
            (
                "SGD(lr=0.1, momentum=0.9)",
                json!({"name": "SGD", "lr": 0.1, "momentum": 0.9}),
                [
                    0x3f0645a2, 0xbfa63d71, 0x3fe6a7f0, 0x3f000000, 0xbe807ca6, 0x3f36978d,
                ],
                0x997d83085119c444,
            ),
            (
                "SGD(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.01)",
                json!({"name": "SGD", "lr": 0.05, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01}),
                [
                    0x3f585f10, 0xbfde323e, 0x401f6f39, 0x3eff77b8, 0xbe7fc7cb, 0x3e6a93f3,
                ],
                0x9a4fd4e3ff0b8a2e,
            ),
            (
                "SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)",
                json!({"name": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": true, "weight_decay": 0.1}),
                [
                    0x3e4e8237, 0xbf5a5bba, 0x3f95d5bb, 0x3eebbfb5, 0xbe6d38ca, 0x3f8a175d,
                ],
                0xed8bd8fc9a9e8892,
            ),
        ]
    }

    #[test]
    fn updates_match_torch_optim_bit_for_bit() {
        for (call, config, six, thousand) in torch_cases() {
            let config = OptimizerConfig::from_config(&config).unwrap();
            let (w, mut optimizer) = fresh(&config, 6);
            run(&mut optimizer, &w, 1..=3);
            assert_eq!(bits(&w), six, "{call}: {:?}", values(&w));
            let (w, mut optimizer) = fresh(&config, 1000);
            run(&mut optimizer, &w, 1..=3);
            assert_eq!(fingerprint(&w), thousand, "{call}, 1000 weights");
        }
    }

    #[test]
    fn adam_and_adamw_match_hand_computed_updates() {
        // By hand: with a constant gradient g, after k steps m = (1 - b1^k) g and v = (1 - b2^k) g², so the
        // bias-corrected step is lr g / (|g| + eps) = lr sign(g) to 1e-8: 0.1 per step, 0 where g = 0.
        // AdamW (wd 0.1) first shrinks each weight by (1 - lr wd) = 0.99, so after three steps
        // w3 = 0.99³ w0 - 0.1 sign(g) (1 + 0.99 + 0.99²) = 0.970299 w0 - 0.29701 sign(g).
        let cases = [
            (0.0, [0.7f32, -1.7, 2.7, 0.5]),
            (0.1, [0.673289, -1.643588, 2.613887, 0.4851495]),
        ];
        for (weight_decay, expected) in cases {
            let w = Tensor::from_slice(&[1.0f32, -2.0, 3.0, 0.5]).set_requires_grad(true);
            let config = AdamConfig {
                weight_decay,
                decoupled_weight_decay: weight_decay != 0.0,
                ..AdamConfig::adam(0.1)
            };
            let mut adam =
                Adam::with_config(vec![("w".into(), w.shallow_clone())], &config).unwrap();
            for _ in 0..3 {
                adam.zero_grad().unwrap();
                set_gradient(&w, &[2.0, -1.0, 0.5, 0.0]);
                adam.step().unwrap();
            }
            for (a, e) in values(&w).iter().zip(expected) {
                assert!(
                    (a - e).abs() < 1e-5,
                    "weight decay {weight_decay}: {a} vs {e}"
                );
            }
            assert_eq!(adam.step, 3);
        }
        // Adam::new, as the training loop builds it: PyTorch's defaults.
        let adam = Adam::new(Vec::new(), 0.01, 0.0);
        assert_eq!((adam.beta1, adam.beta2, adam.eps), (0.9, 0.999, 1e-8));
    }

    #[test]
    fn sgd_matches_hand_computed_momentum_dampening_and_nesterov_updates() {
        // By hand, gradient 1 on a weight at 0, lr 0.1, momentum 0.9:
        //   heavy ball: buf 1, 1.9, 2.71 -> w -0.1, -0.29, -0.561
        //   nesterov: step g + 0.9 buf = 1.9, 2.71, 3.439 -> w -0.19, -0.461, -0.8049
        //   dampening 0.5: buf 1 (the first is not damped), then 0.9 + 0.5 = 1.4 -> w -0.1, -0.24
        //   weight decay 0.5, no momentum: g = 1 + 0.5 w -> w -0.1, -0.1 - 0.1 (1 - 0.05) = -0.195
        let cases = [
            (0.9, false, 0.0, 0.0, vec![-0.1f32, -0.29, -0.561]),
            (0.9, true, 0.0, 0.0, vec![-0.19, -0.461, -0.8049]),
            (0.9, false, 0.5, 0.0, vec![-0.1, -0.24]),
            (0.0, false, 0.0, 0.5, vec![-0.1, -0.195]),
        ];
        for (momentum, nesterov, dampening, weight_decay, expected) in cases {
            let w = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
            let config = SgdConfig {
                momentum,
                dampening,
                nesterov,
                weight_decay,
                ..SgdConfig::new(0.1)
            };
            let mut sgd = Sgd::with_config(vec![("w".into(), w.shallow_clone())], &config).unwrap();
            for e in expected {
                sgd.zero_grad().unwrap();
                set_gradient(&w, &[1.0]);
                sgd.step().unwrap();
                assert!((values(&w)[0] - e).abs() < 1e-6, "{config:?}: {w} vs {e}");
            }
        }
    }

    #[test]
    fn resuming_from_saved_state_is_bit_identical_to_an_uninterrupted_run() {
        let directory =
            std::env::temp_dir().join(format!("ivado-optim-resume-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        for (index, (call, config, _, _)) in torch_cases().into_iter().enumerate() {
            let config = OptimizerConfig::from_config(&config).unwrap();
            // A rate that changes every step, as a scheduler sets it, with all 17 digits in use.
            let lr_at = |k: usize| 0.1 * (1.0 + (k as f64).sqrt()) / 3.0;
            let drive = |optimizer: &mut Optimizer, w: &Tensor, steps| {
                for k in steps {
                    optimizer.set_lr(lr_at(k));
                    run(optimizer, w, k..=k);
                }
            };
            let (w_through, mut through) = fresh(&config, 6);
            drive(&mut through, &w_through, 1..=5);

            let (w_first, mut first) = fresh(&config, 6);
            drive(&mut first, &w_first, 1..=2);
            // Through a safetensors file and JSON text, as a checkpoint goes.
            let path = directory.join(format!("state-{index}.safetensors"));
            crate::model_folder::write_safetensors_atomic(&path, &first.state()).unwrap();
            let scalars_text = serde_json::to_string(&first.scalars()).unwrap();
            let weights = values(&w_first);
            drop(first);

            let w_second = Tensor::from_slice(&weights).set_requires_grad(true);
            let mut second = config
                .build(vec![("w".into(), w_second.shallow_clone())])
                .unwrap();
            let tensors = Tensor::read_safetensors(&path).unwrap();
            let scalars: Value = serde_json::from_str(&scalars_text).unwrap();
            second.load_state(&tensors, &scalars).unwrap();
            assert_eq!(second.steps_taken(), 2, "{call}");
            assert_eq!(second.lr().to_bits(), lr_at(2).to_bits(), "{call}");
            drive(&mut second, &w_second, 3..=5);
            assert_eq!(bits(&w_second), bits(&w_through), "resumed {call}");
            let state_bits = |o: &Optimizer| -> Vec<(String, Vec<u32>)> {
                o.state()
                    .iter()
                    .map(|(n, t)| (n.clone(), bits(t)))
                    .collect()
            };
            assert_eq!(
                state_bits(&second),
                state_bits(&through),
                "state after resume, {call}"
            );
        }
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn load_state_names_what_does_not_match() {
        let amsgrad = OptimizerConfig::Adam(AdamConfig {
            amsgrad: true,
            ..AdamConfig::adam(0.1)
        });
        let (w, mut saved) = fresh(&amsgrad, 6);
        run(&mut saved, &w, 1..=1);
        let (tensors, scalars) = (saved.state(), saved.scalars());
        assert_eq!(tensors.len(), 3);
        let error = |config: &OptimizerConfig, tensors: &[(String, Tensor)], scalars: &Value| {
            let (_, mut optimizer) = fresh(config, 6);
            let message = optimizer
                .load_state(tensors, scalars)
                .unwrap_err()
                .to_string();
            // A failed load leaves the optimizer as it was.
            assert_eq!(optimizer.steps_taken(), 0);
            assert!(optimizer.state().is_empty());
            message
        };
        let sgd = OptimizerConfig::Sgd(SgdConfig::new(0.1));
        let message = error(&sgd, &tensors, &scalars);
        assert!(
            message.contains("belongs to Adam, this optimizer is SGD"),
            "{message}"
        );
        let plain = OptimizerConfig::Adam(AdamConfig::adam(0.1));
        let message = error(&plain, &tensors, &scalars);
        assert!(message.contains("saved with amsgrad = true"), "{message}");
        let decayed = OptimizerConfig::Adam(AdamConfig {
            weight_decay: 0.5,
            amsgrad: true,
            ..AdamConfig::adam(0.1)
        });
        let message = error(&decayed, &tensors, &scalars);
        assert!(message.contains("saved with weight_decay = 0"), "{message}");
        let copy = |keep: &dyn Fn(&str) -> bool| -> Vec<(String, Tensor)> {
            tensors
                .iter()
                .filter(|(name, _)| keep(name))
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect()
        };
        let message = error(&amsgrad, &copy(&|name| name != "exp_avg_sq.w"), &scalars);
        assert!(message.contains("no tensor `exp_avg_sq.w`"), "{message}");
        let mut extra = copy(&|_| true);
        extra.push((
            "exp_avg.v".into(),
            Tensor::zeros([6], (Kind::Float, tch::Device::Cpu)),
        ));
        let message = error(&amsgrad, &extra, &scalars);
        assert!(
            message.contains("unexpected tensor `exp_avg.v`"),
            "{message}"
        );
        let reshaped: Vec<_> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.reshape([2, 3])))
            .collect();
        let message = error(&amsgrad, &reshaped, &scalars);
        assert!(
            message.contains("is Float [2, 3], the parameter is Float [6]"),
            "{message}"
        );
        let mut renamed = scalars.clone();
        renamed["steps"] = json!({"v": 1});
        let message = error(&amsgrad, &tensors, &renamed);
        assert!(
            message.contains("parameter `v`, which this model does not have"),
            "{message}"
        );
        let message = error(&amsgrad, &tensors, &json!({"lr": 0.1}));
        assert!(message.contains("not an optimizer state"), "{message}");
    }

    #[test]
    fn zero_grad_sets_gradients_to_none_so_unused_parameters_stay_put() {
        // PyTorch's default: after zero_grad, a parameter the next backward pass does not reach has no
        // gradient, and Adam leaves it and its moments alone instead of moving it on old momentum.
        let a = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let b = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let parameters = vec![
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ];
        let mut adam =
            Optimizer::from_config(&json!({"name": "Adam", "lr": 0.1}), parameters).unwrap();
        adam.zero_grad().unwrap();
        (&a + &b).sum(Kind::Float).backward();
        adam.step().unwrap();
        let b_after_first = bits(&b);
        adam.zero_grad().unwrap();
        assert!(!a.grad().defined() && !b.grad().defined());
        a.sum(Kind::Float).backward();
        adam.step().unwrap();
        assert_eq!(bits(&b), b_after_first, "b had no gradient");
        assert_eq!(adam.scalars()["steps"], json!({"a": 2, "b": 1}));
        // `a` took two steps of about lr each.
        assert!((values(&a)[0] - 0.8).abs() < 1e-5);
    }

    #[test]
    fn from_config_reads_pytorch_names_and_defaults() {
        let adam = OptimizerConfig::from_config(&json!({"name": "Adam"})).unwrap();
        assert_eq!(adam, OptimizerConfig::Adam(AdamConfig::adam(1e-3)));
        // ivadomed has no optimizer key: no name means Adam.
        assert_eq!(OptimizerConfig::from_config(&json!({})).unwrap(), adam);
        let adamw =
            OptimizerConfig::from_config(&json!({"name": "adamw", "lr": 3e-4, "amsgrad": true}))
                .unwrap();
        assert_eq!(
            adamw,
            OptimizerConfig::Adam(AdamConfig {
                amsgrad: true,
                ..AdamConfig::adamw(3e-4)
            })
        );
        assert_eq!(adamw.name(), "AdamW");
        let sgd = OptimizerConfig::from_config(
            &json!({"name": "SGD", "lr": 0.01, "momentum": 0.9, "nesterov": true}),
        )
        .unwrap();
        assert_eq!(
            sgd,
            OptimizerConfig::Sgd(SgdConfig {
                momentum: 0.9,
                nesterov: true,
                ..SgdConfig::new(0.01)
            })
        );
        let error = |config: Value| {
            OptimizerConfig::from_config(&config)
                .unwrap_err()
                .to_string()
        };
        let cases = [
            (
                json!({"name": "Adam", "momentum": 0.9}),
                "Adam: unknown config key `momentum`",
            ),
            (json!({"name": "RMSprop"}), "unknown optimizer \"RMSprop\""),
            (
                json!({"name": "Adam", "betas": [0.9]}),
                "`betas` must be two numbers",
            ),
            (
                json!({"name": "Adam", "betas": [0.9, 1.0]}),
                "betas[1] must be in [0, 1)",
            ),
            (
                json!({"name": "SGD", "lr": -1.0}),
                "`lr` must be a finite number >= 0",
            ),
            (
                json!({"name": "SGD", "nesterov": true}),
                "nesterov needs momentum > 0",
            ),
            (
                json!({"name": "Adam", "lr": "fast"}),
                "`lr` must be a number",
            ),
        ];
        for (config, expected) in cases {
            let message = error(config);
            assert!(message.contains(expected), "{message}");
        }
        let (w, _) = fresh(&adam, 6);
        let twice = vec![
            ("w".into(), w.shallow_clone()),
            ("w".into(), w.shallow_clone()),
        ];
        let message = adam.build(twice).err().unwrap().to_string();
        assert!(
            message.contains("parameter `w` is listed twice"),
            "{message}"
        );
    }
}
