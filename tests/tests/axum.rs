//! The axum example (`examples/axum-app`) served by pounce-host through
//! `export_service!`: plain axum routes, JSON, SSE, `ConnectInfo`, body
//! limits, and WebSockets across reloads and shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use pounce_tests::{axum_app, get, request, Client, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<TcpStream>;

/// How long any one WebSocket step may take.
const STEP: Duration = Duration::from_secs(10);

async fn open_socket(addr: SocketAddr) -> Socket {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (socket, response) =
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp).await.expect("WebSocket handshake");
    assert_eq!(response.status(), 101);
    socket
}

/// The next message, within [`STEP`].
async fn next(socket: &mut Socket) -> Option<Message> {
    match tokio::time::timeout(STEP, socket.next()).await.expect("a message within the step") {
        Some(Ok(message)) => Some(message),
        Some(Err(e)) => panic!("WebSocket error: {e}"),
        None => None,
    }
}

/// Sends `text` and returns the text that comes back.
async fn ask(socket: &mut Socket, text: &str) -> String {
    socket.send(Message::text(text)).await.expect("send");
    match next(socket).await {
        Some(Message::Text(reply)) => reply.to_string(),
        other => panic!("expected a text reply to {text:?}, got {other:?}"),
    }
}

/// Waits for the server's Close frame and returns its code.
async fn close_code(socket: &mut Socket) -> CloseCode {
    match next(socket).await {
        Some(Message::Close(Some(frame))) => frame.code,
        other => panic!("expected a Close frame, got {other:?}"),
    }
}

fn reload(server: &Server, generation: u64) {
    server.signal(libc::SIGHUP);
    let published = format!("generation {generation} published");
    assert!(server.wait_for_log(&published, Duration::from_secs(30)), "no {published:?}:\n{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_an_axum_router() {
    let server = Server::start(&axum_app(), &["--app-arg", "greeting=Hi", "--max-body-size", "1KiB"]);
    let addr = server.addr;

    let hello = get(addr, "/").await.unwrap();
    assert_eq!((hello.status, hello.text().as_str()), (200, "Hello, World!"));
    assert_eq!(hello.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(hello.header("content-length"), Some("13"));

    // State built in init from the settings, answered as JSON.
    let info = get(addr, "/info").await.unwrap();
    assert_eq!(info.header("content-type"), Some("application/json"));
    assert_eq!(info.json(), serde_json::json!({"app": "axum-app", "greeting": "Hi", "generation": 1}));

    // JSON in and out, over one keep-alive connection.
    let mut client = Client::connect(addr).await.unwrap();
    let echoed = client.send("POST", "/echo", Bytes::from_static(br#"{"n":[1,2,3]}"#)).await.unwrap();
    assert_eq!(echoed.status, 415, "axum's Json wants a JSON content type: {}", echoed.text());
    let echoed = json_post(addr, "/echo", r#"{"n":[1,2,3]}"#).await;
    assert_eq!(echoed.json(), serde_json::json!({"echo": {"n": [1, 2, 3]}}));
    assert_eq!(json_post(addr, "/echo", "{not json").await.status, 400, "axum's own rejection");

    // axum's routing answers: unknown path, wrong method.
    assert_eq!(client.get("/nope").await.unwrap().status, 404);
    assert_eq!(client.send("DELETE", "/", Bytes::new()).await.unwrap().status, 405);
    assert!(!client.is_closed(), "errors keep the connection");

    // Headers arrive as sent, repeated ones too.
    let many = "GET /headers HTTP/1.1\r\nHost: x\r\nX-One: 1\r\nX-Two: two\r\nX-List: a\r\nX-List: b\r\n\
                Accept: */*\r\nConnection: close\r\n\r\n";
    let reply = raw_exchange(TcpStream::connect(addr).await.unwrap(), many).await;
    let (_, body) = reply.split_once("\r\n\r\n").expect("a response");
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(json["x-one"], serde_json::json!(["1"]), "{json}");
    assert_eq!(json["x-two"], serde_json::json!(["two"]), "{json}");
    assert_eq!(json["x-list"], serde_json::json!(["a", "b"]), "{json}");
    assert_eq!(json["host"], serde_json::json!(["x"]), "{json}");
    assert_eq!(json["connection"], serde_json::json!(["close"]), "{json}");

    // ConnectInfo<SocketAddr>: the client's own address.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let reply = raw_exchange(tcp, "GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(reply.ends_with(&format!("\r\n\r\n{local}")), "peer is the client: {reply}");

    // Server-sent events, streamed as they are made.
    let started = Instant::now();
    let sse = get(addr, "/sse?events=3&interval_ms=100").await.unwrap();
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    let text = sse.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(
        events,
        ["event: tick\ndata: event 1 of 3", "event: tick\ndata: event 2 of 3", "event: tick\ndata: event 3 of 3"]
    );
    assert!(started.elapsed() >= Duration::from_millis(200), "events were paced");

    // The request body limit: under it the app reads it all; over it the
    // client gets 413, declared (the host answers) or not (the app's read
    // fails and the host answers 413 whatever axum said).
    let counted = request(addr, "POST", "/count", Bytes::from(vec![b'x'; 1000])).await.unwrap();
    assert_eq!((counted.status, counted.text().as_str()), (200, "1000 bytes\n"));
    let declared = request(addr, "POST", "/count", Bytes::from(vec![b'x'; 2000])).await.unwrap();
    assert_eq!(declared.status, 413);
    let chunk = "x".repeat(600);
    let chunked = format!(
        "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let reply = raw_exchange(TcpStream::connect(addr).await.unwrap(), &chunked).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "undeclared body over the limit: {reply}");
    let small = "POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                 5\r\nhello\r\n0\r\n\r\n";
    let reply = raw_exchange(TcpStream::connect(addr).await.unwrap(), small).await;
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("5 bytes\n"),
        "streamed body under the limit: {reply}"
    );

    // A WebSocket echoes, counts in health, and is gone when closed.
    let mut socket = open_socket(addr).await;
    assert_eq!(ask(&mut socket, "hello").await, "hello");
    socket.send(Message::binary(vec![0u8, 159, 146, 150])).await.unwrap();
    assert_eq!(next(&mut socket).await, Some(Message::binary(vec![0u8, 159, 146, 150])));
    server.wait_for_health("one upgraded connection", |json| json["upgraded_connections"] == 1).await;
    socket.close(None).await.unwrap();
    while next(&mut socket).await.is_some() {}
    server.wait_for_health("no upgraded connection", |json| json["upgraded_connections"] == 0).await;
}

async fn json_post(addr: SocketAddr, path: &str, body: &str) -> pounce_tests::Reply {
    let text = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let reply = raw_exchange(TcpStream::connect(addr).await.unwrap(), &text).await;
    let (head, body) = reply.split_once("\r\n\r\n").expect("a response head");
    let status = head.get(9..12).and_then(|s| s.parse().ok()).expect("a status");
    pounce_tests::Reply { status, headers: http::HeaderMap::new(), body: Bytes::from(body.to_owned()) }
}

/// Writes `text` and reads until the server closes (bounded).
async fn raw_exchange(mut tcp: TcpStream, text: &str) -> String {
    tcp.write_all(text.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(STEP, tcp.read_to_end(&mut reply)).await.expect("the server closes").ok();
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_stays_on_its_generation_until_it_drains() {
    let args = ["--reload-timeout", "3s", "--app-arg", "close_delay_ms=1000", "--metrics-path", "/metrics"];
    let server = Server::start(&axum_app(), &args);
    let addr = server.addr;
    let mut old = open_socket(addr).await;
    assert_eq!(ask(&mut old, "generation").await, "generation 1");

    let reloaded = Instant::now();
    reload(&server, 2);
    // The new generation serves new sockets; the old socket still talks to
    // the old generation's code, which stays loaded for it.
    let mut new = open_socket(addr).await;
    assert_eq!(ask(&mut new, "generation").await, "generation 2");
    assert_eq!(ask(&mut old, "still there?").await, "still there?");
    assert_eq!(ask(&mut old, "generation").await, "generation 1");
    let health = server.health().await;
    assert_eq!((health["upgraded_connections"].as_u64(), health["draining_generations"].as_u64()), (Some(2), Some(1)));
    let metrics = get(addr, "/metrics").await.unwrap().text();
    assert!(metrics.contains("pounce_upgraded_connections 2"), "{metrics}");

    // The old generation drains: its socket gets Close 1001 "going away"...
    assert_eq!(close_code(&mut old).await, CloseCode::Away);
    let closed_after = reloaded.elapsed();
    assert!(closed_after >= Duration::from_millis(900), "the app's close delay held: {closed_after:?}");
    // ...and this client never answers it, so the host cuts the connection
    // at reload_timeout.
    let mut tcp = old.into_inner();
    let mut rest = Vec::new();
    // End of file or a reset: either way, cut.
    let _ = tokio::time::timeout(STEP, tcp.read_to_end(&mut rest)).await.expect("the host cuts it");
    let cut_after = reloaded.elapsed();
    assert!(
        cut_after >= Duration::from_millis(2800) && cut_after < Duration::from_secs(6),
        "cut at reload_timeout (3s): {cut_after:?}"
    );
    assert!(server.wait_for_log("generation 1 retired", STEP), "{}", server.logs());
    assert!(server.logs().lines().any(|l| l.contains("generation 1 retired") && l.contains("timed_out=true")));
    assert!(server.wait_for_log("generation released, library unmapped", STEP), "{}", server.logs());

    // The new generation's socket was never disturbed.
    assert_eq!(ask(&mut new, "after").await, "after");
    server.wait_for_health("one upgraded connection", |json| json["upgraded_connections"] == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_answers_the_close_ends_the_drain_early() {
    let server = Server::start(&axum_app(), &["--reload-timeout", "20s"]);
    let mut socket = open_socket(server.addr).await;
    assert_eq!(ask(&mut socket, "generation").await, "generation 1");
    let reloaded = Instant::now();
    reload(&server, 2);
    assert_eq!(close_code(&mut socket).await, CloseCode::Away);
    // Reading on sends tungstenite's answer to the Close; then the server ends it.
    assert_eq!(next(&mut socket).await, None);
    assert!(server.wait_for_log("generation 1 retired", STEP), "{}", server.logs());
    assert!(reloaded.elapsed() < Duration::from_secs(10), "drained long before reload_timeout");
    assert!(server.logs().lines().any(|l| l.contains("generation 1 retired") && l.contains("timed_out=false")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_websockets_with_1001_and_exits_0() {
    let mut server = Server::start(&axum_app(), &["--shutdown-timeout", "20s"]);
    let mut sockets = vec![open_socket(server.addr).await, open_socket(server.addr).await];
    for socket in &mut sockets {
        assert_eq!(ask(socket, "ping").await, "ping");
    }
    server.wait_for_health("two upgraded connections", |json| json["upgraded_connections"] == 2).await;
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    for socket in &mut sockets {
        assert_eq!(close_code(socket).await, CloseCode::Away);
        assert_eq!(next(socket).await, None, "the close handshake completes");
    }
    let status = server.wait_exit(STEP).expect("the server exits");
    assert!(status.success(), "exit 0: {status:?}\n{}", server.logs());
    assert!(started.elapsed() < Duration::from_secs(10), "no wait for shutdown_timeout");
    assert!(server.logs().contains("all connections closed"), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_a_websocket_that_ignores_the_close_at_shutdown_timeout() {
    let mut server = Server::start(&axum_app(), &["--shutdown-timeout", "2s"]);
    let mut socket = open_socket(server.addr).await;
    assert_eq!(ask(&mut socket, "ping").await, "ping");
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    assert_eq!(close_code(&mut socket).await, CloseCode::Away);
    let mut tcp = socket.into_inner();
    let _ = tokio::time::timeout(STEP, tcp.read_to_end(&mut Vec::new())).await.expect("cut");
    let status = server.wait_exit(STEP).expect("the server exits");
    assert!(status.success(), "exit 0: {status:?}\n{}", server.logs());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1800) && took < Duration::from_secs(8), "cut at shutdown_timeout: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_of_the_axum_app_leave_one_copy_mapped() {
    let server = Server::start(&axum_app(), &[]);
    assert_eq!(server.mapped_app_copies(), 1);
    for generation in 2..=51 {
        reload(&server, generation);
        // Run each generation's code: a plain route, and an upgrade (the
        // in-memory hyper connection and the WebSocket task).
        assert_eq!(get(server.addr, "/").await.unwrap().text(), "Hello, World!");
        let mut socket = open_socket(server.addr).await;
        assert_eq!(ask(&mut socket, "generation").await, format!("generation {generation}"));
        socket.close(None).await.unwrap();
        while next(&mut socket).await.is_some() {}
    }
    let unmapped = "generation released, library unmapped";
    server.wait_for_log_count(unmapped, 50, Duration::from_secs(30));
    assert_eq!(server.count_logs(unmapped), 50, "every old generation was unmapped:\n{}", server.logs());
    assert_eq!(server.mapped_app_copies(), 1, "copies still mapped after 50 reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_mode_a_retiring_worker_keeps_its_websocket_until_reload_timeout() {
    let args = ["--mode", "process", "--processes", "1", "--reload-timeout", "3s", "--app-arg", "close_delay_ms=1000"];
    let server = Server::start(&axum_app(), &args);
    let mut old = open_socket(server.addr).await;
    assert_eq!(ask(&mut old, "generation").await, "generation 1");
    let reloaded = Instant::now();
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("retiring: a newer generation serves", STEP), "{}", server.logs());
    // The old worker stops accepting a moment after it says so: a socket
    // it still took is left, and another one opened.
    let mut new = None;
    for _ in 0..20 {
        let mut socket = open_socket(server.addr).await;
        socket.send(Message::text("generation")).await.unwrap();
        if matches!(next(&mut socket).await, Some(Message::Text(reply)) if reply.as_str() == "generation 2") {
            new = Some(socket);
            break;
        }
    }
    let mut new = new.expect("a socket on the new worker");
    // The old worker retires but keeps the socket it holds...
    assert_eq!(ask(&mut old, "generation").await, "generation 1");
    assert_eq!(close_code(&mut old).await, CloseCode::Away);
    // ...until reload_timeout, as this client never answers the Close.
    let mut tcp = old.into_inner();
    let _ = tokio::time::timeout(STEP, tcp.read_to_end(&mut Vec::new())).await.expect("cut");
    let cut_after = reloaded.elapsed();
    assert!(cut_after >= Duration::from_millis(2500) && cut_after < Duration::from_secs(8), "{cut_after:?}");
    let exited = |line: &str| line.contains("event=\"worker_exited\"") && line.contains("generation=1");
    let deadline = Instant::now() + STEP;
    while !server.logs().lines().any(exited) {
        assert!(Instant::now() < deadline, "the old worker exits once its socket is gone:\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ask(&mut new, "after").await, "after");
}
