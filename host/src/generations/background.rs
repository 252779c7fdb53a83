//! Long-lived background threads for the reload path's blocking work
//! (loading, initialising, draining, unloading generations), instead of a
//! new thread for each step of each reload.
//!
//! A [`Background`] runs its jobs in order on one thread, started on first
//! use and kept. A job may block (an app's `init`, `drain` or `shutdown`
//! that hangs): a job submitted while every thread has been running its
//! current job for longer than `stuck_after` starts another thread, which
//! takes over the queue; the stuck thread ends once its job returns and the
//! queue is empty. So a hung app holds up nothing but its own job, as with
//! a thread per job, and a working one costs no thread start.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

/// A queue of jobs and the thread(s) that run them.
pub struct Background {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    /// Run first on every thread of this queue (its priority, say).
    setup: fn(),
    stuck_after: Duration,
    state: Mutex<State>,
    /// Wakes an idle thread for a job.
    wake: Condvar,
    /// Wakes whoever waits for the queue to be empty and every job done.
    done: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    /// When each running job started (one entry per busy thread).
    running: Vec<(u64, Instant)>,
    next_thread: u64,
    /// The [`Background`] was dropped: its threads end once the queue is empty.
    closed: bool,
}

impl Background {
    /// A queue whose threads are named `name`, run `setup` when they start,
    /// and count as stuck when one job has run longer than `stuck_after`.
    pub fn new(name: &str, setup: fn(), stuck_after: Duration) -> Background {
        Background {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                setup,
                stuck_after,
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                done: Condvar::new(),
            }),
        }
    }

    /// Queues `job`. Fails only if no thread runs the queue and none could
    /// be started (the job is dropped then).
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut state = self.shared.lock();
        state.jobs.push_back(Box::new(job));
        if state.idle > 0 {
            drop(state);
            self.shared.wake.notify_one();
            return Ok(());
        }
        let stuck = state.running.len() == state.threads
            && state.running.iter().all(|(_, since)| since.elapsed() >= self.shared.stuck_after);
        if state.threads > 0 && !stuck {
            return Ok(());
        }
        if state.threads > 0 {
            tracing::debug!(queue = %self.shared.name, "a background job is stuck; starting another thread");
        }
        let id = state.next_thread;
        let shared = self.shared.clone();
        match std::thread::Builder::new().name(self.shared.name.clone()).spawn(move || shared.serve(id)) {
            Ok(_) => {
                state.next_thread += 1;
                state.threads += 1;
                Ok(())
            }
            Err(e) if state.threads > 0 => {
                tracing::warn!(queue = %self.shared.name, "cannot start another background thread: {e}");
                Ok(())
            }
            Err(e) => {
                state.jobs.pop_back();
                Err(e)
            }
        }
    }

    /// Runs `job` on the queue; the receiver gets its result (or is closed
    /// if the job could not run or panicked).
    pub fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<tokio::sync::oneshot::Receiver<T>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(move || {
            let _ = tx.send(job());
        })?;
        Ok(rx)
    }

    /// Waits until every job queued so far has run, but not past
    /// `deadline`. Returns whether they all did.
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        let mut state = self.shared.lock();
        while !state.jobs.is_empty() || !state.running.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match self.shared.done.wait_timeout(state, deadline - now) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One thread's loop: jobs in order; ends when there is no job and
    /// another thread serves the queue.
    fn serve(&self, id: u64) {
        (self.setup)();
        let mut state = self.lock();
        loop {
            let Some(job) = state.jobs.pop_front() else {
                if state.threads > 1 || state.closed {
                    state.threads -= 1;
                    return;
                }
                state.idle += 1;
                state = self.wake.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
                state.idle -= 1;
                continue;
            };
            state.running.push((id, Instant::now()));
            drop(state);
            // A panicking job must not take the thread (and the queue) with it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            state = self.lock();
            state.running.retain(|(thread, _)| *thread != id);
            if state.jobs.is_empty() && state.running.is_empty() {
                self.done.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn nothing() {}

    #[test]
    fn runs_jobs_in_order_on_one_long_lived_thread() {
        let queue = Background::new("pounce-test-bg", nothing, Duration::from_secs(10));
        let (tx, rx) = mpsc::channel();
        for n in 0..20 {
            let tx = tx.clone();
            queue.submit(move || tx.send((n, std::thread::current().id())).unwrap()).unwrap();
        }
        let ran: Vec<_> = (0..20).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
        assert_eq!(ran.iter().map(|(n, _)| *n).collect::<Vec<_>>(), (0..20).collect::<Vec<_>>());
        assert!(ran.iter().all(|(_, thread)| *thread == ran[0].1), "one thread ran them all");
        assert!(queue.wait_idle(Instant::now() + Duration::from_secs(10)));
        assert_eq!(queue.shared.lock().threads, 1);
    }

    #[test]
    fn a_stuck_job_holds_up_only_itself() {
        let queue = Background::new("pounce-test-bg", nothing, Duration::from_millis(50));
        let (release, stuck) = mpsc::channel::<()>();
        queue
            .submit(move || {
                let _ = stuck.recv();
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let answer = queue.run(|| 42).unwrap();
        assert_eq!(answer.blocking_recv().unwrap(), 42, "another thread took the queue over");
        assert!(!queue.wait_idle(Instant::now() + Duration::from_millis(20)), "the stuck job still runs");
        release.send(()).unwrap();
        assert!(queue.wait_idle(Instant::now() + Duration::from_secs(10)));
        // The surplus thread ends once it finds the queue empty.
        for _ in 0..500 {
            if queue.shared.lock().threads == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(queue.shared.lock().threads, 1);
    }

    #[test]
    fn its_threads_end_when_it_is_dropped() {
        let queue = Background::new("pounce-test-bg", nothing, Duration::from_secs(10));
        assert_eq!(queue.run(|| 1).unwrap().blocking_recv().unwrap(), 1);
        let shared = queue.shared.clone();
        drop(queue);
        for _ in 0..500 {
            if shared.lock().threads == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(shared.lock().threads, 0);
    }

    #[test]
    fn a_panicking_job_leaves_the_queue_working() {
        let queue = Background::new("pounce-test-bg", nothing, Duration::from_secs(10));
        let panicked = queue.run(|| -> u32 { panic!("job panics") }).unwrap();
        assert!(panicked.blocking_recv().is_err(), "the result is never sent");
        assert_eq!(queue.run(|| 7).unwrap().blocking_recv().unwrap(), 7);
    }
}
