//! The listening socket and the accept loop.
//!
//! One listening socket serves every generation: a reload swaps the code
//! behind it, never the socket, so no connection queued in the backlog is
//! ever dropped by a reload.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

/// Accepts connections until the end of a shutdown (every connection is
/// force-closed) or until a process-mode worker retires. During a shutdown
/// it keeps accepting, so a late client gets a quick `503` instead of
/// hanging in the backlog.
pub async fn accept_loop(server: Arc<Server>, listener: TcpListener) {
    let mut stop = server.connections.stop_accepting_signal();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (connection, open) = server.connections.accepted(peer);
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
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!("accept failed: {e}; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
