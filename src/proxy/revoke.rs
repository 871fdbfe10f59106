//! Revocation on reload: the open connections, and which of them a new allowlist forbids.
//!
//! This module owns the registry of relayed connections (route, requested host and port, the
//! upstream address reached, and a token that closes the connection) and the re-check a reload
//! runs against its new policy: a connection whose upstream address the new policy would deny —
//! with exactly the decision a new connection would get ([`crate::policy::Policy::decide`],
//! rule 5's names resolved again from the shared cache) — is closed and counted as `revoked`, and
//! so is one whose requested name, or the server name that let a CONNECT tunnel to an IP address
//! through (`sni: require`), the new policy no longer admits; so is an ingress connection whose
//! client its route's new `allow_from` no longer admits ([`crate::policy::source`]). With
//! `--no-revoke-on-reload` the registry is still kept but nothing is closed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::policy::dns::Dns;
use crate::policy::host::{Host, HostName};
use crate::policy::source::Sources;
use crate::policy::{Denial, Policy, Resolutions};

/// One relayed connection, as the re-check needs it.
#[derive(Clone, Debug)]
pub struct OpenConnection {
    /// Its route's listen address.
    pub route: String,
    pub check: Recheck,
    /// Cancelled to close the connection.
    pub revoke: CancellationToken,
}

/// What a reload checks again about an open connection.
#[derive(Clone, Debug)]
pub enum Recheck {
    /// An enclave's connection out: its destination and the upstream address it reached.
    Upstream {
        host: Host,
        port: u16,
        upstream: SocketAddr,
        /// A CONNECT or SNI route: the requested name itself is checked again too.
        dynamic: bool,
        /// The TLS server name a CONNECT tunnel to an IP address carried (`sni: require`),
        /// allowed only by a name entry: checked again too, as a new tunnel's would be.
        server_name: Option<HostName>,
    },
    /// A client's connection in (an ingress route): its address, against the route's
    /// `allow_from`.
    Source { client: IpAddr },
}

/// The sources of each ingress route of a reloaded file, by listen address.
pub type IngressSources = HashMap<String, Sources>;

/// How many connections a reload closed, by what refused them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Outbound connections the new allowlist denies.
    pub by_allowlist: usize,
    /// Ingress connections whose client the route's new `allow_from` refuses.
    pub by_allow_from: usize,
}

/// Why a reload closed a connection: set before its token is cancelled.
pub type RevokeReason = Arc<Mutex<Option<String>>>;

#[derive(Debug, Default)]
struct Inner {
    next: AtomicU64,
    open: Mutex<HashMap<u64, (OpenConnection, RevokeReason)>>,
}

/// The relayed connections.
#[derive(Clone, Debug, Default)]
pub struct Registry(Arc<Inner>);

/// A connection's place in the registry; dropping it removes the entry.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    registry: Registry,
    reason: RevokeReason,
    token: CancellationToken,
}

impl Registration {
    /// Cancelled when a reload revokes the connection.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Why the connection was revoked (empty before).
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_default()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = self
            .registry
            .0
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        open.remove(&self.id);
    }
}

impl Registry {
    pub fn register(&self, connection: OpenConnection) -> Registration {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        let reason = RevokeReason::default();
        let token = connection.revoke.clone();
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        open.insert(id, (connection, reason.clone()));
        Registration {
            id,
            registry: self.clone(),
            reason,
            token,
        }
    }

    fn snapshot(&self) -> Vec<(OpenConnection, RevokeReason)> {
        let open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        open.values().cloned().collect()
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.0.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every connection `policy` (or, for an ingress route, its new sources) no longer
    /// allows; returns how many. An ingress connection whose route is not in `ingress` (removed,
    /// or no longer an ingress route) is left to drain with its route.
    pub async fn revoke_denied(
        &self,
        policy: &Policy,
        dns: &Dns,
        ingress: &IngressSources,
    ) -> Revoked {
        let mut revoked = Revoked::default();
        for (conn, reason) in self.snapshot() {
            let verdict = match &conn.check {
                Recheck::Upstream {
                    host,
                    port,
                    upstream,
                    dynamic,
                    server_name,
                } => {
                    still_allowed(
                        policy,
                        dns,
                        host,
                        *port,
                        *upstream,
                        *dynamic,
                        server_name.as_ref(),
                    )
                    .await
                }
                Recheck::Source { client } => match ingress.get(&conn.route) {
                    Some(sources) => sources
                        .admits(*client)
                        .map(|_| ())
                        .map_err(|denied| format!("the reloaded route's {denied}")),
                    None => Ok(()),
                },
            };
            if let Err(why) = verdict {
                if let Ok(mut slot) = reason.lock() {
                    *slot = Some(why);
                }
                conn.revoke.cancel();
                match conn.check {
                    Recheck::Upstream { .. } => revoked.by_allowlist += 1,
                    Recheck::Source { .. } => revoked.by_allow_from += 1,
                }
            }
        }
        revoked
    }
}

/// `Ok` if a new connection to the same destination and address would be allowed now.
async fn still_allowed(
    policy: &Policy,
    dns: &Dns,
    host: &Host,
    port: u16,
    upstream: SocketAddr,
    dynamic: bool,
    server_name: Option<&HostName>,
) -> Result<(), String> {
    if dynamic {
        policy
            .admits_request(host, port)
            .map_err(|d| format!("{host}:{port} is no longer allowed: {d}"))?;
    }
    if let Some(name) = server_name {
        policy
            .admits_request(&Host::Name(name.clone()), port)
            .map_err(|d| {
                format!(
                    "the TLS server name {name} in the tunnel to {host}:{port} is no longer \
                     allowed: {d}"
                )
            })?;
    }
    let ip = upstream.ip();
    let mut resolutions = Resolutions::new();
    let mut decision = policy.decide(host, port, ip, &resolutions);
    if matches!(decision, Err(Denial::NotAllowlisted)) {
        for name in policy.names_to_resolve(host, port) {
            if let Ok(ips) = dns.lookup(&name).await {
                resolutions.insert(name, ips);
            }
        }
        decision = policy.decide(host, port, ip, &resolutions);
    }
    decision
        .map(|_| ())
        .map_err(|d| format!("the reloaded allowlist denies {ip} for {host}:{port} ({d})"))
}
