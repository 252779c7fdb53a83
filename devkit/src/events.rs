//! Reading pounce-host's lifecycle events from its log.
//!
//! The host logs each lifecycle event with an `event` field naming it and
//! its data as further fields, in one of two formats: tracing's text format
//! (`... event="server_ready" address=127.0.0.1:8000 ...`, fields after the
//! message) or JSON with the fields flattened (`{..., "event":"server_ready",
//! "address":"127.0.0.1:8000", ...}`). Tools read these fields, not the
//! message, which is written for people and may change.

use std::net::SocketAddr;

/// The address a pounce-host listens on, if `line` is its `server_ready`
/// event: how a tool that started it with `--port 0` learns the port.
pub fn ready_address(line: &str) -> Option<SocketAddr> {
    if log_field(line, "event")? != "server_ready" {
        return None;
    }
    log_field(line, "address")?.parse().ok()
}

/// The value of field `name` in one log line of either format, unquoted:
/// how a tool reads an event's data (`log_field(line, "event")` names it).
pub fn log_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    if line.trim_start().starts_with('{') {
        json_field(line, name)
    } else {
        text_field(line, name)
    }
}

/// `"name":"value"` (strings without escapes, which is what event names
/// and addresses are) or `"name":12.5` (numbers, booleans). A key quoted
/// inside another string is escaped (`\"name\":`), so it does not match.
fn json_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":");
    let rest = line[line.find(&key)? + key.len()..].trim_start();
    if rest.starts_with('"') {
        return quoted(rest);
    }
    rest.split([',', '}']).next().map(str::trim_end).filter(|value| !value.is_empty())
}

/// `name=value` (a field recorded with `Display`, such as the address) or
/// `name="value"` (a string). Fields are preceded by a space, so `name=`
/// inside another name (`app_name=`) does not match.
fn text_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=");
    let rest = &line[line.find(&key)? + key.len()..];
    quoted(rest).or_else(|| rest.split_whitespace().next())
}

/// The text between a leading `"` and the next one.
fn quoted(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('"')?;
    inner.find('"').map(|end| &inner[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn reads_the_address_from_a_text_log() {
        let line = "2026-11-30T21:10:32.339135Z  INFO pounce_host::events: listening on http://127.0.0.1:45085 \
                    event=\"server_ready\" address=127.0.0.1:45085 generation=1 app=\"sample-app\" \
                    app_version=\"0.1.0\" load_ms=10.6 init_ms=0.18";
        assert_eq!(ready_address(line), addr("127.0.0.1:45085"));
        let ipv6 = "INFO pounce_host::events: listening on http://[::1]:8000 event=\"server_ready\" address=[::1]:8000";
        assert_eq!(ready_address(ipv6), addr("[::1]:8000"));
        let baseline = "listening on http://127.0.0.1:8000 event=\"server_ready\" address=127.0.0.1:8000";
        assert_eq!(ready_address(baseline), addr("127.0.0.1:8000"), "the benchmark baseline's line");
        let quoted = "INFO x: ready event=\"server_ready\" address=\"[::1]:8000\"";
        assert_eq!(ready_address(quoted), addr("[::1]:8000"), "an address logged as a string");
    }

    #[test]
    fn reads_the_address_from_a_json_log() {
        let line = r#"{"timestamp":"2026-11-30T21:10:35.341400Z","level":"INFO","message":"listening on http://127.0.0.1:38377","event":"server_ready","address":"127.0.0.1:38377","generation":1,"app":"sample-app","target":"pounce_host::events"}"#;
        assert_eq!(ready_address(line), addr("127.0.0.1:38377"));
        let ipv6 = r#"{"level":"INFO","event": "server_ready","address": "[::1]:8000"}"#;
        assert_eq!(ready_address(ipv6), addr("[::1]:8000"));
    }

    #[test]
    fn reads_any_field_of_an_event() {
        let text = "INFO x: worker 7 of generation 2 serving event=\"worker_ready\" pid=7 generation=2 startup_ms=12.5";
        let json = r#"{"message":"worker 7 serving","event":"worker_ready","pid":7,"generation":2,"startup_ms":12.5}"#;
        for line in [text, json] {
            assert_eq!(log_field(line, "event"), Some("worker_ready"), "{line}");
            assert_eq!(log_field(line, "pid"), Some("7"), "{line}");
            assert_eq!(log_field(line, "startup_ms"), Some("12.5"), "{line}");
            assert_eq!(log_field(line, "how"), None, "{line}");
        }
    }

    #[test]
    fn other_lines_give_none() {
        for line in [
            "",
            "listening on http://127.0.0.1:8000",
            "INFO pounce_host::events: generation 2 published; generation 1 drains event=\"generation_loaded\" generation=2",
            "INFO app: hello server_event=\"server_ready\" address=127.0.0.1:8000",
            "INFO pounce_host::events: listening event=\"server_ready\"",
            "INFO pounce_host::events: listening event=\"server_ready\" address=nowhere",
            r#"{"message":"SIGTERM received","event":"shutdown_started","address":"127.0.0.1:1"}"#,
            r#"{"message":"app said \"event\":\"server_ready\",\"address\":\"127.0.0.1:1\"","target":"app"}"#,
        ] {
            assert_eq!(ready_address(line), None, "{line}");
        }
    }
}
