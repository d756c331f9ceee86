//! Post-processing steps over connected objects: keep the largest, fill holes, drop small ones. The foreground
//! mask goes to the host, is labelled per class with `ivado_sdk::components`, and the kept voxels come back as
//! a mask that multiplies the prediction on its device.
use crate::layout::{
    finite, host_mask, keep_only, map_channels, mask_like, no_record, prediction, Layout,
    PREDICTION,
};
use ivado_sdk::components::{label, label_slices, Connectivity, SliceConnectivity};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::Tensor;
use ivado_sdk::{Config, PluginError, Result, Sample, Transform};

/// ivadomed's `binarize_with_low_threshold`: on soft predictions, objects are the voxels at or above this value.
const OBJECT_THRESHOLD: f64 = 0.001;

/// ivadomed's `threshold_predictions` default, used where it binarises before `fill_holes`.
const BINARY_THRESHOLD: f64 = 0.5;

/// Keeps, in `labels`, the voxels of the largest component; the first in scan order wins ties (numpy's
/// `argmax` over label sizes).
fn largest_of(labels: &[u32], sizes: &[usize]) -> Vec<bool> {
    let mut best: Option<(usize, u32)> = None;
    for (index, &size) in sizes.iter().enumerate() {
        if best.is_none_or(|(largest, _)| size > largest) {
            best = Some((size, index as u32 + 1));
        }
    }
    match best {
        Some((_, keep)) => labels.iter().map(|&l| l == keep).collect(),
        None => vec![false; labels.len()],
    }
}

/// ivadomed's `keep_largest_object`: per class, only the largest connected object survives.
///
/// Objects are face-connected (scipy's default `label` structure: 6 neighbours in 3D, 4 in 2D). On soft
/// predictions ivadomed finds objects among the voxels `>= 0.001` and keeps the soft values of the largest one;
/// voxels below 0.001 become 0. Binary predictions go through the same rule unchanged. ivadomed labels a
/// multi-class `[X, Y, Z, C]` array as one 4D volume, which joins objects of different classes at the same
/// place; here each class is labelled on its own.
pub struct KeepLargestObject;

impl KeepLargestObject {
    pub fn keep(&self, prediction: &Tensor, layout: &Layout) -> Result<Tensor> {
        let foreground = host_mask(&prediction.f_ge(OBJECT_THRESHOLD)?)?;
        let keep = map_channels(&foreground, layout, |channel| {
            let components = label(channel, layout.dims, Connectivity::Six);
            largest_of(&components.labels, &components.sizes)
        });
        keep_only(prediction, &mask_like(&keep, prediction)?)
    }
}

impl Transform for KeepLargestObject {
    const NAME: &'static str = "keep_largest_object";
    const SUMMARY: &'static str =
        "Keeps only the largest face-connected object of each class (objects: values >= 0.001)";

    fn defaults() -> Value {
        json!({})
    }

    fn build(_config: &mut Config) -> Result<Self> {
        Ok(Self)
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let (prediction, layout) = prediction(sample, Self::NAME)?;
        let kept = self.keep(prediction, &layout)?;
        sample.insert(PREDICTION, kept);
        Ok(no_record())
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// `keep_largest`, the name ivadomed's configuration files use for [`KeepLargestObject`].
pub struct KeepLargest(KeepLargestObject);

impl Transform for KeepLargest {
    const NAME: &'static str = "keep_largest";
    const SUMMARY: &'static str = "Same as keep_largest_object (ivadomed's config name)";

    fn defaults() -> Value {
        KeepLargestObject::defaults()
    }

    fn build(config: &mut Config) -> Result<Self> {
        Ok(Self(KeepLargestObject::build(config)?))
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        self.0.apply(sample, seed)
    }

    fn undo(&self, sample: &mut Sample, record: &Value) -> Result<()> {
        self.0.undo(sample, record)
    }
}

/// ivadomed's `keep_largest_object_per_slice`: in every 2D slice across spatial axis `axis` (default 2, the
/// axial axis of an `[X, Y, Z]` volume), only the largest object of that slice survives, with
/// [`KeepLargestObject`]'s rules in 2D (4-connected in-plane, objects `>= 0.001`). A 2D `[H, W]` prediction is
/// one slice across axis 2; across axis 0 or 1 its slices are rows or columns, as ivadomed's split gives.
pub struct KeepLargestObjectPerSlice {
    axis: usize,
}

impl KeepLargestObjectPerSlice {
    pub fn keep(&self, prediction: &Tensor, layout: &Layout) -> Result<Tensor> {
        let [_, ny, nz] = layout.dims;
        let axis = self.axis;
        let slice_of = |index: usize| match axis {
            0 => index / (ny * nz),
            1 => index / nz % ny,
            _ => index % nz,
        };
        let slices = layout.dims[axis];
        let foreground = host_mask(&prediction.f_ge(OBJECT_THRESHOLD)?)?;
        let keep = map_channels(&foreground, layout, |channel| {
            let components = label_slices(channel, layout.dims, axis, SliceConnectivity::Four);
            // Each component lies in one slice; labels run in scan order, so the first largest of a slice is
            // the one scipy would pick labelling that slice alone.
            let mut slice_of_label = vec![usize::MAX; components.count()];
            for (index, &l) in components.labels.iter().enumerate() {
                if l != 0 && slice_of_label[l as usize - 1] == usize::MAX {
                    slice_of_label[l as usize - 1] = slice_of(index);
                }
            }
            let mut best: Vec<(usize, u32)> = vec![(0, 0); slices];
            for (index, &size) in components.sizes.iter().enumerate() {
                let slot = &mut best[slice_of_label[index]];
                if size > slot.0 {
                    *slot = (size, index as u32 + 1);
                }
            }
            components
                .labels
                .iter()
                .enumerate()
                .map(|(index, &l)| l != 0 && best[slice_of(index)].1 == l)
                .collect()
        });
        keep_only(prediction, &mask_like(&keep, prediction)?)
    }
}

impl Transform for KeepLargestObjectPerSlice {
    const NAME: &'static str = "keep_largest_object_per_slice";
    const SUMMARY: &'static str =
        "Keeps only the largest 4-connected object of each 2D slice across spatial axis `axis` (default 2)";

    fn defaults() -> Value {
        json!({"axis": 2})
    }

    fn build(config: &mut Config) -> Result<Self> {
        Ok(Self {
            axis: config.usize_in("axis", 0, 2)?,
        })
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let (prediction, layout) = prediction(sample, Self::NAME)?;
        let kept = self.keep(prediction, &layout)?;
        sample.insert(PREDICTION, kept);
        Ok(no_record())
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// ivadomed's `fill_holes`: the prediction is binarised at 0.5 (`threshold_predictions`), then each class's
/// holes are filled as `scipy.ndimage.binary_fill_holes` with ivadomed's all-ones 3 x 3 x 3 structure does:
/// background not connected to the border of the volume through background becomes foreground, background
/// connecting through faces, edges and corners (26 neighbours; 8 in-plane for 2D). The result is binary.
///
/// For a 2D `[H, W]` prediction only the image's four edges are a border. (ivadomed always works on 3D arrays,
/// where a single-slice volume is all border and nothing would be filled.)
pub struct FillHoles;

impl FillHoles {
    pub fn fill(&self, prediction: &Tensor, layout: &Layout) -> Result<Tensor> {
        let foreground = host_mask(&prediction.f_ge(BINARY_THRESHOLD)?)?;
        let [nx, ny, nz] = layout.dims;
        let z_is_border = layout.rank == 3;
        let on_border = |index: usize| {
            let (x, y, z) = (index / (ny * nz), index / nz % ny, index % nz);
            x == 0
                || x + 1 == nx
                || y == 0
                || y + 1 == ny
                || (z_is_border && (z == 0 || z + 1 == nz))
        };
        let filled = map_channels(&foreground, layout, |channel| {
            let background: Vec<bool> = channel.iter().map(|&f| !f).collect();
            let components = label(&background, layout.dims, Connectivity::TwentySix);
            let mut reaches_border = vec![false; components.count() + 1];
            for (index, &l) in components.labels.iter().enumerate() {
                if l != 0 && on_border(index) {
                    reaches_border[l as usize] = true;
                }
            }
            channel
                .iter()
                .zip(&components.labels)
                .map(|(&f, &l)| f || !reaches_border[l as usize])
                .collect()
        });
        mask_like(&filled, prediction)
    }
}

impl Transform for FillHoles {
    const NAME: &'static str = "fill_holes";
    const SUMMARY: &'static str =
        "Binarises at 0.5 and fills the holes of each class (binary_fill_holes, 3x3x3 structure)";

    fn defaults() -> Value {
        json!({})
    }

    fn build(_config: &mut Config) -> Result<Self> {
        Ok(Self)
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let (prediction, layout) = prediction(sample, Self::NAME)?;
        let filled = self.fill(prediction, &layout)?;
        sample.insert(PREDICTION, filled);
        Ok(no_record())
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

/// The unit of [`RemoveSmall`]'s thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeUnit {
    Voxels,
    CubicMillimetres,
}

/// ivadomed's `remove_small`: per class, objects smaller than the class's threshold are set to 0.
///
/// Objects are the nonzero voxels (ivadomed labels the prediction as it is, soft or binary), 18-connected
/// (`generate_binary_structure(3, 2)`: shared face or edge, not a corner only); kept objects keep their values.
/// `thr` is one number for every class or a list with one per class. With `unit` `"vox"` an object survives
/// when its voxel count is `>= thr`; with `"mm3"` the threshold becomes `round(thr / voxel volume)` voxels
/// (ivadomed's formula, Python rounding: halves to even), the voxel volume being the product of the sample's
/// spacing. ivadomed's own `mm3` path divides a list by a number and crashes; this one works.
pub struct RemoveSmall {
    unit: SizeUnit,
    thr: Vec<f64>,
}

impl RemoveSmall {
    /// Minimal voxel count per class.
    pub fn min_voxels(&self, sample: &Sample, layout: &Layout) -> Result<Vec<f64>> {
        let per_class = match self.thr.len() {
            1 => vec![self.thr[0]; layout.channels],
            n if n == layout.channels => self.thr.clone(),
            n => {
                return Err(PluginError(format!(
                    "{}: `thr` has {n} thresholds but the prediction has {} classes",
                    Self::NAME,
                    layout.channels
                )))
            }
        };
        Ok(match self.unit {
            SizeUnit::Voxels => per_class,
            SizeUnit::CubicMillimetres => {
                let voxel_volume: f64 = sample
                    .checked_spacing(layout.rank, Self::NAME)?
                    .iter()
                    .product();
                per_class
                    .iter()
                    .map(|thr| (thr / voxel_volume).round_ties_even())
                    .collect()
            }
        })
    }

    pub fn remove(
        &self,
        prediction: &Tensor,
        layout: &Layout,
        min_voxels: &[f64],
    ) -> Result<Tensor> {
        let foreground = host_mask(&prediction.f_ne(0.0)?)?;
        let mut class = 0;
        let keep = map_channels(&foreground, layout, |channel| {
            let kept = label(channel, layout.dims, Connectivity::Eighteen)
                .retain_min_size(min_voxels[class]);
            class += 1;
            kept.labels.iter().map(|&l| l != 0).collect()
        });
        keep_only(prediction, &mask_like(&keep, prediction)?)
    }
}

impl Transform for RemoveSmall {
    const NAME: &'static str = "remove_small";
    const SUMMARY: &'static str =
        "Removes 18-connected objects smaller than thr (one per class or one for all) in `vox` or `mm3`";

    fn defaults() -> Value {
        json!({"unit": "vox", "thr": 3})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let unit = match config.choice("unit", &["vox", "mm3"])?.as_str() {
            "vox" => SizeUnit::Voxels,
            _ => SizeUnit::CubicMillimetres,
        };
        let thr = match finite(config, "thr", Self::NAME) {
            Ok(single) => vec![single],
            Err(_) => config.f64_list("thr").map_err(|_| {
                PluginError(format!(
                    "{}: `thr` must be a number or a list of numbers (one per class)",
                    Self::NAME
                ))
            })?,
        };
        if thr.is_empty() {
            return Err(PluginError(format!(
                "{}: `thr` is an empty list",
                Self::NAME
            )));
        }
        if let Some(bad) = thr.iter().find(|t| !(t.is_finite() && **t >= 0.0)) {
            return Err(PluginError(format!(
                "{}: every `thr` must be a finite size >= 0, got {bad}",
                Self::NAME
            )));
        }
        Ok(Self { unit, thr })
    }

    fn apply(&self, sample: &mut Sample, _seed: u64) -> Result<Value> {
        let (prediction, layout) = prediction(sample, Self::NAME)?;
        let min_voxels = self.min_voxels(sample, &layout)?;
        let kept = self.remove(prediction, &layout, &min_voxels)?;
        sample.insert(PREDICTION, kept);
        Ok(no_record())
    }

    fn undo(&self, _sample: &mut Sample, _record: &Value) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{build, ones_of, try_build, values, volume};
    use ivado_sdk::tch::Kind;

    fn sample_3d(prediction: Tensor, spacing: [f64; 3]) -> Sample {
        let mut sample = Sample::new();
        sample.insert(PREDICTION, prediction);
        sample.set_spacing(&spacing);
        sample
    }

    fn run<T: Transform>(config: Value, sample: &mut Sample) -> Tensor {
        let record = build::<T>(config).apply(sample, 7).unwrap();
        assert!(record.is_null());
        sample.get(PREDICTION).unwrap().shallow_clone()
    }

    /// A 2 x 2 x 2 cube at the origin (8 voxels) and a 3-voxel line elsewhere; plus a voxel touching the cube
    /// only at a corner and one touching it only along an edge (each its own face-connected object of 1).
    fn two_blobs() -> Vec<[usize; 3]> {
        let mut voxels = Vec::new();
        for x in 0..2 {
            for y in 0..2 {
                for z in 0..2 {
                    voxels.push([x, y, z]);
                }
            }
        }
        voxels.extend([[4, 4, 3], [4, 4, 4], [4, 4, 5], [2, 2, 2], [2, 2, 0]]);
        voxels
    }

    #[test]
    fn keep_largest_object_keeps_the_cube_per_class_with_soft_values() {
        let dims = [6, 6, 6];
        let binary = volume(dims, &two_blobs());
        let mut sample = sample_3d(binary.shallow_clone(), [1.0, 1.0, 1.0]);
        let out = run::<KeepLargestObject>(json!({}), &mut sample);
        assert_eq!(out.kind(), Kind::Float);
        assert_eq!(out.size(), vec![1, 6, 6, 6]);
        // Face connectivity: the cube (8) beats the line (3) and the corner and edge voxels (1 each), which go.
        let cube: Vec<[usize; 3]> = two_blobs()[..8].to_vec();
        assert_eq!(ones_of(&out), cube);

        // Soft, two classes. Class 0: the same layout with values 0.8 (cube), 0.9 (line, corner and edge voxels), plus a
        // face neighbour of the cube at 0.0005, below ivadomed's 0.001 object threshold: it is not part of the
        // cube and is zeroed. Class 1: only the line and one isolated voxel, so its largest object is the line.
        let class0 = volume(dims, &two_blobs()) * 0.9;
        for &[x, y, z] in &cube {
            let _ = class0
                .get(0)
                .get(x as i64)
                .get(y as i64)
                .get(z as i64)
                .fill_(0.8);
        }
        let _ = class0.get(0).get(0).get(0).get(2).fill_(0.0005);
        let class1 = volume(dims, &[[4, 4, 3], [4, 4, 4], [4, 4, 5], [0, 5, 0]]);
        let prediction = Tensor::cat(&[class0, class1], 0);
        let mut sample = sample_3d(prediction, [1.0, 1.0, 1.0]);
        let out = run::<KeepLargestObject>(json!({}), &mut sample);
        assert_eq!(out.size(), vec![2, 6, 6, 6]);
        let got = values(&out);
        let at = |c: usize, [x, y, z]: [usize; 3]| got[((c * 6 + x) * 6 + y) * 6 + z];
        for &voxel in &cube {
            assert_eq!(at(0, voxel), 0.8f32 as f64, "{voxel:?}");
        }
        assert_eq!(got[..216].iter().filter(|&&v| v != 0.0).count(), 8);
        assert_eq!(at(0, [0, 0, 2]), 0.0);
        let line = [[4, 4, 3], [4, 4, 4], [4, 4, 5]];
        for voxel in line {
            assert_eq!(at(1, voxel), 1.0);
        }
        assert_eq!(got[216..].iter().filter(|&&v| v != 0.0).count(), 3);

        // ivadomed's config name does the same.
        let mut sample = sample_3d(binary, [1.0, 1.0, 1.0]);
        assert_eq!(ones_of(&run::<KeepLargest>(json!({}), &mut sample)), cube);
    }

    #[test]
    fn keep_largest_object_per_slice_picks_each_slices_own_largest() {
        // [X, Y, Z] = [4, 4, 3], slices across z (axis 2). Worked by hand:
        //   z = 0: A = (0,0) (0,1) (0,2) (3 voxels) and (3,3) (1)          -> keep A.
        //   z = 1: (0,0) (1, joined to A in 3D) and C = (2,2) (2,3) (2)    -> keep C.
        //   z = 2: (1,1) and (2,2), diagonal so two 4-connected objects of 1 -> tie: keep the first, (1,1).
        let voxels = [
            [0, 0, 0],
            [0, 1, 0],
            [0, 2, 0],
            [3, 3, 0],
            [0, 0, 1],
            [2, 2, 1],
            [2, 3, 1],
            [1, 1, 2],
            [2, 2, 2],
        ];
        let prediction = volume([4, 4, 3], &voxels);
        let mut sample = sample_3d(prediction.shallow_clone(), [1.0, 1.0, 2.0]);
        let out = run::<KeepLargestObjectPerSlice>(json!({}), &mut sample);
        let mut kept = ones_of(&out);
        kept.sort_by_key(|&[x, y, z]| (z, x, y));
        assert_eq!(
            kept,
            vec![
                [0, 0, 0],
                [0, 1, 0],
                [0, 2, 0],
                [2, 2, 1],
                [2, 3, 1],
                [1, 1, 2]
            ]
        );
        // The whole-volume rule keeps only the largest 3D object, A plus (0,0,1): 4 voxels.
        let mut sample = sample_3d(prediction.shallow_clone(), [1.0, 1.0, 2.0]);
        let out = run::<KeepLargestObject>(json!({}), &mut sample);
        assert_eq!(
            ones_of(&out),
            vec![[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 2, 0]]
        );
        // Across x (axis 0): slice x = 0 holds (0,0,0) (0,1,0) (0,2,0) (0,0,1), one 4-connected object of 4;
        // x = 1 one voxel; x = 2 holds (2,2,1) (2,3,1) (2,2,2), one object of 3; x = 3 one voxel. All survive.
        let mut sample = sample_3d(prediction, [1.0, 1.0, 2.0]);
        let out = run::<KeepLargestObjectPerSlice>(json!({"axis": 0}), &mut sample);
        assert_eq!(ones_of(&out).len(), voxels.len());
    }

    /// A `[1, H, W]` image from rows of '#' (1.0), '+' (0.7), 'o' (0.3) and '.' (0).
    fn image(rows: &[&str]) -> Tensor {
        let data: Vec<f32> = rows
            .iter()
            .flat_map(|row| {
                row.chars().map(|c| match c {
                    '#' => 1.0,
                    '+' => 0.7,
                    'o' => 0.3,
                    _ => 0.0,
                })
            })
            .collect();
        Tensor::from_slice(&data).reshape([1, rows.len() as i64, rows[0].len() as i64])
    }

    fn fill_2d(rows: &[&str]) -> Vec<f64> {
        let mut sample = Sample::new();
        sample.insert(PREDICTION, image(rows));
        sample.set_spacing(&[1.0, 1.0]);
        values(&run::<FillHoles>(json!({}), &mut sample))
    }

    #[test]
    fn fill_holes_fills_a_ring_and_binarises() {
        // A soft ring (0.7 >= 0.5) around a 0.3 centre (< 0.5: background, enclosed): the 3 x 3 block becomes 1.
        let filled = fill_2d(&[".....", ".+++.", ".+o+.", ".+++.", "....."]);
        assert_eq!(
            filled,
            values(&image(&[".....", ".###.", ".###.", ".###.", "....."]))
        );
        // The ring's corner removed: the centre touches the outside through that corner. The all-ones structure
        // connects background diagonally (scipy with ivadomed's 3 x 3 x 3), so it is no hole and stays 0.
        let open = fill_2d(&[".....", "..##.", ".#.#.", ".###.", "....."]);
        assert_eq!(
            open,
            values(&image(&[".....", "..##.", ".#.#.", ".###.", "....."]))
        );
    }

    #[test]
    fn fill_holes_in_3d_needs_an_enclosed_cavity() {
        // A hollow 3 x 3 x 3 shell in a 5^3 volume: its centre is enclosed and gets filled. A flat ring in one
        // slice of the same volume encloses nothing in 3D (its centre reaches the border through z) and is kept.
        let mut shell = Vec::new();
        for x in 1..4 {
            for y in 1..4 {
                for z in 1..4 {
                    if [x, y, z] != [2, 2, 2] {
                        shell.push([x, y, z]);
                    }
                }
            }
        }
        let mut flat_ring = Vec::new();
        for x in 1..4 {
            for y in 1..4 {
                if [x, y] != [2, 2] {
                    flat_ring.push([x, y, 2]);
                }
            }
        }
        let prediction = Tensor::cat(
            &[volume([5, 5, 5], &shell), volume([5, 5, 5], &flat_ring)],
            0,
        );
        let mut sample = sample_3d(prediction, [1.0, 1.0, 1.0]);
        let out = run::<FillHoles>(json!({}), &mut sample);
        assert_eq!(out.size(), vec![2, 5, 5, 5]);
        assert_eq!(out.kind(), Kind::Float);
        let got = values(&out);
        let centre = (2 * 5 + 2) * 5 + 2;
        assert_eq!(got[centre], 1.0, "the shell's cavity is filled");
        assert_eq!(got[..125].iter().sum::<f64>(), 27.0);
        assert_eq!(got[125 + centre], 0.0, "the flat ring's centre is open");
        assert_eq!(got[125..].iter().sum::<f64>(), 8.0);
    }

    type Voxels = Vec<[usize; 3]>;

    /// Three objects in an 8^3 volume, labelled with 18-connectivity:
    ///   E: (1,1,1) (2,2,1), touching along an edge: one object of 2.
    ///   K: (5,5,5) (6,6,6), touching at a corner only: two objects of 1.
    ///   L: (1,5,5) (1,5,6) (1,5,7), a line: one object of 3.
    fn edge_corner_line() -> (Voxels, Voxels, Voxels) {
        (
            vec![[1, 1, 1], [2, 2, 1]],
            vec![[5, 5, 5], [6, 6, 6]],
            vec![[1, 5, 5], [1, 5, 6], [1, 5, 7]],
        )
    }

    fn sorted(mut voxels: Vec<[usize; 3]>) -> Vec<[usize; 3]> {
        voxels.sort();
        voxels
    }

    #[test]
    fn remove_small_in_voxels_with_18_connectivity() {
        let (edge, corner, line) = edge_corner_line();
        let all: Vec<[usize; 3]> = [edge.clone(), corner, line.clone()].concat();
        let prediction = volume([8, 8, 8], &all);
        // thr 2: the edge pair (2) and the line (3) stay; the corner pair is two objects of 1 and goes.
        let mut sample = sample_3d(prediction.shallow_clone(), [1.0, 1.0, 1.0]);
        let out = run::<RemoveSmall>(json!({"unit": "vox", "thr": 2}), &mut sample);
        assert_eq!(ones_of(&out), sorted([edge.clone(), line.clone()].concat()));
        // thr 3: only the line.
        let mut sample = sample_3d(prediction.shallow_clone(), [1.0, 1.0, 1.0]);
        let out = run::<RemoveSmall>(json!({"unit": "vox", "thr": 3}), &mut sample);
        assert_eq!(ones_of(&out), line);
        // Soft values of kept objects are kept; any nonzero value is foreground (ivadomed labels the data as is).
        let soft = prediction.shallow_clone() * 0.25;
        let mut sample = sample_3d(soft, [1.0, 1.0, 1.0]);
        let out = run::<RemoveSmall>(json!({"thr": 2}), &mut sample);
        assert_eq!(values(&out).iter().filter(|&&v| v == 0.25).count(), 5);
        assert_eq!(values(&out).iter().filter(|&&v| v != 0.0).count(), 5);
    }

    #[test]
    fn remove_small_in_mm3_on_anisotropic_voxels_and_per_class() {
        // Spacing 0.5 x 1 x 3 mm: a voxel is 1.5 mm3. A 4-voxel object (6 mm3) and a 3-voxel one (4.5 mm3).
        let four = vec![[1, 1, 1], [1, 1, 2], [1, 2, 2], [2, 2, 2]];
        let three = vec![[5, 5, 5], [5, 6, 5], [6, 6, 5]];
        let prediction = volume([8, 8, 8], &[four.clone(), three.clone()].concat());
        let spacing = [0.5, 1.0, 3.0];
        let kept = |thr: f64| {
            let mut sample = sample_3d(prediction.shallow_clone(), spacing);
            ones_of(&run::<RemoveSmall>(
                json!({"unit": "mm3", "thr": thr}),
                &mut sample,
            ))
        };
        // 6 mm3 -> round(6 / 1.5) = 4 voxels: the 4-voxel object stays, the 3-voxel one goes.
        assert_eq!(kept(6.0), four);
        // 7 mm3 -> round(4.67) = 5 voxels: both go. 4.5 mm3 -> 3 voxels: both stay.
        assert_eq!(kept(7.0), Vec::<[usize; 3]>::new());
        assert_eq!(kept(4.5), sorted([four.clone(), three.clone()].concat()));
        // Python rounding as ivadomed: 6.75 mm3 = 4.5 voxels rounds to 4 (even, not 5), so the 4-voxel object
        // stays.
        assert_eq!(kept(6.75), four);

        // One threshold per class: class 0 drops objects under 4 voxels, class 1 under 3 voxels.
        let both = Tensor::cat(&[prediction.shallow_clone(), prediction.shallow_clone()], 0);
        let mut sample = sample_3d(both, spacing);
        let out = run::<RemoveSmall>(json!({"unit": "vox", "thr": [4, 3]}), &mut sample);
        assert_eq!(ones_of(&out.get(0).unsqueeze(0)), four);
        assert_eq!(
            ones_of(&out.get(1).unsqueeze(0)),
            sorted([four.clone(), three.clone()].concat())
        );
        // A list whose length is not the class count, a missing spacing for mm3: errors that say why.
        let mut sample = sample_3d(prediction.shallow_clone(), spacing);
        let error = build::<RemoveSmall>(json!({"thr": [1, 2, 3]}))
            .apply(&mut sample, 0)
            .unwrap_err()
            .0;
        assert!(
            error.contains("3 thresholds") && error.contains("1 classes"),
            "{error}"
        );
        let mut sample = Sample::new();
        sample.insert(PREDICTION, prediction);
        let error = build::<RemoveSmall>(json!({"unit": "mm3", "thr": 6}))
            .apply(&mut sample, 0)
            .unwrap_err()
            .0;
        assert!(error.contains("spacing"), "{error}");
    }

    #[test]
    fn object_step_configs_are_validated() {
        let error = try_build::<RemoveSmall>(json!({"unit": "cm3"}))
            .err()
            .unwrap()
            .0;
        assert!(error.contains("`unit`") && error.contains("cm3"), "{error}");
        let error = try_build::<RemoveSmall>(json!({"thr": "big"}))
            .err()
            .unwrap()
            .0;
        assert!(
            error.contains("`thr` must be a number or a list"),
            "{error}"
        );
        let error = try_build::<RemoveSmall>(json!({"thr": -2}))
            .err()
            .unwrap()
            .0;
        assert!(error.contains(">= 0"), "{error}");
        let error = try_build::<RemoveSmall>(json!({"thr": 3, "size": 4}))
            .err()
            .unwrap()
            .0;
        assert!(error.contains("unknown config key `size`"), "{error}");
        let error = try_build::<KeepLargestObjectPerSlice>(json!({"axis": 3}))
            .err()
            .unwrap()
            .0;
        assert!(error.contains("`axis`"), "{error}");
        let error = try_build::<FillHoles>(json!({"structure": [3, 3, 3]}))
            .err()
            .unwrap()
            .0;
        assert!(error.contains("unknown config key `structure`"), "{error}");
    }
}
