ivado_sdk::export_plugin! {
    name: "classifiers",
    version: env!("CARGO_PKG_VERSION"),
    architectures: [],
    transforms: [],
}
