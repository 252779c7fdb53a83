//! Memory across reloads: RSS (`VmRSS` in /proc/PID/status) and how many
//! copies of the app library are mapped (distinct paths in /proc/PID/maps
//! of pounce-host's copies: in-memory files `/memfd:pounce-host-*`, or files
//! in a staging directory `.../pounce-host-<pid>-*/`).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::procs::{self, Server};
use super::reload::{reload_and_wait, RELOAD_TIMEOUT};

/// Log text that every unload outcome line carries.
const UNLOAD_FIELD: &str = "unload_ms=";
/// Unload outcomes that leave a library mapped.
const KEPT_MAPPED: [&str; 3] = ["kept its library mapped", "its library stays loaded", "stays mapped:"];

/// The figures after some number of reloads.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPoint {
    pub reloads: usize,
    pub rss_kib: u64,
    /// The anonymous (heap, stacks) and file-backed parts of the RSS.
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    /// Distinct app library copies mapped.
    pub mapped_copies: usize,
    /// Open file descriptors (/proc/PID/fd).
    pub open_fds: usize,
    /// Generations whose unload finished by then (any outcome).
    pub unloaded: usize,
    /// Unloads that left the library mapped (logged as warnings).
    pub kept_mapped: usize,
}

#[derive(Clone, Debug)]
pub struct MemoryResult {
    pub points: Vec<MemoryPoint>,
    /// `reload_ms` of every reload.
    pub reload_ms: Vec<f64>,
}

/// `VmRSS`, `RssAnon` and `RssFile` of `pid`, in KiB.
pub fn rss_kib(pid: i32) -> Result<[u64; 3]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("cannot read /proc/PID/status")?;
    let field = |name| status_field(&status, name).with_context(|| format!("no {name} in /proc/PID/status"));
    Ok([field("VmRSS")?, field("RssAnon")?, field("RssFile")?])
}

/// A `Name:   123 kB` field of /proc/PID/status.
fn status_field(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A server's memory: its own process first, then the ones it started
/// (process mode's workers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Footprint {
    pub processes: Vec<ProcessMemory>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessMemory {
    pub pid: i32,
    pub rss_kib: u64,
    /// Proportional set size: shared pages (the supervisor's and a worker's
    /// copy of the same executable) divided among the sharers, so the PSS
    /// of a process tree adds up where RSS counts shared pages twice.
    pub pss_kib: u64,
}

impl Footprint {
    /// The footprint of `root` and its descendants now (one that ends
    /// while being read is left out).
    pub fn of(root: i32) -> Result<Footprint> {
        let descendants = procs::descendants(root).into_iter().filter_map(|pid| ProcessMemory::of(pid).ok());
        Ok(Footprint { processes: std::iter::once(ProcessMemory::of(root)?).chain(descendants).collect() })
    }

    pub fn rss_kib(&self) -> u64 {
        self.processes.iter().map(|p| p.rss_kib).sum()
    }

    pub fn pss_kib(&self) -> u64 {
        self.processes.iter().map(|p| p.pss_kib).sum()
    }
}

impl ProcessMemory {
    fn of(pid: i32) -> Result<ProcessMemory> {
        Ok(ProcessMemory { pid, rss_kib: rss_kib(pid)?[0], pss_kib: pss_kib(pid)? })
    }
}

/// `Pss` of `pid` (/proc/PID/smaps_rollup), in KiB.
pub fn pss_kib(pid: i32) -> Result<u64> {
    let rollup =
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).context("cannot read /proc/PID/smaps_rollup")?;
    status_field(&rollup, "Pss").context("no Pss in /proc/PID/smaps_rollup")
}

/// How many distinct app library copies `pid` has mapped.
pub fn mapped_copies(pid: i32) -> Result<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).context("cannot read /proc/PID/maps")?;
    Ok(parse_mapped_copies(&maps))
}

fn parse_mapped_copies(maps: &str) -> usize {
    maps.lines()
        // The path is everything after the fifth field; it may contain
        // spaces (" (deleted)").
        .filter_map(|line| line.splitn(6, char::is_whitespace).nth(5).map(str::trim))
        .filter(|path| path.starts_with("/memfd:pounce-host-") || path.contains("/pounce-host-"))
        .collect::<BTreeSet<_>>()
        .len()
}

/// How many file descriptors `pid` has open.
pub fn open_fds(pid: i32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd")).context("cannot read /proc/PID/fd")?.count())
}

/// Reloads one at a time (each waits for its `generation N published`,
/// bounded), and records the figures at start and after each checkpoint's
/// number of reloads, once the retired generations are unloaded (or 10 s
/// have passed).
pub fn run(server: &Server, checkpoints: &[usize]) -> Result<MemoryResult> {
    let pid = server.pid();
    let log = &server.proc.stderr;
    let mut points = Vec::new();
    let mut reload_ms = Vec::new();
    let mut done = 0;
    let point = |reloads: usize| -> Result<MemoryPoint> {
        // Each reload retires one generation; wait for all their unloads.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.count(UNLOAD_FIELD) < reloads && std::time::Instant::now() < deadline {
            procs::sleep(Duration::from_millis(20))?;
        }
        let [rss_kib, rss_anon_kib, rss_file_kib] = rss_kib(pid)?;
        Ok(MemoryPoint {
            reloads,
            rss_kib,
            rss_anon_kib,
            rss_file_kib,
            mapped_copies: mapped_copies(pid)?,
            open_fds: open_fds(pid)?,
            unloaded: log.count(UNLOAD_FIELD),
            kept_mapped: KEPT_MAPPED.iter().map(|needle| log.count(needle)).sum(),
        })
    };
    points.push(point(0)?);
    for &checkpoint in checkpoints {
        if checkpoint < done {
            bail!("memory checkpoints must increase: {checkpoints:?}");
        }
        while done < checkpoint {
            // Generation 1 serves at start; reload k publishes k + 1.
            reload_ms.push(reload_and_wait(server, done as u64 + 2, RELOAD_TIMEOUT)?);
            done += 1;
        }
        points.push(point(done)?);
    }
    Ok(MemoryResult { points, reload_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tpounce-host\nVmPeak:\t  100 kB\nVmRSS:\t   12345 kB\nRssAnon:\t  1000 kB\nThreads:\t4\n";
        assert_eq!(status_field(status, "VmRSS"), Some(12345));
        assert_eq!(status_field(status, "RssAnon"), Some(1000));
        assert_eq!(status_field(status, "VmRS"), None);
        assert_eq!(status_field(status, "RssFile"), None);
    }

    #[test]
    fn counts_distinct_app_copies() {
        let maps = "\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 123 /work/target/release/pounce-host
7f0000000000-7f0000100000 r--p 00000000 08:01 456 /tmp/pounce-host-42-0badcafe/g1-0-libsample_app.so (deleted)
7f0000100000-7f0000200000 r-xp 00100000 08:01 456 /tmp/pounce-host-42-0badcafe/g1-0-libsample_app.so (deleted)
7f0000200000-7f0000300000 r--p 00000000 08:01 789 /tmp/pounce-host-42-0badcafe/g2-1-libsample_app.so (deleted)
7f0000300000-7f0000400000 rw-p 00000000 00:00 0
7f0000400000-7f0000500000 r--p 00000000 08:01 999 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000500000-7f0000600000 r--p 00000000 00:01 1024 /memfd:pounce-host-g3-2-libsample_app.so (deleted)
7f0000600000-7f0000700000 r-xp 00100000 00:01 1024 /memfd:pounce-host-g3-2-libsample_app.so (deleted)
7f0000700000-7f0000800000 r--p 00000000 00:01 1025 /memfd:other-program (deleted)
";
        assert_eq!(parse_mapped_copies(maps), 3);
        assert_eq!(mapped_copies(std::process::id() as i32).unwrap(), 0);
        assert!(rss_kib(std::process::id() as i32).unwrap()[0] > 0);
        let footprint = Footprint::of(std::process::id() as i32).unwrap();
        assert!(footprint.rss_kib() >= footprint.pss_kib() && footprint.pss_kib() > 0, "{footprint:?}");
        assert!(open_fds(std::process::id() as i32).unwrap() >= 3);
    }
}
