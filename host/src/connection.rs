//! One client connection: HTTP/1.1 or HTTP/2 (prior knowledge), its idle and
//! header timeouts, and its part in a graceful shutdown.
//!
//! The timeouts are enforced by one timer per connection that wakes only at
//! its deadline (not per request): while no request is in flight, a
//! connection that has never finished a request head is closed after
//! `header_timeout`, and one that has is closed after `keep_alive_timeout`.
//! Nothing is lost by closing then: no request of it is in flight. This also
//! covers what hyper's own timers do not: a connection that never sends a
//! byte, and HTTP/2 connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

use crate::generation::Generation;
use crate::server::Server;
use crate::service;

/// What the requests of one connection share.
pub struct Connection {
    pub server: Arc<Server>,
    pub peer: SocketAddr,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// When the connection last became idle, in ms since `opened`.
    idle_since_ms: AtomicU64,
    opened: Instant,
    /// The generation of the latest app request on this connection.
    generation: AtomicU64,
    /// Closes the connection at once (a retired generation's stuck response).
    close: Notify,
}

impl Connection {
    /// Notes that an app request of `generation` runs on this connection.
    pub fn serves(&self, generation: u64) {
        self.generation.store(generation, Ordering::Relaxed);
    }

    /// Whether a request of `generation` (or older) may still be running here.
    pub fn may_hold(&self, generation: u64) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0 && self.generation.load(Ordering::Relaxed) <= generation
    }

    /// Closes the connection, cutting what runs on it.
    pub fn close(&self) {
        self.close.notify_one();
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// When to close the connection if it stays idle; `None` while busy.
    fn idle_deadline(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let config = &self.server.config;
        let allowed =
            if self.requests.load(Ordering::Relaxed) == 0 { config.header_timeout } else { config.keep_alive_timeout };
        let idle_since = self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(idle_since + allowed)
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
        Activity { connection }
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        let connection = &self.connection;
        connection.idle_since_ms.store(connection.now_ms(), Ordering::Release);
        connection.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request the app serves: counted in its generation until its response
/// body ends (the guard lives in the body), which is what a drain waits for.
pub struct InFlight {
    pub generation: Arc<Generation>,
}

impl InFlight {
    pub fn start(generation: Arc<Generation>) -> InFlight {
        generation.request_started();
        InFlight { generation }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.generation.request_ended();
    }
}

/// Serves one accepted connection until it ends, times out, or is closed by
/// a shutdown.
pub async fn serve(stream: TcpStream, peer: SocketAddr, server: Arc<Server>) {
    let _ = stream.set_nodelay(true);
    let connection = Arc::new(Connection {
        server: server.clone(),
        peer,
        in_flight: AtomicUsize::new(0),
        requests: AtomicU64::new(0),
        idle_since_ms: AtomicU64::new(0),
        opened: Instant::now(),
        generation: AtomicU64::new(0),
        close: Notify::new(),
    });
    server.track(&connection);
    let service = {
        let connection = connection.clone();
        service_fn(move |request| service::handle(request, connection.clone()))
    };
    let conn = server.http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut shutdown = server.shutdown_signal();
    let mut force_close = server.force_close_signal();
    // A connection accepted during shutdown is answered (503), not cut.
    let mut graceful = server.is_shutting_down();
    let idle = sleep_until(connection.idle_deadline().unwrap_or_else(Instant::now));
    tokio::pin!(idle);
    loop {
        tokio::select! {
            biased;
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                break;
            }
            () = &mut idle => match connection.idle_deadline() {
                Some(deadline) if deadline <= Instant::now() => {
                    tracing::debug!(%peer, "closing idle connection");
                    break;
                }
                Some(deadline) => idle.as_mut().reset(deadline),
                None => idle.as_mut().reset(Instant::now() + server.config.keep_alive_timeout),
            },
            changed = shutdown.changed(), if !graceful => {
                graceful = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = force_close.changed() => break,
            () = connection.close.notified() => {
                tracing::debug!(%peer, "closing a connection held by a retired generation");
                break;
            }
        }
    }
}
