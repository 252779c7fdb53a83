//! The whole service's metrics in process mode. Each worker counts its own
//! requests and reports them (cumulative) in every beat; the supervisor
//! adds them up, with the last counts of workers that are gone folded into
//! a base, and writes the totals to a page of shared counters that every
//! worker maps. Whichever worker answers a scrape reads the same page, and
//! its totals only grow: they never go back between two scrapes, even when
//! workers crash or retire.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::ffi::process::SharedCounters;

/// Requests by status class, 1xx to 5xx.
pub const CLASSES: usize = 5;

/// Where each figure lives in the page.
const REQUESTS: usize = 0;
const RESTARTS: usize = REQUESTS + CLASSES;
const ROLLBACKS: usize = RESTARTS + 1;
const WORKERS: usize = ROLLBACKS + 1;
const GENERATION: usize = WORKERS + 1;
/// How many counters the page holds.
pub const LEN: usize = GENERATION + 1;

/// The supervisor's side: adds the workers' counts up and publishes them.
pub struct Totals {
    page: Arc<SharedCounters>,
    /// The last counts each live worker reported.
    live: HashMap<u32, [u64; CLASSES]>,
    /// What workers that are gone had counted.
    base: [u64; CLASSES],
}

impl Totals {
    pub fn new(page: Arc<SharedCounters>) -> Totals {
        Totals { page, live: HashMap::new(), base: [0; CLASSES] }
    }

    /// Worker `pid` has counted `requests` so far.
    pub fn reported(&mut self, pid: u32, requests: [u64; CLASSES]) {
        self.live.insert(pid, requests);
        self.publish_requests();
    }

    /// Worker `pid` is gone: its last counts stay in the totals.
    pub fn gone(&mut self, pid: u32) {
        if let Some(counts) = self.live.remove(&pid) {
            for (base, count) in self.base.iter_mut().zip(counts) {
                *base += count;
            }
        }
    }

    /// The service's own figures.
    pub fn service(&self, restarts: u64, rollbacks: u64, workers: usize, generation: u64) {
        let counters = self.page.counters();
        counters[RESTARTS].store(restarts, Ordering::Relaxed);
        counters[ROLLBACKS].store(rollbacks, Ordering::Relaxed);
        counters[WORKERS].store(workers as u64, Ordering::Relaxed);
        counters[GENERATION].store(generation, Ordering::Relaxed);
    }

    /// The page's descriptor, to pass to every worker.
    pub fn raw_fd(&self) -> i32 {
        self.page.raw_fd()
    }

    fn publish_requests(&self) {
        let counters = self.page.counters();
        for class in 0..CLASSES {
            let total = self.base[class] + self.live.values().map(|counts| counts[class]).sum::<u64>();
            // A worker's counts only grow and a gone worker's stay in the
            // base, so the total never shrinks; fetch_max keeps it so even
            // if a report were to arrive out of order.
            counters[REQUESTS + class].fetch_max(total, Ordering::Relaxed);
        }
    }
}

/// A worker's side: the page, encoded as `pounce_service_*` metrics.
#[derive(Debug)]
pub struct ServiceMetrics {
    page: Arc<SharedCounters>,
}

impl ServiceMetrics {
    pub fn new(page: Arc<SharedCounters>) -> ServiceMetrics {
        ServiceMetrics { page }
    }
}

impl Collector for ServiceMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.page.counters();
        let value = |index: usize| counters[index].load(Ordering::Relaxed);
        let requests = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "service_requests",
            "Requests answered by every worker of the service, by status class",
            None,
            requests.metric_type(),
        )?;
        for class in 0..CLASSES {
            let labels = [("class", format!("{}xx", class + 1))];
            ConstCounter::new(value(REQUESTS + class)).encode(family.encode_family(&labels)?)?;
        }
        let counter = |encoder: &mut DescriptorEncoder, name: &str, help: &str, n: u64| {
            let counter = ConstCounter::new(n);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
        };
        counter(
            &mut encoder,
            "service_worker_restarts",
            "Workers started to replace one that ended unasked",
            value(RESTARTS),
        )?;
        counter(&mut encoder, "service_rollbacks", "Automatic rollbacks to a previous generation", value(ROLLBACKS))?;
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, n: u64| {
            let gauge = ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        gauge(&mut encoder, "service_workers", "Worker processes serving the current generation", value(WORKERS))?;
        gauge(&mut encoder, "service_generation", "Generation serving new connections", value(GENERATION))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_keep_what_gone_workers_counted_and_never_shrink() {
        let page = Arc::new(SharedCounters::create("pounce-test-totals", LEN).unwrap());
        let mut totals = Totals::new(page.clone());
        totals.reported(1, [0, 10, 0, 0, 1]);
        totals.reported(2, [0, 5, 0, 0, 0]);
        assert_eq!(page.counters()[REQUESTS + 1].load(Ordering::Relaxed), 15);
        totals.gone(1);
        totals.reported(3, [0, 0, 0, 0, 0]);
        assert_eq!(page.counters()[REQUESTS + 1].load(Ordering::Relaxed), 15, "the gone worker's 10 stay");
        totals.reported(2, [0, 7, 0, 0, 0]);
        assert_eq!(page.counters()[REQUESTS + 1].load(Ordering::Relaxed), 17);
        assert_eq!(page.counters()[REQUESTS + 4].load(Ordering::Relaxed), 1);
    }
}
