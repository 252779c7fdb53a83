//! The value types and parsers that flags and the config file share:
//! durations, byte sizes, on/off switches, the log format and app settings.
//! Parsers return a plain-text problem; the caller says where the value came
//! from.

use std::time::Duration;

use clap::ValueEnum;

/// Where app code runs (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// In the server process, on its worker threads: the fastest, but a
    /// crash in app code takes the server down.
    Thread,
    /// In supervised worker processes: a crash, hang or exit in app code
    /// costs only that worker's connections.
    Process,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// An on/off setting, spelled the way operators write it in flags and
/// environment files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl From<Switch> for bool {
    fn from(switch: Switch) -> bool {
        switch == Switch::On
    }
}

/// A timeout that may be turned off: `off`, or a duration as
/// [`parse_duration`] reads it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TimeoutOrOff(pub Option<Duration>);

/// Shown in error messages the way the operator wrote it.
impl std::fmt::Debug for TimeoutOrOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(duration) => write!(f, "{duration:?}"),
            None => f.write_str("off"),
        }
    }
}

/// Parses `off` or a duration.
pub fn parse_timeout_or_off(text: &str) -> Result<TimeoutOrOff, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(TimeoutOrOff(None));
    }
    parse_duration(text).map(|duration| TimeoutOrOff(Some(duration))).map_err(|problem| format!("{problem}, or off"))
}

/// The app's settings reach it as `KEY=VALUE` strings, so a key can hold
/// neither `=` nor be empty.
pub fn check_app_key(key: &str) -> Result<(), String> {
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
    fn timeouts_parse_or_turn_off() {
        assert_eq!(parse_timeout_or_off("off"), Ok(TimeoutOrOff(None)));
        assert_eq!(parse_timeout_or_off(" OFF "), Ok(TimeoutOrOff(None)));
        assert_eq!(parse_timeout_or_off("1.5s"), Ok(TimeoutOrOff(Some(Duration::from_millis(1500)))));
        let message = parse_timeout_or_off("never").unwrap_err();
        assert!(message.starts_with("invalid duration: ") && message.ends_with(", or off"), "{message}");
        assert_eq!(format!("{:?}", TimeoutOrOff(None)), "off");
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
}
