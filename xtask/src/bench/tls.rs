//! `cargo xtask bench-tls`: HTTPS keep-alive throughput of pounce-host
//! (`--tls-cert/--tls-key`) against the baseline in its TLS mode, both with
//! the same rustls setup (ring, TLS 1.3, ALPN `http/1.1` here), one server
//! thread each, pinned like `cargo xtask bench` (server and load on their
//! own CPUs), alternated ABBA, medians over the rounds.
//!
//! The load is `wrk -t1 -c64` over HTTPS (Debian's wrk is built with
//! OpenSSL) on the load CPU, as in `cargo xtask bench`; without wrk, a
//! closed-loop rustls client: `--connections` keep-alive TLS connections,
//! each with one request in flight, from a single-threaded runtime (much
//! slower than wrk: the server is then not saturated). Figures: requests
//! per second, and the server's CPU time per request (from its `/proc`
//! accounting). Written to `bench/results/tls-latest.md` and printed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use pounce_devkit::{ready_address, workspace};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::procs::{self, pin_current_thread, CpuWatch, Kind, Pinning, Proc};
use super::wrk;

struct Settings {
    seconds: u64,
    rounds: usize,
    connections: usize,
}

const USAGE: &str =
    "usage: cargo xtask bench-tls [--seconds N (5)] [--rounds N (3)] [--connections N (16, without wrk only)]";

fn settings(args: &[String]) -> Result<Option<Settings>> {
    let mut settings = Settings { seconds: 5, rounds: 3, connections: 16 };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut number = || -> Result<u64> {
            let value = args.next().ok_or_else(|| anyhow!("{flag} needs a value"))?;
            value.parse().ok().filter(|n| *n > 0).ok_or_else(|| anyhow!("{flag}: expected a positive integer"))
        };
        match flag.as_str() {
            "--seconds" => settings.seconds = number()?.min(600),
            "--rounds" => settings.rounds = number()?.min(100) as usize,
            "--connections" => settings.connections = number()?.min(1000) as usize,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(settings))
}

pub fn main(args: Vec<String>) -> Result<()> {
    let Some(settings) = settings(&args)? else { return Ok(()) };
    procs::install_interrupt_handler();
    eprintln!("bench-tls: building (release)");
    let binaries = procs::build(true)?;
    let pinning = Pinning::detect();
    eprintln!("bench-tls: {}", pinning.description);
    let dir = std::env::temp_dir().join(format!("pounce-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).context("make a certificate")?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem())?;
    std::fs::write(&key, made.key_pair.serialize_pem())?;
    let der = made.cert.der().to_vec();
    let result = rounds(&settings, &binaries, &pinning, &cert, &key, &der);
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    print!("{report}");
    let path = workspace().join("bench/results/tls-latest.md");
    std::fs::write(&path, &report).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("bench-tls: written to {}", path.display());
    Ok(())
}

/// One measurement: requests per second and server CPU microseconds per
/// request.
#[derive(Clone, Copy)]
struct Run {
    rate: f64,
    cpu_us: f64,
}

fn rounds(
    settings: &Settings,
    binaries: &procs::Binaries,
    pinning: &Pinning,
    cert: &Path,
    key: &Path,
    der: &[u8],
) -> Result<String> {
    let wrk = wrk::find();
    let mut runs: Vec<(Kind, Run)> = Vec::new();
    for round in 0..settings.rounds {
        let order = if round % 2 == 0 { [Kind::Thread, Kind::Baseline] } else { [Kind::Baseline, Kind::Thread] };
        for kind in order {
            procs::check_interrupted()?;
            let mut command = match kind {
                Kind::Thread | Kind::Process { .. } => {
                    let mut command = pinning.command(pinning.server_cpu, &binaries.host);
                    command.args(kind.args(1, &[]));
                    command.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key).arg(&binaries.app);
                    command
                }
                Kind::Baseline => {
                    let mut command = pinning.command(pinning.server_cpu, &binaries.baseline);
                    command.args(["--port", "0", "--workers", "1"]);
                    command.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
                    command
                }
            };
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("POUNCE_") {
                    command.env_remove(name);
                }
            }
            let mut server = Proc::spawn(kind.label(), command)?;
            let Some((addr, _)) = server.stderr.wait_for(0, Duration::from_secs(30), ready_address) else {
                server.stop();
                bail!("{} did not start:\n{}", kind.label(), server.stderr.text());
            };
            // Warm-up, then the measurement.
            let duration = Duration::from_secs(settings.seconds);
            let (rate, cpu) = match &wrk {
                Some(wrk) => {
                    let url = format!("https://{addr}/");
                    wrk::run(wrk, pinning, &url, 1, wrk::Mode::KeepAlive)?;
                    let watch = CpuWatch::start(server.pid())?;
                    let result = wrk::run(wrk, pinning, &url, settings.seconds, wrk::Mode::KeepAlive)?;
                    let cpu = watch.finish()?;
                    if result.failures() > 0 {
                        bail!("{}: {} failed requests under wrk", kind.label(), result.failures());
                    }
                    (result.requests_per_sec, cpu)
                }
                None => {
                    load(addr, der, settings.connections, Duration::from_secs(1), pinning.load_cpu)?;
                    let watch = CpuWatch::start(server.pid())?;
                    let requests = load(addr, der, settings.connections, duration, pinning.load_cpu)?;
                    (requests as f64 / duration.as_secs_f64(), watch.finish()?)
                }
            };
            server.stop();
            let cpu_us = cpu.server * 1e6 / rate.max(1.0);
            eprintln!("bench-tls: round {} {}: {rate:.0} req/s, {cpu_us:.2} µs CPU/request", round + 1, kind.label());
            runs.push((kind, Run { rate, cpu_us }));
        }
    }
    let median = |kind: Kind, pick: fn(&Run) -> f64| {
        let mut values: Vec<f64> = runs.iter().filter(|(k, _)| *k == kind).map(|(_, run)| pick(run)).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (pounce_rate, base_rate) = (median(Kind::Thread, |r| r.rate), median(Kind::Baseline, |r| r.rate));
    let (pounce_cpu, base_cpu) = (median(Kind::Thread, |r| r.cpu_us), median(Kind::Baseline, |r| r.cpu_us));
    Ok(format!(
        "# HTTPS keep-alive: pounce-host against the baseline\n\n\
         `cargo xtask bench-tls --seconds {} --rounds {}`: TLS 1.3, HTTP/1.1, `GET /`, {}, \
         one server thread; {}.\n\n\
         | server | requests/s (median) | server CPU per request |\n|---|---|---|\n\
         | baseline (hyper + rustls, handler compiled in) | {base_rate:.0} | {base_cpu:.2} µs |\n\
         | pounce-host (--tls-cert) | {pounce_rate:.0} | {pounce_cpu:.2} µs |\n\
         | ratio | {:.3}x | {:.3}x |\n",
        settings.seconds,
        settings.rounds,
        match wrk {
            Some(_) => format!("`wrk -t1 -c{}` keep-alive", wrk::CONNECTIONS),
            None => format!(
                "{} keep-alive connections of a rustls client (closed loop; wrk not found)",
                settings.connections
            ),
        },
        pinning.description,
        pounce_rate / base_rate,
        pounce_cpu / base_cpu,
    ))
}

/// `connections` keep-alive HTTPS connections requesting `GET /` for
/// `duration`, from a single-threaded runtime (pinned to `cpu`); returns
/// how many requests succeeded.
fn load(addr: SocketAddr, der: &[u8], connections: usize, duration: Duration, cpu: Option<usize>) -> Result<u64> {
    let der = der.to_vec();
    let thread = std::thread::spawn(move || -> Result<u64> {
        if let Some(cpu) = cpu {
            pin_current_thread(cpu)?;
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let local = tokio::task::LocalSet::new();
        runtime.block_on(local.run_until(async move {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from(der))?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let connector = TlsConnector::from(Arc::new(config));
            let deadline = Instant::now() + duration;
            let host = HeaderValue::from_str(&addr.to_string())?;
            let tasks: Vec<_> = (0..connections)
                .map(|_| {
                    let (connector, host) = (connector.clone(), host.clone());
                    tokio::task::spawn_local(connection(addr, connector, host, deadline))
                })
                .collect();
            let mut total = 0;
            for task in tasks {
                total += task.await??;
            }
            Ok(total)
        }))
    });
    thread.join().map_err(|_| anyhow!("the load thread panicked"))?
}

async fn connection(addr: SocketAddr, connector: TlsConnector, host: HeaderValue, deadline: Instant) -> Result<u64> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let tls = connector.connect(ServerName::from(addr.ip()), stream).await?;
    let (mut sender, driver) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls)).await?;
    tokio::task::spawn_local(driver);
    let mut done = 0;
    while Instant::now() < deadline {
        let request = Request::get("/").header(HOST, host.clone()).body(Empty::new())?;
        let response = sender.send_request(request).await?;
        if !response.status().is_success() {
            bail!("status {}", response.status());
        }
        response.into_body().collect().await?;
        done += 1;
    }
    Ok(done)
}
