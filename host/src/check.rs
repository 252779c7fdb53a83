//! `pounce-host check`: would this library serve? Load it exactly as a
//! reload would (copy, open, ABI check, init), shut it down, and report.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::ffi::Unloaded;
use crate::generations::loader::{LoadError, Loader};

/// How long the app's shutdown may take during a check.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads, checks and unloads the library; returns the report to print. A
/// load that takes longer than `limit` fails: the thread running the app's
/// init is abandoned (the process exits after the report).
pub fn run(loader: Arc<Loader>, limit: Duration) -> Result<String, LoadError> {
    let (tx, rx) = mpsc::channel();
    let loading = loader.clone();
    std::thread::Builder::new()
        .name("pounce-check".to_owned())
        .spawn(move || {
            let _ = tx.send(loading.load(1));
        })
        .map_err(LoadError::Thread)?;
    let loaded = match rx.recv_timeout(limit) {
        Ok(result) => result?,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(LoadError::TimedOut { path: loader.source().to_owned(), limit });
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            return Err(LoadError::Crashed { path: loader.source().to_owned() });
        }
    };
    let info = loaded.generation.info().clone();
    let path = loader.source().display().to_string();
    let started = Instant::now();
    let unloaded = loaded.generation.into_app().unload(SHUTDOWN_TIMEOUT);
    let shutdown_ms = started.elapsed().as_secs_f64() * 1000.0;
    let unload = match unloaded {
        Unloaded::Unmapped => "ok, library unmapped".to_owned(),
        Unloaded::StillMapped => "ok, but the library stayed mapped after dlclose".to_owned(),
        Unloaded::ThreadsLeft => {
            "the app's threads did not stop in time (a reload would keep this library loaded)".to_owned()
        }
        Unloaded::Pinned(pins) => format!("the library stays mapped ({pins}): every reload would keep a copy"),
    };
    Ok(format!(
        "ok: {path}\n  app:         {} {}\n  ABI version: {} (app-abi {})\n  load:        ok in {:.1} ms (init {:.1} ms)\n  shutdown:    {unload} in {shutdown_ms:.1} ms\n",
        info.name,
        info.version,
        info.abi_version,
        info.abi_crate_version,
        loaded.duration.as_secs_f64() * 1000.0,
        info.init_duration.as_secs_f64() * 1000.0,
    ))
}
