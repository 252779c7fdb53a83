//! Support for pounce-host's end-to-end tests: build the real binary and the
//! sample app, start `pounce-host serve` on a free loopback port, talk HTTP
//! to it with hyper's client, send it signals, and read its log.
//!
//! Every wait here is bounded: a test that hangs is a failing test. Tests
//! wait for what they need (a log event, a health field), not for a fixed
//! time.
//!
//! pounce-host refuses a library that users other than root and its own
//! could change (a group- or world-writable file or directory on its path),
//! so the harness keeps what it writes private whatever the umask of the
//! shell that started the tests: it sets the umask to 022, creates its
//! directories 0755 and its library files 0644, and serves the workspace's
//! sample app from a copy outside the checkout.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pounce_devkit::{ready_address, target_dir, workspace};
use tokio::net::TcpStream;

mod log;
pub mod tls;

pub use log::Log;

/// The build-time settings of the sample app (`SAMPLE_GREETING`,
/// `SAMPLE_FAULT`): a build sets at most one, never inherits them.
const SAMPLE_SETTINGS: [&str; 2] = ["SAMPLE_GREETING", "SAMPLE_FAULT"];

fn cargo_build(packages: &[&str], target: &Path, setting: Option<(&str, &str)>) {
    let mut command = pounce_devkit::cargo();
    command.arg("build").arg("--quiet").current_dir(workspace()).env("CARGO_TARGET_DIR", target);
    for package in packages {
        command.args(["-p", package]);
    }
    for name in SAMPLE_SETTINGS {
        command.env_remove(name);
    }
    // `cargo test` sets it for this process; a build script that tracks it
    // (ring's) would rebuild for every nested build, and again after it.
    command.env_remove("CARGO_MANIFEST_DIR");
    if let Some((name, value)) = setting {
        command.env(name, value);
    }
    let status = command.status().expect("cargo runs");
    assert!(status.success(), "cargo build {packages:?} failed");
}

/// Sets this process's umask to 022 (once), so that the files and
/// directories tests write, and those of the compilers they run, are not
/// writable by group or others.
fn private_umask() {
    static SET: Once = Once::new();
    // SAFETY: umask(2) only changes the process's file creation mask.
    SET.call_once(|| unsafe {
        libc::umask(0o022);
    });
}

/// Builds `pounce-host` and the sample app once per test process.
fn built() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    private_umask();
    BUILT.get_or_init(|| {
        let target = target_dir();
        cargo_build(&["pounce-host", "sample-app"], &target, None);
        target.join("debug")
    })
}

/// The `pounce-host` binary.
pub fn host_binary() -> PathBuf {
    built().join("pounce-host")
}

/// The `xtask` binary (`cargo xtask ...` without the cargo wrapper).
pub fn xtask_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target = target_dir();
            cargo_build(&["xtask"], &target, None);
            target.join("debug/xtask")
        })
        .clone()
}

/// Where cargo builds for the end-to-end tests' own builds.
pub fn variants_target_dir() -> PathBuf {
    target_dir().join("e2e-variants")
}

/// The axum example (`examples/axum-app`), built on first use (it is not a
/// default member of the workspace) and copied as [`sample_app`] is.
pub fn axum_app() -> PathBuf {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let target = target_dir();
        cargo_build(&["axum-app"], &target, None);
        private_copy(&target.join("debug/libaxum_app.so"))
    })
    .clone()
}

/// The sample app as built by the workspace (default greeting), copied once
/// per test process into a directory of its own (0755, the file 0644): the
/// build output may sit in a checkout that is writable by its group, whose
/// libraries pounce-host refuses. The copy is removed when the process exits.
pub fn sample_app() -> PathBuf {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| private_copy(&built().join("libsample_app.so"))).clone()
}

/// This test process's directory for library copies (0755), created once
/// and removed when the process exits.
fn private_dir() -> PathBuf {
    fn path() -> PathBuf {
        std::env::temp_dir().join(format!("pounce-e2e-{}-sample-app", std::process::id()))
    }
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = path();
        let _ = std::fs::remove_dir_all(&dir);
        make_dir(&dir);
        extern "C" fn remove_dir() {
            let _ = std::fs::remove_dir_all(path());
        }
        // SAFETY: atexit(3) registers a plain function, run once at exit.
        unsafe { libc::atexit(remove_dir) };
        dir
    })
    .clone()
}

/// A copy of `library` (0644) in [`private_dir`].
fn private_copy(library: &Path) -> PathBuf {
    let copy = private_dir().join(library.file_name().expect("a library file"));
    replace_file(library, &copy);
    copy
}

/// Creates `path` with mode 0755 whatever the umask.
fn make_dir(path: &Path) {
    private_umask();
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(path).expect("temp dir");
    set_mode(path, 0o755);
}

/// Sets the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A private temporary directory (mode 0755), removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pounce-e2e-{}-{label}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        make_dir(&path);
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The sample app built with `SAMPLE_GREETING=greeting`.
pub fn sample_variant(greeting: &str) -> PathBuf {
    sample_built_with("SAMPLE_GREETING", greeting)
}

/// The sample app built with `SAMPLE_FAULT=fault`: it crashes in `init`
/// (`init-segfault`, `init-abort`) or on every `GET /` (`serve-abort`).
pub fn sample_fault_variant(fault: &str) -> PathBuf {
    sample_built_with("SAMPLE_FAULT", fault)
}

/// The sample app built with one build-time setting. Variants build in
/// their own target directory, one at a time, so they never touch the
/// library other tests are serving; each is built once per test process.
fn sample_built_with(setting: &str, value: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let target = variants_target_dir();
    let slug: String = value.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let prefix = setting.trim_start_matches("SAMPLE_").to_ascii_lowercase();
    let built = target.join(format!("libsample_{prefix}_{slug}_{}.so", std::process::id()));
    if !built.exists() {
        cargo_build(&["sample-app"], &target, Some((setting, value)));
        std::fs::copy(target.join("debug/libsample_app.so"), &built).expect("keep the variant");
    }
    built
}

/// A library whose ELF constructor writes through a null pointer: it
/// crashes whoever `dlopen`s it, before any app code is called. Built with
/// `cc` into `dir`.
pub fn crashing_constructor_library(dir: &TempDir) -> PathBuf {
    let source = dir.join("ctor.c");
    std::fs::write(&source, "__attribute__((constructor)) static void boom(void) { *(volatile int *)0 = 1; }\n")
        .expect("write C source");
    let library = dir.join("libctor.so");
    let status =
        Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&library).arg(&source).status().expect("cc runs");
    assert!(status.success(), "cc failed");
    library
}

/// Replaces `dest` with a copy of `source` (mode 0644) the way a linker or
/// deploy does: write a new file, then rename it over the old one (a new
/// inode).
pub fn replace_file(source: &Path, dest: &Path) {
    private_umask();
    let partial = dest.with_extension("partial");
    std::fs::copy(source, &partial).expect("copy library");
    set_mode(&partial, 0o644);
    std::fs::rename(&partial, dest).expect("rename library");
}

/// A running `pounce-host serve`.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Log,
    /// The health endpoint's path, as `--health-path` set it.
    health_path: String,
}

/// How long a server may take to start (it builds nothing; debug binary).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How far apart a server's exit and the end of its stderr may come (it has
/// no children holding the pipe, so they come together).
const PIPE_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long a health field may take to show what a test waits for.
const HEALTH_WAIT: Duration = Duration::from_secs(10);
/// How often the health endpoint is asked while waiting.
const HEALTH_POLL: Duration = Duration::from_millis(20);

impl Server {
    /// Starts `pounce-host serve --port 0 <library> <args>` and waits until
    /// it listens (its `server_ready` event, which gives the address).
    pub fn start(library: &Path, args: &[&str]) -> Server {
        Self::try_start(library, args)
            .unwrap_or_else(|(status, logs)| panic!("server did not start ({status:?}):\n{logs}"))
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(library: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::try_start_with_env(library, args, env)
            .unwrap_or_else(|(status, logs)| panic!("server did not start ({status:?}):\n{logs}"))
    }

    /// Like [`Server::start`], with the server's `RLIMIT_NOFILE` (soft and
    /// hard) set to `max_fds`, to run it out of file descriptors.
    pub fn start_with_fd_limit(library: &Path, args: &[&str], max_fds: u64) -> Server {
        Self::try_start_command(library, args, &[], |command| limit_fds(command, max_fds))
            .unwrap_or_else(|(status, logs)| panic!("server did not start ({status:?}):\n{logs}"))
    }

    /// Like [`Server::start`], but returns the exit status and log if the
    /// server exits instead of listening.
    pub fn try_start(library: &Path, args: &[&str]) -> Result<Server, (Option<ExitStatus>, String)> {
        Self::try_start_with_env(library, args, &[])
    }

    /// Like [`Server::try_start`], with extra environment variables.
    pub fn try_start_with_env(
        library: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, (Option<ExitStatus>, String)> {
        Self::try_start_command(library, args, env, |_| ())
    }

    /// Like [`Server::start_with_env`], in a process where `memfd_create`
    /// fails with ENOSYS (see [`deny_memfd`]).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub fn start_without_memfd(library: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::try_start_command(library, args, env, deny_memfd)
            .unwrap_or_else(|(status, logs)| panic!("server did not start ({status:?}):\n{logs}"))
    }

    fn try_start_command(
        library: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        prepare: impl FnOnce(&mut Command),
    ) -> Result<Server, (Option<ExitStatus>, String)> {
        let mut command = Command::new(host_binary());
        command
            .arg("serve")
            .args(defaults_not_in(args, &[("--port", "0"), ("--log-format", "text")]))
            .args(args)
            .arg(library);
        clean_env(&mut command);
        command.envs(env.iter().copied());
        prepare(&mut command);
        let health_path = flag_value(args, "--health-path").unwrap_or("/health").to_owned();
        Self::launch(command, &health_path, true)
    }

    /// Starts `command` (a `pounce-host serve`, perhaps behind a wrapper
    /// such as `systemd-socket-activate`) with its stderr collected, and
    /// waits for its `server_ready` event. With `tcp` the event must give a
    /// TCP address (else [`Server::addr`] is `0.0.0.0:0`).
    pub fn launch(mut command: Command, health_path: &str, tcp: bool) -> Result<Server, (Option<ExitStatus>, String)> {
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("start pounce-host");
        let log = Log::default();
        log.collect(child.stderr.take().expect("stderr piped"));
        let ready = if tcp {
            wait_for_ready(&log, START_TIMEOUT)
        } else {
            log.wait_for(START_TIMEOUT, |lines| {
                lines
                    .iter()
                    .find(|line| line.contains("server_ready"))
                    .map(|line| ready_address(line).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))))
            })
        };
        if let Some(addr) = ready {
            return Ok(Server { child, addr, log, health_path: health_path.to_owned() });
        }
        // No address: it is exiting (its stderr closed), or it never got ready.
        let exiting = log.wait_for_end(Duration::ZERO);
        let status = if exiting { wait_for_exit(&mut child, PIPE_CLOSE_WAIT) } else { None };
        if status.is_none() {
            let _ = child.kill();
        }
        let _ = child.wait(); // reaps it (at once: it has exited or been killed)
        Err((status, log.text()))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends signal `signal` (e.g. `libc::SIGHUP`) to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.log.text()
    }

    /// How many log lines contain `needle`.
    pub fn count_logs(&self, needle: &str) -> usize {
        self.log.count(needle)
    }

    /// Waits until the log contains `needle`, at most `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits until at least `times` log lines contain `needle`, at most
    /// `timeout`.
    pub fn wait_for_log_count(&self, needle: &str, times: usize, timeout: Duration) -> bool {
        self.log.wait_for_count(needle, times, timeout)
    }

    /// Waits for the process to exit, at most `timeout`, and then for the
    /// rest of its log, so that [`Server::logs`] is complete.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_for_exit(&mut self.child, timeout)?;
        assert!(self.log.wait_for_end(PIPE_CLOSE_WAIT), "stderr still open after the exit:\n{}", self.logs());
        Some(status)
    }

    /// Waits for the process to exit, at most `timeout`, without waiting
    /// for its log to end (after a binary upgrade the new process writes
    /// to the same pipe).
    pub fn wait_exit_status(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for_exit(&mut self.child, timeout)
    }

    /// The admin listener's address (`--admin-listen`), from the
    /// `server_ready` line: the listener marked `(admin)`.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let logs = self.logs();
        let line = logs.lines().find(|l| l.contains("server_ready"))?;
        let before = &line[..line.find(" (admin)")?];
        before.rsplit([' ', '"', '=']).next()?.trim_start_matches("http://").parse().ok()
    }

    /// Where the full health answer is: the admin listener if there is
    /// one, else the app's port.
    fn health_addr(&self) -> SocketAddr {
        self.admin_addr().unwrap_or(self.addr)
    }

    /// The health endpoint's JSON.
    pub async fn health(&self) -> serde_json::Value {
        get(self.health_addr(), &self.health_path).await.expect("GET the health endpoint").json()
    }

    /// Asks the health endpoint until its JSON satisfies `ready` and returns
    /// that reply; panics, naming `what`, if it does not within 10 s.
    pub async fn wait_for_health(&self, what: &str, ready: impl Fn(&serde_json::Value) -> bool) -> Reply {
        let deadline = Instant::now() + HEALTH_WAIT;
        loop {
            match get(self.health_addr(), &self.health_path).await {
                Ok(reply) if serde_json::from_slice(&reply.body).is_ok_and(|json| ready(&json)) => return reply,
                last => assert!(
                    Instant::now() < deadline,
                    "health did not show {what} within {HEALTH_WAIT:?}; last answer {last:?}; log:\n{}",
                    self.logs()
                ),
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// Waits until the server is handling `count` requests: those a test
    /// started have reached the app, not merely been sent.
    pub async fn wait_for_in_flight(&self, count: u64) {
        self.wait_for_health(&format!("{count} requests in flight"), |json| json["in_flight"] == count).await;
    }

    /// Waits until the server says it is draining (a shutdown has begun) and
    /// returns that health reply.
    pub async fn wait_until_draining(&self) -> Reply {
        self.wait_for_health("status draining", |json| json["status"] == "draining").await
    }

    /// How many file descriptors the server has open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, Iterator::count)
    }

    /// Copies of the app library the server has mapped, counted from
    /// `/proc/<pid>/maps`: distinct in-memory copies (`/memfd:pounce-host-*`)
    /// or staged files (`.../pounce-host-<pid>-*/...`).
    pub fn mapped_app_copies(&self) -> usize {
        let mut files = self.mapped_app_files();
        files.dedup();
        files.len()
    }

    /// The paths of the app library copies in `/proc/<pid>/maps`, one per
    /// mapping, sorted.
    pub fn mapped_app_files(&self) -> Vec<String> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap_or_default();
        let mut files: Vec<String> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| is_app_copy(p))
            .map(str::to_owned)
            .collect();
        files.sort_unstable();
        files
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a path in `/proc/<pid>/maps` is a copy of an app library that
/// pounce-host made: an in-memory file or a file in a staging directory.
pub fn is_app_copy(mapped: &str) -> bool {
    mapped.starts_with("/memfd:pounce-host-") || mapped.contains("/pounce-host-")
}

/// Makes the process `command` starts see `memfd_create` fail with ENOSYS,
/// as on a kernel without it or under a seccomp policy that forbids it: a
/// seccomp filter installed between fork and exec.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn deny_memfd(command: &mut Command) {
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;
    // Offsets in `struct seccomp_data`.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let statement = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter { code: code as u16, jt, jf, k };
    let filter = [
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, ARCH),
        jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, AUDIT_ARCH, 1, 0),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, NR),
        jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, libc::SYS_memfd_create as u32, 0, 1),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    // SAFETY: the hook runs in the child between fork and exec: it only
    // makes two prctl calls on memory it owns (the filter was built before
    // the fork), allocates nothing and takes no lock. Filters survive exec.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program as *const libc::sock_fprog)
                    != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Removes the settings a test must not inherit from its own environment:
/// `POUNCE_*`, systemd's notify, watchdog and socket-activation variables.
pub fn clean_env(command: &mut Command) {
    for (key, _) in std::env::vars() {
        if key.starts_with("POUNCE_")
            || key == "NOTIFY_SOCKET"
            || key.starts_with("WATCHDOG_")
            || key.starts_with("LISTEN_")
        {
            command.env_remove(key);
        }
    }
}

/// Sets the child's `RLIMIT_NOFILE` (soft and hard) to `max_fds`.
fn limit_fds(command: &mut Command, max_fds: u64) {
    let limit = libc::rlimit { rlim_cur: max_fds as libc::rlim_t, rlim_max: max_fds as libc::rlim_t };
    // SAFETY: runs in the forked child before exec; setrlimit is
    // async-signal-safe and `limit` is a plain value copied in.
    unsafe {
        command.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
}

/// The `(flag, value)` defaults whose flag `args` does not give.
fn defaults_not_in<'a>(args: &[&str], defaults: &[(&'a str, &'a str)]) -> Vec<&'a str> {
    defaults.iter().filter(|(flag, _)| !args.contains(flag)).flat_map(|(flag, value)| [*flag, *value]).collect()
}

/// Waits for a pounce-host's `server_ready` event in `log`, at most
/// `timeout`, and returns the address it gives.
pub fn wait_for_ready(log: &Log, timeout: Duration) -> Option<SocketAddr> {
    log.wait_for(timeout, |lines| lines.iter().find_map(|line| ready_address(line)))
}

/// The value `args` give `flag`, as `flag value` or `flag=value`.
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(at, arg)| match arg.strip_prefix(flag)? {
        "" => args.get(at + 1).copied(),
        rest => rest.strip_prefix('='),
    })
}

/// Waits for `child` to exit, at most `timeout`. std cannot wait with a
/// timeout, so this polls.
pub fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a test sees of a response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON; panics, showing the body, if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Any failure of a client call, as text.
pub type ClientError = String;

/// A keep-alive HTTP/1.1 connection to a server.
pub struct Client {
    addr: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let (sender, connection) =
            http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        Ok(Client { addr, sender })
    }

    pub async fn send(&mut self, method: &str, path: &str, body: Bytes) -> Result<Reply, ClientError> {
        self.sender.ready().await.map_err(|e| format!("connection not ready: {e}"))?;
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = self.sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body })
    }

    /// Whether the server closed this connection (after `Connection: close`,
    /// say): the next request needs a new one.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, ClientError> {
        self.send("GET", path, Bytes::new()).await
    }
}

/// One request on a fresh connection.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Bytes) -> Result<Reply, ClientError> {
    Client::connect(addr).await?.send(method, path, body).await
}

/// `GET path` on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Reply, ClientError> {
    request(addr, "GET", path, Bytes::new()).await
}

/// `GET path` over HTTP/2 with prior knowledge, on a fresh connection.
pub async fn get_h2(addr: SocketAddr, path: &str) -> Result<(http::Version, Reply), ClientError> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) =
        http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
    let version = response.version();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok((version, Reply { status: parts.status.as_u16(), headers: parts.headers, body }))
}

/// `GET path` on a fresh connection, retrying while the connection itself
/// fails (a listener that is not there yet), for at most `within`.
pub async fn get_when_listening(addr: SocketAddr, path: &str, within: Duration) -> Result<Reply, ClientError> {
    let deadline = Instant::now() + within;
    loop {
        match get(addr, path).await {
            Err(e) if e.starts_with("connect") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            done => return done,
        }
    }
}

/// systemd's `systemd-socket-activate` (Debian package systemd, which
/// `.ci/run` installs): tests of socket activation fail, not skip, without it.
pub fn systemd_socket_activate() -> PathBuf {
    ["/usr/bin/systemd-socket-activate", "/bin/systemd-socket-activate"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .expect("systemd-socket-activate is installed (Debian package systemd; .ci/run installs it)")
}

/// A free TCP port on 127.0.0.1 (free when asked; tests that need one
/// bound by another program use it at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Runs `pounce-host` with `args` to completion (bounded), returning its
/// exit status and output.
pub fn run_host(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let mut command = Command::new(host_binary());
    command.args(args);
    run_to_end(command, timeout)
}

/// Runs `command` to completion, killing it after `timeout`; returns its
/// exit status and its stdout followed by its stderr.
pub fn run_to_end(mut command: Command, timeout: Duration) -> (ExitStatus, String) {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    if wait_for_exit(&mut child, timeout).is_none() {
        let _ = child.kill();
        panic!("{command:?} did not exit within {timeout:?}");
    }
    let output = child.wait_with_output().expect("collect output");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status, text)
}
