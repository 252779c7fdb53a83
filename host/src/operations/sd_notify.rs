//! systemd's notification protocol (`sd_notify(3)`), spoken directly: one
//! datagram per state change to the unix socket named by `NOTIFY_SOCKET`.
//!
//! Without `NOTIFY_SOCKET` nothing is sent and nothing fails. A send that
//! fails is logged at debug level and otherwise ignored: systemd's view of
//! the service is never worth failing a request or a reload over.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use crate::ffi::clock::monotonic_usec;

pub struct SdNotify {
    socket: UnixDatagram,
    target: SocketAddr,
}

impl SdNotify {
    /// Connects to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
    /// namespace), if it is set.
    pub fn from_env() -> Option<SdNotify> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let name = name.to_string_lossy().into_owned();
        let target = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
            None => SocketAddr::from_pathname(&name),
        };
        let opened = target.and_then(|target| Ok((UnixDatagram::unbound()?, target)));
        match opened {
            Ok((socket, target)) => Some(SdNotify { socket, target }),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={name} is unusable ({e}); not notifying systemd");
                None
            }
        }
    }

    /// Sends `state`: newline-separated `KEY=VALUE` assignments.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.target) {
            tracing::debug!("sd_notify: sending {state:?} failed: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` that `Type=notify-reload`
    /// requires in the same datagram.
    pub fn reloading(&self, status: &str) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS={status}", monotonic_usec()));
    }

    /// Hands the service to process `pid` (a binary upgrade): systemd
    /// watches it from now on, and it may notify.
    pub fn main_pid(&self, pid: u32, status: &str) {
        self.send(&format!("MAINPID={pid}\nREADY=1\nSTATUS={status}"));
    }

    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

/// Sends `WATCHDOG=1` every half `$WATCHDOG_USEC` from a task on the
/// calling runtime, when systemd asks for it: if the runtime wedges, the
/// pings stop and systemd restarts the service.
pub fn spawn_watchdog() {
    let (Some(systemd), Some(interval)) = (SdNotify::from_env(), watchdog_interval()) else { return };
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            systemd.watchdog();
        }
    });
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, if the
/// watchdog is on and meant for this process (`$WATCHDOG_PID`, if set).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
