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
