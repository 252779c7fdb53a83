//! pounce-host's lifecycle events as the benchmark reads them from a text
//! log: the event's name, its fields (through `pounce_devkit::log_field`,
//! the one parser the tools share) and when the host wrote it. Timings
//! between events use the host's own timestamps, so they do not depend on
//! how soon xtask's pipe reader got the lines on a busy machine.

use std::time::{SystemTime, UNIX_EPOCH};

use pounce_devkit::log_field;

/// One event line.
#[derive(Clone, Copy, Debug)]
pub struct LogEvent<'a> {
    pub name: &'a str,
    /// When the host wrote it: seconds since the Unix epoch.
    pub at: f64,
    line: &'a str,
}

impl<'a> LogEvent<'a> {
    /// `line` as an event, if it is one with a readable timestamp.
    pub fn parse(line: &'a str) -> Option<LogEvent<'a>> {
        let name = log_field(line, "event")?;
        Some(LogEvent { name, at: timestamp(line)?, line })
    }

    /// `line` as the event `name`, if it is that event.
    pub fn named(line: &'a str, name: &str) -> Option<LogEvent<'a>> {
        LogEvent::parse(line).filter(|event| event.name == name)
    }

    /// Field `name`, read as `T`.
    pub fn get<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        log_field(self.line, name)?.parse().ok()
    }
}

/// Now, in the log's clock: seconds since the Unix epoch.
pub fn now() -> f64 {
    unix_seconds(SystemTime::now())
}

pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The time a text log line starts with (`2026-11-24T23:39:23.925937Z`,
/// after a process-mode worker's `[worker PID gN] ` tag, if any) or a JSON
/// line's `timestamp` field.
fn timestamp(line: &str) -> Option<f64> {
    if let Some(value) = line.trim_start().starts_with('{').then(|| log_field(line, "timestamp")).flatten() {
        return parse_rfc3339(value);
    }
    let untagged = match line.strip_prefix("[worker ") {
        Some(rest) => &rest[rest.find("] ")? + 2..],
        None => line,
    };
    parse_rfc3339(untagged.split_whitespace().next()?)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` → seconds since the Unix epoch.
fn parse_rfc3339(text: &str) -> Option<f64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date = date.splitn(3, '-').map(str::parse::<i64>);
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let mut clock = time.splitn(3, ':');
    let hours: i64 = clock.next()?.parse().ok()?;
    let minutes: i64 = clock.next()?.parse().ok()?;
    let seconds: f64 = clock.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hours * 3600 + minutes * 60) as f64 + seconds)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`, the inverse of the one in `report::format_utc`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_events_of_the_supervisor_and_of_workers() {
        let line = "2026-11-24T23:39:23.925937Z  INFO pounce_host::operations::events: generation 2 published; generation 1 drains event=\"generation_loaded\" generation=2 previous=1 load_ms=19.45 reload_ms=36.908364";
        let event = LogEvent::parse(line).unwrap();
        assert_eq!(event.name, "generation_loaded");
        assert_eq!(event.get::<u64>("generation"), Some(2));
        assert_eq!(event.get::<f64>("reload_ms"), Some(36.908364));
        assert!((event.at - 1_795_563_563.925937).abs() < 1e-6, "{}", event.at);

        let tagged = "[worker 4242 g3] 1970-01-02T00:00:01.5Z  INFO x: retiring event=\"worker_note\" pid=4242";
        let event = LogEvent::named(tagged, "worker_note").unwrap();
        assert_eq!((event.at, event.get::<u32>("pid")), (86_401.5, Some(4242)));
        assert!(LogEvent::named(tagged, "worker_ready").is_none());

        let json = r#"{"timestamp":"2000-02-29T00:00:00.000001Z","level":"INFO","event":"worker_ready","pid":7}"#;
        let event = LogEvent::parse(json).unwrap();
        assert!((event.at - 951_782_400.000001).abs() < 1e-6);
    }

    #[test]
    fn lines_without_an_event_or_a_time_are_not_events() {
        assert!(LogEvent::parse("2026-11-24T23:39:23Z INFO listening").is_none());
        assert!(LogEvent::parse("INFO x: event=\"server_ready\"").is_none());
        assert!(parse_rfc3339("2026-13-01T00:00:00Z").is_none());
        assert!((now() - unix_seconds(SystemTime::now())).abs() < 1.0);
    }
}
