//! Reloads: sending SIGHUP, reading pounce-host's `generation N published
//! ... reload_ms=...` log lines, and the reload storm under load.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::loadgen::{self, LatencyResult, Plan};
use super::procs::{self, CpuWatch, Pinning, Server};
use super::wrk::{self, Mode, WrkResult};

/// How long one reload may take before the benchmark gives up on it.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A `generation N published` line: N and its `reload_ms` field (text log
/// `reload_ms=12.3`, or JSON `"reload_ms":12.3`).
pub fn parse_published(line: &str) -> Option<(u64, f64)> {
    let at = line.find(" published")?;
    let generation = line[..at].rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    if !line[..at].trim_end_matches(|c: char| c.is_ascii_digit()).ends_with("generation ") {
        return None;
    }
    let field = &line[line.find("reload_ms")? + "reload_ms".len()..];
    let value = field.trim_start_matches(['"', '=', ':', ' ']);
    let end = value.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-')).unwrap_or(value.len());
    Some((generation, value[..end].parse().ok()?))
}

/// Sends SIGHUP and waits (bounded) for `generation {expected} published`;
/// returns its `reload_ms`.
pub fn reload_and_wait(server: &Server, expected: u64, timeout: Duration) -> Result<f64> {
    let from = server.proc.stderr.len();
    server.proc.signal(libc::SIGHUP)?;
    let found = server.proc.stderr.wait_for(from, timeout, |line| {
        parse_published(line).filter(|(generation, _)| *generation == expected).map(|(_, ms)| ms)
    });
    match found {
        Some((ms, _)) => Ok(ms),
        None => {
            procs::check_interrupted()?;
            let log = server.proc.stderr.since(from).join("\n");
            bail!("generation {expected} was not published within {timeout:?}; the log since the signal:\n{log}")
        }
    }
}

/// What the storm measured.
#[derive(Clone, Debug)]
pub struct StormResult {
    pub signals: usize,
    pub interval: Duration,
    pub published: usize,
    /// `reload_ms` of every published generation.
    pub reload_ms: Vec<f64>,
    pub load: StormLoad,
}

/// The load during the storm and in steady state, from wrk or, without wrk,
/// from the fixed-rate generator.
#[derive(Clone, Debug)]
pub enum StormLoad {
    /// `steady`: before and after the storm.
    Wrk {
        steady: [WrkResult; 2],
        storm: WrkResult,
    },
    FixedRate {
        steady: [LatencyResult; 2],
        storm: LatencyResult,
    },
}

pub struct StormPlan<'a> {
    pub wrk: Option<&'a Path>,
    pub pinning: &'a Pinning,
    pub seconds: u64,
    pub signals: usize,
    pub interval: Duration,
    /// The rate for the fixed-rate generator when wrk is absent.
    pub fallback_rate: f64,
    pub connections: usize,
}

/// Measures steady state for `seconds`, then the same load again while
/// `signals` SIGHUPs arrive every `interval` (not waiting for each reload:
/// signals that arrive during a reload collapse into one more), then steady
/// state again (so a disturbance of one steady run shows).
pub fn storm(server: &Server, plan: &StormPlan<'_>) -> Result<StormResult> {
    let load_plan = || Plan {
        addr: server.addr,
        path: "/".to_owned(),
        rate: plan.fallback_rate,
        duration: Duration::from_secs(plan.seconds),
        connections: plan.connections,
        cpu: plan.pinning.load_cpu,
    };
    enum Steady {
        Wrk(WrkResult),
        FixedRate(LatencyResult),
    }
    enum Started {
        Wrk(procs::Proc),
        FixedRate(loadgen::Running),
    }
    let steady_run = || -> Result<Steady> {
        let watch = CpuWatch::start(server.pid())?;
        Ok(match plan.wrk {
            Some(wrk) => {
                let mut result = wrk::run(wrk, plan.pinning, &server.url(), plan.seconds, Mode::KeepAlive)?;
                result.cpu = watch.finish()?;
                Steady::Wrk(result)
            }
            None => {
                let mut result = loadgen::run(load_plan())?;
                result.cpu = watch.finish()?;
                Steady::FixedRate(result)
            }
        })
    };
    let before = steady_run()?;

    let from = server.proc.stderr.len();
    let watch = CpuWatch::start(server.pid())?;
    let load = match plan.wrk {
        Some(wrk) => Started::Wrk(wrk::start(wrk, plan.pinning, &server.url(), plan.seconds, Mode::KeepAlive)?),
        None => Started::FixedRate(loadgen::start(load_plan())?),
    };
    // Leave a stretch at the start and end of the run without reloads, so
    // the signals all land inside it.
    let total = plan.interval * plan.signals as u32;
    let lead = Duration::from_secs(plan.seconds).saturating_sub(total) / 2;
    procs::sleep(lead.min(Duration::from_secs(1)))?;
    let first = Instant::now();
    for i in 0..plan.signals {
        procs::sleep_until(first + plan.interval * i as u32)?;
        server.proc.signal(libc::SIGHUP)?;
    }
    let storm = match load {
        Started::Wrk(proc) => {
            let mut result = wrk::finish(proc, plan.seconds)?;
            result.cpu = watch.finish()?;
            Steady::Wrk(result)
        }
        Started::FixedRate(running) => {
            let mut result = running.join()?;
            result.cpu = watch.finish()?;
            Steady::FixedRate(result)
        }
    };
    // Let the last reload finish: until no `published` line came for 2 s.
    let mut next = from;
    while let Some((_, after)) = server.proc.stderr.wait_for(next, Duration::from_secs(2), parse_published) {
        next = after;
    }
    let reload_ms: Vec<f64> =
        server.proc.stderr.since(from).iter().filter_map(|line| parse_published(line)).map(|(_, ms)| ms).collect();
    let after = steady_run()?;
    let load = match (before, storm, after) {
        (Steady::Wrk(before), Steady::Wrk(storm), Steady::Wrk(after)) => {
            StormLoad::Wrk { steady: [before, after], storm }
        }
        (Steady::FixedRate(before), Steady::FixedRate(storm), Steady::FixedRate(after)) => {
            StormLoad::FixedRate { steady: [before, after], storm }
        }
        _ => unreachable!("steady state and storm use the same load"),
    };
    Ok(StormResult { signals: plan.signals, interval: plan.interval, published: reload_ms.len(), reload_ms, load })
}

impl StormResult {
    /// Why this storm measured the machine rather than the server, if it
    /// did: other work ran during one of its three runs.
    pub fn disturbed(&self) -> Option<String> {
        let foreign: Vec<f64> = match &self.load {
            StormLoad::Wrk { steady, storm } => steady.iter().chain([storm]).map(|r| r.cpu.foreign).collect(),
            StormLoad::FixedRate { steady, storm } => steady.iter().chain([storm]).map(|r| r.cpu.foreign).collect(),
        };
        foreign
            .iter()
            .any(|&f| f > procs::MAX_FOREIGN_CPU)
            .then(|| format!("other work on the machine during the steady/storm/steady runs: {foreign:.2?} cores"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_published_lines_in_text_and_json() {
        let text = "2026-11-24T23:39:23.925937Z  INFO pounce_host::reload: generation 2 published; generation 1 drains generation=2 previous=1 load_ms=19.45 init_ms=7.01 publish_us=1.312 reload_ms=36.908364";
        assert_eq!(parse_published(text), Some((2, 36.908364)));
        let json = r#"{"timestamp":"2026-11-24T23:39:23.925937Z","level":"INFO","message":"generation 17 published; generation 16 drains","generation":17,"previous":16,"load_ms":1.5,"reload_ms":2.25,"target":"pounce_host::reload"}"#;
        assert_eq!(parse_published(json), Some((17, 2.25)));
    }

    #[test]
    fn ignores_other_lines() {
        assert_eq!(parse_published("INFO pounce_host::reload: reload started: loading x generation=3"), None);
        assert_eq!(parse_published("INFO pounce_host::drain: generation 1 retired"), None);
        assert_eq!(parse_published("generation 3 published without a duration"), None);
    }
}
