//! Cutting volumes into 2D slices, 2D patches or 3D subvolumes, and stitching predictions back together.
//!
//! ivadomed samples patches with `length_2D`/`stride_2D` (`MRI2DSegmentationDataset.prepare_indices`) and
//! subvolumes with `length_3D`/`stride_3D` (`MRI3DSubVolumeSegmentationDataset`), and rebuilds a volume by
//! averaging overlapping predictions (`image_reconstruction`, `volume_reconstruction`). [`TileGrid`] places
//! tiles as ivadomed's 2D patching does: origins 0, stride, 2·stride, … along each axis plus a last tile
//! flush with the end, so any size is covered exactly without padding. ivadomed's 3D loader instead demands
//! `(size - length) % stride == 0` and `length % 16 == 0`; the grid here does not, and it also accepts a
//! volume smaller than the tile along an axis (ivadomed raises), padding it with zeros on both sides as
//! nnU-Net does and cropping the padding away again when stitching.
//!
//! [`Stitcher`] accumulates weighted tiles into a sum and a weight map and divides at the end. Weights are
//! either uniform (ivadomed's plain average) or nnU-Net's Gaussian importance map, which trusts tile centres
//! more than tile borders.
//!
//! Everything is tensor operations on the tensors' own device, so CPU and CUDA work alike.
use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// nnU-Net's default: sigma = tile size / 8 along each axis.
pub const DEFAULT_SIGMA_SCALE: f64 = 1.0 / 8.0;

/// Where tiles sit over a 2D or 3D volume (spatial shape only; channels come first in the tensors).
#[derive(Clone, Debug, PartialEq)]
pub struct TileGrid {
    volume_shape: Vec<i64>,
    tile: Vec<i64>,
    stride: Vec<i64>,
    /// Zeros added before the volume along each axis (non-zero only where the volume is smaller than the tile).
    pad_before: Vec<i64>,
    /// Volume shape after padding: `max(size, tile)` per axis.
    padded_shape: Vec<i64>,
    /// Tile origins in the volume's coordinates, last axis fastest (ivadomed's loop order). An origin is
    /// negative where the tile overhangs a volume smaller than itself into the zero padding.
    origins: Vec<Vec<i64>>,
}

impl TileGrid {
    /// A grid of `tile`-sized tiles every `stride` voxels over a volume of `volume_shape` (2 or 3 axes).
    pub fn new(volume_shape: &[i64], tile: &[i64], stride: &[i64]) -> Result<TileGrid> {
        let rank = volume_shape.len();
        ensure!(
            rank == 2 || rank == 3,
            "tiling works on 2D or 3D volumes, got a volume shape with {rank} axes ({volume_shape:?})"
        );
        ensure!(
            tile.len() == rank,
            "tile size {tile:?} has {} axes but the volume shape {volume_shape:?} has {rank}",
            tile.len()
        );
        ensure!(
            stride.len() == rank,
            "stride {stride:?} has {} axes but the volume shape {volume_shape:?} has {rank}",
            stride.len()
        );
        for axis in 0..rank {
            let (size, length, step) = (volume_shape[axis], tile[axis], stride[axis]);
            ensure!(
                size > 0,
                "volume size must be positive, got {size} along axis {axis}"
            );
            ensure!(
                length > 0,
                "tile size must be positive, got {length} along axis {axis}"
            );
            ensure!(
                step > 0,
                "stride must be positive, got {step} along axis {axis}"
            );
            ensure!(
                step <= length,
                "stride {step} is larger than the tile size {length} along axis {axis}: \
                 voxels between tiles would never be covered"
            );
        }
        let pad_before: Vec<i64> = (0..rank)
            .map(|a| (tile[a] - volume_shape[a]).max(0) / 2)
            .collect();
        let padded_shape: Vec<i64> = (0..rank).map(|a| volume_shape[a].max(tile[a])).collect();
        let per_axis: Vec<Vec<i64>> = (0..rank)
            .map(|a| axis_origins(padded_shape[a], tile[a], stride[a], pad_before[a]))
            .collect();
        let mut origins = vec![Vec::new()];
        for axis_starts in &per_axis {
            origins = origins
                .into_iter()
                .flat_map(|prefix: Vec<i64>| {
                    axis_starts.iter().map(move |&start| {
                        let mut origin = prefix.clone();
                        origin.push(start);
                        origin
                    })
                })
                .collect();
        }
        Ok(TileGrid {
            volume_shape: volume_shape.to_vec(),
            tile: tile.to_vec(),
            stride: stride.to_vec(),
            pad_before,
            padded_shape,
            origins,
        })
    }

    /// Number of spatial axes (2 or 3).
    pub fn rank(&self) -> usize {
        self.volume_shape.len()
    }

    /// Number of tiles.
    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// Always false: a valid grid has at least one tile per axis.
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    pub fn volume_shape(&self) -> &[i64] {
        &self.volume_shape
    }

    pub fn tile_shape(&self) -> &[i64] {
        &self.tile
    }

    pub fn stride(&self) -> &[i64] {
        &self.stride
    }

    /// Tile origins in the volume's coordinates, last axis fastest. Tile `i` spans
    /// `origins()[i][a] .. origins()[i][a] + tile_shape()[a]` along axis `a`; parts outside `0..size` are
    /// zero padding (only where the volume is smaller than the tile).
    pub fn origins(&self) -> &[Vec<i64>] {
        &self.origins
    }

    /// Number of tiles along each axis: `ceil((size - tile) / stride) + 1`, or 1 where the volume is smaller
    /// than the tile.
    pub fn tiles_per_axis(&self) -> Vec<usize> {
        (0..self.rank())
            .map(|a| {
                axis_origins(
                    self.padded_shape[a],
                    self.tile[a],
                    self.stride[a],
                    self.pad_before[a],
                )
                .len()
            })
            .collect()
    }

    /// Zeros added `(before, after)` each axis, non-zero only where the volume is smaller than the tile.
    pub fn padding(&self) -> Vec<(i64, i64)> {
        (0..self.rank())
            .map(|a| {
                let before = self.pad_before[a];
                (before, self.padded_shape[a] - self.volume_shape[a] - before)
            })
            .collect()
    }

    fn needs_padding(&self) -> bool {
        self.padded_shape != self.volume_shape
    }

    fn check_index(&self, index: usize) -> Result<()> {
        ensure!(
            index < self.len(),
            "tile index {index} is out of range: the grid has {} tiles",
            self.len()
        );
        Ok(())
    }

    /// `volume` ([C, ...spatial]) zero-padded to the padded shape (the same tensor when no padding is needed).
    fn padded_volume(&self, volume: &Tensor) -> Result<Tensor> {
        let size = volume.size();
        ensure!(
            size.len() == self.rank() + 1 && size[1..] == self.volume_shape[..],
            "expected a volume [C, {}] but got {size:?}",
            join(&self.volume_shape)
        );
        if !self.needs_padding() {
            return Ok(volume.shallow_clone());
        }
        // constant_pad_nd lists (before, after) pairs from the last axis backwards.
        let pad: Vec<i64> = self
            .padding()
            .iter()
            .rev()
            .flat_map(|&(before, after)| [before, after])
            .collect();
        Ok(volume.f_constant_pad_nd(pad.as_slice())?)
    }

    /// Tile `index` as a view of `padded` (or of any [.., C, ...padded_shape] tensor): narrowing the spatial
    /// axes, which are the last `rank` ones.
    fn cut(&self, padded: &Tensor, index: usize) -> Result<Tensor> {
        let leading = padded.dim() as i64 - self.rank() as i64;
        let mut view = padded.shallow_clone();
        for (axis, &start) in self.origins[index].iter().enumerate() {
            view = view.f_narrow(
                leading + axis as i64,
                start + self.pad_before[axis],
                self.tile[axis],
            )?;
        }
        Ok(view)
    }

    /// Every tile of `volume` ([C, ...spatial]) as [C, ...tile], in `origins()` order. Tiles are views that
    /// share the volume's storage (or its padded copy).
    pub fn extract(&self, volume: &Tensor) -> Result<Vec<Tensor>> {
        let padded = self.padded_volume(volume)?;
        (0..self.len()).map(|i| self.cut(&padded, i)).collect()
    }

    /// Tile `index` of `volume` ([C, ...spatial]) as [C, ...tile].
    pub fn extract_tile(&self, volume: &Tensor, index: usize) -> Result<Tensor> {
        self.check_index(index)?;
        let padded = self.padded_volume(volume)?;
        self.cut(&padded, index)
    }

    /// The tiles `indices` of `volume` ([C, ...spatial]) stacked into a batch [B, C, ...tile].
    pub fn extract_batch(&self, volume: &Tensor, indices: &[usize]) -> Result<Tensor> {
        ensure!(
            !indices.is_empty(),
            "extract_batch needs at least one tile index"
        );
        for &index in indices {
            self.check_index(index)?;
        }
        let padded = self.padded_volume(volume)?;
        let tiles = indices
            .iter()
            .map(|&i| self.cut(&padded, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::f_stack(&tiles, 0)?)
    }
}

/// Tile starts along one axis in volume coordinates: 0, stride, … while the tile fits, then one flush with
/// the end (ivadomed's 2D patch rule), shifted by the padding so a padded axis gets its single tile at
/// `-pad_before`.
fn axis_origins(padded_size: i64, tile: i64, stride: i64, pad_before: i64) -> Vec<i64> {
    let last = padded_size - tile;
    let mut starts: Vec<i64> = (0..=last).step_by(stride as usize).collect();
    if *starts.last().unwrap_or(&-1) != last {
        starts.push(last);
    }
    starts.into_iter().map(|s| s - pad_before).collect()
}

fn join(values: &[i64]) -> String {
    values
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// How much each voxel of a tile counts when overlapping tiles are averaged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Weighting {
    /// Every voxel counts once: ivadomed's plain average of overlapping predictions.
    Uniform,
    /// nnU-Net's importance map: a Gaussian centred on the tile with sigma = tile size × `sigma_scale`.
    Gaussian { sigma_scale: f64 },
}

impl Weighting {
    /// Gaussian weighting with nnU-Net's default sigma (tile / 8).
    pub fn gaussian() -> Self {
        Weighting::Gaussian {
            sigma_scale: DEFAULT_SIGMA_SCALE,
        }
    }
}

/// The per-voxel weight of a tile (shape `tile`, f32, CPU).
///
/// Gaussian follows nnU-Net's `compute_gaussian`: a unit impulse at the tile centre (`tile // 2`) blurred
/// with scipy's `gaussian_filter` (kernel truncated at `int(4 sigma + 0.5)` voxels, zero outside), scaled
/// so the maximum is 1, and zeros raised to the smallest non-zero weight so no voxel is ever divided by 0.
/// The blur of an impulse is the kernel itself, and the kernel is separable, so the map is the product of
/// one truncated 1D Gaussian per axis.
pub fn importance_map(tile: &[i64], weighting: Weighting) -> Result<Tensor> {
    ensure!(
        tile.iter().all(|&t| t > 0),
        "tile size must be positive, got {tile:?}"
    );
    let sigma_scale = match weighting {
        Weighting::Uniform => {
            return Ok(Tensor::ones(tile, (Kind::Float, Device::Cpu)));
        }
        Weighting::Gaussian { sigma_scale } => sigma_scale,
    };
    ensure!(
        sigma_scale.is_finite() && sigma_scale > 0.0,
        "Gaussian sigma_scale must be a positive number, got {sigma_scale}"
    );
    let profiles: Vec<Vec<f64>> = tile
        .iter()
        .map(|&length| {
            let sigma = length as f64 * sigma_scale;
            let radius = (4.0 * sigma + 0.5).floor() as i64;
            let centre = length / 2;
            (0..length)
                .map(|i| {
                    let d = i - centre;
                    if d.abs() > radius {
                        0.0
                    } else {
                        (-0.5 * (d as f64 / sigma).powi(2)).exp()
                    }
                })
                .collect()
        })
        .collect();
    let mut weights = vec![1.0f64];
    for profile in &profiles {
        weights = weights
            .iter()
            .flat_map(|&w| profile.iter().map(move |&p| w * p))
            .collect();
    }
    let max = weights.iter().cloned().fold(0.0, f64::max);
    let mut weights: Vec<f32> = weights.iter().map(|&w| (w / max) as f32).collect();
    // After the f32 cast, so weights too small for f32 are raised as well.
    let smallest = weights
        .iter()
        .cloned()
        .filter(|&w| w > 0.0)
        .fold(f32::INFINITY, f32::min);
    for w in weights.iter_mut().filter(|w| **w == 0.0) {
        *w = smallest;
    }
    Ok(Tensor::from_slice(&weights).reshape(tile))
}

/// The weighted sum and weight map of the tiles added so far, on the first tile's device.
struct Accumulators {
    /// [C, ...padded_shape]
    sum: Tensor,
    /// [1, ...padded_shape], broadcast over channels.
    weight: Tensor,
    /// [1, ...tile] on the accumulators' device; None for uniform weighting (adds 1 without multiplying, so
    /// integer-valued predictions average bit for bit).
    tile_weights: Option<Tensor>,
}

/// Rebuilds a volume from predicted tiles by weighted averaging of overlaps.
pub struct Stitcher {
    grid: TileGrid,
    channels: i64,
    weighting: Weighting,
    importance: Tensor,
    added: Vec<u32>,
    accumulators: Option<Accumulators>,
}

impl Stitcher {
    /// A stitcher for tiles of `channels` channels over `grid`. Buffers are allocated on the first
    /// [`Stitcher::add`], on that tile's device, in f64 for f64 tiles and f32 otherwise.
    pub fn new(grid: &TileGrid, channels: i64, weighting: Weighting) -> Result<Stitcher> {
        ensure!(
            channels > 0,
            "the number of channels must be positive, got {channels}"
        );
        let importance = importance_map(&grid.tile, weighting)?.unsqueeze(0);
        Ok(Stitcher {
            grid: grid.clone(),
            channels,
            weighting,
            importance,
            added: vec![0; grid.len()],
            accumulators: None,
        })
    }

    pub fn grid(&self) -> &TileGrid {
        &self.grid
    }

    pub fn weighting(&self) -> Weighting {
        self.weighting
    }

    /// Adds the prediction `tile` ([C, ...tile]) for tile `index` of the grid. Adding a tile twice counts it
    /// twice (as test-time augmentation would).
    pub fn add(&mut self, index: usize, tile: &Tensor) -> Result<()> {
        self.grid.check_index(index)?;
        let mut expected = vec![self.channels];
        expected.extend_from_slice(&self.grid.tile);
        ensure!(
            tile.size() == expected,
            "tile {index}: expected a prediction [{}] but got {:?}",
            join(&expected),
            tile.size()
        );
        if self.accumulators.is_none() {
            self.accumulators = Some(self.allocate(tile)?);
        }
        let Some(accumulators) = self.accumulators.as_ref() else {
            bail!("accumulators were not allocated");
        };
        let prediction = tile
            .detach()
            .f_to_device(accumulators.sum.device())?
            .f_to_kind(accumulators.sum.kind())?;
        let mut sum = self.grid.cut(&accumulators.sum, index)?;
        let mut weight = self.grid.cut(&accumulators.weight, index)?;
        // In place through the views, so the accumulators themselves change; the returned handles are unused.
        match &accumulators.tile_weights {
            None => {
                let _ = sum.f_add_(&prediction)?;
                let _ = weight.f_add_scalar_(1.0)?;
            }
            Some(tile_weights) => {
                let _ = sum.f_add_(&prediction.f_mul(tile_weights)?)?;
                let _ = weight.f_add_(tile_weights)?;
            }
        }
        self.added[index] += 1;
        Ok(())
    }

    /// Zeroed buffers on `first_tile`'s device: f64 for f64 tiles, f32 otherwise.
    fn allocate(&self, first_tile: &Tensor) -> Result<Accumulators> {
        let device = first_tile.device();
        let kind = if first_tile.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        let mut shape = vec![self.channels];
        shape.extend_from_slice(&self.grid.padded_shape);
        let sum = Tensor::f_zeros(&shape, (kind, device))?;
        shape[0] = 1;
        let weight = Tensor::f_zeros(&shape, (kind, device))?;
        let tile_weights = match self.weighting {
            Weighting::Uniform => None,
            Weighting::Gaussian { .. } => {
                Some(self.importance.f_to_device(device)?.f_to_kind(kind)?)
            }
        };
        Ok(Accumulators {
            sum,
            weight,
            tile_weights,
        })
    }

    /// Adds a batch of predictions `tiles` ([B, C, ...tile]) for the grid tiles `indices` (B of them).
    pub fn add_batch(&mut self, indices: &[usize], tiles: &Tensor) -> Result<()> {
        ensure!(
            tiles.dim() == self.grid.rank() + 2 && tiles.size()[0] == indices.len() as i64,
            "expected a batch of {} predictions [B, C, ...tile] but got {:?}",
            indices.len(),
            tiles.size()
        );
        for (b, &index) in indices.iter().enumerate() {
            self.add(index, &tiles.f_get(b as i64)?)
                .with_context(|| format!("batch item {b}"))?;
        }
        Ok(())
    }

    /// The averaged volume [C, ...volume_shape] (padding cropped away). Fails if some voxel received no
    /// prediction, which happens only when tiles were skipped.
    pub fn finish(self) -> Result<Tensor> {
        let missing = self.added.iter().filter(|&&n| n == 0).count();
        let Some(accumulators) = self.accumulators else {
            bail!("no tiles were added: the grid has {}", self.grid.len());
        };
        let crop = |t: &Tensor| -> Result<Tensor> {
            let mut view = t.shallow_clone();
            for axis in 0..self.grid.rank() {
                view = view.f_narrow(
                    1 + axis as i64,
                    self.grid.pad_before[axis],
                    self.grid.volume_shape[axis],
                )?;
            }
            Ok(view)
        };
        let sum = crop(&accumulators.sum)?;
        let weight = crop(&accumulators.weight)?;
        let uncovered = weight.f_eq(0.0)?.f_sum(Kind::Int64)?.int64_value(&[]);
        if uncovered > 0 {
            bail!(
                "{uncovered} voxels received no prediction ({missing} of {} tiles were never added)",
                self.grid.len()
            );
        }
        Ok(sum.f_div(&weight)?)
    }
}

/// The anatomical slice axes, numbered as ivadomed's `slice_axis` (and the RAS canonical [X, Y, Z] order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceAxis {
    Sagittal = 0,
    Coronal = 1,
    Axial = 2,
}

impl SliceAxis {
    pub const ALL: [SliceAxis; 3] = [SliceAxis::Sagittal, SliceAxis::Coronal, SliceAxis::Axial];

    /// The spatial axis (0, 1 or 2) slices are taken along.
    pub fn index(self) -> i64 {
        self as i64
    }

    /// ivadomed's names: "sagittal", "coronal", "axial".
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "sagittal" => Ok(SliceAxis::Sagittal),
            "coronal" => Ok(SliceAxis::Coronal),
            "axial" => Ok(SliceAxis::Axial),
            other => bail!("unknown slice axis {other:?}: expected sagittal, coronal or axial"),
        }
    }

    /// ivadomed's numbers: sagittal 0, coronal 1, axial 2.
    pub fn from_index(index: i64) -> Result<Self> {
        match index {
            0 => Ok(SliceAxis::Sagittal),
            1 => Ok(SliceAxis::Coronal),
            2 => Ok(SliceAxis::Axial),
            other => {
                bail!("slice axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {other}")
            }
        }
    }
}

/// The 2D slices of `volume` ([..., X, Y, Z]: the last three axes are spatial, any leading ones such as
/// channels are kept) along `axis`, as views [..., A, B] in increasing position.
pub fn slices(volume: &Tensor, axis: SliceAxis) -> Result<Vec<Tensor>> {
    ensure!(
        volume.dim() >= 3,
        "slicing needs a volume with three spatial axes, got shape {:?}",
        volume.size()
    );
    let dim = volume.dim() as i64 - 3 + axis.index();
    Ok(volume.f_unbind(dim)?)
}

/// Stacks 2D slices ([..., A, B], all the same shape) back into a volume [..., X, Y, Z] along `axis`: the
/// inverse of [`slices`].
pub fn stack_slices(slices: &[Tensor], axis: SliceAxis) -> Result<Tensor> {
    let Some(first) = slices.first() else {
        bail!("cannot stack an empty list of slices");
    };
    ensure!(
        first.dim() >= 2,
        "slices need two spatial axes, got shape {:?}",
        first.size()
    );
    if let Some((i, odd)) = slices
        .iter()
        .enumerate()
        .find(|(_, s)| s.size() != first.size())
    {
        bail!(
            "slice {i} has shape {:?}, unlike slice 0 {:?}",
            odd.size(),
            first.size()
        );
    }
    let dim = first.dim() as i64 - 2 + axis.index();
    Ok(Tensor::f_stack(slices, dim)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [C, ...shape] f32 volume whose value is its flat index: every voxel differs, and sums of a few
    /// copies stay integers below 2^24, so averaging them is exact in f32.
    fn ramp(channels: i64, shape: &[i64]) -> Tensor {
        let mut full = vec![channels];
        full.extend_from_slice(shape);
        Tensor::arange(full.iter().product::<i64>(), (Kind::Float, Device::Cpu)).reshape(&full)
    }

    fn stitch(grid: &TileGrid, volume: &Tensor, weighting: Weighting) -> Tensor {
        let mut stitcher = Stitcher::new(grid, volume.size()[0], weighting).unwrap();
        for (index, tile) in grid.extract(volume).unwrap().iter().enumerate() {
            stitcher.add(index, tile).unwrap();
        }
        stitcher.finish().unwrap()
    }

    /// The brief's count formula, in floating point, independent of the integer stepping in `axis_origins`;
    /// an axis no larger than the tile holds one (padded) tile.
    fn expected_tiles(size: i64, tile: i64, stride: i64) -> usize {
        if size <= tile {
            1
        } else {
            ((size - tile) as f64 / stride as f64).ceil() as usize + 1
        }
    }

    /// (volume shape, tile, stride): multiples, non-multiples of tile and stride, tile equal to the volume,
    /// stride 1, and volumes smaller than the tile along some or all axes.
    const CONFIGS_2D: &[(&[i64], &[i64], &[i64])] = &[
        (&[16, 16], &[8, 8], &[8, 8]),
        (&[16, 16], &[8, 8], &[4, 4]),
        (&[17, 13], &[8, 6], &[5, 4]),
        (&[10, 11], &[4, 4], &[3, 3]),
        (&[7, 7], &[7, 7], &[1, 1]),
        (&[12, 9], &[5, 4], &[1, 2]),
        (&[5, 9], &[8, 4], &[4, 1]),
        (&[3, 3], &[8, 8], &[8, 8]),
    ];

    const CONFIGS_3D: &[(&[i64], &[i64], &[i64])] = &[
        (&[16, 16, 16], &[16, 16, 16], &[8, 8, 8]),
        (&[16, 16, 16], &[8, 8, 8], &[8, 8, 8]),
        (&[20, 18, 17], &[8, 8, 8], &[4, 6, 8]),
        (&[9, 10, 11], &[4, 5, 3], &[3, 2, 3]),
        (&[33, 16, 10], &[16, 16, 16], &[8, 8, 8]),
        (&[2, 3, 4], &[4, 4, 4], &[2, 2, 2]),
    ];

    fn all_configs(
    ) -> impl Iterator<Item = &'static (&'static [i64], &'static [i64], &'static [i64])> {
        CONFIGS_2D.iter().chain(CONFIGS_3D.iter())
    }

    #[test]
    fn tiling_tile_counts_match_the_formula() {
        for &(shape, tile, stride) in all_configs() {
            let grid = TileGrid::new(shape, tile, stride).unwrap();
            let per_axis: Vec<usize> = (0..shape.len())
                .map(|a| expected_tiles(shape[a], tile[a], stride[a]))
                .collect();
            assert_eq!(
                grid.tiles_per_axis(),
                per_axis,
                "{shape:?} {tile:?} {stride:?}"
            );
            assert_eq!(grid.len(), per_axis.iter().product::<usize>(), "{shape:?}");
        }
        // Hand counts: 11 voxels, tile 4, stride 3 -> starts 0, 3, 6 and the end-aligned 7.
        assert_eq!(TileGrid::new(&[11, 4], &[4, 4], &[3, 1]).unwrap().len(), 4);
        // 10 voxels -> 0, 3, 6 where 6 + 4 = 10 already ends flush.
        assert_eq!(TileGrid::new(&[10, 4], &[4, 4], &[3, 1]).unwrap().len(), 3);
    }

    #[test]
    fn tiling_origins_follow_ivadomed_order_and_align_the_last_tile() {
        // Axis 0: 11 voxels, tile 4, stride 3 -> 0, 3, 6, 7 (7 = 11 - 4). Axis 1: 3 voxels under an 8-voxel
        // tile -> one tile padded by (8 - 3) / 2 = 2 zeros before, so it starts at -2.
        let grid = TileGrid::new(&[11, 3], &[4, 8], &[3, 8]).unwrap();
        assert_eq!(
            grid.origins(),
            &[vec![0, -2], vec![3, -2], vec![6, -2], vec![7, -2]]
        );
        assert_eq!(grid.padding(), vec![(0, 0), (2, 3)]);
        // The last axis varies fastest, as in ivadomed's nested loops.
        let grid = TileGrid::new(&[10, 10], &[4, 4], &[3, 3]).unwrap();
        assert_eq!(
            grid.origins()[..4],
            [vec![0, 0], vec![0, 3], vec![0, 6], vec![3, 0]]
        );
    }

    #[test]
    fn tiling_covers_every_voxel_and_stays_inside_the_volume() {
        for &(shape, tile, stride) in all_configs() {
            let grid = TileGrid::new(shape, tile, stride).unwrap();
            // Count coverage with plain loops over the origins (3D shapes; 2D ones get a unit third axis).
            let dims: Vec<i64> = (0..3).map(|a| shape.get(a).copied().unwrap_or(1)).collect();
            let mut covered = vec![0u32; dims.iter().product::<i64>() as usize];
            for origin in grid.origins() {
                let range = |a: usize| -> std::ops::Range<i64> {
                    match origin.get(a) {
                        Some(&start) => start.max(0)..(start + tile[a]).min(shape[a]),
                        None => 0..1,
                    }
                };
                for x in range(0) {
                    for y in range(1) {
                        for z in range(2) {
                            covered[((x * dims[1] + y) * dims[2] + z) as usize] += 1;
                        }
                    }
                }
                for (a, &start) in origin.iter().enumerate() {
                    if shape[a] >= tile[a] {
                        assert!(
                            start >= 0 && start + tile[a] <= shape[a],
                            "{shape:?}: tile {origin:?} leaves the volume"
                        );
                    } else {
                        // Centred in its zero padding.
                        assert_eq!(start, -((tile[a] - shape[a]) / 2), "{shape:?}");
                    }
                }
            }
            assert!(
                covered.iter().all(|&n| n >= 1),
                "{shape:?} {tile:?} {stride:?}: uncovered voxels"
            );
            // The end-aligned tile reaches the last voxel on every axis.
            for a in 0..shape.len() {
                let last = grid.origins().iter().map(|o| o[a]).max().unwrap();
                assert_eq!(
                    last + tile[a],
                    shape[a].max(tile[a]) - (tile[a] - shape[a]).max(0) / 2
                );
            }
            let mut distinct = grid.origins().to_vec();
            distinct.dedup();
            assert_eq!(distinct.len(), grid.len(), "{shape:?}: repeated tile");
        }
    }

    #[test]
    fn tiling_uniform_round_trip_is_bit_exact_for_patches_and_subvolumes() {
        for &(shape, tile, stride) in all_configs() {
            let grid = TileGrid::new(shape, tile, stride).unwrap();
            let volume = ramp(2, shape);
            let rebuilt = stitch(&grid, &volume, Weighting::Uniform);
            assert_eq!(rebuilt.kind(), Kind::Float);
            assert!(
                rebuilt.equal(&volume),
                "{shape:?} {tile:?} {stride:?}: round trip changed values"
            );
        }
        // f64 predictions accumulate and come back in f64.
        let grid = TileGrid::new(&[9, 10, 11], &[4, 5, 3], &[3, 2, 3]).unwrap();
        let volume = ramp(1, &[9, 10, 11]).to_kind(Kind::Double);
        let rebuilt = stitch(&grid, &volume, Weighting::Uniform);
        assert_eq!(rebuilt.kind(), Kind::Double);
        assert!(rebuilt.equal(&volume));
    }

    #[test]
    fn tiling_gaussian_round_trip_is_exact_within_float_tolerance() {
        for &(shape, tile, stride) in all_configs() {
            let grid = TileGrid::new(shape, tile, stride).unwrap();
            let volume = ramp(2, shape);
            let rebuilt = stitch(&grid, &volume, Weighting::gaussian());
            // Σ w·x / Σ w = x up to f32 rounding: a few ulps relative to the value.
            let error = (&rebuilt - &volume).abs() / volume.abs().clamp_min(1.0);
            let worst = error.max().double_value(&[]);
            assert!(
                worst < 1e-5,
                "{shape:?} {tile:?} {stride:?}: relative error {worst}"
            );
        }
    }

    #[test]
    fn tiling_overlaps_average_as_computed_by_hand() {
        // One row of 6 voxels, tiles of 4 every 2: tile 0 covers 0..4, tile 1 covers 2..6.
        let grid = TileGrid::new(&[1, 6], &[1, 4], &[1, 2]).unwrap();
        assert_eq!(grid.origins(), &[vec![0, 0], vec![0, 2]]);
        let two = Tensor::full([1, 1, 4], 2.0, (Kind::Float, Device::Cpu));
        let four = Tensor::full([1, 1, 4], 4.0, (Kind::Float, Device::Cpu));

        let mut uniform = Stitcher::new(&grid, 1, Weighting::Uniform).unwrap();
        uniform.add(0, &two).unwrap();
        uniform.add(1, &four).unwrap();
        let mean = Vec::<f32>::try_from(uniform.finish().unwrap().reshape([-1])).unwrap();
        assert_eq!(mean, vec![2.0, 2.0, 3.0, 3.0, 4.0, 4.0]);

        // Gaussian along the 4-voxel axis: sigma 0.5, centre 2, radius int(4 * 0.5 + 0.5) = 2, so weights
        // at offsets -2, -1, 0, 1 are e^-8, e^-2, 1, e^-2 (the 1-voxel axis has weight 1). Voxel 2 is the
        // centre of tile 0 (weight 1) and the first voxel of tile 1 (weight e^-8); voxel 3 gets e^-2 from both.
        let mut gaussian = Stitcher::new(&grid, 1, Weighting::gaussian()).unwrap();
        gaussian.add(0, &two).unwrap();
        gaussian.add(1, &four).unwrap();
        let blended = Vec::<f32>::try_from(gaussian.finish().unwrap().reshape([-1])).unwrap();
        let e8 = (-8.0f64).exp();
        let voxel2 = (2.0 + 4.0 * e8) / (1.0 + e8);
        let expected = [2.0, 2.0, voxel2, 3.0, 4.0, 4.0];
        for (got, want) in blended.iter().zip(expected) {
            assert!(
                (*got as f64 - want).abs() < 1e-6,
                "{blended:?} vs {expected:?}"
            );
        }
    }

    #[test]
    fn tiling_gaussian_importance_map_matches_nnunet() {
        // Tile 8: sigma 1, centre 4, radius int(4.5) = 4, which reaches both borders; weight e^(-d²/2) per axis.
        let map = importance_map(&[8, 8], Weighting::gaussian()).unwrap();
        assert_eq!(map.size(), vec![8, 8]);
        let at = |m: &Tensor, i: i64, j: i64| m.double_value(&[i, j]);
        assert_eq!(at(&map, 4, 4), 1.0);
        assert!((at(&map, 4, 5) - (-0.5f64).exp()).abs() < 1e-7);
        assert!((at(&map, 5, 5) - (-1.0f64).exp()).abs() < 1e-7);
        assert!((at(&map, 0, 0) - (-16.0f64).exp()).abs() < 1e-12);
        assert!((at(&map, 7, 0) - (-12.5f64).exp()).abs() < 1e-12);

        // sigma_scale 1/16 on tile 16: sigma 1, radius 4 around centre 8, so offsets beyond 4 are cut to 0 and
        // then raised to the smallest non-zero weight, e^-16 at offsets (-4, -4).
        let narrow = importance_map(
            &[16, 16],
            Weighting::Gaussian {
                sigma_scale: 1.0 / 16.0,
            },
        )
        .unwrap();
        let floor = (-16.0f64).exp() as f32 as f64;
        assert_eq!(at(&narrow, 8, 8), 1.0);
        assert_eq!(at(&narrow, 4, 4), floor);
        assert_eq!(at(&narrow, 0, 0), floor);
        assert_eq!(at(&narrow, 8, 3), floor);
        assert_eq!(narrow.min().double_value(&[]), floor);

        // 3D: product over the axes, tile 4 -> sigma 0.5, centre 2.
        let cube = importance_map(&[4, 4, 4], Weighting::gaussian()).unwrap();
        let corner = cube.double_value(&[1, 2, 3]);
        assert!((corner - (-4.0f64).exp()).abs() < 1e-7, "{corner}");

        assert!(importance_map(&[4, 4], Weighting::Uniform)
            .unwrap()
            .equal(&Tensor::ones([4, 4], (Kind::Float, Device::Cpu))));
        let bad = importance_map(&[4, 4], Weighting::Gaussian { sigma_scale: 0.0 }).unwrap_err();
        assert!(bad.to_string().contains("sigma_scale"), "{bad}");
    }

    #[test]
    fn tiling_pads_volumes_smaller_than_the_tile_with_centred_zeros() {
        // 3 x 5 under a 4 x 8 tile: axis 0 gets 0 zeros before and 1 after, axis 1 gets 1 before and 2 after.
        let grid = TileGrid::new(&[3, 5], &[4, 8], &[4, 8]).unwrap();
        assert_eq!(grid.padding(), vec![(0, 1), (1, 2)]);
        let volume = ramp(1, &[3, 5]);
        let tiles = grid.extract(&volume).unwrap();
        assert_eq!(tiles.len(), 1);
        assert_eq!(tiles[0].size(), vec![1, 4, 8]);
        for r in 0..4 {
            for c in 0..8 {
                // The ramp's value at (r, c - 1) is r * 5 + c - 1.
                let want = if r < 3 && (1..=5).contains(&c) {
                    (r * 5 + c - 1) as f64
                } else {
                    0.0
                };
                assert_eq!(tiles[0].double_value(&[0, r, c]), want, "({r}, {c})");
            }
        }
        // The padding is cropped away again.
        let rebuilt = stitch(&grid, &volume, Weighting::Uniform);
        assert_eq!(rebuilt.size(), vec![1, 3, 5]);
        assert!(rebuilt.equal(&volume));
    }

    #[test]
    fn tiling_batches_match_single_tiles() {
        let shape = [9, 10, 11];
        let grid = TileGrid::new(&shape, &[4, 5, 3], &[3, 2, 3]).unwrap();
        let volume = ramp(2, &shape);
        let tiles = grid.extract(&volume).unwrap();
        let batch = grid.extract_batch(&volume, &[5, 0, 7]).unwrap();
        assert_eq!(batch.size(), vec![3, 2, 4, 5, 3]);
        assert!(batch.get(0).equal(&tiles[5]));
        assert!(batch.get(1).equal(&tiles[0]));
        assert!(batch.get(2).equal(&grid.extract_tile(&volume, 7).unwrap()));
        // Tile 5 starts where the grid says: compare with a direct slice of the ramp.
        let origin = &grid.origins()[5];
        let direct = volume
            .narrow(1, origin[0], 4)
            .narrow(2, origin[1], 5)
            .narrow(3, origin[2], 3);
        assert!(tiles[5].equal(&direct));

        // Stitching in batches of 4 rebuilds the volume as well.
        let indices: Vec<usize> = (0..grid.len()).collect();
        let mut stitcher = Stitcher::new(&grid, 2, Weighting::Uniform).unwrap();
        for chunk in indices.chunks(4) {
            let batch = grid.extract_batch(&volume, chunk).unwrap();
            stitcher.add_batch(chunk, &batch).unwrap();
        }
        assert!(stitcher.finish().unwrap().equal(&volume));
    }

    #[test]
    fn tiling_slices_round_trip_along_every_axis() {
        let (c, x, y, z) = (2, 3, 4, 5);
        let volume = ramp(c, &[x, y, z]);
        // Value of the ramp at (channel, i, j, k).
        let value = |ch: i64, i: i64, j: i64, k: i64| (((ch * x + i) * y + j) * z + k) as f64;
        for axis in SliceAxis::ALL {
            let cut = slices(&volume, axis).unwrap();
            let (count, shape) = match axis {
                SliceAxis::Sagittal => (x, vec![c, y, z]),
                SliceAxis::Coronal => (y, vec![c, x, z]),
                SliceAxis::Axial => (z, vec![c, x, y]),
            };
            assert_eq!(cut.len() as i64, count, "{axis:?}");
            for (s, slice) in cut.iter().enumerate() {
                let s = s as i64;
                assert_eq!(slice.size(), shape, "{axis:?}");
                // Element (1, 2, 1) of slice s, placed back at its 3D position.
                let want = match axis {
                    SliceAxis::Sagittal => value(1, s, 2, 1),
                    SliceAxis::Coronal => value(1, 2, s, 1),
                    SliceAxis::Axial => value(1, 2, 1, s),
                };
                assert_eq!(slice.double_value(&[1, 2, 1]), want, "{axis:?} slice {s}");
            }
            assert!(stack_slices(&cut, axis).unwrap().equal(&volume), "{axis:?}");
            // Without a channel axis too.
            let plain = volume.get(1);
            let back = stack_slices(&slices(&plain, axis).unwrap(), axis).unwrap();
            assert!(back.equal(&plain), "{axis:?} without channels");
        }
        assert_eq!(SliceAxis::from_name("coronal").unwrap(), SliceAxis::Coronal);
        assert_eq!(SliceAxis::from_index(2).unwrap(), SliceAxis::Axial);
    }

    #[test]
    fn tiling_patches_of_slices_round_trip_along_every_axis() {
        // The 2D patch path end to end: slice along an axis, patch each slice, stitch, restack.
        let volume = ramp(1, &[13, 9, 11]);
        for axis in SliceAxis::ALL {
            let cut = slices(&volume, axis).unwrap();
            let plane = &cut[0].size()[1..];
            for &(tile, stride) in &[
                ([4i64, 4i64], [3i64, 2i64]),
                ([16, 6], [16, 5]),
                ([5, 5], [5, 5]),
            ] {
                let grid = TileGrid::new(plane, &tile, &stride).unwrap();
                let rebuilt: Vec<Tensor> = cut
                    .iter()
                    .map(|slice| stitch(&grid, slice, Weighting::Uniform))
                    .collect();
                let back = stack_slices(&rebuilt, axis).unwrap();
                assert!(
                    back.equal(&volume),
                    "{axis:?} tile {tile:?} stride {stride:?}"
                );
            }
        }
    }

    fn message(result: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn tiling_rejects_bad_configurations_clearly() {
        let zero = message(TileGrid::new(&[10, 10], &[4, 4], &[0, 4]));
        assert!(
            zero.contains("stride must be positive, got 0 along axis 0"),
            "{zero}"
        );
        let gaps = message(TileGrid::new(&[10, 10], &[4, 4], &[4, 5]));
        assert!(
            gaps.contains("stride 5 is larger than the tile size 4 along axis 1"),
            "{gaps}"
        );
        let ranks = message(TileGrid::new(&[10, 10], &[4, 4, 4], &[2, 2, 2]));
        assert!(
            ranks.contains("tile size [4, 4, 4] has 3 axes but the volume shape [10, 10] has 2"),
            "{ranks}"
        );
        let strides = message(TileGrid::new(&[10, 10, 10], &[4, 4, 4], &[2, 2]));
        assert!(strides.contains("stride [2, 2] has 2 axes"), "{strides}");
        let one_d = message(TileGrid::new(&[10], &[4], &[2]));
        assert!(one_d.contains("2D or 3D"), "{one_d}");
        let empty_tile = message(TileGrid::new(&[10, 10], &[4, 0], &[2, 2]));
        assert!(
            empty_tile.contains("tile size must be positive"),
            "{empty_tile}"
        );

        let grid = TileGrid::new(&[8, 8], &[4, 4], &[4, 4]).unwrap();
        let wrong_volume = message(grid.extract(&ramp(1, &[8, 9])));
        assert!(
            wrong_volume.contains("expected a volume [C, 8, 8] but got [1, 8, 9]"),
            "{wrong_volume}"
        );
        let no_channels = message(grid.extract(&Tensor::zeros([8, 8], (Kind::Float, Device::Cpu))));
        assert!(no_channels.contains("expected a volume"), "{no_channels}");
        assert!(message(grid.extract_batch(&ramp(1, &[8, 8]), &[4])).contains("out of range"));

        let mut stitcher = Stitcher::new(&grid, 2, Weighting::Uniform).unwrap();
        let wrong_tile = message(stitcher.add(0, &ramp(1, &[4, 4])));
        assert!(
            wrong_tile.contains("expected a prediction [2, 4, 4] but got [1, 4, 4]"),
            "{wrong_tile}"
        );
        let index = message(stitcher.add(4, &ramp(2, &[4, 4])));
        assert!(
            index.contains("tile index 4 is out of range: the grid has 4 tiles"),
            "{index}"
        );
        assert!(message(stitcher.finish()).contains("no tiles were added"));

        assert!(message(SliceAxis::from_name("transverse")).contains("unknown slice axis"));
        assert!(message(SliceAxis::from_index(3)).contains("slice axis must be"));
        assert!(message(stack_slices(&[], SliceAxis::Axial)).contains("empty"));
        let mismatched = [ramp(1, &[2, 2]), ramp(1, &[2, 3])];
        assert!(message(stack_slices(&mismatched, SliceAxis::Axial)).contains("slice 1 has shape"));
        assert!(message(slices(&ramp(1, &[2]), SliceAxis::Axial)).contains("three spatial axes"));
    }

    #[test]
    fn tiling_finish_reports_voxels_left_without_prediction() {
        // Two tiles side by side; only the first is added, so the 4 voxels of the second are empty.
        let grid = TileGrid::new(&[1, 8], &[1, 4], &[1, 4]).unwrap();
        let mut stitcher = Stitcher::new(&grid, 1, Weighting::Uniform).unwrap();
        stitcher.add(0, &ramp(1, &[1, 4])).unwrap();
        let missing = message(stitcher.finish());
        assert!(
            missing.contains("4 voxels received no prediction (1 of 2 tiles were never added)"),
            "{missing}"
        );
        // Overlapping tiles may be skipped as long as every voxel is still covered (origins 0, 1, 2 here).
        let grid = TileGrid::new(&[1, 6], &[1, 4], &[1, 1]).unwrap();
        let volume = ramp(1, &[1, 6]);
        let mut stitcher = Stitcher::new(&grid, 1, Weighting::Uniform).unwrap();
        for index in [0, 2] {
            stitcher
                .add(index, &grid.extract_tile(&volume, index).unwrap())
                .unwrap();
        }
        assert!(stitcher.finish().unwrap().equal(&volume));
    }
}
