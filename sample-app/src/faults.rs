//! Misbehaviour on purpose, to see what each server mode does about it
//! (thread mode: the server dies or stalls; process mode: one worker is
//! replaced). Off unless the server passes `--app-arg faults=on`, so a
//! sample app exposed by mistake cannot be killed by a request.
//!
//! | route | fault |
//! |---|---|
//! | `GET /fault/segfault` | writes through a null pointer (SIGSEGV) |
//! | `GET /fault/abort` | `std::process::abort()` (SIGABRT) |
//! | `GET /fault/stack-overflow` | unbounded recursion |
//! | `GET /fault/exit?code=N` | `std::process::exit(N)` |
//! | `GET /fault/block?ms=N` | blocks the host thread polling it (`thread::sleep`) |
//! | `GET /fault/spin?ms=N` | spins the CPU for N ms on the host thread |
//!
//! Built with `SAMPLE_FAULT=init-segfault`, `init-abort` or `serve-abort`,
//! the library crashes in `init`, or on every request to `/`: a bad deploy.

use std::time::{Duration, Instant};

use app_abi::{Request, Response};

/// The fault built into this copy of the library (`SAMPLE_FAULT`).
pub const BUILT_IN: Option<&str> = option_env!("SAMPLE_FAULT");

/// Crashes now if this build was asked to crash at `moment`.
pub fn built_in(moment: &str) {
    match BUILT_IN {
        Some(fault) if fault == format!("{moment}-segfault") => segfault(),
        Some(fault) if fault == format!("{moment}-abort") => std::process::abort(),
        _ => {}
    }
}

/// Answers a `/fault/...` route, if `path` is one.
pub fn route(req: &Request<'_>, path: &str) -> Option<Response> {
    let ms = || req.query_param("ms").and_then(|ms| ms.parse::<u64>().ok()).unwrap_or(60_000).min(600_000);
    match path {
        "/fault/segfault" => segfault(),
        "/fault/abort" => std::process::abort(),
        "/fault/stack-overflow" => Some(Response::text(format!("depth {}\n", recurse(0)))),
        "/fault/exit" => std::process::exit(req.query_param("code").and_then(|c| c.parse().ok()).unwrap_or(7)),
        "/fault/block" => {
            app_abi::tracing::info!(ms = ms(), "blocking the thread that polls this handler");
            std::thread::sleep(Duration::from_millis(ms()));
            Some(Response::text("blocked\n"))
        }
        "/fault/spin" => {
            let until = Instant::now() + Duration::from_millis(ms());
            let mut spins = 0u64;
            while Instant::now() < until {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
            Some(Response::text(format!("spun {spins} times\n")))
        }
        _ => None,
    }
}

fn segfault() -> ! {
    let null: *mut u64 = std::hint::black_box(std::ptr::null_mut());
    // SAFETY: none, on purpose: this is the fault the route exists to show.
    // A volatile write through null is a SIGSEGV the compiler cannot remove.
    unsafe { null.write_volatile(1) };
    unreachable!("a write through a null pointer returned")
}

fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    if depth == u64::MAX {
        return frame[0];
    }
    recurse(depth + 1) + std::hint::black_box(frame[1]) % 2
}
