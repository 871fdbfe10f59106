//! Reading one query off a client's connection: where it ends, however it was split.
//!
//! This module owns the server's side of "the query is complete". A query may reach the server
//! in several reads (a client that writes `eu-` and then `west-1\n`, or one write split in
//! transit), so the server keeps reading until one of these, whichever comes first:
//! * a newline or a NUL byte (a C client's terminator): the query is what came before it;
//! * the client's half-close (end of stream);
//! * no further byte for [`QUERY_PAUSE`] after bytes that end in a digit, as every region name
//!   does (`us-east-1`): the workshop's client sends the region in one write with neither a
//!   newline nor a close, and must not wait for the client timeout;
//! * bytes that are not UTF-8 whatever follows, or more than [`MAX_QUERY_BYTES`]: complete at
//!   once, and [`protocol::parse_query`](crate::protocol::parse_query) names the fault.
//!
//! Anything else (`eu-` and then silence) waits for more, at most the client timeout counted
//! from the connection: a query that never ends is timed out, and the client is told how to end
//! one.

use std::fmt;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::{timeout_at, Instant};

use crate::protocol::MAX_QUERY_BYTES;

/// How long the server waits for more after bytes that already look like a whole region name.
pub const QUERY_PAUSE: Duration = Duration::from_millis(200);

/// Why no query could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed without sending anything.
    ClosedEmpty,
    /// Nothing at all arrived within the client timeout.
    Silent(Duration),
    /// Bytes arrived, but the query did not end within the client timeout.
    Unfinished { timeout: Duration, bytes: usize },
    /// Reading failed.
    Io(std::io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::ClosedEmpty => f.write_str("the client closed without sending a query"),
            ReadError::Silent(t) => write!(
                f,
                "no query received within {}: send a region name such as us-east-1 right after connecting",
                humantime::format_duration(*t)
            ),
            ReadError::Unfinished { timeout, bytes } => write!(
                f,
                "the query did not end within {} ({bytes} bytes without a newline): end it with a newline, or send the whole region name in one write",
                humantime::format_duration(*timeout)
            ),
            ReadError::Io(e) => write!(f, "reading the query failed: {e}"),
        }
    }
}

/// Reads one query from `stream` within `client_timeout`; returns its raw bytes (without the
/// terminator, untrimmed) for [`crate::protocol::parse_query`].
pub async fn read_query<R: AsyncReadExt + Unpin>(
    stream: &mut R,
    client_timeout: Duration,
) -> Result<Vec<u8>, ReadError> {
    let deadline = Instant::now() + client_timeout;
    let mut received = Vec::with_capacity(64);
    let mut chunk = [0u8; MAX_QUERY_BYTES + 1];
    loop {
        if let Some(end) = received.iter().position(|&b| b == b'\n' || b == b'\0') {
            received.truncate(end);
            return Ok(received);
        }
        if received.len() > MAX_QUERY_BYTES || never_utf8(&received) {
            return Ok(received);
        }
        let looks_whole = received.last().is_some_and(u8::is_ascii_digit);
        let wait_until = if looks_whole {
            deadline.min(Instant::now() + QUERY_PAUSE)
        } else {
            deadline
        };
        let room = MAX_QUERY_BYTES + 1 - received.len();
        match timeout_at(wait_until, stream.read(&mut chunk[..room])).await {
            Ok(Ok(0)) if received.is_empty() => return Err(ReadError::ClosedEmpty),
            Ok(Ok(0)) => return Ok(received),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(ReadError::Io(e)),
            Err(_) if looks_whole => return Ok(received),
            Err(_) if received.is_empty() => return Err(ReadError::Silent(client_timeout)),
            Err(_) => {
                return Err(ReadError::Unfinished {
                    timeout: client_timeout,
                    bytes: received.len(),
                })
            }
        }
    }
}

/// Whether `bytes` hold a sequence that no continuation can make UTF-8 (an incomplete
/// character at the end may still be completed by the next read).
fn never_utf8(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_err_and(|e| e.error_len().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// Runs `read_query` against a peer that sends `parts` with a pause of `gap` between them,
    /// keeping its side open afterwards.
    async fn read_parts(parts: &[&[u8]], gap: Duration) -> Result<Vec<u8>, ReadError> {
        let (mut server, mut client) = tokio::io::duplex(4096);
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for part in parts {
                client.write_all(&part).await.unwrap();
                tokio::time::sleep(gap).await;
            }
            // Keep the write side open until the reader is done.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(client);
        });
        let result = read_query(&mut server, TIMEOUT).await;
        writer.abort();
        result
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_split_across_reads_is_read_whole() {
        // The pause between the parts is far longer than QUERY_PAUSE: "eu-" cannot be a region.
        let got = read_parts(&[b"eu-", b"west-1\n"], Duration::from_secs(3)).await;
        assert_eq!(got.unwrap(), b"eu-west-1");
        let got = read_parts(&[b"us-", b"gov-", b"west-1"], Duration::from_secs(1)).await;
        assert_eq!(got.unwrap(), b"us-gov-west-1", "ended by the pause");
    }

    #[tokio::test(start_paused = true)]
    async fn the_query_ends_at_a_newline_or_nul_and_the_rest_is_ignored() {
        let got = read_parts(&[b"  us-east-1\r\nnext line"], Duration::ZERO).await;
        assert_eq!(got.unwrap(), b"  us-east-1\r");
        let got = read_parts(&[b"mars\0junk"], Duration::ZERO).await;
        assert_eq!(got.unwrap(), b"mars");
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_close_ends_the_query() {
        let (mut server, mut client) = tokio::io::duplex(64);
        client.write_all(b"eu-").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(read_query(&mut server, TIMEOUT).await.unwrap(), b"eu-");
        let (mut server, client) = tokio::io::duplex(64);
        drop(client);
        assert!(matches!(
            read_query(&mut server, TIMEOUT).await,
            Err(ReadError::ClosedEmpty)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_that_never_ends_times_out() {
        let got = read_parts(&[b"eu-"], Duration::ZERO).await;
        let Err(e @ ReadError::Unfinished { bytes: 3, .. }) = got else {
            panic!("not timed out: {got:?}");
        };
        assert!(e.to_string().contains("end it with a newline"));
        let got = read_parts(&[], Duration::ZERO).await;
        assert!(matches!(got, Err(ReadError::Silent(TIMEOUT))), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_and_binary_queries_end_at_once() {
        let long = vec![b'a'; 1500];
        let got = read_parts(&[&long], Duration::ZERO).await.unwrap();
        assert_eq!(
            got.len(),
            MAX_QUERY_BYTES + 1,
            "read no further than the bound"
        );
        let got = read_parts(&[b"\xff\xfe"], Duration::ZERO).await.unwrap();
        assert_eq!(got, b"\xff\xfe");
        // The first two bytes of a three-byte character: wait for the third.
        let got = read_parts(&[b"eu-\xe2\x82", b"\xac\n"], Duration::from_secs(1)).await;
        assert_eq!(got.unwrap(), "eu-€".as_bytes());
    }
}
