//! Building components outside a host, the way the host builds them: for a plugin's unit tests and for
//! benchmarks that link a plugin crate directly.
use crate::{Architecture, Config, Result};
use serde_json::Value;
use tch::{nn, Device};

/// Builds architecture `A` with `config` merged over its defaults, rejecting unknown keys exactly as
/// `model(...)` in a script does. The returned store owns the parameters.
pub fn build_architecture<A: Architecture>(
    config: Value,
    device: Device,
) -> Result<(nn::VarStore, A)> {
    let store = nn::VarStore::new(device);
    let mut checked = Config::new(A::NAME, A::defaults(), config)?;
    let network = A::build(&mut checked, store.root())?;
    checked.finish()?;
    Ok((store, network))
}
