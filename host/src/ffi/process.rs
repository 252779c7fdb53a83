//! Process plumbing for process mode: starting a worker with descriptors at
//! fixed numbers, taking them over in the worker, anonymous in-memory files
//! for a generation's library bytes, and sending signals.
//!
//! Workers are started by executing the host's own binary again, never by
//! `fork()` alone: the supervisor is multi-threaded, and between `fork` and
//! `exec` only async-signal-safe calls are allowed. The `pre_exec` hook
//! below keeps to `dup2` and `prctl`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Starts `command` with each `(source, target)` descriptor duplicated to
/// `target` in the child (`dup2` clears close-on-exec on the copy, so only
/// these reach the new program). With `die_with_parent` the child gets
/// SIGKILL when the thread that started it exits (`PR_SET_PDEATHSIG`): call
/// this from a thread that lives as long as the supervisor. (A binary
/// upgrade's new process must outlive the old one: it does not.)
pub fn spawn_with_fds(command: &mut Command, fds: &[(RawFd, RawFd)], die_with_parent: bool) -> io::Result<Child> {
    const MAX: usize = 64;
    /// Above every target (targets are small numbers: 3 and up).
    const FLOOR: RawFd = 100;
    if fds.len() > MAX {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors for a worker"));
    }
    let mut table = [(-1, -1); MAX];
    table[..fds.len()].copy_from_slice(fds);
    let count = fds.len();
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it calls only fcntl, dup2 and
    // prctl, allocates nothing (the table is a copied array) and touches no
    // lock.
    unsafe {
        command.pre_exec(move || {
            // First move every source above the targets (close-on-exec), so
            // that a source whose number is another's target is not lost.
            let mut moved = [-1; MAX];
            for (slot, &(source, _)) in moved.iter_mut().zip(&table[..count]) {
                *slot = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, FLOOR);
                if *slot == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // dup2 clears close-on-exec on the target: these reach the program.
            for (&temporary, &(_, target)) in moved.iter().zip(&table[..count]) {
                if libc::dup2(temporary, target) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Takes over descriptor `fd`, inherited from the parent, if it is open;
/// marks it close-on-exec so it goes no further.
pub fn inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor's flags; -1 means closed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags == -1 {
        return None;
    }
    // SAFETY: as above, on an open descriptor; a failure changes nothing.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the parent passed `fd` to this process for this purpose, it is
    // open (checked above) and nothing else in the process owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An anonymous in-memory file (`memfd_create`), close-on-exec: it lives
/// only as long as a descriptor to it does and needs no writable or
/// executable filesystem.
pub fn memfd(name: &str) -> io::Result<File> {
    let name = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: `name` is a valid C string for the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Sends `signal` to process `pid`. A process that is already gone is not
/// an error.
pub fn kill(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) takes plain integers; a stale pid fails with ESRCH.
    unsafe { libc::kill(pid, signal) };
}

/// The parent's pid: a worker compares it with the supervisor's, to close
/// the race where the supervisor died before `PR_SET_PDEATHSIG` was set.
pub fn parent_pid() -> u32 {
    // SAFETY: getppid cannot fail.
    let pid = unsafe { libc::getppid() };
    u32::try_from(pid).unwrap_or(0)
}

/// A page of 64-bit atomic counters in shared memory (a memfd mapped
/// `MAP_SHARED`): one process writes, any number read, with no round trip.
/// Process mode's supervisor keeps the whole service's totals here, so any
/// worker's `/metrics` answers the same numbers.
pub struct SharedCounters {
    counters: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
    file: File,
}

// SAFETY: the mapping is only ever accessed through `AtomicU64`s, which are
// safe to share between threads; the pointer is owned (unmapped on drop).
unsafe impl Send for SharedCounters {}
// SAFETY: as above: `&SharedCounters` gives only atomic access.
unsafe impl Sync for SharedCounters {}

impl SharedCounters {
    /// A new page of `len` counters, all zero (close-on-exec; pass its
    /// descriptor to the processes that read it).
    pub fn create(name: &str, len: usize) -> io::Result<SharedCounters> {
        let file = memfd(name)?;
        file.set_len(Self::bytes(len)? as u64)?;
        Self::map(file, len)
    }

    /// Maps the page another process created, at descriptor `fd`.
    pub fn open(fd: OwnedFd, len: usize) -> io::Result<SharedCounters> {
        let file = File::from(fd);
        if file.metadata()?.len() < Self::bytes(len)? as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the shared counters are smaller than expected"));
        }
        Self::map(file, len)
    }

    fn bytes(len: usize) -> io::Result<usize> {
        len.checked_mul(8).filter(|&n| n > 0).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad length"))
    }

    fn map(file: File, len: usize) -> io::Result<SharedCounters> {
        use std::os::fd::AsRawFd;
        let bytes = Self::bytes(len)?;
        // SAFETY: a fresh shared mapping of `bytes` bytes of an open file at
        // least that long; the kernel picks the (page-aligned) address.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let counters = std::ptr::NonNull::new(address.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(SharedCounters { counters, len, file })
    }

    pub fn counters(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping holds `len` zero-initialised, page-aligned
        // u64s, valid until drop; AtomicU64 has the layout of u64, and every
        // access, here and in the other processes, is atomic.
        unsafe { std::slice::from_raw_parts(self.counters.as_ptr(), self.len) }
    }

    /// The descriptor to pass to a reader.
    pub fn raw_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }
}

impl std::fmt::Debug for SharedCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCounters").field("len", &self.len).finish()
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference from
        // `counters()` outlives `self`.
        unsafe { libc::munmap(self.counters.as_ptr().cast(), self.len * 8) };
    }
}
