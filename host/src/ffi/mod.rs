//! Everything `unsafe` in the host: opening app libraries, calling through
//! their C ABI, the thread-local destructor guard, and the raw clock.
//!
//! The rest of the host is safe code that uses four types from here:
//! [`LoadedApp`] (one opened library with its initialized app), [`AppCall`]
//! (one request in flight inside an app), [`AppStream`] (a streamed
//! response body produced by an app) and `AppIo` (the app's end of an
//! upgraded connection). Each of them holds what keeps the
//! library's code loaded for as long as the host may call into it.

mod app;
pub mod clock;
mod library;
pub mod priority;
pub mod process;
pub mod unload_guard;

pub use app::{
    AppBody, AppCall, AppInfo, AppResponse, AppStream, CallError, Lease, LoadedApp, OpenError, OpenedLibrary, Unloaded,
    Upgrade,
};
