//! Calling an app through its C ABI (see `app_abi::ffi` for the contract).

use std::ffi::c_void;
use std::fs::File;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use app_abi::ffi::{
    self as abi, body_kind, body_status, level, status, AppInstance, AppVTable, BodyStream, FfiWaker, Header, HostBody,
    HostVTable, InitContextC, OwnedString, PeerAddr, RequestHead, ResponseFuture, ResponseHead, Slice,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::library::Library;
use super::pins::{self, Pins};
use super::threads;
use super::unload_guard::{self, LoadId};

/// What an app library says about itself.
#[derive(Clone, Debug)]
pub struct AppInfo {
    /// How long the app's `init` took.
    pub init_duration: Duration,
    pub name: String,
    pub version: String,
    pub abi_version: u32,
    /// The version of the `app-abi` crate the app was built with.
    pub abi_crate_version: String,
}

/// Why a library could not be opened as an app. The loader adds the path.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the dynamic loader refused it: {0}")]
    Dlopen(String),
    #[error(
        "it does not export the `{}` symbol, so it is not a pounce-host app; \
         build an app crate with `crate-type = [\"cdylib\"]` and `app_abi::export_app!(YourApp);`",
        abi::ENTRY_SYMBOL
    )]
    MissingEntry,
    #[error("its `{}` symbol returned no ABI table", abi::ENTRY_SYMBOL)]
    NullTable,
    #[error(
        "it was built for app ABI version {found}, but this pounce-host speaks version {supported}; \
         rebuild the app against an app-abi crate with ABI version {supported}"
    )]
    AbiVersion { found: u32, supported: u32 },
    #[error(
        "its ABI table is {found} bytes, smaller than the {expected} bytes of ABI version {}; \
         the library is damaged or was built with a broken app-abi: rebuild it",
        abi::ABI_VERSION
    )]
    TableSize { found: u32, expected: usize },
    #[error("the app's init returned an error: {0}")]
    InitFailed(String),
    #[error("the app's init panicked: {0}")]
    InitPanicked(String),
    #[error("the app's init failed ({0}) and left threads running; the library stays loaded so they cannot crash")]
    InitThreadsLeft(String),
}

/// How an unload ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unloaded {
    /// The library's code is gone from the address space.
    Unmapped,
    /// `dlclose` ran but the loader kept the object mapped (something else
    /// pinned it, e.g. a thread-local destructor registered while its ELF
    /// constructors ran).
    StillMapped,
    /// Threads of the app's runtime were still running after the timeout,
    /// so the library was left open on purpose: unmapping it would crash them.
    ThreadsLeft,
    /// Something outside the app's runtime still points into the library
    /// (a thread it started, a signal handler, a key destructor), so it was
    /// left open on purpose. See [`Pins`].
    Pinned(Pins),
}

/// Libraries left mapped on purpose so far (`ThreadsLeft`, `Pinned`, and
/// failed loads kept for the same reasons).
static KEPT_MAPPED: AtomicU64 = AtomicU64::new(0);

/// How many libraries have been left mapped on purpose since the start.
pub fn kept_mapped() -> u64 {
    KEPT_MAPPED.load(Ordering::Relaxed)
}

/// Leaves `library` mapped for good, and counts it. Its load stays
/// registered with the unload guard.
fn keep_mapped(library: Library) {
    KEPT_MAPPED.fetch_add(1, Ordering::Relaxed);
    std::mem::forget(library);
}

/// Closes `library` (load `load`) unless code of it could still run (see
/// `pins`): then it stays mapped and the reasons are returned. The caller
/// guarantees that the host will not call into it again.
fn release(library: Library, load: LoadId) -> Unloaded {
    let pins = unload_guard::get(load).map(|guarded| pins::find(&guarded)).unwrap_or_default();
    if !pins.is_empty() {
        keep_mapped(library);
        return Unloaded::Pinned(pins);
    }
    unload_guard::unregister(load);
    if library.close() {
        Unloaded::Unmapped
    } else {
        Unloaded::StillMapped
    }
}

/// [`release`] for a load that failed: a pin is logged here, since the
/// failure itself is what the caller reports.
fn release_failed(library: Library, load: LoadId, generation: u64) {
    if let Unloaded::Pinned(pins) = release(library, load) {
        tracing::warn!(generation, "generation {generation} failed to load and stays mapped: {pins}");
    }
}

/// What keeps an app's library loaded while the host may call into it: the
/// host's generation. `ffi` holds one with every request, stream and waker it
/// hands out, and knows nothing else of generations.
pub trait Lease: Send + Sync + 'static {
    fn app(&self) -> &LoadedApp;
}

/// An opened library whose app has been initialized: one generation's code.
///
/// Dropping it without [`LoadedApp::unload`] leaks the library (it stays
/// mapped), which is always safe.
pub struct LoadedApp {
    library: Library,
    vtable: *const AppVTable,
    instance: *mut AppInstance,
    load: LoadId,
    info: AppInfo,
}

// SAFETY: the app's entry points may be called from any thread: the app type
// is `Send + Sync` (app-abi's `App` bound) and the glue keeps no thread
// affinity. The pointers stay valid while the library is open, which this
// value guarantees until `unload` consumes it.
unsafe impl Send for LoadedApp {}
// SAFETY: as above; shared access only calls entry points that take `&App`.
unsafe impl Sync for LoadedApp {}

/// The functions the host offers every app (static: valid for the process).
static HOST_VTABLE: HostVTable = HostVTable {
    abi_version: abi::ABI_VERSION,
    size: std::mem::size_of::<HostVTable>() as u32,
    log: app_log,
    body_poll,
};

impl LoadedApp {
    pub fn info(&self) -> &AppInfo {
        &self.info
    }

    fn vtable(&self) -> &AppVTable {
        // SAFETY: the table is static in the library, which stays open as
        // long as `self` exists.
        unsafe { &*self.vtable }
    }

    /// Tells the app its generation gets no new requests.
    pub fn drain(&self) {
        // SAFETY: `instance` is live until `unload`.
        unsafe { (self.vtable().drain)(self.instance) };
    }

    /// Runs the app's shutdown (waiting up to `timeout` for its threads) but
    /// leaves the library mapped: for the end of the process, when host
    /// threads that may still run its thread-local destructors are exiting
    /// concurrently and unmapping would gain nothing.
    pub fn shut_down_for_exit(self, timeout: Duration) {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        // SAFETY: as in `unload`: nothing of the generation runs any more and
        // `self` is consumed, so `shutdown` is called once.
        unsafe { (self.vtable().shutdown)(self.instance, timeout_ms) };
        std::mem::forget(self.library);
    }

    /// Shuts the app down (waiting up to `timeout` for its threads) and
    /// closes the library, unless code of it could still run: then it stays
    /// mapped ([`Unloaded::ThreadsLeft`], [`Unloaded::Pinned`]). The caller
    /// guarantees that no request, stream or waker of this generation is
    /// left, which holding the last reference to its `Generation` proves.
    pub fn unload(self, timeout: Duration) -> Unloaded {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        // SAFETY: nothing of the generation runs any more (see above), and
        // `shutdown` is called once: `self` is consumed.
        let code = unsafe { (self.vtable().shutdown)(self.instance, timeout_ms) };
        if code != status::OK {
            // Unmapping would pull the code out from under the app's threads.
            keep_mapped(self.library);
            return Unloaded::ThreadsLeft;
        }
        release(self.library, self.load)
    }
}

/// A library opened and checked (ABI version and table size), whose app is
/// not initialized yet. The two steps may run on different threads: opening
/// is background work, `init` starts the app's own threads, which inherit
/// the priority of the thread that runs it.
pub struct OpenedLibrary {
    library: Library,
    vtable: *const AppVTable,
    load: LoadId,
    generation: u64,
    name: String,
    version: String,
    abi_crate_version: String,
}

// SAFETY: the table pointer stays valid while the library is open, which
// this value guarantees; nothing of the app has run yet but its getter.
unsafe impl Send for OpenedLibrary {}

impl OpenedLibrary {
    /// Opens `path` as `generation` and checks its ABI table. The library
    /// is registered with the unload guard as a new load right after
    /// `dlopen`, so whatever its constructors left behind is checked before
    /// it is ever closed.
    pub fn open(path: &Path, generation: u64) -> Result<OpenedLibrary, OpenError> {
        OpenedLibrary::check(generation, || Library::open(path))
    }

    /// Opens the library in `file` (an anonymous in-memory copy) as
    /// `generation` and checks its ABI table. The library keeps `file` open
    /// for as long as it is mapped: its `/proc/self/fd/N` path must keep
    /// naming it.
    pub fn open_file(file: File, generation: u64) -> Result<OpenedLibrary, OpenError> {
        OpenedLibrary::check(generation, || Library::open_file(file))
    }

    /// Opens a library with `open`, registers it with the unload guard as a
    /// new load and checks its ABI table; closes it if it is not an app of
    /// this ABI.
    fn check(generation: u64, open: impl FnOnce() -> Result<Library, String>) -> Result<OpenedLibrary, OpenError> {
        // Signal handlers of the loaded libraries are noted before a new one
        // may install its own on top of them.
        pins::note_signal_handlers();
        let threads_before = threads::live_tids();
        let library = open().map_err(OpenError::Dlopen)?;
        let load = unload_guard::register(generation, library.segments(), threads_before);
        let Some(entry) = library.symbol(abi::ENTRY_SYMBOL) else {
            release_failed(library, load, generation);
            return Err(OpenError::MissingEntry);
        };
        match check_table(entry) {
            Ok(vtable) => {
                // SAFETY: `check_table` verified a full table of this ABI version, static in
                // the library, whose strings are static too.
                let (name, version, abi_crate_version) = unsafe {
                    let table = &*vtable;
                    (text(table.name), text(table.version), text(table.abi_crate_version))
                };
                Ok(OpenedLibrary { library, vtable, load, generation, name, version, abi_crate_version })
            }
            Err(e) => {
                release_failed(library, load, generation);
                Err(e)
            }
        }
    }

    /// Runs the app's init. Run it on a short-lived thread: app code
    /// touching a thread-local there cannot pin anything once it exits.
    pub fn init(self, settings: &[(String, String)], max_log_level: u32) -> Result<LoadedApp, OpenError> {
        let OpenedLibrary { library, vtable, load, generation, name, version, abi_crate_version } = self;
        let started = std::time::Instant::now();
        // SAFETY: the table is valid while `library` is open.
        let initialized = init(unsafe { &*vtable }, generation, settings, max_log_level);
        pins::note_signal_handlers();
        match initialized {
            Ok(instance) => {
                let info = AppInfo {
                    init_duration: started.elapsed(),
                    name,
                    version,
                    abi_version: abi::ABI_VERSION,
                    abi_crate_version,
                };
                Ok(LoadedApp { library, vtable, instance, load, info })
            }
            Err(e @ OpenError::InitThreadsLeft(_)) => {
                // Unmapping would pull the code out from under those threads.
                keep_mapped(library);
                Err(e)
            }
            Err(e) => {
                release_failed(library, load, generation);
                Err(e)
            }
        }
    }
}

/// Calls the entry symbol and checks the table it returns.
fn check_table(entry: *mut c_void) -> Result<*const AppVTable, OpenError> {
    // SAFETY: the symbol is app-abi's entry point, an `EntryFn`; it only
    // returns the address of a static table.
    let table = unsafe { std::mem::transmute::<*mut c_void, abi::EntryFn>(entry)() };
    if table.is_null() {
        return Err(OpenError::NullTable);
    }
    // SAFETY: every ABI version starts the table with two `u32`s, the
    // version and the size, so these reads are valid before we know which
    // version it is.
    let (found, size) = unsafe { (std::ptr::read(table as *const u32), std::ptr::read((table as *const u32).add(1))) };
    if found != abi::ABI_VERSION {
        return Err(OpenError::AbiVersion { found, supported: abi::ABI_VERSION });
    }
    let expected = std::mem::size_of::<AppVTable>();
    if (size as usize) < expected {
        return Err(OpenError::TableSize { found: size, expected });
    }
    Ok(table)
}

/// Copies a static string of the app.
///
/// # Safety
/// `slice` points to bytes that stay valid during the call.
unsafe fn text(slice: Slice) -> String {
    // SAFETY: see the function's contract.
    String::from_utf8_lossy(unsafe { slice.as_bytes() }).into_owned()
}

fn init(
    vtable: &AppVTable,
    generation: u64,
    settings: &[(String, String)],
    max_log_level: u32,
) -> Result<*mut AppInstance, OpenError> {
    let pairs: Vec<Header> = settings
        .iter()
        .map(|(k, v)| Header { name: Slice::new(k.as_bytes()), value: Slice::new(v.as_bytes()) })
        .collect();
    let ctx = InitContextC {
        generation,
        settings: pairs.as_ptr(),
        settings_count: pairs.len(),
        max_log_level,
        host: &HOST_VTABLE,
    };
    let mut instance = std::ptr::null_mut();
    let mut error = OwnedString::EMPTY;
    // SAFETY: every pointer is valid for the call; `pairs` and `settings`
    // outlive it.
    let code = unsafe { (vtable.init)(&ctx, &mut instance, &mut error) };
    match (code, instance.is_null()) {
        (status::OK, false) => return Ok(instance),
        (status::OK, true) => return Err(OpenError::InitFailed("it reported success but returned no app".to_owned())),
        (status::FAILED | status::PANICKED | status::THREADS_LEFT, _) => {}
        (other, _) => return Err(OpenError::InitFailed(format!("it returned the unknown status {other}"))),
    }
    // SAFETY: on these statuses the app filled `error`, which is not freed yet.
    let message = unsafe { error.to_string_lossy() };
    // SAFETY: `error` was allocated by this app and is given back once.
    unsafe { (vtable.free_string)(error) };
    match code {
        status::PANICKED => Err(OpenError::InitPanicked(message)),
        status::THREADS_LEFT => Err(OpenError::InitThreadsLeft(message)),
        _ => Err(OpenError::InitFailed(message)),
    }
}

/// Prints a log record from the app, tagged with its generation.
///
/// # Safety
/// `target` and `message` are valid for the call (the app's glue lends them).
unsafe extern "C" fn app_log(generation: u64, level: u32, target: Slice, message: Slice) {
    let _ = catch_unwind(|| {
        // SAFETY: the app passes slices valid for the call.
        let (target, message) = unsafe { (target.as_bytes(), message.as_bytes()) };
        let target = String::from_utf8_lossy(target);
        let message = String::from_utf8_lossy(message);
        match level {
            level::ERROR => tracing::error!(target: "app", generation, app_target = %target, "{message}"),
            level::WARN => tracing::warn!(target: "app", generation, app_target = %target, "{message}"),
            level::INFO => tracing::info!(target: "app", generation, app_target = %target, "{message}"),
            level::DEBUG => tracing::debug!(target: "app", generation, app_target = %target, "{message}"),
            _ => tracing::trace!(target: "app", generation, app_target = %target, "{message}"),
        }
    });
}

// ---------------------------------------------------------------------------
// One request inside the app
// ---------------------------------------------------------------------------

/// A request handed to the app. Boxed, so the pointers in `head` (into
/// `parts` and `headers`) stay put while the app borrows them.
struct PendingRequest {
    lease: Arc<dyn Lease>,
    parts: http::request::Parts,
    headers: Vec<Header>,
    head: RequestHead,
    body: RequestBody,
}

/// The host side of a request body the app reads through `body_poll`.
struct RequestBody {
    incoming: Incoming,
    limit: u64,
    received: u64,
    over_limit: bool,
    /// The chunk last handed to the app, valid until its next poll.
    chunk: Bytes,
    /// The text last handed to the app (limit or error), same lifetime.
    note: String,
}

impl RequestBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> (u32, Slice) {
        if self.over_limit {
            return (body_status::TOO_LARGE, Slice::new(self.note.as_bytes()));
        }
        loop {
            let frame = match Pin::new(&mut self.incoming).poll_frame(cx) {
                Poll::Pending => return (body_status::PENDING, Slice::EMPTY),
                Poll::Ready(None) => return (body_status::END, Slice::EMPTY),
                Poll::Ready(Some(Err(e))) => {
                    self.note = e.to_string();
                    return (body_status::ERROR, Slice::new(self.note.as_bytes()));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            // Trailers are not offered to apps (ABI v2).
            let Ok(data) = frame.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            self.received = self.received.saturating_add(data.len() as u64);
            if self.received > self.limit {
                self.over_limit = true;
                self.note = self.limit.to_string();
                return (body_status::TOO_LARGE, Slice::new(self.note.as_bytes()));
            }
            self.chunk = data;
            return (body_status::CHUNK, Slice::new(&self.chunk));
        }
    }
}

/// `HostVTable::body_poll`: the app reads the request body.
///
/// # Safety
/// `body` is the `HostBody` of a request whose app future is still alive,
/// `waker` is valid for the call, and `out` points to a writable `Slice`
/// (the ABI's contract for `body_poll`).
unsafe extern "C" fn body_poll(body: *mut HostBody, waker: *const FfiWaker, out: *mut Slice) -> u32 {
    let request = body as *mut PendingRequest;
    // SAFETY: `head.body` is the request's `PendingRequest`, alive until the
    // app's future is dropped. Only the `body` field is borrowed mutably; the
    // app holds shared borrows of `head` and `parts` only.
    let (body, lease) = unsafe { (&mut (*request).body, &(*request).lease) };
    let polled = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `waker` is lent for this call. A clone of it (stored by
        // hyper) keeps the generation, and so the waker's code, loaded.
        unsafe { abi::with_foreign_waker(waker, Some(lease), |cx| body.poll(cx)) }
    }));
    let (code, slice) = polled.unwrap_or((body_status::ERROR, Slice::from_static("the host failed reading the body")));
    // SAFETY: `out` is valid for the call.
    unsafe { *out = slice };
    code
}

fn abi_version(version: Version) -> u32 {
    match version {
        Version::HTTP_09 => abi::version::HTTP_09,
        Version::HTTP_10 => abi::version::HTTP_10,
        Version::HTTP_2 => abi::version::HTTP_2,
        Version::HTTP_3 => abi::version::HTTP_3,
        _ => abi::version::HTTP_11,
    }
}

/// Why an app call produced no response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the handler panicked")]
    Panicked,
    #[error("the handler returned an invalid response: {0}")]
    InvalidResponse(String),
}

fn invalid(why: &str) -> CallError {
    CallError::InvalidResponse(why.to_owned())
}

/// The body of an app's response.
pub enum AppBody {
    Full(Bytes),
    Stream(AppStream),
}

/// An app's response, copied out of the app.
pub struct AppResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: AppBody,
    /// The request body went over the limit while the app read it: the
    /// client must get `413` whatever the app answered.
    pub body_over_limit: bool,
    /// A `101`: the client's connection, once hyper hands it over, and the
    /// app's end to join it to.
    pub upgrade: Option<Upgrade>,
}

/// An accepted upgrade: hyper's promise of the client's connection, and the
/// app's end of it.
pub struct Upgrade {
    pub on_upgrade: OnUpgrade,
    pub io: AppIo,
}

/// A request in flight inside an app: a future of its response head.
/// Dropping it cancels the app's handler.
pub struct AppCall {
    request: *mut PendingRequest,
    future: *mut ResponseFuture,
    /// Whether `handle` was called (it makes the future and polls it once).
    started: bool,
}

// SAFETY: the app's future is `Send` (app-abi's `App::handle` bound) and the
// `PendingRequest` holds only `Send` data; the raw pointers are owned.
unsafe impl Send for AppCall {}

impl AppCall {
    /// Hands `request` to the app `lease` keeps loaded. `max_body_size` bounds what the
    /// app may read of the body.
    pub fn start(
        lease: Arc<dyn Lease>,
        request: http::Request<Incoming>,
        peer: Option<SocketAddr>,
        max_body_size: u64,
    ) -> AppCall {
        let (parts, incoming) = request.into_parts();
        let body = RequestBody {
            incoming,
            limit: max_body_size,
            received: 0,
            over_limit: false,
            chunk: Bytes::new(),
            note: String::new(),
        };
        let head = empty_head(peer.map_or(PeerAddr::UNKNOWN, PeerAddr::new));
        let request = spare::allocate(PendingRequest { lease, parts, headers: Vec::new(), head, body });
        // SAFETY: `request` was just allocated and nothing else points to it
        // yet, so this exclusive borrow is the only one.
        let pending = unsafe { &mut *request };
        fill_head(pending, request as *mut HostBody);
        AppCall { request, future: std::ptr::null_mut(), started: false }
    }

    /// Calls the app's `handle` (first poll) or `poll_response` (later ones).
    fn poll_app(&mut self, waker: &FfiWaker, head: &mut ResponseHead) -> u32 {
        let app = self.app();
        if self.started {
            // SAFETY: the future is live (a started call that is not finished
            // has one); `waker` and `head` are valid for the call.
            return unsafe { (app.vtable().poll_response)(self.future, waker, head) };
        }
        let mut future = std::ptr::null_mut();
        // SAFETY: the request head and everything it points to live in
        // `self.request` until `drop_response` (see `finish`), as the ABI
        // requires; the out-pointers are valid for the call.
        let code = unsafe { (app.vtable().handle)(app.instance, &(*self.request).head, waker, head, &mut future) };
        self.future = future;
        self.started = true;
        code
    }

    fn app(&self) -> &LoadedApp {
        // SAFETY: `request` is live until `finish` or `Drop`, which null it.
        unsafe { (*self.request).lease.app() }
    }

    /// The request's method and path (empty once the call finished).
    pub fn line(&self) -> (&str, &str) {
        if self.request.is_null() {
            return ("", "");
        }
        // SAFETY: `request` is live until `finish` or `Drop`, which null it;
        // only shared borrows of `parts` exist while the app runs.
        let parts = unsafe { &(*self.request).parts };
        (parts.method.as_str(), parts.uri.path())
    }

    /// Drops the app's future, then the request it borrowed; returns the
    /// whether the body went over the limit. The request's lease goes with it.
    fn finish(&mut self) -> bool {
        if !self.future.is_null() {
            // SAFETY: the future is live and dropped exactly once (nulled).
            unsafe { (self.app().vtable().drop_response)(self.future) };
            self.future = std::ptr::null_mut();
        }
        // SAFETY: `request` is live until the release below.
        let over_limit = unsafe { (*self.request).body.over_limit };
        // SAFETY: the future that borrowed the request is gone; the box is
        // given back exactly once (the pointer is nulled).
        unsafe { spare::release(self.request) };
        self.request = std::ptr::null_mut();
        over_limit
    }

    /// Copies the response head out of the app.
    fn take(&mut self, head: &ResponseHead) -> Result<AppResponse, CallError> {
        // SAFETY: `request` is live until `finish` below.
        let lease = unsafe { &(*self.request).lease };
        let stream = (head.body_kind == body_kind::STREAM && !head.stream.is_null())
            .then(|| AppStream { lease: lease.clone(), stream: head.stream });
        let io = (!head.io.is_null()).then(|| AppIo { lease: lease.clone(), io: head.io });
        // SAFETY: `request` is live until `finish` below. Only the
        // `extensions` field is borrowed mutably: the head the app was lent
        // points at other fields.
        let (version, extensions) = unsafe { ((*self.request).parts.version, &mut (*self.request).parts.extensions) };
        // Only what `fill_head` offered: HTTP/1.1 (not an HTTP/2 CONNECT).
        let on_upgrade = (version == Version::HTTP_11).then(|| extensions.remove::<OnUpgrade>()).flatten();
        // SAFETY: `head` was filled by `poll_response` returning OK and the
        // future is not dropped yet (that happens in `finish`, below).
        let parsed = unsafe { parse_head(head) };
        let body = match stream {
            Some(stream) => AppBody::Stream(stream),
            // SAFETY: as above, the body bytes live in the future.
            None => AppBody::Full(Bytes::copy_from_slice(unsafe { head.body.as_bytes() })),
        };
        let body_over_limit = self.finish();
        let (status, headers) = parsed?;
        let upgrade = match (status == StatusCode::SWITCHING_PROTOCOLS, io, on_upgrade) {
            (false, None, _) => None,
            (true, Some(io), Some(on_upgrade)) => Some(Upgrade { on_upgrade, io }),
            (true, None, _) => return Err(invalid("status 101 without taking the connection")),
            (true, Some(_), None) => return Err(invalid("status 101 to a request that cannot be upgraded")),
            (false, Some(_), _) => return Err(invalid("took the connection without status 101")),
        };
        Ok(AppResponse { status, headers, body, body_over_limit, upgrade })
    }
}

fn empty_head(peer: PeerAddr) -> RequestHead {
    RequestHead {
        method: Slice::EMPTY,
        path: Slice::EMPTY,
        query: Slice::EMPTY,
        has_query: 0,
        version: abi::version::HTTP_11,
        headers: std::ptr::null(),
        header_count: 0,
        peer,
        body: std::ptr::null_mut(),
        body_size: abi::BODY_SIZE_UNKNOWN,
        upgrade: 0,
    }
}

/// Points the C head at the request's parts (which live in the same box).
fn fill_head(pending: &mut PendingRequest, body: *mut HostBody) {
    let parts = &pending.parts;
    pending.headers.clear();
    pending.headers.extend(parts.headers.iter().map(|(name, value)| Header {
        name: Slice::new(name.as_str().as_bytes()),
        value: Slice::new(value.as_bytes()),
    }));
    let query = parts.uri.query();
    // hyper offers the connection of an HTTP/1.1 request with `Upgrade`
    // (HTTP/2 CONNECT streams are not offered to apps).
    let upgrade = parts.version == Version::HTTP_11 && parts.extensions.get::<OnUpgrade>().is_some();
    let body_size = match pending.body.incoming.is_end_stream() {
        true => 0,
        false => pending.body.incoming.size_hint().exact().unwrap_or(abi::BODY_SIZE_UNKNOWN),
    };
    pending.head = RequestHead {
        method: Slice::new(parts.method.as_str().as_bytes()),
        path: Slice::new(parts.uri.path().as_bytes()),
        query: Slice::new(query.unwrap_or("").as_bytes()),
        has_query: u8::from(query.is_some()),
        version: abi_version(parts.version),
        headers: pending.headers.as_ptr(),
        header_count: pending.headers.len(),
        body,
        body_size,
        upgrade: u8::from(upgrade),
        ..pending.head
    };
}

/// Validates and copies status and headers.
///
/// # Safety
/// `head` was filled by `poll_response` and its future is not dropped yet.
unsafe fn parse_head(head: &ResponseHead) -> Result<(StatusCode, HeaderMap), CallError> {
    let status = StatusCode::from_u16(head.status)
        .map_err(|_| CallError::InvalidResponse(format!("status {} is not an HTTP status code", head.status)))?;
    // SAFETY: see the function's contract.
    let pairs = unsafe { head.header_slice() };
    // Room for two more: hyper adds `content-length` and `date` to an
    // HTTP/2 response's map (growing it would rehash and reallocate).
    let mut headers = HeaderMap::with_capacity(pairs.len() + 2);
    for pair in pairs {
        // SAFETY: header bytes live in the future (function contract).
        let (name, value) = unsafe { (pair.name.as_bytes(), pair.value.as_bytes()) };
        let invalid = || CallError::InvalidResponse(format!("header {:?} is not valid", String::from_utf8_lossy(name)));
        let name = match common_name(name) {
            Some(name) => name,
            None => HeaderName::from_bytes(name).map_err(|_| invalid())?,
        };
        let value = match common_value(value) {
            Some(value) => value,
            None => HeaderValue::from_bytes(value).map_err(|_| invalid())?,
        };
        headers.append(name, value);
    }
    Ok((status, headers))
}

/// Header values most responses carry, as static `HeaderValue`s: copying one
/// out of the app would allocate on every response. (Constants: made at
/// compile time, where `from_static` checks the bytes.)
fn common_value(value: &[u8]) -> Option<HeaderValue> {
    const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
    const HTML: HeaderValue = HeaderValue::from_static("text/html; charset=utf-8");
    const JSON: HeaderValue = HeaderValue::from_static("application/json");
    const EVENTS: HeaderValue = HeaderValue::from_static("text/event-stream");
    const OCTETS: HeaderValue = HeaderValue::from_static("application/octet-stream");
    const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
    const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
    const CLOSE: HeaderValue = HeaderValue::from_static("close");
    Some(match value {
        b"text/plain; charset=utf-8" => TEXT,
        b"text/html; charset=utf-8" => HTML,
        b"application/json" => JSON,
        b"text/event-stream" => EVENTS,
        b"application/octet-stream" => OCTETS,
        b"no-store" => NO_STORE,
        b"no-cache" => NO_CACHE,
        b"close" => CLOSE,
        _ => return None,
    })
}

/// Header names most responses carry, without `HeaderName::from_bytes`'s
/// search of the standard names.
fn common_name(name: &[u8]) -> Option<HeaderName> {
    use http::header;
    Some(match name {
        b"content-type" => header::CONTENT_TYPE,
        b"cache-control" => header::CACHE_CONTROL,
        b"location" => header::LOCATION,
        b"set-cookie" => header::SET_COOKIE,
        _ => return None,
    })
}

impl std::future::Future for AppCall {
    type Output = Result<AppResponse, CallError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.request.is_null() {
            // Polled after completion: a caller bug, answered without UB.
            return Poll::Ready(Err(CallError::InvalidResponse("polled after it completed".to_owned())));
        }
        let waker = FfiWaker::borrowed(cx.waker());
        let mut head = ResponseHead::EMPTY;
        // The app keeps `head`'s data until `drop_response`, in `finish`.
        match this.poll_app(&waker, &mut head) {
            status::OK => Poll::Ready(this.take(&head)),
            status::PENDING => Poll::Pending,
            _ => {
                this.finish();
                Poll::Ready(Err(CallError::Panicked))
            }
        }
    }
}

impl Drop for AppCall {
    fn drop(&mut self) {
        if !self.request.is_null() {
            self.finish();
        }
    }
}

/// A streamed response body inside the app.
pub struct AppStream {
    lease: Arc<dyn Lease>,
    stream: *mut BodyStream,
}

// SAFETY: the app's stream is `Send` (app-abi requires it) and owned here.
unsafe impl Send for AppStream {}
// SAFETY: `&AppStream` gives no access to the stream (polling takes `&mut`).
unsafe impl Sync for AppStream {}

/// The app's stream failed or panicked (already logged by the app side).
#[derive(Debug, thiserror::Error)]
#[error("the app's response stream failed")]
pub struct StreamFailed;

impl AppStream {
    /// The next chunk, copied out of the app.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, StreamFailed>>> {
        let waker = FfiWaker::borrowed(cx.waker());
        let mut chunk = Slice::EMPTY;
        let app = self.lease.app();
        // SAFETY: the stream is live until `Drop`; `waker` and `chunk` are
        // valid for the call.
        let code = unsafe { (app.vtable().poll_chunk)(self.stream, &waker, &mut chunk) };
        match code {
            // SAFETY: the chunk is valid until the next call on the stream.
            status::CHUNK => Poll::Ready(Some(Ok(Bytes::copy_from_slice(unsafe { chunk.as_bytes() })))),
            status::END => Poll::Ready(None),
            status::PENDING => Poll::Pending,
            _ => Poll::Ready(Some(Err(StreamFailed))),
        }
    }
}

impl Drop for AppStream {
    fn drop(&mut self) {
        // SAFETY: the stream is live and dropped exactly once, before the
        // lease (a field dropped after this runs).
        unsafe { (self.lease.app().vtable().drop_stream)(self.stream) };
    }
}

/// The app's end of an upgraded connection: what the client sends is
/// written to it, what the app sends is read from it.
pub struct AppIo {
    lease: Arc<dyn Lease>,
    io: *mut AppIo_,
}

/// The app's opaque type, named apart from the host's wrapper.
type AppIo_ = app_abi::ffi::AppIo;

// SAFETY: the app's end is `Send` (app-abi requires it) and owned here.
unsafe impl Send for AppIo {}
// SAFETY: `&AppIo` gives no access to the app's end (I/O takes `&mut`).
unsafe impl Sync for AppIo {}

impl AppIo {
    /// Calls one `io_*` entry point with the task's waker.
    fn call(&mut self, cx: &mut Context<'_>, f: impl FnOnce(&AppVTable, *mut AppIo_, &FfiWaker) -> u32) -> u32 {
        let waker = FfiWaker::borrowed(cx.waker());
        f(self.lease.app().vtable(), self.io, &waker)
    }
}

fn io_result<T>(code: u32, value: T) -> Poll<std::io::Result<T>> {
    match code {
        status::OK => Poll::Ready(Ok(value)),
        status::PENDING => Poll::Pending,
        status::IO_ERROR => Poll::Ready(Err(std::io::Error::other("the app's end of the connection failed"))),
        _ => Poll::Ready(Err(std::io::Error::other("the app panicked on an upgraded connection"))),
    }
}

impl AsyncRead for AppIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let unfilled = buf.initialize_unfilled();
        let (ptr, cap) = (unfilled.as_mut_ptr(), unfilled.len());
        let mut read = 0;
        // SAFETY: the app's end is live until `Drop`; `ptr` is `cap`
        // initialized, writable bytes and `read` is writable, for the call.
        let code = self.get_mut().call(cx, |app, io, waker| unsafe { (app.io_read)(io, waker, ptr, cap, &mut read) });
        let polled = io_result(code, ());
        if polled.is_ready() {
            buf.advance(read.min(cap));
        }
        polled
    }
}

impl AsyncWrite for AppIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut written = 0;
        // SAFETY: the app's end is live until `Drop`; `data` and `written`
        // are valid for the call.
        let code = self
            .get_mut()
            .call(cx, |app, io, waker| unsafe { (app.io_write)(io, waker, Slice::new(data), &mut written) });
        io_result(code, written.min(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // SAFETY: the app's end is live until `Drop`; `waker` is valid for the call.
        io_result(self.get_mut().call(cx, |app, io, waker| unsafe { (app.io_flush)(io, waker) }), ())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // SAFETY: the app's end is live until `Drop`; `waker` is valid for the call.
        io_result(self.get_mut().call(cx, |app, io, waker| unsafe { (app.io_shutdown)(io, waker) }), ())
    }
}

impl Drop for AppIo {
    fn drop(&mut self) {
        // SAFETY: the app's end is live and dropped exactly once, before the
        // lease (a field dropped after this runs).
        unsafe { (self.lease.app().vtable().drop_io)(self.io) };
    }
}

/// Request boxes given back on this thread, for the next requests: a
/// request reuses one (and the capacity of its header array) instead of two
/// allocations.
mod spare {
    use std::cell::RefCell;
    use std::mem::MaybeUninit;

    use super::{Header, PendingRequest};

    /// How many boxes a thread keeps: enough for the streams in flight on a
    /// few HTTP/2 connections (a box is about half a kilobyte).
    const KEPT: usize = 64;

    struct Spare {
        shell: Box<MaybeUninit<PendingRequest>>,
        headers: Vec<Header>,
    }

    thread_local! {
        static SPARES: RefCell<Vec<Spare>> = const { RefCell::new(Vec::new()) };
    }

    /// Boxes `request`, in a spare box if this thread has one.
    pub(super) fn allocate(mut request: PendingRequest) -> *mut PendingRequest {
        let spare = SPARES.try_with(|spares| spares.borrow_mut().pop()).ok().flatten();
        let Some(Spare { mut shell, headers }) = spare else {
            return Box::into_raw(Box::new(request));
        };
        request.headers = headers;
        shell.write(request);
        // The box now holds an initialized request.
        Box::into_raw(shell) as *mut PendingRequest
    }

    /// Drops the request and keeps its box (and its header array) for a
    /// later request on this thread.
    ///
    /// # Safety
    /// `request` came from [`allocate`] and is given back once; nothing
    /// borrows it any more.
    pub(super) unsafe fn release(request: *mut PendingRequest) {
        // SAFETY: the box is live (function contract). Its header array is
        // taken, its value dropped in place once, and the allocation is then
        // treated as uninitialized memory of the same layout, which is what
        // `MaybeUninit` is.
        let (mut headers, shell) = unsafe {
            let headers = std::mem::take(&mut (*request).headers);
            std::ptr::drop_in_place(request);
            (headers, Box::from_raw(request as *mut MaybeUninit<PendingRequest>))
        };
        headers.clear();
        let _ = SPARES.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < KEPT {
                spares.push(Spare { shell, headers });
            }
        });
    }
}
