ivado_sdk::export_plugin! {
    name: "postprocess",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [],
    transforms: [],
}
