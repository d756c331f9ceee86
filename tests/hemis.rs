//! HeMIS on ivadomed's functional-testing data (T1w, T2w, T2star) with one subject lacking its T2star: the
//! training samples keep that subject with a zero channel and a 0 in the availability mask, random drops
//! follow the seed, a tiny hemis_unet trains, and `segment` takes any subset of its contrasts.
use ivado_runtime::bids::{BidsIndex, BidsQuery};
use ivado_runtime::channels::{MissingContrast, ModalityDrops};
use ivado_runtime::data::{SamplingOptions, SliceSet};
use ivado_runtime::pipeline::{Phase, Pipeline};
use ivado_runtime::plugin::{PluginRegistry, SearchPath};
use ivado_sdk::Mode;
use ivado_tests::{run_ivado, shared_data};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const CONTRASTS: [&str; 3] = ["T1w", "T2w", "T2star"];
/// The subject whose T2star (image, sidecar and labels) the copy leaves out.
const LACKING: &str = "sub-unf03";

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{LACKING}_T2star"))
        {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of data_functional_testing without sub-unf03's T2star files (the real data is read-only).
fn dataset_lacking_a_contrast(dir: &Path) -> PathBuf {
    let root = dir.join("bids");
    copy_tree(&shared_data("data_functional_testing"), &root);
    assert!(!root
        .join(format!("{LACKING}/anat/{LACKING}_T2star.nii.gz"))
        .exists());
    root
}

fn hemis_sampling() -> SamplingOptions {
    SamplingOptions {
        multichannel: true,
        contrasts: CONTRASTS.iter().map(|c| c.to_string()).collect(),
        missing_contrast: MissingContrast::ZeroChannel,
        ..SamplingOptions::default()
    }
}

fn rows(tensor: &Tensor) -> Vec<Vec<f32>> {
    let width = tensor.size()[1] as usize;
    Vec::<f32>::try_from(tensor.flatten(0, -1))
        .unwrap()
        .chunks(width)
        .map(<[f32]>::to_vec)
        .collect()
}

#[test]
fn samples_carry_the_real_flags_and_drops_follow_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dataset_lacking_a_contrast(dir.path());
    let contrasts: Vec<String> = CONTRASTS.iter().map(|c| c.to_string()).collect();
    let index = BidsIndex::scan(
        &root,
        &BidsQuery {
            target_suffix: "_seg-manual",
            contrasts: Some(&contrasts),
        },
    )
    .unwrap();
    let set = SliceSet::build_sampled(
        Phase::Training,
        &index.entries,
        &Pipeline::default(),
        0,
        &hemis_sampling(),
    )
    .unwrap();
    // Three subjects, 16 axial slices each (131 x 141 x 16), one sample per subject and slice.
    assert_eq!(set.volumes.len(), 3);
    assert_eq!(set.images.size(), [48, 3, 131, 141]);
    let real = set
        .available
        .as_ref()
        .expect("HeMIS sampling records availability");
    assert_eq!(real.size(), [48, 3]);
    // Expected from the files on disk: only sub-unf03 lacks a contrast, its T2star.
    for (sample, row) in rows(real).iter().enumerate() {
        let volume = &set.volumes[set.volume_of_slice[sample]];
        let lacking = volume.contains(LACKING);
        assert_eq!(
            row,
            &[1.0, 1.0, if lacking { 0.0 } else { 1.0 }],
            "sample {sample} of {volume}"
        );
        if lacking {
            // Its zero channel really is zeros.
            assert_eq!(
                set.images
                    .get(sample as i64)
                    .get(2)
                    .abs()
                    .max()
                    .double_value(&[]),
                0.0
            );
        }
    }

    let drops = ModalityDrops::new(0.5, 0.9).unwrap();
    let indices: Vec<i64> = (0..48).collect();
    let masks = |seed: u64, epoch: usize| {
        rows(
            &drops
                .batch_availability(real, &indices, seed, epoch)
                .unwrap(),
        )
    };
    let first = masks(7, 1);
    assert_eq!(first, masks(7, 1), "same seed and epoch, same masks");
    assert_ne!(first, masks(8, 1), "another seed draws other masks");
    assert_ne!(first, masks(7, 2), "another epoch draws other masks");
    let real_rows = rows(real);
    let mut dropped = 0;
    for (mask, real) in first.iter().zip(&real_rows) {
        // A drop only removes contrasts: a missing one never comes back, and one always stays.
        assert!(
            mask.iter().zip(real).all(|(m, r)| m <= r),
            "{mask:?} vs {real:?}"
        );
        assert!(mask.contains(&1.0), "every contrast dropped: {mask:?}");
        dropped += real.iter().zip(mask).filter(|(r, m)| r > m).count();
    }
    assert!(dropped > 0, "p = 0.5 dropped nothing in 48 samples");
    // A batch's masks depend on the sample indices, not on the batch it is in (any number of workers).
    let split: Vec<Vec<f32>> = [&indices[..20], &indices[20..]]
        .iter()
        .flat_map(|part| {
            let rows_of_part = Tensor::from_slice(part);
            rows(
                &drops
                    .batch_availability(&real.index_select(0, &rows_of_part), part, 7, 1)
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(split, first);

    // The curriculum: epoch e drops with p ** (growth ** (e - 1)), as ivadomed's `p **= growth` per epoch.
    assert_eq!(drops.probability_at(1), 0.5);
    assert!((drops.probability_at(2) - (0.9 * 0.5f64.ln()).exp()).abs() < 1e-12);
    assert!((drops.probability_at(3) - (0.81 * 0.5f64.ln()).exp()).abs() < 1e-12);
    // Over many complete samples, each of 3 contrasts drops with p, except that one comes back when all 3
    // were drawn (probability p^3): 3p - p^3 = 1.375 dropped per sample at p = 0.5.
    let complete = Tensor::ones([4000, 3], (Kind::Float, Device::Cpu));
    let many: Vec<i64> = (0..4000).collect();
    let kept = drops
        .batch_availability(&complete, &many, 11, 1)
        .unwrap()
        .sum(Kind::Float)
        .double_value(&[]);
    let per_sample = (12000.0 - kept) / 4000.0;
    assert!(
        (per_sample - 1.375).abs() < 0.05,
        "{per_sample} dropped per sample"
    );
    assert!(ModalityDrops::new(1.0, 0.9).is_err());
    assert!(ModalityDrops::new(0.2, 0.0).is_err());
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

/// The soft prediction `segment --soft` wrote into `dir`.
fn soft_map(dir: &Path) -> Tensor {
    let soft: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("_soft.nii.gz"))
        .collect();
    assert_eq!(soft.len(), 1, "one soft map expected in {}", dir.display());
    ivado_runtime::volume::read_volume(&soft[0]).unwrap().data
}

fn max_abs_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn a_hemis_unet_trains_with_a_missing_contrast_and_segments_any_subset() {
    let dir = tempfile::tempdir().unwrap();
    let root = dataset_lacking_a_contrast(dir.path());
    let run = dir.path().join("run");
    let body = r#"
let dataset = bids(ARGS[0], #{ target_suffix: "_seg-manual", contrasts: ["T1w", "T2w", "T2star"] });
let train_set = subset(dataset, ["sub-unf01", "sub-unf03"]);
let valid_set = subset(dataset, ["sub-unf02"]);
let result = train(model("hemis_unet", #{ contrasts: ["T1w", "T2w", "T2star"], depth: 2, n_filters: 4 }), #{
    train: train_set,
    valid: valid_set,
    preprocess: [transform("CenterCrop", #{ size: [64, 64] }), transform("NormalizeInstance", #{})],
    epochs: 2,
    batch_size: 8,
    learning_rate: 0.003,
    missing_probability: 0.3,
    missing_probability_growth: 0.9,
    seed: 3,
    num_workers: 2,
    out: ARGS[1],
});
print(`model ${result.model_dir}`);
"#;
    let path = script(dir.path(), "hemis.rhai", body);
    let (ok, stdout, stderr) = run_ivado(
        &[
            "run",
            &path,
            &root.display().to_string(),
            &run.display().to_string(),
        ],
        "info",
    );
    assert!(ok, "{stdout}\n{stderr}");
    // sub-unf03 trains with a zero T2star channel instead of being skipped.
    assert!(
        stderr.contains("sub-unf03: no T2star image, zero channel"),
        "{stderr}"
    );
    // The masks fed to the model, recounted from the drop rule: the 32 training samples are sub-unf01's 16
    // slices (all three contrasts) then sub-unf03's (no T2star), and each sample draws from (seed 3, epoch,
    // its index). The run logs how many present contrasts its batches dropped.
    let drops = ModalityDrops::new(0.3, 0.9).unwrap();
    for epoch in 1..=2usize {
        let expected: f32 = (0..32u64)
            .map(|sample| {
                let real = [1.0, 1.0, if sample < 16 { 1.0 } else { 0.0 }];
                let mask = drops.sample_availability(&real, 3, epoch, sample);
                real.iter().sum::<f32>() - mask.iter().sum::<f32>()
            })
            .sum();
        let prefix = format!(
            "epoch {epoch}: missing_probability {:.4}, ",
            drops.probability_at(epoch)
        );
        let logged = stderr
            .lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest.to_owned()))
            .unwrap_or_else(|| panic!("no `{prefix}` line in {stderr}"));
        assert_eq!(
            logged,
            format!("{expected} contrast channel(s) dropped"),
            "epoch {epoch}"
        );
    }
    // The drop probability of each epoch: 0.3, then 0.3 ** 0.9 = 0.3384.
    assert!(
        stderr.contains("epoch 1: missing_probability 0.3000"),
        "{stderr}"
    );
    assert!(
        stderr.contains("epoch 2: missing_probability 0.3384"),
        "{stderr}"
    );
    let model_dir = PathBuf::from(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("model "))
            .expect("the script prints the model folder"),
    );
    let model = model_dir.display().to_string();

    let anat = root.join("sub-unf02/anat");
    let image = |contrast: &str| {
        anat.join(format!("sub-unf02_{contrast}.nii.gz"))
            .display()
            .to_string()
    };
    let segment = |name: &str, input: &str| {
        let out = dir.path().join(name);
        let out_arg = out.display().to_string();
        let (ok, stdout, stderr) = run_ivado(
            &[
                "segment", "--model", &model, "--soft", "-o", &out_arg, input,
            ],
            "info",
        );
        (ok, stdout, stderr, out)
    };
    let (ok, _, stderr, only_t2w) = segment("only_t2w", &image("T2w"));
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("HeMIS contrasts used: T2w; missing (zero channel): T1w, T2star"),
        "{stderr}"
    );
    let all = format!("{},{},{}", image("T1w"), image("T2w"), image("T2star"));
    let (ok, _, stderr, all_dir) = segment("all", &all);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("HeMIS contrasts used: T1w, T2w, T2star; missing (zero channel): none"),
        "{stderr}"
    );
    // The same images in another order go to the same channels (by their contrast), bit for bit.
    let shuffled = format!("{},{},{}", image("T2star"), image("T1w"), image("T2w"));
    let (ok, _, stderr, shuffled_dir) = segment("shuffled", &shuffled);
    assert!(ok, "{stderr}");
    let (one, every) = (soft_map(&only_t2w), soft_map(&all_dir));
    assert_eq!(max_abs_difference(&every, &soft_map(&shuffled_dir)), 0.0);
    // With T1w and T2star fused in, the prediction moves.
    let moved = max_abs_difference(&one, &every);
    assert!(
        moved > 1e-4,
        "one contrast and all three gave the same map ({moved})"
    );

    // A contrast the model does not know names itself and the model's contrasts.
    let flair = dir.path().join("sub-unf02_FLAIR.nii.gz");
    std::fs::copy(image("T2w"), &flair).unwrap();
    let (ok, _, stderr, _) = segment("flair", &format!("{},{}", image("T2w"), flair.display()));
    assert!(!ok);
    assert!(
        stderr.contains(
            "contrast \"FLAIR\" is not one of the model's contrasts [\"T1w\", \"T2w\", \"T2star\"]"
        ),
        "{stderr}"
    );

    // The Rhai `segment` takes a subset too, and gives the CLI's map.
    let rhai_out = dir.path().join("rhai");
    let rhai = script(
        dir.path(),
        "segment.rhai",
        &format!(
            "let m = load_model({model:?});\nsegment(m, {:?}, #{{ out: {:?}, soft: true }});\n",
            image("T2w"),
            rhai_out.display().to_string()
        ),
    );
    let (ok, stdout, stderr) = run_ivado(&["run", &rhai], "info");
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(max_abs_difference(&one, &soft_map(&rhai_out)), 0.0);

    // What a missing channel holds does not matter: zeros or noise give the same output, while a present
    // channel does change it (so the comparison can fail).
    let registry = PluginRegistry::discover(&SearchPath::standard(&[]));
    let loaded = ivado_runtime::model_folder::load(&model_dir, &registry, Device::Cpu).unwrap();
    tch::manual_seed(5);
    let images = Tensor::randn([2, 3, 48, 48], (Kind::Float, Device::Cpu));
    let mask = Tensor::from_slice(&[1.0f32, 1.0, 0.0, 0.0, 1.0, 0.0]).reshape([2, 3]);
    let forward =
        |x: &Tensor| tch::no_grad(|| loaded.model.forward(&[x, &mask], Mode::Eval)).unwrap();
    let reference = forward(&images);
    let noisy = &images
        + Tensor::randn([2, 3, 48, 48], (Kind::Float, Device::Cpu))
            * 100.0
            * &mask
                .logical_not()
                .to_kind(Kind::Float)
                .reshape([2, 3, 1, 1]);
    assert!(max_abs_difference(&noisy, &images) > 1.0);
    assert_eq!(max_abs_difference(&forward(&noisy), &reference), 0.0);
    let zeroed = &images * mask.reshape([2, 3, 1, 1]);
    assert_eq!(max_abs_difference(&forward(&zeroed), &reference), 0.0);
    let present_changed = &images + mask.reshape([2, 3, 1, 1]) * 2.0;
    assert!(max_abs_difference(&forward(&present_changed), &reference) > 1e-4);
}
