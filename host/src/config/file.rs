//! Reading the `--config` TOML file into a [`Layer`]. Unknown keys are
//! errors: a typo must not silently leave a setting at its default.

use std::fmt;
use std::fs;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use toml::Value;

use super::checks::{
    check_dir, check_extensions, check_file, check_header_size, check_health_path, check_hosts, check_log_level,
    check_timeout, check_timeout_or_off, in_range, parse_admin_listen, parse_host, parse_mode, range_problem, BACKLOG,
    H2_MAX_CONCURRENT_STREAMS, MAX_CONNECTIONS, PORTS, PROCESSES, RESTARTS, WORKERS,
};
use super::error::{ConfigError, Origin};
use super::layer::Layer;
use super::values::{check_app_key, parse_duration, parse_size, parse_timeout_or_off, Switch};

/// The config file's settings, or none if there is no config file.
pub fn read_optional(path: Option<&Path>) -> Result<Layer, ConfigError> {
    path.map_or_else(|| Ok(Layer::default()), read)
}

/// Reads and checks a config file.
fn read(path: &Path) -> Result<Layer, ConfigError> {
    let text = fs::read_to_string(path).map_err(|error| ConfigError::ReadFile { path: path.to_owned(), error })?;
    let table: toml::Table = text.parse().map_err(|error| ConfigError::ParseFile { path: path.to_owned(), error })?;
    let mut layer = Layer::default();
    for (key, value) in &table {
        let parsed = match key.as_str() {
            "host" => put(
                &mut layer.host,
                list(value).and_then(|hosts| hosts.iter().map(|h| parse_host(h)).collect()).and_then(check_hosts),
            ),
            "uds" => put(&mut layer.uds, text_of(value).map(PathBuf::from).and_then(check_file)),
            "uds_mode" => put(&mut layer.uds_mode, text_of(value).and_then(|text| parse_mode(&text))),
            "tls_cert" => put(&mut layer.tls_cert, text_of(value).map(PathBuf::from).and_then(check_file)),
            "tls_key" => put(&mut layer.tls_key, text_of(value).map(PathBuf::from).and_then(check_file)),
            "admin_listen" => {
                put(&mut layer.admin_listen, number_or_text(value).and_then(|text| parse_admin_listen(&text)))
            }
            "port" => put(&mut layer.port, integer_in(value, &PORTS)),
            "workers" => put(&mut layer.workers, integer_in(value, &WORKERS)),
            "backlog" => put(&mut layer.backlog, integer_in(value, &BACKLOG)),
            "max_connections" => put(&mut layer.max_connections, integer_in(value, &MAX_CONNECTIONS)),
            "reload_timeout" => put(&mut layer.reload_timeout, timeout(value)),
            "shutdown_timeout" => put(&mut layer.shutdown_timeout, timeout(value)),
            "request_timeout" => put(&mut layer.request_timeout, timeout(value)),
            "keep_alive_timeout" => put(&mut layer.keep_alive_timeout, timeout(value)),
            "header_timeout" => put(&mut layer.header_timeout, timeout(value)),
            "send_timeout" => put(&mut layer.send_timeout, timeout_or_off(value)),
            "stall_warning" => put(&mut layer.stall_warning, timeout_or_off(value)),
            "max_body_size" => put(&mut layer.max_body_size, size(value)),
            "max_header_size" => put(&mut layer.max_header_size, size(value).and_then(check_header_size)),
            "h2_max_concurrent_streams" => {
                put(&mut layer.h2_max_concurrent_streams, integer_in(value, &H2_MAX_CONCURRENT_STREAMS))
            }
            "h2_keep_alive" => put(&mut layer.h2_keep_alive, timeout_or_off(value)),
            "health_path" => put(&mut layer.health_path, text_of(value).and_then(check_health_path)),
            "log_format" => put(&mut layer.log_format, choice(value)),
            "log_level" => put(&mut layer.log_level, text_of(value).and_then(check_log_level)),
            "unload_guard" => put(&mut layer.unload_guard, switch(value)),
            "mode" => put(&mut layer.mode, choice(value)),
            "processes" => put(&mut layer.processes, integer_in(value, &PROCESSES)),
            "worker_timeout" => put(&mut layer.worker_timeout, timeout_or_off(value)),
            "max_restarts" => put(&mut layer.max_restarts, integer_in(value, &RESTARTS)),
            "restart_window" => put(&mut layer.restart_window, timeout(value)),
            "rollback_window" => put(&mut layer.rollback_window, timeout_or_off(value)),
            "reload" => put(&mut layer.reload, switch(value)),
            "reload_dir" => {
                put(&mut layer.reload_dirs, list(value).map(|dirs| dirs.into_iter().map(PathBuf::from).collect()))
            }
            "reload_include" => put(&mut layer.reload_include, list(value).and_then(check_extensions)),
            "metrics_path" => put(&mut layer.metrics_path, text_of(value).and_then(check_health_path)),
            "access_log" => put(&mut layer.access_log, switch(value)),
            "preflight" => put(&mut layer.preflight, switch(value)),
            "allow_insecure_library" => put(&mut layer.allow_insecure_library, switch(value)),
            "staging_dir" => put(&mut layer.staging_dir, text_of(value).map(PathBuf::from).and_then(check_dir)),
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

/// A list setting: a TOML array of strings, or one comma-separated string.
fn list(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::String(text) => Ok(text.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect()),
        Value::Array(items) => items.iter().map(text_of).collect(),
        _ => Err("expected an array of strings or a comma-separated string".to_owned()),
    }
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

fn timeout_or_off(value: &Value) -> Result<Option<Duration>, String> {
    number_or_text(value).and_then(|text| parse_timeout_or_off(&text)).and_then(check_timeout_or_off)
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
