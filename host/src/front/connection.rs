//! One client connection: HTTP/1.1 or HTTP/2 (prior knowledge), its idle,
//! header and send timeouts, and its part in a graceful shutdown.
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
//!   `keep_alive_timeout` (on HTTP/2, whatever frames arrive between
//!   requests, such as the answers to hyper's keep-alive PINGs).
//!
//! And while a response is being sent (`send_timeout`): a response body
//! that has handed hyper a frame, which hyper has not come back for the next
//! one, is waiting on its client. If the connection makes no send progress
//! for `send_timeout` meanwhile (hyper asks no body for its next frame and,
//! on HTTP/1, the socket accepts no bytes), its client has stopped reading:
//! the connection is closed, which drops the response and its generation's
//! lease. On HTTP/2 only the body being asked for more counts: flow control
//! stops a stream's data before the socket fills, while PINGs and other
//! streams keep the socket writable.
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
    /// `None`: a response may wait for its client forever.
    pub send_timeout: Option<Duration>,
    shutting_down: AtomicBool,
    retiring: AtomicBool,
}

impl Rules {
    pub fn new(header_timeout: Duration, keep_alive_timeout: Duration, send_timeout: Option<Duration>) -> Rules {
        Rules {
            header_timeout,
            keep_alive_timeout,
            send_timeout,
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

/// Who is at the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client.
    Ip(SocketAddr),
    /// A client of a unix socket, shown as the socket (`unix:/run/pounce.sock`).
    Unix(Arc<str>),
}

impl Peer {
    /// The client's IP address and port, which the app sees; `None` on a
    /// unix socket.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Peer::Ip(address) => Some(*address),
            Peer::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Ip(address) => address.fmt(f),
            Peer::Unix(name) => f.write_str(name),
        }
    }
}

/// What the requests of one connection share.
pub struct Connection {
    rules: Arc<Rules>,
    pub peer: Peer,
    /// Accepted on the admin listener: health and metrics only.
    pub admin: bool,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// When the connection last became idle (coarse clock, ms).
    idle_since_ms: AtomicU64,
    /// When bytes of the next request head started to arrive (coarse clock,
    /// ms), plus one; 0 when none are pending.
    head_since_ms: AtomicU64,
    /// Response bodies that handed hyper a frame and were not asked for
    /// the next one yet: their response waits on the client.
    sending: AtomicUsize,
    /// When sending last made progress (coarse clock, ms).
    sent_ms: AtomicU64,
    /// Whether the connection speaks HTTP/2 (socket writes are no sign
    /// that a response moves; see the module docs).
    http2: AtomicBool,
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

    /// Whether the connection is known to speak HTTP/2.
    pub fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
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

    /// The send timeout, if a response has waited on its client, with no
    /// send progress, for that long at `now` (and the connection is not
    /// already closing).
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        let timeout = self.rules.send_timeout?;
        let waiting = self.sending.load(Ordering::Acquire) > 0;
        let stalled = waiting && Self::at(self.sent_ms.load(Ordering::Acquire)) + timeout <= now;
        (stalled && self.control.state.load(Ordering::Acquire) < CLOSE).then_some(timeout)
    }

    /// The generation of the latest app request on this connection (0: none).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Notes that the connection speaks HTTP/2.
    pub fn speaks_http2(&self) {
        if !self.http2.load(Ordering::Relaxed) {
            self.http2.store(true, Ordering::Relaxed);
        }
    }

    /// Sending moved on: a body was asked for more, or (HTTP/1) the socket
    /// took bytes.
    fn send_progressed(&self) {
        self.sent_ms.store(stamp_ms(), Ordering::Release);
    }

    /// The socket took bytes: progress, if a response waits to be written.
    fn wrote(&self) {
        if self.sending.load(Ordering::Relaxed) > 0 && !self.http2.load(Ordering::Relaxed) {
            self.send_progressed();
        }
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
    /// Not on a connection known to speak HTTP/2: between its requests,
    /// frames such as the answers to the keep-alive PINGs arrive, and its
    /// idle time is bounded by `keep_alive_timeout` anyway.
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == 0
            && !self.http2.load(Ordering::Relaxed)
        {
            self.head_since_ms.store(stamp_ms() + 1, Ordering::Release);
        }
    }
}

/// The socket, noting when request bytes arrive (for `header_timeout`).
struct Watched<S> {
    stream: S,
    connection: Arc<Connection>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.connection.bytes_arrived();
        }
        polled
    }
}

/// The socket, noting when it takes bytes (send progress, for `send_timeout`).
impl<S> Watched<S> {
    fn written(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(1..)) = polled {
            self.connection.wrote();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.written(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.written(polled)
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
    /// The response body handed hyper a frame and was not asked for the
    /// next one yet.
    waiting: bool,
}

impl Activity {
    pub fn start(connection: Arc<Connection>) -> Activity {
        connection.in_flight.fetch_add(1, Ordering::AcqRel);
        connection.requests.fetch_add(1, Ordering::Relaxed);
        connection.head_since_ms.store(0, Ordering::Release);
        Activity { connection, waiting: false }
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// hyper asks the response body for its next frame: the last one is
    /// written, or buffered.
    pub fn frame_asked(&mut self) {
        if self.waiting {
            self.waiting = false;
            self.connection.sending.fetch_sub(1, Ordering::AcqRel);
            self.connection.send_progressed();
        }
    }

    /// The response body handed hyper a frame: until hyper asks for the
    /// next one, the response waits on the client.
    pub fn frame_given(&mut self) {
        if !self.waiting {
            self.waiting = true;
            self.connection.send_progressed();
            self.connection.sending.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        self.frame_asked();
        let connection = &self.connection;
        connection.idle_since_ms.store(stamp_ms(), Ordering::Release);
        connection.in_flight.fetch_sub(1, Ordering::AcqRel);
        // During a shutdown, a connection that was accepted late (or raced
        // the shutdown's sweep over connections) closes after its answer;
        // for HTTP/2 that is a GOAWAY, which `Connection: close` is not.
        // A retiring process (a process-mode worker, or the old process of
        // a binary upgrade) closes HTTP/1 connections only through the
        // `Connection: close` of an answer: closing one after a response
        // that promised keep-alive would fail the client's next request.
        let retiring_h2 = connection.rules.is_retiring() && connection.is_http2();
        if connection.rules.is_shutting_down() || retiring_h2 {
            connection.control.set(FINISH);
        }
    }
}

impl Connection {
    /// A connection from `peer`, just accepted (on the admin listener if `admin`).
    pub fn new(peer: Peer, admin: bool, rules: Arc<Rules>) -> Connection {
        Connection {
            accepted_in_shutdown: rules.is_shutting_down(),
            rules,
            peer,
            admin,
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(stamp_ms()),
            head_since_ms: AtomicU64::new(0),
            sending: AtomicUsize::new(0),
            sent_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            control: Control { state: AtomicU8::new(SERVE), waker: AtomicWaker::new() },
            upgrading: AtomicBool::new(false),
            upgraded: AtomicBool::new(false),
            session: Mutex::new(None),
        }
    }
}

/// Serves `connection` over `stream` (TCP, unix or TLS) with `service`
/// until it ends or is closed through its control.
pub async fn serve<I, S, B>(stream: I, connection: Arc<Connection>, http: &auto::Builder<TokioExecutor>, service: S)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let peer = connection.peer.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn connection(send_timeout: Option<Duration>) -> Arc<Connection> {
        let rules = Rules::new(Duration::from_secs(10), Duration::from_secs(5), send_timeout);
        Arc::new(Connection::new(Peer::Ip(SocketAddr::from(([127, 0, 0, 1], 1))), false, Arc::new(rules)))
    }

    /// When the connection counts as stalled unless sending progresses.
    fn stalls_at(connection: &Connection) -> Instant {
        Connection::at(connection.sent_ms.load(Ordering::Acquire)) + SECOND
    }

    /// Moves the coarse clock on by a few milliseconds.
    fn advance() {
        let before = tick();
        while Instant::now() < before + Duration::from_millis(3) {
            std::thread::yield_now();
        }
        tick();
    }

    #[test]
    fn a_response_waiting_on_its_client_stalls_after_send_timeout() {
        let connection = connection(Some(SECOND));
        let mut activity = Activity::start(connection.clone());
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(connection.stalled_for(far), None, "no frame handed out yet");
        activity.frame_given();
        let at = stalls_at(&connection);
        assert_eq!(connection.stalled_for(at - Duration::from_millis(1)), None);
        assert_eq!(connection.stalled_for(at), Some(SECOND));
        activity.frame_asked();
        assert_eq!(connection.stalled_for(far), None, "hyper came back for more: the app is the slow one");
        activity.frame_given();
        drop(activity);
        assert_eq!(connection.stalled_for(far), None, "a dropped body waits on nobody");
        assert_eq!(connection.sending.load(Ordering::Acquire), 0);
    }

    #[test]
    fn socket_writes_count_as_progress_on_http1_only() {
        let connection = connection(Some(SECOND));
        let mut activity = Activity::start(connection.clone());
        activity.frame_given();
        let first = stalls_at(&connection);
        advance();
        connection.wrote();
        assert!(stalls_at(&connection) > first, "HTTP/1: the socket took bytes of the response");
        assert_eq!(connection.stalled_for(first), None);

        connection.speaks_http2();
        let second = stalls_at(&connection);
        advance();
        connection.wrote();
        assert_eq!(stalls_at(&connection), second, "HTTP/2: PINGs and other streams move the socket too");
        drop(activity);
    }

    #[test]
    fn http2_frames_between_requests_keep_the_keep_alive_deadline() {
        let connection = connection(None);
        connection.bytes_arrived();
        assert!(connection.head_since_ms.load(Ordering::Acquire) > 0, "HTTP/1: a request head has begun");
        drop(Activity::start(connection.clone()));
        connection.speaks_http2();
        connection.bytes_arrived();
        assert_eq!(connection.head_since_ms.load(Ordering::Acquire), 0, "HTTP/2: a PING's answer, say");
    }

    #[test]
    fn send_timeout_off_never_stalls() {
        let connection = connection(None);
        let mut activity = Activity::start(connection.clone());
        activity.frame_given();
        assert_eq!(connection.stalled_for(Instant::now() + Duration::from_secs(3600)), None);
    }

    #[test]
    fn a_closing_connection_is_not_reported_twice() {
        let connection = connection(Some(SECOND));
        let mut activity = Activity::start(connection.clone());
        activity.frame_given();
        let at = stalls_at(&connection);
        assert_eq!(connection.stalled_for(at), Some(SECOND));
        connection.close();
        assert_eq!(connection.stalled_for(at), None);
    }
}
