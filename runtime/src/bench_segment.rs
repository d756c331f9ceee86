//! `ivado bench segment`: seconds per volume of [`crate::infer::segment_loaded`] on a generated volume
//! (256 x 256 x 64 by default), with ivadomed's default 2D U-Net on axial slices and a 3D U-Net on
//! subvolumes, each without and with test-time augmentation (random flips, undone per tile). The table has
//! columns for ivadomed's figures, measured separately by scripts/ivadomed/segment_bench.py and passed in with
//! `--ivadomed LABEL=SECONDS`, and for how many times faster ivado is.
use crate::infer::{segment_loaded, LoadedVolume, Sampling, SegmentOptions, VolumeInput};
use crate::model_folder::LoadedModel;
use crate::pipeline::Pipeline;
use crate::plugin::PluginRegistry;
use crate::volume::{Reorientation, Volume};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One benchmarked configuration.
pub struct SegmentCase {
    pub label: &'static str,
    pub architecture: &'static str,
    pub config: Value,
    pub sampling: Sampling,
    pub tta: usize,
}

/// ivadomed's default 2D U-Net (depth 3, 64 filters) on axial slices, and a 3D U-Net (16 filters) on
/// 128 x 128 x 32 subvolumes, each plain and with `tta` passes.
pub fn default_cases(tta: usize) -> Vec<SegmentCase> {
    let unet2d = || json!({});
    let unet3d = || json!({"n_filters": 16});
    let slices = Sampling::default();
    let cubes = Sampling::Subvolumes {
        length: [128, 128, 32],
        stride: [128, 128, 32],
    };
    vec![
        SegmentCase {
            label: "2d",
            architecture: "unet2d",
            config: unet2d(),
            sampling: slices.clone(),
            tta: 0,
        },
        SegmentCase {
            label: "2d_tta",
            architecture: "unet2d",
            config: unet2d(),
            sampling: slices,
            tta,
        },
        SegmentCase {
            label: "3d",
            architecture: "unet3d",
            config: unet3d(),
            sampling: cubes.clone(),
            tta: 0,
        },
        SegmentCase {
            label: "3d_tta",
            architecture: "unet3d",
            config: unet3d(),
            sampling: cubes,
            tta,
        },
    ]
}

/// A random volume of `shape` with an identity affine, as segmentation reads it.
fn generated_volume(shape: [i64; 3]) -> Result<LoadedVolume> {
    let affine = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let data = Tensor::rand(shape, (Kind::Float, Device::Cpu));
    let path = PathBuf::from(format!(
        "generated_{}x{}x{}.nii.gz",
        shape[0], shape[1], shape[2]
    ));
    let source = Volume {
        data: data.shallow_clone(),
        spacing: [1.0; 3],
        affine,
        reorientation: Reorientation::from_affine(&affine, shape.map(|s| s as usize))?,
        header: nifti::NiftiHeader::default(),
        path: path.clone(),
    };
    Ok(LoadedVolume {
        input: VolumeInput {
            channels: vec![path],
        },
        image: data.unsqueeze(0),
        source,
        sidecar: BTreeMap::new(),
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

/// Runs every case `repeats` times after one warm-up and writes the table to `table` row by row (a case takes
/// minutes on a CPU). `ivadomed` holds ivadomed's seconds per volume by case label, printed beside ours.
pub fn run(
    table: &mut dyn Write,
    registry: &PluginRegistry,
    device: Device,
    shape: [i64; 3],
    tta: usize,
    repeats: usize,
    ivadomed: &BTreeMap<String, f64>,
) -> Result<()> {
    let volume = generated_volume(shape)?;
    let flips = Pipeline::from_specs(
        registry,
        &[json!({"name": "RandomReverse", "config": {}, "dataset_type": ["training"]})],
    )?;
    writeln!(
        table,
        "segmentation of a generated {}x{}x{} volume on {} ({} threads), median of {repeats} after 1 warm-up",
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
        "{:<8} {:<10} {:<32} {:>6} {:>12} {:>14} {:>11}",
        "case", "network", "sampling", "passes", "s/volume", "ivadomed s/vol", "x ivadomed"
    )?;
    for case in cases {
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
            batch_size: 16,
            ..SegmentOptions::default()
        };
        let mut seconds = Vec::with_capacity(repeats);
        for run in 0..=repeats {
            let start = Instant::now();
            segment_loaded(&loaded, &volume, &options)?;
            if run > 0 {
                seconds.push(start.elapsed().as_secs_f64());
            }
        }
        seconds.sort_by(f64::total_cmp);
        let median = seconds[seconds.len() / 2];
        let (reference, speedup) = comparison_columns(ivadomed.get(case.label).copied(), median);
        writeln!(
            table,
            "{:<8} {:<10} {:<32} {:>6} {:>12.2} {:>14} {:>11}",
            case.label,
            case.architecture,
            case.sampling.to_section().to_string(),
            case.tta.max(1),
            median,
            reference,
            speedup
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
