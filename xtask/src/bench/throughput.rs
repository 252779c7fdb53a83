//! What the closed-loop load generators (`wrk` for HTTP/1.1, `h2load` for
//! HTTP/2) have in common: a run's throughput, failures and latency, and
//! the server's CPU use during it, measured the same way for both.

use std::fmt::Debug;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use super::procs::{CpuUse, CpuWatch, Proc};
use super::report::ratio;

/// One run of a closed-loop load generator.
pub trait LoadResult: Clone + Debug {
    /// The names of the two latency figures [`LoadResult::latency_us`]
    /// gives, for table headers.
    const LATENCY: [&'static str; 2];

    fn requests_per_sec(&self) -> f64;
    /// Requests that failed, however the tool counts them.
    fn failures(&self) -> u64;
    /// The two latency figures named by [`LoadResult::LATENCY`], in µs.
    fn latency_us(&self) -> [f64; 2];
    fn cpu(&self) -> CpuUse;
    fn set_cpu(&mut self, cpu: CpuUse);

    /// Server CPU time per request in µs (NaN without requests).
    fn cpu_us_per_request(&self) -> f64 {
        ratio(self.cpu().server * 1e6, self.requests_per_sec())
    }
}

/// Runs `run` with the CPU of the server (`server_pid` and its children)
/// counted into its result, and prints a line about it.
pub fn watched<R: LoadResult>(server_pid: i32, run: impl FnOnce() -> Result<R>) -> Result<R> {
    let watch = CpuWatch::start(server_pid)?;
    let mut result = run()?;
    result.set_cpu(watch.finish()?);
    let [first, second] = R::LATENCY;
    let [first_us, second_us] = result.latency_us();
    eprintln!(
        "    {:.0} req/s, {first} {first_us:.0} µs, {second} {second_us:.0} µs, failures {}, server CPU {:.2} ({:.2} µs per request), other CPU {:.2}",
        result.requests_per_sec(),
        result.failures(),
        result.cpu().server,
        result.cpu_us_per_request(),
        result.cpu().foreign
    );
    Ok(result)
}

/// Waits (bounded) for the load generator `name`, started for `seconds`,
/// and reads its report from its standard output with `parse`.
pub fn finish<R>(mut proc: Proc, name: &str, seconds: u64, parse: fn(&str) -> Result<R>) -> Result<R> {
    let status = proc.wait(Duration::from_secs(seconds.max(1) + 30))?;
    let out = proc.stdout.text();
    if !status.success() {
        bail!("{name} failed ({status}):\n{out}\n{}", proc.stderr.text());
    }
    parse(&out).with_context(|| format!("cannot read {name}'s report:\n{out}"))
}
