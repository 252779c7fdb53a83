//! Lifecycle events: one typed value per thing an operator cares about,
//! emitted in one place that logs it (with its fields, and an `event` field
//! naming it for JSON consumers), tells systemd, and counts it in the
//! metrics.

use std::path::Path;
use std::time::Duration;

use crate::config::format_duration;

pub enum Event<'a> {
    /// Listening, the first generation serving.
    Ready {
        /// The first app TCP address (tools read the bound port here), or
        /// the first listener when there is no TCP one.
        address: &'a str,
        /// Every listener, as `http://127.0.0.1:8000 unix:/run/p.sock ...`.
        listeners: &'a str,
        generation: u64,
        /// A binary upgrade: the pid of the process this one replaces.
        upgraded_from: Option<u32>,
        app: &'a str,
        app_version: &'a str,
        load: Duration,
        init: Duration,
    },
    ReloadStarted {
        generation: u64,
        serving: u64,
        source: &'a Path,
    },
    /// Loaded and published: new requests go to `generation`.
    GenerationLoaded {
        generation: u64,
        previous: u64,
        load: Duration,
        init: Duration,
        publish: Duration,
        total: Duration,
        /// Requests in flight across all generations, at publication.
        in_flight: usize,
    },
    ReloadFailed {
        generation: u64,
        serving: u64,
        reason: &'a str,
        total: Duration,
    },
    /// Shutdown began while `generation` was loading; it is not published.
    ReloadAbandoned {
        generation: u64,
    },
    GenerationDraining {
        generation: u64,
        in_flight: usize,
        upgraded: usize,
    },
    GenerationRetired {
        generation: u64,
        drain: Duration,
        timed_out: bool,
    },
    ShutdownStarted {
        signal: &'a str,
        connections: usize,
        timeout: Duration,
    },
    ShutdownDrained {
        took: Duration,
    },
    ShutdownTimedOut {
        took: Duration,
        connections: usize,
    },
    /// A call into app code has run for `running` on a server thread.
    AppCallStalled {
        kind: &'static str,
        generation: u64,
        request: Option<&'a str>,
        running: Duration,
        thread: &'a str,
    },
    /// SIGUSR2: the binary at `executable` is started with the listeners.
    UpgradeStarted {
        executable: &'a Path,
    },
    /// The new process (`pid`) serves; this one drains and exits.
    UpgradeComplete {
        pid: u32,
        took: Duration,
    },
    /// The new binary did not start serving; this process keeps serving.
    UpgradeFailed {
        reason: &'a str,
    },
    /// Process mode: a worker process started (it is not serving yet).
    WorkerStarted {
        pid: u32,
        generation: u64,
    },
    /// Process mode: a worker loaded its generation and accepts connections,
    /// `startup` after it was started.
    WorkerReady {
        pid: u32,
        generation: u64,
        startup: Duration,
    },
    /// Process mode: a worker process ended. `expected`: it was told to
    /// retire or stop; otherwise it crashed (or exited on its own).
    WorkerExited {
        pid: u32,
        generation: u64,
        how: &'a str,
        expected: bool,
    },
    /// Process mode: a worker showed no progress for `silent` and is killed.
    WorkerHung {
        pid: u32,
        generation: u64,
        silent: Duration,
    },
    /// Process mode: more than `restarts` restarts in `window`: the next
    /// one waits `delay`.
    CrashLoop {
        restarts: usize,
        window: Duration,
        delay: Duration,
    },
    /// Process mode: `generation` crashed `crashes` times soon after its
    /// reload; the library of `back_to` is loaded again as `into`.
    RollingBack {
        generation: u64,
        crashes: usize,
        back_to: u64,
        into: u64,
    },
}

pub(super) fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

impl Event<'_> {
    pub(super) fn log(&self) {
        match *self {
            Event::Ready { address, listeners, generation, upgraded_from, app, app_version, load, init } => {
                let from = upgraded_from.map_or(String::new(), |pid| format!(" (took over from pid {pid})"));
                tracing::info!(
                    event = "server_ready",
                    // Machine-readable: tools find the bound port here (`--port 0`).
                    address = %address,
                    listeners,
                    generation,
                    pid = std::process::id(),
                    app,
                    app_version,
                    load_ms = ms(load),
                    init_ms = ms(init),
                    "listening on {listeners}{from}"
                )
            }
            Event::UpgradeStarted { executable } => tracing::info!(
                event = "upgrade_started",
                executable = %executable.display(),
                "binary upgrade: starting {} with the listening sockets",
                executable.display()
            ),
            Event::UpgradeComplete { pid, took } => tracing::info!(
                event = "upgrade_complete",
                new_pid = pid,
                upgrade_ms = ms(took),
                "binary upgrade: pid {pid} serves; this process stops accepting, finishes its connections and exits"
            ),
            Event::UpgradeFailed { reason } => tracing::error!(
                event = "upgrade_failed",
                "binary upgrade failed: {reason}; this process keeps serving"
            ),
            Event::ReloadStarted { generation, serving, source } => tracing::info!(
                event = "reload_started",
                generation,
                serving,
                "reload started: loading {}",
                source.display()
            ),
            Event::GenerationLoaded { generation, previous, load, init, publish, total, .. } => tracing::info!(
                event = "generation_loaded",
                generation,
                previous,
                load_ms = ms(load),
                init_ms = ms(init),
                publish_us = publish.as_secs_f64() * 1e6,
                reload_ms = ms(total),
                "generation {generation} published; generation {previous} drains"
            ),
            Event::ReloadFailed { generation, serving, reason, total } => tracing::error!(
                event = "reload_failed",
                generation,
                serving,
                reload_ms = ms(total),
                "reload failed: {reason}; generation {serving} keeps serving"
            ),
            Event::ReloadAbandoned { generation } => tracing::info!(
                event = "reload_abandoned",
                generation,
                "shutdown began during the reload; generation {generation} is not published"
            ),
            Event::GenerationDraining { generation, in_flight, upgraded } => tracing::info!(
                event = "generation_draining",
                generation,
                in_flight,
                upgraded,
                "generation {generation} draining"
            ),
            Event::GenerationRetired { generation, drain, timed_out } => tracing::info!(
                event = "generation_retired",
                generation,
                drain_ms = ms(drain),
                timed_out,
                "generation {generation} retired"
            ),
            Event::ShutdownStarted { signal, connections, timeout } => tracing::info!(
                event = "shutdown_started",
                signal,
                connections,
                "{signal} received: shutting down; open connections get up to {} to finish",
                format_duration(timeout)
            ),
            Event::ShutdownDrained { took } => {
                tracing::info!(event = "shutdown_drained", shutdown_ms = ms(took), "all connections closed")
            }
            Event::ShutdownTimedOut { took, connections } => tracing::warn!(
                event = "shutdown_timed_out",
                shutdown_ms = ms(took),
                connections,
                "shutdown_timeout reached; closing the remaining connections"
            ),
            Event::AppCallStalled { kind, generation, request, running, thread } => tracing::warn!(
                event = "app_call_stalled",
                kind,
                generation,
                request,
                running_ms = ms(running),
                thread,
                "app {kind}{} of generation {generation} has been running for {:.1}s on thread {thread}: \
                 it blocks or spins; in thread mode nothing can stop it (process mode replaces a hung worker)",
                request.map(|r| format!(" for {r}")).unwrap_or_default(),
                running.as_secs_f64()
            ),
            Event::WorkerStarted { pid, generation } => {
                tracing::debug!(event = "worker_started", pid, generation, "worker {pid} of generation {generation} started")
            }
            Event::WorkerReady { pid, generation, startup } => tracing::info!(
                event = "worker_ready",
                pid,
                generation,
                startup_ms = ms(startup),
                "worker {pid} of generation {generation} serving ({:.1} ms after it started)",
                ms(startup)
            ),
            Event::WorkerExited { pid, generation, how, expected: true } => tracing::info!(
                event = "worker_exited",
                pid,
                generation,
                how,
                "worker {pid} of generation {generation} {how}"
            ),
            Event::WorkerExited { pid, generation, how, expected: false } => tracing::error!(
                event = "worker_crashed",
                pid,
                generation,
                how,
                "worker {pid} of generation {generation} {how}; its connections are lost, a replacement starts"
            ),
            Event::WorkerHung { pid, generation, silent } => tracing::error!(
                event = "worker_hung",
                pid,
                generation,
                silent_ms = ms(silent),
                "worker {pid} of generation {generation} made no progress for {:.1}s; killing it (see --worker-timeout)",
                silent.as_secs_f64()
            ),
            Event::CrashLoop { restarts, window, delay } => tracing::error!(
                event = "crash_loop",
                restarts,
                delay_ms = ms(delay),
                "crash loop: {restarts} worker restarts within {}; next restart in {}",
                format_duration(window),
                format_duration(delay)
            ),
            Event::RollingBack { generation, crashes, back_to, into } => tracing::error!(
                event = "rolling_back",
                generation,
                crashes,
                back_to,
                into,
                "generation {generation} crashed {crashes} times right after its reload; \
                 rolling back to the library of generation {back_to}, as generation {into}"
            ),
        }
    }
}
