//! What an app gets when its generation starts.

use tokio::sync::watch;

/// Handed to [`App::init`](crate::App::init): which generation this is, the
/// app settings the operator gave the host, and the drain signal.
pub struct InitContext {
    generation: u64,
    settings: Vec<(String, String)>,
    drain: DrainSignal,
}

impl InitContext {
    pub(crate) fn new(generation: u64, settings: Vec<(String, String)>, drain: DrainSignal) -> InitContext {
        InitContext { generation, settings, drain }
    }

    /// The generation number: 1 for the library loaded at start, one more for
    /// each successful reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// An app setting (`--app-arg KEY=VALUE`, or the `[app]` table of the
    /// host's config file).
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.settings.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// All app settings, in the order the host resolved them.
    pub fn settings(&self) -> impl Iterator<Item = (&str, &str)> {
        self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A signal that fires when this generation starts to drain: it gets no
    /// new requests, and long-lived responses (event streams, long polls)
    /// should end soon so the old code can be released.
    pub fn drain_signal(&self) -> DrainSignal {
        self.drain.clone()
    }
}

/// Fires once, when the generation starts to drain. Cheap to clone; keep one
/// in long-lived streams and `select!` on [`DrainSignal::drained`].
#[derive(Clone)]
pub struct DrainSignal {
    rx: watch::Receiver<bool>,
}

impl DrainSignal {
    pub(crate) fn new(rx: watch::Receiver<bool>) -> DrainSignal {
        DrainSignal { rx }
    }

    /// Whether the generation is draining now.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes when the generation drains (at once if it already does).
    pub async fn drained(&self) {
        let mut rx = self.rx.clone();
        // An error means the generation is shutting down: that is a drain too.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}
