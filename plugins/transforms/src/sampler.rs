//! libtorch's `grid_sample` (bi/trilinear, `align_corners = false`, zeros or reflection padding) for contiguous
//! float32 CPU tensors, in Rust.
//!
//! libtorch's CPU kernel for 3D grids is scalar and re-derives every corner's bounds per channel; this one computes a
//! voxel's corners and weights once for all channels and skips the bounds checks when all corners are inside, which
//! makes 3D warps several times cheaper. The arithmetic follows libtorch's (`grid_sampler_compute_source_index`,
//! `reflect_coordinates`, `clip_coordinates`, corner weights as products of distances), so results agree to float32
//! rounding.
use crate::cpu::new_f32;
use ivado_sdk::tch::Tensor;
use ivado_sdk::{PluginError, Result};

/// What positions outside the input read (libtorch's `padding_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// Corners outside the input contribute 0.
    Zeros,
    /// Coordinates are mirrored about the outer voxel edges, then clipped into the input.
    Reflection,
}

/// Input position (in voxels) of the normalised grid coordinate `coord` along an axis of `size` voxels.
#[inline(always)]
fn source_index(coord: f32, size: usize, padding: Padding) -> f32 {
    let size = size as f32;
    // Halving as a product (exact either way), as the AVX2 path computes it.
    let position = ((coord + 1.0) * size - 1.0) * 0.5;
    match padding {
        Padding::Zeros => position,
        // Inside the outer voxel centres, reflecting and clipping leave the position as it is (libtorch's round
        // trip through `position + 0.5` may move it by a rounding error); skipping them spares an fmod.
        Padding::Reflection if (0.0..=size - 1.0).contains(&position) => position,
        Padding::Reflection => {
            // reflect_coordinates(position, -1, 2 size - 1): mirror about -0.5 and size - 0.5.
            let distance = (position + 0.5).abs();
            let extra = distance % size;
            let flips = (distance / size).floor();
            let reflected = if flips % 2.0 == 0.0 {
                extra - 0.5
            } else {
                size - extra - 0.5
            };
            reflected.clamp(0.0, size - 1.0)
        }
    }
}

/// Samples `input` (`[N, C, *size]`, `R` spatial axes) at `grid` (`[N, *out, R]`, coordinates in reversed axis
/// order, normalised with `align_corners = false`): the `[N, C, *out]` result of libtorch's
/// `grid_sampler(input, grid, bilinear, padding, false)`.
pub fn grid_sample<const R: usize>(
    input: &[f32],
    input_shape: &[i64],
    grid: &[f32],
    grid_shape: &[i64],
    padding: Padding,
) -> Result<Tensor> {
    let voxels: usize = input_shape.iter().skip(2).map(|&n| n as usize).product();
    grid_sample_with::<R>(
        input,
        input_shape,
        grid,
        grid_shape,
        padding,
        has_avx2(voxels),
    )
}

/// [`grid_sample`], with or without the AVX2 path.
fn grid_sample_with<const R: usize>(
    input: &[f32],
    input_shape: &[i64],
    grid: &[f32],
    grid_shape: &[i64],
    padding: Padding,
    avx2: bool,
) -> Result<Tensor> {
    if input_shape.len() != R + 2 || grid_shape.len() != R + 2 || grid_shape[R + 1] != R as i64 {
        return Err(PluginError(format!(
            "grid_sample: input {input_shape:?} and grid {grid_shape:?} are not {R}D"
        )));
    }
    let (samples, channels) = (input_shape[0] as usize, input_shape[1] as usize);
    let size: [usize; R] = std::array::from_fn(|k| input_shape[k + 2] as usize);
    let voxels: usize = size.iter().product();
    let out_voxels: usize = grid_shape[1..=R].iter().map(|&n| n as usize).product();
    if grid_shape[0] as usize != samples
        || input.len() != samples * channels * voxels
        || grid.len() != samples * out_voxels * R
    {
        return Err(PluginError(format!(
            "grid_sample: input {input_shape:?} and grid {grid_shape:?} do not match their data"
        )));
    }
    let geometry = Geometry::new(size);
    let mut out_shape = vec![samples as i64, channels as i64];
    out_shape.extend_from_slice(&grid_shape[1..=R]);
    new_f32(&out_shape, |out| {
        for ((source, target), points) in input
            .chunks_exact(channels * voxels)
            .zip(out.chunks_exact_mut(channels * out_voxels))
            .zip(grid.chunks_exact(out_voxels * R))
        {
            let sources: Vec<&[f32]> = source.chunks_exact(voxels).collect();
            let mut targets: Vec<&mut [f32]> = target.chunks_exact_mut(out_voxels).collect();
            let mut voxel = 0;
            if avx2 {
                while voxel + LANES <= out_voxels {
                    let mut positions = [[0f32; LANES]; R];
                    for (lane, point) in points[voxel * R..(voxel + LANES) * R]
                        .chunks_exact(R)
                        .enumerate()
                    {
                        for (k, lanes) in positions.iter_mut().enumerate() {
                            lanes[lane] = source_index(point[R - 1 - k], size[k], padding);
                        }
                    }
                    // SAFETY: the CPU supports AVX2 and planes are indexable with i32 ([`has_avx2`]).
                    unsafe {
                        interpolate_block_avx2(&geometry, &positions, &sources, &mut targets, voxel)
                    };
                    voxel += LANES;
                }
            }
            for (voxel, point) in points.chunks_exact(R).enumerate().skip(voxel) {
                let position =
                    std::array::from_fn(|k| source_index(point[R - 1 - k], size[k], padding));
                interpolate_voxel(&geometry, position, &sources, &mut targets, voxel);
            }
        }
        Ok(())
    })
}

/// Output voxels computed together by the AVX2 path.
const LANES: usize = 8;

/// Whether to use the AVX2 path: the CPU has it, and planes of `voxels` are indexable with i32 (gather indices).
fn has_avx2(voxels: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && voxels < i32::MAX as usize
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = voxels;
        false
    }
}

/// Shapes shared by the interpolations of one call: input `size` and strides, and the offset of each corner of a
/// cell from its lower corner (`2^R` used; corner c is upper along axis k when bit R - 1 - k of c is set, so bit 0
/// is the last axis).
struct Geometry<const R: usize> {
    size: [usize; R],
    strides: [usize; R],
    offsets: [usize; 8],
}

impl<const R: usize> Geometry<R> {
    fn new(size: [usize; R]) -> Self {
        let mut strides = [1usize; R];
        for k in (0..R.saturating_sub(1)).rev() {
            strides[k] = strides[k + 1] * size[k + 1];
        }
        let mut offsets = [0usize; 8];
        for (corner, offset) in offsets.iter_mut().enumerate().take(1 << R) {
            *offset = (0..R)
                .filter(|&k| corner >> (R - 1 - k) & 1 == 1)
                .map(|k| strides[k])
                .sum();
        }
        Self {
            size,
            strides,
            offsets,
        }
    }
}

/// Positions further out than this are outside the input whatever their cell (libtorch clamps them likewise).
const FAR: f32 = 1e6;

/// `floor` of a value within ±[`FAR`], without a libm call on CPUs that lack SSE4.1 rounding.
#[inline(always)]
fn floor(value: f32) -> f32 {
    // SAFETY (of the conversion): |value| <= FAR fits in an i32.
    let truncated = unsafe { value.to_int_unchecked::<i32>() } as f32;
    if truncated > value {
        truncated - 1.0
    } else {
        truncated
    }
}

/// Interpolates every plane (`sources[p]` into `targets[p]`) at input `position` (voxels, tensor axis order) for
/// output voxel `voxel`: linearly between the cell's corners, corners outside the input counting 0.
#[inline(always)]
fn interpolate_voxel<const R: usize>(
    geometry: &Geometry<R>,
    position: [f32; R],
    sources: &[&[f32]],
    targets: &mut [&mut [f32]],
    voxel: usize,
) {
    let (size, strides) = (&geometry.size, &geometry.strides);
    // Lower corner and the weight of the upper neighbour along each axis.
    let mut lower = [0isize; R];
    let mut upper_weight = [0f32; R];
    let mut finite = true;
    for k in 0..R {
        let mut position = position[k];
        // Far positions (and NaN) are outside whatever their corner.
        if position.is_nan() || position.abs() > FAR {
            finite = false;
            position = -FAR;
        }
        let below = floor(position);
        // SAFETY (of the conversion): |below| <= FAR + 1 fits in an isize.
        lower[k] = unsafe { below.to_int_unchecked::<isize>() };
        upper_weight[k] = position - below;
    }
    let inside = finite && (0..R).all(|k| lower[k] >= 0 && lower[k] + 1 < size[k] as isize);
    let beyond = !finite || (0..R).any(|k| lower[k] < -1 || lower[k] >= size[k] as isize);
    if beyond {
        // No corner inside: 0 (zeros padding; reflected positions never get here).
        for target in targets.iter_mut() {
            target[voxel] = 0.0;
        }
        return;
    }
    if !inside {
        for (source, target) in sources.iter().zip(targets.iter_mut()) {
            target[voxel] = border::<R>(source, &lower, size, strides, &upper_weight);
        }
        return;
    }
    let mut base = 0usize;
    for k in 0..R {
        base += lower[k] as usize * strides[k];
    }
    let mut values = [0f32; 8];
    for (source, target) in sources.iter().zip(targets.iter_mut()) {
        for (value, &offset) in values.iter_mut().zip(&geometry.offsets).take(1 << R) {
            *value = source[base + offset];
        }
        // Linear interpolation one axis at a time, the last axis (corner bit 0) first: a tree of R levels rather
        // than a chain of 2^R dependent additions. The AVX2 path does the same operations in the same order.
        let mut count = 1 << R;
        for &weight in upper_weight.iter().rev() {
            count /= 2;
            for i in 0..count {
                values[i] = values[2 * i] * (1.0 - weight) + values[2 * i + 1] * weight;
            }
        }
        target[voxel] = values[0];
    }
}

/// [`interpolate_voxel`] for the 8 output voxels from `voxel` at once, with AVX2 gathers, when all their cells lie
/// inside the input (else voxel by voxel): the same float32 operations, so the same values.
///
/// # Safety
/// The CPU must support AVX2, and each plane must have fewer than 2^31 voxels (gather indices are i32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn interpolate_block_avx2<const R: usize>(
    geometry: &Geometry<R>,
    positions: &[[f32; LANES]; R],
    sources: &[&[f32]],
    targets: &mut [&mut [f32]],
    voxel: usize,
) {
    use std::arch::x86_64::*;
    let mut inside = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    let mut base = _mm256_setzero_si256();
    let mut weights = [_mm256_setzero_ps(); R];
    for k in 0..R {
        let position = _mm256_loadu_ps(positions[k].as_ptr());
        let below = _mm256_floor_ps(position);
        weights[k] = _mm256_sub_ps(position, below);
        // 0 <= lower and lower + 1 < size (false for NaN).
        let low = _mm256_cmp_ps::<_CMP_GE_OQ>(below, _mm256_setzero_ps());
        let high =
            _mm256_cmp_ps::<_CMP_LE_OQ>(below, _mm256_set1_ps(geometry.size[k] as f32 - 2.0));
        inside = _mm256_and_ps(inside, _mm256_and_ps(low, high));
        let index = _mm256_cvttps_epi32(below);
        base = _mm256_add_epi32(
            base,
            _mm256_mullo_epi32(index, _mm256_set1_epi32(geometry.strides[k] as i32)),
        );
    }
    if _mm256_movemask_ps(inside) != 0xff {
        for lane in 0..LANES {
            let position = positions.map(|lanes| lanes[lane]);
            interpolate_voxel(geometry, position, sources, targets, voxel + lane);
        }
        return;
    }
    for (source, target) in sources.iter().zip(targets.iter_mut()) {
        let mut values = [_mm256_setzero_ps(); 8];
        for (value, &offset) in values.iter_mut().zip(&geometry.offsets).take(1 << R) {
            let index = _mm256_add_epi32(base, _mm256_set1_epi32(offset as i32));
            // SAFETY: every lane's cell is inside the input (checked above), so each index is below the plane's
            // length.
            *value = _mm256_i32gather_ps::<4>(source.as_ptr(), index);
        }
        let mut count = 1 << R;
        for &weight in weights.iter().rev() {
            count /= 2;
            let rest = _mm256_sub_ps(_mm256_set1_ps(1.0), weight);
            for i in 0..count {
                values[i] = _mm256_add_ps(
                    _mm256_mul_ps(values[2 * i], rest),
                    _mm256_mul_ps(values[2 * i + 1], weight),
                );
            }
        }
        _mm256_storeu_ps(target[voxel..voxel + LANES].as_mut_ptr(), values[0]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn interpolate_block_avx2<const R: usize>(
    geometry: &Geometry<R>,
    positions: &[[f32; LANES]; R],
    sources: &[&[f32]],
    targets: &mut [&mut [f32]],
    voxel: usize,
) {
    for lane in 0..LANES {
        let position = positions.map(|lanes| lanes[lane]);
        interpolate_voxel(geometry, position, sources, targets, voxel + lane);
    }
}

/// Tolerance, in voxels, of "inside the outer voxel centres" for affine warps (as `warp::host_affine_grids`).
const AFFINE_TOLERANCE: f64 = 1e-3;

/// Warps float32 planes through one affine map per sample, in voxel indices: output voxel `o` of sample `b` reads
/// input position `matrices[b][.., ..R] · o + matrices[b][.., R]`, linearly interpolated (neighbours outside read
/// 0), or 0 when that position lies beyond the outer voxel centres (by more than 1e-3 voxel): what
/// `warp::host_affine_grids` and `grid_sample` compute, without building the grid. `sources[b]` and `targets[b]`
/// are sample `b`'s planes (every channel of every tensor), input and output on `size`.
pub fn warp_affine<const R: usize>(
    size: [usize; R],
    matrices: &[Vec<Vec<f64>>],
    sources: &[Vec<&[f32]>],
    targets: &mut [Vec<&mut [f32]>],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2(size.iter().product()) {
        #[target_feature(enable = "avx2")]
        unsafe fn wide<const R: usize>(
            size: [usize; R],
            matrices: &[Vec<Vec<f64>>],
            sources: &[Vec<&[f32]>],
            targets: &mut [Vec<&mut [f32]>],
        ) {
            warp_affine_with::<R, true>(size, matrices, sources, targets)
        }
        // SAFETY: the CPU supports AVX2 and planes are indexable with i32, checked just above.
        unsafe { wide(size, matrices, sources, targets) };
        return;
    }
    warp_affine_with::<R, false>(size, matrices, sources, targets)
}

/// [`warp_affine`], with the AVX2 blocks when `AVX2` (only instantiated so where the CPU has it).
#[inline(always)]
fn warp_affine_with<const R: usize, const AVX2: bool>(
    size: [usize; R],
    matrices: &[Vec<Vec<f64>>],
    sources: &[Vec<&[f32]>],
    targets: &mut [Vec<&mut [f32]>],
) {
    let voxels: usize = size.iter().product();
    let geometry = Geometry::new(size);
    let avx2 = AVX2;
    let last = size[R - 1];
    let limits: [f64; R] = std::array::from_fn(|k| size[k] as f64 - 1.0 + AFFINE_TOLERANCE);
    for ((matrix, sources), targets) in matrices.iter().zip(sources).zip(targets.iter_mut()) {
        let along: [f64; R] = std::array::from_fn(|k| matrix[k][R - 1]);
        let mut outer = [0usize; R];
        for line in 0..voxels / last {
            let mut rest = line;
            for axis in (0..R - 1).rev() {
                outer[axis] = rest % size[axis];
                rest /= size[axis];
            }
            let start: [f64; R] = std::array::from_fn(|k| {
                matrix[k][R]
                    + (0..R - 1)
                        .map(|axis| matrix[k][axis] * outer[axis] as f64)
                        .sum::<f64>()
            });
            // Input position of step `step` along the line, as float32, or far outside.
            let position = |step: usize| -> [f32; R] {
                let exact: [f64; R] = std::array::from_fn(|k| start[k] + along[k] * step as f64);
                let within = (0..R).all(|k| exact[k] >= -AFFINE_TOLERANCE && exact[k] <= limits[k]);
                std::array::from_fn(|k| if within { exact[k] as f32 } else { -FAR })
            };
            let first = line * last;
            let mut step = 0;
            if avx2 {
                while step + LANES <= last {
                    let mut positions = [[0f32; LANES]; R];
                    for lane in 0..LANES {
                        for (lanes, value) in positions.iter_mut().zip(position(step + lane)) {
                            lanes[lane] = value;
                        }
                    }
                    // SAFETY: the CPU supports AVX2 and planes are indexable with i32 ([`has_avx2`]).
                    unsafe {
                        interpolate_block_avx2(
                            &geometry,
                            &positions,
                            sources,
                            targets,
                            first + step,
                        )
                    };
                    step += LANES;
                }
            }
            for step in step..last {
                interpolate_voxel(&geometry, position(step), sources, targets, first + step);
            }
        }
    }
}

/// The corners of a cell at the input's edge: those outside contribute 0 (only zeros padding reaches past an edge;
/// clipped reflected positions at the last voxel have an upper neighbour of weight 0 outside).
#[cold]
fn border<const R: usize>(
    plane: &[f32],
    lower: &[isize; R],
    size: &[usize; R],
    strides: &[usize; R],
    upper_weight: &[f32; R],
) -> f32 {
    let mut total = 0.0;
    'corners: for corner in 0..1usize << R {
        let mut weight = 1.0;
        let mut offset = 0usize;
        for k in 0..R {
            let upper = corner >> (R - 1 - k) & 1 == 1;
            let index = lower[k] + isize::from(upper);
            if index < 0 || index >= size[k] as isize {
                continue 'corners;
            }
            weight *= if upper {
                upper_weight[k]
            } else {
                1.0 - upper_weight[k]
            };
            offset += index as usize * strides[k];
        }
        total += plane[offset] * weight;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::f32_data;
    use ivado_sdk::tch::{Device, Kind};

    /// libtorch's `grid_sampler` and this one on the same input and grid: largest difference.
    fn against_libtorch(input: &Tensor, grid: &Tensor, padding: Padding) -> f64 {
        let rank = grid.size().len() - 2;
        let code = match padding {
            Padding::Zeros => 0,
            Padding::Reflection => 2,
        };
        let expected = input.grid_sampler(grid, 0, code, false);
        let (data, points) = (f32_data(input).unwrap(), f32_data(grid).unwrap());
        let got = match rank {
            2 => grid_sample::<2>(data, &input.size(), points, &grid.size(), padding),
            _ => grid_sample::<3>(data, &input.size(), points, &grid.size(), padding),
        }
        .unwrap();
        assert_eq!(got.size(), expected.size());
        f64::try_from((got - expected).abs().max()).unwrap()
    }

    // Random grids reaching well past the input (normalised coordinates in [-1.6, 1.6]) on random inputs, 2D and 3D,
    // both paddings, with the exact edge coordinates ±1 and 0 among the points: libtorch's results within float32
    // rounding of values of order 1.
    #[test]
    fn equals_libtorchs_grid_sampler() {
        tch::manual_seed(7);
        let options = (Kind::Float, Device::Cpu);
        for (input_shape, grid_shape) in [
            (vec![3i64, 2, 7, 9], vec![3i64, 5, 11, 2]),
            (vec![2, 3, 5, 6, 4], vec![2, 4, 7, 3, 3]),
        ] {
            let input = Tensor::rand(input_shape.as_slice(), options);
            // Past the edges on every side; and (the vectorised path's case) within the outer voxel centres.
            for reach in [1.6, 0.7] {
                let grid = Tensor::rand(grid_shape.as_slice(), options) * (2.0 * reach) - reach;
                let flat = grid.view([-1]);
                flat.narrow(0, 0, 3)
                    .copy_(&Tensor::from_slice(&[1.0f32, -1.0, 0.0]));
                for padding in [Padding::Zeros, Padding::Reflection] {
                    let difference = against_libtorch(&input, &grid, padding);
                    assert!(
                        difference < 1e-5,
                        "{input_shape:?} {padding:?} reach {reach}: {difference}"
                    );
                }
            }
        }
    }

    // The AVX2 path and the scalar path give the same bits (the claim that a seed gives the same warp on every
    // x86-64 CPU), on grids with blocks inside, across and outside the input, for both paddings.
    #[test]
    fn vector_and_scalar_paths_agree_bit_for_bit() {
        if !has_avx2(1) {
            return;
        }
        tch::manual_seed(3);
        let options = (Kind::Float, Device::Cpu);
        let input = Tensor::rand([2, 2, 6, 9, 5], options);
        let grid = Tensor::rand([2, 5, 7, 11, 3], options) * 2.4 - 1.2;
        let (values, points) = (f32_data(&input).unwrap(), f32_data(&grid).unwrap());
        for padding in [Padding::Zeros, Padding::Reflection] {
            let run = |avx2| {
                let out = grid_sample_with::<3>(
                    values,
                    &input.size(),
                    points,
                    &grid.size(),
                    padding,
                    avx2,
                )
                .unwrap();
                f32_data(&out).unwrap().to_vec()
            };
            let (scalar, vector) = (run(false), run(true));
            assert!(
                scalar
                    .iter()
                    .zip(&vector)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{padding:?}"
            );
            assert!(scalar.iter().any(|&v| v != 0.0));
        }
    }

    use ivado_sdk::tch;
}
