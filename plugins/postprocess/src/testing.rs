//! Helpers for the unit tests: building a step as the host does, reading tensors back, placing voxels.
use ivado_sdk::serde_json::Value;
use ivado_sdk::tch::{Kind, Tensor};
use ivado_sdk::{Config, Transform};

/// Builds `T` from `config` merged over its defaults, rejecting unknown keys as the host does.
pub fn build<T: Transform>(config: Value) -> T {
    try_build(config).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_build<T: Transform>(config: Value) -> ivado_sdk::Result<T> {
    let mut checked = Config::new(T::NAME, T::defaults(), config)?;
    let transform = T::build(&mut checked)?;
    checked.finish()?;
    Ok(transform)
}

/// All values of a tensor, flattened in C order.
pub fn values(tensor: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&tensor.to_kind(Kind::Double).reshape([-1])).unwrap()
}

/// A `[1, X, Y, Z]` f32 volume with 1 at `voxels`, 0 elsewhere.
pub fn volume(dims: [usize; 3], voxels: &[[usize; 3]]) -> Tensor {
    let mut data = vec![0.0f32; dims.iter().product()];
    for &[x, y, z] in voxels {
        data[(x * dims[1] + y) * dims[2] + z] = 1.0;
    }
    Tensor::from_slice(&data).reshape([1, dims[0] as i64, dims[1] as i64, dims[2] as i64])
}

/// The voxels equal to 1 in a `[1, X, Y, Z]` volume, in C order.
pub fn ones_of(tensor: &Tensor) -> Vec<[usize; 3]> {
    let size = tensor.size();
    let (ny, nz) = (size[2] as usize, size[3] as usize);
    values(tensor)
        .iter()
        .enumerate()
        .filter(|(_, &v)| v == 1.0)
        .map(|(i, _)| [i / (ny * nz), i / nz % ny, i % nz])
        .collect()
}
