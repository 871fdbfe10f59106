//! Allowlist entries that add nothing: duplicates, and entries a wider entry of the same port
//! already allows in full. These are warnings (the file still loads): an operator who deletes the
//! wider entry later may not expect the narrower one to keep allowing its part.
//!
//! An entry is called shadowed only when the wider entry allows everything it allows under the
//! rules of [`crate::policy::decision`]: an IP entry allows its address even when it is special
//! (loopback, the instance metadata service, ...), a CIDR block allows special addresses only when
//! it is wholly special space and the metadata service only as a single-address block, so
//! `169.254.169.254` is not shadowed by `169.254.0.0/16`. When unsure, no warning.
//!
//! Found in time linear in the allowlist (each entry costs at most one hash lookup per prefix
//! length in use, at most 129), so a 100,000-entry file is checked in milliseconds.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::allowlist::Entry;
use crate::policy::host::{cidr_allows_special, cidr_is_wholly_special, special_kind, HostPattern};

/// How an entry adds nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlapKind {
    /// The same address (or name, or wildcard) and port as an earlier entry.
    Duplicate,
    /// An IP or CIDR inside a wider CIDR block of the same port that allows all of it.
    InsideBlock,
    /// A host name a wildcard entry of the same port matches.
    MatchedByWildcard,
}

/// `entry` adds nothing beside `by` (indexes into the allowlist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub entry: usize,
    pub by: usize,
    pub kind: OverlapKind,
}

impl fmt::Display for OverlapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverlapKind::Duplicate => "duplicate",
            OverlapKind::InsideBlock => "inside a wider block",
            OverlapKind::MatchedByWildcard => "matched by a wildcard",
        })
    }
}

/// Per port: the first entry of each exact address, block, name and wildcard.
#[derive(Default)]
struct Seen {
    ips: HashMap<IpAddr, usize>,
    blocks: HashMap<(bool, u8, u128), usize>,
    /// The prefix lengths in use, per family (`false` IPv4, `true` IPv6), sorted.
    lengths: [Vec<u8>; 2],
    names: HashMap<String, usize>,
    wildcards: HashMap<String, usize>,
}

fn bits(ip: IpAddr) -> (bool, u128, u8) {
    match ip {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (true, u128::from(v6), 128),
    }
}

impl Seen {
    /// The first block (lowest index) strictly wider than `len` that contains `addr` and for
    /// which `allows` holds.
    fn wider_block(
        &self,
        addr: IpAddr,
        len: u8,
        entries: &[Entry],
        allows: impl Fn(&IpNet) -> bool,
    ) -> Option<usize> {
        let (v6, value, width) = bits(addr);
        self.lengths[usize::from(v6)]
            .iter()
            .take_while(|&&l| l < len)
            .filter_map(|&l| {
                let mask = if l == 0 { 0 } else { u128::MAX << (width - l) };
                self.blocks.get(&(v6, l, value & mask)).copied()
            })
            .filter(|&i| matches!(&entries[i].address, HostPattern::Cidr(net) if allows(net)))
            .min()
    }
}

/// Every entry of `entries` that is a duplicate of an earlier one or is allowed in full by a
/// wider entry of the same port, in file order of the entry. Each entry is named at most once.
pub fn overlaps(entries: &[Entry]) -> Vec<Overlap> {
    let mut ports: HashMap<u16, Seen> = HashMap::new();
    let mut found = Vec::new();
    // First pass: the first entry of each kind and value, per port.
    for (index, entry) in entries.iter().enumerate() {
        let seen = ports.entry(entry.port).or_default();
        let first = match &entry.address {
            HostPattern::Ip(ip) => *seen.ips.entry(ip.to_canonical()).or_insert(index),
            HostPattern::Cidr(net) => {
                let (v6, value, _) = bits(net.network());
                let len = net.prefix_len();
                let lengths = &mut seen.lengths[usize::from(v6)];
                if let Err(at) = lengths.binary_search(&len) {
                    lengths.insert(at, len);
                }
                *seen.blocks.entry((v6, len, value)).or_insert(index)
            }
            HostPattern::Name(name) => *seen.names.entry(name.as_str().to_owned()).or_insert(index),
            HostPattern::Wildcard(suffix) => *seen
                .wildcards
                .entry(suffix.as_str().to_owned())
                .or_insert(index),
        };
        if first != index {
            found.push(Overlap {
                entry: index,
                by: first,
                kind: OverlapKind::Duplicate,
            });
        }
    }
    // Second pass: entries inside a wider one, earlier or later in the file.
    let mut duplicate = vec![false; entries.len()];
    for o in &found {
        duplicate[o.entry] = true;
    }
    for (index, entry) in entries.iter().enumerate() {
        if duplicate[index] {
            continue;
        }
        let Some(seen) = ports.get(&entry.port) else {
            continue;
        };
        let by = match &entry.address {
            HostPattern::Ip(ip) => {
                let ip = ip.to_canonical();
                let max = if ip.is_ipv4() { 32 } else { 128 };
                // An IP entry allows its address even when it is special; a block only as
                // the decision's rule 2 says.
                let special = special_kind(ip);
                seen.wider_block(ip, max + 1, entries, |net| {
                    special.is_none_or(|kind| cidr_allows_special(net, kind))
                })
            }
            HostPattern::Cidr(net) if net.prefix_len() == net.max_prefix_len() => {
                // A single-address block allows its address as an IP entry does, except a
                // special one in a block that is not wholly special; compare as for an IP.
                let ip = net.network();
                let special = special_kind(ip);
                if special.is_some_and(|kind| !cidr_allows_special(net, kind)) {
                    None
                } else {
                    seen.wider_block(ip, net.prefix_len(), entries, |wider| {
                        special.is_none_or(|kind| cidr_allows_special(wider, kind))
                    })
                }
            }
            HostPattern::Cidr(net) => {
                // A wider block allows the special addresses this one allows when this one is
                // not wholly special (it allows none) or the wider one is wholly special too;
                // neither allows the metadata service (not single-address blocks).
                let own_special = cidr_is_wholly_special(net);
                seen.wider_block(net.network(), net.prefix_len(), entries, |wider| {
                    !own_special || cidr_is_wholly_special(wider)
                })
            }
            HostPattern::Name(name) => {
                let text = name.as_str();
                text.match_indices('.')
                    .filter(|(at, _)| *at > 0)
                    .filter_map(|(at, _)| seen.wildcards.get(&text[at + 1..]).copied())
                    .filter(|&i| {
                        matches!(&entries[i].address, HostPattern::Wildcard(s) if name.matches_wildcard(s))
                    })
                    .min()
            }
            HostPattern::Wildcard(_) => None,
        };
        if let Some(by) = by {
            found.push(Overlap {
                entry: index,
                by,
                kind: match entry.address {
                    HostPattern::Name(_) => OverlapKind::MatchedByWildcard,
                    _ => OverlapKind::InsideBlock,
                },
            });
        }
    }
    found.sort_by_key(|o| o.entry);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[(&str, u16)]) -> Vec<Entry> {
        list.iter()
            .map(|(a, p)| Entry {
                address: a.parse().unwrap(),
                port: *p,
            })
            .collect()
    }

    fn found(list: &[(&str, u16)]) -> Vec<(usize, usize, OverlapKind)> {
        overlaps(&entries(list))
            .into_iter()
            .map(|o| (o.entry, o.by, o.kind))
            .collect()
    }

    use OverlapKind::*;

    #[test]
    fn duplicates_and_wider_entries_of_the_same_port() {
        assert_eq!(
            found(&[
                ("a.example", 443),
                ("10.1.2.3", 443),
                ("A.example.", 443),
                ("10.0.0.0/8", 443),
                ("10.1.0.0/16", 443),
                ("10.1.2.3", 80),
                ("x.example.com", 443),
                ("*.example.com", 443),
                ("*.example.com", 443),
                ("example.com", 443),
                ("10.0.0.0/8", 443),
            ]),
            vec![
                (1, 3, InsideBlock),
                (2, 0, Duplicate),
                (4, 3, InsideBlock),
                (6, 7, MatchedByWildcard),
                (8, 7, Duplicate),
                (10, 3, Duplicate),
            ]
        );
    }

    #[test]
    fn special_addresses_a_block_does_not_allow_are_not_shadowed() {
        assert_eq!(
            found(&[
                ("169.254.0.0/16", 80),
                ("169.254.169.254", 80),
                ("169.254.169.254/32", 80),
                ("0.0.0.0/0", 80),
                ("127.0.0.1", 80),
                ("127.0.0.0/16", 80),
                ("127.0.0.0/8", 443),
                ("127.0.0.5", 443),
                ("127.1.0.0/16", 443),
                ("192.0.2.7/32", 80),
                ("fd00:ec2::254", 80),
                ("::/0", 80),
                ("2001:db8::1", 80),
            ]),
            vec![
                // The metadata service: only its single-address block allows it as the IP does.
                (1, 2, InsideBlock),
                // 127.0.0.0/16 is wholly loopback and allows it; 0.0.0.0/0 allows neither it
                // nor 169.254.0.0/16 (wholly link-local), so those two are not shadowed.
                (4, 5, InsideBlock),
                (7, 6, InsideBlock),
                (8, 6, InsideBlock),
                (9, 3, InsideBlock),
                (12, 11, InsideBlock),
            ]
        );
    }

    #[test]
    fn a_hundred_thousand_entries_take_well_under_a_second() {
        let mut list = Vec::new();
        for i in 0..100_000u32 {
            list.push(Entry {
                address: format!("{}.{}.{}.0/24", 10 + (i >> 16), (i >> 8) & 255, i & 255)
                    .parse()
                    .unwrap(),
                port: 443,
            });
        }
        let start = std::time::Instant::now();
        assert!(overlaps(&list).is_empty());
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }
}
