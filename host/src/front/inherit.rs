//! Listening sockets a process is handed instead of binding them itself:
//!
//! - **systemd socket activation** (`sd_listen_fds(3)`): `LISTEN_PID` is
//!   this process, `LISTEN_FDS` sockets start at descriptor 3,
//!   `LISTEN_FDNAMES` names them (`FileDescriptorName=`; a socket named
//!   `admin` serves health and metrics only, any other name the app). The
//!   socket unit decides where the app listens: `--host`, `--port` and
//!   `--uds` are not bound.
//! - **a binary upgrade** (SIGUSR2, `lifecycle::upgrade`): the old
//!   pounce-host passes every listener it has, starting at descriptor 3,
//!   named in `POUNCE_UPGRADE_FDS`, then its end of a socket pair on which
//!   the new process says `ready` once it serves. `POUNCE_UPGRADE_FROM` must
//!   be the parent's pid, so a process started by the new one does not take
//!   them again.
//!
//! Process-mode workers get theirs from the supervisor (`process::worker`).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream as StdUnixStream;

use super::listener::{self, BindError, Listener, Role};
use crate::config::Config;
use crate::ffi::process::{inherited_fd, parent_pid};

/// The first inherited descriptor (`SD_LISTEN_FDS_START`).
pub const FIRST_FD: i32 = 3;

/// Variables of the upgrade hand-over (set only by pounce-host for its
/// successor, never by an operator).
pub const UPGRADE_FROM: &str = "POUNCE_UPGRADE_FROM";
pub const UPGRADE_FDS: &str = "POUNCE_UPGRADE_FDS";
pub const UPGRADE_GENERATION: &str = "POUNCE_UPGRADE_GENERATION";

/// systemd's variables.
pub const SYSTEMD_VARIABLES: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// What this process was handed.
pub enum Inherited {
    /// Nothing: bind what the configuration says.
    Nothing,
    /// Sockets from systemd.
    Systemd(Vec<Listener>),
    /// Everything the pounce-host this one replaces listened on.
    Upgrade(Upgrade),
}

/// A binary upgrade in progress, seen from the new process.
pub struct Upgrade {
    pub listeners: Vec<Listener>,
    /// The old process's pid.
    pub from: u32,
    /// The generation number to serve first (the old one's next).
    pub generation: u64,
    /// Where to say `ready` to the old process.
    pub ready: StdUnixStream,
}

/// Takes over what the environment says this process was handed.
pub fn take() -> Result<Inherited, BindError> {
    if let Some(upgrade) = take_upgrade()? {
        return Ok(Inherited::Upgrade(upgrade));
    }
    let Some(names) = systemd_names() else { return Ok(Inherited::Nothing) };
    let listeners = names
        .iter()
        .enumerate()
        .map(|(at, name)| take_fd(FIRST_FD + at as i32, name))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Inherited::Systemd(listeners))
}

/// The names of the sockets systemd passed to this process, if it did.
fn systemd_names() -> Option<Vec<String>> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.trim().parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let count: usize = std::env::var("LISTEN_FDS").ok()?.trim().parse().ok()?;
    if count == 0 {
        return None;
    }
    let given: Vec<String> =
        std::env::var("LISTEN_FDNAMES").unwrap_or_default().split(':').map(str::to_owned).collect();
    Some((0..count).map(|at| given.get(at).cloned().unwrap_or_else(|| "unknown".to_owned())).collect())
}

fn take_upgrade() -> Result<Option<Upgrade>, BindError> {
    let Some(from) = std::env::var(UPGRADE_FROM).ok().and_then(|pid| pid.trim().parse::<u32>().ok()) else {
        return Ok(None);
    };
    if from != parent_pid() {
        tracing::warn!("{UPGRADE_FROM}={from} is not this process's parent: ignoring the upgrade variables");
        return Ok(None);
    }
    let names: Vec<String> = std::env::var(UPGRADE_FDS).unwrap_or_default().split(',').map(str::to_owned).collect();
    let generation = std::env::var(UPGRADE_GENERATION).ok().and_then(|n| n.trim().parse().ok()).unwrap_or(1);
    let listeners = names
        .iter()
        .enumerate()
        .map(|(at, name)| take_fd(FIRST_FD + at as i32, name))
        .collect::<Result<Vec<_>, _>>()?;
    let ready_fd = FIRST_FD + names.len() as i32;
    let ready = inherited_fd(ready_fd).map(StdUnixStream::from).ok_or_else(|| BindError::Inherited {
        fd: ready_fd,
        name: "upgrade-ready".to_owned(),
        error: std::io::Error::other("not open"),
    })?;
    Ok(Some(Upgrade { listeners, from, generation, ready }))
}

fn take_fd(fd: i32, name: &str) -> Result<Listener, BindError> {
    let error = |error| BindError::Inherited { fd, name: name.to_owned(), error };
    let owned: OwnedFd = inherited_fd(fd).ok_or_else(|| error(std::io::Error::other("not open")))?;
    Listener::from_fd(owned, Role::from_name(name)).map_err(error)
}

/// The listeners to serve: those handed over, or those `config` asks for.
/// With systemd's sockets, only the admin listener may still be bound (if
/// `--admin-listen` is set and no socket is named `admin`).
pub fn listeners(config: &Config, inherited: Inherited) -> Result<(Vec<Listener>, Option<Upgrade>), BindError> {
    match inherited {
        Inherited::Nothing => Ok((listener::bind(config)?, None)),
        Inherited::Systemd(mut listeners) => {
            tracing::info!(
                sockets = listeners.len(),
                "systemd passed {} listening socket(s): serving them (--host, --port and --uds are not bound)",
                listeners.len()
            );
            let has_admin = listeners.iter().any(|l| l.role == Role::Admin);
            if let (Some(address), false) = (config.admin_listen, has_admin) {
                listeners.push(listener::bind_admin(address, config.backlog)?);
            }
            Ok((listeners, None))
        }
        Inherited::Upgrade(mut upgrade) => {
            let listeners = std::mem::take(&mut upgrade.listeners);
            Ok((listeners, Some(upgrade)))
        }
    }
}
