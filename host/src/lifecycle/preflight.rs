//! Preflight (thread mode): before a reload loads a new library into the
//! serving process, the same bytes are loaded in a short-lived child process
//! first (`pounce-host check`): its ELF constructors run, its ABI is
//! checked, its `init` and `shutdown` run. A library that crashes there
//! (SIGSEGV in a constructor, `abort()` in init) kills only the child; the
//! reload fails with the signal named and the serving process never maps it.
//!
//! The child reads the very copy the serving process then opens (an
//! in-memory file passed at descriptor 3, or the copy in the private
//! staging directory): a deploy that replaces the file meanwhile cannot
//! slip in bytes that were not checked.
//!
//! **Bytes that passed once are not checked again.** The loader hashes
//! every copy as it makes it (`generations::copies`); a copy whose hash is
//! one of the [`Passed`] ones (the last [`REMEMBERED`] that passed in this
//! process, and the bytes the server started with, whose constructors and
//! `init` ran in the serving process itself; only their `shutdown` did not)
//! skips the child, logged at debug level (`preflight skipped`).
//! A reload storm or `cargo xtask dev` reloads the same file again and
//! again, and each preflight costs the serving core a process start, a
//! load, an init and a reaping. This is safe enough: the very same bytes
//! were already loaded and initialised in a child, with the same app
//! settings (they cannot change while the server runs), and nothing the
//! preflight could see differs the next time but what the app's init reads
//! from outside (files, the network, the clock), which a preflight never
//! vouches for anyway. The reload still loads the bytes and runs `init` in
//! the serving process: it makes a new generation.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use super::exit::describe;
use crate::config::{format_duration, Config};
use crate::ffi::process::{kill, spawn_with_fds};
use crate::generations::copies::ContentHash;
use crate::generations::loader::LoadError;

/// Where the child finds an in-memory copy.
const SNAPSHOT_FD: i32 = 3;

/// How many passed hashes are remembered.
pub const REMEMBERED: usize = 64;

/// What the child loads: a copy of `source` that the serving process will
/// open next. Its trust was checked when it was copied (a copy has no
/// owner a trust check could judge).
pub struct Target<'a> {
    /// The library file the operator gave, for messages.
    pub source: &'a Path,
    pub bytes: Bytes<'a>,
}

/// Where the copy is.
pub enum Bytes<'a> {
    /// An in-memory file.
    Memory(&'a File),
    /// A file in the private staging directory (no in-memory files).
    Staged(&'a Path),
}

impl Target<'_> {
    /// The path the child is given.
    fn path(&self) -> String {
        match &self.bytes {
            Bytes::Memory(_) => format!("/proc/self/fd/{SNAPSHOT_FD}"),
            Bytes::Staged(path) => path.display().to_string(),
        }
    }
}

/// The content hashes of the libraries that passed the preflight in this
/// process (the last [`REMEMBERED`]).
#[derive(Default)]
pub struct Passed {
    hashes: Mutex<VecDeque<ContentHash>>,
}

impl Passed {
    pub fn contains(&self, hash: ContentHash) -> bool {
        self.lock().contains(&hash)
    }

    pub fn insert(&self, hash: ContentHash) {
        let mut hashes = self.lock();
        if !hashes.contains(&hash) {
            hashes.push_front(hash);
            hashes.truncate(REMEMBERED);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<ContentHash>> {
        self.hashes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Loads `target` in a child process, bounded by `reload_timeout`; returns
/// how long it took.
pub fn check(config: &Config, target: Target<'_>) -> Result<Duration, LoadError> {
    let started = Instant::now();
    let source = target.source.to_owned();
    let failed = |reason: String| LoadError::Preflight { path: source.clone(), reason };
    let mut command = check_command(config, &target);
    let fds: &[(i32, i32)] = match &target.bytes {
        Bytes::Memory(file) => &[(file.as_raw_fd(), SNAPSHOT_FD)],
        Bytes::Staged(_) => &[],
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
        Ok(Ok(output)) => Err(failed(reason(&output, &target.path(), &source))),
        Ok(Err(e)) => Err(failed(format!("cannot wait for it: {e}"))),
        Err(_) => {
            kill(pid, libc::SIGKILL);
            Err(failed(format!("it did not finish within {}", format_duration(limit))))
        }
    }
}

/// `pounce-host check` of the target with the app's settings, its own limit
/// `reload_timeout`. The copy's trust was checked when it was made.
fn check_command(config: &Config, target: &Target<'_>) -> Command {
    let mut command = Command::new("/proc/self/exe");
    command
        .arg("check")
        .args(["--timeout", &format_duration(config.reload_timeout)])
        .arg("--staging-dir")
        .arg(&config.staging_dir)
        .arg("--allow-insecure-library");
    for (key, value) in &config.app_args {
        command.arg("--app-arg").arg(format!("{key}={value}"));
    }
    command.arg(target.path());
    // The settings above are the merged ones: no file or variable may add to them.
    for name in ["POUNCE_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID"] {
        command.env_remove(name);
    }
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// Why the child failed: the signal that killed it, or its error message
/// (naming the library file rather than the copy it read, at `read`).
fn reason(output: &Output, read: &str, source: &Path) -> String {
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
        .replace(read, &source.display().to_string());
    format!("it {how}: {message}")
}
