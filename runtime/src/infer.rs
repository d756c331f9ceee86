//! Segmenting a volume: axial slices through the model folder's preprocessing and network, the
//! preprocessing undone on each prediction, and the slices stacked back into the source's voxel grid.
use crate::data::axial_samples;
use crate::model_folder::LoadedModel;
use crate::pipeline::Phase;
use crate::volume::{read_volume, write_like, OutputType, Volume};
use anyhow::{bail, Context, Result};
use ivado_sdk::{Mode, Sample};
use std::path::Path;
use tch::{Device, Tensor};

/// Soft prediction for `image_path` in the source's canonical grid: `[X, Y, Z]` for one class, `[K, X, Y, Z]`
/// for K classes.
pub fn segment_volume(
    loaded: &LoadedModel,
    image_path: &Path,
    device: Device,
    batch_size: usize,
) -> Result<(Volume, Tensor)> {
    let source = read_volume(image_path)?;
    let mut inputs = Vec::new();
    let mut undo = Vec::new();
    for (z, sample) in axial_samples(&source, None).into_iter().enumerate() {
        let (sample, records) = loaded
            .pipeline
            .apply_in(Phase::Testing, sample, 0)
            .with_context(|| format!("preprocessing slice {z} of {}", image_path.display()))?;
        inputs.push(sample.get("image")?.shallow_clone());
        undo.push((sample.meta, records));
    }
    let mut outputs: Vec<Tensor> = Vec::with_capacity(inputs.len());
    tch::no_grad(|| -> Result<()> {
        for chunk in inputs.chunks(batch_size.max(1)) {
            let batch = Tensor::stack(chunk, 0).to_device(device);
            let predictions = loaded
                .model
                .forward(&[&batch], Mode::Eval)?
                .to_device(Device::Cpu);
            outputs.extend((0..predictions.size()[0]).map(|i| predictions.get(i)));
        }
        Ok(())
    })?;
    let mut slices = Vec::with_capacity(outputs.len());
    for (z, (prediction, (meta, records))) in outputs.into_iter().zip(undo).enumerate() {
        let mut sample = Sample {
            tensors: Default::default(),
            meta,
        };
        sample.insert("prediction", prediction);
        let restored = loaded.pipeline.undo(sample, &records).with_context(|| {
            format!(
                "undoing preprocessing on slice {z} of {}",
                image_path.display()
            )
        })?;
        slices.push(restored.get("prediction")?.shallow_clone());
    }
    // [K, X, Y] per slice -> [K, X, Y, Z]
    let soft = Tensor::stack(&slices, -1);
    let size = soft.size();
    let expected = source.data.size();
    if size[1..] != expected[..] {
        bail!(
            "prediction shape {:?} does not match the source {:?} after undoing the preprocessing",
            &size[1..],
            expected
        );
    }
    let soft = if size[0] == 1 {
        soft.squeeze_dim(0)
    } else {
        soft
    };
    Ok((source, soft))
}

/// Applies the model folder's post-processing steps, in order, to a soft prediction in the source's grid
/// (`[X, Y, Z]` or `[K, X, Y, Z]`), with the source's voxel spacing (for thresholds in mm³).
pub fn postprocess(loaded: &LoadedModel, source: &Volume, soft: &Tensor) -> Result<Tensor> {
    if loaded.postprocess.is_empty() {
        return Ok(soft.shallow_clone());
    }
    let single = soft.dim() == 3;
    let mut sample = Sample::new();
    sample.insert(
        "prediction",
        if single {
            soft.unsqueeze(0)
        } else {
            soft.shallow_clone()
        },
    );
    sample.set_spacing(&source.spacing);
    let (sample, _) = loaded
        .postprocess
        .apply_in(Phase::Testing, sample, 0)
        .with_context(|| {
            format!(
                "post-processing the prediction of {}",
                source.path.display()
            )
        })?;
    let prediction = sample.get("prediction")?.shallow_clone();
    Ok(if single {
        prediction.squeeze_dim(0)
    } else {
        prediction
    })
}

/// Writes a binary mask (`soft >= threshold`) with the source's header and affine, so it overlays the source in
/// any viewer. Multi-class predictions are written one file per class (`_class-<k>` before the extension).
pub fn write_segmentation(
    source: &Volume,
    soft: &Tensor,
    out: &Path,
    threshold: f64,
) -> Result<Vec<std::path::PathBuf>> {
    let binary = soft.ge(threshold).to_kind(tch::Kind::Float);
    if binary.dim() == 3 {
        write_like(source, &binary, out, OutputType::U8)?;
        return Ok(vec![out.to_owned()]);
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, extension) = name.split_once('.').unwrap_or((&name, "nii.gz"));
    let mut written = Vec::new();
    for class in 0..binary.size()[0] {
        let path = out.with_file_name(format!("{stem}_class-{class}.{extension}"));
        write_like(source, &binary.get(class), &path, OutputType::U8)?;
        written.push(path);
    }
    Ok(written)
}
