ivado_sdk::export_plugin! {
    name: "countception",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [],
    transforms: [],
}
