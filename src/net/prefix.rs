//! Reading the first bytes of a connection until they say where it goes.
//!
//! This module owns the one bounded read both dynamic route kinds do before any policy
//! decision ([`crate::proxy::request::connect`]'s request head, [`crate::proxy::request::sni`]'s ClientHello): read until a pure
//! parser says the prefix is whole, at most `max` bytes, within `timeout`, and hand back every
//! byte read so nothing is lost on the way to the upstream.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Why no whole prefix was read.
#[derive(Debug, PartialEq, Eq)]
pub enum PrefixError<E> {
    /// The parser refused the bytes.
    Parse(E),
    /// `max` bytes and still not whole.
    TooLarge,
    /// Not whole within the timeout.
    Timeout,
    /// The client closed (or failed) first.
    Closed,
}

/// Reads from `client` until `parse` returns `Some`; the parsed value and the bytes read.
/// `start` is what was already read from `client` by someone else (the bytes a CONNECT client
/// sent behind its head are the start of the ClientHello in its tunnel): parsed first, counted
/// against `max` and handed back at the front of the bytes.
pub async fn read_prefix<S, T, E>(
    client: &mut S,
    start: Vec<u8>,
    max: usize,
    timeout: Duration,
    parse: impl Fn(&[u8]) -> Result<Option<T>, E>,
) -> Result<(T, Vec<u8>), PrefixError<E>>
where
    S: AsyncRead + Unpin,
{
    let read = async {
        let mut bytes = start;
        let mut chunk = [0u8; 2048];
        loop {
            if let Some(parsed) = parse(&bytes).map_err(PrefixError::Parse)? {
                return Ok((parsed, bytes));
            }
            if bytes.len() >= max {
                return Err(PrefixError::TooLarge);
            }
            let room = (max - bytes.len()).min(chunk.len());
            match client.read(&mut chunk[..room]).await {
                Ok(0) | Err(_) => return Err(PrefixError::Closed),
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(PrefixError::Timeout))
}
