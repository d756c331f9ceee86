//! `ivado bench segment`: seconds per volume of segmentation end to end (read the NIfTI file, tile,
//! preprocess, forward, undo, stitch, write the mask) on a generated volume (256 x 256 x 64 by default), with
//! ivadomed's default 2D U-Net on axial slices and a 3D U-Net on subvolumes, each without and with test-time
//! augmentation (random flips, undone per tile; the averaged mask written, as ivadomed's TTA rows), then
//! with TTA and ivadomed's uncertainty maps written too, at the default precision (`auto`), and in fp32 for
//! comparison. Each row breaks the time down by stage. The table has a column for ivadomed's figures,
//! measured separately and passed in with `--ivadomed LABEL=SECONDS`, and their ratio to ours.
use crate::infer::{
    load_volume, segment_loaded, write_outputs, OutputTarget, Sampling, SegmentOptions, StageTimes,
    VolumeInput,
};
use crate::model_folder::LoadedModel;
use crate::pipeline::Pipeline;
use crate::plugin::PluginRegistry;
use crate::precision::Precision;
use crate::volume::{write_like, OutputType, Reorientation, Volume};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// One benchmarked configuration.
pub struct SegmentCase {
    pub label: &'static str,
    pub architecture: &'static str,
    pub config: Value,
    pub sampling: Sampling,
    pub tta: usize,
    /// With TTA: compute and write the soft and uncertainty maps (`ivado segment --tta`'s default), else
    /// only the averaged mask (`--no-uncertainty-maps`).
    pub uncertainty_maps: bool,
    /// `None`: `auto`, what `ivado segment` runs by default.
    pub precision: Option<Precision>,
}

/// ivadomed's default 2D U-Net (depth 3, 64 filters) on axial slices, and a 3D U-Net (16 filters) on
/// 128 x 128 x 32 subvolumes, each plain, with `tta` passes, and with `tta` passes and the uncertainty maps
/// at the default precision, then plain in fp32.
pub fn default_cases(tta: usize) -> Vec<SegmentCase> {
    let slices = Sampling::default();
    let cubes = Sampling::Subvolumes {
        length: [128, 128, 32],
        stride: [128, 128, 32],
    };
    let case =
        |label, architecture, config: Value, sampling: &Sampling, tta, precision| SegmentCase {
            label,
            architecture,
            config,
            sampling: sampling.clone(),
            tta,
            uncertainty_maps: false,
            precision,
        };
    let with_maps = |case: SegmentCase| SegmentCase {
        uncertainty_maps: true,
        ..case
    };
    let unet3d = || json!({"n_filters": 16});
    vec![
        case("2d", "unet2d", json!({}), &slices, 0, None),
        case("2d_tta", "unet2d", json!({}), &slices, tta, None),
        with_maps(case("2d_unc", "unet2d", json!({}), &slices, tta, None)),
        case("3d", "unet3d", unet3d(), &cubes, 0, None),
        case("3d_tta", "unet3d", unet3d(), &cubes, tta, None),
        with_maps(case("3d_unc", "unet3d", unet3d(), &cubes, tta, None)),
        case(
            "2d_fp32",
            "unet2d",
            json!({}),
            &slices,
            0,
            Some(Precision::Fp32),
        ),
        case(
            "3d_fp32",
            "unet3d",
            unet3d(),
            &cubes,
            0,
            Some(Precision::Fp32),
        ),
    ]
}

/// Writes a random volume of `shape` with an identity affine to `dir` as NIfTI (f32, gzip), the file the
/// benchmark reads back in every run.
fn generated_volume(dir: &Path, shape: [i64; 3]) -> Result<VolumeInput> {
    let affine = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let path = dir.join(format!(
        "generated_{}x{}x{}.nii.gz",
        shape[0], shape[1], shape[2]
    ));
    let data = Tensor::rand(shape, (Kind::Float, Device::Cpu));
    // 1 mm voxels, the sform the identity: the canonical grid is the file's.
    let header = nifti::NiftiHeader {
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
        pixdim: [1.0; 8],
        sform_code: 1,
        srow_x: [1.0, 0.0, 0.0, 0.0],
        srow_y: [0.0, 1.0, 0.0, 0.0],
        srow_z: [0.0, 0.0, 1.0, 0.0],
        ..nifti::NiftiHeader::default()
    };
    let template = Volume {
        data: data.shallow_clone(),
        spacing: [1.0; 3],
        affine,
        reorientation: Reorientation::from_affine(&affine, shape.map(|s| s as usize))?,
        header,
        path: path.clone(),
    };
    write_like(&template, &data, &path, OutputType::F32)?;
    Ok(VolumeInput {
        channels: vec![path],
    })
}

/// The `ivadomed s/vol` and `x ivadomed` cells of a row: ivadomed's seconds and how many times faster ivado
/// is (ivadomed's seconds over ours), or dashes when ivadomed was not measured.
fn comparison_columns(ivadomed_seconds: Option<f64>, seconds: f64) -> (String, String) {
    match ivadomed_seconds {
        Some(reference) => (
            format!("{reference:.2}"),
            format!("{:.1}", reference / seconds),
        ),
        None => ("-".into(), "-".into()),
    }
}

/// Wall time of one end-to-end run, by stage.
#[derive(Clone, Copy, Debug, Default)]
struct RunTimes {
    read: Duration,
    compute: StageTimes,
    write: Duration,
    total: Duration,
}

/// Reads, segments and writes `input` once, as `ivado segment` does for one volume.
fn run_once(
    loaded: &LoadedModel,
    input: &VolumeInput,
    options: &SegmentOptions,
    out: &Path,
) -> Result<(RunTimes, Precision)> {
    let start = Instant::now();
    let volume = load_volume(input)?;
    let read = start.elapsed();
    let segmentation = segment_loaded(loaded, &volume, options)?;
    let written = Instant::now();
    write_outputs(
        &loaded.postprocess,
        &volume.source,
        &volume.input,
        &segmentation,
        &OutputTarget::Folder(out.to_owned()),
        options,
    )?;
    let times = RunTimes {
        read,
        compute: segmentation.times,
        write: written.elapsed(),
        total: start.elapsed(),
    };
    Ok((times, segmentation.precision))
}

/// Runs every case (or those named in `only`) `repeats` times after one warm-up and writes the table to
/// `table` row by row (a case takes minutes on a CPU). Each row is the run with the median total; its stage
/// columns are that run's. `ivadomed` holds ivadomed's seconds per volume by case label, printed beside ours
/// with the ratio ivadomed / ivado.
#[allow(clippy::too_many_arguments)]
pub fn run(
    table: &mut dyn Write,
    registry: &PluginRegistry,
    device: Device,
    shape: [i64; 3],
    tta: usize,
    repeats: usize,
    ivadomed: &BTreeMap<String, f64>,
    only: &[String],
) -> Result<()> {
    let scratch_dir = crate::scratch::ScratchDir::new("bench-segment")?;
    let scratch = scratch_dir.path();
    let input = generated_volume(scratch, shape)?;
    let out = scratch.join("predictions");
    let flips = Pipeline::from_specs(
        registry,
        &[json!({"name": "RandomReverse", "config": {}, "dataset_type": ["training"]})],
    )?;
    writeln!(
        table,
        "segmentation of a generated {}x{}x{} volume (read .nii.gz, segment, write the mask) on {} ({} threads), \
         median of {repeats} after 1 warm-up; stage columns in seconds",
        shape[0],
        shape[1],
        shape[2],
        crate::device::describe(device),
        tch::get_num_threads()
    )?;
    let cases = default_cases(tta);
    if let Some(unknown) = ivadomed
        .keys()
        .find(|label| !cases.iter().any(|case| case.label == label.as_str()))
    {
        let known: Vec<_> = cases.iter().map(|case| case.label).collect();
        anyhow::bail!("--ivadomed {unknown}=...: no such case; the cases are {known:?}");
    }
    writeln!(
        table,
        "{:<8} {:<7} {:<28} {:>6} {:>5} {:>9} {:>6} {:>6} {:>8} {:>6} {:>6} {:>6} {:>9} {:>7}",
        "case",
        "network",
        "sampling",
        "passes",
        "prec",
        "s/volume",
        "read",
        "prep",
        "forward",
        "undo",
        "finish",
        "write",
        "ivadomed",
        "speedup"
    )?;
    for case in cases {
        if !only.is_empty() && !only.iter().any(|label| label == case.label) {
            continue;
        }
        let model = registry
            .model(case.architecture, &case.config, device)
            .with_context(|| format!("building {}", case.architecture))?;
        let loaded = LoadedModel {
            model,
            pipeline: flips.clone(),
            postprocess: Pipeline::default(),
            description: json!({"inference": case.sampling.to_section()}),
        };
        let options = SegmentOptions {
            device,
            tta: case.tta,
            no_uncertainty_maps: !case.uncertainty_maps,
            precision: case.precision,
            batch_size: crate::infer::default_batch_size(device),
            ..SegmentOptions::default()
        };
        let mut runs = Vec::with_capacity(repeats);
        let mut precision = Precision::Fp32;
        for run in 0..=repeats {
            let (times, used) = run_once(&loaded, &input, &options, &out)?;
            precision = used;
            if run > 0 {
                runs.push(times);
            }
        }
        runs.sort_by_key(|run| run.total);
        let median = runs[runs.len() / 2];
        let seconds = median.total.as_secs_f64();
        let (reference, ratio) = comparison_columns(ivadomed.get(case.label).copied(), seconds);
        let s = |d: Duration| d.as_secs_f64();
        writeln!(
            table,
            "{:<8} {:<7} {:<28} {:>6} {:>5} {:>9.2} {:>6.2} {:>6.2} {:>8.2} {:>6.2} {:>6.2} {:>6.2} {:>9} {:>7}",
            case.label,
            case.architecture,
            case.sampling.to_section().to_string(),
            case.tta.max(1),
            precision.name(),
            seconds,
            s(median.read),
            s(median.compute.preprocess),
            s(median.compute.forward),
            s(median.compute.undo_stitch),
            s(median.compute.finish),
            s(median.write),
            reference,
            ratio
        )?;
        table.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::comparison_columns;

    #[test]
    fn comparison_columns_print_ivadomed_seconds_and_the_speedup() {
        // 322.04 s for ivadomed against 40.25 s for ivado: 322.04 / 40.25 = 8.0009..., printed to one decimal.
        assert_eq!(
            comparison_columns(Some(322.04), 40.25),
            ("322.04".to_owned(), "8.0".to_owned())
        );
        // Slower than ivadomed reads below 1: 5 / 13.47 = 0.371...
        assert_eq!(
            comparison_columns(Some(5.0), 13.47),
            ("5.00".to_owned(), "0.4".to_owned())
        );
        assert_eq!(
            comparison_columns(None, 1.0),
            ("-".to_owned(), "-".to_owned())
        );
    }
}
