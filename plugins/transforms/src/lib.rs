//! ivadomed's deterministic pre-processing transforms as an ivado transform plugin: [`CenterCrop`],
//! [`NormalizeInstance`] and [`Resample`].
//!
//! Every transform works on 2D samples (`image` `[C, H, W]`) and 3D samples (`image` `[C, D, H, W]`). The
//! spatial rank comes from the config (`size` / `spacing` has 2 or 3 entries) and must match the sample. Other
//! tensors (`label`, `roi`, `prediction`, ...) may carry any number of leading (channel) axes, but their trailing
//! spatial axes must have the same shape as every other tensor of the sample: a spatial transform applies the same
//! geometric operation to all of them. Each `apply` returns an undo record that lets `undo` restore the original
//! shape and geometry, e.g. of a prediction made on the transformed sample.
//!
//! None of them is random: the seed is ignored.

mod crop;
mod geometry;
mod normalize;
mod resample;

pub use crop::CenterCrop;
pub use normalize::NormalizeInstance;
pub use resample::Resample;

ivado_sdk::export_plugin! {
    name: "transforms",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [],
    transforms: [CenterCrop, NormalizeInstance, Resample],
}
