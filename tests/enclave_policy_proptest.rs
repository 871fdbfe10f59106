//! Property tests of per-enclave policy ([`nitro_vsock_proxy::policy::enclaves`]): what a
//! connection may reach is never more than the union of the top-level allowlist and the
//! allowlists of the entries it matches, never less, and a connection that matches no entry
//! never gets an entry's addresses.
//!
//! The oracle is independent of the composition under test: each allowlist (the top-level one,
//! each entry's) is compiled alone, and an address is in the union when one of those allows
//! it alone. The peers, entries and addresses are drawn from small spaces so that matches,
//! overlaps and shared addresses happen often.

use std::net::{IpAddr, Ipv4Addr};

use nitro_vsock_proxy::policy::enclaves::{Enclave, Match, PeerIdentity, PolicySet, Table};
use nitro_vsock_proxy::policy::host::{Host, HostPattern};
use nitro_vsock_proxy::policy::{Allowlist, Entry, Policy, Resolutions};
use proptest::prelude::*;

const PORTS: [u16; 2] = [443, 8443];

fn address(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))
}

fn entry() -> impl Strategy<Value = Entry> {
    (0u8..8, 0usize..2, any::<bool>()).prop_map(|(i, p, block)| Entry {
        address: if block {
            // A /30 around the address: blocks and single addresses overlap.
            HostPattern::Cidr(format!("10.0.0.{}/30", i & !3).parse().unwrap())
        } else {
            HostPattern::Ip(address(i))
        },
        port: PORTS[p],
    })
}

fn allowlist() -> impl Strategy<Value = Allowlist> {
    prop::collection::vec(entry(), 0..4).prop_map(|entries| Allowlist { entries })
}

/// An entry matching by CID (1..4) or by source (127.0.0.1..4), or both.
fn enclave(index: usize) -> impl Strategy<Value = Enclave> {
    (
        prop::option::of(1u32..4),
        prop::option::of(1u8..4),
        allowlist(),
    )
        .prop_filter("a match needs a key", |(cid, source, _)| {
            cid.is_some() || source.is_some()
        })
        .prop_map(move |(cid, source, allowlist)| Enclave {
            id: format!("e{index}"),
            matcher: Match {
                cid,
                source: source.map(|s| format!("127.0.0.{s}/32").parse().unwrap()),
                ..Match::default()
            },
            allowlist,
        })
}

fn peer() -> impl Strategy<Value = PeerIdentity> {
    prop_oneof![
        (1u32..5).prop_map(|cid| PeerIdentity {
            cid: Some(cid),
            source: None
        }),
        (1u8..5).prop_map(|s| PeerIdentity {
            cid: None,
            source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, s)))
        }),
    ]
}

fn enclaves() -> impl Strategy<Value = Vec<Enclave>> {
    (enclave(0), enclave(1), enclave(2)).prop_map(|(a, b, c)| vec![a, b, c])
}

/// Whether `allowlist` alone allows `addr`:`port`.
fn alone(allowlist: &Allowlist, addr: IpAddr, port: u16) -> bool {
    Policy::new(allowlist.clone())
        .decide(&Host::Ip(addr), port, addr, &Resolutions::new())
        .is_ok()
}

proptest! {
    #[test]
    fn a_connection_reaches_exactly_the_union_of_what_it_matches(
        top in allowlist(),
        entries in enclaves(),
        peer in peer(),
    ) {
        let set = PolicySet::new(top.clone(), entries.clone());
        let matched = set.matching(&peer, &Table::unavailable());
        let ids: Vec<&str> = set.ids(&matched).collect();
        let policy = set.for_matched(&matched);
        for i in 0u8..8 {
            for port in PORTS {
                let addr = address(i);
                let decided = policy
                    .decide(&Host::Ip(addr), port, addr, &Resolutions::new())
                    .is_ok();
                let union = alone(&top, addr, port)
                    || entries
                        .iter()
                        .filter(|e| ids.contains(&e.id.as_str()))
                        .any(|e| alone(&e.allowlist, addr, port));
                prop_assert_eq!(decided, union, "{} port {} for {:?} matching {:?}", addr, port, peer, ids);
                let admitted = policy.admits_request(&Host::Ip(addr), port).is_ok();
                prop_assert_eq!(admitted, union);
            }
        }
    }

    #[test]
    fn a_connection_matching_nothing_never_gets_an_entrys_addresses(
        top in allowlist(),
        entries in enclaves(),
    ) {
        // CID 9 and 127.0.0.9 match none of the generated entries.
        for peer in [
            PeerIdentity { cid: Some(9), source: None },
            PeerIdentity { cid: None, source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))) },
            PeerIdentity::default(),
        ] {
            let set = PolicySet::new(top.clone(), entries.clone());
            let matched = set.matching(&peer, &Table::unavailable());
            prop_assert!(matched.is_empty());
            let policy = set.for_matched(&matched);
            for i in 0u8..8 {
                for port in PORTS {
                    let addr = address(i);
                    let decided = policy
                        .decide(&Host::Ip(addr), port, addr, &Resolutions::new())
                        .is_ok();
                    prop_assert_eq!(decided, alone(&top, addr, port));
                }
            }
        }
    }
}
