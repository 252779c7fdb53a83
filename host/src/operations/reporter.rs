//! The [`Reporter`]: where every lifecycle [`Event`] goes. It logs the
//! event, tells systemd, counts it in the metrics (a retired generation's
//! request series fold into `generation="retired"`) and keeps the last
//! reload's outcome for the health endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::events::{ms, Event};
use super::health::ReloadReport;
use super::metrics::Metrics;
use super::sd_notify::SdNotify;

pub struct Reporter {
    started: Instant,
    last_reload: Mutex<Option<ReloadReport>>,
    systemd: Option<SdNotify>,
    metrics: Option<Metrics>,
    /// Process mode: the whole service's state as the supervisor last sent
    /// it, so any worker's health answer describes the service.
    service: Mutex<Option<serde_json::Value>>,
    /// A binary upgrade handed the service over: systemd hears from the
    /// new process only.
    handed_over: AtomicBool,
}

impl Reporter {
    /// `metrics`: whether `--metrics-path` is on. systemd is told when
    /// `NOTIFY_SOCKET` is set.
    pub fn new(metrics: bool) -> Reporter {
        Reporter {
            started: Instant::now(),
            last_reload: Mutex::new(None),
            systemd: SdNotify::from_env(),
            metrics: metrics.then(Metrics::new),
            service: Mutex::new(None),
            handed_over: AtomicBool::new(false),
        }
    }

    /// The metrics, when `--metrics-path` is on.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }

    pub fn count(&self, update: impl FnOnce(&Metrics)) {
        if let Some(metrics) = &self.metrics {
            update(metrics);
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn set_service(&self, state: serde_json::Value) {
        *lock(&self.service) = Some(state);
    }

    pub fn service(&self) -> Option<serde_json::Value> {
        lock(&self.service).clone()
    }

    /// The last reload's outcome, aged to now.
    pub fn last_reload(&self) -> Option<ReloadReport> {
        lock(&self.last_reload).clone().map(|mut report| {
            report.seconds_ago = report.at.map_or(0.0, |at| at.elapsed().as_secs_f64());
            report
        })
    }

    /// Logs `event`, tells systemd, counts it, and keeps the last reload's
    /// outcome for the health endpoint.
    pub fn emit(&self, event: Event<'_>) {
        match event {
            Event::GenerationLoaded { generation, total, .. } => {
                *lock(&self.last_reload) = Some(report("ok", generation, None, total));
                self.count(|m| m.reload(true, total));
            }
            Event::ReloadFailed { serving, reason, total, .. } => {
                *lock(&self.last_reload) = Some(report("failed", serving, Some(reason.to_owned()), total));
                self.count(|m| m.reload(false, total));
            }
            Event::AppCallStalled { kind, .. } => self.count(|m| m.stalled(kind)),
            Event::GenerationRetired { generation, drain, timed_out } => self.count(|m| {
                m.drained(drain, timed_out);
                m.retire(generation);
            }),
            _ => {}
        }
        // Logged after it is counted and recorded: whoever reads the line
        // then finds it in the metrics and the health endpoint too.
        event.log();
        self.tell_systemd(&event);
    }

    fn tell_systemd(&self, event: &Event<'_>) {
        let Some(systemd) = &self.systemd else { return };
        if self.handed_over.load(Ordering::Relaxed) {
            return;
        }
        match *event {
            // After an upgrade the old process tells systemd (MAINPID=).
            Event::Ready { upgraded_from: Some(_), .. } => {}
            Event::Ready { listeners, generation, .. } => {
                systemd.ready(&format!("serving generation {generation} on {listeners}"))
            }
            Event::UpgradeComplete { pid, .. } => {
                systemd.main_pid(pid, &format!("binary upgraded: pid {pid} serves"));
                self.handed_over.store(true, Ordering::Relaxed);
            }
            Event::ReloadStarted { generation, .. } => {
                systemd.reloading(&format!("reloading into generation {generation}"))
            }
            Event::GenerationLoaded { generation, total, in_flight, .. } => systemd.ready(&format!(
                "serving generation {generation}; last reload ok in {:.1} ms; {in_flight} requests in flight",
                ms(total)
            )),
            Event::ReloadFailed { serving, reason, .. } => {
                systemd.ready(&format!("reload failed, still serving generation {serving}: {reason}"))
            }
            Event::ShutdownStarted { signal, connections, .. } => {
                systemd.stopping(&format!("shutting down ({signal}); {connections} connections open"))
            }
            _ => {}
        }
    }
}

fn report(outcome: &'static str, generation: u64, error: Option<String>, duration: Duration) -> ReloadReport {
    ReloadReport { outcome, generation, error, duration_ms: ms(duration), seconds_ago: 0.0, at: Some(Instant::now()) }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
