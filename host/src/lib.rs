//! pounce-host: an HTTP server that serves web apps compiled as `cdylib`
//! plugins and swaps in new app code while it keeps serving.
//!
//! The crate is layered; each layer imports only the layers below it:
//!
//! | layer | holds |
//! |---|---|
//! | [`process`] | process mode: the supervisor, its workers, their control channel |
//! | [`lifecycle`] | start-up, signals, reload, drain, shutdown, file watching |
//! | [`front`] | listener, connections, the request path, response bodies |
//! | [`operations`] | lifecycle events, systemd notify, metrics, health data |
//! | [`generations`] | loading, the generation, the current one, unloading |
//! | [`config`] | flags, environment, config file, units |
//! | `ffi` | all `unsafe`: dlopen, the app's C ABI, the unload guard |
//!
//! [`check`] and [`logging`] serve the binary's subcommands. See
//! ARCHITECTURE.md at the repository root for the map, the request path,
//! the reload path and the invariants around app libraries.

pub mod check;
pub mod config;
mod ffi;
pub mod front;
pub mod generations;
pub mod lifecycle;
pub mod logging;
pub mod operations;
pub mod process;

pub use ffi::{AppInfo, LoadedApp, PinningSignal, PinningThread, Pins, Unloaded};
