//! Draining and retiring a generation that a reload replaced.
//!
//! 1. The app is told (`drain`): it gets no new requests, and long-lived
//!    responses should end soon. No new request can reach it anyway: it is
//!    no longer current.
//! 2. Its in-flight requests, response streams and upgraded connections
//!    (WebSockets: the app closes them on its drain signal) run to
//!    completion, for at most `reload_timeout`.
//! 3. Then it is retired: whatever still runs in it is cancelled (responses
//!    end, upgraded connections are cut, their connections close). The library is released when its last
//!    lease is dropped (see [`Generation`]'s `Drop`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::format_duration;
use crate::front::Server;
use crate::generations::Generation;
use crate::operations::Event;

/// How long cancelled requests get to unwind before the retirement is
/// logged; their leases still keep the library loaded until they do.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// How long a drained generation must stay idle to count as drained.
const SETTLE: Duration = Duration::from_millis(10);

/// Completes when `generation` has had no request in flight for a moment: a
/// request that leased it just before the swap may not be counted yet.
async fn settled(generation: &Generation) {
    loop {
        generation.idle().await;
        tokio::time::sleep(SETTLE).await;
        if generation.busy() == 0 {
            return;
        }
    }
}

/// Starts retiring `old`, just replaced (and listed as draining since its
/// publication, see `Current::publish`): tells the app at once, then waits
/// for it in a task of its own.
pub fn retire(server: &Arc<Server>, old: Arc<Generation>) {
    old.drain_in_background();
    server.reporter.emit(Event::GenerationDraining {
        generation: old.number(),
        in_flight: old.in_flight(),
        upgraded: old.upgraded(),
    });
    tokio::spawn(wait_and_retire(server.clone(), old, Instant::now()));
}

async fn wait_and_retire(server: Arc<Server>, old: Arc<Generation>, started: Instant) {
    let number = old.number();
    let timeout = server.config.reload_timeout;
    let timed_out = tokio::time::timeout(timeout, settled(&old)).await.is_err();
    if timed_out {
        tracing::warn!(
            generation = number,
            in_flight = old.in_flight(),
            upgraded = old.upgraded(),
            "generation {number} still busy after reload_timeout ({}); cancelling what remains",
            format_duration(timeout)
        );
        old.cancel();
        if tokio::time::timeout(CANCEL_GRACE, old.idle()).await.is_err() {
            // Responses hyper cannot finish writing (a client that stopped
            // reading) never see the cancel: close their connections.
            let closed = server.connections.close_those_holding(number);
            tracing::warn!(generation = number, closed, "closing connections still held by generation {number}");
            let _ = tokio::time::timeout(CANCEL_GRACE, old.idle()).await;
        }
    }
    server.current.remove_draining(number);
    server.reporter.emit(Event::GenerationRetired { generation: number, drain: started.elapsed(), timed_out });
}
