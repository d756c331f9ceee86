//! Images as volumes: NIfTI-1 in canonical (RAS+) voxel order, and 2D microscopy (PNG/TIFF).
//!
//! [`read_image`] is the one entry point: it dispatches on the extension. [`read_nifti`] loads a `.nii` /
//! `.nii.gz` file of any integer, float or RGB datatype into an `f32` tensor and reorients it to the closest
//! canonical orientation, exactly like nibabel's `as_closest_canonical` (the axis mapping follows
//! nibabel's `io_orientation`); PNG/TIFF go through [`crate::microscopy`]. [`write_like`] undoes that
//! reorientation and writes a prediction with the source file's geometry (dims, pixdim, qform/sform, units),
//! atomically, as NIfTI or (for 2D sources) PNG.
//!
//! Nothing in here panics on bad input: every failure is an error whose message names the file.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use nalgebra::Matrix3;
use nifti::{Endianness, NiftiError, NiftiHeader, NiftiType};
use tch::{Device, Kind, Tensor};

const MAGIC_SINGLE_FILE: &[u8; 4] = b"n+1\0";
const MAGIC_PAIR: &[u8; 4] = b"ni1\0";
const NIFTI1_HEADER_SIZE: u64 = 348;
const NIFTI1_MIN_VOX_OFFSET: u64 = 352;

/// A 4x4 row-major affine (voxel index -> world mm).
pub type Affine = [[f64; 4]; 4];

/// A NIfTI volume in canonical RAS+ voxel order.
#[derive(Debug)]
pub struct Volume {
    /// f32 CPU tensor, shape [X, Y, Z], in canonical RAS+ voxel order: axis 0 increases toward Right,
    /// axis 1 toward Anterior, axis 2 toward Superior (like nibabel's as_closest_canonical).
    pub data: Tensor,
    /// voxel size in mm along each canonical axis (the column norms of `affine`)
    pub spacing: [f64; 3],
    /// 4x4 voxel->world (mm) affine of the canonical array (row-major)
    pub affine: Affine,
    /// what was done to the file's voxel order to reach canonical order (permutation + flips + original shape)
    pub reorientation: Reorientation,
    /// the source header, kept so predictions are written with identical geometry
    pub header: NiftiHeader,
    pub path: PathBuf,
}

impl Volume {
    /// Canonical shape [X, Y, Z].
    pub fn shape(&self) -> [usize; 3] {
        self.reorientation.canonical_shape()
    }

    /// The voxel->world affine of the file's own voxel order (the one chosen from sform/qform/pixdim).
    pub fn file_affine(&self) -> Affine {
        self.reorientation.file_affine(&self.affine)
    }

    /// nibabel-style axis codes of the file's voxel order, e.g. `['L', 'A', 'S']`.
    pub fn file_axcodes(&self) -> [char; 3] {
        self.reorientation.file_axcodes()
    }
}

/// How the file's voxel order maps onto the canonical RAS+ order.
///
/// Canonical axis `c` is file axis `perm[c]`, reversed when `flip[c]` is true. So a canonical index `v`
/// reads the file voxel `f` with `f[perm[c]] = if flip[c] { file_shape[perm[c]] - 1 - v[c] } else { v[c] }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reorientation {
    /// canonical axis `c` holds file axis `perm[c]`
    pub perm: [usize; 3],
    /// canonical axis `c` runs opposite to file axis `perm[c]`
    pub flip: [bool; 3],
    /// shape [X, Y, Z] of the volume in the file's voxel order
    pub file_shape: [usize; 3],
}

impl Reorientation {
    /// The reorientation to the closest canonical (RAS+) orientation of a voxel->world affine, following
    /// nibabel's `io_orientation`: take the orthogonal matrix closest to the affine's rotation part (polar
    /// decomposition), then for each voxel axis in turn pick the world axis with the largest absolute
    /// component, and remove that world axis from further consideration.
    ///
    /// Errors on a degenerate affine (non-finite, a zero column, or singular).
    pub fn from_affine(affine: &Affine, file_shape: [usize; 3]) -> Result<Self> {
        let rzs = Matrix3::from_fn(|r, c| affine[r][c]);
        if rzs.iter().any(|v| !v.is_finite()) {
            bail!("affine has non-finite entries: {affine:?}");
        }
        let mut rs = rzs;
        for c in 0..3 {
            let norm = rzs.column(c).norm();
            if norm == 0.0 {
                bail!("affine column {c} is zero: {affine:?}");
            }
            rs.column_mut(c).unscale_mut(norm);
        }
        let svd = rs.svd(true, true);
        let smax = svd.singular_values.max();
        let tol = smax * 3.0 * f64::EPSILON;
        if svd.singular_values.iter().any(|&s| s <= tol) {
            bail!("affine is singular: {affine:?}");
        }
        let (u, v_t) = match (svd.u, svd.v_t) {
            (Some(u), Some(v_t)) => (u, v_t),
            _ => bail!("SVD of the affine failed: {affine:?}"),
        };
        let mut r = u * v_t;
        let mut perm = [usize::MAX; 3];
        let mut flip = [false; 3];
        for in_ax in 0..3 {
            let col = r.column(in_ax).into_owned();
            let (out_ax, value) = col
                .iter()
                .copied()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .ok_or_else(|| anyhow!("empty affine column"))?;
            if value == 0.0 || perm[out_ax] != usize::MAX {
                bail!("cannot find an orientation for voxel axis {in_ax} of affine {affine:?}");
            }
            perm[out_ax] = in_ax;
            flip[out_ax] = value < 0.0;
            r.row_mut(out_ax).fill(0.0);
        }
        Ok(Reorientation {
            perm,
            flip,
            file_shape,
        })
    }

    /// True when the file is already in canonical order.
    pub fn is_identity(&self) -> bool {
        self.perm == [0, 1, 2] && self.flip == [false; 3]
    }

    /// Shape [X, Y, Z] in canonical order.
    pub fn canonical_shape(&self) -> [usize; 3] {
        [
            self.file_shape[self.perm[0]],
            self.file_shape[self.perm[1]],
            self.file_shape[self.perm[2]],
        ]
    }

    /// The file voxel index holding canonical voxel `v`.
    pub fn file_index(&self, v: [usize; 3]) -> [usize; 3] {
        let mut f = [0; 3];
        for (c, &vc) in v.iter().enumerate() {
            let a = self.perm[c];
            f[a] = if self.flip[c] {
                self.file_shape[a] - 1 - vc
            } else {
                vc
            };
        }
        f
    }

    /// The canonical voxel index of file voxel `f`.
    pub fn canonical_index(&self, f: [usize; 3]) -> [usize; 3] {
        std::array::from_fn(|c| {
            let a = self.perm[c];
            if self.flip[c] {
                self.file_shape[a] - 1 - f[a]
            } else {
                f[a]
            }
        })
    }

    /// Affine of the canonical array, given the affine of the file's voxel order.
    ///
    /// Canonical column `c` is file column `perm[c]`, negated when flipped; a flip also moves the origin to
    /// the far end of that axis: `t' = t + col * (n - 1)`.
    pub fn canonical_affine(&self, file_affine: &Affine) -> Affine {
        let a = file_affine;
        let mut out = [[0.0; 4]; 4];
        out[3][3] = 1.0;
        for (o, row) in out.iter_mut().zip(a.iter()).take(3) {
            o[3] = row[3];
        }
        for c in 0..3 {
            let f = self.perm[c];
            let sign = if self.flip[c] { -1.0 } else { 1.0 };
            for r in 0..3 {
                out[r][c] = sign * a[r][f];
                if self.flip[c] {
                    out[r][3] += a[r][f] * (self.file_shape[f] as f64 - 1.0);
                }
            }
        }
        out
    }

    /// Inverse of [`Reorientation::canonical_affine`].
    pub fn file_affine(&self, canonical_affine: &Affine) -> Affine {
        let a = canonical_affine;
        let mut out = [[0.0; 4]; 4];
        out[3][3] = 1.0;
        for (o, row) in out.iter_mut().zip(a.iter()).take(3) {
            o[3] = row[3];
        }
        for c in 0..3 {
            let f = self.perm[c];
            let sign = if self.flip[c] { -1.0 } else { 1.0 };
            for (o, row) in out.iter_mut().zip(a.iter()).take(3) {
                o[f] = sign * row[c];
                if self.flip[c] {
                    // canonical column c = -file column f, so t = t' + canonical column * (n - 1)
                    o[3] += row[c] * (self.file_shape[f] as f64 - 1.0);
                }
            }
        }
        out
    }

    /// nibabel-style axis codes (`aff2axcodes`) of the file's voxel order, e.g. `['L', 'A', 'S']`.
    pub fn file_axcodes(&self) -> [char; 3] {
        const POS: [char; 3] = ['R', 'A', 'S'];
        const NEG: [char; 3] = ['L', 'P', 'I'];
        let mut codes = ['?'; 3];
        for c in 0..3 {
            codes[self.perm[c]] = if self.flip[c] { NEG[c] } else { POS[c] };
        }
        codes
    }

    fn batch_offset(t: &Tensor) -> usize {
        let nd = t.dim();
        assert!(
            nd >= 3,
            "reorientation needs a tensor with at least 3 dims, got shape {:?}",
            t.size()
        );
        nd - 3
    }

    /// File voxel order -> canonical order. Works on the last 3 dims, so `[X, Y, Z]` and `[..., X, Y, Z]`
    /// (channels, batch) are both fine. The result may be a view of the input.
    ///
    /// # Panics
    /// When `file_order` has fewer than 3 dims.
    pub fn to_canonical(&self, file_order: &Tensor) -> Tensor {
        let off = Self::batch_offset(file_order);
        let mut dims: Vec<i64> = (0..off as i64).collect();
        dims.extend(self.perm.iter().map(|&p| (off + p) as i64));
        let t = file_order.permute(dims.as_slice());
        let flips = self.flip_dims(off);
        if flips.is_empty() {
            t
        } else {
            t.flip(flips.as_slice())
        }
    }

    /// Canonical order -> file voxel order; the exact inverse of [`Reorientation::to_canonical`]. Works on
    /// the last 3 dims. The result may be a view of the input.
    ///
    /// # Panics
    /// When `canonical` has fewer than 3 dims.
    pub fn to_file(&self, canonical: &Tensor) -> Tensor {
        let off = Self::batch_offset(canonical);
        let flips = self.flip_dims(off);
        let t = if flips.is_empty() {
            canonical.shallow_clone()
        } else {
            canonical.flip(flips.as_slice())
        };
        let mut inv = [0usize; 3];
        for (c, &p) in self.perm.iter().enumerate() {
            inv[p] = c;
        }
        let mut dims: Vec<i64> = (0..off as i64).collect();
        dims.extend(inv.iter().map(|&c| (off + c) as i64));
        t.permute(dims.as_slice())
    }

    fn flip_dims(&self, off: usize) -> Vec<i64> {
        (0..3)
            .filter(|&c| self.flip[c])
            .map(|c| (off + c) as i64)
            .collect()
    }
}

/// Voxel type of a written volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    /// uint8 (datatype 2): values are rounded and clamped to 0..=255, NaN becomes 0. For binary/label masks.
    U8,
    /// float32 (datatype 16): for soft (probability) maps.
    F32,
}

/// What to do with NaN or infinite voxels in a NIfTI file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// refuse the file, saying how many voxels are NaN and how many infinite (the default: such voxels
    /// poison normalisation and every loss they touch)
    #[default]
    Error,
    /// set them to 0 and log a warning with the counts
    ReplaceWithZero,
}

/// Options of [`read_image_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    pub non_finite: NonFinitePolicy,
}

/// Reads any supported image into a [`Volume`], by extension (case-insensitive): `.nii` / `.nii.gz` (NIfTI-1,
/// see [`read_nifti`]) or `.png` / `.tif` / `.tiff` (2D microscopy, see [`crate::microscopy`]).
///
/// `sidecar` is the image's JSON sidecar. Microscopy takes its pixel size from it; when `None`, the sidecars
/// that apply by BIDS inheritance are looked up next to and above the image. A NIfTI's sidecar, when given,
/// is only checked to be valid JSON. NaN/Inf voxels are an error (see [`read_image_with`] to replace them).
pub fn read_image(path: &Path, sidecar: Option<&Path>) -> Result<Volume> {
    read_image_with(path, sidecar, ReadOptions::default())
}

/// [`read_image`] with options.
pub fn read_image_with(
    path: &Path,
    sidecar: Option<&Path>,
    options: ReadOptions,
) -> Result<Volume> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if crate::microscopy::is_microscopy(path) {
        // 8/16-bit integer samples: never NaN or infinite
        crate::microscopy::read_microscopy(path, sidecar)
    } else if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        if let Some(sidecar) = sidecar {
            crate::microscopy::read_sidecar(sidecar)
                .with_context(|| format!("failed to read NIfTI file {}", path.display()))?;
        }
        read_nifti(path, options)
    } else {
        bail!(
            "cannot read image {}: unsupported file extension (expected .nii, .nii.gz, .png, .tif or .tiff)",
            path.display()
        )
    }
}

/// Reads a label (ground truth) with [`read_image`]. Microscopy labels, stored as 0/255 grey images, are
/// binarized at half scale (`v / 255 >= 0.5`, like ivadomed); NIfTI labels keep their values.
pub fn read_label(path: &Path, sidecar: Option<&Path>) -> Result<Volume> {
    let mut volume = read_image(path, sidecar)?;
    if crate::microscopy::is_microscopy(path) {
        crate::microscopy::binarize_label(&mut volume)
            .with_context(|| format!("failed to binarize label {}", path.display()))?;
    }
    Ok(volume)
}

/// [`read_image`] without an explicit sidecar: NIfTI, or microscopy with its BIDS-inherited sidecar.
pub fn read_volume(path: &Path) -> Result<Volume> {
    read_image(path, None)
}

/// Reads a NIfTI-1 file (`.nii` or `.nii.gz`; gzip is detected from the content) into canonical order.
///
/// Every datatype among int8..uint64, float32 and float64 is converted to f32 after applying
/// `scl_slope`/`scl_inter` (when the slope is finite and non-zero, like nibabel). RGB24 and RGBA32 become grey
/// with the luma weights of [`crate::microscopy::GRAY_WEIGHTS`] (alpha dropped, no scaling, as the standard
/// says). A trailing singleton dimension (`dim[4] == 1`) is accepted; a real 4D volume, complex, header-only
/// (`.hdr/.img`) and NIfTI-2 files are errors, and so are NaN/Inf voxels unless `options` replaces them. The
/// affine is the sform when `sform_code > 0`, else the qform when `qform_code > 0`, else nibabel's
/// pixdim-scaled base affine (with its x flip); a degenerate sform or qform is skipped with a warning.
pub fn read_nifti(path: &Path, options: ReadOptions) -> Result<Volume> {
    match catch_unwind(AssertUnwindSafe(|| read_nifti_inner(path, options))) {
        Ok(result) => {
            result.with_context(|| format!("failed to read NIfTI file {}", path.display()))
        }
        Err(panic) => Err(anyhow!(
            "failed to read NIfTI file {}: internal panic: {}",
            path.display(),
            panic_message(&panic)
        )),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.lines().next().unwrap_or_default().to_string()
    } else {
        "unknown panic".to_string()
    }
}

/// Reads up to `n` bytes; returns what was read and the error that stopped it early, if any.
fn read_up_to(reader: &mut dyn Read, n: usize) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::new();
    if out.try_reserve_exact(n).is_err() {
        return (
            out,
            Some(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate {n} bytes"),
            )),
        );
    }
    match reader.take(n as u64).read_to_end(&mut out) {
        Ok(_) => (out, None),
        Err(e) => (out, Some(e)),
    }
}

fn read_nifti_inner(path: &Path, options: ReadOptions) -> Result<Volume> {
    let file = File::open(path).map_err(|e| anyhow!("cannot open: {e}"))?;
    let mut buffered = BufReader::with_capacity(1 << 16, file);
    let head = buffered
        .fill_buf()
        .map_err(|e| anyhow!("cannot read: {e}"))?;
    let gzipped = head.starts_with(&[0x1f, 0x8b]);
    let named_gz = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().to_lowercase().ends_with(".gz"));
    let mut reader: Box<dyn Read> = if gzipped {
        Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::bufread::MultiGzDecoder::new(buffered),
        ))
    } else {
        Box::new(buffered)
    };
    // what went wrong when the stream stopped early: a short file, or a gzip stream that does not decode
    let stream_error = |what: &str, e: io::Error| -> anyhow::Error {
        if gzipped && e.kind() != io::ErrorKind::UnexpectedEof {
            anyhow!("corrupt gzip stream while {what}: {e}")
        } else if gzipped {
            anyhow!("file is truncated: the gzip stream ends early while {what} ({e})")
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            anyhow!("file is truncated while {what} ({e})")
        } else {
            anyhow!("{what}: {e}")
        }
    };

    let (raw_header, error) = read_up_to(&mut reader, NIFTI1_HEADER_SIZE as usize);
    if let Some(e) = error {
        return Err(stream_error("reading the 348-byte header", e));
    }
    let not_gz_note = if named_gz && !gzipped {
        " (and it is not gzip-compressed although its name ends in .gz)"
    } else {
        ""
    };
    if raw_header.len() < 4 {
        bail!(
            "not a NIfTI-1 file: {} bytes, shorter than a 348-byte header{not_gz_note}",
            raw_header.len()
        );
    }
    let first4 = [raw_header[0], raw_header[1], raw_header[2], raw_header[3]];
    let (sizeof_le, sizeof_be) = (i32::from_le_bytes(first4), i32::from_be_bytes(first4));
    if sizeof_le == 540 || sizeof_be == 540 {
        bail!("NIfTI-2 files are not supported (sizeof_hdr 540); convert to NIfTI-1");
    }
    if sizeof_le != NIFTI1_HEADER_SIZE as i32 && sizeof_be != NIFTI1_HEADER_SIZE as i32 {
        bail!(
            "not a NIfTI-1 file: sizeof_hdr is {sizeof_le} (expected 348), the file starts with {:?}{not_gz_note}",
            String::from_utf8_lossy(&raw_header[..raw_header.len().min(16)])
        );
    }
    if raw_header.len() < NIFTI1_HEADER_SIZE as usize {
        bail!(
            "file is truncated: {} bytes, shorter than a 348-byte NIfTI-1 header",
            raw_header.len()
        );
    }
    let magic = &raw_header[344..348];
    if magic == MAGIC_PAIR {
        bail!("header-only NIfTI (.hdr/.img pair) is not supported");
    }
    if magic != MAGIC_SINGLE_FILE {
        bail!(
            "not a single-file NIfTI-1 image: bad magic {:?} (expected \"n+1\\0\"; Analyze 7.5 is not supported)",
            String::from_utf8_lossy(magic)
        );
    }
    let header = match NiftiHeader::from_reader(io::Cursor::new(&raw_header)) {
        Ok(h) => h,
        Err(NiftiError::InvalidFormat) => {
            bail!("not a NIfTI-1 file (bad magic; NIfTI-2 and Analyze files are not supported)")
        }
        Err(e) => bail!("invalid NIfTI-1 header: {e}"),
    };

    let dims = header
        .dim()
        .map_err(|e| anyhow!("invalid dim field {:?}: {e}", header.dim))?;
    let full_shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    if full_shape.iter().skip(3).any(|&d| d != 1) {
        bail!(
            "{}D volume of shape {:?} where a 3D volume is expected (a 4th dimension of 1 is accepted; split \
             the volumes or pick one)",
            full_shape.len(),
            full_shape
        );
    }
    let mut file_shape = [1usize; 3];
    for (i, d) in full_shape.iter().take(3).enumerate() {
        file_shape[i] = *d;
    }

    let datatype = header
        .data_type()
        .map_err(|_| anyhow!("unsupported NIfTI datatype code {}", header.datatype))?;
    let elem_size = match datatype {
        NiftiType::Uint8 | NiftiType::Int8 => 1,
        NiftiType::Uint16 | NiftiType::Int16 => 2,
        NiftiType::Rgb24 => 3,
        NiftiType::Uint32 | NiftiType::Int32 | NiftiType::Float32 | NiftiType::Rgba32 => 4,
        NiftiType::Uint64 | NiftiType::Int64 | NiftiType::Float64 => 8,
        other => bail!(
            "unsupported NIfTI datatype {other:?} (code {})",
            header.datatype
        ),
    };

    // skip the rest of the header block (extender + extensions) up to vox_offset
    if !header.vox_offset.is_finite() || header.vox_offset < 0.0 {
        bail!("invalid vox_offset {}", header.vox_offset);
    }
    let vox_offset = (header.vox_offset as u64).max(NIFTI1_MIN_VOX_OFFSET);
    let skip = vox_offset - NIFTI1_HEADER_SIZE;
    let skipped = io::copy(&mut reader.by_ref().take(skip), &mut io::sink())
        .map_err(|e| stream_error("reading header extensions", e))?;
    if skipped != skip {
        bail!("file is truncated: it ends before vox_offset {vox_offset}");
    }

    let nvox: usize = file_shape.iter().product();
    let nbytes = nvox
        .checked_mul(elem_size)
        .ok_or_else(|| anyhow!("volume of shape {full_shape:?} is too large"))?;
    let (raw, error) = read_up_to(&mut reader, nbytes);
    match error {
        Some(e) if e.kind() == io::ErrorKind::OutOfMemory => {
            bail!("cannot allocate {nbytes} bytes for a volume of shape {full_shape:?}")
        }
        Some(e) if gzipped && e.kind() != io::ErrorKind::UnexpectedEof => bail!(
            "corrupt gzip stream after {} of the {nbytes} bytes of voxel data: {e}",
            raw.len()
        ),
        _ => {}
    }
    if raw.len() != nbytes {
        bail!(
            "file is truncated: expected {nbytes} bytes of voxel data for shape {full_shape:?} ({datatype:?}) \
             after the {vox_offset}-byte header, found {}{}",
            raw.len(),
            if gzipped {
                " (the gzip stream ends early)"
            } else {
                ""
            }
        );
    }
    if gzipped {
        // read to the end of the gzip stream so that its CRC and length trailer are checked
        io::copy(&mut reader, &mut io::sink())
            .map_err(|e| stream_error("checking the gzip trailer", e))?;
    }

    let mut values = decode_to_f32(
        &raw,
        datatype,
        header.endianness,
        header.scl_slope,
        header.scl_inter,
    )?;
    drop(raw);
    check_finite(&mut values, options.non_finite, path)?;

    let file_affine = best_affine(&header, file_shape, path);
    let reorientation =
        Reorientation::from_affine(&file_affine, file_shape).with_context(|| {
            format!("cannot orient the volume (file axcodes unknown), affine {file_affine:?}")
        })?;
    let affine = reorientation.canonical_affine(&file_affine);
    let spacing = column_norms(&affine);

    let [nx, ny, nz] = file_shape.map(|d| d as i64);
    // Fortran order: x varies fastest, so the flat buffer is a C-ordered [Z, Y, X] array
    let file_order = Tensor::f_from_slice(&values)?
        .f_view([nz, ny, nx])?
        .f_permute([2, 1, 0])?;
    let data = reorientation.to_canonical(&file_order).f_contiguous()?;

    Ok(Volume {
        data,
        spacing,
        affine,
        reorientation,
        header,
        path: path.to_path_buf(),
    })
}

/// Counts NaN and infinite values; an error by default, else they become 0 with a warning.
fn check_finite(values: &mut [f32], policy: NonFinitePolicy, path: &Path) -> Result<()> {
    let nan = values.iter().filter(|v| v.is_nan()).count();
    let inf = values.iter().filter(|v| v.is_infinite()).count();
    if nan + inf == 0 {
        return Ok(());
    }
    let what = format!(
        "{} of {} voxels are not finite ({nan} NaN, {inf} infinite)",
        nan + inf,
        values.len()
    );
    match policy {
        NonFinitePolicy::Error => bail!(
            "{what}; fix the file, or read it with the replace-with-zero policy for non-finite voxels"
        ),
        NonFinitePolicy::ReplaceWithZero => {
            tracing::warn!(file = %path.display(), "{what}: replaced by 0");
            for v in values.iter_mut().filter(|v| !v.is_finite()) {
                *v = 0.0;
            }
            Ok(())
        }
    }
}

fn column_norms(a: &Affine) -> [f64; 3] {
    let mut n = [0.0; 3];
    for (c, v) in n.iter_mut().enumerate() {
        *v = (a[0][c] * a[0][c] + a[1][c] * a[1][c] + a[2][c] * a[2][c]).sqrt();
    }
    n
}

fn decode_to_f32(
    raw: &[u8],
    datatype: NiftiType,
    endianness: Endianness,
    slope: f32,
    inter: f32,
) -> Result<Vec<f32>> {
    let big = matches!(endianness, Endianness::Big);
    // nibabel: a zero or non-finite slope means "no scaling"
    let scale = slope.is_finite() && slope != 0.0 && !(slope == 1.0 && inter == 0.0);
    let (slope, inter) = (
        slope as f64,
        if inter.is_finite() { inter as f64 } else { 0.0 },
    );

    macro_rules! decode {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            raw.chunks_exact(N)
                .map(|chunk| {
                    let mut bytes = [0u8; N];
                    bytes.copy_from_slice(chunk);
                    let v = if big {
                        <$t>::from_be_bytes(bytes)
                    } else {
                        <$t>::from_le_bytes(bytes)
                    };
                    if scale {
                        (v as f64 * slope + inter) as f32
                    } else {
                        v as f32
                    }
                })
                .collect::<Vec<f32>>()
        }};
    }
    // RGB(A) bytes are interleaved per voxel and never scaled (NIfTI-1: scl_* do not apply to RGB)
    let rgb = |stride: usize| -> Vec<f32> {
        raw.chunks_exact(stride)
            .map(|px| {
                crate::microscopy::rgb_to_gray(px[0] as f64, px[1] as f64, px[2] as f64) as f32
            })
            .collect()
    };

    Ok(match datatype {
        NiftiType::Uint8 => decode!(u8),
        NiftiType::Int8 => decode!(i8),
        NiftiType::Uint16 => decode!(u16),
        NiftiType::Int16 => decode!(i16),
        NiftiType::Uint32 => decode!(u32),
        NiftiType::Int32 => decode!(i32),
        NiftiType::Uint64 => decode!(u64),
        NiftiType::Int64 => decode!(i64),
        NiftiType::Float32 => decode!(f32),
        NiftiType::Float64 => decode!(f64),
        NiftiType::Rgb24 => rgb(3),
        NiftiType::Rgba32 => rgb(4),
        other => bail!("unsupported NIfTI datatype {other:?}"),
    })
}

/// The voxel->world affine of the file's voxel order, chosen like nibabel's `get_best_affine`: sform if
/// `sform_code > 0`, else qform if `qform_code > 0`, else the pixdim-scaled base affine. A degenerate
/// (non-finite or singular) sform/qform is skipped with a warning. Never panics.
fn best_affine(header: &NiftiHeader, file_shape: [usize; 3], path: &Path) -> Affine {
    if header.sform_code > 0 {
        let a = sform_affine(header);
        if Reorientation::from_affine(&a, file_shape).is_ok() {
            return a;
        }
        tracing::warn!(file = %path.display(), "degenerate sform {a:?} ignored");
    }
    if header.qform_code > 0 {
        let a = qform_affine(header);
        if Reorientation::from_affine(&a, file_shape).is_ok() {
            return a;
        }
        tracing::warn!(file = %path.display(), "degenerate qform {a:?} ignored");
    }
    base_affine(header, file_shape)
}

fn sform_affine(h: &NiftiHeader) -> Affine {
    let row = |r: &[f32; 4]| [r[0] as f64, r[1] as f64, r[2] as f64, r[3] as f64];
    [
        row(&h.srow_x),
        row(&h.srow_y),
        row(&h.srow_z),
        [0.0, 0.0, 0.0, 1.0],
    ]
}

fn zoom(p: f32) -> f64 {
    if p.is_finite() && p != 0.0 {
        (p as f64).abs()
    } else {
        1.0
    }
}

/// The qform affine, computed like nifti1_io's `nifti_quatern_to_mat44` (so it never panics, unlike
/// `NiftiHeader::qform_affine`): qfac is -1 when pixdim[0] < 0 and 1 otherwise, voxel sizes are |pixdim|
/// (0 or non-finite becomes 1).
pub fn qform_affine(h: &NiftiHeader) -> Affine {
    let (mut b, mut c, mut d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
    let w2 = 1.0 - (b * b + c * c + d * d);
    let a = if w2 < 1e-7 {
        let n = 1.0 / (b * b + c * c + d * d).sqrt();
        b *= n;
        c *= n;
        d *= n;
        0.0
    } else {
        w2.sqrt()
    };
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let z = [
        zoom(h.pixdim[1]),
        zoom(h.pixdim[2]),
        zoom(h.pixdim[3]) * qfac,
    ];
    let t = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
    let mut out = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            out[i][j] = r[i][j] * z[j];
        }
        out[i][3] = t[i];
    }
    out[3][3] = 1.0;
    out
}

/// nibabel's `shape_zoom_affine` with its x flip: diag(-zx, zy, zz), origin at the volume centre.
fn base_affine(h: &NiftiHeader, file_shape: [usize; 3]) -> Affine {
    let z = [-zoom(h.pixdim[1]), zoom(h.pixdim[2]), zoom(h.pixdim[3])];
    let mut out = [[0.0; 4]; 4];
    for i in 0..3 {
        out[i][i] = z[i];
        let origin = (file_shape[i] as f64 - 1.0) / 2.0;
        out[i][3] = -origin * z[i];
    }
    out[3][3] = 1.0;
    out
}

/// Writes `canonical` (shape = the reference's canonical shape) back in the reference file's voxel order, with
/// the reference's header (same dims, pixdim, qform/sform, xyzt_units; datatype/bitpix/scl fields are set for
/// `datatype`, cal_min/cal_max are cleared since the display range of the source image does not fit a
/// prediction), atomically (write to a temp file in the same dir, then rename). `datatype`: write uint8 for
/// binary masks or float32 for soft maps. The path must end in `.nii` or `.nii.gz` (gzip-compressed), or in
/// `.png` for a 2D (`[H, W, 1]`) reference such as a microscopy image: an 8-bit grey PNG of `round(255 * v)`
/// for either `datatype`, so a binary mask is 0/255, like ivadomed's `pred_to_png`.
pub fn write_like(
    reference: &Volume,
    canonical: &Tensor,
    path: &Path,
    datatype: OutputType,
) -> Result<()> {
    write_all_like(
        reference,
        &[(canonical.shallow_clone(), path.to_owned(), datatype)],
    )
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes several maps in the geometry of one reference, as [`write_like`] each: the tensor work (and a
/// PNG) runs on this thread, the NIfTI encoding and compression (most of a `.nii.gz` write) on up to as many
/// threads as there are cores. Every file is written atomically; the first error is returned once all
/// threads are done.
pub fn write_all_like(reference: &Volume, maps: &[(Tensor, PathBuf, OutputType)]) -> Result<()> {
    let reference_path = reference.path.as_path();
    let mut encodes = Vec::new();
    for (canonical, path, datatype) in maps {
        let prepared = writing(reference_path, path, || {
            prepare_write(reference, canonical, path, *datatype)
        })?;
        match prepared {
            PreparedWrite::Nifti(nifti) => encodes.push(nifti),
            // [H, W, 1] in file order is [rows, columns]: the PNG's own layout
            PreparedWrite::Png { file_order, tmp } => writing(reference_path, path, || {
                finish_write(crate::microscopy::write_png(&file_order, &tmp), &tmp, path)
            })?,
        }
    }
    let encode = |nifti: &PreparedNifti| writing(reference_path, &nifti.path, || nifti.write());
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(encodes.len());
    if threads <= 1 {
        return encodes.iter().try_for_each(|nifti| encode(nifti));
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|first| {
                let (encodes, encode) = (&encodes, &encode);
                scope.spawn(move || -> Result<()> {
                    encodes
                        .iter()
                        .skip(first)
                        .step_by(threads)
                        .try_for_each(|nifti| encode(nifti))
                })
            })
            .collect();
        workers.into_iter().try_for_each(crate::joined)
    })
}

/// Runs one step of writing `path`, naming the file and the reference in its error, and reporting a panic
/// as an error.
fn writing<T>(reference: &Path, path: &Path, step: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(step)) {
        Ok(result) => result.with_context(|| {
            format!(
                "failed to write NIfTI file {} (geometry of {})",
                path.display(),
                reference.display()
            )
        }),
        Err(panic) => Err(anyhow!(
            "failed to write NIfTI file {}: internal panic: {}",
            path.display(),
            panic_message(&panic)
        )),
    }
}

/// A map ready to be written: file order, header and temporary name settled.
enum PreparedWrite {
    Png { file_order: Tensor, tmp: PathBuf },
    Nifti(Box<PreparedNifti>),
}

/// A NIfTI write without tensors, so it can run on any thread.
struct PreparedNifti {
    path: PathBuf,
    tmp: PathBuf,
    header: NiftiHeader,
    shape: Vec<usize>,
    values: Vec<f32>,
    datatype: OutputType,
}

impl PreparedNifti {
    fn write(&self) -> Result<()> {
        let written = write_nifti_file(
            &self.tmp,
            &self.header,
            &self.shape,
            &self.values,
            self.datatype,
        );
        finish_write(written, &self.tmp, &self.path)
    }
}

fn prepare_write(
    reference: &Volume,
    canonical: &Tensor,
    path: &Path,
    datatype: OutputType,
) -> Result<PreparedWrite> {
    let expected: Vec<i64> = reference.shape().iter().map(|&d| d as i64).collect();
    if canonical.size() != expected {
        bail!(
            "tensor shape {:?} does not match the reference's canonical shape {:?}",
            canonical.size(),
            expected
        );
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow!("output path has no file name"))?;
    let ext = if name.ends_with(".nii.gz") {
        ".nii.gz"
    } else if name.ends_with(".nii") {
        ".nii"
    } else if name.to_lowercase().ends_with(".png") {
        ".png"
    } else {
        bail!("output file name must end in .nii, .nii.gz or .png");
    };
    if ext == ".png" && reference.shape()[2] != 1 {
        bail!(
            "a PNG holds one 2D image, but the reference {} has shape {:?}",
            reference.path.display(),
            reference.shape()
        );
    }

    // canonical -> file order, then Fortran order (x fastest) = C order of [Z, Y, X]
    let file_order = reference
        .reorientation
        .to_file(&canonical.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?);
    let flat = file_order
        .f_permute([2, 1, 0])?
        .f_contiguous()?
        .f_view([-1])?;
    let values = Vec::<f32>::try_from(&flat)?;

    // the written dims are the reference's full dims, trailing singleton dims included
    let ref_dims = reference
        .header
        .dim()
        .map_err(|e| anyhow!("reference header has invalid dims: {e}"))?;
    let shape: Vec<usize> = ref_dims.iter().map(|&d| d as usize).collect();
    if shape.iter().product::<usize>() != values.len() {
        bail!(
            "reference dims {shape:?} do not match {} voxels",
            values.len()
        );
    }

    let mut header = reference.header.clone();
    header.cal_min = 0.0;
    header.cal_max = 0.0;

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // no dots in the temp stem: the nifti writer re-derives the extension from the last dot
    let tmp = dir.join(format!(
        ".ivado-tmp-{}-{}{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed),
        ext
    ));
    if ext == ".png" {
        return Ok(PreparedWrite::Png { file_order, tmp });
    }
    Ok(PreparedWrite::Nifti(Box::new(PreparedNifti {
        path: path.to_owned(),
        tmp,
        header,
        shape,
        values,
        datatype,
    })))
}

/// Moves a written temporary file to `path`, or removes it when the write failed.
fn finish_write(written: Result<()>, tmp: &Path, path: &Path) -> Result<()> {
    let result = written.and_then(|()| {
        if !tmp.is_file() {
            bail!("the NIfTI writer did not create {}", tmp.display());
        }
        std::fs::rename(tmp, path)
            .map_err(|e| anyhow!("cannot rename {} to the output: {e}", tmp.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn write_nifti_file(
    tmp: &Path,
    header: &NiftiHeader,
    shape: &[usize],
    values: &[f32],
    datatype: OutputType,
) -> Result<()> {
    use ndarray::ShapeBuilder;
    let writer = nifti::writer::WriterOptions::new(tmp).reference_header(header);
    let shape = ndarray::IxDyn(shape).f();
    let written = match datatype {
        OutputType::F32 => writer.write_nifti(&ndarray::ArrayView::from_shape(shape, values)?),
        OutputType::U8 => {
            let bytes: Vec<u8> = values
                .iter()
                .map(|&v| {
                    if v.is_nan() {
                        0
                    } else {
                        v.round().clamp(0.0, 255.0) as u8
                    }
                })
                .collect();
            writer.write_nifti(&ndarray::Array::from_shape_vec(shape, bytes)?)
        }
    };
    written.map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    const FUNC: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/data_functional_testing"
    );
    const TESTING: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/data-testing"
    );

    fn data_path(rel: &str) -> PathBuf {
        PathBuf::from(rel)
    }

    /// A fresh, unique temp dir (tempfile is not a dependency of the runtime).
    fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "ivado-volume-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn raw_f32(path: &Path) -> (NiftiHeader, Vec<f32>) {
        use nifti::NiftiObject;
        let obj = nifti::ReaderOptions::new().read_file(path).unwrap();
        let header = obj.header().clone();
        let volume = obj.into_volume();
        let dt = header.data_type().unwrap();
        let raw = volume.into_raw_data();
        let values = decode_to_f32(
            &raw,
            dt,
            header.endianness,
            header.scl_slope,
            header.scl_inter,
        )
        .unwrap();
        (header, values)
    }

    fn at(t: &Tensor, idx: [usize; 3]) -> f64 {
        t.double_value(&[idx[0] as i64, idx[1] as i64, idx[2] as i64])
    }

    fn world(a: &Affine, v: [usize; 3]) -> [f64; 3] {
        let mut w = [0.0; 3];
        for (r, wr) in w.iter_mut().enumerate() {
            *wr = a[r][0] * v[0] as f64 + a[r][1] * v[1] as f64 + a[r][2] * v[2] as f64 + a[r][3];
        }
        w
    }

    fn assert_close(a: [f64; 3], b: [f64; 3]) {
        for i in 0..3 {
            assert!((a[i] - b[i]).abs() < 1e-4, "{a:?} != {b:?}");
        }
    }

    #[test]
    fn reads_functional_t2w_in_canonical_order() {
        // DATA.md calls these volumes "RPI" (the SCT naming). Their sform (code 2, qform_code 0) is
        // [[1,0,0],[0,.987,.162],[0,-.162,.987]]: +x, +y, +z with a 9.3 degree tilt about x, i.e. nibabel's
        // RAS. So as_closest_canonical is the identity here: no permutation and no flip.
        let path = data_path(&format!("{FUNC}/sub-unf01/anat/sub-unf01_T2w.nii.gz"));
        let vol = read_volume(&path).unwrap();
        assert_eq!(vol.reorientation.file_shape, [131, 141, 16]);
        assert_eq!(vol.data.size(), vec![131, 141, 16]);
        assert_eq!(vol.data.kind(), Kind::Float);
        assert_eq!(vol.file_axcodes(), ['R', 'A', 'S']);
        assert!(vol.reorientation.is_identity());
        for s in vol.spacing {
            assert!((s - 1.0).abs() < 1e-5, "spacing {:?}", vol.spacing);
        }
        // the canonical affine is the sform itself
        assert_eq!(vol.affine, sform_affine(&vol.header));

        // file order value at file index (i,j,k) comes from the Fortran-ordered raw buffer:
        // flat = i + 131*(j + 141*k)
        let (_, raw) = raw_f32(&path);
        for f in [
            [0usize, 0, 0],
            [10, 20, 3],
            [130, 140, 15],
            [65, 70, 8],
            [1, 139, 14],
        ] {
            let flat = f[0] + 131 * (f[1] + 141 * f[2]);
            let v = vol.reorientation.canonical_index(f);
            assert_eq!(v, f); // identity orientation
            assert_eq!(at(&vol.data, v), raw[flat] as f64, "voxel {f:?}");
        }
        let sum: f64 = raw.iter().map(|&x| x as f64).sum();
        assert!(
            (vol.data.sum(Kind::Double).double_value(&[]) - sum).abs() < 1e-6 * sum.abs().max(1.0)
        );
    }

    #[test]
    fn reads_las_volume_with_a_flip() {
        // sub-unf02_T2star (int16, 45x45x2, pixdim[0] = -1) has sform columns (-4.98,0,-.16),
        // (0,4.97,-.35), (-1.17,2.62,37.4): axis 0 points Left, so canonical flips axis 0 only:
        // canonical index (x,y,z) = file index (44-x, y, z).
        let path = data_path(&format!("{TESTING}/sub-unf02/anat/sub-unf02_T2star.nii.gz"));
        let vol = read_volume(&path).unwrap();
        assert_eq!(vol.header.datatype, NiftiType::Int16 as i16);
        assert_eq!(vol.file_axcodes(), ['L', 'A', 'S']);
        assert_eq!(vol.reorientation.perm, [0, 1, 2]);
        assert_eq!(vol.reorientation.flip, [true, false, false]);
        assert_eq!(vol.data.size(), vec![45, 45, 2]);
        let (_, raw) = raw_f32(&path);
        for f in [[0usize, 0, 0], [3, 7, 1], [44, 44, 1], [20, 30, 0]] {
            let flat = f[0] + 45 * (f[1] + 45 * f[2]);
            let v = [44 - f[0], f[1], f[2]];
            assert_eq!(vol.reorientation.canonical_index(f), v);
            assert_eq!(vol.reorientation.file_index(v), f);
            assert_eq!(at(&vol.data, v), raw[flat] as f64, "voxel {f:?}");
            // the same voxel sits at the same world position in both orders
            assert_close(world(&vol.affine, v), world(&vol.file_affine(), f));
        }
        assert!(vol.affine[0][0] > 0.0 && vol.affine[1][1] > 0.0 && vol.affine[2][2] > 0.0);
        assert!(
            (vol.spacing[0] - 4.9778).abs() < 1e-3 && (vol.spacing[2] - 37.5).abs() < 1e-2,
            "{:?}",
            vol.spacing
        );
    }

    #[test]
    fn reads_tiny_int16_and_float64_volumes() {
        let mut seen = std::collections::BTreeSet::new();
        for sub in ["sub-unf02", "sub-unf03"] {
            for contrast in ["T1w", "T2w", "T2star"] {
                let path = data_path(&format!("{TESTING}/{sub}/anat/{sub}_{contrast}.nii.gz"));
                let vol = read_volume(&path).unwrap();
                let (h, raw) = raw_f32(&path);
                seen.insert(h.datatype);
                let fs = vol.reorientation.file_shape;
                assert_eq!(fs.map(|d| d as u16), [h.dim[1], h.dim[2], h.dim[3]]);
                assert_eq!(vol.data.numel(), raw.len());
                // every voxel: canonical value == file value at the mapped index
                let flat_data = Vec::<f32>::try_from(&vol.data.view([-1])).unwrap();
                let cs = vol.shape();
                for (ci, &value) in flat_data.iter().enumerate() {
                    let v = [ci / (cs[1] * cs[2]), (ci / cs[2]) % cs[1], ci % cs[2]];
                    let f = vol.reorientation.file_index(v);
                    assert_eq!(
                        value,
                        raw[f[0] + fs[0] * (f[1] + fs[1] * f[2])],
                        "{} voxel {v:?}",
                        path.display()
                    );
                }
                for s in vol.spacing {
                    assert!(s > 1.0, "{}: spacing {:?}", path.display(), vol.spacing);
                }
            }
        }
        assert!(
            seen.contains(&(NiftiType::Int16 as i16))
                && seen.contains(&(NiftiType::Float64 as i16)),
            "{seen:?}"
        );
    }

    #[test]
    fn reads_ct_and_its_uint8_label() {
        let ct = read_volume(Path::new(&format!(
            "{TESTING}/ct_scan/sub-spleen2/ct/sub-spleen2_ct.nii.gz"
        )))
        .unwrap();
        let seg = read_volume(Path::new(&format!(
            "{TESTING}/ct_scan/derivatives/labels/sub-spleen2/ct/sub-spleen2_ct_seg-manual.nii.gz"
        )))
        .unwrap();
        assert_eq!(ct.data.size(), vec![164, 166, 26]);
        assert_eq!(seg.header.datatype, NiftiType::Uint8 as i16);
        assert_eq!(seg.data.size(), ct.data.size());
        assert_eq!(seg.affine, ct.affine);
        assert!(
            (ct.spacing[0] - 0.7949).abs() < 1e-3 && (ct.spacing[2] - 5.0).abs() < 1e-6,
            "{:?}",
            ct.spacing
        );
        let ones = seg.data.eq(1.0).sum(Kind::Int64).int64_value(&[]);
        let zeros = seg.data.eq(0.0).sum(Kind::Int64).int64_value(&[]);
        assert!(ones > 0 && ones + zeros == seg.data.numel() as i64);
    }

    #[test]
    fn round_trip_keeps_geometry_and_data() {
        let dir = temp_dir("roundtrip");
        for (src, out_type) in [
            (
                format!("{FUNC}/sub-unf01/anat/sub-unf01_T2w.nii.gz"),
                OutputType::F32,
            ),
            (
                format!("{TESTING}/sub-unf02/anat/sub-unf02_T2star.nii.gz"),
                OutputType::F32,
            ),
            (
                format!("{FUNC}/derivatives/labels/sub-unf01/anat/sub-unf01_T2w_seg-manual.nii.gz"),
                OutputType::U8,
            ),
        ] {
            let src = PathBuf::from(src);
            let vol = read_volume(&src).unwrap();
            for ext in [".nii.gz", ".nii"] {
                let out = dir.join(format!("pred.v1{ext}"));
                write_like(&vol, &vol.data, &out, out_type).unwrap();
                let (h_in, raw_in) = raw_f32(&src);
                let (h_out, raw_out) = raw_f32(&out);
                assert_eq!(h_out.dim, h_in.dim);
                assert_eq!(h_out.pixdim, h_in.pixdim);
                assert_eq!(h_out.sform_code, h_in.sform_code);
                assert_eq!(h_out.qform_code, h_in.qform_code);
                assert_eq!(h_out.srow_x, h_in.srow_x);
                assert_eq!(h_out.srow_y, h_in.srow_y);
                assert_eq!(h_out.srow_z, h_in.srow_z);
                assert_eq!(
                    [
                        h_out.quatern_b,
                        h_out.quatern_c,
                        h_out.quatern_d,
                        h_out.quatern_x,
                        h_out.quatern_y,
                        h_out.quatern_z
                    ],
                    [
                        h_in.quatern_b,
                        h_in.quatern_c,
                        h_in.quatern_d,
                        h_in.quatern_x,
                        h_in.quatern_y,
                        h_in.quatern_z
                    ]
                );
                assert_eq!(h_out.xyzt_units, h_in.xyzt_units);
                let expected_type = match out_type {
                    OutputType::F32 => NiftiType::Float32,
                    OutputType::U8 => NiftiType::Uint8,
                };
                assert_eq!(h_out.datatype, expected_type as i16);
                assert_eq!(raw_out, raw_in, "{}", src.display());
                // and our own reader agrees
                let back = read_volume(&out).unwrap();
                assert_eq!(back.reorientation, vol.reorientation);
                assert_eq!(back.affine, vol.affine);
                assert!(back.data.equal(&vol.data));
            }
        }
        // no temp files left behind
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".ivado-tmp"))
            .collect();
        assert!(leftovers.is_empty());
        // wrong shape is an error naming the output file
        let vol = read_volume(Path::new(&format!(
            "{TESTING}/sub-unf02/anat/sub-unf02_T2w.nii.gz"
        )))
        .unwrap();
        let out = dir.join("bad.nii.gz");
        let err = write_like(
            &vol,
            &Tensor::zeros([2, 2, 2], (Kind::Float, Device::Cpu)),
            &out,
            OutputType::U8,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains(&out.display().to_string()),
            "{err:#}"
        );
        assert!(!out.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_files_give_errors_naming_the_file() {
        let dir = temp_dir("bad");
        let src = format!("{FUNC}/sub-unf01/anat/sub-unf01_T2w.nii.gz");
        let bytes = std::fs::read(&src).unwrap();

        let truncated = dir.join("truncated.nii.gz");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_volume(&truncated).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&truncated.display().to_string()), "{msg}");
        // 131 x 141 x 16 float32 voxels
        let expected = format!("expected {} bytes of voxel data", 131 * 141 * 16 * 4);
        assert!(
            msg.contains("truncated") && msg.contains(&expected),
            "{msg}"
        );
        eprintln!("truncated: {msg}");

        let text = dir.join("x.nii.gz");
        std::fs::write(&text, "this is not a NIfTI file\n".repeat(40)).unwrap();
        let msg = format!("{:#}", read_volume(&text).unwrap_err());
        assert!(
            msg.contains(&text.display().to_string())
                && msg.contains("not a NIfTI-1 file: sizeof_hdr is")
                && msg.contains("not gzip-compressed"),
            "{msg}"
        );
        eprintln!("text: {msg}");

        let short = dir.join("short.nii");
        std::fs::write(&short, "tiny").unwrap();
        let msg = format!("{:#}", read_volume(&short).unwrap_err());
        assert!(msg.contains(&short.display().to_string()), "{msg}");

        let missing = dir.join("missing.nii.gz");
        let msg = format!("{:#}", read_volume(&missing).unwrap_err());
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        eprintln!("missing: {msg}");

        let odd = dir.join("volume.mgz");
        std::fs::write(&odd, "x").unwrap();
        let msg = format!("{:#}", read_volume(&odd).unwrap_err());
        assert!(
            msg.contains(&odd.display().to_string()) && msg.contains("unsupported file extension"),
            "{msg}"
        );

        // a corrupted byte inside the compressed stream
        let mut corrupt = bytes.clone();
        let mid = corrupt.len() / 2;
        for b in &mut corrupt[mid..mid + 64] {
            *b ^= 0x5a;
        }
        let corrupt_path = dir.join("corrupt.nii.gz");
        std::fs::write(&corrupt_path, &corrupt).unwrap();
        let msg = format!("{:#}", read_volume(&corrupt_path).unwrap_err());
        assert!(
            msg.contains(&corrupt_path.display().to_string()) && msg.contains("corrupt gzip"),
            "{msg}"
        );
        eprintln!("corrupt: {msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Writes a small volume with the nifti crate's own writer.
    fn write_synthetic(
        path: &Path,
        header: &NiftiHeader,
        shape: &[usize],
        f: impl Fn(&[usize]) -> f32,
    ) {
        use ndarray::Dimension;
        let arr = ndarray::Array::from_shape_fn(ndarray::IxDyn(shape), |idx| f(idx.slice()));
        nifti::writer::WriterOptions::new(path)
            .reference_header(header)
            .write_nifti(&arr)
            .unwrap();
    }

    fn value_of(idx: &[usize]) -> f32 {
        (idx[0] * 100 + idx[1] * 10 + idx[2]) as f32
    }

    #[test]
    fn synthetic_permuted_and_flipped_sform() {
        let dir = temp_dir("synthetic");
        let path = dir.join("perm.nii.gz");
        // file axis 0 -> Inferior (2 mm), axis 1 -> Right (3 mm), axis 2 -> Posterior (4 mm): "IRP"
        let header = NiftiHeader {
            pixdim: [1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0],
            sform_code: 2,
            qform_code: 0,
            srow_x: [0.0, 3.0, 0.0, 10.0],
            srow_y: [0.0, 0.0, -4.0, 20.0],
            srow_z: [-2.0, 0.0, 0.0, 30.0],
            xyzt_units: 2,
            ..NiftiHeader::default()
        };
        write_synthetic(&path, &header, &[4, 5, 6], value_of);
        let vol = read_volume(&path).unwrap();
        assert_eq!(vol.file_axcodes(), ['I', 'R', 'P']);
        assert_eq!(vol.reorientation.perm, [1, 2, 0]);
        assert_eq!(vol.reorientation.flip, [false, true, true]);
        assert_eq!(vol.data.size(), vec![5, 6, 4]);
        assert_eq!(vol.spacing, [3.0, 4.0, 2.0]);
        // diagonal positive, origin moved to the far ends of the flipped axes:
        // t' = (10,20,30) + (0,-4,0)*(6-1) + (0,0,-2)*(4-1) = (10, 0, 24)
        let expected: Affine = [
            [3.0, 0.0, 0.0, 10.0],
            [0.0, 4.0, 0.0, 0.0],
            [0.0, 0.0, 2.0, 24.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        assert_eq!(vol.affine, expected);
        assert_eq!(vol.file_affine(), sform_affine(&header));
        // canonical (x,y,z) = file (3-z, x, 5-y)
        for v in [[0usize, 0, 0], [4, 5, 3], [2, 1, 3], [1, 4, 0]] {
            let f = [3 - v[2], v[0], 5 - v[1]];
            assert_eq!(vol.reorientation.file_index(v), f);
            assert_eq!(at(&vol.data, v), value_of(&f) as f64);
            assert_close(world(&vol.affine, v), world(&vol.file_affine(), f));
        }
        // exact inverse, also with leading (channel) dims
        let x = Tensor::rand([4, 5, 6], (Kind::Float, Device::Cpu));
        let c = vol.reorientation.to_canonical(&x);
        assert_eq!(c.size(), vec![5, 6, 4]);
        assert!(vol.reorientation.to_file(&c).equal(&x));
        let xb = Tensor::rand([2, 3, 4, 5, 6], (Kind::Float, Device::Cpu));
        let cb = vol.reorientation.to_canonical(&xb);
        assert_eq!(cb.size(), vec![2, 3, 5, 6, 4]);
        assert!(vol.reorientation.to_file(&cb).equal(&xb));
        assert!(cb
            .get(1)
            .get(2)
            .equal(&vol.reorientation.to_canonical(&xb.get(1).get(2))));

        // written back in the file's order
        let out = dir.join("perm_pred.nii.gz");
        write_like(&vol, &vol.data, &out, OutputType::F32).unwrap();
        let (h, raw) = raw_f32(&out);
        assert_eq!(h.dim, [3, 4, 5, 6, 1, 1, 1, 1]);
        for (k, &value) in raw.iter().enumerate() {
            let f = [k % 4, (k / 4) % 5, k / 20];
            assert_eq!(value, value_of(&f));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn qform_only_and_negative_pixdim_do_not_panic() {
        let dir = temp_dir("qform");
        // 180 degrees about z (b=c=0, d=1 -> a=0), qfac -1: columns (-2,0,0), (0,-3,0), (0,0,-4): LPI
        let mut header = NiftiHeader {
            pixdim: [-1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0],
            sform_code: 0,
            qform_code: 1,
            quatern_b: 0.0,
            quatern_c: 0.0,
            quatern_d: 1.0,
            quatern_x: 5.0,
            quatern_y: 6.0,
            quatern_z: 7.0,
            ..NiftiHeader::default()
        };
        let ours = qform_affine(&header);
        let theirs: nalgebra::Matrix4<f64> = header.qform_affine();
        for r in 0..4 {
            for c in 0..4 {
                assert!(
                    (ours[r][c] - theirs[(r, c)]).abs() < 1e-6,
                    "{ours:?} vs {theirs}"
                );
            }
        }
        let path = dir.join("lpi.nii");
        write_synthetic(&path, &header, &[4, 5, 6], value_of);
        let vol = read_volume(&path).unwrap();
        assert_eq!(vol.file_axcodes(), ['L', 'P', 'I']);
        assert_eq!(vol.reorientation.flip, [true, true, true]);
        assert_eq!(at(&vol.data, [0, 0, 0]), value_of(&[3, 4, 5]) as f64);
        assert!(vol.affine[0][0] > 0.0 && vol.affine[1][1] > 0.0 && vol.affine[2][2] > 0.0);

        // negative pixdim would make NiftiHeader::qform_affine panic; we read it (|pixdim|)
        header.pixdim = [0.0, -2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0];
        let path = dir.join("negative.nii.gz");
        write_synthetic(&path, &header, &[4, 5, 6], value_of);
        let vol = read_volume(&path).unwrap();
        assert_eq!(vol.spacing, [2.0, 3.0, 4.0]);

        // no sform nor qform: nibabel's base affine, x flipped -> LAS
        header.qform_code = 0;
        header.pixdim = [1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0];
        let path = dir.join("base.nii.gz");
        write_synthetic(&path, &header, &[4, 5, 6], value_of);
        let vol = read_volume(&path).unwrap();
        assert_eq!(vol.file_axcodes(), ['L', 'A', 'S']);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn four_d_volumes() {
        let dir = temp_dir("4d");
        let header = NiftiHeader {
            sform_code: 2,
            ..NiftiHeader::default()
        };
        let ok = dir.join("singleton.nii.gz");
        write_synthetic(&ok, &header, &[4, 5, 6, 1], value_of);
        let vol = read_volume(&ok).unwrap();
        assert_eq!(vol.data.size(), vec![4, 5, 6]);
        assert_eq!(at(&vol.data, [3, 2, 1]), 321.0);
        // written back with the trailing singleton dim
        let out = dir.join("singleton_pred.nii.gz");
        write_like(&vol, &vol.data, &out, OutputType::U8).unwrap();
        let (h, _) = raw_f32(&out);
        assert_eq!(&h.dim[..5], &[4, 4, 5, 6, 1]);

        let bad = dir.join("real4d.nii.gz");
        write_synthetic(&bad, &header, &[4, 5, 6, 2], value_of);
        let msg = format!("{:#}", read_volume(&bad).unwrap_err());
        assert!(
            msg.contains(&bad.display().to_string()) && msg.contains("[4, 5, 6, 2]"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn scaling_and_big_endian() {
        let raw: Vec<u8> = [1i16, -2, 300]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let v = decode_to_f32(&raw, NiftiType::Int16, Endianness::Big, 0.5, 10.0).unwrap();
        assert_eq!(v, vec![10.5, 9.0, 160.0]);
        let v = decode_to_f32(&raw, NiftiType::Int16, Endianness::Big, 0.0, 10.0).unwrap();
        assert_eq!(v, vec![1.0, -2.0, 300.0]);
    }

    /// A NIfTI-1 file built byte by byte (little-endian, no sform/qform): an independent writer for tests.
    fn nifti_bytes(
        dims: &[u16],
        datatype: i16,
        bitpix: i16,
        slope: f32,
        inter: f32,
        data: &[u8],
    ) -> Vec<u8> {
        let mut h = vec![0u8; 352];
        h[0..4].copy_from_slice(&348i32.to_le_bytes());
        let mut dim = [1u16; 8];
        dim[0] = dims.len() as u16;
        dim[1..=dims.len()].copy_from_slice(dims);
        for (i, d) in dim.iter().enumerate() {
            h[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
        }
        h[70..72].copy_from_slice(&datatype.to_le_bytes());
        h[72..74].copy_from_slice(&bitpix.to_le_bytes());
        for i in 0..8 {
            h[76 + 4 * i..80 + 4 * i].copy_from_slice(&1.0f32.to_le_bytes());
        }
        h[108..112].copy_from_slice(&352.0f32.to_le_bytes());
        h[112..116].copy_from_slice(&slope.to_le_bytes());
        h[116..120].copy_from_slice(&inter.to_le_bytes());
        h[344..348].copy_from_slice(b"n+1\0");
        h.extend_from_slice(data);
        h
    }

    /// The values of a volume in the file's (Fortran) order, canonical orientation undone.
    fn file_order_values(vol: &Volume) -> Vec<f32> {
        let t = vol
            .reorientation
            .to_file(&vol.data)
            .permute([2, 1, 0])
            .contiguous();
        Vec::<f32>::try_from(&t.view([-1])).unwrap()
    }

    #[test]
    fn every_integer_and_float_datatype_with_scaling() {
        let dir = temp_dir("datatypes");
        // four voxels per type (2 x 2 x 1), slope 2 and intercept 3 applied: v * 2 + 3
        macro_rules! case {
            ($t:ty, $code:expr, $values:expr) => {{
                let values: [$t; 4] = $values;
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                let bits = (8 * std::mem::size_of::<$t>()) as i16;
                let path = dir.join(format!("dt{}.nii", $code));
                std::fs::write(
                    &path,
                    nifti_bytes(&[2, 2, 1], $code, bits, 2.0, 3.0, &bytes),
                )
                .unwrap();
                let vol = read_image(&path, None).unwrap();
                let expected: Vec<f32> = values
                    .iter()
                    .map(|&v| (v as f64 * 2.0 + 3.0) as f32)
                    .collect();
                assert_eq!(file_order_values(&vol), expected, "datatype {}", $code);
            }};
        }
        case!(u8, 2, [0, 1, 200, 255]);
        case!(i8, 256, [-128, -1, 0, 127]);
        case!(i16, 4, [-32768, -2, 300, 32767]);
        case!(u16, 512, [0, 1, 40000, 65535]);
        case!(i32, 8, [i32::MIN, -7, 0, 1 << 20]);
        case!(u32, 768, [0, 5, 1 << 24, 3_000_000_000]);
        case!(i64, 1024, [-(1 << 40), -1, 0, 1 << 30]);
        case!(u64, 1280, [0, 1, 1 << 33, 77]);
        case!(f32, 16, [-1.5, 0.0, 2.25, 1e6]);
        case!(f64, 64, [-1.5, 0.0, 2.25, 1e-3]);
        // slope 0 means no scaling (nibabel)
        let path = dir.join("noscale.nii");
        std::fs::write(&path, nifti_bytes(&[2, 1, 1], 2, 8, 0.0, 3.0, &[7, 9])).unwrap();
        assert_eq!(
            file_order_values(&read_image(&path, None).unwrap()),
            vec![7.0, 9.0]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rgb_nifti_becomes_luma_grey() {
        // synthetic RGB24 and RGBA32 (interleaved per voxel; scaling ignored for RGB), then the real file
        let dir = temp_dir("rgb");
        let rgb = [200u8, 100, 50, 0, 0, 255];
        let path = dir.join("rgb24.nii");
        std::fs::write(&path, nifti_bytes(&[2, 1, 1], 128, 24, 2.0, 3.0, &rgb)).unwrap();
        let got = file_order_values(&read_image(&path, None).unwrap());
        // 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 124.2; 0.114 * 255 = 29.07
        assert!(
            (got[0] - 124.2).abs() < 1e-4 && (got[1] - 29.07).abs() < 1e-4,
            "{got:?}"
        );
        let rgba = [200u8, 100, 50, 0, 0, 0, 255, 255];
        let path = dir.join("rgba32.nii");
        std::fs::write(&path, nifti_bytes(&[2, 1, 1], 2304, 32, 1.0, 0.0, &rgba)).unwrap();
        let got = file_order_values(&read_image(&path, None).unwrap());
        assert!(
            (got[0] - 124.2).abs() < 1e-4 && (got[1] - 29.07).abs() < 1e-4,
            "{got:?}"
        );

        let real = PathBuf::from(format!("{TESTING}/rgb_test_file.nii.gz"));
        let vol = read_image(&real, None).unwrap();
        let mut raw = Vec::new();
        flate2::read::MultiGzDecoder::new(File::open(&real).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(i16::from_le_bytes([raw[70], raw[71]]), 128);
        let dims: Vec<usize> = (0..4)
            .map(|i| u16::from_le_bytes([raw[40 + 2 * i], raw[41 + 2 * i]]) as usize)
            .collect();
        assert_eq!(dims, vec![3, 10, 10, 4]);
        let offset = f32::from_le_bytes([raw[108], raw[109], raw[110], raw[111]]) as usize;
        assert_eq!(raw.len(), offset + 10 * 10 * 4 * 3);
        let mut distinct_channels = 0;
        for f in [
            [0usize, 0, 0],
            [3, 4, 1],
            [9, 9, 3],
            [0, 5, 2],
            [3, 5, 2],
            [6, 5, 2],
            [8, 5, 2],
        ] {
            let k = offset + 3 * (f[0] + 10 * (f[1] + 10 * f[2]));
            let (r, g, b) = (raw[k] as f64, raw[k + 1] as f64, raw[k + 2] as f64);
            if r != g || g != b {
                distinct_channels += 1;
            }
            let expected = 0.299 * r + 0.587 * g + 0.114 * b;
            let got = at(&vol.data, vol.reorientation.canonical_index(f));
            assert!(
                (got - expected).abs() < 1e-4,
                "voxel {f:?}: {got} vs {expected}"
            );
        }
        // the file's only coloured voxels are file x 0..=8 at y 5, z 2, e.g. (138, 201, 227) -> 185.127
        assert_eq!(distinct_channels, 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Voxel values decoded straight from the decompressed bytes at vox_offset (int16 / float32 / float64,
    /// little-endian), with scl_slope / scl_inter applied when the slope is non-zero: `(dims, values)`.
    fn raw_header_offset_read(path: &Path) -> (Vec<usize>, i16, Vec<f64>) {
        let mut raw = Vec::new();
        flate2::read::MultiGzDecoder::new(File::open(path).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]), 348);
        let i16_at = |o: usize| i16::from_le_bytes([raw[o], raw[o + 1]]);
        let f32_at = |o: usize| f32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]]);
        let dims: Vec<usize> = (1..=3).map(|i| i16_at(40 + 2 * i) as usize).collect();
        let datatype = i16_at(70);
        let (offset, slope, inter) = (f32_at(108) as usize, f32_at(112), f32_at(116));
        let n: usize = dims.iter().product();
        let data = &raw[offset..];
        let values: Vec<f64> = (0..n)
            .map(|i| match datatype {
                4 => i16::from_le_bytes([data[2 * i], data[2 * i + 1]]) as f64,
                16 => f32::from_le_bytes(data[4 * i..4 * i + 4].try_into().unwrap()) as f64,
                64 => f64::from_le_bytes(data[8 * i..8 * i + 8].try_into().unwrap()),
                other => panic!("datatype {other} not handled by this test"),
            })
            .map(|v| {
                if slope != 0.0 && slope.is_finite() {
                    v * slope as f64 + inter as f64
                } else {
                    v
                }
            })
            .collect();
        (dims, datatype, values)
    }

    #[test]
    fn int16_and_float64_match_raw_header_offset_reads() {
        let mut seen = std::collections::BTreeSet::new();
        for sub in ["sub-unf02", "sub-unf03"] {
            for contrast in ["T1w", "T2w", "T2star"] {
                let path = PathBuf::from(format!("{TESTING}/{sub}/anat/{sub}_{contrast}.nii.gz"));
                let (dims, datatype, expected) = raw_header_offset_read(&path);
                seen.insert(datatype);
                let vol = read_image(&path, None).unwrap();
                assert_eq!(vol.reorientation.file_shape.to_vec(), dims);
                let got = file_order_values(&vol);
                assert_eq!(got.len(), expected.len());
                for (g, e) in got.iter().zip(&expected) {
                    assert_eq!(*g, *e as f32, "{}", path.display());
                }
            }
        }
        assert!(seen.contains(&4) && seen.contains(&64), "{seen:?}");
    }

    #[test]
    fn non_finite_voxels_are_counted() {
        let dir = temp_dir("nan");
        let values = [
            1.0f32,
            f32::NAN,
            f32::INFINITY,
            f32::NAN,
            f32::NEG_INFINITY,
            2.0,
        ];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = dir.join("nan.nii");
        std::fs::write(&path, nifti_bytes(&[3, 2, 1], 16, 32, 1.0, 0.0, &bytes)).unwrap();
        let msg = format!("{:#}", read_image(&path, None).unwrap_err());
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains("4 of 6 voxels are not finite (2 NaN, 2 infinite)"),
            "{msg}"
        );
        let options = ReadOptions {
            non_finite: NonFinitePolicy::ReplaceWithZero,
        };
        let vol = read_image_with(&path, None, options).unwrap();
        assert_eq!(file_order_values(&vol), vec![1.0, 0.0, 0.0, 0.0, 0.0, 2.0]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
