//! The TLS ClientHello's server name, for `mode: sni` routes and fixed and CONNECT routes with
//! `sni: require`.
//!
//! This module owns reading the first bytes of a connection (or of a CONNECT tunnel) until they
//! hold a whole ClientHello (which may span reads and TLS records; at most [`MAX_HELLO`] bytes
//! within [`HELLO_TIMEOUT`]) and taking its `server_name` (host_name), normalised as allowlist
//! names are, and whether it carries `encrypted_client_hello` (ECH, type 0xfe0d): then its
//! server name is only the outer, public name, and the name the client really wants is
//! encrypted to the server (tls-parser 0.12 does not know the type; it is read as the raw type
//! of an unknown extension, like every extension here). The TLS parsing
//! is `tls-parser`'s: record headers with `parse_tls_record_header` and records with
//! `parse_tls_raw_record`, the ClientHello body with `parse_tls_handshake_client_hello`, each
//! extension's raw type and data with `parse_tls_extension_unknown`, the server name list with
//! `parse_tls_extension_sni_content`.
//!
//! Only the handshake records that carry the ClientHello are parsed, and only until the hello
//! message is whole: a TLS 1.3 client may send a ChangeCipherSpec record and early data in the
//! same write, and whatever follows the hello is not inspected. The bytes read, those included,
//! are handed back so they can be sent on to the upstream unchanged: TLS stays end to end, the
//! proxy only looks.
//!
//! A hello that could name two servers is refused as malformed, so no upstream can read a name
//! other than the one the policy judged: two `host_name` entries (RFC 6066 allows one name of
//! each type), or any extension type twice, two `server_name` extensions among them (RFC 8446
//! forbids duplicates). So is a hello whose lengths do not add up (bytes after the extensions,
//! a server name list with bytes left over), for the same reason.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use tls_parser::{
    parse_tls_extension_sni_content, parse_tls_extension_unknown, parse_tls_handshake_client_hello,
    parse_tls_raw_record, parse_tls_record_header, Err as NomErr, SNIType, TlsExtension,
    TlsRecordType,
};
use tokio::io::AsyncRead;

use crate::net::prefix::{read_prefix, PrefixError};
use crate::policy::host::HostName;

/// The most bytes read while waiting for a whole ClientHello.
pub const MAX_HELLO: usize = 16 * 1024;
/// How long a client has to send its whole ClientHello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a whole ClientHello says, and every byte read to get it.
#[derive(Debug)]
pub struct ClientHello {
    /// The host_name of its `server_name` extension; `None` when it names no server (no
    /// extension, an empty list, no host_name entry).
    pub server_name: Option<HostName>,
    /// Whether it carries `encrypted_client_hello`: `server_name` is then the outer, public
    /// name only.
    pub ech: bool,
    pub bytes: Vec<u8>,
}

impl ClientHello {
    /// The server name, for routes that need one: a hello without is [`HelloError::NoServerName`].
    pub fn name(&self) -> Result<&HostName, HelloError> {
        self.server_name.as_ref().ok_or(HelloError::NoServerName)
    }
}

/// What a whole ClientHello message says (see [`ClientHello`]), before the bytes are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub server_name: Option<HostName>,
    pub ech: bool,
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

/// Reads from `client` until a whole ClientHello has arrived; returns what it says and the
/// bytes read.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    client: &mut S,
) -> Result<ClientHello, HelloError> {
    read_client_hello_after(client, Vec::new()).await
}

/// As [`read_client_hello`], where `start` is the beginning of the hello, already read from
/// `client` (what a CONNECT client sent behind its head). The same limits apply to the whole.
pub async fn read_client_hello_after<S: AsyncRead + Unpin>(
    client: &mut S,
    start: Vec<u8>,
) -> Result<ClientHello, HelloError> {
    match read_prefix(client, start, MAX_HELLO, HELLO_TIMEOUT, parse).await {
        Ok((Parsed { server_name, ech }, bytes)) => Ok(ClientHello {
            server_name,
            ech,
            bytes,
        }),
        Err(PrefixError::Parse(e)) => Err(e),
        Err(PrefixError::TooLarge) => Err(HelloError::TooLarge),
        Err(PrefixError::Timeout) => Err(HelloError::Timeout),
        Err(PrefixError::Closed) => Err(HelloError::Truncated),
    }
}

/// The server name of the bytes so far: `Ok(None)` while the ClientHello is not whole yet, and
/// a whole hello without one is [`HelloError::NoServerName`]. Pure.
///
/// Bytes after the ClientHello message (in its last record or in later records) are not looked
/// at: the name comes from the hello alone.
pub fn server_name(bytes: &[u8]) -> Result<Option<HostName>, HelloError> {
    match parse(bytes)? {
        Some(Parsed {
            server_name: Some(name),
            ..
        }) => Ok(Some(name)),
        Some(Parsed {
            server_name: None, ..
        }) => Err(HelloError::NoServerName),
        None => Ok(None),
    }
}

/// What the bytes so far say: `Ok(None)` while the ClientHello is not whole yet. Pure; as
/// [`server_name`], but a hello without a server name is not an error here (a CONNECT to an IP
/// address may carry one).
pub fn parse(bytes: &[u8]) -> Result<Option<Parsed>, HelloError> {
    match client_hello_message(bytes)? {
        Some(body) => parse_body(&body).map(Some),
        None => Ok(None),
    }
}

/// The handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// A handshake message's header: its type and a 24-bit length.
const HANDSHAKE_HEADER: usize = 4;
/// The extension type of `server_name` (RFC 6066).
const SERVER_NAME: u16 = 0;
/// The extension type of `encrypted_client_hello` (draft-ietf-tls-esni, the one deployed).
pub const ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// The ClientHello message's body, reassembled from the handshake records at the start of
/// `bytes`, once it is whole; `Ok(None)` until then.
fn client_hello_message(bytes: &[u8]) -> Result<Option<Vec<u8>>, HelloError> {
    let mut handshake = Vec::new();
    let mut rest = bytes;
    let mut first_record = true;
    loop {
        // Checked before each record, so that no record after the one that completes the hello
        // is parsed: a TLS 1.3 client's ChangeCipherSpec and early data follow in the same
        // write, and they are the upstream's to judge.
        if let Some(len) = hello_len(&handshake)? {
            handshake.truncate(len);
            handshake.drain(..HANDSHAKE_HEADER);
            return Ok(Some(handshake));
        }
        if rest.is_empty() {
            return Ok(None);
        }
        // The header alone tells a TLS handshake from anything else.
        match parse_tls_record_header(rest) {
            Ok((_, header)) if header.record_type != TlsRecordType::Handshake => {
                return Err(if first_record {
                    HelloError::NotTls
                } else {
                    // RFC 8446 5.1: a handshake message is not interleaved with other records.
                    HelloError::Malformed(format!(
                        "a {:?} record inside the ClientHello",
                        header.record_type
                    ))
                });
            }
            Ok(_) => {}
            Err(NomErr::Incomplete(_)) => return Ok(None),
            Err(_) => return Err(HelloError::NotTls),
        }
        match parse_tls_raw_record(rest) {
            Ok((after, record)) => {
                handshake.extend_from_slice(record.data);
                rest = after;
                first_record = false;
            }
            Err(NomErr::Incomplete(_)) => return Ok(None),
            Err(e) => {
                return Err(HelloError::Malformed(format!(
                    "bad TLS record: {}",
                    why(&e)
                )))
            }
        }
    }
}

/// The length of the first handshake message (header included) once `handshake` holds all of
/// it. A first message that is not a ClientHello is refused as soon as its type byte is in.
fn hello_len(handshake: &[u8]) -> Result<Option<usize>, HelloError> {
    match handshake {
        [] => Ok(None),
        [kind, ..] if *kind != CLIENT_HELLO => Err(HelloError::Malformed(
            "the first handshake message is not a ClientHello".into(),
        )),
        [_, a, b, c, ..] => {
            let len = HANDSHAKE_HEADER + u32::from_be_bytes([0, *a, *b, *c]) as usize;
            Ok((handshake.len() >= len).then_some(len))
        }
        _ => Ok(None),
    }
}

/// What a whole ClientHello body says.
fn parse_body(body: &[u8]) -> Result<Parsed, HelloError> {
    let hello = match parse_tls_handshake_client_hello(body) {
        Ok(([], hello)) => hello,
        // The body is whole, so anything left is not part of a ClientHello (and with it the
        // extensions, when their length runs past the end).
        Ok(_) => {
            return Err(HelloError::Malformed(
                "the ClientHello's lengths do not add up".into(),
            ))
        }
        Err(e) => return Err(HelloError::Malformed(why(&e))),
    };
    let Some(extensions) = hello.ext else {
        return Ok(Parsed {
            server_name: None,
            ech: false,
        });
    };
    let Extensions { server_name, ech } = read_extensions(extensions)?;
    let server_name = match server_name {
        Some(list) => name_in(list)?,
        None => None,
    };
    Ok(Parsed { server_name, ech })
}

/// The host_name of a `server_name` extension's data, if it has one.
fn name_in(list: &[u8]) -> Result<Option<HostName>, HelloError> {
    let names = match parse_tls_extension_sni_content(list) {
        Ok((_, TlsExtension::SNI(names))) => names,
        Ok(_) => return Err(HelloError::Malformed("bad server_name extension".into())),
        Err(e) => {
            return Err(HelloError::Malformed(format!(
                "bad server_name extension: {}",
                why(&e)
            )))
        }
    };
    // tls-parser stops at the first entry it cannot read and ignores bytes after the list: an
    // upstream that reads them differently must not see a name that was not judged.
    let read: usize = names.iter().map(|(_, name)| 3 + name.len()).sum();
    if !list.is_empty() && 2 + read != list.len() {
        return Err(HelloError::Malformed(
            "the server_name list's length does not match its names".into(),
        ));
    }
    let mut types = HashSet::new();
    if let Some((kind, _)) = names.iter().find(|(kind, _)| !types.insert(kind.0)) {
        let kind = match *kind {
            SNIType::HostName => "host_name".to_owned(),
            other => format!("type {}", other.0),
        };
        return Err(HelloError::Malformed(format!(
            "two {kind} entries in the server_name extension (RFC 6066 allows one name of each type)"
        )));
    }
    let Some(name) = names
        .iter()
        .find(|(kind, _)| *kind == SNIType::HostName)
        .map(|(_, name)| *name)
    else {
        return Ok(None);
    };
    let name =
        std::str::from_utf8(name).map_err(|_| HelloError::BadServerName("not UTF-8".into()))?;
    HostName::parse(name)
        .map(Some)
        .map_err(HelloError::BadServerName)
}

/// The extensions of a ClientHello this module looks at.
struct Extensions<'a> {
    /// The data of the one `server_name` extension, if any.
    server_name: Option<&'a [u8]>,
    /// Whether `encrypted_client_hello` is there (its content is the server's to read).
    ech: bool,
}

/// Reads a ClientHello's extension block. Every extension is read by its raw type (GREASE
/// values stay distinct), so that any type seen twice is refused (RFC 8446 4.2), and an
/// extension tls-parser cannot interpret does not hide the ones after it.
fn read_extensions(mut extensions: &[u8]) -> Result<Extensions<'_>, HelloError> {
    let mut seen = HashSet::new();
    let mut server_name = None;
    let mut ech = false;
    while !extensions.is_empty() {
        let (after, (kind, data)) = match parse_tls_extension_unknown(extensions) {
            Ok((after, TlsExtension::Unknown(kind, data))) => (after, (kind.0, data)),
            // parse_tls_extension_unknown makes nothing else; refused rather than guessed at.
            Ok(_) => return Err(HelloError::Malformed("unreadable extension".into())),
            Err(e) => {
                return Err(HelloError::Malformed(format!(
                    "bad extension list: {}",
                    why(&e)
                )))
            }
        };
        if !seen.insert(kind) {
            return Err(HelloError::Malformed(format!(
                "extension {kind} appears twice (RFC 8446 forbids it)"
            )));
        }
        match kind {
            SERVER_NAME => server_name = Some(data),
            ENCRYPTED_CLIENT_HELLO => ech = true,
            _ => {}
        }
        extensions = after;
    }
    Ok(Extensions { server_name, ech })
}

/// A nom error in a few words: its kind, not the (possibly 16 KiB) input it stopped at.
fn why(e: &NomErr<tls_parser::nom::error::Error<&[u8]>>) -> String {
    match e {
        NomErr::Incomplete(_) => "truncated".into(),
        NomErr::Error(e) | NomErr::Failure(e) => format!("{:?}", e.code),
    }
}

/// A minimal ClientHello (one TLS record, one cipher suite, SNI `name`), built field by field:
/// for tests of this parser and of SNI routes where no TLS client can run (the test VM).
#[doc(hidden)]
pub fn example_client_hello(name: &str) -> Vec<u8> {
    let list = example_server_name_list(&[(0, name)]);
    example_client_hello_with(&[(SERVER_NAME, &list)])
}

/// A `server_name` extension's data: a list of (name type, name) entries, as RFC 6066 lays it
/// out, with no check of what is in it (tests need the malformed ones too).
#[doc(hidden)]
pub fn example_server_name_list(entries: &[(u8, &str)]) -> Vec<u8> {
    let entries: Vec<u8> = entries
        .iter()
        .flat_map(|(kind, name)| {
            [
                &[*kind][..],
                &(name.len() as u16).to_be_bytes(),
                name.as_bytes(),
            ]
            .concat()
        })
        .collect();
    [&(entries.len() as u16).to_be_bytes()[..], &entries].concat()
}

/// A minimal ClientHello in one TLS record with the given (type, data) extensions in order, as
/// [`example_client_hello`] but with no check of what they are (tests need duplicates too).
#[doc(hidden)]
pub fn example_client_hello_with(extensions: &[(u16, &[u8])]) -> Vec<u8> {
    let ext: Vec<u8> = extensions
        .iter()
        .flat_map(|(kind, data)| {
            [
                &kind.to_be_bytes()[..],
                &(data.len() as u16).to_be_bytes(),
                data,
            ]
            .concat()
        })
        .collect();
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
    let handshake = [&[CLIENT_HELLO][..], &len.to_be_bytes()[1..], &body].concat();
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

    /// A TLS 1.3 middlebox-compatibility ChangeCipherSpec record.
    const CCS: &[u8] = &[0x14, 3, 3, 0, 1, 1];

    /// An application data record (what 0-RTT early data looks like on the wire).
    fn early_data() -> Vec<u8> {
        [&[0x17u8, 3, 3, 0, 32][..], &[0xe0; 32]].concat()
    }

    /// `hello`'s handshake message split into two handshake records at `at`.
    fn two_records(hello: &[u8], at: usize) -> Vec<u8> {
        let (a, b) = hello[5..].split_at(at);
        let record =
            |part: &[u8]| [&[22u8, 3, 1][..], &(part.len() as u16).to_be_bytes(), part].concat();
        [record(a), record(b)].concat()
    }

    fn malformed(bytes: &[u8]) -> bool {
        matches!(server_name(bytes), Err(HelloError::Malformed(_)))
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
        let two = two_records(&hello, 10);
        assert_eq!(server_name(&two[..15 + 5]), Ok(None));
        assert_eq!(
            server_name(&two).unwrap().unwrap().as_str(),
            "split.example.com"
        );
    }

    #[test]
    fn records_after_the_hello_are_not_inspected() {
        // A TLS 1.3 first flight in one write: ClientHello, ChangeCipherSpec, early data.
        let hello = client_hello("zero.example.com");
        let flight = [&hello[..], CCS, &early_data()].concat();
        for cut in hello.len()..=flight.len() {
            assert_eq!(
                server_name(&flight[..cut]).unwrap().unwrap().as_str(),
                "zero.example.com",
                "cut at {cut}"
            );
        }
        // Whatever follows, even bytes that are no TLS at all or a record tls-parser refuses.
        let two = two_records(&hello, 30);
        for after in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[0x17, 3, 3, 0xff, 0xff],
            &[0x16, 3, 3, 0, 4, 2, 0, 0, 0],
            CCS,
        ] {
            for hello in [&hello, &two] {
                let bytes = [&hello[..], after].concat();
                assert_eq!(
                    server_name(&bytes).unwrap().unwrap().as_str(),
                    "zero.example.com",
                    "{after:?}"
                );
            }
        }
        // Bytes after the hello message in its own last record are not looked at either.
        let handshake = [&hello[5..], &[20, 0, 0, 1, 9]].concat();
        let record = [
            &[22u8, 3, 1][..],
            &(handshake.len() as u16).to_be_bytes(),
            &handshake,
        ]
        .concat();
        assert_eq!(
            server_name(&record).unwrap().unwrap().as_str(),
            "zero.example.com"
        );
    }

    #[test]
    fn another_record_inside_the_hello_is_malformed() {
        let hello = client_hello("a.example");
        let two = two_records(&hello, 10);
        let first = 5 + 10;
        let interleaved = [&two[..first], CCS, &two[first..]].concat();
        assert!(malformed(&interleaved), "{:?}", server_name(&interleaved));
    }

    #[test]
    fn a_first_record_that_is_not_a_handshake_is_not_tls() {
        let hello = client_hello("a.example");
        for first in [CCS, &early_data()[..]] {
            let bytes = [first, &hello[..]].concat();
            assert_eq!(server_name(&bytes), Err(HelloError::NotTls));
        }
    }

    #[test]
    fn two_server_names_are_malformed() {
        let name = |entries: &[(u8, &str)]| example_server_name_list(entries);
        // Two host_name entries in one server_name extension, in either order of "good" name.
        for entries in [
            [(0, "a.example"), (0, "b.example")],
            [(0, "b.example"), (0, "a.example")],
            [(0, "a.example"), (0, "a.example")],
        ] {
            let hello = example_client_hello_with(&[(0, &name(&entries))]);
            assert!(malformed(&hello), "{entries:?}: {:?}", server_name(&hello));
        }
        // Two server_name extensions, next to each other or not.
        let a = name(&[(0, "a.example")]);
        let b = name(&[(0, "b.example")]);
        for extensions in [
            vec![(0, &a[..]), (0, &b[..])],
            vec![(0, &a[..]), (23, &[][..]), (0, &b[..])],
            vec![(0, &a[..]), (0, &a[..])],
        ] {
            let hello = example_client_hello_with(&extensions);
            assert!(malformed(&hello), "{:?}", server_name(&hello));
        }
        // Two names of another type, too: RFC 6066 allows one of each.
        let hello =
            example_client_hello_with(&[(0, &name(&[(0, "a.example"), (7, "x"), (7, "y")]))]);
        assert!(malformed(&hello));
        // One host_name and one name of another (unknown) type is allowed.
        let hello = example_client_hello_with(&[(0, &name(&[(7, "x"), (0, "a.example")]))]);
        assert_eq!(server_name(&hello).unwrap().unwrap().as_str(), "a.example");
        assert_eq!(
            HelloError::Malformed(String::new()).kind(),
            "malformed_hello"
        );
    }

    #[test]
    fn any_extension_twice_is_malformed_but_distinct_grease_values_are_not() {
        let sni = example_server_name_list(&[(0, "a.example")]);
        let twice = example_client_hello_with(&[(23, &[]), (0, &sni), (23, &[])]);
        assert!(malformed(&twice), "{:?}", server_name(&twice));
        let grease = example_client_hello_with(&[(0x0a0a, &[]), (0, &sni), (0x1a1a, &[0])]);
        assert_eq!(server_name(&grease).unwrap().unwrap().as_str(), "a.example");
        let grease_twice = example_client_hello_with(&[(0x0a0a, &[]), (0, &sni), (0x0a0a, &[])]);
        assert!(malformed(&grease_twice));
    }

    #[test]
    fn a_name_hidden_by_lengths_that_do_not_add_up_is_malformed() {
        // Bytes after the server name list's entries, inside or after its own length.
        let mut list = example_server_name_list(&[(0, "a.example")]);
        list.extend_from_slice(&[0, 0, 9]);
        let hello = example_client_hello_with(&[(0, &list)]);
        assert!(malformed(&hello), "{:?}", server_name(&hello));
        let mut list = example_server_name_list(&[(0, "a.example")]);
        let inner = u16::from_be_bytes([list[0], list[1]]) + 3;
        list[..2].copy_from_slice(&inner.to_be_bytes());
        list.extend_from_slice(&[0, 0, 9]);
        let hello = example_client_hello_with(&[(0, &list)]);
        assert!(malformed(&hello), "{:?}", server_name(&hello));
        // An extension tls-parser would refuse to interpret (extended_master_secret with data)
        // does not hide a second server_name after it.
        let a = example_server_name_list(&[(0, "a.example")]);
        let b = example_server_name_list(&[(0, "b.example")]);
        let hello = example_client_hello_with(&[(0, &a), (23, &[1, 2]), (0, &b)]);
        assert!(malformed(&hello), "{:?}", server_name(&hello));
        // Bytes after the extension block, inside the hello message.
        let hello = client_hello("a.example");
        let mut handshake = hello[5..].to_vec();
        handshake.extend_from_slice(&[0, 0, 0, 0]);
        let len = (handshake.len() - 4) as u32;
        handshake[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
        let record = [
            &[22u8, 3, 1][..],
            &(handshake.len() as u16).to_be_bytes(),
            &handshake,
        ]
        .concat();
        assert!(malformed(&record), "{:?}", server_name(&record));
    }

    #[test]
    fn a_whole_message_too_short_for_a_hello_is_malformed_not_waited_for() {
        for body in [&[][..], &[3, 3], &[3, 3, 0, 0]] {
            let mut handshake = vec![CLIENT_HELLO, 0, 0, body.len() as u8];
            handshake.extend_from_slice(body);
            let record = [&[22u8, 3, 1, 0, handshake.len() as u8][..], &handshake].concat();
            assert!(malformed(&record), "{body:?}: {:?}", server_name(&record));
        }
        // Another handshake message first: refused at its type byte, not once it is whole.
        assert!(malformed(&[22, 3, 1, 0, 1, 2]));
    }

    #[test]
    fn an_encrypted_client_hello_extension_is_reported_with_the_outer_name() {
        let sni = example_server_name_list(&[(0, "public.example")]);
        let ech = [0u8, 0, 1, 0, 1, 7, 0, 0, 0, 0];
        for extensions in [
            vec![(SERVER_NAME, &sni[..]), (ENCRYPTED_CLIENT_HELLO, &ech[..])],
            vec![(ENCRYPTED_CLIENT_HELLO, &ech[..]), (SERVER_NAME, &sni[..])],
            vec![
                (0x0a0a, &[][..]),
                (ENCRYPTED_CLIENT_HELLO, &[][..]),
                (SERVER_NAME, &sni[..]),
            ],
        ] {
            let hello = example_client_hello_with(&extensions);
            let parsed = parse(&hello).unwrap().unwrap();
            assert!(parsed.ech, "{extensions:?}");
            assert_eq!(
                parsed.server_name.map(|n| n.as_str().to_owned()),
                Some("public.example".to_owned())
            );
            // The name alone is still the outer one: callers must look at `ech`.
            assert_eq!(
                server_name(&hello).unwrap().unwrap().as_str(),
                "public.example"
            );
        }
        let plain = parse(&client_hello("a.example")).unwrap().unwrap();
        assert!(!plain.ech);
        // The draft ESNI type (0xffce) and a neighbour of 0xfe0d are not ECH.
        for other in [0xffce, 0xfe0c, 0xfe0e] {
            let hello = example_client_hello_with(&[(SERVER_NAME, &sni), (other, &[])]);
            assert!(!parse(&hello).unwrap().unwrap().ech, "{other:#x}");
        }
        // Twice is malformed, as any extension twice.
        let twice = example_client_hello_with(&[
            (ENCRYPTED_CLIENT_HELLO, &[]),
            (SERVER_NAME, &sni),
            (ENCRYPTED_CLIENT_HELLO, &[]),
        ]);
        assert!(malformed(&twice), "{:?}", parse(&twice));
        // Without a server name, ECH is still seen.
        let nameless = parse(&example_client_hello_with(&[(
            ENCRYPTED_CLIENT_HELLO,
            &ech,
        )]));
        assert_eq!(
            nameless,
            Ok(Some(Parsed {
                server_name: None,
                ech: true
            }))
        );
    }

    #[test]
    fn a_hello_without_a_name_parses_to_none_and_is_no_sni_for_server_name() {
        for hello in [
            example_client_hello_with(&[]),
            example_client_hello_with(&[(0, &[])]),
            example_client_hello_with(&[(0, &example_server_name_list(&[(7, "x")]))]),
        ] {
            assert_eq!(
                parse(&hello),
                Ok(Some(Parsed {
                    server_name: None,
                    ech: false
                }))
            );
            assert_eq!(server_name(&hello), Err(HelloError::NoServerName));
        }
    }

    #[tokio::test]
    async fn bytes_already_read_are_the_start_of_the_hello() {
        let hello = [&client_hello("tunnel.example")[..], CCS].concat();
        for at in [0, 1, 5, 20, hello.len() - CCS.len(), hello.len()] {
            let (start, rest) = hello.split_at(at);
            let mut client = rest;
            let read = read_client_hello_after(&mut client, start.to_vec())
                .await
                .unwrap();
            assert_eq!(read.name().unwrap().as_str(), "tunnel.example", "at {at}");
            assert!(!read.ech);
            // What was read, followed by what is left, is the input, byte for byte.
            assert_eq!([&read.bytes[..], client].concat(), hello, "at {at}");
        }
        // The start counts against the limit, and is parsed as any other bytes.
        let mut empty: &[u8] = &[];
        let start = b"GET / HTTP/1.1\r\n".to_vec();
        assert_eq!(
            read_client_hello_after(&mut empty, start)
                .await
                .unwrap_err(),
            HelloError::NotTls
        );
        let mut empty: &[u8] = &[];
        let mut too_much = [&[22u8, 3, 1, 0x40, 0][..], &[1, 0, 0x40, 0]].concat();
        too_much.resize(MAX_HELLO, 0);
        assert_eq!(
            read_client_hello_after(&mut empty, too_much)
                .await
                .unwrap_err(),
            HelloError::TooLarge
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
        // No extensions at all; an empty server_name extension.
        assert_eq!(
            server_name(&example_client_hello_with(&[])),
            Err(HelloError::NoServerName)
        );
        assert_eq!(
            server_name(&example_client_hello_with(&[(0, &[])])),
            Err(HelloError::NoServerName)
        );
    }
}
