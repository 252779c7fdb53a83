//! Rolling reloads: load the library again as generation N+1, publish it,
//! and hand the old generation to [`drain`](crate::drain).
//!
//! Reloads are serialized by one task. A reload request is a permit on a
//! [`Notify`]: requests that arrive while a reload runs collapse into one
//! stored permit, so they cause exactly one more reload after it, never a
//! parallel one and never a lost one.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use crate::drain;
use crate::loader::{LoadError, Loader};
use crate::server::{ReloadReport, Server};

/// Starts the reload task: each `notify_one` on `requests` asks for a reload.
pub fn spawn(server: Arc<Server>, loader: Arc<Loader>, requests: Arc<Notify>) {
    tokio::spawn(async move {
        let mut next = server.current.number() + 1;
        loop {
            requests.notified().await;
            if server.is_shutting_down() {
                return;
            }
            if reload(&server, &loader, next).await {
                next += 1;
            }
        }
    });
}

/// One reload. Returns whether generation `number` was published.
async fn reload(server: &Arc<Server>, loader: &Arc<Loader>, number: u64) -> bool {
    let started = Instant::now();
    let serving = server.current.number();
    tracing::info!(generation = number, serving, "reload started: loading {}", loader.source().display());
    let loading = loader.clone();
    let loaded = tokio::task::spawn_blocking(move || loading.load(number)).await;
    let loaded = match loaded {
        Ok(result) => result,
        Err(_) => Err(LoadError::Crashed { path: loader.source().to_owned() }),
    };
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            let ms = millis(started);
            tracing::error!(
                generation = number,
                serving,
                load_ms = ms,
                "reload failed: {e}; generation {serving} keeps serving"
            );
            server.record_reload(report("failed", serving, Some(e.to_string()), ms));
            return false;
        }
    };
    if server.is_shutting_down() {
        tracing::info!(generation = number, "shutdown began during the reload; generation {number} is not published");
        return false;
    }
    let init_ms = loaded.generation.info().init_duration.as_secs_f64() * 1000.0;
    let publish_started = Instant::now();
    let old = server.current.publish(Arc::new(loaded.generation));
    let publish_us = publish_started.elapsed().as_secs_f64() * 1e6;
    let ms = millis(started);
    tracing::info!(
        generation = number,
        previous = old.number(),
        load_ms = loaded.duration.as_secs_f64() * 1000.0,
        init_ms,
        publish_us,
        reload_ms = ms,
        "generation {number} published; generation {} drains",
        old.number()
    );
    server.record_reload(report("ok", number, None, ms));
    tokio::spawn(drain::retire(server.clone(), old));
    true
}

fn millis(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn report(outcome: &'static str, generation: u64, error: Option<String>, duration_ms: f64) -> ReloadReport {
    ReloadReport { outcome, generation, error, duration_ms, seconds_ago: 0.0, at: Some(Instant::now()) }
}
