//! The TLS ClientHello's server name, for `mode: sni` routes and fixed routes with `sni: require`.
//!
//! This module owns reading the first bytes of a connection until they hold a whole ClientHello
//! (which may span reads and TLS records; at most [`MAX_HELLO`] bytes within [`HELLO_TIMEOUT`])
//! and taking its `server_name` (host_name), normalised as allowlist names are. The TLS parsing
//! is `tls-parser`'s: records with `parse_tls_raw_record`, the handshake message with
//! `parse_tls_message_handshake`, the extensions with `parse_tls_client_hello_extensions`. The
//! bytes read are handed back so they can be sent on to the upstream unchanged: TLS stays end to
//! end, the proxy only looks.

use std::fmt;
use std::time::Duration;

use tls_parser::{
    parse_tls_client_hello_extensions, parse_tls_message_handshake, parse_tls_raw_record,
    parse_tls_record_header, Err as NomErr, SNIType, TlsExtension, TlsMessage, TlsMessageHandshake,
    TlsRecordType,
};
use tokio::io::AsyncRead;

use crate::host::HostName;
use crate::prefix::{read_prefix, PrefixError};

/// The most bytes read while waiting for a whole ClientHello.
pub const MAX_HELLO: usize = 16 * 1024;
/// How long a client has to send its whole ClientHello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A ClientHello's server name and every byte read to get it.
#[derive(Debug)]
pub struct ClientHello {
    pub server_name: HostName,
    pub bytes: Vec<u8>,
}

/// Why no server name was taken. The connection is closed without connecting anywhere.
#[derive(Debug, PartialEq, Eq)]
pub enum HelloError {
    NotTls,
    Malformed(String),
    NoServerName,
    BadServerName(String),
    TooLarge,
    Timeout,
    /// The client closed (or failed) before the ClientHello was whole.
    Truncated,
}

impl HelloError {
    /// A short machine-friendly reason for structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            HelloError::NotTls => "not_tls",
            HelloError::Malformed(_) => "malformed_hello",
            HelloError::NoServerName => "no_sni",
            HelloError::BadServerName(_) => "bad_sni",
            HelloError::TooLarge => "hello_too_large",
            HelloError::Timeout => "hello_timeout",
            HelloError::Truncated => "hello_truncated",
        }
    }
}

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelloError::NotTls => f.write_str("the client did not start a TLS handshake"),
            HelloError::Malformed(why) => write!(f, "malformed TLS ClientHello: {why}"),
            HelloError::NoServerName => {
                f.write_str("the TLS ClientHello names no server (no SNI host_name)")
            }
            HelloError::BadServerName(why) => {
                write!(f, "the TLS server name is not a host name: {why}")
            }
            HelloError::TooLarge => {
                write!(f, "no whole TLS ClientHello in the first {MAX_HELLO} bytes")
            }
            HelloError::Timeout => write!(
                f,
                "no whole TLS ClientHello within {}",
                humantime::format_duration(HELLO_TIMEOUT)
            ),
            HelloError::Truncated => {
                f.write_str("the client closed the connection before its ClientHello was whole")
            }
        }
    }
}

/// Reads from `client` until a whole ClientHello has arrived; returns its server name and the
/// bytes read.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    client: &mut S,
) -> Result<ClientHello, HelloError> {
    match read_prefix(client, MAX_HELLO, HELLO_TIMEOUT, server_name).await {
        Ok((server_name, bytes)) => Ok(ClientHello { server_name, bytes }),
        Err(PrefixError::Parse(e)) => Err(e),
        Err(PrefixError::TooLarge) => Err(HelloError::TooLarge),
        Err(PrefixError::Timeout) => Err(HelloError::Timeout),
        Err(PrefixError::Closed) => Err(HelloError::Truncated),
    }
}

/// What the bytes so far say: `Ok(None)` while the ClientHello is not whole yet. Pure.
pub fn server_name(bytes: &[u8]) -> Result<Option<HostName>, HelloError> {
    let mut handshake = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        // The header alone tells a TLS handshake from anything else.
        match parse_tls_record_header(rest) {
            Ok((_, header)) if header.record_type != TlsRecordType::Handshake => {
                return Err(HelloError::NotTls)
            }
            Ok(_) => {}
            Err(NomErr::Incomplete(_)) => break,
            Err(_) => return Err(HelloError::NotTls),
        }
        match parse_tls_raw_record(rest) {
            Ok((after, record)) => {
                handshake.extend_from_slice(record.data);
                rest = after;
            }
            Err(NomErr::Incomplete(_)) => break,
            Err(e) => return Err(HelloError::Malformed(format!("bad TLS record: {e:?}"))),
        }
    }
    if handshake.is_empty() {
        return Ok(None);
    }
    let hello = match parse_tls_message_handshake(&handshake) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        Ok(_) => {
            return Err(HelloError::Malformed(
                "the first handshake message is not a ClientHello".into(),
            ))
        }
        Err(NomErr::Incomplete(_)) => return Ok(None),
        Err(e) => return Err(HelloError::Malformed(format!("{e:?}"))),
    };
    let extensions = match hello.ext {
        Some(ext) => {
            parse_tls_client_hello_extensions(ext)
                .map_err(|e| HelloError::Malformed(format!("bad extensions: {e:?}")))?
                .1
        }
        None => return Err(HelloError::NoServerName),
    };
    let name = extensions.iter().find_map(|ext| match ext {
        TlsExtension::SNI(names) => names
            .iter()
            .find(|(kind, _)| *kind == SNIType::HostName)
            .map(|(_, name)| *name),
        _ => None,
    });
    let name = name.ok_or(HelloError::NoServerName)?;
    let name =
        std::str::from_utf8(name).map_err(|_| HelloError::BadServerName("not UTF-8".into()))?;
    HostName::parse(name)
        .map(Some)
        .map_err(HelloError::BadServerName)
}

/// A minimal ClientHello (one TLS record, one cipher suite, SNI `name`), built field by field:
/// for tests of this parser and of SNI routes where no TLS client can run (the test VM).
#[doc(hidden)]
pub fn example_client_hello(name: &str) -> Vec<u8> {
    let sni_entry = [
        &[0u8][..],
        &(name.len() as u16).to_be_bytes(),
        name.as_bytes(),
    ]
    .concat();
    let sni_list = [&(sni_entry.len() as u16).to_be_bytes()[..], &sni_entry].concat();
    let ext = [
        &[0u8, 0][..],
        &(sni_list.len() as u16).to_be_bytes(),
        &sni_list,
    ]
    .concat();
    let body = [
        &[3u8, 3][..],
        &[7u8; 32],
        &[0],
        &[0, 2, 0x13, 0x01],
        &[1, 0],
        &(ext.len() as u16).to_be_bytes(),
        &ext,
    ]
    .concat();
    let len = body.len() as u32;
    let handshake = [&[1u8][..], &len.to_be_bytes()[1..], &body].concat();
    [
        &[22u8, 3, 1][..],
        &(handshake.len() as u16).to_be_bytes(),
        &handshake,
    ]
    .concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(name: &str) -> Vec<u8> {
        example_client_hello(name)
    }

    #[test]
    fn the_server_name_is_taken_once_the_hello_is_whole() {
        let hello = client_hello("API.Example.com.");
        for cut in 0..hello.len() {
            assert_eq!(server_name(&hello[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            server_name(&hello).unwrap().unwrap().as_str(),
            "api.example.com"
        );
    }

    #[test]
    fn a_hello_split_across_records_is_reassembled() {
        let hello = client_hello("split.example.com");
        let handshake = &hello[5..];
        let (a, b) = handshake.split_at(10);
        let record =
            |part: &[u8]| [&[22u8, 3, 1][..], &(part.len() as u16).to_be_bytes(), part].concat();
        let two = [record(a), record(b)].concat();
        assert_eq!(server_name(&record(a)), Ok(None));
        assert_eq!(
            server_name(&two).unwrap().unwrap().as_str(),
            "split.example.com"
        );
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), Err(HelloError::NotTls));
        assert_eq!(
            server_name(b"\x17\x03\x03\x00\x01x"),
            Err(HelloError::NotTls)
        );
        assert!(matches!(
            server_name(&client_hello("192.0.2.1")),
            Err(HelloError::BadServerName(_))
        ));
        let mut no_sni = client_hello("a.example");
        // Turn the SNI extension into an unknown one (type 0xfafa).
        let at = no_sni.len() - ("a.example".len() + 9);
        no_sni[at] = 0xfa;
        no_sni[at + 1] = 0xfa;
        assert_eq!(server_name(&no_sni), Err(HelloError::NoServerName));
    }
}
