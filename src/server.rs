//! The accept loop, the connection limits and graceful shutdown.
//!
//! This module owns the life of the listening sockets and of every connection task: one loop
//! accepts from the listener of every route (backing off on errors such as EMFILE instead of
//! spinning or exiting), takes listeners in and out as a reload adds and removes routes
//! ([`Command`]), enforces `--max-connections` and each route's `max_connections` by closing
//! excess connections at once, runs one [`handle`] task per connection inside its own
//! `conn{route id peer}` span, and on shutdown stops accepting, lets open connections finish for
//! the drain timeout, then returns. A removed route drains the same way on its own
//! ([`drain_removed_route`]).
//!
//! The loop also beats a [`Heartbeat`] (systemd's watchdog) between accepts, so the pings stop
//! when the loop itself is stuck — not merely when some other task still runs.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use crate::dns::Dns;
use crate::endpoint::{Endpoint, Listener, Stream};
use crate::policy::Policy;
use crate::relay::relay;
use crate::route::{Counters, Route, RouteSlot};
use crate::upstream;

/// Everything a connection needs, shared by all of them.
pub struct Shared {
    /// The current policy; replaced whole on reload, so a connection sees one consistent version.
    pub policy: RwLock<Arc<Policy>>,
    pub dns: Dns,
    pub connect_timeout: Duration,
    /// Totals over every route, including removed ones.
    pub counters: Counters,
    /// The routes being served, in configuration order (for reload and STATUS=).
    pub routes: RwLock<Vec<Arc<Route>>>,
}

impl Shared {
    pub fn new(policy: Policy, dns: Dns, connect_timeout: Duration) -> Shared {
        Shared {
            policy: RwLock::new(Arc::new(policy)),
            dns,
            connect_timeout,
            counters: Counters::default(),
            routes: RwLock::new(Vec::new()),
        }
    }

    /// The policy as of now.
    pub fn policy(&self) -> Arc<Policy> {
        // A poisoned lock still holds a whole Arc: a panic cannot leave it half-written.
        match self.policy.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `policy` the one new connections use.
    pub fn replace_policy(&self, policy: Policy) {
        let new = Arc::new(policy);
        match self.policy.write() {
            Ok(mut guard) => *guard = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// The routes being served, as of now.
    pub fn routes(&self) -> Vec<Arc<Route>> {
        match self.routes.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `routes` the routes being served.
    pub fn replace_routes(&self, routes: Vec<Arc<Route>>) {
        match self.routes.write() {
            Ok(mut guard) => *guard = routes,
            Err(poisoned) => *poisoned.into_inner() = routes,
        }
    }
}

/// A route's listener, as the accept loop holds it.
pub struct Served {
    pub listener: Listener,
    pub route: Arc<Route>,
    /// A unix socket file this process created, removed when the listener is dropped (one that
    /// systemd passed belongs to the .socket unit and stays).
    pub socket_file: Option<PathBuf>,
}

impl Drop for Served {
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

/// Something to call regularly from the accept loop while it is alive (the watchdog ping).
pub struct Heartbeat {
    pub every: Duration,
    pub beat: Box<dyn Fn() + Send + Sync>,
}

/// Waits for the next heartbeat tick and beats; never resolves without a heartbeat.
async fn next_beat(heartbeat: &mut Option<(tokio::time::Interval, Heartbeat)>) {
    match heartbeat {
        Some((interval, heartbeat)) => {
            interval.tick().await;
            (heartbeat.beat)();
        }
        None => std::future::pending().await,
    }
}

const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const OVER_LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Serves `served` (and whatever `commands` adds) until `shutdown` resolves, then drains.
/// Returns how many connections were still open when the drain timeout ran out (they are
/// closed when the runtime stops).
pub async fn serve(
    served: Vec<Served>,
    shared: Arc<Shared>,
    limits: ServerLimits,
    commands: mpsc::UnboundedReceiver<Command>,
    shutdown: impl std::future::Future<Output = ()>,
    heartbeat: Option<Heartbeat>,
) -> usize {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut heartbeat = heartbeat.map(|h| {
        let mut interval = tokio::time::interval(h.every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (interval, h)
    });
    let mut accept = AcceptLoop {
        served,
        shared: shared.clone(),
        permits: permits.clone(),
        max_connections: limits.max_connections,
        commands,
        over_limit: OverLimitLog::default(),
    };
    tokio::select! {
        _ = accept.run(&mut heartbeat) => {}
        _ = shutdown => {}
    }
    drop(accept);
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
                _ = next_beat(&mut heartbeat) => {}
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

/// The accept loop's state.
struct AcceptLoop {
    served: Vec<Served>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    max_connections: usize,
    commands: mpsc::UnboundedReceiver<Command>,
    over_limit: OverLimitLog,
}

/// What woke the accept loop.
enum Wake {
    Command(Option<Command>),
    Accepted(usize, std::io::Result<(Stream, String)>),
}

impl AcceptLoop {
    async fn run(&mut self, heartbeat: &mut Option<(tokio::time::Interval, Heartbeat)>) {
        let mut backoff = ACCEPT_BACKOFF_START;
        let mut resume_at: Option<Instant> = None;
        let mut next_listener = 0;
        let mut next_id: u64 = 0;
        let mut commands_open = true;
        loop {
            // Accepting is cancel-safe, so a heartbeat tick or a command may interrupt the wait
            // at any point.
            let wake = tokio::select! {
                biased;
                _ = next_beat(heartbeat) => continue,
                command = self.commands.recv(), if commands_open => Wake::Command(command),
                (index, accepted) = accept_any(&self.served, &mut next_listener, resume_at) => {
                    Wake::Accepted(index, accepted)
                }
            };
            let (index, accepted) = match wake {
                Wake::Command(Some(command)) => {
                    self.apply(command);
                    continue;
                }
                Wake::Command(None) => {
                    commands_open = false;
                    continue;
                }
                Wake::Accepted(index, accepted) => (index, accepted),
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF_START;
                    resume_at = None;
                    accepted
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: wait a little and keep serving.
                    warn!(error = %e, retry_in = ?backoff, "accept failed");
                    resume_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            next_id += 1;
            let route = self.served[index].route.clone();
            if let Some((permit, slot)) = self.admit(&route, &peer) {
                spawn_connection(stream, peer, next_id, route, permit, slot, &self.shared);
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Add(served) => {
                info!(route = %served.route.listen, "accepting on a new route");
                self.served.push(served);
            }
            Command::Remove(listen, done) => {
                // Dropping the listener closes it: new connects are refused from here on.
                self.served.retain(|s| s.route.listen != listen);
                let _ = done.send(());
            }
        }
    }

    /// A global permit and a route slot for a new connection, or `None` after closing it.
    fn admit(
        &mut self,
        route: &Arc<Route>,
        peer: &str,
    ) -> Option<(OwnedSemaphorePermit, RouteSlot)> {
        let limit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => match route.try_reserve() {
                Ok(slot) => return Some((permit, slot)),
                Err(route_max) => format!("the route's max_connections ({route_max})"),
            },
            Err(_) => format!("--max-connections ({})", self.max_connections),
        };
        // Closing at once tells the enclave now, instead of leaving it hanging in a queue.
        for counters in [&self.shared.counters, &route.counters] {
            counters.rejected_over_limit.fetch_add(1, Ordering::Relaxed);
        }
        self.over_limit.note(&route.listen, peer, &limit);
        None
    }
}

fn spawn_connection(
    stream: Stream,
    peer: String,
    id: u64,
    route: Arc<Route>,
    permit: OwnedSemaphorePermit,
    slot: RouteSlot,
    shared: &Arc<Shared>,
) {
    for counters in [&shared.counters, &route.counters] {
        counters.accepted.fetch_add(1, Ordering::Relaxed);
    }
    shared.counters.open.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("conn", route = %route.listen, id, peer = %peer, upstream = tracing::field::Empty);
    let shared = shared.clone();
    let tasks = route.tasks.clone();
    tasks.spawn(
        async move {
            tokio::select! {
                _ = handle(stream, &route, &shared) => {}
                _ = route.closed.cancelled() => {
                    info!("connection closed: its route was removed and the drain timeout ran out");
                }
            }
            shared.counters.open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
            drop(permit);
        }
        .instrument(span),
    );
}

/// Polls every listener once, starting after the one that accepted last (so a busy listener
/// cannot starve the others). Returns which listener accepted.
fn poll_accept_any(
    served: &[Served],
    next: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<(usize, std::io::Result<(Stream, String)>)> {
    let n = served.len();
    for i in 0..n {
        let index = (*next + i) % n;
        if let Poll::Ready(result) = served[index].listener.poll_accept(cx) {
            *next = (index + 1) % n;
            return Poll::Ready((index, result));
        }
    }
    Poll::Pending
}

/// Waits out a back-off (if any), then accepts from any listener.
async fn accept_any(
    served: &[Served],
    next: &mut usize,
    resume_at: Option<Instant>,
) -> (usize, std::io::Result<(Stream, String)>) {
    if let Some(at) = resume_at {
        tokio::time::sleep_until(at).await;
    }
    std::future::poll_fn(|cx| poll_accept_any(served, next, cx)).await
}

/// Logs connections closed over a limit, at most once per interval.
#[derive(Default)]
struct OverLimitLog {
    last: Option<Instant>,
    since_last: u64,
}

impl OverLimitLog {
    fn note(&mut self, route: &Endpoint, peer: &str, limit: &str) {
        self.since_last += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < OVER_LIMIT_LOG_INTERVAL)
        {
            return;
        }
        warn!(
            route = %route,
            rejected = self.since_last,
            peer = %peer,
            "connection limit reached ({limit}); closing new connections"
        );
        self.last = Some(now);
        self.since_last = 0;
    }
}

/// One enclave connection: enforce the policy, connect, relay, log how it ended.
async fn handle(client: Stream, route: &Route, shared: &Shared) {
    let started = Instant::now();
    let settings = route.settings();
    let target = &settings.target;
    let policy = shared.policy();
    let connected = upstream::connect(
        &policy,
        &shared.dns,
        &target.host,
        target.port,
        shared.connect_timeout,
    )
    .await;
    drop(policy);
    let (upstream, addr) = match connected {
        Ok(ok) => ok,
        Err(e) => {
            for counters in [&shared.counters, &route.counters] {
                counters.denied.fetch_add(1, Ordering::Relaxed);
            }
            warn!(
                remote = %target.host,
                port = target.port,
                reason = e.kind(),
                "connection refused: {e}"
            );
            return;
        }
    };
    tracing::Span::current().record("upstream", tracing::field::display(addr));
    tracing::debug!("relaying");
    let report = relay(client, upstream, settings.idle_timeout).await;
    info!(
        bytes_to_upstream = report.to_upstream,
        bytes_to_client = report.to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        end = %report.end,
        "connection closed"
    );
}
