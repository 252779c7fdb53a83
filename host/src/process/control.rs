//! The control channel between the supervisor and one worker: a
//! `socketpair(AF_UNIX, SOCK_STREAM)` carrying one JSON object per line.
//! Its end of file tells either side that the other one is gone, whatever
//! killed it.
//!
//! The worker finds its end at descriptor [`CONTROL_FD`], the generation's
//! library bytes at [`LIBRARY_FD`], the service's totals at [`TOTALS_FD`],
//! and the listening sockets from [`FIRST_LISTENER_FD`] on (their roles in
//! its `--listeners` argument).

use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Where a worker finds its end of the control channel.
pub const CONTROL_FD: i32 = 3;
/// Where a worker finds its generation's library (an in-memory file).
pub const LIBRARY_FD: i32 = 4;
/// Where a worker finds the service's totals (shared counters).
pub const TOTALS_FD: i32 = 5;
/// Where a worker finds the first listening socket; the others follow.
pub const FIRST_LISTENER_FD: i32 = 6;

/// What a worker tells the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum FromWorker {
    /// The generation is loaded and the worker accepts connections.
    Ready { app: String, app_version: String, load_ms: f64, init_ms: f64 },
    /// The library could not be loaded; the worker exits.
    LoadFailed { reason: String },
    /// The worker's event loop runs (sent every [`BEAT`]), with its figures:
    /// `connections` counts the `upgraded` ones (WebSockets...) too;
    /// `requests` by status class 1xx..5xx, counted since it started (with
    /// `--metrics-path` on; zeros otherwise).
    Beat { in_flight: usize, connections: usize, upgraded: usize, requests: [u64; 5] },
}

/// What the supervisor tells a worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ToWorker {
    /// A newer generation serves: stop accepting, finish what is in
    /// flight within `reload_timeout`, exit.
    Retire,
    /// The whole service's state, for the health endpoint.
    Service(serde_json::Value),
}

/// How often a worker beats.
pub const BEAT: std::time::Duration = std::time::Duration::from_millis(250);

/// The two ends of a new channel: the supervisor's, and the worker's (to
/// be passed at [`CONTROL_FD`]).
pub fn pair() -> io::Result<(StdUnixStream, StdUnixStream)> {
    StdUnixStream::pair()
}

/// Reads messages of type `T`, one per line.
pub struct Receiver<T> {
    lines: Lines<BufReader<OwnedReadHalf>>,
    _marker: std::marker::PhantomData<T>,
}

/// Writes messages of type `T`, one per line.
pub struct Sender<T> {
    half: OwnedWriteHalf,
    _marker: std::marker::PhantomData<T>,
}

/// Splits one end (a std stream, made non-blocking here) into its halves;
/// call from within a tokio runtime.
pub fn open<In, Out>(stream: StdUnixStream) -> io::Result<(Receiver<In>, Sender<Out>)> {
    stream.set_nonblocking(true)?;
    let (read, write) = UnixStream::from_std(stream)?.into_split();
    let receiver = Receiver { lines: BufReader::new(read).lines(), _marker: std::marker::PhantomData };
    Ok((receiver, Sender { half: write, _marker: std::marker::PhantomData }))
}

impl<T: for<'de> Deserialize<'de>> Receiver<T> {
    /// The next message; `None` once the other side is gone. A line that is
    /// not a message is skipped (logged): both sides are the same binary, so
    /// it would be a bug, not an attack.
    pub async fn next(&mut self) -> Option<T> {
        loop {
            let line = self.lines.next_line().await.ok()??;
            match serde_json::from_str(&line) {
                Ok(message) => return Some(message),
                Err(e) => tracing::error!("control channel: unreadable message {line:?}: {e}"),
            }
        }
    }
}

impl<T: Serialize> Sender<T> {
    /// Sends `message`; an error means the other side is gone.
    pub async fn send(&mut self, message: &T) -> io::Result<()> {
        let mut line = serde_json::to_string(message).map_err(io::Error::other)?;
        line.push('\n');
        self.half.write_all(line.as_bytes()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_cross_in_order_and_end_of_file_ends_the_stream() {
        let (a, b) = pair().unwrap();
        let (mut from_worker, mut to_worker) = open::<FromWorker, ToWorker>(a).unwrap();
        let (mut at_worker, mut worker_out) = open::<ToWorker, FromWorker>(b).unwrap();
        let ready = FromWorker::Ready { app: "a".into(), app_version: "1".into(), load_ms: 1.5, init_ms: 0.5 };
        worker_out.send(&ready).await.unwrap();
        let beat = FromWorker::Beat { in_flight: 2, connections: 3, upgraded: 1, requests: [0, 9, 0, 1, 0] };
        worker_out.send(&beat).await.unwrap();
        to_worker.send(&ToWorker::Retire).await.unwrap();
        assert_eq!(from_worker.next().await, Some(ready));
        assert_eq!(from_worker.next().await, Some(beat));
        assert_eq!(at_worker.next().await, Some(ToWorker::Retire));
        drop((worker_out, at_worker));
        assert_eq!(from_worker.next().await, None);
    }
}
