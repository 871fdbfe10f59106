//! Log output: tracing-subscriber as text, JSON or for the journal; level from `RUST_LOG`.
//!
//! This module owns the one place where the subscriber is installed, so the rest of the code only
//! emits `tracing` events and spans, and the promise that logging never holds up the accept loop
//! or a relay: nothing is written from the thread that logs.
//! - Text, JSON and the `<N>`-prefixed journal lines go to standard error through a lossy
//!   non-blocking writer: a bounded queue of [`STDERR_QUEUE_LINES`] lines in front of one writer
//!   thread, which takes them in batches and writes each batch with as few write(2) calls as
//!   its buffer allows ([`crate::ops::batch`] says why: a thread woken per line cost more than
//!   the lines). When standard error does not keep up (a full pipe, a stalled journald)
//!   further lines are dropped and counted, never waited for.
//! - The journal format sends structured entries to journald itself ([`crate::ops::journal`]), with
//!   its own bounded queue and the same promise.
//! - [`dropped_lines`] is the total dropped so far. A reporter thread says so at WARN ("N log
//!   lines dropped: standard error was not keeping up") once the sink takes lines again: after a
//!   second without new drops, at most every [`DROP_REPORT_INTERVAL`], and once more at exit.
//!
//! [`init`] returns a [`LogGuard`]; holding it until exit makes the last lines (the exit error)
//! reach their sink before the process ends (each sink waits about a second at most).
//!
//! The journal format: under systemd's journal (chosen automatically when standard error is the
//! journal stream, see [`crate::ops::systemd::stderr_is_journal`], or by `--log-format journal`) every
//! event becomes a journal entry with the event's and its spans' fields as `NVP_<NAME>` fields
//! (`journalctl NVP_REASON=denied`), PRIORITY from the level, SYSLOG_IDENTIFIER and a MESSAGE
//! that is the text line without timestamp and level. When the journal socket cannot be used, the
//! same MESSAGE goes to standard error prefixed with the syslog priority of its level (`<3>`
//! ERROR, `<4>` WARN, `<6>` INFO, `<7>` DEBUG and TRACE), the sd-daemon(3) convention journald
//! reads from a service's standard error: it stores the level as PRIORITY (`journalctl -p
//! warning` filters by it) but the fields stay inside the message. Without `--log-format` the
//! format is chosen by where standard error goes: journal when it is systemd's journal stream,
//! text otherwise.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::ops::batch;
use crate::ops::journal::{self, JournalGuard};

/// How log lines are written to standard error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain text lines with a timestamp.
    Text,
    /// One JSON object per line.
    Json,
    /// Native journal entries with fields (MESSAGE, PRIORITY, NVP_REASON, NVP_ROUTE, ...) sent
    /// to journald's socket; text lines with syslog priority prefixes (`<4>` for WARN) on
    /// standard error only when journald is absent (its socket cannot be used).
    Journal,
}

/// The writer thread's buffer in front of standard error (see [`stderr_writer`]).
const STDERR_BUFFER_BYTES: usize = 64 * 1024;

/// Lines waiting for standard error; more are dropped (and counted). About a few MiB at most.
pub const STDERR_QUEUE_LINES: usize = 8192;

/// The dropped-lines warning comes at most this often.
pub const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// How often the reporter looks at the drop counters.
const DROP_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long the guard waits at exit for the lines queued so far to reach standard error.
const STDERR_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Lines the standard-error writer dropped: its queue was full, or writing failed.
static STDERR_DROPS: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far because a sink (standard error or the journal) was not keeping up.
pub fn dropped_lines() -> u64 {
    STDERR_DROPS
        .load(Ordering::Relaxed)
        .saturating_add(journal::dropped_entries())
}

/// The format to use: the one asked for, else journal under systemd's journal, else text.
pub fn choose(requested: Option<LogFormat>) -> LogFormat {
    match requested {
        Some(format) => format,
        None if crate::ops::systemd::stderr_is_journal() => LogFormat::Journal,
        None => LogFormat::Text,
    }
}

/// Keeps the log writers running; dropping it reports any last drops and flushes what is
/// queued (bounded: about a second per sink). Hold it until the process exits.
#[must_use = "dropping the guard stops the log writers; hold it until exit"]
pub struct LogGuard {
    // Declared first, so it is dropped first: its last report is flushed by the sinks below.
    _reporter: Option<DropReporter>,
    _journal: Option<JournalGuard>,
    _stderr: Option<StderrGuard>,
}

/// Installs the global subscriber. `RUST_LOG` selects levels (default `info`); an invalid
/// `RUST_LOG` falls back to `info` and says so rather than silencing the daemon. A second call
/// installs nothing (and says so on standard error).
pub fn init(format: LogFormat) -> LogGuard {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("{spec:?}: {e}"))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let mut journal_unusable = None;
    let (installed, sink, journal_guard, stderr_guard) = match format {
        LogFormat::Journal => match journal::connect() {
            Ok((layer, guard)) => (
                registry.with(layer).try_init(),
                Sink::Journal,
                Some(guard),
                None,
            ),
            Err(e) => {
                journal_unusable = Some(e);
                let (writer, guard) = stderr_writer();
                let layer = tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_ansi(false)
                    .event_format(JournalFormat {
                        inner: tracing_subscriber::fmt::format()
                            .without_time()
                            .with_level(false)
                            .with_target(false)
                            .with_ansi(false),
                    });
                (registry.with(layer).try_init(), Sink::Stderr, None, guard)
            }
        },
        LogFormat::Text => {
            let (writer, guard) = stderr_writer();
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_target(false)
                .with_ansi(false);
            (registry.with(layer).try_init(), Sink::Stderr, None, guard)
        }
        LogFormat::Json => {
            let (writer, guard) = stderr_writer();
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(writer)
                // JSON keeps the target, so the audit trail (`"target":"audit"`) can be picked out.
                .with_target(true);
            (registry.with(layer).try_init(), Sink::Stderr, None, guard)
        }
    };
    if let Err(e) = installed {
        eprintln!("nitro-vsock-proxy: cannot install the logger: {e}");
        return LogGuard {
            _reporter: None,
            _journal: None,
            _stderr: None,
        };
    }
    if let Some(problem) = bad_filter {
        tracing::warn!("ignoring invalid RUST_LOG {problem}; logging at info");
    }
    if let Some(why) = journal_unusable {
        tracing::warn!(
            "{why}; logging to standard error with <N> priority prefixes instead, without \
             journal fields (is systemd-journald running?)"
        );
    }
    LogGuard {
        _reporter: DropReporter::spawn(sink),
        _journal: journal_guard,
        _stderr: stderr_guard,
    }
}

/// The lossy, bounded, non-blocking writer to standard error (see the module docs) and the
/// guard that flushes it at exit. Without a writer thread (the system refused one) lines are
/// written directly: slower, never lost.
fn stderr_writer() -> (StderrQueue, Option<StderrGuard>) {
    let (queue, lines) = crossbeam_channel::bounded(STDERR_QUEUE_LINES);
    match std::thread::Builder::new()
        .name("log-stderr".into())
        .spawn(move || write_lines(lines))
    {
        Ok(_) => (
            StderrQueue {
                queue: Some(queue.clone()),
            },
            Some(StderrGuard { queue }),
        ),
        Err(e) => {
            eprintln!("nitro-vsock-proxy: cannot start the log writer thread ({e}); writing log lines directly");
            (StderrQueue { queue: None }, None)
        }
    }
}

/// What the standard-error writer thread is sent.
enum Line {
    Text(Vec<u8>),
    /// Sent by the guard at exit: answered once every line queued before it is written.
    Flush(Sender<()>),
}

/// The [`MakeWriter`] of the text, JSON and `<N>` formats: each formatted line (the fmt layer
/// writes a line in one call) goes onto the queue, or is dropped and counted when it is full.
struct StderrQueue {
    queue: Option<Sender<Line>>,
}

impl Write for &StderrQueue {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        match &self.queue {
            Some(queue) => {
                if queue.try_send(Line::Text(line.to_vec())).is_err() {
                    STDERR_DROPS.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                if std::io::stderr().write_all(line).is_err() {
                    STDERR_DROPS.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for StderrQueue {
    type Writer = &'a StderrQueue;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// The writer thread: each batch through one buffer, flushed before the thread pauses.
fn write_lines(lines: Receiver<Line>) {
    let mut out = std::io::BufWriter::with_capacity(STDERR_BUFFER_BYTES, std::io::stderr());
    let mut flushed = Vec::new();
    let mut failed = 0;
    while batch::drain(&lines, |line| match line {
        Line::Text(text) => {
            if out.write_all(&text).is_err() {
                failed += 1;
            }
        }
        Line::Flush(done) => flushed.push(done),
    }) {
        if out.flush().is_err() {
            failed += 1;
        }
        STDERR_DROPS.fetch_add(std::mem::take(&mut failed), Ordering::Relaxed);
        for done in flushed.drain(..) {
            let _ = done.try_send(());
        }
        std::thread::sleep(batch::PAUSE);
    }
}

/// Keeps the standard-error writer's queue open; on drop, waits (at most
/// [`STDERR_FLUSH_TIMEOUT`]) until the lines logged so far are written.
struct StderrGuard {
    queue: Sender<Line>,
}

impl Drop for StderrGuard {
    fn drop(&mut self) {
        let (done, flushed) = crossbeam_channel::bounded(1);
        if self
            .queue
            .send_timeout(Line::Flush(done), STDERR_FLUSH_TIMEOUT)
            .is_ok()
        {
            let _ = flushed.recv_timeout(STDERR_FLUSH_TIMEOUT);
        }
    }
}

/// Where the lines go, as the dropped-lines warning names it.
#[derive(Clone, Copy)]
enum Sink {
    Stderr,
    Journal,
}

impl Sink {
    fn describe(self) -> &'static str {
        match self {
            Sink::Stderr => "standard error was not keeping up",
            Sink::Journal => "the journal was not keeping up",
        }
    }
}

/// The thread that turns the drop counter into WARN lines (see the module docs).
struct DropReporter {
    stop: Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl DropReporter {
    fn spawn(sink: Sink) -> Option<DropReporter> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("log-drops".into())
            .spawn(move || {
                let mut drops = DropCount::default();
                loop {
                    let at_exit = match stopped.recv_timeout(DROP_CHECK_EVERY) {
                        Err(RecvTimeoutError::Timeout) => false,
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
                    };
                    if let Some(n) = drops.due_report(dropped_lines(), Instant::now(), at_exit) {
                        tracing::warn!(
                            dropped = n,
                            dropped_total = dropped_lines(),
                            "{n} log line{} dropped: {}",
                            if n == 1 { "" } else { "s" },
                            sink.describe()
                        );
                    }
                    if at_exit {
                        return;
                    }
                }
            });
        match thread {
            Ok(thread) => Some(DropReporter {
                stop,
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::warn!("cannot start the thread that reports dropped log lines: {e}; drops are still counted");
                None
            }
        }
    }
}

impl Drop for DropReporter {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// When to report drops: the count not yet reported, once a check saw no new drops (the sink
/// takes lines again) and [`DROP_REPORT_INTERVAL`] has passed since the last report; at exit,
/// whatever is left.
#[derive(Default)]
struct DropCount {
    reported: u64,
    seen: u64,
    last_report: Option<Instant>,
}

impl DropCount {
    fn due_report(&mut self, total: u64, now: Instant, at_exit: bool) -> Option<u64> {
        let quiet = total == self.seen;
        self.seen = total;
        let unreported = total.saturating_sub(self.reported);
        let due = self
            .last_report
            .is_none_or(|at| now.duration_since(at) >= DROP_REPORT_INTERVAL);
        if unreported == 0 || !(at_exit || (quiet && due)) {
            return None;
        }
        self.reported = total;
        self.last_report = Some(now);
        Some(unreported)
    }
}

/// The text format without timestamp and level, behind a `<N>` priority prefix (the journal
/// format when the journal socket cannot be used).
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
        write!(
            writer,
            "<{}>",
            journal::journal_priority(*event.metadata().level())
        )?;
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::journal::journal_priority;
    use tracing::Level;

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(journal_priority(Level::ERROR), 3);
        assert_eq!(journal_priority(Level::WARN), 4);
        assert_eq!(journal_priority(Level::INFO), 6);
        assert_eq!(journal_priority(Level::DEBUG), 7);
        assert_eq!(journal_priority(Level::TRACE), 7);
    }

    #[test]
    fn drops_are_reported_once_the_sink_is_quiet_and_at_most_every_interval() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut drops = DropCount::default();
        assert_eq!(drops.due_report(0, at(0), false), None, "nothing dropped");
        assert_eq!(drops.due_report(5, at(1), false), None, "still dropping");
        assert_eq!(drops.due_report(5, at(2), false), Some(5), "quiet again");
        assert_eq!(drops.due_report(5, at(3), false), None, "already reported");
        assert_eq!(drops.due_report(9, at(4), false), None, "still dropping");
        assert_eq!(
            drops.due_report(9, at(5), false),
            None,
            "too soon after the last"
        );
        assert_eq!(drops.due_report(9, at(12), false), Some(4));
        assert_eq!(
            drops.due_report(10, at(13), true),
            Some(1),
            "at exit, whatever is left"
        );
    }

    #[test]
    fn explicit_format_wins() {
        assert_eq!(choose(Some(LogFormat::Json)), LogFormat::Json);
        assert_eq!(choose(Some(LogFormat::Text)), LogFormat::Text);
    }
}
