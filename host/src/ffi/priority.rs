//! Thread priority for background work (loading and unloading libraries),
//! so a reload under load takes CPU from requests as little as possible.

/// The nice value of background threads: they still progress under full
/// load (about a tenth of a busy core), but requests come first.
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority for the rest of its life. Raising
/// it back needs privileges, so call this only on threads that do nothing
/// else (on Linux the nice value is per thread, and new threads inherit it).
pub fn lower_this_thread() {
    // SAFETY: gettid and setpriority only read and change the calling
    // thread's scheduling attributes; a failure leaves them as they were.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE);
    }
}
