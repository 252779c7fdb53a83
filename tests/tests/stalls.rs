//! The stall watchdog: an app call that blocks a server thread longer than
//! `--stall-warning` is reported once, with what it serves.

use std::time::Duration;

use pounce_tests::{get, sample_app, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_handler_and_a_blocking_drain_are_reported_once_each() {
    let args = [
        "--stall-warning",
        "300ms",
        "--metrics-path",
        "/metrics",
        "--app-arg",
        "faults=on",
        "--app-arg",
        "drain_delay_ms=1000",
    ];
    let server = Server::start(&sample_app(), &args);
    let reply = get(server.addr, "/fault/block?ms=1200").await.expect("the blocked handler answers in the end");
    assert_eq!(reply.status, 200);
    assert!(server.wait_for_log("event=\"app_call_stalled\"", Duration::from_secs(5)), "{}", server.logs());
    let logs = server.logs();
    assert_eq!(server.count_logs("event=\"app_call_stalled\""), 1, "once per call:\n{logs}");
    assert!(logs.contains("app handler for GET /fault/block of generation 1 has been running for"), "{logs}");
    // A drain that blocks (here at the reload) is a stalled call too.
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("app drain of generation 1", Duration::from_secs(10)), "{}", server.logs());
    let metrics = get(server.addr, "/metrics").await.expect("metrics").text();
    assert!(metrics.contains("pounce_stalled_app_calls_total{kind=\"handler\"} 1"), "{metrics}");
    assert!(metrics.contains("pounce_stalled_app_calls_total{kind=\"drain\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_calls_and_a_watchdog_turned_off_report_nothing() {
    let server = Server::start(&sample_app(), &["--stall-warning", "off", "--app-arg", "faults=on"]);
    get(server.addr, "/fault/block?ms=600").await.expect("answers");
    let quick = Server::start(&sample_app(), &["--stall-warning", "300ms"]);
    for _ in 0..50 {
        get(quick.addr, "/").await.expect("answers");
    }
    // The watchdog looks every 100 ms: give it several looks at each.
    assert!(!server.wait_for_log("app_call_stalled", Duration::from_millis(700)), "{}", server.logs());
    assert_eq!(quick.count_logs("app_call_stalled"), 0, "{}", quick.logs());
}
