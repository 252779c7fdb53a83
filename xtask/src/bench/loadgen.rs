//! A fixed-rate HTTP/1.1 load generator with coordinated-omission
//! correction: request *i* is due at `start + i / rate`, and its latency is
//! measured from that intended time, not from when it was actually sent. A
//! server that stalls therefore shows its stall in the latency of every
//! request that should have been sent meanwhile, which a closed-loop tool
//! such as wrk hides.
//!
//! One thread (pinned to the load CPU) runs a single-threaded tokio runtime:
//! a pacing task hands due requests to `connections` keep-alive connections,
//! each with at most one request in flight. When all are busy, due requests
//! queue, and the queueing counts in their latency. Pacing spins with
//! `yield_now` rather than sleeping, because tokio's timer has a 1 ms
//! resolution, far coarser than the gap between requests; the load core is
//! busy for the run either way. Everything is bounded: the schedule has
//! `rate * duration` requests, and the run ends at most `GRACE` after the
//! schedule does; requests still unanswered then are counted, not awaited.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::procs::{interrupted, pin_current_thread, CpuUse};

/// How long after the end of the schedule the run may take to finish.
const GRACE: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound on the schedule, whatever the rate and duration.
const MAX_REQUESTS: u64 = 20_000_000;

/// What to generate.
#[derive(Clone, Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    pub path: String,
    /// Requests per second.
    pub rate: f64,
    pub duration: Duration,
    pub connections: usize,
    pub cpu: Option<usize>,
}

/// A run's figures. Latencies are in microseconds, from the intended send
/// time to the end of the response body.
#[derive(Clone, Debug, Default)]
pub struct LatencyResult {
    pub rate: f64,
    pub scheduled: u64,
    /// 2xx answers.
    pub ok: u64,
    pub non_2xx: u64,
    /// Connection or protocol errors.
    pub errors: u64,
    /// Scheduled requests never sent (the run hit its time bound).
    pub not_sent: u64,
    /// Requests sent but unanswered when the run hit its time bound.
    pub unfinished: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// How late requests were sent (intended time to the worker starting
    /// the request), p99 and max in microseconds: when this is large, the
    /// generator itself could not keep up and the figures above are not the
    /// server's.
    pub send_lag_p99_us: f64,
    pub send_lag_max_us: f64,
    /// Latency from the actual send (what a closed-loop tool would report).
    pub uncorrected_p99_us: f64,
    /// CPU use during the run (filled in by the caller).
    pub cpu: CpuUse,
}

impl LatencyResult {
    pub fn failures(&self) -> u64 {
        self.non_2xx + self.errors + self.not_sent + self.unfinished
    }

    /// The run measured the machine rather than the server: other work
    /// used the CPUs, or the generator itself fell behind its schedule.
    pub fn disturbed(&self) -> bool {
        self.cpu.disturbed() || self.send_lag_p99_us > MAX_SEND_LAG_P99_US
    }
}

/// A generator that sent later than this (p99) could not keep its schedule.
pub const MAX_SEND_LAG_P99_US: f64 = 1000.0;

/// A generator running on its own thread.
pub struct Running {
    thread: JoinHandle<Result<LatencyResult>>,
}

impl Running {
    /// Waits for the run; it ends by itself within `duration + GRACE`.
    pub fn join(self) -> Result<LatencyResult> {
        self.thread.join().map_err(|_| anyhow!("the load generator thread panicked"))?
    }
}

/// Starts a run on a new thread.
pub fn start(plan: Plan) -> Result<Running> {
    if !(plan.rate > 0.0 && plan.rate.is_finite()) || plan.connections == 0 {
        bail!("invalid load plan: {plan:?}");
    }
    let thread = std::thread::Builder::new()
        .name("bench-loadgen".to_owned())
        .spawn(move || {
            if let Some(cpu) = plan.cpu {
                pin_current_thread(cpu)?;
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the load generator's runtime")?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, generate(plan))
        })
        .context("cannot start the load generator thread")?;
    Ok(Running { thread })
}

/// Runs to the end on the calling thread's behalf.
pub fn run(plan: Plan) -> Result<LatencyResult> {
    start(plan)?.join()
}

#[derive(Default)]
struct Shared {
    idle: RefCell<Vec<usize>>,
    latencies_ns: RefCell<Vec<u64>>,
    lags_ns: RefCell<Vec<u64>>,
    service_ns: RefCell<Vec<u64>>,
    ok: Cell<u64>,
    non_2xx: Cell<u64>,
    errors: Cell<u64>,
}

async fn generate(plan: Plan) -> Result<LatencyResult> {
    let host = HeaderValue::from_str(&plan.addr.to_string())?;
    let scheduled = ((plan.rate * plan.duration.as_secs_f64()).round() as u64).clamp(1, MAX_REQUESTS);
    let shared = Rc::new(Shared::default());
    for samples in [&shared.latencies_ns, &shared.lags_ns, &shared.service_ns] {
        samples.borrow_mut().reserve(usize::try_from(scheduled).unwrap_or(0));
    }
    // Connect first, so connection set-up is not part of any latency.
    let mut senders = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        senders.push(connect(plan.addr).await.with_context(|| format!("cannot connect to {}", plan.addr))?);
    }
    let mut queues = Vec::with_capacity(plan.connections);
    let mut workers = Vec::with_capacity(plan.connections);
    for (id, sender) in senders.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel::<Instant>(1);
        queues.push(tx);
        shared.idle.borrow_mut().push(id);
        let worker =
            Worker { id, addr: plan.addr, path: plan.path.clone(), host: host.clone(), shared: shared.clone() };
        workers.push(tokio::task::spawn_local(worker.run(Some(sender), rx)));
    }

    let interval_ns = 1e9 / plan.rate;
    let start = Instant::now() + Duration::from_millis(10);
    let hard_stop = start + plan.duration + GRACE;
    let due = |i: u64| start + Duration::from_nanos((i as f64 * interval_ns) as u64);
    let mut next = 0u64;
    let mut sent = 0u64;
    let mut backlog: VecDeque<Instant> = VecDeque::new();
    loop {
        let now = Instant::now();
        if now >= hard_stop || interrupted() {
            break;
        }
        while next < scheduled && due(next) <= now {
            backlog.push_back(due(next));
            next += 1;
        }
        while let Some(&intended) = backlog.front() {
            let Some(id) = shared.idle.borrow_mut().pop() else { break };
            if queues[id].try_send(intended).is_ok() {
                backlog.pop_front();
                sent += 1;
            }
        }
        if next == scheduled && backlog.is_empty() && shared.idle.borrow().len() == plan.connections {
            break;
        }
        tokio::task::yield_now().await;
    }
    drop(queues);
    let unfinished = (plan.connections - shared.idle.borrow().len()) as u64;
    for worker in workers {
        worker.abort();
    }
    if interrupted() {
        bail!("interrupted");
    }

    let sorted = |samples: &RefCell<Vec<u64>>| {
        let mut values = std::mem::take(&mut *samples.borrow_mut());
        values.sort_unstable();
        values
    };
    let latencies = sorted(&shared.latencies_ns);
    let lags = sorted(&shared.lags_ns);
    let service = sorted(&shared.service_ns);
    let at = |q: f64| percentile(&latencies, q) / 1e3;
    Ok(LatencyResult {
        rate: plan.rate,
        scheduled,
        ok: shared.ok.get(),
        non_2xx: shared.non_2xx.get(),
        errors: shared.errors.get(),
        not_sent: scheduled - sent,
        unfinished,
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: percentile(&latencies, 1.0) / 1e3,
        send_lag_p99_us: percentile(&lags, 0.99) / 1e3,
        send_lag_max_us: percentile(&lags, 1.0) / 1e3,
        uncorrected_p99_us: percentile(&service, 0.99) / 1e3,
        cpu: CpuUse::default(),
    })
}

/// The `q` quantile (nearest rank) of sorted values; 0 when empty.
pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>> {
    let stream =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await.context("connect timed out")??;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

struct Worker {
    id: usize,
    addr: SocketAddr,
    path: String,
    host: HeaderValue,
    shared: Rc<Shared>,
}

impl Worker {
    async fn run(self, mut sender: Option<SendRequest<Empty<Bytes>>>, mut due: mpsc::Receiver<Instant>) {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        while let Some(intended) = due.recv().await {
            let sent = Instant::now();
            match self.request(&mut sender).await {
                Ok(status) => {
                    let done = Instant::now();
                    self.shared.latencies_ns.borrow_mut().push(ns(done - intended));
                    self.shared.lags_ns.borrow_mut().push(ns(sent.saturating_duration_since(intended)));
                    self.shared.service_ns.borrow_mut().push(ns(done - sent));
                    let counter = if status.is_success() { &self.shared.ok } else { &self.shared.non_2xx };
                    counter.set(counter.get() + 1);
                }
                Err(_) => {
                    // The connection is unusable: the next request reconnects.
                    sender = None;
                    self.shared.errors.set(self.shared.errors.get() + 1);
                }
            }
            self.shared.idle.borrow_mut().push(self.id);
        }
    }

    async fn request(&self, sender: &mut Option<SendRequest<Empty<Bytes>>>) -> Result<StatusCode> {
        if sender.as_ref().is_none_or(SendRequest::is_closed) {
            *sender = Some(connect(self.addr).await?);
        }
        let Some(open) = sender.as_mut() else { unreachable!("connected above") };
        open.ready().await?;
        let request = Request::get(self.path.as_str()).header(HOST, self.host.clone()).body(Empty::new())?;
        let response = open.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&values, 0.5), 500.0);
        assert_eq!(percentile(&values, 0.99), 990.0);
        assert_eq!(percentile(&values, 0.999), 999.0);
        assert_eq!(percentile(&values, 1.0), 1000.0);
        assert_eq!(percentile(&[7], 0.999), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn rejects_a_plan_without_rate() {
        let plan = Plan {
            addr: "127.0.0.1:1".parse().unwrap(),
            path: "/".into(),
            rate: 0.0,
            duration: Duration::from_secs(1),
            connections: 1,
            cpu: None,
        };
        assert!(start(plan).is_err());
    }
}
