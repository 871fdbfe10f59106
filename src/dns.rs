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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::Query;
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::{Hosts, TokioResolver};

use crate::host::HostName;

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

/// A failed lookup, ready for a log line.
#[derive(Debug, thiserror::Error)]
#[error("DNS lookup of {name} failed: {reason}")]
pub struct LookupError {
    pub name: HostName,
    pub reason: String,
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
        let result = self.lookup_uncounted(name).await;
        crate::metrics::global().dns_lookup(match &result {
            Ok(_) => "ok",
            Err(_) => "error",
        });
        result
    }

    async fn lookup_uncounted(&self, name: &HostName) -> Result<Vec<IpAddr>, LookupError> {
        let fail = |reason: String| LookupError {
            name: name.clone(),
            reason,
        };
        let fqdn = Name::from_ascii(format!("{name}.")).map_err(|e| fail(e.to_string()))?;
        let answer: Vec<IpAddr> = match self.hosts_answer(&fqdn) {
            Some(ips) => ips,
            None => self
                .resolver
                .lookup_ip(fqdn)
                .await
                .map_err(|e| fail(e.to_string()))?
                .iter()
                .collect(),
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
            return Err(fail("no address records".into()));
        }
        Ok(ips)
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
