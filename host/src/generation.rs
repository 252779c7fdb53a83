//! Generations: one loaded copy of the app library each.
//!
//! The host serves from the *current* generation, held in an [`ArcSwap`]:
//! a request loads it once when it starts and keeps that `Arc` (its *lease*)
//! until its response body ends, so a reload never changes the code under a
//! request. Every pointer into a library (futures, streams, wakers handed to
//! hyper) holds such a lease, so a generation's last `Arc` is dropped only
//! when nothing can call into it any more: that drop is what unloads it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::ffi::{AppInfo, LoadedApp, Unloaded};

/// One loaded copy of the app library and its app instance.
pub struct Generation {
    number: u64,
    /// `Some` until the generation is dropped, when it moves to an unload thread.
    app: Option<LoadedApp>,
    /// Requests whose response has not ended yet.
    in_flight: AtomicUsize,
    /// Wakes whoever waits for `in_flight` to reach zero.
    idle: Notify,
    /// Set when the generation is retired with requests still running: they
    /// are cancelled (their responses end, their connections close).
    cancel: watch::Sender<bool>,
    /// How long the app's `shutdown` may wait for its threads.
    unload_timeout: Duration,
}

impl Generation {
    pub fn new(number: u64, app: LoadedApp, unload_timeout: Duration) -> Generation {
        Generation {
            number,
            app: Some(app),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            cancel: watch::Sender::new(false),
            unload_timeout,
        }
    }

    pub fn number(&self) -> u64 {
        self.number
    }

    pub fn app(&self) -> &LoadedApp {
        match &self.app {
            Some(app) => app,
            // `app` is only taken in `Drop`, when no reference remains.
            None => unreachable!("generation {} used after its app was released", self.number),
        }
    }

    /// Takes the app out, for a caller that unloads it itself (`check`).
    pub fn into_app(mut self) -> LoadedApp {
        match self.app.take() {
            Some(app) => app,
            None => unreachable!("generation {} has no app", self.number),
        }
    }

    pub fn info(&self) -> &AppInfo {
        self.app().info()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in; [`Generation::request_ended`] counts it out.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Completes when no request of this generation is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Tells the app it gets no new requests.
    pub fn drain(&self) {
        self.app().drain();
    }

    /// Cancels every request still running in this generation.
    pub fn cancel(&self) {
        self.cancel.send_replace(true);
    }

    /// Completes when the generation is cancelled.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.subscribe();
        // An error means the sender is gone, i.e. the generation is too.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
    }
}

/// Set once the process is exiting (see [`begin_exit`]).
static EXITING: AtomicBool = AtomicBool::new(false);

/// From now on, released generations run their app's `shutdown` but are not
/// unmapped: the host's worker threads are exiting and may still run their
/// thread-local destructors, and the process is about to end anyway.
pub fn begin_exit() {
    EXITING.store(true, Ordering::SeqCst);
}

impl Drop for Generation {
    /// The last lease is gone: nothing can call into the library any more.
    /// Unloading waits for the app's threads, so it runs on its own thread,
    /// never on a request-serving one.
    fn drop(&mut self) {
        let Some(app) = self.app.take() else { return };
        let (number, timeout) = (self.number, self.unload_timeout);
        let exiting = EXITING.load(Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name(format!("pounce-unload-g{number}")).spawn(move || {
            crate::ffi::priority::lower_this_thread();
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

/// The generation new requests go to.
pub struct Current {
    slot: ArcSwap<Generation>,
}

impl Current {
    pub fn new(first: Generation) -> Current {
        Current { slot: ArcSwap::from_pointee(first) }
    }

    /// The current generation, leased for one request.
    pub fn lease(&self) -> Arc<Generation> {
        self.slot.load_full()
    }

    /// Publishes `next`; returns the generation it replaces.
    pub fn publish(&self, next: Arc<Generation>) -> Arc<Generation> {
        self.slot.swap(next)
    }

    pub fn number(&self) -> u64 {
        self.slot.load().number()
    }
}
