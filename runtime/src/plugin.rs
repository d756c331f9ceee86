//! Host side of the plugin contract: finding plugin libraries, checking their ABI record, and safe wrappers
//! over their architectures and transforms.
//!
//! Lifetime rule (dlclose really unmaps): every object that came from a plugin holds an `Arc` of its
//! [`PluginLibrary`], so the library stays mapped as long as anything from it lives.
use anyhow::{anyhow, bail, Context, Result};
use ivado_sdk::abi::{
    self, OwnedStr, PluginTable, SampleIn, SampleSink, Status, StrRef, TensorHandle, TensorSink,
};
use ivado_sdk::{Batch, Mode, Sample};
use serde_json::Value;
use std::cell::RefCell;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Tensor};

/// Environment variable with extra plugin directories, `:`-separated.
pub const PLUGIN_PATH_ENV: &str = "IVADO_PLUGIN_PATH";
/// Overrides where the built-in plugins are looked for.
pub const BUILTIN_DIR_ENV: &str = "IVADO_BUILTIN_PLUGIN_DIR";
/// File name prefix of the built-in plugin libraries (`libivado_plugin_unet.so`, ...).
const BUILTIN_PREFIX: &str = "libivado_plugin_";

/// One component a plugin offers, as it described itself.
#[derive(Clone, Debug)]
pub struct ComponentInfo {
    pub name: String,
    pub summary: String,
    pub defaults: Value,
    /// Architectures only: whether TorchScript tracing records its forward faithfully.
    pub traceable: bool,
}

/// A loaded plugin library whose ABI record was accepted.
pub struct PluginLibrary {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub sdk_version: String,
    pub libtorch_version: String,
    pub architectures: Vec<ComponentInfo>,
    pub transforms: Vec<ComponentInfo>,
    table: &'static PluginTable,
    // Declared last so it is dropped last; the table points into it.
    _library: libloading::Library,
}

// SAFETY: the table is immutable function pointers; plugin entry points are reentrant (no shared mutable
// state besides libtorch's, which is thread-safe).
unsafe impl Send for PluginLibrary {}
unsafe impl Sync for PluginLibrary {}

impl std::fmt::Debug for PluginLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginLibrary")
            .field("path", &self.path)
            .field("name", &self.name)
            .finish()
    }
}

thread_local! {
    /// Name of the plugin being called on this thread, for log messages coming back through the callback.
    static CURRENT_PLUGIN: RefCell<String> = const { RefCell::new(String::new()) };
}

unsafe extern "C" fn host_log(level: u32, message: StrRef) {
    let _ = std::panic::catch_unwind(|| {
        let message = unsafe { message.as_str() };
        CURRENT_PLUGIN.with(|plugin| {
            let plugin = plugin.borrow();
            match level {
                1 => tracing::error!(plugin = %plugin, "{message}"),
                2 => tracing::warn!(plugin = %plugin, "{message}"),
                3 => tracing::info!(plugin = %plugin, "{message}"),
                4 => tracing::debug!(plugin = %plugin, "{message}"),
                _ => tracing::trace!(plugin = %plugin, "{message}"),
            }
        })
    });
}

impl PluginLibrary {
    /// Loads one library, checking its ABI record before calling anything else in it.
    pub fn load(path: &Path) -> Result<Arc<Self>> {
        let shown = path.display();
        if !path.is_file() {
            bail!("plugin {shown}: no such file");
        }
        // SAFETY: loading runs the library's initialisers. Plugins are code the user chose to run.
        let library = unsafe { libloading::Library::new(path) }
            .map_err(|e| anyhow!("plugin {shown}: not a loadable shared library ({e})"))?;
        let entry: abi::EntryFn = unsafe {
            *library.get::<abi::EntryFn>(abi::ENTRY_SYMBOL).map_err(|_| {
                anyhow!(
                    "plugin {shown}: not an ivado plugin: it does not export the symbol `ivado_plugin_entry` \
                     (a plugin crate must call ivado_sdk::export_plugin!)"
                )
            })?
        };
        let table = unsafe { entry() };
        if table.is_null() {
            bail!("plugin {shown}: its entry point failed (returned no plugin table)");
        }
        // SAFETY: the record is the table's first field, with a layout frozen across ABI versions, so it can be
        // read before we know the rest of the table has the layout we expect. It lives in the library's static
        // data, which `library` keeps mapped.
        let record: &abi::AbiRecord = unsafe { &*(table as *const abi::AbiRecord) };
        if record.magic != abi::MAGIC {
            bail!("plugin {shown}: its plugin table has no ivado ABI record (bad magic); it was not built with ivado-sdk");
        }
        let name = unsafe { record.plugin_name.as_str() }.to_owned();
        let version = unsafe { record.plugin_version.as_str() }.to_owned();
        let sdk_version = unsafe { record.sdk_version.as_str() }.to_owned();
        let libtorch_version = unsafe { record.libtorch_version.as_str() }.to_owned();
        if record.abi_version != abi::ABI_VERSION {
            bail!(
                "plugin {shown} (`{name}` {version}): ABI mismatch: it was built against ivado-sdk {sdk_version} \
                 (plugin ABI v{}), but this ivado speaks plugin ABI v{} (ivado-sdk {}). Rebuild the plugin against \
                 ivado-sdk {}: update its ivado-sdk dependency and run `cargo build --release` in its crate.",
                record.abi_version,
                abi::ABI_VERSION,
                abi::SDK_VERSION,
                abi::SDK_VERSION
            );
        }
        if libtorch_version != abi::LIBTORCH_VERSION {
            bail!(
                "plugin {shown} (`{name}` {version}): libtorch mismatch: it was built against libtorch \
                 {libtorch_version}, but this ivado uses libtorch {}. Tensors cannot cross between two libtorch \
                 builds; rebuild the plugin with the same libtorch (run scripts/setup-libtorch.sh, then \
                 `cargo build --release` in its crate).",
                abi::LIBTORCH_VERSION
            );
        }
        // SAFETY: the record says this is our ABI version, so the full table has the layout we expect.
        let table: &'static PluginTable = unsafe { &*table };
        unsafe { (table.set_logger)(host_log) };

        let mut plugin = Self {
            path: path.to_owned(),
            name,
            version,
            sdk_version,
            libtorch_version,
            architectures: Vec::new(),
            transforms: Vec::new(),
            table,
            _library: library,
        };
        let description = plugin.call("describe", |err| {
            let mut out = OwnedStr::EMPTY;
            let status = unsafe { (table.describe)(&mut out, err) };
            (status, out)
        })?;
        let text = plugin.take_string(description);
        let description: Value = serde_json::from_str(&text)
            .with_context(|| format!("plugin {shown}: describe returned invalid JSON"))?;
        plugin.architectures = parse_components(&description, "architectures");
        plugin.transforms = parse_components(&description, "transforms");
        Ok(Arc::new(plugin))
    }

    /// The kinds of component this plugin provides, e.g. "architecture" or "architecture+transform".
    pub fn kind(&self) -> String {
        let mut kinds = Vec::new();
        if !self.architectures.is_empty() {
            kinds.push("architecture");
        }
        if !self.transforms.is_empty() {
            kinds.push("transform");
        }
        if kinds.is_empty() {
            "empty".to_owned()
        } else {
            kinds.join("+")
        }
    }

    fn take_string(&self, text: OwnedStr) -> String {
        let copy = unsafe { text.as_str() }.to_owned();
        unsafe { (self.table.free_string)(text) };
        copy
    }

    /// Calls one entry point; turns its status and error message into a `Result` naming this plugin.
    fn call<T>(&self, what: &str, body: impl FnOnce(*mut OwnedStr) -> (Status, T)) -> Result<T> {
        let mut err = OwnedStr::EMPTY;
        let previous = CURRENT_PLUGIN
            .with(|current| std::mem::replace(&mut *current.borrow_mut(), self.name.clone()));
        let (status, value) = body(&mut err);
        CURRENT_PLUGIN.with(|current| *current.borrow_mut() = previous);
        match status {
            Status::Ok => Ok(value),
            Status::Error | Status::Panic => {
                let message = self.take_string(err);
                Err(anyhow!(
                    "plugin `{}` ({}): {what} failed: {message}",
                    self.name,
                    self.path.display()
                ))
            }
        }
    }
}

fn parse_components(description: &Value, key: &str) -> Vec<ComponentInfo> {
    description
        .get(key)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .map(|item| ComponentInfo {
                    name: item
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    summary: item
                        .get("summary")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                    defaults: item.get("defaults").cloned().unwrap_or(Value::Null),
                    traceable: item
                        .get("traceable")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn device_code(device: Device) -> abi::DeviceCode {
    match device {
        Device::Cuda(index) => index as i64,
        _ => -1,
    }
}

/// A parameter or buffer of a plugin model, sharing storage with the plugin's own tensor.
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
    /// Updated by the optimizer.
    pub trainable: bool,
    /// A learnable parameter frozen for transfer learning (then `trainable` is false).
    pub frozen: bool,
}

/// An architecture instance living in a plugin.
pub struct PluginModel {
    handle: *mut c_void,
    pub architecture: String,
    /// The config the user asked for (defaults not merged in).
    pub config: Value,
    pub parameters: Vec<NamedTensor>,
    // Declared last: the library outlives the handle and the parameters.
    library: Arc<PluginLibrary>,
}

// SAFETY: the handle is only used through `&self`/`&mut self` calls, which the plugin contract allows from any
// thread (one at a time: PluginModel is not Sync).
unsafe impl Send for PluginModel {}

unsafe extern "C" fn push_parameter(
    ctx: *mut c_void,
    name: StrRef,
    tensor: TensorHandle,
    flags: u32,
) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let parameters = unsafe { &mut *(ctx as *mut Vec<NamedTensor>) };
        parameters.push(NamedTensor {
            name: unsafe { name.as_str() }.to_owned(),
            tensor: unsafe { Tensor::from_ptr(tensor) },
            trainable: flags & abi::TENSOR_TRAINABLE != 0,
            frozen: false,
        });
    }));
}

impl PluginModel {
    pub fn create(
        library: Arc<PluginLibrary>,
        architecture: &str,
        config: &Value,
        device: Device,
    ) -> Result<Self> {
        let config_text = config.to_string();
        let handle = library.call(&format!("creating architecture `{architecture}`"), |err| {
            let mut out: *mut c_void = std::ptr::null_mut();
            let status = unsafe {
                (library.table.model_create)(
                    StrRef::from_str(architecture),
                    StrRef::from_str(&config_text),
                    device_code(device),
                    &mut out,
                    err,
                )
            };
            (status, out)
        })?;
        let mut model = Self {
            handle,
            architecture: architecture.to_owned(),
            config: config.clone(),
            parameters: Vec::new(),
            library,
        };
        let mut parameters: Vec<NamedTensor> = Vec::new();
        let sink = TensorSink {
            ctx: (&mut parameters as *mut Vec<NamedTensor>).cast(),
            push: push_parameter,
        };
        model.library.call("listing parameters", |err| {
            (
                unsafe { (model.library.table.model_parameters)(handle, sink, err) },
                (),
            )
        })?;
        model.parameters = parameters;
        Ok(model)
    }

    pub fn library(&self) -> &Arc<PluginLibrary> {
        &self.library
    }

    /// Runs the network. Errors (bad shapes, panics) come back as messages naming the plugin.
    pub fn forward(&self, inputs: &[&Tensor], mode: Mode) -> Result<Tensor> {
        let handles: Vec<TensorHandle> =
            inputs.iter().map(|t| t.as_ptr() as TensorHandle).collect();
        let output = self
            .library
            .call(&format!("forward of `{}`", self.architecture), |err| {
                let mut out: TensorHandle = std::ptr::null_mut();
                let status = unsafe {
                    (self.library.table.model_forward)(
                        self.handle,
                        handles.as_ptr(),
                        handles.len(),
                        mode as u8,
                        &mut out,
                        err,
                    )
                };
                (status, out)
            })?;
        if output.is_null() {
            bail!(
                "plugin `{}`: forward of `{}` returned no tensor",
                self.library.name,
                self.architecture
            );
        }
        Ok(unsafe { Tensor::from_ptr(output) })
    }

    pub fn trainable(&self) -> impl Iterator<Item = &NamedTensor> {
        self.parameters.iter().filter(|p| p.trainable)
    }

    /// Learnable values the optimizer updates.
    pub fn parameter_count(&self) -> i64 {
        self.trainable().map(|p| p.tensor.numel() as i64).sum()
    }

    /// Learnable values, frozen or not: what PyTorch's `sum(p.numel() for p in model.parameters())` gives.
    pub fn learnable_count(&self) -> i64 {
        self.parameters
            .iter()
            .filter(|p| p.trainable || p.frozen)
            .map(|p| p.tensor.numel() as i64)
            .sum()
    }
}

impl Drop for PluginModel {
    fn drop(&mut self) {
        unsafe { (self.library.table.model_drop)(self.handle) };
    }
}

/// A transform instance living in a plugin.
pub struct PluginTransform {
    handle: *mut c_void,
    pub name: String,
    pub config: Value,
    library: Arc<PluginLibrary>,
}

// SAFETY: the SDK requires transforms to be `Send + Sync` (`apply`/`undo` take `&self`), so the handle may be
// shared between threads.
unsafe impl Send for PluginTransform {}
unsafe impl Sync for PluginTransform {}

struct SampleBuilder {
    sample: Sample,
    meta_error: Option<String>,
}

unsafe extern "C" fn sink_tensor(ctx: *mut c_void, name: StrRef, tensor: TensorHandle) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let builder = unsafe { &mut *(ctx as *mut SampleBuilder) };
        builder.sample.insert(unsafe { name.as_str() }, unsafe {
            Tensor::from_ptr(tensor)
        });
    }));
}

unsafe extern "C" fn sink_meta(ctx: *mut c_void, meta: StrRef) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let builder = unsafe { &mut *(ctx as *mut SampleBuilder) };
        match serde_json::from_str::<Value>(unsafe { meta.as_str() }) {
            Ok(Value::Object(map)) => builder.sample.meta = map,
            _ => {
                builder.meta_error =
                    Some("transform returned metadata that is not a JSON object".into())
            }
        }
    }));
}

struct BatchBuilder {
    batch: Batch,
    meta_error: Option<String>,
}

unsafe extern "C" fn sink_batch_tensor(ctx: *mut c_void, name: StrRef, tensor: TensorHandle) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let builder = unsafe { &mut *(ctx as *mut BatchBuilder) };
        builder.batch.insert(unsafe { name.as_str() }, unsafe {
            Tensor::from_ptr(tensor)
        });
    }));
}

unsafe extern "C" fn sink_batch_meta(ctx: *mut c_void, meta: StrRef) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let builder = unsafe { &mut *(ctx as *mut BatchBuilder) };
        let parsed = match serde_json::from_str::<Value>(unsafe { meta.as_str() }) {
            Ok(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::Object(map) => Some(map),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>(),
            _ => None,
        };
        match parsed {
            Some(metas) => builder.batch.metas = metas,
            None => {
                builder.meta_error = Some(
                    "transform returned batch metadata that is not a JSON array of objects".into(),
                )
            }
        }
    }));
}

/// Borrowed view of a sample in the ABI's parallel-array form. Holds the buffers alive during a call.
struct SampleArgs {
    names: Vec<String>,
    name_refs: Vec<StrRef>,
    handles: Vec<TensorHandle>,
    meta: String,
}

impl SampleArgs {
    fn new(sample: &Sample) -> Self {
        let names: Vec<String> = sample.tensors.keys().cloned().collect();
        let name_refs = names.iter().map(|n| StrRef::from_str(n)).collect();
        let handles = sample
            .tensors
            .values()
            .map(|t| t.as_ptr() as TensorHandle)
            .collect();
        let meta = Value::Object(sample.meta.clone()).to_string();
        Self {
            names,
            name_refs,
            handles,
            meta,
        }
    }

    /// A batch: its stacked tensors, and its metadata as a JSON array of one object per sample.
    fn of_batch(batch: &Batch) -> Self {
        let names: Vec<String> = batch.tensors.keys().cloned().collect();
        let name_refs = names.iter().map(|n| StrRef::from_str(n)).collect();
        let handles = batch
            .tensors
            .values()
            .map(|t| t.as_ptr() as TensorHandle)
            .collect();
        let meta =
            Value::Array(batch.metas.iter().cloned().map(Value::Object).collect()).to_string();
        Self {
            names,
            name_refs,
            handles,
            meta,
        }
    }

    fn raw(&self) -> SampleIn {
        debug_assert_eq!(self.names.len(), self.handles.len());
        SampleIn {
            names: self.name_refs.as_ptr(),
            tensors: self.handles.as_ptr(),
            len: self.handles.len(),
            meta_json: StrRef::from_str(&self.meta),
        }
    }
}

impl PluginTransform {
    pub fn create(library: Arc<PluginLibrary>, name: &str, config: &Value) -> Result<Self> {
        let config_text = config.to_string();
        let handle = library.call(&format!("creating transform `{name}`"), |err| {
            let mut out: *mut c_void = std::ptr::null_mut();
            let status = unsafe {
                (library.table.transform_create)(
                    StrRef::from_str(name),
                    StrRef::from_str(&config_text),
                    &mut out,
                    err,
                )
            };
            (status, out)
        })?;
        Ok(Self {
            handle,
            name: name.to_owned(),
            config: config.clone(),
            library,
        })
    }

    /// The library this transform came from (hot reload finds its file through it).
    pub fn library(&self) -> &Arc<PluginLibrary> {
        &self.library
    }

    /// Calls a transform entry point that emits a sample, and collects that sample.
    fn call_with_sink<T>(
        &self,
        what: &str,
        body: impl FnOnce(SampleSink, *mut OwnedStr) -> (Status, T),
    ) -> Result<(Sample, T)> {
        let mut builder = SampleBuilder {
            sample: Sample::new(),
            meta_error: None,
        };
        let sink = SampleSink {
            ctx: (&mut builder as *mut SampleBuilder).cast(),
            push_tensor: sink_tensor,
            set_meta: sink_meta,
        };
        let value = self.library.call(what, |err| body(sink, err))?;
        if let Some(error) = builder.meta_error {
            bail!("plugin `{}`: {what}: {error}", self.library.name);
        }
        Ok((builder.sample, value))
    }

    /// Applies the transform, returning the new sample and the undo record.
    pub fn apply(&self, sample: &Sample, seed: u64) -> Result<(Sample, Value)> {
        let args = SampleArgs::new(sample);
        let (sample, undo) =
            self.call_with_sink(&format!("transform `{}`", self.name), |sink, err| {
                let mut undo = OwnedStr::EMPTY;
                let status = unsafe {
                    (self.library.table.transform_apply)(
                        self.handle,
                        args.raw(),
                        seed,
                        sink,
                        &mut undo,
                        err,
                    )
                };
                (status, undo)
            })?;
        let undo = self.library.take_string(undo);
        Ok((sample, serde_json::from_str(&undo).unwrap_or(Value::Null)))
    }

    /// Applies the transform to a batch (stacked `[B, ...]` tensors, one seed per sample) in one call; returns the
    /// new batch and one undo record per sample.
    pub fn apply_batch(&self, batch: &Batch, seeds: &[u64]) -> Result<(Batch, Vec<Value>)> {
        if seeds.len() != batch.len() {
            bail!(
                "transform `{}`: a batch of {} samples needs as many seeds, got {}",
                self.name,
                batch.len(),
                seeds.len()
            );
        }
        let args = SampleArgs::of_batch(batch);
        let what = format!("transform `{}` (batched)", self.name);
        let mut builder = BatchBuilder {
            batch: Batch {
                tensors: Default::default(),
                metas: Vec::new(),
            },
            meta_error: None,
        };
        let sink = SampleSink {
            ctx: (&mut builder as *mut BatchBuilder).cast(),
            push_tensor: sink_batch_tensor,
            set_meta: sink_batch_meta,
        };
        let undo = self.library.call(&what, |err| {
            let mut undo = OwnedStr::EMPTY;
            let status = unsafe {
                (self.library.table.transform_apply_batch)(
                    self.handle,
                    args.raw(),
                    seeds.as_ptr(),
                    seeds.len(),
                    sink,
                    &mut undo,
                    err,
                )
            };
            (status, undo)
        })?;
        let undo = self.library.take_string(undo);
        if let Some(error) = builder.meta_error {
            bail!("plugin `{}`: {what}: {error}", self.library.name);
        }
        let records = match serde_json::from_str::<Value>(&undo) {
            Ok(Value::Array(records)) if records.len() == batch.len() => records,
            _ => bail!(
                "plugin `{}`: {what}: the undo records are not a JSON array of {} entries",
                self.library.name,
                batch.len()
            ),
        };
        if builder.batch.metas.len() != batch.len() {
            bail!(
                "plugin `{}`: {what}: returned {} metadata objects for {} samples",
                self.library.name,
                builder.batch.metas.len(),
                batch.len()
            );
        }
        if let Some((name, tensor)) = builder
            .batch
            .tensors
            .iter()
            .find(|(_, t)| t.dim() == 0 || t.size()[0] != batch.len() as i64)
        {
            bail!(
                "plugin `{}`: {what}: returned `{name}` of shape {:?} for a batch of {} samples",
                self.library.name,
                tensor.size(),
                batch.len()
            );
        }
        Ok((builder.batch, records))
    }

    /// Reverts [`PluginTransform::apply`] on `sample` (typically a prediction) given its undo record.
    pub fn undo(&self, sample: &Sample, record: &Value) -> Result<Sample> {
        let args = SampleArgs::new(sample);
        let record = record.to_string();
        let (sample, ()) = self.call_with_sink(
            &format!("undoing transform `{}`", self.name),
            |sink, err| {
                let status = unsafe {
                    (self.library.table.transform_undo)(
                        self.handle,
                        args.raw(),
                        StrRef::from_str(&record),
                        sink,
                        err,
                    )
                };
                (status, ())
            },
        )?;
        Ok(sample)
    }
}

impl Drop for PluginTransform {
    fn drop(&mut self) {
        unsafe { (self.library.table.transform_drop)(self.handle) };
    }
}

/// Where plugins are looked for, in order: the built-in plugins, `--plugin-dir`s, then `IVADO_PLUGIN_PATH`.
#[derive(Clone, Debug, Default)]
pub struct SearchPath {
    pub builtin: Option<PathBuf>,
    pub extra: Vec<PathBuf>,
}

impl SearchPath {
    /// The standard search path plus `plugin_dirs` (from `--plugin-dir` or a script).
    pub fn standard(plugin_dirs: &[PathBuf]) -> Self {
        let mut extra = plugin_dirs.to_vec();
        if let Some(value) = std::env::var_os(PLUGIN_PATH_ENV) {
            extra.extend(std::env::split_paths(&value).filter(|p| !p.as_os_str().is_empty()));
        }
        Self {
            builtin: builtin_plugin_dir(),
            extra,
        }
    }

    /// Library files to try: `libivado_plugin_*` in the built-in directory, every shared library elsewhere.
    pub fn candidates(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(dir) = &self.builtin {
            files.extend(shared_libraries(dir).into_iter().filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(BUILTIN_PREFIX))
            }));
        }
        for dir in &self.extra {
            if dir.is_file() {
                files.push(dir.clone());
            } else {
                files.extend(shared_libraries(dir));
            }
        }
        files
    }
}

fn shared_libraries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_file()
                && matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("so" | "dylib")
                )
        })
        .collect();
    files.sort();
    files
}

/// The directory holding the built-in plugins: next to the `ivado` binary (cargo puts the cdylibs there), or
/// its parent for test binaries in `target/<profile>/deps`.
pub fn builtin_plugin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(BUILTIN_DIR_ENV) {
        return Some(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// Every plugin found on a search path, plus the files that failed to load and why.
#[derive(Default)]
pub struct PluginRegistry {
    pub libraries: Vec<Arc<PluginLibrary>>,
    pub failures: Vec<(PathBuf, String)>,
}

impl PluginRegistry {
    /// Loads every candidate. A broken library is recorded (and logged), not fatal: it only matters if a
    /// script asks for something only it could have provided.
    pub fn discover(search: &SearchPath) -> Self {
        let mut registry = Self::default();
        for path in search.candidates() {
            registry.add_file(&path);
        }
        registry
    }

    pub fn add_file(&mut self, path: &Path) {
        match PluginLibrary::load(path) {
            Ok(library) => {
                tracing::debug!(plugin = %library.name, version = %library.version, path = %path.display(), "loaded plugin");
                self.libraries.push(library);
            }
            Err(error) => {
                tracing::warn!("{error:#}");
                self.failures.push((path.to_owned(), format!("{error:#}")));
            }
        }
    }

    pub(crate) fn failure_note(&self) -> String {
        if self.failures.is_empty() {
            String::new()
        } else {
            let failed: Vec<String> = self
                .failures
                .iter()
                .map(|(_, e)| format!("\n  - {e}"))
                .collect();
            format!("\nThese plugin files failed to load:{}", failed.concat())
        }
    }

    /// Finds a component. `name` may be qualified as `plugin:component`.
    fn find(
        &self,
        name: &str,
        kind: fn(&PluginLibrary) -> &[ComponentInfo],
        what: &str,
    ) -> Result<Arc<PluginLibrary>> {
        let (plugin, component) = match name.split_once(':') {
            Some((plugin, component)) => (Some(plugin), component),
            None => (None, name),
        };
        let found = self
            .libraries
            .iter()
            .filter(|lib| plugin.is_none_or(|p| lib.name == p))
            .find(|lib| kind(lib).iter().any(|c| c.name == component));
        match found {
            Some(library) => Ok(library.clone()),
            None => {
                let available: Vec<String> = self
                    .libraries
                    .iter()
                    .flat_map(|lib| {
                        kind(lib)
                            .iter()
                            .map(move |c| format!("{}:{}", lib.name, c.name))
                    })
                    .collect();
                Err(anyhow!(
                    "no plugin provides the {what} `{name}` (available: {}){}",
                    if available.is_empty() {
                        "none".into()
                    } else {
                        available.join(", ")
                    },
                    self.failure_note()
                ))
            }
        }
    }

    pub fn model(&self, architecture: &str, config: &Value, device: Device) -> Result<PluginModel> {
        let library = self.find(architecture, |lib| &lib.architectures, "architecture")?;
        let component = architecture.rsplit(':').next().unwrap_or(architecture);
        PluginModel::create(library, component, config, device)
    }

    pub fn transform(&self, name: &str, config: &Value) -> Result<PluginTransform> {
        let library = self.find(name, |lib| &lib.transforms, "transform")?;
        let component = name.rsplit(':').next().unwrap_or(name);
        PluginTransform::create(library, component, config)
    }
}
