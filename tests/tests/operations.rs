//! Operations: systemd notifications, JSON logs, the access log, lifecycle
//! events and Prometheus metrics.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use pounce_tests::{get, replace_file, sample_app, sample_variant, Client, Server, TempDir};

/// A unix datagram socket standing in for systemd's notify socket.
struct FakeSystemd {
    socket: UnixDatagram,
    _dir: TempDir,
    path: String,
}

impl FakeSystemd {
    fn new() -> FakeSystemd {
        let dir = TempDir::new("notify");
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        FakeSystemd { socket, path: path.to_str().unwrap().to_owned(), _dir: dir }
    }

    /// The next datagram, waiting at most `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    }

    fn expect(&self, what: &str) -> String {
        self.next(Duration::from_secs(20)).unwrap_or_else(|| panic!("no datagram for {what}"))
    }
}

/// The assignments of a datagram, without their values for `MONOTONIC_USEC`
/// (checked separately) and `STATUS` (free text, checked by substring).
fn keys(datagram: &str) -> Vec<String> {
    datagram
        .lines()
        .map(|line| match line.split_once('=') {
            Some(("MONOTONIC_USEC" | "STATUS", _)) => line.split('=').next().unwrap_or_default().to_owned(),
            _ => line.to_owned(),
        })
        .collect()
}

fn status(datagram: &str) -> &str {
    datagram.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or("")
}

#[test]
fn systemd_hears_start_reloads_and_shutdown_in_order() {
    systemd_sequence(&[]);
}

/// In process mode the supervisor is the main pid: it alone talks to
/// systemd (its workers do not inherit `NOTIFY_SOCKET`).
#[test]
fn systemd_hears_the_supervisor_in_process_mode() {
    systemd_sequence(&["--mode", "process", "--processes", "2"]);
}

fn systemd_sequence(args: &[&str]) {
    let systemd = FakeSystemd::new();
    let dir = TempDir::new("notify-lib");
    let library = dir.join("libapp.so");
    replace_file(&sample_variant("Greeting A"), &library);
    let mut server = Server::start_with_env(&library, args, &[("NOTIFY_SOCKET", &systemd.path)]);

    let ready = systemd.expect("start");
    assert_eq!(keys(&ready), ["READY=1", "STATUS"], "{ready}");
    assert!(status(&ready).contains("serving generation 1"), "{ready}");

    replace_file(&sample_variant("Greeting B"), &library);
    server.signal(libc::SIGHUP);
    let reloading = systemd.expect("good reload start");
    assert_eq!(keys(&reloading), ["RELOADING=1", "MONOTONIC_USEC", "STATUS"], "{reloading}");
    let usec: u64 = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).unwrap().parse().unwrap();
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    assert!(
        usec <= now_usec && now_usec - usec < 30_000_000,
        "MONOTONIC_USEC is CLOCK_MONOTONIC: {usec} vs {now_usec}"
    );
    let reloaded = systemd.expect("good reload end");
    assert_eq!(keys(&reloaded), ["READY=1", "STATUS"], "{reloaded}");
    assert!(status(&reloaded).contains("serving generation 2") && status(&reloaded).contains("ok"), "{reloaded}");

    std::fs::write(&library, b"garbage").unwrap();
    server.signal(libc::SIGHUP);
    assert_eq!(keys(&systemd.expect("failed reload start")), ["RELOADING=1", "MONOTONIC_USEC", "STATUS"]);
    let failed = systemd.expect("failed reload end");
    assert_eq!(keys(&failed), ["READY=1", "STATUS"], "{failed}");
    assert!(status(&failed).contains("reload failed, still serving generation 2"), "{failed}");

    server.signal(libc::SIGTERM);
    let stopping = systemd.expect("shutdown");
    assert_eq!(keys(&stopping), ["STOPPING=1", "STATUS"], "{stopping}");
    assert_eq!(server.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0));
    assert_eq!(systemd.next(Duration::from_millis(300)), None, "nothing after STOPPING=1");
}

#[test]
fn systemd_watchdog_is_fed_while_serving() {
    let systemd = FakeSystemd::new();
    let server =
        Server::start_with_env(&sample_app(), &[], &[("NOTIFY_SOCKET", &systemd.path), ("WATCHDOG_USEC", "200000")]);
    let mut pings = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while pings < 3 && Instant::now() < deadline {
        if systemd.next(Duration::from_millis(500)).as_deref() == Some("WATCHDOG=1") {
            pings += 1;
        }
    }
    assert_eq!(pings, 3, "WATCHDOG=1 every 100 ms:\n{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_notify_socket_fails_nothing() {
    let server = Server::start_with_env(&sample_app(), &[], &[("NOTIFY_SOCKET", "/nonexistent/notify.sock")]);
    assert_eq!(get(server.addr, "/").await.unwrap().status, 200);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("generation 2 published", Duration::from_secs(20)), "{}", server.logs());
    assert_eq!(get(server.addr, "/health").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_with_access_log_and_events() {
    let dir = TempDir::new("json");
    let library = dir.join("libapp.so");
    replace_file(&sample_variant("Greeting A"), &library);
    let mut server = Server::start(&library, &["--log-format", "json", "--access-log", "on"]);
    assert_eq!(get(server.addr, "/").await.unwrap().status, 200);
    assert_eq!(get(server.addr, "/nope").await.unwrap().status, 404);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("generation_retired", Duration::from_secs(20)), "{}", server.logs());
    server.signal(libc::SIGTERM);
    // The whole log: `wait_exit` also waits for the end of its stderr.
    assert_eq!(server.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0));

    let lines: Vec<serde_json::Value> = server
        .logs()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    for expected in [
        "server_ready",
        "reload_started",
        "generation_loaded",
        "generation_draining",
        "generation_retired",
        "shutdown_started",
        "shutdown_drained",
    ] {
        assert!(events.contains(&expected), "event {expected} missing from {events:?}");
    }
    let access: Vec<&serde_json::Value> = lines.iter().filter(|l| l["target"] == "access").collect();
    assert_eq!(access.len(), 2, "one access line per request: {access:?}");
    let first = access[0];
    assert_eq!((first["method"].as_str(), first["path"].as_str()), (Some("GET"), Some("/")));
    assert_eq!(
        (first["status"].as_u64(), first["bytes"].as_u64(), first["generation"].as_u64()),
        (Some(200), Some(13), Some(1))
    );
    assert!(first["duration_ms"].as_f64().is_some());
    assert_eq!(access[1]["status"].as_u64(), Some(404));
    let retired = lines.iter().find(|l| l["event"] == "generation_retired").unwrap();
    assert_eq!((retired["generation"].as_u64(), retired["timed_out"].as_bool()), (Some(1), Some(false)));
    assert!(retired["drain_ms"].as_f64().is_some());
    let loaded = lines.iter().find(|l| l["event"] == "generation_loaded").unwrap();
    for field in ["load_ms", "init_ms", "publish_us", "reload_ms"] {
        assert!(loaded[field].as_f64().is_some(), "{field} in {loaded}");
    }
}

#[test]
fn reload_failed_event_names_the_reason() {
    let dir = TempDir::new("failed-event");
    let library = dir.join("libapp.so");
    replace_file(&sample_app(), &library);
    let server = Server::start(&library, &["--log-format", "json"]);
    std::fs::write(&library, b"garbage").unwrap();
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("reload_failed", Duration::from_secs(20)));
    let line = server.logs().lines().find(|l| l.contains("reload_failed")).unwrap().to_owned();
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(json["message"].as_str().unwrap().contains("not a shared library"), "{json}");
    assert_eq!(json["serving"].as_u64(), Some(1));
}

/// The value of a sample line `name{labels} value` in a scrape.
fn sample(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape.lines().find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_traffic_and_reloads() {
    let dir = TempDir::new("metrics");
    let library = dir.join("libapp.so");
    replace_file(&sample_app(), &library);
    let server = Server::start(&library, &["--metrics-path", "/metrics", "--keep-alive-timeout", "60s"]);
    // One connection for everything, so the open-connections gauge does not
    // race the server noticing that earlier connections closed.
    let mut client = Client::connect(server.addr).await.unwrap();
    for _ in 0..5 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert_eq!(client.get("/nope").await.unwrap().status, 404);
    assert_eq!(client.get("/panic").await.unwrap().status, 500);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("generation 2 published", Duration::from_secs(20)));
    std::fs::write(&library, b"garbage").unwrap();
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("reload failed", Duration::from_secs(20)));
    assert_eq!(client.get("/").await.unwrap().status, 200);
    assert!(server.wait_for_log("generation 1 retired", Duration::from_secs(20)));

    let scrape = client.get("/metrics").await.unwrap();
    assert_eq!(scrape.status, 200);
    assert!(scrape.header("content-type").unwrap_or("").starts_with("application/openmetrics-text"));
    let text = scrape.text();
    // Generation 1 is retired: its series fold into `generation="retired"`.
    assert_eq!(sample(&text, r#"pounce_requests_total{class="2xx",generation="retired"}"#), Some(5.0), "{text}");
    assert_eq!(sample(&text, r#"pounce_requests_total{class="4xx",generation="retired"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"pounce_requests_total{class="5xx",generation="retired"}"#), Some(1.0), "{text}");
    assert!(!text.contains(r#"generation="1""#), "{text}");
    assert_eq!(sample(&text, r#"pounce_requests_total{class="2xx",generation="2"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"pounce_reloads_total{outcome="ok"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, r#"pounce_reloads_total{outcome="failed"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, "pounce_reload_duration_seconds_count"), Some(2.0), "{text}");
    assert_eq!(sample(&text, r#"pounce_drain_duration_seconds_count{timed_out="false"}"#), Some(1.0), "{text}");
    assert_eq!(sample(&text, "pounce_request_duration_seconds_count"), Some(8.0), "{text}");
    assert_eq!(sample(&text, "pounce_current_generation"), Some(2.0), "{text}");
    assert_eq!(sample(&text, "pounce_draining_generations"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "pounce_in_flight_requests"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "pounce_open_connections"), Some(1.0), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
}
