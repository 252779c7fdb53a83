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

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Reload(&'static str),
    Shutdown { name: &'static str, number: i32 },
}

pub struct Signals {
    hup: Signal,
    usr1: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal received.
    pub async fn next(&mut self) -> Request {
        tokio::select! {
            Some(()) = self.hup.recv() => Request::Reload("SIGHUP"),
            Some(()) = self.usr1.recv() => Request::Reload("SIGUSR1"),
            Some(()) = self.term.recv() => Request::Shutdown { name: "SIGTERM", number: libc::SIGTERM },
            Some(()) = self.int.recv() => Request::Shutdown { name: "SIGINT", number: libc::SIGINT },
        }
    }
}
