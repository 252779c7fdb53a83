//! [`Server`]: what the request path and the lifecycle share. Each part has
//! its own home and its own methods; this module only puts them together
//! and takes the health snapshot that needs all of them.

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use super::connection::Rules;
use super::connections::Connections;
use super::tls::Tls;
use crate::config::Config;
use crate::generations::{Current, Generation};
use crate::operations::{Reporter, Snapshot};

pub struct Server {
    pub config: Config,
    /// The generation new requests go to, and those still draining.
    pub current: Current,
    pub connections: Arc<Connections>,
    /// Events, metrics, systemd, the last reload's outcome.
    pub reporter: Reporter,
    pub http: auto::Builder<TokioExecutor>,
    /// HTTPS on the app's TCP listeners (`--tls-cert`), swapped on reloads.
    pub tls: Option<Arc<Tls>>,
}

impl Server {
    pub fn new(config: Config, first: Generation, tls: Option<Arc<Tls>>) -> Server {
        let rules = Rules::new(config.header_timeout, config.keep_alive_timeout, config.send_timeout);
        Server {
            current: Current::new(first),
            connections: Arc::new(Connections::new(rules, config.max_connections)),
            reporter: Reporter::new(config.metrics_path.is_some()),
            http: http_builder(&config),
            tls,
            config,
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.connections.is_shutting_down()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            shutting_down: self.is_shutting_down(),
            generation: self.current.number(),
            uptime: self.reporter.uptime(),
            in_flight: self.current.in_flight(),
            connections: self.connections.count(),
            upgraded: self.current.upgraded(),
            draining: self.current.draining().len(),
            pinned_generations: crate::generations::pinned_generations(),
            last_reload: self.reporter.last_reload(),
            service: self.reporter.service(),
        }
    }
}

/// Streams an HTTP/2 client may make the server reset (malformed requests
/// and the like) before it gets GOAWAY: hyper's default, pinned here so a
/// dependency update cannot silently lift it (RUSTSEC-2024-0003).
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// hyper's own header-read timer is off: it would arm a timer for every
/// request, and `connection` enforces `header_timeout` without one. HTTP/2
/// gets a timer for its keep-alive PINGs (one per connection, not per
/// request): every `--h2-keep-alive`, and the client has as long again to
/// answer. Rapid reset (CVE-2023-44487): hyper's default limit on streams
/// a client resets before they are answered (`max_pending_accept_reset_streams`,
/// h2's 20) stays in force.
fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).header_read_timeout(None).max_buf_size(config.max_header_size);
    builder
        .http2()
        .max_header_list_size(u32::try_from(config.max_header_size).unwrap_or(u32::MAX))
        .max_concurrent_streams(config.h2_max_concurrent_streams)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .timer(TokioTimer::new())
        .keep_alive_interval(config.h2_keep_alive);
    if let Some(timeout) = config.h2_keep_alive {
        builder.http2().keep_alive_timeout(timeout);
    }
    builder
}
