//! The baseline of `cargo xtask bench`: the smallest hyper server that
//! answers what the sample app answers on `GET /` (`200`, `content-type:
//! text/plain; charset=utf-8`, `Hello, World!`), with the handler compiled
//! in: no plugin, no generations, no timers. hyper-util's auto builder
//! (HTTP/1.1 + h2c) on a multi-thread tokio runtime with `--workers`
//! threads (default 1, as the benchmark runs pounce-host).
//!
//! Usage: `pounce-baseline [--host ADDR] [--port PORT] [--workers N]
//! [--tls-cert FILE --tls-key FILE]`; port 0 picks a free one. With a
//! certificate it serves HTTPS with pounce-host's rustls setup (ring, TLS
//! 1.3 and 1.2, ALPN h2 and http/1.1), for `cargo xtask bench-tls`. It reports the bound address on stderr as pounce-host
//! does, in a text-log `server_ready` line (`event="server_ready"
//! address=ADDR:PORT`) that the benchmark reads for both servers, and runs
//! until it is killed.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpSocket;

/// pounce-host's default listen backlog.
const BACKLOG: u32 = 2048;

struct Args {
    host: IpAddr,
    port: u16,
    workers: usize,
    tls_cert: Option<String>,
    tls_key: Option<String>,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("pounce-baseline: {e}\nusage: pounce-baseline [--host ADDR] [--port PORT] [--workers N] [--tls-cert FILE --tls-key FILE]");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .thread_name("baseline-worker")
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pounce-baseline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match tls_acceptor(cert, key) {
            Ok(acceptor) => Some(acceptor),
            Err(e) => {
                eprintln!("pounce-baseline: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => None,
        _ => {
            eprintln!("pounce-baseline: --tls-cert and --tls-key go together");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(serve(SocketAddr::new(args.host, args.port), tls)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pounce-baseline: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed =
        Args { host: IpAddr::V4(Ipv4Addr::LOCALHOST), port: 8000, workers: 1, tls_cert: None, tls_key: None };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--host" => parsed.host = value()?.parse().map_err(|e| format!("--host: {e}"))?,
            "--port" => parsed.port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--workers" => {
                parsed.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?;
                if parsed.workers == 0 {
                    return Err("--workers must be at least 1".to_owned());
                }
            }
            "--tls-cert" => parsed.tls_cert = Some(value()?),
            "--tls-key" => parsed.tls_key = Some(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

/// pounce-host's TLS setup (`front::tls`): ring, TLS 1.3 and 1.2, ALPN h2
/// then http/1.1.
fn tls_acceptor(cert: &str, key: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

async fn serve(address: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> std::io::Result<()> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }?;
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    let listener = socket.listen(BACKLOG)?;
    let bound = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!("listening on {scheme}://{bound} event=\"server_ready\" address={bound}");
    let http = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let http = http.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), service_fn(hello)).await;
                }
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = http.serve_connection(TokioIo::new(stream), service_fn(hello)).await;
                    }
                }
            }
        });
    }
}

async fn hello(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (request.method().as_str(), request.uri().path()) {
        ("GET", "/") => (StatusCode::OK, "Hello, World!"),
        (_, "/") => (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    Ok(response)
}
