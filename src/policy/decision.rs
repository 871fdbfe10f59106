//! The allowlist decision: a pure function of (allowlist, requested host, DNS answers, destination).
//!
//! This module owns *whether* the proxy may connect to one IP address. It does no I/O: callers
//! resolve names and pass the answers in. Rules, in order:
//! 1. An IP entry equal to the address, with the remote port, allows it — even a special address.
//! 2. A CIDR entry containing the address allows it, but allows a special address (loopback,
//!    link-local, ...) only when the whole block is special space, and the instance metadata
//!    service only when the block is that one address (a /32 or /128).
//! 3. Any other special address is denied, whatever DNS said.
//! 4. A hostname entry equal to the requested host (a route's remote, a CONNECT target, a TLS
//!    server name), or a wildcard entry (`*.example.com`) matching it, allows every address it
//!    resolves to.
//! 5. A hostname entry whose own current resolution contains the address allows it (a wildcard
//!    entry has no one name to resolve, so it never vouches for an address).
//! 6. Everything else is denied.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::policy::allowlist::{Allowlist, Entry};
use ipnet::IpNet;

use crate::policy::host::{
    cidr_allows_special, special_kind, Host, HostName, HostPattern, SpecialKind,
};

/// Why an address may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowance {
    /// An IP or CIDR entry contains the address.
    Address(HostPattern),
    /// The hostname entry equal to the requested host.
    RemoteName(HostName),
    /// A wildcard entry matching the requested host (held as its suffix).
    Wildcard(HostName),
    /// A hostname entry whose current DNS answer contains the address.
    Resolution(HostName),
}

impl fmt::Display for Allowance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowance::Address(p) => write!(f, "allowlisted address {p}"),
            Allowance::RemoteName(n) => write!(f, "allowlisted name {n}"),
            Allowance::Wildcard(suffix) => write!(f, "allowlisted wildcard *.{suffix}"),
            Allowance::Resolution(n) => write!(f, "current address of allowlisted name {n}"),
        }
    }
}

/// Why an address may not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// A special address that no explicit IP or CIDR entry allows.
    Special(SpecialKind),
    /// No entry allows the address for this port.
    NotAllowlisted,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Special(kind) => write!(
                f,
                "{kind} address, allowed only by an explicit IP or CIDR entry"
            ),
            Denial::NotAllowlisted => f.write_str("no allowlist entry allows it"),
        }
    }
}

/// The current DNS answers of allowlisted host names (rule 5), keyed by name.
pub type Resolutions = HashMap<HostName, Vec<IpAddr>>;

/// One allowlist compiled for decisions (the top-level one, or one `enclaves:` entry's); a
/// connection decides with a [`Policy`] of one or more of them.
///
/// Decisions follow the rules above in file order (the first entry that allows an address is the
/// one an operator is shown), but never scan the list: each port's entries are indexed by
/// address, by prefix length and network, by name and by wildcard suffix, so a decision costs
/// about the same at 10 entries as at 100,000 (at most one hash lookup per prefix length in use).
#[derive(Clone, Debug)]
pub struct Rules {
    allowlist: Allowlist,
    ports: HashMap<u16, PortRules>,
}

/// One port's entries, as indexes into the allowlist (lower is earlier in the file).
#[derive(Clone, Debug, Default)]
struct PortRules {
    /// Rule 1: IP entries by address.
    ips: HashMap<IpAddr, usize>,
    /// Rule 2: CIDR entries of each address family.
    v4: Prefixes,
    v6: Prefixes,
    /// Rule 4: hostname entries by name, and wildcard entries by suffix.
    names: HashMap<HostName, usize>,
    wildcards: HashMap<String, (usize, HostName)>,
    /// Rule 5: the hostname entries in file order, and their distinct names sorted.
    resolvable: Vec<usize>,
    names_sorted: Vec<HostName>,
}

/// CIDR blocks of one address family: the first entry of each (prefix length, network).
#[derive(Clone, Debug, Default)]
struct Prefixes {
    /// The prefix lengths in use, so that a lookup tries only those.
    lengths: Vec<u8>,
    networks: HashMap<(u8, u128), usize>,
}

impl Prefixes {
    fn insert(&mut self, len: u8, network: u128, index: usize) {
        self.networks.entry((len, network)).or_insert(index);
        if let Err(at) = self.lengths.binary_search(&len) {
            self.lengths.insert(at, len);
        }
    }

    /// The entries whose block contains `bits` (an address `width` bits wide).
    fn containing(&self, bits: u128, width: u8) -> impl Iterator<Item = usize> + '_ {
        self.lengths.iter().filter_map(move |&len| {
            let mask = match len {
                0 => 0,
                _ => u128::MAX << (width - len),
            };
            self.networks.get(&(len, bits & mask)).copied()
        })
    }
}

fn family_bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

impl PortRules {
    fn add(&mut self, index: usize, pattern: &HostPattern) {
        match pattern {
            HostPattern::Ip(ip) => {
                self.ips.entry(ip.to_canonical()).or_insert(index);
            }
            HostPattern::Cidr(net) => {
                let (network, _) = family_bits(net.network());
                let table = match net {
                    IpNet::V4(_) => &mut self.v4,
                    IpNet::V6(_) => &mut self.v6,
                };
                table.insert(net.prefix_len(), network, index);
            }
            HostPattern::Name(name) => {
                self.names.entry(name.clone()).or_insert(index);
                self.resolvable.push(index);
                self.names_sorted.push(name.clone());
            }
            HostPattern::Wildcard(suffix) => {
                self.wildcards
                    .entry(suffix.as_str().to_owned())
                    .or_insert((index, suffix.clone()));
            }
        }
    }
}

impl Rules {
    /// Compiles `allowlist`, in time linear in its length.
    pub fn new(allowlist: Allowlist) -> Rules {
        let mut ports: HashMap<u16, PortRules> = HashMap::new();
        for (index, entry) in allowlist.entries.iter().enumerate() {
            ports
                .entry(entry.port)
                .or_default()
                .add(index, &entry.address);
        }
        for rules in ports.values_mut() {
            rules.names_sorted.sort();
            rules.names_sorted.dedup();
        }
        Rules { allowlist, ports }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.allowlist.entries
    }

    fn entries_for(&self, port: u16) -> impl Iterator<Item = &Entry> {
        self.allowlist
            .entries
            .iter()
            .filter(move |e| e.port == port)
    }

    /// Whether the requested host:port is allowed without any DNS answer: by a hostname entry equal to
    /// it, or (for an IP literal) by rules 1–3.
    pub fn allows_remote_statically(&self, remote: &Host, port: u16) -> bool {
        self.static_allowance(remote, port).is_some()
    }

    /// What allows the requested host:port without any DNS answer, if anything does.
    pub fn static_allowance(&self, remote: &Host, port: u16) -> Option<Allowance> {
        match remote {
            Host::Name(name) => self.name_allowance(name, port),
            Host::Ip(ip) => self.decide(remote, port, *ip, &Resolutions::new()).ok(),
        }
    }

    /// The hostname entry equal to `name`, or else the first wildcard entry matching it, for
    /// `port`.
    fn name_allowance(&self, name: &HostName, port: u16) -> Option<Allowance> {
        let rules = self.ports.get(&port)?;
        if rules.names.contains_key(name) {
            return Some(Allowance::RemoteName(name.clone()));
        }
        if rules.wildcards.is_empty() {
            return None;
        }
        // Each proper suffix after a dot (`b.c` and `c` of `a.b.c`) is a wildcard that could
        // match; the earliest entry among those present wins, as a scan in file order would.
        let text = name.as_str();
        text.match_indices('.')
            .filter(|(at, _)| *at > 0)
            .filter_map(|(at, _)| rules.wildcards.get(&text[at + 1..]))
            .filter(|(_, suffix)| name.matches_wildcard(suffix))
            .min_by_key(|(index, _)| *index)
            .map(|(_, suffix)| Allowance::Wildcard(suffix.clone()))
    }

    /// The ports for which an exact host-name entry or a wildcard entry allows `name`, in
    /// ascending order: empty when the allowlist does not allow the name by name. Costs one
    /// name lookup per port in use, whatever the allowlist's length.
    pub fn ports_allowing_name(&self, name: &HostName) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .ports
            .keys()
            .copied()
            .filter(|&port| self.name_allowance(name, port).is_some())
            .collect();
        ports.sort_unstable();
        ports
    }

    /// Whether a connection to `name` (allowed by name for `ports`, see
    /// [`Rules::ports_allowing_name`]) would be let through to `addr` for at least one of those
    /// ports: false for a special address (loopback, the metadata service, ...) that no IP or
    /// CIDR entry of those ports allows. What a DNS route may answer.
    pub fn would_connect(&self, name: &HostName, ports: &[u16], addr: IpAddr) -> bool {
        let host = Host::Name(name.clone());
        let none = Resolutions::new();
        ports
            .iter()
            .any(|&port| self.decide(&host, port, addr, &none).is_ok())
    }

    /// Whether a destination asked for per connection (an HTTP CONNECT target, a TLS server
    /// name) may be tried at all: a name needs a hostname or wildcard entry for `port`; an IP
    /// literal needs an IP or CIDR entry (rules 1–3; another name's DNS answer cannot vouch for
    /// an address the enclave chose). Every address is then decided by [`Rules::decide`].
    pub fn admits_request(&self, requested: &Host, port: u16) -> Result<Allowance, Denial> {
        match requested {
            Host::Name(name) => self
                .name_allowance(name, port)
                .ok_or(Denial::NotAllowlisted),
            Host::Ip(ip) => self.decide(requested, port, *ip, &Resolutions::new()),
        }
    }

    /// The entries with `port`, for telling an operator what the allowlist does allow.
    pub fn entries_with_port(&self, port: u16) -> Vec<&Entry> {
        self.entries_for(port).collect()
    }

    /// Host names whose resolution rule 5 may need to decide about addresses of `remote`:
    /// the hostname entries with `port`, other than the requested host itself.
    pub fn names_to_resolve(&self, remote: &Host, port: u16) -> Vec<HostName> {
        let Some(rules) = self.ports.get(&port) else {
            return Vec::new();
        };
        rules
            .names_sorted
            .iter()
            .filter(|n| !matches!(remote, Host::Name(r) if r == *n))
            .cloned()
            .collect()
    }

    /// The index of the entry that gave `allowance` for `port` (to show an operator which
    /// entries a route relies on).
    pub fn entry_for(&self, allowance: &Allowance, port: u16) -> Option<usize> {
        self.allowlist.entries.iter().position(|e| {
            e.port == port
                && match (allowance, &e.address) {
                    (Allowance::Address(p), a) => p == a,
                    (Allowance::RemoteName(n) | Allowance::Resolution(n), HostPattern::Name(a)) => {
                        n == a
                    }
                    (Allowance::Wildcard(s), HostPattern::Wildcard(a)) => s == a,
                    _ => false,
                }
        })
    }

    /// The first IP or CIDR entry for the port that allows `addr` by rules 1 and 2.
    fn address_entry(
        &self,
        rules: &PortRules,
        addr: IpAddr,
        special: Option<SpecialKind>,
    ) -> Option<usize> {
        let exact = rules.ips.get(&addr).copied();
        let (bits, width) = family_bits(addr);
        let table = match addr {
            IpAddr::V4(_) => &rules.v4,
            IpAddr::V6(_) => &rules.v6,
        };
        let block = table
            .containing(bits, width)
            .filter(
                |&index| match (&self.allowlist.entries[index].address, special) {
                    (_, None) => true,
                    (HostPattern::Cidr(net), Some(kind)) => cidr_allows_special(net, kind),
                    _ => false,
                },
            )
            .min();
        exact.into_iter().chain(block).min()
    }

    /// Decides whether the proxy may connect to `addr`:`port` on behalf of `remote`.
    pub fn decide(
        &self,
        remote: &Host,
        port: u16,
        addr: IpAddr,
        resolutions: &Resolutions,
    ) -> Result<Allowance, Denial> {
        let addr = addr.to_canonical();
        let special = special_kind(addr);
        let rules = self.ports.get(&port);
        if let Some(index) = rules.and_then(|rules| self.address_entry(rules, addr, special)) {
            return Ok(Allowance::Address(
                self.allowlist.entries[index].address.clone(),
            ));
        }
        if let Some(kind) = special {
            return Err(Denial::Special(kind));
        }
        if let Host::Name(name) = remote {
            if let Some(allowance) = self.name_allowance(name, port) {
                return Ok(allowance);
            }
        }
        let Some(rules) = rules else {
            return Err(Denial::NotAllowlisted);
        };
        for &index in &rules.resolvable {
            if let HostPattern::Name(name) = &self.allowlist.entries[index].address {
                let contains = resolutions
                    .get(name)
                    .is_some_and(|ips| ips.iter().any(|ip| ip.to_canonical() == addr));
                if contains {
                    return Ok(Allowance::Resolution(name.clone()));
                }
            }
        }
        Err(Denial::NotAllowlisted)
    }
}

/// What one connection may reach: the top-level allowlist and the allowlists of the
/// `enclaves:` entries its peer matched (see [`crate::policy::enclaves`]), decided as the union
/// of their entries. Each rule above holds for the union exactly when it holds for one of the
/// parts (a rule is a test of one entry, and whether an address is special does not depend on
/// the allowlist), so a decision is the first part's allowance, or, when none allows, the one
/// denial every part gives. Cheap to build: the parts are shared.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The top-level allowlist first, then the matched entries' in file order; never empty.
    parts: Vec<Arc<Rules>>,
}

impl Policy {
    /// `allowlist` alone (no `enclaves:`).
    pub fn new(allowlist: Allowlist) -> Policy {
        Policy::from_parts(vec![Arc::new(Rules::new(allowlist))])
    }

    /// The union of `parts`; the first is the top-level allowlist.
    pub fn from_parts(parts: Vec<Arc<Rules>>) -> Policy {
        let parts = if parts.is_empty() {
            vec![Arc::new(Rules::new(Allowlist::default()))]
        } else {
            parts
        };
        Policy { parts }
    }

    /// The top-level allowlist's entries (indexes in start-up's route checks refer to them).
    pub fn entries(&self) -> &[Entry] {
        self.parts[0].entries()
    }

    /// Every entry of every part, top-level first: what this connection may reach.
    pub fn all_entries(&self) -> impl Iterator<Item = &Entry> {
        self.parts.iter().flat_map(|p| p.entries().iter())
    }

    /// See [`Rules::allows_remote_statically`].
    pub fn allows_remote_statically(&self, remote: &Host, port: u16) -> bool {
        self.static_allowance(remote, port).is_some()
    }

    /// See [`Rules::static_allowance`].
    pub fn static_allowance(&self, remote: &Host, port: u16) -> Option<Allowance> {
        self.parts
            .iter()
            .find_map(|p| p.static_allowance(remote, port))
    }

    /// See [`Rules::ports_allowing_name`]: over every part.
    pub fn ports_allowing_name(&self, name: &HostName) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .parts
            .iter()
            .flat_map(|p| p.ports_allowing_name(name))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// See [`Rules::would_connect`].
    pub fn would_connect(&self, name: &HostName, ports: &[u16], addr: IpAddr) -> bool {
        let host = Host::Name(name.clone());
        let none = Resolutions::new();
        ports
            .iter()
            .any(|&port| self.decide(&host, port, addr, &none).is_ok())
    }

    /// See [`Rules::admits_request`].
    pub fn admits_request(&self, requested: &Host, port: u16) -> Result<Allowance, Denial> {
        let mut denial = Denial::NotAllowlisted;
        for part in &self.parts {
            match part.admits_request(requested, port) {
                Ok(allowance) => return Ok(allowance),
                Err(d) => denial = d,
            }
        }
        Err(denial)
    }

    /// The entries with `port` in every part, for telling an operator what is allowed.
    pub fn entries_with_port(&self, port: u16) -> Vec<&Entry> {
        self.parts
            .iter()
            .flat_map(|p| p.entries_with_port(port))
            .collect()
    }

    /// See [`Rules::names_to_resolve`]: over every part, each name once.
    pub fn names_to_resolve(&self, remote: &Host, port: u16) -> Vec<HostName> {
        if self.parts.len() == 1 {
            return self.parts[0].names_to_resolve(remote, port);
        }
        let mut names: Vec<HostName> = self
            .parts
            .iter()
            .flat_map(|p| p.names_to_resolve(remote, port))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The index in the top-level allowlist of the entry that gave `allowance` (see
    /// [`Rules::entry_for`]).
    pub fn entry_for(&self, allowance: &Allowance, port: u16) -> Option<usize> {
        self.parts[0].entry_for(allowance, port)
    }

    /// See [`Rules::decide`]: the first part's allowance, else the denial.
    pub fn decide(
        &self,
        remote: &Host,
        port: u16,
        addr: IpAddr,
        resolutions: &Resolutions,
    ) -> Result<Allowance, Denial> {
        let mut denial = Denial::NotAllowlisted;
        for part in &self.parts {
            match part.decide(remote, port, addr, resolutions) {
                Ok(allowance) => return Ok(allowance),
                Err(d) => denial = d,
            }
        }
        Err(denial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The rules as a scan of the entries in file order: the definition the index must match.
    fn linear_decide(
        entries: &[Entry],
        remote: &Host,
        port: u16,
        addr: IpAddr,
        resolutions: &Resolutions,
    ) -> Result<Allowance, Denial> {
        let addr = addr.to_canonical();
        let special = special_kind(addr);
        let for_port = || entries.iter().filter(|e| e.port == port);
        for entry in for_port() {
            match &entry.address {
                HostPattern::Ip(ip) if ip.to_canonical() == addr => {
                    return Ok(Allowance::Address(entry.address.clone()))
                }
                HostPattern::Cidr(net)
                    if net.contains(&addr)
                        && special.is_none_or(|kind| cidr_allows_special(net, kind)) =>
                {
                    return Ok(Allowance::Address(entry.address.clone()))
                }
                _ => {}
            }
        }
        if let Some(kind) = special {
            return Err(Denial::Special(kind));
        }
        if let Host::Name(name) = remote {
            if for_port().any(|e| matches!(&e.address, HostPattern::Name(n) if n == name)) {
                return Ok(Allowance::RemoteName(name.clone()));
            }
            if let Some(w) = for_port().find_map(|e| match &e.address {
                HostPattern::Wildcard(suffix) if name.matches_wildcard(suffix) => {
                    Some(Allowance::Wildcard(suffix.clone()))
                }
                _ => None,
            }) {
                return Ok(w);
            }
        }
        for entry in for_port() {
            if let HostPattern::Name(name) = &entry.address {
                if resolutions
                    .get(name)
                    .is_some_and(|ips| ips.iter().any(|ip| ip.to_canonical() == addr))
                {
                    return Ok(Allowance::Resolution(name.clone()));
                }
            }
        }
        Err(Denial::NotAllowlisted)
    }

    const PATTERNS: &[&str] = &[
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.3",
        "10.1.2.3/32",
        "0.0.0.0/0",
        "127.0.0.0/8",
        "127.0.0.1",
        "169.254.0.0/16",
        "169.254.169.254/32",
        "169.254.169.254",
        "::/0",
        "2001:db8::/32",
        "2001:db8::1",
        "::1",
        "::1/128",
        "fd00::/8",
        "::ffff:10.1.0.0/112",
        "a.example",
        "b.a.example",
        "*.example",
        "*.a.example",
        "*.b.a.example",
        "c.example",
    ];
    const ADDRESSES: &[&str] = &[
        "10.1.2.3",
        "10.1.9.9",
        "10.200.0.1",
        "127.0.0.1",
        "169.254.169.254",
        "169.254.1.1",
        "2001:db8::1",
        "2001:db8::2",
        "::1",
        "fd00::5",
        "::ffff:10.1.2.3",
        "192.0.2.7",
    ];
    const REMOTES: &[&str] = &[
        "a.example",
        "b.a.example",
        "x.b.a.example",
        "c.example",
        "example",
        "10.1.2.3",
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// The indexed decision equals the scan in file order, allowance (which entry) included.
        #[test]
        fn the_index_decides_as_a_scan_in_file_order(
            picks in proptest::collection::vec((0..PATTERNS.len(), proptest::bool::ANY), 0..14),
            addr in 0..ADDRESSES.len(),
            remote_pick in 0..REMOTES.len(),
            port_443 in proptest::bool::ANY,
            resolved in proptest::collection::vec((0..PATTERNS.len(), 0..ADDRESSES.len()), 0..4),
        ) {
            let entries: Vec<Entry> = picks
                .iter()
                .map(|&(p, on_443)| Entry {
                    address: PATTERNS[p].parse().unwrap(),
                    port: if on_443 { 443 } else { 80 },
                })
                .collect();
            let policy = Rules::new(Allowlist { entries: entries.clone() });
            let port = if port_443 { 443 } else { 80 };
            let remote = remote(REMOTES[remote_pick]);
            let mut resolutions = Resolutions::new();
            for (p, a) in resolved {
                if let Ok(HostPattern::Name(n)) = PATTERNS[p].parse::<HostPattern>() {
                    resolutions.entry(n).or_default().push(ip(ADDRESSES[a]));
                }
            }
            let addr = ip(ADDRESSES[addr]);
            proptest::prop_assert_eq!(
                policy.decide(&remote, port, addr, &resolutions),
                linear_decide(&entries, &remote, port, addr, &resolutions)
            );
        }
    }

    fn policy(yaml: &str) -> Rules {
        Rules::new(
            crate::config::parse(yaml, Path::new("test.yaml"))
                .unwrap()
                .allowlist,
        )
    }

    fn name(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    fn remote(s: &str) -> Host {
        Host::parse(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn none() -> Resolutions {
        Resolutions::new()
    }

    #[test]
    fn remote_name_allows_its_addresses_on_its_port_only() {
        let p = policy("allowlist:\n- {address: API.example.com., port: 443}\n");
        let r = remote("api.EXAMPLE.com");
        assert!(p.allows_remote_statically(&r, 443));
        assert!(!p.allows_remote_statically(&r, 80));
        assert_eq!(
            p.decide(&r, 443, ip("192.0.2.10"), &none()),
            Ok(Allowance::RemoteName(name("api.example.com")))
        );
        assert_eq!(
            p.decide(&r, 80, ip("192.0.2.10"), &none()),
            Err(Denial::NotAllowlisted)
        );
        let other = remote("other.example.com");
        assert!(!p.allows_remote_statically(&other, 443));
        assert_eq!(
            p.decide(&other, 443, ip("192.0.2.10"), &none()),
            Err(Denial::NotAllowlisted)
        );
    }

    #[test]
    fn name_allowance_never_covers_special_addresses() {
        let p = policy("allowlist:\n- {address: api.example.com, port: 443}\n");
        let r = remote("api.example.com");
        for (addr, kind) in [
            ("169.254.169.254", SpecialKind::InstanceMetadata),
            ("::ffff:169.254.169.254", SpecialKind::InstanceMetadata),
            ("fd00:ec2::254", SpecialKind::InstanceMetadata),
            ("127.0.0.1", SpecialKind::Loopback),
            ("::1", SpecialKind::Loopback),
            ("::ffff:127.0.0.5", SpecialKind::Loopback),
            ("169.254.10.10", SpecialKind::LinkLocal),
            ("fe80::1", SpecialKind::LinkLocal),
            ("0.0.0.0", SpecialKind::Unspecified),
            ("::", SpecialKind::Unspecified),
            ("239.1.1.1", SpecialKind::Multicast),
            ("255.255.255.255", SpecialKind::Broadcast),
        ] {
            assert_eq!(
                p.decide(&r, 443, ip(addr), &none()),
                Err(Denial::Special(kind)),
                "{addr}"
            );
        }
    }

    #[test]
    fn explicit_ip_or_special_cidr_allows_special_addresses() {
        let p = policy(
            "allowlist:\n- {address: api.example.com, port: 443}\n\
             - {address: 127.0.0.2, port: 443}\n- {address: 169.254.169.254, port: 80}\n\
             - {address: 127.0.1.0/24, port: 443}\n",
        );
        let r = remote("api.example.com");
        assert!(p.decide(&r, 443, ip("127.0.0.2"), &none()).is_ok());
        assert!(p.decide(&r, 443, ip("::ffff:127.0.0.2"), &none()).is_ok());
        assert!(p.decide(&r, 443, ip("127.0.1.77"), &none()).is_ok());
        assert_eq!(
            p.decide(&r, 443, ip("127.0.0.3"), &none()),
            Err(Denial::Special(SpecialKind::Loopback))
        );
        assert!(p.decide(&r, 80, ip("169.254.169.254"), &none()).is_ok());
        assert!(p.decide(&r, 443, ip("169.254.169.254"), &none()).is_err());
    }

    #[test]
    fn link_local_cidr_opens_aws_services_but_not_the_metadata_service() {
        let p = policy(
            "allowlist:\n- {address: 169.254.0.0/16, port: 53}\n- {address: 'fd00:ec2::/64', port: 53}\n\
             - {address: 169.254.169.254/32, port: 80}\n- {address: 'fd00:ec2::254', port: 80}\n",
        );
        let r = remote("api.example.com");
        for twin in [
            "169.254.169.253",
            "fd00:ec2::253",
            "169.254.169.123",
            "fd00:ec2::123",
        ] {
            assert!(p.decide(&r, 53, ip(twin), &none()).is_ok(), "{twin}");
        }
        for metadata in ["169.254.169.254", "fd00:ec2::254"] {
            assert_eq!(
                p.decide(&r, 53, ip(metadata), &none()),
                Err(Denial::Special(SpecialKind::InstanceMetadata)),
                "{metadata}"
            );
            assert!(
                p.decide(&r, 80, ip(metadata), &none()).is_ok(),
                "{metadata}"
            );
        }
    }

    #[test]
    fn embedded_special_addresses_are_denied_like_their_ipv4() {
        let p = policy(
            "allowlist:\n- {address: api.example.com, port: 443}\n- {address: '::/0', port: 443}\n",
        );
        let r = remote("api.example.com");
        for (addr, kind) in [
            ("2002:a9fe:a9fe::1", SpecialKind::InstanceMetadata),
            ("2001:0:c000:201::5601:5601", SpecialKind::InstanceMetadata),
            ("64:ff9b:1:a9fe:a9:fe00::", SpecialKind::InstanceMetadata),
            ("2002:7f00:1::", SpecialKind::Loopback),
            ("fd00:ec2::253", SpecialKind::LinkLocal),
        ] {
            assert_eq!(
                p.decide(&r, 443, ip(addr), &none()),
                Err(Denial::Special(kind)),
                "{addr}"
            );
        }
        assert!(p.decide(&r, 443, ip("2002:c000:201::1"), &none()).is_ok());
    }

    #[test]
    fn ipv4_mapped_cidr_entry_allows_the_ipv4_block() {
        let p = policy("allowlist:\n- {address: '::ffff:198.51.100.0/120', port: 443}\n");
        let r = remote("api.example.com");
        assert!(p.decide(&r, 443, ip("198.51.100.7"), &none()).is_ok());
        assert!(p
            .decide(&r, 443, ip("::ffff:198.51.100.7"), &none())
            .is_ok());
        assert_eq!(
            p.decide(&r, 443, ip("198.51.101.7"), &none()),
            Err(Denial::NotAllowlisted)
        );
        assert!(p.allows_remote_statically(&remote("198.51.100.9"), 443));
    }

    #[test]
    fn broad_cidr_does_not_open_special_addresses() {
        let p = policy(
            "allowlist:\n- {address: 0.0.0.0/0, port: 443}\n- {address: '::/0', port: 443}\n",
        );
        let r = remote("api.example.com");
        assert!(p.decide(&r, 443, ip("52.94.1.1"), &none()).is_ok());
        assert!(p.decide(&r, 443, ip("2600:1f18::1"), &none()).is_ok());
        assert_eq!(
            p.decide(&r, 443, ip("169.254.169.254"), &none()),
            Err(Denial::Special(SpecialKind::InstanceMetadata))
        );
        assert_eq!(
            p.decide(&r, 443, ip("127.0.0.1"), &none()),
            Err(Denial::Special(SpecialKind::Loopback))
        );
        assert_eq!(
            p.decide(&r, 443, ip("::ffff:127.0.0.1"), &none()),
            Err(Denial::Special(SpecialKind::Loopback))
        );
    }

    #[test]
    fn ip_and_cidr_entries() {
        let p = policy("allowlist:\n- {address: 192.0.2.7, port: 443}\n- {address: 198.51.100.0/24, port: 443}\n");
        let r = remote("api.example.com");
        assert!(!p.allows_remote_statically(&r, 443));
        assert_eq!(
            p.decide(&r, 443, ip("192.0.2.7"), &none()),
            Ok(Allowance::Address("192.0.2.7".parse().unwrap()))
        );
        assert!(p.decide(&r, 443, ip("198.51.100.200"), &none()).is_ok());
        assert!(p
            .decide(&r, 443, ip("::ffff:198.51.100.200"), &none())
            .is_ok());
        assert_eq!(
            p.decide(&r, 443, ip("192.0.2.8"), &none()),
            Err(Denial::NotAllowlisted)
        );
        assert_eq!(
            p.decide(&r, 8443, ip("192.0.2.7"), &none()),
            Err(Denial::NotAllowlisted)
        );
        let literal = remote("192.0.2.7");
        assert!(p.allows_remote_statically(&literal, 443));
        assert!(!p.allows_remote_statically(&remote("192.0.2.9"), 443));
    }

    #[test]
    fn other_hostname_entries_allow_by_their_current_resolution() {
        let p = policy(
            "allowlist:\n- {address: a.example.com, port: 443}\n- {address: b.example.com, port: 443}\n\
             - {address: c.example.com, port: 80}\n",
        );
        let r = remote("alias.example.net");
        assert_eq!(
            p.names_to_resolve(&r, 443),
            vec![name("a.example.com"), name("b.example.com")]
        );
        assert_eq!(
            p.names_to_resolve(&remote("a.example.com"), 443),
            vec![name("b.example.com")]
        );
        let mut res = Resolutions::new();
        res.insert(
            name("b.example.com"),
            vec![ip("192.0.2.20"), ip("169.254.169.254")],
        );
        res.insert(name("c.example.com"), vec![ip("192.0.2.30")]);
        assert_eq!(
            p.decide(&r, 443, ip("192.0.2.20"), &res),
            Ok(Allowance::Resolution(name("b.example.com")))
        );
        // c.example.com is allowlisted for another port only.
        assert_eq!(
            p.decide(&r, 443, ip("192.0.2.30"), &res),
            Err(Denial::NotAllowlisted)
        );
        // An allowlisted name resolving to a special address does not make it allowed.
        assert_eq!(
            p.decide(&r, 443, ip("169.254.169.254"), &res),
            Err(Denial::Special(SpecialKind::InstanceMetadata))
        );
    }

    #[test]
    fn remote_parse_rejects_cidr() {
        assert!(Host::parse("10.0.0.0/8").is_err());
        assert_eq!(
            Host::parse("::ffff:10.0.0.1").unwrap(),
            Host::Ip(ip("10.0.0.1"))
        );
    }

    #[test]
    fn wildcards_allow_names_never_addresses_and_never_their_suffix() {
        let p = policy("allowlist:\n- {address: '*.s3.example.com', port: 443}\n- {address: 192.0.2.0/24, port: 443}\n");
        let bucket = remote("my-bucket.s3.example.com");
        assert_eq!(
            p.admits_request(&bucket, 443),
            Ok(Allowance::Wildcard(name("s3.example.com")))
        );
        assert_eq!(
            p.entry_for(&Allowance::Wildcard(name("s3.example.com")), 443),
            Some(0)
        );
        assert_eq!(
            p.decide(&bucket, 443, ip("198.51.100.7"), &none()),
            Ok(Allowance::Wildcard(name("s3.example.com")))
        );
        // ...but never a special address, never another port, never the suffix itself.
        assert_eq!(
            p.decide(&bucket, 443, ip("169.254.169.254"), &none()),
            Err(Denial::Special(SpecialKind::InstanceMetadata))
        );
        assert_eq!(p.admits_request(&bucket, 80), Err(Denial::NotAllowlisted));
        assert_eq!(
            p.admits_request(&remote("s3.example.com"), 443),
            Err(Denial::NotAllowlisted)
        );
        assert!(p.names_to_resolve(&remote("other.example"), 443).is_empty());
        // An IP literal asked for per connection needs an IP or CIDR entry.
        assert!(p.admits_request(&remote("192.0.2.9"), 443).is_ok());
        let named = policy("allowlist:\n- {address: api.example, port: 443}\n");
        assert_eq!(
            named.admits_request(&remote("192.0.2.9"), 443),
            Err(Denial::NotAllowlisted)
        );
    }
}
