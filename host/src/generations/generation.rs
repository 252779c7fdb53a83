//! Generations: one loaded copy of the app library each.
//!
//! The host serves from the *current* generation (see [`super::Current`]):
//! a request loads it once when it starts and keeps that `Arc` (its *lease*)
//! until its response body ends, so a reload never changes the code under a
//! request. Every pointer into a library (futures, streams, wakers handed to
//! hyper) holds such a lease, so a generation's last `Arc` is dropped only
//! when nothing can call into it any more: that drop is what unloads it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::background::Background;
use super::copies::Lent;
use super::stalls::{self, CallKind};
use super::unload;
use crate::ffi::{AppInfo, Lease, LoadedApp};

/// How long an app's `drain` may run before the next generation's drain
/// gets a thread of its own: telling the app is a moment's work.
const DRAIN_STUCK_AFTER: Duration = Duration::from_millis(100);

/// One loaded copy of the app library and its app instance.
pub struct Generation {
    number: u64,
    /// `Some` until the generation is dropped, when it moves to an unload thread.
    app: Option<LoadedApp>,
    /// Requests whose response has not ended yet.
    in_flight: AtomicUsize,
    /// Upgraded connections (WebSockets...) this generation accepted that
    /// are still open.
    upgraded: AtomicUsize,
    /// Wakes whoever waits for `in_flight` and `upgraded` to reach zero.
    idle: Notify,
    /// Set when the generation is retired with requests still running: they
    /// are cancelled (their responses end, their connections close).
    cancel: watch::Sender<bool>,
    /// How long the app's `shutdown` may wait for its threads.
    unload_timeout: Duration,
    /// The in-memory copy the library was opened from, for reuse once it
    /// is unmapped.
    copy: Option<Lent>,
}

impl Generation {
    pub fn new(number: u64, app: LoadedApp, unload_timeout: Duration, copy: Option<Lent>) -> Generation {
        unload::made();
        Generation {
            number,
            app: Some(app),
            copy,
            in_flight: AtomicUsize::new(0),
            upgraded: AtomicUsize::new(0),
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

    pub fn upgraded(&self) -> usize {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// Requests in flight and upgraded connections: what a drain waits for.
    pub fn busy(&self) -> usize {
        self.in_flight.load(Ordering::Acquire) + self.upgraded.load(Ordering::Acquire)
    }

    /// Completes when no request of this generation is in flight and none
    /// of its upgraded connections is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.busy() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Tells the app it gets no new requests, on a long-lived background
    /// thread (`pounce-drain`): an app whose `drain` blocks must hold up
    /// neither the serving threads nor a shutdown (nor, for longer than
    /// [`DRAIN_STUCK_AFTER`], the next generation's drain: see
    /// [`Background`]). The job holds a lease, so the code stays loaded
    /// while it runs.
    pub fn drain_in_background(self: &Arc<Self>) {
        static DRAINS: OnceLock<Background> = OnceLock::new();
        let drains = DRAINS.get_or_init(|| Background::new("pounce-drain", || {}, DRAIN_STUCK_AFTER));
        let generation = self.clone();
        let queued = drains.submit(move || {
            let _running = stalls::enter(CallKind::Drain, generation.number, None);
            generation.app().drain();
        });
        if let Err(e) = queued {
            tracing::warn!(generation = self.number, "cannot start the app's drain: {e}");
        }
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

impl Lease for Generation {
    fn app(&self) -> &LoadedApp {
        Generation::app(self)
    }
}

impl Drop for Generation {
    /// The last lease is gone: nothing can call into the library any more.
    fn drop(&mut self) {
        if let Some(app) = self.app.take() {
            unload::release(self.number, app, self.unload_timeout, self.copy.take());
        }
    }
}

/// A request the app serves: counted in its generation until its response
/// body ends (the guard lives in the body), which is what a drain waits for.
pub struct InFlight {
    pub generation: Arc<Generation>,
}

impl InFlight {
    pub fn start(generation: Arc<Generation>) -> InFlight {
        generation.request_started();
        InFlight { generation }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.generation.request_ended();
    }
}

/// An upgraded connection (a WebSocket, say) of a generation: it holds the
/// generation's lease and counts in it until the connection ends, so a
/// drain waits for it (at most `reload_timeout`, then it is cancelled).
pub struct UpgradedLease {
    pub generation: Arc<Generation>,
}

impl UpgradedLease {
    pub fn start(generation: Arc<Generation>) -> UpgradedLease {
        generation.upgraded.fetch_add(1, Ordering::AcqRel);
        UpgradedLease { generation }
    }
}

impl Drop for UpgradedLease {
    fn drop(&mut self) {
        if self.generation.upgraded.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.generation.idle.notify_waiters();
        }
    }
}
