//! One source's settings (the flags with their environment variables, or
//! the config file), each checked on its own so that an error names where
//! the bad value came from.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::checks::{
    check_dir, check_extensions, check_file, check_header_size, check_health_path, check_hosts, check_log_level,
    check_timeout, check_timeout_or_off, in_range, parse_admin_listen, parse_mode, BACKLOG, H2_MAX_CONCURRENT_STREAMS,
    MAX_CONNECTIONS, PROCESSES, RESTARTS, WORKERS,
};
use super::cli::ServeArgs;
use super::error::{ConfigError, Origin};
use super::values::{LogFormat, Mode};

/// The settings one source gave; `None` means that source left it unset.
#[derive(Debug, Default)]
pub struct Layer {
    pub host: Option<Vec<IpAddr>>,
    pub port: Option<u16>,
    pub uds: Option<PathBuf>,
    pub uds_mode: Option<u32>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub admin_listen: Option<SocketAddr>,
    pub workers: Option<usize>,
    pub backlog: Option<u32>,
    pub max_connections: Option<usize>,
    pub reload_timeout: Option<Duration>,
    pub shutdown_timeout: Option<Duration>,
    pub request_timeout: Option<Duration>,
    pub keep_alive_timeout: Option<Duration>,
    pub header_timeout: Option<Duration>,
    /// `Some(None)` means explicitly turned off.
    pub send_timeout: Option<Option<Duration>>,
    pub stall_warning: Option<Option<Duration>>,
    pub max_body_size: Option<u64>,
    pub max_header_size: Option<usize>,
    pub h2_max_concurrent_streams: Option<u32>,
    /// `Some(None)` means explicitly turned off.
    pub h2_keep_alive: Option<Option<Duration>>,
    /// `Some(None)` means explicitly turned off.
    pub health_path: Option<Option<String>>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub unload_guard: Option<bool>,
    pub mode: Option<Mode>,
    pub processes: Option<usize>,
    /// `Some(None)` means explicitly turned off.
    pub worker_timeout: Option<Option<Duration>>,
    pub max_restarts: Option<u32>,
    pub restart_window: Option<Duration>,
    pub rollback_window: Option<Option<Duration>>,
    pub app_args: Vec<(String, String)>,
    pub reload: Option<bool>,
    pub reload_dirs: Option<Vec<PathBuf>>,
    pub reload_include: Option<Vec<String>>,
    pub metrics_path: Option<Option<String>>,
    pub access_log: Option<bool>,
    pub preflight: Option<bool>,
    pub allow_insecure_library: Option<bool>,
    pub staging_dir: Option<PathBuf>,
}

impl Layer {
    /// Checks the values clap parsed from flags and environment variables.
    pub fn from_flags(args: ServeArgs) -> Result<Layer, ConfigError> {
        Ok(Layer {
            host: flag("host", non_empty(args.host), check_hosts)?,
            port: args.port,
            uds: flag("uds", args.uds, check_file)?,
            uds_mode: flag("uds_mode", args.uds_mode, |text| parse_mode(&text))?,
            tls_cert: flag("tls_cert", args.tls_cert, check_file)?,
            tls_key: flag("tls_key", args.tls_key, check_file)?,
            admin_listen: flag("admin_listen", args.admin_listen, |text| parse_admin_listen(&text))?,
            workers: flag("workers", args.workers, |n| in_range(n, &WORKERS))?,
            backlog: flag("backlog", args.backlog, |n| in_range(n, &BACKLOG))?,
            max_connections: flag("max_connections", args.max_connections, |n| in_range(n, &MAX_CONNECTIONS))?,
            reload_timeout: flag("reload_timeout", args.reload_timeout, check_timeout)?,
            shutdown_timeout: flag("shutdown_timeout", args.shutdown_timeout, check_timeout)?,
            request_timeout: flag("request_timeout", args.request_timeout, check_timeout)?,
            keep_alive_timeout: flag("keep_alive_timeout", args.keep_alive_timeout, check_timeout)?,
            header_timeout: flag("header_timeout", args.header_timeout, check_timeout)?,
            send_timeout: flag("send_timeout", args.send_timeout, check_timeout_or_off)?,
            stall_warning: flag("stall_warning", args.stall_warning, check_timeout_or_off)?,
            max_body_size: args.max_body_size,
            max_header_size: flag("max_header_size", args.max_header_size, check_header_size)?,
            h2_max_concurrent_streams: flag("h2_max_concurrent_streams", args.h2_max_concurrent_streams, |n| {
                in_range(n, &H2_MAX_CONCURRENT_STREAMS)
            })?,
            h2_keep_alive: flag("h2_keep_alive", args.h2_keep_alive, check_timeout_or_off)?,
            health_path: flag("health_path", args.health_path, check_health_path)?,
            log_format: args.log_format,
            log_level: flag("log_level", args.log_level, check_log_level)?,
            unload_guard: args.unload_guard.map(bool::from),
            mode: args.mode,
            processes: flag("processes", args.processes, |n| in_range(n, &PROCESSES))?,
            worker_timeout: flag("worker_timeout", args.worker_timeout, check_timeout_or_off)?,
            max_restarts: flag("max_restarts", args.max_restarts, |n| in_range(n, &RESTARTS))?,
            restart_window: flag("restart_window", args.restart_window, check_timeout)?,
            rollback_window: flag("rollback_window", args.rollback_window, check_timeout_or_off)?,
            app_args: args.app_args,
            reload: args.reload.map(bool::from),
            reload_dirs: (!args.reload_dir.is_empty()).then_some(args.reload_dir),
            reload_include: flag("reload_include", non_empty(args.reload_include), check_extensions)?,
            metrics_path: flag("metrics_path", args.metrics_path, check_health_path)?,
            access_log: args.access_log.map(bool::from),
            preflight: args.preflight.map(bool::from),
            allow_insecure_library: args.allow_insecure_library.map(bool::from),
            staging_dir: flag("staging_dir", args.staging_dir, check_dir)?,
        })
    }
}

fn non_empty<T>(values: Vec<T>) -> Option<Vec<T>> {
    (!values.is_empty()).then_some(values)
}

/// Checks a value given by flag or environment variable, if there is one.
pub(super) fn flag<T: fmt::Debug, U>(
    key: &'static str,
    value: Option<T>,
    check: impl FnOnce(T) -> Result<U, String>,
) -> Result<Option<U>, ConfigError> {
    value
        .map(|value| {
            let shown = format!("{value:?}");
            check(value).map_err(|problem| ConfigError::InvalidValue {
                origin: Origin::Flag { key },
                value: shown,
                problem,
            })
        })
        .transpose()
}
