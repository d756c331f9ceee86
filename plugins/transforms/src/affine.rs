//! ivadomed's `RandomAffine`.
use crate::random::{seeded, uniform};
use crate::warp::{
    affine_grid, batch_frame, invert_affine, warp_affine_batch, warp_sample, Outside,
};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::{
    apply_as_batch, check_seeds, Batch, Config, PluginError, Result, Sample, Transform,
};
use rand::Rng;

/// A random rotation, per-axis scaling and whole-voxel translation, drawn once per sample and applied to every
/// tensor alike.
///
/// Parameters and draws follow ivadomed: the angle is uniform in `degrees` (a number `d` means `[-d, d]`), the
/// rotation plane is axes (0, 1) in 2D and a uniformly drawn pair of axes in 3D (with ivadomed's sign convention per
/// plane), the scale along axis k is uniform in `[1 - scale[k], 1 + scale[k]]` and the translation along axis k is
/// `round(uniform(-translate[k] * n_k, translate[k] * n_k))` voxels. Lists may have 2 entries on a 3D sample (the
/// third axis then neither scales nor moves), as in ivadomed. The map is the same as ivadomed's: output position
/// `o` reads input position `S⁻¹ Rᵀ (o - c) + c + t`.
///
/// Two deliberate differences: the map is built in physical millimetres (voxel index times `spacing`), so a rotation
/// of an anisotropic volume is a true rotation rather than a rotation of the voxel grid, and `c` is the centre of the
/// field of view (`(n - 1) / 2`), where ivadomed uses `n / 2` and so rotates about a point half a voxel off.
///
/// Images and predictions are interpolated bi/trilinearly; binary `label*`/`roi*` masks linearly and then
/// thresholded at 0.5 so they stay binary (soft masks stay soft); integer tensors nearest. Outside the input is 0.
/// The undo record holds the voxel-index matrix (`rank` rows of `rank + 1`: output index -> input index) and the
/// drawn parameters; `undo` resamples with the inverse matrix, which brings a prediction back onto the input grid.
pub struct RandomAffine {
    degrees: (f64, f64),
    translate: Vec<f64>,
    scale: Vec<f64>,
}

/// cos and sin of an angle in degrees, exact at multiples of 90 degrees.
fn cos_sin_degrees(degrees: f64) -> (f64, f64) {
    let quarter = degrees / 90.0;
    if quarter.fract() == 0.0 {
        match (quarter as i64).rem_euclid(4) {
            0 => (1.0, 0.0),
            1 => (0.0, 1.0),
            2 => (-1.0, 0.0),
            _ => (0.0, -1.0),
        }
    } else {
        let radians = degrees.to_radians();
        (radians.cos(), radians.sin())
    }
}

impl RandomAffine {
    pub fn new(degrees: (f64, f64), translate: Vec<f64>, scale: Vec<f64>) -> Result<Self> {
        if !(degrees.0.is_finite() && degrees.1.is_finite() && degrees.0 <= degrees.1) {
            return Err(PluginError(format!(
                "{}: `degrees` range must be finite with min <= max, got {degrees:?}",
                Self::NAME
            )));
        }
        for (key, values) in [("translate", &translate), ("scale", &scale)] {
            if !(values.len() == 2 || values.len() == 3) {
                return Err(PluginError(format!(
                    "{}: `{key}` must have 2 or 3 entries, got {values:?}",
                    Self::NAME
                )));
            }
            if let Some(bad) = values.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                return Err(PluginError(format!(
                    "{}: `{key}` values must be between 0 and 1, got {bad}",
                    Self::NAME
                )));
            }
        }
        Ok(Self {
            degrees,
            translate,
            scale,
        })
    }

    /// The voxel-index matrix for a rotation by `angle` degrees in plane `axes`, per-axis `scales` and a
    /// `translation` in voxels, on a grid of `shape` voxels of `spacing` mm.
    pub fn index_matrix(
        angle: f64,
        axes: [usize; 2],
        scales: &[f64],
        translation: &[f64],
        shape: &[i64],
        spacing: &[f64],
    ) -> Vec<Vec<f64>> {
        let rank = shape.len();
        let (cos, sin) = cos_sin_degrees(angle);
        let mut rotation: Vec<Vec<f64>> = (0..rank)
            .map(|i| (0..rank).map(|j| f64::from(u8::from(i == j))).collect())
            .collect();
        let [a, b] = axes;
        // ivadomed's matrices: planes (0, 1) and (1, 2) rotate one way, plane (0, 2) the other.
        let sign = if axes == [0, 2] { -1.0 } else { 1.0 };
        rotation[a][a] = cos;
        rotation[a][b] = -sign * sin;
        rotation[b][a] = sign * sin;
        rotation[b][b] = cos;
        let centre: Vec<f64> = shape.iter().map(|&n| (n as f64 - 1.0) / 2.0).collect();
        (0..rank)
            .map(|i| {
                // Physical map M = S⁻¹ Rᵀ, expressed on voxel indices: A = P⁻¹ M P with P = diag(spacing).
                let mut row: Vec<f64> = (0..rank)
                    .map(|j| rotation[j][i] / scales[i] * spacing[j] / spacing[i])
                    .collect();
                let shift =
                    translation[i] + centre[i] - (0..rank).map(|j| row[j] * centre[j]).sum::<f64>();
                row.push(shift);
                row
            })
            .collect()
    }
}

impl RandomAffine {
    /// One sample's draws from `seed` (angle, plane, scales, translation, in this order) and the voxel-index
    /// matrix they give on a grid of `shape` voxels of `spacing` mm, with the undo record.
    fn draw(
        &self,
        seed: u64,
        rank: usize,
        shape: &[i64],
        spacing: &[f64],
    ) -> Result<(Vec<Vec<f64>>, Value)> {
        let mut rng = seeded(seed);
        let angle = uniform(&mut rng, self.degrees.0, self.degrees.1);
        let axes = if rank == 2 {
            [0, 1]
        } else {
            [[0, 1], [0, 2], [1, 2]][rng.random_range(0..3usize)]
        };
        let scales: Vec<f64> = (0..rank)
            .map(|k| {
                let s = self.scale.get(k).copied().unwrap_or(0.0);
                uniform(&mut rng, 1.0 - s, 1.0 + s)
            })
            .collect();
        if let Some(bad) = scales.iter().find(|s| **s <= 0.0) {
            return Err(PluginError(format!(
                "{}: drew a scale factor of {bad}; `scale` entries must be below 1",
                Self::NAME
            )));
        }
        let translation: Vec<f64> = (0..rank)
            .map(|k| {
                let max = self.translate.get(k).copied().unwrap_or(0.0) * shape[k] as f64;
                // `+ 0.0` turns -0 into 0 for a tidy record.
                uniform(&mut rng, -max, max).round_ties_even() + 0.0
            })
            .collect();
        let matrix = Self::index_matrix(angle, axes, &scales, &translation, shape, spacing);
        let record = json!({
            "matrix": matrix,
            "angle": angle,
            "axes": axes,
            "scale": scales,
            "translation": translation,
        });
        Ok((matrix, record))
    }
}

impl Transform for RandomAffine {
    const NAME: &'static str = "RandomAffine";
    const SUMMARY: &'static str =
        "Random rotation/scale/translation in mm, one draw for all tensors (undoable)";

    fn defaults() -> Value {
        json!({"degrees": 0.0, "translate": [0.0, 0.0], "scale": [0.0, 0.0]})
    }

    fn build(config: &mut Config) -> Result<Self> {
        let degrees = match config.f64("degrees") {
            Ok(max) if max >= 0.0 => (-max, max),
            Ok(max) => {
                return Err(PluginError(format!(
                    "{}: if `degrees` is a single number, it must be positive, got {max}",
                    Self::NAME
                )))
            }
            Err(_) => match config.f64_list("degrees").ok().as_deref() {
                Some([low, high]) => (*low, *high),
                _ => {
                    return Err(PluginError(format!(
                        "{}: `degrees` must be a number or a list [min, max]",
                        Self::NAME
                    )))
                }
            },
        };
        Self::new(
            degrees,
            config.f64_list("translate")?,
            config.f64_list("scale")?,
        )
    }

    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        apply_as_batch(self, sample, seed)
    }

    /// Each sample draws its map from its own seed; one `affine_grid` and one `grid_sample` per tensor then
    /// warp the whole batch.
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        check_seeds(batch, seeds)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let frame = batch_frame(batch, Self::NAME)?;
        let rank = frame.rank;
        if self.translate.len() > rank || self.scale.len() > rank {
            return Err(PluginError(format!(
                "{}: `translate` {:?} / `scale` {:?} have more entries than the sample's {rank} axes",
                Self::NAME,
                self.translate,
                self.scale
            )));
        }
        let mut matrices = Vec::with_capacity(seeds.len());
        let mut records = Vec::with_capacity(seeds.len());
        for (&seed, spacing) in seeds.iter().zip(&frame.spacings) {
            let (matrix, record) = self.draw(seed, rank, &frame.shape, spacing)?;
            matrices.push(matrix);
            records.push(record);
        }
        warp_affine_batch(&mut batch.tensors, rank, &frame.shape, &matrices)?;
        Ok(records)
    }

    fn undo(&self, sample: &mut Sample, record: &Value) -> Result<()> {
        let rows = record
            .get("matrix")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                PluginError(format!(
                    "{}: undo record has no `matrix`: {record}",
                    Self::NAME
                ))
            })?;
        let rank = rows.len();
        let matrix: Option<Vec<Vec<f64>>> = rows
            .iter()
            .map(|row| {
                row.as_array()
                    .filter(|values| values.len() == rank + 1)
                    .and_then(|values| values.iter().map(Value::as_f64).collect())
            })
            .collect();
        let matrix = match matrix {
            Some(matrix) if rank == 2 || rank == 3 => matrix,
            _ => {
                return Err(PluginError(format!(
                    "{}: undo record `matrix` must be 2 rows of 3 or 3 rows of 4 numbers, got {}",
                    Self::NAME,
                    Value::Array(rows.clone())
                )))
            }
        };
        let Some(first) = sample.tensors.values().next() else {
            return Ok(());
        };
        let device = first.device();
        let shape = crate::geometry::spatial_shape(sample, rank, Self::NAME)?;
        let grid = affine_grid(&invert_affine(&matrix)?, &shape, device)?;
        warp_sample(sample, &grid, Outside::Zero)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ivado_sdk::tch::{Device, Kind, Tensor};

    fn values(tensor: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&tensor.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn affine(config: Value) -> RandomAffine {
        let mut config = Config::new("RandomAffine", RandomAffine::defaults(), config).unwrap();
        let transform = RandomAffine::build(&mut config).unwrap();
        config.finish().unwrap();
        transform
    }

    fn sample(image: Tensor, spacing: &[f64]) -> Sample {
        let mut sample = Sample::new();
        sample.insert("image", image);
        sample.set_spacing(spacing);
        sample
    }

    /// numpy's `rot90(m)` of an n x n row-major matrix: `out[i][j] = m[j][n - 1 - i]`.
    fn rot90(m: &[f64], n: usize) -> Vec<f64> {
        let mut out = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                out[i * n + j] = m[j * n + (n - 1 - i)];
            }
        }
        out
    }

    #[test]
    fn ninety_degrees_in_2d_is_numpy_rot90() {
        let n = 6usize;
        // Asymmetric pattern: all values distinct, plus an L-shaped label.
        let pattern: Vec<f64> = (0..n * n)
            .map(|k| (k * k % 37) as f64 + 0.25 * k as f64)
            .collect();
        let label: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                f64::from(u8::from((i == 1 && j >= 1) || (j == 1 && i <= 3)))
            })
            .collect();
        let mut s = sample(
            Tensor::from_slice(&pattern)
                .reshape([1, n as i64, n as i64])
                .to_kind(Kind::Float),
            &[1.0, 1.0],
        );
        s.insert(
            "label",
            Tensor::from_slice(&label)
                .reshape([1, n as i64, n as i64])
                .to_kind(Kind::Float),
        );
        let record = affine(json!({"degrees": [90, 90]}))
            .apply(&mut s, 11)
            .unwrap();
        assert_eq!(record["angle"], json!(90.0));
        let image = values(s.get("image").unwrap());
        for (got, want) in image.iter().zip(rot90(&pattern, n)) {
            assert!((got - want).abs() < 1e-4, "{image:?}");
        }
        assert_eq!(values(s.get("label").unwrap()), rot90(&label, n));
    }

    // General angles, scales and translations against scipy's affine_transform fed ivadomed's matrices (with the
    // field-of-view centre; see reference_data.rs), at 1 mm isotropic spacing where millimetres are voxels.
    #[test]
    fn matches_scipy_affine_transform_with_ivadomeds_matrices() {
        use crate::reference_data::*;
        /// One scipy case: input, expected output, shape, angle, plane, scales, translation (voxels).
        struct Case<'a> {
            input: &'a [f64],
            expected: &'a [f64],
            shape: Vec<i64>,
            angle: f64,
            axes: [usize; 2],
            scales: Vec<f64>,
            translation: Vec<f64>,
        }
        let cases = [
            Case {
                input: &AFFINE_2D_INPUT,
                expected: &AFFINE_2D_EXPECTED,
                shape: vec![9, 8],
                angle: 30.0,
                axes: [0, 1],
                scales: vec![1.1, 0.9],
                translation: vec![2.0, -1.0],
            },
            Case {
                input: &AFFINE_3D_INPUT,
                expected: &AFFINE_3D_EXPECTED,
                shape: vec![6, 5, 7],
                angle: 25.0,
                axes: [0, 2],
                scales: vec![0.95, 1.0, 1.05],
                translation: vec![1.0, 0.0, -2.0],
            },
        ];
        for Case {
            input,
            expected,
            shape,
            angle,
            axes,
            scales,
            translation,
        } in cases
        {
            let spacing = vec![1.0; shape.len()];
            let matrix =
                RandomAffine::index_matrix(angle, axes, &scales, &translation, &shape, &spacing);
            let grid = affine_grid(&matrix, &shape, Device::Cpu).unwrap();
            let mut full = vec![1];
            full.extend_from_slice(&shape);
            let image = Tensor::from_slice(input).reshape(full.as_slice());
            let out = values(
                &crate::warp::sample_at(
                    &image,
                    &grid,
                    crate::warp::WarpMode::Linear,
                    Outside::Zero,
                )
                .unwrap(),
            );
            for (k, (got, want)) in out.iter().zip(expected).enumerate() {
                assert!(
                    (got - want).abs() < 1e-9,
                    "{shape:?} voxel {k}: {got} vs scipy {want}"
                );
            }
        }
    }

    #[test]
    fn ninety_degrees_in_3d_rotates_the_drawn_plane() {
        let n = 4i64;
        let cube = Tensor::arange(n * n * n, (Kind::Float, Device::Cpu)).reshape([1, n, n, n]);
        let original = values(&cube);
        let mut planes = std::collections::BTreeSet::new();
        for seed in 0..12 {
            let mut s = sample(cube.shallow_clone(), &[1.0, 1.0, 1.0]);
            let record = affine(json!({"degrees": [90, 90]}))
                .apply(&mut s, seed)
                .unwrap();
            let axes: Vec<usize> = serde_json_axes(&record);
            planes.insert(axes.clone());
            let out = values(s.get("image").unwrap());
            let last = n as usize - 1;
            for z in 0..n as usize {
                for y in 0..n as usize {
                    for x in 0..n as usize {
                        let o = [z, y, x];
                        let mut i = o;
                        // Planes (0,1) and (1,2): in_a = o_b, in_b = n-1-o_a (numpy rot90 over (a, b)); plane
                        // (0, 2) turns the other way: in_a = n-1-o_b, in_b = o_a.
                        let (a, b) = (axes[0], axes[1]);
                        if axes == [0, 2] {
                            i[a] = last - o[b];
                            i[b] = o[a];
                        } else {
                            i[a] = o[b];
                            i[b] = last - o[a];
                        }
                        let got = out[(z * 4 + y) * 4 + x];
                        let want = original[(i[0] * 4 + i[1]) * 4 + i[2]];
                        assert!((got - want).abs() < 1e-4, "plane {axes:?} at {o:?}");
                    }
                }
            }
        }
        assert_eq!(planes.len(), 3, "all three planes are drawn: {planes:?}");
    }

    fn serde_json_axes(record: &Value) -> Vec<usize> {
        record["axes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }

    /// A Gaussian blob of width `sigma` voxels at the grid centre, and a disk of `radius` voxels.
    fn blob_and_disk(n: i64, sigma: f64, radius: f64) -> (Tensor, Tensor) {
        let c = (n as f64 - 1.0) / 2.0;
        let mut blob = Vec::new();
        let mut disk = Vec::new();
        for i in 0..n {
            for j in 0..n {
                let r2 = (i as f64 - c).powi(2) + (j as f64 - c).powi(2);
                blob.push((-r2 / (2.0 * sigma * sigma)).exp() as f32);
                disk.push(if r2 <= radius * radius { 1.0f32 } else { 0.0 });
            }
        }
        (
            Tensor::from_slice(&blob).reshape([1, n, n]),
            Tensor::from_slice(&disk).reshape([1, n, n]),
        )
    }

    #[test]
    fn apply_then_undo_restores_a_smooth_image_and_labels_stay_binary() {
        let (blob, disk) = blob_and_disk(40, 6.0, 9.0);
        let transform =
            affine(json!({"degrees": 30, "translate": [0.1, 0.1], "scale": [0.15, 0.15]}));
        for seed in [1u64, 2, 3] {
            let mut s = sample(blob.shallow_clone(), &[1.0, 1.0]);
            s.insert("label", disk.shallow_clone());
            s.insert("prediction", blob.shallow_clone());
            let record = transform.apply(&mut s, seed).unwrap();
            let moved = values(s.get("image").unwrap());
            assert!(
                moved
                    .iter()
                    .zip(values(&blob))
                    .any(|(a, b)| (a - b).abs() > 0.05),
                "seed {seed}: the transform did something ({record})"
            );
            let label = values(s.get("label").unwrap());
            assert!(label.iter().all(|&v| v == 0.0 || v == 1.0));
            transform.undo(&mut s, &record).unwrap();
            let label_back = values(s.get("label").unwrap());
            assert!(label_back.iter().all(|&v| v == 0.0 || v == 1.0));
            // Two linear resamplings of a smooth blob: small error everywhere it stayed in the field of view
            // (the centre 20 x 20, given |t| <= 4 voxels and scale >= 0.85).
            for name in ["image", "prediction"] {
                let back = s.get(name).unwrap().narrow(1, 10, 20).narrow(2, 10, 20);
                let original = blob.narrow(1, 10, 20).narrow(2, 10, 20);
                let error = f64::try_from((back - original).abs().max()).unwrap();
                assert!(error < 0.03, "seed {seed} {name}: round-trip error {error}");
            }
            // The disk comes back up to boundary pixels: fewer than its circumference 2 pi r.
            let changed = label_back
                .iter()
                .zip(values(&disk))
                .filter(|(a, b)| a != &b)
                .count();
            assert!(changed < 57, "seed {seed}: {changed} label pixels changed");
        }
    }

    // A disk of radius 8 mm on a grid of 2 x 1 mm voxels is an ellipse of 4 x 8 voxels. Rotating it 90 degrees in
    // millimetres leaves it where it was; rotating the voxel grid instead would give an 8 x 4 ellipse, which
    // differs from the original on about 2 * (area of the 8 x 4 ellipse - area of the 4 x 4 circle) ≈ 100 pixels.
    #[test]
    fn rotation_happens_in_millimetres() {
        let (h, w) = (17i64, 33i64);
        let mut disk = Vec::new();
        for i in 0..h {
            for j in 0..w {
                let (y, x) = ((i - 8) as f64 * 2.0, (j - 16) as f64);
                disk.push(f32::from(u8::from(y * y + x * x <= 64.0)));
            }
        }
        let disk = Tensor::from_slice(&disk).reshape([1, h, w]);
        let mut s = sample(disk.shallow_clone(), &[2.0, 1.0]);
        s.insert("label", disk.shallow_clone());
        affine(json!({"degrees": [90, 90]}))
            .apply(&mut s, 5)
            .unwrap();
        let changed = values(s.get("label").unwrap())
            .iter()
            .zip(values(&disk))
            .filter(|(a, b)| a != &b)
            .count();
        assert!(changed <= 12, "{changed} pixels changed");
    }

    // Without rotation or scaling, the content moves by minus the recorded whole-voxel translation.
    #[test]
    fn translation_moves_content_by_whole_voxels() {
        let shape = [6i64, 7, 8];
        let volume =
            Tensor::arange(6 * 7 * 8, (Kind::Float, Device::Cpu)).reshape([1, 6, 7, 8]) + 1.0;
        let transform = affine(json!({"translate": [0.3, 0.3, 0.3]}));
        let mut moved_some = false;
        for seed in 0..4 {
            let mut s = sample(volume.shallow_clone(), &[3.0, 1.0, 0.5]);
            let record = transform.apply(&mut s, seed).unwrap();
            let t: Vec<i64> = record["translation"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as i64)
                .collect();
            moved_some |= t.iter().any(|&v| v != 0);
            for (k, &v) in t.iter().enumerate() {
                assert!(v.abs() as f64 <= 0.3 * shape[k] as f64 + 0.5, "{t:?}");
            }
            let out = values(s.get("image").unwrap());
            for z in 0..6 {
                for y in 0..7 {
                    for x in 0..8 {
                        let (sz, sy, sx) = (z + t[0], y + t[1], x + t[2]);
                        let inside =
                            (0..6).contains(&sz) && (0..7).contains(&sy) && (0..8).contains(&sx);
                        let want = if inside {
                            ((sz * 7 + sy) * 8 + sx + 1) as f64
                        } else {
                            0.0
                        };
                        let got = out[((z * 7 + y) * 8 + x) as usize];
                        assert!(
                            (got - want).abs() < 1e-3,
                            "t {t:?} at {z},{y},{x}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        assert!(moved_some);
    }

    #[test]
    fn same_seed_same_result_different_seed_different_result() {
        let (blob, disk) = blob_and_disk(24, 4.0, 6.0);
        let transform =
            affine(json!({"degrees": 45, "translate": [0.2, 0.2], "scale": [0.2, 0.2]}));
        let run = |seed: u64| {
            let mut s = sample(blob.shallow_clone(), &[1.0, 1.0]);
            s.insert("label", disk.shallow_clone());
            let record = transform.apply(&mut s, seed).unwrap();
            (
                record,
                values(s.get("image").unwrap()),
                values(s.get("label").unwrap()),
            )
        };
        assert_eq!(run(7), run(7));
        let (a, b) = (run(7), run(8));
        assert_ne!(a.0, b.0);
        assert_ne!(a.1, b.1);
    }

    #[test]
    fn config_errors_name_the_problem() {
        for bad in [
            json!({"degrees": -5}),
            json!({"degrees": [10, 5]}),
            json!({"degrees": "a lot"}),
            json!({"translate": [0.1]}),
            json!({"scale": [1.5, 0.1]}),
        ] {
            let mut config =
                Config::new("RandomAffine", RandomAffine::defaults(), bad.clone()).unwrap();
            assert!(RandomAffine::build(&mut config).is_err(), "{bad}");
        }
        let transform = affine(json!({"translate": [0.1, 0.1, 0.1]}));
        let mut s = sample(
            Tensor::zeros([1, 4, 4], (Kind::Float, Device::Cpu)),
            &[1.0, 1.0],
        );
        let error = transform.apply(&mut s, 0).unwrap_err().0;
        assert!(error.contains("more entries"), "{error}");
        let error = transform
            .undo(&mut s, &json!({"matrix": [[1, 0]]}))
            .unwrap_err()
            .0;
        assert!(error.contains("matrix"), "{error}");
    }
}
