//! `cargo xtask bench`: pounce-host serving the sample app, in thread mode
//! and in process mode, against a plain hyper server with the same handler
//! compiled in (bench/baseline), on one machine, in one run. See `USAGE`
//! for what it measures.
//!
//! Modules: `procs` (processes, pinning, cleanup, the servers' kinds:
//! baseline, thread mode, process mode), `events` (the host's log events),
//! `throughput` (what the closed-loop load generators share: a run watched
//! for server CPU), `wrk` (HTTP/1.1 throughput), `h2load` (HTTP/2
//! throughput, installed when missing), `loadgen` (fixed-rate latency),
//! `reload` (the reload storm), `memory` (RSS and mapped copies across
//! reloads, a server's footprint), `crash` (process mode's crash recovery;
//! `sockets` tells which worker answered), `criterion` (the request-path
//! micro-benchmark), `report` (figures, targets, Markdown).

pub mod axum;
mod crash;
mod criterion;
mod events;
mod h2load;
mod loadgen;
mod memory;
mod procs;
mod reload;
mod report;
mod sockets;
mod throughput;
mod tls;
mod wrk;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use memory::Footprint;
use procs::{Binaries, CpuWatch, Kind, Pinning, Server};
use report::{Comparison, Http2, Latency, Machine, Report, Throughput, TWO_WORKERS};
use throughput::{watched, LoadResult};
pub use tls::main as tls_main;

const USAGE: &str = "\
usage: cargo xtask bench [--quick] [--duration SECS] [--runs N] [--rate REQ_PER_SEC]
                         [--crashes N] [--no-criterion] [--out FILE]

Builds pounce-host, the sample app and the baseline (bench/baseline, a plain
hyper server with the same handler compiled in) in release mode, then, with
the server pinned to one core and the load generator to another:

  1. keep-alive throughput over HTTP/1.1 (wrk -t1 -c64): the baseline,
     pounce-host in thread mode and in process mode (one worker process)
     alternating, --runs times each: medians, ratios, server CPU per
     request, memory. Then the baseline and thread mode over HTTP/2 (h2c,
     h2load -c16 -m8: 16 connections, 8 concurrent streams each), and over
     HTTP/1.1 with --workers 2 for both, the server and wrk sharing both
     cores (the load generator on the same cores: a scaling check)
  2. the same with a new connection per request (Connection: close),
     baseline and thread mode
  3. latency at a fixed rate (default 30% of the baseline's keep-alive
     throughput) with coordinated-omission correction: p50, p99, p99.9
  4. a reload storm in each mode: 100 SIGHUPs at 10/s under keep-alive
     load; failures, throughput and p99 against steady state, the time
     from each signal to the new generation being published under load
  5. memory: RSS and app copies mapped after 100 and 1000 reloads
  6. the criterion micro-benchmark host/benches/request_path.rs
  7. process mode's crash recovery: a worker crashed --crashes times, time
     until its replacement answers

Every throughput figure comes with the server's CPU time per request. It
prints the results and writes them to bench/results/latest.md.

  --quick          short runs (about 2.5 minutes in all; less precise)
  --duration SECS  throughput run length (default 5); the latency runs take
                   twice that, the storm SECS + 7 (100 reloads at default)
  --runs N         alternations of the servers (default 3)
  --rate R         fixed rate of the latency runs, requests per second
  --crashes N      worker crashes to time (default 20; 0 skips them)
  --no-criterion   skip the criterion micro-benchmark
  --out FILE       write the Markdown there instead of bench/results/latest.md

Needs wrk (apt-get install wrk) for HTTP/1.1 throughput; without it those
figures are skipped and the storm uses the fixed-rate generator as load.
Needs h2load for HTTP/2: when it is missing, the bench installs it
(apt-get install -y nghttp2-client, which needs root); if that fails, the
HTTP/2 figures are skipped and the report says why.
";

/// Everything a run does, with its durations. `cargo xtask bench` fills it
/// from flags; the smoke test uses tiny values.
#[derive(Clone, Debug)]
pub struct Settings {
    pub release: bool,
    pub throughput_secs: u64,
    pub warmup_secs: u64,
    pub runs: usize,
    pub latency_secs: u64,
    pub rate: Option<f64>,
    /// The latency rate as a fraction of the baseline's keep-alive throughput.
    pub rate_fraction: f64,
    /// Used when no throughput was measured and no --rate given.
    pub fallback_rate: f64,
    pub latency_connections: usize,
    pub storm_secs: u64,
    pub storm_signals: usize,
    pub storm_interval: Duration,
    pub memory_checkpoints: Vec<usize>,
    /// Reloads one at a time with `--preflight off`, to set against the
    /// memory phase's (with the preflight, the default) for its cost.
    pub preflight_reloads: usize,
    /// Worker crashes to time in process mode (0: none).
    pub crashes: usize,
    /// Install h2load (apt-get) when it is missing.
    pub install_h2load: bool,
    /// How often a run that other work on the machine disturbed is run
    /// again; the last attempt counts whatever it shows.
    pub retries: usize,
    pub criterion: criterion::Mode,
    pub out: Option<PathBuf>,
    pub command: String,
}

impl Settings {
    fn with_duration(seconds: u64) -> Settings {
        let storm_secs = seconds + 7;
        Settings {
            release: true,
            throughput_secs: seconds,
            warmup_secs: 1,
            runs: 3,
            latency_secs: seconds * 2,
            rate: None,
            rate_fraction: 0.3,
            fallback_rate: 2000.0,
            latency_connections: 32,
            storm_secs,
            // 10 per second, leaving a second of steady load at each end.
            storm_signals: usize::try_from((storm_secs.saturating_sub(2)) * 10).unwrap_or(100).min(100),
            storm_interval: Duration::from_millis(100),
            memory_checkpoints: vec![100, 1000],
            preflight_reloads: 100,
            crashes: 20,
            install_h2load: true,
            retries: 2,
            criterion: criterion::Mode::Measure { warm_up: 1.0, measurement: 3.0 },
            out: Some(pounce_devkit::workspace().join("bench/results/latest.md")),
            command: "cargo xtask bench".to_owned(),
        }
    }

    fn quick() -> Settings {
        Settings {
            runs: 2,
            latency_secs: 4,
            memory_checkpoints: vec![100, 300],
            criterion: criterion::Mode::Measure { warm_up: 0.5, measurement: 1.0 },
            ..Settings::with_duration(2)
        }
    }

    pub fn from_args(args: &[String]) -> Result<Option<Settings>> {
        if args.iter().any(|a| a == "-h" || a == "--help") {
            print!("{USAGE}");
            return Ok(None);
        }
        let mut settings =
            if args.iter().any(|a| a == "--quick") { Settings::quick() } else { Settings::with_duration(5) };
        let mut iter = args.iter();
        while let Some(flag) = iter.next() {
            let mut value = || iter.next().with_context(|| format!("{flag} needs a value\n\n{USAGE}"));
            match flag.as_str() {
                "--quick" => {}
                "--duration" => {
                    let seconds: u64 = value()?.parse().context("--duration: a whole number of seconds")?;
                    if !(1..=600).contains(&seconds) {
                        bail!("--duration: between 1 and 600 seconds");
                    }
                    let quick = std::mem::replace(&mut settings, Settings::with_duration(seconds));
                    settings.runs = quick.runs;
                    settings.criterion = quick.criterion;
                    settings.memory_checkpoints = quick.memory_checkpoints;
                }
                "--runs" => {
                    settings.runs = value()?.parse().context("--runs: a number")?;
                    if !(1..=20).contains(&settings.runs) {
                        bail!("--runs: between 1 and 20");
                    }
                }
                "--rate" => {
                    let rate: f64 = value()?.parse().context("--rate: requests per second")?;
                    if !(1.0..=1e6).contains(&rate) {
                        bail!("--rate: between 1 and 1000000");
                    }
                    settings.rate = Some(rate);
                }
                "--crashes" => {
                    settings.crashes = value()?.parse().context("--crashes: a number")?;
                    if settings.crashes > 200 {
                        bail!("--crashes: at most 200");
                    }
                }
                "--no-criterion" => settings.criterion = criterion::Mode::Off,
                "--out" => settings.out = Some(PathBuf::from(value()?)),
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        settings.command =
            std::iter::once("cargo xtask bench".to_owned()).chain(args.iter().cloned()).collect::<Vec<_>>().join(" ");
        Ok(Some(settings))
    }
}

/// `cargo xtask bench ARGS`.
pub fn main(args: Vec<String>) -> Result<()> {
    let Some(settings) = Settings::from_args(&args)? else { return Ok(()) };
    if cfg!(debug_assertions) && std::env::var_os(RELEASE_MARK).is_none() {
        return exec_release(&args);
    }
    procs::install_interrupt_handler();
    let report = run(&settings)?;
    let markdown = report.to_markdown();
    println!("\n{markdown}");
    if let Some(out) = &settings.out {
        write_report(out, &markdown)?;
        eprintln!("written to {}", out.display());
    }
    let missed = report.missed();
    if !missed.is_empty() {
        eprintln!("targets missed: {}", missed.iter().map(|t| t.figure.as_str()).collect::<Vec<_>>().join("; "));
    }
    Ok(())
}

/// Set in the environment of the release xtask that [`exec_release`] runs.
const RELEASE_MARK: &str = "XTASK_BENCH_RELEASE";

/// `cargo xtask` builds xtask in debug mode, but the latency generator runs
/// inside xtask and must not be the slow side: build xtask in release mode
/// and replace this process with it.
fn exec_release(args: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    step("building xtask in release mode (the latency generator runs in it)");
    let status = procs::cargo().args(["build", "--quiet", "--release", "-p", "xtask"]).status()?;
    if !status.success() {
        bail!("cargo build --release -p xtask failed ({status})");
    }
    let release = pounce_devkit::target_dir().join("release/xtask");
    let error = std::process::Command::new(&release).arg("bench").args(args).env(RELEASE_MARK, "1").exec();
    Err(error).with_context(|| format!("cannot run {}", release.display()))
}

fn write_report(path: &Path, markdown: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, markdown).with_context(|| format!("cannot write {}", path.display()))
}

fn step(text: &str) {
    eprintln!("==> {text}");
}

/// Runs every measurement `settings` asks for.
pub fn run(settings: &Settings) -> Result<Report> {
    let mut notes = Vec::new();
    step(&format!("building ({})", if settings.release { "release" } else { "debug" }));
    let binaries = procs::build(settings.release)?;
    let machine = Machine::detect();
    let pinning = Pinning::detect();
    step(&format!("placement: {}", pinning.description));
    let wrk = wrk::find();
    if wrk.is_none() {
        eprintln!("warning: {}; skipping the throughput figures", wrk::INSTALL_HINT);
        notes.push(format!(
            "{}; throughput figures skipped, storm load is the fixed-rate generator.",
            wrk::INSTALL_HINT
        ));
    }

    let throughput = match &wrk {
        Some(wrk) => Some(throughput(wrk, &binaries, &pinning, settings)?),
        None => None,
    };
    let http2 = http2(&binaries, &pinning, settings, &mut notes)?;

    let baseline_rps = throughput.as_ref().map_or(0.0, |t| t.keep_alive.rps(Kind::Baseline));
    let (rate, rate_source) = match settings.rate {
        Some(rate) => (rate, "given with --rate".to_owned()),
        None if baseline_rps > 0.0 => (
            (baseline_rps * settings.rate_fraction).round(),
            format!(
                "{:.0}% of the baseline's median keep-alive throughput of {:.0} req/s",
                settings.rate_fraction * 100.0,
                baseline_rps
            ),
        ),
        _ => (settings.fallback_rate, "fixed fallback: no throughput was measured".to_owned()),
    };
    let latency = latency(&binaries, &pinning, settings, rate, rate_source)?;

    let mut storms = Vec::new();
    for kind in [Kind::Thread, Kind::PROCESS] {
        storms.push(storm(kind, wrk.as_deref(), &binaries, &pinning, settings, rate, &mut notes)?);
    }

    step(&format!("memory: reloads one at a time up to {:?}", settings.memory_checkpoints));
    let memory = {
        let server = Server::start(Kind::Thread, &binaries, &pinning)?;
        memory::run(&server, &settings.memory_checkpoints)?
    };

    step(&format!("preflight: {} reloads one at a time with --preflight off", settings.preflight_reloads));
    let reload_ms_without_preflight = {
        let server = Server::start_with(Kind::Thread, 1, &["--preflight", "off"], &binaries, &pinning)?;
        (0..settings.preflight_reloads)
            .map(|done| reload::reload_and_wait(&server, done as u64 + 2, reload::RELOAD_TIMEOUT))
            .collect::<Result<Vec<f64>>>()?
    };

    step("criterion: host/benches/request_path.rs");
    let criterion = criterion::run(settings.criterion, &binaries.app)?;
    if settings.criterion == criterion::Mode::Off {
        notes.push("The criterion micro-benchmark was skipped (--no-criterion).".to_owned());
    }

    let crash = match settings.crashes {
        0 => None,
        crashes => {
            step(&format!("crash recovery: {crashes} worker crashes in process mode, one at a time"));
            Some(crash::measure(&binaries, &pinning, crashes)?)
        }
    };

    Ok(Report {
        command: settings.command.clone(),
        machine,
        pinning: pinning.description.clone(),
        profile: binaries.profile.to_owned(),
        throughput_seconds: settings.throughput_secs,
        throughput,
        http2,
        latency,
        storms,
        storm_seconds: settings.storm_secs,
        memory,
        reload_ms_without_preflight,
        crash,
        criterion,
        notes,
    })
}

/// The order of `kinds` in alternation `round`: forward, then backward
/// (ABBA for two, ABCCBA for three), so that a steady drift of the machine
/// over the run favours none of them.
fn order(round: usize, kinds: &[Kind]) -> Vec<Kind> {
    let mut order = kinds.to_vec();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// The reload storm on a fresh server of `kind`, run again (at most
/// `settings.retries` times) if other work on the machine disturbed it.
fn storm(
    kind: Kind,
    wrk: Option<&Path>,
    binaries: &Binaries,
    pinning: &Pinning,
    settings: &Settings,
    rate: f64,
    notes: &mut Vec<String>,
) -> Result<reload::StormResult> {
    step(&format!(
        "reload storm, {}: {} s steady, {} s with {} SIGHUPs every {} ms, {} s steady",
        kind.label(),
        settings.storm_secs,
        settings.storm_secs,
        settings.storm_signals,
        settings.storm_interval.as_millis(),
        settings.storm_secs
    ));
    let server = Server::start(kind, binaries, pinning)?;
    warm_up(wrk, pinning, &server, settings)?;
    let plan = reload::StormPlan {
        kind,
        wrk,
        pinning,
        seconds: settings.storm_secs,
        signals: settings.storm_signals,
        interval: settings.storm_interval,
        fallback_rate: rate,
        connections: settings.latency_connections,
    };
    let mut discarded = 0;
    let storm = undisturbed(
        settings.retries,
        &mut discarded,
        || reload::storm(&server, &plan),
        reload::StormResult::disturbed,
    )?;
    if discarded > 0 {
        notes.push(format!(
            "The reload storm ({}) was run {discarded} time(s) more: other work on the machine disturbed it.",
            kind.label()
        ));
    }
    Ok(storm)
}

fn warm_up(wrk: Option<&Path>, pinning: &Pinning, server: &Server, settings: &Settings) -> Result<()> {
    if let (Some(wrk), true) = (wrk, settings.warmup_secs > 0) {
        wrk::run(wrk, pinning, &server.url(), settings.warmup_secs, wrk::Mode::KeepAlive)?;
    }
    Ok(())
}

/// The HTTP/1.1 comparisons with wrk: keep-alive (the baseline, thread
/// mode, process mode), the same with [`TWO_WORKERS`] worker threads on
/// cores the server and wrk share, and a new connection per request.
fn throughput(wrk: &Path, binaries: &Binaries, pinning: &Pinning, settings: &Settings) -> Result<Throughput> {
    let load = |mode| move |pinning: &Pinning, url: &str, seconds| wrk::run(wrk, pinning, url, seconds, mode);
    let (keep_alive, close) = (load(wrk::Mode::KeepAlive), load(wrk::Mode::Close));
    let one_worker = Plan {
        title: "keep-alive",
        kinds: &[Kind::Baseline, Kind::Thread, Kind::PROCESS],
        workers: 1,
        pinning,
        load: &keep_alive,
    };
    let shared = pinning.shared();
    let pair = [Kind::Baseline, Kind::Thread];
    let title = format!("keep-alive, --workers {TWO_WORKERS} on shared cores");
    let two_workers = Plan { title: &title, kinds: &pair, workers: TWO_WORKERS, pinning: &shared, ..one_worker };
    let new_connections = Plan { title: "new connection per request", kinds: &pair, load: &close, ..one_worker };
    Ok(Throughput {
        keep_alive: compare(binaries, settings, &one_worker)?,
        two_workers: compare(binaries, settings, &two_workers)?,
        close: compare(binaries, settings, &new_connections)?,
        two_workers_placement: shared.description.clone(),
    })
}

/// The HTTP/2 comparison with h2load (installed first if it is missing and
/// `settings` allows), or why there is none.
fn http2(binaries: &Binaries, pinning: &Pinning, settings: &Settings, notes: &mut Vec<String>) -> Result<Http2> {
    let h2load = match h2load::find_or_install(settings.install_h2load) {
        Ok(h2load) => h2load,
        Err(error) => {
            let why = format!("{error:#}");
            eprintln!("warning: {why}; skipping the HTTP/2 figures");
            notes.push(format!("HTTP/2 figures skipped: {why}."));
            return Ok(Err(why));
        }
    };
    let load = |pinning: &Pinning, url: &str, seconds| h2load::run(&h2load, pinning, url, seconds);
    let plan = Plan { title: "HTTP/2 (h2c)", kinds: &[Kind::Baseline, Kind::Thread], workers: 1, pinning, load: &load };
    Ok(Ok(compare(binaries, settings, &plan)?))
}

/// One comparison: the servers, their worker threads, where they run, and
/// the load that measures them (given where to run, the URL and seconds).
struct Plan<'a, R> {
    title: &'a str,
    kinds: &'a [Kind],
    workers: usize,
    pinning: &'a Pinning,
    load: &'a dyn Fn(&Pinning, &str, u64) -> Result<R>,
}

/// The plan's load against each of its servers in turn, `settings.runs`
/// times, each on a fresh server after a warm-up.
fn compare<R: LoadResult>(binaries: &Binaries, settings: &Settings, plan: &Plan<'_, R>) -> Result<Comparison<R>> {
    let mut comparison = Comparison::new(plan.kinds, plan.workers);
    for round in 0..settings.runs {
        for kind in order(round, plan.kinds) {
            step(&format!(
                "throughput {}, run {}/{}: {} for {} s",
                plan.title,
                round + 1,
                settings.runs,
                kind.label(),
                settings.throughput_secs
            ));
            let server = Server::start_with(kind, plan.workers, &[], binaries, plan.pinning)?;
            let run = |seconds| (plan.load)(plan.pinning, &server.url(), seconds);
            if settings.warmup_secs > 0 {
                run(settings.warmup_secs)?;
            }
            let measure = || watched(server.pid(), || run(settings.throughput_secs));
            let result = undisturbed(settings.retries, &mut comparison.discarded, measure, |r: &R| {
                r.cpu().disturbed().then(|| format!("{:.2} cores of other work ran meanwhile", r.cpu().foreign))
            })?;
            comparison.push(kind, result, Footprint::of(server.pid())?);
        }
    }
    Ok(comparison)
}

/// How long a measurement waits for other work on the machine to end.
const QUIET_WAIT: Duration = Duration::from_secs(60);

/// Waits for a quiet machine, then runs `measure` until `disturbed` finds
/// nothing wrong with its result, at most `retries` more times, counting the
/// discarded attempts.
fn undisturbed<T>(
    retries: usize,
    discarded: &mut usize,
    mut measure: impl FnMut() -> Result<T>,
    disturbed: impl Fn(&T) -> Option<String>,
) -> Result<T> {
    let mut attempt = 0;
    loop {
        if retries > 0 && procs::wait_for_quiet(QUIET_WAIT)?.is_none() {
            eprintln!("    the machine stayed busy for {QUIET_WAIT:?}; measuring anyway");
        }
        let result = measure()?;
        match disturbed(&result) {
            Some(why) if attempt < retries => {
                eprintln!("    discarded: {why}; running again");
                *discarded += 1;
                attempt += 1;
            }
            _ => return Ok(result),
        }
    }
}

fn latency(
    binaries: &Binaries,
    pinning: &Pinning,
    settings: &Settings,
    rate: f64,
    rate_source: String,
) -> Result<Latency> {
    let mut latency = Latency {
        rate,
        rate_source,
        seconds: settings.latency_secs,
        connections: settings.latency_connections,
        ..Latency::default()
    };
    for round in 0..settings.runs {
        for kind in order(round, &[Kind::Baseline, Kind::Thread]) {
            step(&format!(
                "latency at {rate:.0} req/s, run {}/{}: {} for {} s",
                round + 1,
                settings.runs,
                kind.label(),
                settings.latency_secs
            ));
            let server = Server::start(kind, binaries, pinning)?;
            let plan = |seconds: u64| loadgen::Plan {
                addr: server.addr,
                path: "/".to_owned(),
                rate,
                duration: Duration::from_secs(seconds),
                connections: settings.latency_connections,
                cpu: pinning.load_cpu,
            };
            if settings.warmup_secs > 0 {
                loadgen::run(plan(settings.warmup_secs))?;
            }
            let measure = || {
                let watch = CpuWatch::start(server.pid())?;
                let mut result = loadgen::run(plan(settings.latency_secs))?;
                result.cpu = watch.finish()?;
                eprintln!(
                    "    p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, failures {}, send lag p99 {:.1} µs, other CPU {:.2}",
                    result.p50_us,
                    result.p99_us,
                    result.p999_us,
                    result.failures(),
                    result.send_lag_p99_us,
                    result.cpu.foreign
                );
                Ok(result)
            };
            let result =
                undisturbed(settings.retries, &mut latency.discarded, measure, |r: &loadgen::LatencyResult| {
                    r.disturbed().then(|| {
                        format!(
                            "{:.2} cores of other work ran meanwhile, send lag p99 {:.0} µs",
                            r.cpu.foreign, r.send_lag_p99_us
                        )
                    })
                })?;
            match kind {
                Kind::Baseline => latency.baseline.push(result),
                _ => latency.pounce.push(result),
            }
        }
    }
    Ok(latency)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn default_settings_match_the_issue() {
        let settings = Settings::from_args(&[]).unwrap().unwrap();
        assert_eq!(settings.throughput_secs, 5);
        assert_eq!(settings.runs, 3);
        assert_eq!(settings.latency_secs, 10);
        assert_eq!(settings.storm_secs, 12);
        assert_eq!(settings.storm_signals, 100);
        assert_eq!(settings.memory_checkpoints, [100, 1000]);
        assert_eq!(settings.crashes, 20);
        assert!(settings.release);
    }

    #[test]
    fn flags_change_the_settings() {
        let settings =
            Settings::from_args(&args("--duration 2 --runs 5 --rate 1000 --crashes 3 --no-criterion --out x.md"))
                .unwrap()
                .unwrap();
        assert_eq!(settings.throughput_secs, 2);
        assert_eq!(settings.latency_secs, 4);
        assert_eq!(settings.storm_secs, 9);
        assert_eq!(settings.storm_signals, 70);
        assert_eq!(settings.runs, 5);
        assert_eq!(settings.rate, Some(1000.0));
        assert_eq!(settings.crashes, 3);
        assert_eq!(settings.criterion, criterion::Mode::Off);
        assert_eq!(settings.out, Some(PathBuf::from("x.md")));
        assert_eq!(
            settings.command,
            "cargo xtask bench --duration 2 --runs 5 --rate 1000 --crashes 3 --no-criterion --out x.md"
        );

        let quick = Settings::from_args(&args("--quick")).unwrap().unwrap();
        assert!(quick.throughput_secs < 5 && quick.runs < 3);
        assert!(Settings::from_args(&args("--bogus")).is_err());
        assert!(Settings::from_args(&args("--duration")).is_err());
        assert!(Settings::from_args(&args("--duration 0")).is_err());
        assert!(Settings::from_args(&args("--crashes 1000")).is_err());
        assert!(Settings::from_args(&args("--help")).unwrap().is_none());
    }

    #[test]
    fn servers_alternate_forward_then_backward() {
        let two = [Kind::Baseline, Kind::Thread];
        let sequence: Vec<Kind> = (0..2).flat_map(|round| order(round, &two)).collect();
        assert_eq!(sequence, [Kind::Baseline, Kind::Thread, Kind::Thread, Kind::Baseline]);
        let three = [Kind::Baseline, Kind::Thread, Kind::PROCESS];
        let sequence: Vec<Kind> = (0..2).flat_map(|round| order(round, &three)).collect();
        assert_eq!(sequence, [three, [Kind::PROCESS, Kind::Thread, Kind::Baseline]].concat());
    }

    /// Runs every code path of `cargo xtask bench` with tiny durations on
    /// debug builds: it asserts that each figure was produced, not what it
    /// is (the machine may be busy with other tests).
    #[test]
    fn bench_smoke() {
        let settings = Settings {
            release: false,
            throughput_secs: 1,
            warmup_secs: 0,
            runs: 1,
            latency_secs: 1,
            rate: None,
            rate_fraction: 0.3,
            fallback_rate: 500.0,
            latency_connections: 4,
            storm_secs: 2,
            storm_signals: 3,
            storm_interval: Duration::from_millis(100),
            memory_checkpoints: vec![1, 3],
            preflight_reloads: 2,
            crashes: 2,
            install_h2load: false,
            retries: 0,
            criterion: criterion::Mode::Check,
            out: None,
            command: "bench smoke test".to_owned(),
        };
        if wrk::find().is_none() {
            eprintln!("bench_smoke: {}; the wrk-based parts are skipped", wrk::INSTALL_HINT);
        }
        if h2load::find().is_none() {
            eprintln!("bench_smoke: h2load is not installed; the HTTP/2 part must be skipped, said so");
        }
        let report = run(&settings).expect("the bench runs");

        if let Some(throughput) = &report.throughput {
            let [keep_alive, close, two] = [&throughput.keep_alive, &throughput.close, &throughput.two_workers];
            assert_measured(keep_alive, &[Kind::Baseline, Kind::Thread, Kind::PROCESS]);
            assert_measured(close, &[Kind::Baseline, Kind::Thread]);
            assert_measured(two, &[Kind::Baseline, Kind::Thread]);
            assert_eq!((keep_alive.workers, two.workers), (1, 2));
            assert!(throughput.two_workers_placement.contains("same cores"), "{}", throughput.two_workers_placement);
            assert!(keep_alive.ratio(Kind::PROCESS, Kind::Thread) > 0.0, "{keep_alive:?}");
            let process = &keep_alive.servers[2];
            assert_eq!(process.footprints[0].processes.len(), 2, "a supervisor and one worker: {process:?}");
        }
        match (&report.http2, h2load::find()) {
            (Ok(http2), _) => assert_measured(http2, &[Kind::Baseline, Kind::Thread]),
            (Err(why), None) => {
                assert!(why.contains("h2load"), "{why}");
                assert!(report.notes.iter().any(|note| note.contains(why.as_str())), "{:?}", report.notes);
            }
            (Err(why), Some(path)) => panic!("{} is installed, yet HTTP/2 was not measured: {why}", path.display()),
        }
        let latency = &report.latency;
        assert!(latency.rate > 0.0);
        for run in latency.baseline.iter().chain(&latency.pounce) {
            assert!(run.ok > 0 && run.p50_us > 0.0 && run.p99_us >= run.p50_us, "{run:?}");
        }
        assert!(latency.p99_ratio().is_finite());

        let modes: Vec<Kind> = report.storms.iter().map(|s| s.kind).collect();
        assert_eq!(modes, [Kind::Thread, Kind::PROCESS]);
        for storm in &report.storms {
            assert_eq!(storm.signals, 3);
            assert!(storm.published >= 1 && storm.reload_ms.iter().all(|ms| *ms > 0.0), "{storm:?}");
            assert!(!storm.signal_to_published_ms.is_empty(), "{storm:?}");
            assert!(storm.signal_to_published_ms.iter().all(|ms| *ms > 0.0), "{storm:?}");
            assert!(storm.ratios().0.is_finite(), "{storm:?}");
        }

        let crash = report.crash.as_ref().expect("crashes measured");
        assert_eq!((crash.crashes, crash.to_ready_ms.len()), (2, 2), "{crash:?}");
        assert_eq!(crash.to_serving_ms.len() + crash.unanswered, 2, "{crash:?}");
        assert!(crash.to_ready_ms.iter().chain(&crash.startup_ms).all(|ms| *ms > 0.0), "{crash:?}");

        let reloads: Vec<usize> = report.memory.points.iter().map(|p| p.reloads).collect();
        assert_eq!(reloads, [0, 1, 3]);
        assert_eq!(report.memory.reload_ms.len(), 3);
        assert!(report.memory.points.iter().all(|p| p.rss_kib > 0 && p.mapped_copies >= 1), "{:?}", report.memory);

        let names: Vec<&str> = report.criterion.iter().map(|e| e.name.as_str()).collect();
        for name in ["request_path/lease", "request_path/baseline_loopback", "request_path/pounce_loopback"] {
            assert!(names.contains(&name), "criterion ran {names:?}");
        }

        let markdown = report.to_markdown();
        // Shown when the test fails (or with --nocapture).
        eprintln!("{markdown}");
        for heading in [
            "## Machine",
            "## Summary",
            "### 1d-1e. HTTP/2 (h2c)",
            "## 3. Latency",
            "## 4. Reload under load",
            "### pounce-host process mode",
            "## 5. Memory",
            "## 6.",
            "## 7. Crash recovery",
        ] {
            assert!(markdown.contains(heading), "no {heading:?} in:\n{markdown}");
        }
        if report.throughput.is_some() {
            assert!(markdown.contains("### 1f. Keep-alive with --workers 2"), "{markdown}");
        }
        let targets = report.targets();
        assert_eq!(targets.len(), 16, "{targets:?}");
        let cpu_rows = targets.iter().filter(|t| t.figure.contains("server CPU per request")).count();
        assert_eq!(cpu_rows, 2, "keep-alive and HTTP/2: {targets:?}");
    }

    /// One run of each of `kinds` in `comparison`, with server CPU per
    /// request, and a thread mode / baseline ratio.
    fn assert_measured<R: LoadResult>(comparison: &Comparison<R>, kinds: &[Kind]) {
        for &kind in kinds {
            assert_eq!(comparison.runs(kind).len(), 1, "{kind:?}: {comparison:?}");
            assert!(comparison.cpu_us_per_request(kind) > 0.0, "{kind:?}: {comparison:?}");
        }
        let ratio = comparison.ratio(Kind::Thread, Kind::Baseline);
        assert!(ratio.is_finite() && ratio > 0.0, "{comparison:?}");
        assert!(comparison.cpu_ratio(Kind::Thread, Kind::Baseline).is_finite(), "{comparison:?}");
    }
}
