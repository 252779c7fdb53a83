//! What still points into a library that is about to be unmapped.
//!
//! Before a load's library is closed (its generation released, or a failed
//! load given up), the host looks for code of it that could still run:
//!
//! - **threads** that may still run user code (they exist and have not
//!   begun to exit) and were started with a routine in the library (see
//!   `threads`), or that no `pthread_create` call started and that appeared
//!   after the library was opened (the host starts all of its threads
//!   through `pthread_create`, so such a thread can only be a library's, or
//!   a helper glibc started for one);
//! - **signal handlers**: for every signal but SIGKILL and SIGSTOP, a
//!   disposition whose handler lies in the library, or one that lies in
//!   another loaded library installed after this one held that signal (a
//!   handler that chains to the previous one, as signal-hook and most C
//!   libraries do, would call into this one);
//! - **thread-specific keys** whose destructor lies in the library and that
//!   the unload guard will not delete (only with `--unload-guard off`).
//!
//! Any of these keeps the library mapped for good ([`Pins`], reported as
//! `Unloaded::Pinned`): a small leak instead of a crash.

use std::fmt;
use std::time::{Duration, Instant};

use super::library::Segments;
use super::threads;
use super::unload_guard::{self, Guarded};

/// How long the check waits for threads that are just starting to be
/// recorded: while some thread's record has no id yet, a thread nobody
/// recorded may be that one. Past this, it counts (a loaded machine may not
/// run a new thread for a while; a leak is the worst outcome).
const SETTLE: Duration = Duration::from_secs(2);
const SETTLE_STEP: Duration = Duration::from_millis(2);

/// Why a library stays mapped. Empty: nothing points into it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins {
    pub threads: Vec<PinningThread>,
    pub signals: Vec<PinningSignal>,
    /// Keys with a destructor in the library that stay (guard off).
    pub keys: usize,
}

/// A live thread that may run the library's code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinningThread {
    /// 0 while it is still starting.
    pub tid: i32,
    pub name: String,
    /// Started through `pthread_create` with a routine in the library;
    /// otherwise not started through `pthread_create` at all, after the
    /// library was opened.
    pub started_by_library: bool,
}

/// A signal whose handler may call into the library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinningSignal {
    /// The signal's handler lies in the library.
    Handler { signal: i32 },
    /// The library held the signal's handler before; the handler now lies in
    /// the library of `generation`, which may chain to it.
    Chained { signal: i32, generation: u64 },
}

impl Pins {
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty() && self.signals.is_empty() && self.keys == 0
    }
}

impl fmt::Display for Pins {
    /// `1 thread still running (tid 1234 'worker'), SIGHUP handler in the library`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if !self.threads.is_empty() {
            let count = self.threads.len();
            let list: Vec<String> = self
                .threads
                .iter()
                .map(|t| match (t.tid, t.started_by_library) {
                    (0, _) => "one starting".to_owned(),
                    (tid, true) => format!("tid {tid} '{}'", t.name),
                    (tid, false) => format!("tid {tid} '{}', not started by pthread_create", t.name),
                })
                .collect();
            let threads = if count == 1 { "thread" } else { "threads" };
            parts.push(format!("{count} {threads} still running ({})", list.join(", ")));
        }
        for signal in &self.signals {
            parts.push(match *signal {
                PinningSignal::Handler { signal } => format!("{} handler in the library", signal_name(signal)),
                PinningSignal::Chained { signal, generation } => {
                    format!("{} handler of generation {generation} may chain into it", signal_name(signal))
                }
            });
        }
        if self.keys > 0 {
            let keys = if self.keys == 1 { "key" } else { "keys" };
            parts.push(format!("{} pthread {keys} with a destructor in the library (--unload-guard off)", self.keys));
        }
        f.write_str(&parts.join(", "))
    }
}

/// What pins `load`'s library (see the module docs). Waits up to
/// [`SETTLE`] while a thread nobody recorded may be one that is starting.
pub(super) fn find(load: &Guarded) -> Pins {
    note_signal_handlers();
    let signals = signal_pins(load, &unload_guard::loads(), &handlers());
    let keys = unload_guard::keys_left_behind(load).len();
    let deadline = Instant::now() + SETTLE;
    loop {
        let found = thread_pins(load);
        if !found.unsettled || Instant::now() >= deadline {
            return Pins { threads: found.threads, signals, keys };
        }
        std::thread::sleep(SETTLE_STEP);
    }
}

/// The outcome of one look at the threads.
struct ThreadCheck {
    threads: Vec<PinningThread>,
    /// Threads nobody recorded were seen while others were starting
    /// (records without an id yet): look again.
    unsettled: bool,
}

/// The threads that may run `load`'s code.
fn thread_pins(load: &Guarded) -> ThreadCheck {
    threads::prune();
    // The task list first: a thread that starts after it is read has its
    // record by the time the records are read, or counts as starting.
    let live = threads::live_tids();
    let records = threads::recorded();
    let host = Host { may_run: threads::may_run, name_of: threads::name_of };
    classify(load.segments(), load.threads_before(), &records, live.as_deref(), host)
}

/// How [`classify`] asks about a thread (a seam for the tests).
struct Host<R, N> {
    /// Whether the thread exists and has not begun to exit.
    may_run: R,
    name_of: N,
}

/// The threads that may run code of the library at `segments`, given the
/// thread `records`, the `live` task list and the threads that existed
/// before the library was opened (each `None` if it could not be read).
fn classify(
    segments: &Segments,
    before: Option<&[i32]>,
    records: &[threads::Record],
    live: Option<&[i32]>,
    host: Host<impl Fn(i32) -> bool, impl Fn(i32) -> String>,
) -> ThreadCheck {
    let Host { may_run, name_of } = host;
    let mut threads = Vec::new();
    for record in records.iter().filter(|r| segments.contains(r.start)) {
        // Asked directly, not from `live`: it may have started since.
        if record.tid == 0 || may_run(record.tid) {
            let name = if record.tid == 0 { String::new() } else { name_of(record.tid) };
            threads.push(PinningThread { tid: record.tid, name, started_by_library: true });
        }
    }
    // Without both task lists, threads nobody recorded cannot be told apart.
    let (Some(live), Some(before)) = (live, before) else { return ThreadCheck { threads, unsettled: false } };
    let mut unrecorded = false;
    for &tid in live {
        // Asked again after the records were read: a thread that has exited
        // since the task list was read may have lost its record already.
        if records.iter().any(|r| r.tid == tid) || before.contains(&tid) || !may_run(tid) {
            continue;
        }
        let name = name_of(tid);
        // io_uring's kernel workers belong to the process but run no user code.
        if !name.starts_with("iou-wrk-") && !name.starts_with("iou-sqp-") {
            threads.push(PinningThread { tid, name, started_by_library: false });
            unrecorded = true;
        }
    }
    let starting = records.iter().any(|r| r.tid == 0 && !segments.contains(r.start));
    ThreadCheck { threads, unsettled: unrecorded && starting }
}

/// `(signal, handler address)` for every signal whose disposition is a
/// handler function (not default, not ignored).
fn handlers() -> Vec<(i32, usize)> {
    let mut found = Vec::new();
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        let mut action = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
        // SAFETY: with a null new action, sigaction only writes the current
        // one into `action`; signals glibc reserves or that do not exist fail
        // with EINVAL and write nothing.
        if unsafe { libc::sigaction(signal, std::ptr::null(), action.as_mut_ptr()) } != 0 {
            continue;
        }
        // SAFETY: sigaction succeeded, so it filled `action`.
        let handler = unsafe { action.assume_init() }.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN && handler != libc::SIG_ERR {
            found.push((signal, handler));
        }
    }
    found
}

/// Notes, for every loaded library, which signals' handlers lie in it now.
/// Run before a library is opened, after each app `init` and at every
/// unload check, so a library that installed a handler is known even after
/// a later one installed its own on top.
pub(super) fn note_signal_handlers() {
    let loads = unload_guard::loads();
    if loads.is_empty() {
        return;
    }
    for (signal, handler) in handlers() {
        for load in loads.iter().filter(|l| l.segments().contains(handler)) {
            load.note_signal(signal);
        }
    }
}

/// The signals through which `load`'s code may still be called, given the
/// current `handlers` and every registered load.
fn signal_pins(load: &Guarded, loads: &[std::sync::Arc<Guarded>], handlers: &[(i32, usize)]) -> Vec<PinningSignal> {
    let mut pins = Vec::new();
    for &(signal, handler) in handlers {
        if load.segments().contains(handler) {
            pins.push(PinningSignal::Handler { signal });
        } else if load.held_signal(signal) {
            let later = loads.iter().find(|other| other.load() != load.load() && other.segments().contains(handler));
            if let Some(later) = later {
                pins.push(PinningSignal::Chained { signal, generation: later.generation() });
            }
        }
    }
    pins
}

/// `SIGHUP`, ..., or `signal N` for the real-time ones.
fn signal_name(signal: i32) -> String {
    const NAMES: [(i32, &str); 30] = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGTRAP, "SIGTRAP"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGSTKFLT, "SIGSTKFLT"),
        (libc::SIGCHLD, "SIGCHLD"),
        (libc::SIGCONT, "SIGCONT"),
        (libc::SIGSTOP, "SIGSTOP"),
        (libc::SIGTSTP, "SIGTSTP"),
        (libc::SIGTTIN, "SIGTTIN"),
        (libc::SIGTTOU, "SIGTTOU"),
        (libc::SIGURG, "SIGURG"),
        (libc::SIGXCPU, "SIGXCPU"),
        (libc::SIGXFSZ, "SIGXFSZ"),
        (libc::SIGVTALRM, "SIGVTALRM"),
        (libc::SIGPROF, "SIGPROF"),
        (libc::SIGWINCH, "SIGWINCH"),
        (libc::SIGIO, "SIGIO"),
        (libc::SIGSYS, "SIGSYS"),
    ];
    NAMES.iter().find(|(n, _)| *n == signal).map_or_else(|| format!("signal {signal}"), |(_, name)| (*name).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_read_as_one_line() {
        let pins = Pins {
            threads: vec![PinningThread { tid: 1234, name: "my-thread".to_owned(), started_by_library: true }],
            signals: vec![PinningSignal::Handler { signal: libc::SIGHUP }],
            keys: 0,
        };
        assert_eq!(pins.to_string(), "1 thread still running (tid 1234 'my-thread'), SIGHUP handler in the library");
        let pins = Pins {
            threads: vec![
                PinningThread { tid: 5, name: "a".to_owned(), started_by_library: false },
                PinningThread { tid: 0, name: String::new(), started_by_library: true },
            ],
            signals: vec![PinningSignal::Chained { signal: 40, generation: 4 }],
            keys: 2,
        };
        assert_eq!(
            pins.to_string(),
            "2 threads still running (tid 5 'a', not started by pthread_create, one starting), \
             signal 40 handler of generation 4 may chain into it, \
             2 pthread keys with a destructor in the library (--unload-guard off)"
        );
        assert!(Pins::default().is_empty() && !pins.is_empty());
    }

    extern "C" fn on_usr2(_: c_int) {}
    use std::ffi::c_int;

    /// A registered load whose "library" is the one byte at `around`.
    fn fake_load(generation: u64, around: usize) -> std::sync::Arc<Guarded> {
        let segments = Segments::from_ranges(&[(around, around + 1)]);
        let load = unload_guard::register(generation, segments, threads::live_tids());
        unload_guard::get(load).expect("registered")
    }

    #[test]
    fn a_handler_in_the_library_pins_it_and_a_later_one_pins_it_too() {
        let handler = on_usr2 as extern "C" fn(c_int) as usize;
        let earlier = fake_load(901, handler);
        // SAFETY: installing a handler that does nothing, for a signal no
        // other test uses; the previous action is restored below.
        let previous = unsafe { libc::signal(libc::SIGUSR2, handler) };
        assert!(handlers().contains(&(libc::SIGUSR2, handler)));
        note_signal_handlers();
        assert!(earlier.held_signal(libc::SIGUSR2));
        let pins = signal_pins(&earlier, &unload_guard::loads(), &handlers());
        assert_eq!(pins, vec![PinningSignal::Handler { signal: libc::SIGUSR2 }]);

        // A later library took over the signal (as if chaining): the earlier
        // one stays pinned through it; the later one is pinned directly.
        let current = [(libc::SIGUSR2, 0x10)];
        let later = fake_load(902, 0x10);
        let loads = unload_guard::loads();
        assert_eq!(
            signal_pins(&earlier, &loads, &current),
            vec![PinningSignal::Chained { signal: libc::SIGUSR2, generation: 902 }]
        );
        assert_eq!(signal_pins(&later, &loads, &current), vec![PinningSignal::Handler { signal: libc::SIGUSR2 }]);
        // A handler outside every library pins neither.
        assert!(signal_pins(&earlier, &loads, &[(libc::SIGUSR2, 0x20)]).is_empty());

        // SAFETY: restoring the previous action.
        unsafe { libc::signal(libc::SIGUSR2, previous) };
        unload_guard::unregister(earlier.load());
        unload_guard::unregister(later.load());
    }

    #[test]
    fn threads_are_blamed_on_the_library_that_started_them() {
        let app = Segments::from_ranges(&[(0x1000, 0x2000)]);
        let (in_app, in_host) = (0x1800, 0x9000);
        let records = vec![
            threads::Record::new(11, in_app),  // the app's, running
            threads::Record::new(12, in_app),  // the app's, gone
            threads::Record::new(0, in_app),   // the app's, starting
            threads::Record::new(13, in_host), // the host's
            threads::Record::new(17, in_app),  // the app's, started after the task list was read
            threads::Record::new(18, in_app),  // the app's, exiting
        ];
        // 14 was there before the library was opened; 15 appeared later and
        // nobody recorded it; 16 is an io_uring worker; 19 has exited since
        // the task list was read (and its record was pruned).
        let live = [1, 11, 13, 14, 15, 16, 19];
        let host = || Host {
            may_run: |tid: i32| (live.contains(&tid) && tid != 19) || tid == 17,
            name_of: |tid: i32| if tid == 16 { "iou-wrk-1".to_owned() } else { format!("t{tid}") },
        };
        let tids = |check: ThreadCheck| check.threads.iter().map(|p| p.tid).collect::<Vec<_>>();
        let check = classify(&app, Some(&[1, 14]), &records, Some(&live), host());
        let seen: Vec<(i32, &str, bool)> =
            check.threads.iter().map(|p| (p.tid, p.name.as_str(), p.started_by_library)).collect();
        assert_eq!(seen, vec![(11, "t11", true), (0, "", true), (17, "t17", true), (15, "t15", false)]);
        assert!(!check.unsettled, "no other thread is starting: 15 is nobody's");
        // Another library's check blames none of the app's threads, but
        // while the app's thread is starting, 15 could be that one.
        let other = Segments::from_ranges(&[(0x5000, 0x6000)]);
        let check = classify(&other, Some(&[1, 14]), &records, Some(&live), host());
        assert!(check.unsettled);
        assert_eq!(tids(check), vec![15]);
        // Without a task list (or the one from before the library was
        // opened), threads nobody recorded cannot be told apart.
        assert_eq!(tids(classify(&app, None, &records, Some(&live), host())), vec![11, 0, 17]);
        assert_eq!(tids(classify(&app, Some(&[1, 14]), &records, None, host())), vec![11, 0, 17]);
    }

    #[test]
    fn a_thread_started_in_the_library_pins_it_until_it_ends() {
        // The "library" here is the start routine of every std thread in
        // this test binary, so only this test's thread is looked for.
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("pin-probe".to_owned())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = stopped.recv();
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        let start = threads::recorded().iter().find(|r| r.tid == tid).expect("recorded").start;
        let load = fake_load(903, start);
        let pins = thread_pins(&load).threads;
        assert!(pins.iter().any(|p| p.tid == tid && p.name == "pin-probe" && p.started_by_library), "{pins:?}");
        stop.send(()).unwrap();
        thread.join().unwrap();
        // Joined: it has begun to exit, so it runs no user code any more.
        assert!(!thread_pins(&load).threads.iter().any(|p| p.tid == tid));
        unload_guard::unregister(load.load());
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGHUP), "SIGHUP");
        assert_eq!(signal_name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(signal_name(50), "signal 50");
    }
}
