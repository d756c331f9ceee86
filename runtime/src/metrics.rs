//! Segmentation metrics and the training loss.
use tch::{Kind, Tensor};

/// ivadomed's DiceLoss: `-(2 |p·t| + smooth) / (|p| + |t| + smooth)`, in [-1, 0], with smooth = 1.
/// It is negative so that lower is better, and -1 for an empty prediction of an empty target.
pub fn dice_loss(prediction: &Tensor, target: &Tensor, smooth: f64) -> Tensor {
    let p = prediction.reshape([-1]);
    let t = target.reshape([-1]);
    let intersection = (&p * &t).sum(Kind::Float);
    -((intersection * 2.0 + smooth) / (p.sum(Kind::Float) + t.sum(Kind::Float) + smooth))
}

/// Overlap counts of a binarised prediction against a binary target.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Overlap {
    pub true_positive: f64,
    pub false_positive: f64,
    pub false_negative: f64,
}

impl Overlap {
    pub fn of(prediction: &Tensor, target: &Tensor, threshold: f64) -> Self {
        let p = prediction.ge(threshold).to_kind(Kind::Float);
        let t = target.ge(0.5).to_kind(Kind::Float);
        let tp = (&p * &t).sum(Kind::Double).double_value(&[]);
        let p_sum = p.sum(Kind::Double).double_value(&[]);
        let t_sum = t.sum(Kind::Double).double_value(&[]);
        Self {
            true_positive: tp,
            false_positive: p_sum - tp,
            false_negative: t_sum - tp,
        }
    }

    /// One overlap per item of a batch (dimension 0), read back from the device in a single transfer.
    pub fn per_item(prediction: &Tensor, target: &Tensor, threshold: f64) -> Vec<Self> {
        let batch = prediction.size()[0];
        let p = prediction
            .ge(threshold)
            .to_kind(Kind::Double)
            .reshape([batch, -1]);
        let t = target.ge(0.5).to_kind(Kind::Double).reshape([batch, -1]);
        let sum = |x: &Tensor| x.sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
        let counts =
            Tensor::stack(&[sum(&(&p * &t)), sum(&p), sum(&t)], 1).to_device(tch::Device::Cpu);
        let counts = Vec::<f64>::try_from(counts.reshape([-1])).unwrap_or_default();
        counts
            .chunks_exact(3)
            .map(|c| Self {
                true_positive: c[0],
                false_positive: c[1] - c[0],
                false_negative: c[2] - c[0],
            })
            .collect()
    }

    pub fn add(&mut self, other: Overlap) {
        self.true_positive += other.true_positive;
        self.false_positive += other.false_positive;
        self.false_negative += other.false_negative;
    }

    /// Hard Dice. Both empty counts as a perfect 1.0: nothing to find, and nothing found.
    pub fn dice(&self) -> f64 {
        let denominator = 2.0 * self.true_positive + self.false_positive + self.false_negative;
        if denominator == 0.0 {
            1.0
        } else {
            2.0 * self.true_positive / denominator
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn dice_loss_matches_hand_computed_values() {
        // p = [1, 1, 0, 0], t = [1, 0, 0, 0]: intersection 1, sums 2 and 1 -> -(2 + 1) / (3 + 1) = -0.75.
        let p = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 0.0]);
        let t = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0]);
        assert!((dice_loss(&p, &t, 1.0).double_value(&[]) + 0.75).abs() < 1e-6);
        // Empty vs empty is -1 (ivadomed's own test value).
        let zero = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        assert_eq!(dice_loss(&zero, &zero, 1.0).double_value(&[]), -1.0);
    }

    #[test]
    fn hard_dice_counts_overlap() {
        // prediction {0, 1}, target {1, 2}: TP 1, FP 1, FN 1 -> Dice 2/4.
        let p = Tensor::from_slice(&[0.9f32, 0.6, 0.2, 0.1]);
        let t = Tensor::from_slice(&[0.0f32, 1.0, 1.0, 0.0]);
        let overlap = Overlap::of(&p, &t, 0.5);
        assert_eq!(
            overlap,
            Overlap {
                true_positive: 1.0,
                false_positive: 1.0,
                false_negative: 1.0
            }
        );
        assert_eq!(overlap.dice(), 0.5);
        assert_eq!(Overlap::default().dice(), 1.0);
        // Per item: the same two vectors as a batch of 2 rows, each row counted on its own.
        let batch = Overlap::per_item(&p.reshape([2, 2]), &t.reshape([2, 2]), 0.5);
        assert_eq!(
            batch,
            vec![
                Overlap {
                    true_positive: 1.0,
                    false_positive: 1.0,
                    false_negative: 0.0
                },
                Overlap {
                    true_positive: 0.0,
                    false_positive: 0.0,
                    false_negative: 1.0
                },
            ]
        );
    }
}
