//! Logging from inside a plugin. Messages go through the callback the host installs, so they land in the
//! host's `tracing` output with the plugin's name; a plugin never sets up logging state of its own.
use crate::abi::{LogCallback, LogLevel, StrRef};
use std::sync::atomic::{AtomicUsize, Ordering};

static CALLBACK: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn install(callback: LogCallback) {
    CALLBACK.store(callback as usize, Ordering::Release);
}

/// Sends one message to the host. Before the host installed its callback, messages go to stderr.
pub fn log(level: LogLevel, message: &str) {
    let raw = CALLBACK.load(Ordering::Acquire);
    if raw == 0 {
        eprintln!("[plugin {level:?}] {message}");
        return;
    }
    // SAFETY: only `install` stores into CALLBACK, always a valid `LogCallback`.
    let callback: LogCallback = unsafe { std::mem::transmute::<usize, LogCallback>(raw) };
    // SAFETY: the StrRef borrows `message` for the duration of the call, as the ABI specifies.
    unsafe { callback(level as u32, StrRef::from_str(message)) };
}

pub fn error(message: &str) {
    log(LogLevel::Error, message)
}
pub fn warn(message: &str) {
    log(LogLevel::Warn, message)
}
pub fn info(message: &str) {
    log(LogLevel::Info, message)
}
pub fn debug(message: &str) {
    log(LogLevel::Debug, message)
}
