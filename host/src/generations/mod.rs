//! Generations: loading an app library (file checks, trust check, in-memory
//! copy, ELF check, `dlopen`, ABI check, init), a library's bytes kept for
//! later loads ([`snapshot`]), the [`Generation`] it becomes, the
//! [`Current`] one new requests go to, and unloading a generation once its
//! last lease is gone.
//!
//! The blocking work runs on long-lived threads ([`background`]): the
//! loader's, the drain's and the unload's.
//!
//! Imports only `config` (units) and `ffi`.

mod background;
pub mod copies;
mod current;
pub mod elf;
mod generation;
pub mod loader;
pub mod snapshot;
pub mod stalls;
pub mod trust;
mod unload;

pub use current::Current;
pub use generation::{Generation, InFlight, UpgradedLease};
pub use unload::{begin_exit, wait_for_unloads};

/// How many app libraries have been left mapped on purpose (threads,
/// signal handlers or keys of theirs could still run) since the start.
pub fn pinned_generations() -> u64 {
    crate::ffi::kept_mapped()
}

/// The unload guard (see ARCHITECTURE.md): thread-local destructors and
/// pthread keys of app code never run after their library is unmapped.
pub mod unload_guard {
    pub use crate::ffi::unload_guard::{is_enabled, set_enabled, skipped_destructors};
}
