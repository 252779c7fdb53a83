//! The supervisor of process mode. It never loads app code: it binds the
//! listening socket once and keeps it for its whole life, starts worker
//! processes (its own binary again, `pounce-host worker`) that serve one
//! generation each, and is the one truth for generation numbers.
//!
//! - **Reload** (SIGHUP, SIGUSR1, `--reload`): snapshot the library, start
//!   `--processes` workers of the new generation; only when all are ready,
//!   publish it and tell the old workers to retire. Any new worker failing
//!   (load error, crash, not ready within `reload_timeout`) stops the new
//!   ones: the old keep serving. Signals during a reload collapse into one
//!   more.
//! - **Crash**: a worker of the current generation that ends without being
//!   asked is replaced at once; more than `--max-restarts` within
//!   `--restart-window` backs off instead of spinning.
//! - **Rollback**: a generation whose workers crash 3 times within
//!   `--rollback-window` of its reload is replaced by the previous
//!   generation's library (its bytes were kept).
//! - **Hang**: a worker that has not beaten for `--worker-timeout` is killed
//!   and replaced.
//! - **Binary upgrade** (SIGUSR2, `lifecycle::upgrade`): the binary is
//!   started again with the listening sockets; it is a new supervisor that
//!   starts its own workers of the next generation. Once they serve, this
//!   supervisor retires all of its workers (as after a reload) and exits.
//! - **Shutdown**: SIGTERM/SIGINT go to every worker (each drains within
//!   `shutdown_timeout`); what is left after that is killed. A second signal
//!   kills everything at once. If the supervisor is killed, the kernel kills
//!   the workers (`PR_SET_PDEATHSIG`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, Notify};

use super::control::{self, FromWorker, ToWorker, CONTROL_FD, FIRST_LISTENER_FD, LIBRARY_FD, TOTALS_FD};
use super::totals::{self, Totals};
use crate::config::Config;
use crate::ffi::priority;
use crate::ffi::process::{kill, spawn_with_fds, SharedCounters};
use crate::front::inherit;
use crate::front::listener::Listener;
use crate::front::tls;
use crate::generations::loader::LoadError;
use crate::generations::snapshot::Snapshot;
use crate::lifecycle::exit::describe;
use crate::lifecycle::serve::{describe_listeners, watch_spec, StartError};
use crate::lifecycle::shutdown::hard_deadline;
use crate::lifecycle::signals::{Request, Signals};
use crate::lifecycle::upgrade::{self, Upgrading};
use crate::lifecycle::watch;
use crate::operations::{sd_notify, Event, Reporter};

/// Crashes within `--rollback-window` of a reload that roll it back.
const ROLLBACK_CRASHES: usize = 3;
/// How often the supervisor checks deadlines and heartbeats.
const TICK: Duration = Duration::from_millis(100);
/// Longest back-off between restarts in a crash loop.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Extra time a worker gets past its own deadline before it is killed.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// What reaches the supervisor's loop from its workers.
enum Input {
    Message(u32, FromWorker),
    Exited(u32, ExitStatus),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// Started, not ready yet.
    Starting,
    Serving,
    /// Told to retire (a newer generation serves), since when.
    Retiring(Instant),
    /// Told to stop: a failed reload, a shutdown, or a hang.
    Stopping,
}

struct Worker {
    generation: u64,
    state: State,
    started: Instant,
    last_beat: Instant,
    connections: usize,
    in_flight: usize,
    upgraded: usize,
    /// Killed for not beating: its exit is a failure, not expected.
    hung: bool,
    orders: mpsc::UnboundedSender<ToWorker>,
}

/// The generation new connections go to.
struct Live {
    number: u64,
    snapshot: Arc<Snapshot>,
    published: Instant,
    crashes: Vec<Instant>,
    /// The generation it replaced, for a rollback.
    previous: Option<(u64, Arc<Snapshot>)>,
}

/// A reload in progress: the new generation's workers, until all are ready.
struct Reload {
    generation: u64,
    snapshot: Arc<Snapshot>,
    started: Instant,
    pending: HashSet<u32>,
    /// What the first ready worker reported: app, version, load, init.
    ready: Option<FromWorker>,
    /// A rollback keeps the previous-of-previous out of reach.
    rollback: bool,
}

pub struct Supervisor {
    config: Config,
    /// The `serve` arguments, passed on to every worker.
    serve_args: Vec<OsString>,
    /// Every listening socket, passed to every worker (and to the new
    /// binary of an upgrade).
    listeners: Arc<Vec<Listener>>,
    /// This supervisor took over from pid N (a binary upgrade): said in
    /// its `server_ready`.
    upgraded_from: Option<u32>,
    /// The address tools read, and every listener, for `server_ready`.
    address: String,
    described: String,
    reporter: Reporter,
    inputs: mpsc::UnboundedSender<Input>,
    workers: HashMap<u32, Worker>,
    current: Option<Live>,
    reload: Option<Reload>,
    reload_queued: bool,
    next_generation: u64,
    restarts: VecDeque<Instant>,
    total_restarts: u64,
    rollbacks: u64,
    /// In a crash loop: when the next restart may happen.
    respawn_at: Option<Instant>,
    /// How many back-offs in a row (the delay doubles with each).
    backoff_level: u32,
    /// Retiring generations and when they started to drain.
    draining: HashMap<u64, Instant>,
    /// The whole service's metrics, in a page every worker maps.
    totals: Totals,
}

/// Runs the service in process mode until a shutdown completes.
pub async fn run(config: Config, serve_args: Vec<OsString>) -> Result<(), StartError> {
    let mut signals = Signals::install(hard_deadline(&config))?;
    upgrade::remember_executable();
    let reloads = Arc::new(Notify::new());
    let _watch = match config.reload {
        true => Some(watch::start(watch_spec(&config), reloads.clone())?),
        false => None,
    };
    if let Some(files) = &config.tls {
        tls::check(files)?;
    }
    let (listeners, mut upgraded) = inherit::listeners(&config, inherit::take()?)?;
    let (address, described) = describe_listeners(&listeners, config.tls.is_some());
    let (inputs, mut received) = mpsc::unbounded_channel();
    let page = Arc::new(SharedCounters::create("pounce-service-totals", totals::LEN)?);
    let mut supervisor = Supervisor {
        reporter: Reporter::new(false),
        config,
        serve_args,
        listeners: Arc::new(listeners),
        upgraded_from: upgraded.as_ref().map(|u| u.from),
        address,
        described,
        inputs,
        workers: HashMap::new(),
        current: None,
        reload: None,
        reload_queued: false,
        next_generation: upgraded.as_ref().map_or(1, |u| u.generation),
        restarts: VecDeque::new(),
        total_restarts: 0,
        rollbacks: 0,
        respawn_at: None,
        backoff_level: 0,
        draining: HashMap::new(),
        totals: Totals::new(page),
    };
    if !supervisor.start_first(&mut received, &mut signals).await? {
        return Ok(());
    }
    if let Some(upgrade) = &mut upgraded {
        upgrade::say_ready(upgrade);
    }
    drop(upgraded);
    sd_notify::spawn_watchdog();
    let mut ticks = tokio::time::interval(TICK);
    let mut upgrading = Upgrading::default();
    let stop = loop {
        tokio::select! {
            request = signals.next() => match request {
                Request::Reload(name) => {
                    tracing::info!("{name} received: reload requested");
                    supervisor.request_reload();
                }
                Request::Upgrade(name) => {
                    let (listeners, next) = (supervisor.listeners.clone(), supervisor.next_generation);
                    upgrading.begin(name, &supervisor.reporter, listeners, next, supervisor.config.reload_timeout);
                }
                Request::Shutdown { name, number } => break (name, number),
            },
            Some((pid, took)) = upgrading.finished(&supervisor.reporter), if upgrading.is_running() => {
                match supervisor.hand_over(pid, took, &mut signals, &mut received).await {
                    Some(stop) => break stop,
                    None => return Ok(()),
                }
            }
            () = reloads.notified() => supervisor.request_reload(),
            Some(input) = received.recv() => supervisor.on_input(input),
            _ = ticks.tick() => supervisor.on_tick(),
        }
    };
    upgrading.abort();
    supervisor.shut_down(stop, &mut signals, &mut received).await;
    Ok(())
}

impl Supervisor {
    /// Starts generation 1 and waits until all its workers serve; any
    /// failure ends the start-up (exit 3). A shutdown signal meanwhile stops
    /// the workers and ends it too (`false`: do not serve).
    async fn start_first(
        &mut self,
        received: &mut mpsc::UnboundedReceiver<Input>,
        signals: &mut Signals,
    ) -> Result<bool, StartError> {
        let first = self.next_generation;
        let snapshot = Arc::new(Snapshot::take(&self.config.library, first, self.config.allow_insecure_library)?);
        self.next_generation = first + 1;
        self.begin_reload(first, snapshot, false).map_err(|e| StartError::Workers(e.to_string()))?;
        let deadline = tokio::time::sleep(self.config.reload_timeout);
        tokio::pin!(deadline);
        while self.current.is_none() {
            tokio::select! {
                Some(input) = received.recv() => {
                    if let Some(reason) = self.on_start_input(input) {
                        self.stop_reload();
                        return Err(StartError::Workers(reason));
                    }
                }
                () = &mut deadline => {
                    self.stop_reload();
                    return Err(StartError::Workers(format!(
                        "not ready within reload_timeout ({})",
                        crate::config::format_duration(self.config.reload_timeout)
                    )));
                }
                request = signals.next() => match request {
                    Request::Shutdown { name, .. } => {
                        tracing::info!("{name} received while the workers were starting: not starting");
                        self.stop_reload();
                        return Ok(false);
                    }
                    Request::Reload(name) => tracing::info!("{name} received while starting: the workers load the current file anyway"),
                    Request::Upgrade(name) => tracing::warn!("{name} ignored: the server is still starting"),
                },
            }
        }
        Ok(true)
    }

    /// Handles an input during start-up; returns why start-up failed, if it did.
    fn on_start_input(&mut self, input: Input) -> Option<String> {
        match input {
            Input::Message(pid, FromWorker::LoadFailed { reason }) => Some(format!("worker {pid}: {reason}")),
            Input::Exited(pid, status) => {
                let how = describe(status);
                self.workers.remove(&pid);
                Some(format!("worker {pid} {how} while loading"))
            }
            input => {
                self.on_input(input);
                None
            }
        }
    }

    fn request_reload(&mut self) {
        if self.reload.is_some() {
            self.reload_queued = true;
            return;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let serving = self.current_number();
        self.reporter.emit(Event::ReloadStarted { generation, serving, source: &self.config.library });
        let started = Instant::now();
        let tls = self.config.tls.as_ref().map(tls::check).transpose().map_err(|e| e.to_string());
        let begun = tls
            .and_then(|_| self.snapshot(generation).map_err(|e| e.to_string()))
            .and_then(|snapshot| self.begin_reload(generation, snapshot, false).map_err(|e| e.to_string()));
        if let Err(reason) = begun {
            self.fail_reload_with(generation, &reason, started);
        }
    }

    /// The library's bytes for `generation`: the serving generation's
    /// snapshot again if the file still holds the same bytes (a reload
    /// storm), else a new one.
    fn snapshot(&self, generation: u64) -> Result<Arc<Snapshot>, LoadError> {
        let (library, insecure) = (&self.config.library, self.config.allow_insecure_library);
        let Some(current) = &self.current else { return Snapshot::take(library, generation, insecure).map(Arc::new) };
        let (snapshot, reused) = Snapshot::take_or_reuse(library, generation, insecure, &current.snapshot)?;
        if reused {
            tracing::debug!(
                generation,
                from = current.number,
                "the library's bytes are unchanged: its snapshot is reused"
            );
        }
        Ok(snapshot)
    }

    /// Starts `--processes` workers of `generation` from `snapshot`.
    fn begin_reload(&mut self, generation: u64, snapshot: Arc<Snapshot>, rollback: bool) -> std::io::Result<()> {
        let mut pending = HashSet::new();
        self.reload = Some(Reload {
            generation,
            snapshot: snapshot.clone(),
            started: Instant::now(),
            pending: HashSet::new(),
            ready: None,
            rollback,
        });
        for _ in 0..self.config.processes {
            pending.insert(self.spawn(generation, &snapshot)?);
        }
        if let Some(reload) = &mut self.reload {
            reload.pending = pending;
        }
        Ok(())
    }

    /// Starts one worker of `generation`.
    fn spawn(&mut self, generation: u64, snapshot: &Snapshot) -> std::io::Result<u32> {
        let (mine, theirs) = control::pair()?;
        let roles: Vec<&str> = self.listeners.iter().map(|l| l.role.name()).collect();
        // The very binary the supervisor runs, whatever a deploy did to the
        // file since; named as the operator started it, for `ps`.
        let mut command = Command::new("/proc/self/exe");
        if let Some(name) = std::env::args_os().next() {
            command.arg0(name);
        }
        command
            .arg("worker")
            .args(["--generation", &generation.to_string(), "--supervisor", &std::process::id().to_string()])
            .arg(format!("--listeners={}", roles.join(",")))
            .args(&self.serve_args)
            .stdin(Stdio::null());
        // systemd talks to the supervisor only; inherited sockets are its.
        for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            command.env_remove(name);
        }
        let mut fds =
            vec![(theirs.as_raw_fd(), CONTROL_FD), (snapshot.raw_fd(), LIBRARY_FD), (self.totals.raw_fd(), TOTALS_FD)];
        for (at, listener) in self.listeners.iter().enumerate() {
            fds.push((listener.fd().as_raw_fd(), FIRST_LISTENER_FD + at as i32));
        }
        let mut child = spawn_with_fds(&mut command, &fds, true)?;
        drop(theirs);
        let pid = child.id();
        let exits = self.inputs.clone();
        let reaped = std::thread::Builder::new().name(format!("pounce-reap-{pid}")).spawn(move || {
            // Reaping a process costs the kernel real work (its /proc
            // entries are invalidated, which spins while the process is
            // still being torn down): at background priority, in small
            // pieces, it takes little from the workers serving on the core.
            priority::lower_this_thread();
            if let Ok(status) = child.wait() {
                let _ = exits.send(Input::Exited(pid, status));
            }
        });
        if let Err(e) = reaped {
            kill(pid, libc::SIGKILL);
            return Err(e);
        }
        let orders = self.connect(pid, mine)?;
        let now = Instant::now();
        let worker = Worker {
            generation,
            state: State::Starting,
            started: now,
            last_beat: now,
            connections: 0,
            in_flight: 0,
            upgraded: 0,
            hung: false,
            orders,
        };
        self.workers.insert(pid, worker);
        self.reporter.emit(Event::WorkerStarted { pid, generation });
        // Its first message: what its health answers report.
        self.tell_service_state();
        Ok(pid)
    }

    /// Forwards `pid`'s messages to the loop, and the loop's orders to it.
    fn connect(
        &self,
        pid: u32,
        channel: std::os::unix::net::UnixStream,
    ) -> std::io::Result<mpsc::UnboundedSender<ToWorker>> {
        let (mut messages, mut sender) = control::open::<FromWorker, ToWorker>(channel)?;
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                if inputs.send(Input::Message(pid, message)).is_err() {
                    return;
                }
            }
        });
        let (orders, mut queued) = mpsc::unbounded_channel::<ToWorker>();
        tokio::spawn(async move {
            while let Some(order) = queued.recv().await {
                if sender.send(&order).await.is_err() {
                    return;
                }
            }
        });
        Ok(orders)
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Message(pid, message) => self.on_message(pid, message),
            Input::Exited(pid, status) => self.on_exit(pid, status),
        }
    }

    fn on_message(&mut self, pid: u32, message: FromWorker) {
        let Some(worker) = self.workers.get_mut(&pid) else { return };
        worker.last_beat = Instant::now();
        match message {
            FromWorker::Beat { in_flight, connections, upgraded, requests } => {
                worker.in_flight = in_flight;
                worker.upgraded = upgraded;
                worker.connections = connections;
                self.totals.reported(pid, requests);
            }
            FromWorker::Ready { .. } => {
                if worker.state == State::Starting {
                    worker.state = State::Serving;
                }
                let (generation, startup) = (worker.generation, worker.started.elapsed());
                self.reporter.emit(Event::WorkerReady { pid, generation, startup });
                self.worker_ready(pid, message);
            }
            FromWorker::LoadFailed { reason } => {
                let in_reload = self.reload.as_ref().is_some_and(|r| r.pending.contains(&pid));
                if in_reload {
                    self.fail_reload(&format!("worker {pid}: {reason}"));
                } else {
                    tracing::error!(pid, "replacement worker {pid} could not load: {reason}");
                }
            }
        }
    }

    fn worker_ready(&mut self, pid: u32, ready: FromWorker) {
        let Some(reload) = &mut self.reload else {
            self.tell_service_state();
            return;
        };
        if reload.pending.remove(&pid) && reload.ready.is_none() {
            reload.ready = Some(ready);
        }
        if reload.pending.is_empty() {
            self.publish();
        } else {
            self.tell_service_state();
        }
    }

    /// Every new worker serves: the new generation is current, the old one
    /// retires.
    fn publish(&mut self) {
        let Some(reload) = self.reload.take() else { return };
        let (app, app_version, load, init) = match &reload.ready {
            Some(FromWorker::Ready { app, app_version, load_ms, init_ms }) => {
                (app.clone(), app_version.clone(), millis(*load_ms), millis(*init_ms))
            }
            _ => (String::new(), String::new(), Duration::ZERO, Duration::ZERO),
        };
        let previous = self.current.take();
        let kept = match (&previous, reload.rollback) {
            (Some(old), false) => Some((old.number, old.snapshot.clone())),
            _ => None,
        };
        self.current = Some(Live {
            number: reload.generation,
            snapshot: reload.snapshot,
            published: Instant::now(),
            crashes: Vec::new(),
            previous: kept,
        });
        let Some(old) = previous else {
            let (load, init) = (reload.started.elapsed(), init);
            self.reporter.emit(Event::Ready {
                address: &self.address,
                listeners: &self.described,
                generation: reload.generation,
                upgraded_from: self.upgraded_from,
                app: &app,
                app_version: &app_version,
                load,
                init,
            });
            self.tell_service_state();
            return;
        };
        let in_flight = self.workers.values().map(|w| w.in_flight).sum();
        self.reporter.emit(Event::GenerationLoaded {
            generation: reload.generation,
            previous: old.number,
            load,
            init,
            publish: Duration::ZERO,
            total: reload.started.elapsed(),
            in_flight,
        });
        self.retire_all_but(reload.generation);
        self.tell_service_state();
        if std::mem::take(&mut self.reload_queued) {
            self.request_reload();
        }
    }

    /// Tells every worker of an older generation to retire.
    fn retire_all_but(&mut self, generation: u64) {
        let now = Instant::now();
        let mut retiring: HashMap<u64, (usize, usize)> = HashMap::new();
        for worker in self.workers.values_mut().filter(|w| w.generation != generation) {
            if matches!(worker.state, State::Starting | State::Serving) {
                worker.state = State::Retiring(now);
                let _ = worker.orders.send(ToWorker::Retire);
                let busy = retiring.entry(worker.generation).or_default();
                busy.0 += worker.in_flight;
                busy.1 += worker.upgraded;
            }
        }
        for (old, (in_flight, upgraded)) in retiring {
            self.draining.entry(old).or_insert(now);
            self.reporter.emit(Event::GenerationDraining { generation: old, in_flight, upgraded });
        }
    }

    fn fail_reload(&mut self, reason: &str) {
        let Some(reload) = &self.reload else { return };
        let (generation, started) = (reload.generation, reload.started);
        self.fail_reload_with(generation, reason, started);
    }

    fn fail_reload_with(&mut self, generation: u64, reason: &str, started: Instant) {
        self.stop_reload();
        let serving = self.current_number();
        self.reporter.emit(Event::ReloadFailed { generation, serving, reason, total: started.elapsed() });
        self.tell_service_state();
        if std::mem::take(&mut self.reload_queued) {
            self.request_reload();
        }
    }

    /// Stops the workers of the reload in progress, if any.
    fn stop_reload(&mut self) {
        let Some(reload) = self.reload.take() else { return };
        for worker in self.workers.iter_mut().filter(|(_, w)| w.generation == reload.generation) {
            worker.1.state = State::Stopping;
            kill(*worker.0, libc::SIGKILL);
        }
    }

    fn on_exit(&mut self, pid: u32, status: ExitStatus) {
        let Some(worker) = self.workers.remove(&pid) else { return };
        self.totals.gone(pid);
        let how = describe(status);
        // Stopped workers were killed on purpose; a retiring one should exit
        // 0, unless it outstayed its drain and was killed for it.
        let retired_cleanly = status.success() || status.signal() == Some(libc::SIGKILL);
        let expected = match worker.state {
            State::Stopping => !worker.hung,
            State::Retiring(_) => retired_cleanly,
            State::Starting | State::Serving => false,
        };
        self.reporter.emit(Event::WorkerExited { pid, generation: worker.generation, how: &how, expected });
        if let State::Retiring(_) = worker.state {
            self.retired_if_last(worker.generation);
        }
        if expected || worker.state == State::Stopping {
            self.tell_service_state();
            return;
        }
        if self.reload.as_ref().is_some_and(|r| r.pending.contains(&pid)) {
            self.fail_reload(&format!("worker {pid} {how} while loading"));
            return;
        }
        if self.current_number() == worker.generation {
            self.crashed(worker.generation);
        }
        self.tell_service_state();
    }

    /// The last worker of a retiring generation is gone.
    fn retired_if_last(&mut self, generation: u64) {
        if self.workers.values().any(|w| w.generation == generation) {
            return;
        }
        if let Some(since) = self.draining.remove(&generation) {
            let drain = since.elapsed();
            let timed_out = drain >= self.config.reload_timeout;
            self.reporter.emit(Event::GenerationRetired { generation, drain, timed_out });
        }
    }

    /// A worker of the current generation ended unasked: roll back, back
    /// off, or replace it.
    fn crashed(&mut self, generation: u64) {
        let now = Instant::now();
        if self.should_roll_back(now) {
            return self.roll_back(generation);
        }
        self.restarts.push_back(now);
        while self.restarts.front().is_some_and(|t| now.duration_since(*t) > self.config.restart_window) {
            self.restarts.pop_front();
        }
        if self.respawn_at.is_some() {
            return; // backing off: the restart is already scheduled
        }
        if self.restarts.len() > self.config.max_restarts as usize {
            let delay = Duration::from_secs(1 << self.backoff_level.min(5)).min(MAX_BACKOFF);
            self.backoff_level += 1;
            self.respawn_at = Some(now + delay);
            let (restarts, window) = (self.restarts.len(), self.config.restart_window);
            self.reporter.emit(Event::CrashLoop { restarts, window, delay });
            return;
        }
        self.replace_missing();
    }

    fn should_roll_back(&mut self, now: Instant) -> bool {
        let (Some(window), Some(live)) = (self.config.rollback_window, &mut self.current) else { return false };
        if live.previous.is_none() || now.duration_since(live.published) > window || self.reload.is_some() {
            return false;
        }
        live.crashes.push(now);
        live.crashes.len() >= ROLLBACK_CRASHES
    }

    fn roll_back(&mut self, generation: u64) {
        let Some(live) = &self.current else { return };
        let Some((back_to, snapshot)) = live.previous.clone() else { return };
        let crashes = live.crashes.len();
        let into = self.next_generation;
        self.next_generation += 1;
        self.rollbacks += 1;
        self.reporter.emit(Event::RollingBack { generation, crashes, back_to, into });
        self.reporter.emit(Event::ReloadStarted { generation: into, serving: generation, source: &snapshot.source });
        let started = Instant::now();
        if let Err(e) = self.begin_reload(into, snapshot, true) {
            self.fail_reload_with(into, &e.to_string(), started);
        }
    }

    /// Starts workers until the current generation has `--processes`.
    fn replace_missing(&mut self) {
        let Some(live) = &self.current else { return };
        let (number, snapshot) = (live.number, live.snapshot.clone());
        let alive = self
            .workers
            .values()
            .filter(|w| w.generation == number && matches!(w.state, State::Starting | State::Serving))
            .count();
        for _ in alive..self.config.processes {
            self.total_restarts += 1;
            if let Err(e) = self.spawn(number, &snapshot) {
                tracing::error!(generation = number, "cannot start a replacement worker: {e}");
            }
        }
    }

    /// Deadlines: hung workers, a reload that takes too long, workers that
    /// outstay their drain, the end of a back-off.
    fn on_tick(&mut self) {
        let now = Instant::now();
        self.kill_hung(now);
        let reload_timeout = self.config.reload_timeout;
        if self.reload.as_ref().is_some_and(|r| now.duration_since(r.started) > reload_timeout) {
            let limit = crate::config::format_duration(reload_timeout);
            self.fail_reload(&format!("the new workers were not ready within reload_timeout ({limit})"));
        }
        for (pid, worker) in &self.workers {
            let overdue = match worker.state {
                State::Retiring(since) => now.duration_since(since) > reload_timeout + KILL_GRACE,
                State::Starting => now.duration_since(worker.started) > reload_timeout + KILL_GRACE,
                _ => false,
            };
            if overdue {
                kill(*pid, libc::SIGKILL);
            }
        }
        if self.respawn_at.is_some_and(|at| now >= at) {
            self.respawn_at = None;
            self.replace_missing();
        }
        if self.restarts.back().is_some_and(|t| now.duration_since(*t) > self.config.restart_window) {
            self.restarts.clear();
            self.backoff_level = 0;
        }
    }

    fn kill_hung(&mut self, now: Instant) {
        let Some(limit) = self.config.worker_timeout else { return };
        for (pid, worker) in &mut self.workers {
            let silent = now.duration_since(worker.last_beat);
            if worker.state == State::Serving && !worker.hung && silent > limit {
                worker.hung = true;
                self.reporter.emit(Event::WorkerHung { pid: *pid, generation: worker.generation, silent });
                kill(*pid, libc::SIGKILL);
            }
        }
    }

    /// Sends every worker the service's state, for its health answers.
    fn tell_service_state(&self) {
        let generation = self.current_number();
        let serving = self.workers.values().filter(|w| w.generation == generation && w.state == State::Serving).count();
        let mut draining: Vec<u64> = self.draining.keys().copied().collect();
        draining.sort_unstable();
        let state = json!({
            "generation": generation,
            "processes": self.config.processes,
            "workers_serving": serving,
            "workers": self.workers.len(),
            "draining_generations": draining.len(),
            "draining": draining,
            "restarts": self.total_restarts,
            "rollbacks": self.rollbacks,
            "crash_loop": self.respawn_at.is_some() || self.backoff_level > 0,
            "last_reload": self.reporter.last_reload(),
            "supervisor_pid": std::process::id(),
        });
        for worker in self.workers.values() {
            let _ = worker.orders.send(ToWorker::Service(state.clone()));
        }
        self.totals.service(self.total_restarts, self.rollbacks, serving, generation);
    }

    fn current_number(&self) -> u64 {
        self.current.as_ref().map_or(0, |live| live.number)
    }

    /// A binary upgrade's new supervisor (`pid`) serves: tell systemd, stop
    /// any reload, retire every worker (they stop accepting and finish
    /// their connections, as after a reload), and return once they are gone
    /// (`None`: exit) or a shutdown signal arrives (what to shut down with).
    async fn hand_over(
        &mut self,
        pid: u32,
        took: Duration,
        signals: &mut Signals,
        received: &mut mpsc::UnboundedReceiver<Input>,
    ) -> Option<(&'static str, i32)> {
        self.reporter.emit(Event::UpgradeComplete { pid, took });
        self.stop_reload();
        self.reload_queued = false;
        self.respawn_at = None;
        let now = Instant::now();
        for worker in self.workers.values_mut() {
            if matches!(worker.state, State::Starting | State::Serving) {
                worker.state = State::Retiring(now);
                let _ = worker.orders.send(ToWorker::Retire);
            }
        }
        let deadline = tokio::time::sleep(self.config.reload_timeout + KILL_GRACE);
        tokio::pin!(deadline);
        while !self.workers.is_empty() {
            tokio::select! {
                Some(input) = received.recv() => self.on_input(input),
                request = signals.next() => match request {
                    Request::Shutdown { name, number } => return Some((name, number)),
                    Request::Reload(name) | Request::Upgrade(name) => {
                        tracing::warn!("{name} ignored: pid {pid} serves now; signal it instead")
                    }
                },
                () = &mut deadline => {
                    tracing::warn!(workers = self.workers.len(), "workers still draining after reload_timeout; killing them");
                    self.kill_all();
                    break;
                }
            }
        }
        None
    }

    /// SIGTERM to every worker; wait for them within `shutdown_timeout`
    /// (plus a grace), then kill what is left. A second signal kills at once.
    async fn shut_down(
        &mut self,
        (name, _): (&'static str, i32),
        signals: &mut Signals,
        received: &mut mpsc::UnboundedReceiver<Input>,
    ) {
        let started = Instant::now();
        let timeout = self.config.shutdown_timeout;
        let connections = self.workers.values().map(|w| w.connections).sum();
        self.reporter.emit(Event::ShutdownStarted { signal: name, connections, timeout });
        self.reload = None;
        for (pid, worker) in &mut self.workers {
            worker.state = State::Stopping;
            kill(*pid, libc::SIGTERM);
        }
        let deadline = tokio::time::sleep(timeout + KILL_GRACE);
        tokio::pin!(deadline);
        while !self.workers.is_empty() {
            tokio::select! {
                Some(input) = received.recv() => self.on_input(input),
                request = signals.next() => if let Request::Shutdown { name, number } = request {
                    tracing::warn!("second {name} received: killing the workers and exiting now");
                    self.kill_all();
                    std::process::exit(128 + number);
                },
                () = &mut deadline => break,
            }
        }
        let took = started.elapsed();
        if self.workers.is_empty() {
            return self.reporter.emit(Event::ShutdownDrained { took });
        }
        self.reporter.emit(Event::ShutdownTimedOut { took, connections: self.workers.len() });
        self.kill_all();
    }

    fn kill_all(&self) {
        for pid in self.workers.keys() {
            kill(*pid, libc::SIGKILL);
        }
    }
}

fn millis(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}
