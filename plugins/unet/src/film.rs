//! Feature-wise linear modulation (FiLM, Perez et al. 2018) as ivadomed's `FiLMlayer` and `FiLMgenerator`.
use ivado_sdk::tch::{nn, Tensor};
use ivado_sdk::{Config, PluginError, Result};

/// Hidden width of the generator MLP (ivadomed's `n_hid=64`, not configurable there either).
const GENERATOR_HIDDEN: i64 = 64;

/// Where FiLM layers go and what conditions them.
pub(crate) struct FilmSpec {
    pub(crate) n_metadata: i64,
    /// One flag per position, `2 * depth + 2` of them: the `depth` encoder levels, the bottom, the `depth`
    /// decoder levels, and the last convolution, in the order the forward pass reaches them.
    pub(crate) layers: Vec<bool>,
}

impl FilmSpec {
    /// Reads `n_metadata` and `film_layers`, checking the list against `depth` as ivadomed does.
    pub(crate) fn read(architecture: &str, config: &mut Config, depth: usize) -> Result<Self> {
        let n_metadata = config.usize_in("n_metadata", 1, 65536)? as i64;
        let values = config.f64_list("film_layers")?;
        if values.len() != 2 * depth + 2 {
            return Err(PluginError(format!(
                "{architecture}: config key `film_layers` must list 2 * depth + 2 = {} flags (one per \
                 encoder level, the bottom, one per decoder level, the last convolution), got {}",
                2 * depth + 2,
                values.len()
            )));
        }
        let layers = values
            .iter()
            .map(|&v| {
                if v == 0.0 || v == 1.0 {
                    Ok(v == 1.0)
                } else {
                    Err(PluginError(format!(
                        "{architecture}: config key `film_layers` must hold only 0 or 1, got {v}"
                    )))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { n_metadata, layers })
    }

    /// A FiLM layer for position `index` when that position is switched on.
    pub(crate) fn layer(&self, index: usize, path: nn::Path, channels: i64) -> Option<FilmLayer> {
        self.layers[index].then(|| FilmLayer::new(path, self.n_metadata, channels))
    }
}

/// The generator MLP: linear → sigmoid three times, giving a scale and a shift per channel, both in (0, 1).
/// Parameters sit under `generator.linear{1,2,3}`, ivadomed's names.
pub(crate) struct FilmLayer {
    linear1: nn::Linear,
    linear2: nn::Linear,
    linear3: nn::Linear,
    channels: i64,
}

impl FilmLayer {
    fn new(path: nn::Path, n_metadata: i64, channels: i64) -> Self {
        let generator = &path / "generator";
        let config = nn::LinearConfig::default();
        Self {
            linear1: nn::linear(&generator / "linear1", n_metadata, GENERATOR_HIDDEN, config),
            linear2: nn::linear(
                &generator / "linear2",
                GENERATOR_HIDDEN,
                GENERATOR_HIDDEN / 4,
                config,
            ),
            linear3: nn::linear(
                &generator / "linear3",
                GENERATOR_HIDDEN / 4,
                2 * channels,
                config,
            ),
            channels,
        }
    }

    /// Modulates `features` ([N, C, spatial...]) by `metadata` ([N, n_metadata]).
    ///
    /// ivadomed shares the hidden weight `linear2.weight` between all FiLM layers of a network: the first
    /// layer the forward pass reaches uses its own and hands it on, and every later layer uses that one
    /// instead of its own. `shared` carries it along the pass; the later layers' own `linear2.weight` stay
    /// in the parameter list (ivadomed's count and state_dict keep them) but receive no gradient.
    pub(crate) fn forward(
        &self,
        features: &Tensor,
        metadata: &Tensor,
        shared: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let linear2_weight = shared.get_or_insert_with(|| self.linear2.ws.shallow_clone());
        let hidden = metadata
            .f_linear(&self.linear1.ws, self.linear1.bs.as_ref())?
            .sigmoid()
            .f_linear(linear2_weight, self.linear2.bs.as_ref())?
            .sigmoid();
        let params = hidden
            .f_linear(&self.linear3.ws, self.linear3.bs.as_ref())?
            .sigmoid();
        // [N, 2C] → [N, 2C, 1, ...]: one affine map per channel, the same at every location.
        let mut shape = params.size();
        shape.resize(features.dim(), 1);
        let params = params.f_view(shape.as_slice())?;
        let gammas = params.f_narrow(1, 0, self.channels)?;
        let betas = params.f_narrow(1, self.channels, self.channels)?;
        Ok(gammas * features + betas)
    }
}

/// Checks the metadata input of a FiLM network and casts it to the image's floating-point kind.
pub(crate) fn check_metadata(
    architecture: &str,
    inputs: &[Tensor],
    batch: i64,
    n_metadata: i64,
) -> Result<Tensor> {
    let metadata = inputs.get(1).ok_or_else(|| {
        PluginError(format!(
            "{architecture} needs the metadata vector as a second input, a float tensor \
             [N, n_metadata] = [N, {n_metadata}]; got only the image"
        ))
    })?;
    let size = metadata.size();
    if size != [batch, n_metadata] {
        return Err(PluginError(format!(
            "{architecture}: the metadata input must be [N, n_metadata] = [{batch}, {n_metadata}], \
             got shape {size:?}"
        )));
    }
    if !metadata.is_floating_point() {
        return Err(PluginError(format!(
            "{architecture}: the metadata input must be a float tensor, got {:?}",
            metadata.kind()
        )));
    }
    let image = &inputs[0];
    let metadata = metadata.to_device(image.device());
    Ok(if image.is_floating_point() {
        metadata.f_to_kind(image.kind())?
    } else {
        metadata
    })
}
