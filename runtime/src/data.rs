//! From an indexed BIDS dataset to batches: subject-level splits, image/label pairs checked against each
//! other, and 2D axial slices run through the preprocessing pipeline.
use crate::bids::BidsEntry;
use crate::pipeline::{derive_seed, Phase, Pipeline};
use crate::volume::{read_volume, Volume};
use anyhow::{bail, Context, Result};
use ivado_sdk::Sample;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// Train / validation / test entries, split by participant so no subject leaks across sets.
#[derive(Clone, Debug, Default)]
pub struct Split {
    pub train: Vec<BidsEntry>,
    pub valid: Vec<BidsEntry>,
    pub test: Vec<BidsEntry>,
}

/// Splits entries by subject. Subjects are sorted, then shuffled with `seed`, so the split depends only on the
/// seed and the set of subjects. Each non-zero fraction gets at least one subject when there are enough.
pub fn split_by_subject(
    entries: &[BidsEntry],
    valid_fraction: f64,
    test_fraction: f64,
    seed: u64,
) -> Result<Split> {
    if !(0.0..1.0).contains(&valid_fraction)
        || !(0.0..1.0).contains(&test_fraction)
        || valid_fraction + test_fraction >= 1.0
    {
        bail!("split fractions must be in [0, 1) and leave room for training: valid {valid_fraction} + test {test_fraction}");
    }
    let mut subjects: Vec<String> = entries.iter().map(|e| e.subject.clone()).collect();
    subjects.sort();
    subjects.dedup();
    let count = subjects.len();
    subjects.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let portion = |fraction: f64| {
        if fraction > 0.0 {
            ((count as f64 * fraction).round() as usize).max(1)
        } else {
            0
        }
    };
    let n_test = portion(test_fraction);
    let n_valid = portion(valid_fraction);
    if n_test + n_valid >= count {
        bail!(
            "cannot split {count} subject(s) into train/valid/test with fractions {:.2}/{valid_fraction:.2}/{test_fraction:.2}: \
             no subject would be left for training",
            1.0 - valid_fraction - test_fraction
        );
    }
    let test_subjects = &subjects[..n_test];
    let valid_subjects = &subjects[n_test..n_test + n_valid];
    let mut split = Split::default();
    for entry in entries {
        let set = if test_subjects.contains(&entry.subject) {
            &mut split.test
        } else if valid_subjects.contains(&entry.subject) {
            &mut split.valid
        } else {
            &mut split.train
        };
        set.push(entry.clone());
    }
    Ok(split)
}

/// Largest affine difference (mm) tolerated between an image and its label.
const AFFINE_TOLERANCE_MM: f64 = 1e-3;

/// Reads an image and its label, and checks they describe the same voxels.
pub fn load_pair(entry: &BidsEntry) -> Result<(Volume, Volume)> {
    let label_path = entry
        .label
        .as_ref()
        .with_context(|| format!("{}: no label found for this image", entry.image.display()))?;
    let image = read_volume(&entry.image)?;
    let label = read_volume(label_path)?;
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
    if worst > AFFINE_TOLERANCE_MM {
        bail!(
            "image {} and its label {} have different affines (largest difference {worst:.4} mm): they do not overlay",
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
        let mut images = Vec::with_capacity(indices.len());
        let mut labels = Vec::with_capacity(indices.len());
        for &index in indices {
            let mut sample = Sample::new();
            sample.insert("image", self.images.get(index));
            sample.insert("label", self.labels.get(index));
            sample.set_spacing(&self.spacing[index as usize]);
            let (sample, _) = augment
                .apply(sample, derive_seed(epoch_seed, index as u64))
                .with_context(|| {
                    format!(
                        "augmenting a slice of {}",
                        self.volumes[self.volume_of_slice[index as usize]]
                    )
                })?;
            images.push(sample.get("image")?.shallow_clone());
            labels.push(sample.get("label")?.ge(0.5).to_kind(Kind::Float));
        }
        let first = images[0].size();
        if let Some(other) = images.iter().find(|t| t.size() != first) {
            bail!(
                "the augmentation pipeline changed slice shapes ({first:?} vs {:?}); spatial augmentations must keep the shape",
                other.size()
            );
        }
        Ok((
            Tensor::stack(&images, 0).to_device(device),
            Tensor::stack(&labels, 0).to_device(device),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn entry(subject: &str, contrast: &str) -> BidsEntry {
        BidsEntry {
            subject: subject.into(),
            session: None,
            contrast: contrast.into(),
            image: PathBuf::from(format!("{subject}_{contrast}.nii.gz")),
            label: None,
            sidecar: None,
        }
    }

    #[test]
    fn split_keeps_subjects_together_and_is_reproducible() {
        let entries: Vec<BidsEntry> = (0..10)
            .flat_map(|s| ["T1w", "T2w"].map(|c| entry(&format!("sub-{s:02}"), c)))
            .collect();
        let split = split_by_subject(&entries, 0.2, 0.2, 7).unwrap();
        assert_eq!(
            (split.train.len(), split.valid.len(), split.test.len()),
            (12, 4, 4)
        );
        let subjects = |set: &[BidsEntry]| {
            set.iter()
                .map(|e| e.subject.clone())
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert!(subjects(&split.train).is_disjoint(&subjects(&split.test)));
        assert!(subjects(&split.train).is_disjoint(&subjects(&split.valid)));
        let again = split_by_subject(&entries, 0.2, 0.2, 7).unwrap();
        assert_eq!(subjects(&again.test), subjects(&split.test));
        let other =
            (0..20).map(|seed| subjects(&split_by_subject(&entries, 0.2, 0.2, seed).unwrap().test));
        assert!(
            other.collect::<std::collections::BTreeSet<_>>().len() > 1,
            "the seed changes nothing"
        );
    }

    #[test]
    fn split_refuses_fractions_that_leave_no_training_subject() {
        let entries = vec![entry("sub-01", "T1w"), entry("sub-02", "T1w")];
        let error = split_by_subject(&entries, 0.5, 0.5, 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("leave room for training"), "{error}");
        let error = split_by_subject(&entries, 0.3, 0.3, 0)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("no subject would be left for training"),
            "{error}"
        );
    }
}
