//! ivadomed's `Encoder`/`Decoder` pair and the architectures built from one of each: `Unet` (2D and 3D) and
//! `FiLMedUnet`.
//!
//! ivadomed's `ModuleList`s interleave the conv blocks with FiLM slots (`None` when off) and max-pools, which
//! is why encoder blocks sit at `down_path` indices 0, 3, 6, ... with their FiLM layer at 1, 4, 7, ..., and
//! decoder blocks at `up_path` 0, 2, 4, ... with their FiLM layer at 1, 3, 5, ... The names here follow.
use crate::blocks::{BlockSettings, Conv, ConvBlock, Dims, FinalActivation, UnetOptions};
use crate::film::{check_metadata, FilmLayer, FilmSpec};
use ivado_sdk::serde_json::{json, Value};
use ivado_sdk::tch::{nn, Tensor};
use ivado_sdk::{Architecture, Config, Mode, PluginError, Result};

/// Runs an optional FiLM layer.
fn modulate(
    film: &Option<FilmLayer>,
    x: Tensor,
    metadata: Option<&Tensor>,
    shared: &mut Option<Tensor>,
) -> Result<Tensor> {
    match (film, metadata) {
        (None, _) => Ok(x),
        (Some(film), Some(metadata)) => film.forward(&x, metadata, shared),
        (Some(_), None) => Err(PluginError(
            "a FiLM layer was reached without metadata".into(),
        )),
    }
}

/// The contracting path: `depth` conv blocks each followed by a 2x max-pool, doubling the channels from
/// `n_filters` on, then a bottom block that keeps them.
pub(crate) struct Encoder {
    dims: Dims,
    down: Vec<ConvBlock>,
    down_films: Vec<Option<FilmLayer>>,
    bottom: ConvBlock,
    bottom_film: Option<FilmLayer>,
}

impl Encoder {
    pub(crate) fn new(
        path: &nn::Path,
        in_channels: i64,
        depth: usize,
        n_filters: i64,
        settings: &BlockSettings,
        film: Option<&FilmSpec>,
    ) -> Self {
        let down_path = path / "down_path";
        let mut down = Vec::with_capacity(depth);
        let mut down_films = Vec::with_capacity(depth);
        let mut channels_in = in_channels;
        for level in 0..depth {
            let channels = n_filters << level;
            down.push(ConvBlock::new(
                &down_path / (3 * level),
                channels_in,
                channels,
                settings,
            ));
            down_films
                .push(film.and_then(|f| f.layer(level, &down_path / (3 * level + 1), channels)));
            channels_in = channels;
        }
        let bottom = ConvBlock::new(path / "conv_bottom", channels_in, channels_in, settings);
        let bottom_film = film.and_then(|f| f.layer(depth, path / "film_bottom", channels_in));
        Self {
            dims: settings.dims,
            down,
            down_films,
            bottom,
            bottom_film,
        }
    }

    pub(crate) fn in_channels(&self) -> i64 {
        self.down[0].in_channels()
    }

    pub(crate) fn depth(&self) -> usize {
        self.down.len()
    }

    /// The skip features of every level, then the bottom features: `depth + 1` tensors.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        metadata: Option<&Tensor>,
        shared: &mut Option<Tensor>,
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        let mut features = Vec::with_capacity(self.down.len() + 1);
        let mut x = x.shallow_clone();
        for (block, film) in self.down.iter().zip(&self.down_films) {
            let skip = modulate(film, block.forward(&x, mode)?, metadata, shared)?;
            x = self.dims.max_pool(&skip)?;
            features.push(skip);
        }
        let bottom = self.bottom.forward(&x, mode)?;
        features.push(modulate(&self.bottom_film, bottom, metadata, shared)?);
        Ok(features)
    }
}

/// The expanding path: per level, upsample to the skip's size, concatenate the skip, conv block; then a
/// 3x3(x3) convolution to `out_channels` and the final activation.
pub(crate) struct Decoder {
    dims: Dims,
    up: Vec<ConvBlock>,
    up_films: Vec<Option<FilmLayer>>,
    last_conv: Conv,
    last_film: Option<FilmLayer>,
    activation: FinalActivation,
}

impl Decoder {
    /// `skip_multiplier` is 1, or 2 for HeMIS, whose skips and bottom carry a mean and a variance map per
    /// encoder channel.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        path: &nn::Path,
        out_channels: i64,
        depth: usize,
        n_filters: i64,
        skip_multiplier: i64,
        settings: &BlockSettings,
        activation: FinalActivation,
        film: Option<&FilmSpec>,
    ) -> Self {
        let up_path = path / "up_path";
        let mut up = Vec::with_capacity(depth);
        let mut up_films = Vec::with_capacity(depth);
        // What arrives from below: the bottom features at level 0, the previous block's output after.
        let mut upsampled = skip_multiplier * (n_filters << (depth - 1));
        for level in 0..depth {
            let channels = n_filters << (depth - 1 - level);
            up.push(ConvBlock::new(
                &up_path / (2 * level) / "downconv",
                upsampled + skip_multiplier * channels,
                channels,
                settings,
            ));
            up_films.push(
                film.and_then(|f| f.layer(depth + 1 + level, &up_path / (2 * level + 1), channels)),
            );
            upsampled = channels;
        }
        let last_conv = settings
            .dims
            .conv(path / "last_conv", n_filters, out_channels);
        let last_film = film.and_then(|f| f.layer(2 * depth + 1, path / "last_film", out_channels));
        Self {
            dims: settings.dims,
            up,
            up_films,
            last_conv,
            last_film,
            activation,
        }
    }

    pub(crate) fn forward(
        &self,
        features: &[Tensor],
        metadata: Option<&Tensor>,
        shared: &mut Option<Tensor>,
        mode: Mode,
    ) -> Result<Tensor> {
        let depth = self.up.len();
        let mut x = features[depth].shallow_clone();
        for (level, (block, film)) in self.up.iter().zip(&self.up_films).enumerate() {
            let skip = &features[depth - 1 - level];
            let upsampled = self.dims.upsample_to(&x, skip)?;
            let joined = Tensor::f_cat(&[upsampled, skip.shallow_clone()], 1)?;
            x = modulate(film, block.forward(&joined, mode)?, metadata, shared)?;
        }
        let logits = modulate(
            &self.last_film,
            self.last_conv.forward(&x),
            metadata,
            shared,
        )?;
        self.activation.apply(logits)
    }
}

/// One encoder and one decoder: ivadomed's `Unet`, and `FiLMedUnet` when FiLM layers are given.
pub(crate) struct UnetCore {
    dims: Dims,
    encoder: Encoder,
    decoder: Decoder,
}

impl UnetCore {
    fn new(root: &nn::Path, options: &UnetOptions, dims: Dims, film: Option<&FilmSpec>) -> Self {
        let settings = options.block_settings(dims);
        Self {
            dims,
            encoder: Encoder::new(
                &(root / "encoder"),
                options.in_channels,
                options.depth,
                options.n_filters,
                &settings,
                film,
            ),
            decoder: Decoder::new(
                &(root / "decoder"),
                options.out_channels,
                options.depth,
                options.n_filters,
                1,
                &settings,
                options.activation,
                film,
            ),
        }
    }

    /// Checks the image batch `inputs[0]` and returns it.
    fn image<'a>(&self, architecture: &str, inputs: &'a [Tensor]) -> Result<&'a Tensor> {
        let x = inputs.first().ok_or_else(|| {
            PluginError(format!(
                "{architecture} got no input; it needs an image batch"
            ))
        })?;
        self.dims
            .check_batch(architecture, x, self.encoder.in_channels(), "the image")?;
        Ok(x)
    }

    fn forward(&self, x: &Tensor, metadata: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let mut shared = None;
        let features = self.encoder.forward(x, metadata, &mut shared, mode)?;
        self.decoder.forward(&features, metadata, &mut shared, mode)
    }
}

fn unet_defaults(n_filters: i64) -> Value {
    json!({
        "in_channels": 1,
        "out_channels": 1,
        "depth": 3,
        "n_filters": n_filters,
        "dropout_rate": 0.3,
        "bn_momentum": 0.1,
        "final_activation": "sigmoid",
    })
}

/// ivadomed's 2D U-Net (`Unet`, `is_2d=True`).
pub struct Unet2d(UnetCore);

impl Architecture for Unet2d {
    const NAME: &'static str = "unet2d";
    const SUMMARY: &'static str =
        "ivadomed's 2D U-Net: conv-ReLU-BN-dropout blocks, max-pool down, bilinear up";

    fn defaults() -> Value {
        unet_defaults(64)
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let options = UnetOptions::read(Self::NAME, config, true)?;
        Ok(Self(UnetCore::new(&root, &options, Dims::Two, None)))
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        let x = self.0.image(Self::NAME, inputs)?;
        self.0.forward(x, None, mode)
    }
}

/// ivadomed's 3D U-Net (`Unet`, `is_2d=False`): Conv3d, InstanceNorm3d without affine parameters or running
/// statistics, Dropout3d, MaxPool3d, trilinear upsampling. Input [N, C, D, H, W].
pub struct Unet3d(UnetCore);

impl Architecture for Unet3d {
    const NAME: &'static str = "unet3d";
    const SUMMARY: &'static str = "ivadomed's 3D U-Net: conv3d-ReLU-InstanceNorm-dropout blocks, \
         max-pool down, trilinear up";

    fn defaults() -> Value {
        unet_defaults(64)
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let options = UnetOptions::read(Self::NAME, config, true)?;
        Ok(Self(UnetCore::new(&root, &options, Dims::Three, None)))
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        let x = self.0.image(Self::NAME, inputs)?;
        self.0.forward(x, None, mode)
    }
}

/// ivadomed's `FiLMedUnet`: a U-Net whose feature maps are scaled and shifted per channel by an MLP of a
/// metadata vector, at the positions `film_layers` switches on. `inputs[1]` is the metadata, [N, n_metadata].
pub struct FilmedUnet {
    core: UnetCore,
    n_metadata: i64,
}

impl Architecture for FilmedUnet {
    const NAME: &'static str = "film_unet";
    const SUMMARY: &'static str =
        "ivadomed's FiLMedUnet: a U-Net modulated by a metadata vector (second input [N, n_metadata])";

    fn defaults() -> Value {
        let mut defaults = unet_defaults(64);
        // ivadomed's config default turns FiLM on after the second encoder level only; n_metadata is the
        // length of the metadata vector (ivadomed derives it from the encoded metadata).
        defaults["is_2d"] = json!(true);
        defaults["n_metadata"] = json!(1);
        defaults["film_layers"] = json!([0, 1, 0, 0, 0, 0, 0, 0]);
        defaults
    }

    fn build(config: &mut Config, root: nn::Path) -> Result<Self> {
        let options = UnetOptions::read(Self::NAME, config, true)?;
        let dims = if config.bool("is_2d")? {
            Dims::Two
        } else {
            Dims::Three
        };
        let film = FilmSpec::read(Self::NAME, config, options.depth)?;
        Ok(Self {
            core: UnetCore::new(&root, &options, dims, Some(&film)),
            n_metadata: film.n_metadata,
        })
    }

    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        let x = self.core.image(Self::NAME, inputs)?;
        let metadata = check_metadata(Self::NAME, inputs, x.size()[0], self.n_metadata)?;
        self.core.forward(x, Some(&metadata), mode)
    }
}
