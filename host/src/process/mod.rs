//! Process mode: app code runs in supervised worker processes, so a crash,
//! hang or exit in the app never takes the service down.
//!
//! The [`supervisor`] binds the listening socket once, never loads app
//! code, and starts each [`worker`] by executing its own binary again with
//! the socket, a [`control`] channel and the generation's library
//! snapshot (`generations::snapshot`) at fixed descriptors. Workers serve with the thread-mode
//! code (`front`, `generations`).
//!
//! The top layer beside `lifecycle`: imports `lifecycle`, `front`,
//! `generations`, `operations`, `config`, `ffi`.

pub mod control;
pub mod supervisor;
mod totals;
pub mod worker;
