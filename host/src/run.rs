//! `pounce-host serve`: start-up, the signal loop, and the shutdown sequence.
//!
//! Start-up loads generation 1 before it binds the port, so a bad library
//! never leaves a half-started server behind. Shutdown (SIGTERM/SIGINT):
//! 1. stop taking work: new requests get `503` + `Connection: close`, the
//!    health endpoint answers `503 {"status":"draining"}`, idle keep-alive
//!    connections close at once, busy ones after their current response;
//!    the app is told to drain (streams should end);
//! 2. wait for every connection to close, for at most `shutdown_timeout`;
//! 3. close what is left by force; the caller then drops the runtime and the
//!    generations, whose unload runs each app's `shutdown`.
//!
//! A second SIGTERM/SIGINT exits at once with status 128 + the signal number.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::config::Config;
use crate::events::Event;
use crate::loader::{LoadError, Loader};
use crate::sd_notify;
use crate::server::{self, BindError, Server};
use crate::signals::{Request, Signals};
use crate::watch::{self, WatchError, WatchSpec};
use crate::{reload, tls};

/// Why `serve` could not start. The exit code tells them apart.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot load the app: {0}")]
    Load(#[from] LoadError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl StartError {
    /// 2: a bad `--reload-dir`; 3: the app library could not be loaded;
    /// 4: the port could not be bound; 1: anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Watch(_) => 2,
            StartError::Load(_) => 3,
            StartError::Bind(_) => 4,
            StartError::Io(_) => 1,
        }
    }
}

pub async fn serve(config: Config, max_log_level: u32) -> Result<(), StartError> {
    let mut signals = Signals::install()?;
    tls::configure(config.unload_guard);
    if !tls::is_enabled() {
        tracing::warn!("--unload-guard off: retired generations will stay mapped (see ARCHITECTURE.md)");
    }
    let loader =
        Arc::new(Loader::new(config.library.clone(), config.app_args.clone(), max_log_level, config.shutdown_timeout)?);
    let first = {
        let loader = loader.clone();
        tokio::task::spawn_blocking(move || loader.load(1))
            .await
            .map_err(|_| LoadError::Crashed { path: config.library.clone() })??
    };
    // Watch before binding, so a bad --reload-dir fails the start-up.
    let reloads = Arc::new(Notify::new());
    let _watch = match config.reload {
        true => Some(watch::start(watch_spec(&config), reloads.clone())?),
        false => None,
    };
    let listener = server::bind(&config)?;
    let address = listener.local_addr()?;
    let info = first.generation.info().clone();
    let server = Arc::new(Server::new(config, first.generation));
    tokio::spawn(server::accept_loop(server.clone(), listener));
    tokio::spawn(server::sweep(server.clone()));
    server.emit(Event::Ready {
        address,
        app: &info.name,
        app_version: &info.version,
        load: first.duration,
        init: info.init_duration,
    });
    if let (Some(_), Some(interval)) = (&server.systemd, sd_notify::watchdog_interval()) {
        tokio::spawn(watchdog(server.clone(), interval));
    }
    reload::spawn(server.clone(), loader, reloads.clone());
    let first_stop = loop {
        match signals.next().await {
            Request::Reload(name) => {
                tracing::info!("{name} received: reload requested");
                reloads.notify_one();
            }
            Request::Shutdown { name, number } => break (name, number),
        }
    };
    shut_down(&server, &mut signals, first_stop).await;
    Ok(())
}

fn watch_spec(config: &Config) -> WatchSpec {
    WatchSpec {
        library: config.library.clone(),
        dirs: config.reload_dirs.clone(),
        include: config.reload_include.clone(),
    }
}

async fn shut_down(server: &Arc<Server>, signals: &mut Signals, (name, _): (&'static str, i32)) {
    let started = Instant::now();
    let timeout = server.config.shutdown_timeout;
    server.emit(Event::ShutdownStarted { signal: name, connections: server.connections(), timeout });
    server.begin_shutdown();
    server.current.lease().drain();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let drained = loop {
        tokio::select! {
            () = server.all_connections_closed() => break true,
            () = &mut deadline => break false,
            request = signals.next() => match request {
                Request::Reload(name) => tracing::warn!("{name} ignored: the server is shutting down"),
                Request::Shutdown { name, number } => {
                    tracing::warn!("second {name} received: exiting now");
                    std::process::exit(128 + number);
                }
            },
        }
    };
    let took = started.elapsed();
    if drained {
        server.emit(Event::ShutdownDrained { took });
    } else {
        server.emit(Event::ShutdownTimedOut { took, connections: server.connections() });
    }
    server.force_close();
}

/// Sends `WATCHDOG=1` every `interval` from a task on the serving runtime:
/// if the runtime wedges, the pings stop and systemd restarts the service.
async fn watchdog(server: Arc<Server>, interval: std::time::Duration) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        if let Some(systemd) = &server.systemd {
            systemd.watchdog();
        }
    }
}
