//! Observing requests: the access log line and the request metrics, both
//! taken when a response body ends (so they see the bytes sent and the full
//! duration). Only requests of a server with `--access-log on` or
//! `--metrics-path` carry a record; others pay nothing.

use std::sync::Arc;
use std::time::Instant;

use http::Method;

use super::connection::Peer;
use super::server::Server;

pub struct RequestRecord {
    server: Arc<Server>,
    /// The client: its address, or the unix socket it came through.
    peer: Peer,
    method: Method,
    path: String,
    started: Instant,
    status: u16,
    /// The generation that answered; `None` for answers of the host itself.
    generation: Option<u64>,
    bytes: u64,
}

impl RequestRecord {
    /// Starts a record if the server observes requests.
    pub fn start(server: &Arc<Server>, peer: &Peer, method: &Method, path: &str) -> Option<RequestRecord> {
        let observes = server.config.access_log || server.reporter.metrics().is_some();
        observes.then(|| RequestRecord {
            server: server.clone(),
            peer: peer.clone(),
            method: method.clone(),
            path: path.to_owned(),
            started: Instant::now(),
            status: 0,
            generation: None,
            bytes: 0,
        })
    }

    pub fn answered(&mut self, status: u16, generation: Option<u64>) {
        self.status = status;
        self.generation = generation;
    }

    pub fn sent(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
    }

    /// The response ended (or was cut): log and count it.
    pub fn finish(self) {
        let duration = self.started.elapsed();
        if self.server.config.access_log {
            tracing::info!(
                target: "access",
                peer = %self.peer,
                method = %self.method,
                path = %self.path,
                status = self.status,
                bytes = self.bytes,
                duration_ms = duration.as_secs_f64() * 1000.0,
                generation = self.generation,
                "{} {} {}",
                self.method,
                self.path,
                self.status
            );
        }
        // Host answers are counted as generation 0.
        self.server.reporter.count(|m| m.request(self.status, self.generation.unwrap_or(0), duration));
    }
}
