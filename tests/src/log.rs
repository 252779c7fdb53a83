//! A child process's output, line by line as it arrives, for tests to wait
//! on: a wait wakes on every new line, so it ends as soon as what it waits
//! for is logged, and gives up as soon as nothing more can come.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The lines a child writes to one or more pipes, merged in arrival order.
/// Cloning gives another handle to the same log.
#[derive(Clone, Default)]
pub struct Log(Arc<Shared>);

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    lines: Vec<String>,
    /// Pipes still being read; at zero the log is complete.
    open_pipes: usize,
}

impl Log {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads `pipe` into the log on a thread of its own, until it closes.
    pub fn collect(&self, pipe: impl Read + Send + 'static) {
        self.state().open_pipes += 1;
        let log = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                log.state().lines.push(line);
                log.0.changed.notify_all();
            }
            log.state().open_pipes -= 1;
            log.0.changed.notify_all();
        });
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.state().lines.join("\n")
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        count(&self.state().lines, needle)
    }

    /// Waits until `found` gives something for the lines so far, at most
    /// `timeout`. Gives up early once every pipe has closed.
    pub fn wait_for<T>(&self, timeout: Duration, mut found: impl FnMut(&[String]) -> Option<T>) -> Option<T> {
        self.wait(timeout, |state| match found(&state.lines) {
            Some(value) => Some(Some(value)),
            None if state.open_pipes == 0 => Some(None),
            None => None,
        })
        .flatten()
    }

    /// Waits until at least `times` lines contain `needle`, at most `timeout`.
    pub fn wait_for_count(&self, needle: &str, times: usize, timeout: Duration) -> bool {
        self.wait_for(timeout, |lines| (count(lines, needle) >= times).then_some(())).is_some()
    }

    /// Waits until every pipe has closed, at most `timeout`: after that the
    /// log is complete.
    pub fn wait_for_end(&self, timeout: Duration) -> bool {
        self.wait(timeout, |state| (state.open_pipes == 0).then_some(())).is_some()
    }

    /// Waits until `done` gives something, re-checking on every change.
    fn wait<T>(&self, timeout: Duration, mut done: impl FnMut(&State) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        loop {
            if let Some(value) = done(&state) {
                return Some(value);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state = self.0.changed.wait_timeout(state, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
    }
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|line| line.contains(needle)).count()
}
