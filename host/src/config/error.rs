//! What goes wrong with a setting, and where its value came from.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Top-level keys of the config file, listed in the unknown-key error.
/// `library` is not among them: only the command line chooses which code
/// runs.
pub const FILE_KEYS: [&str; 40] = [
    "host",
    "port",
    "uds",
    "uds_mode",
    "tls_cert",
    "tls_key",
    "admin_listen",
    "workers",
    "backlog",
    "max_connections",
    "reload_timeout",
    "shutdown_timeout",
    "request_timeout",
    "keep_alive_timeout",
    "header_timeout",
    "send_timeout",
    "stall_warning",
    "max_body_size",
    "max_header_size",
    "h2_max_concurrent_streams",
    "h2_keep_alive",
    "health_path",
    "log_format",
    "log_level",
    "unload_guard",
    "reload",
    "reload_dir",
    "reload_include",
    "metrics_path",
    "access_log",
    "preflight",
    "mode",
    "processes",
    "worker_timeout",
    "max_restarts",
    "restart_window",
    "rollback_window",
    "allow_insecure_library",
    "staging_dir",
    "app",
];

/// A setting that cannot be used. Each message says where the value came
/// from, what is wrong with it and what is expected instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file is missing or unreadable.
    #[error("config file {}: cannot read it: {error}", path.display())]
    ReadFile { path: PathBuf, error: io::Error },
    /// The `--config` file is not TOML at all.
    #[error("config file {}: not valid TOML: {error}", path.display())]
    ParseFile { path: PathBuf, error: toml::de::Error },
    /// A config file key that no setting has, most likely a typo.
    #[error(
        "config file {}: unknown key {key:?}: expected one of {}",
        path.display(),
        FILE_KEYS.join(", ")
    )]
    UnknownKey { path: PathBuf, key: String },
    /// Settings that do not go together, e.g. --tls-cert without --tls-key.
    #[error("{0}")]
    Conflict(String),
    /// A value of the wrong type, malformed, or out of range.
    #[error("{origin} = {value}: {problem}")]
    InvalidValue {
        origin: Origin,
        /// The value as the operator wrote it (quoted if it is text).
        value: String,
        problem: String,
    },
}

/// Where a setting's value came from, so an error points at the right place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A flag or its environment variable; clap does not say which.
    Flag { key: &'static str },
    /// A key of the config file; `app.<name>` for the `[app]` table.
    File { path: PathBuf, key: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag { key } => write!(f, "--{} / POUNCE_{}", key.replace('_', "-"), key.to_ascii_uppercase()),
            Origin::File { path, key } => write!(f, "config file {}: {key}", path.display()),
        }
    }
}
