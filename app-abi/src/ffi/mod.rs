//! The C ABI between pounce-host and an app library, version 2 (version 1
//! plus HTTP upgrades: `RequestHead::upgrade`, `ResponseHead::io`, the
//! `io_*` entry points).
//!
//! Everything that crosses the boundary is defined here as `#[repr(C)]` data
//! and `extern "C"` functions, so a host and an app built by different rustc
//! versions agree on it. No Rust type with an unstable layout (`String`,
//! `Vec`, trait objects, `Waker`) ever crosses.
//!
//! This is the only module of `app-abi` with `unsafe` code. Its parts, one
//! file each, bottom up:
//! - `abi`: the ABI types both sides read ([`AppVTable`], [`HostVTable`],
//!   [`RequestHead`], [`ResponseHead`], [`FfiWaker`], ...);
//! - `waker`: the waker bridge both sides use to poll each other's futures;
//! - `host`: the app side's link to its host (its table, the log) and safe
//!   views of the request data the host lends;
//! - `header_list`: response headers kept in the C form the host reads;
//! - `glue`: what the [`export_app!`](crate::export_app) macro instantiates
//!   for an app type: it catches every panic, enters the generation's own
//!   tokio runtime around every call, and owns every buffer it hands out
//!   until the host gives it back.
//!
//! Imports go only downwards, so there is no circle: the four lower parts
//! import nothing from the safe API (`request`, `response`, `context`,
//! `log`); the safe API imports only them; `glue` sits on top of both to
//! drive an [`App`](crate::App).
//!
//! Ownership rules (the host relies on them to unload a library safely):
//! - A buffer is freed by the side that allocated it. Data the host passes in
//!   (a [`RequestHead`], a body chunk) is borrowed; data the app passes out
//!   (a [`ResponseHead`], a stream chunk) is borrowed until the host calls the
//!   app's `drop_response` / next `poll_chunk` / `drop_stream`. An upgraded
//!   connection's [`AppIo`] belongs to the host from the response on, until
//!   it calls `drop_io`; bytes cross `io_read` / `io_write` in buffers the
//!   host lends for the call.
//! - The host keeps a request's [`RequestHead`] and [`HostBody`] alive until it
//!   has called `drop_response` for that request's future.
//! - The host calls `shutdown` only after every future, stream and upgraded
//!   connection of the generation was dropped, and never calls into the
//!   library afterwards.
//! - The app may read a request body after its handler returned (an owned
//!   body moved into a task): the glue's `drop_response` closes that
//!   body's gate first, so no `body_poll` reaches the host after it.

pub(crate) mod abi;
mod glue;
pub(crate) mod header_list;
pub(crate) mod host;
mod waker;

pub use abi::{
    body_kind, body_status, level, status, version, AppInstance, AppIo, AppVTable, BodyStream, EntryFn, FfiWaker,
    FfiWakerVTable, Header, HostBody, HostVTable, InitContextC, OwnedString, PeerAddr, RequestHead, ResponseFuture,
    ResponseHead, Slice, ABI_VERSION, BODY_SIZE_UNKNOWN, ENTRY_SYMBOL,
};
#[doc(hidden)]
pub use glue::vtable;
pub use waker::with_foreign_waker;
