//! The per-request cost inside pounce-host, run by `cargo xtask bench` (or
//! `cargo bench -p pounce-host --bench request_path`).
//!
//! - `lease`: `Current::lease()`, the generation load every request does
//!   (ArcSwap load + Arc clone/drop).
//! - `pounce_loopback`: one `GET /` at a time over a keep-alive loopback
//!   connection to an in-process pounce-host (`Server` + `accept_loop`, one
//!   worker thread) serving the sample app: lease, crossing the ABI, the
//!   response, and hyper and the kernel's loopback around them.
//! - `baseline_loopback`: the same against a plain hyper hello server on the
//!   same runtime. The difference is what the host adds per request.
//!
//! The app library comes from `POUNCE_BENCH_APP`, else
//! `target/release/libsample_app.so` (`cargo build --release -p sample-app`).
//! The server's thread and the client's are pinned to two different CPUs
//! when there are two.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser as _;
use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use pounce_host::config::cli::{Cli, Command};
use pounce_host::config::Config;
use pounce_host::front::{listener, Server};
use pounce_host::generations::loader::{Loader, LoaderSettings};
use pounce_host::generations::unload_guard;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

fn app_library() -> PathBuf {
    if let Some(path) = std::env::var_os("POUNCE_BENCH_APP") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("release/libsample_app.so");
    assert!(
        path.exists(),
        "{} not found: build it with `cargo build --release -p sample-app` (or run `cargo xtask bench`); \
         POUNCE_BENCH_APP=path selects another library",
        path.display()
    );
    path
}

/// pounce-host's settings as `pounce-host serve --port 0 --workers 1`
/// would have them, with a keep-alive timeout longer than the bench.
fn config(library: &Path) -> Config {
    let args = ["pounce-host", "serve", "--port", "0", "--workers", "1", "--keep-alive-timeout", "1h"];
    let cli = Cli::try_parse_from(args.iter().map(|a| a.to_string()).chain([library.display().to_string()]))
        .expect("serve arguments parse");
    let Command::Serve(serve) = cli.command else { unreachable!("parsed a serve command") };
    Config::from_serve_args(serve).expect("valid configuration")
}

/// The CPUs this process may use.
fn cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
    }
}

fn pin_current_thread(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: a zeroed cpu_set_t is valid; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

async fn hello(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = if request.uri().path() == "/" {
        Response::new(Full::new(Bytes::from_static(b"Hello, World!")))
    } else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        response
    };
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    Ok(response)
}

/// A plain hyper hello server, like bench/baseline.
async fn baseline_accept_loop(listener: TcpListener) {
    let http = auto::Builder::new(TokioExecutor::new());
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let http = http.clone();
        tokio::spawn(async move {
            let _ = http.serve_connection(TokioIo::new(stream), service_fn(hello)).await;
        });
    }
}

/// A keep-alive HTTP/1.1 client connection driven by `runtime`.
fn connect(runtime: &Runtime, addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    runtime.block_on(async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        sender
    })
}

async fn round_trip(sender: &mut SendRequest<Empty<Bytes>>, host: &HeaderValue) {
    sender.ready().await.expect("connection open");
    let request = Request::get("/").header(HOST, host.clone()).body(Empty::new()).expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"Hello, World!");
}

fn request_path(c: &mut Criterion) {
    let cpus = cpus();
    let (server_cpu, client_cpu) = match cpus[..] {
        [server, client, ..] => (Some(server), Some(client)),
        _ => (None, None),
    };
    // App thread-locals must not pin libraries (see ARCHITECTURE.md). In a
    // bench binary the guard's symbols are not exported, so libraries stay
    // mapped; this bench loads one.
    unload_guard::set_enabled(true);
    let library = app_library();
    let config = config(&library);
    let loader = Loader::new(LoaderSettings {
        source: library.clone(),
        app_args: Vec::new(),
        max_log_level: app_abi::ffi::level::OFF,
        unload_timeout: Duration::from_secs(10),
        staging_dir: config.staging_dir.clone(),
        allow_insecure_library: config.allow_insecure_library,
    })
    .expect("staging directory");
    let first = loader.load(1).unwrap_or_else(|e| panic!("cannot load {}: {e}", library.display()));

    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || pin_current_thread(server_cpu))
        .build()
        .expect("server runtime");
    let server = Arc::new(Server::new(config.clone(), first.generation, None));
    let pounce_addr = {
        let _entered = server_runtime.enter();
        let listener = listener::bind(&config).expect("bind").remove(0);
        let addr = listener.tcp_address().expect("address");
        server_runtime.spawn(listener::accept_loop(server.clone(), listener));
        addr
    };
    let baseline_addr = server_runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(baseline_accept_loop(listener));
        addr
    });

    pin_current_thread(client_cpu);
    let client = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("client runtime");

    let mut group = c.benchmark_group("request_path");
    group.bench_function("lease", |b| b.iter(|| black_box(server.current.lease())));
    for (name, addr) in [("baseline_loopback", baseline_addr), ("pounce_loopback", pounce_addr)] {
        let mut sender = connect(&client, addr);
        let host = HeaderValue::from_str(&addr.to_string()).expect("host header");
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                client.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iterations {
                        round_trip(&mut sender, &host).await;
                    }
                    started.elapsed()
                })
            })
        });
    }
    group.finish();
    server.connections.begin_shutdown();
    server.connections.force_close();
    server_runtime.shutdown_timeout(Duration::from_secs(1));
}

criterion_group!(benches, request_path);
criterion_main!(benches);
