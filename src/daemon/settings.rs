//! The daemon's settings, built once from the command line and the file ([`Settings::from_options`]):
//! the resolver's, the upstream connects', the connections' lifetimes, the per-peer and global
//! connection limits, the audit level and where metrics are served (`--metrics-listen`, else the
//! file's `metrics_listen:`). Nothing else turns [`Options`] into these structs.
//!
//! Imports nothing from the rest of the daemon.

use crate::config::cli::{AuditLevel, Options};
use crate::config::Config;
use crate::net::endpoint::Endpoint;
use crate::policy::dns::{DnsSettings, Family};
use crate::proxy::peers::PeerLimits;
use crate::proxy::server::ServerLimits;
use crate::proxy::shared::Lifetimes;
use crate::proxy::upstream::UpstreamSettings;

/// Everything the daemon takes from [`Options`] (and the file's `metrics_listen:`), in the
/// shape the layers below want it. Built at start-up, again on each reload (where only
/// [`Settings::dns`] and [`Settings::metrics_listen`] are looked at: the rest apply on restart).
#[derive(Debug)]
pub struct Settings {
    /// The resolver: name servers, address family, timeout.
    pub dns: DnsSettings,
    /// Upstream connects: timeout and TCP keepalive.
    pub upstream: UpstreamSettings,
    /// Set-up timeout, maximum lifetime and relay mode of every connection.
    pub lifetimes: Lifetimes,
    /// `--max-connections-per-peer`.
    pub peers: PeerLimits,
    /// `--max-connections` and `--drain-timeout`.
    pub limits: ServerLimits,
    /// `--audit allowed`: allowed connections are audited too, not only denied ones.
    pub audit_allowed: bool,
    /// Where metrics are served: the command line wins over the file.
    pub metrics_listen: Option<Endpoint>,
}

impl Settings {
    pub fn from_options(options: &Options, file: &Config) -> Settings {
        Settings {
            dns: dns_settings(options),
            upstream: UpstreamSettings {
                connect_timeout: options.connect_timeout,
                keepalive: options.tcp_keepalive,
            },
            lifetimes: Lifetimes {
                setup_timeout: options.setup_timeout,
                max_lifetime: options.max_lifetime,
                relay_mode: options.relay,
            },
            peers: PeerLimits::new(options.max_connections_per_peer),
            limits: ServerLimits {
                max_connections: options.max_connections as usize,
                drain_timeout: options.drain_timeout,
            },
            audit_allowed: options.audit == AuditLevel::Allowed,
            metrics_listen: options
                .metrics_listen
                .clone()
                .or_else(|| file.metrics_listen.clone()),
        }
    }
}

/// The resolver settings the command line asks for.
fn dns_settings(options: &Options) -> DnsSettings {
    let family = match (options.ipv4, options.ipv6) {
        (true, _) => Family::V4Only,
        (_, true) => Family::V6Only,
        _ => Family::Both,
    };
    DnsSettings {
        nameservers: options.nameservers.clone(),
        family,
        timeout: options.dns_timeout,
    }
}
