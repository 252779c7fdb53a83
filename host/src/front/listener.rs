//! The listening sockets and the accept loops.
//!
//! Listening sockets serve every generation: a reload swaps the code
//! behind them, never the sockets, so no connection queued in a backlog is
//! ever dropped by a reload. There may be several: TCP on each `--host`
//! (HTTPS with `--tls-cert`), a unix socket (`--uds`), sockets systemd
//! passed (socket activation), and the admin listener (`--admin-listen`:
//! health and metrics only). Each gets its own accept loop; all of them
//! feed the same [`Server`].
//!
//! The accept loop is generic over the socket type and the connection over
//! its stream type, so a plain TCP request pays for no TLS or unix-socket
//! branch and no boxed stream.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use socket2::{Domain, SockRef, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::connection::{self, Peer};
use super::server::Server;
use super::service;
use super::tls::Tls;
use crate::config::Config;

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The app (and the health endpoint, briefly when `--admin-listen` is set).
    App,
    /// Health and metrics only (`--admin-listen`, or a systemd socket named `admin`).
    Admin,
}

impl Role {
    /// The name a listener of this role is passed under (systemd's
    /// `FileDescriptorName=`, and between pounce-host processes).
    pub fn name(self) -> &'static str {
        match self {
            Role::App => "app",
            Role::Admin => "admin",
        }
    }

    pub fn from_name(name: &str) -> Role {
        if name == "admin" {
            Role::Admin
        } else {
            Role::App
        }
    }
}

/// A listening socket, before the runtime takes it over.
#[derive(Debug)]
pub enum Socket {
    Tcp(std::net::TcpListener),
    Unix(StdUnixListener),
}

/// One listening socket and what it serves.
#[derive(Debug)]
pub struct Listener {
    pub socket: Socket,
    pub role: Role,
}

impl Listener {
    /// A listening socket inherited as `fd` (from systemd, a supervisor or
    /// an upgrading pounce-host): a stream socket in the listening state,
    /// TCP or unix.
    pub fn from_fd(fd: OwnedFd, role: Role) -> io::Result<Listener> {
        let socket = SockRef::from(&fd);
        if socket.r#type()? != Type::STREAM || !socket.is_listener()? {
            return Err(io::Error::other("not a listening stream socket"));
        }
        // systemd passes blocking sockets; the runtime needs them not to be.
        socket.set_nonblocking(true)?;
        let domain = socket.domain()?;
        let socket = if domain == Domain::UNIX {
            Socket::Unix(StdUnixListener::from(fd))
        } else if domain == Domain::IPV4 || domain == Domain::IPV6 {
            Socket::Tcp(std::net::TcpListener::from(fd))
        } else {
            return Err(io::Error::other("neither a TCP nor a unix socket"));
        };
        Ok(Listener { socket, role })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            Socket::Tcp(socket) => socket.as_fd(),
            Socket::Unix(socket) => socket.as_fd(),
        }
    }

    /// Another descriptor of the same socket.
    pub fn try_clone(&self) -> io::Result<Listener> {
        let socket = match &self.socket {
            Socket::Tcp(socket) => Socket::Tcp(socket.try_clone()?),
            Socket::Unix(socket) => Socket::Unix(socket.try_clone()?),
        };
        Ok(Listener { socket, role: self.role })
    }

    /// The TCP address, for a TCP listener.
    pub fn tcp_address(&self) -> Option<SocketAddr> {
        match &self.socket {
            Socket::Tcp(socket) => socket.local_addr().ok(),
            Socket::Unix(_) => None,
        }
    }

    /// Whether connections to it speak TLS, given the server's TLS setting.
    pub fn uses_tls(&self, tls: bool) -> bool {
        tls && self.role == Role::App && matches!(self.socket, Socket::Tcp(_))
    }

    /// How it is shown in logs: `http://127.0.0.1:8000`,
    /// `https://[::1]:8443`, `unix:/run/pounce.sock`, with ` (admin)` for
    /// the admin listener.
    pub fn describe(&self, tls: bool) -> String {
        let place = match &self.socket {
            Socket::Tcp(socket) => match socket.local_addr() {
                Ok(address) => format!("{}://{address}", if self.uses_tls(tls) { "https" } else { "http" }),
                Err(_) => "tcp:?".to_owned(),
            },
            Socket::Unix(socket) => unix_name(socket),
        };
        match self.role {
            Role::App => place,
            Role::Admin => format!("{place} (admin)"),
        }
    }
}

fn unix_name(socket: &StdUnixListener) -> String {
    match socket.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)) {
        Some(path) => format!("unix:{}", path.display()),
        None => "unix:(unnamed)".to_owned(),
    }
}

/// Why a listening socket could not be opened (exit status 4).
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{address} is already in use: stop the process that listens there, or choose another --port")]
    InUse { address: SocketAddr },
    #[error("cannot listen on {address}: {error}")]
    Other { address: String, error: io::Error },
    #[error(
        "unix socket {}: another process is listening on it; stop it, or choose another --uds path",
        path.display()
    )]
    UnixInUse { path: PathBuf },
    #[error("unix socket {}: the path exists and is not a socket; remove it, or choose another --uds path", path.display())]
    NotASocket { path: PathBuf },
    #[error("inherited socket (descriptor {fd}, name {name:?}): {error}")]
    Inherited { fd: i32, name: String, error: io::Error },
}

/// Opens the listeners `config` asks for: TCP on every `--host` (if TCP is
/// on), the `--uds` socket, and the admin listener.
pub fn bind(config: &Config) -> Result<Vec<Listener>, BindError> {
    let mut listeners = Vec::new();
    if config.tcp {
        let mut port = config.port;
        let several = config.host.len() > 1;
        for host in &config.host {
            let socket = bind_tcp(SocketAddr::new(*host, port), config.backlog, several)?;
            if port == 0 {
                port = socket.local_addr().map_or(0, |a| a.port());
            }
            listeners.push(Listener { socket: Socket::Tcp(socket), role: Role::App });
        }
    }
    if let Some(path) = &config.uds {
        let socket = bind_unix(path, config.uds_mode, config.backlog)?;
        listeners.push(Listener { socket: Socket::Unix(socket), role: Role::App });
    }
    if let Some(address) = config.admin_listen {
        listeners.push(bind_admin(address, config.backlog)?);
    }
    Ok(listeners)
}

/// The admin listener on `address`.
pub fn bind_admin(address: SocketAddr, backlog: u32) -> Result<Listener, BindError> {
    Ok(Listener { socket: Socket::Tcp(bind_tcp(address, backlog, false)?), role: Role::Admin })
}

/// A TCP listening socket with `SO_REUSEADDR` (a restart does not wait for
/// old connections in TIME_WAIT). With several addresses an IPv6 one is
/// IPv6-only, so that `0.0.0.0` and `::` can both be given.
fn bind_tcp(address: SocketAddr, backlog: u32, v6_only: bool) -> Result<std::net::TcpListener, BindError> {
    let other = |error| BindError::Other { address: address.to_string(), error };
    let socket = socket2::Socket::new(Domain::for_address(address), Type::STREAM.cloexec(), None).map_err(other)?;
    socket.set_reuse_address(true).map_err(other)?;
    if address.is_ipv6() && v6_only {
        socket.set_only_v6(true).map_err(other)?;
    }
    socket.bind(&address.into()).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => BindError::InUse { address },
        _ => other(e),
    })?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX)).map_err(other)?;
    socket.set_nonblocking(true).map_err(other)?;
    Ok(socket.into())
}

/// A unix listening socket at `path` with permissions `mode`. A socket file
/// already there is removed if nothing listens on it (a dead process left
/// it: connecting is refused); one a live process listens on is an error.
fn bind_unix(path: &Path, mode: u32, backlog: u32) -> Result<StdUnixListener, BindError> {
    let other = |error| BindError::Other { address: format!("unix:{}", path.display()), error };
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => match StdUnixStream::connect(path) {
            Ok(_) => return Err(BindError::UnixInUse { path: path.to_owned() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("unix socket {}: removing the stale socket file of a dead process", path.display());
                std::fs::remove_file(path).map_err(other)?;
            }
            Err(e) => return Err(other(e)),
        },
        Ok(_) => return Err(BindError::NotASocket { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(other(e)),
    }
    let socket = socket2::Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(other)?;
    socket.bind(&socket2::SockAddr::unix(path).map_err(other)?).map_err(other)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(other)?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX)).map_err(other)?;
    socket.set_nonblocking(true).map_err(other)?;
    Ok(StdUnixListener::from(OwnedFd::from(socket)))
}

/// How long the accept loop waits after a failed accept (out of file
/// descriptors and the like) rather than spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// At most one warning about failed accepts per this interval.
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(1);

/// At most one warning about reaching `max_connections` per this interval.
const LIMIT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// What an accept loop needs of a listening socket.
trait Accept: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Stream, Peer)>>;
}

impl Accept for TcpListener {
    type Stream = TcpStream;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, Peer)>> {
        TcpListener::poll_accept(self, cx).map_ok(|(stream, peer)| {
            let _ = stream.set_nodelay(true);
            (stream, Peer::Ip(peer))
        })
    }
}

/// A unix listener and the name its connections' peers are shown as.
struct Unix {
    listener: UnixListener,
    name: Arc<str>,
}

impl Accept for Unix {
    type Stream = UnixStream;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(UnixStream, Peer)>> {
        self.listener.poll_accept(cx).map_ok(|(stream, _)| (stream, Peer::Unix(self.name.clone())))
    }
}

/// Accepts connections on `listener` until the end of a shutdown (every
/// connection is force-closed), until a process-mode worker retires or
/// until a binary upgrade hands over. During a shutdown it keeps
/// accepting, so a late client gets a quick `503` instead of hanging in
/// the backlog. At `max_connections` it stops accepting until a connection
/// closes: new clients wait in the kernel's backlog.
pub async fn accept_loop(server: Arc<Server>, listener: Listener) {
    let role = listener.role;
    let tls = if listener.uses_tls(server.tls.is_some()) { server.tls.clone() } else { None };
    let name = listener.describe(tls.is_some());
    let taken = match listener.socket {
        Socket::Tcp(socket) => match TcpListener::from_std(socket) {
            Ok(socket) => return run(server, socket, role, tls).await,
            Err(e) => e,
        },
        Socket::Unix(socket) => match UnixListener::from_std(socket) {
            Ok(listener) => return run(server, Unix { listener, name: Arc::from(name.as_str()) }, role, None).await,
            Err(e) => e,
        },
    };
    tracing::error!("cannot accept on {name}: {taken}");
}

async fn run<A: Accept>(server: Arc<Server>, listener: A, role: Role, tls: Option<Arc<Tls>>) {
    let mut stop = server.connections.stop_accepting_signal();
    let mut limit = LimitLog::new(server.config.max_connections);
    let mut failures = AcceptFailures::default();
    loop {
        let admission = match server.connections.try_admit() {
            Some(admission) => admission,
            None => {
                limit.reached();
                let admission = tokio::select! {
                    admission = server.connections.admit() => admission,
                    _ = stop.changed() => return,
                };
                limit.lifted();
                admission
            }
        };
        let (stream, peer) = loop {
            let accepted = tokio::select! {
                accepted = std::future::poll_fn(|cx| listener.poll_accept(cx)) => accepted,
                _ = stop.changed() => return,
            };
            match accepted {
                Ok(accepted) => break accepted,
                Err(e) => {
                    failures.failed(&e);
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        };
        let (connection, open) = server.connections.accepted(peer, role == Role::Admin, admission);
        let server = server.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _open = open;
            let service = {
                let (server, connection) = (server.clone(), connection.clone());
                service_fn(move |request| service::handle(request, server.clone(), connection.clone()))
            };
            let Some(tls) = tls else {
                return connection::serve(stream, connection, &server.http, service).await;
            };
            // The handshake counts against header_timeout: a client that
            // opens a connection and never finishes it is closed then.
            match tokio::time::timeout(server.config.header_timeout, tls.acceptor().accept(stream)).await {
                Ok(Ok(stream)) => connection::serve(stream, connection, &server.http, service).await,
                Ok(Err(e)) => tracing::debug!(peer = %connection.peer, "TLS handshake failed: {e}"),
                Err(_) => {
                    tracing::debug!(peer = %connection.peer, "TLS handshake not done within header_timeout; closing")
                }
            }
        });
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Logs reaching `max_connections` and accepting again, once each per
/// time the limit is hit; limits hit again within [`LIMIT_WARN_INTERVAL`]
/// of the last warning are only counted, and the next warning says how
/// many there were.
struct LimitLog {
    max: usize,
    last_warned: Option<Instant>,
    /// Whether this time at the limit was warned about (so its end is logged).
    warned: bool,
    unlogged: u64,
    since: Instant,
}

impl LimitLog {
    fn new(max: usize) -> LimitLog {
        LimitLog { max, last_warned: None, warned: false, unlogged: 0, since: Instant::now() }
    }

    /// The accept loop starts waiting for a connection to close.
    fn reached(&mut self) {
        let now = Instant::now();
        self.since = now;
        if self.last_warned.is_some_and(|at| now.duration_since(at) < LIMIT_WARN_INTERVAL) {
            self.unlogged += 1;
            self.warned = false;
            return;
        }
        let max = self.max;
        let again = match self.unlogged {
            0 => String::new(),
            n => format!(" ({n} more times since the last warning)"),
        };
        tracing::warn!(
            max_connections = max,
            "max_connections ({max}) reached{again}: new connections wait in the backlog until one closes"
        );
        self.last_warned = Some(now);
        self.warned = true;
        self.unlogged = 0;
    }

    /// A connection closed while the loop waited: it accepts again.
    fn lifted(&mut self) {
        if self.warned {
            self.warned = false;
            let waited_ms = self.since.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(
                waited_ms,
                "a connection closed: accepting connections again (max_connections {})",
                self.max
            );
        }
    }
}

/// Failed accepts (out of file descriptors and the like), warned about at
/// most once per [`ACCEPT_WARN_INTERVAL`], with how many failed since the
/// last warning.
#[derive(Default)]
struct AcceptFailures {
    last_warned: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    fn failed(&mut self, error: &io::Error) {
        self.unlogged += 1;
        let now = Instant::now();
        if self.last_warned.is_some_and(|at| now.duration_since(at) < ACCEPT_WARN_INTERVAL) {
            return;
        }
        let failures = self.unlogged;
        tracing::warn!(
            failures,
            "accept failed: {error} ({failures} failures since the last such warning); retrying every {}ms",
            ACCEPT_RETRY.as_millis()
        );
        self.last_warned = Some(now);
        self.unlogged = 0;
    }
}
