//! The query/reply protocol between `client` and `server`, compatible with the workshop's Python.
//!
//! This module owns the wire format and nothing else (no I/O): the client connects, sends the
//! query (a region name, UTF-8, at most [`MAX_QUERY_BYTES`], in one write, without closing its
//! side); the server reads the whole query (up to a newline, a NUL, the client's half-close, or
//! a pause after a region-shaped name: see `query_reader`), trimmed, replies once and closes. A reply is a JSON array of prefixes (`["3.5.0.0/19","52.216.0.0/15"]`, `[]` for an
//! unknown region) or a JSON object `{"error": "..."}`. The workshop's Python server replies with
//! a Python list (`['3.5.0.0/19', '52.216.0.0/15']`); [`interpret_reply`] accepts that as an
//! answer too.

use std::fmt;

/// The longest query, in bytes: the workshop's server reads it with one `recv(1024)`.
pub const MAX_QUERY_BYTES: usize = 1024;

/// Why the bytes a client sent are not a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// Nothing but whitespace (or NUL bytes).
    Empty,
    /// More than [`MAX_QUERY_BYTES`] bytes.
    TooLong(usize),
    /// Not UTF-8.
    NotUtf8,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::Empty => {
                f.write_str("empty query: send a region name such as us-east-1")
            }
            QueryError::TooLong(n) => write!(
                f,
                "query too long: more than {MAX_QUERY_BYTES} bytes (got at least {n}); send a region name such as us-east-1"
            ),
            QueryError::NotUtf8 => {
                f.write_str("query is not UTF-8 text: send a region name such as us-east-1")
            }
        }
    }
}

/// The region a client asked for: the bytes received, as UTF-8, without leading and trailing
/// whitespace or NUL bytes (a C client may send its string terminator).
pub fn parse_query(raw: &[u8]) -> Result<&str, QueryError> {
    if raw.len() > MAX_QUERY_BYTES {
        return Err(QueryError::TooLong(raw.len()));
    }
    let text = std::str::from_utf8(raw).map_err(|_| QueryError::NotUtf8)?;
    let query = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if query.is_empty() {
        return Err(QueryError::Empty);
    }
    Ok(query)
}

/// The reply to a successful query: a JSON array of the prefixes, in the order given.
pub fn prefixes_reply<S: AsRef<str>>(prefixes: &[S]) -> Vec<u8> {
    let list: Vec<&str> = prefixes.iter().map(AsRef::as_ref).collect();
    // Serialising a list of strings cannot fail; fall back to an error reply rather than panic.
    serde_json::to_vec(&list).unwrap_or_else(|e| error_reply(&format!("cannot encode: {e}")))
}

/// The reply to a query that could not be answered: `{"error": message}`.
pub fn error_reply(message: &str) -> Vec<u8> {
    let object = serde_json::json!({ "error": message });
    serde_json::to_vec(&object).unwrap_or_else(|_| br#"{"error":"unknown error"}"#.to_vec())
}

/// What a reply means to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An answer: a JSON array, or another format such as the Python server's list. Printed as is.
    Answer,
    /// The server's `{"error": ...}` object, with its message.
    Error(String),
    /// The server closed the connection without sending anything.
    Empty,
}

/// Classifies the bytes a server sent before closing.
pub fn interpret_reply(reply: &[u8]) -> Reply {
    if reply.iter().all(u8::is_ascii_whitespace) {
        return Reply::Empty;
    }
    match serde_json::from_slice::<serde_json::Value>(reply) {
        Ok(serde_json::Value::Object(map)) => match map.get("error") {
            Some(serde_json::Value::String(message)) => Reply::Error(message.clone()),
            Some(other) => Reply::Error(other.to_string()),
            None => Reply::Answer,
        },
        _ => Reply::Answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_trimmed_of_whitespace_and_nul() {
        assert_eq!(parse_query(b"us-east-1"), Ok("us-east-1"));
        assert_eq!(parse_query(b"  us-east-1\n"), Ok("us-east-1"));
        assert_eq!(parse_query(b"\tus-east-1\r\n"), Ok("us-east-1"));
        assert_eq!(parse_query(b"us-east-1\0"), Ok("us-east-1"));
        assert_eq!(parse_query(b"eu west"), Ok("eu west"), "inner spaces stay");
    }

    #[test]
    fn bad_queries_are_named() {
        assert_eq!(parse_query(b""), Err(QueryError::Empty));
        assert_eq!(parse_query(b" \r\n\0"), Err(QueryError::Empty));
        assert_eq!(parse_query(b"\xff\xfe"), Err(QueryError::NotUtf8));
        let long = vec![b'a'; MAX_QUERY_BYTES + 1];
        assert_eq!(
            parse_query(&long),
            Err(QueryError::TooLong(MAX_QUERY_BYTES + 1))
        );
        let longest = vec![b'a'; MAX_QUERY_BYTES];
        assert!(parse_query(&longest).is_ok(), "exactly 1024 bytes is fine");
        assert!(QueryError::Empty.to_string().contains("us-east-1"));
    }

    #[test]
    fn prefixes_reply_is_a_json_array_in_order() {
        assert_eq!(
            prefixes_reply(&["3.5.0.0/19", "52.216.0.0/15"]),
            br#"["3.5.0.0/19","52.216.0.0/15"]"#
        );
        assert_eq!(prefixes_reply::<&str>(&[]), b"[]");
        let parsed: Vec<String> =
            serde_json::from_slice(&prefixes_reply(&["2600:1f18::/33"])).unwrap();
        assert_eq!(parsed, ["2600:1f18::/33"]);
    }

    #[test]
    fn error_reply_is_a_json_object_with_escaping() {
        let reply = error_reply("cannot download \"x\"\nnext line");
        let value: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(value["error"], "cannot download \"x\"\nnext line");
        assert_eq!(value.as_object().unwrap().len(), 1);
    }

    #[test]
    fn replies_are_classified() {
        assert_eq!(interpret_reply(br#"["3.5.0.0/19"]"#), Reply::Answer);
        assert_eq!(interpret_reply(b"[]"), Reply::Answer);
        assert_eq!(
            interpret_reply(b"['3.5.0.0/19', '52.216.0.0/15']"),
            Reply::Answer,
            "the Python server's list"
        );
        assert_eq!(
            interpret_reply(&error_reply("proxy down")),
            Reply::Error("proxy down".into())
        );
        assert_eq!(
            interpret_reply(br#"{"error": {"code": 7}}"#),
            Reply::Error(r#"{"code":7}"#.into())
        );
        assert_eq!(interpret_reply(br#"{"other": 1}"#), Reply::Answer);
        assert_eq!(interpret_reply(b""), Reply::Empty);
        assert_eq!(interpret_reply(b"\n"), Reply::Empty);
    }
}
