//! The accept loop, the connection limit and graceful shutdown.
//!
//! This module owns the life of the listening sockets and of every connection task: one loop
//! accepts from every listener (backing off on errors such as EMFILE instead of spinning or
//! exiting), enforces `--max-connections` by closing excess connections at once, runs one
//! [`handle`] task per connection inside its own tracing span, and on shutdown stops accepting,
//! lets open connections finish for the drain timeout, then returns.
//!
//! The loop also beats a [`Heartbeat`] (systemd's watchdog) between accepts, so the pings stop
//! when the loop itself is stuck — not merely when some other task still runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{info, warn, Instrument};

use crate::dns::Dns;
use crate::endpoint::{Listener, Stream};
use crate::policy::{Policy, Remote};
use crate::relay::relay;
use crate::upstream;

/// Everything a connection needs, shared by all of them.
pub struct Shared {
    /// The current policy; replaced whole on reload, so a connection sees one consistent version.
    pub policy: RwLock<Arc<Policy>>,
    pub dns: Dns,
    pub remote: Remote,
    pub remote_port: u16,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub counters: Counters,
}

impl Shared {
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
}

/// Live counters (for logs and sd_notify STATUS).
#[derive(Default, Debug)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub denied: AtomicU64,
    pub rejected_over_limit: AtomicU64,
    pub open: AtomicU64,
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

/// Serves `listeners` until `shutdown` resolves, then drains. Returns how many connections were
/// still open when the drain timeout ran out (they are closed when the runtime stops).
pub async fn serve(
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()>,
    heartbeat: Option<Heartbeat>,
) -> usize {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut heartbeat = heartbeat.map(|h| {
        let mut interval = tokio::time::interval(h.every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (interval, h)
    });
    tokio::select! {
        _ = accept_loop(&listeners, &shared, &permits, limits.max_connections, &mut heartbeat) => {}
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

/// Polls every listener once, starting after the one that accepted last (so a busy listener
/// cannot starve the others).
fn poll_accept_any(
    listeners: &[Listener],
    next: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<(Stream, String)>> {
    let n = listeners.len();
    for i in 0..n {
        let index = (*next + i) % n;
        if let Poll::Ready(result) = listeners[index].poll_accept(cx) {
            *next = (index + 1) % n;
            return Poll::Ready(result);
        }
    }
    Poll::Pending
}

/// Waits out a back-off (if any), then accepts from any listener.
async fn accept_any(
    listeners: &[Listener],
    next: &mut usize,
    resume_at: Option<Instant>,
) -> std::io::Result<(Stream, String)> {
    if let Some(at) = resume_at {
        tokio::time::sleep_until(at).await;
    }
    std::future::poll_fn(|cx| poll_accept_any(listeners, next, cx)).await
}

async fn accept_loop(
    listeners: &[Listener],
    shared: &Arc<Shared>,
    permits: &Arc<Semaphore>,
    max: usize,
    heartbeat: &mut Option<(tokio::time::Interval, Heartbeat)>,
) {
    let mut backoff = ACCEPT_BACKOFF_START;
    let mut resume_at: Option<Instant> = None;
    let mut next_listener = 0;
    let mut next_id: u64 = 0;
    let mut last_over_limit_log: Option<Instant> = None;
    let mut over_limit_since_log: u64 = 0;
    loop {
        // Accepting is cancel-safe, so a heartbeat tick may interrupt the wait at any point.
        let accepted = tokio::select! {
            biased;
            _ = next_beat(heartbeat) => continue,
            accepted = accept_any(listeners, &mut next_listener, resume_at) => accepted,
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Closing at once tells the enclave now, instead of leaving it hanging in a queue.
            drop(stream);
            shared
                .counters
                .rejected_over_limit
                .fetch_add(1, Ordering::Relaxed);
            over_limit_since_log += 1;
            let now = Instant::now();
            if last_over_limit_log.is_none_or(|t| now.duration_since(t) >= OVER_LIMIT_LOG_INTERVAL)
            {
                warn!(
                    max_connections = max,
                    rejected = over_limit_since_log,
                    peer = %peer,
                    "connection limit reached; closing new connections"
                );
                last_over_limit_log = Some(now);
                over_limit_since_log = 0;
            }
            continue;
        };
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", id = next_id, peer = %peer, upstream = tracing::field::Empty);
        let shared = shared.clone();
        tokio::spawn(
            async move {
                shared.counters.open.fetch_add(1, Ordering::Relaxed);
                handle(stream, &shared).await;
                shared.counters.open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// One enclave connection: enforce the policy, connect, relay, log how it ended.
async fn handle(client: Stream, shared: &Shared) {
    let started = Instant::now();
    let policy = shared.policy();
    let connected = upstream::connect(
        &policy,
        &shared.dns,
        &shared.remote,
        shared.remote_port,
        shared.connect_timeout,
    )
    .await;
    drop(policy);
    let (upstream, addr) = match connected {
        Ok(ok) => ok,
        Err(e) => {
            shared.counters.denied.fetch_add(1, Ordering::Relaxed);
            warn!(
                remote = %shared.remote,
                port = shared.remote_port,
                reason = e.kind(),
                "connection refused: {e}"
            );
            return;
        }
    };
    tracing::Span::current().record("upstream", tracing::field::display(addr));
    tracing::debug!("relaying");
    let report = relay(client, upstream, shared.idle_timeout).await;
    info!(
        bytes_to_upstream = report.to_upstream,
        bytes_to_client = report.to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        end = %report.end,
        "connection closed"
    );
}
