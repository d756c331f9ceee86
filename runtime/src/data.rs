//! From an indexed BIDS dataset to batches: image/label pairs checked against each other, and 2D axial
//! slices run through the preprocessing pipeline. Splits live in [`crate::split`] (re-exported here).
use crate::bids::BidsEntry;
use crate::pipeline::{derive_seed, Phase, Pipeline};
use crate::volume::{read_image, read_label, Volume};
use anyhow::{bail, Context, Result};
use ivado_sdk::{Batch, Sample};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

pub use crate::split::{split_by_subject, Split};

/// Largest affine difference (mm) tolerated between an image and its label.
const AFFINE_TOLERANCE_MM: f64 = 1e-3;

/// Reads an image and its label, and checks they describe the same voxels.
pub fn load_pair(entry: &BidsEntry) -> Result<(Volume, Volume)> {
    let label_path = entry
        .label
        .as_ref()
        .with_context(|| format!("{}: no label found for this image", entry.image.display()))?;
    // the label shares its image's geometry, so it takes the image's sidecar (microscopy pixel size)
    let sidecar = entry.sidecar.as_deref();
    let image = read_image(&entry.image, sidecar)?;
    let label = read_label(label_path, sidecar)?;
    if image.data.size() != label.data.size() {
        bail!(
            "image {} has shape {:?} but its label {} has shape {:?}",
            entry.image.display(),
            image.reorientation.file_shape,
            label_path.display(),
            label.reorientation.file_shape
        );
    }
    let worst = image
        .affine
        .iter()
        .flatten()
        .zip(label.affine.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    // microscopy pixels are ~1e-4 mm: the tolerance is also at most 1% of the smallest voxel
    let smallest_voxel = image.spacing.iter().copied().fold(f64::INFINITY, f64::min);
    let tolerance = AFFINE_TOLERANCE_MM.min(0.01 * smallest_voxel);
    if worst > tolerance {
        bail!(
            "image {} and its label {} have different affines (largest difference {worst:.3e} mm, tolerance {tolerance:.1e} mm): they do not overlay",
            entry.image.display(),
            label_path.display()
        );
    }
    Ok((image, label))
}

/// The axial slices of one volume as samples: `image` `[1, X, Y]` plus `label` when given.
pub fn axial_samples(image: &Volume, label: Option<&Volume>) -> Vec<Sample> {
    let depth = image.data.size()[2];
    (0..depth)
        .map(|z| {
            let mut sample = Sample::new();
            sample.insert("image", image.data.select(2, z).unsqueeze(0));
            if let Some(label) = label {
                sample.insert("label", label.data.select(2, z).unsqueeze(0));
            }
            sample.set_spacing(&image.spacing[..2]);
            sample
        })
        .collect()
}

/// One entry's axial slices through `pipeline`'s `phase` steps: per slice, the `[1, H, W]` image, its binary
/// label and its spacing. Slice `z` of the `volume`-th entry is seeded by (`seed`, volume, z), which only
/// matters for a pipeline that is not deterministic.
pub fn preprocess_entry(
    entry: &BidsEntry,
    pipeline: &Pipeline,
    phase: Phase,
    seed: u64,
    volume: usize,
) -> Result<Vec<(Tensor, Tensor, Vec<f64>)>> {
    let (image, label) = load_pair(entry)?;
    axial_samples(&image, Some(&label))
        .into_iter()
        .enumerate()
        .map(|(z, sample)| {
            let sample_seed = derive_seed(seed, (volume as u64) << 20 | z as u64);
            let (sample, _) = pipeline
                .apply_in(phase, sample, sample_seed)
                .with_context(|| format!("preprocessing slice {z} of {}", entry.image.display()))?;
            Ok((
                sample.get("image")?.shallow_clone(),
                // Labels stay binary through nearest-neighbour resampling; threshold anyway for soft inputs.
                sample.get("label")?.ge(0.5).to_kind(Kind::Float),
                sample.spacing()?,
            ))
        })
        .collect()
}

/// Preprocessed 2D slices stacked into tensors, with the volume each slice came from.
pub struct SliceSet {
    /// `[N, 1, H, W]`
    pub images: Tensor,
    /// `[N, 1, H, W]`, binary
    pub labels: Tensor,
    /// Index into `volumes` per slice.
    pub volume_of_slice: Vec<usize>,
    /// Image path per volume.
    pub volumes: Vec<String>,
    /// Physical spacing of each slice after preprocessing (mm per axis), for augmentations that work in mm.
    pub spacing: Vec<Vec<f64>>,
    /// `[N, M]` FiLM metadata per slice (its volume's encoded vector), the model's second input; `None` for
    /// a model without FiLM.
    pub metadata: Option<Tensor>,
}

impl SliceSet {
    /// Loads every entry's axial slices through `pipeline`'s training-phase steps (run once: they must be
    /// deterministic).
    pub fn build(entries: &[BidsEntry], pipeline: &Pipeline, seed: u64) -> Result<Self> {
        Self::build_in(Phase::Training, entries, pipeline, seed)
    }

    /// [`SliceSet::build`] with the steps whose `dataset_type` includes `phase`.
    pub fn build_in(
        phase: Phase,
        entries: &[BidsEntry],
        pipeline: &Pipeline,
        seed: u64,
    ) -> Result<Self> {
        if entries.is_empty() {
            bail!("no images to load: the dataset split is empty");
        }
        let mut images = Vec::new();
        let mut labels = Vec::new();
        let mut volume_of_slice = Vec::new();
        let mut volumes = Vec::new();
        let mut spacing = Vec::new();
        for entry in entries {
            for (image, label, slice_spacing) in
                preprocess_entry(entry, pipeline, phase, seed, volumes.len())?
            {
                images.push(image);
                labels.push(label);
                spacing.push(slice_spacing);
                volume_of_slice.push(volumes.len());
            }
            volumes.push(entry.image.display().to_string());
        }
        let shapes: Vec<Vec<i64>> = images.iter().map(|t| t.size()).collect();
        if shapes.windows(2).any(|w| w[0] != w[1]) {
            bail!(
                "preprocessed slices differ in shape ({:?} ...); add a CenterCrop to the pipeline",
                &shapes[..2]
            );
        }
        Ok(Self {
            images: Tensor::stack(&images, 0),
            labels: Tensor::stack(&labels, 0),
            volume_of_slice,
            volumes,
            spacing,
            metadata: None,
        })
    }

    /// Gives every slice its volume's FiLM vector: `per_volume[v]` for the slices of `volumes[v]`.
    pub fn set_metadata(&mut self, per_volume: &[Vec<f32>]) -> Result<()> {
        if per_volume.len() != self.volumes.len() {
            bail!(
                "{} metadata vectors for {} volumes",
                per_volume.len(),
                self.volumes.len()
            );
        }
        let width = per_volume.first().map_or(0, Vec::len);
        let flat: Vec<f32> = self
            .volume_of_slice
            .iter()
            .flat_map(|&v| per_volume[v].iter().copied())
            .collect();
        self.metadata = Some(Tensor::from_slice(&flat).reshape([self.len() as i64, width as i64]));
        Ok(())
    }

    /// The FiLM metadata of the slices `indices` (`[B, M]`) on `device`, when the set has any.
    pub fn metadata_batch(&self, indices: &[i64], device: Device) -> Option<Tensor> {
        self.metadata.as_ref().map(|metadata| {
            metadata
                .index_select(0, &Tensor::from_slice(indices))
                .to_device(device)
        })
    }

    /// Another handle on the same slices (tensor storage is shared, not copied), for a loader worker:
    /// tensors are `Send` but not `Sync`, so each thread needs its own handles.
    pub fn share(&self) -> SliceSet {
        SliceSet {
            images: self.images.shallow_clone(),
            labels: self.labels.shallow_clone(),
            volume_of_slice: self.volume_of_slice.clone(),
            volumes: self.volumes.clone(),
            spacing: self.spacing.clone(),
            metadata: self.metadata.as_ref().map(Tensor::shallow_clone),
        }
    }

    pub fn len(&self) -> usize {
        self.volume_of_slice.len()
    }

    pub fn is_empty(&self) -> bool {
        self.volume_of_slice.is_empty()
    }

    /// Slice indices in a seeded random order.
    pub fn shuffled(&self, seed: u64) -> Vec<i64> {
        let mut order: Vec<i64> = (0..self.len() as i64).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        order
    }

    /// Whether each slice's label has any foreground.
    pub fn positive(&self) -> Vec<bool> {
        let sums = self
            .labels
            .sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float);
        Vec::<f32>::try_from(&sums)
            .unwrap_or_default()
            .into_iter()
            .map(|sum| sum > 0.0)
            .collect()
    }

    /// As many slice indices as the set holds, drawn with replacement so that slices with and without
    /// foreground come up equally often (ivadomed's balanced sampler). Falls back to a shuffle when one of the
    /// two kinds is absent.
    pub fn balanced(&self, seed: u64) -> Vec<i64> {
        use rand::Rng;
        let positive = self.positive();
        let (with, without): (Vec<i64>, Vec<i64>) =
            (0..self.len() as i64).partition(|&i| positive[i as usize]);
        if with.is_empty() || without.is_empty() {
            return self.shuffled(seed);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..self.len())
            .map(|_| {
                let pool = if rng.random_bool(0.5) {
                    &with
                } else {
                    &without
                };
                pool[rng.random_range(0..pool.len())]
            })
            .collect()
    }

    /// One batch through a random augmentation pipeline, on `device`. Each slice gets one draw, seeded by
    /// (run seed, epoch, slice index), applied to its image and label alike, so a batch is the same whatever
    /// else ran before it. Labels are binarised again after the spatial transforms.
    pub fn augmented_batch(
        &self,
        indices: &[i64],
        augment: &Pipeline,
        seed: u64,
        epoch: u64,
        device: Device,
    ) -> Result<(Tensor, Tensor)> {
        let epoch_seed = derive_seed(seed, epoch);
        if indices.is_empty() {
            bail!("cannot augment an empty batch");
        }
        // The whole batch goes through each step at once (one plugin call per step); every slice still draws
        // only from its own seed.
        let index = Tensor::from_slice(indices);
        let mut batch = Batch {
            tensors: Default::default(),
            metas: Vec::with_capacity(indices.len()),
        };
        batch.insert("image", self.images.index_select(0, &index));
        batch.insert("label", self.labels.index_select(0, &index));
        for &slice in indices {
            let mut meta = Sample::new();
            meta.set_spacing(&self.spacing[slice as usize]);
            batch.metas.push(meta.meta);
        }
        let seeds: Vec<u64> = indices
            .iter()
            .map(|&slice| derive_seed(epoch_seed, slice as u64))
            .collect();
        let (batch, _) = augment
            .apply_batch(Phase::Training, batch, &seeds)
            .with_context(|| {
                let mut volumes: Vec<&str> = indices
                    .iter()
                    .map(|&slice| self.volumes[self.volume_of_slice[slice as usize]].as_str())
                    .collect();
                volumes.dedup();
                format!("augmenting a batch of slices of {}", volumes.join(", "))
            })?;
        let images = batch.get("image")?;
        let labels = batch.get("label")?;
        let expected = self.images.size();
        if images.size()[1..] != expected[1..] || labels.size()[1..] != expected[1..] {
            bail!(
                "the augmentation pipeline changed slice shapes ({:?} vs {:?}); spatial augmentations must keep the shape",
                &expected[1..],
                &images.size()[1..]
            );
        }
        Ok((
            images.to_device(device),
            labels.ge(0.5).to_kind(Kind::Float).to_device(device),
        ))
    }

    /// One batch on `device`.
    pub fn batch(&self, indices: &[i64], device: Device) -> (Tensor, Tensor) {
        let index = Tensor::from_slice(indices);
        (
            self.images.index_select(0, &index).to_device(device),
            self.labels.index_select(0, &index).to_device(device),
        )
    }
}
