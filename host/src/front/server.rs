//! [`Server`]: what the request path and the lifecycle share. Each part has
//! its own home and its own methods; this module only puts them together
//! and takes the health snapshot that needs all of them.

use std::sync::Arc;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use super::connection::Rules;
use super::connections::Connections;
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
}

impl Server {
    pub fn new(config: Config, first: Generation) -> Server {
        let rules = Rules::new(config.header_timeout, config.keep_alive_timeout);
        Server {
            current: Current::new(first),
            connections: Arc::new(Connections::new(rules)),
            reporter: Reporter::new(config.metrics_path.is_some()),
            http: http_builder(&config),
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
            last_reload: self.reporter.last_reload(),
            service: self.reporter.service(),
        }
    }
}

/// hyper's own header-read timer is off: it would arm a timer for every
/// request, and `connection` enforces `header_timeout` without one.
fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).header_read_timeout(None).max_buf_size(config.max_header_size);
    builder.http2().max_header_list_size(u32::try_from(config.max_header_size).unwrap_or(u32::MAX));
    builder
}
