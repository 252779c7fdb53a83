//! The criterion micro-benchmark of the request path
//! (host/benches/request_path.rs), run through cargo, its output parsed.

use std::path::Path;
use std::process::Stdio;

use anyhow::{bail, Context as _, Result};

use super::procs;

/// The environment variable that tells the bench which app library to load.
pub const APP_ENV: &str = "POUNCE_BENCH_APP";

/// How to run the bench.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Off,
    /// `cargo test --bench`: every benchmark runs once, nothing is timed
    /// (debug build; for the smoke test).
    #[cfg_attr(not(test), allow(dead_code))]
    Check,
    /// `cargo bench` with these warm-up and measurement times (seconds).
    Measure {
        warm_up: f64,
        measurement: f64,
    },
}

/// One benchmark: its id and, when measured, criterion's point estimate.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    pub name: String,
    pub ns: Option<f64>,
}

/// Runs the bench against the app library `app`.
pub fn run(mode: Mode, app: &Path) -> Result<Vec<Estimate>> {
    let mut command = procs::cargo();
    match mode {
        Mode::Off => return Ok(Vec::new()),
        // `--workspace` resolves features as `cargo test --workspace` does,
        // so inside the project's test run nothing is rebuilt but the bench.
        Mode::Check => command.args(["test", "--quiet", "--workspace", "--bench", "request_path"]),
        Mode::Measure { warm_up, measurement } => command.args([
            "bench",
            "--quiet",
            "-p",
            "pounce-host",
            "--bench",
            "request_path",
            "--",
            "--warm-up-time",
            &warm_up.to_string(),
            "--measurement-time",
            &measurement.to_string(),
            "--noplot",
        ]),
    };
    command.env(APP_ENV, app).stdin(Stdio::null());
    eprintln!("running {command:?}");
    let output = command.output().context("cannot run cargo")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "the request_path bench failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let estimates = match mode {
        Mode::Measure { .. } => parse_measured(&stdout),
        _ => parse_checked(&stdout),
    };
    if estimates.is_empty() {
        bail!("the request_path bench reported no benchmark:\n{stdout}");
    }
    Ok(estimates)
}

/// Criterion's `time:   [low estimate high]` lines; the id is on the same
/// line before `time:`, or alone on the line before.
pub fn parse_measured(text: &str) -> Vec<Estimate> {
    let mut estimates = Vec::new();
    let mut previous = "";
    for line in text.lines() {
        if let Some(at) = line.find("time:") {
            let name = match line[..at].trim() {
                "" => previous.trim(),
                name => name,
            };
            let values = line[at + "time:".len()..].trim().trim_start_matches('[').trim_end_matches(']');
            let words: Vec<&str> = values.split_whitespace().collect();
            if let [_, _, estimate, unit, ..] = words.as_slice() {
                if let (Ok(value), Some(scale)) = (estimate.parse::<f64>(), unit_ns(unit)) {
                    estimates.push(Estimate { name: name.to_owned(), ns: Some(value * scale) });
                }
            }
        }
        if !line.trim().is_empty() && !line.starts_with(' ') {
            previous = line;
        }
    }
    estimates
}

fn unit_ns(unit: &str) -> Option<f64> {
    Some(match unit {
        "ps" => 1e-3,
        "ns" => 1.0,
        "µs" | "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => return None,
    })
}

/// Test mode: `Testing NAME` then `Success`.
pub fn parse_checked(text: &str) -> Vec<Estimate> {
    let mut estimates = Vec::new();
    let mut testing = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("Testing ") {
            testing = Some(name.trim().to_owned());
        } else if line == "Success" {
            if let Some(name) = testing.take() {
                estimates.push(Estimate { name, ns: None });
            }
        }
    }
    estimates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_measured_output() {
        let text = "\
Gnuplot not found, using plotters backend
request_path/lease      time:   [11.021 ns 11.093 ns 11.170 ns]
Found 3 outliers among 100 measurements (3.00%)
request_path/baseline_loopback
                        time:   [24.101 µs 24.562 µs 25.010 µs]
                        change: [-1.0% +0.5% +2.0%] (p = 0.50 > 0.05)
request_path/pounce_loopback
                        time:   [1.2001 ms 1.2100 ms 1.2200 ms]
";
        let estimates = parse_measured(text);
        assert_eq!(estimates.len(), 3);
        assert_eq!(estimates[0], Estimate { name: "request_path/lease".into(), ns: Some(11.093) });
        assert_eq!(estimates[1].name, "request_path/baseline_loopback");
        assert!((estimates[1].ns.unwrap() - 24_562.0).abs() < 1e-6);
        assert!((estimates[2].ns.unwrap() - 1_210_000.0).abs() < 1e-3);
    }

    #[test]
    fn parses_test_mode_output() {
        let text = "Testing request_path/lease\nSuccess\n\nTesting request_path/pounce_loopback\nSuccess\n";
        let names: Vec<String> = parse_checked(text).into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["request_path/lease", "request_path/pounce_loopback"]);
    }
}
