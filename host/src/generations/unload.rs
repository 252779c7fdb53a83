//! Releasing a generation's library once its last lease is gone: the app's
//! `shutdown` (which waits for its threads), the check for code of it that
//! could still run (threads, signal handlers, keys: then it stays mapped),
//! the unload guard, `dlclose`; an in-memory copy that was really unmapped
//! goes back to its pool (see [`super::copies`]).
//!
//! Released generations queue for one long-lived thread at background
//! priority (`pounce-unload`), never a request-serving one and never a new
//! thread per generation: those released together (a reload storm retires
//! many) are unloaded in one batch. An app whose `shutdown` hangs holds up
//! the queue for at most its timeout and a second, then the next release
//! gets a thread of its own (see [`Background`]).
//!
//! At exit, each released generation gets a thread of its own (the apps'
//! `shutdown`s run side by side, and one that hangs holds up no other); the
//! process waits for them, bounded.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::background::Background;
use super::copies::Lent;
use super::stalls::{self, CallKind};
use crate::ffi::{priority, LoadedApp, Unloaded};

/// Set once the process is exiting (see [`begin_exit`]).
static EXITING: AtomicBool = AtomicBool::new(false);

/// Generations made and not yet handed to [`release`]: at exit, their last
/// leases may still be dropping on other threads (a drain thread, the stall
/// watchdog), and [`wait_for_unloads`] waits for them.
static UNRELEASED: AtomicUsize = AtomicUsize::new(0);

/// Counts a new generation (see [`UNRELEASED`]); [`release`] uncounts it.
pub(super) fn made() {
    UNRELEASED.fetch_add(1, Ordering::SeqCst);
}

/// From now on, released generations run their app's `shutdown` but are not
/// unmapped: the host's worker threads are exiting and may still run their
/// thread-local destructors, and the process is about to end anyway.
pub fn begin_exit() {
    EXITING.store(true, Ordering::SeqCst);
}

/// A generation whose last lease is gone.
struct Release {
    number: u64,
    app: LoadedApp,
    timeout: Duration,
    copy: Option<Lent>,
}

/// The releases waiting for the unload thread, and whether a batch job is
/// queued to take them.
#[derive(Default)]
struct Pending {
    releases: Vec<Release>,
    scheduled: bool,
}

fn lock_pending() -> std::sync::MutexGuard<'static, Pending> {
    static PENDING: Mutex<Pending> = Mutex::new(Pending { releases: Vec::new(), scheduled: false });
    PENDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn queue() -> &'static Background {
    /// An app's shutdown may take its timeout: only past that (and its own
    /// thread joins) is the queue's thread taken as stuck.
    const STUCK_AFTER: Duration = Duration::from_secs(60);
    static QUEUE: OnceLock<Background> = OnceLock::new();
    QUEUE.get_or_init(|| Background::new("pounce-unload", priority::lower_this_thread, STUCK_AFTER))
}

/// Moves `app` (generation `number`) to the unload thread. It is counted
/// out only once it is there, so [`wait_for_unloads`] sees it either way.
pub(super) fn release(number: u64, app: LoadedApp, timeout: Duration, copy: Option<Lent>) {
    hand_over(Release { number, app, timeout, copy });
    UNRELEASED.fetch_sub(1, Ordering::SeqCst);
}

fn hand_over(release: Release) {
    if EXITING.load(Ordering::SeqCst) {
        return release_for_exit(release);
    }
    let mut pending = lock_pending();
    pending.releases.push(release);
    if pending.scheduled {
        return;
    }
    pending.scheduled = true;
    drop(pending);
    if let Err(e) = queue().submit(unload_batch) {
        let mut pending = lock_pending();
        pending.scheduled = false;
        let count = pending.releases.len();
        // Dropping a LoadedApp leaks its library: it stays mapped, safely.
        let left: Vec<Release> = std::mem::take(&mut pending.releases);
        drop(pending);
        tracing::error!(generations = count, "cannot start the unload thread ({e}); their libraries stay loaded");
        drop(left);
    }
}

/// The unload thread's job: every release queued until none is left.
fn unload_batch() {
    loop {
        let batch = {
            let mut pending = lock_pending();
            if pending.releases.is_empty() {
                pending.scheduled = false;
                return;
            }
            std::mem::take(&mut pending.releases)
        };
        if batch.len() > 1 {
            tracing::debug!(generations = batch.len(), "unloading released generations together");
        }
        for release in batch {
            if EXITING.load(Ordering::SeqCst) {
                release_for_exit(release);
            } else {
                unload(release);
            }
        }
    }
}

fn unload(Release { number, app, timeout, copy }: Release) {
    let started = Instant::now();
    let outcome = {
        let _running = stalls::enter(CallKind::Shutdown, number, None);
        app.unload(timeout)
    };
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match outcome {
        Unloaded::Unmapped => {
            if let Some(copy) = copy {
                copy.unmapped();
            }
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

/// At exit: the app's `shutdown` on a thread of its own, the library left
/// mapped.
fn release_for_exit(Release { number, app, timeout, .. }: Release) {
    let spawned = std::thread::Builder::new().name(format!("pounce-unload-g{number}")).spawn(move || {
        priority::lower_this_thread();
        let _running = stalls::enter(CallKind::Shutdown, number, None);
        app.shut_down_for_exit(timeout);
    });
    match spawned {
        Ok(handle) => {
            let mut exits = exits();
            exits.retain(|earlier| !earlier.is_finished());
            exits.push(handle);
        }
        Err(e) => tracing::error!(generation = number, "cannot start an exit thread ({e}); its shutdown is skipped"),
    }
}

fn exits() -> std::sync::MutexGuard<'static, Vec<JoinHandle<()>>> {
    static EXITS: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
    EXITS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits for every unload started so far (at exit, so the apps' `shutdown`
/// runs before the process ends), but not past `deadline`: an app whose
/// shutdown hangs must not keep the process alive.
pub fn wait_for_unloads(deadline: Instant) {
    while UNRELEASED.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if UNRELEASED.load(Ordering::SeqCst) > 0 {
        tracing::warn!("a generation was still in use at exit; exiting without its app's shutdown");
    }
    let queued = lock_pending().scheduled;
    if queued && !queue().wait_idle(deadline) {
        tracing::warn!("an app's shutdown did not finish in time; exiting without waiting for it");
    }
    let pending = std::mem::take(&mut *exits());
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
