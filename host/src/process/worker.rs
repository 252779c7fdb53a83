//! One worker process (`pounce-host worker`, started only by the
//! supervisor): it serves one generation with the thread-mode serving code
//! (`--workers` threads), on the listening socket it inherited.
//!
//! It loads the library bytes the supervisor passed (never the file on
//! disk), says `Ready` (or why it could not load), beats every
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

use std::net::TcpListener as StdTcpListener;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::control::{self, FromWorker, ToWorker, CONTROL_FD, LIBRARY_FD, LISTENER_FD};
use crate::config::Config;
use crate::ffi::process::{inherited_fd, parent_pid};
use crate::front::{connections, listener, Server};
use crate::generations::loader::{LoadError, Loaded, Loader};
use crate::generations::unload_guard;
use crate::lifecycle::serve::StartError;
use crate::lifecycle::shutdown;
use crate::lifecycle::signals::{Request, Signals};

/// What the supervisor told this worker on its command line.
pub struct Assignment {
    pub generation: u64,
    pub supervisor: u32,
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
    let mut signals = Signals::install()?;
    unload_guard::set_enabled(config.unload_guard);
    let loaded = match load(&config, max_log_level, assignment.generation).await {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = reports.send(&FromWorker::LoadFailed { reason: e.to_string() }).await;
            return Err(e.into());
        }
    };
    let socket = inherited_fd(LISTENER_FD).ok_or_else(|| missing("listening socket", LISTENER_FD))?;
    let socket = StdTcpListener::from(socket);
    socket.set_nonblocking(true)?;
    let socket = tokio::net::TcpListener::from_std(socket)?;
    let info = loaded.generation.info().clone();
    let server = Arc::new(Server::new(config, loaded.generation));
    tokio::spawn(listener::accept_loop(server.clone(), socket));
    tokio::spawn(connections::sweep(server.connections.clone()));
    let ready = FromWorker::Ready {
        app: info.name,
        app_version: info.version,
        load_ms: loaded.duration.as_secs_f64() * 1000.0,
        init_ms: info.init_duration.as_secs_f64() * 1000.0,
    };
    reports.send(&ready).await?;
    tokio::spawn(beat(server.clone(), reports));
    serve_until_told(&server, &mut signals, &mut orders).await;
    Ok(())
}

fn missing(what: &str, fd: i32) -> StartError {
    let message = format!("no {what} at descriptor {fd}: `pounce-host worker` is started by `serve --mode process`");
    StartError::Io(std::io::Error::other(message))
}

/// Loads the generation from the bytes at [`LIBRARY_FD`], bounded by
/// `reload_timeout` like any reload.
async fn load(config: &Config, max_log_level: u32, generation: u64) -> Result<Loaded, LoadError> {
    let source = PathBuf::from(format!("/proc/self/fd/{LIBRARY_FD}"));
    let loader = Loader::new(source.clone(), config.app_args.clone(), max_log_level, config.shutdown_timeout)
        .map_err(|error| LoadError::Stage { path: source.clone(), staging: std::env::temp_dir(), error })?;
    let limit = config.reload_timeout;
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || loader.load(generation))).await {
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
        };
        if reports.send(&beat).await.is_err() {
            return;
        }
    }
}

async fn serve_until_told(server: &Arc<Server>, signals: &mut Signals, orders: &mut FromSupervisor) {
    loop {
        tokio::select! {
            request = signals.next() => match request {
                Request::Reload(name) => tracing::debug!("{name} ignored: the supervisor reloads"),
                Request::Shutdown { name, number } => {
                    return shutdown::run(server, signals, (name, number)).await;
                }
            },
            order = orders.next() => match order {
                Some(ToWorker::Service(state)) => server.reporter.set_service(state),
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
    server.current.lease().drain();
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
