//! The app side's link to its host: the host's table, and safe views of the
//! request data it lends.
//!
//! The glue's `init` records the host's [`HostVTable`] and the generation here
//! ([`connect`]); the log forwarder and the panic hook send records through
//! [`host_log`]. A handler's `Request` wraps a [`HeadRef`] and reads the body
//! through a [`HostBodyRef`]: both read the host's buffers in place, and their
//! lifetime `'a` is the request's, which is what makes that sound. A body
//! that must outlive that borrow (moved into a task, or into an
//! `http::Request`) reads through a [`BodyGate`] instead, which the glue
//! closes before the host frees the request.
//!
//! It sits below the safe API (`request` and `log` use it) and imports
//! nothing from it.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Waker;

use bytes::Bytes;

use super::abi::{body_status, FfiWaker, Header, HostBody, HostVTable, RequestHead, Slice, BODY_SIZE_UNKNOWN};

/// What the app side remembers about its host. One library copy serves one
/// generation, so process-wide statics are per generation.
struct HostLink {
    host: &'static HostVTable,
    generation: u64,
}

static HOST: OnceLock<HostLink> = OnceLock::new();

/// Records the host this library copy serves. Called by `init`, before any
/// other entry point can run; a second call (there is none) would be ignored.
pub(super) fn connect(host: &'static HostVTable, generation: u64) {
    let _ = HOST.set(HostLink { host, generation });
}

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

/// A safe view of a [`RequestHead`] for the life of one request.
#[derive(Clone, Copy)]
pub(crate) struct HeadRef<'a> {
    head: &'a RequestHead,
}

impl<'a> HeadRef<'a> {
    /// # Safety
    /// `head` was passed by the host to `handle`, so every pointer in it is
    /// valid (module rules) for at least `'a`.
    pub(super) unsafe fn new(head: &'a RequestHead) -> HeadRef<'a> {
        HeadRef { head }
    }

    fn text(slice: Slice) -> &'a str {
        // SAFETY: every `Slice` of the head is valid for `'a` (see `new`).
        std::str::from_utf8(unsafe { slice.as_bytes() }).unwrap_or("")
    }

    pub(crate) fn method(self) -> &'a str {
        Self::text(self.head.method)
    }

    /// The method's bytes, for a caller that parses them itself (no UTF-8
    /// check).
    #[cfg(feature = "tower")]
    pub(crate) fn method_bytes(self) -> &'a [u8] {
        // SAFETY: every `Slice` of the head is valid for `'a` (see `new`).
        unsafe { self.head.method.as_bytes() }
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

    /// Whether the host can hand this request's connection over (`101`).
    pub(crate) fn upgrade(self) -> bool {
        self.head.upgrade != 0
    }

    /// The body's exact length, if the host knows it.
    pub(crate) fn body_size(self) -> Option<u64> {
        (self.head.body_size != BODY_SIZE_UNKNOWN).then_some(self.head.body_size)
    }

    pub(crate) fn headers(self) -> impl ExactSizeIterator<Item = (&'a str, &'a [u8])> {
        // SAFETY: header values are valid for `'a`, like the names.
        self.header_array().iter().map(|h| (Self::text(h.name), unsafe { h.value.as_bytes() }))
    }

    /// The headers' names and values as bytes (no UTF-8 check of the names).
    #[cfg(feature = "tower")]
    pub(crate) fn header_bytes(self) -> impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])> {
        self.header_array().iter().map(|h| {
            // SAFETY: names and values are valid for `'a` (see `new`).
            unsafe { (h.name.as_bytes(), h.value.as_bytes()) }
        })
    }

    fn header_array(self) -> &'a [Header] {
        if self.head.header_count == 0 || self.head.headers.is_null() {
            return &[];
        }
        // SAFETY: the host points `headers` at `header_count` headers valid
        // for `'a` (see `new`).
        unsafe { std::slice::from_raw_parts(self.head.headers, self.head.header_count) }
    }

    pub(crate) fn body(self) -> HostBodyRef<'a> {
        HostBodyRef { body: self.head.body, _request: PhantomData }
    }
}

/// The host's request body, readable for the life of one request.
pub(crate) struct HostBodyRef<'a> {
    body: *mut HostBody,
    _request: PhantomData<&'a RequestHead>,
}

// SAFETY: the host's body is a `Send` object behind an opaque pointer; the
// host serializes access to it through `body_poll`, which takes `&mut`.
unsafe impl Send for HostBodyRef<'_> {}

impl HostBodyRef<'_> {
    /// Polls the host for the next piece of the request body: the
    /// [`body_status`](super::body_status) code, and the bytes the host left
    /// in `out` for it (a chunk, a limit or a reason; empty for the others).
    /// The bytes stay valid until the next poll, which needs `&mut self` again.
    pub(crate) fn poll(&mut self, waker: &Waker) -> (u32, &[u8]) {
        let waker = FfiWaker::borrowed(waker);
        let mut out = Slice::EMPTY;
        // SAFETY: `body` is valid for the request (module rules); `waker` and
        // `out` are valid for the call.
        let code = unsafe { (host_vtable().body_poll)(self.body, &waker, &mut out) };
        // SAFETY: the host filled `out` for this call and keeps it until the
        // next `body_poll` on this body, which the borrow of `self` rules out.
        (code, unsafe { out.as_bytes() })
    }
}

/// The host's request body for a reader that may outlive the request's
/// borrow. The glue closes the gate in `drop_response`, before the host frees
/// the body: from then on reading gives `None`. Reading holds the lock, so
/// closing waits for a read that runs on another thread.
pub(crate) struct BodyGate {
    body: Mutex<Option<BodyPtr>>,
}

struct BodyPtr(*mut HostBody);

// SAFETY: the host's body is a `Send` object behind an opaque pointer, and it
// is only reached under the gate's lock.
unsafe impl Send for BodyPtr {}

impl BodyGate {
    /// # Safety
    /// `head` was passed by the host to `handle`, and the gate is closed
    /// before the glue's `drop_response` for that request returns.
    pub(super) unsafe fn new(head: &RequestHead) -> Arc<BodyGate> {
        Arc::new(BodyGate { body: Mutex::new(Some(BodyPtr(head.body))) })
    }

    /// No more reads reach the host.
    pub(super) fn close(&self) {
        *self.body.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Polls the host for the next piece of the body, like
    /// [`HostBodyRef::poll`], copying its bytes out; `None` once the request
    /// has ended.
    pub(crate) fn poll(&self, waker: &Waker) -> Option<(u32, Bytes)> {
        let guard = self.body.lock().unwrap_or_else(|p| p.into_inner());
        let body = guard.as_ref()?.0;
        let waker = FfiWaker::borrowed(waker);
        let mut out = Slice::EMPTY;
        // SAFETY: the gate is open, so the request (and its body) is alive,
        // and the lock keeps it so during the call; `waker` and `out` are
        // valid for the call.
        let code = unsafe { (host_vtable().body_poll)(body, &waker, &mut out) };
        let bytes = match code {
            body_status::PENDING | body_status::END => Bytes::new(),
            // SAFETY: the host keeps `out` valid until the next `body_poll`
            // on this body, which the lock (still held) rules out.
            _ => Bytes::copy_from_slice(unsafe { out.as_bytes() }),
        };
        Some((code, bytes))
    }
}
