//! One client connection: HTTP/1.1 or HTTP/2 (prior knowledge), its idle and
//! header timeouts, and its part in a graceful shutdown.
//!
//! A connection task waits on two things only: its hyper connection, and
//! its [`Control`] (one atomic and a waker). Nothing else is polled when a
//! request arrives, so the timeouts and the shutdown cost the request path
//! nothing. The registry's sweeper (`connections::sweep`) looks at every open
//! connection a few times a second and closes those past a deadline; a
//! shutdown asks every connection to finish gracefully, and a retired
//! generation closes the connections it still holds, through the same
//! control.
//!
//! Deadlines, while no request of the connection is in flight (so closing
//! loses nothing):
//! - bytes of a request head arrived but the head is not complete: closed
//!   `header_timeout` after the first of them (slowloris);
//! - nothing arrived since the connection opened: closed after
//!   `header_timeout` (a connection that never sends a request);
//! - nothing arrived since the last response: closed after
//!   `keep_alive_timeout`.
//!
//! The sweep runs every [`SWEEP`], and activity is stamped with a clock of
//! that resolution (rounded up), so a deadline is enforced never early and
//! at most two sweeps late.
//!
//! An upgraded connection (a `101` answer: a WebSocket, say) has no
//! deadline: once hyper hands the socket over, the same task runs the
//! session the request path left in [`Connection::upgrade`] (joining the
//! client to the app's end), until either side ends it, its generation is
//! retired (`reload_timeout`) or the connection is closed (the end of a
//! shutdown). Asking it to finish does nothing: the app ends it the
//! protocol's way when its generation drains.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How often the server checks connection deadlines (and advances the
/// coarse clock connections stamp their activity with).
pub const SWEEP: Duration = Duration::from_millis(100);

/// A clock that ticks once per sweep: reading the real clock twice per
/// request costs more than a timeout measured in seconds needs.
struct CoarseClock {
    epoch: Instant,
    now_ms: AtomicU64,
}

fn coarse_clock() -> &'static CoarseClock {
    static CLOCK: std::sync::OnceLock<CoarseClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(|| CoarseClock { epoch: Instant::now(), now_ms: AtomicU64::new(0) })
}

/// Advances the coarse clock; the sweeper calls it every [`SWEEP`].
pub fn tick() -> Instant {
    let clock = coarse_clock();
    let now = Instant::now();
    let ms = u64::try_from(now.duration_since(clock.epoch).as_millis()).unwrap_or(u64::MAX);
    clock.now_ms.store(ms, Ordering::Relaxed);
    now
}

/// A stamp for "now" that is never earlier than now (the coarse clock lags
/// by up to a sweep), so no deadline fires early.
fn stamp_ms() -> u64 {
    coarse_clock().now_ms.load(Ordering::Relaxed) + SWEEP.as_millis() as u64
}

/// What a connection task is asked to do, in increasing order.
const SERVE: u8 = 0;
const FINISH: u8 = 1;
const CLOSE: u8 = 2;

/// How the rest of the server steers a connection task.
struct Control {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl Control {
    fn set(&self, state: u8) {
        self.state.fetch_max(state, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Ready with the new state once it differs from `seen`.
    fn poll_change(&self, cx: &mut Context<'_>, seen: u8) -> Poll<u8> {
        self.waker.register(cx.waker());
        let state = self.state.load(Ordering::Acquire);
        if state == seen {
            Poll::Pending
        } else {
            Poll::Ready(state)
        }
    }
}

/// What every connection follows: its deadlines, and whether the server is
/// shutting down or (a process-mode worker) retiring.
pub struct Rules {
    pub header_timeout: Duration,
    pub keep_alive_timeout: Duration,
    shutting_down: AtomicBool,
    retiring: AtomicBool,
}

impl Rules {
    pub fn new(header_timeout: Duration, keep_alive_timeout: Duration) -> Rules {
        Rules {
            header_timeout,
            keep_alive_timeout,
            shutting_down: AtomicBool::new(false),
            retiring: AtomicBool::new(false),
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Whether this process hands its clients over to newer workers: it
    /// still serves every request it gets, but closes each connection
    /// after its current response.
    pub fn is_retiring(&self) -> bool {
        self.retiring.load(Ordering::Relaxed)
    }

    pub fn begin_retiring(&self) {
        self.retiring.store(true, Ordering::Relaxed);
    }
}

/// What the requests of one connection share.
pub struct Connection {
    rules: Arc<Rules>,
    pub peer: SocketAddr,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// When the connection last became idle (coarse clock, ms).
    idle_since_ms: AtomicU64,
    /// When bytes of the next request head started to arrive (coarse clock,
    /// ms), plus one; 0 when none are pending.
    head_since_ms: AtomicU64,
    /// The generation of the latest app request on this connection.
    generation: AtomicU64,
    /// Accepted during a shutdown: answered `503`, not asked to finish.
    accepted_in_shutdown: bool,
    control: Control,
    /// A request that may be answered `101` is in flight: asking the
    /// connection to finish must not touch hyper's keep-alive now (hyper
    /// would add `close` to the `101`'s `Connection: upgrade`).
    upgrading: AtomicBool,
    /// A `101` was answered: the connection has no deadlines any more.
    upgraded: AtomicBool,
    /// What runs once hyper hands the upgraded socket over.
    session: Mutex<Option<Session>>,
}

/// An upgraded connection's life after the `101`.
pub type Session = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Connection {
    /// Notes that an app request of `generation` runs on this connection.
    pub fn serves(&self, generation: u64) {
        self.generation.store(generation, Ordering::Relaxed);
    }

    /// Whether a request or an upgraded connection of `generation` (or
    /// older) may still be running here.
    pub fn may_hold(&self, generation: u64) -> bool {
        (self.in_flight.load(Ordering::Acquire) > 0 || self.upgraded.load(Ordering::Acquire))
            && self.generation.load(Ordering::Relaxed) <= generation
    }

    /// Whether a request that may be answered `101` is in flight.
    pub fn set_upgrading(&self, upgrading: bool) {
        self.upgrading.store(upgrading, Ordering::Release);
    }

    /// The response being sent is a `101`: after it, `session` runs on this
    /// connection instead of HTTP.
    pub fn upgrade(&self, session: Session) {
        self.upgraded.store(true, Ordering::Release);
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
    }

    fn take_session(&self) -> Option<Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Whether a request is being served on this connection.
    pub fn is_busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// Closes the connection at once, cutting what runs on it.
    pub fn close(&self) {
        self.control.set(CLOSE);
    }

    /// Lets the current response finish, then closes (HTTP/2: GOAWAY).
    pub fn finish(&self) {
        if !self.accepted_in_shutdown {
            self.control.set(FINISH);
        }
    }

    /// Whether an idle or header deadline has passed at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.deadline().is_some_and(|deadline| deadline <= now)
    }

    fn at(ms: u64) -> Instant {
        coarse_clock().epoch + Duration::from_millis(ms)
    }

    /// When to close the connection unless something happens; `None` while
    /// a request is in flight.
    fn deadline(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 || self.upgraded.load(Ordering::Acquire) {
            return None;
        }
        let rules = &self.rules;
        let head = self.head_since_ms.load(Ordering::Acquire);
        if head > 0 {
            return Some(Self::at(head - 1) + rules.header_timeout);
        }
        let idle_since = Self::at(self.idle_since_ms.load(Ordering::Acquire));
        let first = self.requests.load(Ordering::Relaxed) == 0;
        Some(idle_since + if first { rules.header_timeout } else { rules.keep_alive_timeout })
    }

    /// Bytes arrived: if no request is in flight, a request head has begun.
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.head_since_ms.load(Ordering::Relaxed) == 0 {
            self.head_since_ms.store(stamp_ms() + 1, Ordering::Release);
        }
    }
}

/// The socket, noting when request bytes arrive (for `header_timeout`).
struct Watched {
    stream: TcpStream,
    connection: Arc<Connection>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.connection.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One request on its connection, from its head until its response body
/// ends (the guard lives in the body): every request, host-answered or not,
/// keeps the connection from counting as idle.
pub struct Activity {
    connection: Arc<Connection>,
}

impl Activity {
    pub fn start(connection: Arc<Connection>) -> Activity {
        connection.in_flight.fetch_add(1, Ordering::AcqRel);
        connection.requests.fetch_add(1, Ordering::Relaxed);
        connection.head_since_ms.store(0, Ordering::Release);
        Activity { connection }
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        let connection = &self.connection;
        connection.idle_since_ms.store(stamp_ms(), Ordering::Release);
        connection.in_flight.fetch_sub(1, Ordering::AcqRel);
        // During a shutdown, a connection that was accepted late (or raced
        // the shutdown's sweep over connections) closes after its answer;
        // for HTTP/2 that is a GOAWAY, which `Connection: close` is not.
        if connection.rules.is_shutting_down() || connection.rules.is_retiring() {
            connection.control.set(FINISH);
        }
    }
}

impl Connection {
    /// A connection from `peer`, just accepted.
    pub fn new(peer: SocketAddr, rules: Arc<Rules>) -> Connection {
        Connection {
            accepted_in_shutdown: rules.is_shutting_down(),
            rules,
            peer,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(stamp_ms()),
            head_since_ms: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            control: Control { state: AtomicU8::new(SERVE), waker: AtomicWaker::new() },
            upgrading: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            session: Mutex::new(None),
        }
    }
}

/// Serves `connection` over `stream` with `service` until it ends or is
/// closed through its control.
pub async fn serve<S, B>(
    stream: TcpStream,
    connection: Arc<Connection>,
    http: &auto::Builder<TokioExecutor>,
    service: S,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = stream.set_nodelay(true);
    let peer = connection.peer;
    let io = TokioIo::new(Watched { stream, connection: connection.clone() });
    let mut seen = SERVE;
    // In a block, so hyper's connection is dropped before an upgraded
    // session starts: if it ended without handing the socket over, that
    // drop is what tells the session.
    {
        let conn = http.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        loop {
            let step = std::future::poll_fn(|cx| match conn.as_mut().poll(cx) {
                Poll::Ready(ended) => Poll::Ready(Err(ended)),
                Poll::Pending => connection.control.poll_change(cx, seen).map(Ok),
            })
            .await;
            match step {
                Err(ended) => {
                    if let Err(e) = ended {
                        tracing::debug!(%peer, "connection ended: {e}");
                    }
                    break;
                }
                Ok(FINISH) => {
                    seen = FINISH;
                    // An upgrade request in flight is answered as it comes
                    // (with `Connection: close` unless it is a `101`).
                    if !connection.upgrading.load(Ordering::Acquire) {
                        conn.as_mut().graceful_shutdown();
                    }
                }
                Ok(_) => {
                    tracing::debug!(%peer, "closing the connection");
                    break;
                }
            }
        }
    }
    let Some(mut session) = connection.take_session() else { return };
    if connection.control.state.load(Ordering::Acquire) == CLOSE {
        return;
    }
    // Upgraded: the session runs until it ends or the connection is closed;
    // a request to finish is the app's to honour (its drain signal).
    loop {
        let step = std::future::poll_fn(|cx| match session.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => connection.control.poll_change(cx, seen).map(Some),
        })
        .await;
        match step {
            None => return,
            Some(CLOSE) => {
                tracing::debug!(%peer, "closing the upgraded connection");
                return;
            }
            Some(state) => seen = state,
        }
    }
}
