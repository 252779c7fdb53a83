//! How a child process ended, in words, for logs and error messages.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// How a child (a worker, a preflight) ended: "exited with status 7", "was killed by
/// signal 11 (SIGSEGV)".
pub fn describe(status: ExitStatus) -> String {
    if let Some(signal) = status.signal() {
        let core = if status.core_dumped() { ", core dumped" } else { "" };
        return format!("was killed by signal {signal} ({}{core})", signal_name(signal));
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => "ended".to_owned(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGSYS => "SIGSYS",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_with_the_signal_or_the_status() {
        assert_eq!(describe(ExitStatus::from_raw(7 << 8)), "exited with status 7");
        assert_eq!(describe(ExitStatus::from_raw(libc::SIGSEGV)), "was killed by signal 11 (SIGSEGV)");
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGABRT | 0x80)),
            "was killed by signal 6 (SIGABRT, core dumped)"
        );
    }
}
