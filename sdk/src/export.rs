//! The plugin side of the ABI: the `extern "C"` functions behind [`PluginTable`], generated once here and
//! compiled into every plugin through [`export_plugin!`](crate::export_plugin). Each one catches panics and
//! turns them, and every error, into a message for the host.
use crate::abi::*;
use crate::error::first_line;
use crate::{Architecture, Batch, Config, Mode, PluginError, Result, Sample, Transform};
use serde_json::{json, Map, Value};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;
use tch::{nn, Device, Tensor};

/// Everything one plugin library offers. Built by the export macro.
pub struct Registry {
    pub name: &'static str,
    pub version: &'static str,
    pub architectures: Vec<ArchitectureEntry>,
    pub transforms: Vec<TransformEntry>,
}

pub struct ArchitectureEntry {
    name: &'static str,
    summary: &'static str,
    traceable: bool,
    defaults: fn() -> Value,
    build: fn(&mut Config, nn::Path) -> Result<Box<dyn DynArchitecture>>,
}

impl ArchitectureEntry {
    pub fn of<A: Architecture>() -> Self {
        Self {
            name: A::NAME,
            summary: A::SUMMARY,
            traceable: A::TRACEABLE,
            defaults: A::defaults,
            build: |config, root| Ok(Box::new(A::build(config, root)?)),
        }
    }
}

pub struct TransformEntry {
    name: &'static str,
    summary: &'static str,
    defaults: fn() -> Value,
    build: fn(&mut Config) -> Result<Box<dyn DynTransform>>,
}

impl TransformEntry {
    pub fn of<T: Transform>() -> Self {
        Self {
            name: T::NAME,
            summary: T::SUMMARY,
            defaults: T::defaults,
            build: |config| Ok(Box::new(T::build(config)?)),
        }
    }
}

trait DynArchitecture: Send {
    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor>;
}

impl<A: Architecture> DynArchitecture for A {
    fn forward(&self, inputs: &[Tensor], mode: Mode) -> Result<Tensor> {
        Architecture::forward(self, inputs, mode)
    }
}

trait DynTransform: Send + Sync {
    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value>;
    fn undo(&self, sample: &mut Sample, record: &Value) -> Result<()>;
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>>;
}

impl<T: Transform> DynTransform for T {
    fn apply(&self, sample: &mut Sample, seed: u64) -> Result<Value> {
        Transform::apply(self, sample, seed)
    }
    fn apply_batch(&self, batch: &mut Batch, seeds: &[u64]) -> Result<Vec<Value>> {
        Transform::apply_batch(self, batch, seeds)
    }
    fn undo(&self, sample: &mut Sample, record: &Value) -> Result<()> {
        Transform::undo(self, sample, record)
    }
}

struct ModelInstance {
    // Owns the parameters; the network holds views into it.
    store: nn::VarStore,
    network: Box<dyn DynArchitecture>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();
static TABLE: OnceLock<PluginTable> = OnceLock::new();

fn registry() -> &'static Registry {
    REGISTRY
        .get()
        .expect("ivado plugin registry used before the entry point ran")
}

/// Body of the exported entry symbol. Returns null if building the registry panicked.
pub fn entry(build: fn() -> Registry) -> *const PluginTable {
    let result = catch_unwind(|| {
        let registry = REGISTRY.get_or_init(build);
        TABLE.get_or_init(|| PluginTable {
            record: AbiRecord {
                magic: MAGIC,
                abi_version: ABI_VERSION,
                libtorch_version: StrRef::from_str(LIBTORCH_VERSION),
                sdk_version: StrRef::from_str(SDK_VERSION),
                plugin_name: StrRef::from_str(registry.name),
                plugin_version: StrRef::from_str(registry.version),
            },
            set_logger,
            free_string,
            describe,
            model_create,
            model_parameters,
            model_forward,
            model_drop,
            transform_create,
            transform_apply,
            transform_undo,
            transform_drop,
            transform_apply_batch,
        }) as *const PluginTable
    });
    result.unwrap_or(std::ptr::null())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic payload".to_owned()
    };
    // tch panics with the full libtorch error, whose C++ backtrace is noise to a user. An `unwrap()` on a tch
    // error prints it with Debug, where the newlines are escaped, so cut there too.
    let line = first_line(&text);
    match line.find("\\n") {
        Some(end) => format!("{}…", &line[..end]),
        None => line.to_owned(),
    }
}

/// Runs one entry point's body: errors and panics become a status plus a message in `*err`.
fn guard(err: *mut OwnedStr, body: impl FnOnce() -> Result<()>) -> Status {
    let (status, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return Status::Ok,
        Ok(Err(PluginError(message))) => (Status::Error, message),
        Err(payload) => (
            Status::Panic,
            format!("plugin panicked: {}", panic_message(payload.as_ref())),
        ),
    };
    if !err.is_null() {
        // SAFETY: the host passes a valid out-pointer; see the ABI conventions.
        unsafe { err.write(OwnedStr::from_string(message)) };
    }
    status
}

unsafe extern "C" fn set_logger(callback: LogCallback) {
    let _ = catch_unwind(|| {
        crate::log::install(callback);
        // A panic is reported to the host as an error already; keep the default hook from also printing it.
        std::panic::set_hook(Box::new(|info| {
            crate::log::debug(&format!(
                "panic at {}",
                info.location().map(|l| l.to_string()).unwrap_or_default()
            ))
        }));
    });
}

unsafe extern "C" fn free_string(text: OwnedStr) {
    let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { text.into_string() })));
}

unsafe extern "C" fn describe(out: *mut OwnedStr, err: *mut OwnedStr) -> Status {
    guard(err, || {
        let registry = registry();
        let architectures: Vec<Value> = registry
            .architectures
            .iter()
            .map(|a| {
                json!({"name": a.name, "summary": a.summary, "defaults": (a.defaults)(), "traceable": a.traceable})
            })
            .collect();
        let transforms: Vec<Value> = registry
            .transforms
            .iter()
            .map(|t| json!({"name": t.name, "summary": t.summary, "defaults": (t.defaults)()}))
            .collect();
        let text = json!({"architectures": architectures, "transforms": transforms}).to_string();
        unsafe { out.write(OwnedStr::from_string(text)) };
        Ok(())
    })
}

fn parse_config(component: &str, text: &str) -> Result<Value> {
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(text)
        .map_err(|e| PluginError(format!("{component}: config is not valid JSON: {e}")))
}

fn device_from_code(code: DeviceCode) -> Device {
    if code < 0 {
        Device::Cpu
    } else {
        Device::Cuda(code as usize)
    }
}

/// The registered component called `name`, or an error listing the ones this plugin has.
fn find_entry<'a, E>(
    entries: &'a [E],
    name_of: fn(&E) -> &'static str,
    kind: &str,
    name: &str,
) -> Result<&'a E> {
    entries
        .iter()
        .find(|entry| name_of(entry) == name)
        .ok_or_else(|| {
            let known: Vec<&str> = entries.iter().map(name_of).collect();
            PluginError(format!(
                "plugin `{}` has no {kind} named `{name}` (it has: {})",
                registry().name,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })
}

unsafe extern "C" fn model_create(
    name: StrRef,
    config_json: StrRef,
    device: DeviceCode,
    out: *mut *mut c_void,
    err: *mut OwnedStr,
) -> Status {
    guard(err, || {
        let name = unsafe { name.as_str() };
        let entry = find_entry(&registry().architectures, |a| a.name, "architecture", name)?;
        let user = parse_config(name, unsafe { config_json.as_str() })?;
        let mut config = Config::new(name, (entry.defaults)(), user)?;
        let store = nn::VarStore::new(device_from_code(device));
        let network = (entry.build)(&mut config, store.root())?;
        config.finish()?;
        let instance = Box::new(ModelInstance { store, network });
        unsafe { out.write(Box::into_raw(instance).cast()) };
        Ok(())
    })
}

/// Hands a tensor to the host, which now owns the handle.
fn into_handle(tensor: Tensor) -> TensorHandle {
    let mut tensor = std::mem::ManuallyDrop::new(tensor);
    tensor.as_mut_ptr()
}

unsafe extern "C" fn model_parameters(
    model: *mut c_void,
    sink: TensorSink,
    err: *mut OwnedStr,
) -> Status {
    guard(err, || {
        let instance = unsafe { &*(model as *const ModelInstance) };
        for (name, tensor) in creation_order(&instance.store) {
            let flags = if tensor.requires_grad() {
                TENSOR_TRAINABLE
            } else {
                0
            };
            unsafe {
                (sink.push)(
                    sink.ctx,
                    StrRef::from_str(&name),
                    into_handle(tensor),
                    flags,
                )
            };
        }
        Ok(())
    })
}

/// The store's tensors in the order the architecture created them, which is the order of its layers (what
/// transfer learning's "first fraction of the layers" means). tch keeps trainable variables in creation order
/// but buffers only by name, so each buffer goes right after the last parameter of its module.
fn creation_order(store: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = store.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut ordered: Vec<(String, Tensor)> = Vec::with_capacity(named.len());
    for parameter in store.trainable_variables() {
        if let Some(index) = named
            .iter()
            .position(|(_, t)| t.data_ptr() == parameter.data_ptr() && t.size() == parameter.size())
        {
            ordered.push(named.remove(index));
        }
    }
    let module = |name: &str| name.rsplit_once('.').map_or("", |(m, _)| m).to_owned();
    for (name, tensor) in named {
        let owner = module(&name);
        match ordered.iter().rposition(|(n, _)| module(n) == owner) {
            Some(last) => ordered.insert(last + 1, (name, tensor)),
            None => ordered.push((name, tensor)),
        }
    }
    ordered
}

/// Owned shallow clones of borrowed handles.
unsafe fn borrow_tensors(handles: *const TensorHandle, len: usize) -> Result<Vec<Tensor>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if handles.is_null() {
        return Err(PluginError::new("null tensor array"));
    }
    let handles = unsafe { std::slice::from_raw_parts(handles, len) };
    handles
        .iter()
        .map(|&handle| {
            if handle.is_null() {
                Err(PluginError::new("null tensor handle"))
            } else {
                Ok(unsafe { Tensor::clone_from_ptr(handle) })
            }
        })
        .collect()
}

unsafe extern "C" fn model_forward(
    model: *mut c_void,
    inputs: *const TensorHandle,
    n_inputs: usize,
    mode: u8,
    out: *mut TensorHandle,
    err: *mut OwnedStr,
) -> Status {
    guard(err, || {
        let instance = unsafe { &*(model as *const ModelInstance) };
        let inputs = unsafe { borrow_tensors(inputs, n_inputs)? };
        if inputs.is_empty() {
            return Err(PluginError::new("forward needs at least one input tensor"));
        }
        let mode = Mode::from_code(mode)
            .ok_or_else(|| PluginError(format!("unknown forward mode {mode}")))?;
        let output = instance.network.forward(&inputs, mode)?;
        unsafe { out.write(into_handle(output)) };
        Ok(())
    })
}

unsafe extern "C" fn model_drop(model: *mut c_void) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            drop(unsafe { Box::from_raw(model as *mut ModelInstance) })
        }));
    }
}

unsafe extern "C" fn transform_create(
    name: StrRef,
    config_json: StrRef,
    out: *mut *mut c_void,
    err: *mut OwnedStr,
) -> Status {
    guard(err, || {
        let name = unsafe { name.as_str() };
        let entry = find_entry(&registry().transforms, |t| t.name, "transform", name)?;
        let user = parse_config(name, unsafe { config_json.as_str() })?;
        let mut config = Config::new(name, (entry.defaults)(), user)?;
        let transform = (entry.build)(&mut config)?;
        config.finish()?;
        // Double box: a thin pointer for the C side.
        let transform: Box<Box<dyn DynTransform>> = Box::new(transform);
        unsafe { out.write(Box::into_raw(transform).cast()) };
        Ok(())
    })
}

unsafe fn read_sample(sample: &SampleIn) -> Result<Sample> {
    let tensors = unsafe { borrow_tensors(sample.tensors, sample.len)? };
    let names: &[StrRef] = if sample.len == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(sample.names, sample.len) }
    };
    let meta_text = unsafe { sample.meta_json.as_str() };
    let meta = if meta_text.trim().is_empty() {
        Map::new()
    } else {
        match serde_json::from_str(meta_text) {
            Ok(Value::Object(map)) => map,
            Ok(_) | Err(_) => return Err(PluginError::new("sample metadata is not a JSON object")),
        }
    };
    let mut result = Sample {
        tensors: Default::default(),
        meta,
    };
    for (name, tensor) in names.iter().zip(tensors) {
        result.insert(unsafe { name.as_str() }, tensor);
    }
    Ok(result)
}

fn write_sample(sample: Sample, sink: &SampleSink) {
    let meta = Value::Object(sample.meta).to_string();
    unsafe { (sink.set_meta)(sink.ctx, StrRef::from_str(&meta)) };
    for (name, tensor) in sample.tensors {
        unsafe { (sink.push_tensor)(sink.ctx, StrRef::from_str(&name), into_handle(tensor)) };
    }
}

unsafe extern "C" fn transform_apply(
    transform: *mut c_void,
    sample: SampleIn,
    seed: u64,
    out: SampleSink,
    undo: *mut OwnedStr,
    err: *mut OwnedStr,
) -> Status {
    guard(err, || {
        let transform = unsafe { &*(transform as *const Box<dyn DynTransform>) };
        let mut sample = unsafe { read_sample(&sample)? };
        let record = transform.apply(&mut sample, seed)?;
        write_sample(sample, &out);
        unsafe { undo.write(OwnedStr::from_string(record.to_string())) };
        Ok(())
    })
}

/// The tensors of a `SampleIn` and its metadata as a JSON array of one object per sample.
unsafe fn read_batch(batch: &SampleIn, expected: usize) -> Result<Batch> {
    let tensors = unsafe { borrow_tensors(batch.tensors, batch.len)? };
    let names: &[StrRef] = if batch.len == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(batch.names, batch.len) }
    };
    let metas = match serde_json::from_str(unsafe { batch.meta_json.as_str() }) {
        Ok(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::Object(map) => Ok(map),
                _ => Err(PluginError::new(
                    "batch metadata must be an array of JSON objects",
                )),
            })
            .collect::<Result<Vec<_>>>()?,
        _ => {
            return Err(PluginError::new(
                "batch metadata is not a JSON array of objects",
            ))
        }
    };
    if metas.len() != expected {
        return Err(PluginError(format!(
            "a batch of {expected} seeds came with {} metadata objects",
            metas.len()
        )));
    }
    let mut result = Batch {
        tensors: Default::default(),
        metas,
    };
    for (name, tensor) in names.iter().zip(tensors) {
        if tensor.dim() == 0 || tensor.size()[0] != expected as i64 {
            return Err(PluginError(format!(
                "batch tensor `{}` has shape {:?}, not [{expected}, ...]",
                unsafe { name.as_str() },
                tensor.size()
            )));
        }
        result.insert(unsafe { name.as_str() }, tensor);
    }
    Ok(result)
}

unsafe extern "C" fn transform_apply_batch(
    transform: *mut c_void,
    batch: SampleIn,
    seeds: *const u64,
    n_seeds: usize,
    out: SampleSink,
    undo: *mut OwnedStr,
    err: *mut OwnedStr,
) -> Status {
    guard(err, || {
        let transform = unsafe { &*(transform as *const Box<dyn DynTransform>) };
        let seeds: &[u64] = if n_seeds == 0 {
            &[]
        } else if seeds.is_null() {
            return Err(PluginError::new("null seed array"));
        } else {
            unsafe { std::slice::from_raw_parts(seeds, n_seeds) }
        };
        let mut batch = unsafe { read_batch(&batch, n_seeds)? };
        let records = transform.apply_batch(&mut batch, seeds)?;
        if records.len() != n_seeds {
            return Err(PluginError(format!(
                "the transform returned {} undo records for a batch of {n_seeds} samples",
                records.len()
            )));
        }
        let metas = Value::Array(batch.metas.into_iter().map(Value::Object).collect()).to_string();
        unsafe { (out.set_meta)(out.ctx, StrRef::from_str(&metas)) };
        for (name, tensor) in batch.tensors {
            unsafe { (out.push_tensor)(out.ctx, StrRef::from_str(&name), into_handle(tensor)) };
        }
        unsafe { undo.write(OwnedStr::from_string(Value::Array(records).to_string())) };
        Ok(())
    })
}

unsafe extern "C" fn transform_undo(
    transform: *mut c_void,
    sample: SampleIn,
    undo_json: StrRef,
    out: SampleSink,
    err: *mut OwnedStr,
) -> Status {
    guard(err, || {
        let transform = unsafe { &*(transform as *const Box<dyn DynTransform>) };
        let mut sample = unsafe { read_sample(&sample)? };
        let text = unsafe { undo_json.as_str() };
        let record: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(text)
                .map_err(|e| PluginError(format!("undo record is not valid JSON: {e}")))?
        };
        transform.undo(&mut sample, &record)?;
        write_sample(sample, &out);
        Ok(())
    })
}

unsafe extern "C" fn transform_drop(transform: *mut c_void) {
    if !transform.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            drop(unsafe { Box::from_raw(transform as *mut Box<dyn DynTransform>) })
        }));
    }
}

/// Exports a plugin: its name, version and components.
///
/// ```text
/// ivado_sdk::export_plugin! {
///     name: "unet",
///     version: env!("CARGO_PKG_VERSION"),
///     architectures: [Unet2d],
///     transforms: [],
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (
        name: $name:expr,
        version: $version:expr,
        architectures: [$($arch:ty),* $(,)?],
        transforms: [$($transform:ty),* $(,)?] $(,)?
    ) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn ivado_plugin_entry() -> *const $crate::abi::PluginTable {
            fn registry() -> $crate::export::Registry {
                $crate::export::Registry {
                    name: $name,
                    version: $version,
                    architectures: vec![$($crate::export::ArchitectureEntry::of::<$arch>()),*],
                    transforms: vec![$($crate::export::TransformEntry::of::<$transform>()),*],
                }
            }
            $crate::export::entry(registry)
        }
    };
}
