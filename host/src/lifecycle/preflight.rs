//! Preflight (thread mode): before a reload loads a new library into the
//! serving process, the same bytes are loaded in a short-lived child process
//! first (`pounce-host check`): its ELF constructors run, its ABI is
//! checked, its `init` and `shutdown` run. A library that crashes there
//! (SIGSEGV in a constructor, `abort()` in init) kills only the child; the
//! reload fails with the signal named and the serving process never maps it.
//!
//! The child reads the library from an in-memory snapshot passed at
//! descriptor 3, and the serving process then loads that same snapshot: a
//! deploy that replaces the file meanwhile cannot slip in bytes that were
//! not checked.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::exit::describe;
use crate::config::{format_duration, Config};
use crate::ffi::process::{kill, spawn_with_fds};
use crate::generations::loader::LoadError;
use crate::generations::snapshot::Snapshot;

/// Where the child finds the snapshot.
const SNAPSHOT_FD: i32 = 3;

/// What the child loads.
pub enum Target<'a> {
    /// The bytes the serving process will load next.
    Snapshot(&'a Snapshot),
    /// The library file itself: where in-memory files are not available
    /// (the file could change between the preflight and the load).
    File(&'a Path),
}

impl Target<'_> {
    fn source(&self) -> &Path {
        match self {
            Target::Snapshot(snapshot) => &snapshot.source,
            Target::File(path) => path,
        }
    }
}

/// Loads `target` in a child process, bounded by `reload_timeout`; returns
/// how long it took.
pub fn check(config: &Config, target: Target<'_>) -> Result<Duration, LoadError> {
    let started = Instant::now();
    let source = target.source().to_owned();
    let failed = |reason: String| LoadError::Preflight { path: source.clone(), reason };
    let mut command = check_command(config, &target);
    let fds: &[(i32, i32)] = match &target {
        Target::Snapshot(snapshot) => &[(snapshot.raw_fd(), SNAPSHOT_FD)],
        Target::File(_) => &[],
    };
    let child = spawn_with_fds(&mut command, fds, true).map_err(|e| failed(format!("cannot start it: {e}")))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("pounce-preflight".to_owned())
        .spawn(move || {
            let _ = tx.send(child.wait_with_output());
        })
        .map_err(LoadError::Thread)?;
    // The child bounds its own load by the same limit; this is its backstop.
    let limit = config.reload_timeout + Duration::from_secs(2);
    match rx.recv_timeout(limit) {
        Ok(Ok(output)) if output.status.success() => Ok(started.elapsed()),
        Ok(Ok(output)) => Err(failed(reason(&output, &source))),
        Ok(Err(e)) => Err(failed(format!("cannot wait for it: {e}"))),
        Err(_) => {
            kill(pid, libc::SIGKILL);
            Err(failed(format!("it did not finish within {}", format_duration(limit))))
        }
    }
}

/// `pounce-host check` of the target with the app's settings, its own limit
/// `reload_timeout`. A snapshot's trust was checked when it was taken (the
/// in-memory copy has no owner a trust check could judge); a file is
/// checked as a load would.
fn check_command(config: &Config, target: &Target<'_>) -> Command {
    let mut command = Command::new("/proc/self/exe");
    command
        .arg("check")
        .args(["--timeout", &format_duration(config.reload_timeout)])
        .arg("--staging-dir")
        .arg(&config.staging_dir);
    let trust_checked = matches!(target, Target::Snapshot(_)) || config.allow_insecure_library;
    if trust_checked {
        command.arg("--allow-insecure-library");
    }
    for (key, value) in &config.app_args {
        command.arg("--app-arg").arg(format!("{key}={value}"));
    }
    match target {
        Target::Snapshot(_) => command.arg(format!("/proc/self/fd/{SNAPSHOT_FD}")),
        Target::File(path) => command.arg(path),
    };
    // The settings above are the merged ones: no file or variable may add to them.
    for name in ["POUNCE_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID"] {
        command.env_remove(name);
    }
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// Why the child failed: the signal that killed it, or its error message
/// (naming the library file rather than the descriptor it read).
fn reason(output: &Output, source: &Path) -> String {
    let how = describe(output.status);
    if std::os::unix::process::ExitStatusExt::signal(&output.status).is_some() {
        return format!("the library crashed it: it {how}");
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let message = stderr
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("pounce-host: error: "))
        .unwrap_or(stderr.trim())
        .replace(&format!("/proc/self/fd/{SNAPSHOT_FD}"), &source.display().to_string());
    format!("it {how}: {message}")
}
