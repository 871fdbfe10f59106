//! Host names, allowlist address patterns and the classification of special IP addresses.
//!
//! This module owns the vocabulary the policy is written in: a normalised [`HostName`] (compared
//! case-insensitively, trailing dot ignored, IDNA to ASCII), a [`HostPattern`] (hostname, IP or
//! CIDR) and [`special_kind`], which says whether an address is one the proxy must never reach
//! unless the operator names it explicitly (loopback, link-local, instance metadata, ...).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

/// A DNS host name in canonical form: ASCII (IDNA-encoded), lower case, no trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

impl HostName {
    /// Normalises and validates a host name.
    pub fn parse(input: &str) -> Result<HostName, String> {
        let trimmed = input.trim();
        let without_dot = trimmed.strip_suffix('.').unwrap_or(trimmed);
        if without_dot.is_empty() {
            return Err("empty host name".into());
        }
        let ascii = idna::domain_to_ascii_cow(without_dot.as_bytes(), idna::AsciiDenyList::EMPTY)
            .map_err(|_| format!("{trimmed:?} is not a valid host name (IDNA conversion failed)"))?
            .to_ascii_lowercase();
        if ascii.len() > 253 {
            return Err(format!(
                "host name is {} characters long; the limit is 253",
                ascii.len()
            ));
        }
        let labels: Vec<&str> = ascii.split('.').collect();
        for label in &labels {
            if label.is_empty() {
                return Err(format!(
                    "{trimmed:?} has an empty label (two dots in a row?)"
                ));
            }
            if label.len() > 63 {
                return Err(format!("label {label:?} is longer than 63 characters"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(format!("label {label:?} starts or ends with '-'"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "{trimmed:?} is not a valid host name (letters, digits, '-' and '.' only)"
                ));
            }
        }
        // An all-digit last label is never a real name; it is a mistyped IP address.
        if labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!(
                "{trimmed:?} is neither a valid IP address nor a host name"
            ));
        }
        Ok(HostName(ascii))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this name is matched by the wildcard `*.suffix`: one or more labels before
    /// `suffix`, never `suffix` itself.
    pub fn matches_wildcard(&self, suffix: &HostName) -> bool {
        self.0
            .strip_suffix(suffix.as_str())
            .is_some_and(|head| head.len() > 1 && head.ends_with('.'))
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an allowlist `address:` (or the proxy's REMOTE_ADDR) names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Name(HostName),
    /// `*.example.com`, held as its suffix `example.com`: allows names, never addresses.
    Wildcard(HostName),
    Ip(IpAddr),
    Cidr(IpNet),
}

impl FromStr for HostPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(suffix) = s.strip_prefix("*.") {
            if suffix.contains('*') {
                return Err(format!(
                    "{s:?}: `*` may only be the whole first label, as in *.example.com"
                ));
            }
            return HostName::parse(suffix)
                .map(HostPattern::Wildcard)
                .map_err(|e| format!("{s:?}: after `*.`: {e}"));
        }
        if s.contains('*') {
            return Err(format!(
                "{s:?}: `*` may only be the whole first label, as in *.example.com"
            ));
        }
        if s.contains('/') {
            let net: IpNet = s
                .parse()
                .map_err(|_| format!("{s:?} is not a valid CIDR block (like 192.0.2.0/24)"))?;
            if net.trunc() != net {
                return Err(format!(
                    "CIDR block {s:?} has host bits set; did you mean {}?",
                    net.trunc()
                ));
            }
            return Ok(HostPattern::Cidr(net));
        }
        let bare = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(HostPattern::Ip(ip.to_canonical()));
        }
        HostName::parse(s).map(HostPattern::Name)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Name(n) => n.fmt(f),
            HostPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
            HostPattern::Ip(ip) => ip.fmt(f),
            HostPattern::Cidr(net) => net.fmt(f),
        }
    }
}

/// A destination host as requested: one name or one IP address (never a pattern).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Name(HostName),
    Ip(IpAddr),
}

impl Host {
    /// Parses a host name or IP literal (`[v6]` accepted); a CIDR block is not a destination.
    pub fn parse(s: &str) -> Result<Host, String> {
        match s.parse::<HostPattern>()? {
            HostPattern::Name(n) => Ok(Host::Name(n)),
            HostPattern::Ip(ip) => Ok(Host::Ip(ip)),
            HostPattern::Cidr(_) => Err(format!(
                "{s:?} is a CIDR block; a destination must be one host name or IP address"
            )),
            HostPattern::Wildcard(_) => Err(format!(
                "{s:?} is a wildcard; a destination must be one host name or IP address"
            )),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => n.fmt(f),
            Host::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Address ranges the proxy never connects to on the strength of a DNS answer alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecialKind {
    Loopback,
    /// The EC2 instance metadata service (169.254.169.254, fd00:ec2::254).
    InstanceMetadata,
    LinkLocal,
    Unspecified,
    Multicast,
    Broadcast,
}

impl fmt::Display for SpecialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpecialKind::Loopback => "loopback",
            SpecialKind::InstanceMetadata => "instance metadata service",
            SpecialKind::LinkLocal => "link-local",
            SpecialKind::Unspecified => "unspecified/this-host",
            SpecialKind::Multicast => "multicast",
            SpecialKind::Broadcast => "broadcast",
        })
    }
}

const EC2_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// The IPv4 address an IPv6 address carries, for forms that can reach an IPv4 host: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`) and the NAT64 well-known prefix
/// (`64:ff9b::a.b.c.d`). A DNS answer in one of these forms must not dodge the IPv4 rules.
pub fn embedded_ipv4(ip: &Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let compatible = s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1); // not :: or ::1
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    (compatible || nat64).then_some(tail)
}

/// Classifies `ip`, looking through IPv4-in-IPv6 forms. `None` means an ordinary address.
pub fn special_kind(ip: IpAddr) -> Option<SpecialKind> {
    match ip {
        IpAddr::V4(v4) => special_kind_v4(v4),
        IpAddr::V6(v6) => match embedded_ipv4(&v6) {
            Some(v4) => special_kind_v4(v4),
            None => special_kind_v6(v6),
        },
    }
}

fn special_kind_v4(ip: Ipv4Addr) -> Option<SpecialKind> {
    if ip == Ipv4Addr::new(169, 254, 169, 254) {
        Some(SpecialKind::InstanceMetadata)
    } else if ip.is_loopback() {
        Some(SpecialKind::Loopback)
    } else if ip.is_link_local() {
        Some(SpecialKind::LinkLocal)
    } else if ip.octets()[0] == 0 {
        // 0.0.0.0/8: "this network"; Linux connects 0.0.0.0 to the local host.
        Some(SpecialKind::Unspecified)
    } else if ip.is_multicast() {
        Some(SpecialKind::Multicast)
    } else if ip.is_broadcast() {
        Some(SpecialKind::Broadcast)
    } else {
        None
    }
}

fn special_kind_v6(ip: Ipv6Addr) -> Option<SpecialKind> {
    if ip == EC2_METADATA_V6 {
        Some(SpecialKind::InstanceMetadata)
    } else if ip.is_loopback() {
        Some(SpecialKind::Loopback)
    } else if ip.is_unspecified() {
        Some(SpecialKind::Unspecified)
    } else if ip.is_multicast() {
        Some(SpecialKind::Multicast)
    } else if (ip.segments()[0] & 0xffc0) == 0xfe80 {
        Some(SpecialKind::LinkLocal)
    } else {
        None
    }
}

/// Whether every address of `net` is special. A CIDR entry may allow a special address only when
/// the whole block lies inside special space (`127.0.0.0/8` does, `0.0.0.0/0` does not): a broad
/// block written for public endpoints must not also open the metadata service. Each special range
/// is contiguous, so a block whose first and last address fall in the same range lies inside it.
pub fn cidr_is_wholly_special(net: &IpNet) -> bool {
    // The IPv4 metadata address sits inside link-local space: one range for this purpose.
    let range = |ip: IpAddr| {
        special_kind(ip).map(|k| match k {
            SpecialKind::InstanceMetadata if ip.to_canonical().is_ipv4() => SpecialKind::LinkLocal,
            other => other,
        })
    };
    match (range(net.network()), range(net.broadcast())) {
        (Some(first), Some(last)) => first == last,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn host_names_are_normalised() {
        let n = HostName::parse("KMS.US-East-1.AmazonAWS.com.").unwrap();
        assert_eq!(n.as_str(), "kms.us-east-1.amazonaws.com");
        assert_eq!(
            HostName::parse("bücher.example").unwrap().as_str(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            HostName::parse("BÜCHER.example.").unwrap(),
            HostName::parse("xn--bcher-kva.example").unwrap()
        );
    }

    #[test]
    fn bad_host_names_are_rejected() {
        for bad in [
            "",
            ".",
            "a..b",
            "-a.example",
            "a-.example",
            "a b.example",
            "1.2.3",
            "10.0.0.256",
            &"x".repeat(64),
        ] {
            assert!(HostName::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn patterns() {
        assert_eq!(
            "10.1.2.3".parse::<HostPattern>().unwrap(),
            HostPattern::Ip(ip("10.1.2.3"))
        );
        assert_eq!(
            "[::1]".parse::<HostPattern>().unwrap(),
            HostPattern::Ip(ip("::1"))
        );
        // IPv4-mapped entries are stored as the IPv4 address they mean.
        assert_eq!(
            "::ffff:10.1.2.3".parse::<HostPattern>().unwrap(),
            HostPattern::Ip(ip("10.1.2.3"))
        );
        assert!(matches!(
            "10.0.0.0/8".parse::<HostPattern>().unwrap(),
            HostPattern::Cidr(_)
        ));
        assert!("10.0.0.1/8"
            .parse::<HostPattern>()
            .unwrap_err()
            .contains("10.0.0.0/8"));
        assert!("10.0.0.0/33".parse::<HostPattern>().is_err());
    }

    #[test]
    fn special_addresses() {
        use SpecialKind::*;
        let cases = [
            ("169.254.169.254", Some(InstanceMetadata)),
            ("fd00:ec2::254", Some(InstanceMetadata)),
            ("::ffff:169.254.169.254", Some(InstanceMetadata)),
            ("64:ff9b::169.254.169.254", Some(InstanceMetadata)),
            ("::169.254.169.254", Some(InstanceMetadata)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.9", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("169.254.1.1", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("224.0.0.1", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("192.0.2.1", None),
            ("52.94.0.1", None),
            ("2001:db8::1", None),
            ("fec0::1", None),
            ("fd00:ec2::253", None),
        ];
        for (addr, want) in cases {
            assert_eq!(special_kind(ip(addr)), want, "{addr}");
        }
    }

    #[test]
    fn cidr_is_wholly_special_requires_the_whole_block() {
        let k = |s: &str| cidr_is_wholly_special(&s.parse().unwrap());
        assert!(k("127.0.0.0/8"));
        assert!(k("127.0.0.2/32"));
        assert!(k("169.254.169.254/32"));
        assert!(k("169.254.0.0/16"));
        assert!(k("fd00:ec2::254/128"));
        assert!(!k("0.0.0.0/0"));
        assert!(!k("::/0"));
        assert!(!k("128.0.0.0/1"));
        assert!(!k("0.0.0.0/1"));
        assert!(!k("192.0.2.0/24"));
    }

    #[test]
    fn wildcards_match_names_below_their_suffix_only() {
        let p: HostPattern = "*.Example.COM.".parse().unwrap();
        let HostPattern::Wildcard(suffix) = &p else {
            panic!("{p:?}")
        };
        assert_eq!(p.to_string(), "*.example.com");
        let n = |s: &str| HostName::parse(s).unwrap();
        assert!(n("a.example.com").matches_wildcard(suffix));
        assert!(n("A.B.example.com.").matches_wildcard(suffix));
        assert!(!n("example.com").matches_wildcard(suffix));
        assert!(!n("badexample.com").matches_wildcard(suffix));
        assert!(!n("example.com.evil").matches_wildcard(suffix));
        for bad in [
            "*",
            "*.",
            "a*.example.com",
            "*.*.example.com",
            "a.*.example.com",
            "**.example.com",
        ] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad}");
        }
        assert!(Host::parse("*.example.com").is_err());
    }
}
