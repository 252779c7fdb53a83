//! Listeners: HTTPS (ALPN, TLS versions, the handshake deadline, the
//! certificate reloaded with the app), unix sockets (stale files, live
//! ones, permissions), several listeners at once (IPv4, IPv6, unix) in both
//! modes, the admin listener, systemd socket activation with
//! `systemd-socket-activate`, and the SIGUSR2 binary upgrade under load.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use pounce_tests::tls::{write_replacing, TestCert, TlsClient, TLS12, TLS13};
use pounce_tests::{
    clean_env, free_port, get, get_when_listening, host_binary, replace_file, run_host, sample_app, sample_variant,
    systemd_socket_activate, Client, Reply, Server, TempDir,
};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixStream};

const WAIT: Duration = Duration::from_secs(20);

/// `GET path` over the unix socket at `socket`.
async fn get_unix(socket: &Path, path: &str) -> Result<Reply, String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(path)
        .header(http::header::HOST, "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status: parts.status.as_u16(), headers: parts.headers, body })
}

/// A TLS certificate and key written into `dir`.
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
}

impl CertFiles {
    fn new(dir: &TempDir, made: &TestCert) -> CertFiles {
        let files = CertFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        made.write(&files.cert, &files.key);
        files
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".to_owned(),
            self.cert.to_string_lossy().into_owned(),
            "--tls-key".to_owned(),
            self.key.to_string_lossy().into_owned(),
        ]
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The listener marked `(admin)` in the `server_ready` line.
fn admin_address(server: &Server) -> SocketAddr {
    server.admin_addr().unwrap_or_else(|| panic!("no admin listener:\n{}", server.logs()))
}

// ---------------------------------------------------------------------------
// TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_http1_and_h2_by_alpn_over_tls_1_2_and_1_3() {
    let dir = TempDir::new("tls");
    let made = TestCert::new();
    let files = CertFiles::new(&dir, &made);
    let server = Server::start(&sample_app(), &strs(&files.args()));
    assert!(server.logs().contains(&format!("https://{}", server.addr)), "{}", server.logs());

    let h1 = TlsClient::trusting(&made.der).alpn(&[b"http/1.1"]).get(server.addr, "/").await.unwrap();
    assert_eq!((h1.reply.status, h1.reply.text()), (200, "Hello, World!".to_owned()));
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.http_version, http::Version::HTTP_11);
    assert_eq!(h1.certificate, made.der);

    let h2 = TlsClient::trusting(&made.der).get(server.addr, "/version").await.unwrap();
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]), "h2 is preferred");
    assert_eq!(h2.http_version, http::Version::HTTP_2);
    assert_eq!(h2.reply.text(), "Hello from sample-app (generation 1)\n");

    for (version, expected) in [(&TLS13, rustls::ProtocolVersion::TLSv1_3), (&TLS12, rustls::ProtocolVersion::TLSv1_2)]
    {
        let reply = TlsClient::trusting(&made.der).versions(&[version]).get(server.addr, "/").await.unwrap();
        assert_eq!(reply.tls_version, Some(expected));
        assert_eq!(reply.reply.status, 200);
    }
    let no_alpn = TlsClient::trusting(&made.der).alpn(&[]).get(server.addr, "/").await.unwrap();
    assert_eq!((no_alpn.alpn, no_alpn.http_version), (None, http::Version::HTTP_11));

    // Plain HTTP to the HTTPS port gets no answer.
    assert!(get(server.addr, "/").await.is_err(), "plain HTTP is not served on an HTTPS port");
    // A client that does not trust the certificate fails its handshake.
    let other = TestCert::new();
    assert!(TlsClient::trusting(&other.der).get(server.addr, "/").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_handshake_counts_against_header_timeout() {
    let dir = TempDir::new("tls-slow");
    let files = CertFiles::new(&dir, &TestCert::new());
    let mut args = files.args();
    args.extend(["--header-timeout".to_owned(), "1s".to_owned()]);
    let server = Server::start(&sample_app(), &strs(&args));
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed without a handshake: {read:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "closed after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_a_renewed_certificate_and_a_broken_one_keeps_the_old() {
    let dir = TempDir::new("tls-reload");
    let library = dir.join("libapp.so");
    replace_file(&sample_app(), &library);
    let first = TestCert::new();
    let files = CertFiles::new(&dir, &first);
    let server = Server::start(&library, &strs(&files.args()));
    fn client<'a>(first: &'a TestCert, cert: &'a TestCert) -> TlsClient<'a> {
        TlsClient { trusted: vec![&first.der, &cert.der], ..TlsClient::trusting(&cert.der) }
    }

    // Renewed: the next connections get the new certificate, with generation 2.
    let second = TestCert::new();
    second.write(&files.cert, &files.key);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("generation 2 published", WAIT), "{}", server.logs());
    let renewed = client(&first, &second).get(server.addr, "/version").await.unwrap();
    assert_eq!(renewed.certificate, second.der, "the renewed certificate is served");
    assert_eq!(renewed.reply.text(), "Hello from sample-app (generation 2)\n");

    // Broken: a certificate that is not PEM, a key that does not match,
    // a missing key. Each fails the reload; the second pair keeps serving.
    let third = TestCert::new();
    type Breakage<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, Breakage); 3] = [
        ("not valid PEM", Box::new(|| write_replacing(&files.cert, b"-----BEGIN CERTIFICATE-----\nnope\n", 0o644))),
        (
            "does not belong",
            Box::new(|| {
                write_replacing(&files.cert, second.cert_pem.as_bytes(), 0o644);
                write_replacing(&files.key, third.key_pem.as_bytes(), 0o600);
            }),
        ),
        ("cannot read it", Box::new(|| std::fs::remove_file(&files.key).unwrap())),
    ];
    for (at, (problem, breakage)) in cases.iter().enumerate() {
        breakage();
        server.signal(libc::SIGHUP);
        assert!(server.wait_for_log_count("reload_failed", at + 1, WAIT), "{problem}: {}", server.logs());
        let logs = server.logs();
        let failed = logs.lines().filter(|l| l.contains("reload_failed")).nth(at).unwrap();
        assert!(failed.contains(problem) && failed.contains("TLS"), "{problem}: {failed}");
        let still = client(&first, &second).get(server.addr, "/version").await.unwrap();
        assert_eq!(still.certificate, second.der, "{problem}: the old pair keeps serving");
        assert_eq!(still.reply.text(), "Hello from sample-app (generation 2)\n", "{problem}: so does the old app");
        let health = client(&first, &second).get(server.addr, "/health").await.unwrap().reply.json();
        assert_eq!(health["last_reload"]["outcome"], "failed", "{health}");
        let error = health["last_reload"]["error"].as_str().unwrap_or_default();
        assert!(error.contains(problem), "{problem}: {error}");
    }

    // Fixed again: the reload after it succeeds.
    second.write(&files.cert, &files.key);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("generation 3 published", WAIT), "{}", server.logs());
}

#[test]
fn tls_start_up_errors_name_the_file_and_the_problem() {
    let dir = TempDir::new("tls-bad");
    let library = sample_app();
    let library = library.to_str().unwrap();
    let made = TestCert::new();
    let files = CertFiles::new(&dir, &made);
    let (cert, key) = (files.cert.to_str().unwrap(), files.key.to_str().unwrap());
    let missing = dir.join("missing.pem");
    let missing = missing.to_str().unwrap();

    let (status, output) = run_host(&["serve", "--port", "0", "--tls-cert", cert, library], WAIT);
    assert_eq!(status.code(), Some(2), "a certificate without a key is a bad command line: {output}");
    assert!(output.contains("--tls-key / POUNCE_TLS_KEY (tls_key) is not"), "{output}");

    let (status, output) = run_host(&["serve", "--port", "0", "--tls-cert", missing, "--tls-key", key, library], WAIT);
    assert_eq!(status.code(), Some(5), "{output}");
    assert!(output.contains(&format!("TLS certificate {missing}: cannot read it")), "{output}");

    let other = TestCert::new();
    let other_key = dir.join("other-key.pem");
    write_replacing(&other_key, other.key_pem.as_bytes(), 0o600);
    let other_key = other_key.to_str().unwrap();
    let (status, output) =
        run_host(&["serve", "--port", "0", "--tls-cert", cert, "--tls-key", other_key, library], WAIT);
    assert_eq!(status.code(), Some(5), "{output}");
    assert!(output.contains("does not belong to the (first) certificate") && output.contains(other_key), "{output}");

    let (status, output) = run_host(&["serve", "--port", "0", "--tls-cert", key, "--tls-key", cert, library], WAIT);
    assert_eq!(status.code(), Some(5), "{output}");
    assert!(output.contains(&format!("TLS certificate {key}: no CERTIFICATE block")), "{output}");
}

// ---------------------------------------------------------------------------
// Unix sockets, several listeners

fn unix_only(library: &Path, args: &[&str]) -> Server {
    let mut command = Command::new(host_binary());
    command.arg("serve").args(["--log-format", "text"]).args(args).arg(library);
    clean_env(&mut command);
    Server::launch(command, "/health", false).unwrap_or_else(|(status, logs)| panic!("({status:?}):\n{logs}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_serves_alone_with_its_mode_and_shows_as_the_peer() {
    let dir = TempDir::new("uds");
    let socket = dir.join("pounce.sock");
    let path = socket.to_str().unwrap();
    let server = unix_only(&sample_app(), &["--uds", path, "--uds-mode", "600", "--access-log", "on"]);
    let logs = server.logs();
    assert!(logs.contains(&format!("listening on unix:{path}")), "only the socket: {logs}");
    let reply = get_unix(&socket, "/").await.unwrap();
    assert_eq!((reply.status, reply.text()), (200, "Hello, World!".to_owned()));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let health = get_unix(&socket, "/health").await.unwrap().json();
    assert_eq!(health["status"], "ok");
    assert!(server.wait_for_log(&format!("peer=unix:{path}"), WAIT), "{}", server.logs());
    assert!(!server.logs().contains("listening on http"), "no TCP port with --uds alone");
}

#[test]
fn a_stale_socket_file_is_replaced_but_a_live_one_is_not() {
    let dir = TempDir::new("uds-stale");
    let socket = dir.join("pounce.sock");
    let path = socket.to_str().unwrap();
    let library = sample_app();

    // A live listener: pounce-host must not take its path.
    let live = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let (status, output) = run_host(&["serve", "--uds", path, library.to_str().unwrap()], WAIT);
    assert_eq!(status.code(), Some(4), "{output}");
    assert!(output.contains(&format!("unix socket {path}: another process is listening on it")), "{output}");
    assert!(socket.exists(), "the live socket's file is left alone");

    // The listener is gone, its file stays: a stale file is replaced.
    drop(live);
    assert!(socket.exists());
    let mut server = unix_only(&library, &["--uds", path]);
    assert!(server.logs().contains("removing the stale socket file"), "{}", server.logs());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(runtime.block_on(get_unix(&socket, "/")).unwrap().status, 200);
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(WAIT).and_then(|s| s.code()), Some(0));

    // Not a socket at all.
    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    let (status, output) = run_host(&["serve", "--uds", file.to_str().unwrap(), library.to_str().unwrap()], WAIT);
    assert_eq!(status.code(), Some(4), "{output}");
    assert!(output.contains("exists and is not a socket"), "{output}");
}

/// Every listener of `server` answers `/version` on a new connection with
/// `generation`. In process mode an old worker may take a new connection in
/// the moment between a publication and its retirement (answering it, with
/// `Connection: close`), so each listener is asked again until the
/// generation answers, for at most [`WAIT`].
async fn every_listener_serves(server: &Server, socket: &Path, v6: SocketAddr, generation: u64) {
    let expected = format!("Hello from sample-app (generation {generation})\n");
    let deadline = std::time::Instant::now() + WAIT;
    for listener in ["IPv4", "IPv6", "unix"] {
        let answer = loop {
            let reply = match listener {
                "IPv4" => get(server.addr, "/version").await,
                "IPv6" => get(v6, "/version").await,
                _ => get_unix(socket, "/version").await,
            };
            let text = reply.map(|r| r.text()).unwrap_or_else(|e| e);
            if text == expected || std::time::Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(answer, expected, "{listener}");
    }
}

async fn tcp_v4_v6_and_unix_at_once(mode: &[&str]) {
    let dir = TempDir::new("many");
    let socket = dir.join("pounce.sock");
    let mut args = vec!["--host", "127.0.0.1,::1", "--uds", socket.to_str().unwrap()];
    args.extend_from_slice(mode);
    let server = Server::start(&sample_app(), &args);
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, server.addr.port()));
    let logs = server.logs();
    let ready = logs.lines().find(|l| l.contains("server_ready")).unwrap();
    for listener in [format!("http://{}", server.addr), format!("http://{v6}"), format!("unix:{}", socket.display())] {
        assert!(ready.contains(&listener), "{listener} in {ready}");
    }
    every_listener_serves(&server, &socket, v6, 1).await;
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("generation 2 published", WAIT), "{}", server.logs());
    every_listener_serves(&server, &socket, v6, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_v4_v6_and_unix_at_once_serve_the_same_generations() {
    tcp_v4_v6_and_unix_at_once(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_mode_workers_serve_every_listener() {
    tcp_v4_v6_and_unix_at_once(&["--mode", "process", "--processes", "2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_mode_serves_https_and_the_admin_listener() {
    let dir = TempDir::new("process-tls");
    let made = TestCert::new();
    let files = CertFiles::new(&dir, &made);
    let mut args = files.args();
    args.extend(
        ["--mode", "process", "--processes", "2", "--admin-listen", "0", "--metrics-path", "/metrics"]
            .map(str::to_owned),
    );
    let server = Server::start(&sample_app(), &strs(&args));
    let reply = TlsClient::trusting(&made.der).get(server.addr, "/").await.unwrap();
    assert_eq!((reply.reply.status, reply.http_version), (200, http::Version::HTTP_2));
    let admin = admin_address(&server);
    let health = get(admin, "/health").await.unwrap().json();
    assert_eq!(health["mode"], "process", "{health}");
    assert_eq!(get(admin, "/metrics").await.unwrap().status, 200);
    // A broken certificate fails a process-mode reload too.
    write_replacing(&files.cert, b"garbage", 0o644);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("reload_failed", WAIT), "{}", server.logs());
    assert!(server.logs().contains("no CERTIFICATE block"), "{}", server.logs());
    let still = TlsClient::trusting(&made.der).get(server.addr, "/version").await.unwrap();
    assert_eq!(still.reply.text(), "Hello from sample-app (generation 1)\n");
}

// ---------------------------------------------------------------------------
// The admin listener

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_has_health_and_metrics_and_the_app_port_only_status() {
    let server = Server::start(&sample_app(), &["--admin-listen", "0", "--metrics-path", "/metrics"]);
    let admin = admin_address(&server);
    assert!(admin.ip().is_loopback(), "a bare port listens on loopback: {admin}");

    let brief = get(server.addr, "/health").await.unwrap();
    assert_eq!(brief.status, 200);
    let brief = brief.json();
    let keys: Vec<&str> = brief.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["generation", "status"], "{brief}");
    assert_eq!(get(server.addr, "/metrics").await.unwrap().status, 404, "metrics go to the app: it has none");

    let full = get(admin, "/health").await.unwrap().json();
    assert_eq!(full["status"], "ok");
    assert!(full.get("uptime_seconds").is_some() && full.get("last_reload").is_some(), "{full}");
    let metrics = get(admin, "/metrics").await.unwrap();
    assert_eq!(metrics.status, 200);
    assert!(metrics.text().contains("pounce_"), "{}", metrics.text());
    let other = get(admin, "/").await.unwrap();
    assert_eq!(other.status, 404, "the admin listener never reaches the app");
    assert!(other.text().contains("/health and /metrics"), "{}", other.text());
}

// ---------------------------------------------------------------------------
// systemd socket activation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activation_serves_the_inherited_sockets() {
    let activate = systemd_socket_activate();
    let dir = TempDir::new("activate");
    let socket = dir.join("pounce.sock");
    let (app_port, admin_port) = (free_port(), free_port());
    let mut command = Command::new(activate);
    command
        .args(["-l", &format!("127.0.0.1:{app_port}"), "-l", socket.to_str().unwrap()])
        .args(["-l", &format!("127.0.0.1:{admin_port}"), "--fdname=web:web:admin"])
        .arg(host_binary())
        .args(["serve", "--log-format", "text", "--port", "1", "--metrics-path", "/metrics"])
        .arg(sample_app());
    clean_env(&mut command);
    let mut started = command;
    started.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
    // systemd-socket-activate listens at once and starts the server on the
    // first connection, which waits in the backlog meanwhile: the request
    // below is what starts it, and it is answered.
    let launch = std::thread::spawn(move || Server::launch(started, "/health", true));
    let app = SocketAddr::from(([127, 0, 0, 1], app_port));
    let first = get_when_listening(app, "/version", WAIT).await.unwrap();
    assert_eq!(first.text(), "Hello from sample-app (generation 1)\n");
    let mut server = launch.join().unwrap().unwrap_or_else(|(status, logs)| panic!("({status:?}):\n{logs}"));
    assert_eq!(server.addr, app);
    let logs = server.logs();
    assert!(logs.contains("systemd passed 3 listening socket(s)"), "{logs}");
    assert!(!logs.contains("127.0.0.1:1 "), "--port is not bound under socket activation: {logs}");
    assert_eq!(get_unix(&socket, "/").await.unwrap().status, 200);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    assert_eq!(get(admin, "/metrics").await.unwrap().status, 200, "the socket named admin");
    assert_eq!(get(admin, "/").await.unwrap().status, 404);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("generation 2 published", WAIT), "{}", server.logs());
    assert_eq!(get_unix(&socket, "/version").await.unwrap().text(), "Hello from sample-app (generation 2)\n");
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(WAIT).and_then(|s| s.code()), Some(0), "{}", server.logs());
}

// ---------------------------------------------------------------------------
// Binary upgrade

/// The host binary copied where a test may replace it, as a deploy does.
fn binary_copy(dir: &TempDir) -> PathBuf {
    let copy = dir.join("pounce-host");
    replace_file(&host_binary(), &copy);
    pounce_tests::set_mode(&copy, 0o755);
    copy
}

fn start_from(binary: &Path, library: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut command = Command::new(binary);
    command.arg("serve").args(["--port", "0", "--log-format", "text"]).args(args).arg(library);
    clean_env(&mut command);
    command.envs(env.iter().copied());
    Server::launch(command, "/health", true).unwrap_or_else(|(status, logs)| panic!("({status:?}):\n{logs}"))
}

/// The pid the upgrade handed over to, from `upgrade_complete`.
fn new_pid(server: &Server) -> i32 {
    let logs = server.logs();
    let line = logs.lines().find(|l| l.contains("upgrade_complete")).expect("upgrade_complete logged");
    let field = line.split_whitespace().find_map(|w| w.strip_prefix("new_pid=")).expect("new_pid field");
    field.parse().unwrap()
}

/// Ends a process that is not our child (the upgraded server).
fn stop(pid: i32) {
    // SAFETY: kill(2) with a pid this test started (indirectly).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + WAIT;
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Keep-alive clients requesting `/` in a loop until `stop`; a `Connection:
/// close` answer means the next request goes on a new connection.
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    stop: AtomicBool,
    errors: std::sync::Mutex<Vec<String>>,
}

async fn keep_requesting(addr: SocketAddr, load: Arc<Load>) {
    let mut client: Option<Client> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !load.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let mut connected = match client.take() {
            Some(client) => client,
            None => match Client::connect(addr).await {
                Ok(client) => client,
                Err(e) => {
                    load.refused.fetch_add(1, Ordering::Relaxed);
                    load.errors.lock().unwrap().push(e);
                    continue;
                }
            },
        };
        match connected.get("/").await {
            Ok(reply) if reply.status == 200 => {
                load.ok.fetch_add(1, Ordering::Relaxed);
                if reply.header("connection") != Some("close") {
                    client = Some(connected);
                }
            }
            Ok(reply) => {
                load.failed.fetch_add(1, Ordering::Relaxed);
                load.errors.lock().unwrap().push(format!("status {}", reply.status));
            }
            Err(e) => {
                load.failed.fetch_add(1, Ordering::Relaxed);
                load.errors.lock().unwrap().push(e);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_the_binary_under_load_without_a_failed_request() {
    upgrade_under_load(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_the_process_mode_supervisor_under_load() {
    upgrade_under_load(&["--mode", "process", "--processes", "2"]).await;
}

async fn upgrade_under_load(mode: &[&str]) {
    let process_mode = !mode.is_empty();
    let dir = TempDir::new("upgrade");
    let binary = binary_copy(&dir);
    let library = dir.join("libapp.so");
    replace_file(&sample_variant("Greeting A"), &library);
    let socket = dir.join("pounce.sock");
    let mut args = vec!["--uds", socket.to_str().unwrap()];
    args.extend_from_slice(mode);
    let mut server = start_from(&binary, &library, &args, &[]);
    let old_pid = server.pid();

    let load = Arc::new(Load {
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        errors: Default::default(),
    });
    let clients: Vec<_> = (0..4).map(|_| tokio::spawn(keep_requesting(server.addr, load.clone()))).collect();
    while load.ok.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A deploy renames a new build over the binary, and the library too.
    replace_file(&host_binary(), &binary);
    pounce_tests::set_mode(&binary, 0o755);
    replace_file(&sample_variant("Greeting B"), &library);
    server.signal(libc::SIGUSR2);
    assert!(server.wait_for_log("upgrade_complete", WAIT), "{}", server.logs());
    let pid = new_pid(&server);
    assert_ne!(pid, old_pid);
    let old_exit = server.wait_exit_status(WAIT);
    let served_before_exit = load.ok.load(Ordering::Relaxed);
    while load.ok.load(Ordering::Relaxed) < served_before_exit + 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    load.stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let health = get(server.addr, "/health").await.unwrap().json();
    let version = get(server.addr, "/version").await.unwrap().text();
    let unix_version = get_unix(&socket, "/version").await.unwrap().text();
    stop(pid);
    let logs = server.logs();
    assert_eq!(old_exit.and_then(|s| s.code()), Some(0), "the old process drains and exits 0:\n{logs}");
    let errors = load.errors.lock().unwrap().clone();
    assert_eq!(load.failed.load(Ordering::Relaxed), 0, "failed requests: {errors:?}\n{logs}");
    assert_eq!(load.refused.load(Ordering::Relaxed), 0, "refused connections: {errors:?}\n{logs}");
    let serving = if process_mode { &health["service"]["supervisor_pid"] } else { &health["pid"] };
    assert_eq!(*serving, pid, "the new process serves: {health}");
    assert_eq!(health["generation"], 2, "it loaded the current library as the next generation: {health}");
    assert_eq!(version, "Greeting B (generation 2)\n");
    assert_eq!(unix_version, version, "the unix socket was handed over too");
    assert!(logs.contains(&format!("took over from pid {old_pid}")), "{logs}");
    eprintln!("upgrade under load {mode:?}: {} requests, 0 failed, 0 refused", load.ok.load(Ordering::Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_fails_to_start_leaves_the_old_one_serving() {
    let dir = TempDir::new("upgrade-bad");
    let binary = binary_copy(&dir);
    let server = start_from(&binary, &sample_app(), &[], &[]);
    let broken = dir.join("broken");
    std::fs::write(&broken, "#!/bin/sh\necho 'pounce-host: error: this build is broken' >&2\nexit 7\n").unwrap();
    pounce_tests::set_mode(&broken, 0o755);
    std::fs::rename(&broken, &binary).unwrap();
    server.signal(libc::SIGUSR2);
    assert!(server.wait_for_log("upgrade_failed", WAIT), "{}", server.logs());
    let logs = server.logs();
    let failed = logs.lines().find(|l| l.contains("upgrade_failed")).unwrap();
    assert!(failed.contains("exited with status 7") && failed.contains("keeps serving"), "{failed}");
    assert!(logs.contains("this build is broken"), "the new binary's own words reach the log: {logs}");
    let health = get(server.addr, "/health").await.unwrap().json();
    assert_eq!(health["pid"], server.pid(), "{health}");
    assert_eq!(get(server.addr, "/").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_upgraded_process_becomes_the_main_pid() {
    let dir = TempDir::new("upgrade-notify");
    let binary = binary_copy(&dir);
    let notify = dir.join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut server = start_from(&binary, &sample_app(), &[], &[("NOTIFY_SOCKET", notify.to_str().unwrap())]);
    let mut buf = [0u8; 4096];
    let mut next = || {
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().starts_with("READY=1"));
    server.signal(libc::SIGUSR2);
    assert!(server.wait_for_log("upgrade_complete", WAIT), "{}", server.logs());
    let pid = new_pid(&server);
    let handed = next();
    assert!(handed.starts_with(&format!("MAINPID={pid}\nREADY=1\n")), "{handed}");
    assert_eq!(server.wait_exit_status(WAIT).and_then(|s| s.code()), Some(0));
    // From now on the new process tells systemd about its reloads.
    // SAFETY: kill(2) on the process the upgrade started.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let reloading = next();
    assert!(reloading.starts_with("RELOADING=1"), "{reloading}");
    stop(pid);
}
