//! Prometheus metrics (`--metrics-path`), in the OpenMetrics text format of
//! the `prometheus-client` crate.
//!
//! Counters and histograms are updated as things happen; the gauges (in
//! flight, connections, generation, draining) and the count of pinned
//! generations (kept by the unload threads) are read from the server's
//! state when scraped, so the request path pays for nothing it does not
//! need. With metrics off, nothing here runs.
//!
//! Request series are kept per live generation only: when a generation is
//! retired, its counts move to `generation="retired"` (so totals never go
//! backwards) and its series are removed, so a server that reloads for
//! months keeps a handful of series, not one set per reload.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::health::Snapshot;

/// `1xx` ... `5xx`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct StatusClass(u16);

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_fmt(encoder, format_args!("{}xx", self.0))
    }
}

/// The generation that answered (`0`: the host itself), or `retired` for
/// the counts of every retired generation together.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum GenerationLabel {
    Number(u64),
    Retired,
}

impl EncodeLabelValue for GenerationLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        match self {
            GenerationLabel::Number(n) => fmt::Write::write_fmt(encoder, format_args!("{n}")),
            GenerationLabel::Retired => fmt::Write::write_str(encoder, "retired"),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    class: StatusClass,
    generation: GenerationLabel,
}

/// Status classes a response can have (`StatusCode` is 100..=999); 0 for
/// safety.
const STATUS_CLASSES: std::ops::RangeInclusive<u16> = 0..=9;

/// The retired generations. Generations are published with consecutive
/// numbers from 1 and all but the current one retire, so this is "every
/// number below `below`" plus the few retired out of order.
#[derive(Debug)]
struct Retired {
    below: u64,
    above: BTreeSet<u64>,
}

impl Retired {
    fn new() -> Retired {
        Retired { below: 1, above: BTreeSet::new() }
    }

    fn contains(&self, generation: u64) -> bool {
        generation != 0 && (generation < self.below || self.above.contains(&generation))
    }

    fn insert(&mut self, generation: u64) {
        if generation < self.below {
            return;
        }
        self.above.insert(generation);
        while self.above.remove(&self.below) {
            self.below += 1;
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Outcome {
    ok,
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DrainLabels {
    timed_out: bool,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// Held for reading while a request is counted or the exposition is
    /// written, for writing while a generation's series are folded, so no
    /// request is counted into a removed series and no scrape sees a count
    /// twice.
    retired: RwLock<Retired>,
    request_duration: Histogram,
    reloads: Family<OutcomeLabels, Counter>,
    reload_duration: Histogram,
    drain_duration: Family<DrainLabels, Histogram>,
    in_flight: Gauge,
    connections: Gauge,
    upgraded: Gauge,
    generation: Gauge,
    draining: Gauge,
    /// Requests by status class 1xx..5xx, for process mode's service totals.
    by_class: [AtomicU64; 5],
    /// Process mode: the whole service's figures, shown beside this
    /// process's own.
    service: OnceLock<Registry>,
    pinned: Counter,
    stalled: Family<KindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pounce");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests answered, by status class and generation", requests.clone());
        // 100 µs .. ~52 s.
        let request_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response body",
            request_duration.clone(),
        );
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register("reloads", "Reloads, by outcome", reloads.clone());
        // 1 ms .. ~65 s.
        let reload_duration = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "reload_duration_seconds",
            "Time from reload start to the new generation published (or the failure)",
            reload_duration.clone(),
        );
        let drain_duration = Family::<DrainLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register(
            "drain_duration_seconds",
            "Time a replaced generation took to drain, by whether reload_timeout cut it",
            drain_duration.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let in_flight = gauge(&mut registry, "in_flight_requests", "Requests whose response has not ended");
        let connections = gauge(&mut registry, "open_connections", "Open client connections, upgraded ones included");
        let upgraded = gauge(&mut registry, "upgraded_connections", "Open upgraded connections (WebSockets...)");
        let generation = gauge(&mut registry, "current_generation", "Generation serving new requests");
        let draining = gauge(&mut registry, "draining_generations", "Replaced generations still draining");
        let pinned = Counter::default();
        registry.register(
            "pinned_generations",
            "App libraries left mapped because code of theirs could still run (threads, signal handlers, keys)",
            pinned.clone(),
        );
        let stalled = Family::<KindLabels, Counter>::default();
        registry.register(
            "stalled_app_calls",
            "Calls into app code that ran longer than --stall-warning on a server thread, by kind",
            stalled.clone(),
        );
        Metrics {
            registry,
            requests,
            retired: RwLock::new(Retired::new()),
            request_duration,
            reloads,
            reload_duration,
            drain_duration,
            in_flight,
            connections,
            upgraded,
            generation,
            draining,
            by_class: Default::default(),
            service: OnceLock::new(),
            pinned,
            stalled,
        }
    }

    /// Adds the whole service's figures (process mode) to the exposition.
    pub fn describe_service(&self, service: Box<dyn Collector>) {
        let mut registry = Registry::with_prefix("pounce");
        registry.register_collector(service);
        let _ = self.service.set(registry);
    }

    /// Requests answered so far, by status class 1xx..5xx.
    pub fn requests_by_class(&self) -> [u64; 5] {
        std::array::from_fn(|class| self.by_class[class].load(Ordering::Relaxed))
    }

    pub fn request(&self, status: u16, generation: u64, duration: Duration) {
        let retired = read(&self.retired);
        let generation =
            if retired.contains(generation) { GenerationLabel::Retired } else { GenerationLabel::Number(generation) };
        if let Some(count) = usize::from(status / 100).checked_sub(1).and_then(|class| self.by_class.get(class)) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let labels = RequestLabels { class: StatusClass(status / 100), generation };
        self.requests.get_or_create(&labels).inc();
        drop(retired);
        self.request_duration.observe(duration.as_secs_f64());
    }

    /// `generation` was retired: its request counts move to
    /// `generation="retired"` and its series go. Requests of it that end
    /// later are counted there too.
    pub fn retire(&self, generation: u64) {
        let mut retired = write(&self.retired);
        if generation == 0 || retired.contains(generation) {
            return;
        }
        retired.insert(generation);
        for class in STATUS_CLASSES.map(StatusClass) {
            let labels = RequestLabels { class, generation: GenerationLabel::Number(generation) };
            let Some(count) = self.requests.get(&labels).map(|counter| counter.get()) else { continue };
            let into = RequestLabels { class, generation: GenerationLabel::Retired };
            self.requests.get_or_create(&into).inc_by(count);
            self.requests.remove(&labels);
        }
    }

    pub fn reload(&self, ok: bool, duration: Duration) {
        let outcome = if ok { Outcome::ok } else { Outcome::failed };
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
        self.reload_duration.observe(duration.as_secs_f64());
    }

    /// An app call of `kind` (handler, stream, init, drain, shutdown) stalled.
    pub fn stalled(&self, kind: &'static str) {
        self.stalled.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn drained(&self, duration: Duration, timed_out: bool) {
        self.drain_duration.get_or_create(&DrainLabels { timed_out }).observe(duration.as_secs_f64());
    }

    /// The exposition, with the gauges read from `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let as_gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.in_flight.set(as_gauge(snapshot.in_flight as u64));
        self.connections.set(as_gauge(snapshot.connections as u64));
        self.upgraded.set(as_gauge(snapshot.upgraded as u64));
        self.generation.set(as_gauge(snapshot.generation));
        self.draining.set(as_gauge(snapshot.draining as u64));
        // A count kept elsewhere that only grows: mirrored, not incremented.
        self.pinned.inner().store(snapshot.pinned_generations, std::sync::atomic::Ordering::Relaxed);
        let mut text = String::new();
        let _consistent = read(&self.retired);
        if encode(&mut text, &self.registry, self.service.get()).is_err() {
            text.clear();
        }
        text
    }
}

/// One exposition of `own` and then `service`'s metrics.
fn encode(text: &mut String, own: &Registry, service: Option<&Registry>) -> std::fmt::Result {
    use prometheus_client::encoding::text::{encode_eof, encode_registry};
    encode_registry(text, own)?;
    if let Some(service) = service {
        encode_registry(text, service)?;
    }
    encode_eof(text)
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            shutting_down: false,
            generation: 1,
            uptime: Duration::ZERO,
            in_flight: 0,
            connections: 0,
            draining: 0,
            last_reload: None,
            service: None,
            pinned_generations: 0,
            upgraded: 0,
        }
    }

    /// The `pounce_requests_total` samples of an exposition, as `labels value`.
    fn request_lines(metrics: &Metrics) -> Vec<String> {
        let mut lines: Vec<String> = metrics
            .render(&snapshot())
            .lines()
            .filter_map(|line| line.strip_prefix("pounce_requests_total"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn retired_generations_fold_into_one_series_that_keeps_the_totals() {
        let metrics = Metrics::new();
        let ms = Duration::from_millis(1);
        for (status, generation) in [(200, 1), (200, 1), (404, 1), (200, 2), (503, 0), (200, 3)] {
            metrics.request(status, generation, ms);
        }
        metrics.retire(1);
        metrics.retire(2);
        metrics.retire(2);
        metrics.retire(0);
        // A request of a retired generation that ends late.
        metrics.request(500, 1, ms);
        assert_eq!(
            request_lines(&metrics),
            [
                r#"{class="2xx",generation="3"} 1"#,
                r#"{class="2xx",generation="retired"} 3"#,
                r#"{class="4xx",generation="retired"} 1"#,
                r#"{class="5xx",generation="0"} 1"#,
                r#"{class="5xx",generation="retired"} 1"#,
            ]
        );
    }

    #[test]
    fn generations_retired_out_of_order_are_remembered_compactly() {
        let mut retired = Retired::new();
        for generation in [2, 4, 1] {
            retired.insert(generation);
        }
        assert!(retired.contains(1) && retired.contains(2) && retired.contains(4));
        assert!(!retired.contains(0) && !retired.contains(3) && !retired.contains(5));
        assert_eq!((retired.below, retired.above.len()), (3, 1));
        retired.insert(3);
        assert_eq!((retired.below, retired.above.len()), (5, 0));
    }
}
