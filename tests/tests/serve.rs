//! Serving the sample app: every route, HTTP/2, limits, panics, concurrency,
//! the health endpoint and `pounce-host check`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pounce_tests::{get, get_h2, request, run_host, sample_app, Client, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_every_sample_route() {
    let server = Server::start(&sample_app(), &[]);
    let hello = get(server.addr, "/").await.unwrap();
    assert_eq!(hello.status, 200);
    assert_eq!(hello.text(), "Hello, World!");
    assert_eq!(hello.header("content-type"), Some("text/plain; charset=utf-8"));

    let version = get(server.addr, "/version").await.unwrap();
    assert_eq!(version.text(), "Hello from sample-app (generation 1)\n");

    let slept = get(server.addr, "/sleep?ms=50").await.unwrap();
    assert_eq!((slept.status, slept.text()), (200, "slept 50 ms (generation 1)\n".to_owned()));

    let blocked = get(server.addr, "/blocking?ms=20").await.unwrap();
    assert_eq!(blocked.status, 200);

    let started = Instant::now();
    let stream = get(server.addr, "/stream?chunks=3&interval_ms=100").await.unwrap();
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.text(), "data: chunk 1 of 3\n\ndata: chunk 2 of 3\n\ndata: chunk 3 of 3\n\n");
    assert!(started.elapsed() >= Duration::from_millis(200), "chunks were paced");

    let echo = request(server.addr, "POST", "/echo", Bytes::from_static(b"ping \x00\xff pong")).await.unwrap();
    assert_eq!((echo.status, &echo.body[..]), (200, &b"ping \x00\xff pong"[..]));

    assert_eq!(get(server.addr, "/nope").await.unwrap().status, 404);
    assert_eq!(request(server.addr, "DELETE", "/", Bytes::new()).await.unwrap().status, 405);
    assert_eq!(get(server.addr, "/sleep?ms=abc").await.unwrap().status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connection_serves_many_requests() {
    let server = Server::start(&sample_app(), &[]);
    let mut client = Client::connect(server.addr).await.unwrap();
    for _ in 0..50 {
        let reply = client.get("/").await.unwrap();
        assert_eq!(reply.text(), "Hello, World!");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_http2_with_prior_knowledge() {
    let server = Server::start(&sample_app(), &[]);
    let (version, reply) = get_h2(server.addr, "/").await.unwrap();
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!((reply.status, reply.text()), (200, "Hello, World!".to_owned()));
    let (_, health) = get_h2(server.addr, "/health").await.unwrap();
    assert_eq!(health.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_bodies_over_the_limit_with_413() {
    let server = Server::start(&sample_app(), &["--max-body-size", "1KiB"]);
    let small = request(server.addr, "POST", "/echo", Bytes::from(vec![b'a'; 1024])).await.unwrap();
    assert_eq!((small.status, small.body.len()), (200, 1024));

    let declared = request(server.addr, "POST", "/echo", Bytes::from(vec![b'a'; 1025])).await.unwrap();
    assert_eq!(declared.status, 413);
    assert_eq!(declared.header("connection"), Some("close"));

    // Chunked: no length up front, so the limit trips while the app reads.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let chunk = "a".repeat(600);
    let head = "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
    let body = format!("258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n");
    stream.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server closed the connection after answering");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    assert_eq!(get(server.addr, "/").await.unwrap().status, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_gets_500_and_the_server_keeps_serving() {
    let server = Server::start(&sample_app(), &[]);
    for _ in 0..3 {
        let reply = get(server.addr, "/panic").await.unwrap();
        assert_eq!(reply.status, 500);
        assert_eq!(get(server.addr, "/").await.unwrap().text(), "Hello, World!");
    }
    assert!(server.wait_for_log("/panic was requested", Duration::from_secs(5)), "panic logged:\n{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_does_not_delay_fast_ones() {
    let server = Server::start(&sample_app(), &["--workers", "2"]);
    let addr = server.addr;
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let reply = get(addr, "/sleep?ms=1000").await.unwrap();
        (reply.status, started.elapsed())
    });
    // Several slow requests in flight at once must not hold fast ones either.
    let more_slow: Vec<_> = (0..4).map(|_| tokio::spawn(async move { get(addr, "/sleep?ms=1000").await })).collect();
    server.wait_for_in_flight(5).await;
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.unwrap().status, 200);
    }
    let fast = started.elapsed();
    assert!(fast < Duration::from_millis(500), "20 fast requests took {fast:?} while slow ones waited");
    let (status, slow_took) = slow.await.unwrap();
    assert_eq!(status, 200);
    assert!(slow_took >= Duration::from_millis(1000), "the slow request really waited ({slow_took:?})");
    for handle in more_slow {
        assert_eq!(handle.await.unwrap().unwrap().status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoint_is_answered_by_the_host() {
    let server = Server::start(&sample_app(), &[]);
    let reply = get(server.addr, "/health").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(json["status"], "ok");
    assert_eq!(json["generation"], 1);
    let uptime = json["uptime_seconds"].as_f64().expect("uptime is a number");
    assert!((0.0..60.0).contains(&uptime), "uptime since this test started it: {uptime}");
    assert_eq!(json["in_flight"], 0);

    let head = request(server.addr, "HEAD", "/health", Bytes::new()).await.unwrap();
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(request(server.addr, "POST", "/health", Bytes::new()).await.unwrap().status, 405);

    let custom = Server::start(&sample_app(), &["--health-path", "/healthz"]);
    assert_eq!(get(custom.addr, "/healthz").await.unwrap().status, 200);
    assert_eq!(get(custom.addr, "/health").await.unwrap().status, 404, "/health goes to the app");

    let off = Server::start(&sample_app(), &["--health-path", "off"]);
    assert_eq!(get(off.addr, "/health").await.unwrap().status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_counts_requests_in_flight() {
    let server = Server::start(&sample_app(), &[]);
    let addr = server.addr;
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=800").await });
    server.wait_for_in_flight(1).await;
    assert_eq!(slow.await.unwrap().unwrap().status, 200);
    // Counted out once its response has ended (which the server may notice
    // just after the client has read it).
    server.wait_for_in_flight(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_settings_and_logs_reach_the_app_and_the_host_log() {
    let server = Server::start(&sample_app(), &["--app-arg", "mode=test"]);
    assert!(server.wait_for_log("sample-app ready", Duration::from_secs(5)));
    let line = server.logs().lines().find(|l| l.contains("sample-app ready")).unwrap_or_default().to_owned();
    assert!(line.contains("generation=1"), "app log tagged with the generation: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_app_takes_over_a_connection_with_response_upgrade() {
    let server = Server::start(&sample_app(), &[]);
    assert_eq!(get(server.addr, "/upgrade").await.unwrap().status, 426, "no Upgrade header: no upgrade");
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut byte)).await.unwrap().unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo") && head.contains("connection: upgrade"), "{head}");
    for word in [&b"ping"[..], b"\x00\xffbinary"] {
        tcp.write_all(word).await.unwrap();
        let mut back = vec![0u8; word.len()];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, word);
    }
    assert_eq!(server.health().await["upgraded_connections"], 1);
    // The client ends its side: the app reads the end, ends too, and the
    // connection closes.
    tcp.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty());
    server.wait_for_health("no upgraded connection", |json| json["upgraded_connections"] == 0).await;
}

#[test]
fn check_reports_a_good_library() {
    let (status, output) = run_host(&["check", sample_app().to_str().unwrap()], Duration::from_secs(30));
    assert!(status.success(), "{output}");
    assert!(output.contains("app:         sample-app 0.1.0"), "{output}");
    assert!(output.contains("ABI version: 2"), "{output}");
    assert!(output.contains("library unmapped"), "{output}");
}
