//! The host's log output: human text on a terminal, JSON lines on request.

use std::io::IsTerminal;

use app_abi::ffi::level;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `filter` was validated with the config.
/// Returns the most verbose level it lets through, which apps use to skip
/// formatting records nobody will print.
pub fn init(format: LogFormat, filter: &str) -> u32 {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let max = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    abi_level(max)
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
