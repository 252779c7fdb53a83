//! The app side's link to its host: the host's table, and safe views of the
//! request data it lends.
//!
//! The glue's `init` records the host's [`HostVTable`] and the generation here
//! ([`connect`]); the log forwarder and the panic hook send records through
//! [`host_log`]. A handler's `Request` wraps a [`HeadRef`] and reads the body
//! through a [`HostBodyRef`]: both read the host's buffers in place, and their
//! lifetime `'a` is the request's, which is what makes that sound.
//!
//! It sits below the safe API (`request` and `log` use it) and imports
//! nothing from it.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::task::Waker;

use super::abi::{FfiWaker, Header, HostBody, HostVTable, RequestHead, Slice};

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
            // for `'a` (see `new`).
            unsafe { std::slice::from_raw_parts(self.head.headers, self.head.header_count) }
        };
        // SAFETY: header values are valid for `'a`, like the names.
        headers.iter().map(|h| (Self::text(h.name), unsafe { h.value.as_bytes() }))
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
