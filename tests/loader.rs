//! The training loader and the volume caches: batches identical whatever the number of workers, the prefetch
//! bound, errors that name their file without hanging, the memory budget and LRU order, and the disk cache
//! across processes.
use anyhow::{bail, Result};
use ivado_runtime::bids::{BidsEntry, BidsIndex, BidsOptions, BidsQuery};
use ivado_runtime::cache::{CacheOptions, CachedSlices, CachedWindows, MemoryCache, Weighed};
use ivado_runtime::data::{SamplingOptions, SliceSet};
use ivado_runtime::loader::{cached_batches, slice_batches, BuildBatch, Loader, LoaderOptions};
use ivado_runtime::phantom::{self, PhantomSpec};
use ivado_runtime::pipeline::{LivePipeline, Phase, Pipeline, Step};
use ivado_runtime::plugin::{PluginRegistry, SearchPath};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};

use ivado_tests::shared_data;

fn registry() -> PluginRegistry {
    PluginRegistry::discover(&SearchPath::standard(&[]))
}

fn pipeline(registry: &PluginRegistry, steps: &[(&str, Value)]) -> Pipeline {
    Pipeline {
        steps: steps
            .iter()
            .map(|(name, config)| Step::from(Arc::new(registry.transform(name, config).unwrap())))
            .collect(),
    }
}

/// `subjects` T2w phantoms of 40x40x12 voxels (1x1x2 mm) with their cord labels.
fn phantom_entries(root: &Path, subjects: usize) -> Vec<BidsEntry> {
    phantom::generate(
        root,
        &PhantomSpec {
            subjects,
            shape: [40, 40, 12],
            contrasts: vec!["T2w".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let query = BidsQuery {
        target_suffix: "_seg-manual",
        contrasts: None,
    };
    BidsIndex::scan(root, &query).unwrap().entries
}

fn augmentation(registry: &PluginRegistry) -> LivePipeline {
    LivePipeline::new(pipeline(
        registry,
        &[
            (
                "RandomAffine",
                json!({"degrees": 10.0, "translate": [0.1, 0.1], "scale": [0.1, 0.1]}),
            ),
            (
                "ElasticTransform",
                json!({"alpha_range": [28.0, 30.0], "sigma_range": [3.5, 4.5], "p": 1.0}),
            ),
            ("AdditiveGaussianNoise", json!({"std": 0.05})),
        ],
    ))
}

fn same(a: &(Tensor, Tensor), b: &(Tensor, Tensor)) -> bool {
    a.0.size() == b.0.size() && a.0.equal(&b.0) && a.1.equal(&b.1)
}

/// Runs `body` on its own thread and fails the test if it has not returned after `seconds` (a hang).
fn within<T: Send + 'static>(seconds: u64, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || send.send(body()).ok());
    receive
        .recv_timeout(Duration::from_secs(seconds))
        .expect("the loader hung")
}

#[test]
fn batches_are_bit_identical_with_one_or_four_workers_and_synchronously() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let entries = phantom_entries(dir.path(), 2);
    let preprocess = pipeline(
        &registry,
        &[
            ("CenterCrop", json!({"size": [32, 32]})),
            ("NormalizeInstance", json!({})),
        ],
    );
    let set = SliceSet::build(&entries, &preprocess, 3).unwrap();
    let augment = augmentation(&registry);
    let chunks: Vec<Vec<i64>> = set
        .shuffled(11)
        .chunks(4)
        .take(3)
        .map(<[i64]>::to_vec)
        .collect();
    // The reference is the synchronous path the trainer took before the loader: one call per batch here.
    let (seed, epoch) = (7, 2);
    let reference: Vec<(Tensor, Tensor)> = chunks
        .iter()
        .map(|chunk| {
            set.augmented_batch(chunk, &augment.current(), seed, epoch, Device::Cpu)
                .unwrap()
        })
        .collect();
    // Not vacuous: augmentation changed the slices, and another epoch draws differently.
    assert!(!same(&reference[0], &set.batch(&chunks[0], Device::Cpu)));
    let other_epoch = set
        .augmented_batch(&chunks[0], &augment.current(), seed, epoch + 1, Device::Cpu)
        .unwrap();
    assert!(!same(&reference[0], &other_epoch));
    for workers in [0, 1, 4] {
        let batches: Vec<(Tensor, Tensor)> = slice_batches(
            &set,
            Some(&augment),
            chunks.clone(),
            seed,
            epoch,
            Device::Cpu,
            LoaderOptions::new(workers),
        )
        .collect::<Result<_>>()
        .unwrap();
        assert_eq!(batches.len(), 3);
        for (index, (got, expected)) in batches.iter().zip(&reference).enumerate() {
            assert!(
                same(got, expected),
                "batch {index} differs with {workers} worker(s)"
            );
        }
    }
}

#[test]
fn at_most_prefetch_batches_are_ever_built_ahead() {
    let started = Arc::new(AtomicUsize::new(0));
    let options = LoaderOptions {
        num_workers: 4,
        prefetch: 3,
        worker_threads: 1,
    };
    let counter = Arc::clone(&started);
    let mut loader = Loader::start(20, options, move |_| -> BuildBatch<usize> {
        let counter = Arc::clone(&counter);
        Box::new(move |index| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(index)
        })
    });
    let mut most_ahead = 0;
    for taken in 0..20 {
        // Give the workers ample time to run as far ahead as they are allowed.
        std::thread::sleep(Duration::from_millis(15));
        most_ahead = most_ahead.max(started.load(Ordering::SeqCst) - taken);
        assert_eq!(loader.next().unwrap().unwrap(), taken, "out of order");
    }
    assert!(loader.next().is_none());
    // Four workers would build everything at once without the bound; with it, exactly 3 run ahead.
    assert_eq!(most_ahead, 3);
}

fn counting(started: &Arc<AtomicUsize>) -> impl FnMut(usize) -> BuildBatch<usize> {
    let started = Arc::clone(started);
    move |_| -> BuildBatch<usize> {
        let started = Arc::clone(&started);
        Box::new(move |index| {
            started.fetch_add(1, Ordering::SeqCst);
            Ok(index * 10)
        })
    }
}

#[test]
fn batches_come_in_order_and_once_whatever_the_worker_count() {
    for workers in [0, 1, 3] {
        let started = Arc::new(AtomicUsize::new(0));
        let options = LoaderOptions {
            num_workers: workers,
            prefetch: 4,
            worker_threads: 1,
        };
        let out: Vec<usize> = Loader::start(25, options, counting(&started))
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(out, (0..25).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(started.load(Ordering::SeqCst), 25, "{workers} workers");
    }
}

#[test]
fn dropping_a_loader_midway_stops_its_workers_without_hanging() {
    let started = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&started);
    let built = within(30, move || {
        let options = LoaderOptions {
            num_workers: 2,
            prefetch: 3,
            worker_threads: 1,
        };
        let mut loader = Loader::start(1000, options, counting(&counter));
        assert_eq!(loader.next().unwrap().unwrap(), 0);
        // An early stop: the drop joins the workers, so it returns only once they have exited.
        drop(loader);
        counter.load(Ordering::SeqCst)
    });
    // One taken plus at most `prefetch` ahead, and nothing more once the drop returned.
    assert!(built <= 4, "{built} batches built");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(started.load(Ordering::SeqCst), built);
}

#[test]
fn a_failing_batch_surfaces_its_error_and_the_loader_stops() {
    let (message, later, built) = within(30, || {
        let built = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&built);
        let options = LoaderOptions {
            num_workers: 3,
            prefetch: 4,
            worker_threads: 1,
        };
        let mut loader = Loader::start(1000, options, move |_| -> BuildBatch<usize> {
            let counter = Arc::clone(&counter);
            Box::new(move |index| {
                counter.fetch_add(1, Ordering::SeqCst);
                if index == 5 {
                    bail!("failed to read NIfTI file sub-07_T2w.nii.gz: gzip stream is corrupt");
                }
                Ok(index)
            })
        });
        let mut message = String::new();
        for batch in loader.by_ref() {
            if let Err(error) = batch {
                message = format!("{error:#}");
            }
        }
        let later = loader.next().is_none();
        (message, later, built.load(Ordering::SeqCst))
    });
    assert!(message.contains("sub-07_T2w.nii.gz"), "{message}");
    assert!(later, "the loader goes on after an error");
    assert!(built <= 5 + 1 + 4, "{built} batches built after the error");
}

#[test]
fn a_corrupt_volume_is_named_by_the_cached_loader_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let entries = phantom_entries(dir.path(), 3);
    let broken = entries[1].image.clone();
    // Keep the header (the index reads it) but cut the gzip stream short.
    let bytes = std::fs::read(&broken).unwrap();
    std::fs::write(&broken, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let message = within(60, move || {
        let registry = registry();
        let set = Arc::new(
            CachedSlices::new(
                entries,
                Pipeline::default(),
                pipeline(&registry, &[("CenterCrop", json!({"size": [32, 32]}))]),
                Phase::Training,
                &CacheOptions {
                    memory_budget: usize::MAX,
                    disk: None,
                },
            )
            .unwrap(),
        );
        let order: Vec<i64> = (0..set.len() as i64).collect();
        let batches = order.chunks(5).map(<[i64]>::to_vec).collect();
        let loader = cached_batches(set, None, batches, 1, 1, Device::Cpu, LoaderOptions::new(2));
        let errors: Vec<String> = loader
            .filter_map(|batch| batch.err().map(|e| format!("{e:#}")))
            .collect();
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].clone()
    });
    let name = broken.file_name().unwrap().to_string_lossy().into_owned();
    assert!(message.contains(&name), "{message}");
}

struct Blob(usize);

impl Weighed for Blob {
    fn bytes(&self) -> usize {
        self.0
    }
}

#[test]
fn the_memory_cache_evicts_least_recently_used_first() {
    let cache = MemoryCache::new(100);
    for key in ["a", "b", "c"] {
        cache.get_or_load(key, || Ok(Blob(30))).unwrap();
    }
    cache.get_or_load("a", || panic!("`a` is cached")).unwrap();
    // `b` is now the least recently used: it goes first.
    cache.get_or_load("d", || Ok(Blob(30))).unwrap();
    assert_eq!(cache.keys_by_age(), ["c", "a", "d"]);
    // 60 bytes need two evictions, in age order: `c`, then `a`.
    cache.get_or_load("e", || Ok(Blob(60))).unwrap();
    assert_eq!(cache.keys_by_age(), ["d", "e"]);
    assert_eq!(cache.held(), 90);
    // Larger than the budget: handed over, not kept, nothing evicted for it.
    assert_eq!(cache.get_or_load("f", || Ok(Blob(101))).unwrap().0, 101);
    assert_eq!(cache.keys_by_age(), ["d", "e"]);
    let stats = cache.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.evictions, stats.too_large),
        (1, 6, 3, 1)
    );
}

fn cached_set(
    registry: &PluginRegistry,
    entries: Vec<BidsEntry>,
    cache: CacheOptions,
) -> CachedSlices {
    CachedSlices::new(
        entries,
        pipeline(registry, &[("Resample", json!({"spacing": [1.0, 1.0]}))]),
        pipeline(
            registry,
            &[
                ("CenterCrop", json!({"size": [32, 32]})),
                ("NormalizeInstance", json!({})),
            ],
        ),
        Phase::Training,
        &cache,
    )
    .unwrap()
}

#[test]
fn cached_slices_stay_within_the_budget_and_equal_the_in_memory_set() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let entries = phantom_entries(dir.path(), 5);
    // A prepared volume is 12 slices of 40x40: 4 bytes of image and 1 of label per voxel.
    let volume_bytes = 12 * 40 * 40 * 5;
    let budget = 2 * volume_bytes + volume_bytes / 2;
    let set = Arc::new(cached_set(
        &registry,
        entries.clone(),
        CacheOptions {
            memory_budget: budget,
            disk: None,
        },
    ));
    assert_eq!((set.len(), set.volumes()), (60, 5));
    // A fully shuffled order makes the cache churn; check the bytes held after every slice.
    let whole = SliceSet::build(
        &entries,
        &pipeline(
            &registry,
            &[
                ("Resample", json!({"spacing": [1.0, 1.0]})),
                ("CenterCrop", json!({"size": [32, 32]})),
                ("NormalizeInstance", json!({})),
            ],
        ),
        0,
    )
    .unwrap();
    for index in whole.shuffled(3) {
        let (image, label, _) = set.slice(index as usize).unwrap();
        assert!(set.memory().held() <= budget);
        let (expected_image, expected_label) = whole.batch(&[index], Device::Cpu);
        assert!(image.unsqueeze(0).equal(&expected_image), "slice {index}");
        assert!(label.unsqueeze(0).equal(&expected_label), "slice {index}");
    }
    let stats = set.memory().stats();
    assert!(stats.evictions > 0, "{stats:?}");
    assert!(stats.peak_bytes <= budget && stats.peak_bytes >= 2 * volume_bytes);
    // Through four workers at once, the budget holds as well.
    let batches = set
        .window_order(9, 2)
        .chunks(6)
        .map(<[i64]>::to_vec)
        .collect();
    let loader = cached_batches(
        Arc::clone(&set),
        None,
        batches,
        1,
        1,
        Device::Cpu,
        LoaderOptions::new(4),
    );
    assert_eq!(loader.map(Result::unwrap).count(), 10);
    assert!(set.memory().stats().peak_bytes <= budget);
}

/// FNV-1a over the prepared volumes' bytes: what another process must read back identically.
fn fingerprint(set: &CachedSlices) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for volume in 0..set.volumes() {
        let prepared = set.volume(volume).unwrap();
        let bytes = prepared
            .image
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .chain(prepared.label.iter().copied());
        for byte in bytes {
            hash = (hash ^ byte as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    hash
}

fn scan(root: &Path) -> Vec<BidsEntry> {
    let query = BidsQuery {
        target_suffix: "_seg-manual",
        contrasts: None,
    };
    BidsIndex::scan(root, &query).unwrap().entries
}

const CHILD_ENV: &str = "IVADO_LOADER_DISK_CACHE_CHILD";

/// Run by `the_disk_cache_survives_the_process_and_misses_changed_files` in a child process.
#[test]
#[ignore = "run as a child process by the_disk_cache_survives_the_process_and_misses_changed_files"]
fn disk_cache_child() {
    let folders = std::env::var(CHILD_ENV).expect("run by the parent test only");
    let (data, disk) = folders.split_once('\n').unwrap();
    let set = cached_set(
        &registry(),
        scan(Path::new(data)),
        CacheOptions {
            memory_budget: 0,
            disk: Some(disk.into()),
        },
    );
    let hash = fingerprint(&set);
    println!("child: prepared {} fingerprint {hash}", set.prepared());
}

#[test]
fn the_disk_cache_survives_the_process_and_misses_changed_files() {
    let registry = registry();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let disk = dir.path().join("cache");
    let entries = phantom_entries(&data, 3);
    let options = CacheOptions {
        memory_budget: 0,
        disk: Some(disk.clone()),
    };
    let first = cached_set(&registry, entries.clone(), options.clone());
    let hash = fingerprint(&first);
    assert_eq!(first.prepared(), 3);
    // A new process reads all three volumes from the disk cache and gets the same bytes.
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["disk_cache_child", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, format!("{}\n{}", data.display(), disk.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("child: prepared 0 fingerprint {hash}")),
        "{stdout}"
    );
    // A newer mtime on one image: that volume alone is prepared again.
    let touched = std::fs::File::options()
        .write(true)
        .open(&entries[0].image)
        .unwrap();
    touched
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let second = cached_set(&registry, entries.clone(), options.clone());
    assert_eq!(fingerprint(&second), hash, "same content, same volumes");
    assert_eq!(second.prepared(), 1);
    // Another image's content (a different size) under the old mtime: detected by the size.
    let target = &entries[1].image;
    let before = std::fs::metadata(target).unwrap();
    std::fs::copy(&entries[2].image, target).unwrap();
    assert_ne!(std::fs::metadata(target).unwrap().len(), before.len());
    let modified = before.modified().unwrap();
    std::fs::File::options()
        .write(true)
        .open(target)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    let third = cached_set(&registry, entries, options);
    assert_ne!(fingerprint(&third), hash);
    assert_eq!(third.prepared(), 1);
}

/// data_functional_testing's T1w and T2w images with their cord labels (sub-unf02's T1w has none, so it is
/// indexed without it).
fn functional_testing_entries() -> Vec<BidsEntry> {
    let options = BidsOptions::from_json(&json!({
        "contrasts": ["T1w", "T2w"],
        "target_suffix": ["_seg-manual"],
    }))
    .unwrap();
    BidsIndex::build(&[shared_data("data_functional_testing")], &options)
        .unwrap()
        .entries
}

#[test]
fn lazy_windows_equal_the_in_memory_ones_in_every_mode_within_the_budget() {
    let registry = registry();
    let entries = functional_testing_entries();
    assert_eq!(entries.len(), 5, "3 T2w, 2 T1w with a cord label");
    let normalize = pipeline(&registry, &[("NormalizeInstance", json!({}))]);
    // Every volume is 131 x 141 x 16 f32: one channel and one target are 2 such volumes, two channels 3.
    let voxels = 131 * 141 * 16 * 4;
    let affine = augmentation(&registry);
    // (options, groups that yield samples, samples, augment too)
    let modes = [
        // sub-unf02 has no T1w with a label, so the multichannel T1w + T2w group of sub-unf02 is skipped.
        (
            json!({"slice_axis": "sagittal", "multichannel": true, "contrasts": ["T1w", "T2w"], "soft_gt": true}),
            2,
            2 * 131,
            true,
        ),
        // The slice filter needs voxels: the windows come from one pass over the volumes.
        (
            json!({"slice_axis": "coronal", "slice_filter_params": {"filter_empty_mask": true}}),
            5,
            0,
            true,
        ),
        // 2D patches of 48 x 48 every 48 voxels, training-time patch filter.
        (
            json!({"length_2D": [48, 48], "stride_2D": [48, 48], "patch_filter_params": {"filter_empty_mask": true}}),
            5,
            0,
            true,
        ),
        // 3D subvolumes: 4 x 4 x 1 tiles of 48 x 48 x 16 (x at 0, 48, 83; y at 0, 48, 93), 3 x 3 per volume.
        (
            json!({"length_3D": [48, 48, 16], "stride_3D": [48, 48, 16]}),
            5,
            5 * 9,
            false,
        ),
        // Whole volumes, two channels.
        (
            json!({"length_3D": [131, 141, 16], "multichannel": true, "contrasts": ["T2w", "T1w"]}),
            2,
            2,
            false,
        ),
    ];
    for (options, groups, expected_samples, augment) in modes {
        let sampling = SamplingOptions::from_json(&options).unwrap();
        let memory =
            SliceSet::build_windows(Phase::Training, &entries, &normalize, 7, &sampling).unwrap();
        let channels = memory.images.size()[1] as usize;
        let classes = memory.labels.size()[1] as usize;
        let group_bytes = (channels + classes) * voxels;
        // Room for one group and a half: every new group evicts the one before.
        let budget = group_bytes + group_bytes / 2;
        let lazy = Arc::new(
            CachedWindows::new(
                &entries,
                normalize.clone(),
                Phase::Training,
                7,
                &sampling,
                &CacheOptions {
                    memory_budget: budget,
                    disk: None,
                },
            )
            .unwrap(),
        );
        assert_eq!(lazy.len(), memory.len(), "{options}");
        assert_eq!(lazy.volumes(), groups, "{options}");
        if expected_samples > 0 {
            assert_eq!(lazy.len(), expected_samples, "{options}");
        }
        // One sample at a time in an epoch's order, the cache's bytes checked after each.
        for index in lazy.window_order(3, 1) {
            let (image, label, spacing) = lazy.sample(index as usize).unwrap();
            assert!(lazy.memory().held() <= budget, "{options}");
            let (expected_image, expected_label) = memory.batch(&[index], Device::Cpu);
            assert!(
                image.unsqueeze(0).equal(&expected_image),
                "{options}: sample {index}"
            );
            assert!(
                label.unsqueeze(0).equal(&expected_label),
                "{options}: sample {index}"
            );
            assert_eq!(spacing, memory.spacing[index as usize], "{options}");
        }
        let stats = lazy.memory().stats();
        assert!(stats.peak_bytes <= budget, "{options}: {stats:?}");
        if groups > 1 {
            assert!(stats.evictions > 0, "{options}: {stats:?}");
        }
        // The trainer's batches: four workers on the lazy set equal the in-memory set's, augmentation included.
        let chunks: Vec<Vec<i64>> = lazy
            .window_order(5, 2)
            .chunks(4)
            .take(6)
            .map(<[i64]>::to_vec)
            .collect();
        let live = augment.then(|| affine.clone());
        let in_memory: Vec<(Tensor, Tensor)> = slice_batches(
            &memory,
            live.as_ref(),
            chunks.clone(),
            11,
            2,
            Device::Cpu,
            LoaderOptions::new(1),
        )
        .map(Result::unwrap)
        .collect();
        let from_cache: Vec<(Tensor, Tensor)> = cached_batches(
            Arc::clone(&lazy),
            live,
            chunks,
            11,
            2,
            Device::Cpu,
            LoaderOptions::new(4),
        )
        .map(Result::unwrap)
        .collect();
        assert_eq!(in_memory.len(), from_cache.len());
        for (a, b) in in_memory.iter().zip(&from_cache) {
            assert!(same(a, b), "{options}");
        }
        assert!(lazy.memory().stats().peak_bytes <= budget, "{options}");
    }
}

#[test]
fn lazy_windows_read_their_groups_back_from_the_disk_cache() {
    let registry = registry();
    let entries = functional_testing_entries();
    let dir = tempfile::tempdir().unwrap();
    let sampling = SamplingOptions::from_json(&json!({"slice_axis": "coronal"})).unwrap();
    let options = CacheOptions {
        memory_budget: 0,
        disk: Some(dir.path().to_owned()),
    };
    let normalize = pipeline(&registry, &[("NormalizeInstance", json!({}))]);
    let make = || {
        CachedWindows::new(
            &entries,
            normalize.clone(),
            Phase::Training,
            7,
            &sampling,
            &options,
        )
        .unwrap()
    };
    let first = make();
    let second = make();
    // Coronal slices of 5 volumes of 141 voxels along y.
    assert_eq!(first.len(), 5 * 141);
    for index in (0..first.len()).step_by(47) {
        let (image, label, _) = first.sample(index).unwrap();
        let (again, again_label, _) = second.sample(index).unwrap();
        assert!(image.equal(&again) && label.equal(&again_label), "{index}");
    }
    // The first set assembled each group once (nothing is kept in memory: budget 0, so the disk serves
    // every later read); the second found them all on disk.
    assert_eq!(first.prepared(), 5);
    assert_eq!(second.prepared(), 0);
}
