//! Learning-rate schedules (PyTorch's formulas, ivadomed's `scheduler` config) and early stopping.
//!
//! A [`Schedule`] is a pure function from a step count to a learning rate ([`Schedule::lr_at`]).
//! [`LrScheduler`] counts the steps, so its saved state is a name and one integer and a resumed run gets the
//! very same rates. Each schedule steps per epoch or per batch ([`Schedule::unit`]). The loop calls
//! `optimizer.set_lr(scheduler.lr())` before training an epoch (or batch) and `scheduler.step()` after it,
//! which is when ivadomed calls `scheduler.step()`.
//!
//! The rates are PyTorch's to the last bit (checked against torch 2.13): the closed forms of
//! `CosineAnnealingWarmRestarts` and `CyclicLR` in PyTorch's operation order, and, for `CosineAnnealingLR`
//! and `PolynomialLR`, which PyTorch steps recursively (each rate from the previous one, drifting from the
//! closed form by about 1e-16 relative), that recursion replayed from step 0: `lr_at(n)` replays n steps,
//! microseconds next to an epoch.
use anyhow::{anyhow, bail, Result};
use ivado_sdk::Config;
use serde_json::{json, Map, Value};
use std::f64::consts::PI;

/// The `lr_scheduler` names [`Schedule::from_config`] accepts.
pub const NAMES: &[&str] = &[
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "PolynomialLR",
    "constant",
];

/// ivadomed's `scheduler.initial_lr` default.
pub const DEFAULT_INITIAL_LR: f64 = 1e-3;

/// When a schedule advances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepUnit {
    Epoch,
    Batch,
}

/// `CyclicLR`'s amplitude policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CyclicMode {
    /// The same triangle every cycle.
    Triangular,
    /// The amplitude halves each cycle (ivadomed's choice).
    Triangular2,
    /// The amplitude is scaled by `gamma^iteration`.
    ExpRange,
}

impl CyclicMode {
    fn name(self) -> &'static str {
        match self {
            CyclicMode::Triangular => "triangular",
            CyclicMode::Triangular2 => "triangular2",
            CyclicMode::ExpRange => "exp_range",
        }
    }
}

/// A learning rate as a function of the step count (epochs or batches, see [`Schedule::unit`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// `CosineAnnealingLR`: `eta_min + (base_lr - eta_min) (1 + cos(π t / t_max)) / 2`. It reaches `eta_min`
    /// at `t_max` and, past it, climbs back (period `2 t_max`), as PyTorch's does. Per epoch.
    CosineAnnealing {
        base_lr: f64,
        t_max: u64,
        eta_min: f64,
    },
    /// `CosineAnnealingWarmRestarts` (SGDR): the cosine above over a period `T_i` that restarts at `base_lr`;
    /// `T_i` starts at `t_0` and is multiplied by `t_mult` at each restart, so with `t_mult` 2 restarts fall
    /// on epochs 0, t_0, 3 t_0, 7 t_0, ... Per epoch.
    CosineAnnealingWarmRestarts {
        base_lr: f64,
        t_0: u64,
        t_mult: u64,
        eta_min: f64,
    },
    /// `CyclicLR`: a triangle from `base_lr` up to `max_lr` in `step_size_up` batches and back down in
    /// `step_size_down`, its amplitude scaled by `mode`. Per batch.
    Cyclic {
        base_lr: f64,
        max_lr: f64,
        step_size_up: u64,
        step_size_down: u64,
        mode: CyclicMode,
        gamma: f64,
    },
    /// `PolynomialLR`: `base_lr (1 - min(t, total_iters) / total_iters)^power`, 0 from `total_iters` on.
    /// Per epoch.
    Polynomial {
        base_lr: f64,
        total_iters: u64,
        power: f64,
    },
    /// The same rate throughout.
    Constant { lr: f64 },
}

impl Schedule {
    /// Reads ivadomed's `training_parameters.scheduler` object:
    /// `{"initial_lr": 0.001, "lr_scheduler": {"name": "CosineAnnealingLR", ...}}`.
    ///
    /// As in ivadomed: `CosineAnnealingLR` anneals from `initial_lr` over `num_epochs` (`T_max`), and ignores
    /// the `base_lr` and `max_lr` that ivadomed's default config carries; `CosineAnnealingWarmRestarts`
    /// takes `T_0` (required), `T_mult`, `eta_min`; `CyclicLR` takes `base_lr`, `max_lr`, `step_size_up`,
    /// `step_size_down` and runs `triangular2`, per batch, starting at `base_lr`. Additions: `T_max` and
    /// `eta_min` for `CosineAnnealingLR`; `mode` (`triangular`, `triangular2`, `exp_range`) and `gamma` for
    /// `CyclicLR` (ivadomed fixes the mode and would reject the key); `PolynomialLR` (`total_iters`, default
    /// `num_epochs`, and `power`, default 1) and `constant`. Missing `initial_lr` is 0.001 and missing
    /// `lr_scheduler` is `CosineAnnealingLR`, ivadomed's defaults. Unknown keys are errors that name them.
    pub fn from_config(scheduler: &Value, num_epochs: u64) -> Result<Schedule> {
        let Some(outer) = scheduler.as_object() else {
            bail!("a scheduler config must be a JSON object such as {{\"initial_lr\": 0.001, \"lr_scheduler\": {{\"name\": \"CosineAnnealingLR\"}}}}, got {scheduler}");
        };
        if let Some(unknown) = outer
            .keys()
            .find(|k| !["initial_lr", "lr_scheduler"].contains(&k.as_str()))
        {
            bail!(
                "scheduler: unknown config key `{unknown}` (known keys: initial_lr, lr_scheduler)"
            );
        }
        let initial_lr = match outer.get("initial_lr") {
            None => DEFAULT_INITIAL_LR,
            Some(lr) => lr
                .as_f64()
                .ok_or_else(|| anyhow!("scheduler: `initial_lr` must be a number, got {lr}"))?,
        };
        non_negative("scheduler", "initial_lr", initial_lr)?;
        let default_scheduler = json!({"name": "CosineAnnealingLR"});
        let lr_scheduler = outer.get("lr_scheduler").unwrap_or(&default_scheduler);
        let Some(user) = lr_scheduler.as_object() else {
            bail!(
                "scheduler: `lr_scheduler` must be a JSON object with a `name`, got {lr_scheduler}"
            );
        };
        let name = user
            .get("name")
            .and_then(Value::as_str)
            .and_then(|n| NAMES.iter().find(|known| **known == n))
            .copied()
            .ok_or_else(|| {
                anyhow!(
                    "scheduler: unknown lr_scheduler {} (known: {})",
                    user.get("name").unwrap_or(&Value::Null),
                    NAMES.join(", ")
                )
            })?;
        let mut user: Map<String, Value> = user.clone();
        user.remove("name");
        // PyTorch's None: the same as `step_size_up`.
        if user.get("step_size_down") == Some(&Value::Null) {
            user.remove("step_size_down");
        }
        let step_size_down_given = user.contains_key("step_size_down");
        let mut config = Config::new(name, Self::defaults(name, num_epochs)?, Value::Object(user))?;
        // Periods and counts: at least 1, and small enough for the integer arithmetic of `lr_at`.
        let count = |config: &mut Config, key: &str| -> Result<u64> {
            Ok(config.usize_in(key, 1, 1 << 40)? as u64)
        };
        let schedule = match name {
            "CosineAnnealingLR" => {
                // Read so that ivadomed's default config passes; ivadomed ignores them here too.
                config.f64("base_lr")?;
                config.f64("max_lr")?;
                Schedule::CosineAnnealing {
                    base_lr: initial_lr,
                    t_max: count(&mut config, "T_max")?,
                    eta_min: finite(name, "eta_min", config.f64("eta_min")?)?,
                }
            }
            "CosineAnnealingWarmRestarts" => Schedule::CosineAnnealingWarmRestarts {
                base_lr: initial_lr,
                t_0: count(&mut config, "T_0")?,
                t_mult: count(&mut config, "T_mult")?,
                eta_min: finite(name, "eta_min", config.f64("eta_min")?)?,
            },
            "CyclicLR" => {
                let step_size_up = count(&mut config, "step_size_up")?;
                let step_size_down = if step_size_down_given {
                    count(&mut config, "step_size_down")?
                } else {
                    step_size_up
                };
                let mode = match config
                    .choice("mode", &["triangular", "triangular2", "exp_range"])?
                    .as_str()
                {
                    "triangular" => CyclicMode::Triangular,
                    "triangular2" => CyclicMode::Triangular2,
                    _ => CyclicMode::ExpRange,
                };
                Schedule::Cyclic {
                    base_lr: non_negative(name, "base_lr", config.f64("base_lr")?)?,
                    max_lr: non_negative(name, "max_lr", config.f64("max_lr")?)?,
                    step_size_up,
                    step_size_down,
                    mode,
                    gamma: finite(name, "gamma", config.f64("gamma")?)?,
                }
            }
            "PolynomialLR" => Schedule::Polynomial {
                base_lr: initial_lr,
                total_iters: count(&mut config, "total_iters")?,
                power: non_negative(name, "power", config.f64("power")?)?,
            },
            _ => Schedule::Constant { lr: initial_lr },
        };
        config.finish()?;
        Ok(schedule)
    }

    /// Every `lr_scheduler` key of `name` with its default (`initial_lr` lives one level up).
    pub fn defaults(name: &str, num_epochs: u64) -> Result<Value> {
        Ok(match name {
            "CosineAnnealingLR" => {
                json!({"T_max": num_epochs, "eta_min": 0.0, "base_lr": 1e-5, "max_lr": 1e-2})
            }
            "CosineAnnealingWarmRestarts" => json!({"T_mult": 1, "eta_min": 0.0}),
            // ivadomed's documented defaults for the bounds; PyTorch's for the rest.
            "CyclicLR" => json!({
                "base_lr": 1e-5, "max_lr": 1e-2, "step_size_up": 2000, "mode": "triangular2",
                "gamma": 1.0,
            }),
            "PolynomialLR" => json!({"total_iters": num_epochs, "power": 1.0}),
            "constant" => json!({}),
            _ => bail!(
                "scheduler: unknown lr_scheduler {name:?} (known: {})",
                NAMES.join(", ")
            ),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Schedule::CosineAnnealing { .. } => "CosineAnnealingLR",
            Schedule::CosineAnnealingWarmRestarts { .. } => "CosineAnnealingWarmRestarts",
            Schedule::Cyclic { .. } => "CyclicLR",
            Schedule::Polynomial { .. } => "PolynomialLR",
            Schedule::Constant { .. } => "constant",
        }
    }

    /// `CyclicLR` steps per batch (as ivadomed steps it); the others per epoch.
    pub fn unit(&self) -> StepUnit {
        match self {
            Schedule::Cyclic { .. } => StepUnit::Batch,
            _ => StepUnit::Epoch,
        }
    }

    /// The learning rate after `step` scheduler steps: for the first epoch (or batch) `step` is 0.
    /// Periods and counts below 1 (possible only when the enum is built by hand) count as 1.
    pub fn lr_at(&self, step: u64) -> f64 {
        // Each formula follows PyTorch's operation order so that the rates agree to the last bit.
        match *self {
            Schedule::CosineAnnealing {
                base_lr,
                t_max,
                eta_min,
            } => {
                let t_max = t_max.max(1);
                let period = t_max as f64;
                let mut lr = base_lr;
                for epoch in 1..=step {
                    // PyTorch's `(epoch - 1 - T_max) % (2 T_max) == 0`: the step after a minimum, where the
                    // ratio below would divide by 1 + cos(π) = 0.
                    let since_minimum = u128::from(epoch) - 1 + u128::from(t_max);
                    lr = if since_minimum % (2 * u128::from(t_max)) == 0 {
                        lr + (base_lr - eta_min) * (1.0 - (PI / period).cos()) / 2.0
                    } else {
                        (1.0 + (PI * epoch as f64 / period).cos())
                            / (1.0 + (PI * (epoch - 1) as f64 / period).cos())
                            * (lr - eta_min)
                            + eta_min
                    };
                }
                lr
            }
            Schedule::CosineAnnealingWarmRestarts {
                base_lr,
                t_0,
                t_mult,
                eta_min,
            } => {
                let (t_0, t_mult) = (t_0.max(1), t_mult.max(1));
                let (t_cur, t_i) = if t_mult == 1 {
                    (step % t_0, t_0)
                } else {
                    let (mut t_cur, mut t_i) = (step, t_0);
                    while t_cur >= t_i {
                        t_cur -= t_i;
                        t_i = t_i.saturating_mul(t_mult);
                    }
                    (t_cur, t_i)
                };
                cosine(base_lr, eta_min, t_cur, t_i)
            }
            Schedule::Cyclic {
                base_lr,
                max_lr,
                step_size_up,
                step_size_down,
                mode,
                gamma,
            } => {
                let (step_size_up, step_size_down) = (step_size_up.max(1), step_size_down.max(1));
                let total_size = step_size_up as f64 + step_size_down as f64;
                let step_ratio = step_size_up as f64 / total_size;
                let iteration = step as f64;
                let cycle = (1.0 + iteration / total_size).floor();
                let x = 1.0 + iteration / total_size - cycle;
                let scale_factor = if x <= step_ratio {
                    x / step_ratio
                } else {
                    (x - 1.0) / (step_ratio - 1.0)
                };
                let base_height = (max_lr - base_lr) * scale_factor;
                let scale = match mode {
                    CyclicMode::Triangular => 1.0,
                    CyclicMode::Triangular2 => 1.0 / 2f64.powf(cycle - 1.0),
                    CyclicMode::ExpRange => gamma.powf(iteration),
                };
                base_lr + base_height * scale
            }
            Schedule::Polynomial {
                base_lr,
                total_iters,
                power,
            } => {
                let total_iters = total_iters.max(1);
                let total = total_iters as f64;
                let mut lr = base_lr;
                for epoch in 1..=step.min(total_iters) {
                    let decay_factor = ((1.0 - epoch as f64 / total)
                        / (1.0 - (epoch - 1) as f64 / total))
                        .powf(power);
                    lr *= decay_factor;
                }
                lr
            }
            Schedule::Constant { lr } => lr,
        }
    }

    /// The schedule as JSON, for logs and checkpoint metadata.
    pub fn describe(&self) -> Value {
        let mut description = match *self {
            Schedule::CosineAnnealing {
                base_lr,
                t_max,
                eta_min,
            } => json!({"base_lr": base_lr, "T_max": t_max, "eta_min": eta_min}),
            Schedule::CosineAnnealingWarmRestarts {
                base_lr,
                t_0,
                t_mult,
                eta_min,
            } => json!({"base_lr": base_lr, "T_0": t_0, "T_mult": t_mult, "eta_min": eta_min}),
            Schedule::Cyclic {
                base_lr,
                max_lr,
                step_size_up,
                step_size_down,
                mode,
                gamma,
            } => json!({
                "base_lr": base_lr, "max_lr": max_lr, "step_size_up": step_size_up,
                "step_size_down": step_size_down, "mode": mode.name(), "gamma": gamma,
            }),
            Schedule::Polynomial {
                base_lr,
                total_iters,
                power,
            } => json!({"base_lr": base_lr, "total_iters": total_iters, "power": power}),
            Schedule::Constant { lr } => json!({"lr": lr}),
        };
        description["name"] = Value::from(self.name());
        description
    }
}

/// PyTorch's `eta_min + (base_lr - eta_min) * (1 + cos(pi * t / period)) / 2`.
fn cosine(base_lr: f64, eta_min: f64, t: u64, period: u64) -> f64 {
    eta_min + (base_lr - eta_min) * (1.0 + (PI * t as f64 / period as f64).cos()) / 2.0
}

fn finite(schedule: &str, key: &str, value: f64) -> Result<f64> {
    if !value.is_finite() {
        bail!("{schedule}: `{key}` must be a finite number, got {value}");
    }
    Ok(value)
}

fn non_negative(schedule: &str, key: &str, value: f64) -> Result<f64> {
    if !value.is_finite() || value < 0.0 {
        bail!("{schedule}: `{key}` must be a finite number >= 0, got {value}");
    }
    Ok(value)
}

/// A [`Schedule`] with its step count: the stateful side, saved and restored with checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct LrScheduler {
    schedule: Schedule,
    steps: u64,
}

impl LrScheduler {
    pub fn new(schedule: Schedule) -> Self {
        Self { schedule, steps: 0 }
    }

    /// [`Schedule::from_config`] at step 0.
    pub fn from_config(scheduler: &Value, num_epochs: u64) -> Result<Self> {
        Ok(Self::new(Schedule::from_config(scheduler, num_epochs)?))
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    pub fn unit(&self) -> StepUnit {
        self.schedule.unit()
    }

    /// The learning rate for the current epoch (or batch).
    pub fn lr(&self) -> f64 {
        self.schedule.lr_at(self.steps)
    }

    /// How many times `step` ran.
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// Moves to the next epoch (or batch) and returns its learning rate.
    pub fn step(&mut self) -> f64 {
        self.steps += 1;
        self.lr()
    }

    /// `{"scheduler": name, "step": n}`: the rate is a function of `n`, so this is all a resume needs.
    pub fn state(&self) -> Value {
        json!({"scheduler": self.schedule.name(), "step": self.steps})
    }

    /// Restores what [`LrScheduler::state`] saved; the state must come from the same kind of schedule.
    pub fn load_state(&mut self, state: &Value) -> Result<()> {
        let name = state.get("scheduler").and_then(Value::as_str);
        if name != Some(self.schedule.name()) {
            bail!(
                "the scheduler state belongs to {}, this scheduler is {}",
                state.get("scheduler").unwrap_or(&Value::Null),
                self.schedule.name()
            );
        }
        let step = state.get("step").unwrap_or(&Value::Null);
        self.steps = step.as_u64().ok_or_else(|| {
            anyhow!("scheduler state: `step` must be an integer >= 0, got {step}")
        })?;
        Ok(())
    }
}

/// Which way a monitored value improves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// A loss.
    Lower,
    /// A score such as Dice.
    Higher,
}

impl Better {
    fn name(self) -> &'static str {
        match self {
            Better::Lower => "lower",
            Better::Higher => "higher",
        }
    }
}

/// What one epoch's value meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The value beat the best so far by more than epsilon (always true for the first value).
    pub improved: bool,
    /// `patience` epochs in a row have passed without improvement: stop training.
    pub stop: bool,
}

/// Stops training after `patience` epochs in a row without an improvement of more than `epsilon` over the
/// best value so far; an improvement resets the count.
///
/// ivadomed's rule differs, on purpose: it compares each epoch's validation loss with the previous epoch's
/// (not with the best), as a percentage of the current loss (`(previous - current) * 100 / |current| <
/// early_stopping_epsilon`), and its counter never resets, so `patience` bad epochs spread over the whole
/// run stop it. Here `epsilon` is in the monitored value's own units, and the value may be a loss or a
/// score ([`Better`]). A NaN value never counts as an improvement.
#[derive(Clone, Debug, PartialEq)]
pub struct EarlyStopping {
    pub patience: usize,
    pub epsilon: f64,
    pub better: Better,
    best: Option<f64>,
    epochs_without_improvement: usize,
}

impl EarlyStopping {
    /// `patience` >= 1 epochs; `epsilon` >= 0.
    pub fn new(patience: usize, epsilon: f64, better: Better) -> Result<Self> {
        if patience == 0 {
            bail!("early stopping: patience must be at least 1 epoch");
        }
        non_negative("early stopping", "epsilon", epsilon)?;
        Ok(Self {
            patience,
            epsilon,
            better,
            best: None,
            epochs_without_improvement: 0,
        })
    }

    /// Reads ivadomed's `training_parameters.training_time` object: `early_stopping_patience` (default 50)
    /// and `early_stopping_epsilon` (default 0.001, here in the monitored value's units, see the type's
    /// documentation). `num_epochs`, which lives in the same object, is accepted and left to the caller.
    pub fn from_config(training_time: &Value, better: Better) -> Result<Self> {
        let mut config = Config::new(
            "training_time",
            json!({"num_epochs": 100, "early_stopping_patience": 50, "early_stopping_epsilon": 0.001}),
            training_time.clone(),
        )?;
        config.usize_in("num_epochs", 0, usize::MAX)?;
        let patience = config.usize_in("early_stopping_patience", 1, usize::MAX)?;
        let epsilon = config.f64("early_stopping_epsilon")?;
        config.finish()?;
        Self::new(patience, epsilon, better)
    }

    /// Records one epoch's value.
    pub fn observe(&mut self, value: f64) -> Verdict {
        let improved = match self.best {
            None => !value.is_nan(),
            Some(best) => match self.better {
                Better::Lower => value < best - self.epsilon,
                Better::Higher => value > best + self.epsilon,
            },
        };
        if improved {
            self.best = Some(value);
            self.epochs_without_improvement = 0;
        } else {
            self.epochs_without_improvement += 1;
        }
        Verdict {
            improved,
            stop: self.should_stop(),
        }
    }

    pub fn should_stop(&self) -> bool {
        self.epochs_without_improvement >= self.patience
    }

    /// The best value so far.
    pub fn best(&self) -> Option<f64> {
        self.best
    }

    pub fn epochs_without_improvement(&self) -> usize {
        self.epochs_without_improvement
    }

    /// The counters, with the best value also as its exact bits (a JSON integer survives any parser; a JSON
    /// decimal need not).
    pub fn state(&self) -> Value {
        json!({
            "better": self.better.name(),
            "best": self.best,
            "best_bits": self.best.map(f64::to_bits),
            "epochs_without_improvement": self.epochs_without_improvement,
        })
    }

    /// Restores what [`EarlyStopping::state`] saved; `patience` and `epsilon` stay as configured.
    pub fn load_state(&mut self, state: &Value) -> Result<()> {
        let better = state.get("better").and_then(Value::as_str);
        if better != Some(self.better.name()) {
            bail!(
                "the early-stopping state monitors a value where {} is better, this one where {} is",
                state.get("better").unwrap_or(&Value::Null),
                self.better.name()
            );
        }
        let best = match (state.get("best_bits"), state.get("best")) {
            (Some(bits), _) if !bits.is_null() => {
                Some(f64::from_bits(bits.as_u64().ok_or_else(|| {
                    anyhow!("early-stopping state: `best_bits` must be an integer, got {bits}")
                })?))
            }
            (_, Some(best)) if !best.is_null() => Some(best.as_f64().ok_or_else(|| {
                anyhow!("early-stopping state: `best` must be a number, got {best}")
            })?),
            _ => None,
        };
        let count = state
            .get("epochs_without_improvement")
            .unwrap_or(&Value::Null);
        let count = count.as_u64().ok_or_else(|| {
            anyhow!("early-stopping state: `epochs_without_improvement` must be an integer >= 0, got {count}")
        })?;
        self.best = best;
        self.epochs_without_improvement = count as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_sequence(schedule: &Schedule, expected: &[f64]) {
        for (step, want) in expected.iter().enumerate() {
            let got = schedule.lr_at(step as u64);
            assert!(
                (got - want).abs() <= 1e-12,
                "{} step {step}: {got} vs {want}",
                schedule.name()
            );
        }
    }

    #[test]
    fn cosine_annealing_follows_its_closed_form_over_two_cycles() {
        // 0.01 + 0.045 (1 + cos(π t / 4)); cos(π/4) = 0.7071067811865476 gives 0.01 + 0.045 + 0.0318198...
        // The period is 2 T_max = 8: down to eta_min at 4, back up to base_lr at 8, and again.
        let schedule = Schedule::CosineAnnealing {
            base_lr: 0.1,
            t_max: 4,
            eta_min: 0.01,
        };
        let cycle = [
            0.1,
            0.0868198051533946,
            0.055,
            0.0231801948466054,
            0.01,
            0.0231801948466054,
            0.055,
            0.0868198051533946,
        ];
        let two_cycles: Vec<f64> = cycle.iter().chain(&cycle).copied().chain([0.1]).collect();
        assert_sequence(&schedule, &two_cycles);
        assert_eq!(schedule.unit(), StepUnit::Epoch);
    }

    #[test]
    fn warm_restarts_with_t_mult_2_restart_at_0_t0_and_3_t0() {
        // T_0 = 2, T_mult = 2: periods 2, 4, 8, so restarts on epochs 0, 2, 6 (= 3 T_0) and 14 (= 7 T_0).
        // Within a period T_i the rate is (1 + cos(π t / T_i)) / 2: cos(π/4) = 0.70711, cos(π/8) = 0.92388,
        // cos(3π/8) = 0.38268.
        let schedule = Schedule::CosineAnnealingWarmRestarts {
            base_lr: 1.0,
            t_0: 2,
            t_mult: 2,
            eta_min: 0.0,
        };
        assert_sequence(
            &schedule,
            &[
                1.0,
                0.5,
                1.0,
                0.8535533905932737,
                0.5,
                0.1464466094067262,
                1.0,
                0.9619397662556434,
                0.8535533905932737,
                0.6913417161825449,
                0.5,
                0.3086582838174551,
                0.1464466094067262,
                0.03806023374435663,
                1.0,
            ],
        );
        // T_mult 1: period 3, eta_min 0.1: 0.1 + 0.9 (1 + cos(π t / 3)) / 2 = 1, 0.775, 0.325, then again.
        let schedule = Schedule::CosineAnnealingWarmRestarts {
            base_lr: 1.0,
            t_0: 3,
            t_mult: 1,
            eta_min: 0.1,
        };
        assert_sequence(&schedule, &[1.0, 0.775, 0.325, 1.0, 0.775, 0.325, 1.0]);
    }

    #[test]
    fn cyclic_lr_triangles_and_triangular2_halves_the_amplitude_each_cycle() {
        let cyclic = |mode, step_size_up, step_size_down, gamma| Schedule::Cyclic {
            base_lr: 0.001,
            max_lr: 0.005,
            step_size_up,
            step_size_down,
            mode,
            gamma,
        };
        // Amplitude 0.004 over 2 batches up, 2 down: 0.001, 0.003, 0.005, 0.003, then the same.
        assert_sequence(
            &cyclic(CyclicMode::Triangular, 2, 2, 1.0),
            &[
                0.001, 0.003, 0.005, 0.003, 0.001, 0.003, 0.005, 0.003, 0.001,
            ],
        );
        // triangular2: peaks 0.005, 0.003, 0.002 (amplitude 0.004, 0.002, 0.001).
        let halving = cyclic(CyclicMode::Triangular2, 2, 2, 1.0);
        assert_sequence(
            &halving,
            &[
                0.001, 0.003, 0.005, 0.003, 0.001, 0.002, 0.003, 0.002, 0.001, 0.0015, 0.002,
                0.0015, 0.001,
            ],
        );
        assert_eq!(halving.unit(), StepUnit::Batch);
        // exp_range, gamma 0.5: 0.001 + 0.004 * triangle(t) * 0.5^t.
        assert_sequence(
            &cyclic(CyclicMode::ExpRange, 2, 2, 0.5),
            &[0.001, 0.002, 0.002, 0.00125, 0.001, 0.0010625, 0.0010625],
        );
        // Asymmetric: 1 batch up, 3 down: 0.001, 0.005, 0.001 + 0.004 * 2/3, 0.001 + 0.004 / 3, 0.001.
        assert_sequence(
            &cyclic(CyclicMode::Triangular, 1, 3, 1.0),
            &[
                0.001,
                0.005,
                0.001 + 0.008 / 3.0,
                0.001 + 0.004 / 3.0,
                0.001,
            ],
        );
    }

    /// FNV-1a (64 bit) over the little-endian bytes of each rate.
    fn fingerprint(rates: impl Iterator<Item = f64>) -> u64 {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for byte in rates.flat_map(f64::to_le_bytes) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
        hash
    }

    #[test]
    fn rates_match_torch_bit_for_bit() {
        // Fingerprints of torch 2.13's rates: each `torch.optim.lr_scheduler` class below, on an SGD
        // optimizer whose lr is the base rate, stepped n times, collecting `param_groups[0]["lr"]` before
        // each step; then `fingerprint` (FNV-1a over `struct.pack("<d", lr)`). CosineAnnealingLR and
        // PolynomialLR pin PyTorch's recursive stepping, which the closed form misses by ~1e-16.
        let cyclic =
            |base_lr, max_lr, step_size_up, step_size_down, mode, gamma| Schedule::Cyclic {
                base_lr,
                max_lr,
                step_size_up,
                step_size_down,
                mode,
                gamma,
            };
        let cases = [
            // CosineAnnealingLR(T_max=4, eta_min=0.01), lr 0.1
            (
                Schedule::CosineAnnealing {
                    base_lr: 0.1,
                    t_max: 4,
                    eta_min: 0.01,
                },
                40,
                0x2939_1fd0_ebc7_6ebc,
            ),
            // CosineAnnealingLR(T_max=100), lr 0.001
            (
                Schedule::CosineAnnealing {
                    base_lr: 0.001,
                    t_max: 100,
                    eta_min: 0.0,
                },
                150,
                0x092f_e806_4dab_db03,
            ),
            // CosineAnnealingWarmRestarts(T_0=2, T_mult=2), lr 1
            (
                Schedule::CosineAnnealingWarmRestarts {
                    base_lr: 1.0,
                    t_0: 2,
                    t_mult: 2,
                    eta_min: 0.0,
                },
                40,
                0xb129_c0cd_f413_4fd4,
            ),
            // CosineAnnealingWarmRestarts(T_0=3, T_mult=1, eta_min=0.1), lr 1
            (
                Schedule::CosineAnnealingWarmRestarts {
                    base_lr: 1.0,
                    t_0: 3,
                    t_mult: 1,
                    eta_min: 0.1,
                },
                40,
                0x3b61_aaba_622d_5423,
            ),
            // CyclicLR(base_lr=0.001, max_lr=0.005, step_size_up=2, mode="triangular2")
            (
                cyclic(0.001, 0.005, 2, 2, CyclicMode::Triangular2, 1.0),
                40,
                0x57ad_7b50_1048_0def,
            ),
            // CyclicLR(base_lr=0.001, max_lr=0.005, step_size_up=1, step_size_down=3)
            (
                cyclic(0.001, 0.005, 1, 3, CyclicMode::Triangular, 1.0),
                40,
                0x3934_8e23_8852_17f5,
            ),
            // CyclicLR(base_lr=0.001, max_lr=0.005, step_size_up=2, mode="exp_range", gamma=0.9)
            (
                cyclic(0.001, 0.005, 2, 2, CyclicMode::ExpRange, 0.9),
                40,
                0xd14b_eab6_06bc_f2fa,
            ),
            // CyclicLR(base_lr=1e-5, max_lr=1e-2, step_size_up=7, mode="triangular2")
            (
                cyclic(1e-5, 1e-2, 7, 7, CyclicMode::Triangular2, 1.0),
                100,
                0x09a3_648c_13da_cbe2,
            ),
            // PolynomialLR(total_iters=4, power=2.0), lr 0.1
            (
                Schedule::Polynomial {
                    base_lr: 0.1,
                    total_iters: 4,
                    power: 2.0,
                },
                10,
                0x45fc_3634_e607_ca2c,
            ),
            // PolynomialLR(total_iters=30, power=0.9), lr 0.01
            (
                Schedule::Polynomial {
                    base_lr: 0.01,
                    total_iters: 30,
                    power: 0.9,
                },
                40,
                0x088b_ff8b_d52c_3f0f,
            ),
        ];
        for (schedule, steps, expected) in cases {
            let got = fingerprint((0..steps).map(|t| schedule.lr_at(t)));
            assert_eq!(got, expected, "{schedule:?}: {got:#018x}");
        }
    }

    #[test]
    fn polynomial_and_constant_schedules() {
        // 0.1 (1 - t/4)^2 = 0.1, 0.05625, 0.025, 0.00625, then 0 from total_iters on.
        let poly = Schedule::Polynomial {
            base_lr: 0.1,
            total_iters: 4,
            power: 2.0,
        };
        assert_sequence(&poly, &[0.1, 0.05625, 0.025, 0.00625, 0.0, 0.0, 0.0]);
        let linear = Schedule::Polynomial {
            base_lr: 0.1,
            total_iters: 4,
            power: 1.0,
        };
        assert_sequence(&linear, &[0.1, 0.075, 0.05, 0.025, 0.0]);
        assert_sequence(&Schedule::Constant { lr: 0.02 }, &[0.02, 0.02, 0.02]);
    }

    #[test]
    fn from_config_reads_ivadomed_scheduler_objects() {
        // ivadomed's default config: CosineAnnealingLR over num_epochs from initial_lr; base_lr and max_lr
        // are ignored, as ivadomed ignores them.
        let default = json!({"initial_lr": 0.001, "lr_scheduler": {"name": "CosineAnnealingLR", "max_lr": 1e-2, "base_lr": 1e-5}});
        assert_eq!(
            Schedule::from_config(&default, 100).unwrap(),
            Schedule::CosineAnnealing {
                base_lr: 0.001,
                t_max: 100,
                eta_min: 0.0
            }
        );
        assert_eq!(
            Schedule::from_config(&json!({}), 20).unwrap(),
            Schedule::CosineAnnealing {
                base_lr: DEFAULT_INITIAL_LR,
                t_max: 20,
                eta_min: 0.0
            }
        );
        let cyclic = json!({"initial_lr": 1e-3, "lr_scheduler": {"name": "CyclicLR", "base_lr": 1e-5, "max_lr": 1e-2}});
        let cyclic = Schedule::from_config(&cyclic, 100).unwrap();
        assert_eq!(
            cyclic,
            Schedule::Cyclic {
                base_lr: 1e-5,
                max_lr: 1e-2,
                step_size_up: 2000,
                step_size_down: 2000,
                mode: CyclicMode::Triangular2,
                gamma: 1.0
            }
        );
        // CyclicLR starts at base_lr, not initial_lr (PyTorch sets the optimizer's rate to base_lr).
        assert_eq!(cyclic.lr_at(0), 1e-5);
        let restarts = json!({"initial_lr": 0.01, "lr_scheduler": {"name": "CosineAnnealingWarmRestarts", "T_0": 10, "T_mult": 2}});
        assert_eq!(
            Schedule::from_config(&restarts, 100).unwrap(),
            Schedule::CosineAnnealingWarmRestarts {
                base_lr: 0.01,
                t_0: 10,
                t_mult: 2,
                eta_min: 0.0
            }
        );
        let poly =
            json!({"initial_lr": 0.01, "lr_scheduler": {"name": "PolynomialLR", "power": 0.9}});
        assert_eq!(
            Schedule::from_config(&poly, 30).unwrap(),
            Schedule::Polynomial {
                base_lr: 0.01,
                total_iters: 30,
                power: 0.9
            }
        );
        let error = |config: Value| Schedule::from_config(&config, 10).unwrap_err().to_string();
        let message = error(json!({"lr_scheduler": {"name": "CosineAnnealingLR", "T_mx": 3}}));
        assert!(message.contains("unknown config key `T_mx`"), "{message}");
        // PyTorch's CosineAnnealingWarmRestarts takes no base_lr: ivadomed would fail on it too.
        let message = error(
            json!({"lr_scheduler": {"name": "CosineAnnealingWarmRestarts", "T_0": 5, "base_lr": 1e-5}}),
        );
        assert!(
            message.contains("unknown config key `base_lr`"),
            "{message}"
        );
        let message = error(json!({"lr_scheduler": {"name": "CosineAnnealingWarmRestarts"}}));
        assert!(message.contains("missing config key `T_0`"), "{message}");
        let message = error(json!({"lr_scheduler": {"name": "StepLR"}}));
        assert!(
            message.contains("unknown lr_scheduler \"StepLR\""),
            "{message}"
        );
        let message = error(json!({"initial_lr": 0.1, "lr_schedular": {}}));
        assert!(
            message.contains("unknown config key `lr_schedular`"),
            "{message}"
        );
        let message = error(json!({"lr_scheduler": {"name": "CyclicLR", "mode": "sawtooth"}}));
        assert!(message.contains("must be one of"), "{message}");
        let message = Schedule::from_config(&json!({}), 0)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`T_max` must be an integer in 1..="),
            "{message}"
        );
    }

    #[test]
    fn a_resumed_scheduler_gives_the_same_rates_bit_for_bit() {
        let config = json!({"initial_lr": 0.001, "lr_scheduler": {"name": "CosineAnnealingWarmRestarts", "T_0": 3, "T_mult": 2}});
        let mut through = LrScheduler::from_config(&config, 50).unwrap();
        let rates: Vec<u64> = (0..12).map(|_| through.step().to_bits()).collect();

        let mut first = LrScheduler::from_config(&config, 50).unwrap();
        let mut resumed_rates: Vec<u64> = (0..5).map(|_| first.step().to_bits()).collect();
        let saved = serde_json::to_string(&first.state()).unwrap();
        let mut second = LrScheduler::from_config(&config, 50).unwrap();
        second
            .load_state(&serde_json::from_str(&saved).unwrap())
            .unwrap();
        assert_eq!(second.steps_taken(), 5);
        resumed_rates.extend((0..7).map(|_| second.step().to_bits()));
        assert_eq!(resumed_rates, rates);

        let mut cyclic = LrScheduler::new(Schedule::Constant { lr: 0.1 });
        let message = cyclic.load_state(&first.state()).unwrap_err().to_string();
        assert!(
            message
                .contains("belongs to \"CosineAnnealingWarmRestarts\", this scheduler is constant"),
            "{message}"
        );
    }

    /// Feeds values and returns (improved, epochs without improvement, stop) after each.
    fn trace(stopper: &mut EarlyStopping, values: &[f64]) -> Vec<(bool, usize, bool)> {
        values
            .iter()
            .map(|&v| {
                let verdict = stopper.observe(v);
                (
                    verdict.improved,
                    stopper.epochs_without_improvement(),
                    verdict.stop,
                )
            })
            .collect()
    }

    #[test]
    fn early_stopping_on_a_loss_waits_patience_epochs_and_resets_on_improvement() {
        // patience 3, epsilon 0.01. 0.995 and 0.999 beat 1.0 by less than 0.01; 0.98 beats it by 0.02 and
        // resets the count; then 0.975, 0.979, 0.972 are within 0.01 of 0.98: the third one stops.
        let mut stopper = EarlyStopping::new(3, 0.01, Better::Lower).unwrap();
        assert_eq!(
            trace(
                &mut stopper,
                &[1.0, 0.995, 0.999, 0.98, 0.975, 0.979, 0.972]
            ),
            [
                (true, 0, false),
                (false, 1, false),
                (false, 2, false),
                (true, 0, false),
                (false, 1, false),
                (false, 2, false),
                (false, 3, true),
            ]
        );
        assert_eq!(stopper.best(), Some(0.98));
        // An improvement of exactly epsilon (0.25, exact in binary) is not more than epsilon.
        let mut stopper = EarlyStopping::new(1, 0.25, Better::Lower).unwrap();
        assert_eq!(
            trace(&mut stopper, &[1.0, 0.75]),
            [(true, 0, false), (false, 1, true)]
        );
        // NaN never improves.
        let mut stopper = EarlyStopping::new(2, 0.0, Better::Lower).unwrap();
        assert_eq!(
            trace(&mut stopper, &[f64::NAN, 1.0, f64::NAN, f64::NAN]),
            [
                (false, 1, false),
                (true, 0, false),
                (false, 1, false),
                (false, 2, true)
            ]
        );
    }

    #[test]
    fn early_stopping_on_dice_counts_higher_as_better() {
        // patience 2, epsilon 0: an equal Dice is no improvement.
        let mut stopper = EarlyStopping::new(2, 0.0, Better::Higher).unwrap();
        assert_eq!(
            trace(&mut stopper, &[0.5, 0.6, 0.6, 0.7, 0.65, 0.69]),
            [
                (true, 0, false),
                (true, 0, false),
                (false, 1, false),
                (true, 0, false),
                (false, 1, false),
                (false, 2, true),
            ]
        );
        assert_eq!(stopper.best(), Some(0.7));
    }

    #[test]
    fn early_stopping_resumes_exactly_and_reads_ivadomed_keys() {
        let values = [0.1 + 0.2, 0.3, 0.29, 0.31, 0.2999999, 0.28];
        let mut through = EarlyStopping::new(3, 1e-9, Better::Lower).unwrap();
        let expected = trace(&mut through, &values);
        let mut first = EarlyStopping::new(3, 1e-9, Better::Lower).unwrap();
        let mut resumed = trace(&mut first, &values[..2]);
        let saved = serde_json::to_string(&first.state()).unwrap();
        let mut second = EarlyStopping::new(3, 1e-9, Better::Lower).unwrap();
        second
            .load_state(&serde_json::from_str(&saved).unwrap())
            .unwrap();
        assert_eq!(
            second.best().map(f64::to_bits),
            Some((0.1f64 + 0.2).to_bits())
        );
        resumed.extend(trace(&mut second, &values[2..]));
        assert_eq!(resumed, expected);
        let mut dice = EarlyStopping::new(3, 0.0, Better::Higher).unwrap();
        let message = dice.load_state(&first.state()).unwrap_err().to_string();
        assert!(message.contains("\"lower\" is better"), "{message}");

        let ivadomed = json!({"num_epochs": 100, "early_stopping_patience": 50, "early_stopping_epsilon": 0.001});
        let stopper = EarlyStopping::from_config(&ivadomed, Better::Lower).unwrap();
        assert_eq!((stopper.patience, stopper.epsilon), (50, 0.001));
        let message =
            EarlyStopping::from_config(&json!({"early_stopping_patience": 0}), Better::Lower)
                .unwrap_err()
                .to_string();
        assert!(
            message.contains("`early_stopping_patience` must be an integer in 1..="),
            "{message}"
        );
        let message = EarlyStopping::from_config(&json!({"patience": 3}), Better::Lower)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("unknown config key `patience`"),
            "{message}"
        );
    }
}
