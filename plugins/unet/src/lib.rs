//! ivadomed's U-Net family as ivado architecture plugins: `unet2d` and `unet3d` (`Unet`, `is_2d` true or
//! false), `film_unet` (`FiLMedUnet`) and `hemis_unet` (`HeMISUnet`).
//!
//! The layer layout, the order conv → ReLU → normalisation → channel dropout, and the parameter names mirror
//! ivadomed's `ivadomed/models.py`, so parameter counts equal ivadomed's for the same settings and a PyTorch
//! `state_dict` maps key for key (PyTorch's batch-norm `num_batches_tracked` counters have no counterpart).
//! The blocks are written once, generic over 2D/3D (`blocks`), and the encoder and decoder once for all four
//! architectures (`unet`).
mod blocks;
mod film;
mod hemis;
mod unet;

pub use hemis::HemisUnet;
pub use unet::{FilmedUnet, Unet2d, Unet3d};

ivado_sdk::export_plugin! {
    name: "unet",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [Unet2d, Unet3d, FilmedUnet, HemisUnet],
    transforms: [],
}

#[cfg(test)]
mod tests;
