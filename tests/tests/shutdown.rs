//! Graceful shutdown on SIGTERM/SIGINT, its timeouts, and signals at awkward
//! moments.

use std::time::{Duration, Instant};

use pounce_tests::{get, sample_app, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a client connecting after the signal sees: refused, closed, or a
/// quick 503; never a hang.
async fn late_client_is_not_left_hanging(server: &Server) {
    let started = Instant::now();
    let attempt = tokio::time::timeout(Duration::from_secs(3), get(server.addr, "/")).await;
    let reply = attempt.expect("a connection after SIGTERM must not hang");
    if let Ok(reply) = reply {
        assert_eq!(reply.status, 503, "a late request is turned away: {reply:?}");
        assert_eq!(reply.header("connection"), Some("close"));
        assert!(reply.header("retry-after").is_some());
    }
    assert!(started.elapsed() < Duration::from_secs(2));
}

async fn in_flight_request_completes(signal: i32) {
    let mut server = Server::start(&sample_app(), &[]);
    let addr = server.addr;
    let started = Instant::now();
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=2000").await });
    server.wait_for_in_flight(1).await;
    server.signal(signal);
    let health = server.wait_until_draining().await;
    assert_eq!(health.status, 503, "{}", health.text());
    late_client_is_not_left_hanging(&server).await;

    let reply = slow.await.unwrap().expect("the in-flight request completes");
    assert_eq!((reply.status, reply.text()), (200, "slept 2000 ms (generation 1)\n".to_owned()));
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", server.logs());
    assert!(started.elapsed() < Duration::from_secs(5), "exit within the bound: {:?}", started.elapsed());
    assert!(server.logs().contains("shutdown complete"), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    in_flight_request_completes(libc::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_does_the_same() {
    in_flight_request_completes(libc::SIGINT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_cuts_a_long_request() {
    let mut server = Server::start(&sample_app(), &["--shutdown-timeout", "1s"]);
    let addr = server.addr;
    let long = tokio::spawn(async move { get(addr, "/sleep?ms=10000").await });
    server.wait_for_in_flight(1).await;
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(8)).expect("exits");
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "exit in about a second: {took:?}");
    assert!(long.await.unwrap().is_err(), "the cut request saw its connection close");
    assert!(server.logs().contains("shutdown_timeout reached"), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_hold_the_shutdown() {
    let mut server = Server::start(&sample_app(), &["--header-timeout", "1s", "--shutdown-timeout", "20s"]);
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // Connections are accepted in order, so once the health request's own
    // connection is counted, the silent one has been accepted before it.
    server
        .wait_for_health("the silent connection accepted", |json| {
            json["connections"].as_u64().is_some_and(|open| open >= 2)
        })
        .await;
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(8)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(3), "not held past header_timeout: {:?}", started.elapsed());
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(2), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the silent connection was closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_connections_time_out_while_serving() {
    let server = Server::start(&sample_app(), &["--header-timeout", "1s", "--keep-alive-timeout", "1s"]);
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a connection that sends nothing is closed");
    assert!(started.elapsed() >= Duration::from_millis(900), "not before header_timeout");
    assert_eq!(get(server.addr, "/").await.unwrap().status, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_cut_by_header_timeout() {
    let server = Server::start(&sample_app(), &["--header-timeout", "1s"]);
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a half-sent request head does not hold the connection open");
    assert!(started.elapsed() >= Duration::from_millis(900), "not before header_timeout");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"), "the half request was not served");
    assert_eq!(get(server.addr, "/").await.unwrap().status, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_answers_504_and_cancels_the_handler() {
    let server = Server::start(&sample_app(), &["--request-timeout", "1s"]);
    let started = Instant::now();
    let reply = get(server.addr, "/sleep?ms=5000").await.unwrap();
    let took = started.elapsed();
    assert_eq!(reply.status, 504);
    assert!(reply.text().contains("did not answer within 1s"), "{}", reply.text());
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
    let json: serde_json::Value = serde_json::from_slice(&get(server.addr, "/health").await.unwrap().body).unwrap();
    assert_eq!(json["in_flight"], 0);
    assert!(
        server.wait_for_log("sleep handler cancelled", Duration::from_secs(5)),
        "the app's handler was dropped:\n{}",
        server.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let mut server = Server::start(&sample_app(), &[]);
    let addr = server.addr;
    let _long = tokio::spawn(async move { get(addr, "/sleep?ms=10000").await });
    server.wait_for_in_flight(1).await;
    server.signal(libc::SIGTERM);
    assert!(server.wait_for_log("shutting down", Duration::from_secs(5)));
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(8)).expect("exits");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "at once, not after the request's or the shutdown's 10 s: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_shutdown_is_ignored() {
    let mut server = Server::start(&sample_app(), &[]);
    let addr = server.addr;
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=1500").await });
    server.wait_for_in_flight(1).await;
    server.signal(libc::SIGTERM);
    assert!(server.wait_for_log("shutting down", Duration::from_secs(5)));
    server.signal(libc::SIGHUP);
    assert_eq!(slow.await.unwrap().unwrap().status, 200);
    assert_eq!(server.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0));
    assert!(server.logs().contains("SIGHUP ignored: the server is shutting down"), "{}", server.logs());
    assert!(!server.logs().contains("generation 2 published"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_reload_exits_cleanly_without_publishing() {
    let mut server = Server::start(&sample_app(), &["--app-arg", "init_delay_ms=1500"]);
    server.signal(libc::SIGHUP);
    // Logged as the load begins; the app's init then takes 1.5 s, so the
    // SIGTERM arrives in the middle of the reload.
    assert!(server.wait_for_log(r#"event="reload_started""#, Duration::from_secs(5)), "{}", server.logs());
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", server.logs());
    assert!(!server.logs().contains("generation 2 published"), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_used_for_health_checks_is_not_cut() {
    let server = Server::start(&sample_app(), &["--header-timeout", "1s", "--keep-alive-timeout", "1s"]);
    let mut client = pounce_tests::Client::connect(server.addr).await.unwrap();
    // Polled more often than either timeout, for longer than both: the
    // pauses between checks are what is tested, so they are real sleeps.
    for _ in 0..8 {
        assert_eq!(client.get("/health").await.expect("the connection stays open").status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_opened_during_shutdown_does_not_hold_it() {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut server = Server::start(&sample_app(), &["--keep-alive-timeout", "20s", "--header-timeout", "20s"]);
    let addr = server.addr;
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=1000").await });
    server.wait_for_in_flight(1).await;
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    assert!(server.wait_for_log("shutting down", Duration::from_secs(5)));
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::builder().uri(format!("http://{addr}/")).body(Full::new(bytes::Bytes::new())).unwrap();
    let reply = sender.send_request(request).await.unwrap();
    assert_eq!(reply.status(), 503, "a late HTTP/2 request is turned away");
    // The client keeps its side open (`sender` lives on); the server must
    // still close the connection rather than wait out the 20 s timeouts.
    assert_eq!(slow.await.unwrap().unwrap().status, 200);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5), "not held by the late connection: {:?}", started.elapsed());
    drop(sender);
}
