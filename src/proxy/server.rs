//! The daemon's listeners, who gets in, and graceful shutdown.
//!
//! This module owns the listening sockets and admission: the accept loop
//! ([`crate::net::accept::run`]) accepts from the listener of every route and takes listeners in
//! and out as a reload adds and removes routes ([`Command`]); admission enforces
//! `--max-connections`, each route's `max_connections` and `--max-connections-per-peer` by
//! closing excess connections at once, and hands each admitted one, with its slots, to
//! [`connection::spawn`]. On shutdown it stops accepting, lets open connections finish for the
//! drain timeout, then returns. A removed route drains the same way on its own
//! ([`drain_removed_route`]).
//!
//! The loop also beats a [`Heartbeat`] (systemd's watchdog) between accepts, so the pings stop
//! when the loop itself is stuck — not merely when some other task still runs; and keeps beating
//! while the daemon drains.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::net::accept::{Heartbeat, Pulse};
use crate::net::endpoint::{Endpoint, Listener, Stream};
use crate::ops::audit;
use crate::ops::metrics::Outcome;
use crate::proxy::connection;
use crate::proxy::ingress;
use crate::proxy::peers::PeerSlot;
use crate::proxy::route::{Destination, Route, RouteSlot};
use crate::proxy::shared::Shared;

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
    route
        .counters
        .log("route removed", Some(&route.listen), None);
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
        // A load balancer's connection counts for the client its PROXY header names, which
        // only the connection itself reads (`ingress::serve` takes that slot).
        let header_first = match &route.settings().destination {
            Destination::Ingress(spec) => ingress::reads_header(spec, &stream),
            _ => false,
        };
        let peer_slot = || match header_first {
            true => Ok(None),
            false => self
                .shared
                .peers
                .try_reserve(audit::peer_key(&peer))
                .map(Some),
        };
        let limit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => match route.try_reserve() {
                Ok(slot) => match peer_slot() {
                    Ok(peer_slot) => {
                        let id = self.next_id;
                        let slots = Slots {
                            _global: permit,
                            _route: slot,
                            _peer: peer_slot,
                        };
                        return connection::spawn(
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
            reason: None,
            message: &format!("connection limit reached ({limit}); closing new connections"),
        });
    }
}

/// The slots one connection holds; dropping them (however the task ends) gives them back.
struct Slots {
    _global: OwnedSemaphorePermit,
    _route: RouteSlot,
    /// `None` for a load balancer's connection: its client's slot is the connection's own.
    _peer: Option<PeerSlot>,
}
