//! Reloads: sending SIGHUP, reading pounce-host's `generation_loaded`
//! events (thread mode's server and process mode's supervisor log the same
//! one), and the reload storm under load, for either mode.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::events::{self, LogEvent};
use super::loadgen::{self, LatencyResult, Plan};
use super::procs::{self, CpuWatch, Kind, Pinning, Server};
use super::report::{mean, ratio};
use super::wrk::{self, Mode, WrkResult};

/// How long one reload may take before the benchmark gives up on it.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A `generation_loaded` event: the generation and its `reload_ms` (the
/// host's own measure, from the start of the reload to its publication).
pub fn parse_published(line: &str) -> Option<(u64, f64)> {
    let event = LogEvent::named(line, "generation_loaded")?;
    Some((event.get("generation")?, event.get("reload_ms")?))
}

/// Sends SIGHUP and waits (bounded) for generation `expected` to be
/// published; returns its `reload_ms`.
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
    pub kind: Kind,
    pub signals: usize,
    pub interval: Duration,
    pub published: usize,
    /// `reload_ms` of every published generation.
    pub reload_ms: Vec<f64>,
    /// For each signal, from its sending to the publication of the first
    /// generation whose reload started after it (the first that serves the
    /// library as it was at the signal): what a deploy waits for. Signals
    /// that arrive during a reload wait for it too, so this is `reload_ms`
    /// plus queueing. Signals no published generation answered are missing.
    pub signal_to_published_ms: Vec<f64>,
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
    /// The server's kind, for the report.
    pub kind: Kind,
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
    let mut sent = Vec::with_capacity(plan.signals);
    for i in 0..plan.signals {
        procs::sleep_until(first + plan.interval * i as u32)?;
        sent.push(events::now());
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
    let log = server.proc.stderr.since(from);
    let reload_ms: Vec<f64> = log.iter().filter_map(|line| parse_published(line)).map(|(_, ms)| ms).collect();
    let signal_to_published_ms = signal_to_published_ms(&sent, &log);
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
    Ok(StormResult {
        kind: plan.kind,
        signals: plan.signals,
        interval: plan.interval,
        published: reload_ms.len(),
        reload_ms,
        signal_to_published_ms,
        load,
    })
}

/// For each signal sent at `sent` (log clock), the milliseconds until the
/// `generation_loaded` of the first generation whose `reload_started` came
/// after it, from the host's timestamps in `log`.
fn signal_to_published_ms(sent: &[f64], log: &[String]) -> Vec<f64> {
    let events: Vec<LogEvent<'_>> = log.iter().filter_map(|line| LogEvent::parse(line)).collect();
    let published = |generation: u64| {
        events.iter().find(|e| e.name == "generation_loaded" && e.get("generation") == Some(generation))
    };
    // Reloads that were published, in the order they started.
    let reloads: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| e.name == "reload_started")
        .filter_map(|started| Some((started.at, published(started.get("generation")?)?.at)))
        .collect();
    sent.iter()
        .filter_map(|&at| reloads.iter().find(|(started, _)| *started >= at).map(|(_, done)| (done - at) * 1000.0))
        .collect()
}

impl StormResult {
    /// Storm p99 / steady p99 and storm / steady throughput (wrk's p99 under
    /// wrk; the fixed-rate p99 without wrk). Steady is the mean of the runs
    /// before and after.
    pub fn ratios(&self) -> (f64, f64) {
        match &self.load {
            StormLoad::Wrk { steady, storm } => (
                ratio(storm.p99_us, mean(steady.iter().map(|r| r.p99_us))),
                ratio(storm.requests_per_sec, mean(steady.iter().map(|r| r.requests_per_sec))),
            ),
            StormLoad::FixedRate { steady, storm } => {
                (ratio(storm.p99_us, mean(steady.iter().map(|r| r.p99_us))), f64::NAN)
            }
        }
    }

    /// Failed requests and socket errors over the three runs.
    pub fn failures(&self) -> u64 {
        match &self.load {
            StormLoad::Wrk { steady, storm } => steady.iter().chain([storm]).map(WrkResult::failures).sum(),
            StormLoad::FixedRate { steady, storm } => steady.iter().chain([storm]).map(LatencyResult::failures).sum(),
        }
    }

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
    fn reads_generation_loaded_events_in_text_and_json() {
        let text = "2026-11-24T23:39:23.925937Z  INFO pounce_host::operations::events: generation 2 published; generation 1 drains event=\"generation_loaded\" generation=2 previous=1 load_ms=19.45 init_ms=7.01 publish_us=1.312 reload_ms=36.908364";
        assert_eq!(parse_published(text), Some((2, 36.908364)));
        let json = r#"{"timestamp":"2026-11-24T23:39:23.925937Z","level":"INFO","message":"generation 17 published; generation 16 drains","event":"generation_loaded","generation":17,"previous":16,"load_ms":1.5,"reload_ms":2.25,"target":"pounce_host::operations::events"}"#;
        assert_eq!(parse_published(json), Some((17, 2.25)));
    }

    #[test]
    fn ignores_other_lines() {
        let started = "2026-11-24T23:39:23Z INFO x: reload started event=\"reload_started\" generation=3 serving=2";
        assert_eq!(parse_published(started), None);
        assert_eq!(parse_published("2026-11-24T23:39:23Z INFO x: generation 3 published reload_ms=1"), None);
        let no_duration = "2026-11-24T23:39:23Z INFO x: published event=\"generation_loaded\" generation=3";
        assert_eq!(parse_published(no_duration), None);
    }

    /// A line of event `name` for `generation` at `at` seconds past midnight.
    fn line(at: f64, name: &str, generation: u64) -> String {
        format!("1970-01-01T00:00:{at:09.6}Z  INFO x: y event=\"{name}\" generation={generation} reload_ms=1")
    }

    #[test]
    fn each_signal_waits_for_the_first_reload_that_started_after_it() {
        let log = [
            line(10.0, "reload_started", 2),
            line(10.05, "generation_loaded", 2),
            line(10.1, "reload_started", 3),
            line(10.3, "generation_loaded", 3),
            line(10.3, "reload_started", 4),
            line(10.35, "reload_failed", 4),
            line(10.4, "reload_started", 5),
            line(10.45, "generation_loaded", 5),
        ];
        // The signals at 10.15 and 10.2 arrive during reload 3 and wait for
        // it; reload 4, which they caused, fails, so generation 5 answers
        // them. The last signal is never answered.
        let sent = [9.99, 10.09, 10.15, 10.2, 10.32, 10.5];
        let waited: Vec<f64> = signal_to_published_ms(&sent, &log).iter().map(|ms| ms.round()).collect();
        assert_eq!(waited, [60.0, 210.0, 300.0, 250.0, 130.0]);
    }
}
