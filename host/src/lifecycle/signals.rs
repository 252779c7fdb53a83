//! The process signals pounce-host acts on.
//!
//! | signal | action |
//! |---|---|
//! | SIGHUP, SIGUSR1 | rolling reload of the app library |
//! | SIGTERM, SIGINT | graceful shutdown; a second one exits at once |
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

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals as Received;
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Reload(&'static str),
    Shutdown { name: &'static str, number: i32 },
}

pub struct Signals {
    received: mpsc::UnboundedReceiver<i32>,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        let mut signals = Received::new([SIGHUP, SIGUSR1, SIGTERM, SIGINT])?;
        let (tx, received) = mpsc::unbounded_channel();
        std::thread::Builder::new().name("pounce-signals".to_owned()).spawn(move || {
            for signal in signals.forever() {
                // Nobody listens once serving has ended: a shutdown signal
                // during the final clean-up still exits at once.
                if tx.send(signal).is_err() && matches!(signal, SIGTERM | SIGINT) {
                    std::process::exit(128 + signal);
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
                Some(SIGTERM) => return Request::Shutdown { name: "SIGTERM", number: SIGTERM },
                Some(SIGINT) => return Request::Shutdown { name: "SIGINT", number: SIGINT },
                Some(_) => {}
                // The signal thread is gone; nothing will arrive any more.
                None => std::future::pending().await,
            }
        }
    }
}
