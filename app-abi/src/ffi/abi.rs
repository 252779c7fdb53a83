//! The contract: every type and constant that crosses the boundary.
//!
//! Host and app both compile against this file, possibly with different
//! rustc versions, so everything here is `#[repr(C)]` data, plain `u32`
//! codes and `extern "C"` function pointers; changing any of it is an ABI
//! change and needs a new [`ABI_VERSION`]. It holds no logic of either side,
//! only conversions to and from these forms; the `unsafe` readers of borrowed
//! pointers rely on the ownership rules stated in the `ffi` module docs.

use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The ABI version this crate implements. The host refuses any other.
pub const ABI_VERSION: u32 = 2;

/// The name of the one symbol an app library exports: an
/// `extern "C" fn() -> *const AppVTable`.
pub const ENTRY_SYMBOL: &str = "pounce_app_entry";

/// Signature of [`ENTRY_SYMBOL`].
pub type EntryFn = unsafe extern "C" fn() -> *const AppVTable;

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

    /// Hands `s` over; [`AppVTable::free_string`] gives it back.
    pub(super) fn from_string(s: String) -> OwnedString {
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
    /// `io_*`: the upgraded connection's I/O failed; it is over.
    pub const IO_ERROR: u32 = 7;
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

/// Opaque: the app's end of an upgraded connection (after `101 Switching
/// Protocols`). Only the app reads it; the host moves bytes between it and
/// the client with the `io_*` entry points.
#[repr(C)]
pub struct AppIo {
    _private: [u8; 0],
}

/// [`RequestHead::body_size`] when the body's length is not known up front.
pub const BODY_SIZE_UNKNOWN: u64 = u64::MAX;

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
    /// The body's exact length (`0`: no body), or [`BODY_SIZE_UNKNOWN`].
    pub body_size: u64,
    /// `1` if the host can hand this request's connection to the app: an
    /// HTTP/1.1 request with an `Upgrade` header. The app accepts by
    /// answering `101` with [`ResponseHead::io`] set.
    pub upgrade: u8,
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
/// give it back with `drop_stream`. `io`, when not null (a `101` answer to a
/// request with [`RequestHead::upgrade`] set), now belongs to the host, which
/// must give it back with `drop_io`.
#[repr(C)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: *const Header,
    pub header_count: usize,
    pub body_kind: u32,
    pub body: Slice,
    pub stream: *mut BodyStream,
    pub io: *mut AppIo,
}

impl ResponseHead {
    pub const EMPTY: ResponseHead = ResponseHead {
        status: 0,
        headers: std::ptr::null(),
        header_count: 0,
        body_kind: body_kind::BYTES,
        body: Slice::EMPTY,
        stream: std::ptr::null_mut(),
        io: std::ptr::null_mut(),
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
    /// Reads what the app sends on an upgraded connection into the host's
    /// `buf` (`cap` bytes): [`status::OK`] with `*out_len` bytes (`0`: the
    /// app's side ended), [`status::PENDING`], [`status::IO_ERROR`] or
    /// [`status::PANICKED`].
    pub io_read: unsafe extern "C" fn(
        io: *mut AppIo,
        waker: *const FfiWaker,
        buf: *mut u8,
        cap: usize,
        out_len: *mut usize,
    ) -> u32,
    /// Hands the app bytes the client sent: [`status::OK`] with `*out_len`
    /// bytes taken, or as for `io_read`.
    pub io_write: unsafe extern "C" fn(io: *mut AppIo, waker: *const FfiWaker, data: Slice, out_len: *mut usize) -> u32,
    /// Flushes what was written: [`status::OK`], or as for `io_read`.
    pub io_flush: unsafe extern "C" fn(io: *mut AppIo, waker: *const FfiWaker) -> u32,
    /// The client sent all it will: the app reads the end. As `io_flush`.
    pub io_shutdown: unsafe extern "C" fn(io: *mut AppIo, waker: *const FfiWaker) -> u32,
    /// The connection is over (closed by either side, or cut by the host).
    pub drop_io: unsafe extern "C" fn(io: *mut AppIo),
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

/// The functions behind an [`FfiWaker`], each taking its `data`.
#[repr(C)]
pub struct FfiWakerVTable {
    pub clone: unsafe extern "C" fn(data: *const c_void) -> FfiWaker,
    pub wake: unsafe extern "C" fn(data: *const c_void),
    pub wake_by_ref: unsafe extern "C" fn(data: *const c_void),
    pub drop: unsafe extern "C" fn(data: *const c_void),
}
