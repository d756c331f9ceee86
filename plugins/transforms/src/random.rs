//! Seeded randomness and the config readers shared by the random transforms.
//!
//! Every random transform draws from one ChaCha8 stream seeded with the `seed` that `apply` receives, on the host,
//! in a fixed order. Noise fields are drawn host-side too and then copied to the tensor's device, so the result is
//! the same for a seed on every device and thread count, whatever else uses libtorch's global generator.
use ivado_sdk::{Config, PluginError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

pub type SeededRng = ChaCha8Rng;

pub fn seeded(seed: u64) -> SeededRng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform in `[low, high)`; `low` itself when the range is empty (e.g. `[90, 90]`).
pub fn uniform(rng: &mut SeededRng, low: f64, high: f64) -> f64 {
    low + (high - low) * rng.random::<f64>()
}

/// True with probability `p` (numpy's `np.random.random() < p`).
pub fn chance(rng: &mut SeededRng, p: f64) -> bool {
    rng.random::<f64>() < p
}

/// `count` float32 values uniform in `[-1, 1)`, drawn host-side.
pub fn uniform_values(rng: &mut SeededRng, count: i64) -> Vec<f32> {
    (0..count)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect()
}

/// `count` float32 values drawn from N(`mean`, `std`²) host-side.
pub fn normal_values(rng: &mut SeededRng, mean: f64, std: f64, count: i64) -> Result<Vec<f32>> {
    let normal = Normal::new(mean as f32, std as f32).map_err(|e| {
        PluginError(format!(
            "invalid normal distribution N({mean}, {std}²): {e}"
        ))
    })?;
    Ok((0..count).map(|_| normal.sample(rng)).collect())
}

/// A `[low, high]` range config key (`alpha_range`, `sigma_range`, ...): two finite numbers with `low <= high`.
/// ivadomed has no default for these keys, so their default is `null` and leaving one out is an error.
pub fn range_key(config: &mut Config, who: &str, key: &str) -> Result<(f64, f64)> {
    let values = config.f64_list(key).map_err(|e| {
        PluginError(format!(
            "{e} ({who} needs `{key}` as [low, high]; it has no default)"
        ))
    })?;
    match values.as_slice() {
        [low, high] if low.is_finite() && high.is_finite() && low <= high => Ok((*low, *high)),
        _ => Err(PluginError(format!(
            "{who}: `{key}` must be [low, high] with low <= high, got {values:?}"
        ))),
    }
}

/// A probability config key, in `[0, 1]`.
pub fn probability_key(config: &mut Config, who: &str, key: &str) -> Result<f64> {
    let p = config.f64(key)?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(PluginError(format!(
            "{who}: `{key}` is a probability and must be in [0, 1], got {p}"
        )))
    }
}

/// A non-negative finite number.
pub fn non_negative_key(config: &mut Config, who: &str, key: &str) -> Result<f64> {
    let value = config.f64(key)?;
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(PluginError(format!(
            "{who}: `{key}` must be a non-negative number, got {value}"
        )))
    }
}
