//! The training loader: worker threads build batches ahead of the training loop, at most `prefetch` of them
//! at a time, and hand them over in order.
//!
//! Batch `b` is a function of its index alone (its slice indices come from the epoch's order, and every
//! random draw is seeded by (run seed, epoch, sample)), so which worker builds it and when does not matter:
//! batches are bit-identical with 0, 1 or N workers. Workers claim the next unbuilt index; the consumer
//! takes batches in index order and each take frees one prefetch slot. Index `b` may only be claimed once
//! `b < taken + prefetch`, so the batch the consumer waits for is always claimable and the loop cannot
//! deadlock, whatever the number of workers.
//!
//! Dropping the loader (end of epoch, early stop, an error in the loop) stops the workers: they finish the
//! batch in hand, see the stop flag and exit; the drop joins them.
use crate::cache::LazySamples;
use crate::data::SliceSet;
use crate::pipeline::LivePipeline;
use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Barrier, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use tch::{Device, Tensor};

/// How batches are built: `num_workers` threads (0: in the caller's thread, when it asks for the batch),
/// at most `prefetch` batches built or being built ahead of the consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderOptions {
    /// PyTorch DataLoader's `num_workers`: 0 builds each batch synchronously.
    pub num_workers: usize,
    /// Batches built ahead at most, over all workers (PyTorch's `prefetch_factor` x `num_workers`).
    pub prefetch: usize,
    /// libtorch intra-op threads of each worker. One by default: workers run side by side and beside the
    /// training step, which keeps the caller's thread count; more would oversubscribe the cores.
    pub worker_threads: usize,
}

impl LoaderOptions {
    /// `num_workers` workers with PyTorch's default of 2 batches in flight per worker.
    pub fn new(num_workers: usize) -> Self {
        Self {
            num_workers,
            prefetch: 2 * num_workers.max(1),
            worker_threads: 1,
        }
    }
}

impl Default for LoaderOptions {
    /// Two workers: on a small machine one builds while the other waits for its slot, enough to hide
    /// augmentation behind a training step.
    fn default() -> Self {
        Self::new(2)
    }
}

/// What builds batch `index`; each worker owns one (they need not be `Sync`).
pub type BuildBatch<T> = Box<dyn FnMut(usize) -> Result<T> + Send>;

struct State<T> {
    /// Next index a worker may claim.
    claimed: usize,
    /// Batches the consumer took.
    taken: usize,
    ready: BTreeMap<usize, Result<T>>,
    stopped: bool,
    /// Workers that have not exited yet.
    running: usize,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A worker panic is caught before it can poison the lock; recover anyway rather than hang.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An ordered stream of `batches` batches (see the module documentation).
pub struct Loader<'a, T: Send + 'static> {
    total: usize,
    next: usize,
    prefetch: usize,
    shared: Arc<Shared<T>>,
    workers: Vec<JoinHandle<()>>,
    /// The synchronous path (`num_workers == 0`).
    inline: Option<Box<dyn FnMut(usize) -> Result<T> + 'a>>,
    failed: bool,
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl<'a, T: Send + 'static> Loader<'a, T> {
    /// Builds batches `0..total` with `options.num_workers` workers, each made by `make_worker(w)` in this
    /// thread. With no workers, `make_worker(0)` builds every batch here, on demand.
    pub fn start(
        total: usize,
        options: LoaderOptions,
        mut make_worker: impl FnMut(usize) -> BuildBatch<T> + 'a,
    ) -> Self {
        crate::allocator::for_loading();
        let prefetch = options.prefetch.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                claimed: 0,
                taken: 0,
                ready: BTreeMap::new(),
                stopped: false,
                running: options.num_workers,
            }),
            changed: Condvar::new(),
        });
        let mut loader = Self {
            total,
            next: 0,
            prefetch,
            shared: Arc::clone(&shared),
            workers: Vec::new(),
            inline: None,
            failed: false,
        };
        if options.num_workers == 0 {
            loader.inline = Some(make_worker(0));
            return loader;
        }
        // libtorch's intra-op thread count is per thread once a thread has used it, but `set_num_threads`
        // also changes the default for threads that have not yet: pin ours first, and restore the default
        // once every worker has set its own.
        let caller_threads = tch::get_num_threads();
        let ready = Arc::new(Barrier::new(options.num_workers + 1));
        for worker in 0..options.num_workers {
            let mut build = make_worker(worker);
            let shared = Arc::clone(&shared);
            let ready = Arc::clone(&ready);
            let threads = options.worker_threads.max(1) as i32;
            let handle = std::thread::Builder::new()
                .name(format!("ivado-loader-{worker}"))
                .spawn(move || {
                    tch::set_num_threads(threads);
                    ready.wait();
                    work(&shared, &mut build, total, prefetch);
                    shared.lock().running -= 1;
                    shared.changed.notify_all();
                })
                .expect("spawning a loader thread");
            loader.workers.push(handle);
        }
        ready.wait();
        tch::set_num_threads(caller_threads);
        loader
    }

    /// Batches not yet taken.
    pub fn remaining(&self) -> usize {
        self.total - self.next
    }

    /// The most batches that are ever built ahead of the consumer.
    pub fn prefetch(&self) -> usize {
        self.prefetch
    }

    fn take(&mut self) -> Result<T> {
        let index = self.next;
        if let Some(build) = self.inline.as_mut() {
            return build(index);
        }
        let mut state = self.shared.lock();
        loop {
            if let Some(batch) = state.ready.remove(&index) {
                state.taken += 1;
                drop(state);
                self.shared.changed.notify_all();
                return batch;
            }
            if state.running == 0 {
                return Err(anyhow!(
                    "the loader's workers exited before building batch {index}"
                ));
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn stop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
        let joined = !self.workers.is_empty();
        for handle in self.workers.drain(..) {
            // Worker panics are caught inside; a join error would only repeat one.
            let _ = handle.join();
        }
        if joined {
            crate::allocator::release_free_memory();
        }
    }
}

/// A worker's loop: claim the next index when the prefetch window allows, build it, publish it.
fn work<T>(shared: &Shared<T>, build: &mut BuildBatch<T>, total: usize, prefetch: usize) {
    loop {
        let index = {
            let mut state = shared.lock();
            loop {
                if state.stopped || state.claimed >= total {
                    return;
                }
                if state.claimed < state.taken + prefetch {
                    break;
                }
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.claimed += 1;
            state.claimed - 1
        };
        let batch = catch_unwind(AssertUnwindSafe(|| build(index))).unwrap_or_else(|panic| {
            Err(anyhow!(
                "a loader worker panicked building batch {index}: {}",
                panic_text(&panic)
            ))
        });
        let failed = batch.is_err();
        {
            let mut state = shared.lock();
            state.ready.insert(index, batch);
            // Later batches are not needed once one fails: the consumer stops at the error.
            state.stopped |= failed;
        }
        shared.changed.notify_all();
    }
}

impl<T: Send + 'static> Iterator for Loader<'_, T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.failed || self.next >= self.total {
            return None;
        }
        let batch = self.take();
        self.next += 1;
        if batch.is_err() {
            self.failed = true;
            self.stop();
        }
        Some(batch)
    }
}

impl<T: Send + 'static> Drop for Loader<'_, T> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Moves a CPU batch to `device`: through pinned memory with a non-blocking copy on CUDA, so the copy of
/// the next batch overlaps the current step.
pub fn to_device(tensor: Tensor, device: Device) -> Result<Tensor> {
    match device {
        Device::Cpu => Ok(tensor),
        Device::Cuda(_) => {
            Ok(tensor
                .f_pin_memory(device)?
                .f_to_device_(device, tensor.kind(), true, false)?)
        }
        other => Ok(tensor.f_to_device(other)?),
    }
}

/// The training batches of one epoch of `set`: `batches[b]` holds slice indices, augmented with the
/// `augment` pipeline current when the batch starts (seeded by `seed`, `epoch` and slice index), stacked
/// and moved to `device`.
pub fn slice_batches<'a>(
    set: &'a SliceSet,
    augment: Option<&'a LivePipeline>,
    batches: Vec<Vec<i64>>,
    seed: u64,
    epoch: u64,
    device: Device,
    options: LoaderOptions,
) -> Loader<'a, (Tensor, Tensor)> {
    let batches = Arc::new(batches);
    let total = batches.len();
    Loader::start(total, options, move |_| {
        // Each worker its own handles on the set's tensors (tensors are `Send`, not `Sync`).
        let set = set.share();
        let augment = augment.cloned();
        let batches = Arc::clone(&batches);
        Box::new(move |index| {
            let indices = &batches[index];
            let (images, labels) = match &augment {
                Some(live) => {
                    set.augmented_batch(indices, &live.current(), seed, epoch, Device::Cpu)?
                }
                None => set.batch(indices, Device::Cpu),
            };
            Ok((to_device(images, device)?, to_device(labels, device)?))
        })
    })
}

/// The batches of one epoch of a lazily read set ([`crate::cache::CachedSlices`],
/// [`crate::cache::CachedWindows`]): each worker reads its samples through the caches, then augments them
/// with [`SliceSet::augmented_batch_as`]. Sample `i` draws as sample `i` of the in-memory set does (seeded
/// by `seed`, `epoch` and its index), so the batches equal [`slice_batches`]' over the same samples.
pub fn cached_batches<S: LazySamples + ?Sized + 'static>(
    set: Arc<S>,
    augment: Option<LivePipeline>,
    batches: Vec<Vec<i64>>,
    seed: u64,
    epoch: u64,
    device: Device,
    options: LoaderOptions,
) -> Loader<'static, (Tensor, Tensor)> {
    let batches = Arc::new(batches);
    Loader::start(batches.len(), options, move |_| {
        let set = Arc::clone(&set);
        let augment = augment.clone();
        let batches = Arc::clone(&batches);
        Box::new(move |index| {
            let indices = &batches[index];
            let samples = set.batch_set(indices)?;
            let local: Vec<i64> = (0..samples.len() as i64).collect();
            let (images, labels) = match &augment {
                Some(live) => samples.augmented_batch_as(
                    &local,
                    indices,
                    &live.current(),
                    seed,
                    epoch,
                    Device::Cpu,
                )?,
                None => (samples.images, samples.labels),
            };
            Ok((to_device(images, device)?, to_device(labels, device)?))
        })
    })
}
