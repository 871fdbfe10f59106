//! TLS ClientHellos built by hand, byte by byte from RFC 8446 4.1.2 and RFC 6066 3, for tests
//! that need ones no TLS library would send: two server names, an extension twice. Independent
//! of the proxy's own example builder, so the parser is not checked against itself.
//!
//! Also used by `tests/parsers_proptest.rs` (through `#[path]`), which has no `mod common`.

#![allow(dead_code)]

/// A `server_name` extension's data: its list of (name type, name) entries (0 is host_name).
pub fn server_name_list(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (kind, name) in entries {
        list.push(*kind);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    data
}

/// A ClientHello handshake message (header included) with these (type, data) extensions, in
/// order: TLS 1.2 legacy version, a fixed random, a 32-byte session id, two TLS 1.3 cipher
/// suites, the null compression method.
pub fn client_hello_message(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut ext = Vec::new();
    for (kind, data) in extensions {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(32);
    body.extend_from_slice(&[0xa5; 32]);
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
    body.extend_from_slice(&[1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut message = vec![1];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

/// `message` in handshake records, cut at the given offsets (none: one record).
pub fn in_records(message: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut bounds = vec![0];
    bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < message.len()));
    bounds.push(message.len());
    bounds.sort_unstable();
    bounds.dedup();
    let mut records = Vec::new();
    for part in bounds.windows(2) {
        let part = &message[part[0]..part[1]];
        records.extend_from_slice(&[22, 3, 1]);
        records.extend_from_slice(&(part.len() as u16).to_be_bytes());
        records.extend_from_slice(part);
    }
    records
}

/// A ClientHello in one record whose `server_name` extension holds these host names (none: no
/// extension), each a separate entry.
pub fn client_hello_naming(names: &[&str]) -> Vec<u8> {
    let entries: Vec<(u8, &[u8])> = names.iter().map(|n| (0, n.as_bytes())).collect();
    let extensions = if names.is_empty() {
        Vec::new()
    } else {
        vec![(0, server_name_list(&entries))]
    };
    in_records(&client_hello_message(&extensions), &[])
}

/// A ClientHello in one record with one `server_name` extension per name.
pub fn client_hello_with_extension_per_name(names: &[&str]) -> Vec<u8> {
    let extensions: Vec<(u16, Vec<u8>)> = names
        .iter()
        .map(|n| (0, server_name_list(&[(0, n.as_bytes())])))
        .collect();
    in_records(&client_hello_message(&extensions), &[])
}

/// A TLS 1.3 middlebox-compatibility ChangeCipherSpec record.
pub const CHANGE_CIPHER_SPEC: [u8; 6] = [0x14, 3, 3, 0, 1, 1];

/// An application data record of `len` bytes of `fill`: what 0-RTT early data looks like.
pub fn application_data(len: u16, fill: u8) -> Vec<u8> {
    let mut record = vec![0x17, 3, 3];
    record.extend_from_slice(&len.to_be_bytes());
    record.resize(5 + len as usize, fill);
    record
}

/// `hello` (one handshake record holding one whole ClientHello, as a TLS client's first write
/// is) with the extension (`kind`, `data`) inserted first in its extension list, and the
/// extension list's, the handshake message's and the record's lengths fixed to match. First, so
/// that a `pre_shared_key` extension stays last (RFC 8446 4.2.11). Bytes after the record (a
/// ChangeCipherSpec, early data) are kept as they are.
pub fn with_extension(hello: &[u8], kind: u16, data: &[u8]) -> Vec<u8> {
    let u16_at = |at: usize| usize::from(u16::from_be_bytes([hello[at], hello[at + 1]]));
    assert_eq!(hello[0], 22, "not a handshake record");
    assert_eq!(hello[5], 1, "not a ClientHello");
    let record_end = 5 + u16_at(3);
    // Record header (5), handshake header (4), legacy_version (2), random (32).
    let mut at = 5 + 4 + 2 + 32;
    at += 1 + usize::from(hello[at]); // legacy_session_id
    at += 2 + u16_at(at); // cipher_suites
    at += 1 + usize::from(hello[at]); // legacy_compression_methods
    let extensions_len_at = at;
    let message_end = 5 + 4 + u32::from_be_bytes([0, hello[6], hello[7], hello[8]]) as usize;
    assert_eq!(
        extensions_len_at + 2 + u16_at(extensions_len_at),
        message_end,
        "the extensions do not end the ClientHello"
    );
    assert_eq!(message_end, record_end, "not one ClientHello in one record");
    let mut extension = kind.to_be_bytes().to_vec();
    extension.extend_from_slice(&(data.len() as u16).to_be_bytes());
    extension.extend_from_slice(data);
    let grow = extension.len();
    let mut out = hello[..extensions_len_at + 2].to_vec();
    out.extend_from_slice(&extension);
    out.extend_from_slice(&hello[extensions_len_at + 2..]);
    let set_u16 = |out: &mut Vec<u8>, at: usize, add: usize| {
        let value = usize::from(u16::from_be_bytes([out[at], out[at + 1]])) + add;
        out[at..at + 2].copy_from_slice(&(value as u16).to_be_bytes());
    };
    set_u16(&mut out, 3, grow);
    set_u16(&mut out, extensions_len_at, grow);
    let message_len = u32::from_be_bytes([0, out[6], out[7], out[8]]) as usize + grow;
    out[6..9].copy_from_slice(&(message_len as u32).to_be_bytes()[1..]);
    out
}

/// The `encrypted_client_hello` extension type (draft-ietf-tls-esni), as browsers send it.
pub const ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// An outer `encrypted_client_hello` extension's data, in its layout: type outer (0), an HPKE
/// cipher suite (HKDF-SHA256, AES-128-GCM), a config id, an encapsulated key and a payload
/// (random bytes here: only the server that holds the ECH key could read a real one).
pub fn outer_ech_payload() -> Vec<u8> {
    let mut data = vec![0, 0, 1, 0, 1, 0x2a];
    data.extend_from_slice(&32u16.to_be_bytes());
    data.extend_from_slice(&[0x11; 32]);
    data.extend_from_slice(&200u16.to_be_bytes());
    data.extend_from_slice(&[0x5c; 200]);
    data
}
