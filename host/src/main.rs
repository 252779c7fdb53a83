//! The `pounce-host` binary: parse the command line, set up logging and the
//! runtime, run a subcommand, and turn its outcome into an exit code.
//!
//! Exit codes: 0 success (including a graceful shutdown); 1 unexpected
//! failure; 2 invalid command line or configuration; 3 the app library could
//! not be loaded; 4 the listening socket could not be opened; 128 + N when a
//! second SIGTERM/SIGINT (signal N) forced an immediate exit.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use pounce_host::config::cli::{CheckArgs, Cli, Command, ServeArgs};
use pounce_host::config::{self, Config, LogFormat};
use pounce_host::generations::loader::{Loader, LoaderSettings};
use pounce_host::generations::{self, trust, unload_guard};
use pounce_host::lifecycle::serve;
use pounce_host::{check, logging};

/// How long the runtime waits for its tasks after a shutdown, before the
/// generations are released.
const RUNTIME_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::from_serve_args(args) {
        Ok(config) => config,
        Err(e) => return fail(2, anyhow::Error::new(e).context("invalid configuration")),
    };
    let max_log_level = logging::init(config.log_format, &config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .thread_name("pounce-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(1, e),
    };
    let unload_timeout = config.shutdown_timeout;
    let outcome = runtime.block_on(serve::serve(config, max_log_level));
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
    let max_log_level = logging::init(LogFormat::Text, "warn");
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
    match check::run(&loader) {
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
