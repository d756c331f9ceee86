//! A synthetic BIDS dataset of "spinal cord" phantoms: the demo's built-in default data.
//!
//! Each subject is a volume of soft tissue crossed along z (inferior → superior) by an elliptic cylinder, the
//! cord, wrapped in a ring of CSF. The cord's centre drifts along z on a gentle smooth curve; its semi-axes are
//! drawn in 4..8 mm per subject. The manual segmentation is exactly the set of voxels whose centre lies inside the
//! cord's ellipse. Each contrast has its own tissue / CSF / cord intensities (CSF bright on T2w, dark on T1w), a
//! smooth multiplicative bias field and additive Gaussian noise.
//!
//! Everything is drawn from ChaCha8 streams derived from the seed, subject and contrast, so a spec always gives
//! byte-identical files on every machine, and adding a contrast does not change the other contrasts or the
//! geometry.
//!
//! Layout (BIDS, as ivadomed loads it):
//! ```text
//! root/dataset_description.json, README, participants.tsv, participants.json
//! root/sub-ph01/anat/sub-ph01_T2w.nii.gz (+ .json sidecar)
//! root/derivatives/labels/dataset_description.json
//! root/derivatives/labels/sub-ph01/anat/sub-ph01_T2w_seg-manual.nii.gz
//! ```
use anyhow::{bail, Context, Result};
use ndarray::Array3;
use nifti::writer::WriterOptions;
use nifti::{Endianness, NiftiHeader};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::f64::consts::PI;
use std::fs;
use std::path::Path;

/// `GeneratedBy[0].Name` in the phantom's `dataset_description.json`; marks a folder as a previous phantom.
pub const GENERATOR: &str = "ivado-phantom";

/// Contrasts the phantom knows, with their (tissue, CSF, cord) intensities before bias and noise.
pub const CONTRASTS: [(&str, [f32; 3]); 3] = [
    ("T1w", [0.55, 0.12, 0.90]),
    ("T2w", [0.20, 1.00, 0.60]),
    ("T2star", [0.25, 0.90, 0.60]),
];

/// Cord semi-axes are drawn uniformly in this range, in mm.
const RADIUS_MM: (f64, f64) = (4.0, 8.0);
/// Thickness of the CSF ring around the cord, in mm.
const CSF_MM: (f64, f64) = (2.0, 4.0);
/// Largest random shift of the cord's mean position from the centre of the field of view, in mm.
const OFFSET_MM: f64 = 2.0;
/// Largest amplitude of the cord's drift along z, in mm.
const DRIFT_MM: f64 = 4.0;
/// Smallest in-plane field of view, in mm, that holds the largest cord, its CSF and its offset.
const MIN_FOV_MM: f64 = 2.0 * (RADIUS_MM.1 + CSF_MM.1 + OFFSET_MM + 1.0);

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct PhantomSpec {
    pub subjects: usize,
    /// Voxels along x (right), y (anterior), z (superior); the cord runs along z.
    pub shape: [usize; 3],
    /// Voxel size in mm along x, y, z.
    pub spacing: [f64; 3],
    /// BIDS suffixes, each one of [`CONTRASTS`].
    pub contrasts: Vec<String>,
    /// Standard deviation of the additive Gaussian noise, in the intensity units of [`CONTRASTS`] (where the
    /// brightest structure is about 1).
    pub noise: f64,
    pub seed: u64,
}

impl Default for PhantomSpec {
    /// 6 subjects of 96 x 96 x 24 voxels at 1 x 1 x 2 mm, T1w and T2w, noise 0.05, seed 0.
    fn default() -> Self {
        Self {
            subjects: 6,
            shape: [96, 96, 24],
            spacing: [1.0, 1.0, 2.0],
            contrasts: vec!["T1w".into(), "T2w".into()],
            noise: 0.05,
            seed: 0,
        }
    }
}

impl PhantomSpec {
    fn validate(&self) -> Result<()> {
        if self.subjects == 0 || self.subjects > 9999 {
            bail!(
                "phantom: subjects must be in 1..=9999, got {}",
                self.subjects
            );
        }
        if self.shape.contains(&0) || self.shape.iter().product::<usize>() > 1 << 28 {
            bail!(
                "phantom: shape {:?} must have no zero axis and at most 2^28 voxels",
                self.shape
            );
        }
        if self.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!(
                "phantom: spacing {:?} must be positive numbers of mm",
                self.spacing
            );
        }
        for axis in 0..2 {
            let fov = self.shape[axis] as f64 * self.spacing[axis];
            if fov < MIN_FOV_MM {
                bail!(
                    "phantom: the field of view along {} is {fov} mm ({} voxels of {} mm); at least {MIN_FOV_MM} mm is needed to hold the cord",
                    ["x", "y"][axis],
                    self.shape[axis],
                    self.spacing[axis]
                );
            }
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            bail!(
                "phantom: noise must be a non-negative number, got {}",
                self.noise
            );
        }
        if self.contrasts.is_empty() {
            bail!("phantom: at least one contrast is needed");
        }
        for (i, contrast) in self.contrasts.iter().enumerate() {
            if intensities(contrast).is_none() {
                let known: Vec<&str> = CONTRASTS.iter().map(|c| c.0).collect();
                bail!(
                    "phantom: unknown contrast {contrast:?} (known: {})",
                    known.join(", ")
                );
            }
            if self.contrasts[..i].contains(contrast) {
                bail!("phantom: contrast {contrast:?} is listed twice");
            }
        }
        Ok(())
    }

    fn subject_id(&self, index: usize) -> String {
        let width = self.subjects.to_string().len().max(2);
        format!("sub-ph{:0width$}", index + 1)
    }
}

fn intensities(contrast: &str) -> Option<[f32; 3]> {
    CONTRASTS.iter().find(|c| c.0 == contrast).map(|c| c.1)
}

/// SplitMix64 finaliser: decorrelated seeds for the (seed, subject, stream) streams.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stream 0 is a subject's geometry, stream `1 + c` its contrast `c`.
fn stream(seed: u64, subject: usize, stream: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(mix(mix(seed) ^ subject as u64) ^ stream as u64))
}

/// Standard normal draws by the Box-Muller transform.
struct Gaussian {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl Gaussian {
    fn next(&mut self) -> f64 {
        if let Some(value) = self.spare.take() {
            return value;
        }
        // 1 - [0, 1) is in (0, 1], so the log is finite.
        let u1 = 1.0 - self.rng.random::<f64>();
        let u2 = self.rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * PI * u2;
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }
}

/// One subject's cord, in mm from the centre of voxel (0, 0, 0).
#[derive(Clone, Debug)]
pub struct Cord {
    /// Semi-axes of the cord's ellipse along x and y.
    pub semi_axes: [f64; 2],
    /// Semi-axes of the outer CSF boundary.
    pub csf_semi_axes: [f64; 2],
    centre: [f64; 2],
    amplitude: [f64; 2],
    /// Cycles over the volume's length.
    cycles: [f64; 2],
    phase: [f64; 2],
    length: f64,
}

impl Cord {
    fn draw(spec: &PhantomSpec, rng: &mut ChaCha8Rng) -> Self {
        let semi_axes = [
            rng.random_range(RADIUS_MM.0..RADIUS_MM.1),
            rng.random_range(RADIUS_MM.0..RADIUS_MM.1),
        ];
        let csf = rng.random_range(CSF_MM.0..CSF_MM.1);
        let csf_semi_axes = [semi_axes[0] + csf, semi_axes[1] + csf];
        let mut centre = [0.0; 2];
        let mut amplitude = [0.0; 2];
        let mut cycles = [0.0; 2];
        let mut phase = [0.0; 2];
        for axis in 0..2 {
            let half_fov = spec.shape[axis] as f64 * spec.spacing[axis] / 2.0;
            centre[axis] = (spec.shape[axis] as f64 - 1.0) / 2.0 * spec.spacing[axis]
                + rng.random_range(-OFFSET_MM..=OFFSET_MM);
            // Keep the CSF ring 1 mm inside the field of view wherever the drift takes it.
            let room = (half_fov - csf_semi_axes[axis] - OFFSET_MM - 1.0).max(0.0);
            amplitude[axis] = rng.random_range(0.25..=1.0) * DRIFT_MM.min(room);
            cycles[axis] = rng.random_range(0.25..=0.75);
            phase[axis] = rng.random_range(0.0..2.0 * PI);
        }
        Self {
            semi_axes,
            csf_semi_axes,
            centre,
            amplitude,
            cycles,
            phase,
            length: spec.shape[2] as f64 * spec.spacing[2],
        }
    }

    /// Centre of the cord's cross-section at height `z` mm.
    pub fn centre(&self, z: f64) -> [f64; 2] {
        let at = |axis: usize| {
            self.centre[axis]
                + self.amplitude[axis]
                    * (2.0 * PI * self.cycles[axis] * z / self.length + self.phase[axis]).sin()
        };
        [at(0), at(1)]
    }
}

/// The cord geometry of subject `index` (0-based) of `spec`, as [`generate`] draws it.
pub fn subject_cord(spec: &PhantomSpec, index: usize) -> Cord {
    Cord::draw(spec, &mut stream(spec.seed, index, 0))
}

/// 0 tissue, 1 CSF, 2 cord, per voxel in x-fastest order.
fn classes(spec: &PhantomSpec, cord: &Cord) -> Vec<u8> {
    let [nx, ny, nz] = spec.shape;
    let [sx, sy, sz] = spec.spacing;
    let mut out = Vec::with_capacity(nx * ny * nz);
    for k in 0..nz {
        let [cx, cy] = cord.centre(k as f64 * sz);
        for j in 0..ny {
            for i in 0..nx {
                let (dx, dy) = (i as f64 * sx - cx, j as f64 * sy - cy);
                let inside = |[a, b]: [f64; 2]| (dx / a).powi(2) + (dy / b).powi(2) <= 1.0;
                out.push(if inside(cord.semi_axes) {
                    2
                } else if inside(cord.csf_semi_axes) {
                    1
                } else {
                    0
                });
            }
        }
    }
    out
}

fn header(spec: &PhantomSpec, description: &str) -> Result<NiftiHeader> {
    let [sx, sy, sz] = spec.spacing.map(|s| s as f32);
    // World origin at the centre of the volume.
    let origin: Vec<f32> = (0..3)
        .map(|a| -((spec.shape[a] as f64 - 1.0) / 2.0 * spec.spacing[a]) as f32)
        .collect();
    let mut header = NiftiHeader {
        pixdim: [1.0, sx, sy, sz, 1.0, 1.0, 1.0, 1.0],
        // NIFTI_UNITS_MM.
        xyzt_units: 2,
        qform_code: 1,
        sform_code: 1,
        quatern_b: 0.0,
        quatern_c: 0.0,
        quatern_d: 0.0,
        quatern_x: origin[0],
        quatern_y: origin[1],
        quatern_z: origin[2],
        srow_x: [sx, 0.0, 0.0, origin[0]],
        srow_y: [0.0, sy, 0.0, origin[1]],
        srow_z: [0.0, 0.0, sz, origin[2]],
        endianness: Endianness::Little,
        ..NiftiHeader::default()
    };
    header
        .set_description_str(description)
        .context("phantom: NIfTI description")?;
    Ok(header)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn is_previous_phantom(root: &Path) -> bool {
    fs::read_to_string(root.join("dataset_description.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|d| {
            d.pointer("/GeneratedBy/0/Name")
                .and_then(Value::as_str)
                .map(|n| n == GENERATOR)
        })
        .unwrap_or(false)
}

/// Makes `root` ready: creates it, or accepts it empty, or clears the subject folders of a previous phantom.
fn prepare_root(root: &Path) -> Result<()> {
    if root.exists() {
        if !root.is_dir() {
            bail!("phantom: {} exists and is not a folder", root.display());
        }
        let empty = fs::read_dir(root)
            .with_context(|| format!("reading {}", root.display()))?
            .next()
            .is_none();
        if !empty {
            if !is_previous_phantom(root) {
                bail!(
                    "phantom: refusing to write into {}: the folder is not empty and is not a previous phantom \
                     (its dataset_description.json was not generated by {GENERATOR}); choose an empty or new folder",
                    root.display()
                );
            }
            // Stale subjects of a previous phantom would otherwise mix with the new ones.
            for folder in [root.to_path_buf(), root.join("derivatives").join("labels")] {
                let Ok(entries) = fs::read_dir(&folder) else {
                    continue;
                };
                for entry in entries {
                    let entry = entry?;
                    if entry.file_name().to_string_lossy().starts_with("sub-ph")
                        && entry.file_type()?.is_dir()
                    {
                        fs::remove_dir_all(entry.path())
                            .with_context(|| format!("removing {}", entry.path().display()))?;
                    }
                }
            }
        }
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))
}

/// Writes the phantom dataset under `root` and returns the number of files written.
///
/// `root` may be missing, empty, or a previous phantom (whose `sub-ph*` folders are replaced); any other
/// non-empty folder is refused with an error naming it.
pub fn generate(root: &Path, spec: &PhantomSpec) -> Result<usize> {
    spec.validate()?;
    prepare_root(root)?;
    let mut written = 0usize;
    let spec_json = json!({
        "subjects": spec.subjects, "shape": spec.shape, "spacing": spec.spacing,
        "contrasts": spec.contrasts, "noise": spec.noise, "seed": spec.seed,
    });
    let generated_by = json!([{
        "Name": GENERATOR,
        "Version": env!("CARGO_PKG_VERSION"),
        "Description": "Synthetic spinal-cord phantoms: elliptic cord in a CSF ring, bias field and Gaussian noise",
    }]);
    write_json(
        &root.join("dataset_description.json"),
        &json!({
            "Name": "ivado spinal cord phantom",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": "CC0",
            "GeneratedBy": generated_by,
            "PhantomSpec": spec_json,
        }),
    )?;
    fs::write(
        root.join("README"),
        "Synthetic spinal-cord phantom generated by ivado (`ivado` demo data). Each subject has one image per \
         contrast and a manual-style cord segmentation under derivatives/labels. participants.tsv lists each \
         subject's cord semi-axes in mm.\n",
    )
    .with_context(|| format!("writing {}", root.join("README").display()))?;
    written += 2;

    let labels_root = root.join("derivatives").join("labels");
    fs::create_dir_all(&labels_root)
        .with_context(|| format!("creating {}", labels_root.display()))?;
    write_json(
        &labels_root.join("dataset_description.json"),
        &json!({
            "Name": "ivado spinal cord phantom: manual segmentations",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": generated_by,
        }),
    )?;
    write_json(
        &root.join("participants.json"),
        &json!({
            "participant_id": {"Description": "Subject identifier"},
            "cord_semi_axis_x_mm": {"Description": "Semi-axis of the cord's elliptic cross-section along x (left-right)", "Units": "mm"},
            "cord_semi_axis_y_mm": {"Description": "Semi-axis of the cord's elliptic cross-section along y (anterior-posterior)", "Units": "mm"},
        }),
    )?;
    written += 2;

    let [nx, ny, nz] = spec.shape;
    let mut participants =
        String::from("participant_id\tcord_semi_axis_x_mm\tcord_semi_axis_y_mm\n");
    for index in 0..spec.subjects {
        let id = spec.subject_id(index);
        let cord = subject_cord(spec, index);
        participants.push_str(&format!(
            "{id}\t{:.4}\t{:.4}\n",
            cord.semi_axes[0], cord.semi_axes[1]
        ));
        let class = classes(spec, &cord);
        let label = Array3::from_shape_fn((nx, ny, nz), |(i, j, k)| {
            u8::from(class[(k * ny + j) * nx + i] == 2)
        });

        let anat = root.join(&id).join("anat");
        let label_anat = labels_root.join(&id).join("anat");
        fs::create_dir_all(&anat).with_context(|| format!("creating {}", anat.display()))?;
        fs::create_dir_all(&label_anat)
            .with_context(|| format!("creating {}", label_anat.display()))?;

        for (c, contrast) in spec.contrasts.iter().enumerate() {
            let levels = intensities(contrast).expect("validated");
            let mut rng = stream(spec.seed, index, 1 + c);
            // Smooth multiplicative bias: 1 + linear and cross terms over the normalised field of view.
            let bias: [f64; 4] = std::array::from_fn(|_| rng.random_range(-0.08..=0.08));
            let mut noise = Gaussian { rng, spare: None };
            let mut values = vec![0f32; nx * ny * nz];
            for k in 0..nz {
                let z = 2.0 * k as f64 / (nz.max(2) - 1) as f64 - 1.0;
                for j in 0..ny {
                    let y = 2.0 * j as f64 / (ny.max(2) - 1) as f64 - 1.0;
                    for i in 0..nx {
                        let x = 2.0 * i as f64 / (nx.max(2) - 1) as f64 - 1.0;
                        let flat = (k * ny + j) * nx + i;
                        let field = 1.0 + bias[0] * x + bias[1] * y + bias[2] * z + bias[3] * x * y;
                        let clean = levels[class[flat] as usize] as f64 * field;
                        values[flat] = (clean + spec.noise * noise.next()) as f32;
                    }
                }
            }
            let image =
                Array3::from_shape_fn((nx, ny, nz), |(i, j, k)| values[(k * ny + j) * nx + i]);

            let stem = format!("{id}_{contrast}");
            let image_path = anat.join(format!("{stem}.nii.gz"));
            let image_header = header(spec, &format!("{GENERATOR} {contrast}"))?;
            WriterOptions::new(&image_path)
                .reference_header(&image_header)
                .write_nifti(&image)
                .with_context(|| format!("writing {}", image_path.display()))?;
            write_json(
                &anat.join(format!("{stem}.json")),
                &json!({
                    "GeneratedBy": GENERATOR,
                    "PhantomContrast": contrast,
                    "PhantomIntensities": {"tissue": levels[0], "csf": levels[1], "cord": levels[2]},
                    "NoiseSigma": spec.noise,
                    "Seed": spec.seed,
                }),
            )?;

            let label_path = label_anat.join(format!("{stem}_seg-manual.nii.gz"));
            let mut label_header = header(spec, &format!("{GENERATOR} cord label"))?;
            // NIFTI_INTENT_LABEL.
            label_header.intent_code = 1002;
            WriterOptions::new(&label_path)
                .reference_header(&label_header)
                .write_nifti(&label)
                .with_context(|| format!("writing {}", label_path.display()))?;
            written += 3;
        }
    }
    fs::write(root.join("participants.tsv"), participants)
        .with_context(|| format!("writing {}", root.join("participants.tsv").display()))?;
    written += 1;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let unique = format!(
                "ivado-phantom-{name}-{}-{nanos}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            Self(std::env::temp_dir().join(unique))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn small_spec(seed: u64) -> PhantomSpec {
        PhantomSpec {
            subjects: 2,
            shape: [48, 40, 12],
            spacing: [1.0, 1.0, 2.0],
            seed,
            ..PhantomSpec::default()
        }
    }

    fn read(path: &Path) -> (NiftiHeader, ndarray::ArrayD<f32>) {
        let object = ReaderOptions::new()
            .read_file(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let header = object.header().clone();
        (header, object.into_volume().into_ndarray::<f32>().unwrap())
    }

    /// Every image, label and sidecar below `root`, relative path -> bytes.
    fn files(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    out.push((
                        path.strip_prefix(root).unwrap().to_path_buf(),
                        fs::read(&path).unwrap(),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn writes_bids_layout_with_labels_matching_the_analytic_ellipse() {
        let spec = PhantomSpec::default();
        let dir = TempDir::new("layout");
        let written = generate(&dir.0, &spec).unwrap();
        // 5 dataset files + 3 per subject and contrast.
        assert_eq!(written, 5 + 3 * spec.subjects * spec.contrasts.len());
        assert_eq!(files(&dir.0).len(), written);
        for path in [
            "dataset_description.json",
            "participants.tsv",
            "derivatives/labels/dataset_description.json",
        ] {
            assert!(dir.0.join(path).is_file(), "{path}");
        }
        assert!(dir.0.join("sub-ph06/anat/sub-ph06_T1w.json").is_file());

        // Semi-axes as written in participants.tsv (4 decimals), checked against the documented range.
        let tsv = fs::read_to_string(dir.0.join("participants.tsv")).unwrap();
        let rows: Vec<Vec<String>> = tsv
            .lines()
            .skip(1)
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect();
        assert_eq!(rows.len(), spec.subjects);
        assert_eq!(rows[0][0], "sub-ph01");

        for (s, row) in rows.iter().enumerate() {
            let (a, b): (f64, f64) = (row[1].parse().unwrap(), row[2].parse().unwrap());
            assert!(
                (4.0..=8.0).contains(&a) && (4.0..=8.0).contains(&b),
                "semi-axes {a}, {b}"
            );
            let id = &row[0];
            let (header, label) = read(&dir.0.join(format!(
                "derivatives/labels/{id}/anat/{id}_T2w_seg-manual.nii.gz"
            )));
            assert_eq!(label.shape(), &spec.shape[..]);
            assert_eq!(
                header.datatype,
                nifti::NiftiType::Uint8 as i16,
                "labels are uint8"
            );
            assert_eq!(&header.pixdim[1..4], &[1.0, 1.0, 2.0]);
            assert_eq!(
                (header.sform_code, header.qform_code, header.xyzt_units),
                (1, 1, 2)
            );
            assert_eq!(header.srow_z[2], 2.0);
            assert!(
                label.iter().all(|&v| v == 0.0 || v == 1.0),
                "label values other than 0/1"
            );

            // Analytic cross-section area pi * a * b mm^2, in pixels of 1 x 1 mm.
            let expected_pixels = PI * a * b / (spec.spacing[0] * spec.spacing[1]);
            let slice_voxels = (spec.shape[0] * spec.shape[1]) as f64;
            for k in 0..spec.shape[2] {
                let area = label.index_axis(ndarray::Axis(2), k).sum() as f64;
                assert!(
                    (area / expected_pixels - 1.0).abs() < 0.15,
                    "subject {s} slice {k}: {area} label pixels vs pi a b = {expected_pixels}"
                );
                // Between the smallest (4 x 4 mm) and largest (8 x 8 mm) possible cords.
                let fraction = area / slice_voxels;
                assert!(
                    (0.004..0.025).contains(&fraction),
                    "slice {k}: fraction {fraction}"
                );
            }

            // The cord curves gently: its centroid moves less than 1.5 mm between neighbouring 2 mm slices
            // (the steepest drift allowed is 2 pi * 0.75 cycles * 4 mm / 48 mm = 0.39 mm per mm of z).
            let centroid = |k: usize| {
                let slice = label.index_axis(ndarray::Axis(2), k);
                let n = slice.sum() as f64;
                let x: f64 = slice
                    .indexed_iter()
                    .map(|(ix, &v)| ix[0] as f64 * v as f64)
                    .sum::<f64>()
                    / n;
                let y: f64 = slice
                    .indexed_iter()
                    .map(|(ix, &v)| ix[1] as f64 * v as f64)
                    .sum::<f64>()
                    / n;
                (x, y)
            };
            for k in 1..spec.shape[2] {
                let ((x0, y0), (x1, y1)) = (centroid(k - 1), centroid(k));
                let step = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt();
                assert!(
                    step < 1.5,
                    "subject {s}: the cord jumps by {step} mm at slice {k}"
                );
            }
        }
    }

    #[test]
    fn cord_contrasts_with_background_per_contrast() {
        let spec = small_spec(11);
        let dir = TempDir::new("contrast");
        generate(&dir.0, &spec).unwrap();
        let (_, label) = read(
            &dir.0
                .join("derivatives/labels/sub-ph02/anat/sub-ph02_T1w_seg-manual.nii.gz"),
        );
        for contrast in ["T1w", "T2w"] {
            let (header, image) = read(
                &dir.0
                    .join(format!("sub-ph02/anat/sub-ph02_{contrast}.nii.gz")),
            );
            assert_eq!(header.datatype, nifti::NiftiType::Float32 as i16);
            assert_eq!(image.shape(), &spec.shape[..]);
            let mean = |inside: bool| {
                let picked: Vec<f64> = image
                    .iter()
                    .zip(label.iter())
                    .filter(|pair| (*pair.1 == 1.0) == inside)
                    .map(|pair| *pair.0 as f64)
                    .collect();
                picked.iter().sum::<f64>() / picked.len() as f64
            };
            let (cord, background) = (mean(true), mean(false));
            // Far more than the noise: the cord-background contrast (0.3 to 0.4 units) is over 5 noise sigmas.
            assert!(
                (cord - background).abs() > 5.0 * spec.noise,
                "{contrast}: cord {cord} vs background {background}"
            );
        }
    }

    #[test]
    fn same_seed_gives_identical_files_and_another_seed_differs() {
        let (first, second, third) = (
            TempDir::new("seed-a"),
            TempDir::new("seed-b"),
            TempDir::new("seed-c"),
        );
        generate(&first.0, &small_spec(5)).unwrap();
        generate(&second.0, &small_spec(5)).unwrap();
        generate(&third.0, &small_spec(6)).unwrap();
        let (a, b, c) = (files(&first.0), files(&second.0), files(&third.0));
        assert_eq!(a.len(), b.len());
        for ((path_a, bytes_a), (path_b, bytes_b)) in a.iter().zip(&b) {
            assert_eq!(path_a, path_b);
            assert!(
                bytes_a == bytes_b,
                "{} differs between two runs with the same seed",
                path_a.display()
            );
        }
        let image = PathBuf::from("sub-ph01/anat/sub-ph01_T2w.nii.gz");
        let bytes =
            |set: &[(PathBuf, Vec<u8>)]| set.iter().find(|(p, _)| *p == image).unwrap().1.clone();
        assert_ne!(
            bytes(&a),
            bytes(&c),
            "a different seed gives the same image"
        );
    }

    #[test]
    fn refuses_foreign_folders_and_regenerates_over_a_previous_phantom() {
        let dir = TempDir::new("refuse");
        fs::create_dir_all(&dir.0).unwrap();
        fs::write(dir.0.join("notes.txt"), "mine").unwrap();
        let error = format!("{:#}", generate(&dir.0, &small_spec(0)).unwrap_err());
        assert!(
            error.contains(&dir.0.display().to_string()) && error.contains("not empty"),
            "{error}"
        );
        assert_eq!(fs::read_to_string(dir.0.join("notes.txt")).unwrap(), "mine");

        let phantom = TempDir::new("regen");
        generate(
            &phantom.0,
            &PhantomSpec {
                subjects: 3,
                ..small_spec(0)
            },
        )
        .unwrap();
        assert!(phantom.0.join("sub-ph03").is_dir());
        let written = generate(&phantom.0, &small_spec(0)).unwrap();
        assert_eq!(
            files(&phantom.0).len(),
            written,
            "stale subjects of the previous phantom remain"
        );
        assert!(!phantom.0.join("sub-ph03").exists());

        let error = generate(
            &phantom.0,
            &PhantomSpec {
                contrasts: vec!["DWI".into()],
                ..small_spec(0)
            },
        )
        .unwrap_err();
        assert!(error.to_string().contains("unknown contrast"), "{error}");
        let error = generate(
            &phantom.0,
            &PhantomSpec {
                shape: [20, 96, 10],
                ..small_spec(0)
            },
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("field of view along x"),
            "{error}"
        );
    }
}
