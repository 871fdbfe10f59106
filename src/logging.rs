//! Log output: tracing-subscriber on standard error as text, JSON or journal lines; level from
//! `RUST_LOG`.
//!
//! This module owns the one place where the subscriber is installed, so the rest of the code only
//! emits `tracing` events and spans.
//!
//! The journal format is the text line without its timestamp and level word, prefixed with the
//! syslog priority of its level (`<3>` ERROR, `<4>` WARN, `<6>` INFO, `<7>` DEBUG and TRACE), the
//! sd-daemon(3) convention journald reads from a service's standard error: the journal stores the
//! level as the entry's PRIORITY (`journalctl -p warning` filters by it), adds timestamp, PID and
//! unit, and the message keeps the span and every field, as on a terminal. Without `--log-format` the format is
//! chosen by where standard error goes: journal when it is systemd's journal stream (see
//! [`crate::systemd::stderr_is_journal`]), text otherwise.

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// The format to use: the one asked for, else journal under systemd's journal, else text.
pub fn choose(requested: Option<LogFormat>) -> LogFormat {
    match requested {
        Some(format) => format,
        None if crate::systemd::stderr_is_journal() => LogFormat::Journal,
        None => LogFormat::Text,
    }
}

/// Installs the global subscriber. `RUST_LOG` selects levels (default `info`); an invalid
/// `RUST_LOG` falls back to `info` and says so rather than silencing the daemon.
pub fn init(format: LogFormat) {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("{spec:?}: {e}"))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let installed = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        // JSON keeps the target, so the audit trail (`"target":"audit"`) can be picked out.
        LogFormat::Json => builder
            .with_target(true)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Journal => builder
            .with_ansi(false)
            .event_format(JournalFormat {
                inner: tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false)
                    .with_target(false)
                    .with_ansi(false),
            })
            .try_init(),
    };
    if let Err(e) = installed {
        eprintln!("nitro-vsock-proxy: cannot install the logger: {e}");
    }
    if let Some(problem) = bad_filter {
        tracing::warn!("ignoring invalid RUST_LOG {problem}; logging at info");
    }
}

/// Log lines dropped so far because a sink did not keep up.
pub fn dropped_lines() -> u64 {
    0
}

/// The syslog priority journald gives a line with this level.
pub fn journal_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// The text format without timestamp and level, behind a `<N>` priority prefix.
struct JournalFormat {
    inner: Format<Full, ()>,
}

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", journal_priority(*event.metadata().level()))?;
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(journal_priority(Level::ERROR), 3);
        assert_eq!(journal_priority(Level::WARN), 4);
        assert_eq!(journal_priority(Level::INFO), 6);
        assert_eq!(journal_priority(Level::DEBUG), 7);
        assert_eq!(journal_priority(Level::TRACE), 7);
    }

    #[test]
    fn explicit_format_wins() {
        assert_eq!(choose(Some(LogFormat::Json)), LogFormat::Json);
        assert_eq!(choose(Some(LogFormat::Text)), LogFormat::Text);
    }
}
