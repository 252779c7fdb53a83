//! App code that blocks must never make pounce-host unkillable: an `init`
//! that hangs at start-up or under `check`, a `drain` or `shutdown` that
//! never returns, every worker thread blocked in a handler.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pounce_tests::{get, host_binary, run_host, sample_app, wait_for_exit, Log, Server};

/// Starts `pounce-host serve` without waiting for it to listen (its app may
/// never finish loading).
fn spawn_serve(args: &[&str]) -> (std::process::Child, Log) {
    let mut child = Command::new(host_binary())
        .arg("serve")
        .args(["--port", "0"])
        .args(args)
        .arg(sample_app())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pounce-host");
    let log = Log::default();
    log.collect(child.stderr.take().expect("stderr piped"));
    (child, log)
}

fn signal(child: &std::process::Child, signal: i32) {
    // SAFETY: kill(2) with our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

#[test]
fn sigterm_while_the_first_load_hangs_exits_promptly() {
    let (mut child, log) = spawn_serve(&["--app-arg", "init_delay_ms=60000", "--shutdown-timeout", "2s"]);
    assert!(log.wait_for_count("init waits before it returns", 1, Duration::from_secs(20)), "{}", log.text());
    let started = Instant::now();
    signal(&child, libc::SIGTERM);
    let status = wait_for_exit(&mut child, Duration::from_secs(15)).expect("exits while init hangs");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(status.code(), Some(0), "{}", log.text());
    assert!(log.text().contains("while the app was loading"), "{}", log.text());
}

#[test]
fn sigterm_while_process_mode_workers_hang_in_init_exits_promptly() {
    let args = ["--mode", "process", "--processes", "2", "--app-arg", "init_delay_ms=60000"];
    let (mut child, log) = spawn_serve(&args);
    assert!(log.wait_for_count("init waits before it returns", 2, Duration::from_secs(20)), "{}", log.text());
    let started = Instant::now();
    signal(&child, libc::SIGTERM);
    let status = wait_for_exit(&mut child, Duration::from_secs(15)).expect("exits while the workers hang");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert_eq!(status.code(), Some(0), "{}", log.text());
    assert!(log.text().contains("while the workers were starting"), "{}", log.text());
}

#[test]
fn a_first_load_that_hangs_fails_at_reload_timeout() {
    let (mut child, log) = spawn_serve(&["--app-arg", "init_delay_ms=60000", "--reload-timeout", "1s"]);
    let status = wait_for_exit(&mut child, Duration::from_secs(20)).expect("gives up on the load");
    assert_eq!(status.code(), Some(3), "{}", log.text());
    assert!(log.text().contains("loading took longer than 1s"), "{}", log.text());
}

#[test]
fn check_gives_up_on_an_init_that_hangs() {
    let library = sample_app();
    let library = library.to_str().expect("UTF-8 path");
    let started = Instant::now();
    let (status, output) =
        run_host(&["check", "--timeout", "1s", "--app-arg", "init_delay_ms=60000", library], Duration::from_secs(20));
    assert_eq!(status.code(), Some(3), "{output}");
    assert!(output.contains("took longer than 1s"), "{output}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
}

#[test]
fn a_drain_that_never_returns_does_not_hold_the_shutdown() {
    let mut server = Server::start(&sample_app(), &["--app-arg", "drain_delay_ms=600000", "--shutdown-timeout", "1s"]);
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(20)).expect("exits although drain blocks");
    assert_eq!(status.code(), Some(0), "{}", server.logs());
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[test]
fn the_apps_shutdown_runs_at_exit_and_one_that_never_returns_does_not_hold_it() {
    let args = ["--app-arg", "shutdown_delay_ms=600000", "--shutdown-timeout", "1s"];
    let mut server = Server::start(&sample_app(), &args);
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(20)).expect("exits although shutdown blocks");
    assert_eq!(status.code(), Some(0), "{}", server.logs());
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let logs = server.logs();
    // The stall watchdog once held the server, and with it the serving
    // generation: its app's `shutdown` never ran at exit.
    assert!(logs.contains("shutdown blocks generation=1"), "the app's shutdown ran:\n{logs}");
    assert!(logs.contains("an app's shutdown did not finish in time; exiting without waiting for it"), "{logs}");
}

#[test]
fn a_shutdown_that_never_returns_after_a_reload_is_reported_and_serving_goes_on() {
    let args = ["--app-arg", "shutdown_delay_ms=600000", "--shutdown-timeout", "1s", "--stall-warning", "200ms"];
    let mut server = Server::start(&sample_app(), &args);
    server.signal(libc::SIGHUP);
    let stalled = "app shutdown of generation 1 has been running for";
    assert!(server.wait_for_log(stalled, Duration::from_secs(10)), "no {stalled:?}:\n{}", server.logs());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let reply = runtime.block_on(get(server.addr, "/version")).expect("GET /version");
    assert_eq!(reply.text(), "Hello from sample-app (generation 2)\n");
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(20)).expect("exits although two shutdowns block");
    assert_eq!(status.code(), Some(0), "{}", server.logs());
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[test]
fn a_second_sigterm_exits_at_once_with_every_worker_thread_blocked() {
    let mut server = Server::start(&sample_app(), &["--workers", "1", "--app-arg", "faults=on"]);
    let addr = server.addr;
    // Blocks the server's only worker thread in app code for ten minutes.
    let _blocked = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), get(addr, "/fault/block?ms=600000")).await
        })
    });
    assert!(server.wait_for_log("blocking the thread", Duration::from_secs(10)), "{}", server.logs());
    server.signal(libc::SIGTERM);
    assert!(server.wait_for_log("shutting down", Duration::from_secs(10)), "{}", server.logs());
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("the second SIGTERM ends it");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", server.logs());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}
