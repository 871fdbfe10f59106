//! Property tests of the parsers that read what an enclave sends before any policy decision
//! (the HTTP CONNECT head, the TLS ClientHello, wildcard matching), of what the operator writes
//! (the configuration loader, host-name normalisation) and of the special-address
//! classification. None may panic on any input, every name they accept is one the allowlist
//! names, an IPv4 address carried in IPv6 is judged as that IPv4 address, and a CIDR entry opens
//! a special address only when every address of it is special.
//!
//! The IPv6 forms and the ClientHellos are built here by hand from the RFCs' layouts, not with
//! the code under test. A ClientHello the parser accepts names exactly one server, and every byte
//! after a whole hello (a TLS 1.3 client's ChangeCipherSpec and early data, or anything) is handed
//! on byte for byte.

#[path = "common/hello.rs"]
mod hello;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use ipnet::IpNet;
use nitro_vsock_proxy::config;
use nitro_vsock_proxy::policy::host::{
    cidr_is_wholly_special, embedded_ipv4, ipv4_embedding, special_kind, Host, HostName,
    HostPattern, Ipv4Embedding, SpecialKind,
};
use nitro_vsock_proxy::policy::{Allowlist, Entry};
use nitro_vsock_proxy::policy::{Denial, Policy};
use nitro_vsock_proxy::proxy::request::connect::parse_head;
use nitro_vsock_proxy::proxy::request::sni::{read_client_hello, server_name, HelloError};
use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

fn policy() -> Policy {
    let yaml = "allowlist:\n- {address: api.example.com, port: 443}\n- {address: '*.s3.example.com', port: 443}\n";
    Policy::new(
        config::parse(yaml, std::path::Path::new("p.yaml"))
            .unwrap()
            .allowlist,
    )
}

/// A name accepted for port 443 by the test allowlist, by hand.
fn named_by_allowlist(name: &str) -> bool {
    name == "api.example.com"
        || name
            .strip_suffix(".s3.example.com")
            .is_some_and(|head| !head.is_empty())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn connect_heads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_head(&bytes);
    }

    #[test]
    fn connect_targets_round_trip(host in "[a-zA-Z0-9.*{}\\[\\]:-]{0,40}", port in any::<u16>()) {
        let head = format!("CONNECT {host}:{port} HTTP/1.1\r\n\r\n");
        if let Ok(Some(request)) = parse_head(head.as_bytes()) {
            prop_assert_eq!(request.port, port);
            prop_assert!(port != 0);
            if let Host::Name(name) = &request.host {
                let odd = name.as_str().contains(['*', '{', '}', '[', ']', ':']);
                prop_assert!(!odd, "{}", name);
                let allowed = policy().admits_request(&request.host, port).is_ok();
                prop_assert_eq!(allowed, port == 443 && named_by_allowlist(name.as_str()));
            }
        }
    }

    #[test]
    fn client_hellos_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = server_name(&bytes);
        // Also behind a valid-looking handshake record header.
        let mut record = vec![22u8, 3, 1];
        record.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        record.extend_from_slice(&bytes);
        if let Ok(Some(name)) = server_name(&record) {
            prop_assert!(HostName::parse(name.as_str()).is_ok());
        }
    }

    #[test]
    fn wildcards_match_exactly_the_names_below_their_suffix(label in "[a-z0-9-]{1,10}", rest in "[a-z0-9.-]{0,20}") {
        let suffix = HostName::parse("s3.example.com").unwrap();
        let candidate = format!("{label}.{rest}");
        if let Ok(name) = HostName::parse(&candidate) {
            let by_hand = name.as_str().ends_with(".s3.example.com");
            prop_assert_eq!(name.matches_wildcard(&suffix), by_hand);
            prop_assert_eq!(
                policy().admits_request(&Host::Name(name.clone()), 443).is_ok(),
                named_by_allowlist(name.as_str())
            );
        }
        prop_assert!(!HostName::parse("s3.example.com").unwrap().matches_wildcard(&suffix));
        let pattern = format!("*.{rest}");
        if let Ok(HostPattern::Wildcard(s)) = pattern.parse::<HostPattern>() {
            prop_assert!(!s.as_str().contains('*'));
        }
    }
}

/// One extension of a generated ClientHello.
#[derive(Clone, Debug)]
enum Extension {
    /// `server_name`, with these (name type, name) entries (0 is host_name).
    ServerName(Vec<(u8, &'static str)>),
    /// Any other type, with data the parser never interprets.
    Other(u16, Vec<u8>),
}

/// Names the parser accepts, distinct once normalised but for the second.
const HELLO_NAMES: &[&str] = &[
    "api.example.com",
    "API.Example.com.",
    "b.s3.example.com",
    "evil.example",
];

/// Other extension types: supported_groups, signature_algorithms, extended_master_secret,
/// supported_versions, key_share and three GREASE values.
const OTHER_TYPES: &[u16] = &[10, 13, 23, 43, 51, 0x0a0a, 0x1a1a, 0xfafa];

fn extension() -> impl Strategy<Value = Extension> {
    let entry = (
        prop_oneof![3 => Just(0u8), 1 => Just(7u8)],
        proptest::sample::select(HELLO_NAMES),
    );
    prop_oneof![
        proptest::collection::vec(entry, 0..4).prop_map(Extension::ServerName),
        (
            proptest::sample::select(OTHER_TYPES),
            proptest::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(kind, data)| Extension::Other(kind, data)),
    ]
}

/// The (type, data) pairs of `extensions`, for [`hello::client_hello_message`].
fn raw_extensions(extensions: &[Extension]) -> Vec<(u16, Vec<u8>)> {
    extensions
        .iter()
        .map(|ext| match ext {
            Extension::ServerName(entries) => {
                let entries: Vec<(u8, &[u8])> =
                    entries.iter().map(|(k, n)| (*k, n.as_bytes())).collect();
                (0, hello::server_name_list(&entries))
            }
            Extension::Other(kind, data) => (*kind, data.clone()),
        })
        .collect()
}

/// The one server name `extensions` give, by hand: one `server_name` extension, no extension
/// type twice, no name type twice in its list, one host_name in it.
fn the_one_name(extensions: &[Extension]) -> Option<&'static str> {
    let types: Vec<u16> = raw_extensions(extensions).iter().map(|(t, _)| *t).collect();
    if types.iter().collect::<HashSet<_>>().len() != types.len() {
        return None;
    }
    let lists: Vec<&Vec<(u8, &'static str)>> = extensions
        .iter()
        .filter_map(|ext| match ext {
            Extension::ServerName(entries) => Some(entries),
            Extension::Other(..) => None,
        })
        .collect();
    let [entries] = lists.as_slice() else {
        return None;
    };
    let kinds: HashSet<u8> = entries.iter().map(|(k, _)| *k).collect();
    if kinds.len() != entries.len() {
        return None;
    }
    entries.iter().find(|(k, _)| *k == 0).map(|(_, n)| *n)
}

/// A client that sends `data` in reads of the given sizes (cycled), then closes.
struct Chunked {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    reads: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let size = this.sizes[this.reads % this.sizes.len()];
        let n = size.min(buf.remaining()).min(this.data.len() - this.at);
        buf.put_slice(&this.data[this.at..this.at + n]);
        this.at += n;
        this.reads += 1;
        Poll::Ready(Ok(()))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn an_accepted_client_hello_has_exactly_one_server_name(
        extensions in proptest::collection::vec(extension(), 0..5),
        cuts in proptest::collection::vec(0usize..200, 0..3),
        after in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let message = hello::client_hello_message(&raw_extensions(&extensions));
        let bytes = [hello::in_records(&message, &cuts), after].concat();
        let expected = the_one_name(&extensions).map(|n| HostName::parse(n).unwrap());
        let got = server_name(&bytes);
        match &expected {
            Some(name) => prop_assert_eq!(got, Ok(Some(name.clone()))),
            None => prop_assert!(got.is_err(), "{:?} accepted: {:?}", extensions, got),
        }
        // Two host names anywhere, in one list or in two extensions, are malformed.
        let host_names = extensions
            .iter()
            .map(|ext| match ext {
                Extension::ServerName(entries) => entries.iter().filter(|(k, _)| *k == 0).count(),
                Extension::Other(..) => 0,
            })
            .sum::<usize>();
        if host_names > 1 {
            prop_assert!(
                matches!(server_name(&bytes), Err(HelloError::Malformed(_))),
                "{:?}: {:?}", extensions, server_name(&bytes)
            );
        }
    }

    #[test]
    fn bytes_after_a_whole_client_hello_are_handed_on_byte_for_byte(
        cuts in proptest::collection::vec(0usize..200, 0..3),
        first_flight in any::<bool>(),
        after in proptest::collection::vec(any::<u8>(), 0..3000),
        sizes in proptest::collection::vec(1usize..700, 1..6),
    ) {
        let sni = hello::server_name_list(&[(0, b"api.example.com")]);
        let hello = hello::in_records(&hello::client_hello_message(&[(0, sni)]), &cuts);
        let mut input = hello.clone();
        if first_flight {
            input.extend_from_slice(&hello::CHANGE_CIPHER_SPEC);
            input.extend_from_slice(&hello::application_data(100, 0xee));
        }
        input.extend_from_slice(&after);
        let mut client = Chunked { data: input.clone(), at: 0, sizes, reads: 0 };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let (read, rest) = runtime.block_on(async {
            let read = read_client_hello(&mut client).await;
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            (read, rest)
        });
        let read = read.unwrap();
        prop_assert_eq!(read.name().map(|n| n.as_str()), Ok("api.example.com"));
        prop_assert!(read.bytes.len() >= hello.len());
        // What the route sends upstream first, then what it relays: the input, byte for byte.
        prop_assert_eq!([read.bytes, rest].concat(), input);
    }
}

/// `v4` in each form, the other bits from `filler` where the form leaves them free.
fn embedded_forms(v4: Ipv4Addr, filler: u128) -> Vec<(Ipv4Embedding, Ipv6Addr)> {
    let a = u128::from(u32::from(v4));
    let o = v4.octets().map(u128::from);
    let low = |bits: u32| filler & ((1u128 << bits) - 1);
    vec![
        (Ipv4Embedding::Mapped, Ipv6Addr::from((0xffff << 32) | a)),
        (Ipv4Embedding::Compatible, Ipv6Addr::from(a)),
        (
            Ipv4Embedding::Nat64,
            Ipv6Addr::from((0x0064_ff9b << 96) | a),
        ),
        (
            // Bytes 0..6 the prefix, 6 and 7 octets 0 and 1, 8 the u octet (free here),
            // 9 and 10 octets 2 and 3, 11..16 the suffix.
            Ipv4Embedding::Nat64LocalUse,
            Ipv6Addr::from(
                (0x0064_ff9b_0001 << 80)
                    | (o[0] << 72)
                    | (o[1] << 64)
                    | (filler & (0xff << 56))
                    | (o[2] << 48)
                    | (o[3] << 40)
                    | low(40),
            ),
        ),
        (
            Ipv4Embedding::SixToFour,
            Ipv6Addr::from((0x2002 << 112) | (a << 80) | low(80)),
        ),
    ]
}

/// A Teredo address: server in bits 32..64, flags and port free, client inverted at the end.
fn teredo(server: Ipv4Addr, client: Ipv4Addr, filler: u128) -> Ipv6Addr {
    let server = u128::from(u32::from(server));
    let client = u128::from(!u32::from(client));
    Ipv6Addr::from((0x2001_0000 << 96) | (server << 64) | (filler & (0xffff_ffff << 32)) | client)
}

/// IPv4 addresses, half of them drawn from the special ranges so those get exercised.
fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    let within = |base: u32, len: u32| {
        any::<u32>().prop_map(move |r| Ipv4Addr::from(base | (r & (u32::MAX >> len))))
    };
    prop_oneof![
        any::<u32>().prop_map(Ipv4Addr::from),
        within(0x7f00_0000, 8),
        within(0xa9fe_0000, 16),
        within(0xa9fe_a900, 24),
        Just(Ipv4Addr::new(169, 254, 169, 254)),
        within(0, 8),
        within(0xe000_0000, 4),
        Just(Ipv4Addr::BROADCAST),
    ]
}

/// IPv6 addresses, mostly inside the prefixes the classification looks at.
fn ipv6() -> impl Strategy<Value = Ipv6Addr> {
    let prefixes: [(u128, u32); 10] = [
        (0, 0),
        (0xffff << 32, 96),
        (0, 96),
        (0x0064_ff9b << 96, 96),
        (0x0064_ff9b_0001 << 80, 48),
        (0x2002 << 112, 16),
        (0x2001_0000 << 96, 32),
        (0xfd00_0ec2 << 96, 64),
        (0xfe80 << 112, 10),
        (0xff00 << 112, 8),
    ];
    (0..prefixes.len(), any::<u128>()).prop_map(move |(i, r)| {
        let (base, len) = prefixes[i];
        let host_bits = if len == 0 {
            u128::MAX
        } else {
            u128::MAX >> len
        };
        Ipv6Addr::from(base | (r & host_bits))
    })
}

/// A CIDR block around a generated address, and one address inside it.
fn cidr_and_member() -> impl Strategy<Value = (IpNet, IpAddr)> {
    let v4 = (ipv4(), 0u8..=32, any::<u32>()).prop_map(|(a, len, r)| {
        let net = IpNet::new(IpAddr::V4(a), len).unwrap().trunc();
        let host_bits = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        let IpAddr::V4(first) = net.network() else {
            unreachable!()
        };
        (
            net,
            IpAddr::V4(Ipv4Addr::from(u32::from(first) | (r & host_bits))),
        )
    });
    let v6 = (ipv6(), 0u8..=128, any::<u128>()).prop_map(|(a, len, r)| {
        let net = IpNet::new(IpAddr::V6(a), len).unwrap().trunc();
        let host_bits = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
        let IpAddr::V6(first) = net.network() else {
            unreachable!()
        };
        (
            net,
            IpAddr::V6(Ipv6Addr::from(u128::from(first) | (r & host_bits))),
        )
    });
    prop_oneof![v4, v6]
}

/// Text that looks like a configuration file: the real keys and value shapes, and mistakes.
fn yamlish() -> impl Strategy<Value = String> {
    let address = prop_oneof![
        4 => Just("api.example.com".to_owned()),
        2 => Just("'*.s3.example.com'".to_owned()),
        2 => Just("192.0.2.10".to_owned()),
        2 => Just("'::ffff:10.0.0.0/104'".to_owned()),
        1 => Just("10.0.0.1/8".to_owned()),
        1 => Just("[::1]".to_owned()),
        1 => Just("{region}.x".to_owned()),
        1 => "[ -~]{0,20}",
    ];
    let port = prop_oneof![
        4 => (1u32..65536).prop_map(|p| p.to_string()),
        1 => any::<i64>().prop_map(|p| p.to_string()),
        1 => Just("0".to_owned()),
        1 => Just("'443'".to_owned()),
        1 => Just("443x".to_owned()),
        1 => Just("[1, 2]".to_owned()),
        1 => Just("~".to_owned()),
    ];
    let key = prop_oneof![
        Just("address"),
        Just("port"),
        Just("adress"),
        Just("listen"),
        Just("remote"),
        Just("mode"),
        Just("sni"),
        Just("max_connections"),
        Just("idle_timeout"),
    ];
    let value = prop_oneof![
        address.clone(),
        port.clone(),
        Just("connect".to_owned()),
        Just("require".to_owned()),
        Just("'tcp:127.0.0.1:9000'".to_owned()),
        Just("api.example.com:443".to_owned()),
        Just("8001".to_owned()),
        Just("10s".to_owned()),
        Just("0s".to_owned()),
    ];
    let entry = (address, port).prop_map(|(a, p)| format!("- {{address: {a}, port: {p}}}\n"));
    let free_route = proptest::collection::vec((key, value), 0..5).prop_map(|pairs| {
        let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("- {{{}}}\n", body.join(", "))
    });
    let listen = prop_oneof![
        (9000u16..9004).prop_map(|p| format!("'tcp:127.0.0.1:{p}'")),
        (8000u32..8004).prop_map(|p| p.to_string()),
        Just("'unix:/run/x.sock'".to_owned()),
        Just("'vsock:3:5000'".to_owned()),
        Just("'tcp:[::1]:9000'".to_owned()),
    ];
    let remote = prop_oneof![
        Just("api.example.com:443".to_owned()),
        Just("'kms.{region}.{domain}:443'".to_owned()),
        Just("'[2001:db8::1]:443'".to_owned()),
        Just("api.example.com".to_owned()),
    ];
    let shaped_route = (
        listen,
        remote,
        0..4u8,
        proptest::option::of("[0-9]{1,3}[smh]"),
    )
        .prop_map(|(listen, remote, shape, idle)| {
            let what = match shape {
                0 => format!("remote: {remote}"),
                1 => format!("remote: {remote}, sni: require"),
                2 => "mode: connect".to_owned(),
                _ => "mode: sni, port: 443".to_owned(),
            };
            let idle = idle.map_or_else(String::new, |d| format!(", idle_timeout: {d}"));
            format!("- {{listen: {listen}, {what}{idle}}}\n")
        });
    let route = prop_oneof![3 => shaped_route, 1 => free_route];
    let top = prop_oneof![
        6 => Just("allowlist:"),
        1 => Just("routes:"),
        1 => Just("allowlst:"),
        1 => Just(""),
    ];
    let noise = prop_oneof![4 => Just(String::new()), 1 => "[ -~\n\t]{0,8}"];
    (
        top,
        proptest::collection::vec(entry, 0..3),
        proptest::option::of(proptest::collection::vec(route, 0..4)),
        noise,
    )
        .prop_map(|(top, entries, routes, noise)| {
            let mut text = format!("{top}\n{}", entries.concat());
            if let Some(routes) = routes {
                text.push_str("routes:\n");
                text.push_str(&routes.concat());
            }
            text.push_str(&noise);
            text
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn embedded_ipv4_classifies_as_the_ipv4(v4 in ipv4(), filler in any::<u128>()) {
        let want = special_kind(IpAddr::V4(v4));
        for (form, v6) in embedded_forms(v4, filler) {
            // `::` and `::1` are the IPv6 unspecified and loopback addresses, not IPv4-compatible.
            if form == Ipv4Embedding::Compatible && u32::from(v4) <= 1 {
                continue;
            }
            prop_assert_eq!(special_kind(IpAddr::V6(v6)), want, "{:?} {}", form, v6);
        }
    }

    #[test]
    fn embedded_ipv4_round_trips(v4 in any::<u32>().prop_map(Ipv4Addr::from), filler in any::<u128>()) {
        for (form, v6) in embedded_forms(v4, filler) {
            if form == Ipv4Embedding::Compatible && u32::from(v4) <= 1 {
                prop_assert_eq!(ipv4_embedding(&v6), None);
                continue;
            }
            let got = ipv4_embedding(&v6);
            prop_assert_eq!(got.map(|e| e.form), Some(form), "{}", v6);
            prop_assert_eq!(got.map(|e| e.ipv4), Some(v4), "{}", v6);
            prop_assert_eq!(embedded_ipv4(&v6), Some(v4));
        }
    }

    #[test]
    fn teredo_is_special_when_its_client_or_server_is(
        server in ipv4(),
        client in ipv4(),
        filler in any::<u128>(),
    ) {
        let v6 = teredo(server, client, filler);
        let got = ipv4_embedding(&v6).unwrap();
        prop_assert_eq!(got.form, Ipv4Embedding::Teredo);
        prop_assert_eq!(got.ipv4, client);
        prop_assert_eq!(got.teredo_server, Some(server));
        let want = special_kind(IpAddr::V4(client)).or(special_kind(IpAddr::V4(server)));
        prop_assert_eq!(special_kind(IpAddr::V6(v6)), want, "{}", v6);
    }

    #[test]
    fn a_wholly_special_cidr_holds_only_special_addresses((net, member) in cidr_and_member()) {
        prop_assert!(net.contains(&member));
        if cidr_is_wholly_special(&net) {
            prop_assert!(special_kind(member).is_some(), "{} in {}", member, net);
        }
        // Through the policy: a CIDR entry never opens a special address of a block that also
        // holds ordinary ones, and opens the metadata service only as a one-address block.
        // The entry as the loader stores it (an IPv4-mapped block becomes its IPv4 block).
        let address: HostPattern = net.to_string().parse().unwrap();
        let HostPattern::Cidr(stored) = address else {
            panic!("{net} parsed as {address:?}")
        };
        // The policy compares addresses in IPv4 form where they have one (`::ffff:a.b.c.d` is
        // a.b.c.d), so an IPv6 block does not hold an IPv4-mapped address.
        let holds = stored.contains(&member.to_canonical());
        let policy = Policy::new(Allowlist {
            entries: vec![Entry { address, port: 443 }],
        });
        let remote = Host::Name(HostName::parse("api.example.com").unwrap());
        let decision = policy.decide(&remote, 443, member, &Default::default());
        if !holds {
            prop_assert!(decision.is_err(), "{} outside {}: {:?}", member, stored, decision);
            return Ok(());
        }
        match special_kind(member) {
            None => prop_assert!(decision.is_ok(), "{} in {}: {:?}", member, net, decision),
            Some(SpecialKind::InstanceMetadata) if net.prefix_len() < net.max_prefix_len() => {
                prop_assert_eq!(decision, Err(Denial::Special(SpecialKind::InstanceMetadata)));
            }
            Some(_) => {
                prop_assert_eq!(decision.is_ok(), cidr_is_wholly_special(&net), "{} in {}", member, net);
            }
        }
    }

    #[test]
    fn host_names_normalise_idempotently(input in prop_oneof![
        "[a-zA-Z0-9._-]{0,40}",
        "([a-zA-Z0-9-]{1,12}\\.){1,4}[a-zA-Z]{1,8}\\.?",
        "[a-zA-Zà-ÿ.-]{1,30}",
        any::<String>(),
    ]) {
        if let Ok(name) = HostName::parse(&input) {
            let canonical = name.as_str();
            prop_assert!(!canonical.ends_with('.'), "{}", canonical);
            prop_assert!(canonical.is_ascii() && canonical.len() <= 253, "{}", canonical);
            prop_assert_eq!(canonical.to_ascii_lowercase(), canonical);
            prop_assert_eq!(HostName::parse(canonical).ok(), Some(name.clone()), "idempotent");
            prop_assert_eq!(HostName::parse(&input.to_ascii_uppercase()).ok(), Some(name.clone()));
            prop_assert_eq!(HostName::parse(&input.to_ascii_lowercase()).ok(), Some(name.clone()));
            if !input.trim_end().ends_with('.') {
                let dotted = format!("{}.", input.trim_end());
                prop_assert_eq!(HostName::parse(&dotted).ok(), Some(name.clone()), "trailing dot");
            }
        }
    }

    #[test]
    fn the_config_loader_never_panics_on_any_text(text in any::<String>()) {
        let _ = config::parse(&text, Path::new("fuzz.yaml"));
    }

    #[test]
    fn the_config_loader_never_panics_on_yamlish_text(text in yamlish()) {
        if let Ok(config) = config::parse(&text, Path::new("fuzz.yaml")) {
            prop_assert!(!config.allowlist.entries.is_empty(), "{}", text);
            prop_assert!(config.allowlist.entries.iter().all(|e| e.port != 0), "{}", text);
            prop_assert_eq!(config.allowlist_lines.len(), config.allowlist.entries.len());
        }
    }
}
