//! 2D microscopy images (PNG, TIFF) as [`Volume`]s, their pixel size from BIDS sidecars, and PNG predictions.
//!
//! # Grayscale convention
//! Every image becomes one grey channel on the **8-bit scale** (0..=255, as f32, fractions kept):
//! - 16-bit samples are divided by 257, so that `65535 -> 255` and a 16-bit image made from an 8-bit one by
//!   `v * 257` (the usual widening, the one of `data_test_png_tif`) reads back exactly as `v`;
//! - RGB(A) becomes `0.299 R + 0.587 G + 0.114 B` (ITU-R BT.601 luma, the weights of Pillow's `convert("L")`
//!   / `convert("F")`, which is what ivadomed's `imageio.imread(..., as_gray=True)` calls); a grey pixel
//!   (`R = G = B`) keeps its value;
//! - alpha is dropped (never premultiplied), like ivadomed.
//!
//! The same weights turn RGB NIfTI (datatype 128 / 2304) to grey in [`crate::volume`].
//!
//! # Geometry
//! An image of H rows and W columns becomes a `Volume` of shape `[H, W, 1]` (axis 0 = rows, axis 1 = columns,
//! as ivadomed's `np.expand_dims(imread(...), -1)`), never reoriented. Its spacing comes from the sidecar's
//! `PixelSize` (`[X, Y]` = `[width, height]`, `[X, Y, Z]`, or one number) and `PixelSizeUnits` (`mm`, `um`,
//! `nm`), converted to mm in ivadomed's order `[Y (rows), X (columns), Z]`, Z being X when absent or 0. The
//! affine is `diag(spacing)` with the origin at 0, so microscopy and MRI share the physical-space transforms.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nifti::NiftiHeader;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::volume::{Affine, Reorientation, Volume};

/// Luma weights (R, G, B) of the grayscale convention (ITU-R BT.601, as Pillow).
pub const GRAY_WEIGHTS: [f64; 3] = [0.299, 0.587, 0.114];

/// Divisor taking 16-bit samples to the 8-bit scale (65535 / 255).
pub const SIXTEEN_TO_EIGHT_BIT: f64 = 257.0;

/// File extensions read as microscopy images (lower case, with the dot).
pub const MICROSCOPY_EXTENSIONS: [&str; 3] = [".png", ".tif", ".tiff"];

/// True when `path` names a PNG or TIFF file (by extension, case-insensitive).
pub fn is_microscopy(path: &Path) -> bool {
    let name = file_name_lower(path);
    MICROSCOPY_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

fn file_name_lower(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
}

/// The grey value of one RGB pixel, on the scale of its samples.
pub fn rgb_to_gray(r: f64, g: f64, b: f64) -> f64 {
    GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b
}

/// A decoded 2D image in the grayscale convention: `values[row * width + col]` on the 8-bit scale.
#[derive(Debug, Clone, PartialEq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
    /// what the file held, e.g. "8-bit RGBA", for messages and tests
    pub source_format: String,
}

/// Interleaved samples (`channels` per pixel, 1..=4) at `bits` per sample -> grey on the 8-bit scale.
fn samples_to_gray(samples: &[u16], channels: usize, bits: u8) -> Vec<f32> {
    let scale = if bits == 16 {
        SIXTEEN_TO_EIGHT_BIT
    } else {
        1.0
    };
    samples
        .chunks_exact(channels)
        .map(|px| {
            let v = |i: usize| px[i] as f64 / scale;
            let grey = match channels {
                1 | 2 => v(0),
                _ => rgb_to_gray(v(0), v(1), v(2)),
            };
            grey as f32
        })
        .collect()
}

fn channel_name(channels: usize) -> &'static str {
    match channels {
        1 => "gray",
        2 => "gray+alpha",
        3 => "RGB",
        _ => "RGBA",
    }
}

/// Decodes a PNG (8 or 16 bit; gray, gray+alpha, RGB, RGBA, or palette, which is expanded to RGB(A)).
pub fn decode_png(path: &Path) -> Result<GrayImage> {
    let file = File::open(path).map_err(|e| anyhow!("cannot open: {e}"))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    // palette -> RGB(A), gray below 8 bits -> 8 bits, tRNS -> alpha; 16 bits stay 16 bits
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder
        .read_info()
        .map_err(|e| anyhow!("not a valid PNG file: {e}"))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| anyhow!("PNG image is too large"))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| anyhow!("corrupt or truncated PNG data: {e}"))?;
    let (width, height) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("PNG palette was not expanded"),
    };
    let bits = match info.bit_depth {
        png::BitDepth::Eight => 8u8,
        png::BitDepth::Sixteen => 16,
        other => bail!("unsupported PNG bit depth {other:?} after expansion"),
    };
    let bytes_per_sample = bits as usize / 8;
    let row_bytes = width * channels * bytes_per_sample;
    let mut samples = Vec::with_capacity(width * height * channels);
    for row in buf.chunks(info.line_size).take(height) {
        let row = &row[..row_bytes];
        if bits == 8 {
            samples.extend(row.iter().map(|&b| b as u16));
        } else {
            // PNG stores 16-bit samples big-endian
            samples.extend(
                row.chunks_exact(2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]])),
            );
        }
    }
    if samples.len() != width * height * channels {
        bail!(
            "PNG data holds {} samples, expected {width} x {height} x {channels}",
            samples.len()
        );
    }
    Ok(GrayImage {
        width,
        height,
        values: samples_to_gray(&samples, channels, bits),
        source_format: format!("{bits}-bit {}", channel_name(channels)),
    })
}

/// Decodes the single page of a TIFF (8 or 16 bit; gray, gray+alpha, RGB, RGBA).
pub fn decode_tiff(path: &Path) -> Result<GrayImage> {
    use tiff::decoder::{Decoder, DecodingResult};
    use tiff::ColorType;
    let file = File::open(path).map_err(|e| anyhow!("cannot open: {e}"))?;
    let mut decoder =
        Decoder::new(BufReader::new(file)).map_err(|e| anyhow!("not a valid TIFF file: {e}"))?;
    let colortype = decoder
        .colortype()
        .map_err(|e| anyhow!("invalid TIFF: {e}"))?;
    let (channels, bits) = match colortype {
        ColorType::Gray(b) => (1, b),
        ColorType::GrayA(b) => (2, b),
        ColorType::RGB(b) => (3, b),
        ColorType::RGBA(b) => (4, b),
        other => {
            bail!("unsupported TIFF color type {other:?} (expected gray, gray+alpha, RGB or RGBA)")
        }
    };
    if bits != 8 && bits != 16 {
        bail!("unsupported TIFF bit depth {bits} (expected 8 or 16)");
    }
    let (width, height) = decoder
        .dimensions()
        .map_err(|e| anyhow!("invalid TIFF: {e}"))?;
    let (width, height) = (width as usize, height as usize);
    let samples: Vec<u16> = match decoder
        .read_image()
        .map_err(|e| anyhow!("corrupt or truncated TIFF data: {e}"))?
    {
        DecodingResult::U8(v) => v.into_iter().map(u16::from).collect(),
        DecodingResult::U16(v) => v,
        _ => bail!("unsupported TIFF sample format"),
    };
    // further pages are fine when they are reduced-resolution copies (thumbnails) or masks, as editors write
    let mut page = 1;
    while decoder.more_images() {
        if decoder.next_image().is_err() {
            // an unreadable extra page does not change the first one
            break;
        }
        let subfile = decoder
            .find_tag_unsigned::<u32>(tiff::tags::Tag::NewSubfileType)
            .ok()
            .flatten()
            .unwrap_or(0);
        // NewSubfileType bit 0: reduced-resolution copy, bit 2: transparency mask
        if subfile & 0b101 == 0 {
            bail!(
                "multi-page TIFF (an image stack): page {} is a full image too, but one 2D image is expected",
                page + 1
            );
        }
        page += 1;
    }
    if samples.len() != width * height * channels {
        bail!(
            "TIFF data holds {} samples, expected {width} x {height} x {channels}",
            samples.len()
        );
    }
    Ok(GrayImage {
        width,
        height,
        values: samples_to_gray(&samples, channels, bits),
        source_format: format!("{bits}-bit {}", channel_name(channels)),
    })
}

/// Decodes a PNG or TIFF by extension.
pub fn decode_image(path: &Path) -> Result<GrayImage> {
    if file_name_lower(path).ends_with(".png") {
        decode_png(path)
    } else {
        decode_tiff(path)
    }
}

/// Reads a JSON sidecar; invalid JSON is an error naming the file and the line:column of the fault.
pub fn read_sidecar(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read JSON sidecar {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "invalid JSON in sidecar {} at line {}:{}: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })
}

/// BIDS name parts: key-value entities up to the suffix (the first part without `-`).
fn bids_entities(stem: &str) -> (Vec<(String, String)>, Option<String>) {
    let mut entities = Vec::new();
    for part in stem.split('_') {
        match part.split_once('-') {
            Some((k, v)) => entities.push((k.to_string(), v.to_string())),
            None => return (entities, Some(part.to_string())),
        }
    }
    (entities, None)
}

fn stem_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.split_once('.') {
        Some((stem, _)) => stem.to_string(),
        None => name,
    }
}

/// Directories that may hold sidecars of `image`, nearest first: its folder and those above it up to the
/// dataset root (the folder holding the `sub-*` folder). For a file under `<root>/derivatives/<pipeline>/`,
/// the mirrored folders of the raw dataset follow, so a label finds its image's sidecar.
fn sidecar_dirs(image: &Path) -> Vec<PathBuf> {
    fn up_to_root(start: &Path) -> (Vec<PathBuf>, Option<PathBuf>) {
        let mut dirs = Vec::new();
        let mut dir = Some(start);
        while let Some(d) = dir {
            dirs.push(d.to_path_buf());
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with("sub-") {
                let root = d.parent().map(Path::to_path_buf);
                if let Some(r) = &root {
                    dirs.push(r.clone());
                }
                return (dirs, root);
            }
            dir = d.parent();
            if dirs.len() > 4 {
                break;
            }
        }
        (vec![start.to_path_buf()], None)
    }
    let Some(parent) = image.parent() else {
        return Vec::new();
    };
    let (mut dirs, root) = up_to_root(parent);
    if let Some(root) = root {
        // <raw root>/derivatives/<pipeline>/sub-*/...
        let derivatives = root
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "derivatives"));
        if let Some(raw_root) = derivatives.and_then(Path::parent) {
            if let Ok(rel) = parent.strip_prefix(&root) {
                let (raw_dirs, _) = up_to_root(&raw_root.join(rel));
                dirs.extend(raw_dirs);
            }
        }
    }
    dirs.dedup();
    dirs
}

/// The JSON sidecars that apply to `image` by the BIDS inheritance principle (same suffix, entities a subset
/// of the image's), least specific first, so that merging them in order lets the nearer, more specific
/// file win. A label such as `<image stem>_seg-axon-manual.png` in `derivatives/labels` gets the image's.
pub fn find_sidecars(image: &Path) -> Vec<PathBuf> {
    let (entities, suffix) = bids_entities(&stem_of(image));
    let (Some(suffix), false) = (suffix, entities.is_empty()) else {
        // not a BIDS name: only `<stem>.json` beside it
        let own = image.with_file_name(format!("{}.json", stem_of(image)));
        return if own.is_file() { vec![own] } else { Vec::new() };
    };
    let mut found: Vec<(usize, usize, PathBuf)> = Vec::new();
    for (distance, dir) in sidecar_dirs(image).iter().enumerate() {
        let Ok(read) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut here: Vec<PathBuf> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json") && p.is_file())
            .collect();
        here.sort();
        for candidate in here {
            let (their, their_suffix) = bids_entities(&stem_of(&candidate));
            if their_suffix.as_deref() == Some(suffix.as_str())
                && their.iter().all(|e| entities.contains(e))
                && stem_of(&candidate).split('_').count() == their.len() + 1
            {
                found.push((distance, their.len(), candidate));
            }
        }
    }
    // least specific first: farthest folder, then fewest entities
    found.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    found.into_iter().map(|(_, _, p)| p).collect()
}

/// Pixel size in mm in the volume's axis order `[rows (Y), columns (X), Z]`, from sidecar metadata.
pub fn pixel_size_mm(metadata: &Value, source: &str) -> Result<[f64; 3]> {
    let size = metadata
        .get("PixelSize")
        .ok_or_else(|| anyhow!("{source} has no PixelSize"))?;
    let number = |v: &Value| -> Result<f64> {
        v.as_f64()
            .ok_or_else(|| anyhow!("{source}: PixelSize entry {v} is not a number"))
    };
    // ivadomed's order: [Y, X, Z] to match the [rows, columns, slices] array
    let mut yxz = match size {
        Value::Number(_) => [number(size)?; 3],
        Value::Array(items) if items.len() == 2 || items.len() == 3 => {
            let x = number(&items[0])?;
            let y = number(&items[1])?;
            let z = match items.get(2) {
                Some(v) if number(v)? != 0.0 => number(v)?,
                _ => x,
            };
            [y, x, z]
        }
        other => bail!(
            "{source}: PixelSize {other} is not a number, [X, Y] or [X, Y, Z] (X the width, Y the height)"
        ),
    };
    let units = metadata
        .get("PixelSizeUnits")
        .ok_or_else(|| anyhow!("{source} has PixelSize but no PixelSizeUnits (mm, um or nm)"))?;
    let to_mm = match units.as_str() {
        Some("mm") => 1.0,
        Some("um") | Some("µm") | Some("μm") => 1e-3,
        Some("nm") => 1e-6,
        _ => bail!("{source}: PixelSizeUnits {units} is not one of \"mm\", \"um\", \"nm\""),
    };
    for v in &mut yxz {
        if !v.is_finite() || *v <= 0.0 {
            bail!("{source}: PixelSize {size} must be finite and positive");
        }
        *v *= to_mm;
    }
    Ok(yxz)
}

/// The sidecar metadata of `image`: `sidecar` when given, else the BIDS-inherited sidecars merged.
/// Returns the metadata and a description of where it came from, for messages.
fn image_metadata(image: &Path, sidecar: Option<&Path>) -> Result<(Value, String)> {
    if let Some(sidecar) = sidecar {
        return Ok((
            read_sidecar(sidecar)?,
            format!("sidecar {}", sidecar.display()),
        ));
    }
    let found = find_sidecars(image);
    if found.is_empty() {
        bail!(
            "no JSON sidecar found for this microscopy image: its pixel size (PixelSize, PixelSizeUnits) \
             is needed to place it in physical space"
        );
    }
    let mut merged = serde_json::Map::new();
    for path in &found {
        match read_sidecar(path)? {
            Value::Object(map) => merged.extend(map),
            other => bail!(
                "sidecar {} holds {} instead of a JSON object",
                path.display(),
                other
            ),
        }
    }
    let names: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
    Ok((
        Value::Object(merged),
        format!("sidecar {}", names.join(" + ")),
    ))
}

/// A NIfTI header describing a microscopy volume, so that [`crate::volume::write_like`] can also write its
/// predictions as NIfTI: float32, dims `[H, W, 1]`, pixdim = spacing, sform = `diag(spacing)`, units mm.
pub fn microscopy_header(shape: [usize; 3], spacing: [f64; 3]) -> NiftiHeader {
    let mut pixdim = [1.0f32; 8];
    for (p, s) in pixdim[1..4].iter_mut().zip(spacing) {
        *p = s as f32;
    }
    let row = |axis: usize| {
        let mut r = [0.0f32; 4];
        r[axis] = spacing[axis] as f32;
        r
    };
    NiftiHeader {
        dim: [
            3,
            shape[0] as u16,
            shape[1] as u16,
            shape[2] as u16,
            1,
            1,
            1,
            1,
        ],
        pixdim,
        datatype: nifti::NiftiType::Float32 as i16,
        bitpix: 32,
        sform_code: 2,
        qform_code: 0,
        srow_x: row(0),
        srow_y: row(1),
        srow_z: row(2),
        xyzt_units: 2,
        magic: *b"n+1\0",
        ..NiftiHeader::default()
    }
}

/// Reads a PNG/TIFF image as a `[H, W, 1]` volume in the grayscale convention, with its spacing in mm from
/// `sidecar` (or, when `None`, from the BIDS-inherited sidecars of the image). Errors name the file.
pub fn read_microscopy(path: &Path, sidecar: Option<&Path>) -> Result<Volume> {
    read_microscopy_inner(path, sidecar)
        .with_context(|| format!("failed to read microscopy image {}", path.display()))
}

fn read_microscopy_inner(path: &Path, sidecar: Option<&Path>) -> Result<Volume> {
    if !path.is_file() {
        bail!("no such file");
    }
    let (metadata, source) = image_metadata(path, sidecar)?;
    let spacing = pixel_size_mm(&metadata, &source)?;
    let image = decode_image(path)?;
    if image.width == 0 || image.height == 0 {
        bail!("image is empty ({} x {})", image.width, image.height);
    }
    if image.width > u16::MAX as usize || image.height > u16::MAX as usize {
        bail!(
            "image of {} x {} pixels is larger than a NIfTI-1 dimension allows (32767)",
            image.width,
            image.height
        );
    }
    let shape = [image.height, image.width, 1];
    let data = Tensor::f_from_slice(&image.values)?.f_view([
        image.height as i64,
        image.width as i64,
        1,
    ])?;
    let mut affine: Affine = [[0.0; 4]; 4];
    for (axis, s) in spacing.iter().enumerate() {
        affine[axis][axis] = *s;
    }
    affine[3][3] = 1.0;
    Ok(Volume {
        data,
        spacing,
        affine,
        reorientation: Reorientation {
            perm: [0, 1, 2],
            flip: [false; 3],
            file_shape: shape,
        },
        header: microscopy_header(shape, spacing),
        path: path.to_path_buf(),
    })
}

/// Binarizes a microscopy label read in the grayscale convention: 1 where `value / 255 >= 0.5`, as ivadomed's
/// `threshold_predictions(img / 255, thr=0.5)` on ground truths.
pub fn binarize_label(volume: &mut Volume) -> Result<()> {
    volume.data = volume.data.f_ge(127.5)?.f_to_kind(Kind::Float)?;
    Ok(())
}

/// Writes `image` (`[H, W, 1]` or `[H, W]`, values in 0..=1) as an 8-bit grey PNG of `round(255 * v)`, so a
/// binary mask becomes 0/255 (ivadomed's `pred_to_png`); values are clamped and NaN becomes 0.
pub fn write_png(image: &Tensor, path: &Path) -> Result<()> {
    let size = image.size();
    let (h, w) = match size.as_slice() {
        [h, w] | [h, w, 1] => (*h as usize, *w as usize),
        _ => bail!("a PNG holds one 2D image [H, W, 1], got shape {size:?}"),
    };
    let flat = image
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_view([-1])?;
    let values = Vec::<f32>::try_from(&flat)?;
    let bytes: Vec<u8> = values
        .iter()
        .map(|&v| {
            if v.is_nan() {
                0
            } else {
                (v.clamp(0.0, 1.0) * 255.0).round() as u8
            }
        })
        .collect();
    let file = File::create(path).map_err(|e| anyhow!("cannot create {}: {e}", path.display()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), w as u32, h as u32);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .map_err(|e| anyhow!("cannot write PNG {}: {e}", path.display()))?;
    writer
        .write_image_data(&bytes)
        .map_err(|e| anyhow!("cannot write PNG {}: {e}", path.display()))?;
    writer
        .finish()
        .map_err(|e| anyhow!("cannot write PNG {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const TESTING: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/data-testing"
    );

    fn temp_dir(tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ivado-micr-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The 8-bit gray PNG's bytes as stored (no transformation): `(width, height, pixels)`, row-major.
    fn raw_gray8(path: &Path) -> (usize, usize, Vec<u8>) {
        let mut decoder = png::Decoder::new(BufReader::new(File::open(path).unwrap()));
        decoder.set_transformations(png::Transformations::IDENTITY);
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(
            (info.color_type, info.bit_depth),
            (png::ColorType::Grayscale, png::BitDepth::Eight)
        );
        let (w, h) = (info.width as usize, info.height as usize);
        buf.truncate(w * h);
        (w, h, buf)
    }

    fn at(v: &Volume, row: usize, col: usize) -> f32 {
        v.data.double_value(&[row as i64, col as i64, 0]) as f32
    }

    #[test]
    fn every_png_and_tif_variant_reads_as_the_8bit_gray_image() {
        let root = PathBuf::from(format!("{TESTING}/data_test_png_tif"));
        let (ref_w, ref_h, reference) =
            raw_gray8(&root.join("sub-png/micr/sub-png_sample-8gray_SEM.png"));
        assert_eq!((ref_w, ref_h), (278, 266));
        let mut variants: Vec<PathBuf> = ["sub-png", "sub-tif"]
            .iter()
            .flat_map(|sub| {
                std::fs::read_dir(root.join(sub).join("micr"))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| is_microscopy(p))
            })
            .collect();
        variants.sort();
        // 8 PNG (8/16-bit gray, gray+alpha twice, RGB, RGBA) + 6 TIF (8/16-bit gray, RGB, RGBA)
        assert_eq!(variants.len(), 14, "{variants:?}");
        let mut formats = std::collections::BTreeSet::new();
        for path in &variants {
            let image = decode_image(path).unwrap();
            formats.insert(format!(
                "{} {}",
                path.extension().unwrap().to_string_lossy(),
                image.source_format
            ));
            // the sidecar (sub-png_SEM.json / sub-tif_SEM.json) applies by inheritance: 0.07 um
            let vol = crate::volume::read_image(path, None).unwrap();
            let [h, w, one] = vol.shape();
            assert_eq!(one, 1);
            assert!(
                (w, h) == (256, 256) || (w, h) == (278, 266),
                "{}: {w} x {h}",
                path.display()
            );
            for s in vol.spacing {
                assert!((s - 7e-5).abs() < 1e-12, "{:?}", vol.spacing);
            }
            // the 256x256 files are the top-left crop of the 278x266 ones
            let mut worst = 0.0f32;
            for row in 0..h {
                for col in 0..w {
                    let expected = reference[row * ref_w + col] as f32;
                    worst = worst.max((at(&vol, row, col) - expected).abs());
                }
            }
            assert!(worst <= 1.0, "{}: off by {worst}", path.display());
        }
        for expected in [
            "png 8-bit gray",
            "png 8-bit gray+alpha",
            "png 8-bit RGB",
            "png 8-bit RGBA",
            "png 16-bit gray",
            "png 16-bit RGB",
            "png 16-bit RGBA",
            "tif 8-bit gray",
            "tif 8-bit RGB",
            "tif 8-bit RGBA",
            "tif 16-bit gray",
            "tif 16-bit RGB",
            "tif 16-bit RGBA",
        ] {
            assert!(formats.contains(expected), "{expected} not in {formats:?}");
        }
    }

    #[test]
    fn colour_weights_scale_and_alpha() {
        // The data set's colour files are grey (R = G = B), so check the luma weights on distinct channels:
        // 0.299 * 200 + 0.587 * 100 + 0.114 * 50 = 59.8 + 58.7 + 5.7 = 124.2, alpha ignored, and the same
        // from 16-bit samples v * 257.
        let dir = temp_dir("weights");
        let write = |name: &str, color: png::ColorType, depth: png::BitDepth, data: &[u8]| {
            let path = dir.join(name);
            let mut enc = png::Encoder::new(BufWriter::new(File::create(&path).unwrap()), 2, 1);
            enc.set_color(color);
            enc.set_depth(depth);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(data).unwrap();
            w.finish().unwrap();
            path
        };
        let rgb8 = write(
            "rgb8.png",
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            &[200, 100, 50, 0, 0, 255],
        );
        let img = decode_png(&rgb8).unwrap();
        assert_eq!((img.width, img.height), (2, 1));
        assert!((img.values[0] - 124.2).abs() < 1e-4, "{:?}", img.values);
        assert!((img.values[1] - 0.114 * 255.0).abs() < 1e-4);
        let wide: Vec<u8> = [
            200u16 * 257,
            100 * 257,
            50 * 257,
            0,
            65535,
            65535,
            65535,
            65535,
        ]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
        let rgba16 = write(
            "rgba16.png",
            png::ColorType::Rgba,
            png::BitDepth::Sixteen,
            &wide,
        );
        let img = decode_png(&rgba16).unwrap();
        assert_eq!(img.source_format, "16-bit RGBA");
        assert!((img.values[0] - 124.2).abs() < 1e-4, "{:?}", img.values);
        assert!((img.values[1] - 255.0).abs() < 1e-4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pixel_sizes_in_mm() {
        let micr = |rel: &str| PathBuf::from(format!("{TESTING}/microscopy_png/{rel}"));
        // [0.1, 0.2] um = [X (width), Y (height)] -> rows 0.2 um, columns 0.1 um, Z = X
        let data9 = crate::volume::read_image(
            &micr("sub-rat3/ses-01/micr/sub-rat3_ses-01_sample-data9_SEM.png"),
            Some(&micr(
                "sub-rat3/ses-01/micr/sub-rat3_ses-01_sample-data9_SEM.json",
            )),
        )
        .unwrap();
        assert_eq!(data9.shape(), [756, 764, 1]); // PNG header: 764 wide, 756 high
        assert_eq!(data9.spacing, [0.2e-3, 0.1e-3, 0.1e-3]);
        assert_eq!(data9.affine[0][0], 0.2e-3);
        assert_eq!(data9.affine[1][1], 0.1e-3);
        // 100 nm
        let data10 = crate::volume::read_volume(&micr(
            "sub-rat3/ses-02/micr/sub-rat3_ses-02_sample-data10_SEM.png",
        ))
        .unwrap();
        for s in data10.spacing {
            assert!((s - 1e-4).abs() < 1e-15, "{:?}", data10.spacing);
        }
        // already mm
        let rat2 = crate::volume::read_volume(&micr("sub-rat2/micr/sub-rat2_sample-data5_SEM.png"))
            .unwrap();
        assert_eq!(rat2.spacing, [0.000093; 3]);
        // run-1 has no sidecar of its own: sub-rat3_ses-02_sample-data11_SEM.json applies (0.1 um)
        let run1 = micr("sub-rat3/ses-02/micr/sub-rat3_ses-02_sample-data11_run-1_SEM.png");
        assert_eq!(
            find_sidecars(&run1),
            vec![micr(
                "sub-rat3/ses-02/micr/sub-rat3_ses-02_sample-data11_SEM.json"
            )]
        );
        for s in crate::volume::read_volume(&run1).unwrap().spacing {
            assert!((s - 1e-4).abs() < 1e-15);
        }

        let md = |v: serde_json::Value| pixel_size_mm(&v, "test");
        assert_eq!(
            md(serde_json::json!({"PixelSize": 2.5, "PixelSizeUnits": "um"})).unwrap(),
            [2.5e-3; 3]
        );
        assert_eq!(
            md(serde_json::json!({"PixelSize": [1, 2, 3], "PixelSizeUnits": "mm"})).unwrap(),
            [2.0, 1.0, 3.0]
        );
        assert_eq!(
            md(serde_json::json!({"PixelSize": [1, 2, 0], "PixelSizeUnits": "nm"})).unwrap(),
            [2e-6, 1e-6, 1e-6]
        );
        for (bad, needle) in [
            (serde_json::json!({"PixelSizeUnits": "um"}), "no PixelSize"),
            (
                serde_json::json!({"PixelSize": [1.0]}),
                "not a number, [X, Y]",
            ),
            (
                serde_json::json!({"PixelSize": [1, 1]}),
                "no PixelSizeUnits",
            ),
            (
                serde_json::json!({"PixelSize": [1, 1], "PixelSizeUnits": "inch"}),
                "PixelSizeUnits \"inch\"",
            ),
            (
                serde_json::json!({"PixelSize": [1, -1], "PixelSizeUnits": "um"}),
                "finite and positive",
            ),
        ] {
            let msg = format!("{:#}", md(bad).unwrap_err());
            assert!(msg.contains(needle) && msg.contains("test"), "{msg}");
        }
    }

    #[test]
    fn labels_in_derivatives_take_the_image_sidecar_and_are_binary() {
        let label = PathBuf::from(format!(
            "{TESTING}/microscopy_png/derivatives/labels/sub-rat3/ses-01/micr/\
             sub-rat3_ses-01_sample-data9_SEM_seg-axon-manual.png"
        ));
        let vol = crate::volume::read_label(&label, None).unwrap();
        assert_eq!(vol.spacing, [0.2e-3, 0.1e-3, 0.1e-3]);
        let (w, h, raw) = raw_gray8(&label);
        assert_eq!(vol.shape(), [h, w, 1]);
        // the stored mask is 0/255: ones where the byte is at least half scale
        let expected = raw.iter().filter(|&&b| b >= 128).count() as i64;
        assert!(expected > 0);
        assert_eq!(vol.data.sum(Kind::Int64).int64_value(&[]), expected);
        let ones_or_zeros = vol.data.eq(0.0).logical_or(&vol.data.eq(1.0));
        assert!(bool::try_from(ones_or_zeros.all()).unwrap());
    }

    #[test]
    fn png_prediction_is_8bit_0_255() {
        let dir = temp_dir("write");
        let src = dir.join("img_SEM.png");
        std::fs::copy(
            format!("{TESTING}/data_test_png_tif/sub-png/micr/sub-png_sample-8rgb_SEM.png"),
            &src,
        )
        .unwrap();
        std::fs::write(
            dir.join("img_SEM.json"),
            r#"{"PixelSize": 0.5, "PixelSizeUnits": "um"}"#,
        )
        .unwrap();
        let vol = crate::volume::read_image(&src, None).unwrap();
        let mask = vol.data.ge(128.0).to_kind(Kind::Float);
        let out = dir.join("img_SEM_pred.png");
        crate::volume::write_like(&vol, &mask, &out, crate::volume::OutputType::U8).unwrap();
        let (w, h, raw) = raw_gray8(&out);
        assert_eq!((w, h), (256, 256));
        let source = decode_png(&src).unwrap().values;
        for (i, &b) in raw.iter().enumerate() {
            assert_eq!(b, if source[i] >= 128.0 { 255 } else { 0 }, "pixel {i}");
        }
        // and it reads back as the same binary label
        let back = crate::volume::read_label(&out, Some(&dir.join("img_SEM.json"))).unwrap();
        assert!(back.data.equal(&mask));
        // a NIfTI prediction of a microscopy source keeps the grid and the pixel size (0.5 um)
        let nii = dir.join("img_SEM_pred.nii.gz");
        crate::volume::write_like(&vol, &mask, &nii, crate::volume::OutputType::U8).unwrap();
        let back = crate::volume::read_image(&nii, None).unwrap();
        assert!(back.data.equal(&mask));
        assert!(back.reorientation.is_identity());
        for s in back.spacing {
            assert!((s - 5e-4).abs() < 1e-10, "{:?}", back.spacing);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tiff_stack_is_refused_but_a_thumbnail_is_not() {
        // the data set's TIFs carry a reduced-resolution second page (NewSubfileType 1) and load (see above);
        // two full pages written here are a stack
        use tiff::encoder::{colortype, TiffEncoder};
        let dir = temp_dir("stack");
        let path = dir.join("stack.tif");
        let mut encoder = TiffEncoder::new(BufWriter::new(File::create(&path).unwrap())).unwrap();
        for fill in [10u8, 20] {
            encoder
                .write_image::<colortype::Gray8>(3, 2, &[fill; 6])
                .unwrap();
        }
        drop(encoder);
        let msg = format!("{:#}", decode_tiff(&path).unwrap_err());
        assert!(
            msg.contains("multi-page TIFF") && msg.contains("page 2"),
            "{msg}"
        );
        let single = dir.join("single.tif");
        let mut encoder = TiffEncoder::new(BufWriter::new(File::create(&single).unwrap())).unwrap();
        encoder
            .write_image::<colortype::Gray16>(3, 2, &[0, 257, 514, 65535, 2570, 0])
            .unwrap();
        drop(encoder);
        let image = decode_tiff(&single).unwrap();
        assert_eq!((image.width, image.height), (3, 2));
        assert_eq!(image.values, vec![0.0, 1.0, 2.0, 255.0, 10.0, 0.0]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sidecar_errors_name_the_file() {
        let dir = temp_dir("sidecar");
        let src = dir.join("sub-x_SEM.png");
        std::fs::copy(
            format!("{TESTING}/data_test_png_tif/sub-png/micr/sub-png_sample-8gray_SEM.png"),
            &src,
        )
        .unwrap();
        // no sidecar at all
        let msg = format!("{:#}", crate::volume::read_image(&src, None).unwrap_err());
        assert!(
            msg.contains(&src.display().to_string()) && msg.contains("no JSON sidecar"),
            "{msg}"
        );
        // a sidecar without PixelSize
        let sidecar = dir.join("sub-x_SEM.json");
        std::fs::write(&sidecar, "{\"PixelSizeUnits\": \"um\"}").unwrap();
        let msg = format!("{:#}", crate::volume::read_image(&src, None).unwrap_err());
        assert!(
            msg.contains(&src.display().to_string())
                && msg.contains(&sidecar.display().to_string())
                && msg.contains("no PixelSize"),
            "{msg}"
        );
        // invalid JSON: line 3, column 1 (the missing comma before "PixelSizeUnits")
        std::fs::write(
            &sidecar,
            "{\n  \"PixelSize\": [1, 1]\n\"PixelSizeUnits\": \"um\"\n}\n",
        )
        .unwrap();
        let msg = format!("{:#}", crate::volume::read_image(&src, None).unwrap_err());
        assert!(
            msg.contains(&sidecar.display().to_string()) && msg.contains("line 3:1"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
