//! Thread priority for background work (loading and unloading libraries),
//! so a reload under load takes CPU from requests as little as possible.
//!
//! Two knobs, both per thread (Linux):
//! - the nice value: the share of a busy core the thread gets against the
//!   serving threads (nice 0). Too low a share makes a reload under full
//!   load wait: a nice-19 thread gets about 1.5% of a core kept busy by
//!   the server, so 1 ms of work takes about 70 ms.
//! - the scheduler slice (Linux 6.12 and later, `sched_setattr` with a
//!   `sched_runtime` for a normal thread). The kernel checks a slice only
//!   at its tick, so a short one does not cut runs shorter than that; it
//!   gives the thread an early deadline, so it is picked soon after it
//!   wakes and its little work is done sooner. Measured with `perf sched`
//!   during a reload storm: against the default slice, half the serving
//!   thread's average scheduling delay and half the reload time. Older
//!   kernels ignore it.

/// The nice value of background threads: about a quarter of a core that
/// the server keeps busy (weight 335 against 1024), so the little work a
/// reload does finishes within a few milliseconds under full load while
/// requests still come first.
const BACKGROUND_NICE: i32 = 5;

/// The slice asked for background threads: the shortest the kernel allows.
const BACKGROUND_SLICE_NS: u64 = 100_000;

/// `struct sched_attr` (`<linux/sched/types.h>`), its first version.
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Lowers the calling thread's priority for the rest of its life (nice
/// value and slice, see the module docs). Raising it back needs privileges,
/// so call this only on threads that do nothing else (on Linux both are per
/// thread, and new threads and processes inherit them).
pub fn lower_this_thread() {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice: BACKGROUND_NICE,
        priority: 0,
        runtime: BACKGROUND_SLICE_NS,
        deadline: 0,
        period: 0,
    };
    // SAFETY: sched_setattr(0, ...) reads `attr`, valid for the call, and
    // changes only the calling thread's scheduling attributes; a failure
    // (a kernel without it, a seccomp filter) leaves them as they were.
    let set = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if set != 0 {
        // SAFETY: gettid and setpriority only read and change the calling
        // thread's scheduling attributes; a failure leaves them as they were.
        unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_only_the_calling_thread() {
        let nice = || {
            // SAFETY: getpriority of the calling thread only reads.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        };
        let before = nice();
        let lowered = std::thread::spawn(move || {
            lower_this_thread();
            nice()
        })
        .join()
        .unwrap();
        assert!(lowered >= BACKGROUND_NICE, "{lowered}");
        assert_eq!(nice(), before);
    }
}
