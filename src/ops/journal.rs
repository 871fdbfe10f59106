//! Log entries sent to systemd's journal over its native protocol, as structured fields.
//!
//! This module owns the `journal` log format when the journal socket can be used: a
//! `tracing_subscriber` [`Layer`] that turns each event into one journal entry and a writer
//! thread that sends the entries as datagrams to `/run/systemd/journal/socket` (the protocol of
//! systemd's "Native Journal Protocol" document: `KEY=value\n`, or for a value with a newline
//! `KEY\n` + its length as 64-bit little-endian + the value + `\n`).
//!
//! Each entry carries:
//! - `MESSAGE`: the text of the `<N>`-prefixed line the journal format writes on standard error,
//!   without the prefix (spans with their fields, the message, the event's fields);
//! - `PRIORITY` ([`journal_priority`]), `SYSLOG_IDENTIFIER=nitro-vsock-proxy`,
//!   `TARGET` (the event's tracing target, e.g. `audit`), `CODE_FILE`, `CODE_LINE`;
//! - every field of the event and of its enclosing spans as `NVP_<NAME UPPERCASED>`, so
//!   `journalctl NVP_REASON=denied` finds the refused connections (a field of an inner span or
//!   of the event replaces one of the same name further out).
//!
//! Logging never waits for the journal: the layer puts each entry on a bounded queue
//! ([`QUEUE_ENTRIES`]) with `try_send`, and an entry that does not fit is dropped and counted
//! ([`dropped_entries`]). Only the writer thread ever blocks on the socket; it takes the queue in
//! batches ([`crate::ops::batch`]), so a busy proxy's entries do not wake it one by one. Values longer than
//! [`MAX_VALUE_BYTES`] are truncated rather than sent through a memfd. An entry the socket
//! refuses (journald restarting, an entry too large) is written on standard error as its
//! `<N>`-prefixed line instead, so it is not lost.
//!
//! [`SOCKET_ENV`] points the layer at another socket; it exists for the tests, which bind a
//! datagram socket of their own and read what the real binary sends.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FormatFields, FormattedFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::ops::batch;

/// The syslog priority journald gives a line with this level.
pub fn journal_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Where journald receives native-protocol datagrams.
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// For tests only: the path of the socket to send to instead of [`SOCKET`].
pub const SOCKET_ENV: &str = "NVP_TEST_JOURNAL_SOCKET";

/// The `SYSLOG_IDENTIFIER` of every entry.
pub const IDENTIFIER: &str = "nitro-vsock-proxy";

/// Entries waiting for the writer thread; more are dropped (and counted). A burst of this many
/// is absorbed while journald is busy.
pub const QUEUE_ENTRIES: usize = 8192;

/// A field value (or MESSAGE) is cut to this many bytes, so that an entry always fits in one
/// datagram (the socket's send buffer bounds its size).
pub const MAX_VALUE_BYTES: usize = 16 * 1024;

/// How long the writer thread waits for journald to take one entry before giving up on it
/// (and writing it on standard error instead).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`JournalGuard`]'s drop waits for the queued entries to be sent.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Entries dropped so far because the queue to the journal was full.
pub fn dropped_entries() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The socket path to use: [`SOCKET_ENV`] if set, else [`SOCKET`].
pub fn socket_path() -> PathBuf {
    match std::env::var_os(SOCKET_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(SOCKET),
    }
}

/// One event, ready to be serialized by the writer thread.
struct Entry {
    priority: u8,
    message: String,
    target: &'static str,
    file: Option<&'static str>,
    line: Option<u32>,
    /// `NVP_...` names and their values, outermost span first, no name twice.
    fields: Vec<(String, String)>,
}

enum Msg {
    Entry(Entry),
    /// Sent by the guard at exit: answered once everything queued before it was sent.
    Flush(Sender<()>),
}

/// The layer that sends every event to the journal (see the module docs).
pub struct JournalLayer {
    queue: Sender<Msg>,
}

/// Keeps the writer thread's queue open; on drop, waits (at most [`FLUSH_TIMEOUT`]) until the
/// entries logged so far are sent, so the last lines before exit reach the journal.
pub struct JournalGuard {
    queue: Sender<Msg>,
    _writer: JoinHandle<()>,
}

impl Drop for JournalGuard {
    fn drop(&mut self) {
        let (done, flushed) = crossbeam_channel::bounded(1);
        if self
            .queue
            .send_timeout(Msg::Flush(done), FLUSH_TIMEOUT)
            .is_ok()
        {
            let _ = flushed.recv_timeout(FLUSH_TIMEOUT);
        }
    }
}

/// The layer and its writer thread, if the journal socket accepts a connection; otherwise why
/// not (the caller falls back to `<N>`-prefixed lines on standard error).
pub fn connect() -> Result<(JournalLayer, JournalGuard), String> {
    let path = socket_path();
    let socket = UnixDatagram::unbound()
        .and_then(|s| s.connect(&path).map(|()| s))
        .map_err(|e| format!("cannot use the journal socket {}: {e}", path.display()))?;
    // A timeout rather than a non-blocking socket: this thread may wait for a busy journald, the
    // callers never do (the queue in front of it is bounded and lossy).
    socket
        .set_write_timeout(Some(SEND_TIMEOUT))
        .map_err(|e| format!("cannot set a send timeout on the journal socket: {e}"))?;
    let (queue, entries) = crossbeam_channel::bounded(QUEUE_ENTRIES);
    let writer = std::thread::Builder::new()
        .name("log-journal".into())
        .spawn(move || send_entries(socket, entries))
        .map_err(|e| format!("cannot start the journal writer thread: {e}"))?;
    Ok((
        JournalLayer {
            queue: queue.clone(),
        },
        JournalGuard {
            queue,
            _writer: writer,
        },
    ))
}

/// The writer thread: sends each entry (one datagram each, as the protocol has it), in batches
/// with a pause between them ([`crate::ops::batch`]); one the socket refuses goes to standard
/// error.
fn send_entries(socket: UnixDatagram, entries: Receiver<Msg>) {
    let mut datagram = Vec::with_capacity(4096);
    let mut flushed = Vec::new();
    while batch::drain(&entries, |msg| match msg {
        Msg::Entry(entry) => {
            datagram.clear();
            serialize(&entry, &mut datagram);
            if socket.send(&datagram).is_err() {
                let line = format!("<{}>{}\n", entry.priority, entry.message);
                if std::io::stderr().write_all(line.as_bytes()).is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Msg::Flush(done) => flushed.push(done),
    }) {
        for done in flushed.drain(..) {
            let _ = done.try_send(());
        }
        std::thread::sleep(batch::PAUSE);
    }
}

/// The datagram for `entry`.
fn serialize(entry: &Entry, out: &mut Vec<u8>) {
    push_field(out, "PRIORITY", &entry.priority.to_string());
    push_field(out, "SYSLOG_IDENTIFIER", IDENTIFIER);
    push_field(out, "MESSAGE", &entry.message);
    push_field(out, "TARGET", entry.target);
    if let Some(file) = entry.file {
        push_field(out, "CODE_FILE", file);
    }
    if let Some(line) = entry.line {
        push_field(out, "CODE_LINE", &line.to_string());
    }
    for (name, value) in &entry.fields {
        push_field(out, name, value);
    }
}

/// One field in the native protocol: `KEY=value\n`, or the length-prefixed binary form for a
/// value with a newline (journald would take the newline as the end of the field).
fn push_field(out: &mut Vec<u8>, key: &str, value: &str) {
    let value = truncate(value, MAX_VALUE_BYTES);
    out.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The journal field name for a tracing field: `NVP_` and the name in upper case, every
/// character the journal does not allow (only `A-Z`, `0-9`, `_`) as `_`, at most 64 bytes.
pub fn field_name(name: &str) -> String {
    let name = name.strip_prefix("r#").unwrap_or(name);
    let mut out = String::with_capacity(4 + name.len());
    out.push_str("NVP_");
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    out.truncate(64);
    out
}

/// What the layer keeps for each span: its fields as text (as the text format shows them) and
/// as journal fields.
#[derive(Default)]
struct SpanFields {
    text: String,
    fields: Vec<(String, String)>,
}

/// Collects fields as `(NVP_NAME, value)`, a later value replacing an earlier one of the same
/// name; `message` is kept apart (it is MESSAGE), and `log.` fields (from the `log` crate
/// bridge) are left out, as the text format does.
struct Collector<'a> {
    fields: &'a mut Vec<(String, String)>,
}

impl Collector<'_> {
    fn put(&mut self, field: &Field, value: String) {
        let name = field.name();
        if name == "message" || name.starts_with("log.") {
            return;
        }
        let name = field_name(name);
        match self.fields.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((name, value)),
        }
    }
}

impl Visit for Collector<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.to_string());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.to_string());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.to_string());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.to_string());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields arrive here too, wrapped so that Debug prints their Display form.
        self.put(field, format!("{value:?}"));
    }
}

/// The fields as the text format shows them (`name=value name2=value2`).
fn text_of(fields: impl RecordFields) -> String {
    let mut text = String::new();
    let _ = DefaultFields::new().format_fields(Writer::new(&mut text), fields);
    text
}

impl<S> Layer<S> for JournalLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = SpanFields {
            text: text_of(attrs),
            fields: Vec::new(),
        };
        attrs.record(&mut Collector {
            fields: &mut fields.fields,
        });
        span.extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        let Some(fields) = extensions.get_mut::<SpanFields>() else {
            return;
        };
        // The text format appends recorded fields after the ones the span was created with.
        let mut text = FormattedFields::<DefaultFields>::new(std::mem::take(&mut fields.text));
        let _ = DefaultFields::new().add_fields(&mut text, values);
        fields.text = text.fields;
        values.record(&mut Collector {
            fields: &mut fields.fields,
        });
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let metadata = event.metadata();
        let mut message = String::new();
        let mut fields = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            let mut any = false;
            for span in scope.from_root() {
                any = true;
                message.push_str(span.name());
                if let Some(span_fields) = span.extensions().get::<SpanFields>() {
                    if !span_fields.text.is_empty() {
                        message.push('{');
                        message.push_str(&span_fields.text);
                        message.push('}');
                    }
                    for (name, value) in &span_fields.fields {
                        match fields
                            .iter_mut()
                            .find(|(n, _): &&mut (String, String)| n == name)
                        {
                            Some(slot) => slot.1 = value.clone(),
                            None => fields.push((name.clone(), value.clone())),
                        }
                    }
                }
                message.push(':');
            }
            if any {
                message.push(' ');
            }
        }
        message.push_str(&text_of(event));
        event.record(&mut Collector {
            fields: &mut fields,
        });
        let entry = Entry {
            priority: journal_priority(*metadata.level()),
            message,
            target: metadata.target(),
            file: metadata.file(),
            line: metadata.line(),
            fields,
        };
        match self.queue.try_send(Msg::Entry(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_prefixed_upper_case_and_journal_safe() {
        assert_eq!(field_name("reason"), "NVP_REASON");
        assert_eq!(field_name("r#type"), "NVP_TYPE");
        assert_eq!(field_name("allowed_by"), "NVP_ALLOWED_BY");
        assert_eq!(field_name("a.b-c"), "NVP_A_B_C");
        assert_eq!(field_name(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn a_value_with_a_newline_uses_the_binary_form() {
        let mut out = Vec::new();
        push_field(&mut out, "A", "plain");
        push_field(&mut out, "B", "two\nlines");
        let mut want = b"A=plain\nB\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(out, want);
    }

    #[test]
    fn long_values_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_VALUE_BYTES);
        let cut = truncate(&long, MAX_VALUE_BYTES + 1);
        assert_eq!(cut.len(), MAX_VALUE_BYTES);
        assert_eq!(truncate("short", 10), "short");
    }
}
