//! Revocation on reload: the open connections, and which of them a new allowlist forbids.
//!
//! This module owns the registry of relayed connections (route, requested host and port, the
//! upstream address reached, and how to tell the connection to close) and the re-check a reload
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
use std::sync::{Arc, Mutex, OnceLock};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::policy::dns::Dns;
use crate::policy::enclaves::{PeerIdentity, PolicySet, Table};
use crate::policy::host::{Host, HostName};
use crate::policy::source::Sources;
use crate::policy::{Denial, Policy, Resolutions};

/// One relayed connection, as the re-check needs it.
#[derive(Clone, Debug)]
pub struct OpenConnection {
    /// Its route's listen address.
    pub route: Arc<str>,
    /// Its peer, to match against `enclaves:` again.
    pub identity: PeerIdentity,
    pub check: Recheck,
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

/// What the routes themselves say about who may keep a connection, by listen address: each
/// ingress route's sources, and each route's `enclaves:` ids.
#[derive(Clone, Debug, Default)]
pub struct RouteChecks {
    pub ingress: IngressSources,
    pub route_enclaves: HashMap<String, Vec<String>>,
}

/// How many connections a reload closed, by what refused them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Outbound connections the new allowlist denies.
    pub by_allowlist: usize,
    /// Ingress connections whose client the route's new `allow_from` refuses.
    pub by_allow_from: usize,
}

/// One registered connection: what a reload checks, and how it is told to close. Shared by
/// the registry and the connection's [`Registration`] (one allocation per connection).
#[derive(Debug)]
struct Entry {
    connection: OpenConnection,
    /// Why a reload closed it: set once, before `notify` wakes it.
    reason: OnceLock<String>,
    notify: Notify,
}

impl Entry {
    fn revoke(&self, why: String) {
        // Set before the wake-up, so a waiter that wakes always finds it.
        let _ = self.reason.set(why);
        self.notify.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct Inner {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// The relayed connections.
#[derive(Clone, Debug, Default)]
pub struct Registry(Arc<Inner>);

/// A connection's place in the registry; dropping it removes the entry.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    registry: Registry,
    entry: Arc<Entry>,
}

impl Registration {
    /// Completes when a reload revokes the connection (at once if it already has).
    pub fn revoked(&self) -> RevokedWait<'_> {
        RevokedWait {
            entry: &self.entry,
            notified: self.entry.notify.notified(),
        }
    }

    /// Why the connection was revoked (empty before).
    pub fn reason(&self) -> &str {
        self.entry
            .reason
            .get()
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// What was registered.
    pub fn connection(&self) -> &OpenConnection {
        &self.entry.connection
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

/// [`Registration::revoked`]: a waiter on the entry's [`Notify`] and nothing else (it is part
/// of every relaying connection's task).
pub struct RevokedWait<'a> {
    entry: &'a Entry,
    notified: Notified<'a>,
}

impl Future for RevokedWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: `notified` is never moved out of the pinned `Revoked`; `entry` is a reference.
        let this = unsafe { self.get_unchecked_mut() };
        loop {
            // SAFETY: as above, `notified` stays where it is.
            let mut notified = unsafe { Pin::new_unchecked(&mut this.notified) };
            // Registered as a waiter (by `enable` or by a pending poll) before the check, so a
            // revocation in between still wakes it.
            notified.as_mut().enable();
            if this.entry.reason.get().is_some() {
                return Poll::Ready(());
            }
            match notified.poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Woken: the reason is set before the wake-up; look again with a new waiter.
                Poll::Ready(()) => this.notified = this.entry.notify.notified(),
            }
        }
    }
}

impl Registry {
    pub fn register(&self, connection: OpenConnection) -> Registration {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            connection,
            reason: OnceLock::new(),
            notify: Notify::new(),
        });
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        open.insert(id, entry.clone());
        Registration {
            id,
            registry: self.clone(),
            entry,
        }
    }

    fn snapshot(&self) -> Vec<Arc<Entry>> {
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

    /// Closes every connection the policies (with `table` as the running enclaves) no longer
    /// allow, or (for an ingress route) its new sources refuse; returns how many. An outbound
    /// connection's peer is matched against `enclaves:` again, so one whose enclave was
    /// replaced loses what its entry gave, and one on a route whose `enclaves:` (in
    /// `checks.route_enclaves`) it no longer matches is closed. An ingress connection whose
    /// route is not in `checks.ingress` (removed, or no longer an ingress route) is left to
    /// drain with its route.
    pub async fn revoke_denied(
        &self,
        policies: &PolicySet,
        table: &Table,
        dns: &Dns,
        checks: &RouteChecks,
    ) -> Revoked {
        let mut revoked = Revoked::default();
        for entry in self.snapshot() {
            let conn = &entry.connection;
            let verdict = match &conn.check {
                Recheck::Upstream {
                    host,
                    port,
                    upstream,
                    dynamic,
                    server_name,
                } => {
                    let matched = policies.matching(&conn.identity, table);
                    match checks.route_enclaves.get(&*conn.route) {
                        Some(ids) if !policies.any_of(&matched, ids) => Err(format!(
                            "the peer matches none of the route's enclaves ({}) any more",
                            ids.join(", ")
                        )),
                        _ => {
                            still_allowed(
                                &policies.for_matched(&matched),
                                dns,
                                host,
                                *port,
                                *upstream,
                                *dynamic,
                                server_name.as_ref(),
                            )
                            .await
                        }
                    }
                }
                Recheck::Source { client } => match checks.ingress.get(&*conn.route) {
                    Some(sources) => sources
                        .admits(*client)
                        .map(|_| ())
                        .map_err(|denied| format!("the reloaded route's {denied}")),
                    None => Ok(()),
                },
            };
            if let Err(why) = verdict {
                entry.revoke(why);
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
