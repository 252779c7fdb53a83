//! The process signals pounce-host acts on.
//!
//! | signal | action |
//! |---|---|
//! | SIGHUP, SIGUSR1 | rolling reload of the app library |
//! | SIGTERM, SIGINT | graceful shutdown; a second one exits at once |
//! | SIGUSR2 | binary upgrade: start the binary again with the listening sockets, hand over |
//!
//! Handlers are installed before the first generation loads, so a reload
//! signal that arrives during start-up does not kill the process (SIGHUP's
//! default action) but is acted on once serving starts.
//!
//! Signals are received with `signal-hook` on a thread of their own rather
//! than with tokio's signal support. Cargo unifies a dependency's features
//! across the packages of one build, so an app built together with the host
//! would get tokio's `signal` feature too; every app runtime would then
//! create tokio's process-wide signal globals in its own copy of tokio, two
//! sockets per generation that nothing can close once the library is gone.

use std::io;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals as Received;
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Reload(&'static str),
    Upgrade(&'static str),
    Shutdown { name: &'static str, number: i32 },
}

pub struct Signals {
    received: mpsc::UnboundedReceiver<i32>,
}

impl Signals {
    /// Starts the signal thread. The first SIGTERM/SIGINT goes to the
    /// serving code for a graceful shutdown; from then on the thread itself
    /// guarantees the process ends, even if app code blocks every worker
    /// thread (so nothing async can run): a second shutdown signal exits at
    /// once, and so does `give_up_after` past the first.
    pub fn install(give_up_after: Duration) -> io::Result<Signals> {
        let mut signals = Received::new([SIGHUP, SIGUSR1, SIGUSR2, SIGTERM, SIGINT])?;
        let (tx, received) = mpsc::unbounded_channel();
        std::thread::Builder::new().name("pounce-signals".to_owned()).spawn(move || {
            let mut stopping = false;
            for signal in signals.forever() {
                let shutdown = matches!(signal, SIGTERM | SIGINT);
                if shutdown && stopping {
                    exit_now(signal, "second shutdown signal: exiting at once");
                }
                if shutdown {
                    stopping = true;
                    watch_the_shutdown(signal, give_up_after);
                }
                // Nobody listens once serving has ended: a shutdown signal
                // during the final clean-up still exits at once.
                if tx.send(signal).is_err() && shutdown {
                    exit_now(signal, "shutdown signal after serving ended: exiting at once");
                }
            }
        })?;
        Ok(Signals { received })
    }

    /// The next signal received.
    pub async fn next(&mut self) -> Request {
        loop {
            match self.received.recv().await {
                Some(SIGHUP) => return Request::Reload("SIGHUP"),
                Some(SIGUSR1) => return Request::Reload("SIGUSR1"),
                Some(SIGUSR2) => return Request::Upgrade("SIGUSR2"),
                Some(SIGTERM) => return Request::Shutdown { name: "SIGTERM", number: SIGTERM },
                Some(SIGINT) => return Request::Shutdown { name: "SIGINT", number: SIGINT },
                Some(_) => {}
                // The signal thread is gone; nothing will arrive any more.
                None => std::future::pending().await,
            }
        }
    }
}

/// Exits the process from the signal thread, whatever the rest is doing.
fn exit_now(signal: i32, why: &str) -> ! {
    eprintln!("pounce-host: {why} (status {})", 128 + signal);
    std::process::exit(128 + signal);
}

/// A graceful shutdown must end: if the process still runs `limit` after
/// the first shutdown signal (app code blocking every thread, an app
/// `drain` or `shutdown` that never returns), exit anyway.
fn watch_the_shutdown(signal: i32, limit: Duration) {
    let spawned = std::thread::Builder::new().name("pounce-deadline".to_owned()).spawn(move || {
        std::thread::sleep(limit);
        exit_now(signal, &format!("the shutdown did not finish within {limit:?}: exiting"));
    });
    if let Err(e) = spawned {
        eprintln!("pounce-host: cannot watch the shutdown's deadline: {e}");
    }
}
