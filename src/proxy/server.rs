//! The daemon's listeners, the connection limits and graceful shutdown.
//!
//! This module owns the life of the listening sockets and of every connection task: the accept
//! loop ([`crate::net::accept::run`]) accepts from the listener of every route, takes listeners in and
//! out as a reload adds and removes routes ([`Command`]), and this module enforces `--max-connections` and each route's `max_connections` by closing
//! excess connections at once, runs one [`handle`] task per connection inside its own
//! `conn{route id peer}` span, and on shutdown stops accepting, lets open connections finish for
//! the drain timeout, then returns. A removed route drains the same way on its own
//! ([`drain_removed_route`]).
//!
//! The loop also beats a [`Heartbeat`] (systemd's watchdog) between accepts, so the pings stop
//! when the loop itself is stuck — not merely when some other task still runs; and keeps beating
//! while the daemon drains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use crate::config::remote::Target;
pub use crate::net::accept::Heartbeat;
use crate::net::accept::Pulse;
use crate::net::endpoint::{Endpoint, Listener, Stream};
use crate::net::relay::{relay, LiveBytes, RelayEnd, RelayMode, Side};
use crate::ops::audit;
use crate::ops::metrics::Outcome;
use crate::policy::dns::Dns;
use crate::policy::host::Host;
use crate::policy::Policy;
use crate::proxy::current::Current;
use crate::proxy::peers::{PeerLimits, PeerSlot};
use crate::proxy::request::connect;
use crate::proxy::request::sni;
use crate::proxy::revoke::{OpenConnection, Registry};
use crate::proxy::route::{Counters, Destination, Route, RouteSlot};
use crate::proxy::upstream::{self, UpstreamError, UpstreamSettings};
use tokio_util::sync::CancellationToken;

/// Everything a connection needs, shared by all of them.
pub struct Shared {
    /// The current policy; replaced whole on reload, so a connection sees one consistent version.
    pub policy: Current<Policy>,
    /// The resolver; replaced on reload, which re-reads /etc/hosts and /etc/resolv.conf.
    pub dns: Current<Dns>,
    /// Connect timeout and keepalive of upstream sockets.
    pub upstream: UpstreamSettings,
    /// Totals over every route, including removed ones.
    pub counters: Counters,
    /// The routes being served, in configuration order (for reload and STATUS=).
    pub routes: Current<Vec<Arc<Route>>>,
    /// The time limits of one connection.
    pub lifetimes: Lifetimes,
    /// `--max-connections-per-peer`.
    pub peers: PeerLimits,
    /// The connections being relayed, for reload to re-check.
    pub relayed: Registry,
}

/// How long one connection may take.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// From accept to relaying: reading the request, DNS, the policy, the connects.
    pub setup_timeout: Duration,
    /// From accept to close, however busy (`--max-lifetime`).
    pub max_lifetime: Option<Duration>,
    /// How the relay moves bytes (`--relay`).
    pub relay_mode: RelayMode,
}

impl Default for Lifetimes {
    fn default() -> Lifetimes {
        Lifetimes {
            setup_timeout: Duration::from_secs(15),
            max_lifetime: None,
            relay_mode: RelayMode::Auto,
        }
    }
}

impl Shared {
    pub fn new(policy: Policy, dns: Dns, upstream: UpstreamSettings) -> Shared {
        Shared {
            policy: Current::new(policy),
            dns: Current::new(dns),
            upstream,
            counters: Counters::default(),
            routes: Current::new(Vec::new()),
            lifetimes: Lifetimes::default(),
            peers: PeerLimits::new(None),
            relayed: Registry::default(),
        }
    }
}

/// A route's listener, as the accept loop holds it.
pub type Served = (Listener, ServedRoute);

/// The route a listener serves.
pub struct ServedRoute {
    pub route: Arc<Route>,
    /// A unix socket file this process created, removed when the listener is dropped (one that
    /// systemd passed belongs to the .socket unit and stays).
    pub socket_file: Option<PathBuf>,
}

impl Drop for ServedRoute {
    fn drop(&mut self) {
        if let Some(path) = &self.socket_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A change to the set of listeners, sent by reload.
pub enum Command {
    /// Start accepting on a new route's listener.
    Add(Served),
    /// Stop accepting on this listen address (the listener is closed when `done` fires).
    Remove(Endpoint, oneshot::Sender<()>),
}

/// Limits of the accept loop.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub drain_timeout: Duration,
}

/// Serves `served` (and whatever `commands` adds) until `shutdown` resolves, then drains.
/// Returns how many connections were still open when the drain timeout ran out (they are
/// closed when the runtime stops).
pub async fn serve(
    served: Vec<Served>,
    shared: Arc<Shared>,
    limits: ServerLimits,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shutdown: impl std::future::Future<Output = ()>,
    heartbeat: Option<Heartbeat>,
) -> usize {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut pulse = Pulse::new(heartbeat);
    let mut listeners = served;
    let mut admission = Admission {
        shared: shared.clone(),
        permits: permits.clone(),
        max_connections: limits.max_connections,
        next_id: 0,
    };
    tokio::select! {
        _ = crate::net::accept::run(
            &mut listeners,
            &mut commands,
            &mut pulse,
            apply,
            |served: &ServedRoute, stream, peer| admission.accepted(&served.route, stream, peer),
        ) => {}
        _ = shutdown => {}
    }
    drop(listeners);
    let open = limits.max_connections - permits.available_permits();
    if open > 0 {
        info!(open, drain_timeout = %humantime::format_duration(limits.drain_timeout), "stopped accepting; waiting for open connections");
    }
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    // Keep beating while draining, in case the service manager still watches.
    let drain = async {
        loop {
            tokio::select! {
                _ = permits.acquire_many(all) => return,
                _ = pulse.beat() => {}
            }
        }
    };
    let drained = tokio::time::timeout(limits.drain_timeout, drain).await;
    match drained {
        Ok(_) => 0,
        Err(_) => {
            let left = limits.max_connections - permits.available_permits();
            warn!(
                open = left,
                "drain timeout reached; closing the remaining connections"
            );
            left
        }
    }
}

/// Stops a removed route's connections once they are done or `timeout` is up, whichever is
/// first, as SIGTERM does for the whole daemon. Its listener must already be closed.
pub async fn drain_removed_route(route: Arc<Route>, timeout: Duration) {
    route.tasks.close();
    let open = route.counters.open.load(Ordering::Relaxed);
    if open > 0 {
        info!(route = %route.listen, open, drain_timeout = %humantime::format_duration(timeout), "route removed: stopped accepting; waiting for its open connections");
    }
    if tokio::time::timeout(timeout, route.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            route = %route.listen,
            open = route.counters.open.load(Ordering::Relaxed),
            "drain timeout reached for a removed route; closing its remaining connections"
        );
        route.closed.cancel();
    }
    info!(
        route = %route.listen,
        accepted = route.counters.accepted.load(Ordering::Relaxed),
        denied = route.counters.denied.load(Ordering::Relaxed),
        "route removed"
    );
}

/// Applies a reload's change to the listeners.
fn apply(listeners: &mut Vec<Served>, command: Command) {
    match command {
        Command::Add(served) => {
            info!(route = %served.1.route.listen, "accepting on a new route");
            listeners.push(served);
        }
        Command::Remove(listen, done) => {
            // Dropping the listener closes it: new connects are refused from here on.
            listeners.retain(|(_, s)| s.route.listen != listen);
            let _ = done.send(());
        }
    }
}

/// Who gets in: the global limit, then the route's, then the peer's.
struct Admission {
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    max_connections: usize,
    next_id: u64,
}

impl Admission {
    fn accepted(&mut self, route: &Arc<Route>, stream: Stream, peer: String) {
        self.next_id += 1;
        let limit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => match route.try_reserve() {
                Ok(slot) => match self.shared.peers.try_reserve(audit::peer_key(&peer)) {
                    Ok(peer_slot) => {
                        let id = self.next_id;
                        let slots = Slots {
                            _global: permit,
                            _route: slot,
                            _peer: peer_slot,
                        };
                        return spawn_connection(
                            stream,
                            peer,
                            id,
                            route.clone(),
                            slots,
                            &self.shared,
                        );
                    }
                    Err(max) => format!("--max-connections-per-peer ({max}) for this peer"),
                },
                Err(route_max) => format!("the route's max_connections ({route_max})"),
            },
            Err(_) => format!("--max-connections ({})", self.max_connections),
        };
        // Closing at once tells the enclave now, instead of leaving it hanging in a queue.
        drop(stream);
        for counters in [&self.shared.counters, &route.counters] {
            counters.rejected_over_limit.fetch_add(1, Ordering::Relaxed);
        }
        crate::ops::metrics::global().connection_ended(&route.metrics, Outcome::OverLimit);
        audit::refused(&audit::Decision {
            route: &route.listen.to_string(),
            peer: &peer,
            requested: None,
            port: None,
            addresses: audit::NO_ADDRESSES,
            outcome: Outcome::OverLimit,
            message: &format!("connection limit reached ({limit}); closing new connections"),
        });
    }
}

/// The slots one connection holds; dropping them (however the task ends) gives them back.
struct Slots {
    _global: OwnedSemaphorePermit,
    _route: RouteSlot,
    _peer: PeerSlot,
}

fn spawn_connection(
    stream: Stream,
    peer: String,
    id: u64,
    route: Arc<Route>,
    slots: Slots,
    shared: &Arc<Shared>,
) {
    for counters in [&shared.counters, &route.counters] {
        counters.accepted.fetch_add(1, Ordering::Relaxed);
    }
    let open_now = shared.counters.open.fetch_add(1, Ordering::Relaxed) + 1;
    crate::ops::heap::opened(open_now as usize);
    route.metrics.open.inc();
    if let Stream::Tcp(tcp) = &stream {
        // The tcp: stand-in's client can vanish as silently as an upstream (vsock cannot).
        upstream::set_keepalive(tcp, &shared.upstream);
    }
    let span = tracing::info_span!("conn", route = %route.listen, id, peer = %peer, upstream = tracing::field::Empty);
    let shared = shared.clone();
    let tasks = route.tasks.clone();
    tasks.spawn(
        async move {
            let outcome = tokio::select! {
                outcome = handle(stream, &peer, &route, &shared) => outcome,
                _ = route.closed.cancelled() => {
                    info!("connection closed: its route was removed and the drain timeout ran out");
                    Outcome::Drained
                }
            };
            crate::ops::metrics::global().connection_ended(&route.metrics, outcome);
            route.metrics.open.dec();
            let open_now = shared
                .counters
                .open
                .fetch_sub(1, Ordering::Relaxed)
                .saturating_sub(1);
            drop(slots);
            crate::ops::heap::closed(open_now as usize);
        }
        .instrument(span),
    );
}

/// Where one connection asked to go, and what it already sent.
struct Request {
    host: Host,
    port: u16,
    /// Bytes read to decide (a ClientHello, what followed a CONNECT head), sent on first.
    early: Vec<u8>,
    /// An HTTP CONNECT client, which is answered with a status line.
    connect: bool,
}

/// A refusal before any connect: the reason for logs and metrics, the message, and the HTTP
/// status to answer a CONNECT client with (none for other routes, or a client already gone).
type Refusal = (&'static str, String, Option<u16>);

/// Reads what the route needs to know where the connection goes.
async fn read_request(client: &mut Stream, destination: &Destination) -> Result<Request, Refusal> {
    match destination {
        Destination::Fixed {
            target,
            require_sni: false,
        } => Ok(Request {
            host: target.host.clone(),
            port: target.port,
            early: Vec::new(),
            connect: false,
        }),
        Destination::Fixed {
            target,
            require_sni: true,
        } => {
            let hello = sni::read_client_hello(client)
                .await
                .map_err(|e| (e.kind(), e.to_string(), None))?;
            if Host::Name(hello.server_name.clone()) != target.host {
                return Err((
                    "sni_mismatch",
                    format!(
                        "the TLS server name {} is not the route's remote {} (sni: require)",
                        hello.server_name, target.host
                    ),
                    None,
                ));
            }
            Ok(Request {
                host: target.host.clone(),
                port: target.port,
                early: hello.bytes,
                connect: false,
            })
        }
        Destination::Sni { port } => {
            let hello = sni::read_client_hello(client)
                .await
                .map_err(|e| (e.kind(), e.to_string(), None))?;
            Ok(Request {
                host: Host::Name(hello.server_name),
                port: *port,
                early: hello.bytes,
                connect: false,
            })
        }
        Destination::Connect => match connect::read_request(client).await {
            Ok(request) => Ok(Request {
                host: request.host,
                port: request.port,
                early: request.after_head,
                connect: true,
            }),
            Err(bad) => {
                let status = (bad != connect::BadRequest::Closed).then(|| bad.status());
                Err((bad.kind(), bad.to_string(), status))
            }
        },
    }
}

/// The CONNECT status for a failed upstream: 403 denied, 504 every address timed out, 502
/// otherwise (DNS failure, every address failed).
fn connect_status(e: &UpstreamError) -> u16 {
    match e {
        UpstreamError::Denied(_) => 403,
        UpstreamError::Unreachable(failures, _)
            if !failures.is_empty()
                && failures
                    .iter()
                    .all(|(_, e)| e.kind() == std::io::ErrorKind::TimedOut) =>
        {
            504
        }
        _ => 502,
    }
}

/// The outcome a refusal reason counts as.
fn refusal_outcome(reason: &'static str) -> Outcome {
    match reason {
        "denied" => Outcome::Denied,
        "dns_failure" => Outcome::DnsFailure,
        "unreachable" => Outcome::Unreachable,
        // The client left before saying where to: not a decision.
        "client_closed" => Outcome::ClientError,
        other => Outcome::Refused(other),
    }
}

/// A connection ready to relay.
struct Ready {
    upstream: TcpStream,
    addr: SocketAddr,
    host: Host,
    port: u16,
    dynamic: bool,
    /// Bytes already sent upstream (the ClientHello, what followed a CONNECT head).
    early: u64,
}

/// One enclave connection: learn where it goes (the route, a CONNECT head or a ClientHello),
/// enforce the policy, connect — all within `--setup-timeout` — then relay until it ends, goes
/// idle, reaches `--max-lifetime` or is revoked by a reload. Returns how it ended.
async fn handle(mut client: Stream, peer: &str, route: &Route, shared: &Shared) -> Outcome {
    let started = Instant::now();
    let settings = route.settings();
    let route_name = route.listen.to_string();
    // Boxed with its timer: the set-up's state (DNS lookups, connect attempts, the deadline)
    // is freed once it is done, instead of being part of every idle connection's task.
    let setup = Box::pin(tokio::time::timeout(
        shared.lifetimes.setup_timeout,
        set_up(&mut client, peer, &route_name, route, &settings, shared),
    ))
    .await;
    let ready = match setup {
        Ok(Ok(ready)) => ready,
        Ok(Err(outcome)) => return outcome,
        Err(_) => {
            warn!(
                setup_timeout = %humantime::format_duration(shared.lifetimes.setup_timeout),
                "connection closed: not relaying within --setup-timeout (request, DNS, policy and connect)"
            );
            return Outcome::SetupTimeout;
        }
    };
    let registration = shared.relayed.register(OpenConnection {
        route: route_name.clone(),
        host: ready.host.clone(),
        port: ready.port,
        upstream: ready.addr,
        dynamic: ready.dynamic,
        revoke: CancellationToken::new(),
    });
    let revoked = registration.token();
    tracing::debug!(requested = %ready.host, "relaying");
    let live = LiveBytes {
        to_upstream: route.metrics.to_upstream.inner(),
        to_client: route.metrics.to_client.inner(),
    };
    let client = match Side::new(client) {
        Ok(side) => side,
        Err(e) => {
            warn!(error = %e, "connection closed: cannot register the client socket for the relay");
            return Outcome::ClientError;
        }
    };
    let lifetime = async {
        match shared.lifetimes.max_lifetime {
            // Boxed, so that a connection without --max-lifetime carries no timer.
            Some(max) => Box::pin(tokio::time::sleep_until(started + max)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        report = relay(client, Side::from(ready.upstream), settings.idle_timeout, &live, shared.lifetimes.relay_mode) => {
            info!(
                bytes_to_upstream = report.to_upstream + ready.early,
                bytes_to_client = report.to_client,
                duration_ms = started.elapsed().as_millis() as u64,
                end = %report.end,
                "connection closed"
            );
            match report.end {
                RelayEnd::Completed => Outcome::Completed,
                RelayEnd::IdleTimeout => Outcome::IdleTimeout,
                RelayEnd::ClientError(_) => Outcome::ClientError,
                RelayEnd::UpstreamError(_) => Outcome::UpstreamError,
            }
        }
        _ = revoked.cancelled() => {
            let why = registration.reason();
            audit::refused(&audit::Decision {
                route: &route_name,
                peer,
                requested: Some(&ready.host),
                port: Some(ready.port),
                addresses: &format!("{} denied ({why})", ready.addr.ip()),
                outcome: Outcome::Revoked,
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

/// Everything before relaying: the request, the policy, the upstream connect, the CONNECT
/// answer and the first bytes. A refusal is recorded (audit trail, counters) before the client
/// is answered, so the log never trails what the enclave saw.
async fn set_up(
    client: &mut Stream,
    peer: &str,
    route_name: &str,
    route: &Route,
    settings: &crate::proxy::route::Settings,
    shared: &Shared,
) -> Result<Ready, Outcome> {
    let refused = |reason: &'static str,
                   message: &str,
                   host: Option<&Host>,
                   port: Option<u16>,
                   addresses: &str| {
        for counters in [&shared.counters, &route.counters] {
            counters.denied.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = refusal_outcome(reason);
        if outcome.is_refusal() {
            audit::refused(&audit::Decision {
                route: route_name,
                peer,
                requested: host.map(|h| h as &dyn std::fmt::Display),
                port,
                addresses,
                outcome,
                message,
            });
        } else {
            tracing::debug!(reason, "connection closed before its request: {message}");
        }
        outcome
    };
    let request = match read_request(client, &settings.destination).await {
        Ok(request) => request,
        Err((reason, message, status)) => {
            let outcome = refused(reason, &message, None, None, audit::NO_ADDRESSES);
            if let Some(status) = status {
                connect::refuse(client, status, &message).await;
            }
            return Err(outcome);
        }
    };
    let (host, port) = (&request.host, request.port);
    let policy = shared.policy.get();
    let dynamic = !matches!(settings.destination, Destination::Fixed { .. });
    if dynamic {
        if let Err(denial) = policy.admits_request(host, port) {
            let message = format!(
                "{} is not allowed: {denial}",
                Target {
                    host: host.clone(),
                    port
                }
            );
            let outcome = refused(
                "denied",
                &message,
                Some(host),
                Some(port),
                audit::NO_ADDRESSES,
            );
            if request.connect {
                connect::refuse(client, 403, &message).await;
            }
            return Err(outcome);
        }
    }
    let connecting = Instant::now();
    let dns = shared.dns.get();
    let connected = upstream::connect(&policy, &dns, host, port, &shared.upstream).await;
    drop(policy);
    let (mut upstream, addr, tried) = match connected {
        Ok(ok) => ok,
        Err(e) => {
            let message = e.to_string();
            let outcome = refused(e.kind(), &message, Some(host), Some(port), &e.addresses());
            if request.connect {
                connect::refuse(client, connect_status(&e), &message).await;
            }
            return Err(outcome);
        }
    };
    route
        .metrics
        .connect_duration
        .observe(connecting.elapsed().as_secs_f64());
    tracing::Span::current().record("upstream", tracing::field::display(addr));
    if audit::records_allowed() {
        audit::allowed(&audit::Decision {
            route: route_name,
            peer,
            requested: Some(host),
            port: Some(port),
            addresses: &tried,
            outcome: Outcome::Completed,
            message: &format!("relaying to {addr}"),
        });
    }
    if request.connect {
        if let Err(e) = connect::established(client).await {
            tracing::debug!(error = %e, "the CONNECT client left before 200");
            return Err(Outcome::ClientError);
        }
    }
    if !request.early.is_empty() {
        if let Err(e) = upstream.write_all(&request.early).await {
            warn!(error = %e, "connection closed: cannot send the first bytes upstream");
            return Err(Outcome::UpstreamError);
        }
        route.metrics.to_upstream.inc_by(request.early.len() as u64);
    }
    Ok(Ready {
        upstream,
        addr,
        host: request.host,
        port: request.port,
        dynamic,
        early: request.early.len() as u64,
    })
}
