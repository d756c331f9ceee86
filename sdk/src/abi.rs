//! What crosses the host/plugin boundary, and nothing else.
//!
//! A plugin library exports one symbol, [`ENTRY_SYMBOL`], an `extern "C" fn() -> *const PluginTable`. The
//! table starts with an [`AbiRecord`] whose layout is frozen for every ABI version, so a host can always read
//! the record of any plugin, and refuse a mismatch, before it touches anything else in the table.
//!
//! Conventions for every function in the table:
//! - The return value is a [`Status`]. On anything but `Ok`, `*err` holds a message owned by the plugin; the
//!   host copies it and hands it back through `free_string`.
//! - Strings are UTF-8, passed as pointer + length ([`StrRef`]), borrowed for the duration of the call.
//! - Tensors are raw libtorch handles (`torch_sys::C_tensor*`, a heap `at::Tensor`). Handles passed *in* are
//!   borrowed: the plugin takes its own shallow clone if it keeps them. Handles passed *out* (return values,
//!   sinks) are owned by the receiver, which frees them with libtorch's `at_free`. Both sides must link the
//!   same libtorch build, which the record's `libtorch_version` guards.
//! - Opaque handles (`*mut c_void`) returned by `*_create` stay valid until the matching `*_drop`, and the
//!   host must keep the library loaded until then.
use std::ffi::c_void;

/// Bumped on any change to [`PluginTable`] after its first field.
pub const ABI_VERSION: u32 = 3;

/// The one symbol a plugin exports, NUL-terminated for `dlsym`.
pub const ENTRY_SYMBOL: &[u8] = b"ivado_plugin_entry\0";

/// First 8 bytes of every record: `IVADOPLG` as little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"IVADOPLG");

/// The libtorch this crate was compiled against, as in torch's `version.py` (e.g. `2.13.0+cu130`).
pub const LIBTORCH_VERSION: &str = env!("IVADO_LIBTORCH_VERSION");

/// Directory holding the libtorch shared libraries this crate was compiled against.
pub const LIBTORCH_LIB_DIR: &str = env!("IVADO_LIBTORCH_LIB");

/// The SDK crate version the plugin was built with.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

pub type TensorHandle = *mut torch_sys::C_tensor;

/// Borrowed UTF-8 string.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StrRef {
    pub ptr: *const u8,
    pub len: usize,
}

// SAFETY: a StrRef in a static points at a `&'static str`; it is never written through.
unsafe impl Sync for StrRef {}
unsafe impl Send for StrRef {}

impl StrRef {
    pub const EMPTY: StrRef = StrRef {
        ptr: std::ptr::null(),
        len: 0,
    };

    pub const fn from_str(text: &str) -> Self {
        Self {
            ptr: text.as_ptr(),
            len: text.len(),
        }
    }

    /// # Safety
    /// `ptr` must point at `len` readable bytes that outlive `'a`.
    pub unsafe fn as_str<'a>(self) -> &'a str {
        if self.ptr.is_null() || self.len == 0 {
            return "";
        }
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        std::str::from_utf8(bytes).unwrap_or("<invalid UTF-8>")
    }
}

/// A string allocated by the plugin and freed by the plugin's `free_string`, so that allocation and free
/// always happen in the same image.
#[repr(C)]
pub struct OwnedStr {
    pub ptr: *mut u8,
    pub len: usize,
    pub capacity: usize,
}

impl OwnedStr {
    pub const EMPTY: OwnedStr = OwnedStr {
        ptr: std::ptr::null_mut(),
        len: 0,
        capacity: 0,
    };

    /// Leaks `text` into an OwnedStr; reclaim it with [`OwnedStr::into_string`] in the same image.
    pub fn from_string(text: String) -> Self {
        let mut text = std::mem::ManuallyDrop::new(text);
        Self {
            ptr: text.as_mut_ptr(),
            len: text.len(),
            capacity: text.capacity(),
        }
    }

    /// # Safety
    /// Must come from [`OwnedStr::from_string`] in this same image, and be reclaimed once.
    pub unsafe fn into_string(self) -> String {
        if self.ptr.is_null() {
            return String::new();
        }
        unsafe { String::from_raw_parts(self.ptr, self.len, self.capacity) }
    }

    /// # Safety
    /// The bytes must still be alive (not yet freed).
    pub unsafe fn as_str(&self) -> &str {
        unsafe {
            StrRef {
                ptr: self.ptr,
                len: self.len,
            }
            .as_str()
        }
    }
}

#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    /// The plugin reported an error; `*err` says what.
    Error = 1,
    /// The plugin panicked; it was caught inside the plugin and `*err` holds the panic message.
    Panic = 2,
}

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// Host logging callback: `(level as u32, message)`.
pub type LogCallback = unsafe extern "C" fn(level: u32, message: StrRef);

/// Identity and build of a plugin. Its layout is frozen: new fields only ever go in [`PluginTable`].
#[repr(C)]
pub struct AbiRecord {
    pub magic: u64,
    pub abi_version: u32,
    pub libtorch_version: StrRef,
    pub sdk_version: StrRef,
    pub plugin_name: StrRef,
    pub plugin_version: StrRef,
}

/// Receives named tensors from the plugin, e.g. a model's parameters. `flags` is a bit set of `TENSOR_*`.
#[repr(C)]
pub struct TensorSink {
    pub ctx: *mut c_void,
    pub push:
        unsafe extern "C" fn(ctx: *mut c_void, name: StrRef, tensor: TensorHandle, flags: u32),
}

/// The tensor is trained by the optimizer (as opposed to a buffer such as batch-norm running statistics).
pub const TENSOR_TRAINABLE: u32 = 1;

/// A sample handed to a transform: parallel arrays of names and borrowed tensor handles, plus metadata JSON.
#[repr(C)]
pub struct SampleIn {
    pub names: *const StrRef,
    pub tensors: *const TensorHandle,
    pub len: usize,
    pub meta_json: StrRef,
}

/// Receives a transformed sample: every tensor (owned by the host after the call) and the new metadata JSON.
#[repr(C)]
pub struct SampleSink {
    pub ctx: *mut c_void,
    pub push_tensor: unsafe extern "C" fn(ctx: *mut c_void, name: StrRef, tensor: TensorHandle),
    pub set_meta: unsafe extern "C" fn(ctx: *mut c_void, meta_json: StrRef),
}

/// Device code for `model_create`: -1 is CPU, n >= 0 is CUDA device n.
pub type DeviceCode = i64;

/// The plugin table, ABI version 3 (2 replaced forward's `train` flag with a [`crate::Mode`] code; 3 added
/// `transform_apply_batch`).
#[repr(C)]
pub struct PluginTable {
    /// Must stay the first field.
    pub record: AbiRecord,
    /// Installs the host's log callback. Called once, right after the record was accepted.
    pub set_logger: unsafe extern "C" fn(callback: LogCallback),
    /// Frees a string the plugin handed out.
    pub free_string: unsafe extern "C" fn(text: OwnedStr),
    /// JSON: `{"architectures": [{"name", "summary", "defaults"}], "transforms": [...]}`.
    pub describe: unsafe extern "C" fn(out: *mut OwnedStr, err: *mut OwnedStr) -> Status,

    pub model_create: unsafe extern "C" fn(
        name: StrRef,
        config_json: StrRef,
        device: DeviceCode,
        out: *mut *mut c_void,
        err: *mut OwnedStr,
    ) -> Status,
    /// Pushes every parameter and buffer, named like the equivalent PyTorch `state_dict` keys. The tensors
    /// share storage with the model's own, so the host's optimizer updates the model in place.
    pub model_parameters:
        unsafe extern "C" fn(model: *mut c_void, sink: TensorSink, err: *mut OwnedStr) -> Status,
    pub model_forward: unsafe extern "C" fn(
        model: *mut c_void,
        inputs: *const TensorHandle,
        n_inputs: usize,
        mode: u8, // a crate::Mode
        out: *mut TensorHandle,
        err: *mut OwnedStr,
    ) -> Status,
    pub model_drop: unsafe extern "C" fn(model: *mut c_void),

    pub transform_create: unsafe extern "C" fn(
        name: StrRef,
        config_json: StrRef,
        out: *mut *mut c_void,
        err: *mut OwnedStr,
    ) -> Status,
    /// Applies the transform with `seed`; `*undo` receives the undo record as JSON.
    pub transform_apply: unsafe extern "C" fn(
        transform: *mut c_void,
        sample: SampleIn,
        seed: u64,
        out: SampleSink,
        undo: *mut OwnedStr,
        err: *mut OwnedStr,
    ) -> Status,
    pub transform_undo: unsafe extern "C" fn(
        transform: *mut c_void,
        sample: SampleIn,
        undo_json: StrRef,
        out: SampleSink,
        err: *mut OwnedStr,
    ) -> Status,
    pub transform_drop: unsafe extern "C" fn(transform: *mut c_void),
    /// Applies the transform to a batch of `n_seeds` samples at once: `batch` holds stacked `[B, ...]` tensors and,
    /// as `meta_json`, a JSON array of the B samples' metadata objects; sample `i` draws only from `seeds[i]`.
    /// `out` receives the stacked tensors and (through `set_meta`) the JSON array of the B new metadata objects;
    /// `*undo` receives a JSON array of the B undo records.
    pub transform_apply_batch: unsafe extern "C" fn(
        transform: *mut c_void,
        batch: SampleIn,
        seeds: *const u64,
        n_seeds: usize,
        out: SampleSink,
        undo: *mut OwnedStr,
        err: *mut OwnedStr,
    ) -> Status,
}

// SAFETY: the table is immutable after construction and only holds function pointers and static strings.
unsafe impl Sync for PluginTable {}
unsafe impl Send for PluginTable {}

/// Signature of [`ENTRY_SYMBOL`].
pub type EntryFn = unsafe extern "C" fn() -> *const PluginTable;
