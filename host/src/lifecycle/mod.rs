//! The lifecycle: start-up and the signal loop ([`serve`]), signals,
//! serialized reloads ([`reload`]), draining a replaced generation
//! ([`drain`]), the shutdown sequence ([`shutdown`]) and the file watcher
//! that triggers reloads in development ([`watch`]); thread mode's
//! [`preflight`] of a new library in a child process; describing how a
//! child process ended ([`exit`]); the watchdog that reports app calls
//! that block a server thread ([`stall_watch`]); the binary upgrade
//! ([`upgrade`]).
//!
//! The top layer: imports `front`, `generations`, `operations`, `config`.

pub mod drain;
pub mod exit;
pub mod preflight;
pub mod reload;
pub mod serve;
pub mod shutdown;
pub mod signals;
pub mod stall_watch;
pub mod upgrade;
pub mod watch;
