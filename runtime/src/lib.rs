//! The ivado host runtime: plugin loading, data, training, inference, and the Rhai scripting surface.
//! `docs/architecture.md` is the code map.
pub mod allocator;
pub mod bench;
pub mod bench_augment;
pub mod bench_loader;
pub mod bench_segment;
pub mod bids;
pub mod cache;
pub mod cascade;
pub mod channels;
pub mod data;
pub mod device;
pub mod evaluate;
pub mod infer;
pub mod loader;
pub mod losses;
pub mod metrics;
pub mod microscopy;
pub mod model_folder;
pub mod optim;
pub mod phantom;
pub mod pipeline;
pub mod plugin;
pub mod precision;
pub mod preview;
pub mod report;
pub mod sampling;
pub mod scaffold;
pub mod schedule;
pub mod scratch;
pub mod script;
pub mod script_data;
pub mod script_transform;
pub mod split;
pub mod stats;
pub mod sweep;
pub mod testing;
pub mod tiling;
pub mod torchscript;
pub mod train;
pub mod transfer;
pub mod uncertainty;
pub mod volume;
pub mod watch;

/// The value of a scoped thread; a panic there carries on in the caller.
pub(crate) fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
