//! Who this process runs as, and whether another process is still alive:
//! the library trust check trusts files of root and of the server's own
//! user; the staging fallback removes directories of processes that are
//! gone.

/// The effective user id: the user whose files the server trusts besides
/// root's.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Whether a process with id `pid` exists (it may belong to another user).
/// A pid that does not fit the platform's type exists nowhere.
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be
    // signalled; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_exists_and_pid_zero_does_not_count() {
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(0));
        assert!(!process_exists(u32::MAX));
    }

    #[test]
    fn the_effective_uid_owns_what_this_process_creates() {
        use std::os::unix::fs::MetadataExt;
        let path = std::env::temp_dir().join(format!("pounce-identity-test-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let owner = std::fs::metadata(&path).unwrap().uid();
        let _ = std::fs::remove_file(&path);
        assert_eq!(owner, effective_uid());
    }
}
