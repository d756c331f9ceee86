//! Seeded randomness and the config readers shared by the random transforms.
//!
//! Every random transform draws from one ChaCha8 stream seeded with the `seed` that `apply` receives, on the host,
//! in a fixed order. Noise fields are drawn host-side too, from a faster generator seeded from that stream
//! ([`FieldRng`]), and then copied to the tensor's device, so the result is the same for a seed on every device and
//! thread count, whatever else uses libtorch's global generator.
use ivado_sdk::{Config, PluginError, Result};
use rand::{Rng, RngCore, SeedableRng};
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

/// xoshiro256++ (Blackman and Vigna): the generator of the noise fields, several times faster per value than
/// ChaCha8 and plenty for noise. Its state comes from the transform's ChaCha8 stream, so a field still depends on
/// the sample's seed alone.
pub struct FieldRng {
    state: [u64; 4],
}

impl FieldRng {
    /// Seeds the generator from the next 256 bits of `rng`.
    pub fn from_stream(rng: &mut SeededRng) -> Self {
        let mut state = [0u64; 4];
        for word in &mut state {
            *word = rng.next_u64();
        }
        if state == [0; 4] {
            // The one state xoshiro cannot leave; ChaCha8 gives it with probability 2^-256.
            state[0] = 1;
        }
        Self { state }
    }
}

impl RngCore for FieldRng {
    fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Fills `out` with float32 values uniform in `[-1, 1)`, drawn host-side from a [`FieldRng`] seeded by `rng`.
pub fn fill_uniform(rng: &mut SeededRng, out: &mut [f32]) {
    let mut field = FieldRng::from_stream(rng);
    for value in out {
        *value = field.random::<f32>() * 2.0 - 1.0;
    }
}

/// `count` float32 values uniform in `[-1, 1)` ([`fill_uniform`]).
pub fn uniform_values(rng: &mut SeededRng, count: i64) -> Vec<f32> {
    let mut values = vec![0.0; count.max(0) as usize];
    fill_uniform(rng, &mut values);
    values
}

/// N(`mean`, `std`²) in float32, checked.
pub fn normal(mean: f64, std: f64) -> Result<Normal<f32>> {
    Normal::new(mean as f32, std as f32).map_err(|e| {
        PluginError(format!(
            "invalid normal distribution N({mean}, {std}²): {e}"
        ))
    })
}

/// Calls `take` with float32 draws from `normal`, one per value wanted, from a [`FieldRng`] seeded by `rng`
/// (ziggurat sampling, host-side).
pub fn for_each_normal(
    rng: &mut SeededRng,
    normal: &Normal<f32>,
    count: usize,
    mut take: impl FnMut(f32),
) {
    let mut field = FieldRng::from_stream(rng);
    for _ in 0..count {
        take(normal.sample(&mut field));
    }
}

/// `count` float32 values drawn from N(`mean`, `std`²) host-side ([`for_each_normal`]).
pub fn normal_values(rng: &mut SeededRng, mean: f64, std: f64, count: i64) -> Result<Vec<f32>> {
    let normal = normal(mean, std)?;
    let mut values = Vec::with_capacity(count.max(0) as usize);
    for_each_normal(rng, &normal, count.max(0) as usize, |v| values.push(v));
    Ok(values)
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

#[cfg(test)]
mod tests {
    use super::*;

    // xoshiro256++ from state [1, 2, 3, 4], worked by hand from the algorithm's definition: the first output is
    // rotl(s0 + s3, 23) + s0 = 5 * 2^23 + 1 = 41943041; the update (t = s1 << 17; s2 ^= s0; s3 ^= s1; s1 ^= s2;
    // s0 ^= s3; s2 ^= t; s3 = rotl(s3, 45)) leaves [7, 0, 262146, rotl(6, 45)], so the second output is
    // rotl(7 + rotl(6, 45), 23) + 7.
    #[test]
    fn field_rng_is_xoshiro256_plus_plus() {
        let mut rng = FieldRng {
            state: [1, 2, 3, 4],
        };
        assert_eq!(rng.next_u64(), 41_943_041);
        let expected = 7u64
            .wrapping_add(6u64.rotate_left(45))
            .rotate_left(23)
            .wrapping_add(7);
        assert_eq!(rng.next_u64(), expected);
    }

    // Uniform fields lie in [-1, 1) with mean about 0 and variance 1/3; a seed gives the same field every time.
    #[test]
    fn uniform_fields_are_seeded_and_uniform() {
        let values = uniform_values(&mut seeded(3), 20_000);
        assert!(values.iter().all(|v| (-1.0..1.0).contains(v)));
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / 20_000.0;
        let variance = values.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / 20_000.0;
        // Standard error of the mean: sqrt(1/3 / 20000) = 0.0041.
        assert!(mean.abs() < 0.017, "{mean}");
        assert!((variance - 1.0 / 3.0).abs() < 0.01, "{variance}");
        assert_eq!(values, uniform_values(&mut seeded(3), 20_000));
        assert_ne!(values, uniform_values(&mut seeded(4), 20_000));
    }
}
