//! Write a web app that `pounce-host` serves and hot-swaps.
//!
//! An app is a `cdylib` crate with one type that implements [`App`] and one
//! [`export_app!`] line. The host loads the library, calls [`App::init`] once
//! per *generation* (a loaded copy of the library; a reload makes a new one),
//! then calls [`App::handle`] for every request.
//!
//! ```no_run
//! use app_abi::{export_app, App, InitContext, InitError, Request, Response};
//!
//! struct Hello;
//!
//! impl App for Hello {
//!     fn init(_ctx: &InitContext) -> Result<Self, InitError> {
//!         Ok(Hello)
//!     }
//!
//!     async fn handle(&self, req: Request<'_>) -> Response {
//!         match req.path() {
//!             "/" => Response::text("Hello, World!"),
//!             _ => Response::text("not found\n").with_status(404),
//!         }
//!     }
//! }
//!
//! export_app!(Hello);
//! ```
//!
//! # Async code in an app
//!
//! Handlers are ordinary async Rust: `tokio::time::sleep`, `tokio::spawn`,
//! async I/O and [`tokio::task::spawn_blocking`] all work (use the
//! [`tokio`] re-exported here, so the app and this crate share one copy).
//! Each generation owns a tokio runtime ([`App::RUNTIME_THREADS`] worker
//! threads plus a blocking pool) that drives timers, I/O and spawned tasks;
//! the handler future itself is polled inline on the host's threads with that
//! runtime entered, so a request that does not wait costs no thread hop.
//!
//! Never block a thread inside a handler (`std::thread::sleep`, blocking file
//! or network calls, long CPU work): the handler runs on one of the host's
//! worker threads, and every other request that thread would serve waits.
//! Move such work to the generation's blocking pool with
//! `tokio::task::spawn_blocking(...).await`.
//!
//! # Lifecycle
//!
//! [`App::drain`] is called when a newer generation takes over: this one gets
//! no new requests, and long-lived responses should end soon (see
//! [`InitContext::drain_signal`]). [`App::shutdown`] is called once nothing of
//! the generation runs any more, before its runtime stops and the library is
//! unloaded: stop any thread the app started itself.
//!
//! Panics are caught at the boundary: a panicking handler gives the client a
//! `500`, a panicking `init` fails the load. Build apps with the default
//! `panic = "unwind"`.
//!
//! # Bring your axum app (feature `tower` or `axum`)
//!
//! An app can also be any `tower::Service` over `http` types, an axum
//! `Router` say: [`export_service!`] serves the service a function of the
//! app builds at `init` (see the `service` module). With the `axum` feature,
//! requests carry axum's `ConnectInfo<SocketAddr>`, and WebSocket upgrades
//! (`axum::extract::ws`) work unchanged.
//!
//! # Upgraded connections
//!
//! [`Response::upgrade`] takes over the connection of an HTTP/1.1 request
//! with `Upgrade` ([`Request::is_upgrade`]): after the host sent the `101`,
//! the app reads and writes the client's bytes. The connection keeps its
//! generation's code loaded; when the generation drains, close it the
//! protocol's way: the host cuts it at `reload_timeout`.
//!
//! # Logging
//!
//! `tracing` events from the app (use [`tracing`] re-exported here) are
//! printed by the host, tagged with the generation. Do not install a global
//! subscriber in the app.

pub mod ffi;

mod context;
mod log;
mod request;
mod response;
#[cfg(feature = "tower")]
pub mod service;

use std::future::Future;

pub use bytes::{self, Bytes};
pub use context::{DrainSignal, InitContext};
pub use futures_core::Stream;
pub use request::{BodyError, OwnedBody, Request, RequestBody, Version};
pub use response::{BodySender, ClientGone, Response, Upgraded};
pub use tokio;
pub use tracing;

/// Why an app could not start: any error type converts into it with `?`.
pub type InitError = Box<dyn std::error::Error + Send + Sync>;

/// A web app. One value is built per generation by [`App::init`] and shared by
/// all of that generation's requests.
pub trait App: Send + Sync + Sized + 'static {
    /// Worker threads of the generation's tokio runtime, which drives timers,
    /// I/O and spawned tasks (handler futures themselves run on the host's
    /// threads).
    const RUNTIME_THREADS: usize = 1;

    /// Builds the app for a new generation. Runs inside the generation's
    /// runtime, so it may spawn background tasks. An error fails the load:
    /// at start the host exits, on a reload the old generation keeps serving.
    fn init(ctx: &InitContext) -> Result<Self, InitError>;

    /// Answers one request. Implement it as `async fn handle(&self, req:
    /// Request<'_>) -> Response`.
    fn handle<'a>(&'a self, req: Request<'a>) -> impl Future<Output = Response> + Send + 'a;

    /// This generation gets no new requests from now on. Called once.
    fn drain(&self) {}

    /// Called once before the generation's runtime stops and its library is
    /// released: stop threads the app started itself.
    fn shutdown(&self) {}
}

/// Exports `$app` (a type that implements [`App`]) as this library's app.
/// Use it once, in a crate built as `crate-type = ["cdylib"]`.
#[macro_export]
macro_rules! export_app {
    ($app:ty) => {
        #[doc(hidden)]
        #[no_mangle]
        pub extern "C" fn pounce_app_entry() -> *const $crate::ffi::AppVTable {
            static VTABLE: $crate::ffi::AppVTable =
                $crate::ffi::vtable::<$app>(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));
            &VTABLE
        }
    };
}

/// Exports the `tower::Service` that `$make` builds as this library's app
/// (feature `tower`). `$make` is a function `fn(&InitContext) -> Result<S, E>`
/// called once per generation, inside the generation's runtime; `S` is a
/// `Service<http::Request<app_abi::service::Body>>` that is `Clone` (an
/// axum `Router` with its state applied: `Router<()>`), and `E` converts into
/// [`InitError`]. Use it once, in a crate built as `crate-type = ["cdylib"]`.
/// `runtime_threads = N` sets [`App::RUNTIME_THREADS`].
///
/// ```ignore
/// fn app(ctx: &app_abi::InitContext) -> Result<axum::Router, app_abi::InitError> {
///     Ok(axum::Router::new().route("/", axum::routing::get(|| async { "Hello, World!" })))
/// }
/// app_abi::export_service!(app);
/// ```
#[cfg(feature = "tower")]
#[macro_export]
macro_rules! export_service {
    ($make:expr) => {
        $crate::export_service!($make, runtime_threads = 1);
    };
    ($make:expr, runtime_threads = $threads:expr) => {
        #[doc(hidden)]
        pub struct __PounceService($crate::service::ServiceApp);

        impl $crate::App for __PounceService {
            const RUNTIME_THREADS: usize = $threads;

            fn init(ctx: &$crate::InitContext) -> ::std::result::Result<Self, $crate::InitError> {
                let service = $crate::service::made(($make)(ctx))?;
                ::std::result::Result::Ok(__PounceService($crate::service::ServiceApp::new(service)))
            }

            fn handle<'a>(
                &'a self,
                req: $crate::Request<'a>,
            ) -> impl ::std::future::Future<Output = $crate::Response> + ::std::marker::Send + 'a {
                self.0.handle(req)
            }
        }

        $crate::export_app!(__PounceService);
    };
}
