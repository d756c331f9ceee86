//! Paired tests for comparing two models on the same images: the Wilcoxon signed-rank test and the paired
//! t-test, with the distributions they need (Student t through the regularised incomplete beta function, the
//! normal through `erfc`).
//!
//! The conventions follow scipy (`scipy.stats.wilcoxon` with its default `zero_method="wilcox"`, and
//! `scipy.stats.ttest_rel`), two-sided. Two choices are ours: the Wilcoxon test uses the exact distribution
//! when at most 25 differences remain after dropping zeros and none tie (scipy's older `method="auto"`
//! rule), otherwise the normal approximation with the tie correction of the variance and the continuity
//! correction (scipy's `correction=True`); and differences closer than [`TIE_TOLERANCE`] count as equal,
//! because Dice values that went through a CSV with 6 decimals differ by float noise where they should tie.

/// Two absolute differences (or a difference and zero) closer than this are treated as equal.
pub const TIE_TOLERANCE: f64 = 1e-12;

/// Largest number of non-zero differences for which the Wilcoxon p-value uses the exact distribution.
pub const WILCOXON_EXACT_MAX: usize = 25;

/// Arithmetic mean; NaN for an empty slice.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// Sample standard deviation (denominator n - 1, as pandas' `std`); NaN below two values.
pub fn sample_std(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return f64::NAN;
    }
    let m = mean(values);
    let squares: f64 = values.iter().map(|v| (v - m) * (v - m)).sum();
    (squares / (values.len() - 1) as f64).sqrt()
}

/// Two-sided p-value of a standard normal statistic: `P(|Z| >= |z|)`.
pub fn normal_two_sided_p(z: f64) -> f64 {
    libm::erfc(z.abs() / std::f64::consts::SQRT_2).min(1.0)
}

/// Two-sided p-value of a Student t statistic with `df` degrees of freedom: `P(|T| >= |t|)`.
pub fn student_t_two_sided_p(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return 0.0;
    }
    // P(|T| >= t) = I_{df / (df + t^2)}(df / 2, 1 / 2).
    regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t)).clamp(0.0, 1.0)
}

/// The regularised incomplete beta function `I_x(a, b)` for `a, b > 0` and `0 <= x <= 1`.
pub fn regularized_incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let log_front =
        libm::lgamma(a + b) - libm::lgamma(a) - libm::lgamma(b) + a * x.ln() + b * (1.0 - x).ln();
    // The continued fraction converges fast only on this side of the mean; use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0) {
        log_front.exp() * beta_continued_fraction(a, b, x) / a
    } else {
        1.0 - log_front.exp() * beta_continued_fraction(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of the incomplete beta function, by the modified Lentz method.
fn beta_continued_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut fraction = d;
    for m in 1..=10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        // Even step.
        let numerator = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));
        d = 1.0 + numerator * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + numerator / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        fraction *= d * c;
        // Odd step.
        let numerator = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));
        d = 1.0 + numerator * d;
        d = if d.abs() < TINY { TINY } else { d };
        c = 1.0 + numerator / c;
        c = if c.abs() < TINY { TINY } else { c };
        d = 1.0 / d;
        let step = d * c;
        fraction *= step;
        if (step - 1.0).abs() < 1e-16 {
            break;
        }
    }
    fraction
}

/// Ranks of `values` (1-based), ties (within [`TIE_TOLERANCE`]) sharing their average rank, and the size
/// of every tie group.
pub fn average_ranks(values: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut groups = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] - values[order[end - 1]] <= TIE_TOLERANCE {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; each gets their average.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &index in &order[start..end] {
            ranks[index] = rank;
        }
        groups.push(end - start);
        start = end;
    }
    (ranks, groups)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WilcoxonMethod {
    Exact,
    Normal,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Wilcoxon {
    /// Differences left after dropping the zeros.
    pub n: usize,
    pub zeros: usize,
    /// Whether some absolute differences tie.
    pub ties: bool,
    /// Sum of the ranks of the positive differences.
    pub rank_sum_positive: f64,
    /// scipy's two-sided statistic: the smaller of the positive and negative rank sums.
    pub statistic: f64,
    /// Two-sided; NaN when every difference is zero.
    pub p_value: f64,
    pub method: WilcoxonMethod,
}

/// Number of subsets of `{1, ..., n}` with each sum `0..=n(n+1)/2`: the null distribution of the positive
/// rank sum times `2^n`. f64 counts are exact up to n = 25 (at most 2^25).
fn signed_rank_counts(n: usize) -> Vec<f64> {
    let max = n * (n + 1) / 2;
    let mut counts = vec![0.0; max + 1];
    counts[0] = 1.0;
    for rank in 1..=n {
        for sum in (rank..=max).rev() {
            counts[sum] += counts[sum - rank];
        }
    }
    counts
}

/// Two-sided Wilcoxon signed-rank test of `differences` (B - A for paired samples) against zero.
pub fn wilcoxon_signed_rank(differences: &[f64]) -> Wilcoxon {
    let nonzero: Vec<f64> = differences
        .iter()
        .copied()
        .filter(|d| d.abs() > TIE_TOLERANCE)
        .collect();
    let zeros = differences.len() - nonzero.len();
    let n = nonzero.len();
    let magnitudes: Vec<f64> = nonzero.iter().map(|d| d.abs()).collect();
    let (ranks, groups) = average_ranks(&magnitudes);
    let ties = groups.iter().any(|&size| size > 1);
    let rank_sum_positive: f64 = nonzero
        .iter()
        .zip(&ranks)
        .filter(|(d, _)| **d > 0.0)
        // A fold from +0: f64's `sum` of nothing is -0, which would print as "W = -0".
        .fold(0.0, |sum, (_, r)| sum + r);
    let total = (n * (n + 1)) as f64 / 2.0;
    let statistic = rank_sum_positive.min(total - rank_sum_positive);
    let exact = n <= WILCOXON_EXACT_MAX && !ties;
    let method = if exact {
        WilcoxonMethod::Exact
    } else {
        WilcoxonMethod::Normal
    };
    let p_value = if n == 0 {
        f64::NAN
    } else if exact {
        // Ranks are the integers 1..=n, so the statistic is an integer; by symmetry the two-sided p-value
        // is twice the lower tail at the smaller rank sum.
        let counts = signed_rank_counts(n);
        let lower: f64 = counts[..=statistic.round() as usize].iter().sum();
        (2.0 * lower / 2f64.powi(n as i32)).min(1.0)
    } else {
        let mean = total / 2.0;
        let tie_term: f64 = groups.iter().map(|&t| (t * t * t - t) as f64).sum::<f64>();
        let variance = (n * (n + 1) * (2 * n + 1)) as f64 / 24.0 - tie_term / 48.0;
        let deviation = rank_sum_positive - mean;
        // Continuity correction: half a rank towards the mean (f64::signum(0.0) is 1, hence the match).
        let correction = match deviation.partial_cmp(&0.0) {
            Some(std::cmp::Ordering::Greater) => 0.5,
            Some(std::cmp::Ordering::Less) => -0.5,
            _ => 0.0,
        };
        let z = (deviation - correction) / variance.sqrt();
        normal_two_sided_p(z)
    };
    Wilcoxon {
        n,
        zeros,
        ties,
        rank_sum_positive,
        statistic,
        p_value,
        method,
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PairedT {
    pub n: usize,
    pub mean_difference: f64,
    pub statistic: f64,
    pub df: f64,
    /// Two-sided.
    pub p_value: f64,
}

/// Two-sided paired t-test of `differences` (B - A) against zero, as `scipy.stats.ttest_rel(B, A)`.
pub fn paired_t_test(differences: &[f64]) -> PairedT {
    let n = differences.len();
    let mean_difference = mean(differences);
    let standard_error = sample_std(differences) / (n as f64).sqrt();
    // Constant differences: scipy gives +-inf (p = 0) for a non-zero mean and NaN for all zeros.
    let statistic = mean_difference / standard_error;
    let df = n as f64 - 1.0;
    PairedT {
        n,
        mean_difference,
        statistic,
        df,
        p_value: student_t_two_sided_p(statistic, df),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
        assert!(
            (actual - expected).abs() <= tolerance * expected.abs().max(1e-300),
            "{what}: {actual} vs {expected}"
        );
    }

    #[test]
    fn student_t_two_sided_p_matches_tables_and_scipy() {
        // scipy 1.17: 2 * scipy.stats.t.sf(t, df).
        assert_close(
            student_t_two_sided_p(2.228, 10.0),
            0.05001177181711132,
            1e-10,
            "t=2.228 df=10",
        );
        // df = 1 is the Cauchy distribution: 1 - 2 atan(1) / pi = 0.5 exactly.
        assert_close(student_t_two_sided_p(1.0, 1.0), 0.5, 1e-12, "Cauchy");
        assert_close(
            student_t_two_sided_p(3.182, 3.0),
            0.050017136543313766,
            1e-10,
            "t=3.182 df=3",
        );
        assert_close(
            student_t_two_sided_p(1.96, 1e6),
            0.04999606758526985,
            1e-8,
            "large df approaches the normal",
        );
        assert_close(
            student_t_two_sided_p(0.5, 2.5),
            0.6576979198697148,
            1e-10,
            "fractional df",
        );
        assert_close(
            student_t_two_sided_p(-8.0, 4.0),
            0.0013238969092171672,
            1e-10,
            "negative t, far tail",
        );
        assert_eq!(student_t_two_sided_p(0.0, 7.0), 1.0);
        assert_eq!(student_t_two_sided_p(f64::INFINITY, 7.0), 0.0);
    }

    #[test]
    fn normal_two_sided_p_matches_scipy() {
        // 2 * scipy.stats.norm.sf(z).
        assert_close(normal_two_sided_p(1.96), 0.04999579029644087, 1e-12, "1.96");
        assert_close(
            normal_two_sided_p(-1.96),
            0.04999579029644087,
            1e-12,
            "-1.96",
        );
        assert_close(normal_two_sided_p(6.0), 1.973175290075389e-09, 1e-10, "6");
        assert_eq!(normal_two_sided_p(0.0), 1.0);
    }

    #[test]
    fn regularized_incomplete_beta_has_closed_forms_at_simple_parameters() {
        // I_x(1, 1) = x; I_x(2, 1) = x^2; I_x(1, 3) = 1 - (1 - x)^3.
        assert_close(
            regularized_incomplete_beta(1.0, 1.0, 0.3),
            0.3,
            1e-13,
            "I(1,1)",
        );
        assert_close(
            regularized_incomplete_beta(2.0, 1.0, 0.7),
            0.49,
            1e-13,
            "I(2,1)",
        );
        assert_close(
            regularized_incomplete_beta(1.0, 3.0, 0.2),
            1.0 - 0.8f64.powi(3),
            1e-13,
            "I(1,3)",
        );
    }

    #[test]
    fn average_ranks_share_ties() {
        let (ranks, groups) = average_ranks(&[3.0, 1.0, 3.0, 2.0, 3.0 + 1e-14]);
        assert_eq!(ranks, vec![4.0, 1.0, 4.0, 2.0, 4.0]);
        assert_eq!(groups, vec![1, 1, 3]);
    }

    #[test]
    fn wilcoxon_exact_matches_scipy() {
        // scipy.stats.wilcoxon(d, method="exact") -> statistic 10.0, p 0.083984375.
        let d = [0.3, -0.1, 0.25, 0.5, -0.05, 0.2, 0.45, 0.15, -0.35, 0.4];
        let result = wilcoxon_signed_rank(&d);
        assert_eq!(result.method, WilcoxonMethod::Exact);
        assert_eq!(result.n, 10);
        assert_eq!(result.statistic, 10.0);
        assert_close(result.p_value, 0.083984375, 1e-14, "p");
    }

    #[test]
    fn wilcoxon_drops_zeros_before_ranking() {
        // scipy.stats.wilcoxon([0, .2, -.1, .4, .3], method="exact") -> statistic 1.0, p 0.25.
        let result = wilcoxon_signed_rank(&[0.0, 0.2, -0.1, 0.4, 0.3]);
        assert_eq!((result.n, result.zeros), (4, 1));
        assert_eq!(result.statistic, 1.0);
        assert_close(result.p_value, 0.25, 1e-14, "p");
    }

    #[test]
    fn wilcoxon_with_ties_uses_the_corrected_normal_approximation() {
        // scipy.stats.wilcoxon([1, 1, 2, -2, 3, 4], method="approx", correction=True)
        // -> statistic 3.5, p 0.17058693287144144.
        let result = wilcoxon_signed_rank(&[1.0, 1.0, 2.0, -2.0, 3.0, 4.0]);
        assert_eq!(result.method, WilcoxonMethod::Normal);
        assert!(result.ties);
        assert_eq!(result.statistic, 3.5);
        assert_close(result.p_value, 0.17058693287144144, 1e-12, "p");
    }

    #[test]
    fn wilcoxon_large_samples_use_the_normal_approximation() {
        // scipy.stats.wilcoxon(d, method="approx", correction=True) -> statistic 31.5, p 0.00026642351067369653.
        let d = [
            1.0, 2.0, 2.0, -3.0, 0.0, 4.0, 4.0, 4.0, -1.0, 5.0, 6.0, 0.0, 7.0, 8.0, -2.0, 9.0,
            10.0, 11.0, 12.0, 13.0, 14.0, -15.0, 16.0, 17.0, 18.0, 19.0, 20.0, 21.0,
        ];
        let result = wilcoxon_signed_rank(&d);
        assert_eq!((result.n, result.zeros), (26, 2));
        assert_eq!(result.statistic, 31.5);
        assert_close(result.p_value, 0.00026642351067369653, 1e-10, "p");
        // 1..=30 with 4 and 11 negated: 30 > 25 without ties, so still the approximation.
        // scipy: statistic 15.0, p 8.06957614199731e-06.
        let d: Vec<f64> = (1..=30)
            .map(|i| {
                if i == 4 || i == 11 {
                    -i as f64
                } else {
                    i as f64
                }
            })
            .collect();
        let result = wilcoxon_signed_rank(&d);
        assert_eq!(result.method, WilcoxonMethod::Normal);
        assert_eq!(result.statistic, 15.0);
        assert_close(result.p_value, 8.06957614199731e-06, 1e-10, "p");
    }

    #[test]
    fn wilcoxon_of_all_zero_differences_has_no_p_value() {
        let result = wilcoxon_signed_rank(&[0.0, 0.0]);
        assert_eq!(result.n, 0);
        assert!(result.p_value.is_nan());
    }

    #[test]
    fn wilcoxon_statistic_is_a_positive_zero_when_every_difference_is_negative() {
        // scipy.stats.wilcoxon([-1, -2, -3], method="exact") -> statistic 0.0, p 0.25.
        let result = wilcoxon_signed_rank(&[-1.0, -2.0, -3.0]);
        assert!(result.statistic == 0.0 && result.statistic.is_sign_positive());
        assert_close(result.p_value, 0.25, 1e-14, "p");
    }

    #[test]
    fn paired_t_test_matches_scipy_ttest_rel() {
        // scipy.stats.ttest_rel(b, a) -> statistic 3.05085107923876, p 0.018560955600352272;
        // mean(b - a) = 0.0275.
        let a = [0.71, 0.64, 0.80, 0.58, 0.77, 0.69, 0.73, 0.62];
        let b = [0.74, 0.66, 0.79, 0.65, 0.81, 0.70, 0.78, 0.63];
        let d: Vec<f64> = b.iter().zip(&a).map(|(b, a)| b - a).collect();
        let result = paired_t_test(&d);
        assert_eq!((result.n, result.df), (8, 7.0));
        assert_close(result.mean_difference, 0.0275, 1e-12, "mean");
        assert_close(result.statistic, 3.05085107923876, 1e-10, "t");
        assert_close(result.p_value, 0.018560955600352272, 1e-9, "p");
    }

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean(&[1.0, 2.0, 6.0]), 3.0);
        // Deviations -2, -1, 3: squares sum 14, over n - 1 = 2 gives 7.
        assert_close(sample_std(&[1.0, 2.0, 6.0]), 7f64.sqrt(), 1e-15, "std");
        assert!(sample_std(&[1.0]).is_nan());
        assert!(mean(&[]).is_nan());
    }
}
