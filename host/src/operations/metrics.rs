//! Prometheus metrics (`--metrics-path`), in the OpenMetrics text format of
//! the `prometheus-client` crate.
//!
//! Counters and histograms are updated as things happen; the gauges (in
//! flight, connections, generation, draining) are read from the server's
//! state when scraped, so the request path pays for nothing it does not
//! need. With metrics off, nothing here runs.

use std::fmt;
use std::time::Duration;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    class: StatusClass,
    generation: u64,
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
struct DrainLabels {
    timed_out: bool,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Histogram,
    reloads: Family<OutcomeLabels, Counter>,
    reload_duration: Histogram,
    drain_duration: Family<DrainLabels, Histogram>,
    in_flight: Gauge,
    connections: Gauge,
    upgraded: Gauge,
    generation: Gauge,
    draining: Gauge,
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
        Metrics {
            registry,
            requests,
            request_duration,
            reloads,
            reload_duration,
            drain_duration,
            in_flight,
            connections,
            upgraded,
            generation,
            draining,
        }
    }

    pub fn request(&self, status: u16, generation: u64, duration: Duration) {
        let labels = RequestLabels { class: StatusClass(status / 100), generation };
        self.requests.get_or_create(&labels).inc();
        self.request_duration.observe(duration.as_secs_f64());
    }

    pub fn reload(&self, ok: bool, duration: Duration) {
        let outcome = if ok { Outcome::ok } else { Outcome::failed };
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
        self.reload_duration.observe(duration.as_secs_f64());
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
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
