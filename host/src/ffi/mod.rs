//! Everything `unsafe` in the host: opening app libraries, calling through
//! their C ABI, the unload guard (thread-local destructors, thread-specific
//! keys, which code started each thread) and the checks before an unload,
//! the raw clock, and small process queries (user id, thread priority,
//! descriptors, signals, shared counters).
//!
//! The rest of the host is safe code that uses four types from here:
//! [`LoadedApp`] (one opened library with its initialized app), [`AppCall`]
//! (one request in flight inside an app), [`AppStream`] (a streamed
//! response body produced by an app) and `AppIo` (the app's end of an
//! upgraded connection). Each of them holds what keeps the
//! library's code loaded for as long as the host may call into it.

mod app;
pub mod clock;
pub mod identity;
mod library;
mod pins;
pub mod priority;
pub mod process;
mod threads;
pub mod unload_guard;

pub use app::{
    kept_mapped, AppBody, AppCall, AppInfo, AppResponse, AppStream, CallError, Lease, LoadedApp, OpenError,
    OpenedLibrary, Unloaded, Upgrade,
};
pub use pins::{PinningSignal, PinningThread, Pins};
