//! The host's settings: merged from flags, environment, config file and
//! built-in defaults, validated once, then frozen in [`Config`].
//!
//! Each source is read into a `Layer` and validated on its own, so that an
//! error can say exactly where the bad value came from. A bad value in the
//! config file is an error even when a flag overrides it: a broken file
//! should not wait for the day the flag is dropped.

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use toml::Value;
use tracing_subscriber::EnvFilter;

use crate::cli::{CheckArgs, ServeArgs, Switch};

const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const DEFAULT_PORT: u16 = 8000;
const DEFAULT_BACKLOG: u32 = 2048;
const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_BODY_SIZE: u64 = 1 << 20;
const DEFAULT_MAX_HEADER_SIZE: usize = 64 << 10;
const DEFAULT_HEALTH_PATH: &str = "/health";
const DEFAULT_LOG_LEVEL: &str = "info";

const PORTS: RangeInclusive<u16> = 0..=u16::MAX;
const WORKERS: RangeInclusive<usize> = 1..=1024;
/// `listen(2)` takes a C `int`.
const BACKLOG: RangeInclusive<u32> = 1..=i32::MAX as u32;
/// hyper's `max_buf_size` panics below 8 KiB; beyond 16 MiB a header limit
/// no longer protects memory.
const HEADER_SIZES: RangeInclusive<usize> = 8 << 10..=16 << 20;

/// Top-level keys of the config file, listed in the unknown-key error.
/// `library` is not among them: only the command line chooses which code
/// runs.
const FILE_KEYS: [&str; 21] = [
    "host",
    "port",
    "workers",
    "backlog",
    "reload_timeout",
    "shutdown_timeout",
    "request_timeout",
    "keep_alive_timeout",
    "header_timeout",
    "max_body_size",
    "max_header_size",
    "health_path",
    "log_format",
    "log_level",
    "unload_guard",
    "reload",
    "reload_dir",
    "reload_include",
    "metrics_path",
    "access_log",
    "app",
];

/// The host's fully resolved settings, fixed for the life of the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub library: PathBuf,
    pub host: IpAddr,
    pub port: u16,
    pub workers: usize,
    pub backlog: u32,
    pub reload_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub request_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub header_timeout: Duration,
    pub max_body_size: u64,
    pub max_header_size: usize,
    /// `None` when the health endpoint is turned off.
    pub health_path: Option<String>,
    pub log_format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, already checked to parse.
    pub log_level: String,
    /// The config file's `[app]` table, then `--app-arg`s; one entry per key,
    /// holding the last value given, at the position the key first appeared.
    pub app_args: Vec<(String, String)>,
    pub unload_guard: bool,
    /// Watch files and reload on change (development).
    pub reload: bool,
    pub reload_dirs: Vec<PathBuf>,
    /// Extensions without the dot, lowercase; empty means every file.
    pub reload_include: Vec<String>,
    pub metrics_path: Option<String>,
    pub access_log: bool,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// A setting that cannot be used. Each message says where the value came
/// from, what is wrong with it and what is expected instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file is missing or unreadable.
    #[error("config file {}: cannot read it: {error}", path.display())]
    ReadFile { path: PathBuf, error: io::Error },
    /// The `--config` file is not TOML at all.
    #[error("config file {}: not valid TOML: {error}", path.display())]
    ParseFile { path: PathBuf, error: toml::de::Error },
    /// A config file key that no setting has, most likely a typo.
    #[error(
        "config file {}: unknown key {key:?}: expected one of {}",
        path.display(),
        FILE_KEYS.join(", ")
    )]
    UnknownKey { path: PathBuf, key: String },
    /// A value of the wrong type, malformed, or out of range.
    #[error("{origin} = {value}: {problem}")]
    InvalidValue {
        origin: Origin,
        /// The value as the operator wrote it (quoted if it is text).
        value: String,
        problem: String,
    },
}

/// Where a setting's value came from, so an error points at the right place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A flag or its environment variable; clap does not say which.
    Flag { key: &'static str },
    /// A key of the config file; `app.<name>` for the `[app]` table.
    File { path: PathBuf, key: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag { key } => write!(f, "--{} / POUNCE_{}", key.replace('_', "-"), key.to_ascii_uppercase()),
            Origin::File { path, key } => write!(f, "config file {}: {key}", path.display()),
        }
    }
}

impl Config {
    /// Resolves every setting (flag > environment > config file > default)
    /// and checks it, so that serving never starts with a value it would
    /// trip over later.
    pub fn from_serve_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let file = Layer::from_optional_file(args.config.as_deref())?;
        let library = args.library.clone();
        let flags = Layer::from_flags(args)?;
        Ok(merge(library, flags, file))
    }
}

/// The app settings for `pounce-host check`: the config file's `[app]` table
/// overridden by `--app-arg`s. The rest of the file is validated as well, so
/// that check fails on a file that serve would reject.
pub fn app_args_for_check(args: &CheckArgs) -> Result<Vec<(String, String)>, ConfigError> {
    let file = Layer::from_optional_file(args.config.as_deref())?;
    Ok(merge_app_args(file.app_args, args.app_args.clone()))
}

/// The settings one source gave; `None` means that source left it unset.
#[derive(Debug, Default)]
struct Layer {
    host: Option<IpAddr>,
    port: Option<u16>,
    workers: Option<usize>,
    backlog: Option<u32>,
    reload_timeout: Option<Duration>,
    shutdown_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    keep_alive_timeout: Option<Duration>,
    header_timeout: Option<Duration>,
    max_body_size: Option<u64>,
    max_header_size: Option<usize>,
    /// `Some(None)` means explicitly turned off.
    health_path: Option<Option<String>>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    unload_guard: Option<bool>,
    app_args: Vec<(String, String)>,
    reload: Option<bool>,
    reload_dirs: Option<Vec<PathBuf>>,
    reload_include: Option<Vec<String>>,
    metrics_path: Option<Option<String>>,
    access_log: Option<bool>,
}

impl Layer {
    /// Checks the values clap parsed from flags and environment variables.
    fn from_flags(args: ServeArgs) -> Result<Layer, ConfigError> {
        Ok(Layer {
            host: args.host,
            port: args.port,
            workers: flag("workers", args.workers, |n| in_range(n, &WORKERS))?,
            backlog: flag("backlog", args.backlog, |n| in_range(n, &BACKLOG))?,
            reload_timeout: flag("reload_timeout", args.reload_timeout, check_timeout)?,
            shutdown_timeout: flag("shutdown_timeout", args.shutdown_timeout, check_timeout)?,
            request_timeout: flag("request_timeout", args.request_timeout, check_timeout)?,
            keep_alive_timeout: flag("keep_alive_timeout", args.keep_alive_timeout, check_timeout)?,
            header_timeout: flag("header_timeout", args.header_timeout, check_timeout)?,
            max_body_size: args.max_body_size,
            max_header_size: flag("max_header_size", args.max_header_size, check_header_size)?,
            health_path: flag("health_path", args.health_path, check_health_path)?,
            log_format: args.log_format,
            log_level: flag("log_level", args.log_level, check_log_level)?,
            unload_guard: args.unload_guard.map(bool::from),
            app_args: args.app_args,
            reload: args.reload.map(bool::from),
            reload_dirs: (!args.reload_dir.is_empty()).then_some(args.reload_dir),
            reload_include: flag("reload_include", non_empty(args.reload_include), check_extensions)?,
            metrics_path: flag("metrics_path", args.metrics_path, check_health_path)?,
            access_log: args.access_log.map(bool::from),
        })
    }

    /// The config file's settings, or none if there is no config file.
    fn from_optional_file(path: Option<&Path>) -> Result<Layer, ConfigError> {
        path.map_or_else(|| Ok(Layer::default()), Layer::from_file)
    }

    /// Reads and checks a config file. Unknown keys are errors: a typo must
    /// not silently leave a setting at its default.
    fn from_file(path: &Path) -> Result<Layer, ConfigError> {
        let text = fs::read_to_string(path).map_err(|error| ConfigError::ReadFile { path: path.to_owned(), error })?;
        let table: toml::Table =
            text.parse().map_err(|error| ConfigError::ParseFile { path: path.to_owned(), error })?;
        let mut layer = Layer::default();
        for (key, value) in &table {
            let parsed = match key.as_str() {
                "host" => put(&mut layer.host, text_of(value).and_then(|text| parse_host(&text))),
                "port" => put(&mut layer.port, integer_in(value, &PORTS)),
                "workers" => put(&mut layer.workers, integer_in(value, &WORKERS)),
                "backlog" => put(&mut layer.backlog, integer_in(value, &BACKLOG)),
                "reload_timeout" => put(&mut layer.reload_timeout, timeout(value)),
                "shutdown_timeout" => put(&mut layer.shutdown_timeout, timeout(value)),
                "request_timeout" => put(&mut layer.request_timeout, timeout(value)),
                "keep_alive_timeout" => put(&mut layer.keep_alive_timeout, timeout(value)),
                "header_timeout" => put(&mut layer.header_timeout, timeout(value)),
                "max_body_size" => put(&mut layer.max_body_size, size(value)),
                "max_header_size" => put(&mut layer.max_header_size, size(value).and_then(check_header_size)),
                "health_path" => put(&mut layer.health_path, text_of(value).and_then(check_health_path)),
                "log_format" => put(&mut layer.log_format, choice(value)),
                "log_level" => put(&mut layer.log_level, text_of(value).and_then(check_log_level)),
                "unload_guard" => put(&mut layer.unload_guard, switch(value)),
                "reload" => put(&mut layer.reload, switch(value)),
                "reload_dir" => {
                    put(&mut layer.reload_dirs, list(value).map(|dirs| dirs.into_iter().map(PathBuf::from).collect()))
                }
                "reload_include" => put(&mut layer.reload_include, list(value).and_then(check_extensions)),
                "metrics_path" => put(&mut layer.metrics_path, text_of(value).and_then(check_health_path)),
                "access_log" => put(&mut layer.access_log, switch(value)),
                "app" => {
                    layer.app_args = app_table(path, value)?;
                    Ok(())
                }
                _ => return Err(ConfigError::UnknownKey { path: path.to_owned(), key: key.clone() }),
            };
            parsed.map_err(|problem| invalid_in_file(path, key.clone(), value, problem))?;
        }
        Ok(layer)
    }
}

/// Combines the command line over the file over the built-in defaults.
fn merge(library: PathBuf, flags: Layer, file: Layer) -> Config {
    Config {
        library,
        host: flags.host.or(file.host).unwrap_or(DEFAULT_HOST),
        port: flags.port.or(file.port).unwrap_or(DEFAULT_PORT),
        workers: flags.workers.or(file.workers).unwrap_or_else(default_workers),
        backlog: flags.backlog.or(file.backlog).unwrap_or(DEFAULT_BACKLOG),
        reload_timeout: flags.reload_timeout.or(file.reload_timeout).unwrap_or(DEFAULT_RELOAD_TIMEOUT),
        shutdown_timeout: flags.shutdown_timeout.or(file.shutdown_timeout).unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
        request_timeout: flags.request_timeout.or(file.request_timeout).unwrap_or(DEFAULT_REQUEST_TIMEOUT),
        keep_alive_timeout: flags.keep_alive_timeout.or(file.keep_alive_timeout).unwrap_or(DEFAULT_KEEP_ALIVE_TIMEOUT),
        header_timeout: flags.header_timeout.or(file.header_timeout).unwrap_or(DEFAULT_HEADER_TIMEOUT),
        max_body_size: flags.max_body_size.or(file.max_body_size).unwrap_or(DEFAULT_MAX_BODY_SIZE),
        max_header_size: flags.max_header_size.or(file.max_header_size).unwrap_or(DEFAULT_MAX_HEADER_SIZE),
        health_path: flags.health_path.or(file.health_path).unwrap_or_else(|| Some(DEFAULT_HEALTH_PATH.to_owned())),
        log_format: flags.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
        log_level: flags.log_level.or(file.log_level).unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned()),
        unload_guard: flags.unload_guard.or(file.unload_guard).unwrap_or(true),
        app_args: merge_app_args(file.app_args, flags.app_args),
        reload: flags.reload.or(file.reload).unwrap_or(false),
        reload_dirs: flags.reload_dirs.or(file.reload_dirs).unwrap_or_default(),
        reload_include: flags.reload_include.or(file.reload_include).unwrap_or_default(),
        metrics_path: flags.metrics_path.or(file.metrics_path).unwrap_or(None),
        access_log: flags.access_log.or(file.access_log).unwrap_or(false),
    }
}

fn non_empty<T>(values: Vec<T>) -> Option<Vec<T>> {
    (!values.is_empty()).then_some(values)
}

/// A list setting: a TOML array of strings, or one comma-separated string.
fn list(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::String(text) => Ok(text.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()),
        Value::Array(items) => items.iter().map(text_of).collect(),
        _ => Err("expected an array of strings or a comma-separated string".to_owned()),
    }
}

/// File extensions, written with or without the dot: stored without it,
/// lowercase.
fn check_extensions(extensions: Vec<String>) -> Result<Vec<String>, String> {
    extensions
        .into_iter()
        .map(|ext| {
            let ext = ext.trim().trim_start_matches('.').to_ascii_lowercase();
            if ext.is_empty() || ext.contains(['/', '.', '*']) {
                Err("expected file extensions such as .html,.css".to_owned())
            } else {
                Ok(ext)
            }
        })
        .collect()
}

/// One worker per CPU the process may use, within the allowed range.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get).min(*WORKERS.end())
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

/// Checks a value given by flag or environment variable, if there is one.
fn flag<T: fmt::Debug, U>(
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

fn invalid_in_file(path: &Path, key: String, value: &Value, problem: String) -> ConfigError {
    ConfigError::InvalidValue { origin: Origin::File { path: path.to_owned(), key }, value: show(value), problem }
}

/// Renders a TOML value roughly as written, for error messages (the `toml`
/// crate is built without its serializer).
fn show(value: &Value) -> String {
    match value {
        Value::String(text) => format!("{text:?}"),
        Value::Integer(n) => n.to_string(),
        Value::Float(x) => x.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(when) => when.to_string(),
        Value::Array(_) => "[...]".to_owned(),
        Value::Table(_) => "{...}".to_owned(),
    }
}

/// Reads the `[app]` table: the app sees every value as a string.
fn app_table(path: &Path, value: &Value) -> Result<Vec<(String, String)>, ConfigError> {
    let table =
        value.as_table().ok_or_else(|| invalid_in_file(path, "app".to_owned(), value, "expected a table".into()))?;
    table
        .iter()
        .map(|(key, value)| {
            let text = check_app_key(key).and_then(|()| match value {
                Value::String(text) => Ok(text.clone()),
                Value::Integer(_) | Value::Float(_) | Value::Boolean(_) => Ok(show(value)),
                _ => Err("expected a string, number or boolean".to_owned()),
            });
            let text = text.map_err(|problem| invalid_in_file(path, format!("app.{key}"), value, problem))?;
            Ok((key.clone(), text))
        })
        .collect()
}

/// Stores a file setting once it has parsed.
fn put<T>(slot: &mut Option<T>, parsed: Result<T, String>) -> Result<(), String> {
    *slot = Some(parsed?);
    Ok(())
}

fn text_of(value: &Value) -> Result<String, String> {
    value.as_str().map(str::to_owned).ok_or_else(|| "expected a string".to_owned())
}

/// Durations and sizes may be written as strings or as bare numbers; both
/// go through the same parser as the command line.
fn number_or_text(value: &Value) -> Result<String, String> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Integer(_) | Value::Float(_) => Ok(show(value)),
        _ => Err("expected a string or a number".to_owned()),
    }
}

fn integer_in<T>(value: &Value, range: &RangeInclusive<T>) -> Result<T, String>
where
    T: TryFrom<i64> + PartialOrd + fmt::Display,
{
    let n = value.as_integer().ok_or_else(|| range_problem("expected an integer", range))?;
    in_range(n, range)
}

fn timeout(value: &Value) -> Result<Duration, String> {
    number_or_text(value).and_then(|text| parse_duration(&text)).and_then(check_timeout)
}

fn size(value: &Value) -> Result<u64, String> {
    number_or_text(value).and_then(|text| parse_size(&text))
}

/// Parses a string setting the way clap parses the matching flag.
fn choice<E: ValueEnum>(value: &Value) -> Result<E, String> {
    let text = text_of(value)?;
    E::from_str(&text, true).map_err(|_| {
        let names: Vec<String> = E::value_variants()
            .iter()
            .filter_map(E::to_possible_value)
            .map(|possible| format!("{:?}", possible.get_name()))
            .collect();
        format!("expected one of {}", names.join(", "))
    })
}

/// TOML has real booleans; accept them besides the flag's `on`/`off`.
fn switch(value: &Value) -> Result<bool, String> {
    match value {
        Value::Boolean(on) => Ok(*on),
        _ => choice::<Switch>(value).map(bool::from).map_err(|problem| format!("{problem}, or true, false")),
    }
}

fn parse_host(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|_| "expected an IP address such as 127.0.0.1 or ::1".to_owned())
}

/// Converts `n` to the setting's type if it lies in `range`.
fn in_range<N, T>(n: N, range: &RangeInclusive<T>) -> Result<T, String>
where
    T: TryFrom<N> + PartialOrd + fmt::Display,
{
    T::try_from(n).ok().filter(|n| range.contains(n)).ok_or_else(|| range_problem("out of range", range))
}

fn range_problem<T: fmt::Display>(problem: &str, range: &RangeInclusive<T>) -> String {
    format!("{problem}: expected an integer from {} to {}", range.start(), range.end())
}

/// A zero timeout would fail every request (or reload, or drain) at once.
fn check_timeout(duration: Duration) -> Result<Duration, String> {
    if duration.is_zero() {
        Err("must be greater than zero: expected e.g. 500ms, 30s or 2m".to_owned())
    } else {
        Ok(duration)
    }
}

fn check_header_size(bytes: u64) -> Result<usize, String> {
    usize::try_from(bytes)
        .ok()
        .filter(|bytes| HEADER_SIZES.contains(bytes))
        .ok_or_else(|| "out of range: expected from 8KiB (hyper's smallest read buffer) to 16MiB".to_owned())
}

/// `off` turns the endpoint off; anything else must be a plain URL path, or
/// no request could ever match it.
fn check_health_path(path: String) -> Result<Option<String>, String> {
    if path.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let plain = !path.chars().any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#');
    if path.starts_with('/') && plain {
        Ok(Some(path))
    } else {
        Err("expected \"off\" or a URL path starting with \"/\" and without spaces, ? or #, e.g. /health".to_owned())
    }
}

/// Parses the filter now, so that a typo fails at startup rather than
/// silently logging nothing.
fn check_log_level(filter: String) -> Result<String, String> {
    const EXPECTED: &str = "expected a tracing filter such as info or pounce_host=debug,warn";
    if filter.trim().is_empty() {
        return Err(format!("empty: {EXPECTED}"));
    }
    match EnvFilter::try_new(&filter) {
        Ok(_) => Ok(filter),
        Err(error) => Err(format!("{error}: {EXPECTED}")),
    }
}

/// The app's settings reach it as `KEY=VALUE` strings, so a key can hold
/// neither `=` nor be empty.
fn check_app_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.contains('=') {
        Err("expected a non-empty key without '='".to_owned())
    } else {
        Ok(())
    }
}

/// Parses `--app-arg KEY=VALUE`; the value may itself contain `=`.
pub fn parse_app_arg(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| "expected KEY=VALUE".to_owned())?;
    check_app_key(key)?;
    Ok((key.to_owned(), value.to_owned()))
}

const NANOS_PER_SEC: u128 = 1_000_000_000;
const DURATION_EXPECTED: &str = "expected a number with a unit, e.g. 500ms, 30s or 2m";
const SIZE_EXPECTED: &str = "expected a number of bytes with an optional unit, e.g. 65536, 64KiB or 1MiB";

/// Parses a duration such as `500ms`, `30s`, `1.5s`, `2m` or `1h`; a bare
/// number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let quantity =
        Quantity::parse(text, DURATION_EXPECTED).map_err(|problem| format!("invalid duration: {problem}"))?;
    let nanos_per_unit = match quantity.unit {
        "" | "s" => NANOS_PER_SEC,
        "ms" => NANOS_PER_SEC / 1000,
        "m" => 60 * NANOS_PER_SEC,
        "h" => 3600 * NANOS_PER_SEC,
        unit => return Err(format!("invalid duration: unknown unit {unit:?}: expected ms, s, m or h")),
    };
    let too_large = || "invalid duration: too large".to_owned();
    let nanos = quantity.scaled(nanos_per_unit).ok_or_else(too_large)?;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| too_large())?;
    // The remainder is below one billion, so it fits.
    let subsec_nanos = (nanos % NANOS_PER_SEC) as u32;
    Ok(Duration::new(secs, subsec_nanos))
}

/// Parses a byte size such as `1048576`, `512KiB`, `1MiB`, `1GiB` or `64KB`
/// (decimal: 64000). Units are case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let quantity = Quantity::parse(text, SIZE_EXPECTED).map_err(|problem| format!("invalid size: {problem}"))?;
    if !quantity.fraction.is_empty() {
        return Err("invalid size: expected a whole number, e.g. 1536KiB rather than 1.5MiB".into());
    }
    let bytes_per_unit: u128 = match quantity.unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size: unknown unit {:?}: expected B, KB, MB, GB, KiB, MiB or GiB",
                quantity.unit
            ))
        }
    };
    quantity
        .scaled(bytes_per_unit)
        .and_then(|bytes| u64::try_from(bytes).ok())
        .ok_or_else(|| "invalid size: too large".to_owned())
}

/// Formats a duration in the largest unit that shows it exactly, in a form
/// [`parse_duration`] reads back: `30s`, `2m`, `1h`, `500ms`, `1.0000005s`.
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    let nanos = duration.subsec_nanos();
    if nanos == 0 {
        match secs {
            0 => "0s".to_owned(),
            s if s % 3600 == 0 => format!("{}h", s / 3600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    } else if nanos % 1_000_000 == 0 {
        format!("{}ms", duration.as_millis())
    } else {
        let fraction = format!("{nanos:09}");
        format!("{secs}.{}s", fraction.trim_end_matches('0'))
    }
}

/// A non-negative decimal number and the unit after it, as in `1.5s` or
/// `64 KiB`; kept as digits so that scaling loses nothing to floating point.
struct Quantity<'a> {
    whole: &'a str,
    fraction: &'a str,
    unit: &'a str,
}

impl<'a> Quantity<'a> {
    fn parse(text: &'a str, expected: &str) -> Result<Quantity<'a>, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err(format!("empty value: {expected}"));
        }
        if text.starts_with('-') {
            return Err(format!("must not be negative: {expected}"));
        }
        let number_len = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
        let (number, unit) = text.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let well_formed = !whole.is_empty() && !fraction.contains('.') && !number.ends_with('.');
        if !well_formed {
            return Err(expected.to_owned());
        }
        Ok(Quantity { whole, fraction, unit: unit.trim_start() })
    }

    /// The quantity in units of `1 / per_unit`, rounded down; `None` on
    /// overflow. Digits past the 18th after the point cannot matter at
    /// nanosecond precision and are dropped.
    fn scaled(&self, per_unit: u128) -> Option<u128> {
        let fraction = &self.fraction[..self.fraction.len().min(18)];
        let mantissa: u128 = format!("{}{fraction}", self.whole).parse().ok()?;
        let scale = 10u128.pow(fraction.len() as u32);
        mantissa.checked_mul(per_unit).map(|n| n / scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::tests::{env_lock, serve_args};
    use crate::cli::{Cli, Command};
    use clap::Parser;

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
    fn durations_parse() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("45", Duration::from_secs(45)),
            ("0", Duration::ZERO),
            ("1.5s", Duration::from_millis(1500)),
            ("0.25m", Duration::from_secs(15)),
            (" 30 s ", Duration::from_secs(30)),
            ("1.0000005s", Duration::new(1, 500)),
            ("0.0000000019s", Duration::from_nanos(1)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_durations_are_rejected_with_a_reason() {
        let expected = "expected a number with a unit, e.g. 500ms, 30s or 2m";
        let cases = [
            ("abc", format!("invalid duration: {expected}")),
            ("", format!("invalid duration: empty value: {expected}")),
            ("-5s", format!("invalid duration: must not be negative: {expected}")),
            ("5x", "invalid duration: unknown unit \"x\": expected ms, s, m or h".to_owned()),
            ("5sec", "invalid duration: unknown unit \"sec\": expected ms, s, m or h".to_owned()),
            ("1.2.3s", format!("invalid duration: {expected}")),
            ("1.s", format!("invalid duration: {expected}")),
            (".5s", format!("invalid duration: {expected}")),
            ("s", format!("invalid duration: {expected}")),
            ("99999999999999999999999h", "invalid duration: too large".to_owned()),
            ("999999999999999999999999999999999999999s", "invalid duration: too large".to_owned()),
        ];
        for (text, message) in cases {
            assert_eq!(parse_duration(text), Err(message), "{text:?}");
        }
    }

    #[test]
    fn sizes_parse() {
        let cases = [
            ("1048576", 1 << 20),
            ("512KiB", 512 << 10),
            ("1MiB", 1 << 20),
            ("1GiB", 1 << 30),
            ("64KB", 64_000),
            ("1MB", 1_000_000),
            ("1gb", 1_000_000_000),
            ("10b", 10),
            ("10B", 10),
            ("1mib", 1 << 20),
            (" 64 KiB ", 64 << 10),
            ("0", 0),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_sizes_are_rejected_with_a_reason() {
        let cases = [
            ("", "empty value"),
            ("-1", "must not be negative"),
            ("1.5MiB", "whole number"),
            ("1XB", "unknown unit \"XB\""),
            ("abc", "e.g. 65536, 64KiB or 1MiB"),
            ("99999999999GiB", "too large"),
            ("99999999999999999999", "too large"),
        ];
        for (text, reason) in cases {
            let message = parse_size(text).expect_err(text);
            assert!(message.starts_with("invalid size: "), "{message}");
            assert!(message.contains(reason), "{text:?}: {message}");
        }
    }

    #[test]
    fn durations_format_in_their_largest_exact_unit_and_read_back() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::new(1, 500), "1.0000005s"),
        ];
        for (duration, text) in cases {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration));
        }
    }

    #[test]
    fn defaults_apply_when_nothing_is_given() {
        let config = config(&[]).unwrap();
        assert_eq!(config.library, PathBuf::from("app.so"));
        assert_eq!(config.host, DEFAULT_HOST);
        assert_eq!(config.port, 8000);
        assert!(WORKERS.contains(&config.workers));
        assert_eq!(config.backlog, 2048);
        assert_eq!(config.reload_timeout, Duration::from_secs(30));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.request_timeout, Duration::from_secs(30));
        assert_eq!(config.keep_alive_timeout, Duration::from_secs(5));
        assert_eq!(config.header_timeout, Duration::from_secs(10));
        assert_eq!(config.max_body_size, 1 << 20);
        assert_eq!(config.max_header_size, 64 << 10);
        assert_eq!(config.health_path.as_deref(), Some("/health"));
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.log_level, "info");
        assert!(config.app_args.is_empty());
        assert!(config.unload_guard);
    }

    #[test]
    fn flags_set_every_setting() {
        let config = config(&[
            "--host=0.0.0.0",
            "--port=0",
            "--workers=3",
            "--backlog=16",
            "--reload-timeout=1m",
            "--shutdown-timeout=2s",
            "--request-timeout=250ms",
            "--keep-alive-timeout=1",
            "--header-timeout=3s",
            "--max-body-size=0",
            "--max-header-size=8KiB",
            "--health-path=off",
            "--log-format=json",
            "--log-level=pounce_host=debug,warn",
            "--unload-guard=off",
        ])
        .unwrap();
        assert_eq!(config.host, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(config.port, 0);
        assert_eq!(config.workers, 3);
        assert_eq!(config.backlog, 16);
        assert_eq!(config.reload_timeout, Duration::from_secs(60));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(2));
        assert_eq!(config.request_timeout, Duration::from_millis(250));
        assert_eq!(config.keep_alive_timeout, Duration::from_secs(1));
        assert_eq!(config.header_timeout, Duration::from_secs(3));
        assert_eq!(config.max_body_size, 0);
        assert_eq!(config.max_header_size, 8192);
        assert_eq!(config.health_path, None);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.log_level, "pounce_host=debug,warn");
        assert!(!config.unload_guard);
    }

    #[test]
    fn file_sets_every_setting() {
        let toml = r#"
            host = "::1"
            port = 9000
            workers = 2
            backlog = 128
            reload_timeout = "45s"
            shutdown_timeout = 20
            request_timeout = 1.5
            keep_alive_timeout = "500ms"
            header_timeout = "1m"
            max_body_size = "4MiB"
            max_header_size = 16384
            health_path = "/healthz"
            log_format = "json"
            log_level = "debug"
            unload_guard = false

            [app]
            greeting = "hello"
            retries = 3
            ratio = 0.5
            verbose = true
        "#;
        let config = config_with_file("all-keys", toml, &[]).unwrap();
        assert_eq!(config.host, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(config.port, 9000);
        assert_eq!(config.workers, 2);
        assert_eq!(config.backlog, 128);
        assert_eq!(config.reload_timeout, Duration::from_secs(45));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(config.request_timeout, Duration::from_millis(1500));
        assert_eq!(config.keep_alive_timeout, Duration::from_millis(500));
        assert_eq!(config.header_timeout, Duration::from_secs(60));
        assert_eq!(config.max_body_size, 4 << 20);
        assert_eq!(config.max_header_size, 16384);
        assert_eq!(config.health_path.as_deref(), Some("/healthz"));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.log_level, "debug");
        assert!(!config.unload_guard);
        // `toml::Table` keeps keys sorted.
        let expected = [("greeting", "hello"), ("ratio", "0.5"), ("retries", "3"), ("verbose", "true")];
        assert_eq!(config.app_args, pairs(&expected));
    }

    #[test]
    fn file_accepts_off_spellings() {
        let toml = "health_path = \"off\"\nunload_guard = \"off\"\n";
        let config = config_with_file("off", toml, &[]).unwrap();
        assert_eq!(config.health_path, None);
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
        let args =
            CheckArgs { library: "app.so".into(), config: Some(file.0.clone()), app_args: pairs(&[("mode", "b")]) };
        let app_args = app_args_for_check(&args).unwrap();
        assert_eq!(app_args, pairs(&[("mode", "b"), ("name", "x")]));
    }

    #[test]
    fn check_rejects_a_file_that_serve_would_reject() {
        let file = TempFile::new("check-bad", "prot = 9000\n");
        let args = CheckArgs { library: "app.so".into(), config: Some(file.0.clone()), app_args: Vec::new() };
        let error = app_args_for_check(&args).unwrap_err();
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
            workers = 1
            backlog = 1
            reload_timeout = 1
            shutdown_timeout = 1
            request_timeout = 1
            keep_alive_timeout = 1
            header_timeout = 1
            max_body_size = 1
            max_header_size = "8KiB"
            health_path = "/"
            log_format = "text"
            log_level = "warn"
            unload_guard = "on"
            reload = true
            reload_dir = ["templates"]
            reload_include = ".html,.css"
            metrics_path = "/metrics"
            access_log = "on"
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
}
