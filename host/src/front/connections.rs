//! The registry of open connections: how many there are, how many may be
//! (`max_connections`: a permit per connection, held until its task ends),
//! asking them all to finish (shutdown) or close (force, or a retired
//! generation's leftovers), and the sweep that closes those past an idle or
//! header deadline, or whose client stopped reading (`send_timeout`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::connection::{self, Connection, Peer, Rules};
use crate::config::format_duration;

pub struct Connections {
    rules: Arc<Rules>,
    /// One permit per connection that may be open (`max_connections`).
    admission: Arc<Semaphore>,
    /// Every open connection (forgotten once it is dropped).
    open: Mutex<Vec<Weak<Connection>>>,
    count: AtomicUsize,
    all_closed: Notify,
    stop_accepting: watch::Sender<bool>,
}

impl Connections {
    pub fn new(rules: Rules, max_connections: usize) -> Connections {
        Connections {
            rules: Arc::new(rules),
            admission: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
            open: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            all_closed: Notify::new(),
            stop_accepting: watch::Sender::new(false),
        }
    }

    /// Room for one more connection, if there is some now.
    pub fn try_admit(&self) -> Option<Admission> {
        self.admission.clone().try_acquire_owned().ok().map(|permit| Admission { _permit: permit })
    }

    /// Room for one more connection, once a connection closes.
    pub async fn admit(&self) -> Admission {
        match self.admission.clone().acquire_owned().await {
            Ok(permit) => Admission { _permit: permit },
            // The semaphore is never closed.
            Err(_) => unreachable!("the connection semaphore was closed"),
        }
    }

    /// Registers a connection from `peer`, just accepted into the room
    /// `admission` holds; it counts as open (and keeps that room) until the
    /// returned [`Open`] guard is dropped.
    pub fn accepted(self: &Arc<Self>, peer: Peer, admin: bool, admission: Admission) -> (Arc<Connection>, Open) {
        self.count.fetch_add(1, Ordering::AcqRel);
        let connection = Arc::new(Connection::new(peer, admin, self.rules.clone()));
        let mut open = lock(&self.open);
        open.retain(|c| c.strong_count() > 0);
        open.push(Arc::downgrade(&connection));
        (connection, Open { registry: self.clone(), _admission: admission })
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

    /// A process-mode worker hands over to newer ones, or the old process
    /// of a binary upgrade to the new one: stop accepting (the listening
    /// socket stays open in the other processes), close HTTP/1 connections
    /// after their next response (it carries `Connection: close`; one left
    /// idle is closed by its keep-alive timeout), send HTTP/2 connections
    /// GOAWAY (they finish their streams). Nothing is refused, and no
    /// HTTP/1 client sees a connection close that its last response said
    /// would stay open.
    pub fn retire(&self) {
        self.rules.begin_retiring();
        self.stop_accepting.send_replace(true);
        for connection in self.open_connections().iter().filter(|c| c.is_http2()) {
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

/// Room for one connection under `max_connections`.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

/// Counts a connection as open until its task ends.
pub struct Open {
    registry: Arc<Connections>,
    _admission: Admission,
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.registry.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.registry.all_closed.notify_waiters();
        }
    }
}

/// Closes connections past their idle or header deadline, and those whose
/// client read nothing of a response for `send_timeout`, every
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
            } else if let Some(timeout) = connection.stalled_for(now) {
                tracing::info!(
                    peer = %connection.peer,
                    generation = connection.generation(),
                    "closing a connection whose client read nothing of its response for send_timeout ({})",
                    format_duration(timeout)
                );
                connection.close();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
