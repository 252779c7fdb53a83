//! The host's settings: merged from flags, environment, config file and
//! built-in defaults, validated once, then frozen in [`Config`].
//!
//! Each source is read into a `Layer` and validated on its own, so that an
//! error can say exactly where the bad value came from. A bad value in the
//! config file is an error even when a flag overrides it: a broken file
//! should not wait for the day the flag is dropped.

mod checks;
pub mod cli;
mod error;
mod file;
mod layer;
pub mod values;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

pub use error::{ConfigError, Origin};
pub use values::{format_duration, LogFormat, Mode};

use checks::{PROCESSES, WORKERS};
use cli::{CheckArgs, ServeArgs};
use layer::Layer;

const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const DEFAULT_PORT: u16 = 8000;
const DEFAULT_UDS_MODE: u32 = 0o660;
const DEFAULT_BACKLOG: u32 = 2048;
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_STALL_WARNING: Duration = Duration::from_secs(1);
const DEFAULT_MAX_BODY_SIZE: u64 = 1 << 20;
const DEFAULT_MAX_HEADER_SIZE: usize = 64 << 10;
const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 200;
const DEFAULT_H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
const DEFAULT_HEALTH_PATH: &str = "/health";
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_WORKER_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_RESTARTS: u32 = 5;
const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(60);
const DEFAULT_ROLLBACK_WINDOW: Duration = Duration::from_secs(30);

/// The host's fully resolved settings, fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub library: PathBuf,
    /// The TCP addresses (at least one), all on `port`.
    pub host: Vec<IpAddr>,
    pub port: u16,
    /// Whether to listen on TCP: `--host` or `--port` was given, or no
    /// `--uds` was. (With systemd socket activation nothing is bound for
    /// the app: the socket unit decides.)
    pub tcp: bool,
    /// A unix domain socket to listen on, and its file's permissions.
    pub uds: Option<PathBuf>,
    pub uds_mode: u32,
    /// HTTPS on the TCP listeners.
    pub tls: Option<TlsFiles>,
    /// Health and metrics on a listener of their own.
    pub admin_listen: Option<SocketAddr>,
    pub workers: usize,
    pub backlog: u32,
    /// Connections open at once; at the limit, no more are accepted.
    pub max_connections: usize,
    pub reload_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub request_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub header_timeout: Duration,
    /// `None` when turned off.
    pub send_timeout: Option<Duration>,
    /// `None`: no stall watchdog.
    pub stall_warning: Option<Duration>,
    pub max_body_size: u64,
    pub max_header_size: usize,
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 keep-alive PING interval and answer timeout; `None`: no PINGs.
    pub h2_keep_alive: Option<Duration>,
    /// `None` when the health endpoint is turned off.
    pub health_path: Option<String>,
    pub log_format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, already checked to parse.
    pub log_level: String,
    /// The config file's `[app]` table, then `--app-arg`s; one entry per key,
    /// holding the last value given, at the position the key first appeared.
    pub app_args: Vec<(String, String)>,
    pub unload_guard: bool,
    pub mode: Mode,
    /// Worker processes per generation (process mode).
    pub processes: usize,
    /// `None`: hung workers are never killed.
    pub worker_timeout: Option<Duration>,
    pub max_restarts: u32,
    pub restart_window: Duration,
    /// `None`: never roll back automatically.
    pub rollback_window: Option<Duration>,
    /// Watch files and reload on change (development).
    pub reload: bool,
    pub reload_dirs: Vec<PathBuf>,
    /// Extensions without the dot, lowercase; empty means every file.
    pub reload_include: Vec<String>,
    pub metrics_path: Option<String>,
    pub access_log: bool,
    /// Thread mode: load a new library in a child process before a reload.
    pub preflight: bool,
    /// Load a library that users other than root and the server's could
    /// change (see `generations::trust`).
    pub allow_insecure_library: bool,
    /// Where library copies go if in-memory files are not available.
    pub staging_dir: PathBuf,
}

/// The certificate chain and private key files of `--tls-cert`/`--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The settings `pounce-host check` uses: those that decide how the library
/// is loaded, from its flags and the config file as for `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSettings {
    /// The config file's `[app]` table, then `--app-arg`s (see `Config`).
    pub app_args: Vec<(String, String)>,
    pub allow_insecure_library: bool,
    pub staging_dir: PathBuf,
}

impl Config {
    /// Resolves every setting (flag > environment > config file > default)
    /// and checks it, so that serving never starts with a value it would
    /// trip over later.
    pub fn from_serve_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let file = file::read_optional(args.config.as_deref())?;
        let library = args.library.clone();
        let flags = Layer::from_flags(args)?;
        merge(library, flags, file)
    }
}

/// The settings for `pounce-host check`: the config file's `[app]` table
/// overridden by `--app-arg`s, and the library file settings, flag over
/// file as for `serve`. The rest of the file is validated as well, so that
/// check fails on a file that serve would reject.
pub fn check_settings(args: &CheckArgs) -> Result<CheckSettings, ConfigError> {
    let file = file::read_optional(args.config.as_deref())?;
    let staging_dir = layer::flag("staging_dir", args.staging_dir.clone(), checks::check_dir)?;
    Ok(CheckSettings {
        app_args: merge_app_args(file.app_args, args.app_args.clone()),
        allow_insecure_library: args
            .allow_insecure_library
            .map(bool::from)
            .or(file.allow_insecure_library)
            .unwrap_or(false),
        staging_dir: staging_dir.or(file.staging_dir).unwrap_or_else(std::env::temp_dir),
    })
}

/// Combines the command line over the file over the built-in defaults.
fn merge(library: PathBuf, flags: Layer, file: Layer) -> Result<Config, ConfigError> {
    let host = flags.host.or(file.host);
    let port = flags.port.or(file.port);
    let uds = flags.uds.or(file.uds);
    let tls = match (flags.tls_cert.or(file.tls_cert), flags.tls_key.or(file.tls_key)) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::Conflict(
                "--tls-cert / POUNCE_TLS_CERT (tls_cert) is set but --tls-key / POUNCE_TLS_KEY (tls_key) is not: \
             HTTPS needs both, the certificate chain and its private key"
                    .to_owned(),
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::Conflict(
                "--tls-key / POUNCE_TLS_KEY (tls_key) is set but --tls-cert / POUNCE_TLS_CERT (tls_cert) is not: \
             HTTPS needs both, the certificate chain and its private key"
                    .to_owned(),
            ))
        }
    };
    Ok(Config {
        library,
        tcp: host.is_some() || port.is_some() || uds.is_none(),
        host: host.unwrap_or_else(|| vec![DEFAULT_HOST]),
        port: port.unwrap_or(DEFAULT_PORT),
        uds,
        uds_mode: flags.uds_mode.or(file.uds_mode).unwrap_or(DEFAULT_UDS_MODE),
        tls,
        admin_listen: flags.admin_listen.or(file.admin_listen),
        workers: flags.workers.or(file.workers).unwrap_or_else(|| available_cpus(&WORKERS)),
        backlog: flags.backlog.or(file.backlog).unwrap_or(DEFAULT_BACKLOG),
        max_connections: flags.max_connections.or(file.max_connections).unwrap_or(DEFAULT_MAX_CONNECTIONS),
        reload_timeout: flags.reload_timeout.or(file.reload_timeout).unwrap_or(DEFAULT_RELOAD_TIMEOUT),
        shutdown_timeout: flags.shutdown_timeout.or(file.shutdown_timeout).unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
        request_timeout: flags.request_timeout.or(file.request_timeout).unwrap_or(DEFAULT_REQUEST_TIMEOUT),
        keep_alive_timeout: flags.keep_alive_timeout.or(file.keep_alive_timeout).unwrap_or(DEFAULT_KEEP_ALIVE_TIMEOUT),
        header_timeout: flags.header_timeout.or(file.header_timeout).unwrap_or(DEFAULT_HEADER_TIMEOUT),
        send_timeout: flags.send_timeout.or(file.send_timeout).unwrap_or(Some(DEFAULT_SEND_TIMEOUT)),
        stall_warning: flags.stall_warning.or(file.stall_warning).unwrap_or(Some(DEFAULT_STALL_WARNING)),
        max_body_size: flags.max_body_size.or(file.max_body_size).unwrap_or(DEFAULT_MAX_BODY_SIZE),
        max_header_size: flags.max_header_size.or(file.max_header_size).unwrap_or(DEFAULT_MAX_HEADER_SIZE),
        h2_max_concurrent_streams: flags
            .h2_max_concurrent_streams
            .or(file.h2_max_concurrent_streams)
            .unwrap_or(DEFAULT_H2_MAX_CONCURRENT_STREAMS),
        h2_keep_alive: flags.h2_keep_alive.or(file.h2_keep_alive).unwrap_or(Some(DEFAULT_H2_KEEP_ALIVE)),
        health_path: flags.health_path.or(file.health_path).unwrap_or_else(|| Some(DEFAULT_HEALTH_PATH.to_owned())),
        log_format: flags.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
        log_level: flags.log_level.or(file.log_level).unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned()),
        unload_guard: flags.unload_guard.or(file.unload_guard).unwrap_or(true),
        mode: flags.mode.or(file.mode).unwrap_or(Mode::Thread),
        processes: flags.processes.or(file.processes).unwrap_or_else(|| available_cpus(&PROCESSES)),
        worker_timeout: flags.worker_timeout.or(file.worker_timeout).unwrap_or(Some(DEFAULT_WORKER_TIMEOUT)),
        max_restarts: flags.max_restarts.or(file.max_restarts).unwrap_or(DEFAULT_MAX_RESTARTS),
        restart_window: flags.restart_window.or(file.restart_window).unwrap_or(DEFAULT_RESTART_WINDOW),
        rollback_window: flags.rollback_window.or(file.rollback_window).unwrap_or(Some(DEFAULT_ROLLBACK_WINDOW)),
        app_args: merge_app_args(file.app_args, flags.app_args),
        reload: flags.reload.or(file.reload).unwrap_or(false),
        reload_dirs: flags.reload_dirs.or(file.reload_dirs).unwrap_or_default(),
        reload_include: flags.reload_include.or(file.reload_include).unwrap_or_default(),
        metrics_path: flags.metrics_path.or(file.metrics_path).unwrap_or(None),
        access_log: flags.access_log.or(file.access_log).unwrap_or(false),
        preflight: flags.preflight.or(file.preflight).unwrap_or(true),
        allow_insecure_library: flags.allow_insecure_library.or(file.allow_insecure_library).unwrap_or(false),
        staging_dir: flags.staging_dir.or(file.staging_dir).unwrap_or_else(std::env::temp_dir),
    })
}

/// One per CPU the process may use, within the allowed range.
fn available_cpus(range: &std::ops::RangeInclusive<usize>) -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get).min(*range.end())
}

/// Keeps one entry per key: the last value, at the key's first position, so
/// that overriding a setting does not reorder what the app sees.
fn merge_app_args(file: Vec<(String, String)>, flags: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = Vec::with_capacity(file.len() + flags.len());
    for (key, value) in file.into_iter().chain(flags) {
        match merged.iter_mut().find(|(known, _)| *known == key) {
            Some(entry) => entry.1 = value,
            None => merged.push((key, value)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use clap::Parser;

    use super::cli::tests::{env_lock, serve_args};
    use super::cli::{Cli, Command};
    use super::error::FILE_KEYS;
    use super::*;

    /// A config file in the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &str) -> TempFile {
            let file = format!("pounce-config-test-{}-{name}.toml", std::process::id());
            let path = std::env::temp_dir().join(file);
            fs::write(&path, contents).expect("temp dir is writable");
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().expect("temp path is UTF-8")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }

    /// Sets environment variables and removes them again when dropped, even
    /// if the test fails. Hold [`env_lock`] for as long as this lives.
    struct EnvVars(Vec<&'static str>);

    impl EnvVars {
        fn set(vars: &[(&'static str, &str)]) -> EnvVars {
            for (name, value) in vars {
                std::env::set_var(name, value);
            }
            EnvVars(vars.iter().map(|(name, _)| *name).collect())
        }
    }

    impl Drop for EnvVars {
        fn drop(&mut self) {
            for name in &self.0 {
                std::env::remove_var(name);
            }
        }
    }

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["app.so"];
        argv.extend_from_slice(args);
        Config::from_serve_args(serve_args(&argv))
    }

    fn config_with_file(name: &str, toml: &str, args: &[&str]) -> Result<Config, ConfigError> {
        let file = TempFile::new(name, toml);
        let mut argv = vec!["--config", file.path()];
        argv.extend_from_slice(args);
        config(&argv)
    }

    fn error_with_file(name: &str, toml: &str) -> (String, String) {
        let file = TempFile::new(name, toml);
        let error = config(&["--config", file.path()]).expect_err("file is rejected");
        (error.to_string(), file.path().to_owned())
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_apply_when_nothing_is_given() {
        let config = config(&[]).unwrap();
        assert_eq!(config.library, PathBuf::from("app.so"));
        assert_eq!(config.host, [DEFAULT_HOST]);
        assert_eq!(config.port, 8000);
        assert!(config.preflight);
        assert!(config.tcp);
        assert_eq!(config.uds, None);
        assert_eq!(config.uds_mode, 0o660);
        assert_eq!(config.tls, None);
        assert_eq!(config.admin_listen, None);
        assert!(WORKERS.contains(&config.workers));
        assert_eq!(config.backlog, 2048);
        assert_eq!(config.max_connections, 10_000);
        assert_eq!(config.reload_timeout, Duration::from_secs(30));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.request_timeout, Duration::from_secs(30));
        assert_eq!(config.keep_alive_timeout, Duration::from_secs(5));
        assert_eq!(config.header_timeout, Duration::from_secs(10));
        assert_eq!(config.send_timeout, Some(Duration::from_secs(30)));
        assert_eq!(config.max_body_size, 1 << 20);
        assert_eq!(config.max_header_size, 64 << 10);
        assert_eq!(config.h2_max_concurrent_streams, 200);
        assert_eq!(config.h2_keep_alive, Some(Duration::from_secs(20)));
        assert_eq!(config.health_path.as_deref(), Some("/health"));
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.log_level, "info");
        assert!(config.app_args.is_empty());
        assert!(config.unload_guard);
        assert!(!config.allow_insecure_library);
        assert_eq!(config.staging_dir, std::env::temp_dir());
    }

    #[test]
    fn flags_set_every_setting() {
        let config = config(&[
            "--host=0.0.0.0",
            "--host=::",
            "--port=0",
            "--uds=/run/pounce.sock",
            "--uds-mode=0600",
            "--tls-cert=/etc/pounce/cert.pem",
            "--tls-key=/etc/pounce/key.pem",
            "--admin-listen=9000",
            "--workers=3",
            "--backlog=16",
            "--max-connections=7",
            "--reload-timeout=1m",
            "--shutdown-timeout=2s",
            "--request-timeout=250ms",
            "--keep-alive-timeout=1",
            "--header-timeout=3s",
            "--send-timeout=off",
            "--max-body-size=0",
            "--max-header-size=8KiB",
            "--h2-max-concurrent-streams=5",
            "--h2-keep-alive=off",
            "--health-path=off",
            "--log-format=json",
            "--log-level=pounce_host=debug,warn",
            "--unload-guard=off",
            "--allow-insecure-library",
            "--staging-dir=/var/tmp/pounce",
        ])
        .unwrap();
        assert_eq!(config.host, [IpAddr::V4(Ipv4Addr::UNSPECIFIED), "::".parse().unwrap()]);
        assert_eq!(config.port, 0);
        assert!(config.tcp, "--host given: TCP besides the unix socket");
        assert_eq!(config.uds, Some(PathBuf::from("/run/pounce.sock")));
        assert_eq!(config.uds_mode, 0o600);
        let tls = TlsFiles { cert: "/etc/pounce/cert.pem".into(), key: "/etc/pounce/key.pem".into() };
        assert_eq!(config.tls, Some(tls));
        assert_eq!(config.admin_listen, Some(SocketAddr::from(([127, 0, 0, 1], 9000))));
        assert_eq!(config.workers, 3);
        assert_eq!(config.backlog, 16);
        assert_eq!(config.max_connections, 7);
        assert_eq!(config.reload_timeout, Duration::from_secs(60));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(2));
        assert_eq!(config.request_timeout, Duration::from_millis(250));
        assert_eq!(config.keep_alive_timeout, Duration::from_secs(1));
        assert_eq!(config.header_timeout, Duration::from_secs(3));
        assert_eq!(config.send_timeout, None);
        assert_eq!(config.max_body_size, 0);
        assert_eq!(config.max_header_size, 8192);
        assert_eq!(config.h2_max_concurrent_streams, 5);
        assert_eq!(config.h2_keep_alive, None);
        assert_eq!(config.health_path, None);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.log_level, "pounce_host=debug,warn");
        assert!(!config.unload_guard);
        assert!(config.allow_insecure_library);
        assert_eq!(config.staging_dir, PathBuf::from("/var/tmp/pounce"));
    }

    #[test]
    fn process_mode_settings_come_from_flags_and_file() {
        let config = config(&["--mode", "process", "--processes", "3", "--worker-timeout", "off"]).unwrap();
        assert_eq!(config.mode, Mode::Process);
        assert_eq!(config.processes, 3);
        assert_eq!(config.worker_timeout, None);
        assert_eq!(config.rollback_window, Some(DEFAULT_ROLLBACK_WINDOW));
        let toml = "mode = \"process\"\nprocesses = 2\nworker_timeout = \"2s\"\nmax_restarts = 9\nrestart_window = \"10s\"\nrollback_window = \"off\"\n";
        let config = config_with_file("process", toml, &[]).unwrap();
        assert_eq!(config.mode, Mode::Process);
        assert_eq!(config.processes, 2);
        assert_eq!(config.worker_timeout, Some(Duration::from_secs(2)));
        assert_eq!(config.max_restarts, 9);
        assert_eq!(config.restart_window, Duration::from_secs(10));
        assert_eq!(config.rollback_window, None);
        let (_, message) = error_with_file("badmode", "mode = \"fork\"\n");
        assert!(message.contains("mode"), "{message}");
    }

    #[test]
    fn file_sets_every_setting() {
        let toml = r#"
            host = "::1"
            port = 9000
            uds = "/run/pounce.sock"
            uds_mode = "600"
            tls_cert = "cert.pem"
            tls_key = "key.pem"
            admin_listen = "[::1]:9100"
            workers = 2
            backlog = 128
            max_connections = 500
            reload_timeout = "45s"
            shutdown_timeout = 20
            request_timeout = 1.5
            keep_alive_timeout = "500ms"
            header_timeout = "1m"
            send_timeout = "2s"
            stall_warning = "off"
            max_body_size = "4MiB"
            max_header_size = 16384
            h2_max_concurrent_streams = 64
            h2_keep_alive = "5s"
            health_path = "/healthz"
            log_format = "json"
            log_level = "debug"
            unload_guard = false
            allow_insecure_library = true
            staging_dir = "/var/tmp/pounce"

            [app]
            greeting = "hello"
            retries = 3
            ratio = 0.5
            verbose = true
        "#;
        let config = config_with_file("all-keys", toml, &[]).unwrap();
        assert_eq!(config.host, ["::1".parse::<IpAddr>().unwrap()]);
        assert_eq!(config.port, 9000);
        assert!(config.tcp);
        assert_eq!(config.uds, Some(PathBuf::from("/run/pounce.sock")));
        assert_eq!(config.uds_mode, 0o600);
        assert_eq!(config.tls, Some(TlsFiles { cert: "cert.pem".into(), key: "key.pem".into() }));
        assert_eq!(config.admin_listen, Some("[::1]:9100".parse().unwrap()));
        assert_eq!(config.workers, 2);
        assert_eq!(config.backlog, 128);
        assert_eq!(config.max_connections, 500);
        assert_eq!(config.reload_timeout, Duration::from_secs(45));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(config.request_timeout, Duration::from_millis(1500));
        assert_eq!(config.keep_alive_timeout, Duration::from_millis(500));
        assert_eq!(config.header_timeout, Duration::from_secs(60));
        assert_eq!(config.send_timeout, Some(Duration::from_secs(2)));
        assert_eq!(config.stall_warning, None);
        assert_eq!(config.max_body_size, 4 << 20);
        assert_eq!(config.max_header_size, 16384);
        assert_eq!(config.h2_max_concurrent_streams, 64);
        assert_eq!(config.h2_keep_alive, Some(Duration::from_secs(5)));
        assert_eq!(config.health_path.as_deref(), Some("/healthz"));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.log_level, "debug");
        assert!(!config.unload_guard);
        assert!(config.allow_insecure_library);
        assert_eq!(config.staging_dir, PathBuf::from("/var/tmp/pounce"));
        // `toml::Table` keeps keys sorted.
        let expected = [("greeting", "hello"), ("ratio", "0.5"), ("retries", "3"), ("verbose", "true")];
        assert_eq!(config.app_args, pairs(&expected));
    }

    #[test]
    fn file_accepts_off_spellings() {
        let toml = "health_path = \"off\"\nunload_guard = \"off\"\nsend_timeout = \"off\"\n";
        let config = config_with_file("off", toml, &[]).unwrap();
        assert_eq!(config.health_path, None);
        assert_eq!(config.send_timeout, None);
        assert!(!config.unload_guard);
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let toml = "port = 9000\nbacklog = 64\nhealth_path = \"off\"\n";
        let config = config_with_file("override", toml, &["--port=9100", "--health-path=/up"]).unwrap();
        assert_eq!(config.port, 9100);
        assert_eq!(config.health_path.as_deref(), Some("/up"));
        assert_eq!(config.backlog, 64);
        assert_eq!(config.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
    }

    /// The only test that sets `POUNCE_*` variables; see [`env_lock`].
    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let file = TempFile::new("precedence", "port = 1\nworkers = 2\nbacklog = 3\n");
        let _env = env_lock();
        let _vars = EnvVars::set(&[
            ("POUNCE_CONFIG", file.path()),
            ("POUNCE_PORT", "10"),
            ("POUNCE_WORKERS", "20"),
            ("POUNCE_HEALTH_PATH", "off"),
        ]);
        let cli = Cli::try_parse_from(["pounce-host", "serve", "app.so", "--port=100"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("parsed as check");
        };
        let config = Config::from_serve_args(args).unwrap();
        assert_eq!(config.port, 100, "flag over env and file");
        assert_eq!(config.workers, 20, "env over file");
        assert_eq!(config.health_path, None, "env over default");
        assert_eq!(config.backlog, 3, "file over default");
        assert_eq!(config.log_level, "info", "default");
    }

    /// `pounce-host check --config FILE app.so`.
    fn check_args(file: &TempFile) -> CheckArgs {
        CheckArgs {
            library: "app.so".into(),
            config: Some(file.0.clone()),
            app_args: Vec::new(),
            allow_insecure_library: None,
            staging_dir: None,
            timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn check_takes_the_library_file_settings_like_serve() {
        let empty = TempFile::new("check-library-empty", "");
        let settings = check_settings(&check_args(&empty)).unwrap();
        assert!(!settings.allow_insecure_library);
        assert_eq!(settings.staging_dir, std::env::temp_dir());

        let toml = "allow_insecure_library = true\nstaging_dir = \"/var/tmp/a\"\n";
        let file = TempFile::new("check-library", toml);
        let settings = check_settings(&check_args(&file)).unwrap();
        assert!(settings.allow_insecure_library, "from the file");
        assert_eq!(settings.staging_dir, PathBuf::from("/var/tmp/a"));
        let args = CheckArgs {
            allow_insecure_library: Some(values::Switch::Off),
            staging_dir: Some("/var/tmp/b".into()),
            ..check_args(&file)
        };
        let settings = check_settings(&args).unwrap();
        assert!(!settings.allow_insecure_library, "flag over file");
        assert_eq!(settings.staging_dir, PathBuf::from("/var/tmp/b"));

        let bad = TempFile::new("check-library-bad", "staging_dir = \"\"\n");
        let message = check_settings(&check_args(&bad)).unwrap_err().to_string();
        assert!(message.contains("staging_dir = \"\": empty"), "{message}");
        let args = CheckArgs { staging_dir: Some(PathBuf::new()), ..check_args(&empty) };
        let message = check_settings(&args).unwrap_err().to_string();
        assert!(message.starts_with("--staging-dir / POUNCE_STAGING_DIR = \"\": empty"), "{message}");
    }

    #[test]
    fn app_args_keep_first_position_and_last_value() {
        let toml = "[app]\na = \"1\"\nb = \"2\"\n";
        let args = ["--app-arg=b=3", "--app-arg=c=4", "--app-arg=a=5", "--app-arg=c=6"];
        let config = config_with_file("app-merge", toml, &args).unwrap();
        assert_eq!(config.app_args, pairs(&[("a", "5"), ("b", "3"), ("c", "6")]));
    }

    #[test]
    fn check_reads_app_args_from_file_and_flags() {
        let file = TempFile::new("check", "port = 9000\n[app]\nname = \"x\"\nmode = \"a\"\n");
        let args = CheckArgs { app_args: pairs(&[("mode", "b")]), ..check_args(&file) };
        let settings = check_settings(&args).unwrap();
        assert_eq!(settings.app_args, pairs(&[("mode", "b"), ("name", "x")]));
    }

    #[test]
    fn check_rejects_a_file_that_serve_would_reject() {
        let file = TempFile::new("check-bad", "prot = 9000\n");
        let error = check_settings(&check_args(&file)).unwrap_err();
        assert!(matches!(error, ConfigError::UnknownKey { .. }), "{error}");
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        for key in ["prot", "library", "reload-timeout"] {
            let (message, path) = error_with_file("unknown", &format!("{key} = 1\n"));
            let start = format!("config file {path}: unknown key {key:?}: expected one of host, port");
            assert!(message.starts_with(&start), "{message}");
        }
    }

    #[test]
    fn bad_file_values_name_the_file_key_and_expectation() {
        let (message, path) = error_with_file("bad-duration", "reload_timeout = \"abc\"\n");
        assert_eq!(
            message,
            format!(
                "config file {path}: reload_timeout = \"abc\": invalid duration: \
                 expected a number with a unit, e.g. 500ms, 30s or 2m"
            )
        );
        let cases = [
            ("port = 70000", "port = 70000: out of range: expected an integer from 0 to 65535"),
            ("port = \"80\"", "port = \"80\": expected an integer"),
            ("workers = 0", "workers = 0: out of range: expected an integer from 1 to 1024"),
            ("workers = -1", "workers = -1: out of range"),
            ("backlog = 0", "backlog = 0: out of range: expected an integer from 1 to"),
            ("max_connections = 0", "max_connections = 0: out of range: expected an integer from 1 to 1000000"),
            ("max_connections = 1000001", "max_connections = 1000001: out of range"),
            ("h2_max_concurrent_streams = 0", "h2_max_concurrent_streams = 0: out of range: expected an integer"),
            ("send_timeout = 0", "send_timeout = 0: must be greater than zero: expected e.g. 500ms, 30s or 2m, or off"),
            ("send_timeout = \"soon\"", "send_timeout = \"soon\": invalid duration: expected a number with a unit"),
            ("host = \"localhost\"", "host = \"localhost\": expected an IP address"),
            ("shutdown_timeout = 0", "shutdown_timeout = 0: must be greater than zero"),
            ("request_timeout = -3", "request_timeout = -3: invalid duration: must not be negative"),
            ("header_timeout = true", "header_timeout = true: expected a string or a number"),
            ("max_body_size = \"1 XB\"", "max_body_size = \"1 XB\": invalid size: unknown unit"),
            ("max_header_size = \"4KiB\"", "max_header_size = \"4KiB\": out of range: expected from 8KiB"),
            ("health_path = \"health\"", "health_path = \"health\": expected \"off\" or a URL path"),
            ("log_format = \"xml\"", "log_format = \"xml\": expected one of \"text\", \"json\""),
            ("log_level = \"pounce_host=loud\"", "log_level = \"pounce_host=loud\": error parsing level filter"),
            ("unload_guard = \"maybe\"", "unload_guard = \"maybe\": expected one of \"on\", \"off\", or true, false"),
            ("allow_insecure_library = 1", "allow_insecure_library = 1: expected a string, or true, false"),
            ("staging_dir = \"\"", "staging_dir = \"\": empty: expected a directory"),
            ("staging_dir = 7", "staging_dir = 7: expected a string"),
            ("app = 1", "app = 1: expected a table"),
            ("[app]\nlist = [1]", "app.list = [...]: expected a string, number or boolean"),
            ("[app]\n\"a=b\" = \"c\"", "app.a=b = \"c\": expected a non-empty key without '='"),
        ];
        for (toml, expected) in cases {
            let (message, path) = error_with_file("bad-value", toml);
            let start = format!("config file {path}: {expected}");
            assert!(message.starts_with(&start), "{toml}:\n{message}");
        }
    }

    #[test]
    fn unreadable_and_malformed_files_name_the_path() {
        let missing = std::env::temp_dir().join("pounce-config-test-does-not-exist.toml");
        let missing = missing.to_str().unwrap();
        let message = config(&["--config", missing]).unwrap_err().to_string();
        assert!(message.starts_with(&format!("config file {missing}: cannot read it: ")), "{message}");

        let (message, path) = error_with_file("malformed", "port = \n");
        assert!(message.starts_with(&format!("config file {path}: not valid TOML: ")), "{message}");
    }

    #[test]
    fn bad_flag_values_name_the_flag_and_env_var() {
        let cases = [
            ("--workers=0", "--workers / POUNCE_WORKERS = 0: out of range: expected an integer from 1 to 1024"),
            ("--workers=1025", "--workers / POUNCE_WORKERS = 1025: out of range"),
            ("--backlog=0", "--backlog / POUNCE_BACKLOG = 0: out of range"),
            (
                "--max-connections=0",
                "--max-connections / POUNCE_MAX_CONNECTIONS = 0: out of range: expected an integer",
            ),
            ("--max-connections=1000001", "--max-connections / POUNCE_MAX_CONNECTIONS = 1000001: out of range"),
            (
                "--h2-max-concurrent-streams=0",
                "--h2-max-concurrent-streams / POUNCE_H2_MAX_CONCURRENT_STREAMS = 0: out of range",
            ),
            ("--send-timeout=0", "--send-timeout / POUNCE_SEND_TIMEOUT = 0ns: must be greater than zero"),
            ("--reload-timeout=0s", "--reload-timeout / POUNCE_RELOAD_TIMEOUT = 0ns: must be greater than zero"),
            ("--keep-alive-timeout=0", "--keep-alive-timeout / POUNCE_KEEP_ALIVE_TIMEOUT = 0ns: must be greater"),
            (
                "--max-header-size=8191",
                "--max-header-size / POUNCE_MAX_HEADER_SIZE = 8191: out of range: expected from 8KiB",
            ),
            ("--max-header-size=17MiB", "--max-header-size / POUNCE_MAX_HEADER_SIZE = 17825792: out of range"),
            ("--health-path=health", "--health-path / POUNCE_HEALTH_PATH = \"health\": expected \"off\" or a URL path"),
            ("--health-path=/a b", "--health-path / POUNCE_HEALTH_PATH = \"/a b\": expected"),
            ("--health-path=/a?b", "--health-path / POUNCE_HEALTH_PATH = \"/a?b\": expected"),
            (
                "--log-level=pounce_host=loud",
                "--log-level / POUNCE_LOG_LEVEL = \"pounce_host=loud\": error parsing level filter",
            ),
            ("--log-level=", "--log-level / POUNCE_LOG_LEVEL = \"\": empty: expected a tracing filter"),
            ("--log-level==info", "--log-level / POUNCE_LOG_LEVEL = \"=info\": invalid filter directive"),
        ];
        for (flag, expected) in cases {
            let message = config(&[flag]).expect_err(flag).to_string();
            assert!(message.starts_with(expected), "{flag}:\n{message}");
        }
    }

    #[test]
    fn every_file_key_is_accepted() {
        let toml = r#"
            host = "127.0.0.1"
            port = 1
            uds = "/run/pounce.sock"
            uds_mode = "0660"
            tls_cert = "cert.pem"
            tls_key = "key.pem"
            admin_listen = 9000
            workers = 1
            backlog = 1
            max_connections = 1
            reload_timeout = 1
            shutdown_timeout = 1
            request_timeout = 1
            keep_alive_timeout = 1
            header_timeout = 1
            send_timeout = "off"
            stall_warning = "2s"
            max_body_size = 1
            max_header_size = "8KiB"
            h2_max_concurrent_streams = 1
            h2_keep_alive = "off"
            health_path = "/"
            log_format = "text"
            log_level = "warn"
            unload_guard = "on"
            reload = true
            reload_dir = ["templates"]
            reload_include = ".html,.css"
            metrics_path = "/metrics"
            access_log = "on"
            preflight = "off"
            mode = "thread"
            processes = 1
            worker_timeout = "off"
            max_restarts = 1
            restart_window = "1s"
            rollback_window = "1s"
            allow_insecure_library = "off"
            staging_dir = "/var/tmp"
            [app]
        "#;
        let table: toml::Table = toml.parse().unwrap();
        let mut keys: Vec<&str> = table.keys().map(String::as_str).collect();
        let mut known = FILE_KEYS.to_vec();
        keys.sort_unstable();
        known.sort_unstable();
        assert_eq!(keys, known);
        config_with_file("every-key", toml, &[]).unwrap();
    }

    #[test]
    fn listeners_choose_tcp_unix_or_both() {
        let only_unix = config(&["--uds=/run/p.sock"]).unwrap();
        assert!(!only_unix.tcp, "--uds alone: no TCP port");
        let both = config(&["--uds=/run/p.sock", "--port=8001"]).unwrap();
        assert!(both.tcp);
        let hosts = config_with_file("hosts", "host = [\"127.0.0.1\", \"::1\"]\n", &[]).unwrap();
        assert_eq!(hosts.host, ["127.0.0.1".parse::<IpAddr>().unwrap(), "::1".parse().unwrap()]);
        let hosts = config(&["--host=127.0.0.1,::1"]).unwrap();
        assert_eq!(hosts.host.len(), 2);
        let message = config(&["--host=::1,::1"]).unwrap_err().to_string();
        assert!(message.starts_with("--host / POUNCE_HOST = [::1, ::1]: ::1 is given twice"), "{message}");
    }

    #[test]
    fn tls_needs_both_files_and_listeners_check_their_values() {
        let message = config(&["--tls-cert=cert.pem"]).unwrap_err().to_string();
        assert!(message.contains("--tls-key / POUNCE_TLS_KEY (tls_key) is not"), "{message}");
        let message = config(&["--tls-key=key.pem"]).unwrap_err().to_string();
        assert!(message.contains("--tls-cert / POUNCE_TLS_CERT (tls_cert) is not"), "{message}");
        let cases = [
            ("--uds-mode=999", "--uds-mode / POUNCE_UDS_MODE = \"999\": expected octal permissions"),
            ("--uds-mode=01777", "--uds-mode / POUNCE_UDS_MODE = \"01777\": out of range"),
            ("--admin-listen=localhost:9", "--admin-listen / POUNCE_ADMIN_LISTEN = \"localhost:9\": expected PORT"),
        ];
        for (flag, expected) in cases {
            let message = config(&[flag]).expect_err(flag).to_string();
            assert!(message.starts_with(expected), "{flag}:\n{message}");
        }
        let (message, _) = error_with_file("bad-mode", "uds_mode = 660\n");
        assert!(message.contains("uds_mode = 660: expected a string"), "{message}");
        let config = config(&["--admin-listen=0.0.0.0:9100"]).unwrap();
        assert_eq!(config.admin_listen, Some(SocketAddr::from(([0, 0, 0, 0], 9100))));
    }
}
