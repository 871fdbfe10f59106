//! An ingress route's connection: a client on the network side of the parent, to the enclave.
//!
//! This module owns the life of one such connection, in the same order as an enclave's
//! connection out ([`crate::proxy::connection`], which dispatches here): who the client is (its
//! source address, or, from a trusted load balancer, the client its PROXY header names — read
//! whole within `--setup-timeout`, at most [`crate::net::proxy_header::MAX_HEADER`] bytes) → the
//! per-peer limit for that client → the source policy ([`crate::policy::source`], the route's
//! `allow_from`) → the connect to the enclave (`to:`) → the route's own PROXY header and any bytes
//! read past the load balancer's → the relay, until it ends, goes idle, reaches
//! `--max-lifetime` or a reload's tighter `allow_from` revokes it.
//!
//! A client refused is closed before anything is connected, so no byte of it reaches the enclave.
//! Connections from sources not in `accept_proxy_protocol` are never inspected: whatever they
//! send (a forged PROXY header included) reaches the enclave as data, behind the route's own
//! header naming their real address.

use std::net::IpAddr;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::Ingress;
use crate::net::endpoint::Stream;
use crate::net::proxy_header::{self, Addresses, Header, ReadError};
use crate::net::relay::{relay, LiveBytes, Side};
use crate::ops::audit;
use crate::ops::metrics::Outcome;
use crate::proxy::peers::PeerSlot;
use crate::proxy::revoke::{OpenConnection, Recheck};
use crate::proxy::route::{Route, Settings};
use crate::proxy::shared::Shared;

/// The audit reason of a client outside `allow_from` (counted as `denied`).
pub const SOURCE_NOT_ALLOWED: &str = "source_not_allowed";
/// The audit reason of a trusted source's missing, malformed or late header (`denied`).
pub const BAD_PROXY_HEADER: &str = "bad_proxy_header";

/// Whether a connection on `stream` must start with a PROXY header: its source is in
/// `accept_proxy_protocol`, or it came through a `unix:` listener of a route that accepts
/// headers (a unix client has no address of its own; the socket file's permissions say who may
/// connect). Admission calls it too: such a connection's per-peer slot is its client's, taken
/// once the header is read.
pub fn reads_header(spec: &Ingress, stream: &Stream) -> bool {
    if spec.sources.trusted.is_empty() {
        // The common case, decided without asking the socket for its peer.
        return false;
    }
    match stream {
        Stream::Tcp(tcp) => tcp
            .peer_addr()
            .is_ok_and(|peer| spec.sources.trusts_header_from(peer.ip())),
        Stream::Unix(_) => !spec.sources.trusted.is_empty(),
        Stream::Vsock(_) => false,
    }
}

/// A connection refused before anything was connected.
struct Refused {
    outcome: Outcome,
    reason: &'static str,
    message: String,
}

/// Who the connection is from, once known.
struct Client {
    /// The client and the address it connected to (from the load balancer's header, or the
    /// socket itself).
    addresses: Option<Addresses>,
    /// What the client sent after the load balancer's header, read with it.
    early: Vec<u8>,
    /// Its per-peer slot when admission left it to us (a load balancer's client).
    _peer_slot: Option<PeerSlot>,
}

/// Serves one ingress connection; returns how it ended.
pub async fn serve(
    mut client: Stream,
    peer: &str,
    route: &Route,
    settings: &Settings,
    spec: &Ingress,
    shared: &Shared,
) -> Outcome {
    let started = Instant::now();
    let deadline = started + shared.lifetimes.setup_timeout;
    let route_name = route.name.clone();
    let via_header = reads_header(spec, &client);
    let Client {
        addresses,
        early,
        // Held until the connection ends, however it ends.
        _peer_slot,
    } = match identify(&mut client, via_header, deadline, shared).await {
        Ok(who) => who,
        Err(refused) => return refuse(route, shared, &route_name, peer, None, refused),
    };
    // The client as logged and audited: the load balancer's client when it named one.
    let client_ip = addresses.map(|a| a.client.ip());
    let audited_peer = match (via_header, addresses) {
        (true, Some(a)) => format!("tcp:{}", a.client),
        _ => peer.to_owned(),
    };
    if let Some(addresses) = addresses.filter(|_| via_header) {
        tracing::Span::current().record("client", tracing::field::display(addresses.client));
    }
    let admitted = match client_ip {
        Some(ip) => spec
            .sources
            .admits(ip)
            .map(|block| (ip, block))
            .map_err(|denied| denied.to_string()),
        None => Err(format!(
            "the client of {peer} has no address to judge by allow_from: a unix: listener's \
             clients must come through a load balancer that sends a PROXY header \
             (accept_proxy_protocol)"
        )),
    };
    let (client_ip, block) = match admitted {
        Ok(admitted) => admitted,
        Err(message) => {
            let refused = Refused {
                outcome: Outcome::Denied,
                reason: SOURCE_NOT_ALLOWED,
                message,
            };
            return refuse(
                route,
                shared,
                &route_name,
                &audited_peer,
                Some(spec),
                refused,
            );
        }
    };
    let connecting = Instant::now();
    let early_bytes = early.len() as u64;
    // `early` moves into the connect, so it is freed once sent, not held by an idle connection.
    let connected = tokio::time::timeout_at(deadline, connect(spec, addresses, early)).await;
    let upstream = match connected {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(message)) => {
            let refused = Refused {
                outcome: Outcome::Unreachable,
                reason: Outcome::Unreachable.label(),
                message,
            };
            return refuse(
                route,
                shared,
                &route_name,
                &audited_peer,
                Some(spec),
                refused,
            );
        }
        Err(_) => {
            warn!(
                setup_timeout = %humantime::format_duration(shared.lifetimes.setup_timeout),
                to = %spec.to,
                "connection closed: not relaying within --setup-timeout (PROXY header and connect to the enclave)"
            );
            return Outcome::SetupTimeout;
        }
    };
    route
        .metrics
        .connect_duration
        .observe(connecting.elapsed().as_secs_f64());
    tracing::Span::current().record("upstream", tracing::field::display(&spec.to));
    if early_bytes > 0 {
        route.metrics.to_upstream.inc_by(early_bytes);
    }
    if audit::records_allowed() {
        audit::allowed(&audit::Decision {
            route: &route_name,
            peer: &audited_peer,
            enclave: "-",
            requested: Some(&spec.to),
            port: None,
            addresses: &format!("{client_ip} allowed (allow_from {block})"),
            outcome: Outcome::Completed,
            reason: None,
            message: &format!("relaying to {}", spec.to),
        });
    }
    Relay {
        client,
        upstream,
        early: early_bytes,
        client_ip,
        audited_peer: &audited_peer,
        route,
        route_name: &route_name,
        settings,
        spec,
        shared,
    }
    .run(started)
    .await
}

/// The client's addresses (from the socket, or the trusted load balancer's header, read whole
/// by `deadline`) and, for a load balancer's client, its per-peer slot.
async fn identify(
    client: &mut Stream,
    via_header: bool,
    deadline: Instant,
    shared: &Shared,
) -> Result<Client, Refused> {
    let own = socket_addresses(client);
    if !via_header {
        return Ok(Client {
            addresses: own,
            early: Vec::new(),
            _peer_slot: None,
        });
    }
    let timeout = deadline.saturating_duration_since(Instant::now());
    let (header, early) = proxy_header::read_header(client, timeout)
        .await
        .map_err(|e| Refused {
            outcome: Outcome::Denied,
            reason: BAD_PROXY_HEADER,
            message: match e {
                ReadError::Timeout => format!(
                    "a trusted source (accept_proxy_protocol) sent no whole PROXY header within \
                     --setup-timeout ({})",
                    humantime::format_duration(shared.lifetimes.setup_timeout)
                ),
                e => format!("a trusted source (accept_proxy_protocol) sent {e}"),
            },
        })?;
    let addresses = match header {
        Header::Proxied(addresses) => Some(addresses),
        // The load balancer's own connection (a health check): it is the client.
        Header::Local => own,
    };
    let slot = match addresses {
        Some(a) => {
            let key = format!("tcp:{}", a.client.ip().to_canonical());
            Some(shared.peers.try_reserve(key).map_err(|max| Refused {
                outcome: Outcome::OverLimit,
                reason: Outcome::OverLimit.label(),
                message: format!(
                    "connection limit reached (--max-connections-per-peer ({max}) for client {}); \
                     closing new connections",
                    a.client.ip()
                ),
            })?)
        }
        None => None,
    };
    Ok(Client {
        addresses,
        early,
        _peer_slot: slot,
    })
}

/// A TCP client's own address and the address it connected to (IPv4-mapped written as IPv4);
/// `None` for a unix client.
fn socket_addresses(client: &Stream) -> Option<Addresses> {
    let Stream::Tcp(tcp) = client else {
        return None;
    };
    let (client, destination) = (tcp.peer_addr().ok()?, tcp.local_addr().ok()?);
    Some(Addresses {
        client: proxy_header::canonical(client),
        destination: proxy_header::canonical(destination),
    })
}

/// Connects to the enclave and sends the route's PROXY header and the client's first bytes.
async fn connect(
    spec: &Ingress,
    addresses: Option<Addresses>,
    early: Vec<u8>,
) -> Result<Stream, String> {
    let mut upstream = spec
        .to
        .connect()
        .await
        .map_err(|e| format!("cannot connect to the enclave at {}: {e}", spec.to))?;
    let mut first = match addresses {
        Some(addresses) => proxy_header::encode(spec.proxy_protocol, addresses)
            .map_err(|e| format!("cannot build the PROXY header: {e}"))?,
        None => Vec::new(),
    };
    first.extend_from_slice(&early);
    drop(early);
    if !first.is_empty() {
        upstream.write_all(&first).await.map_err(|e| {
            format!(
                "cannot send the first bytes to the enclave at {}: {e}",
                spec.to
            )
        })?;
    }
    Ok(upstream)
}

/// Counts and audits a refusal; the client is closed when it is dropped. Returns the outcome.
fn refuse(
    route: &Route,
    shared: &Shared,
    route_name: &str,
    peer: &str,
    spec: Option<&Ingress>,
    refused: Refused,
) -> Outcome {
    for counters in [&shared.counters, &route.counters] {
        counters.count_refusal(refused.outcome);
    }
    audit::refused(&audit::Decision {
        route: route_name,
        peer,
        enclave: "-",
        requested: spec.map(|s| &s.to as &dyn std::fmt::Display),
        port: None,
        addresses: audit::NO_ADDRESSES,
        outcome: refused.outcome,
        reason: Some(refused.reason),
        message: &refused.message,
    });
    refused.outcome
}

/// A connection ready to relay.
struct Relay<'a> {
    client: Stream,
    upstream: Stream,
    /// Bytes already sent to the enclave (what followed the load balancer's header).
    early: u64,
    client_ip: IpAddr,
    audited_peer: &'a str,
    route: &'a Route,
    route_name: &'a str,
    settings: &'a Settings,
    spec: &'a Ingress,
    shared: &'a Shared,
}

impl Relay<'_> {
    /// Relays until the connection ends, goes idle, reaches `--max-lifetime` (counted from
    /// `started`) or is revoked by a reload. Returns how it ended.
    async fn run(self, started: Instant) -> Outcome {
        let registration = self.shared.relayed.register(OpenConnection {
            route: self.route.name.clone(),
            identity: Default::default(),
            check: Recheck::Source {
                client: self.client_ip,
            },
        });
        tracing::debug!(to = %self.spec.to, "relaying");
        let live = LiveBytes {
            to_upstream: self.route.metrics.to_upstream.inner(),
            to_client: self.route.metrics.to_client.inner(),
        };
        let (client, upstream) = match (Side::new(self.client), Side::new(self.upstream)) {
            (Ok(client), Ok(upstream)) => (client, upstream),
            (Err(e), _) | (_, Err(e)) => {
                warn!(error = %e, "connection closed: cannot register its sockets for the relay");
                return Outcome::ClientError;
            }
        };
        let lifetime = self.shared.lifetimes.expiry(started);
        tokio::select! {
            report = relay(&client, &upstream, self.settings.idle_timeout, &live, self.shared.lifetimes.relay_mode) => {
                info!(
                    bytes_to_upstream = report.to_upstream + self.early,
                    bytes_to_client = report.to_client,
                    duration_ms = started.elapsed().as_millis() as u64,
                    end = %report.end,
                    "connection closed"
                );
                Outcome::from(&report.end)
            }
            _ = registration.revoked() => {
                let why = registration.reason();
                audit::refused(&audit::Decision {
                    route: self.route_name,
                    peer: self.audited_peer,
                    enclave: "-",
                    requested: Some(&self.spec.to),
                    port: None,
                    addresses: &format!("{} denied ({why})", self.client_ip),
                    outcome: Outcome::Revoked,
                    reason: None,
                    message: &format!("closed by reload: {why}"),
                });
                Outcome::Revoked
            }
            _ = lifetime => {
                info!(
                    duration_ms = started.elapsed().as_millis() as u64,
                    "connection closed: --max-lifetime reached"
                );
                Outcome::MaxLifetime
            }
        }
    }
}
