//! Range and sanity checks every setting passes, whichever source gave it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use super::values::TimeoutOrOff;

pub const PORTS: RangeInclusive<u16> = 0..=u16::MAX;
pub const WORKERS: RangeInclusive<usize> = 1..=1024;
pub const PROCESSES: RangeInclusive<usize> = 1..=1024;
pub const RESTARTS: RangeInclusive<u32> = 1..=1000;
/// `listen(2)` takes a C `int`.
pub const BACKLOG: RangeInclusive<u32> = 1..=i32::MAX as u32;
pub const MAX_CONNECTIONS: RangeInclusive<usize> = 1..=1_000_000;
pub const H2_MAX_CONCURRENT_STREAMS: RangeInclusive<u32> = 1..=1_000_000;
/// hyper's `max_buf_size` panics below 8 KiB; beyond 16 MiB a header limit
/// no longer protects memory.
pub const HEADER_SIZES: RangeInclusive<usize> = 8 << 10..=16 << 20;

/// File extensions, written with or without the dot: stored without it,
/// lowercase.
pub fn check_extensions(extensions: Vec<String>) -> Result<Vec<String>, String> {
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

/// A directory setting: any path but the empty one (which would mean the
/// current directory by accident).
pub fn check_dir(path: PathBuf) -> Result<PathBuf, String> {
    if path.as_os_str().is_empty() {
        Err("empty: expected a directory such as /var/tmp".to_owned())
    } else {
        Ok(path)
    }
}

pub fn parse_host(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|_| "expected an IP address such as 127.0.0.1 or ::1".to_owned())
}

/// Converts `n` to the setting's type if it lies in `range`.
pub fn in_range<N, T>(n: N, range: &RangeInclusive<T>) -> Result<T, String>
where
    T: TryFrom<N> + PartialOrd + fmt::Display,
{
    T::try_from(n).ok().filter(|n| range.contains(n)).ok_or_else(|| range_problem("out of range", range))
}

pub fn range_problem<T: fmt::Display>(problem: &str, range: &RangeInclusive<T>) -> String {
    format!("{problem}: expected an integer from {} to {}", range.start(), range.end())
}

/// A zero timeout would fail every request (or reload, or drain) at once.
pub fn check_timeout(duration: Duration) -> Result<Duration, String> {
    if duration.is_zero() {
        Err("must be greater than zero: expected e.g. 500ms, 30s or 2m".to_owned())
    } else {
        Ok(duration)
    }
}

/// A timeout that may be `off`; if on, it must be greater than zero.
pub fn check_timeout_or_off(timeout: TimeoutOrOff) -> Result<Option<Duration>, String> {
    timeout.0.map(check_timeout).transpose().map_err(|problem| format!("{problem}, or off"))
}

pub fn check_header_size(bytes: u64) -> Result<usize, String> {
    usize::try_from(bytes)
        .ok()
        .filter(|bytes| HEADER_SIZES.contains(bytes))
        .ok_or_else(|| "out of range: expected from 8KiB (hyper's smallest read buffer) to 16MiB".to_owned())
}

/// `off` turns the endpoint off; anything else must be a plain URL path, or
/// no request could ever match it.
pub fn check_health_path(path: String) -> Result<Option<String>, String> {
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
pub fn check_log_level(filter: String) -> Result<String, String> {
    const EXPECTED: &str = "expected a tracing filter such as info or pounce_host=debug,warn";
    if filter.trim().is_empty() {
        return Err(format!("empty: {EXPECTED}"));
    }
    match EnvFilter::try_new(&filter) {
        Ok(_) => Ok(filter),
        Err(error) => Err(format!("{error}: {EXPECTED}")),
    }
}

/// Several `--host` addresses must differ, or the second bind would fail.
pub fn check_hosts(hosts: Vec<IpAddr>) -> Result<Vec<IpAddr>, String> {
    for (at, host) in hosts.iter().enumerate() {
        if hosts[..at].contains(host) {
            return Err(format!("{host} is given twice: expected distinct addresses"));
        }
    }
    Ok(hosts)
}

/// `--uds-mode`: octal permission bits such as `660`, `0660` or `0o660`.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    const EXPECTED: &str = "expected octal permissions such as 0660 or 0600";
    let trimmed = text.trim();
    let digits = trimmed.strip_prefix("0o").unwrap_or(trimmed);
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(8)) {
        return Err(EXPECTED.to_owned());
    }
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("out of range: {EXPECTED} (at most 0777)")),
    }
}

/// `--admin-listen`: `PORT` (on loopback) or `IP:PORT` (`[::1]:PORT` for
/// IPv6).
pub fn parse_admin_listen(text: &str) -> Result<SocketAddr, String> {
    const EXPECTED: &str = "expected PORT (on 127.0.0.1) or IP:PORT, e.g. 9000, 0.0.0.0:9000 or [::1]:9000";
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    text.parse().map_err(|_| EXPECTED.to_owned())
}

/// A file setting (certificate, key, socket path): any path but the empty one.
pub fn check_file(path: std::path::PathBuf) -> Result<std::path::PathBuf, String> {
    if path.as_os_str().is_empty() {
        Err("empty: expected a file path".to_owned())
    } else {
        Ok(path)
    }
}
