//! The registry of open connections: how many there are, asking them all to
//! finish (shutdown) or close (force, or a retired generation's leftovers),
//! and the sweep that closes those past an idle or header deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{watch, Notify};

use super::connection::{self, Connection, Rules};

pub struct Connections {
    rules: Arc<Rules>,
    /// Every open connection (forgotten once it is dropped).
    open: Mutex<Vec<Weak<Connection>>>,
    count: AtomicUsize,
    all_closed: Notify,
    stop_accepting: watch::Sender<bool>,
}

impl Connections {
    pub fn new(rules: Rules) -> Connections {
        Connections {
            rules: Arc::new(rules),
            open: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            all_closed: Notify::new(),
            stop_accepting: watch::Sender::new(false),
        }
    }

    /// Registers a connection from `peer`, just accepted; it counts as open
    /// until the returned [`Open`] guard is dropped.
    pub fn accepted(self: &Arc<Self>, peer: std::net::SocketAddr) -> (Arc<Connection>, Open) {
        self.count.fetch_add(1, Ordering::AcqRel);
        let connection = Arc::new(Connection::new(peer, self.rules.clone()));
        let mut open = lock(&self.open);
        open.retain(|c| c.strong_count() > 0);
        open.push(Arc::downgrade(&connection));
        (connection, Open { registry: self.clone() })
    }

    pub fn is_shutting_down(&self) -> bool {
        self.rules.is_shutting_down()
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Changes when the accept loop must stop (forced close, or retiring).
    pub fn stop_accepting_signal(&self) -> watch::Receiver<bool> {
        self.stop_accepting.subscribe()
    }

    pub fn is_retiring(&self) -> bool {
        self.rules.is_retiring()
    }

    /// A process-mode worker hands over to newer ones: stop accepting (the
    /// listening socket stays open in the other processes), close idle
    /// connections after their next response (`Connection: close`), busy
    /// ones after their current response. Nothing is refused.
    pub fn retire(&self) {
        self.rules.begin_retiring();
        self.stop_accepting.send_replace(true);
        for connection in self.open_connections().iter().filter(|c| c.is_busy()) {
            connection.finish();
        }
    }

    /// Starts a graceful shutdown: new requests get 503, idle connections
    /// close, busy ones close after their current response.
    pub fn begin_shutdown(&self) {
        self.rules.begin_shutdown();
        for connection in self.open_connections() {
            connection.finish();
        }
    }

    /// Closes every connection still open, cancelling what runs on them,
    /// and stops accepting.
    pub fn force_close(&self) {
        self.stop_accepting.send_replace(true);
        for connection in self.open_connections() {
            connection.close();
        }
    }

    /// Completes when no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes every connection that may still carry a request of
    /// `generation`; returns how many.
    pub fn close_those_holding(&self, generation: u64) -> usize {
        let open = self.open_connections();
        let holding: Vec<&Arc<Connection>> = open.iter().filter(|c| c.may_hold(generation)).collect();
        for connection in &holding {
            connection.close();
        }
        holding.len()
    }

    fn open_connections(&self) -> Vec<Arc<Connection>> {
        lock(&self.open).iter().filter_map(Weak::upgrade).collect()
    }
}

/// Counts a connection as open until its task ends.
pub struct Open {
    registry: Arc<Connections>,
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.registry.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.registry.all_closed.notify_waiters();
        }
    }
}

/// Closes connections past their idle or header deadline, every
/// [`connection::SWEEP`].
pub async fn sweep(registry: Arc<Connections>) {
    let mut ticks = tokio::time::interval(connection::SWEEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = connection::tick();
        for connection in registry.open_connections() {
            if connection.is_expired(now) {
                connection.close();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
