//! The C ABI between pounce-host and an app library, version 1.
//!
//! Everything that crosses the boundary is defined here as `#[repr(C)]` data
//! and `extern "C"` functions, so a host and an app built by different rustc
//! versions agree on it. No Rust type with an unstable layout (`String`,
//! `Vec`, trait objects, `Waker`) ever crosses.
//!
//! This is the only module of `app-abi` with `unsafe` code. It has three
//! parts:
//! - the ABI types both sides read ([`AppVTable`], [`HostVTable`],
//!   [`RequestHead`], [`ResponseHead`], [`FfiWaker`], ...);
//! - the app-side glue that the [`export_app!`](crate::export_app) macro
//!   instantiates for an app type: it catches every panic, enters the
//!   generation's own tokio runtime around every call, and owns every buffer
//!   it hands out until the host gives it back;
//! - the waker bridge both sides use to poll each other's futures.
//!
//! Ownership rules (the host relies on them to unload a library safely):
//! - A buffer is freed by the side that allocated it. Data the host passes in
//!   (a [`RequestHead`], a body chunk) is borrowed; data the app passes out
//!   (a [`ResponseHead`], a stream chunk) is borrowed until the host calls the
//!   app's `drop_response` / next `poll_chunk` / `drop_stream`.
//! - The host keeps a request's [`RequestHead`] and [`HostBody`] alive until it
//!   has called `drop_response` for that request's future.
//! - The host calls `shutdown` only after every future and stream of the
//!   generation was dropped, and never calls into the library afterwards.

use std::any::Any;
use std::ffi::c_void;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_core::Stream;

use crate::context::{DrainSignal, InitContext};
use crate::request::{BodyError, Request};
use crate::response::{Body, Headers, Response};
use crate::App;

/// The ABI version this crate implements. The host refuses any other.
pub const ABI_VERSION: u32 = 1;

/// The name of the one symbol an app library exports: an
/// `extern "C" fn() -> *const AppVTable`.
pub const ENTRY_SYMBOL: &str = "pounce_app_entry";

/// Signature of [`ENTRY_SYMBOL`].
pub type EntryFn = unsafe extern "C" fn() -> *const AppVTable;

// ---------------------------------------------------------------------------
// Plain data
// ---------------------------------------------------------------------------

/// Borrowed bytes: a pointer and a length. Who owns them and how long they
/// live is stated where a `Slice` is used.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Slice {
    pub ptr: *const u8,
    pub len: usize,
}

impl Slice {
    pub const EMPTY: Slice = Slice { ptr: std::ptr::NonNull::dangling().as_ptr(), len: 0 };

    pub const fn from_static(s: &'static str) -> Slice {
        Slice { ptr: s.as_ptr(), len: s.len() }
    }

    pub fn new(bytes: &[u8]) -> Slice {
        Slice { ptr: bytes.as_ptr(), len: bytes.len() }
    }

    /// Views the bytes.
    ///
    /// # Safety
    /// `ptr` must point to `len` initialized bytes that stay valid and
    /// unchanged for `'a`; a null `ptr` is allowed only with `len == 0`.
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: the caller upholds the contract above.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

// SAFETY: a `Slice` is a borrowed view; the rules of the struct that holds it
// say how long it lives. It carries no thread affinity.
unsafe impl Send for Slice {}
// SAFETY: as above; it is never written through.
unsafe impl Sync for Slice {}

/// A string the app allocated and handed to the host, which must give it back
/// through [`AppVTable::free_string`].
#[repr(C)]
#[derive(Debug)]
pub struct OwnedString {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

impl OwnedString {
    pub const EMPTY: OwnedString = OwnedString { ptr: std::ptr::null_mut(), len: 0, cap: 0 };

    fn from_string(s: String) -> OwnedString {
        let mut s = ManuallyDrop::new(s);
        OwnedString { ptr: s.as_mut_ptr(), len: s.len(), cap: s.capacity() }
    }

    /// A copy of the text, lossily decoded as UTF-8.
    ///
    /// # Safety
    /// `self` was filled by an app's entry point (so it points to `len`
    /// initialized bytes) and has not been freed yet.
    pub unsafe fn to_string_lossy(&self) -> String {
        let slice = Slice { ptr: self.ptr, len: self.len };
        // SAFETY: see the function's contract.
        String::from_utf8_lossy(unsafe { slice.as_bytes() }).into_owned()
    }
}

/// A name/value pair: a request or response header, or an app setting.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub name: Slice,
    pub value: Slice,
}

/// HTTP version numbers as they cross the ABI.
pub mod version {
    pub const HTTP_09: u32 = 9;
    pub const HTTP_10: u32 = 10;
    pub const HTTP_11: u32 = 11;
    pub const HTTP_2: u32 = 20;
    pub const HTTP_3: u32 = 30;
}

/// Log levels as they cross the ABI (`0` means off).
pub mod level {
    pub const OFF: u32 = 0;
    pub const ERROR: u32 = 1;
    pub const WARN: u32 = 2;
    pub const INFO: u32 = 3;
    pub const DEBUG: u32 = 4;
    pub const TRACE: u32 = 5;
}

/// Results of the app's entry points. Plain `u32`s rather than Rust enums: a
/// value outside the known set from a foreign library must not be UB.
pub mod status {
    /// `init`: the app is ready. `poll_response`: the response head is in `out`.
    pub const OK: u32 = 0;
    /// The future or stream is not ready; the waker will be woken.
    pub const PENDING: u32 = 1;
    /// The app panicked (the panic was caught and logged inside the app).
    pub const PANICKED: u32 = 2;
    /// `init` returned an error; its message is in `out_error`.
    pub const FAILED: u32 = 3;
    /// `poll_chunk`: a chunk is in `out`, valid until the next call.
    pub const CHUNK: u32 = 4;
    /// `poll_chunk`: the stream ended.
    pub const END: u32 = 5;
    /// `shutdown`, or a failed `init` (message in `out_error`): some of the
    /// generation's threads did not stop in time, so the library must stay
    /// loaded.
    pub const THREADS_LEFT: u32 = 6;
}

/// Results of [`HostVTable::body_poll`].
pub mod body_status {
    /// A chunk is in `out`, valid until the next `body_poll` on that body.
    pub const CHUNK: u32 = 0;
    /// The body ended.
    pub const END: u32 = 1;
    /// Nothing yet; the waker will be woken.
    pub const PENDING: u32 = 2;
    /// The body is over the configured limit: the client gets `413` and the
    /// app sees no more. `out` holds the limit in bytes as decimal text.
    pub const TOO_LARGE: u32 = 3;
    /// Reading failed (the client went away...). `out` holds the reason.
    pub const ERROR: u32 = 4;
}

/// The kind of a response body in [`ResponseHead::body_kind`].
pub mod body_kind {
    /// `ResponseHead::body` holds the whole body.
    pub const BYTES: u32 = 0;
    /// `ResponseHead::stream` is a stream the host now owns.
    pub const STREAM: u32 = 1;
}

/// The peer of a connection: `family` is 4, 6, or 0 when unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr {
    pub family: u8,
    pub port: u16,
    /// The address in network order; an IPv4 address uses the first 4 bytes.
    pub ip: [u8; 16],
}

impl PeerAddr {
    pub const UNKNOWN: PeerAddr = PeerAddr { family: 0, port: 0, ip: [0; 16] };

    pub fn new(addr: SocketAddr) -> PeerAddr {
        let mut ip = [0; 16];
        let family = match addr.ip() {
            IpAddr::V4(v4) => {
                ip[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => {
                ip = v6.octets();
                6
            }
        };
        PeerAddr { family, port: addr.port(), ip }
    }

    pub fn to_socket_addr(self) -> Option<SocketAddr> {
        let ip = match self.family {
            4 => IpAddr::V4(Ipv4Addr::new(self.ip[0], self.ip[1], self.ip[2], self.ip[3])),
            6 => IpAddr::V6(Ipv6Addr::from(self.ip)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.port))
    }
}

/// Opaque: the host's request body. Only the host reads it.
#[repr(C)]
pub struct HostBody {
    _private: [u8; 0],
}

/// Opaque: an app instance (one per generation). Only the app reads it.
#[repr(C)]
pub struct AppInstance {
    _private: [u8; 0],
}

/// Opaque: a response future in the app. Only the app reads it.
#[repr(C)]
pub struct ResponseFuture {
    _private: [u8; 0],
}

/// Opaque: a streaming response body in the app. Only the app reads it.
#[repr(C)]
pub struct BodyStream {
    _private: [u8; 0],
}

/// A request as the host passes it to `handle`. Every pointer is owned by the
/// host and valid until the host calls `drop_response` on the future that
/// `handle` returned.
#[repr(C)]
pub struct RequestHead {
    pub method: Slice,
    /// The path, without the query, as sent (not percent-decoded).
    pub path: Slice,
    /// The query after `?` (not percent-decoded); `has_query` says if there was one.
    pub query: Slice,
    pub has_query: u8,
    pub version: u32,
    /// Headers in arrival order; names are lowercase ASCII.
    pub headers: *const Header,
    pub header_count: usize,
    pub peer: PeerAddr,
    /// Read with [`HostVTable::body_poll`].
    pub body: *mut HostBody,
}

// SAFETY: a `RequestHead` is immutable while the app sees it, and its body is
// only reached through `&mut` (see `Request::body`), so sharing it between the
// threads that poll one request is sound.
unsafe impl Sync for RequestHead {}
// SAFETY: as above; the host's data it points to is `Send`.
unsafe impl Send for RequestHead {}

/// A response head as the app fills it in `poll_response`. The pointers are
/// owned by the app's future and valid until `drop_response`; `stream`, when
/// `body_kind` is [`body_kind::STREAM`], now belongs to the host, which must
/// give it back with `drop_stream`.
#[repr(C)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: *const Header,
    pub header_count: usize,
    pub body_kind: u32,
    pub body: Slice,
    pub stream: *mut BodyStream,
}

impl ResponseHead {
    pub const EMPTY: ResponseHead = ResponseHead {
        status: 0,
        headers: std::ptr::null(),
        header_count: 0,
        body_kind: body_kind::BYTES,
        body: Slice::EMPTY,
        stream: std::ptr::null_mut(),
    };

    /// The headers as a slice.
    ///
    /// # Safety
    /// `self` must have been filled by an app's `poll_response` returning
    /// [`status::OK`] and the future must not have been dropped yet.
    pub unsafe fn header_slice(&self) -> &[Header] {
        if self.header_count == 0 || self.headers.is_null() {
            return &[];
        }
        // SAFETY: the app's glue points `headers` at `header_count` headers
        // that live in the future until `drop_response`.
        unsafe { std::slice::from_raw_parts(self.headers, self.header_count) }
    }
}

/// What the host gives an app at `init`. Valid only during the call; the
/// `host` table is valid for the life of the process.
#[repr(C)]
pub struct InitContextC {
    pub generation: u64,
    pub settings: *const Header,
    pub settings_count: usize,
    /// The most verbose level the host will print (see [`level`]).
    pub max_log_level: u32,
    pub host: *const HostVTable,
}

/// The functions the host offers an app. Static in the host: valid as long as
/// the process runs.
#[repr(C)]
pub struct HostVTable {
    pub abi_version: u32,
    pub size: u32,
    /// Prints one log record, tagged with the generation.
    pub log: unsafe extern "C" fn(generation: u64, level: u32, target: Slice, message: Slice),
    /// Polls a request body. `waker` is borrowed for the call. See [`body_status`].
    pub body_poll: unsafe extern "C" fn(body: *mut HostBody, waker: *const FfiWaker, out: *mut Slice) -> u32,
}

/// The table an app library exports through [`ENTRY_SYMBOL`]. The host checks
/// `abi_version` and `size` before it touches anything else.
#[repr(C)]
pub struct AppVTable {
    pub abi_version: u32,
    /// `size_of::<AppVTable>()` as the app saw it.
    pub size: u32,
    /// The app crate's name and version (static in the app).
    pub name: Slice,
    pub version: Slice,
    /// The version of `app-abi` the app was built with (static in the app).
    pub abi_crate_version: Slice,
    /// Builds the app. On [`status::OK`], `*out_app` is set; on
    /// [`status::FAILED`], [`status::PANICKED`] or [`status::THREADS_LEFT`],
    /// `*out_error` holds why.
    pub init: unsafe extern "C" fn(
        ctx: *const InitContextC,
        out_app: *mut *mut AppInstance,
        out_error: *mut OwnedString,
    ) -> u32,
    /// Starts handling a request and polls it once, so an answer that is
    /// ready at once costs one call. Returns like `poll_response`; on
    /// [`status::OK`] and [`status::PENDING`], `*out_future` is the future
    /// (the host polls it until OK, then gives it back with `drop_response`);
    /// on [`status::PANICKED`] it is null.
    pub handle: unsafe extern "C" fn(
        app: *const AppInstance,
        head: *const RequestHead,
        waker: *const FfiWaker,
        out: *mut ResponseHead,
        out_future: *mut *mut ResponseFuture,
    ) -> u32,
    /// [`status::OK`] (head in `out`), [`status::PENDING`] or [`status::PANICKED`].
    pub poll_response:
        unsafe extern "C" fn(future: *mut ResponseFuture, waker: *const FfiWaker, out: *mut ResponseHead) -> u32,
    pub drop_response: unsafe extern "C" fn(future: *mut ResponseFuture),
    /// [`status::CHUNK`] (in `out`), [`status::END`], [`status::PENDING`] or
    /// [`status::PANICKED`] (also used when the app's stream yields an error).
    pub poll_chunk: unsafe extern "C" fn(stream: *mut BodyStream, waker: *const FfiWaker, out: *mut Slice) -> u32,
    pub drop_stream: unsafe extern "C" fn(stream: *mut BodyStream),
    /// The generation gets no new requests from now on.
    pub drain: unsafe extern "C" fn(app: *const AppInstance),
    /// Stops the app and its runtime, waiting up to `timeout_ms` for its
    /// threads; frees the instance. [`status::OK`] or [`status::THREADS_LEFT`].
    pub shutdown: unsafe extern "C" fn(app: *mut AppInstance, timeout_ms: u64) -> u32,
    pub free_string: unsafe extern "C" fn(s: OwnedString),
}

// SAFETY: the table is immutable data and function pointers.
unsafe impl Sync for AppVTable {}
// SAFETY: the table is immutable data and function pointers.
unsafe impl Sync for HostVTable {}

// ---------------------------------------------------------------------------
// Wakers across the boundary
// ---------------------------------------------------------------------------

/// A waker as C data: `vtable` functions of the side that made it.
///
/// A waker passed *by pointer* into a call is borrowed: the callee may call
/// `wake_by_ref`, or `clone` to get an owned one, but never `wake` or `drop`.
/// An owned waker is consumed by exactly one `wake` or `drop`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FfiWaker {
    pub data: *const c_void,
    pub vtable: *const FfiWakerVTable,
}

#[repr(C)]
pub struct FfiWakerVTable {
    pub clone: unsafe extern "C" fn(data: *const c_void) -> FfiWaker,
    pub wake: unsafe extern "C" fn(data: *const c_void),
    pub wake_by_ref: unsafe extern "C" fn(data: *const c_void),
    pub drop: unsafe extern "C" fn(data: *const c_void),
}

impl FfiWaker {
    /// Lends `waker` to the other side for the duration of one call.
    pub fn borrowed(waker: &Waker) -> FfiWaker {
        FfiWaker { data: waker as *const Waker as *const c_void, vtable: &BORROWED_STD_WAKER }
    }
}

unsafe extern "C" fn std_waker_clone(data: *const c_void) -> FfiWaker {
    // SAFETY: `data` is a `&Waker` (borrowed) or a `Box<Waker>` (owned) made
    // by this module; both are live while the other side may call this.
    let waker = unsafe { &*(data as *const Waker) };
    FfiWaker { data: Box::into_raw(Box::new(waker.clone())) as *const c_void, vtable: &OWNED_STD_WAKER }
}

unsafe extern "C" fn std_waker_wake_by_ref(data: *const c_void) {
    // SAFETY: as in `std_waker_clone`.
    unsafe { &*(data as *const Waker) }.wake_by_ref();
}

unsafe extern "C" fn std_waker_wake_owned(data: *const c_void) {
    // SAFETY: an owned waker's `data` is a `Box<Waker>` from `std_waker_clone`,
    // consumed exactly once by `wake` or `drop`.
    unsafe { Box::from_raw(data as *mut Waker) }.wake();
}

unsafe extern "C" fn std_waker_drop_owned(data: *const c_void) {
    // SAFETY: as in `std_waker_wake_owned`.
    drop(unsafe { Box::from_raw(data as *mut Waker) });
}

unsafe extern "C" fn borrowed_waker_misuse(_data: *const c_void) {
    // A borrowed waker must never be consumed; ignoring the call is the only
    // safe answer (the lender still owns it).
}

static BORROWED_STD_WAKER: FfiWakerVTable = FfiWakerVTable {
    clone: std_waker_clone,
    wake: borrowed_waker_misuse,
    wake_by_ref: std_waker_wake_by_ref,
    drop: borrowed_waker_misuse,
};

static OWNED_STD_WAKER: FfiWakerVTable = FfiWakerVTable {
    clone: std_waker_clone,
    wake: std_waker_wake_owned,
    wake_by_ref: std_waker_wake_by_ref,
    drop: std_waker_drop_owned,
};

/// A waker lent for one call: the foreign waker and what keeps its code
/// loaded. `foreign` comes first in both bridge layouts so `wake_by_ref` can
/// read it from either.
#[repr(C)]
struct LentBridge<'a, K> {
    foreign: FfiWaker,
    keep_alive: Option<&'a K>,
}

/// An owned clone of a foreign waker, holding its own `keep_alive`.
#[repr(C)]
struct OwnedBridge<K> {
    foreign: FfiWaker,
    keep_alive: Option<K>,
}

/// Runs `f` with a `Context` whose waker forwards to the borrowed foreign
/// `waker`. Cloning that waker clones the foreign one and `keep_alive`: the
/// host passes its lease on the app's generation, so the app's code stays
/// loaded while any clone exists; the app passes `None` (the host's code
/// never goes away). Nothing is allocated or counted unless the waker is
/// cloned.
///
/// # Safety
/// `waker` must be a borrowed [`FfiWaker`] that stays valid during the call.
pub unsafe fn with_foreign_waker<K, R>(
    waker: *const FfiWaker,
    keep_alive: Option<&K>,
    f: impl FnOnce(&mut Context<'_>) -> R,
) -> R
where
    K: Clone + Send + Sync + 'static,
{
    // SAFETY: the caller guarantees `waker` is valid for this call.
    let foreign = unsafe { *waker };
    let lent = LentBridge { foreign, keep_alive };
    let raw = RawWaker::new(&lent as *const LentBridge<'_, K> as *const (), lent_vtable::<K>());
    // SAFETY: the lent vtable upholds RawWaker's contract for a `&LentBridge`
    // that outlives the `Waker`: the waker is never dropped or consumed (it is
    // `ManuallyDrop` and only lent out as `&Waker`), and `lent` lives until
    // this function returns.
    let waker = ManuallyDrop::new(unsafe { Waker::from_raw(raw) });
    f(&mut Context::from_waker(&waker))
}

fn lent_vtable<K: Clone + Send + Sync + 'static>() -> &'static RawWakerVTable {
    &RawWakerVTable::new(clone_lent::<K>, wake_by_ref_bridge, wake_by_ref_bridge, noop_bridge)
}

fn owned_vtable<K: Clone + Send + Sync + 'static>() -> &'static RawWakerVTable {
    &RawWakerVTable::new(clone_owned::<K>, wake_owned::<K>, wake_by_ref_bridge, drop_owned::<K>)
}

/// Clones the foreign waker into an owned bridge.
///
/// # Safety
/// `foreign` is live: lent for the current call or owned by a live bridge,
/// and its code is kept loaded by `keep_alive` (or is the host's).
unsafe fn own<K: Clone + Send + Sync + 'static>(foreign: FfiWaker, keep_alive: Option<K>) -> RawWaker {
    // SAFETY: see the function's contract.
    let foreign = unsafe { ((*foreign.vtable).clone)(foreign.data) };
    let owned = Box::new(OwnedBridge { foreign, keep_alive });
    RawWaker::new(Box::into_raw(owned) as *const (), owned_vtable::<K>())
}

unsafe fn clone_lent<K: Clone + Send + Sync + 'static>(data: *const ()) -> RawWaker {
    // SAFETY: `data` is the live `LentBridge` of `with_foreign_waker`.
    let lent = unsafe { &*(data as *const LentBridge<'_, K>) };
    // SAFETY: the lent foreign waker is valid during the call.
    unsafe { own(lent.foreign, lent.keep_alive.cloned()) }
}

unsafe fn clone_owned<K: Clone + Send + Sync + 'static>(data: *const ()) -> RawWaker {
    // SAFETY: `data` is a live `OwnedBridge` (RawWaker contract).
    let owned = unsafe { &*(data as *const OwnedBridge<K>) };
    // SAFETY: the bridge owns its foreign waker and keeps its code loaded.
    unsafe { own(owned.foreign, owned.keep_alive.clone()) }
}

unsafe fn wake_by_ref_bridge(data: *const ()) {
    // SAFETY: both bridge layouts are `repr(C)` with `foreign` first, and
    // `data` is a live bridge (RawWaker contract).
    let foreign = unsafe { *(data as *const FfiWaker) };
    // SAFETY: the foreign waker is live and its code loaded (see `own`).
    unsafe { ((*foreign.vtable).wake_by_ref)(foreign.data) };
}

unsafe fn wake_owned<K>(data: *const ()) {
    // SAFETY: an owned bridge is a `Box<OwnedBridge>` from `own`, consumed
    // once. The foreign waker is consumed before `keep_alive` is released, so
    // its code is still loaded while it runs.
    let owned = unsafe { Box::from_raw(data as *mut OwnedBridge<K>) };
    // SAFETY: the bridge owns the foreign waker.
    unsafe { ((*owned.foreign.vtable).wake)(owned.foreign.data) };
    drop(owned.keep_alive);
}

unsafe fn drop_owned<K>(data: *const ()) {
    // SAFETY: as in `wake_owned`.
    let owned = unsafe { Box::from_raw(data as *mut OwnedBridge<K>) };
    // SAFETY: the bridge owns the foreign waker.
    unsafe { ((*owned.foreign.vtable).drop)(owned.foreign.data) };
    drop(owned.keep_alive);
}

unsafe fn noop_bridge(_data: *const ()) {}

// ---------------------------------------------------------------------------
// App side: safe views of host data
// ---------------------------------------------------------------------------

/// A safe view of a [`RequestHead`] for the life of one request.
#[derive(Clone, Copy)]
pub(crate) struct HeadRef<'a> {
    head: &'a RequestHead,
}

impl<'a> HeadRef<'a> {
    fn text(slice: Slice) -> &'a str {
        // SAFETY: every `Slice` of a `RequestHead` is valid for the request
        // (module rules), and `'a` does not outlive the request.
        std::str::from_utf8(unsafe { slice.as_bytes() }).unwrap_or("")
    }

    pub(crate) fn method(self) -> &'a str {
        Self::text(self.head.method)
    }

    pub(crate) fn path(self) -> &'a str {
        Self::text(self.head.path)
    }

    pub(crate) fn query(self) -> Option<&'a str> {
        (self.head.has_query != 0).then(|| Self::text(self.head.query))
    }

    pub(crate) fn version(self) -> u32 {
        self.head.version
    }

    pub(crate) fn peer(self) -> Option<SocketAddr> {
        self.head.peer.to_socket_addr()
    }

    pub(crate) fn headers(self) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        let headers: &'a [Header] = if self.head.header_count == 0 || self.head.headers.is_null() {
            &[]
        } else {
            // SAFETY: the host points `headers` at `header_count` headers valid
            // for the request.
            unsafe { std::slice::from_raw_parts(self.head.headers, self.head.header_count) }
        };
        // SAFETY: header values are valid for the request, like the names.
        headers.iter().map(|h| (Self::text(h.name), unsafe { h.value.as_bytes() }))
    }

    pub(crate) fn body(self) -> HostBodyRef<'a> {
        HostBodyRef { body: self.head.body, _request: std::marker::PhantomData }
    }
}

/// The host's request body, readable for the life of one request.
pub(crate) struct HostBodyRef<'a> {
    body: *mut HostBody,
    _request: std::marker::PhantomData<&'a RequestHead>,
}

// SAFETY: the host's body is a `Send` object behind an opaque pointer; the
// host serializes access to it through `body_poll`, which takes `&mut`.
unsafe impl Send for HostBodyRef<'_> {}

impl HostBodyRef<'_> {
    /// Polls the next chunk of the request body.
    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        let host = host_vtable();
        let waker = FfiWaker::borrowed(cx.waker());
        let mut out = Slice::EMPTY;
        // SAFETY: `body` is valid for the request (module rules); `waker` and
        // `out` are valid for the call; the chunk in `out` is copied before the
        // next call.
        let code = unsafe { (host.body_poll)(self.body, &waker, &mut out) };
        // SAFETY: `out` was filled by the host for this call.
        let bytes = unsafe { out.as_bytes() };
        match code {
            body_status::CHUNK => Poll::Ready(Some(Ok(Bytes::copy_from_slice(bytes)))),
            body_status::END => Poll::Ready(None),
            body_status::PENDING => Poll::Pending,
            body_status::TOO_LARGE => {
                let limit = std::str::from_utf8(bytes).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                Poll::Ready(Some(Err(BodyError::TooLarge { limit })))
            }
            _ => Poll::Ready(Some(Err(BodyError::Read(String::from_utf8_lossy(bytes).into_owned())))),
        }
    }
}

// ---------------------------------------------------------------------------
// App side: the glue `export_app!` instantiates
// ---------------------------------------------------------------------------

/// What the app side remembers about its host. One library copy serves one
/// generation, so process-wide statics are per generation.
struct HostLink {
    host: &'static HostVTable,
    generation: u64,
}

static HOST: OnceLock<HostLink> = OnceLock::new();

fn host_vtable() -> &'static HostVTable {
    match HOST.get() {
        Some(link) => link.host,
        // `init` sets HOST before any other entry point can run.
        None => unreachable!("app-abi: host table used before init"),
    }
}

/// Sends one log record to the host (used by the log forwarder and the panic hook).
pub(crate) fn host_log(level: u32, target: &str, message: &str) {
    if let Some(link) = HOST.get() {
        // SAFETY: both slices borrow strings that outlive the call.
        unsafe {
            (link.host.log)(link.generation, level, Slice::new(target.as_bytes()), Slice::new(message.as_bytes()))
        };
    }
}

/// One generation's app and the runtime its futures use.
struct Instance<A> {
    app: A,
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    drain: tokio::sync::watch::Sender<bool>,
    live_threads: Arc<AtomicUsize>,
}

type BoxedFuture = Pin<Box<dyn Future<Output = Response> + Send + 'static>>;

struct FutureState {
    future: BoxedFuture,
    /// The runtime handle of the generation, owned by the `Instance`, which
    /// outlives every future (module rules).
    handle: *const tokio::runtime::Handle,
    done: Option<Finished>,
}

/// A finished response, kept alive until `drop_response` so the host can read
/// the pointers in its [`ResponseHead`].
struct Finished {
    headers: Headers,
    body: Bytes,
}

struct StreamState {
    stream: Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>,
    handle: *const tokio::runtime::Handle,
    current: Bytes,
}

/// Builds the vtable for app type `A`. Used by [`export_app!`](crate::export_app).
#[doc(hidden)]
pub const fn vtable<A: App>(name: &'static str, version: &'static str) -> AppVTable {
    AppVTable {
        abi_version: ABI_VERSION,
        size: std::mem::size_of::<AppVTable>() as u32,
        name: Slice::from_static(name),
        version: Slice::from_static(version),
        abi_crate_version: Slice::from_static(env!("CARGO_PKG_VERSION")),
        init: init::<A>,
        handle: handle::<A>,
        poll_response,
        drop_response,
        poll_chunk,
        drop_stream,
        drain: drain::<A>,
        shutdown: shutdown::<A>,
        free_string,
    }
}

/// Text of a caught panic payload.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn settings_from(ctx: &InitContextC) -> Vec<(String, String)> {
    if ctx.settings_count == 0 || ctx.settings.is_null() {
        return Vec::new();
    }
    // SAFETY: the host points `settings` at `settings_count` headers that are
    // valid for the `init` call.
    let pairs = unsafe { std::slice::from_raw_parts(ctx.settings, ctx.settings_count) };
    pairs
        .iter()
        .map(|h| {
            // SAFETY: as above.
            let (name, value) = unsafe { (h.name.as_bytes(), h.value.as_bytes()) };
            (String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned())
        })
        .collect()
}

unsafe extern "C" fn init<A: App>(
    ctx: *const InitContextC,
    out_app: *mut *mut AppInstance,
    out_error: *mut OwnedString,
) -> u32 {
    // SAFETY: the host passes a valid context for the call.
    let ctx = unsafe { &*ctx };
    // SAFETY: the host table is static in the host (see `InitContextC`).
    let host = unsafe { &*ctx.host };
    let _ = HOST.set(HostLink { host, generation: ctx.generation });
    crate::log::install(ctx.generation, ctx.max_log_level);
    let (code, message) = match build_instance::<A>(ctx) {
        Ok(instance) => {
            // SAFETY: `out_app` is valid for the call.
            unsafe { *out_app = Box::into_raw(Box::new(instance)) as *mut AppInstance };
            return status::OK;
        }
        Err(failure) => failure,
    };
    // SAFETY: `out_error` is valid for the call; the host frees it with `free_string`.
    unsafe { *out_error = OwnedString::from_string(message) };
    code
}

/// How long a failed init's runtime gets to stop its threads.
const FAILED_INIT_GRACE: Duration = Duration::from_secs(2);

/// Builds the generation's runtime and runs the app's init in it. On
/// failure: the status and message for the host, after stopping the runtime
/// ([`status::THREADS_LEFT`] if some of its threads would not stop).
fn build_instance<A: App>(ctx: &InitContextC) -> Result<Instance<A>, (u32, String)> {
    let live_threads = Arc::new(AtomicUsize::new(0));
    let (started, stopped) = (live_threads.clone(), live_threads.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(A::RUNTIME_THREADS.max(1))
        .thread_name(format!("app-g{}", ctx.generation))
        .on_thread_start(move || {
            started.fetch_add(1, Ordering::SeqCst);
        })
        .on_thread_stop(move || {
            stopped.fetch_sub(1, Ordering::SeqCst);
        })
        .enable_all()
        .build()
        .map_err(|e| (status::FAILED, format!("could not start the app's tokio runtime: {e}")))?;
    let handle = runtime.handle().clone();
    let (drain, drain_rx) = tokio::sync::watch::channel(false);
    let init_ctx = InitContext::new(ctx.generation, settings_from(ctx), DrainSignal::new(drain_rx));
    let initialized = {
        let _entered = handle.enter();
        catch_unwind(AssertUnwindSafe(|| A::init(&init_ctx)))
    };
    let failure = match initialized {
        Ok(Ok(app)) => return Ok(Instance { app, runtime: Some(runtime), handle, drain, live_threads }),
        Ok(Err(e)) => (status::FAILED, e.to_string()),
        Err(payload) => (status::PANICKED, panic_message(payload.as_ref())),
    };
    runtime.shutdown_timeout(FAILED_INIT_GRACE);
    if live_threads.load(Ordering::SeqCst) > 0 {
        return Err((status::THREADS_LEFT, failure.1));
    }
    Err(failure)
}

unsafe extern "C" fn handle<A: App>(
    app: *const AppInstance,
    head: *const RequestHead,
    waker: *const FfiWaker,
    out: *mut ResponseHead,
    out_future: *mut *mut ResponseFuture,
) -> u32 {
    // SAFETY: `app` came from our `init` and is live until `shutdown`.
    let instance = unsafe { &*(app as *const Instance<A>) };
    // SAFETY: the host keeps `head` valid until `drop_response` (module rules).
    let head = HeadRef { head: unsafe { &*head } };
    let _entered = instance.handle.enter();
    let made = catch_unwind(AssertUnwindSafe(|| {
        let future: Pin<Box<dyn Future<Output = Response> + Send + '_>> =
            Box::pin(instance.app.handle(Request::new(head)));
        // SAFETY: the future borrows the instance and the request head. The
        // host keeps both alive until it calls `drop_response`, which drops
        // the future; so erasing the lifetime never lets a borrow dangle.
        let future: BoxedFuture = unsafe { std::mem::transmute(future) };
        future
    }));
    let Ok(future) = made else {
        // SAFETY: `out_future` is valid for the call.
        unsafe { *out_future = std::ptr::null_mut() };
        return status::PANICKED; // the panic hook logged it
    };
    let state = Box::into_raw(Box::new(FutureState { future, handle: &instance.handle, done: None }));
    // SAFETY: `out_future` is valid for the call; the host owns the future now.
    unsafe { *out_future = state as *mut ResponseFuture };
    // SAFETY: `state` was just made; `waker` and `out` are valid for the call.
    unsafe { poll_state(&mut *state, waker, out) }
}

unsafe extern "C" fn poll_response(future: *mut ResponseFuture, waker: *const FfiWaker, out: *mut ResponseHead) -> u32 {
    // SAFETY: `future` came from `handle` and is not dropped yet; the host
    // polls it from one thread at a time.
    let state = unsafe { &mut *(future as *mut FutureState) };
    // SAFETY: the instance (and its handle) outlives the future (module rules).
    let _entered = unsafe { &*state.handle }.enter();
    // SAFETY: `waker` and `out` are valid for the call.
    unsafe { poll_state(state, waker, out) }
}

/// Polls a response future (the generation's runtime entered by the
/// caller) and, once it is ready, fills `out`.
///
/// # Safety
/// `waker` is a lent waker and `out` is writable, both for the call.
unsafe fn poll_state(state: &mut FutureState, waker: *const FfiWaker, out: *mut ResponseHead) -> u32 {
    let polled = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `waker` is lent for this call; the host's code stays loaded.
        unsafe { with_foreign_waker::<(), _>(waker, None, |cx| state.future.as_mut().poll(cx)) }
    }));
    let response = match polled {
        Ok(Poll::Ready(response)) => response,
        Ok(Poll::Pending) => return status::PENDING,
        Err(_) => return status::PANICKED, // the panic hook logged it
    };
    let (head, finished) = finish(response, state.handle);
    let finished = state.done.insert(finished);
    // SAFETY: `out` is valid for the call. The pointers in it point into
    // `state.done`, which lives until `drop_response`.
    unsafe {
        *out = ResponseHead {
            headers: finished.headers.pairs.as_ptr(),
            header_count: finished.headers.pairs.len(),
            body: Slice::new(&finished.body),
            ..head
        }
    };
    status::OK
}

/// Splits a response into the C head (without header and body pointers) and
/// the data those pointers will point into.
fn finish(response: Response, handle: *const tokio::runtime::Handle) -> (ResponseHead, Finished) {
    let Response { status, headers, body } = response;
    let (body_kind, body, stream) = match body {
        Body::Bytes(bytes) => (body_kind::BYTES, bytes, std::ptr::null_mut()),
        Body::Stream(stream) => {
            let state = StreamState { stream, handle, current: Bytes::new() };
            (body_kind::STREAM, Bytes::new(), Box::into_raw(Box::new(state)) as *mut BodyStream)
        }
    };
    let head = ResponseHead { status, body_kind, stream, ..ResponseHead::EMPTY };
    (head, Finished { headers, body })
}

unsafe extern "C" fn drop_response(future: *mut ResponseFuture) {
    // SAFETY: `future` came from `handle` and is dropped exactly once.
    let state = unsafe { Box::from_raw(future as *mut FutureState) };
    // SAFETY: the instance outlives the future (module rules).
    let handle = unsafe { &*state.handle };
    // A future that completed holds nothing that talks to the runtime any
    // more (its locals are gone); only a cancelled one needs it entered.
    let _entered = state.done.is_none().then(|| handle.enter());
    // A panic here was logged by the panic hook; there is nothing else to do.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(state)));
}

unsafe extern "C" fn poll_chunk(stream: *mut BodyStream, waker: *const FfiWaker, out: *mut Slice) -> u32 {
    // SAFETY: `stream` came from `poll_response` and is not dropped yet; the
    // host polls it from one thread at a time.
    let state = unsafe { &mut *(stream as *mut StreamState) };
    // SAFETY: the instance outlives its streams (module rules).
    let handle = unsafe { &*state.handle };
    let polled = catch_unwind(AssertUnwindSafe(|| {
        let _entered = handle.enter();
        // SAFETY: `waker` is borrowed for this call; the host's code stays loaded.
        unsafe { with_foreign_waker::<(), _>(waker, None, |cx| state.stream.as_mut().poll_next(cx)) }
    }));
    match polled {
        Ok(Poll::Ready(Some(Ok(chunk)))) => {
            state.current = chunk;
            // SAFETY: `out` is valid for the call; `current` lives until the
            // next poll or `drop_stream`.
            unsafe { *out = Slice::new(&state.current) };
            status::CHUNK
        }
        Ok(Poll::Ready(None)) => status::END,
        Ok(Poll::Pending) => status::PENDING,
        Ok(Poll::Ready(Some(Err(message)))) => {
            host_log(level::ERROR, "app_abi", &format!("response stream failed: {message}"));
            status::PANICKED
        }
        Err(_) => status::PANICKED, // the panic hook logged it
    }
}

unsafe extern "C" fn drop_stream(stream: *mut BodyStream) {
    // SAFETY: `stream` came from `poll_response` and is dropped exactly once.
    let state = unsafe { Box::from_raw(stream as *mut StreamState) };
    // SAFETY: the instance outlives its streams (module rules).
    let handle = unsafe { &*state.handle };
    let _entered = handle.enter();
    // A panic here was logged by the panic hook; there is nothing else to do.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(state)));
}

unsafe extern "C" fn drain<A: App>(app: *const AppInstance) {
    // SAFETY: `app` came from our `init` and is live until `shutdown`.
    let instance = unsafe { &*(app as *const Instance<A>) };
    instance.drain.send_replace(true);
    let _entered = instance.handle.enter();
    // A panic here was logged by the panic hook; there is nothing else to do.
    let _ = catch_unwind(AssertUnwindSafe(|| instance.app.drain()));
}

unsafe extern "C" fn shutdown<A: App>(app: *mut AppInstance, timeout_ms: u64) -> u32 {
    // SAFETY: `app` came from our `init`; the host calls `shutdown` once, after
    // every future and stream of the instance was dropped.
    let mut instance = unsafe { Box::from_raw(app as *mut Instance<A>) };
    let timeout = Duration::from_millis(timeout_ms);
    let started = Instant::now();
    {
        let _entered = instance.handle.enter();
        // A panic here was logged by the panic hook; there is nothing else to do.
        let _ = catch_unwind(AssertUnwindSafe(|| instance.app.shutdown()));
    }
    let runtime = instance.runtime.take();
    let live_threads = instance.live_threads.clone();
    // A panic here was logged by the panic hook; there is nothing else to do.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(instance)));
    if let Some(runtime) = runtime {
        // Waits for the runtime's threads and joins them when they all stop
        // in time; a blocking task that never returns keeps its thread.
        runtime.shutdown_timeout(timeout.saturating_sub(started.elapsed()));
    }
    let joined = live_threads.load(Ordering::SeqCst) == 0 && started.elapsed() < timeout;
    if joined {
        status::OK
    } else {
        status::THREADS_LEFT
    }
}

unsafe extern "C" fn free_string(s: OwnedString) {
    if !s.ptr.is_null() {
        // SAFETY: `s` came from `OwnedString::from_string` in this library and
        // is freed exactly once.
        drop(unsafe { String::from_raw_parts(s.ptr, s.len, s.cap) });
    }
}
