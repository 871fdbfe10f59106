//! Host names, allowlist address patterns and the classification of special IP addresses.
//!
//! This module owns the vocabulary the policy is written in: a normalised [`HostName`] (compared
//! case-insensitively, trailing dot ignored, IDNA to ASCII), a [`HostPattern`] (hostname, IP or
//! CIDR) and [`special_kind`], which says whether an address is one the proxy must never reach
//! unless the operator names it explicitly (loopback, link-local, instance metadata, ...).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

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
            return Ok(HostPattern::Cidr(ipv4_mapped_cidr_as_ipv4(net)));
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

/// An IPv4-mapped block (`::ffff:10.0.0.0/104`) as the IPv4 block it means (`10.0.0.0/8`), as an
/// IPv4-mapped IP entry is stored as its IPv4 address: the policy compares addresses in IPv4 form,
/// so the mapped block would otherwise match nothing.
pub fn ipv4_mapped_cidr_as_ipv4(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else { return net };
    match (
        v6.network().to_ipv4_mapped(),
        v6.prefix_len().checked_sub(96),
    ) {
        (Some(v4), Some(len)) => Ipv4Net::new(v4, len).map_or(net, IpNet::V4),
        _ => net,
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
    /// 169.254.0.0/16 and fe80::/10, and AWS's IPv6 twin of its link-local services,
    /// fd00:ec2::/64 (the DNS resolver fd00:ec2::253, the time service fd00:ec2::123, ...).
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

/// The /64 where AWS serves, over IPv6, what it serves from 169.254.0.0/16 over IPv4.
const EC2_SERVICES_V6_PREFIX: [u16; 4] = [0xfd00, 0x0ec2, 0, 0];

/// A form of IPv6 address that carries an IPv4 address a connection to it can end up at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv4Embedding {
    /// IPv4-mapped, `::ffff:a.b.c.d`.
    Mapped,
    /// IPv4-compatible (deprecated), `::a.b.c.d`; `::` and `::1` are not this form.
    Compatible,
    /// The NAT64 well-known prefix `64:ff9b::/96` (RFC 6052), IPv4 in the last 32 bits.
    Nat64,
    /// The NAT64 local-use prefix `64:ff9b:1::/48` (RFC 8215) in RFC 6052's /48 layout: the IPv4
    /// octets in bytes 6, 7, 9 and 10 (byte 8 is the "u" octet, ignored here).
    Nat64LocalUse,
    /// 6to4, `2002:AABB:CCDD::/48` (RFC 3056): the IPv4 address in bits 16..48.
    SixToFour,
    /// Teredo, `2001:0::/32` (RFC 4380): the client's IPv4 in the last 32 bits, inverted; the
    /// Teredo server's IPv4 in bits 32..64.
    Teredo,
}

/// The IPv4 address an IPv6 address carries, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddedIpv4 {
    pub form: Ipv4Embedding,
    /// Where a connection ends up: for Teredo, the client.
    pub ipv4: Ipv4Addr,
    /// Teredo only: the server, which relays the tunnel and so is reached too.
    pub teredo_server: Option<Ipv4Addr>,
}

fn ipv4_of(high: u16, low: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))
}

/// Finds the IPv4 address `ip` carries, for every form that can reach an IPv4 host through a
/// translator or tunnel ([`Ipv4Embedding`]). A DNS answer in one of these forms must not dodge
/// the IPv4 rules.
pub fn ipv4_embedding(ip: &Ipv6Addr) -> Option<EmbeddedIpv4> {
    let s = ip.segments();
    let plain = |form, ipv4| EmbeddedIpv4 {
        form,
        ipv4,
        teredo_server: None,
    };
    let tail = ipv4_of(s[6], s[7]);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(plain(Ipv4Embedding::Mapped, v4));
    }
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return Some(plain(Ipv4Embedding::Compatible, tail));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(plain(Ipv4Embedding::Nat64, tail));
    }
    if s[..3] == [0x64, 0xff9b, 1] {
        // Bytes 6, 7 | 8 ("u") | 9, 10: the octets straddle the u octet.
        let v4 = Ipv4Addr::new((s[3] >> 8) as u8, s[3] as u8, s[4] as u8, (s[5] >> 8) as u8);
        return Some(plain(Ipv4Embedding::Nat64LocalUse, v4));
    }
    if s[0] == 0x2002 {
        return Some(plain(Ipv4Embedding::SixToFour, ipv4_of(s[1], s[2])));
    }
    if s[..2] == [0x2001, 0] {
        return Some(EmbeddedIpv4 {
            form: Ipv4Embedding::Teredo,
            ipv4: Ipv4Addr::from(!u32::from(tail)),
            teredo_server: Some(ipv4_of(s[2], s[3])),
        });
    }
    None
}

/// The IPv4 address `ip` carries (for Teredo, the client's); see [`ipv4_embedding`].
pub fn embedded_ipv4(ip: &Ipv6Addr) -> Option<Ipv4Addr> {
    ipv4_embedding(ip).map(|e| e.ipv4)
}

/// Classifies `ip`, looking through IPv4-in-IPv6 forms. `None` means an ordinary address.
pub fn special_kind(ip: IpAddr) -> Option<SpecialKind> {
    match ip {
        IpAddr::V4(v4) => special_kind_v4(v4),
        IpAddr::V6(v6) => match ipv4_embedding(&v6) {
            Some(e) => {
                special_kind_v4(e.ipv4).or_else(|| e.teredo_server.and_then(special_kind_v4))
            }
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
    } else if (ip.segments()[0] & 0xffc0) == 0xfe80 || ip.segments()[..4] == EC2_SERVICES_V6_PREFIX
    {
        Some(SpecialKind::LinkLocal)
    } else {
        None
    }
}

/// Whether every address of `net` is special. A CIDR entry may allow a special address only when
/// the whole block lies inside special space (`127.0.0.0/8` does, `0.0.0.0/0` does not): a broad
/// block written for public endpoints must not also open the metadata service. Each special range
/// is contiguous (and so is the IPv4 block an embedding form's block carries), so a block whose
/// first and last address fall in the same range lies inside it.
pub fn cidr_is_wholly_special(net: &IpNet) -> bool {
    // The metadata addresses sit inside link-local space: one range for this purpose (that a
    // block does not open the metadata service is [`cidr_allows_special`]'s business).
    let range = |ip: IpAddr| {
        special_kind(ip).map(|k| match k {
            SpecialKind::InstanceMetadata => SpecialKind::LinkLocal,
            other => other,
        })
    };
    match (range(net.network()), range(net.broadcast())) {
        (Some(first), Some(last)) => first == last,
        _ => false,
    }
}

/// Whether a CIDR entry `net` that contains an address of kind `kind` allows it. The metadata
/// service needs an entry naming that one address (an IP entry, or a /32 or /128): a block of
/// link-local space written for the DNS resolver or the time service must not also open it.
/// Any other special address needs a block wholly inside special space
/// ([`cidr_is_wholly_special`]).
pub fn cidr_allows_special(net: &IpNet, kind: SpecialKind) -> bool {
    match kind {
        SpecialKind::InstanceMetadata => net.prefix_len() == net.max_prefix_len(),
        _ => cidr_is_wholly_special(net),
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
            // AWS's IPv6 service addresses, twins of 169.254.169.{253,123,23}.
            ("169.254.169.253", Some(LinkLocal)),
            ("fd00:ec2::253", Some(LinkLocal)),
            ("169.254.169.123", Some(LinkLocal)),
            ("fd00:ec2::123", Some(LinkLocal)),
            ("169.254.169.23", Some(LinkLocal)),
            ("fd00:ec2::23", Some(LinkLocal)),
            ("fd00:ec2::ffff:ffff:ffff:ffff", Some(LinkLocal)),
            ("fd00:ec2:0:1::253", None),
            ("fd00:ec3::253", None),
            // 6to4: the IPv4 address in bits 16..48, whatever follows.
            ("2002:a9fe:a9fe::", Some(InstanceMetadata)),
            ("2002:a9fe:a9fe:1234:5678::9", Some(InstanceMetadata)),
            ("2002:7f00:1::", Some(Loopback)),
            ("2002:a9fe:a9fd::1", Some(LinkLocal)),
            ("2002:0:0::1", Some(Unspecified)),
            ("2002:c000:201::1", None),
            // Teredo: client IPv4 = last 32 bits inverted; server IPv4 in bits 32..64.
            ("2001:0:c000:201::5601:5601", Some(InstanceMetadata)),
            ("2001:0:c000:201::80ff:fffe", Some(Loopback)),
            ("2001:0:7f00:1::3fff:fdfe", Some(Loopback)), // server 127.0.0.1, client 192.0.2.1
            ("2001:0:c000:201::3fff:fdfe", None),         // both 192.0.2.1
            ("2001:db8::1", None),                        // documentation, not Teredo
            // NAT64 local-use /48: octets in bytes 6, 7, 9, 10; byte 8 is the u octet.
            ("64:ff9b:1:a9fe:a9:fe00::", Some(InstanceMetadata)),
            ("64:ff9b:1:7f00:1:100::", Some(Loopback)),
            ("64:ff9b:1:c000:2:100::", None),
            ("64:ff9b:1::", Some(Unspecified)),
            ("64:ff9b:2:a9fe:a9:fe00::", None),
        ];
        for (addr, want) in cases {
            assert_eq!(special_kind(ip(addr)), want, "{addr}");
        }
    }

    #[test]
    fn embedded_ipv4_forms() {
        use Ipv4Embedding::*;
        let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        for (addr, form, want, server) in [
            ("::ffff:192.0.2.1", Mapped, "192.0.2.1", None),
            ("::192.0.2.1", Compatible, "192.0.2.1", None),
            ("64:ff9b::192.0.2.1", Nat64, "192.0.2.1", None),
            ("64:ff9b:1:c000:2:100::", Nat64LocalUse, "192.0.2.1", None),
            (
                "64:ff9b:1:c000:ff02:1ff:ffff:ffff",
                Nat64LocalUse,
                "192.0.2.1",
                None,
            ),
            ("2002:c000:201::", SixToFour, "192.0.2.1", None),
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdfe",
                Teredo,
                "192.0.2.1",
                Some("65.54.227.120"),
            ),
        ] {
            let got = ipv4_embedding(&v6(addr)).unwrap();
            assert_eq!(got.form, form, "{addr}");
            assert_eq!(got.ipv4, v4(want), "{addr}");
            assert_eq!(got.teredo_server, server.map(v4), "{addr}");
            assert_eq!(embedded_ipv4(&v6(addr)), Some(v4(want)), "{addr}");
        }
        for plain in [
            "::",
            "::1",
            "2001:db8::1",
            "64:ff9b:0:1::1",
            "fd00:ec2::254",
            "2003::1",
        ] {
            assert_eq!(ipv4_embedding(&v6(plain)), None, "{plain}");
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
        assert!(k("fd00:ec2::/64"));
        assert!(!k("fd00:ec2::/63"));
        assert!(k("2002:7f00::/24"));
        assert!(!k("2002::/16"));
        assert!(!k("2001::/32"));
        assert!(!k("64:ff9b:1::/48"));
    }

    #[test]
    fn the_metadata_service_needs_an_entry_naming_it() {
        let allows =
            |s: &str| cidr_allows_special(&s.parse().unwrap(), SpecialKind::InstanceMetadata);
        assert!(allows("169.254.169.254/32"));
        assert!(allows("fd00:ec2::254/128"));
        assert!(!allows("169.254.0.0/16"));
        assert!(!allows("169.254.169.254/31"));
        assert!(!allows("fd00:ec2::/64"));
        assert!(!allows("2002:a9fe:a9fe::/48"));
        // Other link-local addresses only need a block of link-local space.
        let link_local = |s: &str| cidr_allows_special(&s.parse().unwrap(), SpecialKind::LinkLocal);
        assert!(link_local("169.254.0.0/16"));
        assert!(link_local("fd00:ec2::/64"));
        assert!(!link_local("0.0.0.0/0"));
    }

    #[test]
    fn ipv4_mapped_cidr_entries_are_stored_as_ipv4() {
        let p = |s: &str| s.parse::<HostPattern>().unwrap();
        assert_eq!(p("::ffff:10.0.0.0/104"), p("10.0.0.0/8"));
        assert_eq!(p("::ffff:192.0.2.7/128"), p("192.0.2.7/32"));
        assert_eq!(p("::ffff:0:0/96"), p("0.0.0.0/0"));
        // A block wider than the mapped space stays IPv6; so do other forms.
        assert!(matches!(
            p("::fffe:0:0/95"),
            HostPattern::Cidr(IpNet::V6(_))
        ));
        assert!(matches!(p("64:ff9b::/96"), HostPattern::Cidr(IpNet::V6(_))));
        assert!("::ffff:10.0.0.1/104"
            .parse::<HostPattern>()
            .unwrap_err()
            .contains("did you mean"));
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
