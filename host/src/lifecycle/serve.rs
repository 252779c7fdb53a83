//! `pounce-host serve`: start-up, the signal loop, and the shutdown sequence.
//!
//! Start-up loads generation 1 before it binds the port, so a bad library
//! never leaves a half-started server behind. The first SIGTERM/SIGINT
//! hands over to [`shutdown`](super::shutdown); SIGUSR2 starts a binary
//! [`upgrade`](super::upgrade).

use std::io;
use std::sync::Arc;

use tokio::sync::Notify;

use super::signals::{Request, Signals};
use super::upgrade::{self, Upgrading};
use super::watch::{self, WatchError, WatchSpec};
use super::{reload, shutdown, stall_watch};
use crate::config::Config;
use crate::front::listener::{self, BindError, Listener, Role};
use crate::front::tls::{Tls, TlsError};
use crate::front::{connections, inherit, Server};
use crate::generations::loader::{LoadError, Loaded, Loader, LoaderSettings};
use crate::generations::{trust, unload_guard};
use crate::operations::{sd_notify, Event};

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
    Tls(#[from] TlsError),
    /// Process mode: the first generation's workers did not all start.
    #[error("cannot start the workers: {0}")]
    Workers(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl StartError {
    /// 2: a bad `--reload-dir`; 3: the app library could not be loaded;
    /// 4: a listening socket could not be opened; 5: the TLS certificate or
    /// key cannot be read or used; 1: anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Watch(_) => 2,
            StartError::Load(_) | StartError::Workers(_) => 3,
            StartError::Bind(_) => 4,
            StartError::Tls(_) => 5,
            StartError::Io(_) => 1,
        }
    }
}

pub async fn serve(config: Config, max_log_level: u32) -> Result<(), StartError> {
    let mut signals = Signals::install(shutdown::hard_deadline(&config))?;
    upgrade::remember_executable();
    unload_guard::set_enabled(config.unload_guard);
    if !unload_guard::is_enabled() {
        tracing::warn!("--unload-guard off: retired generations will stay mapped (see ARCHITECTURE.md)");
    }
    if config.allow_insecure_library {
        tracing::warn!("{}", trust::TURNED_OFF);
    }
    // Sockets handed over are taken at once, so none stays open unserved
    // in a process that fails to start.
    let inherited = inherit::take()?;
    let tls = config.tls.as_ref().map(Tls::load).transpose()?.map(Arc::new);
    let loader = Arc::new(Loader::new(LoaderSettings {
        source: config.library.clone(),
        app_args: config.app_args.clone(),
        max_log_level,
        unload_timeout: config.shutdown_timeout,
        staging_dir: config.staging_dir.clone(),
        allow_insecure_library: config.allow_insecure_library,
    })?);
    let first_number = match &inherited {
        inherit::Inherited::Upgrade(upgrade) => upgrade.generation,
        _ => 1,
    };
    let Some(first) = load_first(&loader, first_number, config.reload_timeout, &mut signals).await? else {
        return Ok(());
    };
    // Watch before binding, so a bad --reload-dir fails the start-up.
    let reloads = Arc::new(Notify::new());
    let _watch = match config.reload {
        true => Some(watch::start(watch_spec(&config), reloads.clone())?),
        false => None,
    };
    let (listeners, mut upgraded) = inherit::listeners(&config, inherited)?;
    // Copies of the listening sockets, for a binary upgrade to hand over.
    let kept = Arc::new(listeners.iter().map(Listener::try_clone).collect::<io::Result<Vec<_>>>()?);
    let (address, described) = describe_listeners(&listeners, tls.is_some());
    let info = first.generation.info().clone();
    let first_hash = first.hash;
    let server = Arc::new(Server::new(config, first.generation, tls));
    for listener in listeners {
        tokio::spawn(listener::accept_loop(server.clone(), listener));
    }
    tokio::spawn(connections::sweep(server.connections.clone()));
    stall_watch::spawn(&server);
    server.reporter.emit(Event::Ready {
        address: &address,
        listeners: &described,
        generation: first_number,
        upgraded_from: upgraded.as_ref().map(|u| u.from),
        app: &info.name,
        app_version: &info.version,
        load: first.duration,
        init: info.init_duration,
    });
    if let Some(upgrade) = &mut upgraded {
        upgrade::say_ready(upgrade);
    }
    drop(upgraded);
    sd_notify::spawn_watchdog();
    reload::spawn(server.clone(), loader, reloads.clone(), first_hash);
    let mut upgrading = Upgrading::default();
    let first_stop = loop {
        tokio::select! {
            request = signals.next() => match request {
                Request::Reload(name) => {
                    tracing::info!("{name} received: reload requested");
                    reloads.notify_one();
                }
                Request::Upgrade(name) => {
                    let next = server.current.number() + 1;
                    upgrading.begin(name, &server.reporter, kept.clone(), next, server.config.reload_timeout);
                }
                Request::Shutdown { name, number } => break (name, number),
            },
            Some((pid, took)) = upgrading.finished(&server.reporter), if upgrading.is_running() => {
                upgrade::hand_over(&server, &mut signals, pid, took).await;
                return Ok(());
            }
        }
    };
    upgrading.abort();
    shutdown::run(&server, &mut signals, first_stop).await;
    Ok(())
}

/// The address tools read (the first app TCP listener's, else the first
/// listener's description) and every listener's description.
pub fn describe_listeners(listeners: &[Listener], tls: bool) -> (String, String) {
    let address = listeners
        .iter()
        .filter(|l| l.role == Role::App)
        .find_map(Listener::tcp_address)
        .map(|a| a.to_string())
        .or_else(|| listeners.first().map(|l| l.describe(tls)))
        .unwrap_or_default();
    let described: Vec<String> = listeners.iter().map(|l| l.describe(tls)).collect();
    (address, described.join(" "))
}

/// Loads generation 1, bounded by `reload_timeout` like any reload; a
/// shutdown signal meanwhile ends the start-up at once (`None`: the app's
/// init, if it hangs, is abandoned with the process).
async fn load_first(
    loader: &Arc<Loader>,
    number: u64,
    limit: std::time::Duration,
    signals: &mut Signals,
) -> Result<Option<Loaded>, StartError> {
    let path = loader.source().to_owned();
    let loading = loader.clone();
    let load = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || loading.load(number)));
    tokio::pin!(load);
    loop {
        tokio::select! {
            loaded = &mut load => return match loaded {
                Ok(Ok(result)) => Ok(Some(result?)),
                Ok(Err(_)) => Err(LoadError::Crashed { path }.into()),
                Err(_) => Err(LoadError::TimedOut { path, limit }.into()),
            },
            request = signals.next() => match request {
                Request::Shutdown { name, .. } => {
                    tracing::info!("{name} received while the app was loading: not starting");
                    return Ok(None);
                }
                Request::Reload(name) => tracing::info!("{name} received while starting: it loads the current file anyway"),
                Request::Upgrade(name) => tracing::warn!("{name} ignored: the server is still starting"),
            },
        }
    }
}

pub fn watch_spec(config: &Config) -> WatchSpec {
    WatchSpec {
        library: config.library.clone(),
        dirs: config.reload_dirs.clone(),
        include: config.reload_include.clone(),
    }
}
