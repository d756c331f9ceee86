//! Resampling every tensor of a sample through a coordinate map with libtorch's `grid_sample` (or, for 3D float32
//! batches on the CPU, its Rust equivalent in `sampler`), for the random spatial transforms (affine, elastic). Runs
//! wherever the tensors live (CPU or GPU).
use crate::cpu::{all_binary, f32_data, fresh_f32_mut, new_f32};
use crate::geometry::{batch_spatial_shape, is_float};
use crate::sampler::{grid_sample, warp_affine, Padding};
use ivado_sdk::tch::{Device, Kind, Tensor};
use ivado_sdk::{Batch, PluginError, Result, Sample};
use std::collections::BTreeMap;

/// The spatial rank of a sample: from `image` (`[C, H, W]` or `[C, D, H, W]`) when it has one, else from the
/// length of its spacing.
pub fn sample_rank(sample: &Sample, who: &str) -> Result<usize> {
    let rank = match sample.tensors.get("image") {
        Some(image) => image.dim().saturating_sub(1),
        None => sample
            .spacing()
            .map_err(|e| PluginError(format!("{who}: no `image` to take the rank from, and {e}")))?
            .len(),
    };
    if rank == 2 || rank == 3 {
        Ok(rank)
    } else {
        Err(PluginError(format!(
            "{who}: samples must be 2D (`image` [C, H, W]) or 3D (`image` [C, D, H, W]), got {rank} spatial axes"
        )))
    }
}

/// Spatial rank, shared spatial shape and per-sample spacing of a batch.
pub struct BatchFrame {
    pub rank: usize,
    pub spacings: Vec<Vec<f64>>,
    pub shape: Vec<i64>,
    pub device: Device,
}

/// [`sample_rank`] of a batch: from `image` (`[B, C, ...]`) when it has one, else from the spacing's length.
pub fn batch_rank(batch: &Batch, who: &str) -> Result<usize> {
    let rank = match batch.tensors.get("image") {
        Some(image) => image.dim().saturating_sub(2),
        None => batch
            .metas
            .first()
            .and_then(|meta| meta.get("spacing"))
            .and_then(|spacing| spacing.as_array())
            .map(Vec::len)
            .ok_or_else(|| {
                PluginError(format!(
                    "{who}: no `image` to take the rank from, and the sample metadata has no `spacing` list"
                ))
            })?,
    };
    if rank == 2 || rank == 3 {
        Ok(rank)
    } else {
        Err(PluginError(format!(
            "{who}: samples must be 2D (`image` [C, H, W]) or 3D (`image` [C, D, H, W]), got {rank} spatial axes"
        )))
    }
}

/// Rank, shared spatial shape, each sample's checked spacing and the device of a batch.
pub fn batch_frame(batch: &Batch, who: &str) -> Result<BatchFrame> {
    let rank = batch_rank(batch, who)?;
    let shape = batch_spatial_shape(batch, rank, who)?;
    let spacings = batch.checked_spacings(rank, who)?;
    let device = batch
        .tensors
        .values()
        .next()
        .map(|t| t.device())
        .ok_or_else(|| PluginError(format!("{who}: the sample has no tensors")))?;
    Ok(BatchFrame {
        rank,
        spacings,
        shape,
        device,
    })
}

/// How one tensor is resampled by a warp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarpMode {
    /// Bi/trilinear: images, predictions and soft masks.
    Linear,
    /// Bi/trilinear, then `>= 0.5` -> 1: binary float masks stay binary (ivadomed's `label_augment`).
    LinearThreshold,
    /// Nearest neighbour: integer and boolean tensors (class indices, boolean masks).
    Nearest,
}

/// Whether every value of `tensor` is 0 or 1.
pub fn is_binary(tensor: &Tensor) -> Result<bool> {
    let ok = tensor
        .f_eq(0.0)?
        .f_logical_or(&tensor.f_eq(1.0)?)?
        .f_all()?;
    Ok(bool::try_from(&ok)?)
}

/// `label*` and `roi*` float tensors holding only 0 and 1 are thresholded after linear interpolation so they stay
/// binary; soft ones (e.g. after `DilateGT`) stay soft. Integer and boolean tensors are resampled nearest.
pub fn warp_mode(name: &str, tensor: &Tensor) -> Result<WarpMode> {
    if !is_float(tensor.f_kind()?) {
        return Ok(WarpMode::Nearest);
    }
    if (name.starts_with("label") || name.starts_with("roi")) && is_binary(tensor)? {
        return Ok(WarpMode::LinearThreshold);
    }
    Ok(WarpMode::Linear)
}

/// What lies outside the input grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outside {
    /// Zeros, with no interpolation towards them: a position past the outer voxel centres reads 0 (scipy
    /// `affine_transform`'s default `constant` mode, up to a 1e-3 voxel tolerance for rounding).
    Zero,
    /// Mirrored about the outer voxel edges (scipy `map_coordinates(mode="reflect")`).
    Reflect,
}

/// Samples the trailing spatial axes of `tensor` at `grid` (`[1, *spatial_out, rank]`, normalised coordinates in
/// `(x, y[, z])` = reversed axis order, `align_corners = false`). Leading axes are kept; dtype is preserved.
pub fn sample_at(
    tensor: &Tensor,
    grid: &Tensor,
    mode: WarpMode,
    outside: Outside,
) -> Result<Tensor> {
    let grid_shape = grid.size();
    let rank = grid_shape.len() - 2;
    let shape = tensor.size();
    if shape.len() < rank {
        return Err(PluginError(format!(
            "cannot warp a tensor of shape {shape:?} in {rank}D"
        )));
    }
    let (leading, spatial) = shape.split_at(shape.len() - rank);
    let kind = tensor.f_kind()?;
    // Integers are carried in float64 so class indices stay exact; float32 (and smaller) work in float32.
    let work = if kind == Kind::Double || !is_float(kind) {
        Kind::Double
    } else {
        Kind::Float
    };
    let channels: i64 = leading.iter().product();
    let mut batched = vec![1, channels];
    batched.extend_from_slice(spatial);
    let input = tensor.f_to_kind(work)?.f_reshape(batched.as_slice())?;
    let grid = grid.f_to_kind(work)?.f_to_device(tensor.device())?;
    let interpolation = if mode == WarpMode::Nearest { 1 } else { 0 };
    let padding = match outside {
        Outside::Zero => 0,
        Outside::Reflect => 2,
    };
    let mut output = input.f_grid_sampler(&grid, interpolation, padding, false)?;
    if outside == Outside::Zero {
        output = output.f_mul(&inside(&grid, spatial)?.f_to_kind(work)?.f_unsqueeze(1)?)?;
    }
    if mode == WarpMode::LinearThreshold {
        output = output.f_ge(0.5)?.f_to_kind(work)?;
    }
    let mut out_shape = leading.to_vec();
    out_shape.extend_from_slice(&grid_shape[1..grid_shape.len() - 1]);
    Ok(output.f_reshape(out_shape.as_slice())?.f_to_kind(kind)?)
}

/// Where `grid` (`[1, *out, rank]`, normalised, reversed axis order) reads within the voxel centres of an input of
/// `spatial` shape, `[1, *out]` booleans. grid_sample's zero padding would blend the edge voxel with zeros over
/// the half voxel beyond it; scipy's `constant` mode, which ivadomed uses, reads 0 there instead.
fn inside(grid: &Tensor, spatial: &[i64]) -> Result<Tensor> {
    const TOLERANCE: f64 = 1e-3;
    let rank = spatial.len();
    let mut mask: Option<Tensor> = None;
    for (component, &len) in spatial.iter().rev().enumerate() {
        // u = (2 i + 1) / n - 1  <=>  i = ((u + 1) n - 1) / 2.
        let index = grid
            .f_select(-1, component as i64)?
            .f_add_scalar(1.0)?
            .f_mul_scalar(len as f64 / 2.0)?
            .f_sub_scalar(0.5)?;
        let within = index
            .f_ge(-TOLERANCE)?
            .f_logical_and(&index.f_le(len as f64 - 1.0 + TOLERANCE)?)?;
        mask = Some(match mask {
            Some(mask) => mask.f_logical_and(&within)?,
            None => within,
        });
    }
    mask.ok_or_else(|| PluginError(format!("cannot mask a {rank}D grid")))
}

/// Warps every tensor of `sample` through `grid`, each with its [`warp_mode`].
pub fn warp_sample(sample: &mut Sample, grid: &Tensor, outside: Outside) -> Result<()> {
    for (name, tensor) in sample.tensors.iter_mut() {
        let mode = warp_mode(name, tensor)?;
        *tensor = sample_at(tensor, grid, mode, outside)?;
    }
    Ok(())
}

/// Per sample of a batch, whether every value of `tensor` (`[B, ...]`) is 0 or 1.
fn binary_rows(tensor: &Tensor) -> Result<Vec<bool>> {
    let rows = tensor.size()[0];
    if let Some(values) = f32_data(tensor) {
        return Ok(values
            .chunks_exact(values.len() / rows as usize)
            .map(all_binary)
            .collect());
    }
    let ok = tensor
        .f_eq(0.0)?
        .f_logical_or(&tensor.f_eq(1.0)?)?
        .f_reshape([rows, -1])?
        .f_all_dim(1, false)?;
    Ok(Vec::<bool>::try_from(&ok.f_to_device(Device::Cpu)?)?)
}

/// A batch's sampling grid in a given work kind (`[B, *out, rank]`, normalised as in [`sample_at`]) and how it
/// treats what lies outside the input: `None` reflects (scipy's `reflect`), `Some(mask)` reads zeros, with the
/// optional mask (`[B, 1, *out]`, 0 or 1) of the positions inside the input.
pub type GridIn = (Tensor, Option<Option<Tensor>>);

/// Warps every tensor of a batch (`[B, *leading, *spatial]`) through the grid `grid_in(work kind, device)` gives,
/// sample `b` through `grid[b]`, with the outside its [`GridIn`] says. Each
/// sample's tensor gets the [`warp_mode`] it would get alone (a binary label is thresholded, a soft one not).
/// Tensors resampled alike (same work kind and interpolation) go through one `grid_sample` together, as channels:
/// the grid's coordinates and weights are computed once for all of them.
pub fn warp_batch(
    tensors: &mut BTreeMap<String, Tensor>,
    rank: usize,
    grid_in: &dyn Fn(Kind, Device) -> Result<GridIn>,
) -> Result<()> {
    // (work kind, interpolation code) -> names, in name order.
    let mut groups: Vec<((Kind, i64), Vec<String>)> = Vec::new();
    let mut rows = None;
    for (name, tensor) in tensors.iter() {
        let shape = tensor.size();
        if shape.len() < rank + 1 || rows.is_some_and(|r| r != shape[0]) {
            return Err(PluginError(format!(
                "cannot warp `{name}` of shape {shape:?} in {rank}D with the rest of its batch"
            )));
        }
        rows = Some(shape[0]);
        let kind = tensor.f_kind()?;
        let key = if kind == Kind::Double {
            (Kind::Double, 0)
        } else if is_float(kind) {
            (Kind::Float, 0)
        } else {
            // Integers are carried in float64 and resampled nearest, so class indices stay exact.
            (Kind::Double, 1)
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, names)) => names.push(name.clone()),
            None => groups.push((key, vec![name.clone()])),
        }
    }
    let Some(rows) = rows else { return Ok(()) };
    for ((work, interpolation), names) in groups {
        let device = tensors[&names[0]].device();
        let (grid, zeros) = grid_in(work, device)?;
        let padding = if zeros.is_some() { 0 } else { 2 };
        let mask = zeros.flatten();
        let mut inputs = Vec::with_capacity(names.len());
        let mut channels = Vec::with_capacity(names.len());
        for name in &names {
            let tensor = &tensors[name];
            let shape = tensor.size();
            let spatial = &shape[shape.len() - rank..];
            let count: i64 = shape[1..shape.len() - rank].iter().product();
            let mut batched = vec![rows, count];
            batched.extend_from_slice(spatial);
            inputs.push(tensor.f_to_kind(work)?.f_reshape(batched.as_slice())?);
            channels.push(count);
        }
        let input = if inputs.len() == 1 {
            inputs.pop().ok_or_else(|| PluginError::new("no input"))?
        } else {
            Tensor::f_cat(&inputs, 1)?
        };
        let mut output = match (interpolation, f32_data(&input), f32_data(&grid)) {
            // libtorch's 3D CPU kernel is scalar; ours gathers 8 voxels at a time (twice as fast). Its 2D kernel is
            // vectorised and as fast as ours, and stays.
            (0, Some(values), Some(points)) if rank == 3 => {
                let padding = if padding == 0 {
                    Padding::Zeros
                } else {
                    Padding::Reflection
                };
                grid_sample::<3>(values, &input.size(), points, &grid.size(), padding)?
            }
            _ => input.f_grid_sampler(&grid, interpolation, padding, false)?,
        };
        if let Some(mask) = &mask {
            output = output.f_mul(mask)?;
        }
        let out_spatial = output.size()[2..].to_vec();
        if let Some(values) = f32_data(&output) {
            split_thresholded_f32(tensors, &names, &channels, values, rows, &out_spatial)?;
            continue;
        }
        let mut start = 0;
        for (name, count) in names.iter().zip(channels) {
            let tensor = &tensors[name];
            let kind = tensor.f_kind()?;
            let mut warped = output.f_narrow(1, start, count)?;
            start += count;
            if is_float(kind) && (name.starts_with("label") || name.starts_with("roi")) {
                let binary = binary_rows(tensor)?;
                if binary.iter().any(|&b| b) {
                    let thresholded = warped.f_ge(0.5)?.f_to_kind(work)?;
                    warped = if binary.iter().all(|&b| b) {
                        thresholded
                    } else {
                        let mut view = vec![rows];
                        view.resize(warped.dim(), 1);
                        let condition = Tensor::f_from_slice(&binary)?
                            .f_to_device(device)?
                            .f_reshape(view.as_slice())?;
                        thresholded.f_where_self(&condition, &warped)?
                    };
                }
            }
            let shape = tensor.size();
            let mut out_shape = shape[..shape.len() - rank].to_vec();
            out_shape.extend_from_slice(&out_spatial);
            let warped = warped.f_reshape(out_shape.as_slice())?.f_to_kind(kind)?;
            tensors.insert(name.clone(), warped);
        }
    }
    Ok(())
}

/// The float32 CPU end of [`warp_batch`]: cuts the warped channels `values` (`[rows, sum(channels), *spatial]`)
/// back into the tensors `names` (each `channels[i]` channels), each a new contiguous tensor, thresholding at 0.5 the
/// rows of float `label*`/`roi*` tensors that were binary (the same as the libtorch path's `ge` and `where`).
fn split_thresholded_f32(
    tensors: &mut BTreeMap<String, Tensor>,
    names: &[String],
    channels: &[i64],
    values: &[f32],
    rows: i64,
    spatial: &[i64],
) -> Result<()> {
    let voxels: i64 = spatial.iter().product();
    let row_length = values.len() / rows as usize;
    let mut start = 0usize;
    for (name, &count) in names.iter().zip(channels) {
        let tensor = &tensors[name];
        let kind = tensor.f_kind()?;
        let binary = if is_float(kind) && (name.starts_with("label") || name.starts_with("roi")) {
            binary_rows(tensor)?
        } else {
            vec![false; rows as usize]
        };
        let length = (count * voxels) as usize;
        let shape = tensor.size();
        let mut out_shape = shape[..shape.len() - spatial.len()].to_vec();
        out_shape.extend_from_slice(spatial);
        let warped = new_f32(&out_shape, |out| {
            for ((target, source), &threshold) in out
                .chunks_exact_mut(length)
                .zip(values.chunks_exact(row_length))
                .zip(&binary)
            {
                let source = &source[start..start + length];
                if threshold {
                    for (t, &v) in target.iter_mut().zip(source) {
                        *t = if v >= 0.5 { 1.0 } else { 0.0 };
                    }
                } else {
                    target.copy_from_slice(source);
                }
            }
            Ok(())
        })?;
        start += length;
        tensors.insert(name.clone(), warped.f_to_kind(kind)?);
    }
    Ok(())
}

/// Warps every tensor of a batch through one affine map per sample (`matrices`, voxel indices as in
/// [`host_affine_grids`]), each with its [`warp_mode`]. When every tensor is a contiguous float32 CPU tensor, the
/// positions come straight from the matrices and each sample's planes (all channels of all tensors) are
/// interpolated together with [`warp_affine`], with no grid, no stacked copy of the channels and outputs written in
/// place; otherwise through [`warp_batch`] with [`host_affine_grids`]. Both read 0 beyond the outer voxel centres.
pub fn warp_affine_batch(
    tensors: &mut BTreeMap<String, Tensor>,
    rank: usize,
    shape: &[i64],
    matrices: &[Vec<Vec<f64>>],
) -> Result<()> {
    let direct = !tensors.is_empty()
        && tensors.values().all(|t| {
            let size = t.size();
            f32_data(t).is_some()
                && size.len() > rank
                && size[0] as usize == matrices.len()
                && size[size.len() - rank..] == *shape
        });
    if !direct {
        return warp_batch(tensors, rank, &|work, device| {
            host_affine_grids(matrices, shape, work, device)
        });
    }
    let rows = matrices.len();
    let voxels: usize = shape.iter().map(|&n| n as usize).product();
    let names: Vec<String> = tensors.keys().cloned().collect();
    let mut binary = Vec::with_capacity(names.len());
    let mut outputs = Vec::with_capacity(names.len());
    for name in &names {
        let tensor = &tensors[name];
        binary.push(if name.starts_with("label") || name.starts_with("roi") {
            binary_rows(tensor)?
        } else {
            vec![false; rows]
        });
        outputs.push(Tensor::f_empty(tensor.size(), (Kind::Float, Device::Cpu))?);
    }
    {
        let inputs: Vec<&[f32]> = names
            .iter()
            .map(|name| f32_data(&tensors[name]).unwrap_or_default())
            .collect();
        // SAFETY: the outputs were just made and nothing else refers to them.
        let mut written: Vec<&mut [f32]> = outputs
            .iter_mut()
            .map(|t| unsafe { fresh_f32_mut(t) })
            .collect();
        // Sample b's planes: every channel of every tensor, in name order.
        let mut sources: Vec<Vec<&[f32]>> = vec![Vec::new(); rows];
        for input in &inputs {
            for (b, sample) in input.chunks_exact(input.len() / rows).enumerate() {
                sources[b].extend(sample.chunks_exact(voxels));
            }
        }
        let mut targets: Vec<Vec<&mut [f32]>> = (0..rows).map(|_| Vec::new()).collect();
        for output in written.iter_mut() {
            let per_sample = output.len() / rows;
            for (b, sample) in output.chunks_exact_mut(per_sample).enumerate() {
                targets[b].extend(sample.chunks_exact_mut(voxels));
            }
        }
        let size = |k: usize| shape[k] as usize;
        match rank {
            2 => warp_affine::<2>([size(0), size(1)], matrices, &sources, &mut targets),
            _ => warp_affine::<3>(
                [size(0), size(1), size(2)],
                matrices,
                &sources,
                &mut targets,
            ),
        }
    }
    for ((name, mut output), binary) in names.into_iter().zip(outputs).zip(binary) {
        if binary.iter().any(|&b| b) {
            // SAFETY: `output` is still only ours.
            let values = unsafe { fresh_f32_mut(&mut output) };
            let per_sample = values.len() / rows;
            for (sample, _) in values
                .chunks_exact_mut(per_sample)
                .zip(&binary)
                .filter(|(_, &b)| b)
            {
                for v in sample {
                    *v = if *v >= 0.5 { 1.0 } else { 0.0 };
                }
            }
        }
        tensors.insert(name, output);
    }
    Ok(())
}

/// A float64 grid (`[B, *out, rank]`) as [`warp_batch`] wants it: converted to the work kind, with the inside mask
/// when `outside` is [`Outside::Zero`].
pub fn convert_grid(
    grid: &Tensor,
    spatial: &[i64],
    outside: Outside,
    work: Kind,
    device: Device,
) -> Result<GridIn> {
    let converted = grid.f_to_kind(work)?.f_to_device(device)?;
    let zeros = match outside {
        Outside::Zero => Some(Some(
            inside(&converted, spatial)?
                .f_to_kind(work)?
                .f_unsqueeze(1)?,
        )),
        Outside::Reflect => None,
    };
    Ok((converted, zeros))
}

/// Normalised coordinate given to positions outside the input: far enough that every corner `grid_sample`
/// interpolates from is padding, so with zero padding they read exactly 0.
const FAR_OUTSIDE: f64 = -4.0;

/// The sampling grids of one affine map per sample (`matrices`, voxel indices as in [`affine_grid`]), input and
/// output on `shape`, computed on the host in float64 and handed over in `work` kind: each coordinate is `A · o + a`
/// in voxels, normalised as `(2 i + 1) / n - 1`. A position beyond the outer voxel centres (with the tolerance of
/// [`sample_at`]) is moved far outside, so that it reads 0 under zero padding as scipy's `constant` mode does,
/// without a mask.
pub fn host_affine_grids(
    matrices: &[Vec<Vec<f64>>],
    shape: &[i64],
    work: Kind,
    device: Device,
) -> Result<GridIn> {
    let count = matrices.len() as i64;
    let mut grid_shape = vec![count];
    grid_shape.extend_from_slice(shape);
    grid_shape.push(shape.len() as i64);
    let tensor = if work == Kind::Double {
        let voxels: usize = shape.iter().map(|&n| n as usize).product();
        let mut grid = vec![0.0; matrices.len() * voxels * shape.len()];
        fill_affine_grids(matrices, shape, &mut grid, |v| v);
        Tensor::f_from_slice(&grid)?.f_reshape(grid_shape.as_slice())?
    } else {
        // Written in place: the grid is as large as the image and its copy would cost as much as filling it.
        new_f32(&grid_shape, |grid| {
            fill_affine_grids(matrices, shape, grid, |v| v as f32);
            Ok(())
        })?
        .f_to_kind(work)?
    };
    Ok((tensor.f_to_device(device)?, Some(None)))
}

/// Writes the grids of [`host_affine_grids`] into `grid` (`matrices.len() * voxels * rank` values), with AVX2
/// where the CPU has it (the same arithmetic, in wider vectors: no fused multiply-adds, so the same values).
fn fill_affine_grids<T: Copy>(
    matrices: &[Vec<Vec<f64>>],
    shape: &[i64],
    grid: &mut [T],
    store: impl Fn(f64) -> T,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn wide<T: Copy>(
            matrices: &[Vec<Vec<f64>>],
            shape: &[i64],
            grid: &mut [T],
            store: impl Fn(f64) -> T,
        ) {
            fill_affine_grids_with(matrices, shape, grid, store)
        }
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { wide(matrices, shape, grid, store) };
        return;
    }
    fill_affine_grids_with(matrices, shape, grid, store)
}

#[inline(always)]
fn fill_affine_grids_with<T: Copy>(
    matrices: &[Vec<Vec<f64>>],
    shape: &[i64],
    grid: &mut [T],
    store: impl Fn(f64) -> T,
) {
    const TOLERANCE: f64 = 1e-3;
    let rank = shape.len();
    let voxels: usize = shape.iter().map(|&n| n as usize).product();
    let last = shape[rank - 1] as usize;
    let limits: Vec<f64> = shape.iter().map(|&n| n as f64 - 1.0 + TOLERANCE).collect();
    let scales: Vec<f64> = shape.iter().map(|&n| 2.0 / n as f64).collect();
    let offsets: Vec<f64> = shape.iter().map(|&n| 1.0 / n as f64 - 1.0).collect();
    let far = store(FAR_OUTSIDE);
    let mut start = vec![0.0f64; rank];
    let mut outer = vec![0usize; rank - 1];
    let mut lines = grid.chunks_exact_mut(last * rank);
    for matrix in matrices {
        let along: Vec<f64> = (0..rank).map(|k| matrix[k][rank - 1]).collect();
        // Output voxels in C order, one line along the last axis at a time.
        for line in 0..voxels / last {
            let mut rest = line;
            for axis in (0..rank - 1).rev() {
                let n = shape[axis] as usize;
                outer[axis] = rest % n;
                rest /= n;
            }
            for (k, value) in start.iter_mut().enumerate() {
                *value = matrix[k][rank]
                    + outer
                        .iter()
                        .enumerate()
                        .map(|(axis, &i)| matrix[k][axis] * i as f64)
                        .sum::<f64>();
            }
            let Some(points) = lines.next() else { break };
            let line = Line {
                start: &start,
                along: &along,
                limits: &limits,
                scales: &scales,
                offsets: &offsets,
            };
            match rank {
                2 => fill_line::<T, 2>(points, &line, far, &store),
                _ => fill_line::<T, 3>(points, &line, far, &store),
            }
        }
    }
}

/// One line of output voxels along the last axis: positions `start + along * step` (voxel indices per axis), the
/// largest position inside, and the normalisation `position * scale + offset` per axis.
struct Line<'a> {
    start: &'a [f64],
    along: &'a [f64],
    limits: &'a [f64],
    scales: &'a [f64],
    offsets: &'a [f64],
}

/// The grid points of one [`Line`] (rank `R` known at compile time, no branches, so the loop vectorises).
#[inline(always)]
fn fill_line<T: Copy, const R: usize>(
    points: &mut [T],
    line: &Line,
    far: T,
    store: &impl Fn(f64) -> T,
) {
    const TOLERANCE: f64 = 1e-3;
    let take = |values: &[f64]| -> [f64; R] { std::array::from_fn(|k| values[k]) };
    let (start, along, limits) = (take(line.start), take(line.along), take(line.limits));
    let (scales, offsets) = (take(line.scales), take(line.offsets));
    for (step, point) in points.chunks_exact_mut(R).enumerate() {
        let mut within = true;
        let mut values = [far; R];
        for k in 0..R {
            let position = start[k] + along[k] * step as f64;
            within &= (position >= -TOLERANCE) & (position <= limits[k]);
            // The grid lists coordinates in reversed axis order.
            values[R - 1 - k] = store(position * scales[k] + offsets[k]);
        }
        for (target, value) in point.iter_mut().zip(values) {
            *target = if within { value } else { far };
        }
    }
}

/// The `[rank, rank + 1]` `affine_grid` theta (normalised coordinates, reversed axis order) of an affine map in
/// voxel indices (see [`affine_grid`]), row-major.
pub fn affine_theta(matrix: &[Vec<f64>], shape: &[i64]) -> Vec<f64> {
    let rank = shape.len();
    // Normalised coordinate u = (2 i + 1) / n - 1, i.e. i = half * u + centre.
    let half: Vec<f64> = shape.iter().map(|&n| n as f64 / 2.0).collect();
    let centre: Vec<f64> = shape.iter().map(|&n| (n as f64 - 1.0) / 2.0).collect();
    // u_in = H⁻¹ A H u_out + H⁻¹ (A c + a - c), in tensor axis order.
    let mut theta = vec![0.0f64; rank * (rank + 1)];
    for row in 0..rank {
        let mut shift = matrix[row][rank] - centre[row];
        for col in 0..rank {
            shift += matrix[row][col] * centre[col];
        }
        // The grid's last axis lists coordinates in reversed order (x = last spatial axis first).
        let grid_row = rank - 1 - row;
        for col in 0..rank {
            let grid_col = rank - 1 - col;
            theta[grid_row * (rank + 1) + grid_col] = matrix[row][col] * half[col] / half[row];
        }
        theta[grid_row * (rank + 1) + rank] = shift / half[row];
    }
    theta
}

/// The sampling grids (`[B, *shape, rank]`, float64) of one affine map per sample, in one `affine_grid` call.
pub fn affine_grids(matrices: &[Vec<Vec<f64>>], shape: &[i64], device: Device) -> Result<Tensor> {
    let rank = shape.len() as i64;
    let thetas: Vec<f64> = matrices
        .iter()
        .flat_map(|matrix| affine_theta(matrix, shape))
        .collect();
    let count = matrices.len() as i64;
    let theta = Tensor::f_from_slice(&thetas)?.f_reshape([count, rank, rank + 1])?;
    let mut size = vec![count, 1];
    size.extend_from_slice(shape);
    Ok(Tensor::f_affine_grid_generator(&theta, size.as_slice(), false)?.f_to_device(device)?)
}

/// The sampling grids that read input position `i + displacement[b, k](i)` along each axis `k` for output voxel
/// `i` of sample `b`; `displacement` is `[B, rank, *shape]` in voxels, the grids `[B, *shape, rank]`, in the
/// displacement's kind (float32 or float64).
pub fn displacement_grids(displacement: &Tensor) -> Result<Tensor> {
    let size = displacement.size();
    let rank = size[1] as usize;
    let shape = &size[2..];
    let kind = displacement.f_kind()?;
    let identity: Vec<Vec<f64>> = (0..rank)
        .map(|row| {
            (0..=rank)
                .map(|col| f64::from(u8::from(row == col)))
                .collect()
        })
        .collect();
    let (base, _) = host_affine_grids(&[identity], shape, kind, displacement.device())?;
    // A displacement of d voxels along an axis of n voxels is 2 d / n in normalised units; reversed axis order.
    let mut steps = Vec::with_capacity(rank);
    for axis in (0..rank).rev() {
        steps.push(
            displacement
                .f_select(1, axis as i64)?
                .f_mul_scalar(2.0 / shape[axis] as f64)?,
        );
    }
    Ok(base.f_add(&Tensor::f_stack(&steps, -1)?)?)
}

/// The sampling grid of an affine map in voxel indices: output voxel `i` reads input position
/// `matrix[.., ..rank] · i + matrix[.., rank]` (`matrix` is `rank` rows of `rank + 1`). Input and output share
/// `shape`. Built in float64 with `affine_grid`, so it is exact to float32 precision.
pub fn affine_grid(matrix: &[Vec<f64>], shape: &[i64], device: Device) -> Result<Tensor> {
    affine_grids(&[matrix.to_vec()], shape, device)
}

/// Inverse of an affine map `[A | a]` (rows of `rank + 1`): `[A⁻¹ | -A⁻¹ a]`, by Gauss-Jordan elimination.
pub fn invert_affine(matrix: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
    let rank = matrix.len();
    let mut work: Vec<Vec<f64>> = matrix
        .iter()
        .enumerate()
        .map(|(row, values)| {
            let mut line = values[..rank].to_vec();
            line.extend((0..rank).map(|col| f64::from(u8::from(row == col))));
            line
        })
        .collect();
    for col in 0..rank {
        let pivot = (col..rank)
            .max_by(|&a, &b| work[a][col].abs().total_cmp(&work[b][col].abs()))
            .unwrap_or(col);
        if work[pivot][col].abs() < 1e-12 {
            return Err(PluginError(format!(
                "affine matrix {matrix:?} is singular and cannot be inverted"
            )));
        }
        work.swap(col, pivot);
        let scale = work[col][col];
        for value in work[col].iter_mut() {
            *value /= scale;
        }
        let pivot_row = work[col].clone();
        for (row, line) in work.iter_mut().enumerate() {
            let factor = line[col];
            if row != col && factor != 0.0 {
                for (value, pivot_value) in line.iter_mut().zip(&pivot_row) {
                    *value -= factor * pivot_value;
                }
            }
        }
    }
    Ok((0..rank)
        .map(|row| {
            let inverse = &work[row][rank..];
            let mut line = inverse.to_vec();
            line.push(-(0..rank).map(|k| inverse[k] * matrix[k][rank]).sum::<f64>());
            line
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(tensor: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&tensor.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    // The map i -> i + (1, -2) shifts content by (-1, +2): out[i, j] = in[i + 1, j - 2], zeros past the edge.
    #[test]
    fn affine_grid_translates_by_whole_voxels() {
        let input = Tensor::arange(20, (Kind::Float, Device::Cpu)).reshape([1, 4, 5]) + 1.0;
        let grid = affine_grid(
            &[vec![1.0, 0.0, 1.0], vec![0.0, 1.0, -2.0]],
            &[4, 5],
            Device::Cpu,
        )
        .unwrap();
        let out = values(&sample_at(&input, &grid, WarpMode::Linear, Outside::Zero).unwrap());
        for i in 0..4i64 {
            for j in 0..5i64 {
                let (si, sj) = (i + 1, j - 2);
                let expected = if (0..4).contains(&si) && (0..5).contains(&sj) {
                    (si * 5 + sj + 1) as f64
                } else {
                    0.0
                };
                assert!(
                    (out[(i * 5 + j) as usize] - expected).abs() < 1e-5,
                    "at {i},{j}"
                );
            }
        }
    }

    // A constant displacement of +0.5 voxel along W reads halfway between neighbours; reflection past the end
    // reads the last voxel again (half-sample symmetric).
    #[test]
    fn displacement_grid_reads_shifted_positions() {
        let input = Tensor::from_slice(&[0.0f32, 2.0, 4.0, 6.0]).reshape([1, 1, 4]);
        let displacement = Tensor::zeros([1, 2, 1, 4], (Kind::Float, Device::Cpu));
        let _ = displacement.select(1, 1).fill_(0.5);
        let grid = displacement_grids(&displacement).unwrap();
        let out = values(&sample_at(&input, &grid, WarpMode::Linear, Outside::Reflect).unwrap());
        let expected = [1.0, 3.0, 5.0, 6.0];
        for (got, want) in out.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn inverse_of_a_rotation_scale_translation() {
        let matrix = vec![vec![0.0, -2.0, 3.0], vec![0.5, 0.0, -1.0]];
        let inverse = invert_affine(&matrix).unwrap();
        // Composing both maps a point back onto itself.
        let point = [1.5, -4.0];
        let apply = |m: &Vec<Vec<f64>>, p: [f64; 2]| {
            [
                m[0][0] * p[0] + m[0][1] * p[1] + m[0][2],
                m[1][0] * p[0] + m[1][1] * p[1] + m[1][2],
            ]
        };
        let back = apply(&inverse, apply(&matrix, point));
        assert!((back[0] - point[0]).abs() < 1e-12 && (back[1] - point[1]).abs() < 1e-12);
        assert!(invert_affine(&[vec![1.0, 2.0, 0.0], vec![2.0, 4.0, 0.0]]).is_err());
    }
}
