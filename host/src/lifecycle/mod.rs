//! The lifecycle: start-up and the signal loop ([`serve`]), signals,
//! serialized reloads ([`reload`]), draining a replaced generation
//! ([`drain`]), the shutdown sequence ([`shutdown`]) and the file watcher
//! that triggers reloads in development ([`watch`]) and the binary upgrade
//! ([`upgrade`]).
//!
//! The top layer: imports `front`, `generations`, `operations`, `config`.

pub mod drain;
pub mod reload;
pub mod serve;
pub mod shutdown;
pub mod signals;
pub mod upgrade;
pub mod watch;
