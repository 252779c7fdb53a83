//! Operations: what the server tells the people and systems that run it.
//! Lifecycle [`events`](Event) go through the [`Reporter`] to the log,
//! systemd's notify socket and the Prometheus metrics; the health
//! [`Snapshot`] is rendered here.
//!
//! Imports only `config` (units) and `ffi` (the raw clock).

mod events;
pub mod health;
pub mod metrics;
mod reporter;
pub mod sd_notify;

pub use events::Event;
pub use health::{ReloadReport, Snapshot};
pub use reporter::Reporter;
