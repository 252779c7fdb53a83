//! Throughput with `wrk` (`wrk -t1 -c64 --latency`), and its output parsed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::procs::{find_program, CpuUse, Pinning, Proc};
use super::throughput::{self, LoadResult};

/// What to tell someone without wrk.
pub const INSTALL_HINT: &str = "wrk is not installed: install it with `apt-get install wrk` (Debian/Ubuntu)";

/// wrk's connections: enough to keep one server core busy.
pub const CONNECTIONS: usize = 64;

/// `wrk` at /usr/bin/wrk or on PATH.
pub fn find() -> Option<PathBuf> {
    let standard = Path::new("/usr/bin/wrk");
    if standard.exists() {
        return Some(standard.to_owned());
    }
    find_program("wrk")
}

/// One wrk run's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_sec: f64,
    /// Latency percentiles in microseconds: 50, 75, 90, 99.
    pub p50_us: f64,
    pub p75_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub socket_errors: SocketErrors,
    /// Responses outside 2xx/3xx.
    pub non_2xx: u64,
    /// CPU use during the run (filled in by the caller).
    pub cpu: CpuUse,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
}

impl SocketErrors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

impl WrkResult {
    /// Requests that failed: socket errors and non-2xx/3xx answers.
    pub fn failures(&self) -> u64 {
        self.socket_errors.total() + self.non_2xx
    }
}

/// How wrk's connections behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Keep-alive: many requests per connection.
    KeepAlive,
    /// `Connection: close`: a new TCP connection for every request.
    Close,
}

/// Starts wrk against `url` for `seconds` on the load CPU; the caller waits
/// for it with [`finish`].
pub fn start(wrk: &Path, pinning: &Pinning, url: &str, seconds: u64, mode: Mode) -> Result<Proc> {
    let mut command = pinning.command(pinning.load_cpu, wrk);
    command.args([
        "-t1",
        &format!("-c{CONNECTIONS}"),
        &format!("-d{}s", seconds.max(1)),
        "--latency",
        "--timeout",
        "5s",
    ]);
    if mode == Mode::Close {
        command.args(["-H", "Connection: close"]);
    }
    command.arg(url);
    Proc::spawn("wrk", command)
}

/// Waits (bounded) for a wrk started with [`start`] and parses its report.
pub fn finish(proc: Proc, seconds: u64) -> Result<WrkResult> {
    throughput::finish(proc, "wrk", seconds, parse)
}

/// Runs wrk to the end.
pub fn run(wrk: &Path, pinning: &Pinning, url: &str, seconds: u64, mode: Mode) -> Result<WrkResult> {
    finish(start(wrk, pinning, url, seconds, mode)?, seconds)
}

impl LoadResult for WrkResult {
    const LATENCY: [&'static str; 2] = ["p50", "p99"];

    fn requests_per_sec(&self) -> f64 {
        self.requests_per_sec
    }

    fn failures(&self) -> u64 {
        WrkResult::failures(self)
    }

    fn latency_us(&self) -> [f64; 2] {
        [self.p50_us, self.p99_us]
    }

    fn cpu(&self) -> CpuUse {
        self.cpu
    }

    fn set_cpu(&mut self, cpu: CpuUse) {
        self.cpu = cpu;
    }
}

/// Reads wrk's `--latency` report.
pub fn parse(text: &str) -> Result<WrkResult> {
    let mut result = WrkResult::default();
    let mut seen_rate = false;
    let mut seen_total = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => {
                result.requests_per_sec = rate.parse().context("Requests/sec")?;
                seen_rate = true;
            }
            [count, "requests", "in", seconds, ..] => {
                result.requests = count.parse().context("request count")?;
                result.seconds = duration_us(seconds.trim_end_matches(','))? / 1e6;
                seen_total = true;
            }
            ["50%", value] => result.p50_us = duration_us(value)?,
            ["75%", value] => result.p75_us = duration_us(value)?,
            ["90%", value] => result.p90_us = duration_us(value)?,
            ["99%", value] => result.p99_us = duration_us(value)?,
            ["Socket", "errors:", ..] => result.socket_errors = socket_errors(line)?,
            ["Non-2xx", "or", "3xx", "responses:", count] => result.non_2xx = count.parse().context("Non-2xx")?,
            _ => {}
        }
    }
    if !seen_rate || !seen_total {
        bail!("no `Requests/sec` or `N requests in` line");
    }
    Ok(result)
}

/// `812.00us`, `3.32ms`, `1.01s`, `2.00m` → microseconds (wrk's and
/// h2load's notation).
pub fn duration_us(text: &str) -> Result<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("duration {text:?}"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" | "" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("unknown unit in duration {text:?}"),
    };
    Ok(number * scale)
}

/// `Socket errors: connect 0, read 12, write 0, timeout 0`
fn socket_errors(line: &str) -> Result<SocketErrors> {
    let mut errors = SocketErrors::default();
    let fields = line.split_once(':').map(|(_, rest)| rest).unwrap_or_default();
    for field in fields.split(',') {
        let mut parts = field.split_whitespace();
        let (Some(name), Some(count)) = (parts.next(), parts.next()) else { continue };
        let count: u64 = count.parse().with_context(|| format!("socket errors {field:?}"))?;
        match name {
            "connect" => errors.connect = count,
            "read" => errors.read = count,
            "write" => errors.write = count,
            "timeout" => errors.timeout = count,
            _ => {}
        }
    }
    Ok(errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "Running 3s test @ http://127.0.0.1:45675/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   822.82us  485.02us   7.00ms   92.10%
    Req/Sec    67.68k    11.74k  120.90k    90.00%
  Latency Distribution
     50%  809.00us
     75%    0.89ms
     90%    0.96ms
     99%    3.32ms
  202251 requests in 3.01s, 25.07MB read
Requests/sec:  67274.38
Transfer/sec:      8.34MB
";

    #[test]
    fn parses_a_clean_report() {
        let result = parse(CLEAN).unwrap();
        assert_eq!(result.requests, 202_251);
        assert!((result.seconds - 3.01).abs() < 1e-9);
        assert!((result.requests_per_sec - 67274.38).abs() < 1e-9);
        assert!((result.p50_us - 809.0).abs() < 1e-9);
        assert!((result.p75_us - 890.0).abs() < 1e-9);
        assert!((result.p99_us - 3320.0).abs() < 1e-9);
        assert_eq!(result.failures(), 0);
    }

    #[test]
    fn parses_errors_and_non_2xx() {
        let text = CLEAN.replace(
            "Requests/sec:",
            "  Socket errors: connect 1, read 12, write 3, timeout 4\n  Non-2xx or 3xx responses: 5\nRequests/sec:",
        );
        let result = parse(&text).unwrap();
        assert_eq!(result.socket_errors, SocketErrors { connect: 1, read: 12, write: 3, timeout: 4 });
        assert_eq!(result.non_2xx, 5);
        assert_eq!(result.failures(), 25);
    }

    #[test]
    fn rejects_output_that_is_not_a_report() {
        assert!(parse("unable to connect to 127.0.0.1:1 Connection refused").is_err());
    }

    #[test]
    fn reads_every_duration_unit() {
        assert_eq!(duration_us("10.5us").unwrap(), 10.5);
        assert_eq!(duration_us("2ms").unwrap(), 2000.0);
        assert_eq!(duration_us("1.5s").unwrap(), 1.5e6);
        assert_eq!(duration_us("1.00m").unwrap(), 60e6);
        assert!(duration_us("3parsecs").is_err());
    }
}
