//! Support for pounce-host's end-to-end tests: build the real binary and the
//! sample app, start `pounce-host serve` on a free loopback port, talk HTTP
//! to it with hyper's client, send it signals, and read its log.
//!
//! Every wait here is bounded: a test that hangs is a failing test.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

fn cargo_build(packages: &[&str], target: &Path, greeting: Option<&str>) {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.arg("build").arg("--quiet").current_dir(workspace()).env("CARGO_TARGET_DIR", target);
    for package in packages {
        command.args(["-p", package]);
    }
    match greeting {
        Some(greeting) => command.env("SAMPLE_GREETING", greeting),
        None => command.env_remove("SAMPLE_GREETING"),
    };
    let status = command.status().expect("cargo runs");
    assert!(status.success(), "cargo build {packages:?} failed");
}

/// Builds `pounce-host` and the sample app once per test process.
fn built() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
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

/// The sample app as built by the workspace (default greeting).
pub fn sample_app() -> PathBuf {
    built().join("libsample_app.so")
}

/// A private temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pounce-e2e-{}-{label}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
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

/// The sample app built with `SAMPLE_GREETING=greeting`. Variants build in
/// their own target directory, one at a time, so they never touch the
/// library other tests are serving; each is built once per test process.
pub fn sample_variant(greeting: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let target = variants_target_dir();
    let slug: String = greeting.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let built = target.join(format!("libsample_{slug}_{}.so", std::process::id()));
    if !built.exists() {
        cargo_build(&["sample-app"], &target, Some(greeting));
        std::fs::copy(target.join("debug/libsample_app.so"), &built).expect("keep the variant");
    }
    built
}

/// Replaces `dest` with a copy of `source` the way a linker or deploy does:
/// write a new file, then rename it over the old one (a new inode).
pub fn replace_file(source: &Path, dest: &Path) {
    let partial = dest.with_extension("partial");
    std::fs::copy(source, &partial).expect("copy library");
    std::fs::rename(&partial, dest).expect("rename library");
}

/// A running `pounce-host serve`.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

/// How long a server may take to start (it builds nothing; debug binary).
const START_TIMEOUT: Duration = Duration::from_secs(30);

impl Server {
    /// Starts `pounce-host serve --port 0 <library> <args>` and waits until
    /// it listens.
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
        Self::launch(library, args, &[], Some(max_fds))
            .unwrap_or_else(|(status, logs)| panic!("server did not start ({status:?}):\n{logs}"))
    }

    /// Like [`Server::start`], but returns the exit status and log if the
    /// server exits instead of listening.
    pub fn try_start(library: &Path, args: &[&str]) -> Result<Server, (Option<ExitStatus>, String)> {
        Self::try_start_with_env(library, args, &[])
    }

    fn try_start_with_env(
        library: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, (Option<ExitStatus>, String)> {
        Self::launch(library, args, env, None)
    }

    fn launch(
        library: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        max_fds: Option<u64>,
    ) -> Result<Server, (Option<ExitStatus>, String)> {
        let mut command = Command::new(host_binary());
        command
            .arg("serve")
            .args(defaults_not_in(args, &[("--port", "0"), ("--log-format", "text")]))
            .args(args)
            .arg(library)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars() {
            if key.starts_with("POUNCE_") || key == "NOTIFY_SOCKET" || key.starts_with("WATCHDOG_") {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().copied());
        if let Some(max_fds) = max_fds {
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
        let mut child = command.spawn().expect("start pounce-host");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
            if let Some(addr) = listening_addr(&text) {
                return Ok(Server { child, addr, logs });
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100)); // let the reader drain stderr
                let text = logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
                return Err((Some(status), text));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err((None, text));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    /// How many log lines contain `needle`.
    pub fn count_logs(&self, needle: &str) -> usize {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until the log contains `needle`, at most `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count_logs(needle) > 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// How many file descriptors the server has open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, Iterator::count)
    }

    /// The health endpoint's JSON, on a fresh connection.
    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        let reply = get(self.addr, "/health").await?;
        serde_json::from_slice(&reply.body).map_err(|e| format!("health is not JSON ({e}): {}", reply.text()))
    }

    /// Copies of the app library the server has mapped, counted from
    /// `/proc/<pid>/maps` (distinct staged files).
    pub fn mapped_app_copies(&self) -> usize {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap_or_default();
        let mut files: Vec<&str> =
            maps.lines().filter_map(|l| l.split_whitespace().nth(5)).filter(|p| p.contains("/pounce-host-")).collect();
        files.sort_unstable();
        files.dedup();
        files.len()
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

/// The `(flag, value)` defaults whose flag `args` does not give.
fn defaults_not_in<'a>(args: &[&str], defaults: &[(&'a str, &'a str)]) -> Vec<&'a str> {
    defaults.iter().filter(|(flag, _)| !args.contains(flag)).flat_map(|(flag, value)| [*flag, *value]).collect()
}

/// The first `listening on http://ADDR` in a log.
pub fn listening_addr(logs: &str) -> Option<SocketAddr> {
    let start = logs.find("listening on http://")? + "listening on http://".len();
    let is_addr_char = |c: char| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']');
    logs[start..].split(|c: char| !is_addr_char(c)).next()?.parse().ok()
}

/// What a test sees of a response.
#[derive(Debug)]
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
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("wait for the child").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{command:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().expect("collect output");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status, text)
}
