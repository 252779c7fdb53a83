//! The results: machine information, the figures, the targets, and the
//! Markdown written to bench/results/latest.md.

use std::fmt::Write as _;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::crash::CrashResult;
use super::criterion::Estimate;
use super::h2load::H2Result;
use super::loadgen::LatencyResult;
use super::memory::{Footprint, MemoryResult, ProcessMemory};
use super::procs::Kind;
use super::reload::{StormLoad, StormResult};
use super::throughput::LoadResult;
use super::wrk::WrkResult;

/// RSS growth per reload below which memory counts as flat (allocator
/// noise).
pub const RSS_NOISE_KIB: f64 = 4.0;

/// The target for a crashed worker's replacement to serve (issue 9).
pub const CRASH_P99_MS: f64 = 100.0;

/// Where the numbers were taken.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub rustc: String,
    pub date: String,
    pub commit: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, model)| model.trim().to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |text| format!("Linux {}", text.trim()));
        let rustc = output_of(Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into())).arg("-V"));
        let head = output_of(Command::new("git").args(["rev-parse", "--short", "HEAD"]));
        let dirty = !output_of(Command::new("git").args(["status", "--porcelain", "--untracked-files=no"])).is_empty();
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel,
            rustc: if rustc.is_empty() { "unknown".to_owned() } else { rustc },
            date: utc_now(),
            commit: match (head.is_empty(), dirty) {
                (true, _) => "unknown".to_owned(),
                (false, true) => format!("{head} with uncommitted changes in the work tree"),
                (false, false) => head,
            },
        }
    }
}

fn output_of(command: &mut Command) -> String {
    command
        .current_dir(pounce_devkit::workspace())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format_utc(seconds)
}

fn format_utc(seconds: u64) -> String {
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// The median (mean of the middle two for an even count); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return 0.0;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// The `q` quantile (nearest rank) of `values`; 0 when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return 0.0;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The mean; NaN when empty.
pub fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(sum, count), v| (sum + v, count + 1));
    if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    }
}

/// `numerator / denominator`; NaN when the denominator is not positive.
pub fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 {
        numerator / denominator
    } else {
        f64::NAN
    }
}

/// Closed-loop runs (wrk, h2load) of several servers, alternating.
#[derive(Clone, Debug)]
pub struct Comparison<R = WrkResult> {
    /// Each server's runs, servers in the order they were given.
    pub servers: Vec<ServerRuns<R>>,
    /// Worker threads of every server (per process in process mode).
    pub workers: usize,
    /// Runs thrown away because other work on the machine disturbed them.
    pub discarded: usize,
}

/// One server's runs of a [`Comparison`], in run order.
#[derive(Clone, Debug)]
pub struct ServerRuns<R> {
    pub kind: Kind,
    pub runs: Vec<R>,
    /// The server's memory right after each run, before it stopped.
    pub footprints: Vec<Footprint>,
}

impl<R: LoadResult> Comparison<R> {
    pub fn new(kinds: &[Kind], workers: usize) -> Comparison<R> {
        let servers = kinds.iter().map(|&kind| ServerRuns { kind, runs: Vec::new(), footprints: Vec::new() }).collect();
        Comparison { servers, workers, discarded: 0 }
    }

    pub fn push(&mut self, kind: Kind, result: R, footprint: Footprint) {
        if let Some(server) = self.servers.iter_mut().find(|s| s.kind == kind) {
            server.runs.push(result);
            server.footprints.push(footprint);
        }
    }

    /// `kind`'s runs; none if it was not compared.
    pub fn runs(&self, kind: Kind) -> &[R] {
        self.servers.iter().find(|s| s.kind == kind).map_or(&[], |s| &s.runs)
    }

    /// The median of `metric` over `kind`'s runs.
    fn median_of(&self, kind: Kind, metric: fn(&R) -> f64) -> f64 {
        median(&self.runs(kind).iter().map(metric).collect::<Vec<_>>())
    }

    /// The median throughput of `kind`, requests per second.
    pub fn rps(&self, kind: Kind) -> f64 {
        self.median_of(kind, R::requests_per_sec)
    }

    /// The median server CPU time per request of `kind`, in microseconds.
    pub fn cpu_us_per_request(&self, kind: Kind) -> f64 {
        self.median_of(kind, R::cpu_us_per_request)
    }

    /// `of`'s throughput relative to `to`'s: the median of the ratios of
    /// each alternation's pair of runs. The runs of one alternation are
    /// close in time, so they share the shared machine's state (which here
    /// can swing throughput by 25% for minutes); a ratio of medians would
    /// compare runs from different states.
    pub fn ratio(&self, of: Kind, to: Kind) -> f64 {
        median(&self.pair_ratios(of, to))
    }

    /// `of`'s server CPU per request relative to `to`'s, paired like
    /// [`Comparison::ratio`].
    pub fn cpu_ratio(&self, of: Kind, to: Kind) -> f64 {
        median(&self.pair_ratios_of(of, to, R::cpu_us_per_request))
    }

    /// Each alternation's `of`/`to` throughput ratio, in run order.
    pub fn pair_ratios(&self, of: Kind, to: Kind) -> Vec<f64> {
        self.pair_ratios_of(of, to, R::requests_per_sec)
    }

    pub fn pair_ratios_of(&self, of: Kind, to: Kind, metric: fn(&R) -> f64) -> Vec<f64> {
        self.runs(of).iter().zip(self.runs(to)).map(|(a, b)| ratio(metric(a), metric(b))).collect()
    }

    /// Failed requests over all of `kind`'s runs.
    pub fn failures(&self, kind: Kind) -> u64 {
        self.runs(kind).iter().map(R::failures).sum()
    }
}

/// The wrk comparisons (HTTP/1.1).
#[derive(Clone, Debug)]
pub struct Throughput {
    pub keep_alive: Comparison,
    pub close: Comparison,
    /// Keep-alive with [`TWO_WORKERS`] worker threads, the server and wrk
    /// sharing the cores.
    pub two_workers: Comparison,
    /// Where `two_workers` ran.
    pub two_workers_placement: String,
}

/// The worker threads of the scaling run.
pub const TWO_WORKERS: usize = 2;

/// The HTTP/2 comparison, or why it was not measured.
pub type Http2 = Result<Comparison<H2Result>, String>;

#[derive(Clone, Debug, Default)]
pub struct Latency {
    pub rate: f64,
    /// How the rate was chosen.
    pub rate_source: String,
    pub seconds: u64,
    pub connections: usize,
    /// Runs thrown away because the generator itself fell behind.
    pub discarded: usize,
    pub baseline: Vec<LatencyResult>,
    pub pounce: Vec<LatencyResult>,
}

fn medians(runs: &[LatencyResult]) -> [f64; 4] {
    let of = |f: fn(&LatencyResult) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    [of(|r| r.p50_us), of(|r| r.p99_us), of(|r| r.p999_us), of(|r| r.max_us)]
}

impl Latency {
    pub fn baseline_medians(&self) -> [f64; 4] {
        medians(&self.baseline)
    }

    pub fn pounce_medians(&self) -> [f64; 4] {
        medians(&self.pounce)
    }

    pub fn p99_ratio(&self) -> f64 {
        ratio(self.pounce_medians()[1], self.baseline_medians()[1])
    }
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub pinning: String,
    pub profile: String,
    /// The length of each throughput run (wrk and h2load), in seconds.
    pub throughput_seconds: u64,
    /// `None` when wrk is not installed.
    pub throughput: Option<Throughput>,
    pub http2: Http2,
    pub latency: Latency,
    /// The reload storm in each mode, thread mode first.
    pub storms: Vec<StormResult>,
    pub storm_seconds: u64,
    pub memory: MemoryResult,
    /// Idle reloads in thread mode with `--preflight off` (the memory
    /// phase's have it on, the default).
    pub reload_ms_without_preflight: Vec<f64>,
    /// Process mode's crash recovery; `None` when it was not measured.
    pub crash: Option<CrashResult>,
    pub criterion: Vec<Estimate>,
    pub notes: Vec<String>,
}

/// One row of the summary table.
#[derive(Clone, Debug)]
pub struct Target {
    pub figure: String,
    pub measured: String,
    pub target: String,
    pub verdict: Verdict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// Not measured in this run.
    Skipped,
    /// Measured, with no target to meet.
    Reported,
}

impl Verdict {
    pub fn of(met: bool) -> Verdict {
        if met {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::Skipped => "skipped",
            Verdict::Reported => "reported",
        }
    }
}

impl Target {
    fn skipped(figure: &str, why: &str) -> Target {
        Target {
            figure: figure.to_owned(),
            measured: format!("not measured: {why}"),
            target: String::new(),
            verdict: Verdict::Skipped,
        }
    }
}

/// The storm's target for p99 latency during the storm / steady state.
pub const STORM_P99_RATIO: f64 = 1.3;
/// The storm's target for signal → new generation published, p99.
pub const SIGNAL_TO_PUBLISHED_P99_MS: f64 = 10.0;

/// A summary row of `comparison`'s `of` / `to` throughput ratio (at least
/// `minimum`; no target: reported only), with the medians, server CPU per
/// request and failed requests beside it.
fn throughput_row<R: LoadResult>(
    figure: &str,
    comparison: Result<&Comparison<R>, &str>,
    [of, to]: [Kind; 2],
    minimum: Option<f64>,
) -> Target {
    let comparison = match comparison {
        Ok(comparison) => comparison,
        Err(why) => return Target::skipped(figure, why),
    };
    let value = comparison.ratio(of, to);
    let failed = comparison.failures(of) + comparison.failures(to);
    Target {
        figure: figure.to_owned(),
        measured: format!(
            "{value:.3} (medians {:.0} / {:.0} req/s; server CPU {:.2} / {:.2} µs per request, {:.3}x{})",
            comparison.rps(of),
            comparison.rps(to),
            comparison.cpu_us_per_request(of),
            comparison.cpu_us_per_request(to),
            comparison.cpu_ratio(of, to),
            if failed > 0 { format!("; {failed} failed requests") } else { String::new() }
        ),
        target: minimum.map_or_else(|| "none: a scaling check".to_owned(), |minimum| format!(">= {minimum}")),
        verdict: minimum.map_or(Verdict::Reported, |minimum| Verdict::of(value >= minimum)),
    }
}

/// A summary row of `comparison`'s `of` / `to` server CPU per request (at
/// most `maximum`).
fn cpu_row<R: LoadResult>(
    figure: &str,
    comparison: Result<&Comparison<R>, &str>,
    [of, to]: [Kind; 2],
    maximum: f64,
) -> Target {
    let comparison = match comparison {
        Ok(comparison) => comparison,
        Err(why) => return Target::skipped(figure, why),
    };
    let value = comparison.cpu_ratio(of, to);
    Target {
        figure: figure.to_owned(),
        measured: format!(
            "{value:.3} ({:.2} / {:.2} µs per request)",
            comparison.cpu_us_per_request(of),
            comparison.cpu_us_per_request(to)
        ),
        target: format!("<= {maximum}"),
        verdict: Verdict::of(value <= maximum),
    }
}

/// 4a-4c (thread mode) or 4d-4f (process mode): the storm's failures, its
/// p99 against steady state, and signal to new generation published.
fn storm_targets(storm: &StormResult, [first, second, third]: [&str; 3]) -> [Target; 3] {
    let mode = storm.kind.label().trim_start_matches("pounce-host ");
    let failures = storm.failures();
    let (p99_ratio, _) = storm.ratios();
    let waits = &storm.signal_to_published_ms;
    let p99_wait = quantile(waits, 0.99);
    [
        Target {
            figure: format!("{first}. reload storm, {mode}: failed requests + socket errors"),
            measured: failures.to_string(),
            target: "0".to_owned(),
            verdict: Verdict::of(failures == 0),
        },
        Target {
            figure: format!("{second}. reload storm, {mode}: p99 during the storm / steady state"),
            measured: format!("{p99_ratio:.2}"),
            target: format!("<= {STORM_P99_RATIO}"),
            verdict: Verdict::of(p99_ratio <= STORM_P99_RATIO),
        },
        Target {
            figure: format!("{third}. reload storm, {mode}: signal → new generation published under load, p99"),
            measured: format!(
                "{p99_wait:.1} ms (p50 {:.1}, max {:.1}; {} of {} signals answered)",
                median(waits),
                quantile(waits, 1.0),
                waits.len(),
                storm.signals
            ),
            target: format!("<= {SIGNAL_TO_PUBLISHED_P99_MS} ms, every signal answered"),
            verdict: Verdict::of(waits.len() == storm.signals && p99_wait <= SIGNAL_TO_PUBLISHED_P99_MS),
        },
    ]
}

/// p50 / p99 / max of `values`.
fn spread(values: &[f64]) -> String {
    format!("{:.1} / {:.1} / {:.1}", median(values), quantile(values, 0.99), quantile(values, 1.0))
}

impl Report {
    /// Copies mapped beyond the one live generation, at the last checkpoint.
    pub fn extra_copies(&self) -> usize {
        self.memory.points.last().map_or(0, |p| p.mapped_copies.saturating_sub(1))
    }

    /// RSS growth per reload between the first and the last checkpoint after
    /// start (KiB).
    pub fn rss_growth_per_reload_kib(&self) -> f64 {
        let points = &self.memory.points;
        match (points.get(1), points.last()) {
            (Some(first), Some(last)) if last.reloads > first.reloads => {
                (last.rss_kib as f64 - first.rss_kib as f64) / (last.reloads - first.reloads) as f64
            }
            _ => f64::NAN,
        }
    }

    /// Open file descriptors gained per reload between the first and the
    /// last checkpoint after start.
    pub fn fd_growth_per_reload(&self) -> f64 {
        let points = &self.memory.points;
        match (points.get(1), points.last()) {
            (Some(first), Some(last)) if last.reloads > first.reloads => {
                (last.open_fds as f64 - first.open_fds as f64) / (last.reloads - first.reloads) as f64
            }
            _ => f64::NAN,
        }
    }

    /// No memory growth beyond the live generation: one copy mapped, no
    /// descriptors gained, and RSS per reload under `RSS_NOISE_KIB`.
    pub fn memory_flat(&self) -> bool {
        let growth = |value: f64| value.is_nan() || value <= 0.0;
        self.extra_copies() == 0
            && growth(self.fd_growth_per_reload())
            && (self.rss_growth_per_reload_kib().is_nan() || self.rss_growth_per_reload_kib() < RSS_NOISE_KIB)
    }

    pub fn targets(&self) -> Vec<Target> {
        let mut targets = self.throughput_targets();
        let [_, base_p99, ..] = self.latency.baseline_medians();
        let [_, pounce_p99, ..] = self.latency.pounce_medians();
        let p99 = self.latency.p99_ratio();
        targets.push(Target {
            figure: format!("3. p99 latency at {:.0} req/s, thread mode / baseline", self.latency.rate),
            measured: format!("{p99:.2} ({pounce_p99:.0} / {base_p99:.0} µs)"),
            target: "<= 1.1".to_owned(),
            verdict: Verdict::of(p99 <= 1.1),
        });
        for (storm, labels) in self.storms.iter().zip([["4a", "4b", "4c"], ["4d", "4e", "4f"]]) {
            targets.extend(storm_targets(storm, labels));
        }
        let last = self.memory.points.last();
        targets.push(Target {
            figure: format!("5. memory after {} reloads", last.map_or(0, |p| p.reloads)),
            measured: format!(
                "{} app copy mapped; per reload after the first checkpoint: RSS {:+.1} KiB, open fds {:+.2}",
                last.map_or(0, |p| p.mapped_copies),
                self.rss_growth_per_reload_kib(),
                self.fd_growth_per_reload()
            ),
            target: format!("1 copy, no fd growth, RSS < {RSS_NOISE_KIB} KiB per reload"),
            verdict: Verdict::of(self.memory_flat()),
        });
        targets.push(self.crash_target());
        targets
    }

    /// 1a-1f and 2: throughput and server CPU per request ratios.
    fn throughput_targets(&self) -> Vec<Target> {
        const WRK_MISSING: &str = "wrk missing";
        let wrk = |select: fn(&Throughput) -> &Comparison| self.throughput.as_ref().map(select).ok_or(WRK_MISSING);
        let keep_alive = wrk(|t| &t.keep_alive);
        let http2 = self.http2.as_ref().map_err(String::as_str);
        let thread_base = [Kind::Thread, Kind::Baseline];
        vec![
            throughput_row("1a. keep-alive throughput, thread mode / baseline", keep_alive, thread_base, Some(0.98)),
            cpu_row("1b. keep-alive server CPU per request, thread mode / baseline", keep_alive, thread_base, 1.01),
            throughput_row(
                "1c. keep-alive throughput, process mode (1 worker process) / thread mode",
                keep_alive,
                [Kind::PROCESS, Kind::Thread],
                Some(0.95),
            ),
            throughput_row("1d. HTTP/2 (h2c) throughput, thread mode / baseline", http2, thread_base, Some(0.95)),
            cpu_row("1e. HTTP/2 (h2c) server CPU per request, thread mode / baseline", http2, thread_base, 1.05),
            throughput_row(
                &format!(
                    "1f. keep-alive throughput with --workers {TWO_WORKERS} (load generator on the same cores), thread mode / baseline"
                ),
                wrk(|t| &t.two_workers),
                thread_base,
                None,
            ),
            throughput_row(
                "2. new connection per request, thread mode / baseline",
                wrk(|t| &t.close),
                thread_base,
                Some(0.95),
            ),
        ]
    }

    /// 7: crash to replacement serving.
    fn crash_target(&self) -> Target {
        let figure = "7. process mode: crash to replacement serving, p99".to_owned();
        let Some(crash) = &self.crash else {
            return Target::skipped(&figure, "--crashes 0");
        };
        let p99 = quantile(&crash.to_serving_ms, 0.99);
        let unanswered = match crash.unanswered {
            0 => String::new(),
            n => format!("; {n} replacement(s) not seen serving"),
        };
        Target {
            figure,
            measured: format!(
                "{p99:.1} ms over {} crashes (p50 {:.1}, max {:.1}){unanswered}",
                crash.crashes,
                median(&crash.to_serving_ms),
                quantile(&crash.to_serving_ms, 1.0)
            ),
            target: format!("<= {CRASH_P99_MS} ms"),
            verdict: Verdict::of(crash.unanswered == 0 && !crash.to_serving_ms.is_empty() && p99 <= CRASH_P99_MS),
        }
    }

    pub fn missed(&self) -> Vec<Target> {
        self.targets().into_iter().filter(|t| t.verdict == Verdict::Missed).collect()
    }

    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# pounce-host benchmark results\n");
        let _ = writeln!(md, "Written by `{}` on {}.\n", self.command, m.date);
        let _ = writeln!(md, "## Machine\n");
        let _ = writeln!(md, "| | |\n|---|---|");
        let _ = writeln!(md, "| CPU | {} |", m.cpu);
        let _ = writeln!(md, "| cores available | {} |", m.cpus);
        let _ = writeln!(md, "| kernel | {} |", m.kernel);
        let _ = writeln!(md, "| rustc | {} |", m.rustc);
        let _ = writeln!(md, "| date | {} |", m.date);
        let _ = writeln!(md, "| commit | {} |", m.commit);
        let _ = writeln!(md, "| build | {} (pounce-host, libsample_app.so, pounce-baseline) |", self.profile);
        let _ = writeln!(md, "| placement | {} |", self.pinning);
        let command = |program: &str, kind: Kind, extra: &[&str]| {
            let library = if kind == Kind::Baseline { "" } else { " libsample_app.so" };
            format!("`{program} {}{library}`", kind.args(1, extra).join(" "))
        };
        let _ = writeln!(
            md,
            "| servers | thread mode {}; process mode {} (crash recovery: {}); baseline {} (hyper-util auto, handler compiled in) |\n",
            command("pounce-host", Kind::Thread, &[]),
            command("pounce-host", Kind::PROCESS, &[]),
            command("pounce-host", super::crash::KIND, super::crash::SERVER_ARGS),
            command("pounce-baseline", Kind::Baseline, &[]),
        );

        let _ = writeln!(md, "## Summary\n");
        let _ = writeln!(md, "| figure | measured | target | |\n|---|---|---|---|");
        for target in self.targets() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                target.figure,
                target.measured,
                target.target,
                target.verdict.text()
            );
        }
        md.push('\n');

        self.throughput_section(&mut md);
        self.latency_section(&mut md);
        self.storm_section(&mut md);
        self.memory_section(&mut md);
        self.criterion_section(&mut md);
        self.crash_section(&mut md);
        if !self.notes.is_empty() {
            let _ = writeln!(md, "## Notes\n");
            for note in &self.notes {
                let _ = writeln!(md, "- {note}");
            }
            md.push('\n');
        }
        md
    }

    fn throughput_section(&self, md: &mut String) {
        let seconds = self.throughput_seconds;
        let _ = writeln!(md, "## 1-2. Throughput (wrk, h2load)\n");
        let _ = writeln!(
            md,
            "`GET /` for {seconds} s per run, the servers alternating (A B C, then C B A), each run on a fresh server after a 1 s warm-up. Figures are medians over the runs; a ratio is the median of each alternation's ratio (the runs of one alternation are close in time, so they see the same state of this shared machine). Server CPU counts the server process and, in process mode, its worker processes (the supervisor's and the workers' utime + stime); per request, it is the run's server CPU over its requests. Memory is taken right after each run, with the server idle; in process mode it is the supervisor's plus the worker's (RSS counts the pages they share twice, PSS divides them).\n"
        );
        let wrk = format!("`wrk -t1 -c{} -d{seconds}s --latency`", super::wrk::CONNECTIONS);
        match &self.throughput {
            Some(t) => comparison_section(md, "1a-1c. Keep-alive (HTTP/1.1)", &format!("{wrk}."), &t.keep_alive),
            None => {
                let _ = writeln!(md, "HTTP/1.1 not measured: {}.\n", super::wrk::INSTALL_HINT);
            }
        }
        self.http2_section(md);
        let Some(t) = &self.throughput else { return };
        let shared = format!(
            "{wrk}; {}. A scaling check: with as many worker threads as cores, wrk takes CPU from the server, so req/s is lower than with one pinned worker; the ratios and CPU per request are what compare.",
            t.two_workers_placement
        );
        comparison_section(md, &format!("1f. Keep-alive with --workers {TWO_WORKERS}"), &shared, &t.two_workers);
        let close = format!("{wrk} `-H 'Connection: close'`: a new TCP connection for every request.");
        comparison_section(md, "2. New connection per request", &close, &t.close);
    }

    fn http2_section(&self, md: &mut String) {
        let comparison = match &self.http2 {
            Ok(comparison) => comparison,
            Err(why) => {
                let _ = writeln!(md, "### 1d-1e. HTTP/2 (h2c)\n\nNot measured: {why}.\n");
                return;
            }
        };
        let intro = format!(
            "`h2load {}` (HTTP/2 over cleartext with prior knowledge: {} connections with up to {} concurrent streams each). h2load gives latency as mean and max only.",
            super::h2load::args(self.throughput_seconds).join(" "),
            super::h2load::CLIENTS,
            super::h2load::STREAMS
        );
        comparison_section(md, "1d-1e. HTTP/2 (h2c)", &intro, comparison);
        let counts: Vec<String> = comparison
            .servers
            .iter()
            .map(|server| {
                let sum = |f: fn(&H2Result) -> u64| server.runs.iter().map(f).sum::<u64>();
                format!(
                    "{} {} succeeded, {} failed ({} errored, {} timed out)",
                    server.kind.label(),
                    sum(|r| r.succeeded),
                    sum(|r| r.failed),
                    sum(|r| r.errored),
                    sum(|r| r.timeout)
                )
            })
            .collect();
        let _ = writeln!(md, "h2load's request counts over the runs: {}.\n", counts.join("; "));
    }

    fn latency_section(&self, md: &mut String) {
        let l = &self.latency;
        let _ = writeln!(md, "## 3. Latency at a fixed rate\n");
        let _ = writeln!(
            md,
            "{:.0} req/s ({}) for {} s per run over {} keep-alive connections, with xtask's own fixed-rate generator: each request's latency is measured from its *intended* send time (coordinated-omission correction), to the end of the response body. Runs alternate; figures are medians over the runs.\n",
            l.rate, l.rate_source, l.seconds, l.connections
        );
        let _ = writeln!(
            md,
            "| server | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | answered 2xx / scheduled | failed | uncorrected p99 µs | send lag p99 / max µs |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for (label, runs) in [(Kind::Baseline.label(), &l.baseline), (Kind::Thread.label(), &l.pounce)] {
            let [p50, p99, p999, max] = medians(runs);
            let p90 = median(&runs.iter().map(|r| r.p90_us).collect::<Vec<_>>());
            let ok: u64 = runs.iter().map(|r| r.ok).sum();
            let scheduled: u64 = runs.iter().map(|r| r.scheduled).sum();
            let failed: u64 = runs.iter().map(LatencyResult::failures).sum();
            let uncorrected = median(&runs.iter().map(|r| r.uncorrected_p99_us).collect::<Vec<_>>());
            let lag = median(&runs.iter().map(|r| r.send_lag_p99_us).collect::<Vec<_>>());
            let lag_max = runs.iter().map(|r| r.send_lag_max_us).fold(0.0, f64::max);
            let _ = writeln!(
                md,
                "| {label} | {p50:.1} | {p90:.1} | {p99:.1} | {p999:.1} | {max:.0} | {ok} / {scheduled} | {failed} | {uncorrected:.1} | {lag:.1} / {lag_max:.0} |"
            );
        }
        let _ = writeln!(
            md,
            "\n*Uncorrected* is measured from the actual send, as a closed-loop tool would; *send lag* is how late the generator sent (large values would mean the generator, not the server, limited the figures)."
        );
        if l.discarded > 0 {
            let _ = writeln!(
                md,
                "\n{} run(s) were discarded and run again: other work on the machine used more than {} of a core meanwhile, or the generator's send lag p99 exceeded {} µs.",
                l.discarded,
                super::procs::MAX_FOREIGN_CPU,
                super::loadgen::MAX_SEND_LAG_P99_US
            );
        }
        let _ = writeln!(md, "\nthread mode / baseline p99: **{:.2}**\n", l.p99_ratio());
    }

    fn storm_section(&self, md: &mut String) {
        let _ = writeln!(md, "## 4. Reload under load\n");
        let Some(first) = self.storms.first() else { return };
        let _ = writeln!(
            md,
            "For each mode, one server (after a warm-up): {} s of steady load, the same load again while {} SIGHUPs arrive, one every {} ms (signals that arrive during a reload collapse into one more reload), and {} s of steady load after. In process mode each reload starts a new worker process and retires the old one once the new one is ready.\n",
            self.storm_seconds,
            first.signals,
            first.interval.as_millis(),
            self.storm_seconds
        );
        for storm in &self.storms {
            let _ = writeln!(md, "### {}\n", storm.kind.label());
            storm_table(md, storm);
            let (p99, rps) = storm.ratios();
            let _ = writeln!(
                md,
                "\nstorm / steady (the mean of before and after): p99 **{p99:.2}**, throughput **{rps:.3}**\n"
            );
        }
        let _ = writeln!(md, "### Reload times\n");
        let header: Vec<&str> = self.storms.iter().map(|s| s.kind.label()).collect();
        let _ = writeln!(md, "| | {} |\n|---|{}", header.join(" | "), "---|".repeat(header.len()));
        let row = |md: &mut String, label: &str, cell: &dyn Fn(&StormResult) -> String| {
            let cells: Vec<String> = self.storms.iter().map(cell).collect();
            let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
        };
        row(md, "generations published / signals", &|s| format!("{} / {}", s.published, s.signals));
        row(md, "signal → new generation published (during the storm), ms: p50 / p99 / max", &|s| {
            spread(&s.signal_to_published_ms)
        });
        row(md, "signals answered by a published generation", &|s| {
            format!("{} / {}", s.signal_to_published_ms.len(), s.signals)
        });
        row(md, "reload duration (`reload_ms`), ms: p50 / p99 / max", &|s| spread(&s.reload_ms));
        let _ = writeln!(
            md,
            "\n*Signal → new generation published*: from xtask sending each SIGHUP to the `generation_loaded` event of the first reload that started after it (host timestamps), so a signal that arrived during a reload includes the wait for it. *`reload_ms`*: the host's own measure of each published reload, from its start to its publication. Without load (thread mode, the memory phase, {} reloads one at a time, with the preflight in a child process, the default): `reload_ms` p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; with `--preflight off` ({} reloads): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms. The difference is what the preflight adds to a reload.\n",
            self.memory.reload_ms.len(),
            median(&self.memory.reload_ms),
            quantile(&self.memory.reload_ms, 0.99),
            quantile(&self.memory.reload_ms, 1.0),
            self.reload_ms_without_preflight.len(),
            median(&self.reload_ms_without_preflight),
            quantile(&self.reload_ms_without_preflight, 0.99),
            quantile(&self.reload_ms_without_preflight, 1.0),
        );
    }

    fn memory_section(&self, md: &mut String) {
        let _ = writeln!(md, "## 5. Memory across reloads\n");
        let _ = writeln!(
            md,
            "A fresh pounce-host in thread mode, no load; one SIGHUP at a time, each waiting for its `generation_loaded` event. Each figure is taken once the retired generations' unloads are logged (at most 10 s).\n"
        );
        let _ = writeln!(
            md,
            "| reloads | VmRSS MiB | of it anonymous | of it file-backed | app copies mapped | open fds | unloads logged | left mapped |\n|---|---|---|---|---|---|---|---|"
        );
        let mib = |kib: u64| kib as f64 / 1024.0;
        for p in &self.memory.points {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
                p.reloads,
                mib(p.rss_kib),
                mib(p.rss_anon_kib),
                mib(p.rss_file_kib),
                p.mapped_copies,
                p.open_fds,
                p.unloaded,
                p.kept_mapped
            );
        }
        let _ = writeln!(
            md,
            "\nPer reload between the first checkpoint and the last: RSS {:+.2} KiB, open file descriptors {:+.3}.\n",
            self.rss_growth_per_reload_kib(),
            self.fd_growth_per_reload()
        );
    }

    fn criterion_section(&self, md: &mut String) {
        let _ = writeln!(md, "## 6. Request path micro-benchmark (criterion)\n");
        if self.criterion.is_empty() {
            let _ = writeln!(md, "Not run.\n");
            return;
        }
        let _ = writeln!(
            md,
            "`cargo bench -p pounce-host --bench request_path` (host/benches/request_path.rs): `lease` is `Current::lease()` (ArcSwap load + Arc drop); the loopback benchmarks send one request at a time over a keep-alive loopback connection to an in-process server (one worker thread) and wait for the whole response: pounce-host's `Server`/`accept_loop` serving the sample app, and a plain hyper hello server.\n"
        );
        let _ = writeln!(md, "| benchmark | time per request |\n|---|---|");
        for estimate in &self.criterion {
            let shown = estimate.ns.map_or_else(|| "checked, not timed".to_owned(), format_ns);
            let _ = writeln!(md, "| {} | {shown} |", estimate.name);
        }
        let find = |suffix: &str| self.criterion.iter().find(|e| e.name.ends_with(suffix)).and_then(|e| e.ns);
        if let (Some(pounce), Some(baseline)) = (find("pounce_loopback"), find("baseline_loopback")) {
            let _ = writeln!(
                md,
                "\npounce-host − baseline: **{}** per request ({:+.1}%).",
                format_ns(pounce - baseline),
                (pounce / baseline - 1.0) * 100.0
            );
        }
        md.push('\n');
    }

    fn crash_section(&self, md: &mut String) {
        let _ = writeln!(md, "## 7. Crash recovery (process mode)\n");
        let Some(crash) = &self.crash else {
            let _ = writeln!(md, "Not measured.\n");
            return;
        };
        let _ = writeln!(
            md,
            "A process-mode server with {} worker processes and the sample app's fault routes on. {} times, one at a time: `GET /fault/segfault` crashes the worker that takes it; a client (xtask, on the load CPU) then asks `GET /` on new connections every millisecond until the replacement worker answers one (the worker is told by the connection's server-side socket among its descriptors), and the supervisor's log gives when it saw the crash and when the replacement was ready. After each replacement is ready, {} ms pass before the next crash.\n",
            crash.processes,
            crash.crashes,
            super::crash::SETTLE.as_millis()
        );
        let _ = writeln!(md, "| | p50 ms | p99 ms | max ms | samples |\n|---|---|---|---|---|");
        for (label, values) in [
            (
                "crash (the fault request's connection ends) → first `GET /` answered by the replacement (client)",
                &crash.to_serving_ms,
            ),
            ("`worker_crashed` → the replacement's `worker_ready` (supervisor log)", &crash.to_ready_ms),
            ("of it: `worker_crashed` → replacement started", &crash.to_spawn_ms),
            ("of it: replacement started → ready (`startup_ms`: exec, load, init)", &crash.startup_ms),
        ] {
            let _ = writeln!(
                md,
                "| {label} | {:.1} | {:.1} | {:.1} | {} |",
                median(values),
                quantile(values, 0.99),
                quantile(values, 1.0),
                values.len()
            );
        }
        let _ = writeln!(
            md,
            "\nMeanwhile the other worker answered {} `GET /` (the service stayed up); {} replacement(s) were not seen serving within the bound. Percentiles are nearest-rank: with {} samples, p99 is the largest.\n",
            crash.answered_meanwhile,
            crash.unanswered,
            crash.to_serving_ms.len()
        );
    }
}

/// A comparison's subsection: `title`, `intro` (the load and the
/// servers), the table, and each pair's ratios.
fn comparison_section<R: LoadResult>(md: &mut String, title: &str, intro: &str, comparison: &Comparison<R>) {
    let _ = writeln!(md, "### {title}\n\n{intro} Each server with `--workers {}`.\n", comparison.workers);
    comparison_table(md, comparison);
    if comparison.discarded > 0 {
        let _ = writeln!(
            md,
            "\n{} run(s) were discarded and run again: other work on the machine used more than {} of a core meanwhile.",
            comparison.discarded,
            super::procs::MAX_FOREIGN_CPU
        );
    }
    md.push('\n');
    let list = |ratios: Vec<f64>| ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ");
    for (of, to) in [(Kind::Thread, Kind::Baseline), (Kind::PROCESS, Kind::Thread), (Kind::PROCESS, Kind::Baseline)] {
        if comparison.runs(of).is_empty() || comparison.runs(to).is_empty() {
            continue;
        }
        let _ = writeln!(
            md,
            "- {} / {}: throughput **{:.3}** (the alternations' ratios: {}), server CPU per request **{:.3}** ({})",
            of.label(),
            to.label(),
            comparison.ratio(of, to),
            list(comparison.pair_ratios(of, to)),
            comparison.cpu_ratio(of, to),
            list(comparison.pair_ratios_of(of, to, R::cpu_us_per_request)),
        );
    }
    md.push('\n');
    process_memory_line(md, comparison);
}

/// One row per server: throughput, latency, failures, CPU, memory.
fn comparison_table<R: LoadResult>(md: &mut String, comparison: &Comparison<R>) {
    let [first, second] = R::LATENCY;
    let _ = writeln!(
        md,
        "| server | req/s (median) | runs (req/s) | {first} µs | {second} µs | failed | server CPU (cores) | server CPU µs per request | RSS MiB | PSS MiB |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for server in &comparison.servers {
        let runs = &server.runs;
        let of = |f: &dyn Fn(&R) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let list: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.requests_per_sec())).collect();
        let memory =
            |f: fn(&Footprint) -> u64| mib(median(&server.footprints.iter().map(|m| f(m) as f64).collect::<Vec<_>>()));
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {:.0} | {:.0} | {} | {:.2} | {:.2} | {:.1} | {:.1} |",
            server.kind.label(),
            comparison.rps(server.kind),
            list.join(", "),
            of(&|r| r.latency_us()[0]),
            of(&|r| r.latency_us()[1]),
            comparison.failures(server.kind),
            of(&|r| r.cpu().server),
            comparison.cpu_us_per_request(server.kind),
            memory(Footprint::rss_kib),
            memory(Footprint::pss_kib),
        );
    }
}

/// Process mode's memory split into the supervisor and its worker(s):
/// medians over the runs.
fn process_memory_line<R>(md: &mut String, comparison: &Comparison<R>) {
    let Some(server) = comparison.servers.iter().find(|s| matches!(s.kind, Kind::Process { .. })) else { return };
    // Per run: supervisor RSS, PSS; workers RSS, PSS.
    let split: Vec<[u64; 4]> = server
        .footprints
        .iter()
        .filter_map(|footprint| {
            let (supervisor, workers) = footprint.processes.split_first()?;
            let sum = |f: fn(&ProcessMemory) -> u64| workers.iter().map(f).sum();
            Some([supervisor.rss_kib, supervisor.pss_kib, sum(|w| w.rss_kib), sum(|w| w.pss_kib)])
        })
        .collect();
    let column = |i: usize| mib(median(&split.iter().map(|s| s[i] as f64).collect::<Vec<_>>()));
    let _ = writeln!(
        md,
        "{}: supervisor {:.1} MiB RSS ({:.1} PSS) + worker {:.1} MiB RSS ({:.1} PSS).\n",
        server.kind.label(),
        column(0),
        column(1),
        column(2),
        column(3),
    );
}

/// Steady before, storm, steady after: one column each.
fn storm_table(md: &mut String, storm: &StormResult) {
    let _ = writeln!(md, "| | steady before | storm | steady after |\n|---|---|---|---|");
    match &storm.load {
        StormLoad::Wrk { steady: [before, after], storm } => {
            let _ = writeln!(md, "| load | `wrk -t1 -c{}` keep-alive | same | same |", super::wrk::CONNECTIONS);
            let row = |md: &mut String, label: &str, f: &dyn Fn(&WrkResult) -> String| {
                let _ = writeln!(md, "| {label} | {} | {} | {} |", f(before), f(storm), f(after));
            };
            row(md, "req/s", &|r| format!("{:.0}", r.requests_per_sec));
            row(md, "p50 µs", &|r| format!("{:.0}", r.p50_us));
            row(md, "p99 µs", &|r| format!("{:.0}", r.p99_us));
            row(md, "socket errors", &|r| r.socket_errors.total().to_string());
            row(md, "non-2xx", &|r| r.non_2xx.to_string());
            row(md, "server CPU (cores)", &|r| format!("{:.2}", r.cpu.server));
            row(md, "server CPU µs per request", &|r| format!("{:.2}", r.cpu_us_per_request()));
        }
        StormLoad::FixedRate { steady: [before, after], storm } => {
            let _ = writeln!(md, "| load | fixed rate {:.0} req/s (wrk missing) | same | same |", storm.rate);
            let row = |md: &mut String, label: &str, f: &dyn Fn(&LatencyResult) -> String| {
                let _ = writeln!(md, "| {label} | {} | {} | {} |", f(before), f(storm), f(after));
            };
            row(md, "p50 µs", &|r| format!("{:.1}", r.p50_us));
            row(md, "p99 µs", &|r| format!("{:.1}", r.p99_us));
            row(md, "failed", &|r| r.failures().to_string());
            row(md, "server CPU (cores)", &|r| format!("{:.2}", r.cpu.server));
            row(md, "server CPU µs per request", &|r| format!("{:.2}", ratio(r.cpu.server * 1e6, r.rate)));
        }
    }
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

fn format_ns(ns: f64) -> String {
    if ns.abs() >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns.abs() >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
    }

    #[test]
    fn formats_dates_in_utc() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_795_563_045), "2026-11-24 23:30:45 UTC");
    }

    #[test]
    fn formats_durations() {
        assert_eq!(format_ns(12.34), "12.3 ns");
        assert_eq!(format_ns(24_562.0), "24.56 µs");
        assert_eq!(format_ns(-1_500.0), "-1.50 µs");
    }
}
