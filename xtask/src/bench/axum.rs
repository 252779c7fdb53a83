//! `cargo xtask bench-axum`: keep-alive throughput of the axum example
//! (`examples/axum-app`) served by pounce-host against the same router under
//! plain `axum::serve` (the example's binary), in one run: release builds,
//! the server pinned to one core and wrk to the other, the two servers
//! alternating ABBA, medians and the ratio. Both serve with one worker
//! thread, as `cargo xtask bench` runs pounce-host. Then memory across
//! reloads of the axum app: RSS and copies of the library mapped.
//!
//! It reuses `bench`'s processes, pinning, CPU accounting and wrk, and is
//! its own task so that it stays out of `bench`'s way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use pounce_devkit::{ready_address, target_dir, workspace};

use super::memory::{self, MemoryResult};
use super::procs::{self, Pinning, Proc, Server};
use super::throughput::watched;
use super::wrk::{self, WrkResult};

const USAGE: &str = "\
usage: cargo xtask bench-axum [--duration SECS] [--runs N] [--reloads N] [--out FILE]

Keep-alive throughput (wrk -t1 -c64) of examples/axum-app: pounce-host
serving libaxum_app.so against the same router under axum::serve, release
builds, server and wrk pinned to separate cores, alternating; then RSS and
app copies mapped after 100 and N reloads of it. Prints the figures and
writes them to bench/results/axum.md.

  --duration SECS  length of each run (default 5)
  --runs N         alternations (default 3)
  --reloads N      reloads for the memory figures (default 1000; 0: none)
  --out FILE       where to write the Markdown
";

/// A run with more foreign CPU than this is run again (at most twice).
const RETRIES: usize = 2;
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    AxumServe,
    Pounce,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::AxumServe => "axum::serve",
            Kind::Pounce => "pounce-host",
        }
    }
}

struct Binaries {
    host: PathBuf,
    app: PathBuf,
    axum_serve: PathBuf,
}

/// `cargo xtask bench-axum ARGS`.
pub fn main(args: Vec<String>) -> Result<()> {
    let (mut seconds, mut runs, mut reloads) = (5u64, 3usize, 1000usize);
    let mut out = workspace().join("bench/results/axum.md");
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().with_context(|| format!("{flag} needs a value\n\n{USAGE}"));
        match flag.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--duration" => seconds = value()?.parse().context("--duration: seconds")?,
            "--runs" => runs = value()?.parse().context("--runs: a number")?,
            "--reloads" => reloads = value()?.parse().context("--reloads: a number")?,
            "--out" => out = PathBuf::from(value()?),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    if !(1..=600).contains(&seconds) || !(1..=20).contains(&runs) {
        bail!("--duration: 1 to 600 seconds; --runs: 1 to 20");
    }
    procs::install_interrupt_handler();
    let wrk = wrk::find().with_context(|| wrk::INSTALL_HINT)?;
    let binaries = build()?;
    let pinning = Pinning::detect();
    eprintln!("==> placement: {}", pinning.description);
    let (mut axum, mut pounce) = (Vec::new(), Vec::new());
    for round in 0..runs {
        let order = if round % 2 == 0 { [Kind::AxumServe, Kind::Pounce] } else { [Kind::Pounce, Kind::AxumServe] };
        for kind in order {
            eprintln!("==> keep-alive, run {}/{runs}: {} for {seconds} s", round + 1, kind.label());
            let result = measure(kind, &binaries, &pinning, &wrk, seconds)?;
            match kind {
                Kind::AxumServe => axum.push(result),
                Kind::Pounce => pounce.push(result),
            }
        }
    }
    let memory = match reloads {
        0 => None,
        reloads => {
            eprintln!("==> memory: reloads of the axum app one at a time, up to {reloads}");
            let (proc, addr) = start(Kind::Pounce, &binaries, &pinning)?;
            let server = Server { addr, proc };
            let mut checkpoints: Vec<usize> = [100, reloads].into_iter().filter(|&n| n <= reloads).collect();
            checkpoints.dedup();
            Some(memory::run(&server, &checkpoints)?)
        }
    };
    let mut markdown = report(&axum, &pounce, seconds, &pinning, &args);
    if let Some(memory) = &memory {
        markdown.push_str(&memory_report(memory));
    }
    println!("\n{markdown}");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, markdown).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("written to {}", out.display());
    Ok(())
}

/// Release builds: pounce-host, and the example (its library and its
/// binary) on its own, as an app is built apart from the host.
fn build() -> Result<Binaries> {
    for package in ["pounce-host", "axum-app"] {
        eprintln!("==> building {package} (release)");
        let status = procs::cargo().args(["build", "--quiet", "--release", "-p", package]).status()?;
        if !status.success() {
            bail!("cargo build --release -p {package} failed ({status})");
        }
    }
    let dir = target_dir().join("release");
    Ok(Binaries {
        host: dir.join("pounce-host"),
        app: dir.join("libaxum_app.so"),
        axum_serve: dir.join("axum-app-serve"),
    })
}

/// Starts `kind` on the server core, warms it up, and measures one run,
/// again while other work on the machine disturbs it (at most [`RETRIES`]).
fn measure(kind: Kind, binaries: &Binaries, pinning: &Pinning, wrk: &Path, seconds: u64) -> Result<WrkResult> {
    let (mut proc, addr) = start(kind, binaries, pinning)?;
    let url = format!("http://{addr}/");
    wrk::run(wrk, pinning, &url, 1, wrk::Mode::KeepAlive)?;
    let mut attempt = 0;
    loop {
        procs::wait_for_quiet(Duration::from_secs(30))?;
        let result = watched(proc.pid(), || wrk::run(wrk, pinning, &url, seconds, wrk::Mode::KeepAlive))?;
        if !result.cpu.disturbed() || attempt == RETRIES {
            proc.stop();
            return Ok(result);
        }
        eprintln!("    discarded: other work ran meanwhile; running again");
        attempt += 1;
    }
}

fn start(kind: Kind, binaries: &Binaries, pinning: &Pinning) -> Result<(Proc, SocketAddr)> {
    let mut command = match kind {
        Kind::Pounce => {
            let mut command = pinning.command(pinning.server_cpu, &binaries.host);
            command.args(["serve", "--port", "0", "--log-format", "text", "--workers", "1"]).arg(&binaries.app);
            command
        }
        Kind::AxumServe => {
            let mut command = pinning.command(pinning.server_cpu, &binaries.axum_serve);
            command.env("AXUM_APP_ADDR", "127.0.0.1:0").env("AXUM_APP_THREADS", "1");
            command
        }
    };
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("POUNCE_") {
            command.env_remove(key);
        }
    }
    let mut proc = Proc::spawn(kind.label(), command)?;
    let found = match kind {
        Kind::Pounce => proc.stderr.wait_for(0, START_TIMEOUT, ready_address),
        Kind::AxumServe => proc
            .stdout
            .wait_for(0, START_TIMEOUT, |line| line.strip_prefix("listening on ")?.trim().parse::<SocketAddr>().ok()),
    };
    match found {
        Some((addr, _)) => Ok((proc, addr)),
        None => {
            proc.stop();
            bail!("{} did not start: {}{}", kind.label(), proc.stdout.text(), proc.stderr.text())
        }
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Server CPU per request, in µs.
fn cpu_per_request(result: &WrkResult) -> f64 {
    match result.requests {
        0 => 0.0,
        requests => result.cpu.server * result.seconds * 1e6 / requests as f64,
    }
}

fn report(axum: &[WrkResult], pounce: &[WrkResult], seconds: u64, pinning: &Pinning, args: &[String]) -> String {
    let row = |label: &str, results: &[WrkResult]| {
        format!(
            "| {label} | {:.0} | {:.0} | {:.0} | {:.2} | {} |\n",
            median(results.iter().map(|r| r.requests_per_sec)),
            median(results.iter().map(|r| r.p99_us)),
            median(results.iter().map(|r| r.cpu.server)),
            median(results.iter().map(cpu_per_request)),
            results.iter().map(WrkResult::failures).sum::<u64>(),
        )
    };
    let ratio = median(pounce.iter().map(|r| r.requests_per_sec)) / median(axum.iter().map(|r| r.requests_per_sec));
    let cpu_ratio = median(pounce.iter().map(cpu_per_request)) / median(axum.iter().map(cpu_per_request));
    let each: Vec<String> = axum
        .iter()
        .zip(pounce)
        .map(|(a, p)| format!("{:.0} / {:.0}", a.requests_per_sec, p.requests_per_sec))
        .collect();
    format!(
        "# The axum example: pounce-host against axum::serve\n\n\
         `cargo xtask bench-axum {}`: `GET /` (`Hello, World!`) of `examples/axum-app`, \
         keep-alive, wrk -t1 -c64, {seconds} s per run, {} runs each, alternating; \
         one worker thread each; {}.\n\n\
         | server | req/s (median) | p99 µs | server cores | server CPU µs/request | failures |\n\
         |---|---:|---:|---:|---:|---:|\n{}{}\n\
         pounce-host / axum::serve throughput: **{ratio:.3}x** (target ≥ 0.95x); \
         server CPU per request: {cpu_ratio:.3}x.\n\n\
         Each run (axum::serve / pounce-host req/s): {}.\n",
        args.join(" "),
        axum.len(),
        pinning.description,
        row("axum::serve", axum),
        row("pounce-host + libaxum_app.so", pounce),
        each.join("; "),
    )
}

fn memory_report(memory: &MemoryResult) -> String {
    let mut text = String::from(
        "\n## Memory across reloads of the axum app\n\n\
         | reloads | RSS MiB | anon MiB | file MiB | app copies mapped | open fds | unloads kept mapped |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for point in &memory.points {
        text.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |\n",
            point.reloads,
            point.rss_kib as f64 / 1024.0,
            point.rss_anon_kib as f64 / 1024.0,
            point.rss_file_kib as f64 / 1024.0,
            point.mapped_copies,
            point.open_fds,
            point.kept_mapped
        ));
    }
    text.push_str(&format!(
        "\nReload (median `reload_ms`): {:.1} ms over {} reloads.\n",
        median(memory.reload_ms.iter().copied()),
        memory.reload_ms.len()
    ));
    text
}
