//! HTTP/2 throughput with `h2load` (Debian package nghttp2-client): h2c
//! with prior knowledge (what h2load speaks to an `http://` URL), a few
//! connections with several concurrent streams each, for a duration; and
//! its output parsed. Installed with apt-get when it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::procs::{find_program, CpuUse, Pinning, Proc};
use super::throughput::{self, LoadResult};
use super::wrk::duration_us;

/// The Debian package that has h2load.
pub const PACKAGE: &str = "nghttp2-client";

/// Connections, and concurrent streams on each: 128 requests in flight,
/// enough to keep one server core busy (wrk keeps 64).
pub const CLIENTS: usize = 16;
pub const STREAMS: usize = 8;

/// How long one apt-get command may take.
const APT_TIMEOUT: Duration = Duration::from_secs(300);

/// `h2load` at /usr/bin/h2load or on PATH.
pub fn find() -> Option<PathBuf> {
    let standard = Path::new("/usr/bin/h2load");
    if standard.exists() {
        return Some(standard.to_owned());
    }
    find_program("h2load")
}

/// h2load, installed first (`apt-get install -y nghttp2-client`, after an
/// `apt-get update` if that fails) when it is missing and `install` says
/// so. The error says why there is none.
pub fn find_or_install(install: bool) -> Result<PathBuf> {
    if let Some(path) = find() {
        return Ok(path);
    }
    if !install {
        bail!("h2load is not installed (`apt-get install {PACKAGE}`)");
    }
    super::step(&format!("h2load is missing: apt-get install -y {PACKAGE}"));
    let install = || apt_get(&["install", "-y", "-q", "--no-install-recommends", PACKAGE]);
    install()
        .or_else(|_| apt_get(&["update", "-q"]).and_then(|()| install()))
        .with_context(|| format!("h2load is not installed and `apt-get install {PACKAGE}` failed"))?;
    find().with_context(|| format!("no h2load after `apt-get install {PACKAGE}`"))
}

/// Runs `apt-get ARGS` (bounded); the error has the end of its output.
fn apt_get(args: &[&str]) -> Result<()> {
    let apt = find_program("apt-get").context("apt-get not found")?;
    let mut command = Command::new(apt);
    command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    let mut proc = Proc::spawn("apt-get", command)?;
    let status = proc.wait(APT_TIMEOUT)?;
    if !status.success() {
        let tail = proc.stderr.since(proc.stderr.len().saturating_sub(5)).join("\n");
        bail!("apt-get {} failed ({status}): {tail}", args.join(" "));
    }
    Ok(())
}

/// One h2load run's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct H2Result {
    /// Requests done in the measured duration.
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub succeeded: u64,
    /// Requests that did not succeed, non-2xx answers included.
    pub failed: u64,
    /// Of `failed`: network-level failures and streams reset (not answers).
    pub errored: u64,
    /// Of `failed`: timed out.
    pub timeout: u64,
    /// Time per request (mean and max), in microseconds.
    pub mean_us: f64,
    pub max_us: f64,
    /// CPU use during the run (filled in by the caller).
    pub cpu: CpuUse,
}

impl LoadResult for H2Result {
    const LATENCY: [&'static str; 2] = ["mean", "max"];

    fn requests_per_sec(&self) -> f64 {
        self.requests_per_sec
    }

    fn failures(&self) -> u64 {
        self.failed
    }

    fn latency_us(&self) -> [f64; 2] {
        [self.mean_us, self.max_us]
    }

    fn cpu(&self) -> CpuUse {
        self.cpu
    }

    fn set_cpu(&mut self, cpu: CpuUse) {
        self.cpu = cpu;
    }
}

/// The command line after `h2load`, for a run of `seconds`, as the report
/// shows it.
pub fn args(seconds: u64) -> Vec<String> {
    let args = [format!("-c{CLIENTS}"), format!("-m{STREAMS}"), "-t1".to_owned(), "-D".to_owned()];
    args.into_iter().chain([seconds.max(1).to_string()]).collect()
}

/// Runs h2load against `url` for `seconds` on the load CPU, to the end.
pub fn run(h2load: &Path, pinning: &Pinning, url: &str, seconds: u64) -> Result<H2Result> {
    let mut command = pinning.command(pinning.load_cpu, h2load);
    command.args(args(seconds)).arg(url);
    throughput::finish(Proc::spawn("h2load", command)?, "h2load", seconds, parse)
}

/// Reads h2load's report.
pub fn parse(text: &str) -> Result<H2Result> {
    let mut result = H2Result::default();
    let (mut seen_finished, mut seen_requests) = (false, false);
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let mut fields = rest.split(", ");
            let (Some(seconds), Some(rate)) = (fields.next(), fields.next()) else { bail!("line {line:?}") };
            result.seconds = duration_us(seconds)? / 1e6;
            let rate = rate.strip_suffix(" req/s").with_context(|| format!("no req/s in {line:?}"))?;
            result.requests_per_sec = rate.parse().with_context(|| format!("req/s in {line:?}"))?;
            seen_finished = true;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            requests(rest, &mut result).with_context(|| format!("line {line:?}"))?;
            seen_requests = true;
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // min, max, mean, sd, +/- sd
            let values: Vec<&str> = rest.split_whitespace().collect();
            let (Some(max), Some(mean)) = (values.get(1), values.get(2)) else { bail!("line {line:?}") };
            (result.max_us, result.mean_us) = (duration_us(max)?, duration_us(mean)?);
        }
    }
    if !seen_finished || !seen_requests {
        bail!("no `finished in` or `requests:` line");
    }
    Ok(result)
}

/// ` 10 total, 12 started, 10 done, 9 succeeded, 1 failed, 1 errored, 0 timeout`
fn requests(fields: &str, result: &mut H2Result) -> Result<()> {
    for field in fields.split(',') {
        let mut parts = field.split_whitespace();
        let (Some(count), Some(name)) = (parts.next(), parts.next()) else { continue };
        let count: u64 = count.parse().with_context(|| format!("count {field:?}"))?;
        match name {
            "done" => result.requests = count,
            "succeeded" => result.succeeded = count,
            "failed" => result.failed = count,
            "errored" => result.errored = count,
            "timeout" => result.timeout = count,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 95095.50 req/s, 3.27MB/s
requests: 190191 total, 190319 started, 190191 done, 190191 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 190191 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 6.54MB (6857124) total, 1.09MB (1141146) headers (space savings 95.00%), 2.47MB (2472483) data
                     min         max         mean         sd        +/- sd
time for request:      135us     15.32ms      1.30ms       426us    80.15%
time for connect:      197us      1.85ms      1.05ms       520us    56.25%
time to 1st byte:     1.00ms      2.06ms      1.57ms       334us    62.50%
req/s           :    5930.67     5954.86     5943.43        6.57    62.50%
";

    #[test]
    fn parses_a_clean_report() {
        let result = parse(CLEAN).unwrap();
        assert_eq!((result.requests, result.succeeded, result.failed), (190_191, 190_191, 0));
        assert!((result.seconds - 2.0).abs() < 1e-9);
        assert!((result.requests_per_sec - 95095.5).abs() < 1e-9);
        assert!((result.mean_us - 1300.0).abs() < 1e-9);
        assert!((result.max_us - 15320.0).abs() < 1e-9);
        assert_eq!(result.failures(), 0);
    }

    #[test]
    fn parses_failures() {
        let text = CLEAN
            .replace("190191 succeeded, 0 failed, 0 errored, 0 timeout", "9 succeeded, 7 failed, 3 errored, 1 timeout");
        let result = parse(&text).unwrap();
        assert_eq!((result.succeeded, result.failed, result.errored, result.timeout), (9, 7, 3, 1));
        assert_eq!(result.failures(), 7);
    }

    #[test]
    fn rejects_output_that_is_not_a_report() {
        assert!(parse("connect to 127.0.0.1:1 failed: Connection refused").is_err());
        assert!(parse("finished in 2.00s, many req/s, 3.27MB/s\nrequests: 1 total").is_err());
    }

    #[test]
    fn its_command_line_has_streams_and_a_duration() {
        assert_eq!(args(0).join(" "), "-c16 -m8 -t1 -D 1");
        assert_eq!(args(5).join(" "), "-c16 -m8 -t1 -D 5");
    }
}
