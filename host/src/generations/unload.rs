//! Releasing a generation's library once its last lease is gone: the app's
//! `shutdown` (which waits for its threads), the check for code of it that
//! could still run (threads, signal handlers, keys: then it stays mapped),
//! the unload guard, `dlclose`.
//! It runs on a thread of its own at background priority, never on a
//! request-serving one; the process waits for these threads at exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::stalls::{self, CallKind};
use crate::ffi::{priority, LoadedApp, Unloaded};

/// Set once the process is exiting (see [`begin_exit`]).
static EXITING: AtomicBool = AtomicBool::new(false);

/// From now on, released generations run their app's `shutdown` but are not
/// unmapped: the host's worker threads are exiting and may still run their
/// thread-local destructors, and the process is about to end anyway.
pub fn begin_exit() {
    EXITING.store(true, Ordering::SeqCst);
}

/// Moves `app` (generation `number`) to an unload thread.
pub(super) fn release(number: u64, app: LoadedApp, timeout: Duration) {
    let exiting = EXITING.load(Ordering::SeqCst);
    let spawned = std::thread::Builder::new().name(format!("pounce-unload-g{number}")).spawn(move || {
        priority::lower_this_thread();
        let _running = stalls::enter(CallKind::Shutdown, number, None);
        if exiting {
            app.shut_down_for_exit(timeout);
        } else {
            unload(number, app, timeout);
        }
    });
    match spawned {
        Ok(handle) => {
            let mut unloads = unloads();
            unloads.retain(|earlier| !earlier.is_finished());
            unloads.push(handle);
        }
        Err(e) => {
            tracing::error!(generation = number, "cannot start an unload thread ({e}); the library stays loaded")
        }
    }
}

fn unload(number: u64, app: LoadedApp, timeout: Duration) {
    let started = Instant::now();
    let outcome = app.unload(timeout);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match outcome {
        Unloaded::Unmapped => {
            tracing::info!(generation = number, unload_ms = ms, "generation released, library unmapped")
        }
        Unloaded::StillMapped => tracing::warn!(
            generation = number,
            unload_ms = ms,
            "generation released, but the dynamic loader kept its library mapped (see ARCHITECTURE.md: unloading)"
        ),
        Unloaded::ThreadsLeft => tracing::warn!(
            generation = number,
            unload_ms = ms,
            "the app's threads did not stop within {timeout:?}; its library stays loaded so they cannot crash"
        ),
        Unloaded::Pinned(pins) => tracing::warn!(
            generation = number,
            unload_ms = ms,
            "generation {number} stays mapped: {pins}; unmapping it could crash the server"
        ),
    }
}

fn unloads() -> std::sync::MutexGuard<'static, Vec<JoinHandle<()>>> {
    static UNLOADS: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
    UNLOADS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits for every unload started so far (at exit, so the apps' `shutdown`
/// runs before the process ends), but not past `deadline`: an app whose
/// shutdown hangs must not keep the process alive.
pub fn wait_for_unloads(deadline: Instant) {
    let pending = std::mem::take(&mut *unloads());
    for handle in pending {
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            tracing::warn!("an app's shutdown did not finish in time; exiting without waiting for it");
        }
    }
}
