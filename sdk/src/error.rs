use std::fmt;

/// An error a plugin reports to the host. It crosses the boundary as its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError(pub String);

pub type Result<T, E = PluginError> = std::result::Result<T, E>;

impl PluginError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PluginError {}

impl From<tch::TchError> for PluginError {
    /// libtorch errors carry a long C++ backtrace after the first line; users only need the first line.
    fn from(error: tch::TchError) -> Self {
        Self(first_line(&error.to_string()).to_owned())
    }
}

impl From<String> for PluginError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for PluginError {
    fn from(message: &str) -> Self {
        Self(message.to_owned())
    }
}

/// The first non-empty line of a message.
pub fn first_line(message: &str) -> &str {
    message
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or(message)
}
