//! HTTP CONNECT, for `mode: connect` routes: the request head, its target and the answers.
//!
//! This module owns reading a request head (at most [`MAX_HEAD`] bytes within [`HEAD_TIMEOUT`],
//! parsed with `httparse`), taking `CONNECT host:port` from it (a name, an IPv4 literal or
//! `[IPv6]`), and writing the one-line answers: `200 Connection Established` before relaying
//! (bytes after the head are passed on), or an error status with a one-line reason and a close.
//! No other method is served: TLS stays end to end, there is no plain-HTTP forwarding.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::remote::Remote;
use crate::net::prefix::{read_prefix, PrefixError};
use crate::policy::host::Host;

/// The largest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEADERS: usize = 64;

/// A CONNECT request: where to, and the bytes the client sent after the head.
#[derive(Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    pub host: Host,
    pub port: u16,
    pub after_head: Vec<u8>,
}

/// Why a request is refused before any connect, with its HTTP status.
#[derive(Debug, PartialEq, Eq)]
pub enum BadRequest {
    /// 400: not HTTP, or a CONNECT target that is not `host:port`.
    Malformed(String),
    /// 405: a method other than CONNECT.
    Method(String),
    /// 431: no end of the head within [`MAX_HEAD`] bytes.
    TooLarge,
    /// 408: no whole head within [`HEAD_TIMEOUT`].
    Timeout,
    /// The client closed before its head was whole (nothing to answer).
    Closed,
}

impl BadRequest {
    pub fn status(&self) -> u16 {
        match self {
            BadRequest::Malformed(_) | BadRequest::Closed => 400,
            BadRequest::Method(_) => 405,
            BadRequest::TooLarge => 431,
            BadRequest::Timeout => 408,
        }
    }

    /// A short machine-friendly reason for structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            BadRequest::Malformed(_) => "bad_request",
            BadRequest::Method(_) => "method_not_allowed",
            BadRequest::TooLarge => "head_too_large",
            BadRequest::Timeout => "head_timeout",
            BadRequest::Closed => "client_closed",
        }
    }
}

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadRequest::Malformed(why) => write!(f, "malformed request: {why}"),
            BadRequest::Method(method) => write!(
                f,
                "method {method:?} is not served: this proxy only tunnels (CONNECT host:port)"
            ),
            BadRequest::TooLarge => write!(f, "request head larger than {MAX_HEAD} bytes"),
            BadRequest::Timeout => write!(
                f,
                "no whole request head within {}",
                humantime::format_duration(HEAD_TIMEOUT)
            ),
            BadRequest::Closed => f.write_str("the client closed before its request was whole"),
        }
    }
}

/// Reads one request head from `client`.
pub async fn read_request<S: AsyncRead + Unpin>(
    client: &mut S,
) -> Result<ConnectRequest, BadRequest> {
    match read_prefix(client, Vec::new(), MAX_HEAD, HEAD_TIMEOUT, parse_head).await {
        Ok((request, _)) => Ok(request),
        Err(PrefixError::Parse(bad)) => Err(bad),
        Err(PrefixError::TooLarge) => Err(BadRequest::TooLarge),
        Err(PrefixError::Timeout) => Err(BadRequest::Timeout),
        Err(PrefixError::Closed) => Err(BadRequest::Closed),
    }
}

/// What the bytes so far say: `Ok(None)` while the head is not whole. Pure.
pub fn parse_head(bytes: &[u8]) -> Result<Option<ConnectRequest>, BadRequest> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadRequest::TooLarge),
        Err(e) => return Err(BadRequest::Malformed(e.to_string())),
    };
    let method = request.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(BadRequest::Method(method.to_owned()));
    }
    let target = request.path.unwrap_or_default();
    let (host, port) = parse_authority(target).map_err(BadRequest::Malformed)?;
    Ok(Some(ConnectRequest {
        host,
        port,
        after_head: bytes[head_len..].to_vec(),
    }))
}

/// `host:port`, `a.b.c.d:port` or `[v6]:port`: a CONNECT target.
pub fn parse_authority(target: &str) -> Result<(Host, u16), String> {
    if target.contains(['{', '}', '/', '@']) {
        return Err(format!("CONNECT target {target:?} is not host:port"));
    }
    let remote =
        Remote::parse_host_port(target).map_err(|e| format!("CONNECT target {target:?}: {e}"))?;
    let target = remote.target(None)?;
    Ok((target.host, target.port))
}

/// Writes `200 Connection Established`.
pub async fn established<S: AsyncWrite + Unpin>(client: &mut S) -> std::io::Result<()> {
    client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
}

/// Writes an error answer with a one-line reason; the caller then closes.
pub async fn refuse<S: AsyncWrite + Unpin>(client: &mut S, status: u16, reason: &str) {
    let phrase = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("{}\n", reason.replace(['\r', '\n'], " "));
    let allow = if status == 405 {
        "Allow: CONNECT\r\n"
    } else {
        ""
    };
    let answer = format!(
        "HTTP/1.1 {status} {phrase}\r\n{allow}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The client may be gone already; there is nothing more to tell it.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.write_all(answer.as_bytes())).await;
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_targets() {
        let r = parse_head(
            b"CONNECT API.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\nearly",
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.host, Host::parse("api.example.com").unwrap());
        assert_eq!(r.port, 443);
        assert_eq!(r.after_head, b"early");
        let r = parse_head(b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.host, Host::Ip("2001:db8::1".parse().unwrap()));
        let r = parse_head(b"CONNECT 192.0.2.1:443 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.host, Host::Ip("192.0.2.1".parse().unwrap()));
        assert_eq!(
            parse_head(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a"),
            Ok(None)
        );
    }

    #[test]
    fn bad_requests_get_their_status() {
        let status = |head: &[u8]| parse_head(head).unwrap_err().status();
        assert_eq!(status(b"GET http://a.example/ HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(b"CONNECT a.example HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT a.example:0 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT a.example:99999 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT *.example.com:443 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT kms.{region}.x:443 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"\x16\x03\x01\x00\x05hello\r\n\r\n"), 400);
        let many: Vec<u8> = [
            &b"CONNECT a.example:443 HTTP/1.1\r\n"[..],
            &b"X: y\r\n".repeat(MAX_HEADERS + 1),
            b"\r\n",
        ]
        .concat();
        assert_eq!(status(&many), 431);
    }
}
