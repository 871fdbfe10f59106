//! Name resolution for the policy: one shared, TTL-respecting hickory resolver.
//!
//! This module owns how names become addresses: which name servers are asked (`--nameserver`
//! or the system's `/etc/resolv.conf` and `/etc/hosts`), which address families (`-4`/`-6`),
//! their order (IPv4 before IPv6 by default) and how long answers are cached (their TTL; a
//! negative answer at most [`NEGATIVE_TTL_CAP`]). Lookups are absolute names: the search list
//! never turns `api.example.com` into `api.example.com.corp.internal`.
//!
//! With the system configuration, a name listed in `/etc/hosts` (read at start-up) is answered
//! from that file alone, as glibc's "files before dns" does: a name with only an IPv4 line is not
//! also sent to DNS for its IPv6 address, which would wait out the timeout when DNS is down.
//!
//! A failed lookup keeps its kind ([`DnsFailure`]: no such name, no address, timeout, other
//! error), classified from hickory's error types: start-up tells a misspelt remote (a
//! configuration error) from a DNS outage by it, and metrics count lookups by its label.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::{Hosts, TokioResolver};

use crate::policy::host::HostName;

/// How long an answer from `/etc/hosts` is said to be valid (the file has no TTLs; it is read
/// at start-up).
pub const HOSTS_TTL: Duration = Duration::from_secs(300);

/// The longest a "no such name" or "no address" answer is believed.
pub const NEGATIVE_TTL_CAP: Duration = Duration::from_secs(10);

/// Which address families to resolve, in which order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Family {
    /// IPv4 first, then IPv6.
    #[default]
    Both,
    V4Only,
    V6Only,
}

/// How the resolver is set up.
#[derive(Clone, Debug, Default)]
pub struct DnsSettings {
    /// Explicit name servers; empty means the system configuration.
    pub nameservers: Vec<SocketAddr>,
    pub family: Family,
    /// Time to wait for one answer from one server (hickory's default when `None`).
    pub timeout: Option<Duration>,
}

/// A cloneable handle to the shared resolver and its cache.
#[derive(Clone)]
pub struct Dns {
    resolver: TokioResolver,
    family: Family,
    /// `/etc/hosts`, with the system configuration only.
    hosts: Option<Arc<Hosts>>,
}

/// What kind of failure a lookup was: whether DNS said the name has no address, or could not
/// answer at all. Start-up treats the first as a configuration error and the second as an outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsFailure {
    /// The name does not exist (response code NXDOMAIN).
    NxDomain,
    /// The name exists but has no address of a family asked for (NOERROR with no A/AAAA).
    NoRecords,
    /// No name server answered in time.
    Timeout,
    /// Anything else: SERVFAIL, REFUSED, a refused connection, a malformed answer, ...
    Error,
}

impl DnsFailure {
    /// A stable label for metrics and structured logs: "nxdomain", "no_records", "timeout" or
    /// "error".
    pub fn label(&self) -> &'static str {
        match self {
            DnsFailure::NxDomain => "nxdomain",
            DnsFailure::NoRecords => "no_records",
            DnsFailure::Timeout => "timeout",
            DnsFailure::Error => "error",
        }
    }

    /// Whether DNS answered that the name has no address (rather than failing to answer): the
    /// same answer will come again, so at start-up it is a configuration error.
    pub fn is_negative_answer(&self) -> bool {
        matches!(self, DnsFailure::NxDomain | DnsFailure::NoRecords)
    }

    /// Classifies a resolver error by its type, never by its message text.
    pub fn of(error: &NetError) -> DnsFailure {
        match error {
            NetError::Dns(DnsError::NoRecordsFound(no_records)) => {
                if no_records.response_code == ResponseCode::NXDomain {
                    DnsFailure::NxDomain
                } else {
                    DnsFailure::NoRecords
                }
            }
            NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain)) => DnsFailure::NxDomain,
            NetError::Timeout => DnsFailure::Timeout,
            NetError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => DnsFailure::Timeout,
            _ => DnsFailure::Error,
        }
    }
}

/// A failed lookup, ready for a log line.
#[derive(Debug, thiserror::Error)]
#[error("DNS lookup of {name} failed: {}", describe(*.kind, reason))]
pub struct LookupError {
    pub name: HostName,
    pub kind: DnsFailure,
    /// The resolver's own words, for the cases where they help (timeouts, errors).
    pub reason: String,
}

/// The operator-facing text of a failure: a negative answer is said plainly (the resolver's text
/// for it is a debug dump of the query); an outage or error keeps the resolver's detail.
fn describe(kind: DnsFailure, reason: &str) -> String {
    match kind {
        DnsFailure::NxDomain => "the name does not exist (NXDOMAIN)".to_owned(),
        DnsFailure::NoRecords => format!("the name exists but {reason}"),
        DnsFailure::Timeout => format!("no name server answered in time ({reason})"),
        DnsFailure::Error => reason.to_owned(),
    }
}

impl Dns {
    /// Builds the resolver. Fails only when the system configuration cannot be read.
    pub fn new(settings: &DnsSettings) -> Result<Dns, String> {
        let provider = TokioRuntimeProvider::default();
        let mut hosts = None;
        let mut builder = if settings.nameservers.is_empty() {
            let b = TokioResolver::builder(provider).map_err(|e| {
                format!("cannot read the system DNS configuration (/etc/resolv.conf): {e}; pass --nameserver IP")
            })?;
            match Hosts::from_system() {
                Ok(h) => hosts = Some(Arc::new(h)),
                Err(e) => tracing::warn!("cannot read /etc/hosts ({e}); using DNS only"),
            }
            b
        } else {
            let servers = settings
                .nameservers
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for conn in &mut ns.connections {
                        conn.port = addr.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        // /etc/hosts is consulted by `lookup` itself, whole names at a time.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = match settings.family {
            Family::Both => LookupIpStrategy::Ipv4AndIpv6,
            Family::V4Only => LookupIpStrategy::Ipv4Only,
            Family::V6Only => LookupIpStrategy::Ipv6Only,
        };
        opts.negative_max_ttl = Some(NEGATIVE_TTL_CAP);
        if let Some(t) = settings.timeout {
            opts.timeout = t;
            opts.attempts = 1;
        }
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot build the DNS resolver: {e}"))?;
        Ok(Dns {
            resolver,
            family: settings.family,
            hosts,
        })
    }

    /// The addresses `name` has now (from cache while its TTL lasts), IPv4 before IPv6, without
    /// duplicates. An empty answer is an error: there is nothing to connect to. Each lookup is
    /// counted in `nitro_vsock_proxy_dns_lookups_total{result}`.
    pub async fn lookup(&self, name: &HostName) -> Result<Vec<IpAddr>, LookupError> {
        self.lookup_with_ttl(name).await.map(|(ips, _)| ips)
    }

    /// [`Dns::lookup`] and how long the answer stays valid: the cache entry's remaining TTL (the
    /// shortest of the records', hickory's own accounting), [`HOSTS_TTL`] for `/etc/hosts`.
    pub async fn lookup_with_ttl(
        &self,
        name: &HostName,
    ) -> Result<(Vec<IpAddr>, Duration), LookupError> {
        let result = self.lookup_uncounted(name).await;
        crate::ops::metrics::global().dns_lookup(match &result {
            Ok(_) => "ok",
            Err(e) => e.kind.label(),
        });
        result
    }

    async fn lookup_uncounted(
        &self,
        name: &HostName,
    ) -> Result<(Vec<IpAddr>, Duration), LookupError> {
        let fail = |kind: DnsFailure, reason: String| LookupError {
            name: name.clone(),
            kind,
            reason,
        };
        let fqdn = Name::from_ascii(format!("{name}."))
            .map_err(|e| fail(DnsFailure::Error, e.to_string()))?;
        let (answer, ttl): (Vec<IpAddr>, Duration) = match self.hosts_answer(&fqdn) {
            Some(ips) => (ips, HOSTS_TTL),
            None => {
                let lookup = self.resolver.lookup_ip(fqdn).await.map_err(|e| {
                    let kind = DnsFailure::of(&e);
                    let reason = match kind {
                        DnsFailure::NoRecords => self.no_address_records().to_owned(),
                        _ => e.to_string(),
                    };
                    fail(kind, reason)
                })?;
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                (lookup.iter().collect(), ttl)
            }
        };
        let mut ips: Vec<IpAddr> = Vec::new();
        for ip in answer {
            let ip = ip.to_canonical();
            let wanted = match self.family {
                Family::Both => true,
                Family::V4Only => ip.is_ipv4(),
                Family::V6Only => ip.is_ipv6(),
            };
            if wanted && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        // Stable: keeps the server's order within each family.
        ips.sort_by_key(|ip| ip.is_ipv6());
        if ips.is_empty() {
            return Err(fail(
                DnsFailure::NoRecords,
                self.no_address_records().to_owned(),
            ));
        }
        Ok((ips, ttl))
    }

    /// What "no records" means for the families asked for.
    fn no_address_records(&self) -> &'static str {
        match self.family {
            Family::Both => "has no address records (A or AAAA)",
            Family::V4Only => "has no IPv4 address records (A; -4 was given)",
            Family::V6Only => "has no IPv6 address records (AAAA; -6 was given)",
        }
    }

    /// Every address `/etc/hosts` lists for `fqdn`, if it lists the name at all.
    fn hosts_answer(&self, fqdn: &Name) -> Option<Vec<IpAddr>> {
        let hosts = self.hosts.as_ref()?;
        let ips: Vec<IpAddr> = [RecordType::A, RecordType::AAAA]
            .into_iter()
            .filter_map(|rt| hosts.lookup_static_host(&Query::query(fqdn.clone(), rt)))
            .flat_map(|lookup| {
                lookup
                    .answers()
                    .iter()
                    .filter_map(|r| r.data.ip_addr())
                    .collect::<Vec<_>>()
            })
            .collect();
        (!ips.is_empty()).then_some(ips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::net::NoRecords;

    fn no_records(code: ResponseCode) -> NetError {
        let query = Query::query(Name::from_ascii("typo.example.").unwrap(), RecordType::A);
        NetError::from(NoRecords::new(query, code))
    }

    #[test]
    fn failures_are_classified_by_error_type() {
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let cases = [
            (no_records(ResponseCode::NXDomain), DnsFailure::NxDomain),
            (no_records(ResponseCode::NoError), DnsFailure::NoRecords),
            (
                NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain)),
                DnsFailure::NxDomain,
            ),
            (NetError::Timeout, DnsFailure::Timeout),
            (NetError::from(timed_out), DnsFailure::Timeout),
            (
                NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)),
                DnsFailure::Error,
            ),
            (
                NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)),
                DnsFailure::Error,
            ),
            (NetError::from(refused), DnsFailure::Error),
            (NetError::NoConnections, DnsFailure::Error),
            // A message that merely mentions a timeout is not one.
            (
                NetError::from("request timed out".to_owned()),
                DnsFailure::Error,
            ),
        ];
        for (error, want) in cases {
            assert_eq!(DnsFailure::of(&error), want, "{error:?}");
        }
    }

    #[test]
    fn labels_are_the_metric_values() {
        let labels: Vec<&str> = [
            DnsFailure::NxDomain,
            DnsFailure::NoRecords,
            DnsFailure::Timeout,
            DnsFailure::Error,
        ]
        .iter()
        .map(DnsFailure::label)
        .collect();
        assert_eq!(labels, ["nxdomain", "no_records", "timeout", "error"]);
        assert!(DnsFailure::NxDomain.is_negative_answer());
        assert!(DnsFailure::NoRecords.is_negative_answer());
        assert!(!DnsFailure::Timeout.is_negative_answer());
        assert!(!DnsFailure::Error.is_negative_answer());
    }

    #[test]
    fn messages_say_what_happened() {
        let e = |kind, reason: &str| {
            LookupError {
                name: HostName::parse("typo.example").unwrap(),
                kind,
                reason: reason.into(),
            }
            .to_string()
        };
        assert_eq!(
            e(DnsFailure::NxDomain, "no records found for Query { .. }"),
            "DNS lookup of typo.example failed: the name does not exist (NXDOMAIN)"
        );
        assert_eq!(
            e(DnsFailure::NoRecords, "has no address records (A or AAAA)"),
            "DNS lookup of typo.example failed: the name exists but has no address records (A or AAAA)"
        );
        assert!(e(DnsFailure::Timeout, "request timed out").contains("in time (request timed out)"));
        assert!(e(DnsFailure::Error, "error response: SERVFAIL").ends_with("SERVFAIL"));
    }
}
