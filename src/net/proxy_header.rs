//! The PROXY protocol (HAProxy's v1 text and v2 binary headers): writing the header an ingress
//! route sends the enclave before the client's first byte, and reading the one a trusted load
//! balancer sends before its client's.
//!
//! This module owns the header's bytes, through the `ppp` crate (never hand-written): [`encode`]
//! (the client and the address it connected to, IPv4 written IPv4-mapped beside an IPv6 one so
//! a known client is never `UNSPEC`/`UNKNOWN`), [`parse`] (v1 or v2, whole or not yet, bounded by
//! [`MAX_HEADER`]) and [`read_header`] (a bounded read of one header that may arrive over several
//! reads). It knows nothing of who is trusted: that is the caller's (the daemon's ingress
//! routes, enclave-app's `ingress` and `server`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ppp::{v1, v2};
use tokio::io::AsyncRead;

use crate::net::prefix::{read_prefix, PrefixError};

/// The largest header read: a v2 header with its addresses and the TLVs a load balancer adds
/// (AWS's NLB: the VPC endpoint id) fits in a few hundred bytes; v1 is at most 107.
pub const MAX_HEADER: usize = 4096;

/// The fixed part of a v2 header before its addresses: the signature, version and command,
/// family and protocol, and the length (which counts what follows it).
const V2_FIXED: usize = 16;

/// How a text header starts, and its longest line (the protocol's limit, CRLF included).
const V1_START: &[u8] = b"PROXY";
const V1_MAX: usize = 107;

/// Which header, if any, to write before the client's bytes (`proxy_protocol:` of a route).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Version {
    /// No header: the enclave sees the client's bytes only.
    #[default]
    None,
    /// The text header, `PROXY TCP4 ...\r\n`.
    V1,
    /// The binary header.
    V2,
}

impl FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Version, String> {
        match s {
            "none" => Ok(Version::None),
            "v1" => Ok(Version::V1),
            "v2" => Ok(Version::V2),
            _ => Err(format!(
                "{s:?} is not a PROXY protocol version: use none, v1 or v2"
            )),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::None => "none",
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// The addresses of one proxied connection: the client, and the address it connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses {
    pub client: SocketAddr,
    pub destination: SocketAddr,
}

/// A header read from a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection (v2 `PROXY` over IPv4 or IPv6, v1 `TCP4`/`TCP6`).
    Proxied(Addresses),
    /// A connection of the sender's own (v2 `LOCAL`, v1 `UNKNOWN`, or an address family with no
    /// IP address, such as AF_UNIX): a health check, whose own address is the client.
    Local,
}

/// `addr` with an IPv4-mapped IPv6 address written as the IPv4 one (a dual-stack listener's
/// IPv4 client is IPv4).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `addr` as IPv6 (an IPv4 address IPv4-mapped).
fn as_v6(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

/// Both addresses in one family: IPv4 when both are, else both IPv6 (an IPv4 one mapped), so
/// that the header is TCP4 or TCP6, never UNSPEC or UNKNOWN for a known client.
fn one_family(addresses: Addresses) -> (SocketAddr, SocketAddr) {
    let (client, destination) = (
        canonical(addresses.client),
        canonical(addresses.destination),
    );
    if client.is_ipv4() && destination.is_ipv4() {
        (client, destination)
    } else {
        (as_v6(client), as_v6(destination))
    }
}

/// The header `version` writes for `addresses` (empty for [`Version::None`]).
pub fn encode(version: Version, addresses: Addresses) -> std::io::Result<Vec<u8>> {
    let (client, destination) = one_family(addresses);
    match version {
        Version::None => Ok(Vec::new()),
        Version::V1 => {
            let text = match (client, destination) {
                (SocketAddr::V4(c), SocketAddr::V4(d)) => {
                    v1::Addresses::new_tcp4(*c.ip(), *d.ip(), c.port(), d.port())
                }
                (c, d) => {
                    let (SocketAddr::V6(c), SocketAddr::V6(d)) = (as_v6(c), as_v6(d)) else {
                        // `as_v6` always gives IPv6; kept total rather than unwrapped.
                        return Ok(v1::Addresses::Unknown.to_string().into_bytes());
                    };
                    v1::Addresses::new_tcp6(*c.ip(), *d.ip(), c.port(), d.port())
                }
            };
            Ok(text.to_string().into_bytes())
        }
        Version::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (client, destination),
        )
        .build(),
    }
}

/// A header that cannot be used: what is wrong with it, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadHeader(pub String);

impl fmt::Display for BadHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses the start of a connection as a PROXY header, v2 or v1: `Ok(None)` while more bytes
/// could still make it whole, `Ok(Some((header, length)))` once it is (the bytes after `length`
/// are the client's), `Err` when no more bytes could (not a header, malformed, or larger than
/// [`MAX_HEADER`]).
pub fn parse(bytes: &[u8]) -> Result<Option<(Header, usize)>, BadHeader> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if V1_START.starts_with(&bytes[..bytes.len().min(V1_START.len())]) {
        parse_v1(bytes)
    } else {
        parse_v2(bytes)
    }
}

/// The text header is one line: it is parsed once its end is there (`ppp` reads a line cut
/// short, such as a port half sent, as malformed rather than as incomplete).
fn parse_v1(bytes: &[u8]) -> Result<Option<(Header, usize)>, BadHeader> {
    let window = &bytes[..bytes.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if bytes.len() >= V1_MAX {
            return Err(BadHeader(format!(
                "a PROXY v1 header longer than its {V1_MAX}-byte limit"
            )));
        }
        return Ok(None);
    };
    let line = &bytes[..end + 2];
    let header = v1::Header::try_from(line)
        .map_err(|e| BadHeader(format!("a malformed PROXY v1 header: {e}")))?;
    let parsed = match header.addresses {
        v1::Addresses::Tcp4(a) => Header::Proxied(Addresses {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        v1::Addresses::Tcp6(a) => Header::Proxied(Addresses {
            client: canonical(SocketAddr::from((a.source_address, a.source_port))),
            destination: canonical(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        }),
        v1::Addresses::Unknown => Header::Local,
    };
    Ok(Some((parsed, line.len())))
}

/// The binary header says its length up front.
fn parse_v2(bytes: &[u8]) -> Result<Option<(Header, usize)>, BadHeader> {
    let header = match v2::Header::try_from(bytes) {
        Ok(header) => header,
        // One longer than we would read fails now, not at the deadline.
        Err(v2::ParseError::Partial(_, length)) if V2_FIXED + length > MAX_HEADER => {
            return Err(BadHeader(format!(
                "a PROXY v2 header of {} bytes, over the {MAX_HEADER} bytes read",
                V2_FIXED + length
            )))
        }
        Err(v2::ParseError::Partial(..) | v2::ParseError::Incomplete(_)) => return Ok(None),
        Err(v2::ParseError::Prefix) => {
            return Err(BadHeader(
                "no PROXY header: the connection starts with other bytes".into(),
            ))
        }
        Err(e) => return Err(BadHeader(format!("a malformed PROXY v2 header: {e}"))),
    };
    let parsed = match (header.command, header.addresses) {
        (v2::Command::Local, _) => Header::Local,
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Header::Proxied(Addresses {
            client: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Header::Proxied(Addresses {
            client: canonical(SocketAddr::from((a.source_address, a.source_port))),
            destination: canonical(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        }),
        // AF_UNIX or UNSPEC: no IP address to go by; the sender is the client.
        (v2::Command::Proxy, _) => Header::Local,
    };
    Ok(Some((parsed, header.len())))
}

/// Why no header was read by [`read_header`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// What was sent is not a usable header.
    Bad(BadHeader),
    /// No whole header within the time allowed.
    Timeout,
    /// The sender closed (or failed) before the header was whole.
    Closed,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Bad(bad) => bad.fmt(f),
            ReadError::Timeout => f.write_str("no whole PROXY header in time"),
            ReadError::Closed => f.write_str("closed before a whole PROXY header"),
        }
    }
}

/// Reads one header from `stream`, over as many reads as it takes, at most [`MAX_HEADER`]
/// bytes within `timeout`. Returns the header and the bytes read after it (the client's first
/// bytes, to pass on).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Header, Vec<u8>), ReadError> {
    match read_prefix(stream, Vec::new(), MAX_HEADER, timeout, parse).await {
        Ok(((header, length), mut bytes)) => {
            let after = bytes.split_off(length.min(bytes.len()));
            Ok((header, after))
        }
        Err(PrefixError::Parse(bad)) => Err(ReadError::Bad(bad)),
        Err(PrefixError::TooLarge) => Err(ReadError::Bad(BadHeader(format!(
            "no whole PROXY header in the first {MAX_HEADER} bytes"
        )))),
        Err(PrefixError::Timeout) => Err(ReadError::Timeout),
        Err(PrefixError::Closed) => Err(ReadError::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(client: &str, destination: &str) -> Addresses {
        Addresses {
            client: client.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    #[test]
    fn every_version_round_trips_through_the_parser() {
        for a in [
            addrs("10.1.2.3:5555", "10.0.0.1:443"),
            addrs("[2001:db8::7]:5555", "[2001:db8::1]:443"),
        ] {
            for version in [Version::V1, Version::V2] {
                let mut bytes = encode(version, a).unwrap();
                let header_len = bytes.len();
                bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(
                    parse(&bytes).unwrap(),
                    Some((Header::Proxied(a), header_len)),
                    "{version}"
                );
            }
        }
        assert!(encode(Version::None, addrs("10.1.2.3:1", "10.0.0.1:2"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn mixed_families_are_written_as_tcp6_with_the_ipv4_one_mapped() {
        let a = addrs("10.1.2.3:5555", "[2001:db8::1]:443");
        let v1 = String::from_utf8(encode(Version::V1, a).unwrap()).unwrap();
        assert_eq!(
            v1, "PROXY TCP6 ::ffff:10.1.2.3 2001:db8::1 5555 443\r\n",
            "{v1}"
        );
        let v2 = encode(Version::V2, a).unwrap();
        // The family and protocol byte: AF_INET6 | STREAM.
        assert_eq!(v2[13], 0x21);
        // Read back, the mapped client is IPv4 again.
        assert_eq!(parse(&v2).unwrap(), Some((Header::Proxied(a), v2.len())));
        // An IPv4-mapped client beside an IPv4 destination is plain TCP4.
        let mapped = addrs("[::ffff:10.1.2.3]:5555", "10.0.0.1:443");
        let v1 = String::from_utf8(encode(Version::V1, mapped).unwrap()).unwrap();
        assert_eq!(v1, "PROXY TCP4 10.1.2.3 10.0.0.1 5555 443\r\n");
    }

    #[test]
    fn partial_headers_wait_and_bad_ones_fail() {
        let whole = encode(Version::V2, addrs("10.1.2.3:5555", "10.0.0.1:443")).unwrap();
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        let text = b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 443\r\n";
        for cut in 0..text.len() {
            assert_eq!(parse(&text[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 10.1.2.300 10.0.0.1 5555 443\r\n").is_err());
        // A v2 header announcing more than we would read fails at once.
        let mut huge = whole[..16].to_vec();
        huge[14..16].copy_from_slice(&60000u16.to_be_bytes());
        assert!(parse(&huge).is_err());
        // LOCAL (a health check) and UNKNOWN carry no client.
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((Header::Local, 15))
        );
    }

    #[tokio::test]
    async fn a_header_over_several_reads_keeps_the_bytes_after_it() {
        let header = encode(Version::V1, addrs("10.1.2.3:5555", "10.0.0.1:443")).unwrap();
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in header.chunks(5) {
                client.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client.write_all(b"hello").await.unwrap();
            client
        });
        let (parsed, after) = read_header(&mut server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            parsed,
            Header::Proxied(addrs("10.1.2.3:5555", "10.0.0.1:443"))
        );
        let _client = writer.await.unwrap();
        // What arrived after the header in the same read is kept; the rest is still unread.
        assert!(b"hello".starts_with(&after), "{after:?}");
    }
}
