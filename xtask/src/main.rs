//! Project automation, run as `cargo xtask TASK [ARGS]` (an alias in
//! `.cargo/config.toml`). Each task lives in its own module; this file only
//! dispatches.

use std::process::ExitCode;

mod bench;
mod dev;

/// The tasks that exist: name, one-line summary.
const TASKS: &[(&str, &str)] = &[
    ("bench", "measure pounce-host against a plain hyper baseline; writes bench/results/latest.md"),
    ("bench-tls", "HTTPS keep-alive throughput against the baseline; writes bench/results/tls-latest.md"),
    ("bench-axum", "the axum example under pounce-host against axum::serve; writes bench/results/axum.md"),
    ("dev", "build an app, serve it, rebuild and reload it on every save"),
];

fn usage() -> String {
    let mut text = String::from("usage: cargo xtask TASK [ARGS]\n\ntasks:\n");
    for (name, summary) in TASKS {
        text.push_str(&format!("  {name:<10} {summary}\n"));
    }
    text.push_str("\n`cargo xtask TASK --help` describes a task's arguments.\n");
    text
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let task = args.next();
    let rest: Vec<String> = args.collect();
    let outcome = match task.as_deref() {
        Some("bench") => bench::main(rest),
        Some("bench-tls") => bench::tls_main(rest),
        Some("bench-axum") => bench::axum::main(rest),
        Some("dev") => dev::main(rest),
        Some("-h" | "--help" | "help") => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprint!("xtask: unknown task {other:?}\n\n{}", usage());
            return ExitCode::from(2);
        }
        None => {
            eprint!("{}", usage());
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
