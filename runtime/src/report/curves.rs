//! Training curves as a PNG: loss (train and validation), validation Dice and learning rate against epoch,
//! one panel each, from the rows of a run's `metrics.csv`.
//!
//! Text is drawn with DejaVu Sans, embedded from `runtime/assets/` (Bitstream Vera licence, next to it), so no
//! system font is needed.
use super::{write_png, RgbImage};
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Figure size in pixels.
pub const CURVES_WIDTH: u32 = 1000;
pub const CURVES_HEIGHT: u32 = 1000;
/// Heights of the loss and Dice panels; the learning-rate panel takes the rest.
const LOSS_PANEL_HEIGHT: u32 = 400;
const DICE_PANEL_HEIGHT: u32 = 300;

/// Series colours: matplotlib's first four `tab10` colours, which ivadomed's own plots use by default.
pub const TRAIN_LOSS_COLOUR: [u8; 3] = [31, 119, 180];
pub const VALID_LOSS_COLOUR: [u8; 3] = [255, 127, 14];
pub const VALID_DICE_COLOUR: [u8; 3] = [44, 160, 44];
pub const LEARNING_RATE_COLOUR: [u8; 3] = [148, 103, 189];

/// The font family name the embedded font is registered under.
pub(crate) const FONT_FAMILY: &str = "sans-serif";
static EMBEDDED_FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// One epoch of a metrics CSV. Empty or unparsable cells (for example `nan`) read as NaN and are left out of
/// the plot.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsRow {
    pub epoch: f64,
    pub train_loss: f64,
    pub valid_loss: f64,
    pub valid_dice: f64,
    pub learning_rate: f64,
}

/// Parses a metrics CSV (`epoch,train_loss,valid_loss,valid_dice,learning_rate,...`). Columns are found by
/// header name, so their order does not matter and extra columns are ignored.
pub fn parse_metrics_csv(text: &str) -> Result<Vec<MetricsRow>> {
    let mut lines = text.lines().filter(|line| !line.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .context("metrics CSV is empty")?
        .split(',')
        .map(str::trim)
        .collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| anyhow!("metrics CSV has no `{name}` column (header: {header:?})"))
    };
    let columns = [
        column("epoch")?,
        column("train_loss")?,
        column("valid_loss")?,
        column("valid_dice")?,
        column("learning_rate")?,
    ];
    lines
        .enumerate()
        .map(|(index, line)| {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != header.len() {
                bail!(
                    "metrics CSV line {}: {} cells, header has {}",
                    index + 2,
                    cells.len(),
                    header.len()
                );
            }
            let value = |c: usize| cells[c].parse::<f64>().unwrap_or(f64::NAN);
            Ok(MetricsRow {
                epoch: value(columns[0]),
                train_loss: value(columns[1]),
                valid_loss: value(columns[2]),
                valid_dice: value(columns[3]),
                learning_rate: value(columns[4]),
            })
        })
        .collect()
}

/// Reads and parses a metrics CSV file.
pub fn read_metrics_csv(path: &Path) -> Result<Vec<MetricsRow>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_metrics_csv(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Registers the embedded font once; every later call reports the first outcome.
pub(crate) fn register_embedded_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, EMBEDDED_FONT)
                .map_err(|_| "the embedded DejaVu Sans font failed to load".to_string())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The `(epoch, value)` points of one metric, split into runs of finite values so that a missing value
/// (NaN) leaves a gap in the line instead of being bridged.
fn segments(rows: &[MetricsRow], metric: fn(&MetricsRow) -> f64) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (x, y) in rows.iter().map(|r| (r.epoch, metric(r))) {
        if x.is_finite() && y.is_finite() {
            runs.last_mut().unwrap().push((x, y));
        } else if !runs.last().unwrap().is_empty() {
            runs.push(Vec::new());
        }
    }
    runs.retain(|run| !run.is_empty());
    runs
}

/// Tick label for an axis value: integers without a decimal point (epochs), others with `decimals`.
fn tick_label(value: f64, decimals: usize) -> String {
    if (value - value.round()).abs() < 1e-9 * value.abs().max(1.0) {
        format!("{}", value.round())
    } else {
        format!("{value:.decimals$}")
    }
}

/// `[min, max]` of `values` with 5% padding on each side; a degenerate range is widened so the axis exists.
fn padded_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !low.is_finite() {
        return 0.0..1.0;
    }
    let span = high - low;
    let pad = if span > 0.0 {
        span * 0.05
    } else {
        low.abs().max(1.0) * 0.05
    };
    (low - pad)..(high + pad)
}

fn colour([r, g, b]: [u8; 3]) -> RGBColor {
    RGBColor(r, g, b)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// How the y tick labels of a panel are written.
#[derive(Clone, Copy)]
enum YTicks {
    Decimal,
    /// For values spanning orders of magnitude (learning rates).
    Scientific,
}

/// One curve of a panel: its legend, colour and runs of finite points.
struct Series<'a> {
    legend: &'a str,
    colour: [u8; 3],
    runs: Vec<Vec<(f64, f64)>>,
}

/// One panel: each series is drawn as lines with dots at each epoch.
fn draw_panel(
    area: &Area,
    caption: &str,
    y_label: &str,
    x_range: std::ops::Range<f64>,
    y_range: std::ops::Range<f64>,
    y_ticks: YTicks,
    series: &[Series],
) -> Result<()> {
    // About one tick per epoch for short runs, so ticks fall on whole epochs; plotters picks round steps
    // for longer ones.
    let x_ticks = ((x_range.end - x_range.start).round() as usize + 1).clamp(2, 11);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT_FAMILY, 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(85)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| anyhow!("building the {caption} panel: {e}"))?;
    chart
        .configure_mesh()
        .x_labels(x_ticks)
        .x_label_formatter(&|x| tick_label(*x, 1))
        .y_label_formatter(&|y| match y_ticks {
            YTicks::Decimal => tick_label(*y, 2),
            YTicks::Scientific if *y == 0.0 => "0".to_string(),
            YTicks::Scientific => format!("{y:.1e}"),
        })
        .x_desc("epoch")
        .y_desc(y_label)
        .label_style((FONT_FAMILY, 15))
        .axis_desc_style((FONT_FAMILY, 17))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| anyhow!("drawing the {caption} axes: {e}"))?;
    for Series {
        legend,
        colour: rgb,
        runs,
    } in series
    {
        let style = colour(*rgb).stroke_width(2);
        for (index, run) in runs.iter().enumerate() {
            let drawn = chart
                .draw_series(LineSeries::new(run.iter().copied(), style).point_size(3))
                .map_err(|e| anyhow!("drawing {legend}: {e}"))?;
            // One legend entry per series, not per segment.
            if index == 0 {
                drawn
                    .label(*legend)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            }
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT_FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow!("drawing the {caption} legend: {e}"))?;
    Ok(())
}

/// Renders the three panels (loss, validation Dice, learning rate) into a [`CURVES_WIDTH`] x
/// [`CURVES_HEIGHT`] image.
pub fn render_training_curves(rows: &[MetricsRow]) -> Result<RgbImage> {
    if !rows.iter().any(|r| r.epoch.is_finite()) {
        bail!("no epochs to plot");
    }
    register_embedded_font()?;
    let train_loss = segments(rows, |r| r.train_loss);
    let valid_loss = segments(rows, |r| r.valid_loss);
    let valid_dice = segments(rows, |r| r.valid_dice);
    let learning_rate = segments(rows, |r| r.learning_rate);
    let x_range = {
        let epochs = rows.iter().map(|r| r.epoch).filter(|e| e.is_finite());
        let (low, high) = epochs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), e| {
            (lo.min(e), hi.max(e))
        });
        if high > low {
            low..high
        } else {
            (low - 0.5)..(high + 0.5)
        }
    };
    let loss_range = padded_range(train_loss.iter().chain(&valid_loss).flatten().map(|p| p.1));
    let lr_range = {
        let range = padded_range(learning_rate.iter().flatten().map(|p| p.1));
        // A learning rate is never negative; keep 0 as the floor when the padding would cross it.
        range.start.max(0.0)..range.end
    };

    let mut buffer = vec![0u8; (CURVES_WIDTH * CURVES_HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (CURVES_WIDTH, CURVES_HEIGHT))
            .into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow!("clearing the figure: {e}"))?;
        let (loss_area, rest) = root.split_vertically(LOSS_PANEL_HEIGHT);
        let (dice_area, lr_area) = rest.split_vertically(DICE_PANEL_HEIGHT);
        draw_panel(
            &loss_area,
            "Loss",
            "loss",
            x_range.clone(),
            loss_range,
            YTicks::Decimal,
            &[
                Series {
                    legend: "train",
                    colour: TRAIN_LOSS_COLOUR,
                    runs: train_loss,
                },
                Series {
                    legend: "validation",
                    colour: VALID_LOSS_COLOUR,
                    runs: valid_loss,
                },
            ],
        )?;
        // Dice lives in [0, 1]; a fixed axis makes runs comparable at a glance.
        draw_panel(
            &dice_area,
            "Validation Dice",
            "Dice",
            x_range.clone(),
            0.0..1.0,
            YTicks::Decimal,
            &[Series {
                legend: "validation Dice",
                colour: VALID_DICE_COLOUR,
                runs: valid_dice,
            }],
        )?;
        draw_panel(
            &lr_area,
            "Learning rate",
            "learning rate",
            x_range,
            lr_range,
            YTicks::Scientific,
            &[Series {
                legend: "learning rate",
                colour: LEARNING_RATE_COLOUR,
                runs: learning_rate,
            }],
        )?;
        root.present()
            .map_err(|e| anyhow!("finishing the figure: {e}"))?;
    }
    RgbImage::from_pixels(CURVES_WIDTH as usize, CURVES_HEIGHT as usize, buffer)
}

/// Renders the curves and writes them as a PNG at `path`, atomically.
pub fn write_training_curves(rows: &[MetricsRow], path: &Path) -> Result<()> {
    let image = render_training_curves(rows)?;
    write_png(path, &image)
}

/// Reads `metrics_csv` and writes its curves to `png`.
pub fn plot_metrics_csv(metrics_csv: &Path, png: &Path) -> Result<()> {
    write_training_curves(&read_metrics_csv(metrics_csv)?, png)
}

#[cfg(test)]
mod tests {
    use super::super::decode_png;
    use super::super::scratch::ScratchDir;
    use super::*;

    /// The format `train::write_metrics` writes, with a NaN cell and decreasing learning rate.
    const CSV: &str = "epoch,train_loss,valid_loss,valid_dice,learning_rate,seconds\n\
        1,-0.100000,-0.080000,0.120000,0.001,1.5\n\
        2,-0.350000,-0.300000,0.410000,0.0008,1.4\n\
        3,-0.600000,-0.520000,0.630000,0.0005,1.4\n\
        4,-0.720000,nan,0.700000,0.0002,1.4\n\
        5,-0.800000,-0.700000,0.780000,0.0001,1.4\n";

    #[test]
    fn report_metrics_csv_columns_are_found_by_name() {
        let rows = parse_metrics_csv(CSV).unwrap();
        assert_eq!(rows.len(), 5);
        assert_eq!(
            rows[1],
            MetricsRow {
                epoch: 2.0,
                train_loss: -0.35,
                valid_loss: -0.3,
                valid_dice: 0.41,
                learning_rate: 0.0008
            }
        );
        assert!(rows[3].valid_loss.is_nan());
        // Reordered columns and an extra one read the same values.
        let reordered =
            "valid_dice,extra,epoch,learning_rate,valid_loss,train_loss\n0.5,x,7,0.01,0.2,0.3\n";
        assert_eq!(
            parse_metrics_csv(reordered).unwrap(),
            vec![MetricsRow {
                epoch: 7.0,
                train_loss: 0.3,
                valid_loss: 0.2,
                valid_dice: 0.5,
                learning_rate: 0.01
            }]
        );
        let missing = parse_metrics_csv("epoch,train_loss\n1,2\n").unwrap_err();
        assert!(format!("{missing}").contains("valid_loss"), "{missing}");
        assert!(
            parse_metrics_csv("epoch,train_loss,valid_loss,valid_dice,learning_rate\n1,2\n")
                .is_err()
        );
    }

    #[test]
    fn report_missing_values_split_a_curve() {
        let rows = parse_metrics_csv(CSV).unwrap();
        // Validation loss is NaN at epoch 4: epochs 1-3 and 5 are separate runs; train loss is one run.
        assert_eq!(
            segments(&rows, |r| r.valid_loss),
            vec![
                vec![(1.0, -0.08), (2.0, -0.3), (3.0, -0.52)],
                vec![(5.0, -0.7)]
            ]
        );
        assert_eq!(segments(&rows, |r| r.train_loss).len(), 1);
        assert_eq!(tick_label(3.0, 1), "3");
        assert_eq!(tick_label(2.5, 1), "2.5");
    }

    fn count(image: &RgbImage, rgb: [u8; 3], rows: std::ops::Range<usize>) -> usize {
        rows.flat_map(|y| (0..image.width).map(move |x| (x, y)))
            .filter(|&(x, y)| image.get(x, y) == rgb)
            .count()
    }

    #[test]
    fn report_training_curves_png_decodes_with_every_series_drawn() {
        let dir = ScratchDir::new("curves");
        let csv = dir.path().join("metrics.csv");
        std::fs::write(&csv, CSV).unwrap();
        let png = dir.path().join("plots").join("training_curves.png");
        plot_metrics_csv(&csv, &png).unwrap();
        let image = decode_png(&std::fs::read(&png).unwrap()).unwrap();
        assert_eq!((image.width, image.height), (1000, 1000));

        // Each series colour appears in its own panel (lines 2 px wide over 4 epochs: hundreds of pixels),
        // and nowhere else.
        let (loss, dice, lr) = (0..400, 400..700, 700..1000);
        for (name, rgb, inside, outside) in [
            ("train loss", TRAIN_LOSS_COLOUR, loss.clone(), 400..1000),
            ("valid loss", VALID_LOSS_COLOUR, loss.clone(), 400..1000),
            ("valid Dice", VALID_DICE_COLOUR, dice.clone(), 0..400),
            ("learning rate", LEARNING_RATE_COLOUR, lr.clone(), 0..700),
        ] {
            let drawn = count(&image, rgb, inside);
            assert!(drawn > 200, "{name}: {drawn} pixels");
            assert_eq!(
                count(&image, rgb, outside),
                0,
                "{name} leaks out of its panel"
            );
        }
        // Text renders: the caption strip at the top of each panel (above the plotting area, right of the y
        // tick labels) holds dark glyph pixels, centred horizontally.
        for (name, top) in [
            ("Loss", 0),
            ("Validation Dice", 400),
            ("Learning rate", 700),
        ] {
            let dark = (top + 12..top + 40)
                .flat_map(|y| (100..image.width).map(move |x| (x, y)))
                .filter(|&(x, y)| image.get(x, y).iter().all(|&c| c < 100))
                .map(|(x, _)| x)
                .collect::<Vec<_>>();
            assert!(
                dark.len() > 30,
                "caption {name}: {} dark pixels",
                dark.len()
            );
            let (min, max) = (dark.iter().min().unwrap(), dark.iter().max().unwrap());
            assert!(
                *min > 300 && *max < 700,
                "caption {name} spans x {min}..{max}"
            );
        }
        let names: Vec<_> = std::fs::read_dir(png.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the PNG, no temporary file");
    }

    #[test]
    fn report_training_curves_with_one_epoch_and_constant_values() {
        let rows = parse_metrics_csv(
            "epoch,train_loss,valid_loss,valid_dice,learning_rate\n1,0.5,0.5,0.5,0.001\n",
        )
        .unwrap();
        let image = render_training_curves(&rows).unwrap();
        // One point per series: a dot of radius 3 in each panel.
        assert!(
            count(&image, TRAIN_LOSS_COLOUR, 0..400) + count(&image, VALID_LOSS_COLOUR, 0..400)
                > 10
        );
        assert!(count(&image, VALID_DICE_COLOUR, 400..700) > 10);
        assert!(render_training_curves(&[]).is_err());
    }
}
