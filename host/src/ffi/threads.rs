//! Which code started each thread of the process, so an unload can tell
//! whether an app library left a thread running.
//!
//! # Why not compare the task list with the host's threads
//! A thread that appears while a generation is loaded is not necessarily
//! that generation's: generations overlap (N+1's runtime threads start
//! while N drains), so a time window cannot attribute a thread. Thread
//! names do not help either: a thread started without a name inherits its
//! creator's, so a thread an app starts during `init` is also called
//! `pounce-init-gN`. What identifies a thread's code is the routine it was
//! started with.
//!
//! # How
//! The `pounce-host` executable defines and exports `pthread_create` (see
//! `host/build.rs`), so every thread started through it, by the host's std
//! or tokio as well as by any app library (its std's `thread::spawn`, C
//! code), comes through [`pthread_create`] below. It records the thread's
//! start routine, forwards to glibc with a host trampoline as the routine,
//! and the trampoline records the thread's id (`gettid`) before it calls the
//! real routine. A library still has a thread running when a thread that
//! was started with a routine inside it still exists.
//!
//! A record is kept until the kernel no longer knows its thread (not merely
//! until its routine returns: glibc runs thread-specific destructors after
//! that). Threads not started through `pthread_create` (raw `clone`,
//! glibc's own helper threads such as `SIGEV_THREAD` timers') have no
//! record; the unload check finds those in `/proc/self/task` and counts
//! them against every library opened before they appeared (see `pins`).

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

type StartRoutine = unsafe extern "C" fn(*mut c_void) -> *mut c_void;
/// The trampoline may see a forced unwind (`pthread_exit`,
/// `pthread_cancel`) pass through, hence `C-unwind`.
type Trampoline = unsafe extern "C-unwind" fn(*mut c_void) -> *mut c_void;
type Create =
    unsafe extern "C" fn(*mut libc::pthread_t, *const libc::pthread_attr_t, Option<Trampoline>, *mut c_void) -> c_int;

static REAL_CREATE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static THREADS: Mutex<Vec<Record>> = Mutex::new(Vec::new());
static NEXT_RECORD: AtomicU64 = AtomicU64::new(1);

/// When the list reaches this many records, the next thread start prunes
/// the dead ones first; then the mark moves to twice what is left (at least
/// [`MIN_PRUNE_AT`]), so the list stays within twice the live thread count
/// and a process with many threads does not check them all every time.
static PRUNE_AT: AtomicUsize = AtomicUsize::new(MIN_PRUNE_AT);
const MIN_PRUNE_AT: usize = 64;

/// One thread started through [`pthread_create`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Record {
    id: u64,
    /// Its kernel thread id; 0 until the thread has started.
    pub(super) tid: i32,
    /// The address of the routine it was started with.
    pub(super) start: usize,
}

impl Record {
    #[cfg(test)]
    pub(super) fn new(tid: i32, start: usize) -> Record {
        Record { id: NEXT_RECORD.fetch_add(1, Ordering::Relaxed), tid, start }
    }
}

fn records() -> MutexGuard<'static, Vec<Record>> {
    // Every change is one push, one field write or one `retain`.
    THREADS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The recorded threads: running, starting (tid 0), or gone but not pruned.
pub(super) fn recorded() -> Vec<Record> {
    records().clone()
}

/// Forgets the records of threads that are gone. Records of threads still
/// starting are kept. (Asked of the kernel per record, not compared with a
/// task list read earlier: a thread that started since would look gone.)
pub(super) fn prune() {
    prune_list(&mut records());
}

fn prune_list(list: &mut Vec<Record>) {
    list.retain(|r| r.tid == 0 || exists(r.tid));
}

/// The ids of the process's threads that may still run user code, from
/// `/proc/self/task`, or `None` if it cannot be read.
pub(super) fn live_tids() -> Option<Vec<i32>> {
    let entries = std::fs::read_dir(TASKS).ok()?;
    let tids = entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok());
    Some(tids.filter(|&tid| may_run(tid)).collect())
}

const TASKS: &str = "/proc/self/task";

/// The kernel's flag for a task inside `exit()` (`PF_EXITING`): set before
/// it wakes a `pthread_join`, after glibc ran the thread's key destructors;
/// such a thread never runs user code again.
const PF_EXITING: u64 = 0x4;

/// Whether thread `tid` of this process may still run user code: it exists
/// and has not begun to exit. When that cannot be told (`/proc` unreadable,
/// out of file descriptors), it may: that can only keep a library mapped.
pub(super) fn may_run(tid: i32) -> bool {
    let stat = match std::fs::read_to_string(format!("{TASKS}/{tid}/stat")) {
        Ok(stat) => stat,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::path::Path::new(TASKS).is_dir() => return false,
        Err(_) => return exists(tid),
    };
    // `pid (comm) state ppid pgrp session tty_nr tpgid flags ...`: the
    // fields after the last `)` (comm may hold one).
    let mut fields = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace()).into_iter().flatten();
    let state = fields.next().and_then(|s| s.chars().next());
    let flags = fields.nth(5).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    !matches!(state, Some('Z' | 'X' | 'x')) && flags & PF_EXITING == 0
}

/// Whether thread `tid` of this process exists (including one that is
/// exiting), asked of the kernel directly (`tgkill` with no signal).
pub(super) fn exists(tid: i32) -> bool {
    // SAFETY: tgkill with signal 0 sends nothing; it only checks that the
    // thread exists in this process.
    let found = unsafe {
        libc::syscall(libc::SYS_tgkill, libc::c_long::from(libc::getpid()), libc::c_long::from(tid), 0 as libc::c_long)
    };
    found == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The name of thread `tid` (`/proc/self/task/TID/comm`), or `?`.
pub(super) fn name_of(tid: i32) -> String {
    std::fs::read_to_string(format!("{TASKS}/{tid}/comm"))
        .map(|name| name.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

fn real_create() -> Option<Create> {
    let mut real = REAL_CREATE.load(Ordering::Acquire);
    if real.is_null() {
        // SAFETY: dlsym with RTLD_NEXT only reads the loader's tables.
        real = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_create".as_ptr()) };
        REAL_CREATE.store(real, Ordering::Release);
    }
    // SAFETY: a non-null result is glibc's `pthread_create`, whose C
    // signature `Create` spells (a start routine is a plain code pointer for
    // either ABI string).
    (!real.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, Create>(real) })
}

/// What the trampoline needs: the caller's routine and argument.
struct Start {
    record: u64,
    routine: StartRoutine,
    arg: *mut c_void,
}

/// The interposer: records the thread, then starts it through glibc with
/// [`trampoline`] as its routine. It must not panic (it is `extern "C"`).
///
/// # Safety
/// The contract of POSIX `pthread_create`.
#[no_mangle]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    routine: Option<StartRoutine>,
    arg: *mut c_void,
) -> c_int {
    let (Some(real), Some(routine)) = (real_create(), routine) else { return libc::EINVAL };
    let id = NEXT_RECORD.fetch_add(1, Ordering::Relaxed);
    {
        let mut list = records();
        if list.len() >= PRUNE_AT.load(Ordering::Relaxed) {
            prune_list(&mut list);
            PRUNE_AT.store((list.len() * 2).max(MIN_PRUNE_AT), Ordering::Relaxed);
        }
        list.push(Record { id, tid: 0, start: routine as usize });
    }
    let start = Box::into_raw(Box::new(Start { record: id, routine, arg }));
    // SAFETY: the caller's `thread` and `attr` are forwarded unchanged; the
    // trampoline takes `start` back exactly once, and only if the thread was
    // created.
    let code = unsafe { real(thread, attr, Some(trampoline), start.cast()) };
    if code != 0 {
        // SAFETY: no thread was created, so nothing else owns `start`.
        drop(unsafe { Box::from_raw(start) });
        records().retain(|r| r.id != id);
    }
    code
}

/// The first host frame of every thread started through [`pthread_create`]:
/// records the thread id, then runs the caller's routine. It holds nothing
/// that needs dropping while the routine runs, so a forced unwind through
/// it skips nothing.
///
/// # Safety
/// Called once per thread by glibc with the `Start` box made above.
unsafe extern "C-unwind" fn trampoline(start: *mut c_void) -> *mut c_void {
    // SAFETY: `start` is the box `pthread_create` made for this thread.
    let Start { record, routine, arg } = *unsafe { Box::from_raw(start.cast::<Start>()) };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    {
        let mut list = records();
        // A record still holding this id is of a thread that is gone (ids of
        // live threads are unique): its routine must not be blamed for us.
        list.retain(|r| r.tid != tid);
        if let Some(entry) = list.iter_mut().find(|r| r.id == record) {
            entry.tid = tid;
        }
    }
    // SAFETY: the routine and argument the caller gave `pthread_create`.
    unsafe { routine(arg) }
}

/// Keeps the linker from dropping the interposer from the executable (apps
/// only reach it through the dynamic symbol table).
pub(super) fn keep_interposer() {
    std::hint::black_box(pthread_create as unsafe extern "C" fn(_, _, _, _) -> _);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_recorded_with_their_routine_and_id() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = stopped.recv();
        });
        let tid = rx.recv().unwrap();
        let record = recorded().into_iter().find(|r| r.tid == tid).expect("the std thread went through the interposer");
        assert_ne!(record.start, 0);
        assert!(live_tids().unwrap().contains(&tid));
        assert!(exists(tid) && may_run(tid));
        stop.send(()).unwrap();
        handle.join().unwrap();
        // Joined: it has begun to exit, and may linger a moment in the task list.
        assert!(!may_run(tid), "a joined thread runs no user code");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while exists(tid) && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        prune();
        assert!(!recorded().iter().any(|r| r.tid == tid), "a gone thread is pruned");
    }

    #[test]
    fn the_running_thread_is_listed_with_its_name() {
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        assert!(live_tids().unwrap().contains(&me));
        assert!(exists(me) && !exists(i32::MAX));
        assert!(may_run(me) && !may_run(i32::MAX));
        assert!(!name_of(me).is_empty());
        assert_eq!(name_of(-1), "?");
    }
}
