//! What a researcher reads after a run: TensorBoard event files (`tensorboard`), training-curve PNGs
//! (`curves`) and QC overlay PNGs (`qc`). All of it is written without Python, protobuf codegen or system
//! fonts; PNG files are written atomically (temporary sibling + rename).
//!
//! Tag names that mirror ivadomed's `SummaryWriter` calls (`losses` with `train_loss` and `val_loss`,
//! `Validation/Metrics` with one entry per metric) are in [`tags`].
pub mod curves;
pub mod qc;
pub mod run;
pub mod tensorboard;

use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

/// TensorBoard tags for the per-epoch scalars. ivadomed calls `add_scalars('losses', {...})` and
/// `add_scalars('Validation/Metrics', {...})`, which PyTorch stores as one sub-run per key; a single event
/// file cannot hold sub-runs, so the key becomes the last tag component instead.
pub mod tags {
    pub const TRAIN_LOSS: &str = "losses/train_loss";
    pub const VALID_LOSS: &str = "losses/val_loss";
    pub const VALID_DICE: &str = "Validation/Metrics/dice_score";
    pub const LEARNING_RATE: &str = "learning_rate";
}

/// An 8-bit RGB image, rows top to bottom, pixels interleaved `[r, g, b]` (height x width x 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// A `width` x `height` image filled with `colour`.
    pub fn filled(width: usize, height: usize, colour: [u8; 3]) -> Self {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            pixels.extend_from_slice(&colour);
        }
        Self {
            width,
            height,
            pixels,
        }
    }

    /// Wraps interleaved RGB bytes, checking that there are exactly `width * height * 3` of them.
    pub fn from_pixels(width: usize, height: usize, pixels: Vec<u8>) -> Result<Self> {
        ensure!(
            pixels.len() == width * height * 3,
            "an RGB image of {width}x{height} needs {} bytes, got {}",
            width * height * 3,
            pixels.len()
        );
        Ok(Self {
            width,
            height,
            pixels,
        })
    }

    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let at = (y * self.width + x) * 3;
        [self.pixels[at], self.pixels[at + 1], self.pixels[at + 2]]
    }

    pub fn set(&mut self, x: usize, y: usize, colour: [u8; 3]) {
        let at = (y * self.width + x) * 3;
        self.pixels[at..at + 3].copy_from_slice(&colour);
    }
}

/// Encodes `image` as an 8-bit RGB PNG.
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    ensure!(
        image.width > 0 && image.height > 0,
        "cannot encode an empty {}x{} image as PNG",
        image.width,
        image.height
    );
    ensure!(
        image.pixels.len() == image.width * image.height * 3,
        "RGB image of {}x{} has {} bytes",
        image.width,
        image.height,
        image.pixels.len()
    );
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, image.width as u32, image.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().context("writing PNG header")?;
        writer
            .write_image_data(&image.pixels)
            .context("writing PNG data")?;
        writer.finish().context("finishing PNG")?;
    }
    Ok(bytes)
}

/// Decodes an 8-bit RGB or RGBA PNG (alpha is dropped) into an [`RgbImage`].
pub fn decode_png(bytes: &[u8]) -> Result<RgbImage> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().context("reading PNG header")?;
    let mut buffer = vec![0; reader.output_buffer_size().context("PNG too large")?];
    let info = reader.next_frame(&mut buffer).context("decoding PNG")?;
    if info.bit_depth != png::BitDepth::Eight {
        bail!("only 8-bit PNGs are decoded, got {:?}", info.bit_depth);
    }
    let (width, height) = (info.width as usize, info.height as usize);
    let data = &buffer[..info.buffer_size()];
    let pixels = match info.color_type {
        png::ColorType::Rgb => data.to_vec(),
        png::ColorType::Rgba => data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => data.iter().flat_map(|&g| [g, g, g]).collect(),
        other => bail!("unsupported PNG colour type {other:?}"),
    };
    RgbImage::from_pixels(width, height, pixels)
}

/// Writes `image` as a PNG at `path`, atomically.
pub fn write_png(path: &Path, image: &RgbImage) -> Result<()> {
    let bytes = encode_png(image)?;
    crate::model_folder::write_atomic(path, &bytes)
}

/// Scratch directories for the report tests (tempfile is not a dependency of the runtime).
#[cfg(test)]
pub(crate) mod scratch {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fresh directory, removed with its contents on drop.
    pub struct ScratchDir(PathBuf);

    impl ScratchDir {
        pub fn new(tag: &str) -> Self {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "ivado-report-{tag}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::scratch::ScratchDir;
    use super::*;

    #[test]
    fn report_png_round_trip_keeps_every_pixel() {
        // Every byte value appears, so a channel swap or row offset would change some pixel.
        let pixels: Vec<u8> = (0..7 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
        let image = RgbImage::from_pixels(7, 5, pixels).unwrap();
        let decoded = decode_png(&encode_png(&image).unwrap()).unwrap();
        assert_eq!(decoded, image);
    }

    #[test]
    fn report_write_png_leaves_no_temporary_file() {
        let dir = ScratchDir::new("png");
        let path = dir.path().join("sub").join("image.png");
        let image = RgbImage::filled(3, 2, [10, 20, 30]);
        write_png(&path, &image).unwrap();
        assert_eq!(decode_png(&std::fs::read(&path).unwrap()).unwrap(), image);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("image.png")]);
    }
}
