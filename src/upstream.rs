//! Opening the upstream connection for one enclave connection, under the policy.
//!
//! This module owns the per-connection enforcement sequence: resolve the route's remote (from the
//! shared cache while its TTL lasts), ask [`Policy::decide`] about every address (resolving the
//! other allowlisted names only if rule 5 is needed), then connect to the allowed addresses in
//! order, each with the connect timeout, until one succeeds. Every way this can fail is an
//! [`UpstreamError`] whose `Display` is the reason logged for the operator.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::dns::{Dns, LookupError};
use crate::host::Host;
use crate::policy::{Allowance, Denial, Policy, Resolutions};

/// Why no upstream connection was made.
#[derive(Debug)]
pub enum UpstreamError {
    /// The route's remote host could not be resolved.
    Dns(LookupError),
    /// Every address the remote host resolved to was denied by the policy.
    Denied(Vec<(IpAddr, Denial)>),
    /// Every allowed address failed to connect.
    Unreachable(Vec<(SocketAddr, io::Error)>),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Dns(e) => e.fmt(f),
            UpstreamError::Denied(denials) => {
                f.write_str("no allowed address: ")?;
                for (i, (ip, why)) in denials.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}{ip} denied ({why})")?;
                }
                Ok(())
            }
            UpstreamError::Unreachable(failures) => {
                f.write_str("every allowed address failed: ")?;
                for (i, (addr, e)) in failures.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}{addr}: {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl UpstreamError {
    /// The addresses tried and what became of each, for the audit trail (empty for a failed
    /// lookup: no address was tried).
    pub fn addresses(&self) -> String {
        match self {
            UpstreamError::Dns(_) => String::new(),
            UpstreamError::Denied(denials) => crate::audit::join(
                denials
                    .iter()
                    .map(|(ip, why)| format!("{ip} denied ({why})")),
            ),
            UpstreamError::Unreachable(failures) => crate::audit::join(
                failures
                    .iter()
                    .map(|(addr, e)| format!("{} allowed, connect failed ({e})", addr.ip())),
            ),
        }
    }

    /// A short machine-friendly reason for structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Dns(_) => "dns_failure",
            UpstreamError::Denied(_) => "denied",
            UpstreamError::Unreachable(_) => "unreachable",
        }
    }
}

/// The addresses of `remote` the policy allows, in connection order, with the reason for each,
/// and the denied ones. `Err` only for a failed lookup of `remote` itself.
pub async fn allowed_addresses(
    policy: &Policy,
    dns: &Dns,
    remote: &Host,
    port: u16,
) -> Result<(Vec<(IpAddr, Allowance)>, Vec<(IpAddr, Denial)>), LookupError> {
    let candidates = match remote {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => dns.lookup(name).await?,
    };
    let mut resolutions = Resolutions::new();
    let mut decisions: Vec<_> = candidates
        .iter()
        .map(|ip| (*ip, policy.decide(remote, port, *ip, &resolutions)))
        .collect();
    let needs_rule5 = decisions
        .iter()
        .any(|(_, d)| matches!(d, Err(Denial::NotAllowlisted)));
    if needs_rule5 {
        for name in policy.names_to_resolve(remote, port) {
            match dns.lookup(&name).await {
                Ok(ips) => {
                    resolutions.insert(name, ips);
                }
                // That name cannot vouch for anything now; the others still may.
                Err(e) => tracing::debug!(error = %e, "allowlisted name did not resolve"),
            }
        }
        for (ip, decision) in &mut decisions {
            if matches!(decision, Err(Denial::NotAllowlisted)) {
                *decision = policy.decide(remote, port, *ip, &resolutions);
            }
        }
    }
    let mut allowed = Vec::new();
    let mut denied = Vec::new();
    for (ip, decision) in decisions {
        match decision {
            Ok(why) => allowed.push((ip, why)),
            Err(why) => denied.push((ip, why)),
        }
    }
    Ok((allowed, denied))
}

/// Resolves, checks and connects: the upstream stream and the address it reached.
pub async fn connect(
    policy: &Policy,
    dns: &Dns,
    remote: &Host,
    port: u16,
    connect_timeout: Duration,
) -> Result<(TcpStream, SocketAddr, Allowance), UpstreamError> {
    let (allowed, denied) = allowed_addresses(policy, dns, remote, port)
        .await
        .map_err(UpstreamError::Dns)?;
    for (ip, why) in &denied {
        tracing::debug!(address = %ip, reason = %why, "address denied by policy");
    }
    if allowed.is_empty() {
        return Err(UpstreamError::Denied(denied));
    }
    let mut failures = Vec::new();
    for (ip, why) in allowed {
        let addr = SocketAddr::new(ip, port);
        let attempt = tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await;
        match attempt {
            Ok(Ok(stream)) => {
                // Small writes (TLS handshakes) should not wait for Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                tracing::debug!(upstream = %addr, allowed_by = %why, "connected");
                return Ok((stream, addr, why));
            }
            Ok(Err(e)) => {
                tracing::debug!(upstream = %addr, error = %e, "connect failed, trying the next address");
                failures.push((addr, e));
            }
            Err(_) => {
                tracing::debug!(upstream = %addr, "connect timed out, trying the next address");
                failures.push((
                    addr,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no answer within {}",
                            humantime::format_duration(connect_timeout)
                        ),
                    ),
                ));
            }
        }
    }
    Err(UpstreamError::Unreachable(failures))
}
