//! The ivado host runtime: plugin loading, data, training, inference, and the Rhai scripting surface.
//! `docs/architecture.md` is the code map.
pub mod bench;
pub mod bids;
pub mod data;
pub mod device;
pub mod infer;
pub mod losses;
pub mod metrics;
pub mod model_folder;
pub mod optim;
pub mod phantom;
pub mod pipeline;
pub mod plugin;
pub mod precision;
pub mod report;
pub mod scaffold;
pub mod schedule;
pub mod script;
pub mod script_transform;
pub mod stats;
pub mod sweep;
pub mod torchscript;
pub mod train;
pub mod transfer;
pub mod uncertainty;
pub mod volume;
pub mod watch;
