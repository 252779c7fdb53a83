//! What the health endpoint reports, and its JSON form. The endpoint itself
//! (methods, status code) is part of the request path (`http::host`).

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

/// The outcome of the last reload, as the health endpoint reports it.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadReport {
    pub outcome: &'static str,
    pub generation: u64,
    pub error: Option<String>,
    pub duration_ms: f64,
    pub seconds_ago: f64,
    #[serde(skip)]
    pub at: Option<Instant>,
}

/// The server's state at one moment, for the health endpoint and the
/// metrics' gauges.
pub struct Snapshot {
    pub shutting_down: bool,
    pub generation: u64,
    pub uptime: Duration,
    pub in_flight: usize,
    /// Open connections, upgraded ones included.
    pub connections: usize,
    /// Open upgraded connections (WebSockets...).
    pub upgraded: usize,
    pub draining: usize,
    /// App libraries left mapped on purpose so far (a counter).
    pub pinned_generations: u64,
    pub last_reload: Option<ReloadReport>,
    /// Process mode: the service as the supervisor sees it (its generation,
    /// workers, restarts, rollbacks, last reload); this process's own
    /// figures stay in the other fields.
    pub service: Option<serde_json::Value>,
}

impl Snapshot {
    /// `"ok"` while serving; `"draining"` once shutdown has begun, so load
    /// balancers stop routing here.
    pub fn status(&self) -> &'static str {
        if self.shutting_down {
            "draining"
        } else {
            "ok"
        }
    }

    /// The service's generation (process mode: the supervisor's).
    fn service_generation(&self) -> serde_json::Value {
        match &self.service {
            Some(service) => service["generation"].clone(),
            None => json!(self.generation),
        }
    }

    /// What the app's port answers when an admin listener has the rest:
    /// status and generation only (no paths, no error texts).
    pub fn to_brief_json(&self) -> String {
        let body = json!({ "status": self.status(), "generation": self.service_generation() });
        format!("{body}\n")
    }

    /// The health endpoint's body: one JSON object and a newline.
    pub fn to_json(&self) -> String {
        let mut body = json!({
            "status": self.status(),
            "generation": self.generation,
            "pid": std::process::id(),
            "uptime_seconds": self.uptime.as_secs_f64(),
            "in_flight": self.in_flight,
            "connections": self.connections,
            "upgraded_connections": self.upgraded,
            "draining_generations": self.draining,
            "last_reload": self.last_reload,
        });
        if let Some(service) = &self.service {
            body["mode"] = json!("process");
            body["generation"] = service["generation"].clone();
            body["last_reload"] = service["last_reload"].clone();
            body["draining_generations"] = service["draining_generations"].clone();
            body["service"] = service.clone();
        }
        format!("{body}\n")
    }
}
