//! pounce-host: an HTTP server that serves web apps compiled as `cdylib`
//! plugins and swaps in new app code while it keeps serving.
//!
//! See ARCHITECTURE.md at the repository root for the map of this crate, the
//! request path, the reload path and the invariants around app libraries.

pub mod access;
pub mod body;
pub mod check;
pub mod cli;
pub mod config;
pub mod connection;
pub mod drain;
pub mod elf;
pub mod events;
mod ffi;
pub mod generation;
pub mod health;
pub mod loader;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod run;
pub mod sd_notify;
pub mod server;
pub mod service;
pub mod signals;
pub mod watch;

/// The thread-local destructor guard (see `ffi::tls_guard`).
pub mod tls {
    pub use crate::ffi::tls_guard::{is_enabled, skipped_destructors};

    /// Turns the guard on or off, before the first library loads.
    pub fn configure(enabled: bool) {
        crate::ffi::tls_guard::set_enabled(enabled);
    }
}

pub use ffi::{AppInfo, LoadedApp, Unloaded};
