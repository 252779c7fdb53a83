//! Bounded resources: the connection limit, running out of file
//! descriptors, clients that stop reading, HTTP/2 stream limits and
//! keep-alive PINGs, and metric series that do not grow with every reload.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pounce_tests::{get, replace_file, sample_app, Client, Server, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits until `check` holds, polling every 20 ms for at most `timeout`.
async fn until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// A connection whose receive buffer is small, so the server's writes to it
/// back up quickly when it does not read.
async fn small_window_connection(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads until the server closes the connection (or `timeout`, which
/// fails): everything that arrived.
async fn read_to_close(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close the connection within {timeout:?}");
    received
}

/// Requests in flight according to the health endpoint.
async fn in_flight(server: &Server) -> u64 {
    let health = server.health().await;
    health["in_flight"].as_u64().unwrap_or_else(|| panic!("no in_flight in {health}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_a_new_connection_waits_until_one_closes() {
    let server = Server::start(&sample_app(), &["--max-connections", "2", "--keep-alive-timeout", "60s"]);
    let mut first = Client::connect(server.addr).await.unwrap();
    let mut second = Client::connect(server.addr).await.unwrap();
    assert_eq!(first.get("/").await.unwrap().status, 200);
    assert_eq!(second.get("/").await.unwrap().status, 200);
    let reached = "max_connections (2) reached";
    assert!(server.wait_for_log(reached, EVENT_TIMEOUT), "{}", server.logs());

    // The third connection completes its TCP handshake in the kernel's
    // backlog, but nobody reads its request while the other two are open.
    let mut third = Client::connect(server.addr).await.unwrap();
    let mut answer = tokio::spawn(async move { third.get("/").await });
    let early = tokio::time::timeout(Duration::from_millis(1500), &mut answer).await;
    assert!(early.is_err(), "answered while two connections were open: {early:?}");

    drop(first);
    let reply = tokio::time::timeout(EVENT_TIMEOUT, answer).await.expect("answered once one closed").unwrap();
    assert_eq!(reply.unwrap().status, 200);
    assert!(server.wait_for_log("accepting connections again", EVENT_TIMEOUT), "{}", server.logs());
    assert_eq!(server.count_logs(reached), 1, "one warning, not one per connection:\n{}", server.logs());
    assert_eq!(second.get("/").await.unwrap().status, 200, "the connections kept open still serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_warns_once_a_second_and_recovers() {
    const MAX_FDS: u64 = 64;
    let server = Server::start_with_fd_limit(&sample_app(), &["--header-timeout", "60s"], MAX_FDS);
    assert_eq!(get(server.addr, "/").await.unwrap().status, 200);
    let spare = (MAX_FDS as usize).saturating_sub(server.open_fds());
    assert!(spare > 0 && spare < MAX_FDS as usize, "the server has {} fds open", server.open_fds());

    // More silent connections than the server has descriptors left: the
    // rest wait in the backlog and every accept fails with EMFILE.
    let mut held = Vec::new();
    for _ in 0..spare + 4 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let failed = "accept failed";
    assert!(server.wait_for_log(failed, EVENT_TIMEOUT), "{}", server.logs());
    let first_warning = Instant::now();
    // The accept loop retries every 100 ms; three warnings take two seconds
    // when they are limited to one a second.
    assert!(until(EVENT_TIMEOUT, || server.count_logs(failed) >= 3).await, "{}", server.logs());
    let span = first_warning.elapsed();
    assert!(span >= Duration::from_millis(1800), "3 warnings within {span:?}:\n{}", server.logs());
    let logs = server.logs();
    let counts: Vec<u64> = logs
        .lines()
        .filter(|line| line.contains(failed))
        .filter_map(|line| line.split(" failures since the last such warning").next()?.rsplit('(').next()?.parse().ok())
        .collect();
    assert!(counts.len() >= 3, "every warning counts its failures:\n{logs}");
    assert!(counts[1..].iter().all(|&n| n >= 5), "about ten failures a second are counted: {counts:?}\n{logs}");
    assert!(logs.contains("Too many open files"), "{logs}");

    // Once connections close, the server accepts and serves again.
    drop(held);
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let served = loop {
        match tokio::time::timeout(Duration::from_secs(2), get(server.addr, "/")).await {
            Ok(Ok(reply)) => break reply.status,
            _ if Instant::now() < deadline => continue,
            other => panic!("not served after the connections closed: {other:?}\n{}", server.logs()),
        }
    };
    assert_eq!(served, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_send_timeout() {
    let server = Server::start(&sample_app(), &["--send-timeout", "1s", "--log-level", "info"]);
    let mut stalled = small_window_connection(server.addr).await;
    stalled
        .write_all(b"GET /stream?chunks=100000&interval_ms=0&size=65536 HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let why = "read nothing of its response for send_timeout (1s)";
    assert!(server.wait_for_log(why, EVENT_TIMEOUT), "{}", server.logs());
    assert!(started.elapsed() >= Duration::from_secs(1), "cut after {:?}", started.elapsed());
    assert!(until(EVENT_TIMEOUT, || server.count_logs(why) == 1).await);

    // The stream was cut: the connection closes without the last chunk.
    let received = read_to_close(&mut stalled, EVENT_TIMEOUT).await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{}", &text[..text.len().min(200)]);
    assert!(!text.contains("chunk 100000 of 100000"), "the whole stream was sent");
    assert_eq!(in_flight(&server).await, 0, "the cut response no longer holds its generation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_nobody_reads_is_cut_after_send_timeout() {
    let server = Server::start(&sample_app(), &["--send-timeout", "1s"]);
    let stream = TcpStream::connect(server.addr).await.unwrap();
    // A small window: the server may send 64 KiB before the client must read.
    let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(format!("http://{}/stream?chunks=100000&interval_ms=0&size=65536", server.addr))
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let why = "read nothing of its response for send_timeout (1s)";
    assert!(server.wait_for_log(why, EVENT_TIMEOUT), "{}", server.logs());
    let ended = tokio::time::timeout(EVENT_TIMEOUT, connection).await;
    assert!(ended.is_ok(), "the HTTP/2 connection was not closed");
    let body = tokio::time::timeout(EVENT_TIMEOUT, response.into_body().collect()).await.expect("body ends");
    assert!(body.is_err(), "the stream was cut, not completed");
    assert_eq!(in_flight(&server).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_and_slow_streams_are_not_cut_by_send_timeout() {
    let server = Server::start(&sample_app(), &["--send-timeout", "1s"]);
    // Pauses between chunks longer than send_timeout: the app is slow, not
    // the client.
    let pauses = async {
        let reply = get(server.addr, "/stream?chunks=3&interval_ms=1500").await.unwrap();
        assert_eq!(reply.status, 200);
        assert!(reply.text().contains("chunk 3 of 3"), "{}", reply.text());
    };
    // A client that reads 4 KiB every 40 ms, so the ~500 KiB response takes
    // several times send_timeout, always moving.
    let slow_reader = async {
        let mut stream = small_window_connection(server.addr).await;
        stream.write_all(b"GET /stream?chunks=20000&interval_ms=0 HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
        let started = Instant::now();
        let mut received = Vec::new();
        let mut buf = vec![0u8; 4096];
        while !received.ends_with(b"\r\n0\r\n\r\n") && started.elapsed() < Duration::from_secs(60) {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let text = String::from_utf8_lossy(&received);
        assert!(text.contains("chunk 20000 of 20000"), "cut after {} bytes, {:?}", received.len(), started.elapsed());
        assert!(started.elapsed() > Duration::from_secs(2), "read too fast to matter: {:?}", started.elapsed());
    };
    tokio::join!(pauses, slow_reader);
    assert_eq!(server.count_logs("send_timeout"), 0, "{}", server.logs());
}

/// An HTTP/2 client's first bytes: the preface, then an empty SETTINGS frame.
const H2_CLIENT_START: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// The next HTTP/2 frame's type, flags and payload; `None` once the
/// connection is closed.
async fn read_frame(stream: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], payload))
}

/// The server's SETTINGS_MAX_CONCURRENT_STREAMS, read from its first
/// SETTINGS frame (`None` if it does not send the setting).
async fn h2_max_concurrent_streams(addr: SocketAddr) -> Option<u32> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(H2_CLIENT_START).await.unwrap();
    let read = async {
        loop {
            let (kind, flags, payload) = read_frame(&mut stream).await.expect("the connection stays open");
            if kind == SETTINGS && flags & ACK == 0 {
                return payload.chunks_exact(6).find_map(|setting| {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
                    (id == MAX_CONCURRENT_STREAMS).then(|| u32::from_be_bytes(setting[2..6].try_into().unwrap()))
                });
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, read).await.expect("the server sends its SETTINGS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_told_the_stream_limit() {
    let limited = Server::start(&sample_app(), &["--h2-max-concurrent-streams", "3"]);
    assert_eq!(h2_max_concurrent_streams(limited.addr).await, Some(3));
    let default = Server::start(&sample_app(), &[]);
    assert_eq!(h2_max_concurrent_streams(default.addr).await, Some(200));
    let (version, reply) = pounce_tests::get_h2(limited.addr, "/").await.unwrap();
    assert_eq!((version, reply.status), (http::Version::HTTP_2, 200));
}

/// What a raw HTTP/2 client saw of the server's keep-alive PINGs: when the
/// first came, and when the server closed the connection (`None`: still
/// open after `watch`).
struct PingWatch {
    first_ping: Option<Duration>,
    closed: Option<Duration>,
}

/// Opens an HTTP/2 connection that makes no request and watches it for
/// `watch`, answering the server's PINGs or not.
async fn watch_pings(addr: SocketAddr, answer: bool, watch: Duration) -> PingWatch {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(H2_CLIENT_START).await.unwrap();
    let mut seen = PingWatch { first_ping: None, closed: None };
    let frames = async {
        while let Some((kind, flags, payload)) = read_frame(&mut stream).await {
            if kind == SETTINGS && flags & ACK == 0 {
                stream.write_all(&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0]).await.unwrap();
            }
            if kind == PING && flags & ACK == 0 {
                seen.first_ping.get_or_insert(started.elapsed());
                if answer {
                    let mut pong = vec![0, 0, 8, PING, ACK, 0, 0, 0, 0];
                    pong.extend_from_slice(&payload);
                    stream.write_all(&pong).await.unwrap();
                }
            }
        }
    };
    if tokio::time::timeout(watch, frames).await.is_ok() {
        seen.closed = Some(started.elapsed());
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_answering_pings_is_disconnected() {
    let server = Server::start(&sample_app(), &["--h2-keep-alive", "1s"]);
    let watch = Duration::from_secs(6);
    let (silent, answering) =
        tokio::join!(watch_pings(server.addr, false, watch), watch_pings(server.addr, true, watch));
    let first = silent.first_ping.expect("the server PINGs an idle HTTP/2 connection");
    assert!(first <= Duration::from_secs(3), "first PING after {first:?}, with --h2-keep-alive 1s");
    let closed = silent.closed.expect("a client that does not answer PINGs is disconnected");
    assert!(closed > first && closed <= Duration::from_secs(5), "PING at {first:?}, closed at {closed:?}");
    assert!(answering.first_ping.is_some(), "the answering client was PINGed too");
    assert_eq!(answering.closed, None, "a client that answers stays connected");
    // Without PINGs, an idle HTTP/2 connection sees none.
    let quiet = Server::start(&sample_app(), &["--h2-keep-alive", "off"]);
    let unpinged = watch_pings(quiet.addr, false, Duration::from_secs(3)).await;
    assert_eq!((unpinged.first_ping, unpinged.closed), (None, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_keep_request_series_only_for_live_generations() {
    let dir = TempDir::new("metrics-retired");
    let library = dir.join("libapp.so");
    replace_file(&sample_app(), &library);
    let server = Server::start(&library, &["--metrics-path", "/metrics"]);
    let mut sent = 0;
    for generation in 1..=6 {
        if generation > 1 {
            server.signal(libc::SIGHUP);
            let published = format!("generation {generation} published");
            assert!(server.wait_for_log(&published, EVENT_TIMEOUT), "{}", server.logs());
        }
        for _ in 0..3 {
            assert_eq!(get(server.addr, "/").await.unwrap().status, 200);
            sent += 1;
        }
    }
    for generation in 1..=5 {
        let retired = format!("generation {generation} retired");
        assert!(server.wait_for_log(&retired, EVENT_TIMEOUT), "{}", server.logs());
    }

    let scrape = get(server.addr, "/metrics").await.unwrap().text();
    let series: Vec<(String, f64)> = scrape
        .lines()
        .filter(|line| line.starts_with("pounce_requests_total{"))
        .map(|line| {
            let generation = line.split("generation=\"").nth(1).and_then(|rest| rest.split('"').next());
            let value = line.rsplit(' ').next().and_then(|v| v.parse().ok());
            (generation.unwrap_or_default().to_owned(), value.unwrap_or(f64::NAN))
        })
        .collect();
    let mut generations: Vec<&str> = series.iter().map(|(generation, _)| generation.as_str()).collect();
    generations.sort_unstable();
    generations.dedup();
    assert_eq!(generations, ["6", "retired"], "only the live generation and the retired bucket:\n{scrape}");
    let total: f64 = series.iter().map(|(_, value)| value).sum();
    assert_eq!(total, f64::from(sent), "{scrape}");
}
