//! Forwards the app's `tracing` events to the host's log output.
//!
//! An app library links its own copy of `tracing`, with its own global
//! dispatcher, so events recorded in the app never reach the host's
//! subscriber on their own. At `init`, the glue installs [`HostLog`] as the
//! app's global default: it formats each event and hands it to the host,
//! which prints it with its own format and tags it with the generation.
//! Spans are not forwarded (their fields would need the host to track app
//! span ids across the boundary); events inside spans still are.

use std::any::Any;
use std::fmt::{self, Write as _};

use tracing_core::field::{Field, Visit};
use tracing_core::span::{Attributes, Id, Record};
use tracing_core::{Event, Level, LevelFilter, Metadata, Subscriber};

use crate::ffi::abi::level;
use crate::ffi::host::host_log;

/// Installs the forwarder as this library's global `tracing` dispatcher.
/// A library copy serves one generation, so this runs once per copy; if the
/// app installed its own dispatcher first, the app's wins.
pub(crate) fn install(generation: u64, max_level: u32) {
    let subscriber = HostLog { max: level_filter(max_level) };
    let _ = tracing_core::dispatcher::set_global_default(tracing_core::Dispatch::new(subscriber));
    install_panic_hook(generation);
}

/// Panics inside the app are caught by the glue; this hook reports where they
/// happened through the host's log instead of the app's own stderr printer.
fn install_panic_hook(generation: u64) {
    std::panic::set_hook(Box::new(move |info| {
        let location = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let payload = panic_message(info.payload());
        host_log(level::ERROR, "app_abi", &format!("generation {generation}: panicked{location}: {payload}"));
    }));
}

/// Text of a panic payload (the hook's, or one the glue caught).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn level_filter(max_level: u32) -> LevelFilter {
    match max_level {
        level::OFF => LevelFilter::OFF,
        level::ERROR => LevelFilter::ERROR,
        level::WARN => LevelFilter::WARN,
        level::INFO => LevelFilter::INFO,
        level::DEBUG => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

fn abi_level(level: &Level) -> u32 {
    match *level {
        Level::ERROR => level::ERROR,
        Level::WARN => level::WARN,
        Level::INFO => level::INFO,
        Level::DEBUG => level::DEBUG,
        Level::TRACE => level::TRACE,
    }
}

struct HostLog {
    max: LevelFilter,
}

impl Subscriber for HostLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= &self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = EventLine::default();
        event.record(&mut line);
        let metadata = event.metadata();
        host_log(abi_level(metadata.level()), metadata.target(), &line.finish());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// Renders an event as `message key=value key=value`.
#[derive(Default)]
struct EventLine {
    message: String,
    fields: String,
}

impl EventLine {
    fn finish(self) -> String {
        if self.fields.is_empty() {
            self.message
        } else if self.message.is_empty() {
            self.fields.trim_start().to_owned()
        } else {
            self.message + &self.fields
        }
    }
}

impl Visit for EventLine {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}
