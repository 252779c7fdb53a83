//! The app-side glue that [`export_app!`](crate::export_app) instantiates
//! for an app type: [`vtable`] and the `extern "C"` entry points in it.
//!
//! Each entry point turns C data into the safe API's types (an
//! `InitContext`, a `Request`) and a `Response` back into C data. It catches
//! every panic, so none unwinds into the host; enters the generation's own
//! tokio runtime around every call into the app; and owns every buffer it
//! hands out until the host gives it back (the ownership rules in the `ffi`
//! module docs).
//!
//! This is the top layer: the only part of `ffi` that uses the safe API.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::ReadBuf;

use super::abi::{
    body_kind, level, status, AppInstance, AppIo, AppVTable, BodyStream, FfiWaker, InitContextC, OwnedString,
    RequestHead, ResponseFuture, ResponseHead, Slice, ABI_VERSION,
};
use super::header_list::HeaderList;
use super::host::{connect, host_log, BodyGate, HeadRef};
use super::waker::with_foreign_waker;
use crate::context::{DrainSignal, InitContext};
use crate::log::{self, panic_message};
use crate::request::Request;
use crate::response::{Body, BoxIo, BoxStream, Response};
use crate::App;

/// One generation's app and the runtime its futures use.
struct Instance<A> {
    app: A,
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    drain: tokio::sync::watch::Sender<bool>,
    live_threads: Arc<AtomicUsize>,
}

/// What the host holds as a `ResponseFuture`: what every response future
/// needs, followed in the same allocation by the handler's future itself
/// (see [`Pending`]), whose type is erased behind `poll` and `free`: one
/// allocation per request instead of a state and a boxed future.
struct FutureState {
    /// The runtime handle of the generation, owned by the `Instance`, which
    /// outlives every future (module rules).
    handle: *const tokio::runtime::Handle,
    done: Option<Finished>,
    /// The request body's gate (when it has a body), closed in `drop_response`.
    gate: Option<Arc<BodyGate>>,
    /// Polls the future that follows this state.
    poll: unsafe fn(*mut FutureState, &mut Context<'_>) -> Poll<Response>,
    /// Drops this state and its future, and frees them.
    free: unsafe fn(*mut FutureState),
}

/// A [`FutureState`] and the future it erases. `repr(C)`: a pointer to it
/// is a pointer to its state.
#[repr(C)]
struct Pending<F> {
    state: FutureState,
    future: F,
}

impl<F: Future<Output = Response>> Pending<F> {
    /// Boxes `future` behind its state; the host owns the result.
    fn boxed(future: F, handle: *const tokio::runtime::Handle, gate: Option<Arc<BodyGate>>) -> *mut FutureState {
        let state = FutureState { handle, done: None, gate, poll: Self::poll, free: Self::free };
        Box::into_raw(Box::new(Pending { state, future })) as *mut FutureState
    }

    /// # Safety
    /// `state` is the state of a live `Pending<F>` made by `boxed`, used by
    /// no other thread now, whose future has not completed.
    unsafe fn poll(state: *mut FutureState, cx: &mut Context<'_>) -> Poll<Response> {
        // SAFETY: see the function's contract; the box never moves, so the
        // future stays pinned until `free`.
        unsafe { Pin::new_unchecked(&mut (*(state as *mut Pending<F>)).future) }.poll(cx)
    }

    /// # Safety
    /// `state` is the state of a live `Pending<F>` made by `boxed`; this is
    /// its end.
    unsafe fn free(state: *mut FutureState) {
        // SAFETY: see the function's contract.
        drop(unsafe { Box::from_raw(state as *mut Pending<F>) });
    }
}

/// A finished response, kept alive until `drop_response` so the host can read
/// the pointers in its [`ResponseHead`].
struct Finished {
    headers: HeaderList,
    body: Bytes,
}

struct StreamState {
    stream: BoxStream,
    handle: *const tokio::runtime::Handle,
    current: Bytes,
}

/// The app's end of an upgraded connection, owned by the host until `drop_io`.
struct IoState {
    io: BoxIo,
    handle: *const tokio::runtime::Handle,
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
        io_read,
        io_write,
        io_flush,
        io_shutdown,
        drop_io,
        drain: drain::<A>,
        shutdown: shutdown::<A>,
        free_string,
    }
}

/// Copies the app settings out of the host's context.
///
/// # Safety
/// `ctx.settings` points to `settings_count` headers (or is null) that stay
/// valid during the call, as in the context the host passes to `init`.
unsafe fn settings_from(ctx: &InitContextC) -> Vec<(String, String)> {
    if ctx.settings_count == 0 || ctx.settings.is_null() {
        return Vec::new();
    }
    // SAFETY: see the function's contract.
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

/// # Safety
/// Called by the host as [`AppVTable::init`]: `ctx` points to a context valid
/// for the call whose `host` table is static, and `out_app` and `out_error`
/// are writable.
unsafe extern "C" fn init<A: App>(
    ctx: *const InitContextC,
    out_app: *mut *mut AppInstance,
    out_error: *mut OwnedString,
) -> u32 {
    // SAFETY: the host passes a valid context for the call.
    let ctx = unsafe { &*ctx };
    // SAFETY: the host table is static in the host (see `InitContextC`).
    let host = unsafe { &*ctx.host };
    connect(host, ctx.generation);
    log::install(ctx.generation, ctx.max_log_level);
    // SAFETY: the host's context is valid for the call.
    let settings = unsafe { settings_from(ctx) };
    let (code, message) = match build_instance::<A>(ctx.generation, settings) {
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
fn build_instance<A: App>(generation: u64, settings: Vec<(String, String)>) -> Result<Instance<A>, (u32, String)> {
    let live_threads = Arc::new(AtomicUsize::new(0));
    let (started, stopped) = (live_threads.clone(), live_threads.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(A::RUNTIME_THREADS.max(1))
        .thread_name(format!("app-g{generation}"))
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
    let init_ctx = InitContext::new(generation, settings, DrainSignal::new(drain_rx));
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

/// # Safety
/// Called by the host as [`AppVTable::handle`]: `app` came from this
/// library's `init` and is not shut down; `head` stays valid until the host
/// calls `drop_response` for the future made here; `waker` is lent for the
/// call; `out` and `out_future` are writable.
unsafe extern "C" fn handle<A: App>(
    app: *const AppInstance,
    head: *const RequestHead,
    waker: *const FfiWaker,
    out: *mut ResponseHead,
    out_future: *mut *mut ResponseFuture,
) -> u32 {
    let head_ptr = head;
    // SAFETY: `app` came from our `init` and is live until `shutdown`.
    let instance = unsafe { &*(app as *const Instance<A>) };
    // SAFETY: the host keeps `head` and what it points to valid until
    // `drop_response` (module rules), and the future made here, the only user
    // of the `HeadRef`, is dropped there.
    let head = unsafe { HeadRef::new(&*head) };
    // SAFETY: `head` came from the host's `handle` call, and `drop_response`
    // closes the gate (kept in the future's state) before it returns.
    let gate = (head.body_size() != Some(0)).then(|| unsafe { BodyGate::new(&*head_ptr) });
    let _entered = instance.handle.enter();
    // The future borrows the instance and the request head. The host keeps
    // both alive until it calls `drop_response`, which drops the future; so
    // the state's raw pointer, which forgets the borrow, never outlives it.
    let made = catch_unwind(AssertUnwindSafe(|| {
        let future = instance.app.handle(Request::new(head, gate.clone()));
        Pending::boxed(future, &instance.handle, gate.clone())
    }));
    let Ok(state) = made else {
        if let Some(gate) = gate {
            gate.close();
        }
        // SAFETY: `out_future` is valid for the call.
        unsafe { *out_future = std::ptr::null_mut() };
        return status::PANICKED; // the panic hook logged it
    };
    // SAFETY: `out_future` is valid for the call; the host owns the future now.
    unsafe { *out_future = state as *mut ResponseFuture };
    // SAFETY: `state` was just made; `waker` and `out` are valid for the call.
    unsafe { poll_state(state, waker, out) }
}

/// # Safety
/// Called by the host as [`AppVTable::poll_response`]: `future` came from
/// `handle`, is not dropped yet and is polled by no other thread now;
/// `waker` is lent for the call; `out` is writable.
unsafe extern "C" fn poll_response(future: *mut ResponseFuture, waker: *const FfiWaker, out: *mut ResponseHead) -> u32 {
    let state = future as *mut FutureState;
    // SAFETY: `future` came from `handle` and is not dropped yet; the
    // instance (and its handle) outlives it (module rules).
    let _entered = unsafe { &*(*state).handle }.enter();
    // SAFETY: the host polls it from one thread at a time; `waker` and
    // `out` are valid for the call.
    unsafe { poll_state(state, waker, out) }
}

/// Polls a response future (the generation's runtime entered by the
/// caller) and, once it is ready, fills `out`.
///
/// # Safety
/// `state` came from `Pending::boxed`, is not dropped yet, is used by no
/// other thread now and its future has not completed; `waker` is a lent
/// waker and `out` is writable, both for the call.
unsafe fn poll_state(state: *mut FutureState, waker: *const FfiWaker, out: *mut ResponseHead) -> u32 {
    // SAFETY: `state` is live (function contract).
    let poll = unsafe { (*state).poll };
    let polled = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `waker` is lent for this call; the host's code stays
        // loaded; `state` is as `poll` requires (function contract).
        unsafe { with_foreign_waker::<(), _>(waker, None, |cx| poll(state, cx)) }
    }));
    let response = match polled {
        Ok(Poll::Ready(response)) => response,
        Ok(Poll::Pending) => return status::PENDING,
        Err(_) => return status::PANICKED, // the panic hook logged it
    };
    // SAFETY: `state` is live and used by this thread only (function contract).
    let state = unsafe { &mut *state };
    let (head, finished) = finish(response, state.handle);
    let finished = state.done.insert(finished);
    // SAFETY: `out` is valid for the call. The pointers in it point into
    // `state.done`, which lives until `drop_response`.
    unsafe {
        *out = ResponseHead {
            headers: finished.headers.as_slice().as_ptr(),
            header_count: finished.headers.as_slice().len(),
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
    let (mut stream, mut io) = (std::ptr::null_mut(), std::ptr::null_mut());
    let (body_kind, body) = match body {
        Body::Bytes(bytes) => (body_kind::BYTES, bytes),
        Body::Stream(body) => {
            let state = StreamState { stream: body, handle, current: Bytes::new() };
            stream = Box::into_raw(Box::new(state)) as *mut BodyStream;
            (body_kind::STREAM, Bytes::new())
        }
        Body::Upgrade(upgraded) => {
            io = Box::into_raw(Box::new(IoState { io: upgraded, handle })) as *mut AppIo;
            (body_kind::BYTES, Bytes::new())
        }
    };
    let head = ResponseHead { status, body_kind, stream, io, ..ResponseHead::EMPTY };
    (head, Finished { headers, body })
}

/// # Safety
/// Called by the host as [`AppVTable::drop_response`]: `future` came from
/// `handle` and is not dropped yet; this drops it.
unsafe extern "C" fn drop_response(future: *mut ResponseFuture) {
    let state = future as *mut FutureState;
    // SAFETY: `future` came from `handle` and is not dropped yet; the
    // instance (and its handle) outlives it (module rules).
    let (gate, handle, done, free) =
        unsafe { (&(*state).gate, &*(*state).handle, (*state).done.is_some(), (*state).free) };
    // No read of the request body may reach the host once this returns (a
    // task may still own the body): wait for one that runs, refuse the rest.
    if let Some(gate) = gate {
        gate.close();
    }
    // A future that completed holds nothing that talks to the runtime any
    // more (its locals are gone); only a cancelled one needs it entered.
    let _entered = (!done).then(|| handle.enter());
    // SAFETY: `state` came from `Pending::boxed` and is freed exactly once,
    // here. A panic while dropping was logged by the panic hook; there is
    // nothing else to do.
    let _ = catch_unwind(AssertUnwindSafe(move || unsafe { free(state) }));
}

/// # Safety
/// Called by the host as [`AppVTable::poll_chunk`]: `stream` came in a
/// response head of this library, is not dropped yet and is polled by no
/// other thread now; `waker` is lent for the call; `out` is writable.
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

/// # Safety
/// Called by the host as [`AppVTable::drop_stream`]: `stream` came in a
/// response head of this library and is not dropped yet; this drops it.
unsafe extern "C" fn drop_stream(stream: *mut BodyStream) {
    // SAFETY: `stream` came from `poll_response` and is dropped exactly once.
    let state = unsafe { Box::from_raw(stream as *mut StreamState) };
    // SAFETY: the instance outlives its streams (module rules).
    let handle = unsafe { &*state.handle };
    let _entered = handle.enter();
    // A panic here was logged by the panic hook; there is nothing else to do.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(state)));
}

/// Polls the app's end of an upgraded connection with the host's waker,
/// the generation's runtime entered, catching panics.
///
/// # Safety
/// `io` came in a response head of this library, is not dropped yet and is
/// used by no other thread now; `waker` is lent for the call.
unsafe fn poll_io<T>(
    io: *mut AppIo,
    waker: *const FfiWaker,
    f: impl FnOnce(Pin<&mut dyn crate::response::UpgradedIo>, &mut Context<'_>) -> Poll<std::io::Result<T>>,
) -> Result<Poll<std::io::Result<T>>, ()> {
    // SAFETY: see the function's contract.
    let state = unsafe { &mut *(io as *mut IoState) };
    // SAFETY: the instance outlives its upgraded connections (module rules).
    let handle = unsafe { &*state.handle };
    catch_unwind(AssertUnwindSafe(|| {
        let _entered = handle.enter();
        // SAFETY: `waker` is lent for this call; the host's code stays loaded.
        unsafe { with_foreign_waker::<(), _>(waker, None, |cx| f(state.io.as_mut(), cx)) }
    }))
    .map_err(|_| ())
}

/// The status for a polled I/O step that returns nothing.
fn io_code(polled: Result<Poll<std::io::Result<()>>, ()>) -> u32 {
    match polled {
        Ok(Poll::Ready(Ok(()))) => status::OK,
        Ok(Poll::Pending) => status::PENDING,
        Ok(Poll::Ready(Err(_))) => status::IO_ERROR,
        Err(()) => status::PANICKED,
    }
}

/// # Safety
/// Called by the host as [`AppVTable::io_read`]: `io` came in a response
/// head of this library, is not dropped yet and is used by no other thread
/// now; `waker` is lent for the call; `buf` is `cap` writable bytes and
/// `out_len` is writable, for the call.
unsafe extern "C" fn io_read(
    io: *mut AppIo,
    waker: *const FfiWaker,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> u32 {
    // SAFETY: the host lends `cap` writable bytes at `buf` for the call.
    let buf = unsafe { std::slice::from_raw_parts_mut(buf, cap) };
    let mut read = ReadBuf::new(buf);
    // SAFETY: see the function's contract.
    let polled = unsafe { poll_io(io, waker, |io, cx| io.poll_read(cx, &mut read)) };
    // SAFETY: `out_len` is valid for the call.
    unsafe { *out_len = read.filled().len() };
    io_code(polled)
}

/// # Safety
/// Called by the host as [`AppVTable::io_write`]: as for `io_read`, and
/// `data` is valid for the call.
unsafe extern "C" fn io_write(io: *mut AppIo, waker: *const FfiWaker, data: Slice, out_len: *mut usize) -> u32 {
    // SAFETY: the host lends `data` for the call.
    let data = unsafe { data.as_bytes() };
    // SAFETY: see the function's contract.
    let polled = unsafe { poll_io(io, waker, |io, cx| io.poll_write(cx, data)) };
    let (code, written) = match polled {
        Ok(Poll::Ready(Ok(written))) => (status::OK, written),
        Ok(Poll::Pending) => (status::PENDING, 0),
        Ok(Poll::Ready(Err(_))) => (status::IO_ERROR, 0),
        Err(()) => (status::PANICKED, 0),
    };
    // SAFETY: `out_len` is valid for the call.
    unsafe { *out_len = written };
    code
}

/// # Safety
/// Called by the host as [`AppVTable::io_flush`]: as for `io_read`.
unsafe extern "C" fn io_flush(io: *mut AppIo, waker: *const FfiWaker) -> u32 {
    // SAFETY: see the function's contract.
    io_code(unsafe { poll_io(io, waker, |io, cx| io.poll_flush(cx)) })
}

/// # Safety
/// Called by the host as [`AppVTable::io_shutdown`]: as for `io_read`.
unsafe extern "C" fn io_shutdown(io: *mut AppIo, waker: *const FfiWaker) -> u32 {
    // SAFETY: see the function's contract.
    io_code(unsafe { poll_io(io, waker, |io, cx| io.poll_shutdown(cx)) })
}

/// # Safety
/// Called by the host as [`AppVTable::drop_io`]: `io` came in a response
/// head of this library and is not dropped yet; this drops it.
unsafe extern "C" fn drop_io(io: *mut AppIo) {
    // SAFETY: `io` came from `poll_response` and is dropped exactly once.
    let state = unsafe { Box::from_raw(io as *mut IoState) };
    // SAFETY: the instance outlives its upgraded connections (module rules).
    let handle = unsafe { &*state.handle };
    let _entered = handle.enter();
    // A panic here was logged by the panic hook; there is nothing else to do.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(state)));
}

/// # Safety
/// Called by the host as [`AppVTable::drain`]: `app` came from this
/// library's `init` and is not shut down.
unsafe extern "C" fn drain<A: App>(app: *const AppInstance) {
    // SAFETY: `app` came from our `init` and is live until `shutdown`.
    let instance = unsafe { &*(app as *const Instance<A>) };
    instance.drain.send_replace(true);
    let _entered = instance.handle.enter();
    // A panic here was logged by the panic hook; there is nothing else to do.
    let _ = catch_unwind(AssertUnwindSafe(|| instance.app.drain()));
}

/// # Safety
/// Called by the host as [`AppVTable::shutdown`], once: `app` came from this
/// library's `init`, and every future and stream it made was dropped; this
/// frees it.
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

/// # Safety
/// Called by the host as [`AppVTable::free_string`]: `s` is empty, or was
/// filled by this library and is not freed yet; this frees it.
unsafe extern "C" fn free_string(s: OwnedString) {
    if !s.ptr.is_null() {
        // SAFETY: `s` came from `OwnedString::from_string` in this library and
        // is freed exactly once.
        drop(unsafe { String::from_raw_parts(s.ptr, s.len, s.cap) });
    }
}
