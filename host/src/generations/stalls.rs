//! Which app calls are running now, on which host thread, so a watchdog can
//! notice one that runs too long (a handler that blocks or spins, an app
//! `drain` or `shutdown` that hangs) and say what it is. (`init` is bounded
//! by `reload_timeout` instead.)
//!
//! Each host thread that calls into an app has one [`Slot`]. Entering a call
//! writes what the call is into the slot (kind, generation, and for a
//! request `METHOD /path`) and marks it busy; leaving marks it idle. The
//! request path pays a few plain stores for this: no lock, no clone, no
//! clock. The slot is a sequence lock, because only its own thread writes
//! it: the sequence number is odd while the thread writes, and bumped again
//! when it is done, so the watchdog ([`Stalls::scan`]) can tell a consistent
//! read from one a new call overwrote meanwhile. The watchdog notes when it
//! first saw a slot busy with a given sequence number, and a call is stalled
//! once that moment is `--stall-warning` ago. A call is reported once.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

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

    const ALL: [CallKind; 4] = [CallKind::Handler, CallKind::Stream, CallKind::Drain, CallKind::Shutdown];
}

/// How many 8-byte words of `METHOD /path` a slot keeps: a longer line is
/// reported cut, which is enough to recognise the route.
const LINE_WORDS: usize = 8;

/// One host thread's current app call, written by that thread only.
#[derive(Default)]
struct Slot {
    /// Odd while the thread writes the fields below; bumped by 2 for every
    /// call entered.
    sequence: AtomicU64,
    busy: AtomicBool,
    kind: AtomicU8,
    generation: AtomicU64,
    /// `METHOD /path`, little-endian packed; its length in `line_len`
    /// (0: no request), which may exceed what the words hold.
    line: [AtomicU64; LINE_WORDS],
    line_len: AtomicUsize,
}

/// A consistent read of a busy slot.
struct Call {
    sequence: u64,
    kind: CallKind,
    generation: u64,
    request: Option<String>,
}

impl Slot {
    /// Writes a new call (on the slot's own thread).
    fn write(&self, kind: CallKind, generation: u64, request: Option<(&str, &str)>) {
        let sequence = self.sequence.load(Ordering::Relaxed);
        self.sequence.store(sequence.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.kind.store(kind as u8, Ordering::Relaxed);
        self.generation.store(generation, Ordering::Relaxed);
        let len = match request {
            Some((method, path)) => self.write_line([method.as_bytes(), b" ", path.as_bytes()]),
            None => 0,
        };
        self.line_len.store(len, Ordering::Relaxed);
        self.sequence.store(sequence.wrapping_add(2), Ordering::Release);
        self.busy.store(true, Ordering::Release);
    }

    /// Packs the parts into the line's words (as many bytes as they
    /// hold); returns the parts' whole length.
    fn write_line(&self, parts: [&[u8]; 3]) -> usize {
        let mut bytes = [0u8; LINE_WORDS * 8];
        let mut at = 0;
        for part in parts {
            let taken = part.len().min(bytes.len() - at);
            bytes[at..at + taken].copy_from_slice(&part[..taken]);
            at += taken;
        }
        for (word, chunk) in self.line.iter().zip(bytes.chunks_exact(8)).take(at.div_ceil(8)) {
            let mut packed = [0u8; 8];
            packed.copy_from_slice(chunk);
            word.store(u64::from_le_bytes(packed), Ordering::Relaxed);
        }
        parts.iter().map(|part| part.len()).sum()
    }

    /// The call running now, if the slot is busy and no new call overwrote
    /// it while it was read.
    fn read(&self) -> Option<Call> {
        if !self.busy.load(Ordering::Acquire) {
            return None;
        }
        let sequence = self.sequence.load(Ordering::Acquire);
        if sequence % 2 == 1 {
            return None;
        }
        let kind = CallKind::ALL.get(usize::from(self.kind.load(Ordering::Relaxed))).copied();
        let generation = self.generation.load(Ordering::Relaxed);
        let len = self.line_len.load(Ordering::Relaxed);
        let mut line: Vec<u8> = self.line.iter().flat_map(|word| word.load(Ordering::Relaxed).to_le_bytes()).collect();
        fence(Ordering::Acquire);
        if self.sequence.load(Ordering::Relaxed) != sequence || !self.busy.load(Ordering::Relaxed) {
            return None;
        }
        line.truncate(len);
        let mut request = (len > 0).then(|| String::from_utf8_lossy(&line).into_owned());
        if let Some(text) = request.as_mut().filter(|_| len > LINE_WORDS * 8) {
            text.push('…');
        }
        Some(Call { sequence, kind: kind?, generation, request })
    }
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
/// handler: serving `request`, its method and path).
pub fn enter(kind: CallKind, generation: u64, request: Option<(&str, &str)>) -> AppCall {
    SLOT.with(|slot| slot.write(kind, generation, request));
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
            let Some(call) = slot.read() else { continue };
            let seen = self.remember(&slot, call.sequence, now);
            let running = now.duration_since(seen.since);
            if seen.reported || running < limit {
                continue;
            }
            seen.reported = true;
            stalls.push(Stall { kind: call.kind, generation: call.generation, request: call.request, running, thread });
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
        let running = std::thread::spawn(move || {
            let _call = enter(CallKind::Handler, 7, Some(("GET", "/slow")));
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

    #[test]
    fn a_long_request_line_is_cut_and_marked() {
        let slot = Slot::default();
        let path = format!("/{}", "a".repeat(100));
        slot.write(CallKind::Stream, 3, Some(("POST", &path)));
        let call = slot.read().expect("a busy slot reads");
        assert_eq!((call.kind, call.generation), (CallKind::Stream, 3));
        let expected = format!("POST {}…", &path[..LINE_WORDS * 8 - 5]);
        assert_eq!(call.request.as_deref(), Some(expected.as_str()));
        slot.write(CallKind::Drain, 4, None);
        assert_eq!(slot.read().map(|call| call.request), Some(None), "a new call without a request clears the line");
        slot.busy.store(false, Ordering::Release);
        assert!(slot.read().is_none(), "an idle slot has no call");
    }
}
