//! Processes the benchmark starts: the servers and wrk. Every wait is
//! bounded, and every process is ended when its handle is dropped (also on
//! a panic or an error); a process whose parent dies is killed by the kernel
//! (`PR_SET_PDEATHSIG`), so even a `kill -9` of xtask leaves nothing behind.
//! Ctrl-C sets a flag that the loops check, so they stop and clean up.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use pounce_devkit::{log_field, ready_address, target_dir, workspace};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes Ctrl-C (SIGINT) and SIGTERM stop the benchmark cleanly instead of
/// killing xtask with its children still running.
pub fn install_interrupt_handler() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `duration` in small steps, returning early with an error on Ctrl-C.
pub fn sleep(duration: Duration) -> Result<()> {
    sleep_until(Instant::now() + duration)
}

pub fn sleep_until(deadline: Instant) -> Result<()> {
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
}

/// The program `name` on `PATH`, if any.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Which CPUs the server and the load generator run on.
#[derive(Clone, Debug)]
pub struct Pinning {
    /// `taskset`, when pinning is possible.
    taskset: Option<PathBuf>,
    pub server_cpu: Option<usize>,
    pub load_cpu: Option<usize>,
    /// [`Pinning::shared`]: the CPUs that the server and the load share
    /// (a `taskset -c` list); the two fields above are then `None`.
    shared: Option<String>,
    /// How the processes were placed, for the report.
    pub description: String,
}

impl Pinning {
    /// Server on the first CPU this process may use, load on the second, if
    /// there are two and `taskset` exists; otherwise no pinning (said so).
    pub fn detect() -> Pinning {
        let cpus = allowed_cpus();
        let taskset = find_program("taskset");
        match (&cpus[..], taskset) {
            ([server, load, ..], Some(taskset)) => Pinning {
                taskset: Some(taskset),
                server_cpu: Some(*server),
                load_cpu: Some(*load),
                shared: None,
                description: format!(
                    "server on CPU {server}, load generator on CPU {load} (`taskset -c`; {} CPUs available)",
                    cpus.len()
                ),
            },
            (_, taskset) => Pinning {
                taskset: None,
                server_cpu: None,
                load_cpu: None,
                shared: None,
                description: if cpus.len() < 2 {
                    format!("not pinned: only {} CPU available, server and load share it", cpus.len())
                } else if taskset.is_none() {
                    "not pinned: `taskset` not found (apt-get install util-linux)".to_owned()
                } else {
                    "not pinned".to_owned()
                },
            },
        }
    }

    /// The server and the load generator both on the server's and the load's
    /// CPUs (`taskset -c 0,1`): for a server with as many worker threads as
    /// there are CPUs, with the load generator on the same cores.
    pub fn shared(&self) -> Pinning {
        let (Some(taskset), Some(server), Some(load)) = (&self.taskset, self.server_cpu, self.load_cpu) else {
            let description = format!("{}; the load generator on the same cores as the server", self.description);
            return Pinning { description, ..self.clone() };
        };
        Pinning {
            taskset: Some(taskset.clone()),
            server_cpu: None,
            load_cpu: None,
            shared: Some(format!("{server},{load}")),
            description: format!(
                "server and load generator together on CPUs {server} and {load} (`taskset -c {server},{load}`): the load generator on the same cores as the server"
            ),
        }
    }

    /// A command that runs `program` on `cpu` (through `taskset`), or on the
    /// shared CPUs of a [`Pinning::shared`], or unpinned when pinning is
    /// off. `taskset` execs the program, so the pid is the program's.
    pub fn command(&self, cpu: Option<usize>, program: &Path) -> Command {
        let cpus = self.shared.clone().or_else(|| cpu.map(|cpu| cpu.to_string()));
        match (&self.taskset, cpus) {
            (Some(taskset), Some(cpus)) => {
                let mut command = Command::new(taskset);
                command.arg("-c").arg(cpus).arg(program);
                command
            }
            _ => Command::new(program),
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; pid 0 is the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!("cannot pin the load generator to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time used on the machine during one measurement, to tell a clean run
/// from one that something else on the machine disturbed (other processes,
/// or the hypervisor's steal time). "Ours" is the server with its worker
/// processes (process mode), xtask itself (the latency generator runs in it)
/// and the children reaped meanwhile (wrk).
pub struct CpuWatch {
    started: Instant,
    server_pid: i32,
    machine: f64,
    server: f64,
    ours: f64,
}

/// What a [`CpuWatch`] saw, in cores (CPU seconds per second).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUse {
    /// The server's use of its core: the server process and every process
    /// it started (process mode's workers), also those that ended meanwhile.
    pub server: f64,
    /// Used by anything else (or stolen): a clean run has about 0.
    pub foreign: f64,
}

/// Above this many cores of foreign CPU use, a run counts as disturbed.
pub const MAX_FOREIGN_CPU: f64 = 0.05;

impl CpuUse {
    pub fn disturbed(&self) -> bool {
        self.foreign > MAX_FOREIGN_CPU
    }
}

impl CpuWatch {
    pub fn start(server_pid: i32) -> Result<CpuWatch> {
        let server = tree_cpu_seconds(server_pid)?;
        Ok(CpuWatch {
            started: Instant::now(),
            server_pid,
            machine: machine_busy_seconds()?,
            server,
            ours: own_cpu_seconds() + server,
        })
    }

    pub fn finish(&self) -> Result<CpuUse> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-3);
        let server = tree_cpu_seconds(self.server_pid)?;
        let ours = own_cpu_seconds() + server - self.ours;
        let machine = machine_busy_seconds()? - self.machine;
        // Tick-based accounting: allow for rounding to a tick per CPU.
        Ok(CpuUse { server: (server - self.server) / wall, foreign: ((machine - ours) / wall).max(0.0) })
    }
}

/// Waits until the machine is quiet: less than [`MAX_FOREIGN_CPU`] cores
/// busy over half a second (our servers are idle between runs), at most
/// `max_wait`. Returns how long it waited, or `None` if it never got quiet.
pub fn wait_for_quiet(max_wait: Duration) -> Result<Option<Duration>> {
    let started = Instant::now();
    let mut said = false;
    loop {
        let (machine, ours) = (machine_busy_seconds()?, own_cpu_seconds());
        let window = Instant::now();
        sleep(Duration::from_millis(500))?;
        let busy = (machine_busy_seconds()? - machine - (own_cpu_seconds() - ours)) / window.elapsed().as_secs_f64();
        if busy <= MAX_FOREIGN_CPU {
            return Ok(Some(started.elapsed()));
        }
        if started.elapsed() >= max_wait {
            return Ok(None);
        }
        if !said {
            eprintln!("    waiting for other work on the machine to finish ({busy:.2} cores busy)");
            said = true;
        }
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Busy CPU time of the whole machine (user, nice, system, irq, softirq,
/// steal), in seconds.
fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    machine_busy_ticks(line).map(|ticks| ticks / clock_ticks()).context("unexpected /proc/stat")
}

fn machine_busy_ticks(cpu_line: &str) -> Option<f64> {
    let fields: Vec<f64> = cpu_line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    Some([0, 1, 2, 5, 6, 7].iter().map(|&i| fields.get(i).copied().unwrap_or(0.0)).sum())
}

/// CPU time (user + system) used so far by `root` and its descendants, in
/// seconds. Process mode's supervisor does little: its workers serve. A
/// descendant that ended counts too: its time moved to the `cutime` and
/// `cstime` of the ancestor that reaped it, which are included, so a worker
/// replaced during a measurement is neither lost nor counted twice.
pub fn tree_cpu_seconds(root: i32) -> Result<f64> {
    let stat = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| parse_stat(&s));
    let own = stat(root).with_context(|| format!("cannot read /proc/{root}/stat"))?;
    let descendants: f64 = descendants(root).into_iter().filter_map(stat).map(|s| s.ticks).sum();
    Ok((own.ticks + descendants) / clock_ticks())
}

/// The figures of one /proc/PID/stat line the benchmark uses.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stat {
    ppid: i32,
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: f64,
}

fn parse_stat(stat: &str) -> Option<Stat> {
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name, counting from 0: ppid 1; utime, stime, cutime, cstime 11 to 14.
    let ticks = (11..=14).map(|i| fields.get(i)?.parse::<f64>().ok()).sum::<Option<f64>>()?;
    Some(Stat { ppid: fields.get(1)?.parse().ok()?, ticks })
}

/// The processes below `root` (children, their children...), found by
/// scanning /proc for parent pids: /proc/PID/task/TID/children needs a
/// kernel option that machines here lack.
pub fn descendants(root: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let parents: Vec<(i32, i32)> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parse_stat(&stat)?.ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| *pid));
        next += 1;
    }
    found.remove(0);
    found
}

/// CPU time of xtask itself and of its reaped children, in seconds.
fn own_cpu_seconds() -> f64 {
    let seconds = |who| {
        // SAFETY: a zeroed rusage is valid; getrusage fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid out pointer.
        if unsafe { libc::getrusage(who, &mut usage) } != 0 {
            return 0.0;
        }
        let time = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        time(usage.ru_utime) + time(usage.ru_stime)
    };
    seconds(libc::RUSAGE_SELF) + seconds(libc::RUSAGE_CHILDREN)
}

/// Lines a process wrote to one of its pipes, as they arrive.
#[derive(Default)]
pub struct Lines {
    state: Mutex<LinesState>,
    changed: Condvar,
}

#[derive(Default)]
struct LinesState {
    lines: Vec<String>,
    closed: bool,
}

impl Lines {
    fn state(&self) -> MutexGuard<'_, LinesState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn collect(self: Arc<Self>, pipe: impl Read + Send + 'static) {
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                self.state().lines.push(line);
                self.changed.notify_all();
            }
            self.state().closed = true;
            self.changed.notify_all();
        });
    }

    pub fn len(&self) -> usize {
        self.state().lines.len()
    }

    pub fn text(&self) -> String {
        self.state().lines.join("\n")
    }

    /// The lines from index `from` on.
    pub fn since(&self, from: usize) -> Vec<String> {
        let state = self.state();
        state.lines.get(from..).map(<[String]>::to_vec).unwrap_or_default()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.state().lines.iter().filter(|line| line.contains(needle)).count()
    }

    /// Waits (at most `timeout`) for a line at index `from` or later for
    /// which `found` returns something; returns it and the index after it.
    pub fn wait_for<T>(
        &self,
        from: usize,
        timeout: Duration,
        mut found: impl FnMut(&str) -> Option<T>,
    ) -> Option<(T, usize)> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        let mut state = self.state();
        loop {
            while next < state.lines.len() {
                next += 1;
                if let Some(value) = found(&state.lines[next - 1]) {
                    return Some((value, next));
                }
            }
            let now = Instant::now();
            if state.closed || now >= deadline || interrupted() {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            state = self.changed.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// A child process, ended when dropped: SIGTERM, a bounded wait, SIGKILL.
pub struct Proc {
    name: String,
    child: Child,
    pub stdout: Arc<Lines>,
    pub stderr: Arc<Lines>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `command` with stdin closed and stdout and stderr collected.
    pub fn spawn(name: &str, mut command: Command) -> Result<Proc> {
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child
        // between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = command.spawn().with_context(|| format!("cannot start {name} ({command:?})"))?;
        let stdout = Arc::new(Lines::default());
        let stderr = Arc::new(Lines::default());
        if let Some(pipe) = child.stdout.take() {
            stdout.clone().collect(pipe);
        }
        if let Some(pipe) = child.stderr.take() {
            stderr.clone().collect(pipe);
        }
        Ok(Proc { name: name.to_owned(), child, stdout, stderr, status: None })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: kill(2) on our own child, which we have not reaped yet.
        if unsafe { libc::kill(self.pid(), signal) } != 0 {
            bail!("cannot signal {} (pid {}): {}", self.name, self.pid(), std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the process to exit, at most `timeout`; past it (or on
    /// Ctrl-C) the process is killed and this is an error.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                // Let the readers take in the last lines.
                let _ = self.stdout.wait_for(usize::MAX, Duration::from_millis(500), |_| Some(()));
                let _ = self.stderr.wait_for(usize::MAX, Duration::from_millis(500), |_| Some(()));
                return Ok(status);
            }
            if interrupted() {
                self.stop();
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                self.stop();
                bail!("{} did not finish within {timeout:?}; killed it", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends the process: SIGTERM, up to 5 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        remove_staging(self.child.id());
    }
}

/// A pounce-host process killed before it could clean up (a server stopped
/// with SIGKILL, a worker that crashed) leaves its staging directory behind,
/// if it used one (only where in-memory copies are not available).
fn remove_staging(pid: u32) {
    let prefix = format!("pounce-host-{pid}-");
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Which server a run measures, and how it is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// bench/baseline: the handler compiled into a plain hyper server.
    Baseline,
    /// pounce-host in thread mode (the default), `--workers 1`: app code
    /// runs in the server process.
    Thread,
    /// pounce-host in process mode: a supervisor that never loads app code
    /// and `processes` worker processes of `--workers 1` each.
    Process { processes: usize },
}

impl Kind {
    /// Process mode as it is compared with thread mode: one worker process
    /// with one thread, the same serving capacity as `Thread`.
    pub const PROCESS: Kind = Kind::Process { processes: 1 };

    pub fn label(self) -> &'static str {
        match self {
            Kind::Baseline => "baseline",
            Kind::Thread => "pounce-host thread mode",
            Kind::Process { .. } => "pounce-host process mode",
        }
    }

    /// The server's command line after the program: `workers` worker
    /// threads (per process in process mode), `extra` before the library
    /// (pounce-host only; the library goes last). The report prints it too.
    pub fn args(self, workers: usize, extra: &[&str]) -> Vec<String> {
        let strings = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        let workers = workers.to_string();
        let mode = match self {
            Kind::Baseline => return strings(&["--port", "0", "--workers", &workers]),
            Kind::Thread => Vec::new(),
            Kind::Process { processes } => {
                let mut mode = strings(&["--mode", "process", "--processes"]);
                mode.push(processes.to_string());
                mode
            }
        };
        let mut args = strings(&["serve", "--port", "0", "--log-format", "text"]);
        args.extend(mode);
        args.extend(strings(&["--workers", &workers]));
        args.extend(strings(extra));
        args
    }
}

/// The binaries under test.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub host: PathBuf,
    pub app: PathBuf,
    pub baseline: PathBuf,
    pub profile: &'static str,
}

/// Cargo in the workspace. The sample app must be the default build,
/// whatever the shell has set.
pub fn cargo() -> Command {
    let mut command = pounce_devkit::cargo();
    command.current_dir(workspace()).env_remove("SAMPLE_GREETING");
    command
}

/// Builds pounce-host, the sample app and the baseline (release or debug).
pub fn build(release: bool) -> Result<Binaries> {
    let mut command = cargo();
    command.args(["build", "--quiet", "-p", "pounce-host", "-p", "sample-app", "-p", "pounce-bench-baseline"]);
    if release {
        command.arg("--release");
    }
    let status = command.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    let profile = if release { "release" } else { "debug" };
    let dir = target_dir().join(profile);
    let binaries = Binaries {
        host: dir.join("pounce-host"),
        app: dir.join("libsample_app.so"),
        baseline: dir.join("pounce-baseline"),
        profile,
    };
    for path in [&binaries.host, &binaries.app, &binaries.baseline] {
        if !path.exists() {
            bail!("{} is missing after the build", path.display());
        }
    }
    Ok(binaries)
}

/// How long a server may take to report `server_ready`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server under test.
pub struct Server {
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl Server {
    /// Starts the server with one worker thread on the server CPU (process
    /// mode's workers inherit the pinning) and waits for its `server_ready`
    /// line, which gives the address (both servers log one).
    pub fn start(kind: Kind, binaries: &Binaries, pinning: &Pinning) -> Result<Server> {
        Server::start_with(kind, 1, &[], binaries, pinning)
    }

    /// [`Server::start`] with `workers` worker threads and `extra`
    /// pounce-host arguments.
    pub fn start_with(
        kind: Kind,
        workers: usize,
        extra: &[&str],
        binaries: &Binaries,
        pinning: &Pinning,
    ) -> Result<Server> {
        let program = if kind == Kind::Baseline { &binaries.baseline } else { &binaries.host };
        let mut command = pinning.command(pinning.server_cpu, program);
        command.args(kind.args(workers, extra));
        if kind != Kind::Baseline {
            command.arg(&binaries.app);
        }
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("POUNCE_") {
                command.env_remove(key);
            }
        }
        let mut proc = Proc::spawn(kind.label(), command)?;
        let found = proc.stderr.wait_for(0, START_TIMEOUT, ready_address);
        match found {
            Some((addr, _)) => Ok(Server { addr, proc }),
            None => {
                check_interrupted()?;
                let status = proc.exited();
                proc.stop();
                Err(anyhow!(
                    "{} did not start within {START_TIMEOUT:?} (exit status {status:?}); its log:\n{}",
                    kind.label(),
                    proc.stderr.text()
                ))
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The worker processes its log names (process mode), ended or not.
    fn logged_workers(&self) -> Vec<u32> {
        let lines = self.proc.stderr.since(0);
        let mut pids: Vec<u32> = lines
            .iter()
            .filter(|line| log_field(line, "event").is_some_and(|event| event.starts_with("worker_")))
            .filter_map(|line| log_field(line, "pid")?.parse().ok())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.proc.stop();
        for pid in self.logged_workers() {
            remove_staging(pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_accounting() {
        assert_eq!(machine_busy_ticks("cpu  100 1 50 9000 7 2 3 4 0 0"), Some(160.0));
        let stat = "4242 (pounce worker) S 1 4242 4242 0 -1 4194560 120 0 0 0 31 17 2 1 20 0 4 0 100 0 0";
        assert_eq!(parse_stat(stat), Some(Stat { ppid: 1, ticks: 51.0 }));
        let pid = std::process::id() as i32;
        let watch = CpuWatch::start(pid).unwrap();
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {}
        let used = watch.finish().unwrap();
        assert!(used.server >= 0.0 && used.foreign >= 0.0, "{used:?}");
    }

    #[test]
    fn finds_the_processes_a_process_started() {
        let mut command = Command::new("sh");
        // The child outlives nothing for long if the test fails.
        command.args(["-c", "sleep 2 & wait"]);
        let proc = Proc::spawn("sh", command).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut children = descendants(proc.pid());
        while children.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            children = descendants(proc.pid());
        }
        assert_eq!(children.len(), 1, "sh started one sleep");
        assert!(tree_cpu_seconds(proc.pid()).unwrap() >= 0.0);
        assert!(descendants(children[0]).is_empty());
    }

    #[test]
    fn pounce_host_and_the_baseline_get_their_command_lines() {
        assert_eq!(Kind::Baseline.args(1, &["--ignored"]), ["--port", "0", "--workers", "1"]);
        assert_eq!(Kind::Baseline.args(2, &[]), ["--port", "0", "--workers", "2"]);
        assert_eq!(Kind::Thread.args(1, &[]).join(" "), "serve --port 0 --log-format text --workers 1");
        assert_eq!(Kind::Thread.args(2, &[]).join(" "), "serve --port 0 --log-format text --workers 2");
        assert_eq!(
            Kind::Process { processes: 2 }.args(1, &["--app-arg", "faults=on"]).join(" "),
            "serve --port 0 --log-format text --mode process --processes 2 --workers 1 --app-arg faults=on"
        );
    }

    #[test]
    fn a_process_is_waited_for_with_a_bound_and_its_output_collected() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo err >&2"]);
        let mut proc = Proc::spawn("sh", command).unwrap();
        assert!(proc.wait(Duration::from_secs(10)).unwrap().success());
        assert_eq!(proc.stdout.text(), "out");
        assert_eq!(proc.stderr.text(), "err");

        let mut command = Command::new("sleep");
        command.arg("30");
        let mut proc = Proc::spawn("sleep", command).unwrap();
        let started = Instant::now();
        assert!(proc.wait(Duration::from_millis(100)).is_err());
        assert!(proc.exited().is_some(), "killed after the timeout");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
