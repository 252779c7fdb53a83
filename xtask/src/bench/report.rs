//! The results: machine information, the figures, the targets, and the
//! Markdown written to bench/results/latest.md.

use std::fmt::Write as _;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::crash::CrashResult;
use super::criterion::Estimate;
use super::loadgen::LatencyResult;
use super::memory::{Footprint, MemoryResult, ProcessMemory};
use super::procs::Kind;
use super::reload::{StormLoad, StormResult};
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

/// wrk runs of several servers, alternating.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    /// Each server's runs, servers in the order they were given.
    pub servers: Vec<ServerRuns>,
    /// Runs thrown away because other work on the machine disturbed them.
    pub discarded: usize,
}

/// One server's runs of a [`Comparison`], in run order.
#[derive(Clone, Debug)]
pub struct ServerRuns {
    pub kind: Kind,
    pub runs: Vec<WrkResult>,
    /// The server's memory right after each run, before it stopped.
    pub footprints: Vec<Footprint>,
}

impl Comparison {
    pub fn new(kinds: &[Kind]) -> Comparison {
        let servers = kinds.iter().map(|&kind| ServerRuns { kind, runs: Vec::new(), footprints: Vec::new() }).collect();
        Comparison { servers, discarded: 0 }
    }

    pub fn push(&mut self, kind: Kind, result: WrkResult, footprint: Footprint) {
        if let Some(server) = self.servers.iter_mut().find(|s| s.kind == kind) {
            server.runs.push(result);
            server.footprints.push(footprint);
        }
    }

    /// `kind`'s runs; none if it was not compared.
    pub fn runs(&self, kind: Kind) -> &[WrkResult] {
        self.servers.iter().find(|s| s.kind == kind).map_or(&[], |s| &s.runs)
    }

    /// The median throughput of `kind`, requests per second.
    pub fn rps(&self, kind: Kind) -> f64 {
        median(&self.runs(kind).iter().map(|r| r.requests_per_sec).collect::<Vec<_>>())
    }

    /// The median server CPU time per request of `kind`, in microseconds.
    pub fn cpu_us_per_request(&self, kind: Kind) -> f64 {
        median(&self.runs(kind).iter().map(|r| r.cpu.server / r.requests_per_sec * 1e6).collect::<Vec<_>>())
    }

    /// `of`'s throughput relative to `to`'s: the median of the ratios of
    /// each alternation's pair of runs. The runs of one alternation are
    /// close in time, so they share the shared machine's state (which here
    /// can swing throughput by 25% for minutes); a ratio of medians would
    /// compare runs from different states.
    pub fn ratio(&self, of: Kind, to: Kind) -> f64 {
        median(&self.pair_ratios(of, to))
    }

    /// Each alternation's `of`/`to` throughput ratio, in run order.
    pub fn pair_ratios(&self, of: Kind, to: Kind) -> Vec<f64> {
        self.runs(of).iter().zip(self.runs(to)).map(|(a, b)| ratio(a.requests_per_sec, b.requests_per_sec)).collect()
    }
}

#[derive(Clone, Debug)]
pub struct Throughput {
    pub seconds: u64,
    pub keep_alive: Comparison,
    pub close: Comparison,
}

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
    /// `None` when wrk is not installed.
    pub throughput: Option<Throughput>,
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
    /// `None`: not measured in this run.
    pub met: Option<bool>,
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
            met: Some(p99 <= 1.1),
        });
        for (storm, [first, second]) in self.storms.iter().zip([["4a", "4b"], ["4c", "4d"]]) {
            let mode = storm.kind.label().trim_start_matches("pounce-host ");
            let failures = storm.failures();
            targets.push(Target {
                figure: format!("{first}. reload storm, {mode}: failed requests + socket errors"),
                measured: failures.to_string(),
                target: "0".to_owned(),
                met: Some(failures == 0),
            });
            let (p99_storm, _) = storm.ratios();
            targets.push(Target {
                figure: format!("{second}. reload storm, {mode}: p99 during the storm / steady state"),
                measured: format!("{p99_storm:.2}"),
                target: "<= 1.5".to_owned(),
                met: Some(p99_storm <= 1.5),
            });
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
            met: Some(self.memory_flat()),
        });
        targets.push(self.crash_target());
        targets
    }

    /// 1a, 1b and 2: throughput ratios, with server CPU per request.
    fn throughput_targets(&self) -> Vec<Target> {
        type Select = fn(&Throughput) -> &Comparison;
        let (keep_alive, close): (Select, Select) = (|t| &t.keep_alive, |t| &t.close);
        let rows = [
            ("1a. keep-alive throughput, thread mode / baseline", keep_alive, Kind::Thread, Kind::Baseline, 0.97),
            (
                "1b. keep-alive throughput, process mode (1 worker process) / thread mode",
                keep_alive,
                Kind::PROCESS,
                Kind::Thread,
                0.95,
            ),
            ("2. new connection per request, thread mode / baseline", close, Kind::Thread, Kind::Baseline, 0.95),
        ];
        rows.iter()
            .map(|&(figure, select, of, to, minimum)| {
                let Some(comparison) = self.throughput.as_ref().map(select) else {
                    return Target {
                        figure: figure.to_owned(),
                        measured: "not measured (wrk missing)".to_owned(),
                        target: String::new(),
                        met: None,
                    };
                };
                let value = comparison.ratio(of, to);
                Target {
                    figure: figure.to_owned(),
                    measured: format!(
                        "{value:.3} (medians {:.0} / {:.0} req/s; server CPU {:.2} / {:.2} µs per request)",
                        comparison.rps(of),
                        comparison.rps(to),
                        comparison.cpu_us_per_request(of),
                        comparison.cpu_us_per_request(to)
                    ),
                    target: format!(">= {minimum}"),
                    met: Some(value >= minimum),
                }
            })
            .collect()
    }

    /// 7: crash to replacement serving.
    fn crash_target(&self) -> Target {
        let figure = "7. process mode: crash to replacement serving, p99".to_owned();
        let Some(crash) = &self.crash else {
            return Target { figure, measured: "not measured".to_owned(), target: String::new(), met: None };
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
            met: Some(crash.unanswered == 0 && !crash.to_serving_ms.is_empty() && p99 <= CRASH_P99_MS),
        }
    }

    pub fn missed(&self) -> Vec<Target> {
        self.targets().into_iter().filter(|t| t.met == Some(false)).collect()
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
            let verdict = match target.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "skipped",
            };
            let _ = writeln!(md, "| {} | {} | {} | {verdict} |", target.figure, target.measured, target.target);
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
        let _ = writeln!(md, "## 1-2. Throughput (wrk)\n");
        let Some(throughput) = &self.throughput else {
            let _ = writeln!(md, "Not measured: {}.\n", super::wrk::INSTALL_HINT);
            return;
        };
        let _ = writeln!(
            md,
            "`wrk -t1 -c{} -d{}s --latency` on `GET /`, the servers alternating (A B C, then C B A), each run on a fresh server after a 1 s warm-up. Figures are medians over the runs; a ratio is the median of each alternation's ratio (the runs of one alternation are close in time, so they see the same state of this shared machine). Server CPU counts the server process and, in process mode, its worker processes (the supervisor's and the workers' utime + stime). Memory is taken right after each run, with the server idle; in process mode it is the supervisor's plus the worker's (RSS counts the pages they share twice, PSS divides them).\n",
            super::wrk::CONNECTIONS,
            throughput.seconds
        );
        for (title, comparison) in [
            ("Keep-alive", &throughput.keep_alive),
            ("New connection per request (`-H 'Connection: close'`)", &throughput.close),
        ] {
            let _ = writeln!(md, "### {title}\n");
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
            for (of, to) in
                [(Kind::Thread, Kind::Baseline), (Kind::PROCESS, Kind::Thread), (Kind::PROCESS, Kind::Baseline)]
            {
                if comparison.runs(of).is_empty() || comparison.runs(to).is_empty() {
                    continue;
                }
                let pairs: Vec<String> = comparison.pair_ratios(of, to).iter().map(|r| format!("{r:.3}")).collect();
                let _ = writeln!(
                    md,
                    "- {} / {}: **{:.3}** (the alternations' ratios: {})",
                    of.label(),
                    to.label(),
                    comparison.ratio(of, to),
                    pairs.join(", ")
                );
            }
            md.push('\n');
            process_memory_line(md, comparison);
        }
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
        let spread = |values: &[f64]| {
            format!("{:.1} / {:.1} / {:.1}", median(values), quantile(values, 0.99), quantile(values, 1.0))
        };
        row(md, "generations published / signals", &|s| format!("{} / {}", s.published, s.signals));
        row(md, "signal → new generation published, ms: p50 / p99 / max", &|s| spread(&s.signal_to_published_ms));
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

/// One row per server: throughput, latency, errors, CPU, memory.
fn comparison_table(md: &mut String, comparison: &Comparison) {
    let _ = writeln!(
        md,
        "| server | req/s (median) | runs (req/s) | p50 µs | p99 µs | errors | server CPU (cores) | server CPU µs per request | RSS MiB | PSS MiB |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for server in &comparison.servers {
        let runs = &server.runs;
        let of = |f: fn(&WrkResult) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let list: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.requests_per_sec)).collect();
        let errors: u64 = runs.iter().map(WrkResult::failures).sum();
        let memory =
            |f: fn(&Footprint) -> u64| mib(median(&server.footprints.iter().map(|m| f(m) as f64).collect::<Vec<_>>()));
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {:.0} | {:.0} | {errors} | {:.2} | {:.2} | {:.1} | {:.1} |",
            server.kind.label(),
            comparison.rps(server.kind),
            list.join(", "),
            of(|r| r.p50_us),
            of(|r| r.p99_us),
            of(|r| r.cpu.server),
            comparison.cpu_us_per_request(server.kind),
            memory(Footprint::rss_kib),
            memory(Footprint::pss_kib),
        );
    }
}

/// Process mode's memory split into the supervisor and its worker(s):
/// medians over the runs.
fn process_memory_line(md: &mut String, comparison: &Comparison) {
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
