ivado_sdk::export_plugin! {
    name: "modified3dunet",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [],
    transforms: [],
}
