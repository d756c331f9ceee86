//! QC overlays: a 2D slice in grayscale (windowed to its 1st-99th percentile) with the label contour in green
//! and the prediction contour in red (yellow where they coincide), optionally filled with alpha, upscaled by
//! an integer factor so small slices stay legible; and [`grid`] to assemble several into one picture.
//!
//! ivadomed's own overlays (`overlap_im_seg`) paint the prediction with the jet colour map over the image;
//! contours instead show label and prediction together without hiding the anatomy under them.
use super::RgbImage;
use anyhow::{ensure, Result};

pub const LABEL_COLOUR: [u8; 3] = [0, 255, 0];
pub const PREDICTION_COLOUR: [u8; 3] = [255, 0, 0];
/// Where the label and prediction contours coincide.
pub const BOTH_COLOUR: [u8; 3] = [255, 255, 0];
/// Gutters between tiles and empty cells of a [`grid`].
pub const GRID_BACKGROUND: [u8; 3] = [255, 255, 255];
/// Width of the gutters between tiles, in pixels.
pub const GRID_GAP: usize = 4;

/// A 2D slice, row-major: `values[row * width + column]`, row 0 drawn at the top.
#[derive(Clone, Copy, Debug)]
pub struct Plane<'a> {
    pub values: &'a [f32],
    pub height: usize,
    pub width: usize,
}

impl<'a> Plane<'a> {
    pub fn new(values: &'a [f32], height: usize, width: usize) -> Result<Self> {
        ensure!(
            height > 0 && width > 0 && values.len() == height * width,
            "a {height}x{width} plane needs {} values, got {}",
            height * width,
            values.len()
        );
        Ok(Self {
            values,
            height,
            width,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct QcOptions {
    /// The longer side of the output is at least this many pixels (the slice is upscaled by the smallest
    /// integer factor that gets there; nearest neighbour, so voxels stay square and crisp).
    pub min_size: usize,
    /// Contour thickness in output pixels, drawn inside the mask.
    pub contour_width: usize,
    /// Opacity of the mask fill, 0 (contours only) to 1.
    pub fill_alpha: f32,
    /// Label and prediction values above this are foreground (masks may be soft).
    pub threshold: f32,
}

impl Default for QcOptions {
    fn default() -> Self {
        Self {
            min_size: 256,
            contour_width: 2,
            fill_alpha: 0.0,
            threshold: 0.5,
        }
    }
}

/// The `q`-th percentile (0 to 100) of the finite values, interpolating linearly between order statistics
/// (numpy's default `linear` method). `None` when no value is finite.
pub fn percentile(values: &[f32], q: f64) -> Option<f32> {
    let mut finite: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return None;
    }
    finite.sort_by(f32::total_cmp);
    let position = q.clamp(0.0, 100.0) / 100.0 * (finite.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    let fraction = position - below as f64;
    Some((finite[below] as f64 + (finite[above] as f64 - finite[below] as f64) * fraction) as f32)
}

/// Maps each value to 0-255 linearly from the 1st percentile (black) to the 99th (white), clamping outside;
/// non-finite values are black. A flat slice is mid-gray.
pub fn window_to_gray(values: &[f32]) -> Vec<u8> {
    let (Some(low), Some(high)) = (percentile(values, 1.0), percentile(values, 99.0)) else {
        return vec![0; values.len()];
    };
    let span = high - low;
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                0
            } else if span <= 0.0 {
                128
            } else {
                (((v - low) / span).clamp(0.0, 1.0) * 255.0).round() as u8
            }
        })
        .collect()
}

/// The integer upscale factor for a `height` x `width` slice under `options`.
pub fn upscale_factor(height: usize, width: usize, min_size: usize) -> usize {
    min_size.div_ceil(height.max(width).max(1)).max(1)
}

/// `plane > threshold`, upscaled by `scale` (nearest neighbour), row-major.
fn upscaled_mask(plane: &Plane, scale: usize, threshold: f32) -> Vec<bool> {
    let (out_h, out_w) = (plane.height * scale, plane.width * scale);
    let mut mask = vec![false; out_h * out_w];
    for y in 0..out_h {
        for x in 0..out_w {
            mask[y * out_w + x] = plane.values[(y / scale) * plane.width + x / scale] > threshold;
        }
    }
    mask
}

/// Foreground pixels within `width` pixels (Chebyshev distance) of background, the image border counting as
/// background: the mask minus its erosion by a `(2 * width + 1)` square, computed separably.
fn inner_contour(mask: &[bool], height: usize, width: usize, thickness: usize) -> Vec<bool> {
    let r = thickness as isize;
    let inside = |v: isize, n: usize| v >= 0 && (v as usize) < n;
    // Row pass: a pixel survives if its whole horizontal window is foreground.
    let mut rows = vec![false; mask.len()];
    for y in 0..height {
        for x in 0..width {
            rows[y * width + x] = (-r..=r).all(|d| {
                let xx = x as isize + d;
                inside(xx, width) && mask[y * width + xx as usize]
            });
        }
    }
    let mut contour = vec![false; mask.len()];
    for y in 0..height {
        for x in 0..width {
            let eroded = (-r..=r).all(|d| {
                let yy = y as isize + d;
                inside(yy, height) && rows[yy as usize * width + x]
            });
            contour[y * width + x] = mask[y * width + x] && !eroded;
        }
    }
    contour
}

fn blend(under: [u8; 3], over: [u8; 3], alpha: f32) -> [u8; 3] {
    let mix = |a: u8, b: u8| (a as f32 * (1.0 - alpha) + b as f32 * alpha).round() as u8;
    [
        mix(under[0], over[0]),
        mix(under[1], over[1]),
        mix(under[2], over[2]),
    ]
}

/// Renders one QC tile: `image` windowed to grayscale, the `label` contour in green, the `prediction`
/// contour in red, yellow where both contours fall on the same pixel.
pub fn render_overlay(
    image: Plane,
    label: Option<Plane>,
    prediction: Option<Plane>,
    options: &QcOptions,
) -> Result<RgbImage> {
    for (name, mask) in [("label", &label), ("prediction", &prediction)] {
        if let Some(mask) = mask {
            ensure!(
                (mask.height, mask.width) == (image.height, image.width),
                "{name} is {}x{}, image is {}x{}",
                mask.height,
                mask.width,
                image.height,
                image.width
            );
        }
    }
    ensure!(
        (0.0..=1.0).contains(&options.fill_alpha),
        "fill_alpha must be in [0, 1], got {}",
        options.fill_alpha
    );
    let scale = upscale_factor(image.height, image.width, options.min_size);
    let (height, width) = (image.height * scale, image.width * scale);
    let gray = window_to_gray(image.values);
    let mut out = RgbImage::filled(width, height, [0, 0, 0]);
    for y in 0..height {
        for x in 0..width {
            let g = gray[(y / scale) * image.width + x / scale];
            out.set(x, y, [g, g, g]);
        }
    }
    let masks: Vec<(Vec<bool>, [u8; 3])> = [(label, LABEL_COLOUR), (prediction, PREDICTION_COLOUR)]
        .into_iter()
        .filter_map(|(plane, rgb)| Some((upscaled_mask(&plane?, scale, options.threshold), rgb)))
        .collect();
    if options.fill_alpha > 0.0 {
        for (mask, rgb) in &masks {
            for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
                let (x, y) = (i % width, i / width);
                out.set(x, y, blend(out.get(x, y), *rgb, options.fill_alpha));
            }
        }
    }
    let contours: Vec<(Vec<bool>, [u8; 3])> = masks
        .iter()
        .map(|(mask, rgb)| {
            (
                inner_contour(mask, height, width, options.contour_width),
                *rgb,
            )
        })
        .collect();
    for i in 0..width * height {
        let on: Vec<[u8; 3]> = contours
            .iter()
            .filter(|(c, _)| c[i])
            .map(|(_, rgb)| *rgb)
            .collect();
        let colour = match on.as_slice() {
            [] => continue,
            [one] => *one,
            _ => BOTH_COLOUR,
        };
        out.set(i % width, i / width, colour);
    }
    Ok(out)
}

/// Assembles `tiles` row by row, `columns` per row, in cells as large as the largest tile (tiles at the
/// cell's top-left), separated by [`GRID_GAP`]-pixel gutters of [`GRID_BACKGROUND`].
pub fn grid(tiles: &[RgbImage], columns: usize) -> Result<RgbImage> {
    ensure!(!tiles.is_empty(), "a grid needs at least one tile");
    ensure!(columns > 0, "a grid needs at least one column");
    let columns = columns.min(tiles.len());
    let rows = tiles.len().div_ceil(columns);
    let cell_w = tiles.iter().map(|t| t.width).max().unwrap_or(0);
    let cell_h = tiles.iter().map(|t| t.height).max().unwrap_or(0);
    let width = columns * cell_w + (columns - 1) * GRID_GAP;
    let height = rows * cell_h + (rows - 1) * GRID_GAP;
    let mut out = RgbImage::filled(width, height, GRID_BACKGROUND);
    for (index, tile) in tiles.iter().enumerate() {
        let left = (index % columns) * (cell_w + GRID_GAP);
        let top = (index / columns) * (cell_h + GRID_GAP);
        for y in 0..tile.height {
            let source = y * tile.width * 3;
            let target = ((top + y) * width + left) * 3;
            out.pixels[target..target + tile.width * 3]
                .copy_from_slice(&tile.pixels[source..source + tile.width * 3]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::scratch::ScratchDir;
    use super::super::{decode_png, write_png};
    use super::*;

    /// An 8x8 ramp `row * 8 + column`, a label on rows 2..=5, columns 2..=5, and the same square shifted one
    /// column right as the prediction.
    fn square_case() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let image: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let square = |shift: usize| -> Vec<f32> {
            (0..64)
                .map(|i| {
                    let (row, column) = (i / 8, i % 8);
                    let inside =
                        (2..=5).contains(&row) && (2 + shift..=5 + shift).contains(&column);
                    if inside {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        (image, square(0), square(1))
    }

    #[test]
    fn report_percentile_matches_numpy_linear() {
        // numpy.percentile(range(64), [1, 99]) = [0.63, 62.37]: position q/100 * 63, linear in between.
        let ramp: Vec<f32> = (0..64).map(|i| i as f32).collect();
        assert!((percentile(&ramp, 1.0).unwrap() - 0.63).abs() < 1e-5);
        assert!((percentile(&ramp, 99.0).unwrap() - 62.37).abs() < 1e-4);
        // Order does not matter and NaN is ignored.
        assert_eq!(percentile(&[3.0, f32::NAN, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[f32::NAN], 50.0), None);
        // Values beyond the window clamp; a flat slice is mid-gray.
        assert_eq!(window_to_gray(&ramp)[0], 0);
        assert_eq!(window_to_gray(&ramp)[63], 255);
        assert_eq!(window_to_gray(&[5.0; 4]), vec![128; 4]);
    }

    #[test]
    fn report_overlay_contours_fall_on_the_expected_borders() {
        let (image, label, prediction) = square_case();
        let options = QcOptions {
            min_size: 64,
            contour_width: 1,
            ..QcOptions::default()
        };
        let tile = render_overlay(
            Plane::new(&image, 8, 8).unwrap(),
            Some(Plane::new(&label, 8, 8).unwrap()),
            Some(Plane::new(&prediction, 8, 8).unwrap()),
            &options,
        )
        .unwrap();
        // 64 / 8 = 8x upscale. Label spans output x 16..=47, prediction x 24..=55, both y 16..=47.
        assert_eq!((tile.width, tile.height), (64, 64));
        let gray = |v: u8| [v, v, v];
        // Window [0.63, 62.37]: value 36 (row 4, column 4) -> (36 - 0.63) / 61.74 * 255 = 146.09 -> 146;
        // value 41 (row 5, column 1) -> 40.37 / 61.74 * 255 = 166.74 -> 167; value 34 (row 4, column 2) ->
        // 33.37 / 61.74 * 255 = 137.83 -> 138.
        assert_eq!(
            tile.get(32, 32),
            gray(146),
            "inside both squares: untouched"
        );
        assert_eq!(
            tile.get(15, 40),
            gray(167),
            "just left of the label: untouched"
        );
        assert_eq!(tile.get(16, 32), LABEL_COLOUR, "label's left edge");
        assert_eq!(
            tile.get(47, 32),
            LABEL_COLOUR,
            "label's right edge, inside the prediction"
        );
        assert_eq!(
            tile.get(24, 32),
            PREDICTION_COLOUR,
            "prediction's left edge, inside the label"
        );
        assert_eq!(
            tile.get(55, 32),
            PREDICTION_COLOUR,
            "prediction's right edge"
        );
        assert_eq!(tile.get(32, 16), BOTH_COLOUR, "shared top edge");
        assert_eq!(tile.get(32, 47), BOTH_COLOUR, "shared bottom edge");
        assert_eq!(
            tile.get(20, 16),
            LABEL_COLOUR,
            "top edge where only the label is"
        );
        assert_eq!(
            tile.get(52, 47),
            PREDICTION_COLOUR,
            "bottom edge where only the prediction is"
        );
        assert_eq!(
            tile.get(17, 32),
            gray(138),
            "one pixel inside the label's edge"
        );
        // The coloured pixels are exactly the two 1-pixel square outlines: 4 * 32 - 4 = 124 each, sharing the
        // 2 * 24 pixels of top and bottom edge where x in 24..=47.
        let count = |rgb: [u8; 3]| {
            (0..64 * 64)
                .filter(|i| tile.get(i % 64, i / 64) == rgb)
                .count()
        };
        assert_eq!(count(BOTH_COLOUR), 48);
        assert_eq!(count(LABEL_COLOUR), 124 - 48);
        assert_eq!(count(PREDICTION_COLOUR), 124 - 48);
    }

    #[test]
    fn report_overlay_fill_blends_with_alpha() {
        let (image, label, _) = square_case();
        let options = QcOptions {
            min_size: 8,
            contour_width: 1,
            fill_alpha: 0.5,
            ..QcOptions::default()
        };
        let tile = render_overlay(
            Plane::new(&image, 8, 8).unwrap(),
            Some(Plane::new(&label, 8, 8).unwrap()),
            None,
            &options,
        )
        .unwrap();
        assert_eq!((tile.width, tile.height), (8, 8));
        // Pixel (3, 3) is inside the label, off its outline: gray of value 27 is 26.37 / 61.74 * 255 = 108.91
        // -> 109, half-blended with green: (54.5, 182, 54.5) rounded -> (55, 182, 55).
        assert_eq!(tile.get(3, 3), [55, 182, 55]);
        assert_eq!(tile.get(2, 3), LABEL_COLOUR);
        assert_eq!(tile.get(0, 0), [0, 0, 0]);
    }

    #[test]
    fn report_overlay_rejects_mismatched_shapes() {
        let (image, label, _) = square_case();
        let error = render_overlay(
            Plane::new(&image, 8, 8).unwrap(),
            Some(Plane::new(&label[..32], 4, 8).unwrap()),
            None,
            &QcOptions::default(),
        )
        .unwrap_err();
        assert!(format!("{error}").contains("label is 4x8"), "{error}");
        assert!(Plane::new(&image, 7, 8).is_err());
    }

    #[test]
    fn report_upscale_reaches_the_minimum_size() {
        assert_eq!(upscale_factor(8, 8, 256), 32);
        assert_eq!(upscale_factor(100, 60, 256), 3, "300 >= 256 > 200");
        assert_eq!(upscale_factor(512, 512, 256), 1);
    }

    #[test]
    fn report_grid_places_tiles_row_by_row() {
        let a = RgbImage::filled(10, 6, [1, 1, 1]);
        let b = RgbImage::filled(10, 6, [2, 2, 2]);
        let c = RgbImage::filled(5, 3, [3, 3, 3]);
        let sheet = grid(&[a, b, c], 2).unwrap();
        // 2 columns of 10 + one 4-pixel gutter; 2 rows of 6 + one gutter.
        assert_eq!((sheet.width, sheet.height), (24, 16));
        assert_eq!(sheet.get(0, 0), [1, 1, 1]);
        assert_eq!(sheet.get(9, 5), [1, 1, 1]);
        assert_eq!(sheet.get(10, 0), GRID_BACKGROUND, "gutter");
        assert_eq!(sheet.get(14, 0), [2, 2, 2]);
        assert_eq!(sheet.get(23, 5), [2, 2, 2]);
        assert_eq!(sheet.get(0, 6), GRID_BACKGROUND, "gutter");
        assert_eq!(sheet.get(0, 10), [3, 3, 3]);
        assert_eq!(sheet.get(4, 12), [3, 3, 3]);
        assert_eq!(
            sheet.get(5, 10),
            GRID_BACKGROUND,
            "rest of the smaller tile's cell"
        );
        assert_eq!(sheet.get(14, 10), GRID_BACKGROUND, "empty cell");
        assert!(grid(&[], 2).is_err());
    }

    #[test]
    fn report_qc_png_round_trips() {
        let (image, label, prediction) = square_case();
        let tile = render_overlay(
            Plane::new(&image, 8, 8).unwrap(),
            Some(Plane::new(&label, 8, 8).unwrap()),
            Some(Plane::new(&prediction, 8, 8).unwrap()),
            &QcOptions::default(),
        )
        .unwrap();
        let sheet = grid(&[tile.clone(), tile], 2).unwrap();
        assert_eq!((sheet.width, sheet.height), (256 * 2 + GRID_GAP, 256));
        let dir = ScratchDir::new("qc");
        let path = dir.path().join("qc.png");
        write_png(&path, &sheet).unwrap();
        assert_eq!(decode_png(&std::fs::read(&path).unwrap()).unwrap(), sheet);
    }
}
