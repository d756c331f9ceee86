//! The ivado plugin contract.
//!
//! Two layers:
//! - [`abi`]: what actually crosses the boundary between the host and a plugin library. It is a versioned
//!   `repr(C)` table of `extern "C"` functions, raw libtorch tensor handles and UTF-8 JSON. No Rust type with
//!   an unstable layout crosses it, so a plugin keeps working across rustc and crate upgrades as long as the
//!   ABI version and the libtorch build match.
//! - The authoring layer ([`Architecture`], [`Transform`], [`Config`], [`Sample`], [`export_plugin!`]): safe
//!   Rust on top of the ABI. A plugin author implements one trait per component and calls the export macro
//!   once; they never write `unsafe`. Every entry point the macro exports catches panics inside the plugin and
//!   returns them as error messages, because a panic cannot unwind across two Rust images.
//!
//! The host side (loading, checking the ABI record, calling the table) lives in `ivado-runtime`; the ABI
//! types here are shared by both.

pub mod abi;
mod batch;
pub mod components;
mod config;
mod error;
#[doc(hidden)]
pub mod export;
pub mod log;
pub mod ops;
mod sample;
pub mod testing;

pub use batch::{apply_as_batch, apply_each, check_seeds, Batch};
pub use config::Config;
pub use error::{PluginError, Result};
pub use sample::Sample;
pub use serde_json;
pub use tch;

/// A network architecture. The host owns training: it receives the parameters this architecture registers
/// in its [`tch::nn::Path`], and runs its optimizer and checkpointing on them.
pub trait Architecture: Send + 'static {
    /// Name the host and scripts use to ask for this architecture, e.g. `"unet2d"`.
    const NAME: &'static str;
    /// One line saying what it is.
    const SUMMARY: &'static str;
    /// Whether a trace of `forward` (TorchScript export) records it faithfully. Set it to false when forward
    /// branches on input values, e.g. on which modalities a sample has: a trace would bake in one branch.
    const TRACEABLE: bool = true;

    /// Every config key with its default value. Shown by `ivado plugins` and merged under a user's config.
    fn defaults() -> serde_json::Value;

    /// Builds the network, registering its parameters under `root`. Read every option through `config`; keys
    /// left unread are reported to the user as unknown.
    fn build(config: &mut Config, root: tch::nn::Path) -> Result<Self>
    where
        Self: Sized;

    /// Runs the network. `inputs[0]` is the image batch; further inputs (e.g. FiLM metadata, HeMIS
    /// modality masks) are architecture specific. `mode` says whether dropout is on and which batch-norm
    /// statistics to use.
    fn forward(&self, inputs: &[tch::Tensor], mode: Mode) -> Result<tch::Tensor>;
}

/// How a forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Inference: dropout off, batch-norm uses its running statistics.
    Eval = 0,
    /// Training: dropout on, batch-norm normalises with (and updates) batch statistics.
    Train = 1,
    /// Monte-Carlo dropout for epistemic uncertainty: dropout on, everything else as in `Eval`.
    McDropout = 2,
}

impl Mode {
    /// Whether dropout layers drop.
    pub fn dropout(self) -> bool {
        matches!(self, Mode::Train | Mode::McDropout)
    }

    /// Whether normalisation layers use batch statistics (and update running ones).
    pub fn batch_statistics(self) -> bool {
        self == Mode::Train
    }

    /// The ABI encoding.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Mode::Eval),
            1 => Some(Mode::Train),
            2 => Some(Mode::McDropout),
            _ => None,
        }
    }
}

/// A pre- or post-processing step over one [`Sample`]. Spatial transforms record what they did so the host
/// can undo them on predictions; intensity transforms return `Value::Null` and undo as a no-op.
/// Transforms are called through `&self` and may run on several loader threads at once, hence `Sync`.
pub trait Transform: Send + Sync + 'static {
    const NAME: &'static str;
    const SUMMARY: &'static str;

    fn defaults() -> serde_json::Value;

    fn build(config: &mut Config) -> Result<Self>
    where
        Self: Sized;

    /// Applies the transform in place. Random transforms draw only from `seed`, so the same seed gives the same
    /// result on every machine and thread count. Returns the undo record.
    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<serde_json::Value>;

    /// Applies the transform to every sample of `batch` (tensors `[B, ...]`), sample `i` drawing only from
    /// `seeds[i]`, so a sample's result does not depend on the batch it is in. Returns one undo record per sample.
    ///
    /// The default calls [`Transform::apply`] on each sample and stacks the results again. Override it to
    /// process the batch at once (one libtorch op per batch instead of per sample); [`apply_as_batch`] then
    /// gives `apply` from it.
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<serde_json::Value>> {
        apply_each(self, batch, seeds)
    }

    /// Reverts what [`Transform::apply`] did, given its record.
    fn undo(&self, sample: &mut Sample, record: &serde_json::Value) -> Result<()>;
}
