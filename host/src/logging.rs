//! The host's log output: human text on a terminal, JSON lines on request.
//! In process mode every line of a worker says which worker (pid) and
//! generation wrote it.

use std::fmt;
use std::io::IsTerminal;

use app_abi::ffi::level;
use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, Format, Full, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Who writes the log lines of a process-mode worker.
#[derive(Clone, Copy, Debug)]
pub struct Tag {
    pub pid: u32,
    pub generation: u64,
}

/// Installs the global subscriber. `filter` was validated with the config.
/// Returns the most verbose level it lets through, which apps use to skip
/// formatting records nobody will print.
pub fn init(format: LogFormat, filter: &str, tag: Option<Tag>) -> u32 {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let max = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(Tagged::<Format<Full>> { inner: Format::default(), tag })
            .fmt_fields(DefaultFields::new())
            .init(),
        LogFormat::Json => {
            let json = Format::default().json().flatten_event(true).with_current_span(false);
            builder.event_format(Tagged::<Format<Json>> { inner: json, tag }).fmt_fields(JsonFields::new()).init()
        }
    }
    abi_level(max)
}

/// A log line format with the worker's tag in front (text) or as its first
/// fields (JSON).
struct Tagged<F> {
    inner: F,
    tag: Option<Tag>,
}

impl<S, N> FormatEvent<S, N> for Tagged<Format<Full>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        if let Some(Tag { pid, generation }) = self.tag {
            write!(writer, "[worker {pid} g{generation}] ")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

impl<S, N> FormatEvent<S, N> for Tagged<Format<Json>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let Some(Tag { pid, generation }) = self.tag else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"worker_pid\":{pid},\"worker_generation\":{generation},{rest}"),
            None => writer.write_str(&line),
        }
    }
}

fn abi_level(max: LevelFilter) -> u32 {
    match max {
        LevelFilter::OFF => level::OFF,
        LevelFilter::ERROR => level::ERROR,
        LevelFilter::WARN => level::WARN,
        LevelFilter::INFO => level::INFO,
        LevelFilter::DEBUG => level::DEBUG,
        _ => level::TRACE,
    }
}
