//! The sample app: the routes that pounce-host's tests, benchmarks and README
//! use. Build it with `cargo build -p sample-app`; it lands at
//! `target/debug/libsample_app.so`.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | `200 text/plain` `Hello, World!` |
//! | `GET /version` | the greeting fixed at build time (`SAMPLE_GREETING`) and the generation |
//! | `GET /sleep?ms=N` | waits N ms (asynchronously), then `200` |
//! | `GET /blocking?ms=N` | waits N ms on the generation's blocking pool, then `200` |
//! | `GET /stream?chunks=N&interval_ms=M&size=B` | N server-sent events, one every M ms (`0`: as fast as the client reads), each after a comment line of B colons (default 0) |
//! | `GET /events` | one event a second until the generation drains |
//! | `POST /echo` | the request body back |
//! | `GET /upgrade` (with `Upgrade: echo`) | `101`, then every byte sent comes back |
//! | `GET /panic` | the handler panics (the client gets `500`) |
//! | `GET /fault/...` | crashes, exits, blocks or spins on purpose, with `--app-arg faults=on` (see `faults.rs`) |

mod faults;

use std::time::Duration;

use app_abi::tokio::time::sleep;
use app_abi::{export_app, tracing, App, BodyError, DrainSignal, InitContext, InitError, Request, Response};

/// The greeting `/version` answers; set `SAMPLE_GREETING` when building to
/// tell two builds apart.
const GREETING: &str = match option_env!("SAMPLE_GREETING") {
    Some(greeting) => greeting,
    None => "Hello from sample-app",
};

/// Longest wait `/sleep`, `/blocking` and `/stream` accept, so a typo cannot
/// park a request for hours.
const MAX_WAIT_MS: u64 = 600_000;

/// Largest padding `/stream` puts before each event.
const MAX_PADDING: usize = 1 << 20;

struct SampleApp {
    generation: u64,
    drain: DrainSignal,
    /// `--app-arg drain_delay_ms=N`: `drain` blocks N ms (an app whose
    /// drain hangs).
    drain_delay: Duration,
    /// `--app-arg shutdown_delay_ms=N`: `shutdown` blocks N ms.
    shutdown_delay: Duration,
    /// `--app-arg faults=on`: the `/fault/...` routes misbehave.
    faults: bool,
}

impl App for SampleApp {
    /// Test knobs: `--app-arg fail_init=panic` makes init panic and any other
    /// value makes it fail; `--app-arg init_delay_ms=N` makes init take N ms
    /// (to send a signal in the middle of a reload); `--app-arg
    /// drain_delay_ms=N` makes `drain` block N ms, `--app-arg
    /// shutdown_delay_ms=N` makes `shutdown` block N ms; `--app-arg
    /// detached_thread=yes` starts a thread that outlives the generation
    /// (named `sample-detached`, it never ends), as a careless app would.
    fn init(ctx: &InitContext) -> Result<Self, InitError> {
        if let Some(delay) = ctx.setting("init_delay_ms") {
            let ms: u64 =
                delay.parse().map_err(|_| format!("init_delay_ms={delay:?} is not a number of milliseconds"))?;
            tracing::info!(ms, "init waits before it returns");
            std::thread::sleep(Duration::from_millis(ms.min(MAX_WAIT_MS)));
        }
        match ctx.setting("fail_init") {
            Some("panic") => panic!("sample-app: init panicked because fail_init=panic"),
            Some(_) => return Err("sample-app: init failed because fail_init is set".into()),
            None => {}
        }
        faults::built_in("init");
        if ctx.setting("detached_thread").is_some() {
            std::thread::Builder::new()
                .name("sample-detached".to_owned())
                .spawn(|| loop {
                    std::thread::sleep(Duration::from_millis(100));
                })
                .map_err(|e| format!("sample-app: cannot start the detached thread: {e}"))?;
        }
        tracing::info!(greeting = GREETING, "sample-app ready");
        let faults = ctx.setting("faults") == Some("on");
        let drain_delay = delay_setting(ctx, "drain_delay_ms")?;
        let shutdown_delay = delay_setting(ctx, "shutdown_delay_ms")?;
        Ok(SampleApp { generation: ctx.generation(), drain: ctx.drain_signal(), drain_delay, shutdown_delay, faults })
    }

    async fn handle(&self, req: Request<'_>) -> Response {
        if self.faults && req.method() == "GET" {
            if let Some(response) = faults::route(&req, req.path()) {
                return response;
            }
        }
        match (req.method(), req.path()) {
            ("GET", "/") => {
                faults::built_in("serve");
                Response::text("Hello, World!")
            }
            ("GET", "/version") => Response::text(format!("{GREETING} (generation {})\n", self.generation)),
            ("GET", "/sleep") => self.sleep(&req).await,
            ("GET", "/blocking") => blocking(&req).await,
            ("GET", "/stream") => stream(&req),
            ("GET", "/events") => self.events(),
            ("POST", "/echo") => echo(req).await,
            ("GET", "/panic") => panic!("sample-app: /panic was requested"),
            ("GET", "/upgrade") if req.is_upgrade() => upgrade_echo(),
            ("GET", "/upgrade") => Response::text("upgrade required\n").with_status(426).with_header("upgrade", "echo"),
            (
                _,
                "/" | "/version" | "/sleep" | "/blocking" | "/stream" | "/events" | "/echo" | "/panic" | "/upgrade",
            ) => Response::text("method not allowed\n").with_status(405),
            _ => Response::text("not found\n").with_status(404),
        }
    }

    fn drain(&self) {
        tracing::info!(generation = self.generation, "sample-app draining");
        std::thread::sleep(self.drain_delay);
    }

    fn shutdown(&self) {
        if !self.shutdown_delay.is_zero() {
            tracing::info!(generation = self.generation, ms = self.shutdown_delay.as_millis(), "shutdown blocks");
            std::thread::sleep(self.shutdown_delay);
        }
    }
}

/// `--app-arg NAME=N`, a number of milliseconds (at most [`MAX_WAIT_MS`]), or zero.
fn delay_setting(ctx: &InitContext, name: &str) -> Result<Duration, InitError> {
    match ctx.setting(name).map(str::parse::<u64>) {
        Some(Ok(ms)) => Ok(Duration::from_millis(ms.min(MAX_WAIT_MS))),
        Some(Err(_)) => Err(format!("{name} is not a number of milliseconds").into()),
        None => Ok(Duration::ZERO),
    }
}

impl SampleApp {
    async fn sleep(&self, req: &Request<'_>) -> Response {
        let ms = match millis(req, "ms") {
            Ok(ms) => ms,
            Err(bad) => return bad,
        };
        let mut report = CancelReport { ms, finished: false };
        sleep(Duration::from_millis(ms)).await;
        report.finished = true;
        Response::text(format!("slept {ms} ms (generation {})\n", self.generation))
    }

    /// An endless event stream that ends when the generation drains, so a
    /// reload is not held up by it.
    fn events(&self) -> Response {
        let (response, body) = Response::channel("text/event-stream", 4);
        let drain = self.drain.clone();
        let generation = self.generation;
        app_abi::tokio::spawn(async move {
            for n in 0u64.. {
                let event = format!("data: tick {n} (generation {generation})\n\n");
                if body.send(event).await.is_err() {
                    return;
                }
                app_abi::tokio::select! {
                    _ = sleep(Duration::from_secs(1)) => {}
                    _ = drain.drained() => {
                        let _ = body.send("event: drain\ndata: generation is draining\n\n").await;
                        return;
                    }
                }
            }
        });
        response
    }
}

/// `101`, then an echo of every byte on the connection until the client ends it.
fn upgrade_echo() -> Response {
    Response::upgrade(|io| async move {
        let (mut reader, mut writer) = app_abi::tokio::io::split(io);
        let _ = app_abi::tokio::io::copy(&mut reader, &mut writer).await;
    })
    .with_header("connection", "upgrade")
    .with_header("upgrade", "echo")
}

/// Logs when a `/sleep` handler is dropped before it finished (the host
/// cancelled it: a timeout, a retired generation, a client gone), so tests
/// can see the cancellation reach the app.
struct CancelReport {
    ms: u64,
    finished: bool,
}

impl Drop for CancelReport {
    fn drop(&mut self) {
        if !self.finished {
            tracing::info!(ms = self.ms, "sleep handler cancelled before it finished");
        }
    }
}

/// Reads query parameter `name` as milliseconds, or answers `400`.
fn millis(req: &Request<'_>, name: &str) -> Result<u64, Response> {
    let raw = req.query_param(name).unwrap_or("0");
    match raw.parse::<u64>() {
        Ok(ms) if ms <= MAX_WAIT_MS => Ok(ms),
        _ => Err(Response::text(format!("{name} must be a whole number of milliseconds up to {MAX_WAIT_MS}\n"))
            .with_status(400)),
    }
}

async fn blocking(req: &Request<'_>) -> Response {
    let ms = match millis(req, "ms") {
        Ok(ms) => ms,
        Err(bad) => return bad,
    };
    let waited = app_abi::tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_millis(ms))).await;
    match waited {
        Ok(()) => Response::text(format!("blocked {ms} ms on the blocking pool\n")),
        Err(e) => Response::text(format!("blocking task failed: {e}\n")).with_status(500),
    }
}

fn stream(req: &Request<'_>) -> Response {
    let chunks = match req.query_param("chunks").unwrap_or("5").parse::<u64>() {
        Ok(n) if n <= 100_000 => n,
        _ => return Response::text("chunks must be a whole number up to 100000\n").with_status(400),
    };
    let interval = match millis(req, "interval_ms") {
        Ok(ms) => Duration::from_millis(ms),
        Err(bad) => return bad,
    };
    let padding = match req.query_param("size").unwrap_or("0").parse::<usize>() {
        Ok(n) if n <= MAX_PADDING => ":".repeat(n),
        _ => return Response::text(format!("size must be a whole number up to {MAX_PADDING}\n")).with_status(400),
    };
    let (response, body) = Response::channel("text/event-stream", 4);
    app_abi::tokio::spawn(async move {
        for n in 1..=chunks {
            // `interval_ms=0`: as fast as the client reads.
            if n > 1 && !interval.is_zero() {
                sleep(interval).await;
            }
            let event = match padding.is_empty() {
                true => format!("data: chunk {n} of {chunks}\n\n"),
                false => format!("{padding}\ndata: chunk {n} of {chunks}\n\n"),
            };
            if body.send(event).await.is_err() {
                return;
            }
        }
    });
    response.with_header("cache-control", "no-store")
}

async fn echo(mut req: Request<'_>) -> Response {
    let content_type = req.header("content-type").unwrap_or("application/octet-stream").to_owned();
    match req.body().collect().await {
        Ok(body) => Response::bytes(content_type, body),
        Err(BodyError::TooLarge { limit }) => {
            Response::text(format!("body larger than {limit} bytes\n")).with_status(413)
        }
        Err(e) => Response::text(format!("{e}\n")).with_status(400),
    }
}

export_app!(SampleApp);
