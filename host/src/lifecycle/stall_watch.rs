//! The stall watchdog: a thread of its own (app code that blocks every
//! worker thread cannot block it) that looks at the app calls running now
//! (`generations::stalls`) every [`TICK`] and reports each call running
//! longer than `--stall-warning`, once.

use std::sync::Arc;
use std::time::Duration;

use crate::front::Server;
use crate::generations::stalls::Stalls;
use crate::operations::Event;

/// How often the watchdog looks: a stall is reported at most this late.
const TICK: Duration = Duration::from_millis(100);

/// Starts the watchdog, unless `--stall-warning off`. It holds the server
/// weakly and ends with it: a strong reference would keep the serving
/// generation alive past the runtime, and its app's `shutdown` would never
/// run at exit.
pub fn spawn(server: &Arc<Server>) {
    let Some(limit) = server.config.stall_warning else { return };
    let server = Arc::downgrade(server);
    let spawned = std::thread::Builder::new().name("pounce-stall-watch".to_owned()).spawn(move || {
        let mut stalls = Stalls::default();
        loop {
            std::thread::sleep(TICK);
            let Some(server) = server.upgrade() else { return };
            for stall in stalls.scan(limit) {
                server.reporter.emit(Event::AppCallStalled {
                    kind: stall.kind.name(),
                    generation: stall.generation,
                    request: stall.request.as_deref(),
                    running: stall.running,
                    thread: &stall.thread,
                });
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the stall watchdog ({e}); app calls that block will not be reported");
    }
}
