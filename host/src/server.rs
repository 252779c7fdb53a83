//! The server: the listening socket, the accept loop, and the state every
//! connection shares.
//!
//! One listening socket serves every generation: a reload swaps the code
//! behind it, never the socket, so no connection queued in the backlog is
//! ever dropped by a reload.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::connection::{self, Connection};
use crate::generation::{Current, Generation};
use crate::metrics::Metrics;
use crate::sd_notify::SdNotify;

/// Why the listening socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{address} is already in use: stop the process that listens there, or choose another --port")]
    InUse { address: SocketAddr },
    #[error("cannot listen on {address}: {error}")]
    Other { address: SocketAddr, error: io::Error },
}

/// The outcome of the last reload, as the health endpoint reports it.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    pub outcome: &'static str,
    pub generation: u64,
    pub error: Option<String>,
    pub duration_ms: f64,
    pub seconds_ago: f64,
    #[serde(skip)]
    pub at: Option<Instant>,
}

/// What the health endpoint reports.
pub struct Snapshot {
    pub shutting_down: bool,
    pub generation: u64,
    pub uptime: Duration,
    pub in_flight: usize,
    pub connections: usize,
    pub draining: usize,
    pub last_reload: Option<ReloadReport>,
}

/// State shared by the accept loop, every connection and every request.
pub struct Server {
    pub config: Config,
    pub current: Current,
    pub http: auto::Builder<TokioExecutor>,
    started: Instant,
    draining: Mutex<Vec<Arc<Generation>>>,
    last_reload: Mutex<Option<ReloadReport>>,
    shutting_down: AtomicBool,
    force_close: watch::Sender<bool>,
    connections: AtomicUsize,
    all_closed: Notify,
    /// Every open connection, to close those a retired generation holds.
    open: Mutex<Vec<Weak<Connection>>>,
    pub(crate) systemd: Option<SdNotify>,
    metrics: Option<Metrics>,
}

impl Server {
    pub fn new(config: Config, first: Generation) -> Server {
        let http = http_builder(&config);
        Server {
            current: Current::new(first),
            http,
            started: Instant::now(),
            draining: Mutex::new(Vec::new()),
            last_reload: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            force_close: watch::Sender::new(false),
            connections: AtomicUsize::new(0),
            all_closed: Notify::new(),
            open: Mutex::new(Vec::new()),
            systemd: SdNotify::from_env(),
            metrics: config.metrics_path.is_some().then(Metrics::new),
            config,
        }
    }

    /// The metrics, when `--metrics-path` is on.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    pub(crate) fn count(&self, update: impl FnOnce(&Metrics)) {
        if let Some(metrics) = &self.metrics {
            update(metrics);
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub fn force_close_signal(&self) -> watch::Receiver<bool> {
        self.force_close.subscribe()
    }

    /// Starts a graceful shutdown: new requests get 503, idle connections
    /// close, busy ones close after their current response.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        for connection in self.open_connections() {
            connection.finish();
        }
    }

    /// Closes every connection still open, cancelling what runs on them,
    /// and stops accepting.
    pub fn force_close(&self) {
        self.force_close.send_replace(true);
        for connection in self.open_connections() {
            connection.close();
        }
    }

    fn open_connections(&self) -> Vec<Arc<Connection>> {
        lock(&self.open).iter().filter_map(Weak::upgrade).collect()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Completes when no connection is open.
    pub async fn all_connections_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if self.connections() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Remembers an open connection (forgotten once it is dropped).
    pub fn track(&self, connection: &Arc<Connection>) {
        let mut open = lock(&self.open);
        open.retain(|c| c.strong_count() > 0);
        open.push(Arc::downgrade(connection));
    }

    /// Closes every connection that may still carry a request of
    /// `generation`; returns how many.
    pub fn close_connections_of(&self, generation: u64) -> usize {
        let open = self.open_connections();
        let holding: Vec<&Arc<Connection>> = open.iter().filter(|c| c.may_hold(generation)).collect();
        for connection in &holding {
            connection.close();
        }
        holding.len()
    }

    pub fn add_draining(&self, generation: Arc<Generation>) {
        lock(&self.draining).push(generation);
    }

    pub fn remove_draining(&self, number: u64) {
        lock(&self.draining).retain(|g| g.number() != number);
    }

    pub fn draining(&self) -> Vec<Arc<Generation>> {
        lock(&self.draining).clone()
    }

    pub(crate) fn record_reload(&self, report: ReloadReport) {
        *lock(&self.last_reload) = Some(report);
    }

    pub fn snapshot(&self) -> Snapshot {
        let current = self.current.lease();
        let draining = self.draining();
        let in_flight = current.in_flight() + draining.iter().map(|g| g.in_flight()).sum::<usize>();
        let last_reload = lock(&self.last_reload).clone().map(|mut report| {
            report.seconds_ago = report.at.map_or(0.0, |at| at.elapsed().as_secs_f64());
            report
        });
        Snapshot {
            shutting_down: self.is_shutting_down(),
            generation: current.number(),
            uptime: self.started.elapsed(),
            in_flight,
            connections: self.connections(),
            draining: draining.len(),
            last_reload,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// hyper's own header-read timer is off: it would arm a timer for every
/// request, and `connection` enforces `header_timeout` without one.
fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).header_read_timeout(None).max_buf_size(config.max_header_size);
    builder.http2().max_header_list_size(u32::try_from(config.max_header_size).unwrap_or(u32::MAX));
    builder
}

/// Closes connections past their idle or header deadline, every
/// [`connection::SWEEP`].
pub async fn sweep(server: Arc<Server>) {
    let mut ticks = tokio::time::interval(connection::SWEEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = connection::tick();
        for connection in server.open_connections() {
            if connection.is_expired(now) {
                connection.close();
            }
        }
    }
}

/// Opens the listening socket (with `SO_REUSEADDR`, so a restart does not
/// wait for old connections in TIME_WAIT).
pub fn bind(config: &Config) -> Result<TcpListener, BindError> {
    let address = SocketAddr::new(config.host, config.port);
    let other = |error| BindError::Other { address, error };
    let socket = if address.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(other)?;
    socket.set_reuseaddr(true).map_err(other)?;
    socket.bind(address).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => BindError::InUse { address },
        _ => other(e),
    })?;
    socket.listen(config.backlog).map_err(other)
}

/// Accepts connections until every connection is force-closed at the end of
/// a shutdown. During a shutdown it keeps accepting, so a late client gets a
/// quick `503` instead of hanging in the backlog.
pub async fn accept_loop(server: Arc<Server>, listener: TcpListener) {
    let mut force_close = server.force_close_signal();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = force_close.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                server.connections.fetch_add(1, Ordering::AcqRel);
                let server = server.clone();
                tokio::spawn(async move {
                    connection::serve(stream, peer, server.clone()).await;
                    if server.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
                        server.all_closed.notify_waiters();
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!("accept failed: {e}; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
