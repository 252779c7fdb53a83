//! Crash recovery in process mode: how soon after a worker crashes its
//! replacement serves. The sample app, started with `--app-arg faults=on`,
//! crashes the worker that gets `GET /fault/segfault`; the supervisor
//! starts a replacement. Each crash is timed twice:
//!
//! - by a client (the figure with the target): from the fault request's
//!   connection ending (the crash, as a client sees it) to the first
//!   `GET /` that the replacement answers. Which worker answered is found
//!   from the connection: its server-side socket (`sockets`) is among the
//!   replacement's descriptors. Another worker answering meanwhile is
//!   the service staying up, not the replacement serving.
//! - by the supervisor's log: `worker_crashed` to the replacement's
//!   `worker_ready`, split into the delay before the replacement started
//!   and its `startup_ms` (start to ready).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::events::LogEvent;
use super::procs::{self, Binaries, Kind, Pinning, Server};
use super::sockets;

/// What the crash runs measured, in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct CrashResult {
    /// Worker processes the server runs.
    pub processes: usize,
    pub crashes: usize,
    /// Client: crash to the first `GET /` answered by the replacement.
    pub to_serving_ms: Vec<f64>,
    /// Log: `worker_crashed` to the replacement's `worker_ready`.
    pub to_ready_ms: Vec<f64>,
    /// Log: `worker_crashed` to the replacement's start.
    pub to_spawn_ms: Vec<f64>,
    /// Log: the replacement's `startup_ms` (start to ready).
    pub startup_ms: Vec<f64>,
    /// `GET /` answered by the other workers while the replacement started.
    pub answered_meanwhile: u64,
    /// Crashes whose replacement was not seen serving within the time bound.
    pub unanswered: usize,
}

pub struct CrashPlan {
    pub crashes: usize,
    pub processes: usize,
    /// The bound on one crash's replacement.
    pub timeout: Duration,
    /// The CPU the client runs on.
    pub cpu: Option<usize>,
}

/// How often the client asks while the replacement starts.
const POLL: Duration = Duration::from_millis(1);
/// A quiet moment after each replacement is ready, so the next crash does
/// not land on a worker still warming up.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The server crashes are measured on: process mode with two workers, so
/// one serves while the other is replaced.
pub const KIND: Kind = Kind::Process { processes: PROCESSES };
const PROCESSES: usize = 2;
/// Its extra arguments: the fault routes on, and no crash-loop back-off
/// (by default more than 5 restarts a minute wait, which is what a real
/// crash loop should do, not what this measures).
pub const SERVER_ARGS: &[&str] = &["--app-arg", "faults=on", "--max-restarts", "1000"];
/// The bound on one crash's replacement.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the crash server and crashes its workers `crashes` times.
pub fn measure(binaries: &Binaries, pinning: &Pinning, crashes: usize) -> Result<CrashResult> {
    let server = Server::start_with(KIND, 1, SERVER_ARGS, binaries, pinning)?;
    run(&server, &CrashPlan { crashes, processes: PROCESSES, timeout: TIMEOUT, cpu: pinning.load_cpu })
}

/// Crashes a worker of `server` (process mode, faults on) `plan.crashes`
/// times, one at a time, on a thread pinned to the client CPU.
pub fn run(server: &Server, plan: &CrashPlan) -> Result<CrashResult> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(cpu) = plan.cpu {
                    procs::pin_current_thread(cpu)?;
                }
                let mut result = CrashResult { processes: plan.processes, ..CrashResult::default() };
                for _ in 0..plan.crashes {
                    procs::check_interrupted()?;
                    crash_once(server, plan, &mut result)?;
                    procs::sleep(SETTLE)?;
                }
                Ok(result)
            })
            .join()
            .unwrap_or_else(|_| bail!("the crash client panicked"))
    })
}

/// One crash: the fault request, polling for the replacement, then its
/// log events.
fn crash_once(server: &Server, plan: &CrashPlan, result: &mut CrashResult) -> Result<()> {
    let from = server.proc.stderr.len();
    let before: HashSet<i32> = procs::descendants(server.pid()).into_iter().collect();
    if before.len() != plan.processes {
        bail!("{} worker processes before the crash, expected {}", before.len(), plan.processes);
    }
    crash_a_worker(server.addr)?;
    let crashed = Instant::now();
    result.crashes += 1;
    match first_answer_from_replacement(server, &before, crashed + plan.timeout)? {
        Some((answered, meanwhile)) => {
            result.to_serving_ms.push((answered - crashed).as_secs_f64() * 1000.0);
            result.answered_meanwhile += meanwhile;
        }
        None => result.unanswered += 1,
    }
    let ready =
        server.proc.stderr.wait_for(from, plan.timeout, |line| LogEvent::named(line, "worker_ready").map(|_| ()));
    let log = server.proc.stderr.since(from);
    if let (Some(_), Some(timing)) = (ready, replacement_timing(&log)) {
        result.to_ready_ms.push(timing.to_ready_ms);
        result.to_spawn_ms.push(timing.to_ready_ms - timing.startup_ms);
        result.startup_ms.push(timing.startup_ms);
    } else {
        procs::check_interrupted()?;
        bail!("no crash and replacement in the log within {:?}:\n{}", plan.timeout, log.join("\n"));
    }
    Ok(())
}

/// Sends `GET /fault/segfault` and waits until its connection ends without
/// an answer: the worker that took it is dead.
fn crash_a_worker(addr: SocketAddr) -> Result<()> {
    let mut stream = connect(addr)?;
    stream.write_all(b"GET /fault/segfault HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut answer = Vec::new();
    // A reset is as good as an end: both mean the worker is gone.
    let _ = stream.read_to_end(&mut answer);
    if answer.starts_with(b"HTTP/1.1 ") {
        bail!(
            "GET /fault/segfault was answered (are the fault routes on?): {}",
            String::from_utf8_lossy(&answer).lines().next().unwrap_or_default()
        );
    }
    Ok(())
}

/// Asks `GET /` until a worker that was not in `before` answers it, or
/// `deadline`. Returns when it answered and how many answers came from the
/// other workers first.
fn first_answer_from_replacement(
    server: &Server,
    before: &HashSet<i32>,
    deadline: Instant,
) -> Result<Option<(Instant, u64)>> {
    let before: Vec<i32> = before.iter().copied().collect();
    let mut meanwhile = 0;
    while Instant::now() < deadline {
        procs::check_interrupted()?;
        if let Some((stream, answered)) = get_hello(server.addr) {
            match sockets::socket_inode(v4(server.addr)?, v4(stream.local_addr()?)?)? {
                Some(inode) if sockets::owner(inode, &before).is_some() => meanwhile += 1,
                // Not a worker from before the crash: make sure it is a new
                // one (scanning /proc takes milliseconds, so only now).
                Some(inode) if sockets::owner(inode, &new_workers(server, &before)).is_some() => {
                    return Ok(Some((answered, meanwhile)));
                }
                _ => {}
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(None)
}

/// The server's worker processes that are not in `before`.
fn new_workers(server: &Server, before: &[i32]) -> Vec<i32> {
    procs::descendants(server.pid()).into_iter().filter(|pid| !before.contains(pid)).collect()
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).context("cannot connect")?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `GET /` on a new keep-alive connection; the connection (still open, so
/// its server side can be found) and when the answer was complete, if it
/// was `200 Hello, World!`.
fn get_hello(addr: SocketAddr) -> Option<(TcpStream, Instant)> {
    let mut stream = connect(addr).ok()?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n").ok()?;
    let (status, body) = read_response(&mut stream)?;
    (status == 200 && body == b"Hello, World!").then(|| (stream, Instant::now()))
}

/// Reads one response with a `Content-Length` body: its status and body.
fn read_response(stream: &mut impl Read) -> Option<(u16, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buffer = [0; 1024];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let read = stream.read(&mut buffer).ok().filter(|n| *n > 0)?;
        data.extend_from_slice(&buffer[..read]);
    };
    let head = std::str::from_utf8(&data[..head_end]).ok()?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let length: usize = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
    })?;
    while data.len() < head_end + length {
        let read = stream.read(&mut buffer).ok().filter(|n| *n > 0)?;
        data.extend_from_slice(&buffer[..read]);
    }
    Some((status, data[head_end..head_end + length].to_vec()))
}

fn v4(address: SocketAddr) -> Result<SocketAddrV4> {
    match address {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(_) => bail!("the crash runs need an IPv4 server address, not {address}"),
    }
}

/// One crash and its replacement as the supervisor logged them.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Timing {
    to_ready_ms: f64,
    startup_ms: f64,
}

/// From the first `worker_crashed` in `log` to the `worker_ready` that
/// followed it.
fn replacement_timing(log: &[String]) -> Option<Timing> {
    let events: Vec<LogEvent<'_>> = log.iter().filter_map(|line| LogEvent::parse(line)).collect();
    let crashed = events.iter().position(|e| e.name == "worker_crashed")?;
    let ready = events[crashed..].iter().find(|e| e.name == "worker_ready")?;
    Some(Timing { to_ready_ms: (ready.at - events[crashed].at) * 1000.0, startup_ms: ready.get("startup_ms")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_response() {
        let mut answer: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\nx: y\r\n\r\nHello, World!";
        assert_eq!(read_response(&mut answer), Some((200, b"Hello, World!".to_vec())));
        let mut unavailable: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(read_response(&mut unavailable), Some((503, Vec::new())));
        let mut cut: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello";
        assert_eq!(read_response(&mut cut), None);
    }

    #[test]
    fn times_a_replacement_from_the_supervisor_log() {
        let log = [
            "1970-01-01T00:00:10.000000Z ERROR x: worker 7 crashed event=\"worker_crashed\" pid=7 generation=1",
            "[worker 8 g1] 1970-01-01T00:00:10.010000Z  INFO x: loading event=\"other\"",
            "1970-01-01T00:00:10.030000Z  INFO x: worker 8 serving event=\"worker_ready\" pid=8 generation=1 startup_ms=25",
        ]
        .map(str::to_owned);
        let timing = replacement_timing(&log).unwrap();
        assert!((timing.to_ready_ms - 30.0).abs() < 1e-6 && timing.startup_ms == 25.0, "{timing:?}");
        assert_eq!(replacement_timing(&log[1..]), None);
    }
}
