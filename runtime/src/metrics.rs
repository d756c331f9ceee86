//! Segmentation metrics and the training loss.
//!
//! The training side is [`dice_loss`] and the soft/hard [`Overlap`] counts. The evaluation side works on
//! binary [`Mask`]s (`[X, Y, Z]`, C-ordered, with a voxel spacing in mm) and mirrors ivadomed's
//! `metrics.py` and `evaluation.py` (`Evaluation3DMetrics`): voxel scores, volumes, lesion-wise detection,
//! plus geometric surface distances that ivadomed does not have. [`image_metrics`] produces one row per
//! image with ivadomed's `evaluation_3Dmetrics.csv` column names.
//!
//! NaN means "undefined for this image" (a 0/0), so that averaging rows with a NaN-skipping mean, as
//! ivadomed's `MetricManager` does with `np.nanmean`, ignores images where a score has no meaning. Each
//! function documents when it returns NaN.
use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

use ivado_sdk::components::{Components, Connectivity};

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

/// A binary volume of shape `[X, Y, Z]`, stored flat in C order: voxel `(x, y, z)` is at
/// `(x * Y + y) * Z + z`, the layout of a contiguous `[X, Y, Z]` tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    dims: [usize; 3],
    voxels: Vec<bool>,
}

impl Mask {
    pub fn new(dims: [usize; 3], voxels: Vec<bool>) -> Result<Self> {
        let expected: usize = dims.iter().product();
        ensure!(
            voxels.len() == expected,
            "mask of dims {dims:?} needs {expected} voxels, got {}",
            voxels.len()
        );
        Ok(Self { dims, voxels })
    }

    pub fn empty(dims: [usize; 3]) -> Self {
        Self {
            dims,
            voxels: vec![false; dims.iter().product()],
        }
    }

    /// Binarises an `[X, Y, Z]` tensor: a voxel is foreground when its value is `>= threshold`, as
    /// ivadomed's `threshold_predictions` does.
    pub fn from_tensor(volume: &Tensor, threshold: f64) -> Result<Self> {
        let size = volume.size();
        ensure!(
            size.len() == 3,
            "expected an [X, Y, Z] volume, got shape {size:?}"
        );
        let dims = [size[0] as usize, size[1] as usize, size[2] as usize];
        let flat = volume
            .to_device(Device::Cpu)
            .ge(threshold)
            .to_kind(Kind::Uint8)
            .reshape([-1]);
        let values = Vec::<u8>::try_from(&flat)?;
        Self::new(dims, values.into_iter().map(|v| v != 0).collect())
    }

    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    pub fn voxels(&self) -> &[bool] {
        &self.voxels
    }

    /// Number of foreground voxels.
    pub fn count(&self) -> usize {
        self.voxels.iter().filter(|&&v| v).count()
    }

    pub fn components(&self, connectivity: Connectivity) -> Components {
        ivado_sdk::components::label(&self.voxels, self.dims, connectivity)
    }

    fn from_components(components: &Components) -> Self {
        Self {
            dims: components.dims,
            voxels: components.labels.iter().map(|&l| l != 0).collect(),
        }
    }
}

/// One mask per class: an `[X, Y, Z]` tensor gives one, a `[C, X, Y, Z]` stack gives C.
pub fn class_masks(volume: &Tensor, threshold: f64) -> Result<Vec<Mask>> {
    match volume.dim() {
        3 => Ok(vec![Mask::from_tensor(volume, threshold)?]),
        4 => (0..volume.size()[0])
            .map(|class| Mask::from_tensor(&volume.get(class), threshold))
            .collect(),
        _ => bail!(
            "expected an [X, Y, Z] volume or a [C, X, Y, Z] stack, got shape {:?}",
            volume.size()
        ),
    }
}

fn assert_same_dims(prediction: &Mask, ground_truth: &Mask) {
    assert_eq!(
        prediction.dims, ground_truth.dims,
        "prediction and ground truth dims differ"
    );
}

/// `numerator / denominator`, NaN when the denominator is 0.
fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        f64::NAN
    } else {
        numerator / denominator
    }
}

/// Voxel-wise confusion counts of a prediction against a ground truth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VoxelCounts {
    pub true_positive: u64,
    pub false_positive: u64,
    pub false_negative: u64,
    pub true_negative: u64,
}

impl VoxelCounts {
    /// Panics if the dims differ.
    pub fn of(prediction: &Mask, ground_truth: &Mask) -> Self {
        assert_same_dims(prediction, ground_truth);
        let mut counts = Self::default();
        for (&p, &t) in prediction.voxels.iter().zip(&ground_truth.voxels) {
            match (p, t) {
                (true, true) => counts.true_positive += 1,
                (true, false) => counts.false_positive += 1,
                (false, true) => counts.false_negative += 1,
                (false, false) => counts.true_negative += 1,
            }
        }
        counts
    }

    fn total(&self) -> f64 {
        (self.true_positive + self.false_positive + self.false_negative + self.true_negative) as f64
    }

    /// `2 TP / (2 TP + FP + FN)`; NaN when both masks are empty (ivadomed's evaluation calls
    /// `dice_score` with its default `empty_score=np.nan`).
    pub fn dice(&self) -> f64 {
        let tp = self.true_positive as f64;
        ratio(
            2.0 * tp,
            2.0 * tp + (self.false_positive + self.false_negative) as f64,
        )
    }

    /// `TP / (TP + FP)`; NaN when nothing is predicted (ivadomed's evaluation: `err_value=np.nan`).
    pub fn precision(&self) -> f64 {
        let tp = self.true_positive as f64;
        ratio(tp, tp + self.false_positive as f64)
    }

    /// `TP / (TP + FN)`; NaN when the ground truth is empty (ivadomed's evaluation: `err_value=np.nan`).
    pub fn recall(&self) -> f64 {
        let tp = self.true_positive as f64;
        ratio(tp, tp + self.false_negative as f64)
    }

    /// `TN / (TN + FP)`; NaN when the ground truth covers the whole volume.
    pub fn specificity(&self) -> f64 {
        let tn = self.true_negative as f64;
        ratio(tn, tn + self.false_positive as f64)
    }

    /// `TP / (TP + FP + FN)`; NaN when both masks are empty. ivadomed's `intersection_over_union`
    /// returns 0.0 there; we use NaN like Dice, of which IoU is a monotone function (IoU = D / (2 - D)).
    pub fn iou(&self) -> f64 {
        let tp = self.true_positive as f64;
        ratio(tp, tp + (self.false_positive + self.false_negative) as f64)
    }

    /// `(TP + TN) / N`; NaN only for a volume without voxels.
    pub fn accuracy(&self) -> f64 {
        ratio(
            (self.true_positive + self.true_negative) as f64,
            self.total(),
        )
    }

    /// Mean squared error of the binary masks, `(FP + FN) / N`; NaN for a volume without voxels.
    /// ivadomed's `mse` divides the summed squared error by `X * Y` only (its first two dimensions), which
    /// is not a mean for a 3D volume; we divide by the voxel count.
    pub fn mse(&self) -> f64 {
        ratio(
            (self.false_positive + self.false_negative) as f64,
            self.total(),
        )
    }
}

/// Hard Dice of two masks; NaN when both are empty. See [`VoxelCounts::dice`].
pub fn dice(prediction: &Mask, ground_truth: &Mask) -> f64 {
    VoxelCounts::of(prediction, ground_truth).dice()
}

/// Mean Dice over classes (one mask per class). A class empty in both masks scores 1.0, as in ivadomed's
/// `multi_class_dice_score` (`empty_score=1.0`); no class at all gives NaN. Panics if the class counts or
/// dims differ.
pub fn multi_class_dice(prediction: &[Mask], ground_truth: &[Mask]) -> f64 {
    assert_eq!(
        prediction.len(),
        ground_truth.len(),
        "prediction and ground truth class counts differ"
    );
    let total: f64 = prediction
        .iter()
        .zip(ground_truth)
        .map(|(p, t)| {
            let score = dice(p, t);
            if score.is_nan() {
                1.0
            } else {
                score
            }
        })
        .sum();
    ratio(total, prediction.len() as f64)
}

/// NaN when nothing is predicted. See [`VoxelCounts::precision`].
pub fn precision(prediction: &Mask, ground_truth: &Mask) -> f64 {
    VoxelCounts::of(prediction, ground_truth).precision()
}

/// NaN when the ground truth is empty. See [`VoxelCounts::recall`].
pub fn recall(prediction: &Mask, ground_truth: &Mask) -> f64 {
    VoxelCounts::of(prediction, ground_truth).recall()
}

/// NaN when the ground truth has no background. See [`VoxelCounts::specificity`].
pub fn specificity(prediction: &Mask, ground_truth: &Mask) -> f64 {
    VoxelCounts::of(prediction, ground_truth).specificity()
}

/// NaN when both masks are empty. See [`VoxelCounts::iou`].
pub fn iou(prediction: &Mask, ground_truth: &Mask) -> f64 {
    VoxelCounts::of(prediction, ground_truth).iou()
}

/// NaN only for a volume without voxels. See [`VoxelCounts::accuracy`].
pub fn accuracy(prediction: &Mask, ground_truth: &Mask) -> f64 {
    VoxelCounts::of(prediction, ground_truth).accuracy()
}

/// NaN only for a volume without voxels. See [`VoxelCounts::mse`].
pub fn mse(prediction: &Mask, ground_truth: &Mask) -> f64 {
    VoxelCounts::of(prediction, ground_truth).mse()
}

/// Volume of one voxel in mm3.
pub fn voxel_volume_mm3(spacing: [f64; 3]) -> f64 {
    spacing.iter().product()
}

/// Foreground volume in mm3: voxel count times voxel volume (0 for an empty mask).
pub fn volume_mm3(mask: &Mask, spacing: [f64; 3]) -> f64 {
    mask.count() as f64 * voxel_volume_mm3(spacing)
}

/// ivadomed's relative volume difference `(V_gt - V_pred) / V_gt`: 0 is best, negative means
/// over-segmentation, positive under-segmentation. NaN when the ground truth is empty (as ivadomed).
pub fn relative_volume_difference(
    prediction: &Mask,
    ground_truth: &Mask,
    spacing: [f64; 3],
) -> f64 {
    assert_same_dims(prediction, ground_truth);
    let gt = volume_mm3(ground_truth, spacing);
    ratio(gt - volume_mm3(prediction, spacing), gt)
}

/// `|relative volume difference|`; NaN when the ground truth is empty.
pub fn absolute_volume_difference(
    prediction: &Mask,
    ground_truth: &Mask,
    spacing: [f64; 3],
) -> f64 {
    relative_volume_difference(prediction, ground_truth, spacing).abs()
}

/// Symmetric surface distances between two masks, in mm.
///
/// The surface of a mask is its foreground voxels with at least one of their 6 face neighbours in the
/// background, the space outside the volume counting as background (medpy's and MONAI's convention).
/// Each surface voxel gets its Euclidean distance, with the voxel spacing, to the nearest surface voxel
/// of the other mask, from an exact Euclidean distance transform.
///
/// This is a real geometric distance. ivadomed's `hausdorff_score` instead feeds 2D slices to
/// `scipy.spatial.distance.directed_hausdorff`, which treats each array *row* as one point whose
/// coordinates are the row's 0/1 values, and averages the directed distances over slices: it measures
/// how different the rows' intensity patterns are, in no unit, not how far apart the two surfaces are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SurfaceDistances {
    /// Largest distance from a surface voxel of either mask to the other surface.
    pub hausdorff: f64,
    /// The larger of the two directed 95th percentiles (numpy's linear interpolation), MONAI's
    /// `compute_hausdorff_distance(percentile=95)`; robust to a few outlying voxels.
    pub hausdorff_95: f64,
    /// Mean over the surface voxels of both masks of the distance to the other surface
    /// (`(sum d(A->B) + sum d(B->A)) / (|dA| + |dB|)`, Heimann et al. 2009).
    pub average_symmetric: f64,
}

impl SurfaceDistances {
    /// All three distances NaN: one of the masks is empty, so there is no surface to measure from.
    pub const UNDEFINED: SurfaceDistances = SurfaceDistances {
        hausdorff: f64::NAN,
        hausdorff_95: f64::NAN,
        average_symmetric: f64::NAN,
    };
}

/// Hausdorff distance, HD95 and average symmetric surface distance in mm (see [`SurfaceDistances`]).
/// All NaN when either mask is empty (the distance to an empty set is undefined), including when both
/// are. Panics if the dims differ.
pub fn surface_distances(
    prediction: &Mask,
    ground_truth: &Mask,
    spacing: [f64; 3],
) -> SurfaceDistances {
    let Some((forward, backward)) = directed_surface_distances(prediction, ground_truth, spacing)
    else {
        return SurfaceDistances::UNDEFINED;
    };
    let max = |d: &[f64]| d.iter().copied().fold(0.0f64, f64::max);
    SurfaceDistances {
        hausdorff: max(&forward).max(max(&backward)),
        hausdorff_95: percentile(&forward, 95.0).max(percentile(&backward, 95.0)),
        average_symmetric: (forward.iter().sum::<f64>() + backward.iter().sum::<f64>())
            / (forward.len() + backward.len()) as f64,
    }
}

/// Hausdorff distance in mm; NaN when either mask is empty. See [`SurfaceDistances`].
pub fn hausdorff_distance(prediction: &Mask, ground_truth: &Mask, spacing: [f64; 3]) -> f64 {
    surface_distances(prediction, ground_truth, spacing).hausdorff
}

/// 95th-percentile Hausdorff distance in mm; NaN when either mask is empty. See [`SurfaceDistances`].
pub fn hausdorff_distance_95(prediction: &Mask, ground_truth: &Mask, spacing: [f64; 3]) -> f64 {
    surface_distances(prediction, ground_truth, spacing).hausdorff_95
}

/// Average symmetric surface distance in mm; NaN when either mask is empty. See [`SurfaceDistances`].
pub fn average_surface_distance(prediction: &Mask, ground_truth: &Mask, spacing: [f64; 3]) -> f64 {
    surface_distances(prediction, ground_truth, spacing).average_symmetric
}

/// Flat indices of the surface voxels of `mask` (see [`SurfaceDistances`]), in increasing order.
pub fn surface_voxels(mask: &Mask) -> Vec<usize> {
    let [nx, ny, nz] = mask.dims;
    let inside = |x: usize, y: usize, z: usize| mask.voxels[(x * ny + y) * nz + z];
    let mut surface = Vec::new();
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                if !inside(x, y, z) {
                    continue;
                }
                let interior = x > 0
                    && x + 1 < nx
                    && y > 0
                    && y + 1 < ny
                    && z > 0
                    && z + 1 < nz
                    && inside(x - 1, y, z)
                    && inside(x + 1, y, z)
                    && inside(x, y - 1, z)
                    && inside(x, y + 1, z)
                    && inside(x, y, z - 1)
                    && inside(x, y, z + 1);
                if !interior {
                    surface.push((x * ny + y) * nz + z);
                }
            }
        }
    }
    surface
}

/// Distances (mm) from each surface voxel of `a` to the surface of `b`, and from `b`'s to `a`'s;
/// `None` when either surface is empty.
fn directed_surface_distances(
    a: &Mask,
    b: &Mask,
    spacing: [f64; 3],
) -> Option<(Vec<f64>, Vec<f64>)> {
    assert_same_dims(a, b);
    let surface_a = surface_voxels(a);
    let surface_b = surface_voxels(b);
    if surface_a.is_empty() || surface_b.is_empty() {
        return None;
    }
    // The distance transform only needs the bounding box of both surfaces: every query point and every
    // feature point lies in it, and the separable transform is exact on any box holding all features.
    let [_, ny, nz] = a.dims;
    let coordinates = |index: usize| [index / (ny * nz), (index / nz) % ny, index % nz];
    let mut low = [usize::MAX; 3];
    let mut high = [0usize; 3];
    for &index in surface_a.iter().chain(&surface_b) {
        let c = coordinates(index);
        for axis in 0..3 {
            low[axis] = low[axis].min(c[axis]);
            high[axis] = high[axis].max(c[axis]);
        }
    }
    let box_dims = [
        high[0] - low[0] + 1,
        high[1] - low[1] + 1,
        high[2] - low[2] + 1,
    ];
    let in_box = |index: usize| {
        let c = coordinates(index);
        ((c[0] - low[0]) * box_dims[1] + (c[1] - low[1])) * box_dims[2] + (c[2] - low[2])
    };
    let box_len: usize = box_dims.iter().product();
    let distances_to = |features: &[usize], queries: &[usize]| {
        let mut is_feature = vec![false; box_len];
        for &index in features {
            is_feature[in_box(index)] = true;
        }
        let squared = squared_distance_transform(&is_feature, box_dims, spacing);
        queries
            .iter()
            .map(|&index| squared[in_box(index)].sqrt())
            .collect::<Vec<f64>>()
    };
    Some((
        distances_to(&surface_b, &surface_a),
        distances_to(&surface_a, &surface_b),
    ))
}

/// numpy's default `percentile` (linear interpolation between closest ranks); NaN for no values.
fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = q / 100.0 * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    sorted[below] + (sorted[above] - sorted[below]) * (rank - below as f64)
}

/// Exact squared Euclidean distance (mm2) from every voxel to the nearest `features` voxel, with
/// anisotropic spacing; +inf everywhere when there is no feature. Separable Felzenszwalb-Huttenlocher:
/// one 1D lower-envelope-of-parabolas pass per axis, linear in the voxel count.
fn squared_distance_transform(features: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut values: Vec<f64> = features
        .iter()
        .map(|&f| if f { 0.0 } else { f64::INFINITY })
        .collect();
    let [nx, ny, nz] = dims;
    if values.is_empty() {
        return values;
    }
    let mut envelope = LowerEnvelope::new(dims.iter().copied().max().unwrap_or(0));
    let mut line = vec![0.0; envelope.capacity()];

    // Along z the lines are contiguous.
    for row in values.chunks_exact_mut(nz) {
        line[..nz].copy_from_slice(row);
        envelope.transform(&line[..nz], spacing[2], row);
    }
    // Along y, within one x slab (Y * Z values, small enough to stay in cache).
    for slab in values.chunks_exact_mut(ny * nz) {
        for z in 0..nz {
            for (y, value) in line[..ny].iter_mut().enumerate() {
                *value = slab[y * nz + z];
            }
            envelope.transform_strided(&line[..ny], spacing[1], slab, z, nz);
        }
    }
    // Along x: the lines cross every slab, so gather the X rows of Z values at one y into a block first
    // (contiguous copies) and transform the block's columns there, instead of striding over the volume.
    let mut block = vec![0.0; nx * nz];
    for y in 0..ny {
        for (x, row) in block.chunks_exact_mut(nz).enumerate() {
            let start = (x * ny + y) * nz;
            row.copy_from_slice(&values[start..start + nz]);
        }
        for z in 0..nz {
            for (x, value) in line[..nx].iter_mut().enumerate() {
                *value = block[x * nz + z];
            }
            envelope.transform_strided(&line[..nx], spacing[0], &mut block, z, nz);
        }
        for (x, row) in block.chunks_exact(nz).enumerate() {
            let start = (x * ny + y) * nz;
            values[start..start + nz].copy_from_slice(row);
        }
    }
    values
}

/// Scratch space of the 1D step of the distance transform.
struct LowerEnvelope {
    /// Positions of the parabolas of the lower envelope.
    sites: Vec<usize>,
    /// `bounds[k]`: where parabola `k` starts to be the lowest.
    bounds: Vec<f64>,
    out: Vec<f64>,
}

impl LowerEnvelope {
    fn new(capacity: usize) -> Self {
        Self {
            sites: Vec::with_capacity(capacity),
            bounds: Vec::with_capacity(capacity),
            out: vec![0.0; capacity],
        }
    }

    fn capacity(&self) -> usize {
        self.out.len()
    }

    /// `out[i] = min_q ((i - q) * spacing)^2 + f[q]`; `out` is left alone when no `f[q]` is finite,
    /// since it then already holds +inf everywhere (it is the same line as `f`).
    fn transform(&mut self, f: &[f64], spacing: f64, out: &mut [f64]) {
        if self.build(f, spacing) {
            out.copy_from_slice(&self.out[..f.len()]);
        }
    }

    /// As [`Self::transform`], writing `out[first + i * stride]`.
    fn transform_strided(
        &mut self,
        f: &[f64],
        spacing: f64,
        out: &mut [f64],
        first: usize,
        stride: usize,
    ) {
        if self.build(f, spacing) {
            for (i, &value) in self.out[..f.len()].iter().enumerate() {
                out[first + i * stride] = value;
            }
        }
    }

    /// Fills `self.out` from the lower envelope of the parabolas over the finite `f[q]`; false when
    /// there is none.
    fn build(&mut self, f: &[f64], spacing: f64) -> bool {
        let Self { sites, bounds, out } = self;
        sites.clear();
        bounds.clear();
        let spacing2 = spacing * spacing;
        // Parabola q in index units: spacing2 * (i - q)^2 + f[q]; `key` is the part of its value that
        // does not depend on i once spacing2 * i^2 is factored out, which decides where two cross.
        let key = |q: usize| f[q] + spacing2 * (q * q) as f64;
        for q in (0..f.len()).filter(|&q| f[q].is_finite()) {
            let mut start = f64::NEG_INFINITY;
            while let (Some(&p), Some(&bound)) = (sites.last(), bounds.last()) {
                let crossing = (key(q) - key(p)) / (2.0 * spacing2 * (q - p) as f64);
                if crossing <= bound {
                    // Parabola p is nowhere the lowest any more.
                    sites.pop();
                    bounds.pop();
                } else {
                    start = crossing;
                    break;
                }
            }
            sites.push(q);
            bounds.push(start);
        }
        if sites.is_empty() {
            return false;
        }
        let mut k = 0;
        for (i, value) in out[..f.len()].iter_mut().enumerate() {
            while k + 1 < sites.len() && bounds[k + 1] < i as f64 {
                k += 1;
            }
            let offset = (i as f64 - sites[k] as f64) * spacing;
            *value = offset * offset + f[sites[k]];
        }
        true
    }
}

/// The unit of an object size or size threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeUnit {
    Voxels,
    Mm3,
}

impl SizeUnit {
    /// The unit's name in ivadomed's configuration and column suffixes.
    pub fn name(self) -> &'static str {
        match self {
            SizeUnit::Voxels => "vox",
            SizeUnit::Mm3 => "mm3",
        }
    }
}

/// A size in voxels or mm3.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ObjectSize {
    pub value: f64,
    pub unit: SizeUnit,
}

impl ObjectSize {
    /// In voxels; mm3 are divided by the voxel volume and rounded half to even, like ivadomed's `np.round`.
    pub fn voxels(self, spacing: [f64; 3]) -> f64 {
        match self.unit {
            SizeUnit::Voxels => self.value,
            SizeUnit::Mm3 => (self.value / voxel_volume_mm3(spacing)).round_ties_even(),
        }
    }
}

/// When a ground-truth lesion counts as detected (ivadomed's `overlap` evaluation parameter).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OverlapCriterion {
    /// At least this many overlapping voxels (ivadomed's default: 3 voxels).
    Voxels(f64),
    /// At least this many mm3 of overlap, converted to voxels with half-to-even rounding.
    Mm3(f64),
    /// At least this fraction of the ground-truth lesion's voxels, rounded half to even.
    Ratio(f64),
}

impl Default for OverlapCriterion {
    fn default() -> Self {
        OverlapCriterion::Voxels(3.0)
    }
}

impl OverlapCriterion {
    /// Overlapping voxels needed against a ground-truth lesion of `lesion_voxels` voxels. Never below one
    /// voxel: ivadomed would count a lesion as detected with no overlap at all when the threshold rounds
    /// to 0 (e.g. a small ratio), which is not a detection.
    fn voxels_needed(self, lesion_voxels: usize, spacing: [f64; 3]) -> f64 {
        let needed = match self {
            OverlapCriterion::Voxels(voxels) => voxels,
            OverlapCriterion::Mm3(mm3) => (mm3 / voxel_volume_mm3(spacing)).round_ties_even(),
            OverlapCriterion::Ratio(fraction) => {
                (lesion_voxels as f64 * fraction).round_ties_even()
            }
        };
        needed.max(1.0)
    }
}

/// Lesion size bins (ivadomed's `target_size`): the thresholds are the inclusive upper bounds of all bins
/// but the last, which is open-ended.
#[derive(Clone, Debug, PartialEq)]
pub struct SizeBins {
    pub thresholds: Vec<f64>,
    pub unit: SizeUnit,
}

/// One size bin in voxels, bounds inclusive, with its ivadomed column suffix (e.g. `_0-20vox`).
#[derive(Clone, Debug, PartialEq)]
pub struct SizeRange {
    pub low: f64,
    pub high: f64,
    pub suffix: String,
}

impl SizeRange {
    pub fn contains(&self, voxels: usize) -> bool {
        let voxels = voxels as f64;
        voxels >= self.low && voxels <= self.high
    }
}

impl SizeBins {
    /// The bins in voxels. The first starts at `smallest_voxels` (ivadomed's `size_min`: 0, or the
    /// small-object removal size), each next one right after the previous upper bound, the last is open.
    ///
    /// Suffixes print the voxel bounds the way ivadomed's `str()` does: `_0-20vox`, `_21-INFvox`, and
    /// for mm3 bins (whose bounds ivadomed also prints in voxels) `_0.0-3.0mm3`. For mm3, ivadomed starts
    /// the next bin at `round((threshold + 1 mm3) / voxel volume)`, which leaves gaps or overlaps between
    /// bins; we start it one voxel above the previous bound, so every size falls in exactly one bin.
    pub fn ranges(&self, smallest_voxels: f64, spacing: [f64; 3]) -> Vec<SizeRange> {
        let format = |value: f64| match (self.unit, value.is_infinite()) {
            (_, true) => "INF".to_string(),
            (SizeUnit::Voxels, false) => format!("{value}"),
            (SizeUnit::Mm3, false) => format!("{value:?}"),
        };
        let unit = self.unit;
        let mut ranges = Vec::with_capacity(self.thresholds.len() + 1);
        let mut low = match unit {
            SizeUnit::Voxels => smallest_voxels,
            SizeUnit::Mm3 => smallest_voxels.round_ties_even(),
        };
        let bounds = self
            .thresholds
            .iter()
            .map(|&value| ObjectSize { value, unit }.voxels(spacing))
            .chain(std::iter::once(f64::INFINITY));
        for high in bounds {
            ranges.push(SizeRange {
                low,
                high,
                suffix: format!("_{}-{}{}", format(low), format(high), unit.name()),
            });
            low = high + 1.0;
        }
        ranges
    }
}

/// Options of lesion-wise detection, ivadomed's `evaluation_parameters`.
#[derive(Clone, Debug, PartialEq)]
pub struct LesionOptions {
    /// How voxels join into lesions; ivadomed uses 18-connectivity.
    pub connectivity: Connectivity,
    /// When a ground-truth lesion counts as detected.
    pub overlap: OverlapCriterion,
    /// Per-size-bin detection rates (ivadomed's `target_size`); none by default.
    pub target_size: Option<SizeBins>,
    /// Lesions smaller than this are ignored in both masks (ivadomed's `removeSmall`); none by default.
    pub remove_small: Option<ObjectSize>,
}

impl Default for LesionOptions {
    fn default() -> Self {
        Self {
            connectivity: Connectivity::Eighteen,
            overlap: OverlapCriterion::default(),
            target_size: None,
            remove_small: None,
        }
    }
}

/// Lesion counts of one size bin. A ground-truth lesion falls in the bin of its own size, and so does a
/// predicted one.
#[derive(Clone, Debug, PartialEq)]
pub struct SizeBinDetection {
    pub range: SizeRange,
    pub ground_truth_lesions: usize,
    pub detected: usize,
    pub predicted_lesions: usize,
    pub false_positives: usize,
}

impl SizeBinDetection {
    /// Detected / ground-truth lesions of this bin; NaN when the bin has no ground-truth lesion.
    pub fn ltpr(&self) -> f64 {
        ratio(self.detected as f64, self.ground_truth_lesions as f64)
    }

    /// False positives / (detected + false positives) of this bin; NaN when both are 0.
    pub fn lfdr(&self) -> f64 {
        ratio(
            self.false_positives as f64,
            (self.detected + self.false_positives) as f64,
        )
    }
}

/// Lesion-wise detection counts of one image, as ivadomed's `Evaluation3DMetrics`.
#[derive(Clone, Debug, PartialEq)]
pub struct LesionDetection {
    /// Number of predicted lesions (ivadomed's `n_pred`).
    pub predicted_lesions: usize,
    /// Number of ground-truth lesions (ivadomed's `n_gt`).
    pub ground_truth_lesions: usize,
    /// Ground-truth lesions overlapped by the prediction enough to count (ivadomed's `ltp`).
    pub detected: usize,
    /// Ground-truth lesions not detected (ivadomed's `lfn`).
    pub missed: usize,
    /// Predicted lesions without enough ground-truth overlap (ivadomed's `lfp`).
    pub false_positives: usize,
    /// One entry per size bin when `target_size` is set.
    pub per_size: Vec<SizeBinDetection>,
}

impl LesionDetection {
    /// Lesion true positive rate, `detected / ground-truth lesions`; NaN when the ground truth has no
    /// lesion (ivadomed's `get_ltpr`).
    pub fn ltpr(&self) -> f64 {
        ratio(self.detected as f64, self.ground_truth_lesions as f64)
    }

    /// Lesion false detection rate, `false positives / (detected + false positives)`; NaN when both are
    /// 0, e.g. no predicted lesion (ivadomed's current `get_lfdr`; a prediction with an empty ground truth
    /// gives 1.0, every predicted lesion being false).
    pub fn lfdr(&self) -> f64 {
        ratio(
            self.false_positives as f64,
            (self.detected + self.false_positives) as f64,
        )
    }
}

/// Removes the connected objects smaller than `min_voxels` (ivadomed's `remove_small_objects`).
pub fn remove_small_objects(mask: &Mask, min_voxels: f64, connectivity: Connectivity) -> Mask {
    Mask::from_components(&mask.components(connectivity).retain_min_size(min_voxels))
}

/// The lesions of a prediction and a ground truth and the outcome of each, by ivadomed's
/// `Evaluation3DMetrics` rules (`_get_ltp_lfn`, `_get_lfp`); the one place those rules live, behind both
/// [`lesion_detection`] and the painted lesion maps of evaluation:
///
/// - lesions are the connected components of each mask (`options.connectivity`, 18 by default), those
///   smaller than `options.remove_small` dropped;
/// - a ground-truth lesion is detected when the whole prediction overlaps it by at least the
///   `options.overlap` threshold (3 voxels by default; with a ratio, a fraction of that lesion's size);
/// - a predicted lesion is a false positive when its overlap with the whole ground truth is below the
///   threshold of the ground-truth lesion it touches (the highest-numbered one when it touches several, as
///   ivadomed takes the max label); one touching no ground truth is always a false positive.
#[derive(Clone, Debug, PartialEq)]
pub struct LesionOverlap {
    /// The predicted lesions left after small-object removal.
    pub predicted: Components,
    /// The ground-truth lesions left after small-object removal.
    pub truth: Components,
    /// Lesions smaller than this many voxels were dropped from both masks (0: none).
    pub smallest_voxels: f64,
    /// `detected[k - 1]`: ground-truth lesion `k` is overlapped enough to count as detected.
    pub detected: Vec<bool>,
    /// `false_positive[k - 1]`: predicted lesion `k` lacks the ground-truth overlap to count.
    pub false_positive: Vec<bool>,
}

impl LesionOverlap {
    /// Labels both masks and decides every lesion's outcome. Panics if the dims differ.
    pub fn of(
        prediction: &Mask,
        ground_truth: &Mask,
        spacing: [f64; 3],
        options: &LesionOptions,
    ) -> Self {
        assert_same_dims(prediction, ground_truth);
        let smallest_voxels = options
            .remove_small
            .map_or(0.0, |size| size.voxels(spacing));
        let predicted = prediction
            .components(options.connectivity)
            .retain_min_size(smallest_voxels);
        let truth = ground_truth
            .components(options.connectivity)
            .retain_min_size(smallest_voxels);

        // Overlap of each ground-truth lesion with the prediction, of each predicted lesion with the ground
        // truth, and the highest ground-truth label each predicted lesion touches.
        let mut truth_overlap = vec![0usize; truth.count()];
        let mut predicted_overlap = vec![0usize; predicted.count()];
        let mut touched_truth = vec![0u32; predicted.count()];
        for (&p, &t) in predicted.labels.iter().zip(&truth.labels) {
            if p != 0 && t != 0 {
                truth_overlap[t as usize - 1] += 1;
                predicted_overlap[p as usize - 1] += 1;
                let touched = &mut touched_truth[p as usize - 1];
                *touched = (*touched).max(t);
            }
        }
        let detected = truth_overlap
            .iter()
            .zip(&truth.sizes)
            .map(|(&overlap, &size)| overlap as f64 >= options.overlap.voxels_needed(size, spacing))
            .collect();
        let false_positive = predicted_overlap
            .iter()
            .zip(&touched_truth)
            .map(|(&overlap, &touched)| {
                touched == 0
                    || (overlap as f64)
                        < options
                            .overlap
                            .voxels_needed(truth.size_of(touched), spacing)
            })
            .collect();
        Self {
            predicted,
            truth,
            smallest_voxels,
            detected,
            false_positive,
        }
    }

    /// Ground-truth lesions detected (ivadomed's `ltp`).
    pub fn detected_count(&self) -> usize {
        self.detected.iter().filter(|&&hit| hit).count()
    }

    /// Predicted lesions that are false positives (ivadomed's `lfp`).
    pub fn false_positive_count(&self) -> usize {
        self.false_positive.iter().filter(|&&fp| fp).count()
    }
}

/// Lesion-wise detection counts as ivadomed's `Evaluation3DMetrics`, by the rules of [`LesionOverlap`].
///
/// With `target_size`, ground-truth and predicted lesions are also counted per size bin, each by its own
/// size. ivadomed bins a predicted lesion by looking up predicted-lesion size labels at the voxels of the
/// ground-truth lesion it touches (or at all ground-truth background when it touches none), which mixes
/// up objects; we bin it by its own size. Panics if the dims differ.
pub fn lesion_detection(
    prediction: &Mask,
    ground_truth: &Mask,
    spacing: [f64; 3],
    options: &LesionOptions,
) -> LesionDetection {
    let overlap = LesionOverlap::of(prediction, ground_truth, spacing, options);
    let LesionOverlap {
        predicted,
        truth,
        detected,
        false_positive,
        ..
    } = &overlap;

    let per_size = match &options.target_size {
        None => Vec::new(),
        Some(bins) => bins
            .ranges(overlap.smallest_voxels, spacing)
            .into_iter()
            .map(|range| {
                let truth_in_bin = || {
                    truth
                        .sizes
                        .iter()
                        .zip(detected)
                        .filter(|(&size, _)| range.contains(size))
                };
                let predicted_in_bin = || {
                    predicted
                        .sizes
                        .iter()
                        .zip(false_positive)
                        .filter(|(&size, _)| range.contains(size))
                };
                SizeBinDetection {
                    ground_truth_lesions: truth_in_bin().count(),
                    detected: truth_in_bin().filter(|(_, &hit)| hit).count(),
                    predicted_lesions: predicted_in_bin().count(),
                    false_positives: predicted_in_bin().filter(|(_, &fp)| fp).count(),
                    range,
                }
            })
            .collect(),
    };

    let detected_count = overlap.detected_count();
    LesionDetection {
        predicted_lesions: predicted.count(),
        ground_truth_lesions: truth.count(),
        detected: detected_count,
        missed: truth.count() - detected_count,
        false_positives: overlap.false_positive_count(),
        per_size,
    }
}

/// Options of [`image_metrics`].
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsOptions {
    /// A predicted voxel is foreground when `>=` this (the ground truth is binarised at 0.5).
    pub threshold: f64,
    /// Lesion detection settings; `remove_small` also removes the small objects from both masks before
    /// every other metric, as ivadomed's evaluation does.
    pub lesions: LesionOptions,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            lesions: LesionOptions::default(),
        }
    }
}

/// One evaluation row for an image, with ivadomed's `evaluation_3Dmetrics.csv` column names, per class
/// `n`: `vol_pred_class{n}`, `vol_gt_class{n}` (mm3), `rvd_class{n}`, `avd_class{n}`, `dice_class{n}`,
/// `recall_class{n}`, `precision_class{n}`, `specificity_class{n}`, `n_pred_class{n}`, `n_gt_class{n}`,
/// `ltpr_class{n}`, `lfdr_class{n}`, `mse_class{n}`; with size bins, `ltpr{suffix}_class{n}`,
/// `lfdr{suffix}_class{n}` and `n{suffix}_class{n}` for every bin (ivadomed writes the count as
/// `n{suffix}`, which classes overwrite, and writes a bin's columns only when it holds a lesion: we
/// always write them, NaN rates for an empty bin). Ours on top: `hausdorff_mm_class{n}`,
/// `hd95_mm_class{n}`, `asd_mm_class{n}`.
///
/// `prediction` and `ground_truth` are CPU or device tensors of the same shape, `[X, Y, Z]` (class 0) or
/// `[C, X, Y, Z]`, with values in [0, 1]; `spacing` is the voxel size in mm along X, Y, Z. The NaN
/// conventions are those of the individual functions.
pub fn image_metrics(
    prediction: &Tensor,
    ground_truth: &Tensor,
    spacing: [f64; 3],
    options: &MetricsOptions,
) -> Result<BTreeMap<String, f64>> {
    ensure!(
        prediction.size() == ground_truth.size(),
        "prediction shape {:?} differs from ground truth shape {:?}",
        prediction.size(),
        ground_truth.size()
    );
    let predictions = class_masks(prediction, options.threshold)?;
    let truths = class_masks(ground_truth, 0.5)?;
    let mut row = BTreeMap::new();
    for (class, (prediction, truth)) in predictions.iter().zip(&truths).enumerate() {
        class_metrics(
            prediction,
            truth,
            spacing,
            &options.lesions,
            class,
            &mut row,
        );
    }
    Ok(row)
}

fn class_metrics(
    prediction: &Mask,
    ground_truth: &Mask,
    spacing: [f64; 3],
    options: &LesionOptions,
    class: usize,
    row: &mut BTreeMap<String, f64>,
) {
    let (prediction, ground_truth) = match options.remove_small {
        None => (prediction.clone(), ground_truth.clone()),
        Some(size) => {
            let smallest = size.voxels(spacing);
            (
                remove_small_objects(prediction, smallest, options.connectivity),
                remove_small_objects(ground_truth, smallest, options.connectivity),
            )
        }
    };
    let counts = VoxelCounts::of(&prediction, &ground_truth);
    let surface = surface_distances(&prediction, &ground_truth, spacing);
    let lesions = lesion_detection(&prediction, &ground_truth, spacing, options);
    let mut put = |name: &str, value: f64| {
        row.insert(format!("{name}_class{class}"), value);
    };
    put("vol_pred", volume_mm3(&prediction, spacing));
    put("vol_gt", volume_mm3(&ground_truth, spacing));
    let rvd = relative_volume_difference(&prediction, &ground_truth, spacing);
    put("rvd", rvd);
    put("avd", rvd.abs());
    put("dice", counts.dice());
    put("recall", counts.recall());
    put("precision", counts.precision());
    put("specificity", counts.specificity());
    put("mse", counts.mse());
    put("n_pred", lesions.predicted_lesions as f64);
    put("n_gt", lesions.ground_truth_lesions as f64);
    put("ltpr", lesions.ltpr());
    put("lfdr", lesions.lfdr());
    put("hausdorff_mm", surface.hausdorff);
    put("hd95_mm", surface.hausdorff_95);
    put("asd_mm", surface.average_symmetric);
    for bin in &lesions.per_size {
        put(&format!("ltpr{}", bin.range.suffix), bin.ltpr());
        put(&format!("lfdr{}", bin.range.suffix), bin.lfdr());
        put(
            &format!("n{}", bin.range.suffix),
            bin.ground_truth_lesions as f64,
        );
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

    const ANISOTROPIC: [f64; 3] = [0.5, 1.0, 2.0];

    fn mask_with(dims: [usize; 3], voxels: impl IntoIterator<Item = [usize; 3]>) -> Mask {
        let mut mask = Mask::empty(dims);
        for [x, y, z] in voxels {
            mask.voxels[(x * dims[1] + y) * dims[2] + z] = true;
        }
        mask
    }

    fn cuboid(low: [usize; 3], high: [usize; 3]) -> impl Iterator<Item = [usize; 3]> {
        (low[0]..high[0]).flat_map(move |x| {
            (low[1]..high[1]).flat_map(move |y| (low[2]..high[2]).map(move |z| [x, y, z]))
        })
    }

    /// Voxels whose centre (index * spacing) lies within `radius` mm of `centre` (mm).
    fn sphere(dims: [usize; 3], spacing: [f64; 3], centre: [f64; 3], radius: f64) -> Mask {
        let voxels = cuboid([0; 3], dims).filter(|c| {
            (0..3)
                .map(|a| (c[a] as f64 * spacing[a] - centre[a]).powi(2))
                .sum::<f64>()
                <= radius * radius
        });
        mask_with(dims, voxels)
    }

    /// Independent reference: surface voxels found by probing the six neighbours with bounds checks, then
    /// every directed distance by brute force over all pairs.
    fn brute_force_directed(a: &Mask, b: &Mask, spacing: [f64; 3]) -> Vec<f64> {
        let surface = |m: &Mask| -> Vec<[i64; 3]> {
            let d = m.dims.map(|v| v as i64);
            let on = |c: [i64; 3]| {
                (0..3).all(|a| c[a] >= 0 && c[a] < d[a])
                    && m.voxels[((c[0] * d[1] + c[1]) * d[2] + c[2]) as usize]
            };
            let mut out = Vec::new();
            for c in cuboid([0; 3], m.dims) {
                let c = c.map(|v| v as i64);
                let steps = [
                    [1, 0, 0],
                    [-1, 0, 0],
                    [0, 1, 0],
                    [0, -1, 0],
                    [0, 0, 1],
                    [0, 0, -1],
                ];
                if on(c)
                    && steps
                        .iter()
                        .any(|s| !on([c[0] + s[0], c[1] + s[1], c[2] + s[2]]))
                {
                    out.push(c);
                }
            }
            out
        };
        let (from, to) = (surface(a), surface(b));
        from.iter()
            .map(|p| {
                to.iter()
                    .map(|q| {
                        (0..3)
                            .map(|k| ((p[k] - q[k]) as f64 * spacing[k]).powi(2))
                            .sum::<f64>()
                            .sqrt()
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .collect()
    }

    fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{what}: got {actual}, expected {expected} +- {tolerance}"
        );
    }

    #[test]
    fn voxel_scores_match_hand_counts() {
        // 8 voxels; truth = {0,1,2,3}, prediction = {2,3,4}: TP 2, FP 1, FN 2, TN 3.
        let dims = [2, 2, 2];
        let truth = Mask::new(dims, (0..8).map(|i| i < 4).collect()).unwrap();
        let prediction = Mask::new(dims, (0..8).map(|i| (2..5).contains(&i)).collect()).unwrap();
        let counts = VoxelCounts::of(&prediction, &truth);
        assert_eq!(
            counts,
            VoxelCounts {
                true_positive: 2,
                false_positive: 1,
                false_negative: 2,
                true_negative: 3
            }
        );
        assert_close(dice(&prediction, &truth), 4.0 / 7.0, 1e-12, "dice"); // 2*2 / (4 + 3)
        assert_close(
            precision(&prediction, &truth),
            2.0 / 3.0,
            1e-12,
            "precision",
        );
        assert_close(recall(&prediction, &truth), 0.5, 1e-12, "recall");
        assert_close(specificity(&prediction, &truth), 0.75, 1e-12, "specificity"); // 3 / (3 + 1)
        assert_close(iou(&prediction, &truth), 0.4, 1e-12, "iou"); // 2 / 5
        assert_close(accuracy(&prediction, &truth), 5.0 / 8.0, 1e-12, "accuracy");
        assert_close(mse(&prediction, &truth), 3.0 / 8.0, 1e-12, "mse"); // 3 wrong voxels of 8
                                                                         // Multi-class: class 0 as above, class 1 empty in both (counts 1.0) -> (4/7 + 1) / 2 = 11/14.
        let empty = Mask::empty(dims);
        let score = multi_class_dice(&[prediction, empty.clone()], &[truth, empty]);
        assert_close(score, 11.0 / 14.0, 1e-12, "multi-class dice");
    }

    #[test]
    fn nan_conventions_for_empty_masks() {
        let dims = [3, 3, 3];
        let empty = Mask::empty(dims);
        let one = mask_with(dims, [[1, 1, 1]]);
        let full = Mask::new(dims, vec![true; 27]).unwrap();
        // Both empty: Dice and IoU undefined; accuracy 1; specificity 1 (all background kept).
        assert!(dice(&empty, &empty).is_nan());
        assert!(iou(&empty, &empty).is_nan());
        assert_eq!(accuracy(&empty, &empty), 1.0);
        assert_eq!(specificity(&empty, &empty), 1.0);
        // One empty: Dice is a real 0.
        assert_eq!(dice(&one, &empty), 0.0);
        assert_eq!(dice(&empty, &one), 0.0);
        // Nothing predicted -> precision NaN; empty truth -> recall NaN; no background -> specificity NaN.
        assert!(precision(&empty, &one).is_nan());
        assert!(recall(&one, &empty).is_nan());
        assert!(specificity(&one, &full).is_nan());
        // A zero-voxel volume: accuracy and MSE NaN.
        let nothing = Mask::empty([0, 3, 3]);
        assert!(accuracy(&nothing, &nothing).is_nan());
        assert!(mse(&nothing, &nothing).is_nan());
        assert!(multi_class_dice(&[], &[]).is_nan());
        // Volumes: empty is 0 mm3; RVD and AVD undefined with an empty truth, -inf is never produced.
        assert_eq!(volume_mm3(&empty, ANISOTROPIC), 0.0);
        assert!(relative_volume_difference(&one, &empty, ANISOTROPIC).is_nan());
        assert!(absolute_volume_difference(&one, &empty, ANISOTROPIC).is_nan());
        assert_eq!(relative_volume_difference(&empty, &one, ANISOTROPIC), 1.0);
        // Surface distances: NaN as soon as one mask is empty, and for two empty masks.
        for (a, b) in [(&one, &empty), (&empty, &one), (&empty, &empty)] {
            let d = surface_distances(a, b, ANISOTROPIC);
            assert!(
                d.hausdorff.is_nan() && d.hausdorff_95.is_nan() && d.average_symmetric.is_nan()
            );
        }
        // Lesions: no truth lesion -> LTPR NaN; a prediction without truth -> LFDR 1 (all false);
        // nothing predicted -> LFDR NaN (and LTPR 0 when there is a truth lesion).
        let options = LesionOptions {
            overlap: OverlapCriterion::Voxels(1.0),
            ..LesionOptions::default()
        };
        let no_truth = lesion_detection(&one, &empty, ANISOTROPIC, &options);
        assert!(no_truth.ltpr().is_nan());
        assert_eq!(no_truth.lfdr(), 1.0);
        let no_prediction = lesion_detection(&empty, &one, ANISOTROPIC, &options);
        assert!(no_prediction.lfdr().is_nan());
        assert_eq!(no_prediction.ltpr(), 0.0);
        let neither = lesion_detection(&empty, &empty, ANISOTROPIC, &options);
        assert!(neither.ltpr().is_nan() && neither.lfdr().is_nan());
    }

    #[test]
    fn volumes_in_mm3_on_anisotropic_voxels() {
        // Voxel 0.5 x 1.5 x 2 = 1.5 mm3. Truth: 3x4x5 = 60 voxels = 90 mm3; prediction 3x4x6 = 72 voxels
        // = 108 mm3. RVD = (90 - 108) / 90 = -0.2 (over-segmentation), AVD = 0.2.
        let spacing = [0.5, 1.5, 2.0];
        let dims = [5, 6, 8];
        let truth = mask_with(dims, cuboid([1, 1, 1], [4, 5, 6]));
        let prediction = mask_with(dims, cuboid([1, 1, 1], [4, 5, 7]));
        assert_close(volume_mm3(&truth, spacing), 90.0, 1e-12, "truth volume");
        assert_close(
            volume_mm3(&prediction, spacing),
            108.0,
            1e-12,
            "prediction volume",
        );
        assert_close(
            relative_volume_difference(&prediction, &truth, spacing),
            -0.2,
            1e-12,
            "rvd",
        );
        assert_close(
            absolute_volume_difference(&prediction, &truth, spacing),
            0.2,
            1e-12,
            "avd",
        );
    }

    #[test]
    fn surface_distances_of_single_voxels_and_a_line() {
        // Two single voxels (2,0,1) and (0,3,0) at 0.5 x 1 x 2 mm: offsets 1, 3 and 2 mm -> sqrt(14).
        let dims = [4, 4, 2];
        let a = mask_with(dims, [[2, 0, 1]]);
        let b = mask_with(dims, [[0, 3, 0]]);
        let d = surface_distances(&a, &b, ANISOTROPIC);
        let expected = 14f64.sqrt();
        assert_close(d.hausdorff, expected, 1e-12, "hd");
        assert_close(d.hausdorff_95, expected, 1e-12, "hd95");
        assert_close(d.average_symmetric, expected, 1e-12, "asd");

        // A line z = 0..9 against the same line plus an outlier voxel at z = 20 (2 mm steps along z).
        // Every voxel of a 1-voxel-thick line is surface. A->B distances: ten 0. B->A: ten 0 and
        // (20 - 9) * 2 = 22 mm. HD = 22. Directed 95th percentiles: 0, and at rank 0.95 * 10 = 9.5 between
        // 0 and 22 -> 11. ASD = 22 / (10 + 11) surface voxels.
        let dims = [1, 1, 30];
        let line = mask_with(dims, (0..10).map(|z| [0, 0, z]));
        let with_outlier = mask_with(dims, (0..10).chain([20]).map(|z| [0, 0, z]));
        let d = surface_distances(&line, &with_outlier, ANISOTROPIC);
        assert_close(d.hausdorff, 22.0, 1e-12, "hd");
        assert_close(d.hausdorff_95, 11.0, 1e-12, "hd95");
        assert_close(d.average_symmetric, 22.0 / 21.0, 1e-12, "asd");
        // Symmetric in its arguments.
        assert_eq!(surface_distances(&with_outlier, &line, ANISOTROPIC), d);
    }

    #[test]
    fn hausdorff_of_concentric_spheres_on_an_anisotropic_grid() {
        // Spheres of radius 6 and 10 mm centred at (14, 14, 14) mm on a 0.5 x 1 x 2 mm grid (28 mm cube).
        // The continuous surfaces are 10 - 6 = 4 mm apart everywhere, so the discrete HD must be 4 mm
        // within one voxel diagonal, sqrt(0.5^2 + 1^2 + 2^2) ~= 2.29 mm.
        let dims = [56, 28, 14];
        let centre = [14.0, 14.0, 14.0];
        let inner = sphere(dims, ANISOTROPIC, centre, 6.0);
        let outer = sphere(dims, ANISOTROPIC, centre, 10.0);
        let diagonal = ANISOTROPIC.iter().map(|s| s * s).sum::<f64>().sqrt();
        let d = surface_distances(&inner, &outer, ANISOTROPIC);
        assert_close(d.hausdorff, 4.0, diagonal, "hd");
        assert!(d.hausdorff_95 <= d.hausdorff && d.average_symmetric <= d.hausdorff_95);
        assert_close(d.average_symmetric, 4.0, diagonal, "asd");

        // The distance transform must reproduce the brute-force distances exactly.
        let forward = brute_force_directed(&inner, &outer, ANISOTROPIC);
        let backward = brute_force_directed(&outer, &inner, ANISOTROPIC);
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        assert_close(
            d.hausdorff,
            max(&forward).max(max(&backward)),
            1e-9,
            "hd vs brute force",
        );
        let p95 = percentile(&forward, 95.0).max(percentile(&backward, 95.0));
        assert_close(d.hausdorff_95, p95, 1e-9, "hd95 vs brute force");
        let mean = (forward.iter().sum::<f64>() + backward.iter().sum::<f64>())
            / (forward.len() + backward.len()) as f64;
        assert_close(d.average_symmetric, mean, 1e-9, "asd vs brute force");

        // A sphere against itself is 0 everywhere.
        let same = surface_distances(&outer, &outer, ANISOTROPIC);
        assert_eq!(
            same,
            SurfaceDistances {
                hausdorff: 0.0,
                hausdorff_95: 0.0,
                average_symmetric: 0.0
            }
        );
    }

    #[test]
    fn distance_transform_matches_brute_force_on_scattered_features() {
        // Pseudo-random features (a fixed LCG), compared point by point with brute force, spacing 0.7 x
        // 1.3 x 2.1 so no parabola crossing lands on a round number.
        let dims = [9, 7, 5];
        let spacing = [0.7, 1.3, 2.1];
        let mut state = 12345u64;
        let features: Vec<bool> = (0..dims.iter().product::<usize>())
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                state >> 59 == 0 // about 1 voxel in 32
            })
            .collect();
        assert!(features.iter().filter(|&&f| f).count() >= 5);
        let coordinates: Vec<[usize; 3]> = cuboid([0; 3], dims).collect();
        let squared = squared_distance_transform(&features, dims, spacing);
        for (index, p) in coordinates.iter().enumerate() {
            let expected = coordinates
                .iter()
                .zip(&features)
                .filter(|(_, &f)| f)
                .map(|(q, _)| {
                    (0..3)
                        .map(|k| ((p[k] as f64 - q[k] as f64) * spacing[k]).powi(2))
                        .sum::<f64>()
                })
                .fold(f64::INFINITY, f64::min);
            assert_close(squared[index], expected, 1e-9, "squared distance");
        }
        // No feature at all: +inf everywhere.
        let none = squared_distance_transform(&[false; 8], [2, 2, 2], spacing);
        assert!(none.iter().all(|d| d.is_infinite()));
    }

    #[test]
    fn hausdorff_spans_a_full_256x256x64_volume_quickly() {
        // Single voxels at opposite corners: the distance transform covers all 4.2 M voxels. The distance
        // is the box diagonal, sqrt((255 * 0.5)^2 + (255 * 1)^2 + (63 * 2)^2).
        let dims = [256, 256, 64];
        let a = mask_with(dims, [[0, 0, 0]]);
        let b = mask_with(dims, [[255, 255, 63]]);
        let started = std::time::Instant::now();
        let d = hausdorff_distance(&a, &b, ANISOTROPIC);
        let elapsed = started.elapsed();
        let expected = (127.5f64.powi(2) + 255f64.powi(2) + 126f64.powi(2)).sqrt();
        assert_close(d, expected, 1e-9, "corner to corner");
        eprintln!("hausdorff over 256x256x64: {elapsed:?}");
    }

    /// The hand-built lesion layout (spacing 1 x 1 x 2 mm, voxel volume 2 mm3), by 18-connectivity:
    ///
    /// | truth lesion | voxels | prediction on it                    | detected (3 vox) |
    /// |--------------|--------|-------------------------------------|------------------|
    /// | G1 cube      | 27     | P1 = the same cube                  | yes              |
    /// | G2 cube      | 27     | P2 = 2 voxels inside                | no (2 < 3)       |
    /// | G3 cube      | 8      | nothing                             | no               |
    /// | G4 cube      | 8      | P4 = the same cube                  | yes              |
    /// | G5 cube      | 8      | nothing; touches G4 at a corner only | no              |
    ///
    /// plus false positives away from the truth: P5 (2x2x2 cube) and P6a/P6b, single voxels touching at
    /// a corner only. With 26-connectivity G4+G5 become one 16-voxel lesion and P6a+P6b one 2-voxel one.
    fn lesion_layout() -> (Mask, Mask) {
        let dims = [24, 12, 12];
        let g4 = cuboid([16, 1, 1], [18, 3, 3]);
        let truth = mask_with(
            dims,
            cuboid([1, 1, 1], [4, 4, 4]) // G1
                .chain(cuboid([6, 1, 1], [9, 4, 4])) // G2
                .chain(cuboid([11, 1, 1], [13, 3, 3])) // G3
                .chain(g4) // G4
                .chain(cuboid([18, 3, 3], [20, 5, 5])), // G5: corner (17,2,2)-(18,3,3)
        );
        let prediction = mask_with(
            dims,
            cuboid([1, 1, 1], [4, 4, 4]) // P1
                .chain([[6, 1, 1], [6, 1, 2]]) // P2
                .chain(cuboid([16, 1, 1], [18, 3, 3])) // P4
                .chain(cuboid([1, 8, 8], [3, 10, 10])) // P5
                .chain([[10, 8, 8], [11, 9, 9]]), // P6a, P6b
        );
        (prediction, truth)
    }

    const LAYOUT_SPACING: [f64; 3] = [1.0, 1.0, 2.0];

    #[test]
    fn lesion_detection_on_a_hand_built_layout() {
        let (prediction, truth) = lesion_layout();
        // 18-connectivity, 3 voxels: 5 truth lesions, G1 and G4 detected -> LTPR 2/5. Predicted lesions
        // P1 P2 P4 P5 P6a P6b; false: P2 (2 < 3 overlap), P5, P6a, P6b -> LFDR 4 / (2 + 4).
        let eighteen = lesion_detection(
            &prediction,
            &truth,
            LAYOUT_SPACING,
            &LesionOptions::default(),
        );
        assert_eq!(
            (
                eighteen.ground_truth_lesions,
                eighteen.predicted_lesions,
                eighteen.detected,
                eighteen.missed,
                eighteen.false_positives
            ),
            (5, 6, 2, 3, 4)
        );
        assert_close(eighteen.ltpr(), 0.4, 1e-12, "ltpr 18");
        assert_close(eighteen.lfdr(), 4.0 / 6.0, 1e-12, "lfdr 18");

        // 26-connectivity: G4+G5 is one lesion (8 of 16 voxels predicted: detected), P6 one lesion.
        // 4 truth lesions, 2 detected -> 0.5; false P2, P5, P6 -> 3 / (2 + 3).
        let corner = LesionOptions {
            connectivity: Connectivity::TwentySix,
            ..LesionOptions::default()
        };
        let twenty_six = lesion_detection(&prediction, &truth, LAYOUT_SPACING, &corner);
        assert_eq!(
            (
                twenty_six.ground_truth_lesions,
                twenty_six.predicted_lesions,
                twenty_six.detected,
                twenty_six.false_positives
            ),
            (4, 5, 2, 3)
        );
        assert_close(twenty_six.ltpr(), 0.5, 1e-12, "ltpr 26");
        assert_close(twenty_six.lfdr(), 0.6, 1e-12, "lfdr 26");

        // Ratio 0.6 of the truth lesion: G1 needs round(16.2) = 16 <= 27, G4+G5 needs round(9.6) = 10 > 8,
        // so with 26-connectivity only G1 is detected (1/4) and P4 becomes false too: 4 / (1 + 4).
        let ratio_26 = LesionOptions {
            overlap: OverlapCriterion::Ratio(0.6),
            ..corner.clone()
        };
        let detection = lesion_detection(&prediction, &truth, LAYOUT_SPACING, &ratio_26);
        assert_close(detection.ltpr(), 0.25, 1e-12, "ltpr ratio 26");
        assert_close(detection.lfdr(), 0.8, 1e-12, "lfdr ratio 26");
        // Same ratio with 18-connectivity: G4 alone needs round(4.8) = 5 <= 8, detected again (2/5).
        let ratio_18 = LesionOptions {
            overlap: OverlapCriterion::Ratio(0.6),
            ..LesionOptions::default()
        };
        let detection = lesion_detection(&prediction, &truth, LAYOUT_SPACING, &ratio_18);
        assert_close(detection.ltpr(), 0.4, 1e-12, "ltpr ratio 18");

        // 5 mm3 at 2 mm3 per voxel: round(2.5) = 2 voxels (half to even, like np.round). Now P2's 2 voxels
        // detect G2: LTPR 3/5, false P5 P6a P6b -> LFDR 3 / (3 + 3).
        let mm3 = LesionOptions {
            overlap: OverlapCriterion::Mm3(5.0),
            ..LesionOptions::default()
        };
        let detection = lesion_detection(&prediction, &truth, LAYOUT_SPACING, &mm3);
        assert_close(detection.ltpr(), 0.6, 1e-12, "ltpr mm3");
        assert_close(detection.lfdr(), 0.5, 1e-12, "lfdr mm3");
    }

    #[test]
    fn lesion_detection_per_size_bin_and_small_object_removal() {
        let (prediction, truth) = lesion_layout();
        // Bins [0, 10] and [11, inf] voxels. Truth sizes: G1 27, G2 27 (big); G3, G4, G5 8 (small).
        // Small: G4 detected of 3 -> 1/3; big: G1 detected of 2 -> 1/2. Predicted small lesions: P2 (2),
        // P4 (8), P5 (8), P6a, P6b (1), false all but P4 -> 4 / (1 + 4); big: P1 only, not false -> 0.
        let options = LesionOptions {
            target_size: Some(SizeBins {
                thresholds: vec![10.0],
                unit: SizeUnit::Voxels,
            }),
            ..LesionOptions::default()
        };
        let detection = lesion_detection(&prediction, &truth, LAYOUT_SPACING, &options);
        let [small, big] = &detection.per_size[..] else {
            panic!("expected two bins, got {:?}", detection.per_size);
        };
        assert_eq!(small.range.suffix, "_0-10vox");
        assert_eq!(big.range.suffix, "_11-INFvox");
        assert_eq!((small.ground_truth_lesions, small.detected), (3, 1));
        assert_eq!((small.predicted_lesions, small.false_positives), (5, 4));
        assert_close(small.ltpr(), 1.0 / 3.0, 1e-12, "small ltpr");
        assert_close(small.lfdr(), 0.8, 1e-12, "small lfdr");
        assert_eq!((big.ground_truth_lesions, big.detected), (2, 1));
        assert_close(big.ltpr(), 0.5, 1e-12, "big ltpr");
        assert_eq!(big.lfdr(), 0.0);

        // Removing objects under 2 voxels drops P6a and P6b: 4 predicted lesions, false P2 and P5 ->
        // LFDR 2 / (2 + 2); the first bin now starts at 2.
        let removal = LesionOptions {
            remove_small: Some(ObjectSize {
                value: 2.0,
                unit: SizeUnit::Voxels,
            }),
            ..options
        };
        let detection = lesion_detection(&prediction, &truth, LAYOUT_SPACING, &removal);
        assert_eq!(detection.predicted_lesions, 4);
        assert_close(detection.lfdr(), 0.5, 1e-12, "lfdr after removal");
        assert_eq!(detection.per_size[0].range.suffix, "_2-10vox");
        let cleaned = remove_small_objects(&prediction, 2.0, Connectivity::Eighteen);
        assert_eq!(cleaned.count(), prediction.count() - 2);
    }

    #[test]
    fn size_bins_in_mm3_follow_ivadomed_naming() {
        // 2 mm3 voxels, thresholds 6 and 21 mm3 -> 3 and round(10.5) = 10 voxels (half to even).
        let bins = SizeBins {
            thresholds: vec![6.0, 21.0],
            unit: SizeUnit::Mm3,
        };
        let ranges = bins.ranges(0.0, LAYOUT_SPACING);
        let described: Vec<(f64, f64, &str)> = ranges
            .iter()
            .map(|r| (r.low, r.high, r.suffix.as_str()))
            .collect();
        assert_eq!(
            described,
            vec![
                (0.0, 3.0, "_0.0-3.0mm3"),
                (4.0, 10.0, "_4.0-10.0mm3"),
                (11.0, f64::INFINITY, "_11.0-INFmm3"),
            ]
        );
        assert!(ranges[1].contains(10) && !ranges[1].contains(11) && ranges[2].contains(11));
    }

    #[test]
    fn image_metrics_row_uses_ivadomed_column_names() {
        let (prediction, truth) = lesion_layout();
        let dims = prediction.dims().map(|d| d as i64);
        let to_tensor = |mask: &Mask, on: f32| {
            let values: Vec<f32> = mask
                .voxels()
                .iter()
                .map(|&v| if v { on } else { 0.1 })
                .collect();
            Tensor::from_slice(&values).reshape(dims)
        };
        // Soft prediction at 0.7: foreground at threshold 0.5, nothing at threshold 0.8.
        let soft = to_tensor(&prediction, 0.7);
        let target = to_tensor(&truth, 1.0);
        let options = MetricsOptions {
            lesions: LesionOptions {
                target_size: Some(SizeBins {
                    thresholds: vec![10.0],
                    unit: SizeUnit::Voxels,
                }),
                ..LesionOptions::default()
            },
            ..MetricsOptions::default()
        };
        let row = image_metrics(&soft, &target, LAYOUT_SPACING, &options).unwrap();
        let mut expected_names: Vec<String> = [
            "vol_pred",
            "vol_gt",
            "rvd",
            "avd",
            "dice",
            "recall",
            "precision",
            "specificity",
            "mse",
            "n_pred",
            "n_gt",
            "ltpr",
            "lfdr",
            "hausdorff_mm",
            "hd95_mm",
            "asd_mm",
            "ltpr_0-10vox",
            "lfdr_0-10vox",
            "n_0-10vox",
            "ltpr_11-INFvox",
            "lfdr_11-INFvox",
            "n_11-INFvox",
        ]
        .iter()
        .map(|name| format!("{name}_class0"))
        .collect();
        expected_names.sort();
        assert_eq!(row.keys().cloned().collect::<Vec<_>>(), expected_names);

        // Truth: 27 + 27 + 8 + 8 + 8 = 78 voxels = 156 mm3; prediction 27 + 2 + 8 + 8 + 2 = 47 voxels
        // = 94 mm3; overlap 27 + 2 + 8 = 37 -> Dice 74 / 125, RVD (156 - 94) / 156.
        assert_eq!(row["vol_gt_class0"], 156.0);
        assert_eq!(row["vol_pred_class0"], 94.0);
        assert_close(row["rvd_class0"], 62.0 / 156.0, 1e-12, "rvd");
        assert_close(row["dice_class0"], 74.0 / 125.0, 1e-12, "dice");
        assert_close(row["recall_class0"], 37.0 / 78.0, 1e-12, "recall");
        assert_close(row["precision_class0"], 37.0 / 47.0, 1e-12, "precision");
        assert_eq!((row["n_pred_class0"], row["n_gt_class0"]), (6.0, 5.0));
        assert_close(row["ltpr_class0"], 0.4, 1e-12, "ltpr");
        assert_close(row["lfdr_class0"], 4.0 / 6.0, 1e-12, "lfdr");
        assert_eq!(row["n_0-10vox_class0"], 3.0);
        assert!(row["hausdorff_mm_class0"] > 0.0);

        // At threshold 0.8 nothing is predicted: Dice 0, precision and surface distances NaN.
        let strict = MetricsOptions {
            threshold: 0.8,
            ..options.clone()
        };
        let row = image_metrics(&soft, &target, LAYOUT_SPACING, &strict).unwrap();
        assert_eq!(row["dice_class0"], 0.0);
        assert_eq!(row["vol_pred_class0"], 0.0);
        assert!(row["precision_class0"].is_nan() && row["hausdorff_mm_class0"].is_nan());
        assert!(row["lfdr_class0"].is_nan());

        // A [C, X, Y, Z] stack: class 1 empty in both gives NaN overlap scores and zero volumes.
        let empty = Tensor::zeros(dims, (Kind::Float, Device::Cpu));
        let stacked_prediction = Tensor::stack(&[&soft, &empty], 0);
        let stacked_truth = Tensor::stack(&[&target, &empty], 0);
        let row = image_metrics(
            &stacked_prediction,
            &stacked_truth,
            LAYOUT_SPACING,
            &options,
        )
        .unwrap();
        assert_close(row["dice_class0"], 74.0 / 125.0, 1e-12, "dice class 0");
        assert_eq!(row["vol_gt_class1"], 0.0);
        assert_eq!(row["n_gt_class1"], 0.0);
        for name in [
            "dice",
            "rvd",
            "avd",
            "ltpr",
            "lfdr",
            "hausdorff_mm",
            "ltpr_0-10vox",
        ] {
            assert!(row[&format!("{name}_class1")].is_nan(), "{name}_class1");
        }
        assert_eq!(row.len(), 2 * expected_names.len());

        // Shape mismatches and wrong ranks are errors, not panics.
        assert!(image_metrics(&soft, &stacked_truth, LAYOUT_SPACING, &options).is_err());
        let flat = soft.reshape([-1]);
        assert!(image_metrics(&flat, &flat, LAYOUT_SPACING, &options).is_err());
    }
}
