//! Seeded randomness and the config readers shared by the random transforms.
//!
//! Every random transform draws from one ChaCha8 stream seeded with the `seed` that `apply` receives, on the host,
//! in a fixed order. Noise fields are drawn host-side too, from a faster generator seeded from that stream
//! ([`FieldRng`]), and then copied to the tensor's device, so the result is the same for a seed on every device and
//! thread count, whatever else uses libtorch's global generator.
use ivado_sdk::{Config, PluginError, Result};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Normal;

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

/// N(`mean`, `std`²) in float32, checked (finite, `std >= 0`).
pub fn normal(mean: f64, std: f64) -> Result<Normal<f32>> {
    Normal::new(mean as f32, std as f32).map_err(|e| {
        PluginError(format!(
            "invalid normal distribution N({mean}, {std}²): {e}"
        ))
    })
}

/// Fills `out` with float32 draws of `normal` (`mean + std z`, as `rand_distr` computes them), from a [`FieldRng`]
/// seeded by `rng`: standard normals `z` by the Box-Muller transform, two per 64-bit draw, in blocks the CPU
/// computes in vector registers.
pub fn fill_normal(rng: &mut SeededRng, normal: &Normal<f32>, out: &mut [f32]) {
    let (mean, std) = (normal.mean(), normal.std_dev());
    let mut field = FieldRng::from_stream(rng);
    let mut words = [0u64; BOX_MULLER_BLOCK];
    let mut block = [0f32; 2 * BOX_MULLER_BLOCK];
    for chunk in out.chunks_mut(2 * BOX_MULLER_BLOCK) {
        for word in &mut words[..chunk.len().div_ceil(2)] {
            *word = field.next_u64();
        }
        box_muller(&words, &mut block);
        for (target, &z) in chunk.iter_mut().zip(&block) {
            *target = mean + std * z;
        }
    }
}

/// `count` float32 values drawn from N(`mean`, `std`²) host-side ([`fill_normal`]).
pub fn normal_values(rng: &mut SeededRng, mean: f64, std: f64, count: i64) -> Result<Vec<f32>> {
    let normal = normal(mean, std)?;
    let mut values = vec![0.0; count.max(0) as usize];
    fill_normal(rng, &normal, &mut values);
    Ok(values)
}

/// 64-bit draws per Box-Muller block.
const BOX_MULLER_BLOCK: usize = 64;

/// Two standard normals per 64-bit word: with u1 in (0, 1) from its high bits and u2 in [0, 1) from its low bits,
/// `sqrt(-2 ln u1) (cos 2 pi u2, sin 2 pi u2)`. With AVX2 where the CPU has it; the same float32 operations
/// either way (no fused multiply-adds), so the same values on every x86-64 CPU.
fn box_muller(words: &[u64; BOX_MULLER_BLOCK], out: &mut [f32; 2 * BOX_MULLER_BLOCK]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn wide(words: &[u64; BOX_MULLER_BLOCK], out: &mut [f32; 2 * BOX_MULLER_BLOCK]) {
            box_muller_with(words, out)
        }
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { wide(words, out) };
        return;
    }
    box_muller_with(words, out)
}

#[inline(always)]
fn box_muller_with(words: &[u64; BOX_MULLER_BLOCK], out: &mut [f32; 2 * BOX_MULLER_BLOCK]) {
    const TWO_TO_MINUS_31: f32 = 1.0 / 2_147_483_648.0;
    const TWO_TO_MINUS_24: f32 = 1.0 / 16_777_216.0;
    for (&word, pair) in words.iter().zip(out.chunks_exact_mut(2)) {
        // Signed 32-bit integers convert to float in vector registers. u1 = (k + 1/2) 2^-31 with k the top 31
        // bits: never 0, so the radius stays finite (at most 6.6); u2 from the low 24 bits.
        let u1 = (((word >> 33) as i32) as f32 + 0.5) * TWO_TO_MINUS_31;
        let u2 = ((word as i32 & 0x00ff_ffff) as f32) * TWO_TO_MINUS_24;
        let radius = (-2.0 * ln_unit(u1)).sqrt();
        let (sin, cos) = sin_cos_turns(u2);
        pair[0] = radius * cos;
        pair[1] = radius * sin;
    }
}

/// Natural log of `x` in (0, 1], to about 1e-7: `x = m 2^e` with m in [sqrt(1/2), sqrt(2)), and
/// `ln m = 2 atanh(t)`, `t = (m - 1) / (m + 1)`, by its series to t^9 (next term below 1e-9 for |t| < 0.172).
#[inline(always)]
fn ln_unit(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut exponent = ((bits >> 23) & 0xff) as i32 - 127;
    let mut mantissa = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let high = mantissa > std::f32::consts::SQRT_2;
    mantissa = if high { mantissa * 0.5 } else { mantissa };
    exponent += i32::from(high);
    let t = (mantissa - 1.0) / (mantissa + 1.0);
    let t2 = t * t;
    let series = 1.0 + t2 * (1.0 / 3.0 + t2 * (1.0 / 5.0 + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0))));
    exponent as f32 * std::f32::consts::LN_2 + 2.0 * t * series
}

/// `(sin, cos)` of `2 pi turns` for `turns` in [0, 1), to about 1e-7: the nearest quarter turn k and the rest
/// `x` in [-pi/4, pi/4], whose sine and cosine come from their Taylor series (to x^9 and x^10; next terms below
/// 2e-9), rotated by k quarter turns.
#[inline(always)]
fn sin_cos_turns(turns: f32) -> (f32, f32) {
    let quarters = turns * 4.0;
    // SAFETY (of the conversion): quarters + 0.5 is in [0.5, 4.5), inside the i32 range.
    let k = unsafe { (quarters + 0.5).to_int_unchecked::<i32>() };
    let x = (quarters - k as f32) * std::f32::consts::FRAC_PI_2;
    let x2 = x * x;
    let sin = x
        * (1.0
            + x2 * (-1.0 / 6.0
                + x2 * (1.0 / 120.0 + x2 * (-1.0 / 5040.0 + x2 * (1.0 / 362_880.0)))));
    let cos = 1.0
        + x2 * (-0.5
            + x2 * (1.0 / 24.0
                + x2 * (-1.0 / 720.0 + x2 * (1.0 / 40_320.0 + x2 * (-1.0 / 3_628_800.0)))));
    // Rotation by k quarter turns without branches (they would be unpredictable): odd k swaps sine and cosine,
    // k = 2, 3 negate the sine part, k = 1, 2 the cosine part.
    let swap = k & 1 == 1;
    let (first, second) = if swap { (cos, sin) } else { (sin, cos) };
    let sin_sign = ((k & 2) as u32) << 30;
    let cos_sign = (((k + 1) & 2) as u32) << 30;
    (
        f32::from_bits(first.to_bits() ^ sin_sign),
        f32::from_bits(second.to_bits() ^ cos_sign),
    )
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

    // The vectorisable log and sine/cosine against the standard library's float64 ones, over their whole domains.
    #[test]
    fn box_muller_functions_are_accurate() {
        for k in 0..100_000u32 {
            let x = ((k as f32 + 0.5) / 100_000.0).powi(3);
            let want = f64::from(x).ln();
            let got = f64::from(ln_unit(x));
            assert!(
                (got - want).abs() <= 2e-7 * want.abs().max(1.0),
                "ln {x}: {got} vs {want}"
            );
            let turns = k as f32 / 100_000.0;
            let angle = std::f64::consts::TAU * f64::from(turns);
            let (sin, cos) = sin_cos_turns(turns);
            assert!((f64::from(sin) - angle.sin()).abs() < 3e-7, "sin {turns}");
            assert!((f64::from(cos) - angle.cos()).abs() < 3e-7, "cos {turns}");
        }
        assert_eq!(ln_unit(1.0), 0.0);
    }

    // 200,000 draws of N(0, 1): mean within 4 standard errors (0.009), variance within 0.02 of 1, kurtosis within
    // 0.06 of 3 (its standard error is sqrt(24 / n) = 0.011), and the fraction beyond 2 sigma within 0.003 of
    // 0.0455 (standard error 0.0005).
    #[test]
    fn normal_draws_have_gaussian_moments() {
        let values = normal_values(&mut seeded(9), 0.0, 1.0, 200_000).unwrap();
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let moment = |p: i32| {
            values
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(p))
                .sum::<f64>()
                / n
        };
        let (variance, fourth) = (moment(2), moment(4));
        assert!(mean.abs() < 0.009, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.02, "variance {variance}");
        assert!((fourth / variance.powi(2) - 3.0).abs() < 0.06, "kurtosis");
        let beyond = values.iter().filter(|v| v.abs() > 2.0).count() as f64 / n;
        assert!((beyond - 0.0455).abs() < 0.003, "beyond 2 sigma {beyond}");
        // Scaled and shifted as N(mean, std²) is; the same seed gives the same draws.
        let scaled = normal_values(&mut seeded(9), 3.0, 0.5, 200_000).unwrap();
        assert!((f64::from(scaled[7]) - (3.0 + 0.5 * f64::from(values[7]))).abs() < 1e-6);
        assert_eq!(
            values,
            normal_values(&mut seeded(9), 0.0, 1.0, 200_000).unwrap()
        );
    }

    // The AVX2 and the plain build of the Box-Muller block give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn box_muller_is_the_same_with_and_without_avx2() {
        let mut rng = FieldRng::from_stream(&mut seeded(5));
        let words: [u64; BOX_MULLER_BLOCK] = std::array::from_fn(|_| rng.next_u64());
        let mut plain = [0f32; 2 * BOX_MULLER_BLOCK];
        box_muller_with(&words, &mut plain);
        let mut dispatched = [0f32; 2 * BOX_MULLER_BLOCK];
        box_muller(&words, &mut dispatched);
        assert!(plain
            .iter()
            .zip(&dispatched)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
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
