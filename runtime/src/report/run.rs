//! What a training run leaves for a researcher to look at, written after every epoch: TensorBoard scalars and
//! image grids (`<out>/tensorboard/`), the training curves (`<out>/training_curves.png`) and QC overlays of
//! validation slices (`<out>/qc/epoch-NNNN.png`: image, label contour in green, prediction in red).
use super::curves::plot_metrics_csv;
use super::qc::{grid, render_overlay, Plane, QcOptions};
use super::tensorboard::EventWriter;
use super::{tags, write_png, RgbImage};
use anyhow::Result;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// How many validation slices the QC grid shows.
pub const QC_SLICES: usize = 6;

pub struct RunOutputs {
    out_dir: PathBuf,
    events: EventWriter,
}

/// One epoch's scalars.
pub struct EpochScalars {
    pub epoch: usize,
    pub train_loss: f64,
    pub valid_loss: f64,
    pub valid_dice: f64,
    pub learning_rate: f64,
}

impl RunOutputs {
    pub fn create(out_dir: &Path) -> Result<Self> {
        Ok(Self {
            out_dir: out_dir.to_owned(),
            events: EventWriter::create(&out_dir.join("tensorboard"))?,
        })
    }

    /// The TensorBoard event file.
    pub fn event_file(&self) -> &Path {
        self.events.path()
    }

    /// Logs the scalars, redraws the curves from `metrics.csv`, and writes the QC grid when given.
    pub fn epoch(&mut self, scalars: &EpochScalars, qc: Option<&RgbImage>) -> Result<()> {
        let step = scalars.epoch as i64;
        self.events
            .scalar(tags::TRAIN_LOSS, step, scalars.train_loss)?;
        self.events
            .scalar(tags::VALID_LOSS, step, scalars.valid_loss)?;
        self.events
            .scalar(tags::VALID_DICE, step, scalars.valid_dice)?;
        self.events
            .scalar(tags::LEARNING_RATE, step, scalars.learning_rate)?;
        if let Some(image) = qc {
            self.events.image("Validation/qc", step, image)?;
            write_png(
                &self
                    .out_dir
                    .join("qc")
                    .join(format!("epoch-{:04}.png", scalars.epoch)),
                image,
            )?;
        }
        self.events.flush()?;
        plot_metrics_csv(
            &self.out_dir.join("metrics.csv"),
            &self.out_dir.join("training_curves.png"),
        )
    }
}

/// Up to `count` slice indices spread evenly over the slices whose label has foreground (all slices when none
/// has), so the QC grid shows the structure being segmented.
pub fn qc_indices(positive: &[bool], count: usize) -> Vec<i64> {
    let pool: Vec<i64> = if positive.iter().any(|&p| p) {
        (0..positive.len() as i64)
            .filter(|&i| positive[i as usize])
            .collect()
    } else {
        (0..positive.len() as i64).collect()
    };
    if pool.len() <= count {
        return pool;
    }
    (0..count)
        .map(|k| pool[k * (pool.len() - 1) / (count - 1).max(1)])
        .collect()
}

/// A grid of QC tiles, one per slice: `images`, `labels` and `predictions` are `[N, 1, H, W]`.
pub fn qc_grid(images: &Tensor, labels: &Tensor, predictions: &Tensor) -> Result<RgbImage> {
    let plane = |t: &Tensor, i: i64| -> Result<(Vec<f32>, usize, usize)> {
        let slice = t.get(i).get(0).to_kind(Kind::Float).contiguous();
        let size = slice.size();
        Ok((
            Vec::<f32>::try_from(&slice.flatten(0, -1))?,
            size[0] as usize,
            size[1] as usize,
        ))
    };
    let mut tiles = Vec::new();
    for i in 0..images.size()[0] {
        let (image, h, w) = plane(images, i)?;
        let (label, _, _) = plane(labels, i)?;
        let (prediction, _, _) = plane(predictions, i)?;
        tiles.push(render_overlay(
            Plane::new(&image, h, w)?,
            Some(Plane::new(&label, h, w)?),
            Some(Plane::new(&prediction, h, w)?),
            &QcOptions::default(),
        )?);
    }
    grid(&tiles, 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qc_indices_spread_over_positive_slices() {
        let positive = [false, true, true, false, true, true, true, false];
        // Positive slices are 1, 2, 4, 5, 6; three spread evenly: first, middle, last.
        assert_eq!(qc_indices(&positive, 3), vec![1, 4, 6]);
        assert_eq!(qc_indices(&[false, false], 3), vec![0, 1]);
    }

    #[test]
    fn an_epoch_writes_events_curves_and_qc() {
        let dir = super::super::scratch::ScratchDir::new("run");
        std::fs::write(
            dir.path().join("metrics.csv"),
            "epoch,train_loss,valid_loss,valid_dice,learning_rate,seconds\n1,-0.5,-0.4,0.6,0.001,1.0\n",
        )
        .unwrap();
        let mut outputs = RunOutputs::create(dir.path()).unwrap();
        let images = Tensor::rand([2, 1, 16, 16], (Kind::Float, tch::Device::Cpu));
        let labels = images.gt(0.5).to_kind(Kind::Float);
        let qc = qc_grid(&images, &labels, &labels).unwrap();
        outputs
            .epoch(
                &EpochScalars {
                    epoch: 1,
                    train_loss: -0.5,
                    valid_loss: -0.4,
                    valid_dice: 0.6,
                    learning_rate: 1e-3,
                },
                Some(&qc),
            )
            .unwrap();
        let events = super::super::tensorboard::read_events(outputs.event_file()).unwrap();
        // File version, four scalars, one image.
        assert_eq!(events.len(), 6, "{events:?}");
        assert!(dir.path().join("training_curves.png").is_file());
        assert!(dir.path().join("qc/epoch-0001.png").is_file());
    }
}
