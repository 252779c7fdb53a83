//! Process mode end to end: the real `pounce-host serve --mode process`, real
//! crashes (the sample app's `/fault/...` routes and libraries built to
//! crash), real signals, HTTP over loopback.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pounce_tests::{
    crashing_constructor_library, get, replace_file, sample_app, sample_fault_variant, Client, Reply, Server, TempDir,
};

const PROCESS_MODE: [&str; 6] = ["--mode", "process", "--processes", "2", "--app-arg", "faults=on"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    PROCESS_MODE.iter().copied().chain(extra.iter().copied()).collect()
}

/// The library the server serves, in a directory of its own so a test can
/// replace it like a deploy.
fn deployed(dir: &TempDir) -> PathBuf {
    let library = dir.join("libapp.so");
    replace_file(&sample_app(), &library);
    library
}

/// `GET path` on a fresh connection, given up after `limit`.
fn get_within(addr: std::net::SocketAddr, path: &str, limit: Duration) -> Option<Result<Reply, String>> {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async { tokio::time::timeout(limit, get(addr, path)).await.ok() })
}

/// The first health answer that satisfies `ready`, asking for at most 10 s:
/// each answer comes from one worker, which learns the service's state from
/// the supervisor a moment after it changes. A request that fails is asked
/// again: a worker of a crashing generation may die with it.
fn health_until(server: &Server, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_health(server) {
            Ok(health) if ready(&health) || Instant::now() > deadline => return health,
            Err(e) if Instant::now() > deadline => panic!("no health answer: {e}\n{}", server.logs()),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn health(server: &Server) -> serde_json::Value {
    try_health(server).unwrap_or_else(|e| panic!("no health answer: {e}\n{}", server.logs()))
}

fn try_health(server: &Server) -> Result<serde_json::Value, String> {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let reply = runtime.block_on(get(server.addr, "/health")).map_err(|e| e.to_string())?;
    serde_json::from_slice(&reply.body).map_err(|e| format!("health is not JSON: {e}"))
}

/// Keep-alive clients sending `GET /` until stopped; counts what failed.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// What the first failures were, for the assertion messages.
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    runtime: tokio::runtime::Runtime,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(server: &Server, clients: usize) -> Load {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
        let (stop, ok, failed) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let clients = (0..clients)
            .map(|_| {
                let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), server.addr);
                let errors = errors.clone();
                let note = move |error: String| {
                    failed.fetch_add(1, Ordering::Relaxed);
                    let mut errors = errors.lock().unwrap_or_else(|p| p.into_inner());
                    if errors.len() < 5 {
                        errors.push(error);
                    }
                };
                runtime.spawn(async move {
                    let mut client: Option<Client> = None;
                    // Bounded: at most 200 000 requests or until stopped.
                    for _ in 0..200_000 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        // A connection the server closed (Connection: close, a
                        // retiring worker) is replaced before sending: only a
                        // request actually sent can fail.
                        if client.as_ref().is_none_or(Client::is_closed) {
                            match Client::connect(addr).await {
                                Ok(c) => client = Some(c),
                                Err(e) => {
                                    note(format!("connect: {e}"));
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    continue;
                                }
                            }
                        }
                        let Some(c) = client.as_mut() else { continue };
                        match c.get("/").await {
                            Ok(reply) if reply.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(reply) => {
                                note(format!("status {}: {}", reply.status, reply.text()));
                                client = None;
                            }
                            Err(e) => {
                                note(e);
                                client = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, ok, failed, errors, runtime, clients }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `more` requests have succeeded (at most `timeout`).
    fn wait_for_progress(&self, more: u64, timeout: Duration) -> bool {
        let target = self.ok() + more;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.ok() >= target {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the clients; returns (succeeded, failed).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.runtime.block_on(async {
            for client in self.clients {
                let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
            }
        });
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// A fresh `GET /` answers within `timeout` (retrying while a worker is
/// being replaced).
fn answers_within(server: &Server, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(Ok(reply)) = get_within(server.addr, "/", Duration::from_millis(500)) {
            if reply.status == 200 && reply.body == "Hello, World!" {
                return Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The worker `pid` answers a health request on a fresh connection within
/// `limit` (the kernel gives each new connection to one of the workers).
fn replacement_serves_within(server: &Server, pid: u32, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if try_health(server).is_ok_and(|health| health["pid"] == pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn fault(server: &Server, route: &str) {
    let outcome = get_within(server.addr, route, Duration::from_secs(5));
    assert!(!matches!(outcome, Some(Ok(ref reply)) if reply.status == 200), "{route} did not crash: {outcome:?}");
}

#[test]
fn each_kind_of_crash_costs_only_the_dead_workers_connections() {
    let server = Server::start(&sample_app(), &args(&["--workers", "1"]));
    let load = Load::start(&server, 4);
    assert!(load.wait_for_progress(50, Duration::from_secs(10)), "load runs");
    let crashes = [
        ("/fault/segfault", "signal 11 (SIGSEGV)"),
        ("/fault/abort", "signal 6 (SIGABRT"),
        ("/fault/stack-overflow", "signal 6 (SIGABRT"),
        ("/fault/exit?code=7", "exited with status 7"),
    ];
    for (n, (route, how)) in crashes.iter().enumerate() {
        fault(&server, route);
        assert!(server.wait_for_log(how, Duration::from_secs(10)), "{route}: no crash logged:\n{}", server.logs());
        let crashed = Instant::now();
        // Two workers at start, one replacement per crash.
        let replaced = server.wait_for_log_count("event=\"worker_ready\"", 3 + n, Duration::from_secs(5));
        assert!(replaced, "{route}: no replacement:\n{}", server.logs());
        let replacement = *worker_pids(&server).last().expect("a worker_ready pid");
        let serving = replacement_serves_within(&server, replacement, Duration::from_secs(1));
        assert!(serving, "{route}: replacement {replacement} not serving a second after the crash was seen");
        println!("{route}: replacement {replacement} serving {:?} after the crash was seen", crashed.elapsed());
        assert!(load.wait_for_progress(20, Duration::from_secs(10)), "{route}: load stalled");
    }
    let (ok, failed) = load.finish();
    println!("4 crashes under load: {ok} requests answered, {failed} failed (on the dead workers' connections)");
    // At most the requests in flight on the dead workers' connections: one per client per crash.
    assert!(failed <= 4 * 4, "{failed} requests failed");
    let health = health_until(&server, |h| h["service"]["restarts"] == 4);
    assert_eq!(health["service"]["restarts"], 4, "{health}");
}

#[test]
fn a_crash_loop_backs_off_while_the_other_worker_serves() {
    let server =
        Server::start(&sample_app(), &args(&["--workers", "1", "--max-restarts", "1", "--restart-window", "60s"]));
    // A worker that exits with status 0 unasked is a crash too: replaced at once.
    fault(&server, "/fault/exit?code=0");
    assert!(server.wait_for_log("exited with status 0", Duration::from_secs(10)), "{}", server.logs());
    let replaced = server.wait_for_log_count("event=\"worker_ready\"", 3, Duration::from_secs(10));
    assert!(replaced, "no replacement after the first crash:\n{}", server.logs());
    assert!(!server.logs().contains("crash loop"), "one restart is within --max-restarts 1:\n{}", server.logs());

    // The second restart within the window is one too many: the next waits 1 s.
    fault(&server, "/fault/segfault");
    let looped = "crash loop: 2 worker restarts within 1m; next restart in 1s";
    assert!(server.wait_for_log(looped, Duration::from_secs(10)), "no {looped:?}:\n{}", server.logs());
    let backing_off = Instant::now();
    assert!(answers_within(&server, Duration::from_secs(1)).is_some(), "the other worker serves meanwhile");
    let health = health_until(&server, |h| h["service"]["crash_loop"] == true);
    assert_eq!(health["service"]["crash_loop"], true, "{health}");
    let replaced = server.wait_for_log_count("event=\"worker_ready\"", 4, Duration::from_secs(10));
    let waited = backing_off.elapsed();
    assert!(replaced, "no replacement after the back-off:\n{}", server.logs());
    assert!(waited >= Duration::from_millis(700), "restarted after {waited:?}, not after the 1 s back-off");

    // Another crash within the window doubles the wait.
    fault(&server, "/fault/segfault");
    let doubled = "next restart in 2s";
    assert!(server.wait_for_log(doubled, Duration::from_secs(10)), "no {doubled:?}:\n{}", server.logs());
    assert!(server.wait_for_log_count("event=\"worker_ready\"", 5, Duration::from_secs(10)), "{}", server.logs());
    assert!(answers_within(&server, Duration::from_secs(5)).is_some(), "the service answers");
}

#[test]
fn a_crash_in_the_new_librarys_constructor_or_init_keeps_the_old_generation_serving() {
    let dir = TempDir::new("process-bad-deploy");
    let library = deployed(&dir);
    let server = Server::start(&library, &args(&[]));
    let load = Load::start(&server, 2);
    assert!(load.wait_for_progress(20, Duration::from_secs(10)), "load runs");
    for (n, bad) in [crashing_constructor_library(&dir), sample_fault_variant("init-segfault")].iter().enumerate() {
        replace_file(bad, &library);
        server.signal(libc::SIGHUP);
        let failed = server.wait_for_log_count("event=\"reload_failed\"", n + 1, Duration::from_secs(20));
        assert!(failed, "{}", server.logs());
        assert!(load.wait_for_progress(20, Duration::from_secs(10)), "old generation keeps serving");
    }
    assert!(server.logs().contains("(SIGSEGV) while loading"), "{}", server.logs());
    let (ok, failed) = load.finish();
    println!("two crashing deploys: {ok} requests answered, {failed} failed");
    assert_eq!(failed, 0);
    let health = health_until(&server, |h| h["last_reload"]["outcome"] == "failed");
    assert_eq!(health["generation"], 1);
    assert_eq!(health["last_reload"]["outcome"], "failed");
}

#[test]
fn a_generation_that_crashes_right_after_its_reload_is_rolled_back() {
    let dir = TempDir::new("process-rollback");
    let library = deployed(&dir);
    let server = Server::start(&library, &args(&["--rollback-window", "60s"]));
    replace_file(&sample_fault_variant("serve-abort"), &library);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("event=\"generation_loaded\"", Duration::from_secs(20)), "{}", server.logs());
    // Every `GET /` of generation 2 aborts its worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.count_logs("event=\"rolling_back\"") == 0 && Instant::now() < deadline {
        let _ = get_within(server.addr, "/", Duration::from_secs(2));
    }
    assert!(server.count_logs("event=\"rolling_back\"") > 0, "{}", server.logs());
    assert!(server.wait_for_log_count("event=\"generation_loaded\"", 2, Duration::from_secs(20)), "{}", server.logs());
    assert!(answers_within(&server, Duration::from_secs(5)).is_some(), "old code answers again");
    let health = health_until(&server, |h| h["generation"] == 3 && h["service"]["rollbacks"] == 1);
    assert_eq!(health["generation"], 3, "{health}");
    assert_eq!(health["service"]["rollbacks"], 1, "{health}");
    assert!(server.logs().contains("rolling back to the library of generation 1, as generation 3"));
}

#[test]
fn a_spinning_handler_is_killed_and_replaced_while_others_are_served() {
    let server = Server::start(&sample_app(), &args(&["--workers", "1", "--worker-timeout", "2s"]));
    let spinner = {
        let addr = server.addr;
        std::thread::spawn(move || get_within(addr, "/fault/spin?ms=600000", Duration::from_secs(30)))
    };
    let load = Load::start(&server, 2);
    assert!(server.wait_for_log("event=\"worker_hung\"", Duration::from_secs(15)), "{}", server.logs());
    assert!(load.wait_for_progress(20, Duration::from_secs(10)), "others were served");
    let spun = spinner.join().expect("spinner thread");
    assert!(!matches!(spun, Some(Ok(ref reply)) if reply.status == 200), "the spinning request cannot answer");
    assert!(server.wait_for_log("signal 9 (SIGKILL)", Duration::from_secs(5)));
    // Two workers at start, then the replacement of the one that spun.
    let replaced = server.wait_for_log_count("event=\"worker_ready\"", 3, Duration::from_secs(5));
    assert!(replaced, "no replacement:\n{}", server.logs());
    let (ok, failed) = load.finish();
    // Only requests on connections the spinning worker had accepted fail.
    println!("spinning handler: {ok} other requests answered, {failed} failed (on the spinning worker's connections)");
    assert!(failed <= 2, "{failed} requests failed");
}

#[test]
fn a_hundred_reloads_under_load_lose_no_request() {
    let server = Server::start(&sample_app(), &args(&["--workers", "1"]));
    let load = Load::start(&server, 4);
    assert!(load.wait_for_progress(50, Duration::from_secs(10)), "load runs");
    // The storm itself is the behaviour under test: 100 SIGHUPs at 10/s.
    for _ in 0..100 {
        server.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(100));
    }
    let published = |server: &Server| server.count_logs("event=\"generation_loaded\"");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (published(&server), Instant::now());
    while Instant::now() < deadline && last.1.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
        if published(&server) != last.0 {
            last = (published(&server), Instant::now());
        }
    }
    assert!(load.wait_for_progress(50, Duration::from_secs(10)), "still serving after the storm");
    let errors = load.errors();
    let (ok, failed) = load.finish();
    let reloads = published(&server);
    println!("100 SIGHUPs at 10/s: {reloads} generations published, {ok} requests answered, {failed} failed");
    assert!(reloads >= 10, "{reloads} reloads published");
    assert_eq!(server.count_logs("event=\"worker_crashed\""), 0, "{}", server.logs());
    assert_eq!(failed, 0, "requests failed during the storm: {errors:?}");
}

#[test]
fn sigterm_lets_requests_in_flight_finish_and_exits_0() {
    let mut server = Server::start(&sample_app(), &args(&[]));
    let addr = server.addr;
    let slow = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(get(addr, "/sleep?ms=1500"))
    });
    // The request is in flight once the worker serving it counts it (each
    // health answer comes from one worker: ask until that one answers).
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&server)["in_flight"].as_u64().unwrap_or(0) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    server.signal(libc::SIGTERM);
    let reply = slow.join().expect("client thread").expect("the request in flight completes");
    assert_eq!(reply.status, 200);
    let status = server.wait_exit(Duration::from_secs(15)).expect("the supervisor exits");
    assert_eq!(status.code(), Some(0), "{}", server.logs());
}

#[test]
fn no_worker_outlives_a_killed_supervisor() {
    let mut server = Server::start(&sample_app(), &args(&[]));
    let workers = worker_pids(&server);
    assert_eq!(workers.len(), 2, "{}", server.logs());
    server.signal(libc::SIGKILL);
    let _ = server.wait_exit(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(2);
    while workers.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<&u32> = workers.iter().filter(|pid| alive(**pid)).collect();
    assert!(left.is_empty(), "workers {left:?} outlived the supervisor");
}

#[test]
fn process_mode_start_up_errors_name_the_problem() {
    let dir = TempDir::new("process-start");
    let crash = crashing_constructor_library(&dir);
    let Err((status, logs)) = Server::try_start(&crash, &args(&[])) else { panic!("started with a crashing library") };
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{logs}");
    assert!(logs.contains("cannot start the workers") && logs.contains("SIGSEGV"), "{logs}");
    let Err((status, logs)) = Server::try_start(Path::new("/nonexistent/libapp.so"), &args(&[])) else {
        panic!("started without a library")
    };
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{logs}");
    assert!(logs.contains("no such file"), "{logs}");
}

/// The pids of the workers serving, from their `worker_ready` events.
fn worker_pids(server: &Server) -> Vec<u32> {
    server
        .logs()
        .lines()
        .filter(|line| line.contains("event=\"worker_ready\""))
        .filter_map(|line| line.split("pid=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Whether `pid` runs (a zombie waiting for its reaper does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// `pounce_service_requests_total{class="2xx"}` in one scrape.
fn service_requests(server: &Server) -> Option<u64> {
    let reply = get_within(server.addr, "/metrics", Duration::from_secs(5))?.ok()?;
    let text = reply.text();
    let line = text.lines().find(|l| l.starts_with("pounce_service_requests_total{class=\"2xx\"}"))?;
    line.split_whitespace().last()?.parse().ok()
}

#[test]
fn service_metrics_never_go_back_whichever_worker_answers_and_whatever_crashes() {
    let server = Server::start(&sample_app(), &args(&["--metrics-path", "/metrics"]));
    let mut last = 0;
    let mut sent = 0;
    for round in 0..3 {
        for _ in 0..20 {
            if matches!(get_within(server.addr, "/", Duration::from_secs(5)), Some(Ok(ref r)) if r.status == 200) {
                sent += 1;
            }
        }
        // Each scrape may come from either worker (and after a crash, from
        // its replacement): the totals must never shrink, and the workers'
        // beats bring the requests just answered in within moments (a crash
        // loses only what its worker counted since its last beat).
        let deadline = Instant::now() + Duration::from_secs(10);
        while last < sent && Instant::now() < deadline {
            let seen = service_requests(&server).expect("the exposition has the service's totals");
            assert!(seen >= last, "round {round}: {seen} after {last}");
            last = seen;
        }
        assert!(last >= sent, "round {round}: the totals show {last} of {sent}");
        fault(&server, "/fault/segfault");
        assert!(server.wait_for_log_count("event=\"worker_ready\"", 3 + round, Duration::from_secs(10)));
    }
    let total = service_requests(&server).unwrap_or(0);
    println!("{sent} requests answered; the service totals count {total} 2xx (scrapes included)");
    assert!(total >= last, "{total} after {last}");
}

/// A reload of the same bytes reuses the serving generation's snapshot (a
/// reload storm); new bytes get a new one, and the workers serve them.
#[test]
fn unchanged_bytes_reuse_the_snapshot_and_new_ones_do_not() {
    let dir = TempDir::new("process-snapshot-reuse");
    let library = deployed(&dir);
    let server = Server::start(&library, &args(&["--log-level", "pounce_host=debug,info"]));
    let reused = "its snapshot is reused";
    let published = "event=\"generation_loaded\"";
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log_count(published, 1, Duration::from_secs(30)), "{}", server.logs());
    assert_eq!(server.count_logs(reused), 1, "{}", server.logs());
    replace_file(&pounce_tests::sample_variant("new snapshot"), &library);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log_count(published, 2, Duration::from_secs(30)), "{}", server.logs());
    assert_eq!(server.count_logs(reused), 1, "new bytes, a new snapshot:\n{}", server.logs());
    let health = health_until(&server, |h| h["service"]["generation"] == 3);
    assert_eq!(health["service"]["generation"], 3, "{health}");
    // Old workers retire a moment after the publication; ask until a new one answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get_within(server.addr, "/version", Duration::from_secs(5)).expect("answered").expect("serving");
        if reply.text() == "new snapshot (generation 3)\n" {
            break;
        }
        assert!(Instant::now() < deadline, "still {:?}", reply.text());
        std::thread::sleep(Duration::from_millis(20));
    }
}
