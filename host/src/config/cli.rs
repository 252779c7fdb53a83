//! Command-line interface of `pounce-host`.
//!
//! Every serve setting is an `Option` so that [`crate::config`] can tell "not
//! given" from "given the default value" and layer the sources: flag, then
//! environment variable (clap's own precedence), then config file, then the
//! built-in default. Values are only parsed here; range checks live in
//! [`crate::config`] so that they apply to config file values too.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use super::values::{
    parse_app_arg, parse_duration, parse_size, parse_timeout_or_off, LogFormat, Mode, Switch, TimeoutOrOff,
};

/// Serve web apps compiled as cdylib plugins over HTTP, and swap in new app
/// code while serving.
#[derive(Debug, Parser)]
#[command(name = "pounce-host", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at startup, so the size of `Serve` does not matter, and boxing
// it would only make every match on `Command` noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve an app library over HTTP.
    ///
    /// Each setting comes from its flag, else its POUNCE_* environment
    /// variable, else the --config file, else the built-in default.
    Serve(ServeArgs),
    /// Load an app library, verify its ABI, run its init and shutdown, print
    /// what was found; exit 0 if it would serve.
    ///
    /// Deploy pipelines run it before a reload.
    Check(CheckArgs),
    /// One worker process of `serve --mode process`, started by the
    /// supervisor (which passes it the listening socket, a control channel
    /// and the library); not for direct use.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The generation this worker serves.
    #[arg(long)]
    pub generation: u64,
    /// The supervisor's pid: a worker whose parent is not it exits.
    #[arg(long)]
    pub supervisor: u32,
    /// What the listening sockets passed from descriptor 6 on serve, in
    /// order: `app` or `admin`.
    #[arg(long, value_delimiter = ',')]
    pub listeners: Vec<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The app's cdylib (.so) to serve.
    #[arg(env = "POUNCE_LIBRARY", value_name = "LIBRARY")]
    pub library: PathBuf,

    /// TOML file with settings named like these flags, with `_` for `-`
    /// (e.g. `reload_timeout = "45s"`), plus an `[app]` table of settings for
    /// the app. Flags and environment variables override it. Default: none.
    #[arg(long, env = "POUNCE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// IP address to listen on; 0.0.0.0 or :: listen on all interfaces.
    /// Repeat it, or separate addresses with commas, to listen on several
    /// (e.g. 127.0.0.1,::1), all on --port. With --uds and neither --host
    /// nor --port, no TCP port is opened; with systemd socket activation,
    /// neither. Default: 127.0.0.1.
    #[arg(long, env = "POUNCE_HOST", value_name = "ADDR", value_delimiter = ',')]
    pub host: Vec<IpAddr>,

    /// TCP port to listen on; 0 picks a free port (the first --host's; the
    /// other addresses take the same). Default: 8000.
    #[arg(long, env = "POUNCE_PORT", value_name = "PORT")]
    pub port: Option<u16>,

    /// Also listen on this unix domain socket (plain HTTP, for a proxy on
    /// the same machine). A socket file left by a dead process is replaced;
    /// one another process listens on is an error (exit 4). Default: none.
    #[arg(long, env = "POUNCE_UDS", value_name = "PATH")]
    pub uds: Option<PathBuf>,

    /// Permissions of the --uds socket file, in octal. Default: 0660.
    #[arg(long, env = "POUNCE_UDS_MODE", value_name = "OCTAL")]
    pub uds_mode: Option<String>,

    /// Serve HTTPS on the TCP ports with this certificate chain (PEM, the
    /// server's certificate first); needs --tls-key. Re-read, with the key,
    /// on every reload. Default: none (plain HTTP).
    #[arg(long, env = "POUNCE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    /// Default: none.
    #[arg(long, env = "POUNCE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Serve the health and metrics endpoints on their own listener, ADDR
    /// being PORT (on 127.0.0.1) or IP:PORT; the app's ports then answer
    /// health with status and generation only, and no metrics.
    /// Default: none.
    #[arg(long, env = "POUNCE_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,

    /// Worker threads of the async runtime, from 1 to 1024. Default: the
    /// number of available CPUs.
    #[arg(long, env = "POUNCE_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    /// Length of the queue of connections not yet accepted; the kernel may
    /// cap it (net.core.somaxconn). Default: 2048.
    #[arg(long, env = "POUNCE_BACKLOG", value_name = "N")]
    pub backlog: Option<u32>,

    /// Most client connections open at once, from 1 to 1000000. At the
    /// limit no more are accepted until one closes: new ones wait in the
    /// listen backlog. Default: 10000.
    #[arg(long, env = "POUNCE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// After a reload, longest time the old generation may drain (finish its
    /// in-flight requests and streams) before what still runs in it is
    /// cancelled and it is released. Default: 30s.
    #[arg(long, env = "POUNCE_RELOAD_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub reload_timeout: Option<Duration>,

    /// On SIGTERM/SIGINT, longest time to wait for open connections to
    /// finish before they are closed by force; also how long an app's
    /// shutdown may wait for its threads. Default: 10s.
    #[arg(long, env = "POUNCE_SHUTDOWN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,

    /// Longest time the app may take to produce a response head; then the
    /// handler is cancelled and the client gets 504. Default: 30s.
    #[arg(long, env = "POUNCE_REQUEST_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,

    /// How long an idle keep-alive connection waits for its next request
    /// before it is closed. Default: 5s.
    #[arg(long, env = "POUNCE_KEEP_ALIVE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub keep_alive_timeout: Option<Duration>,

    /// Longest time a client may take to send a request's headers, so that
    /// silent connections cannot hold a shutdown forever. Default: 10s.
    #[arg(long, env = "POUNCE_HEADER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub header_timeout: Option<Duration>,

    /// Longest time a response may wait for its client to read any of it;
    /// then its connection is closed, so a client that stopped reading
    /// cannot keep a replaced generation loaded. `off` waits forever.
    /// Default: 30s.
    #[arg(long, env = "POUNCE_SEND_TIMEOUT", value_name = "DURATION", value_parser = parse_timeout_or_off)]
    pub send_timeout: Option<TimeoutOrOff>,

    /// Log a warning (once per call, with generation, method and path) when
    /// one call into app code (a handler's poll, a stream's, drain,
    /// shutdown) has run this long on a server thread: a handler that
    /// blocks or spins. `off` turns the watchdog off. Default: 1s.
    #[arg(long, env = "POUNCE_STALL_WARNING", value_name = "DURATION", value_parser = parse_timeout_or_off)]
    pub stall_warning: Option<TimeoutOrOff>,

    /// Largest request body accepted, e.g. 512KiB, 4MiB or 1MB.
    /// Default: 1MiB.
    #[arg(long, env = "POUNCE_MAX_BODY_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pub max_body_size: Option<u64>,

    /// Largest request head (request line and headers) accepted, from 8KiB
    /// (hyper's smallest read buffer) to 16MiB. Default: 64KiB.
    #[arg(long, env = "POUNCE_MAX_HEADER_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pub max_header_size: Option<u64>,

    /// Most concurrent requests (streams) on one HTTP/2 connection, from 1
    /// to 1000000; sent to clients as SETTINGS_MAX_CONCURRENT_STREAMS.
    /// Default: 200.
    #[arg(long, env = "POUNCE_H2_MAX_CONCURRENT_STREAMS", value_name = "N")]
    pub h2_max_concurrent_streams: Option<u32>,

    /// How often an HTTP/2 connection PINGs its client, and how long the
    /// client then has to answer before the connection is closed: a client
    /// that vanished without closing its connection does not hold it (and
    /// its generation). `off` sends no PINGs. Default: 20s.
    #[arg(long, env = "POUNCE_H2_KEEP_ALIVE", value_name = "DURATION", value_parser = parse_timeout_or_off)]
    pub h2_keep_alive: Option<TimeoutOrOff>,

    /// Path of the built-in health endpoint, or `off` to disable it.
    /// Default: /health.
    #[arg(long, env = "POUNCE_HEALTH_PATH", value_name = "PATH")]
    pub health_path: Option<String>,

    /// Log output: human-readable text, or one JSON object per line.
    /// Default: text.
    #[arg(long, env = "POUNCE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Which log events to emit, as a tracing filter such as `info` or
    /// `pounce_host=debug,warn`. Default: info.
    #[arg(long, env = "POUNCE_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// A setting passed to the app; repeat for more. Overrides the same key
    /// in the config file's `[app]` table.
    #[arg(long = "app-arg", value_name = "KEY=VALUE", value_parser = parse_app_arg)]
    pub app_args: Vec<(String, String)>,

    /// Watch the library file (and --reload-dir) and reload on every change,
    /// as SIGHUP would; for development. `--reload` alone means on;
    /// `--reload=off` turns it off.
    /// Default: off.
    #[arg(long, env = "POUNCE_RELOAD", value_name = "on|off", num_args = 0..=1, require_equals = true, default_missing_value = "on")]
    pub reload: Option<Switch>,

    /// With --reload, also watch this directory (recursively) for changes,
    /// e.g. templates the app reads; repeat for more. Hidden directories and
    /// editor temporary files are ignored. Default: none.
    #[arg(long, env = "POUNCE_RELOAD_DIR", value_name = "DIR", value_delimiter = ':')]
    pub reload_dir: Vec<PathBuf>,

    /// With --reload-dir, only files with these extensions trigger a reload,
    /// as a comma list, e.g. `.html,.css`. Default: every file.
    #[arg(long, env = "POUNCE_RELOAD_INCLUDE", value_name = "EXTS", value_delimiter = ',')]
    pub reload_include: Vec<String>,

    /// Path of a Prometheus metrics endpoint answered by the host, e.g.
    /// `/metrics`, or `off`. Default: off.
    #[arg(long, env = "POUNCE_METRICS_PATH", value_name = "PATH")]
    pub metrics_path: Option<String>,

    /// Log one line per request (method, path, status, bytes, duration,
    /// generation) at info level on target `access`. Default: off.
    #[arg(long, env = "POUNCE_ACCESS_LOG", value_name = "on|off")]
    pub access_log: Option<Switch>,

    /// Thread mode: before a reload loads a new library into the serving
    /// process, load it and run its init and shutdown in a short-lived child
    /// process (`pounce-host check`), so a library that crashes in its
    /// constructor or init is rejected and never mapped here. Default: on.
    #[arg(long, env = "POUNCE_PREFLIGHT", value_name = "on|off")]
    pub preflight: Option<Switch>,

    /// Where app code runs: `thread` (in this process, on its worker
    /// threads) or `process` (in supervised worker processes, so a crash,
    /// hang or exit in app code never takes the service down). Default:
    /// thread.
    #[arg(long, env = "POUNCE_MODE", value_name = "thread|process")]
    pub mode: Option<Mode>,

    /// Process mode: worker processes serving each generation, from 1 to
    /// 1024 (each runs --workers threads). Default: the number of available
    /// CPUs.
    #[arg(long, env = "POUNCE_PROCESSES", value_name = "N")]
    pub processes: Option<usize>,

    /// Process mode: a worker whose event loop shows no progress for this
    /// long (a handler that spins or blocks every thread) is killed and
    /// replaced; `off` never kills. Default: 30s.
    #[arg(long, env = "POUNCE_WORKER_TIMEOUT", value_name = "DURATION|off", value_parser = parse_timeout_or_off)]
    pub worker_timeout: Option<TimeoutOrOff>,

    /// Process mode: more worker restarts than this within --restart-window
    /// is a crash loop, and restarts back off (1s, 2s, 4s ... 30s) instead of
    /// spinning. Default: 5.
    #[arg(long, env = "POUNCE_MAX_RESTARTS", value_name = "N")]
    pub max_restarts: Option<u32>,

    /// Process mode: the window --max-restarts counts in. Default: 60s.
    #[arg(long, env = "POUNCE_RESTART_WINDOW", value_name = "DURATION", value_parser = parse_duration)]
    pub restart_window: Option<Duration>,

    /// Process mode: if workers of a generation crash 3 times within this
    /// long after its reload, go back to the previous generation's library;
    /// `off` never rolls back. Default: 30s.
    #[arg(long, env = "POUNCE_ROLLBACK_WINDOW", value_name = "DURATION|off", value_parser = parse_timeout_or_off)]
    pub rollback_window: Option<TimeoutOrOff>,

    /// Keep app thread-local destructors from pinning retired generations in
    /// memory (see ARCHITECTURE.md). Turn off only if unloading misbehaves on
    /// your libc. Default: on.
    #[arg(long, env = "POUNCE_UNLOAD_GUARD", value_name = "on|off")]
    pub unload_guard: Option<Switch>,

    /// Load the library even if a user other than root and the one running
    /// pounce-host could change it: the file writable by group or others, a
    /// directory above it writable by them without the sticky bit, or either
    /// owned by another user. Such a library is refused otherwise; this logs
    /// a warning instead. `--allow-insecure-library` alone means on.
    /// Default: off.
    #[arg(long, env = "POUNCE_ALLOW_INSECURE_LIBRARY", value_name = "on|off", num_args = 0..=1, require_equals = true, default_missing_value = "on")]
    pub allow_insecure_library: Option<Switch>,

    /// Where each generation's copy of the library is written, only if
    /// in-memory files (memfd_create) are not available; directories that a
    /// crashed pounce-host left there are removed at start.
    /// Default: $TMPDIR, else /tmp.
    #[arg(long, env = "POUNCE_STAGING_DIR", value_name = "DIR")]
    pub staging_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The app's cdylib (.so) to check.
    #[arg(env = "POUNCE_LIBRARY", value_name = "LIBRARY")]
    pub library: PathBuf,

    /// TOML config file as for `serve`. Only its `[app]` table reaches the app,
    /// but the whole file is validated so that check fails where serve would.
    #[arg(long, env = "POUNCE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// A setting passed to the app; repeat for more. Overrides the same key
    /// in the config file's `[app]` table.
    #[arg(long = "app-arg", value_name = "KEY=VALUE", value_parser = parse_app_arg)]
    pub app_args: Vec<(String, String)>,

    /// Longest the load (with the app's init) may take; past it the check
    /// fails (exit 3) instead of waiting for an init that hangs.
    #[arg(long, env = "POUNCE_CHECK_TIMEOUT", value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
    pub timeout: Duration,

    /// As for `serve`: check the library even if users other than root and
    /// the one running pounce-host could change it. Default: off.
    #[arg(long, env = "POUNCE_ALLOW_INSECURE_LIBRARY", value_name = "on|off", num_args = 0..=1, require_equals = true, default_missing_value = "on")]
    pub allow_insecure_library: Option<Switch>,

    /// As for `serve`: where the library's copy goes if in-memory files are
    /// not available. Default: $TMPDIR, else /tmp.
    #[arg(long, env = "POUNCE_STAGING_DIR", value_name = "DIR")]
    pub staging_dir: Option<PathBuf>,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use clap::CommandFactory;

    use super::*;

    /// Serialises command-line parsing against tests that set `POUNCE_*`
    /// variables: clap reads the real process environment, and tests run on
    /// parallel threads.
    pub(crate) fn env_lock() -> MutexGuard<'static, ()> {
        static ENV: Mutex<()> = Mutex::new(());
        ENV.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parses `pounce-host <args>` while no other test changes the environment.
    pub(crate) fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let _env = env_lock();
        Cli::try_parse_from(std::iter::once("pounce-host").chain(args.iter().copied()))
    }

    pub(crate) fn serve_args(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(args);
        match parse(&argv).expect("valid command line").command {
            Command::Serve(serve) => serve,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn command_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `crate::config` names a flag and its variable after the config file
    /// key, so the three spellings must stay in step.
    #[test]
    fn flags_and_env_vars_follow_the_key_names() {
        let command = Cli::command();
        let serve = command.find_subcommand("serve").expect("serve exists");
        for arg in serve.get_arguments().filter(|arg| arg.get_long().is_some()) {
            let key = arg.get_id().as_str();
            if key == "app_args" || key == "help" {
                continue;
            }
            assert_eq!(arg.get_long(), Some(key.replace('_', "-").as_str()));
            let env = arg.get_env().and_then(|env| env.to_str());
            assert_eq!(env, Some(format!("POUNCE_{}", key.to_uppercase()).as_str()));
        }
    }

    #[test]
    fn serve_without_flags_leaves_every_setting_unset() {
        let args = serve_args(&["app.so"]);
        assert_eq!(args.library, PathBuf::from("app.so"));
        assert_eq!(args.port, None);
        assert_eq!(args.reload_timeout, None);
        assert_eq!(args.health_path, None);
        assert!(args.app_args.is_empty());
    }

    #[test]
    fn serve_parses_typed_flags() {
        let args = serve_args(&[
            "app.so",
            "--host=::1",
            "--port=0",
            "--reload-timeout=500ms",
            "--max-body-size=4MiB",
            "--log-format=json",
            "--unload-guard=off",
            "--allow-insecure-library",
            "--staging-dir=/var/tmp",
            "--send-timeout=off",
            "--app-arg=a=1",
            "--app-arg",
            "b=x=y",
        ]);
        assert_eq!(args.host, ["::1".parse::<IpAddr>().unwrap()]);
        assert_eq!(args.port, Some(0));
        assert_eq!(args.reload_timeout, Some(Duration::from_millis(500)));
        assert_eq!(args.max_body_size, Some(4 << 20));
        assert_eq!(args.log_format, Some(LogFormat::Json));
        assert_eq!(args.unload_guard, Some(Switch::Off));
        assert_eq!(args.allow_insecure_library, Some(Switch::On));
        assert_eq!(args.staging_dir, Some(PathBuf::from("/var/tmp")));
        assert_eq!(args.send_timeout, Some(TimeoutOrOff(None)));
        let expected = [("a", "1"), ("b", "x=y")].map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(args.app_args, expected);
    }

    #[test]
    fn serve_rejects_malformed_values() {
        for bad in [
            "--port=65536",
            "--reload-timeout=abc",
            "--max-body-size=1.5MiB",
            "--log-format=xml",
            "--unload-guard=maybe",
            "--allow-insecure-library=yes",
            "--send-timeout=never",
            "--max-connections=-1",
            "--app-arg=novalue",
            "--app-arg==x",
        ] {
            assert!(parse(&["serve", "app.so", bad]).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn duration_errors_name_the_flag_and_what_is_expected() {
        let err = parse(&["serve", "app.so", "--reload-timeout", "abc"]).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("--reload-timeout"), "{message}");
        assert!(message.contains("e.g. 500ms, 30s or 2m"), "{message}");
    }

    #[test]
    fn check_takes_library_config_and_app_args() {
        let cli = parse(&["check", "app.so", "--config", "p.toml", "--app-arg", "k=v"]).unwrap();
        let Command::Check(check) = cli.command else {
            panic!("parsed as serve");
        };
        assert_eq!(check.library, PathBuf::from("app.so"));
        assert_eq!(check.config, Some(PathBuf::from("p.toml")));
        assert_eq!(check.app_args, [("k".to_owned(), "v".to_owned())]);
        assert_eq!(check.allow_insecure_library, None);
        assert_eq!(check.staging_dir, None);
    }

    #[test]
    fn check_takes_the_library_file_settings_of_serve() {
        let args = ["check", "--allow-insecure-library", "--staging-dir", "/var/tmp", "app.so"];
        let Command::Check(check) = parse(&args).unwrap().command else {
            panic!("parsed as serve");
        };
        assert_eq!(check.allow_insecure_library, Some(Switch::On));
        assert_eq!(check.staging_dir, Some(PathBuf::from("/var/tmp")));
        let args = ["check", "--allow-insecure-library=off", "app.so"];
        let Command::Check(check) = parse(&args).unwrap().command else {
            panic!("parsed as serve");
        };
        assert_eq!(check.allow_insecure_library, Some(Switch::Off));
    }
}
