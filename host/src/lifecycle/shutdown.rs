//! The shutdown sequence (SIGTERM/SIGINT):
//! 1. stop taking work: new requests get `503` + `Connection: close`, the
//!    health endpoint answers `503 {"status":"draining"}`, idle keep-alive
//!    connections close at once, busy ones after their current response;
//!    the app is told to drain (streams should end);
//! 2. wait for every connection to close, for at most `shutdown_timeout`;
//! 3. close what is left by force; the caller then drops the runtime and the
//!    generations, whose unload runs each app's `shutdown`.
//!
//! A second SIGTERM/SIGINT exits at once with status 128 + the signal number.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::signals::{Request, Signals};
use crate::config::Config;
use crate::front::Server;
use crate::operations::Event;

/// The longest a graceful shutdown may take, after which the signal thread
/// exits regardless: the connections' drain (`shutdown_timeout`), the
/// runtime's wind-down, the apps' `shutdown` (`shutdown_timeout` again),
/// and a margin.
pub fn hard_deadline(config: &Config) -> Duration {
    config.shutdown_timeout * 2 + Duration::from_secs(5)
}

pub async fn run(server: &Arc<Server>, signals: &mut Signals, (name, _): (&'static str, i32)) {
    let started = Instant::now();
    let timeout = server.config.shutdown_timeout;
    server.reporter.emit(Event::ShutdownStarted { signal: name, connections: server.connections.count(), timeout });
    server.connections.begin_shutdown();
    server.current.lease().drain_in_background();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let drained = loop {
        tokio::select! {
            () = server.connections.all_closed() => break true,
            () = &mut deadline => break false,
            request = signals.next() => match request {
                Request::Reload(name) | Request::Upgrade(name) => tracing::warn!("{name} ignored: the server is shutting down"),
                Request::Shutdown { name, number } => {
                    tracing::warn!("second {name} received: exiting now");
                    std::process::exit(128 + number);
                }
            },
        }
    };
    let took = started.elapsed();
    if drained {
        server.reporter.emit(Event::ShutdownDrained { took });
    } else {
        server.reporter.emit(Event::ShutdownTimedOut { took, connections: server.connections.count() });
    }
    server.connections.force_close();
}
