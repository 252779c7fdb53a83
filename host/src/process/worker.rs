//! One worker process (`pounce-host worker`, started only by the
//! supervisor): it serves one generation with the thread-mode serving code
//! (`--workers` threads), on the listening socket it inherited.
//!
//! It loads the library bytes the supervisor passed (never the file on
//! disk), says `Ready` (or why it could not load), starts accepting once
//! the supervisor's service state names its generation as current, beats every
//! [`control::BEAT`] while its event loop runs, and then waits for one of:
//! - `Retire` from the supervisor: stop accepting, let every connection
//!   finish its current response (`Connection: close`), for at most
//!   `reload_timeout`, then exit 0;
//! - SIGTERM/SIGINT: the thread-mode shutdown (late clients get `503`);
//! - the supervisor's end of the channel closing: the supervisor is gone,
//!   exit at once (the kernel also kills a worker whose supervisor thread
//!   died, with `PR_SET_PDEATHSIG`).
//!
//! SIGHUP and SIGUSR1 are the supervisor's business: a worker ignores them
//! (a terminal's hangup reaches the whole process group).

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::control::{self, FromWorker, ToWorker, CONTROL_FD, FIRST_LISTENER_FD, LIBRARY_FD, TOTALS_FD};
use super::totals::{self, ServiceMetrics};
use crate::config::Config;
use crate::ffi::process::{inherited_fd, parent_pid, SharedCounters};
use crate::front::listener::{self, Listener, Role};
use crate::front::tls::Tls;
use crate::front::{connections, Server};
use crate::generations::loader::{LoadError, Loaded, Loader, LoaderSettings};
use crate::generations::unload_guard;
use crate::lifecycle::serve::StartError;
use crate::lifecycle::shutdown::{self, hard_deadline};
use crate::lifecycle::signals::{Request, Signals};
use crate::lifecycle::stall_watch;

/// What the supervisor told this worker on its command line.
pub struct Assignment {
    pub generation: u64,
    pub supervisor: u32,
    /// The roles of the listening sockets, from [`FIRST_LISTENER_FD`] on.
    pub listeners: Vec<String>,
}

type ToSupervisor = control::Sender<FromWorker>;
type FromSupervisor = control::Receiver<ToWorker>;

pub async fn run(config: Config, max_log_level: u32, assignment: Assignment) -> Result<(), StartError> {
    let channel = inherited_fd(CONTROL_FD).ok_or_else(|| missing("control channel", CONTROL_FD))?;
    let (mut orders, mut reports) = control::open::<ToWorker, FromWorker>(StdUnixStream::from(channel))?;
    if parent_pid() != assignment.supervisor {
        // The supervisor died before this process could ask to die with it.
        return Err(StartError::Io(std::io::Error::other("the supervisor is gone")));
    }
    let mut signals = Signals::install(hard_deadline(&config))?;
    unload_guard::set_enabled(config.unload_guard);
    let tls = match config.tls.as_ref().map(Tls::load).transpose() {
        Ok(tls) => tls.map(Arc::new),
        Err(e) => {
            let _ = reports.send(&FromWorker::LoadFailed { reason: e.to_string() }).await;
            return Err(e.into());
        }
    };
    let loaded = match load(&config, max_log_level, assignment.generation).await {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = reports.send(&FromWorker::LoadFailed { reason: e.to_string() }).await;
            return Err(e.into());
        }
    };
    let listeners = inherited_listeners(&assignment.listeners)?;
    let info = loaded.generation.info().clone();
    let server = Arc::new(Server::new(config, loaded.generation, tls));
    show_service_totals(&server)?;
    tokio::spawn(connections::sweep(server.connections.clone()));
    stall_watch::spawn(&server);
    let ready = FromWorker::Ready {
        app: info.name,
        app_version: info.version,
        load_ms: loaded.duration.as_secs_f64() * 1000.0,
        init_ms: info.init_duration.as_secs_f64() * 1000.0,
    };
    reports.send(&ready).await?;
    tokio::spawn(beat(server.clone(), reports));
    serve_until_told(&server, &mut signals, &mut orders, listeners).await;
    Ok(())
}

/// With `--metrics-path`, this worker's `/metrics` also shows the whole
/// service's totals, which the supervisor keeps at [`TOTALS_FD`].
fn show_service_totals(server: &Server) -> Result<(), StartError> {
    let page = inherited_fd(TOTALS_FD).ok_or_else(|| missing("service totals", TOTALS_FD))?;
    if let Some(metrics) = server.reporter.metrics() {
        let page = SharedCounters::open(page, totals::LEN)?;
        metrics.describe_service(Box::new(ServiceMetrics::new(Arc::new(page))));
    }
    Ok(())
}

/// The listening sockets the supervisor passed, from [`FIRST_LISTENER_FD`] on.
fn inherited_listeners(roles: &[String]) -> Result<Vec<Listener>, StartError> {
    roles
        .iter()
        .enumerate()
        .map(|(at, role)| {
            let fd = FIRST_LISTENER_FD + at as i32;
            let owned = inherited_fd(fd).ok_or_else(|| missing("listening socket", fd))?;
            Ok(Listener::from_fd(owned, Role::from_name(role))?)
        })
        .collect()
}

fn missing(what: &str, fd: i32) -> StartError {
    let message = format!("no {what} at descriptor {fd}: `pounce-host worker` is started by `serve --mode process`");
    StartError::Io(std::io::Error::other(message))
}

/// Loads the generation from the bytes at [`LIBRARY_FD`], bounded by
/// `reload_timeout` like any reload.
async fn load(config: &Config, max_log_level: u32, generation: u64) -> Result<Loaded, LoadError> {
    let source = PathBuf::from(format!("/proc/self/fd/{LIBRARY_FD}"));
    let settings = LoaderSettings {
        source: source.clone(),
        app_args: config.app_args.clone(),
        max_log_level,
        unload_timeout: config.shutdown_timeout,
        staging_dir: config.staging_dir.clone(),
        // The supervisor checked the file the snapshot was taken from; the
        // snapshot itself is an in-memory file only this service holds.
        allow_insecure_library: true,
    };
    let staging = config.staging_dir.clone();
    let loader = Loader::new(settings).map_err(|error| LoadError::Stage { path: source.clone(), staging, error })?;
    let limit = config.reload_timeout;
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || loader.load_in_place(generation))).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(LoadError::Crashed { path: source }),
        Err(_) => Err(LoadError::TimedOut { path: source, limit }),
    }
}

/// Tells the supervisor, every [`control::BEAT`], that the event loop runs.
async fn beat(server: Arc<Server>, mut reports: ToSupervisor) {
    let mut ticks = tokio::time::interval(control::BEAT);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let beat = FromWorker::Beat {
            in_flight: server.current.in_flight(),
            connections: server.connections.count(),
            upgraded: server.current.upgraded(),
            requests: server.reporter.metrics().map_or([0; 5], |metrics| metrics.requests_by_class()),
        };
        if reports.send(&beat).await.is_err() {
            return;
        }
    }
}

/// Serves until the supervisor or a signal says to stop. The listeners are
/// accepted on once a service state names this worker's generation as the
/// current one (its publication; at once for a replacement): so, as in
/// thread mode, no request reaches a generation before it is published, and
/// every health answer carries the state of the service it belongs to.
async fn serve_until_told(
    server: &Arc<Server>,
    signals: &mut Signals,
    orders: &mut FromSupervisor,
    mut listeners: Vec<Listener>,
) {
    loop {
        tokio::select! {
            request = signals.next() => match request {
                Request::Reload(name) | Request::Upgrade(name) => tracing::debug!("{name} ignored: the supervisor acts on it"),
                Request::Shutdown { name, number } => {
                    return shutdown::run(server, signals, (name, number)).await;
                }
            },
            order = orders.next() => match order {
                Some(ToWorker::Service(state)) => {
                    let published = state["generation"].as_u64() == Some(server.current.number());
                    server.reporter.set_service(state);
                    if published {
                        for listener in listeners.drain(..) {
                            tokio::spawn(listener::accept_loop(server.clone(), listener));
                        }
                    }
                }
                Some(ToWorker::Retire) => return retire(server, signals).await,
                None => {
                    tracing::error!("the supervisor is gone; exiting");
                    std::process::exit(1);
                }
            },
        }
    }
}

/// Hands the clients over to the newer workers: stop accepting, finish
/// what is in flight within `reload_timeout`, then close what is left.
async fn retire(server: &Arc<Server>, signals: &mut Signals) {
    let generation = server.current.number();
    tracing::info!(generation, in_flight = server.current.in_flight(), "retiring: a newer generation serves");
    server.connections.retire();
    server.current.lease().drain_in_background();
    let deadline = tokio::time::sleep(server.config.reload_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = server.connections.all_closed() => break,
            () = &mut deadline => {
                tracing::warn!(generation, connections = server.connections.count(), "reload_timeout reached while retiring; closing what is left");
                break;
            }
            request = signals.next() => if let Request::Shutdown { name, number } = request {
                return shutdown::run(server, signals, (name, number)).await;
            },
        }
    }
    server.connections.force_close();
    // Give cancelled responses a moment to unwind before the runtime drops.
    tokio::time::sleep(Duration::from_millis(10)).await;
}
