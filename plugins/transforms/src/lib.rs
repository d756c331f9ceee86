//! ivadomed's pre-processing and data-augmentation transforms as an ivado transform plugin.
//!
//! Deterministic pre-processing: [`CenterCrop`], [`ROICrop`], [`NormalizeInstance`], [`Resample`],
//! [`HistogramClipping`], [`Clahe`], [`DilateGT`]. Random augmentations: [`RandomAffine`], [`ElasticTransform`],
//! [`RandomReverse`], [`RandomShiftIntensity`], [`AdditiveGaussianNoise`], [`RandomGamma`], [`RandomBiasField`],
//! [`RandomBlur`]. Config keys, defaults and draws follow ivadomed; each transform's doc says where it deliberately
//! differs.
//!
//! Every transform works on 2D samples (`image` `[C, H, W]`) and 3D samples (`image` `[C, D, H, W]`). Other
//! tensors (`label`, `roi`, `prediction`, ...) may carry any number of leading (channel) axes, but their trailing
//! spatial axes must have the same shape as every other tensor of the sample: a spatial transform applies the same
//! geometric operation to all of them, and `meta.spacing` (mm per spatial axis) puts it in physical units where that
//! matters. Intensity transforms change only `image`. Each `apply` returns an undo record that lets `undo` restore
//! the original shape and geometry, e.g. of a prediction made on the transformed sample (`null` for intensity
//! transforms, whose undo is a no-op); `ElasticTransform` cannot be undone and says so.
//!
//! Random transforms draw only from the `seed` given to `apply` (a ChaCha8 stream, noise drawn on the host), so a
//! seed gives the same result on every device and thread count. Tensor work runs where the sample's tensors live,
//! CPU or GPU, with libtorch ops; on the CPU, the training augmentations fuse their chains of ops on contiguous
//! float32 tensors into Rust loops (`cpu`, `sampler`) that compute the same values with fewer passes over memory.

mod affine;
#[cfg(test)]
mod batch_tests;
mod clahe;
mod cpu;
mod crop;
mod dilate;
mod elastic;
mod filters;
mod geometry;
mod intensity;
mod normalize;
#[cfg(test)]
mod profile_tests;
mod random;
#[cfg(test)]
mod reference_data;
mod resample;
mod reverse;
mod roi_crop;
mod sampler;
mod warp;

pub use affine::RandomAffine;
pub use clahe::Clahe;
pub use crop::CenterCrop;
pub use dilate::DilateGT;
pub use elastic::ElasticTransform;
pub use intensity::{
    AdditiveGaussianNoise, HistogramClipping, RandomBiasField, RandomBlur, RandomGamma,
    RandomShiftIntensity,
};
pub use normalize::NormalizeInstance;
pub use resample::Resample;
pub use reverse::RandomReverse;
pub use roi_crop::ROICrop;

ivado_sdk::export_plugin! {
    name: "transforms",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [],
    transforms: [
        CenterCrop,
        ROICrop,
        NormalizeInstance,
        Resample,
        HistogramClipping,
        Clahe,
        DilateGT,
        RandomAffine,
        ElasticTransform,
        RandomReverse,
        RandomShiftIntensity,
        AdditiveGaussianNoise,
        RandomGamma,
        RandomBiasField,
        RandomBlur,
    ],
}
