//! Rolling reloads: read the TLS certificate and key again (if any), load
//! the library again as generation N+1, publish both, and hand the old
//! generation to [`drain`](super::drain).
//!
//! Reloads are serialized by one task. A reload request is a permit on a
//! [`Notify`]: requests that arrive while a reload runs collapse into one
//! stored permit, so they cause exactly one more reload after it, never a
//! parallel one and never a lost one.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Notify;

use super::drain;
use super::preflight::{self, Bytes, Passed, Target};
use crate::config::Config;
use crate::front::Server;
use crate::generations::copies::ContentHash;
use crate::generations::loader::{Check, LoadError, Loader, Prepared};
use crate::operations::Event;

/// Starts the reload task: each `notify_one` on `requests` asks for a reload.
/// `serving` is the hash of the bytes the server started with: they count
/// as passed the preflight, as their constructors and `init` ran in the
/// serving process itself (a storm of reloads of an unchanged file then
/// runs no preflight at all). First, the loader makes its spare copy.
pub fn spawn(server: Arc<Server>, loader: Arc<Loader>, requests: Arc<Notify>, serving: Option<ContentHash>) {
    tokio::spawn(async move {
        let mut next = server.current.number() + 1;
        let passed = Arc::new(Passed::default());
        if let Some(hash) = serving {
            passed.insert(hash);
        }
        // Reload requests that arrive meanwhile wait (as one) for the spare.
        loader.stock_spare_copy().await;
        let config = Arc::new(server.config.clone());
        loop {
            requests.notified().await;
            if server.is_shutting_down() || server.connections.is_retiring() {
                return;
            }
            let check = preflight(config.clone(), passed.clone(), next);
            if reload(&server, &loader, check, next).await {
                next += 1;
            }
        }
    });
}

/// The preflight of generation `number`, run by the loader between the
/// copy and the open, unless `--preflight off` or the same bytes passed it
/// before (see [`preflight`]).
fn preflight(config: Arc<Config>, passed: Arc<Passed>, number: u64) -> Option<Check> {
    if !config.preflight {
        return None;
    }
    Some(Box::new(move |loader: &Loader, prepared: &Prepared| {
        let hash = prepared.hash();
        if passed.contains(hash) {
            tracing::debug!(generation = number, hash = %hash, "preflight skipped: the same bytes passed it before");
            return Ok(());
        }
        let bytes = match prepared {
            Prepared::Memory { copy, .. } => Bytes::Memory(&copy.file),
            Prepared::Staged { path, .. } => Bytes::Staged(path),
        };
        let took = preflight::check(&config, Target { source: loader.source(), bytes })?;
        passed.insert(hash);
        tracing::debug!(
            generation = number,
            hash = %hash,
            preflight_ms = took.as_secs_f64() * 1000.0,
            "preflight passed"
        );
        Ok(())
    }))
}

/// One reload. Returns whether generation `number` was published.
async fn reload(server: &Arc<Server>, loader: &Arc<Loader>, check: Option<Check>, number: u64) -> bool {
    let started = Instant::now();
    let serving = server.current.number();
    server.reporter.emit(Event::ReloadStarted { generation: number, serving, source: loader.source() });
    // The certificate and key are read again with the app, and installed
    // with it: a broken pair fails the reload as a broken library does.
    let tls = match server.tls.as_ref().map(|tls| tls.prepare()).transpose() {
        Ok(tls) => tls,
        Err(e) => {
            let reason = e.to_string();
            let total = started.elapsed();
            server.reporter.emit(Event::ReloadFailed { generation: number, serving, reason: &reason, total });
            return false;
        }
    };
    let limit = server.config.reload_timeout;
    let loaded = match tokio::time::timeout(limit, loader.load_checked(number, check)).await {
        Ok(result) => result,
        // The load (an app init that hangs) is abandoned, not cancelled: if
        // it ever finishes, its generation is simply released.
        Err(_) => Err(LoadError::TimedOut { path: loader.source().to_owned(), limit }),
    };
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            let reason = e.to_string();
            server.reporter.emit(Event::ReloadFailed {
                generation: number,
                serving,
                reason: &reason,
                total: started.elapsed(),
            });
            return false;
        }
    };
    if server.is_shutting_down() {
        server.reporter.emit(Event::ReloadAbandoned { generation: number });
        return false;
    }
    let init = loaded.generation.info().init_duration;
    let publish_started = Instant::now();
    if let (Some(serving), Some(config)) = (&server.tls, tls) {
        serving.install(config);
    }
    let old = server.current.publish(Arc::new(loaded.generation));
    server.reporter.emit(Event::GenerationLoaded {
        generation: number,
        previous: old.number(),
        load: loaded.duration,
        init,
        publish: publish_started.elapsed(),
        total: started.elapsed(),
        in_flight: server.current.in_flight(),
    });
    drain::retire(server, old);
    true
}
