//! The listening socket and the accept loop.
//!
//! One listening socket serves every generation: a reload swaps the code
//! behind it, never the socket, so no connection queued in the backlog is
//! ever dropped by a reload.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use tokio::net::{TcpListener, TcpSocket};

use super::connection;
use super::server::Server;
use super::service;
use crate::config::Config;

/// Why the listening socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{address} is already in use: stop the process that listens there, or choose another --port")]
    InUse { address: SocketAddr },
    #[error("cannot listen on {address}: {error}")]
    Other { address: SocketAddr, error: io::Error },
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

/// How long the accept loop waits after a failed accept (out of file
/// descriptors and the like) rather than spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// At most one warning about failed accepts per this interval.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(1);

/// At most one warning about reaching `max_connections` per this interval.
const LIMIT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Accepts connections until the end of a shutdown (every connection is
/// force-closed) or until a process-mode worker retires. During a shutdown
/// it keeps accepting, so a late client gets a quick `503` instead of
/// hanging in the backlog. At `max_connections` it
/// stops accepting until a connection closes: new clients wait in the
/// kernel's backlog.
pub async fn accept_loop(server: Arc<Server>, listener: TcpListener) {
    let mut stop = server.connections.stop_accepting_signal();
    let mut limit = LimitLog::new(server.config.max_connections);
    let mut failures = AcceptFailures::default();
    loop {
        let admission = match server.connections.try_admit() {
            Some(admission) => admission,
            None => {
                limit.reached();
                let admission = tokio::select! {
                    admission = server.connections.admit() => admission,
                    _ = stop.changed() => return,
                };
                limit.lifted();
                admission
            }
        };
        let (stream, peer) = loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.changed() => return,
            };
            match accepted {
                Ok(accepted) => break accepted,
                Err(e) => {
                    failures.failed(&e);
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        };
        let (connection, open) = server.connections.accepted(peer, admission);
        let server = server.clone();
        tokio::spawn(async move {
            let _open = open;
            let service = {
                let (server, connection) = (server.clone(), connection.clone());
                service_fn(move |request| service::handle(request, server.clone(), connection.clone()))
            };
            connection::serve(stream, connection, &server.http, service).await;
        });
    }
}

/// Logs reaching `max_connections` and accepting again, once each per
/// time the limit is hit; limits hit again within [`LIMIT_WARN_INTERVAL`]
/// of the last warning are only counted, and the next warning says how
/// many there were.
struct LimitLog {
    max: usize,
    last_warned: Option<Instant>,
    /// Whether this time at the limit was warned about (so its end is logged).
    warned: bool,
    unlogged: u64,
    since: Instant,
}

impl LimitLog {
    fn new(max: usize) -> LimitLog {
        LimitLog { max, last_warned: None, warned: false, unlogged: 0, since: Instant::now() }
    }

    /// The accept loop starts waiting for a connection to close.
    fn reached(&mut self) {
        let now = Instant::now();
        self.since = now;
        if self.last_warned.is_some_and(|at| now.duration_since(at) < LIMIT_WARN_INTERVAL) {
            self.unlogged += 1;
            self.warned = false;
            return;
        }
        let max = self.max;
        let again = match self.unlogged {
            0 => String::new(),
            n => format!(" ({n} more times since the last warning)"),
        };
        tracing::warn!(
            max_connections = max,
            "max_connections ({max}) reached{again}: new connections wait in the backlog until one closes"
        );
        self.last_warned = Some(now);
        self.warned = true;
        self.unlogged = 0;
    }

    /// A connection closed while the loop waited: it accepts again.
    fn lifted(&mut self) {
        if self.warned {
            self.warned = false;
            let waited_ms = self.since.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(
                waited_ms,
                "a connection closed: accepting connections again (max_connections {})",
                self.max
            );
        }
    }
}

/// Failed accepts (out of file descriptors and the like), warned about at
/// most once per [`ACCEPT_WARN_INTERVAL`], with how many failed since the
/// last warning.
#[derive(Default)]
struct AcceptFailures {
    last_warned: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn failed(&mut self, error: &io::Error) {
        self.unlogged += 1;
        let now = Instant::now();
        if self.last_warned.is_some_and(|at| now.duration_since(at) < ACCEPT_WARN_INTERVAL) {
            return;
        }
        let failures = self.unlogged;
        tracing::warn!(
            failures,
            "accept failed: {error} ({failures} failures since the last such warning); retrying every {}ms",
            ACCEPT_RETRY.as_millis()
        );
        self.last_warned = Some(now);
        self.unlogged = 0;
    }
}
