//! Which app calls are running now, on which host thread, so a watchdog can
//! notice one that runs too long (a handler that blocks or spins, an app
//! `drain` or `shutdown` that hangs) and say what it is. (`init` is bounded
//! by `reload_timeout` instead.)
//!
//! Each host thread that calls into an app has one [`Slot`]. Entering a call
//! bumps the slot's sequence number and marks it busy; leaving marks it
//! idle. Nothing on that path reads a clock: the watchdog ([`Stalls::scan`])
//! notes when it first saw a slot busy with a given sequence number, and a
//! call is stalled once that moment is `--stall-warning` ago. A call is
//! reported once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Method, Uri};

/// What kind of app code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    Handler,
    Stream,
    Drain,
    Shutdown,
}

impl CallKind {
    pub fn name(self) -> &'static str {
        match self {
            CallKind::Handler => "handler",
            CallKind::Stream => "stream",
            CallKind::Drain => "drain",
            CallKind::Shutdown => "shutdown",
        }
    }
}

/// One host thread's current app call.
#[derive(Default)]
struct Slot {
    /// Bumped by every call entered on this thread.
    sequence: AtomicU64,
    busy: AtomicBool,
    /// What the call is: written with `try_lock`, so the request path never
    /// waits for the watchdog.
    call: Mutex<Option<Call>>,
}

#[derive(Clone, Debug)]
struct Call {
    kind: CallKind,
    generation: u64,
    request: Option<(Method, Uri)>,
}

/// A stall the watchdog found.
#[derive(Clone, Debug)]
pub struct Stall {
    pub kind: CallKind,
    pub generation: u64,
    /// `METHOD /path` of the request a handler or stream serves.
    pub request: Option<String>,
    pub running: Duration,
    pub thread: String,
}

fn slots() -> &'static Mutex<Vec<(Weak<Slot>, String)>> {
    static SLOTS: Mutex<Vec<(Weak<Slot>, String)>> = Mutex::new(Vec::new());
    &SLOTS
}

thread_local! {
    static SLOT: Arc<Slot> = {
        let slot = Arc::new(Slot::default());
        let name = std::thread::current().name().unwrap_or("unnamed").to_owned();
        let mut all = lock(slots());
        all.retain(|(slot, _)| slot.strong_count() > 0);
        all.push((Arc::downgrade(&slot), name));
        slot
    };
}

/// Marks an app call as running on this thread until dropped (on this
/// thread: it is not `Send`).
#[must_use = "the call counts as running while the guard lives"]
pub struct AppCall(std::marker::PhantomData<*const ()>);

/// Notes that `kind` app code of `generation` runs on this thread (for a
/// handler or stream: serving `request`).
pub fn enter(kind: CallKind, generation: u64, request: Option<(&Method, &Uri)>) -> AppCall {
    SLOT.with(|slot| {
        if let Ok(mut call) = slot.call.try_lock() {
            *call = Some(Call { kind, generation, request: request.map(|(m, u)| (m.clone(), u.clone())) });
        }
        slot.sequence.fetch_add(1, Ordering::Relaxed);
        slot.busy.store(true, Ordering::Release);
    });
    AppCall(std::marker::PhantomData)
}

impl Drop for AppCall {
    fn drop(&mut self) {
        // A thread's slot lives as long as the thread: still there.
        let _ = SLOT.try_with(|slot| slot.busy.store(false, Ordering::Release));
    }
}

/// The watchdog's memory: since when it has seen each busy call.
#[derive(Default)]
pub struct Stalls {
    seen: Vec<Seen>,
}

struct Seen {
    slot: Weak<Slot>,
    sequence: u64,
    since: Instant,
    reported: bool,
}

impl Stalls {
    /// Looks at every thread's call; returns the calls that have run for
    /// `limit` or more and were not reported before.
    pub fn scan(&mut self, limit: Duration) -> Vec<Stall> {
        let now = Instant::now();
        let mut stalls = Vec::new();
        let all: Vec<(Arc<Slot>, String)> =
            lock(slots()).iter().filter_map(|(slot, name)| Some((slot.upgrade()?, name.clone()))).collect();
        self.seen.retain(|seen| seen.slot.strong_count() > 0);
        for (slot, thread) in all {
            if !slot.busy.load(Ordering::Acquire) {
                continue;
            }
            let sequence = slot.sequence.load(Ordering::Relaxed);
            let seen = self.remember(&slot, sequence, now);
            let running = now.duration_since(seen.since);
            if seen.reported || running < limit {
                continue;
            }
            seen.reported = true;
            let call = lock(&slot.call).clone();
            let Some(call) = call else { continue };
            let request = call.request.map(|(method, uri)| format!("{method} {}", uri.path()));
            stalls.push(Stall { kind: call.kind, generation: call.generation, request, running, thread });
        }
        stalls
    }

    fn remember(&mut self, slot: &Arc<Slot>, sequence: u64, now: Instant) -> &mut Seen {
        let index = match self.seen.iter().position(|seen| std::ptr::eq(seen.slot.as_ptr(), Arc::as_ptr(slot))) {
            Some(index) => index,
            None => {
                self.seen.push(Seen { slot: Arc::downgrade(slot), sequence, since: now, reported: false });
                self.seen.len() - 1
            }
        };
        let seen = &mut self.seen[index];
        if seen.sequence != sequence {
            *seen = Seen { slot: Arc::downgrade(slot), sequence, since: now, reported: false };
        }
        seen
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_runs_past_the_limit_is_reported_once_and_a_finished_one_never() {
        let mut stalls = Stalls::default();
        let uri: Uri = "/slow".parse().unwrap();
        let running = std::thread::spawn(move || {
            let _call = enter(CallKind::Handler, 7, Some((&Method::GET, &uri)));
            std::thread::sleep(Duration::from_millis(300));
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(stalls.scan(Duration::from_millis(100)).is_empty(), "just seen: not stalled yet");
        std::thread::sleep(Duration::from_millis(150));
        let found = stalls.scan(Duration::from_millis(100));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].kind, found[0].generation), (CallKind::Handler, 7));
        assert_eq!(found[0].request.as_deref(), Some("GET /slow"));
        assert!(stalls.scan(Duration::from_millis(100)).is_empty(), "reported once");
        running.join().unwrap();
        {
            let _quick = enter(CallKind::Drain, 1, None);
        }
        assert!(stalls.scan(Duration::ZERO).is_empty(), "a finished call is not a stall");
    }
}
