//! The `pounce-host` binary: parse the command line, set up logging and the
//! runtime, run a subcommand, and turn its outcome into an exit code.
//!
//! Exit codes: 0 success (including a graceful shutdown); 1 unexpected
//! failure; 2 invalid command line or configuration; 3 the app library could
//! not be loaded; 4 a listening socket could not be opened; 5 the TLS
//! certificate or key cannot be read or used; 128 + N when a second
//! SIGTERM/SIGINT (signal N) forced an immediate exit.

use std::ffi::OsString;
use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use pounce_host::check;
use pounce_host::config::cli::{CheckArgs, Cli, Command, ServeArgs, WorkerArgs};
use pounce_host::config::{self, Config, LogFormat, Mode};
use pounce_host::generations::loader::{Loader, LoaderSettings};
use pounce_host::generations::{self, trust, unload_guard};
use pounce_host::lifecycle::serve::{self, StartError};
use pounce_host::logging::{self, Tag};
use pounce_host::process::{supervisor, worker};

/// How long the runtime waits for its tasks after a shutdown, before the
/// generations are released.
const RUNTIME_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check(args),
        Command::Worker(args) => worker(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::from_serve_args(args) {
        Ok(config) => config,
        Err(e) => return fail(2, anyhow::Error::new(e).context("invalid configuration")),
    };
    let max_log_level = logging::init(config.log_format, &config.log_level, None);
    match config.mode {
        Mode::Thread => {
            let workers = config.workers;
            let unload_timeout = config.shutdown_timeout;
            run(workers, unload_timeout, serve::serve(config, max_log_level))
        }
        Mode::Process => {
            // The supervisor runs no app code and serves no request: one thread.
            let unload_timeout = config.shutdown_timeout;
            run(1, unload_timeout, supervisor::run(config, serve_args()))
        }
    }
}

/// The arguments after `serve`, passed on to every worker.
fn serve_args() -> Vec<OsString> {
    std::env::args_os().skip_while(|arg| arg != "serve").skip(1).collect()
}

fn worker(args: WorkerArgs) -> ExitCode {
    let config = match Config::from_serve_args(args.serve) {
        Ok(config) => config,
        Err(e) => return fail(2, anyhow::Error::new(e).context("invalid configuration")),
    };
    let tag = Tag { pid: std::process::id(), generation: args.generation };
    let max_log_level = logging::init(config.log_format, &config.log_level, Some(tag));
    let assignment =
        worker::Assignment { generation: args.generation, supervisor: args.supervisor, listeners: args.listeners };
    let (workers, unload_timeout) = (config.workers, config.shutdown_timeout);
    run(workers, unload_timeout, worker::run(config, max_log_level, assignment))
}

/// Runs `serving` on a runtime of `workers` threads, then releases the
/// generations (each app's `shutdown` runs) and turns the outcome into an
/// exit code.
fn run(workers: usize, unload_timeout: Duration, serving: impl Future<Output = Result<(), StartError>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("pounce-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(1, e),
    };
    let outcome = runtime.block_on(serving);
    // Dropping the runtime drops every task, and with them the last leases
    // on the generations, whose unload threads run the apps' `shutdown`.
    generations::begin_exit();
    runtime.shutdown_timeout(RUNTIME_GRACE);
    generations::wait_for_unloads(Instant::now() + unload_timeout + RUNTIME_GRACE);
    match outcome {
        Ok(()) => {
            tracing::info!("shutdown complete");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let settings = match config::check_settings(&args) {
        Ok(settings) => settings,
        Err(e) => return fail(2, anyhow::Error::new(e).context("invalid configuration")),
    };
    let max_log_level = logging::init(LogFormat::Text, "warn", None);
    unload_guard::set_enabled(true);
    if settings.allow_insecure_library {
        tracing::warn!("{}", trust::TURNED_OFF);
    }
    let loader = match Loader::new(LoaderSettings {
        source: args.library.clone(),
        app_args: settings.app_args,
        max_log_level,
        unload_timeout: Duration::from_secs(10),
        staging_dir: settings.staging_dir,
        allow_insecure_library: settings.allow_insecure_library,
    }) {
        Ok(loader) => loader,
        Err(e) => return fail(1, anyhow::Error::new(e)),
    };
    match check::run(std::sync::Arc::new(loader), args.timeout) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(3, anyhow::Error::new(e).context("check failed")),
    }
}

fn fail(code: u8, error: anyhow::Error) -> ExitCode {
    eprintln!("pounce-host: error: {error:#}");
    ExitCode::from(code)
}
