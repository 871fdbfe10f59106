//! Who may connect to an ingress route: its `allow_from` blocks, and which sources' PROXY
//! headers are believed (`accept_proxy_protocol`).
//!
//! This module owns the source decision, a pure function of the route's blocks and one client
//! address (no I/O), so it is tested without a network and re-run on reload against open
//! connections. Addresses are compared in IPv4 form when they are IPv4-mapped (a dual-stack
//! listener's IPv4 client is judged as IPv4), as the allowlist's are.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::host::ipv4_mapped_cidr_as_ipv4;

/// Parses one block of `allow_from` or `accept_proxy_protocol`: a CIDR block (`10.0.0.0/8`,
/// `2001:db8::/32`) or one address (`10.0.5.7`, as its /32 or /128). An IPv4-mapped block is
/// the IPv4 block it means.
pub fn parse_block(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if s.contains('/') {
        let net: IpNet = s
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR block (like 10.0.0.0/8 or 2001:db8::/32)"))?;
        if net.trunc() != net {
            return Err(format!(
                "CIDR block {s:?} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(ipv4_mapped_cidr_as_ipv4(net));
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>()
        .map(|ip| IpNet::from(ip.to_canonical()))
        .map_err(|_| {
            format!(
                "{s:?} is not an IP address or CIDR block (like 10.0.0.0/8, 2001:db8::/32 or \
                 10.0.5.7); names are not allowed here: a source is judged by its address"
            )
        })
}

/// One ingress route's sources: who may connect, and whose PROXY headers are believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// `allow_from`: a client outside every block is refused. Empty: no one is admitted.
    pub allow_from: Vec<IpNet>,
    /// `accept_proxy_protocol`: connections from these must start with a PROXY header, whose
    /// client is then the one judged.
    pub trusted: Vec<IpNet>,
}

/// Why a source was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotAllowed {
    pub client: IpAddr,
    /// The route's `allow_from`, as written, for the message.
    pub allow_from: String,
}

impl fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.allow_from.is_empty() {
            write!(
                f,
                "source {} is not allowed: the route's allow_from is empty, so it admits no one",
                self.client
            )
        } else {
            write!(
                f,
                "source {} is not in the route's allow_from ({})",
                self.client, self.allow_from
            )
        }
    }
}

/// `a, b, c`: blocks as written in messages and `--check-config`.
pub fn list(blocks: &[IpNet]) -> String {
    blocks
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Sources {
    /// Whether `client` may connect: `Ok` with the block that admits it.
    pub fn admits(&self, client: IpAddr) -> Result<IpNet, NotAllowed> {
        let client = client.to_canonical();
        self.allow_from
            .iter()
            .find(|block| block.contains(&client))
            .copied()
            .ok_or_else(|| NotAllowed {
                client,
                allow_from: list(&self.allow_from),
            })
    }

    /// Whether a connection from `peer` must start with a PROXY header that names its client.
    pub fn trusts_header_from(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted.iter().any(|block| block.contains(&peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sources(allow: &[&str], trusted: &[&str]) -> Sources {
        Sources {
            allow_from: allow.iter().map(|b| parse_block(b).unwrap()).collect(),
            trusted: trusted.iter().map(|b| parse_block(b).unwrap()).collect(),
        }
    }

    #[test]
    fn blocks_and_single_addresses_admit_their_sources_only() {
        let s = sources(&["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"], &[]);
        assert_eq!(s.admits(ip("10.9.8.7")).unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            s.admits(ip("192.0.2.7")).unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert!(s.admits(ip("2001:db8:1::5")).is_ok());
        let denied = s.admits(ip("192.0.2.8")).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "source 192.0.2.8 is not in the route's allow_from (10.0.0.0/8, 2001:db8::/32, 192.0.2.7/32)"
        );
        assert!(s.admits(ip("11.0.0.1")).is_err());
        assert!(s.admits(ip("2001:db9::1")).is_err());
    }

    #[test]
    fn an_ipv4_mapped_source_is_judged_as_ipv4() {
        let s = sources(&["10.0.0.0/8"], &["10.0.5.0/24"]);
        assert!(s.admits(ip("::ffff:10.1.2.3")).is_ok());
        assert!(s.admits(ip("::ffff:11.1.2.3")).is_err());
        assert!(s.trusts_header_from(ip("::ffff:10.0.5.9")));
        // A mapped block written in the file means the IPv4 block.
        let mapped = sources(&["::ffff:10.0.0.0/104"], &[]);
        assert!(mapped.admits(ip("10.1.2.3")).is_ok());
    }

    #[test]
    fn an_empty_allow_from_admits_no_one() {
        let s = sources(&[], &[]);
        let denied = s.admits(ip("127.0.0.1")).unwrap_err();
        assert!(denied.to_string().contains("admits no one"), "{denied}");
        assert!(!s.trusts_header_from(ip("127.0.0.1")));
    }

    #[test]
    fn bad_blocks_say_what_to_write() {
        for (bad, needle) in [
            ("10.0.0.1/8", "host bits set; did you mean 10.0.0.0/8"),
            ("10.0.0.0/33", "is not a CIDR block"),
            ("lb.example.com", "names are not allowed"),
        ] {
            let e = parse_block(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
