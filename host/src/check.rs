//! `pounce-host check`: would this library serve? Load it exactly as a
//! reload would (copy, open, ABI check, init), shut it down, and report.

use std::time::{Duration, Instant};

use crate::ffi::Unloaded;
use crate::generations::loader::{LoadError, Loader};

/// How long the app's shutdown may take during a check.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads, checks and unloads the library; returns the report to print.
pub fn run(loader: &Loader) -> Result<String, LoadError> {
    let loaded = loader.load(1)?;
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
