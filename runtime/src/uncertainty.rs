//! Uncertainty maps from N predictions of the same volume (test-time augmentation samples and/or MC-dropout
//! samples), with the definitions and file suffixes of ivadomed's `uncertainty.py` (`run_uncertainty`,
//! `combine_predictions`, `voxelwise_uncertainty`, `structurewise_uncertainty`).
//!
//! Volumes follow the rest of the runtime: CPU `f32` tensors, `[X, Y, Z]` for one class and `[K, X, Y, Z]`
//! for K classes. ivadomed's maps are written per subject as `<prefix><suffix>.nii.gz`; [`UncertaintyMaps::suffixes`]
//! pairs each map with its suffix:
//!
//! | suffix        | map                                                                            |
//! |---------------|--------------------------------------------------------------------------------|
//! | `_pred`       | hard segmentation whose connected components are the scored structures         |
//! | `_soft`       | mean of the N soft predictions                                                 |
//! | `_unc-vox`    | voxel-wise entropy of that mean                                                |
//! | `_unc-iou`    | per structure: IoU of its instances across the N samples                       |
//! | `_unc-cv`     | per structure: coefficient of variation of its volume across the N samples     |
//! | `_unc-avgUnc` | per structure: mean of `_unc-vox` over its voxels                              |
//!
//! Structure maps are painted as ivadomed writes them: every voxel of a structure holds that structure's
//! value, every other voxel 0 (so 0 is also "not a scored structure").
//!
//! Where this module departs from ivadomed, and why:
//! - Samples are binarised at `threshold` (`>=`, as `threshold_predictions`) before structures are
//!   labelled. ivadomed labels the raw sample arrays, so on soft samples every non-zero voxel (after
//!   `pred_to_nib`'s 1e-2 noise cut) counted as foreground and faint haloes merged structures.
//! - The hard segmentation is the union of the binarised samples. ivadomed thresholds the mean at `1/N`
//!   with the stated intent "1 where at least one sample predicted 1": identical for binary samples, but on
//!   soft samples it also marks voxels that no sample predicts (N samples at `1/N` each).
//! - A structure's instance in a sample is the sample's connected component that overlaps it most (ties go
//!   to the first in scan order). That is ivadomed's later fix; its earlier code took the highest label id
//!   among the overlapping components, an arbitrary pick. Since every sample's foreground lies inside the
//!   union, each sample component lies inside exactly one structure, and the best overlap is simply the
//!   largest component inside it.
//! - One sample works (IoU 1, CV 0); ivadomed pairs samples 0 and 1 first and fails with an IndexError.
//! - Samples with values outside [0, 1] (logits, say) are refused; ivadomed would write NaN entropies.
//! - ivadomed's multi-class predictions are channel-last `[X, Y, Z, C]` and its structure loop runs over
//!   the last axis, which breaks on a plain `[X, Y, Z]` volume; here `[X, Y, Z]` is one class and the class
//!   axis comes first.
//!
//! Kept from ivadomed on purpose: the entropy is the per-class binary entropy (not an entropy over
//! classes), with natural log and epsilon `1e-5` inside the log, clipped at 0, so it peaks at
//! `-ln(0.5 + 1e-5) ~= 0.693127`, not 1; the CV uses the population standard deviation (`np.std`,
//! ddof 0) of voxel counts, samples without the structure counting as volume 0 (voxel counts suffice: the
//! CV is scale-free, so the spacing cancels); the IoU is the intersection of all N instances over their
//! union, so one sample missing the structure makes it 0; structures of a single voxel are not scored
//! (ivadomed's later code skips them) and stay 0 in every structure map.
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

use ivado_sdk::components::{Components, Connectivity};

use crate::joined;
use crate::metrics::Mask;

/// ivadomed's epsilon inside the entropy's logarithm (`voxelwise_uncertainty(.., eps=1e-5)`).
pub const ENTROPY_EPSILON: f64 = 1e-5;

pub const HARD_SUFFIX: &str = "_pred";
pub const SOFT_SUFFIX: &str = "_soft";
pub const VOXEL_ENTROPY_SUFFIX: &str = "_unc-vox";
pub const STRUCTURE_IOU_SUFFIX: &str = "_unc-iou";
pub const STRUCTURE_CV_SUFFIX: &str = "_unc-cv";
pub const STRUCTURE_AVG_UNC_SUFFIX: &str = "_unc-avgUnc";

/// The uncertainty maps of one volume; all tensors have the shape of one sample (`[X, Y, Z]` or
/// `[K, X, Y, Z]`), are `f32` and live on the CPU.
#[derive(Debug)]
pub struct UncertaintyMaps {
    /// 1 where at least one sample is `>= threshold`, else 0 (`_pred`).
    pub hard: Tensor,
    /// Mean of the samples (`_soft`).
    pub soft: Tensor,
    /// `max(0, -(p ln(p + eps) + (1 - p) ln(1 - p + eps)))` of the mean `p` (`_unc-vox`).
    pub voxel_entropy: Tensor,
    /// Per structure: `|intersection of its N instances| / |their union|` (`_unc-iou`).
    pub structure_iou: Tensor,
    /// Per structure: population std / mean of its N instance volumes (`_unc-cv`).
    pub structure_cv: Tensor,
    /// Per structure: mean voxel entropy over its voxels (`_unc-avgUnc`).
    pub structure_avg_unc: Tensor,
    /// The scored structures, class by class, each class in label order.
    pub structures: Vec<StructureUncertainty>,
}

/// The scores of one structure of the hard segmentation (the values painted into the structure maps).
#[derive(Clone, Debug, PartialEq)]
pub struct StructureUncertainty {
    /// Class index (0 for an `[X, Y, Z]` volume).
    pub class: usize,
    /// Component label in that class's hard segmentation (1-based, scan order).
    pub label: u32,
    /// Voxels of the structure in the hard segmentation.
    pub voxels: usize,
    /// Voxels of its instance in each sample (0 where the sample misses it).
    pub sample_volumes: Vec<usize>,
    pub iou: f64,
    pub cv: f64,
    pub avg_unc: f64,
}

impl UncertaintyMaps {
    /// Each map with ivadomed's file suffix, in the order ivadomed writes them.
    pub fn suffixes(&self) -> [(&'static str, &Tensor); 6] {
        [
            (HARD_SUFFIX, &self.hard),
            (SOFT_SUFFIX, &self.soft),
            (VOXEL_ENTROPY_SUFFIX, &self.voxel_entropy),
            (STRUCTURE_IOU_SUFFIX, &self.structure_iou),
            (STRUCTURE_CV_SUFFIX, &self.structure_cv),
            (STRUCTURE_AVG_UNC_SUFFIX, &self.structure_avg_unc),
        ]
    }
}

/// Uncertainty maps of N single-class predictions, each an `[X, Y, Z]` tensor of probabilities.
///
/// `threshold` (in `(0, 1]`) binarises each sample; `connectivity` defines the structures (ivadomed uses
/// 18-connectivity, `Connectivity::default()`). Fails on no samples, on samples of different shapes or of
/// another rank.
pub fn uncertainty_maps(
    samples: &[Tensor],
    threshold: f64,
    connectivity: Connectivity,
) -> Result<UncertaintyMaps> {
    let shape = check_samples(samples, 3, "[X, Y, Z]", threshold)?;
    let with_class_axis: Vec<Tensor> = samples.iter().map(|s| s.unsqueeze(0)).collect();
    let maps = class_maps(&with_class_axis, threshold, connectivity)?;
    Ok(maps.reshaped(&shape))
}

/// Uncertainty maps of N multi-class predictions, each a `[K, X, Y, Z]` tensor of per-class probabilities;
/// every class is treated as its own binary problem, as ivadomed does. Output maps are `[K, X, Y, Z]`.
pub fn multi_class_uncertainty_maps(
    samples: &[Tensor],
    threshold: f64,
    connectivity: Connectivity,
) -> Result<UncertaintyMaps> {
    check_samples(samples, 4, "[K, X, Y, Z]", threshold)?;
    class_maps(samples, threshold, connectivity)
}

fn check_samples(
    samples: &[Tensor],
    rank: usize,
    layout: &str,
    threshold: f64,
) -> Result<Vec<i64>> {
    ensure!(
        !samples.is_empty(),
        "uncertainty needs at least one prediction sample"
    );
    ensure!(
        threshold > 0.0 && threshold <= 1.0,
        "uncertainty threshold must be in (0, 1], got {threshold}"
    );
    let shape = samples[0].size();
    ensure!(
        shape.len() == rank,
        "uncertainty samples must be {layout} volumes, got shape {shape:?}"
    );
    for (index, sample) in samples.iter().enumerate() {
        let other = sample.size();
        if other != shape {
            bail!("uncertainty sample {index} has shape {other:?}, sample 0 has {shape:?}");
        }
    }
    Ok(shape)
}

/// All maps of N checked `[K, X, Y, Z]` samples, as `[K, X, Y, Z]`.
fn class_maps(
    samples: &[Tensor],
    threshold: f64,
    connectivity: Connectivity,
) -> Result<UncertaintyMaps> {
    let size = samples[0].size();
    let classes = size[0];
    let dims = [size[1] as usize, size[2] as usize, size[3] as usize];
    // The mean is accumulated sample by sample in f64 (no N-fold stack in memory, no f32 rounding of the
    // sum). Values outside [0, 1] (logits, say) would make the entropy's logs NaN: refuse them.
    let mut sum = Tensor::zeros(size.as_slice(), (Kind::Double, Device::Cpu));
    for (index, sample) in samples.iter().enumerate() {
        let sample = sample.to_device(Device::Cpu).to_kind(Kind::Double);
        let (low, high) = (
            sample.min().double_value(&[]),
            sample.max().double_value(&[]),
        );
        ensure!(
            (0.0..=1.0).contains(&low) && (0.0..=1.0).contains(&high),
            "uncertainty sample {index} is not a probability map: values span [{low}, {high}]"
        );
        sum += sample;
    }
    let soft = sum / samples.len() as f64;
    let voxel_entropy = binary_entropy(&soft);

    let mut hard = Vec::new();
    let mut iou = Vec::new();
    let mut cv = Vec::new();
    let mut avg_unc = Vec::new();
    let mut structures = Vec::new();
    for class in 0..classes {
        let masks = samples
            .iter()
            .map(|sample| Mask::from_tensor(&sample.get(class), threshold))
            .collect::<Result<Vec<_>>>()?;
        let entropy = Vec::<f64>::try_from(voxel_entropy.get(class).reshape([-1]))?;
        let scored = score_structures(&masks, &entropy, dims, connectivity);
        hard.extend(scored.union.iter().map(|&v| f32::from(u8::from(v))));
        iou.extend(scored.paint(|s| s.iou));
        cv.extend(scored.paint(|s| s.cv));
        avg_unc.extend(scored.paint(|s| s.avg_unc));
        structures.extend(scored.structures.into_iter().map(|mut s| {
            s.class = class as usize;
            s
        }));
    }
    let from_values = |values: &[f32]| Tensor::from_slice(values).reshape(size.as_slice());
    Ok(UncertaintyMaps {
        hard: from_values(&hard),
        soft: soft.to_kind(Kind::Float),
        voxel_entropy: voxel_entropy.to_kind(Kind::Float),
        structure_iou: from_values(&iou),
        structure_cv: from_values(&cv),
        structure_avg_unc: from_values(&avg_unc),
        structures,
    })
}

impl UncertaintyMaps {
    fn reshaped(self, shape: &[i64]) -> Self {
        Self {
            hard: self.hard.reshape(shape),
            soft: self.soft.reshape(shape),
            voxel_entropy: self.voxel_entropy.reshape(shape),
            structure_iou: self.structure_iou.reshape(shape),
            structure_cv: self.structure_cv.reshape(shape),
            structure_avg_unc: self.structure_avg_unc.reshape(shape),
            structures: self.structures,
        }
    }
}

/// ivadomed's voxel-wise entropy of the mean prediction `p`: natural log, epsilon inside the log, negative
/// values (at p = 0 or 1 the epsilon makes it about -1e-5) clipped to 0.
fn binary_entropy(p: &Tensor) -> Tensor {
    let q = p.ones_like() - p;
    let entropy = -(p * (p + ENTROPY_EPSILON).log() + &q * (&q + ENTROPY_EPSILON).log());
    entropy.clamp_min(0.0)
}

/// The structures of one class and their labels, ready to paint.
struct ScoredStructures {
    union: Vec<bool>,
    hard: Components,
    /// `scores[label - 1]` is `None` for a structure that is not scored (a single voxel).
    scores: Vec<Option<usize>>,
    structures: Vec<StructureUncertainty>,
}

impl ScoredStructures {
    fn paint(
        &self,
        value: impl Fn(&StructureUncertainty) -> f64,
    ) -> impl Iterator<Item = f32> + '_ {
        let per_label: Vec<f32> = self
            .scores
            .iter()
            .map(|index| index.map_or(0.0, |i| value(&self.structures[i]) as f32))
            .collect();
        self.hard.labels.iter().map(move |&label| match label {
            0 => 0.0,
            k => per_label[k as usize - 1],
        })
    }
}

fn score_structures(
    masks: &[Mask],
    entropy: &[f64],
    dims: [usize; 3],
    connectivity: Connectivity,
) -> ScoredStructures {
    let n = masks.len();
    let mut union = vec![false; entropy.len()];
    for mask in masks {
        for (u, &v) in union.iter_mut().zip(mask.voxels()) {
            *u |= v;
        }
    }
    // Labelling dominates (three passes over a 256x256x64 volume for two samples): each sample's labelling
    // runs on a second thread while the union's, or the previous sample's bookkeeping, runs on this one.
    // At most three labellings are in memory: the union's, this sample's and the next one's.
    let label_sample = |sample: usize| {
        masks
            .get(sample)
            .map(|mask: &Mask| mask.components(connectivity))
    };
    let (hard, mut next) = std::thread::scope(|scope| {
        let first = scope.spawn(|| label_sample(0));
        let hard = ivado_sdk::components::label(&union, dims, connectivity);
        (hard, joined(first))
    });
    let structure_count = hard.count();

    // Per voxel, how many samples' instances of its structure contain it: N -> in the intersection,
    // > 0 -> in the union.
    let mut instances_here = vec![0u32; entropy.len()];
    let mut sample_volumes = vec![vec![0usize; n]; structure_count];
    for sample in 0..n {
        let components = next
            .take()
            .expect("each sample is labelled before its turn");
        next = std::thread::scope(|scope| {
            let following = scope.spawn(|| label_sample(sample + 1));
            count_instances(
                &components,
                &hard,
                sample,
                &mut sample_volumes,
                &mut instances_here,
            );
            joined(following)
        });
    }

    let mut intersection = vec![0usize; structure_count];
    let mut instance_union = vec![0usize; structure_count];
    let mut entropy_sum = vec![0f64; structure_count];
    for (index, &label) in hard.labels.iter().enumerate() {
        if label == 0 {
            continue;
        }
        let k = label as usize - 1;
        let count = instances_here[index] as usize;
        intersection[k] += usize::from(count == n);
        instance_union[k] += usize::from(count > 0);
        entropy_sum[k] += entropy[index];
    }

    let mut scores = vec![None; structure_count];
    let mut structures = Vec::new();
    for k in 0..structure_count {
        let voxels = hard.sizes[k];
        if voxels == 1 {
            continue;
        }
        let volumes = &sample_volumes[k];
        let mean = volumes.iter().sum::<usize>() as f64 / n as f64;
        let variance = volumes
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        scores[k] = Some(structures.len());
        structures.push(StructureUncertainty {
            class: 0,
            label: k as u32 + 1,
            voxels,
            sample_volumes: volumes.clone(),
            // The union is never empty: every structure holds some sample's component.
            iou: intersection[k] as f64 / instance_union[k] as f64,
            cv: variance.sqrt() / mean,
            avg_unc: entropy_sum[k] / voxels as f64,
        });
    }
    ScoredStructures {
        union,
        hard,
        scores,
        structures,
    }
}

/// Adds one sample's components to the structure bookkeeping: each component lies inside one structure of
/// `hard` (the sample is inside the union), found from the component's first voxel; the largest component
/// per structure (first on ties) is the sample's instance of it.
fn count_instances(
    components: &Components,
    hard: &Components,
    sample: usize,
    sample_volumes: &mut [Vec<usize>],
    instances_here: &mut [u32],
) {
    let structure_count = hard.count();
    let mut host = vec![0u32; components.count()];
    for (index, &label) in components.labels.iter().enumerate() {
        if label != 0 && host[label as usize - 1] == 0 {
            host[label as usize - 1] = hard.labels[index];
        }
    }
    let mut best = vec![0u32; structure_count];
    for (component, &structure) in host.iter().enumerate() {
        let size = components.sizes[component];
        let slot = &mut sample_volumes[structure as usize - 1][sample];
        if size > *slot {
            *slot = size;
            best[structure as usize - 1] = component as u32 + 1;
        }
    }
    for (index, &label) in components.labels.iter().enumerate() {
        if label != 0 && best[hard.labels[index] as usize - 1] == label {
            instances_here[index] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entropy of a mean prediction of 0.5 by ivadomed's formula:
    /// -[0.5 ln(0.50001) + 0.5 ln(0.50001)] = -ln(0.50001) = ln 2 - ln(1.00002)
    /// = 0.69314718 - 0.00002000 = 0.69312718 (python: -math.log(0.50001) = 0.6931271807599427).
    const ENTROPY_HALF: f64 = 0.693_127_180_759_942_7;
    /// Entropy of a mean of 0.25: -(0.25 ln(0.25001) + 0.75 ln(0.75001)) = 0.5623151448854691 (python).
    const ENTROPY_QUARTER: f64 = 0.562_315_144_885_469_1;

    const DIMS: [usize; 3] = [4, 4, 8];

    /// An `[X, Y, Z]` f32 volume of `DIMS` that is `value` at the listed voxels and 0 elsewhere.
    fn volume(voxels: &[[usize; 3]], value: f32) -> Tensor {
        let mut values = vec![0f32; DIMS.iter().product()];
        for &[x, y, z] in voxels {
            values[(x * DIMS[1] + y) * DIMS[2] + z] = value;
        }
        Tensor::from_slice(&values).reshape([DIMS[0] as i64, DIMS[1] as i64, DIMS[2] as i64])
    }

    /// The 2x2x2 cube with its lowest corner at `(x, 0, 0)`.
    fn cube(x: usize) -> Vec<[usize; 3]> {
        let mut voxels = Vec::new();
        for dx in 0..2 {
            for y in 0..2 {
                for z in 0..2 {
                    voxels.push([x + dx, y, z]);
                }
            }
        }
        voxels
    }

    /// Voxels `(x, y, z)` for `z` in `zs`.
    fn line(x: usize, y: usize, zs: std::ops::Range<usize>) -> Vec<[usize; 3]> {
        zs.map(|z| [x, y, z]).collect()
    }

    fn at(map: &Tensor, [x, y, z]: [usize; 3]) -> f64 {
        map.double_value(&[x as i64, y as i64, z as i64])
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-6
    }

    fn maps(samples: &[Tensor]) -> UncertaintyMaps {
        uncertainty_maps(samples, 0.5, Connectivity::default()).unwrap()
    }

    #[test]
    fn uncertainty_of_identical_samples_is_zero() {
        // Three identical binary samples: a cube (8 voxels) and a line of 3 voxels, far apart.
        let voxels = [cube(0), line(3, 3, 4..7)].concat();
        let samples: Vec<Tensor> = (0..3).map(|_| volume(&voxels, 1.0)).collect();
        let maps = maps(&samples);
        // The mean is the sample itself; every mean is 0 or 1, where the formula gives -ln(1 + 1e-5) < 0,
        // clipped to 0.
        assert!(maps.soft.equal(&samples[0]));
        assert!(maps.hard.equal(&samples[0]));
        assert_eq!(maps.voxel_entropy.abs().max().double_value(&[]), 0.0);
        // Both structures: all instances equal, so IoU = 8/8 = 3/3 = 1, volumes {8,8,8} and {3,3,3}: CV 0.
        assert_eq!(maps.structures.len(), 2);
        for structure in &maps.structures {
            assert_eq!(structure.iou, 1.0);
            assert_eq!(structure.cv, 0.0);
            assert_eq!(structure.avg_unc, 0.0);
        }
        assert_eq!(maps.structures[0].sample_volumes, vec![8, 8, 8]);
        assert_eq!(maps.structures[1].sample_volumes, vec![3, 3, 3]);
        // Painted: IoU 1 on both structures (11 voxels), 0 elsewhere; CV and avgUnc 0 everywhere.
        assert_eq!(at(&maps.structure_iou, [1, 1, 1]), 1.0);
        assert_eq!(at(&maps.structure_iou, [3, 3, 5]), 1.0);
        assert_eq!(at(&maps.structure_iou, [2, 2, 2]), 0.0);
        assert_eq!(maps.structure_iou.sum(Kind::Double).double_value(&[]), 11.0);
        assert_eq!(maps.structure_cv.abs().max().double_value(&[]), 0.0);
        assert_eq!(maps.structure_avg_unc.abs().max().double_value(&[]), 0.0);
        assert_eq!(maps.soft.size(), vec![4, 4, 8]);
        assert_eq!(maps.structure_iou.kind(), Kind::Float);
    }

    #[test]
    fn uncertainty_of_two_disjoint_samples() {
        // Sample 0 has a cube at x 0..2, sample 1 a cube at x 2..4 shifted to z 4..6: no shared voxel and
        // no touching (z gap of 2), so the union has two 8-voxel structures.
        let first = cube(0);
        let second: Vec<[usize; 3]> = cube(2).into_iter().map(|[x, y, z]| [x, y, z + 4]).collect();
        let maps = maps(&[volume(&first, 1.0), volume(&second, 1.0)]);
        assert_eq!(maps.structures.len(), 2);
        for structure in &maps.structures {
            // Each structure is in one sample only: intersection 0, union 8 -> IoU 0.
            assert_eq!(structure.iou, 0.0);
            // Volumes {8, 0}: mean 4, population std 4 -> CV 1.
            assert_eq!(structure.cv, 1.0);
            // Mean prediction 0.5 on each of its voxels.
            assert!(close(structure.avg_unc, ENTROPY_HALF), "{structure:?}");
        }
        assert_eq!(maps.structures[0].sample_volumes, vec![8, 0]);
        assert_eq!(maps.structures[1].sample_volumes, vec![0, 8]);
        for voxel in [first[3], second[5]] {
            assert!(close(at(&maps.soft, voxel), 0.5));
            assert!(close(at(&maps.voxel_entropy, voxel), ENTROPY_HALF));
            assert_eq!(at(&maps.structure_iou, voxel), 0.0);
            assert!(close(at(&maps.structure_cv, voxel), 1.0));
            assert!(close(at(&maps.structure_avg_unc, voxel), ENTROPY_HALF));
            assert_eq!(at(&maps.hard, voxel), 1.0);
        }
        // Background: mean 0, entropy clipped to 0, nothing painted.
        assert_eq!(at(&maps.voxel_entropy, [3, 3, 2]), 0.0);
        assert_eq!(at(&maps.structure_cv, [3, 3, 2]), 0.0);
        // 16 voxels at CV 1.
        assert!(close(
            maps.structure_cv.sum(Kind::Double).double_value(&[]),
            16.0
        ));
    }

    #[test]
    fn structure_missing_in_half_the_samples() {
        // Four samples. Structure A (a cube) is in all four. Structure B (a line along z) is 4 voxels in
        // sample 0, its first 2 voxels in sample 1, and missing from samples 2 and 3.
        let a = cube(0);
        let b_long = line(3, 3, 2..6);
        let b_short = line(3, 3, 2..4);
        let samples = [
            volume(&[a.clone(), b_long.clone()].concat(), 1.0),
            volume(&[a.clone(), b_short].concat(), 1.0),
            volume(&a, 1.0),
            volume(&a, 1.0),
        ];
        let maps = maps(&samples);
        assert_eq!(maps.structures.len(), 2);
        let (sa, sb) = (&maps.structures[0], &maps.structures[1]);
        // A: identical in all samples.
        assert_eq!((sa.voxels, sa.iou, sa.cv, sa.avg_unc), (8, 1.0, 0.0, 0.0));
        // B: the intersection of all four instances is empty -> IoU 0.
        assert_eq!(sb.voxels, 4);
        assert_eq!(sb.sample_volumes, vec![4, 2, 0, 0]);
        assert_eq!(sb.iou, 0.0);
        // Volumes {4, 2, 0, 0}: mean 1.5, population variance (2.5² + 0.5² + 1.5² + 1.5²) / 4 = 11/4,
        // CV = sqrt(2.75) / 1.5 = 1.1055416 (the sample std, ddof 1, would give 1.2766).
        assert!(close(sb.cv, 2.75f64.sqrt() / 1.5), "{}", sb.cv);
        assert!(close(sb.cv, 1.105_541_6));
        // B's first two voxels have mean 2/4 = 0.5, the last two 1/4 = 0.25:
        // avgUnc = (2 * 0.69312718 + 2 * 0.56231514) / 4 = 0.62772116.
        assert!(close(at(&maps.voxel_entropy, [3, 3, 2]), ENTROPY_HALF));
        assert!(close(at(&maps.voxel_entropy, [3, 3, 5]), ENTROPY_QUARTER));
        assert!(close(sb.avg_unc, 0.627_721_16), "{}", sb.avg_unc);
        assert!(close(at(&maps.structure_avg_unc, [3, 3, 5]), 0.627_721_16));
        assert_eq!(at(&maps.structure_avg_unc, [1, 1, 1]), 0.0);
        assert_eq!(at(&maps.structure_iou, [1, 1, 1]), 1.0);
        assert_eq!(at(&maps.structure_iou, [3, 3, 5]), 0.0);
    }

    #[test]
    fn partial_overlap_gives_fractional_iou() {
        // Two 4-voxel lines shifted by one: z 0..4 and z 1..5. Intersection {1, 2, 3} = 3, union 5 ->
        // IoU 0.6; volumes {4, 4} -> CV 0; mean 0.5 at z = 0 and z = 4, 1 elsewhere ->
        // avgUnc = 2 * 0.69312718 / 5 = 0.27725087.
        let maps = maps(&[
            volume(&line(1, 1, 0..4), 1.0),
            volume(&line(1, 1, 1..5), 1.0),
        ]);
        assert_eq!(maps.structures.len(), 1);
        let s = &maps.structures[0];
        assert_eq!(s.voxels, 5);
        assert!(close(s.iou, 0.6));
        assert_eq!(s.cv, 0.0);
        assert!(close(s.avg_unc, 2.0 * ENTROPY_HALF / 5.0));
        assert!(close(s.avg_unc, 0.277_250_87));
        assert!(close(at(&maps.structure_iou, [1, 1, 4]), 0.6));
    }

    #[test]
    fn instance_is_the_largest_overlapping_component() {
        // Sample 0: z {0, 1, 2} and the lone voxel z {4}; sample 1 bridges them: z 0..5. The union is one
        // 5-voxel structure holding two components of sample 0; its instance there is the 3-voxel one.
        // IoU = |{0,1,2}| / |{0..4}| = 3/5; volumes {3, 5}: mean 4, std 1 -> CV 0.25. (ivadomed's earlier
        // highest-label pick would take the lone voxel: IoU 1/5, CV 2/3.)
        let maps = maps(&[
            volume(&[line(0, 0, 0..3), line(0, 0, 4..5)].concat(), 1.0),
            volume(&line(0, 0, 0..5), 1.0),
        ]);
        assert_eq!(maps.structures.len(), 1);
        let s = &maps.structures[0];
        assert_eq!(s.sample_volumes, vec![3, 5]);
        assert!(close(s.iou, 0.6));
        assert!(close(s.cv, 0.25));
        // Only z = 3 is missing from a sample (mean 0.5), the other 4 voxels have mean 1:
        // avgUnc = 0.69312718 / 5 = 0.13862544.
        assert!(close(s.avg_unc, 0.138_625_44));
    }

    #[test]
    fn soft_samples_are_binarised_at_the_threshold() {
        // The same cube at 0.7 in sample 0 and 0.3 in sample 1, 0.2 elsewhere in both. The mean is 0.5 on
        // the cube and 0.2 outside; at threshold 0.5 only sample 0 has the cube, and the 0.2 floor is
        // background (ivadomed would label it as foreground, one structure filling the volume).
        let floored = |cube_value: f32| volume(&cube(0), cube_value - 0.2) + 0.2;
        let samples = [floored(0.7), floored(0.3)];
        let maps = maps(&samples);
        assert!(close(at(&maps.soft, [0, 0, 0]), 0.5));
        assert!(close(at(&maps.soft, [3, 3, 7]), 0.2));
        // Entropy of 0.2: -(0.2 ln(0.20001) + 0.8 ln(0.80001)) = 0.50038242 (python), not clipped.
        assert!(close(at(&maps.voxel_entropy, [3, 3, 7]), 0.500_382_42));
        assert_eq!(maps.hard.sum(Kind::Double).double_value(&[]), 8.0);
        assert_eq!(maps.structures.len(), 1);
        let s = &maps.structures[0];
        assert_eq!(s.sample_volumes, vec![8, 0]);
        assert_eq!((s.iou, s.cv), (0.0, 1.0));
        assert!(close(s.avg_unc, ENTROPY_HALF));
        // Threshold 0.25 lets sample 1's cube (0.3) in but still not the 0.2 floor: volumes {8, 8},
        // IoU 1, CV 0.
        let lower = uncertainty_maps(&samples, 0.25, Connectivity::default()).unwrap();
        assert_eq!(lower.hard.sum(Kind::Double).double_value(&[]), 8.0);
        assert_eq!(lower.structures.len(), 1);
        assert_eq!(lower.structures[0].sample_volumes, vec![8, 8]);
        assert_eq!(
            (lower.structures[0].iou, lower.structures[0].cv),
            (1.0, 0.0)
        );
    }

    #[test]
    fn connectivity_defines_structures_and_single_voxels_are_not_scored() {
        // Two voxels touching by a corner, identical in both samples. 26-connectivity: one 2-voxel
        // structure, scored (IoU 1). 18-connectivity (ivadomed's): two single voxels, not scored, so
        // every structure map stays 0 there although the hard segmentation has them.
        let voxels = [[1, 1, 1], [2, 2, 2]];
        let samples = [volume(&voxels, 1.0), volume(&voxels, 1.0)];
        let corner = uncertainty_maps(&samples, 0.5, Connectivity::TwentySix).unwrap();
        assert_eq!(corner.structures.len(), 1);
        assert_eq!(at(&corner.structure_iou, [2, 2, 2]), 1.0);
        let apart = uncertainty_maps(&samples, 0.5, Connectivity::Eighteen).unwrap();
        assert!(apart.structures.is_empty());
        assert_eq!(at(&apart.hard, [2, 2, 2]), 1.0);
        assert_eq!(at(&apart.structure_iou, [2, 2, 2]), 0.0);
    }

    #[test]
    fn one_sample_is_certain() {
        // ivadomed fails on N = 1; here the single instance is its own intersection and union.
        let maps = maps(&[volume(&cube(0), 1.0)]);
        let s = &maps.structures[0];
        assert_eq!((s.iou, s.cv, s.avg_unc), (1.0, 0.0, 0.0));
    }

    #[test]
    fn multi_class_maps_treat_each_class_apart() {
        // Two [2, X, Y, Z] samples: class 0 holds the same cube in both (IoU 1, CV 0), class 1 holds
        // disjoint cubes (two structures with IoU 0, CV 1, avgUnc 0.69312718).
        let shifted: Vec<[usize; 3]> = cube(2).into_iter().map(|[x, y, z]| [x, y, z + 4]).collect();
        let class0 = volume(&cube(0), 1.0);
        let first = Tensor::stack(&[&class0, &volume(&cube(0), 1.0)], 0);
        let second = Tensor::stack(&[&class0, &volume(&shifted, 1.0)], 0);
        let maps =
            multi_class_uncertainty_maps(&[first, second], 0.5, Connectivity::default()).unwrap();
        assert_eq!(maps.structure_iou.size(), vec![2, 4, 4, 8]);
        let classes: Vec<usize> = maps.structures.iter().map(|s| s.class).collect();
        assert_eq!(classes, vec![0, 1, 1]);
        assert_eq!((maps.structures[0].iou, maps.structures[0].cv), (1.0, 0.0));
        for s in &maps.structures[1..] {
            assert_eq!((s.iou, s.cv), (0.0, 1.0));
            assert!(close(s.avg_unc, ENTROPY_HALF));
        }
        // Class 0 at (0,0,0): IoU 1, entropy 0; class 1 at the same voxel: IoU 0, CV 1, entropy of 0.5.
        assert_eq!(maps.structure_iou.double_value(&[0, 0, 0, 0]), 1.0);
        assert_eq!(maps.voxel_entropy.double_value(&[0, 0, 0, 0]), 0.0);
        assert_eq!(maps.structure_iou.double_value(&[1, 0, 0, 0]), 0.0);
        assert!(close(maps.structure_cv.double_value(&[1, 0, 0, 0]), 1.0));
        assert!(close(
            maps.voxel_entropy.double_value(&[1, 0, 0, 0]),
            ENTROPY_HALF
        ));
    }

    #[test]
    fn mismatched_or_malformed_samples_are_rejected() {
        let good = volume(&cube(0), 1.0);
        let other_shape = Tensor::zeros([4, 4, 7], (Kind::Float, Device::Cpu));
        let error = uncertainty_maps(&[good.shallow_clone(), other_shape], 0.5, Connectivity::Six)
            .unwrap_err()
            .to_string();
        assert!(error.contains("sample 1 has shape [4, 4, 7]"), "{error}");
        assert!(uncertainty_maps(&[], 0.5, Connectivity::Six).is_err());
        // A 4D sample for the single-class call, a 3D one for the multi-class call.
        let four_d = good.unsqueeze(0);
        assert!(uncertainty_maps(&[four_d.shallow_clone()], 0.5, Connectivity::Six).is_err());
        assert!(
            multi_class_uncertainty_maps(&[good.shallow_clone()], 0.5, Connectivity::Six).is_err()
        );
        let wider = Tensor::zeros([2, 4, 4, 8], (Kind::Float, Device::Cpu));
        assert!(multi_class_uncertainty_maps(&[four_d, wider], 0.5, Connectivity::Six).is_err());
        // Logits instead of probabilities.
        let logits = volume(&cube(0), 3.0) - 1.0;
        let error = uncertainty_maps(&[good.shallow_clone(), logits], 0.5, Connectivity::Six)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sample 1 is not a probability map"),
            "{error}"
        );
        for threshold in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(
                uncertainty_maps(&[good.shallow_clone()], threshold, Connectivity::Six).is_err()
            );
        }
    }

    #[test]
    fn suffixes_are_ivadomeds() {
        let maps = maps(&[volume(&cube(0), 1.0), volume(&cube(0), 0.0)]);
        let names: Vec<&str> = maps.suffixes().iter().map(|(suffix, _)| *suffix).collect();
        assert_eq!(
            names,
            [
                "_pred",
                "_soft",
                "_unc-vox",
                "_unc-iou",
                "_unc-cv",
                "_unc-avgUnc"
            ]
        );
        // Each suffix names its own map: `_soft` is 0.5 on the cube, `_unc-cv` is 1 there.
        let [_, (_, soft), _, _, (_, cv), _] = maps.suffixes();
        assert!(close(at(soft, [0, 0, 0]), 0.5));
        assert!(close(at(cv, [0, 0, 0]), 1.0));
    }
}
