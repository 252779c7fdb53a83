//! The generation new requests go to, and the replaced ones still draining.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::generation::Generation;

/// The generation new requests go to.
pub struct Current {
    slot: ArcSwap<Generation>,
    /// Replaced generations whose requests have not all ended yet.
    draining: Mutex<Vec<Arc<Generation>>>,
}

impl Current {
    pub fn new(first: Generation) -> Current {
        Current { slot: ArcSwap::from_pointee(first), draining: Mutex::new(Vec::new()) }
    }

    /// The current generation, leased for one request.
    pub fn lease(&self) -> Arc<Generation> {
        self.slot.load_full()
    }

    /// Publishes `next`; returns the generation it replaces, which counts as
    /// draining from this moment (until [`Current::remove_draining`]): the
    /// health answer never misses it between the swap and its drain's start.
    pub fn publish(&self, next: Arc<Generation>) -> Arc<Generation> {
        let mut draining = lock(&self.draining);
        let old = self.slot.swap(next);
        draining.push(old.clone());
        old
    }

    pub fn number(&self) -> u64 {
        self.slot.load().number()
    }

    pub fn remove_draining(&self, number: u64) {
        lock(&self.draining).retain(|g| g.number() != number);
    }

    pub fn draining(&self) -> Vec<Arc<Generation>> {
        lock(&self.draining).clone()
    }

    /// Requests in flight across the current and the draining generations.
    pub fn in_flight(&self) -> usize {
        self.slot.load().in_flight() + lock(&self.draining).iter().map(|g| g.in_flight()).sum::<usize>()
    }

    /// Open upgraded connections across the current and the draining generations.
    pub fn upgraded(&self) -> usize {
        self.slot.load().upgraded() + lock(&self.draining).iter().map(|g| g.upgraded()).sum::<usize>()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
