//! Binary upgrade (SIGUSR2), the way nginx does it. Thread mode hands over
//! with [`hand_over`]; process mode's supervisor starts the new binary with
//! [`start`] too and retires its workers itself.
//!
//! 1. The binary at the path this process was started from is executed
//!    again (re-read from disk: a deploy renamed a new build over it), with
//!    the same arguments and environment, every listening socket at
//!    descriptors 3 and up and one end of a socket pair after them
//!    (`front::inherit` names them). The sockets are never closed: the
//!    kernel queues connections on them whoever accepts.
//! 2. The new process loads the current library as the next generation and
//!    starts accepting; then it says `ready` on the socket pair.
//! 3. Only then does this process hand over: it tells systemd the new
//!    `MAINPID=`, stops accepting, answers what its open connections still
//!    send with `Connection: close` (busy ones close after their response),
//!    and exits when they are gone (at most `shutdown_timeout`).
//!
//! If the new process exits, or does not say `ready` within
//! `reload_timeout` (then it is killed), this process keeps serving and
//! logs why (`upgrade_failed`); the new process's own log lines say more.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use super::shutdown;
use super::signals::{Request, Signals};
use crate::config::format_duration;
use crate::ffi::process::{kill, spawn_with_fds};
use crate::front::inherit::{self, FIRST_FD, SYSTEMD_VARIABLES, UPGRADE_FDS, UPGRADE_FROM, UPGRADE_GENERATION};
use crate::front::listener::Listener;
use crate::front::Server;
use crate::operations::{Event, Reporter};

static EXECUTABLE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Notes the path of the running binary, as it is at start-up (later, a
/// deploy may have renamed another file over it: that is the one an
/// upgrade starts).
pub fn remember_executable() {
    EXECUTABLE.get_or_init(|| std::env::current_exe().ok());
}

/// The binary an upgrade starts.
pub fn executable() -> Option<PathBuf> {
    EXECUTABLE.get().cloned().flatten()
}

/// Kills the new process unless it took over.
struct Started {
    pid: u32,
    took_over: bool,
}

impl Drop for Started {
    fn drop(&mut self) {
        if !self.took_over {
            kill(self.pid, libc::SIGKILL);
        }
    }
}

/// A binary upgrade in progress, if any: what the serving loops of both
/// modes keep while the new process starts.
#[derive(Default)]
pub struct Upgrading(Option<(tokio::task::JoinHandle<Result<u32, String>>, Instant)>);

impl Upgrading {
    pub fn is_running(&self) -> bool {
        self.0.is_some()
    }

    /// Answers SIGUSR2 (`name`): starts the new binary with `listeners`, to
    /// serve from `generation` on; ignored while one is starting already.
    pub fn begin(
        &mut self,
        name: &str,
        reporter: &Reporter,
        listeners: Arc<Vec<Listener>>,
        generation: u64,
        timeout: Duration,
    ) {
        if self.is_running() {
            return tracing::warn!("{name} ignored: a binary upgrade is in progress");
        }
        tracing::info!("{name} received: binary upgrade requested");
        if let Some(executable) = executable() {
            reporter.emit(Event::UpgradeStarted { executable: &executable });
        }
        self.0 = Some((tokio::spawn(start(listeners, generation, timeout)), Instant::now()));
    }

    /// Completes when the upgrade ends: the new process's pid and how long
    /// it took when it serves; `None` (reported) when it failed. Poll only
    /// while [`Upgrading::is_running`].
    pub async fn finished(&mut self, reporter: &Reporter) -> Option<(u32, Duration)> {
        let (task, started) = self.0.as_mut()?;
        let (done, took) = (task.await, started.elapsed());
        self.0 = None;
        let reason = match done {
            Ok(Ok(pid)) => return Some((pid, took)),
            Ok(Err(reason)) => reason,
            Err(e) => e.to_string(),
        };
        reporter.emit(Event::UpgradeFailed { reason: &reason });
        None
    }

    /// Gives up on an upgrade still starting (at shutdown).
    pub fn abort(&mut self) {
        if let Some((task, _)) = self.0.take() {
            task.abort();
        }
    }
}

/// Starts the new binary with `listeners` and waits until it serves
/// generation `generation`; returns its pid, or why it did not take over.
async fn start(listeners: Arc<Vec<Listener>>, generation: u64, timeout: Duration) -> Result<u32, String> {
    let executable = executable().ok_or_else(|| "the path of the running binary is unknown".to_owned())?;
    let (mine, theirs) = StdUnixStream::pair().map_err(|e| format!("cannot make the hand-over channel: {e}"))?;
    let mut command = Command::new(&executable);
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(name) = args.first() {
        command.arg0(name);
    }
    command.args(args.iter().skip(1)).stdin(Stdio::null());
    for name in SYSTEMD_VARIABLES.iter().chain(&["WATCHDOG_PID"]) {
        command.env_remove(name);
    }
    let names: Vec<&str> = listeners.iter().map(|l| l.role.name()).collect();
    command
        .env(UPGRADE_FROM, std::process::id().to_string())
        .env(UPGRADE_FDS, names.join(","))
        .env(UPGRADE_GENERATION, generation.to_string());
    let mut fds: Vec<(i32, i32)> =
        listeners.iter().enumerate().map(|(at, l)| (l.fd().as_raw_fd(), FIRST_FD + at as i32)).collect();
    fds.push((theirs.as_raw_fd(), FIRST_FD + listeners.len() as i32));
    let mut child =
        spawn_with_fds(&mut command, &fds, false).map_err(|e| format!("cannot start {}: {e}", executable.display()))?;
    drop(theirs);
    let started = Started { pid: child.id(), took_over: false };
    let pid = started.pid;
    let (exited, exit) = tokio::sync::oneshot::channel();
    let reaper = std::thread::Builder::new().name("pounce-upgrade".to_owned()).spawn(move || {
        if let Ok(status) = child.wait() {
            let _ = exited.send(status);
        }
    });
    reaper.map_err(|e| format!("cannot watch pid {pid}: {e}"))?;
    let said = match tokio::time::timeout(timeout, ready_line(mine)).await {
        Ok(said) => said,
        Err(_) => {
            return Err(format!(
                "pid {pid} did not serve within reload_timeout ({}); it is killed",
                format_duration(timeout)
            ))
        }
    };
    if said.as_deref().is_ok_and(|line| line.trim() == "ready") {
        let mut started = started;
        started.took_over = true;
        return Ok(pid);
    }
    let how = match tokio::time::timeout(Duration::from_secs(2), exit).await {
        Ok(Ok(status)) => describe(status),
        _ => "closed its hand-over channel".to_owned(),
    };
    Err(format!(
        "the new process (pid {pid}, {}) {how} before serving; its log lines above say why",
        executable.display()
    ))
}

async fn ready_line(channel: StdUnixStream) -> io::Result<String> {
    channel.set_nonblocking(true)?;
    let mut reader = BufReader::new(tokio::net::UnixStream::from_std(channel)?);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    Ok(line)
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".to_owned(),
    }
}

/// The new process serves: say so (systemd gets `MAINPID=`), stop
/// accepting, let the open connections finish (`Connection: close`), for at
/// most `shutdown_timeout`, and return: the process exits.
pub async fn hand_over(server: &Arc<Server>, signals: &mut Signals, pid: u32, took: Duration) {
    server.reporter.emit(Event::UpgradeComplete { pid, took });
    server.connections.retire();
    server.current.lease().drain_in_background();
    let limit = server.config.shutdown_timeout;
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = server.connections.all_closed() => break,
            () = &mut deadline => {
                tracing::warn!(
                    connections = server.connections.count(),
                    "shutdown_timeout ({}) reached while handing over; closing what is left",
                    format_duration(limit)
                );
                break;
            }
            request = signals.next() => match request {
                Request::Shutdown { name, number } => return shutdown::run(server, signals, (name, number)).await,
                Request::Reload(name) | Request::Upgrade(name) => {
                    tracing::warn!("{name} ignored: pid {pid} serves now; signal it instead")
                }
            },
        }
    }
    server.connections.force_close();
    // Give cancelled responses a moment to unwind before the runtime drops.
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// The new process serves: tell the old one (it hands over on this line).
pub fn say_ready(upgrade: &mut inherit::Upgrade) {
    use std::io::Write;
    if let Err(e) = upgrade.ready.write_all(b"ready\n") {
        tracing::warn!("cannot tell pid {} that this process serves: {e}", upgrade.from);
    }
}
