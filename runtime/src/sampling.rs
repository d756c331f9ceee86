//! Sampling windows out of a canonical volume `[C, X, Y, Z]` (RAS voxel order): 2D slices along one axis,
//! 2D patches within those slices, 3D subvolumes, or the whole volume, as ivadomed's 2D dataset
//! (`slice_axis`, `length_2D`/`stride_2D`) and 3D datasets (`length_3D`/`stride_3D`) sample them.
//!
//! Window placement comes from [`TileGrid`]: tiles every `stride` voxels plus one flush with the end, so the
//! windows cover the volume exactly, last partial tile included. Each [`Window`] records its origin in the
//! volume, so [`Reconstructor`] can put predictions back and average overlaps (ivadomed's
//! `image_reconstruction` / `volume_reconstruction`).
//!
//! A 2D window is oriented as ivadomed's `orient_img_hwd` orients slices: (height, width) is (Z, Y) for
//! sagittal slices, (Z, X) for coronal ones and (X, Y) for axial ones, so `length_2D` means what it means in
//! an ivadomed configuration.
//!
//! Filters follow ivadomed: [`SliceFilter`] (`slice_filter_params`) drops whole slices, [`PatchFilter`]
//! (`patch_filter_params`) drops 2D patches at training time only, and the ROI filter (`roi_params`:
//! `slice_filter_roi`) drops slices whose ROI mask has `slice_filter_roi` non-zero voxels or fewer. As in
//! ivadomed, filters apply to the 2D modes only; 3D subvolumes and volumes are never filtered.
use crate::tiling::{SliceAxis, TileGrid};
use anyhow::{bail, ensure, Result};
use tch::{Kind, Tensor};

/// How a volume is cut into training / inference samples.
#[derive(Clone, Debug, PartialEq)]
pub enum SamplingMode {
    /// Every 2D slice along `axis` (ivadomed's default 2D sampling).
    Slices { axis: SliceAxis },
    /// 2D patches of `length` (height, width) every `stride` voxels within each slice along `axis`.
    Patches2D {
        axis: SliceAxis,
        length: [i64; 2],
        stride: [i64; 2],
    },
    /// 3D subvolumes of `length` (X, Y, Z) every `stride` voxels.
    Subvolumes { length: [i64; 3], stride: [i64; 3] },
    /// The whole volume as one sample.
    Volume,
}

/// The canonical axes (0 = X, 1 = Y, 2 = Z) that are a 2D window's height and width (ivadomed's
/// `orient_img_hwd`).
pub fn plane_axes(axis: SliceAxis) -> [usize; 2] {
    match axis {
        SliceAxis::Sagittal => [2, 1],
        SliceAxis::Coronal => [2, 0],
        SliceAxis::Axial => [0, 1],
    }
}

/// One sample's place in the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// The slice axis for 2D windows; None for 3D ones.
    pub axis: Option<SliceAxis>,
    /// First voxel in canonical (X, Y, Z) coordinates. Negative, or overhanging the end, only where a tile is
    /// larger than the volume (the overhang is zeros).
    pub origin: [i64; 3],
    /// Extent in canonical coordinates (1 along the slice axis of a 2D window).
    pub extent: [i64; 3],
}

impl Window {
    /// The position along the slice axis, for 2D windows.
    pub fn slice_index(&self) -> Option<i64> {
        self.axis.map(|axis| self.origin[axis.index() as usize])
    }

    /// Spatial shape of the window's tensors: (height, width) in 2D, (X, Y, Z) in 3D.
    pub fn shape(&self) -> Vec<i64> {
        match self.axis {
            Some(axis) => plane_axes(axis).iter().map(|&a| self.extent[a]).collect(),
            None => self.extent.to_vec(),
        }
    }

    /// The window of `volume` (`[C, X, Y, Z]`): `[C, H, W]` for 2D windows, `[C, x, y, z]` for 3D ones. Parts
    /// outside the volume are zeros.
    pub fn extract(&self, volume: &Tensor) -> Result<Tensor> {
        ensure!(
            volume.dim() == 4,
            "expected a volume [C, X, Y, Z], got shape {:?}",
            volume.size()
        );
        let size = volume.size();
        let mut region = volume.shallow_clone();
        let mut pad = [(0i64, 0i64); 3];
        for axis in 0..3 {
            let (start, end) = (self.origin[axis], self.origin[axis] + self.extent[axis]);
            let inside = (start.max(0), end.min(size[axis + 1]));
            ensure!(
                inside.0 < inside.1,
                "window {:?}+{:?} lies outside the volume {:?}",
                self.origin,
                self.extent,
                &size[1..]
            );
            region = region.f_narrow(axis as i64 + 1, inside.0, inside.1 - inside.0)?;
            pad[axis] = (inside.0 - start, end - inside.1);
        }
        if pad.iter().any(|&(before, after)| before > 0 || after > 0) {
            // constant_pad_nd lists (before, after) from the last axis backwards.
            let widths: Vec<i64> = pad.iter().rev().flat_map(|&(b, a)| [b, a]).collect();
            region = region.f_constant_pad_nd(widths.as_slice())?;
        }
        match self.axis {
            None => Ok(region),
            Some(axis) => {
                let plane = region.f_squeeze_dim(axis.index() + 1)?;
                let [height, width] = plane_axes(axis);
                // After squeezing, the two remaining canonical axes are in increasing order.
                Ok(if height > width {
                    plane.f_transpose(1, 2)?
                } else {
                    plane
                })
            }
        }
    }

    /// `window` (`[C, ...shape()]`) in canonical axis order `[C, ex, ey, ez]`: the inverse of the
    /// orientation done by [`Window::extract`].
    fn to_canonical(&self, window: &Tensor) -> Result<Tensor> {
        match self.axis {
            None => Ok(window.shallow_clone()),
            Some(axis) => {
                let [height, width] = plane_axes(axis);
                let plane = if height > width {
                    window.f_transpose(1, 2)?
                } else {
                    window.shallow_clone()
                };
                Ok(plane.f_unsqueeze(axis.index() + 1)?)
            }
        }
    }
}

/// Every window of `mode` over a volume of spatial shape `shape` (X, Y, Z), in ivadomed's order: slices in
/// increasing position, patches of a slice row by row (height outer, width inner), subvolumes with Z fastest.
pub fn plan(mode: &SamplingMode, shape: [i64; 3]) -> Result<Vec<Window>> {
    ensure!(
        shape.iter().all(|&s| s > 0),
        "volume shape must be positive, got {shape:?}"
    );
    Ok(match mode {
        SamplingMode::Volume => vec![Window {
            axis: None,
            origin: [0; 3],
            extent: shape,
        }],
        SamplingMode::Subvolumes { length, stride } => {
            let grid = TileGrid::new(&shape, length, stride)?;
            grid.origins()
                .iter()
                .map(|o| Window {
                    axis: None,
                    origin: [o[0], o[1], o[2]],
                    extent: *length,
                })
                .collect()
        }
        SamplingMode::Slices { axis } => {
            let a = axis.index() as usize;
            (0..shape[a])
                .map(|s| {
                    let (mut origin, mut extent) = ([0; 3], shape);
                    origin[a] = s;
                    extent[a] = 1;
                    Window {
                        axis: Some(*axis),
                        origin,
                        extent,
                    }
                })
                .collect()
        }
        SamplingMode::Patches2D {
            axis,
            length,
            stride,
        } => {
            let a = axis.index() as usize;
            let [height, width] = plane_axes(*axis);
            let grid = TileGrid::new(&[shape[height], shape[width]], length, stride)?;
            let mut windows = Vec::with_capacity(shape[a] as usize * grid.len());
            for s in 0..shape[a] {
                for o in grid.origins() {
                    let (mut origin, mut extent) = ([0; 3], [1; 3]);
                    origin[a] = s;
                    origin[height] = o[0];
                    origin[width] = o[1];
                    extent[height] = length[0];
                    extent[width] = length[1];
                    windows.push(Window {
                        axis: Some(*axis),
                        origin,
                        extent,
                    });
                }
            }
            windows
        }
    })
}

/// ivadomed's `slice_filter_params`: which whole 2D slices to drop. Everything off by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SliceFilter {
    /// drop slices whose target is empty in every class
    pub filter_empty_mask: bool,
    /// drop slices where at least one class is empty
    pub filter_absent_class: bool,
    /// drop slices where any input channel is constant (ivadomed: std == 0)
    pub filter_empty_input: bool,
}

/// ivadomed's `patch_filter_params`: the same tests on 2D patches, at training time only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PatchFilter {
    pub filter_empty_mask: bool,
    pub filter_absent_class: bool,
    pub filter_empty_input: bool,
}

/// All the filters of one dataset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    pub slice: SliceFilter,
    pub patch: PatchFilter,
    /// `roi_params.slice_filter_roi`: keep a slice only if its ROI mask has more non-zero voxels than this.
    pub slice_filter_roi: Option<i64>,
}

/// Whether `input` (`[C, ...]`) and `target` (`[K, ...]`) pass the three ivadomed tests. Mask tests are
/// skipped without a target (inference).
fn passes(
    input: &Tensor,
    target: Option<&Tensor>,
    empty_mask: bool,
    absent_class: bool,
    empty_input: bool,
) -> Result<bool> {
    if let Some(target) = target {
        let per_class = target.f_ne(0.0)?.f_flatten(1, -1)?.f_any_dim(1, false)?;
        let present: Vec<bool> = Vec::<bool>::try_from(&per_class)?;
        if empty_mask && !present.iter().any(|&p| p) {
            return Ok(false);
        }
        if absent_class && !present.iter().all(|&p| p) {
            return Ok(false);
        }
    }
    if empty_input {
        // A constant channel (std 0): its maximum equals its minimum.
        let flat = input.f_flatten(1, -1)?;
        let constant = flat
            .f_amax(&[1i64][..], false)?
            .f_eq_tensor(&flat.f_amin(&[1i64][..], false)?)?;
        if Vec::<bool>::try_from(&constant)?.iter().any(|&c| c) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The windows of `mode` over `input` (`[C, X, Y, Z]`) that pass `filters`: the slice and ROI filters on each
/// whole slice of the 2D modes, then the patch filter on each patch when `training`. `target` is `[K, X, Y, Z]`
/// and `roi` `[1, X, Y, Z]`, both on `input`'s grid.
pub fn select(
    mode: &SamplingMode,
    input: &Tensor,
    target: Option<&Tensor>,
    roi: Option<&Tensor>,
    filters: &Filters,
    training: bool,
) -> Result<Vec<Window>> {
    let size = input.size();
    ensure!(
        size.len() == 4,
        "expected an input [C, X, Y, Z], got shape {size:?}"
    );
    for (name, other) in [("target", target), ("ROI", roi)] {
        if let Some(other) = other {
            ensure!(
                other.dim() == 4 && other.size()[1..] == size[1..],
                "the {name} has shape {:?} but the input is {size:?}: they must share the grid [_, X, Y, Z]",
                other.size()
            );
        }
    }
    let shape = [size[1], size[2], size[3]];
    let windows = plan(mode, shape)?;
    let axis = match mode {
        SamplingMode::Slices { axis } | SamplingMode::Patches2D { axis, .. } => *axis,
        SamplingMode::Subvolumes { .. } | SamplingMode::Volume => return Ok(windows),
    };
    if filters.slice_filter_roi.is_some() && roi.is_none() {
        bail!("roi_params.slice_filter_roi is set but this sample has no ROI mask");
    }
    let a = axis.index();
    let mut kept_slices = vec![true; shape[a as usize] as usize];
    for (s, keep) in kept_slices.iter_mut().enumerate() {
        let s = s as i64;
        let input_slice = input.f_select(a + 1, s)?;
        let target_slice = target.map(|t| t.f_select(a + 1, s)).transpose()?;
        let f = filters.slice;
        *keep = passes(
            &input_slice,
            target_slice.as_ref(),
            f.filter_empty_mask,
            f.filter_absent_class,
            f.filter_empty_input,
        )?;
        if let (true, Some(threshold), Some(roi)) = (*keep, filters.slice_filter_roi, roi) {
            let count = roi
                .f_select(a + 1, s)?
                .f_count_nonzero(None::<i64>)?
                .int64_value(&[]);
            *keep = count > threshold;
        }
    }
    let patch = filters.patch;
    let patch_filtering = training
        && matches!(mode, SamplingMode::Patches2D { .. })
        && (patch.filter_empty_mask || patch.filter_absent_class || patch.filter_empty_input);
    let mut selected = Vec::new();
    for window in windows {
        if !kept_slices[window.slice_index().unwrap_or(0) as usize] {
            continue;
        }
        if patch_filtering {
            let input_patch = window.extract(input)?;
            let target_patch = target.map(|t| window.extract(t)).transpose()?;
            if !passes(
                &input_patch,
                target_patch.as_ref(),
                patch.filter_empty_mask,
                patch.filter_absent_class,
                patch.filter_empty_input,
            )? {
                continue;
            }
        }
        selected.push(window);
    }
    Ok(selected)
}

/// Puts window predictions back into a volume `[C, X, Y, Z]`, averaging where windows overlap. Voxels no
/// window covered (filtered slices) come out as zeros, as ivadomed fills the slices it skipped.
pub struct Reconstructor {
    shape: [i64; 3],
    channels: i64,
    /// (sum `[C, X, Y, Z]`, count `[1, X, Y, Z]`), allocated on the first prediction's device and kind
    accumulators: Option<(Tensor, Tensor)>,
}

impl Reconstructor {
    pub fn new(shape: [i64; 3], channels: i64) -> Result<Reconstructor> {
        ensure!(
            channels > 0 && shape.iter().all(|&s| s > 0),
            "reconstruction needs positive channels and shape, got {channels} x {shape:?}"
        );
        Ok(Reconstructor {
            shape,
            channels,
            accumulators: None,
        })
    }

    /// Adds `prediction` (`[C, ...window.shape()]`) for `window`.
    pub fn add(&mut self, window: &Window, prediction: &Tensor) -> Result<()> {
        let mut expected = vec![self.channels];
        expected.extend(window.shape());
        ensure!(
            prediction.size() == expected,
            "window at {:?}: expected a prediction {expected:?}, got {:?}",
            window.origin,
            prediction.size()
        );
        if self.accumulators.is_none() {
            let kind = if prediction.kind() == Kind::Double {
                Kind::Double
            } else {
                Kind::Float
            };
            let device = prediction.device();
            let [x, y, z] = self.shape;
            let sum = Tensor::f_zeros([self.channels, x, y, z], (kind, device))?;
            let count = Tensor::f_zeros([1, x, y, z], (kind, device))?;
            self.accumulators = Some((sum, count));
        }
        let Some((sum, count)) = &self.accumulators else {
            bail!("accumulators were not allocated");
        };
        let mut values = window
            .to_canonical(&prediction.detach())?
            .f_to_device(sum.device())?
            .f_to_kind(sum.kind())?;
        let (mut sum_view, mut count_view) = (sum.shallow_clone(), count.shallow_clone());
        for axis in 0..3 {
            let (start, end) = (
                window.origin[axis],
                window.origin[axis] + window.extent[axis],
            );
            let (first, last) = (start.max(0), end.min(self.shape[axis]));
            ensure!(
                first < last,
                "window at {:?} lies outside the volume",
                window.origin
            );
            let dim = axis as i64 + 1;
            values = values.f_narrow(dim, first - start, last - first)?;
            sum_view = sum_view.f_narrow(dim, first, last - first)?;
            count_view = count_view.f_narrow(dim, first, last - first)?;
        }
        // In place through the views: the accumulators change; the returned handles are not needed.
        let _ = sum_view.f_add_(&values)?;
        let _ = count_view.f_add_scalar_(1.0)?;
        Ok(())
    }

    /// The averaged volume `[C, X, Y, Z]`.
    pub fn finish(self) -> Result<Tensor> {
        let Some((sum, count)) = self.accumulators else {
            bail!("no prediction was added");
        };
        Ok(sum.f_div(&count.f_clamp_min(1.0)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[C, X, Y, Z]` holding 0, 1, 2, ... : integer-valued, so averages of equal copies are exact and
    /// every voxel is distinct (a misplaced window cannot go unnoticed).
    fn numbered(shape: [i64; 4]) -> Tensor {
        Tensor::arange(
            shape.iter().product::<i64>(),
            (Kind::Float, tch::Device::Cpu),
        )
        .reshape(shape)
    }

    fn round_trip(volume: &Tensor, mode: &SamplingMode) -> (usize, Tensor) {
        let size = volume.size();
        let windows = plan(mode, [size[1], size[2], size[3]]).unwrap();
        let mut rebuilt = Reconstructor::new([size[1], size[2], size[3]], size[0]).unwrap();
        for window in &windows {
            let piece = window.extract(volume).unwrap();
            assert_eq!(piece.size()[1..], window.shape()[..], "{mode:?}");
            rebuilt.add(window, &piece).unwrap();
        }
        (windows.len(), rebuilt.finish().unwrap())
    }

    #[test]
    fn every_mode_round_trips_bit_for_bit() {
        // 7 x 9 x 5 is a multiple of none of the tiles below, so every axis ends with a partial tile.
        let volume = numbered([2, 7, 9, 5]);
        let mut modes = vec![SamplingMode::Volume];
        for axis in SliceAxis::ALL {
            modes.push(SamplingMode::Slices { axis });
            for (length, stride) in [
                ([4, 4], [3, 3]),
                ([4, 4], [4, 4]),
                ([2, 3], [1, 2]),
                ([5, 2], [5, 2]),
                // larger than the plane on one axis: zero padding, cropped away again
                ([8, 3], [8, 3]),
            ] {
                modes.push(SamplingMode::Patches2D {
                    axis,
                    length,
                    stride,
                });
            }
        }
        for (length, stride) in [
            ([4, 4, 4], [3, 3, 3]),
            ([4, 4, 4], [4, 4, 4]),
            ([3, 5, 2], [2, 3, 1]),
            ([7, 9, 5], [7, 9, 5]),
            ([8, 4, 6], [4, 4, 6]),
        ] {
            modes.push(SamplingMode::Subvolumes { length, stride });
        }
        for mode in &modes {
            let (_, rebuilt) = round_trip(&volume, mode);
            assert!(rebuilt.equal(&volume), "{mode:?} does not round-trip");
        }
    }

    #[test]
    fn window_counts_and_origins_follow_ivadomed() {
        // Axial patches 4 x 4 every 3 over X = 7 (starts 0, 3) and Y = 9 (starts 0, 3, 5 = 9 - 4, the last
        // flush with the end as ivadomed's prepare_indices clamps it), on each of the 5 slices.
        let mode = SamplingMode::Patches2D {
            axis: SliceAxis::Axial,
            length: [4, 4],
            stride: [3, 3],
        };
        let windows = plan(&mode, [7, 9, 5]).unwrap();
        assert_eq!(windows.len(), 2 * 3 * 5);
        let first_slice: Vec<[i64; 3]> = windows[..6].iter().map(|w| w.origin).collect();
        assert_eq!(
            first_slice,
            [
                [0, 0, 0],
                [0, 3, 0],
                [0, 5, 0],
                [3, 0, 0],
                [3, 3, 0],
                [3, 5, 0]
            ]
        );
        // Subvolumes 4^3 every 3 over 7 x 9 x 5: 2 x 3 x 2.
        let mode = SamplingMode::Subvolumes {
            length: [4; 3],
            stride: [3; 3],
        };
        assert_eq!(plan(&mode, [7, 9, 5]).unwrap().len(), 12);
        let slices = SamplingMode::Slices {
            axis: SliceAxis::Coronal,
        };
        assert_eq!(plan(&slices, [7, 9, 5]).unwrap().len(), 9);
    }

    #[test]
    fn slices_are_oriented_as_ivadomed() {
        let volume = numbered([1, 7, 9, 5]);
        let value = |t: &Tensor, index: &[i64]| t.double_value(index);
        // Sagittal slice x = 2 is (Z, Y): element [h, w] is voxel (2, w, h).
        let sagittal = plan(
            &SamplingMode::Slices {
                axis: SliceAxis::Sagittal,
            },
            [7, 9, 5],
        )
        .unwrap();
        let slice = sagittal[2].extract(&volume).unwrap();
        assert_eq!(slice.size(), [1, 5, 9]);
        assert_eq!(value(&slice, &[0, 4, 6]), value(&volume, &[0, 2, 6, 4]));
        // Coronal slice y = 3 is (Z, X): element [h, w] is voxel (w, 3, h).
        let coronal = plan(
            &SamplingMode::Slices {
                axis: SliceAxis::Coronal,
            },
            [7, 9, 5],
        )
        .unwrap();
        let slice = coronal[3].extract(&volume).unwrap();
        assert_eq!(slice.size(), [1, 5, 7]);
        assert_eq!(value(&slice, &[0, 1, 6]), value(&volume, &[0, 6, 3, 1]));
        // Axial slice z = 4 is (X, Y).
        let axial = plan(
            &SamplingMode::Slices {
                axis: SliceAxis::Axial,
            },
            [7, 9, 5],
        )
        .unwrap();
        let slice = axial[4].extract(&volume).unwrap();
        assert_eq!(slice.size(), [1, 7, 9]);
        assert_eq!(value(&slice, &[0, 5, 8]), value(&volume, &[0, 5, 8, 4]));
    }

    #[test]
    fn overlaps_average_and_uncovered_voxels_are_zero() {
        // X = 5 in patches of 3 every 2: windows at x = 0 and x = 2 overlap at x = 2.
        let mode = SamplingMode::Patches2D {
            axis: SliceAxis::Axial,
            length: [3, 1],
            stride: [2, 1],
        };
        let windows = plan(&mode, [5, 1, 2]).unwrap();
        assert_eq!(windows.len(), 4);
        let mut rebuilt = Reconstructor::new([5, 1, 2], 1).unwrap();
        // Only slice z = 0 gets predictions (10 and 20); slice z = 1 stays uncovered.
        rebuilt
            .add(
                &windows[0],
                &Tensor::full([1, 3, 1], 10.0, (Kind::Float, tch::Device::Cpu)),
            )
            .unwrap();
        rebuilt
            .add(
                &windows[1],
                &Tensor::full([1, 3, 1], 20.0, (Kind::Float, tch::Device::Cpu)),
            )
            .unwrap();
        let volume = rebuilt.finish().unwrap();
        let z0: Vec<f32> = Vec::try_from(volume.select(3, 0).flatten(0, -1)).unwrap();
        assert_eq!(z0, [10.0, 10.0, 15.0, 20.0, 20.0]);
        let z1: Vec<f32> = Vec::try_from(volume.select(3, 1).flatten(0, -1)).unwrap();
        assert_eq!(z1, [0.0; 5]);
    }

    /// An input `[1, 6, 6, 10]` whose axial slices z = 0 and 1 are constant (empty input), and a 2-class
    /// target: class 0 on x = 1..=2 of z = 4..=7, class 1 on x = 2 of z = 5 and 6 only.
    fn built_volume() -> (Tensor, Tensor) {
        let input = numbered([1, 6, 6, 10]) + 1.0;
        let _ = input.narrow(3, 0, 2).fill_(0.0);
        let target = Tensor::zeros([2, 6, 6, 10], (Kind::Float, tch::Device::Cpu));
        let _ = target
            .narrow(3, 4, 4)
            .narrow(1, 1, 2)
            .narrow(0, 0, 1)
            .fill_(1.0);
        let _ = target
            .narrow(3, 5, 2)
            .narrow(1, 2, 1)
            .narrow(0, 1, 1)
            .fill_(1.0);
        (input, target)
    }

    fn kept_slices(windows: &[Window]) -> Vec<i64> {
        let mut slices: Vec<i64> = windows.iter().filter_map(Window::slice_index).collect();
        slices.dedup();
        slices
    }

    #[test]
    fn slice_filters_drop_exactly_the_empty_slices() {
        let (input, target) = built_volume();
        let axial = SamplingMode::Slices {
            axis: SliceAxis::Axial,
        };
        let select_with = |slice: SliceFilter| {
            let filters = Filters {
                slice,
                ..Filters::default()
            };
            kept_slices(&select(&axial, &input, Some(&target), None, &filters, true).unwrap())
        };
        assert_eq!(
            select_with(SliceFilter::default()),
            (0..10).collect::<Vec<_>>()
        );
        let empty_input = SliceFilter {
            filter_empty_input: true,
            ..SliceFilter::default()
        };
        assert_eq!(select_with(empty_input), (2..10).collect::<Vec<_>>());
        let empty_mask = SliceFilter {
            filter_empty_mask: true,
            ..SliceFilter::default()
        };
        assert_eq!(select_with(empty_mask), [4, 5, 6, 7]);
        let absent_class = SliceFilter {
            filter_absent_class: true,
            ..SliceFilter::default()
        };
        assert_eq!(select_with(absent_class), [5, 6]);
        // Without a target (inference) the mask filters have nothing to test.
        let filters = Filters {
            slice: empty_mask,
            ..Filters::default()
        };
        assert_eq!(
            select(&axial, &input, None, None, &filters, false)
                .unwrap()
                .len(),
            10
        );
    }

    #[test]
    fn patch_filter_applies_at_training_only() {
        let (input, target) = built_volume();
        // Patches 3 x 3 over the 6 x 6 axial plane: 4 per slice, 40 in all. Class 0 covers x = 1..=2
        // (all y) on z = 4..=7 and class 1 lies within it, so only the 2 patches with x origin 0 of those 4
        // slices have any target: 8 patches.
        let mode = SamplingMode::Patches2D {
            axis: SliceAxis::Axial,
            length: [3, 3],
            stride: [3, 3],
        };
        let filters = Filters {
            patch: PatchFilter {
                filter_empty_mask: true,
                ..PatchFilter::default()
            },
            ..Filters::default()
        };
        let training = select(&mode, &input, Some(&target), None, &filters, true).unwrap();
        assert_eq!(training.len(), 8);
        assert!(training.iter().all(|w| w.origin[0] == 0));
        let inference = select(&mode, &input, Some(&target), None, &filters, false).unwrap();
        assert_eq!(inference.len(), 40);
    }

    #[test]
    fn roi_filter_keeps_slices_with_more_roi_voxels_than_the_threshold() {
        let input = numbered([1, 4, 6, 5]);
        // Coronal slice y = k holds k ROI voxels (y = 0..=5).
        let roi = Tensor::zeros([1, 4, 6, 5], (Kind::Float, tch::Device::Cpu));
        for y in 0..6i64 {
            for k in 0..y {
                let _ = roi.get(0).get(k % 4).get(y).get(k / 4).fill_(1.0);
            }
        }
        let mode = SamplingMode::Slices {
            axis: SliceAxis::Coronal,
        };
        let filters = Filters {
            slice_filter_roi: Some(3),
            ..Filters::default()
        };
        let kept = select(&mode, &input, None, Some(&roi), &filters, true).unwrap();
        assert_eq!(kept_slices(&kept), [4, 5]);
        let error = select(&mode, &input, None, None, &filters, true).unwrap_err();
        assert!(error.to_string().contains("no ROI mask"), "{error}");
    }
}
