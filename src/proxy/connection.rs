//! One connection's life, top to bottom: the route's kind says what to read, the request says
//! where to, the policy says whether, then connect upstream, answer the client, relay.
//!
//! This module owns everything between an admitted connection and its close. [`spawn`] starts
//! its task (counted as open, cut short when its removed route's drain timeout runs out). Its
//! lines name it by the `conn{route id peer enclave upstream}` fields: in a span for the whole
//! set-up when logging below INFO, else in a span made for each refusal or warning, and on the
//! close line itself (a relayed connection at INFO makes no span: see the README's Logs).
//! [`Connection::run`] calls the phases in order: `read_request`, `check_policy`, `connect`
//! and `answer`, all within `--setup-timeout`, then `hand_over`; `Relaying::relay` relays
//! until the connection ends, goes idle, reaches `--max-lifetime` or is revoked by a reload.
//! The two halves run in one task but the set-up's state is boxed and freed at the hand-over,
//! so an open, idle connection keeps only a `Relaying` and its relay's state (see [`spawn`]).
//! A connection turned away in the first three is one [`Refusal`], recorded (counters,
//! audit trail) before the client is answered (`refuse`), so the log never trails what the
//! enclave saw.
//!
//! A CONNECT route with `sni: require` has one more phase inside `answer`: after `200
//! Connection Established` (sent only once the upstream is connected, so that an unreachable
//! one still gets its `502`), the first bytes in the tunnel must be a ClientHello naming the
//! CONNECT host (for an IP address: no name, or one the allowlist names), and nothing reaches
//! the upstream before it is judged. Without it, a tunnel to an allowlisted name could carry a
//! ClientHello for another name served from the same (CDN) address.
//!
//! Before any of it, the peer is identified ([`crate::policy::enclaves`]: its CID, or a `tcp:`
//! peer's source, looked up in `enclaves:`; the running enclaves' table asked for a CID it does
//! not list): the entries it matches give the policy the connection is decided by (the
//! top-level allowlist plus theirs), label its logs and audit events (`enclave=`), and a route
//! with `enclaves:` refuses a peer that matches none of its ids at once
//! (`reason="enclave_not_allowed"`).
//!
//! Admission (the connection limits) is [`crate::proxy::server`]'s, which calls [`spawn`]; this
//! module does not import it.

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::future::Either;
use futures_util::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::level_filters::LevelFilter;
use tracing::{info, warn, Instrument, Span};

use crate::config::remote::Target;
use crate::config::Ech;
use crate::net::endpoint::Stream;
use crate::net::relay::{relay, LiveBytes, Side};
use crate::ops::audit;
use crate::ops::metrics::Outcome;
use crate::policy::enclaves::{Matched, PeerIdentity, PolicySet};
use crate::policy::host::{Host, HostName};
use crate::policy::Policy;
use crate::proxy::dns;
use crate::proxy::ingress;
use crate::proxy::refusal::{Expected, Refusal};
use crate::proxy::request::{connect, sni};
use crate::proxy::revoke::{OpenConnection, Recheck, Registration};
use crate::proxy::route::{Destination, Route, Settings};
use crate::proxy::shared::Shared;
use crate::proxy::upstream;

/// Starts the task of one admitted connection and counts it as open until it ends. `slots` is
/// what admission reserved for it (the connection limits' slots), given back by dropping it
/// when the task ends, however it ends.
pub fn spawn(
    stream: Stream,
    peer: String,
    id: u64,
    route: Arc<Route>,
    slots: impl Send + 'static,
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
    // A span for the whole life only when something logs below INFO (the debug lines of the
    // request, the lookups and the connect read their context from it). At the default level
    // a connection makes none: the few lines it may write carry their span made for them
    // (`Connection::log_span`), and the close line carries every field itself.
    let span = if LevelFilter::current() >= LevelFilter::DEBUG {
        conn_span(&route.listen, id, &peer, None, None)
    } else {
        Span::none()
    };
    let tasks = route.tasks.clone();
    let opened = Opened {
        stream,
        peer,
        id,
        route,
        shared: shared.clone(),
        span,
    };
    // Two phases in one task, so that a relaying connection's task is only as large as what
    // relaying needs: the set-up's state (boxed) is freed when it hands over to the relay.
    tasks.spawn(Box::pin(opened.set_up()).then(move |next| next.finish(slots)));
}

/// An admitted connection, before anything is known about it.
struct Opened {
    stream: Stream,
    peer: String,
    id: u64,
    route: Arc<Route>,
    shared: Arc<Shared>,
    span: Span,
}

impl Opened {
    /// Identifies the peer and sets the connection up ([`Connection::run`]; a dns or ingress
    /// route's connection is served to its end there), cut short when its removed route's drain
    /// timeout runs out. Returns what comes next: the end, or the relay.
    async fn set_up(self) -> Next {
        let Opened {
            stream,
            peer,
            id,
            route,
            shared,
            span,
        } = self;
        let scope = Scope::of(&peer, &shared).instrument(span.clone()).await;
        span.record("enclave", tracing::field::display(&scope.label));
        let step = tokio::select! {
            step = Connection::new(stream, &peer, &route, &shared, &scope).logged_as(id, span).run() => step,
            _ = route.closed.cancelled() => Step::Ended(drained(&route, id, &peer, &scope.label)),
        };
        let Scope {
            set,
            matched,
            label,
            ..
        } = scope;
        let ending = Ending {
            route,
            shared,
            set,
            matched,
        };
        match step {
            Step::Ended(outcome) => Next::Ended(ending, outcome),
            Step::Relay(handover) => Next::Relay(Relaying {
                handover,
                peer: peer.into_boxed_str(),
                id,
                enclave: label,
                ending,
            }),
        }
    }
}

/// A removed route's drain timeout ran out: logs it, returns the outcome.
fn drained(route: &Route, id: u64, peer: &str, enclave: &str) -> Outcome {
    conn_span(&route.name, id, peer, Some(enclave), None).in_scope(|| {
        info!("connection closed: its route was removed and the drain timeout ran out")
    });
    Outcome::Drained
}

/// What the set-up phase ends with.
// Not boxed: it is moved once, and a box would be one more allocation per connection.
#[allow(clippy::large_enum_variant)]
enum Next {
    Ended(Ending, Outcome),
    Relay(Relaying),
}

impl Next {
    /// The rest of the connection's life: nothing more, or the relay; then its end is counted
    /// and `slots` given back.
    fn finish<S: Send + 'static>(
        self,
        slots: S,
    ) -> Either<std::future::Ready<()>, impl Future<Output = ()> + Send> {
        match self {
            Next::Ended(ending, outcome) => {
                ending.close(outcome, slots);
                Either::Left(std::future::ready(()))
            }
            Next::Relay(relaying) => Either::Right(relaying.run(slots)),
        }
    }
}

/// What a connection's end is counted in: the process's and its route's gauges and counters,
/// and its `enclaves:` entries'.
struct Ending {
    route: Arc<Route>,
    shared: Arc<Shared>,
    set: Arc<PolicySet>,
    matched: Matched,
}

impl Ending {
    /// Counts the end (`outcome`) and gives `slots` back.
    fn close(self, outcome: Outcome, slots: impl Send) {
        let metrics = crate::ops::metrics::global();
        metrics.connection_ended(&self.route.metrics, outcome);
        metrics.enclave_connection_ended(self.set.ids(&self.matched), outcome);
        self.route.metrics.open.dec();
        let open_now = self
            .shared
            .counters
            .open
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        drop(slots);
        crate::ops::heap::closed(open_now as usize);
    }
}

/// What the set-up hands the relay: the two sockets, registered for readiness and for revocation.
struct Handover {
    client: Side,
    upstream: Side,
    /// The upstream address reached.
    addr: SocketAddr,
    /// Bytes already sent upstream (the ClientHello, what followed a CONNECT head).
    early: u64,
    /// When the connection was accepted (for `--max-lifetime` and its duration).
    started: Instant,
    idle_timeout: Option<std::time::Duration>,
    registration: Registration,
}

/// A relaying connection: all that an open, idle connection keeps (see [`spawn`]).
struct Relaying {
    handover: Handover,
    peer: Box<str>,
    id: u64,
    /// The `enclave` field of its lines and audit events.
    enclave: Cow<'static, str>,
    ending: Ending,
}

impl Relaying {
    /// Relays to the end, closes both sockets, then counts the end and gives `slots` back.
    // Not an `async fn`: its state would hold `self` twice (the argument, and the local it is
    // moved into); the block keeps the one it captured and borrows it.
    #[allow(clippy::manual_async_fn)]
    fn run<S: Send + 'static>(self, slots: S) -> impl Future<Output = ()> + Send {
        async move {
            let outcome = self.relay().await;
            let Relaying {
                handover, ending, ..
            } = self;
            drop(handover);
            ending.close(outcome, slots);
        }
    }

    /// The span of the rare lines before the close line (a revocation, --max-lifetime).
    fn later_span(&self) -> Span {
        conn_span(
            &self.ending.route.name,
            self.id,
            &self.peer,
            Some(&self.enclave),
            Some(self.handover.addr),
        )
    }

    /// Relays until the connection ends, goes idle, reaches `--max-lifetime`, is revoked by a
    /// reload, or its removed route's drain timeout runs out. Returns how it ended.
    async fn relay(&self) -> Outcome {
        let Handover {
            client,
            upstream,
            addr,
            early,
            started,
            idle_timeout,
            registration,
        } = &self.handover;
        let route = &*self.ending.route;
        let lifetimes = &self.ending.shared.lifetimes;
        let live = LiveBytes {
            to_upstream: route.metrics.to_upstream.inner(),
            to_client: route.metrics.to_client.inner(),
        };
        let lifetime = lifetimes.expiry(*started);
        // Biased: the relay is polled first on every wake-up (nearly all of them are its),
        // the waits for a revocation, the lifetime and a drain after it.
        tokio::select! {
            biased;
            report = relay(client, upstream, *idle_timeout, &live, lifetimes.relay_mode) => {
                info!(
                    route = %route.name,
                    id = self.id,
                    peer = %self.peer,
                    enclave = %self.enclave,
                    upstream = %addr,
                    bytes_to_upstream = report.to_upstream + early,
                    bytes_to_client = report.to_client,
                    duration_ms = started.elapsed().as_millis() as u64,
                    end = %report.end,
                    "connection closed"
                );
                Outcome::from(&report.end)
            }
            _ = registration.revoked() => {
                let why = registration.reason();
                let _span = self.later_span().entered();
                let (requested, port) = match &registration.connection().check {
                    Recheck::Upstream { host, port, .. } => (Some(host as &dyn std::fmt::Display), Some(*port)),
                    Recheck::Source { .. } => (None, None),
                };
                audit::refused(&audit::Decision {
                    route: &route.name,
                    peer: &self.peer,
                    enclave: &self.enclave,
                    requested,
                    port,
                    addresses: &format!("{} denied ({why})", addr.ip()),
                    outcome: Outcome::Revoked,
                    reason: None,
                    message: &format!("closed by reload: {why}"),
                });
                Outcome::Revoked
            }
            _ = lifetime => {
                let _span = self.later_span().entered();
                info!(
                    duration_ms = started.elapsed().as_millis() as u64,
                    "connection closed: --max-lifetime reached"
                );
                Outcome::MaxLifetime
            }
            _ = route.closed.cancelled() => drained(route, self.id, &self.peer, &self.enclave),
        }
    }
}

/// How [`Connection::run`] ended: the connection's end, or the hand-over to the relay.
enum Step {
    Ended(Outcome),
    Relay(Handover),
}

/// The `conn{route id peer enclave client upstream}` span a connection's lines are written in
/// (`client`: an ingress connection's client when a load balancer's PROXY header names it;
/// `enclave` and `upstream` recorded once known, or given here when they are).
fn conn_span(
    route: &dyn std::fmt::Display,
    id: u64,
    peer: &str,
    enclave: Option<&str>,
    upstream: Option<SocketAddr>,
) -> Span {
    let span = tracing::info_span!("conn", route = %route, id, peer = %peer, enclave = tracing::field::Empty, client = tracing::field::Empty, upstream = tracing::field::Empty);
    if let Some(enclave) = enclave {
        span.record("enclave", tracing::field::display(enclave));
    }
    if let Some(upstream) = upstream {
        span.record("upstream", tracing::field::display(upstream));
    }
    span
}

/// Who a connection's peer is, as the policy sees it: the `enclaves:` entries it matched (in
/// the policies as of its accept) and what that lets it reach.
pub struct Scope {
    pub identity: PeerIdentity,
    pub set: Arc<PolicySet>,
    pub matched: Matched,
    /// The matched ids, comma-separated, or `-`: the `enclave` field of logs and audit events.
    pub label: Cow<'static, str>,
    /// The top-level allowlist plus the matched entries'.
    pub policy: Policy,
}

impl Scope {
    /// Identifies `peer` (running `--enclaves-command` first for a CID its table does not list,
    /// see [`crate::proxy::identity::Identity::table_for`]) against the current policies.
    pub async fn of(peer: &str, shared: &Shared) -> Scope {
        let set = shared.policy.get();
        let identity = PeerIdentity::from_peer(peer);
        if set.is_empty() {
            return Scope {
                identity,
                policy: set.base(),
                set,
                matched: Matched::default(),
                label: Cow::Borrowed("-"),
            };
        }
        let table = if set.needs_table() {
            shared.enclaves.table_for(&identity).await
        } else {
            shared.enclaves.table()
        };
        let matched = set.matching(&identity, &table);
        Scope {
            identity,
            label: set.label(&matched).into(),
            policy: set.for_matched(&matched),
            set,
            matched,
        }
    }

    /// Whether a route with `enclaves:` (`Some`) lets this peer in.
    pub fn may_use(&self, route_enclaves: Option<&[String]>) -> bool {
        match route_enclaves {
            None => true,
            Some(ids) => self.set.any_of(&self.matched, ids),
        }
    }
}

/// One enclave connection, from accept to close; see the module docs.
pub struct Connection<'a> {
    client: Stream,
    peer: &'a str,
    route: &'a Route,
    shared: &'a Shared,
    scope: &'a Scope,
    /// The route's listen address, as logged and audited.
    route_name: Arc<str>,
    /// The route's settings as of this connection: a reload changes them for later ones only.
    settings: Arc<Settings>,
    /// The connection's number, as logged.
    id: u64,
    /// Its span for the whole set-up when logging below INFO, else none (see [`spawn`]).
    span: Span,
}

/// Where one connection asked to go, and what it already sent.
struct Request {
    target: Target,
    /// Bytes read to decide (a ClientHello, what followed a CONNECT head), sent on first.
    early: Vec<u8>,
}

/// The upstream connection made for a request.
struct Upstream {
    stream: TcpStream,
    /// The address it reached.
    addr: SocketAddr,
    /// Each address tried and what became of it, for the audit trail.
    tried: String,
}

/// A connection ready to relay.
struct Ready {
    upstream: TcpStream,
    addr: SocketAddr,
    target: Target,
    /// Bytes already sent upstream (the ClientHello, what followed a CONNECT head).
    early: u64,
    /// The server name a CONNECT tunnel to an IP address was let through with (`sni: require`),
    /// which only a name entry allowed: a reload checks it again too.
    server_name: Option<HostName>,
}

impl<'a> Connection<'a> {
    pub fn new(
        client: Stream,
        peer: &'a str,
        route: &'a Route,
        shared: &'a Shared,
        scope: &'a Scope,
    ) -> Connection<'a> {
        Connection {
            client,
            peer,
            route,
            shared,
            scope,
            route_name: route.name.clone(),
            settings: route.settings(),
            id: 0,
            span: Span::none(),
        }
    }

    /// Its number and, when logging below INFO, its span (see [`spawn`]).
    pub fn logged_as(mut self, id: u64, span: Span) -> Connection<'a> {
        self.id = id;
        self.span = span;
        self
    }

    /// The span one of its lines is written in: its own, or when it has none (the default
    /// level), one made now with the fields known so far. Refusals and warnings are rare, an
    /// allowed connection at INFO makes none.
    fn log_span(&self, upstream: Option<SocketAddr>) -> Span {
        if self.span.is_none() {
            conn_span(
                &self.route_name,
                self.id,
                self.peer,
                Some(&self.scope.label),
                upstream,
            )
        } else {
            self.span.clone()
        }
    }

    /// The whole life: set up within `--setup-timeout`, then relay; a dns route's connection
    /// instead carries queries, each answered by the policy ([`dns::serve`]). Returns how it
    /// ended.
    async fn run(mut self) -> Step {
        if !self.scope.may_use(self.settings.spec.enclaves.as_deref()) {
            return Step::Ended(self.log_span(None).in_scope(|| self.refuse_enclave()));
        }
        // The dns and ingress routes' futures are boxed: an async fn's state is as large as the
        // largest future it awaits, and theirs would otherwise be carried by every relayed
        // connection's task.
        if self.settings.destination == Destination::Dns {
            let idle_timeout = self.settings.spec.idle_timeout;
            let span = self.log_span(None);
            return Step::Ended(
                Box::pin(dns::serve(
                    self.client,
                    self.peer,
                    &self.route_name,
                    idle_timeout,
                    self.shared,
                    dns::Asker {
                        policy: &self.scope.policy,
                        enclave: &self.scope.label,
                    },
                ))
                .instrument(span)
                .await,
            );
        }
        if let Destination::Ingress(spec) = &self.settings.destination {
            let span = self.log_span(None);
            return Step::Ended(
                Box::pin(ingress::serve(
                    self.client,
                    self.peer,
                    self.route,
                    &self.settings,
                    spec,
                    self.shared,
                ))
                .instrument(span)
                .await,
            );
        }
        let started = Instant::now();
        let setup_timeout = self.shared.lifetimes.setup_timeout;
        // Boxed with its timer: the set-up's state (DNS lookups, connect attempts, the deadline)
        // is freed once it is done, instead of being part of every idle connection's task.
        let span = self.span.clone();
        let setup = Box::pin(tokio::time::timeout(setup_timeout, self.set_up()))
            .instrument(span)
            .await;
        let ready = match setup {
            Ok(Ok(ready)) => ready,
            Ok(Err(outcome)) => return Step::Ended(outcome),
            Err(_) => {
                self.log_span(None).in_scope(|| warn!(
                    setup_timeout = %humantime::format_duration(setup_timeout),
                    "connection closed: not relaying within --setup-timeout (request, DNS, policy and connect)"
                ));
                return Step::Ended(Outcome::SetupTimeout);
            }
        };
        self.hand_over(ready, started)
    }

    /// Everything before relaying: where to and whether (or the refusal, recorded and
    /// answered), then the answer. `Err` is how the connection ended.
    async fn set_up(&mut self) -> Result<Ready, Outcome> {
        // One version of the policy for the request, every address and a CONNECT tunnel's
        // ClientHello: a reload in between cannot have one connection judged by two allowlists.
        let scope = self.scope;
        let policy = &scope.policy;
        let (request, upstream) = match self.decide(policy).await {
            Ok(decided) => decided,
            Err(refusal) => return Err(self.refuse(refusal, None).await),
        };
        self.answer(policy, request, upstream).await
    }

    /// The request, the policy's word on it and the upstream connect.
    async fn decide(&mut self, policy: &Policy) -> Result<(Request, Upstream), Refusal> {
        let request = self.read_request().await?;
        self.check_policy(policy, &request)?;
        let upstream = self.connect(policy, &request).await?;
        Ok((request, upstream))
    }

    /// Reads what the route's kind needs to know where the connection goes: nothing for a
    /// fixed route, a ClientHello for `sni: require` and SNI routes, a head for CONNECT ones
    /// (whose tunnel's ClientHello, with `sni: require`, comes after the `200`: see
    /// [`Self::answer`]).
    async fn read_request(&mut self) -> Result<Request, Refusal> {
        match &self.settings.destination {
            Destination::Fixed {
                target,
                require_sni: None,
            } => Ok(Request {
                target: target.clone(),
                early: Vec::new(),
            }),
            Destination::Fixed {
                target,
                require_sni: Some(ech),
            } => {
                let hello = sni::read_client_hello(&mut self.client)
                    .await
                    .map_err(Refusal::Hello)?;
                let server_name = named_server(&hello, *ech)?;
                if Host::Name(server_name.clone()) != target.host {
                    return Err(Refusal::SniMismatch {
                        server_name: server_name.clone(),
                        expected: Expected::Remote(target.host.clone()),
                    });
                }
                Ok(Request {
                    target: target.clone(),
                    early: hello.bytes,
                })
            }
            Destination::Sni { port, ech } => {
                let hello = sni::read_client_hello(&mut self.client)
                    .await
                    .map_err(Refusal::Hello)?;
                let server_name = named_server(&hello, *ech)?.clone();
                Ok(Request {
                    target: Target {
                        host: Host::Name(server_name),
                        port: *port,
                    },
                    early: hello.bytes,
                })
            }
            // Served by `dns::serve` and `ingress::serve` from `run`; never a request to relay.
            Destination::Dns | Destination::Ingress(_) => {
                Err(Refusal::BadRequest(connect::BadRequest::Malformed(
                    "a dns route carries DNS queries, not a destination to relay to".into(),
                )))
            }
            Destination::Connect { .. } => {
                let request = connect::read_request(&mut self.client)
                    .await
                    .map_err(Refusal::BadRequest)?;
                Ok(Request {
                    target: Target {
                        host: request.host,
                        port: request.port,
                    },
                    early: request.after_head,
                })
            }
        }
    }

    /// Whether the allowlist could allow the host the enclave named (a CONNECT host, a TLS
    /// server name) at all, before any lookup. A fixed route's remote is the operator's; every
    /// address of either kind is still decided in [`Self::connect`].
    fn check_policy(&self, policy: &Policy, request: &Request) -> Result<(), Refusal> {
        if !self.dynamic() {
            return Ok(());
        }
        let Target { host, port } = &request.target;
        match policy.admits_request(host, *port) {
            Ok(_) => Ok(()),
            Err(denial) => Err(Refusal::Denied {
                target: request.target.clone(),
                denial,
            }),
        }
    }

    /// Resolves, decides every address and connects (see [`upstream::connect`]); records the
    /// connect's duration and the upstream reached (in the span).
    async fn connect(&self, policy: &Policy, request: &Request) -> Result<Upstream, Refusal> {
        let Target { host, port } = &request.target;
        let connecting = Instant::now();
        let dns = self.shared.dns.get();
        let (stream, addr, tried) =
            match upstream::connect(policy, &dns, host, *port, &self.shared.upstream).await {
                Ok(connected) => connected,
                Err(error) => {
                    return Err(Refusal::Upstream {
                        target: request.target.clone(),
                        error,
                    })
                }
            };
        self.route
            .metrics
            .connect_duration
            .observe(connecting.elapsed().as_secs_f64());
        self.span.record("upstream", tracing::field::display(addr));
        Ok(Upstream {
            stream,
            addr,
            tried,
        })
    }

    /// Tells a CONNECT client `200` (and, with `sni: require`, judges the ClientHello in its
    /// tunnel), records the decision in the audit trail when it records allowed connections,
    /// then sends upstream the bytes read to decide. `Err` is how the connection ended: the
    /// client or the upstream went away, or the tunnel's first bytes were refused.
    async fn answer(
        &mut self,
        policy: &Policy,
        mut request: Request,
        upstream: Upstream,
    ) -> Result<Ready, Outcome> {
        let Upstream {
            mut stream,
            addr,
            tried,
        } = upstream;
        let mut server_name = None;
        if let Destination::Connect { require_sni } = self.settings.destination {
            if let Err(e) = connect::established(&mut self.client).await {
                tracing::debug!(error = %e, "the CONNECT client left before 200");
                return Err(Outcome::ClientError);
            }
            if let Some(ech) = require_sni {
                let start = std::mem::take(&mut request.early);
                match self.tunnel_hello(policy, &request.target, start, ech).await {
                    Ok((hello, name)) => {
                        request.early = hello;
                        server_name = name;
                    }
                    Err(refusal) => {
                        // Nothing was sent upstream: dropping `stream` closes it unused.
                        let refusal = Refusal::InTunnel {
                            target: request.target,
                            refusal: Box::new(refusal),
                        };
                        return Err(self.refuse(refusal, Some(addr)).await);
                    }
                }
            }
        }
        if audit::records_allowed() {
            let _span = self.log_span(Some(addr)).entered();
            audit::allowed(&audit::Decision {
                route: &self.route_name,
                peer: self.peer,
                enclave: &self.scope.label,
                requested: Some(&request.target.host),
                port: Some(request.target.port),
                addresses: &tried,
                outcome: Outcome::Completed,
                reason: None,
                message: &format!("relaying to {addr}"),
            });
        }
        if !request.early.is_empty() {
            if let Err(e) = stream.write_all(&request.early).await {
                self.log_span(Some(addr)).in_scope(
                    || warn!(error = %e, "connection closed: cannot send the first bytes upstream"),
                );
                return Err(Outcome::UpstreamError);
            }
            self.route
                .metrics
                .to_upstream
                .inc_by(request.early.len() as u64);
        }
        Ok(Ready {
            upstream: stream,
            addr,
            target: request.target,
            early: request.early.len() as u64,
            server_name,
        })
    }

    /// `sni: require` on a CONNECT route: reads the ClientHello the tunnel starts with (`start`
    /// is what followed the CONNECT head, the hello's beginning) and judges it against the
    /// CONNECT `target`: the server name must be its host name; for an IP address, the hello
    /// may name no server, or one the allowlist allows by name at the port (an address entry
    /// cannot vouch for a name). Returns the bytes read, to send upstream first, and for an IP
    /// address the server name admitted by name, if any.
    async fn tunnel_hello(
        &mut self,
        policy: &Policy,
        target: &Target,
        start: Vec<u8>,
        ech: Ech,
    ) -> Result<(Vec<u8>, Option<HostName>), Refusal> {
        let hello = sni::read_client_hello_after(&mut self.client, start)
            .await
            .map_err(Refusal::Hello)?;
        refuse_ech(&hello, ech)?;
        let mismatch = |server_name: &HostName, expected| {
            Err(Refusal::SniMismatch {
                server_name: server_name.clone(),
                expected,
            })
        };
        match (&target.host, hello.server_name) {
            (Host::Name(host), Some(name)) if name == *host => Ok((hello.bytes, None)),
            (Host::Name(host), Some(name)) => mismatch(&name, Expected::ConnectHost(host.clone())),
            (Host::Name(_), None) => Err(Refusal::Hello(sni::HelloError::NoServerName)),
            (Host::Ip(_), None) => Ok((hello.bytes, None)),
            (Host::Ip(_), Some(name)) => {
                match policy.admits_request(&Host::Name(name.clone()), target.port) {
                    Ok(_) => Ok((hello.bytes, Some(name))),
                    Err(_) => mismatch(&name, Expected::AllowlistedName { port: target.port }),
                }
            }
        }
    }

    /// Records a refusal (both counters of its outcome: `denied`, `dns_failure`, ..., then the
    /// audit trail, or a debug line for a client that left before its request), then answers a
    /// CONNECT client with its status. `upstream`: the address connected to, if it got that far.
    /// Returns how the connection ended.
    async fn refuse(&mut self, refusal: Refusal, upstream: Option<SocketAddr>) -> Outcome {
        let outcome = refusal.outcome();
        for counters in [&self.shared.counters, &self.route.counters] {
            counters.count_refusal(outcome);
        }
        let message = refusal.to_string();
        if outcome.is_refusal() {
            let target = refusal.target();
            let _span = self.log_span(upstream).entered();
            audit::refused(&audit::Decision {
                route: &self.route_name,
                peer: self.peer,
                enclave: &self.scope.label,
                requested: target.map(|t| &t.host as &dyn std::fmt::Display),
                port: target.map(|t| t.port),
                addresses: &refusal.addresses(),
                outcome,
                reason: None,
                message: &message,
            });
        } else {
            self.span.in_scope(|| {
                tracing::debug!(
                    reason = refusal.reason(),
                    "connection closed before its request: {message}"
                )
            });
        }
        if self.is_connect() {
            if let Some(status) = refusal.status() {
                connect::refuse(&mut self.client, status, &message).await;
            }
        }
        outcome
    }

    /// Registers the connection for revocation on reload and both sockets for the relay, and
    /// hands them over (see [`Relaying`]).
    fn hand_over(self, ready: Ready, started: Instant) -> Step {
        let registration = self.shared.relayed.register(OpenConnection {
            route: self.route.name.clone(),
            identity: self.scope.identity,
            check: Recheck::Upstream {
                host: ready.target.host,
                port: ready.target.port,
                upstream: ready.addr,
                dynamic: self.dynamic(),
                server_name: ready.server_name,
            },
        });
        self.span.in_scope(|| tracing::debug!("relaying"));
        let client = match Side::new(self.client) {
            Ok(side) => side,
            Err(e) => {
                // `log_span` without `self.client`, which is gone.
                let span = if self.span.is_none() {
                    conn_span(
                        &self.route_name,
                        self.id,
                        self.peer,
                        Some(&self.scope.label),
                        Some(ready.addr),
                    )
                } else {
                    self.span.clone()
                };
                span.in_scope(|| warn!(error = %e, "connection closed: cannot register the client socket for the relay"));
                return Step::Ended(Outcome::ClientError);
            }
        };
        Step::Relay(Handover {
            client,
            upstream: Side::from(ready.upstream),
            addr: ready.addr,
            early: ready.early,
            started,
            idle_timeout: self.settings.idle_timeout,
            registration,
        })
    }

    /// A route with `enclaves:` whose ids the peer matches none of: closed at once, nothing
    /// read, counted `denied`, audited `reason="enclave_not_allowed"`.
    fn refuse_enclave(&self) -> Outcome {
        let outcome = Outcome::Denied;
        for counters in [&self.shared.counters, &self.route.counters] {
            counters.count_refusal(outcome);
        }
        let ids = self
            .settings
            .spec
            .enclaves
            .as_deref()
            .unwrap_or_default()
            .join(", ");
        let peer_is = if self.scope.matched.is_empty() {
            "matches no `enclaves:` entry".to_owned()
        } else {
            format!("matches only {}", self.scope.label)
        };
        audit::refused(&audit::Decision {
            route: &self.route_name,
            peer: self.peer,
            enclave: &self.scope.label,
            requested: None,
            port: None,
            addresses: audit::NO_ADDRESSES,
            outcome,
            reason: Some("enclave_not_allowed"),
            message: &format!(
                "peer {} {peer_is}; the route admits only the enclaves {ids}",
                self.peer
            ),
        });
        outcome
    }

    /// A route whose destination the enclave names (CONNECT, SNI), not the operator.
    fn dynamic(&self) -> bool {
        !matches!(self.settings.destination, Destination::Fixed { .. })
    }

    /// A CONNECT route, whose client is answered with a status line.
    fn is_connect(&self) -> bool {
        matches!(self.settings.destination, Destination::Connect { .. })
    }
}

/// A ClientHello carrying ECH is refused unless the route has `ech: allow`: its server name is
/// only the outer, public one, so checking it would not check where the connection goes.
fn refuse_ech(hello: &sni::ClientHello, ech: Ech) -> Result<(), Refusal> {
    match (hello.ech, ech) {
        (true, Ech::Refuse) => Err(Refusal::Ech {
            server_name: hello.server_name.clone(),
        }),
        _ => Ok(()),
    }
}

/// The server name of a ClientHello a route checks by name (`mode: sni`, `sni: require` on a
/// fixed route): ECH refused unless allowed, then a name required.
fn named_server(hello: &sni::ClientHello, ech: Ech) -> Result<&HostName, Refusal> {
    refuse_ech(hello, ech)?;
    hello.name().map_err(Refusal::Hello)
}
