//! The one accept loop, shared by the daemon ([`crate::proxy::server`]) and enclave-app.
//!
//! This module owns accepting from a set of listeners: each listener is polled in turn, starting
//! after the one that accepted last (a busy listener cannot starve the others); accept errors
//! such as EMFILE pause the loop with a growing back-off instead of spinning or exiting; a
//! [`Pulse`] (systemd's watchdog) beats between accepts, so pings stop when the loop itself is
//! stuck; commands change the set of listeners while it runs (the daemon's reload). What to do
//! with an accepted connection is the caller's. [`OverLimitLog`] rate-limits the "limit reached"
//! line both callers write, and [`serve`] is the whole single-listener server enclave-app runs:
//! a connection limit, one task per connection in a `conn{id peer}` span.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tracing::{warn, Instrument};

use crate::net::endpoint::{Listener, Stream};

const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const OVER_LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Something to call regularly from the accept loop while it is alive (the watchdog ping).
pub struct Heartbeat {
    pub every: Duration,
    pub beat: Box<dyn Fn() + Send + Sync>,
}

/// A [`Heartbeat`] on its timer; without one, [`Pulse::beat`] never resolves.
pub struct Pulse(Option<(tokio::time::Interval, Heartbeat)>);

impl Pulse {
    pub fn new(heartbeat: Option<Heartbeat>) -> Pulse {
        Pulse(heartbeat.map(|h| {
            let mut interval = tokio::time::interval(h.every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            (interval, h)
        }))
    }

    /// Waits for the next tick and beats.
    pub async fn beat(&mut self) {
        match &mut self.0 {
            Some((interval, heartbeat)) => {
                interval.tick().await;
                (heartbeat.beat)();
            }
            None => std::future::pending().await,
        }
    }
}

/// Accepts from `listeners` forever. `on_accept` gets the key of the listener that accepted,
/// the stream and the peer (as `vsock:CID:PORT`, `unix:PATH` or `tcp:IP:PORT`); `on_command`
/// applies a command from `commands` to the listeners (a closed channel just stops commands).
pub async fn run<K, C>(
    listeners: &mut Vec<(Listener, K)>,
    commands: &mut mpsc::UnboundedReceiver<C>,
    pulse: &mut Pulse,
    mut on_command: impl FnMut(&mut Vec<(Listener, K)>, C),
    mut on_accept: impl FnMut(&K, Stream, String),
) {
    let mut backoff = BACKOFF_START;
    let mut resume_at: Option<Instant> = None;
    let mut next = 0;
    let mut commands_open = true;
    loop {
        // Accepting is cancel-safe, so a beat or a command may interrupt the wait at any point.
        let accepted = tokio::select! {
            biased;
            _ = pulse.beat() => continue,
            command = commands.recv(), if commands_open => {
                match command {
                    Some(command) => on_command(listeners, command),
                    None => commands_open = false,
                }
                continue;
            }
            accepted = accept_any(listeners, &mut next, resume_at) => accepted,
        };
        match accepted {
            (index, Ok((stream, peer))) => {
                backoff = BACKOFF_START;
                resume_at = None;
                on_accept(&listeners[index].1, stream, peer);
            }
            (_, Err(e)) => {
                // EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: wait a little and keep serving.
                warn!(error = %e, retry_in = ?backoff, "accept failed");
                resume_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Polls every listener once, starting at `next`. Returns which listener accepted.
fn poll_accept_any<K>(
    listeners: &[(Listener, K)],
    next: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<(usize, std::io::Result<(Stream, String)>)> {
    let n = listeners.len();
    for i in 0..n {
        let index = (*next + i) % n;
        if let Poll::Ready(result) = listeners[index].0.poll_accept(cx) {
            *next = (index + 1) % n;
            return Poll::Ready((index, result));
        }
    }
    Poll::Pending
}

/// Waits out a back-off (if any), then accepts from any listener.
async fn accept_any<K>(
    listeners: &[(Listener, K)],
    next: &mut usize,
    resume_at: Option<Instant>,
) -> (usize, std::io::Result<(Stream, String)>) {
    if let Some(at) = resume_at {
        tokio::time::sleep_until(at).await;
    }
    std::future::poll_fn(|cx| poll_accept_any(listeners, next, cx)).await
}

/// Counts connections closed over a limit and says when to log them: at most once a second.
#[derive(Default)]
pub struct OverLimitLog {
    last: Option<Instant>,
    since_last: u64,
}

impl OverLimitLog {
    /// Counts one; returns how many to report if a line is due now.
    pub fn note(&mut self) -> Option<u64> {
        self.since_last += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < OVER_LIMIT_LOG_INTERVAL)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_last))
    }
}

/// Accepts on `listener` forever, running `handle(stream, peer)` for each connection in its own
/// task inside a `conn{id peer}` span, so a slow, failing or panicking connection never stops
/// the listener. At most `max_connections` run at once; any beyond that are closed at once (the
/// peer sees a close, not a hang).
pub async fn serve<H, F>(listener: Listener, max_connections: usize, handle: H)
where
    H: Fn(Stream, String) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut over_limit = OverLimitLog::default();
    let mut next_id: u64 = 0;
    let (_no_commands, mut commands) = mpsc::unbounded_channel::<()>();
    let mut listeners = vec![(listener, ())];
    let on_accept = |_: &(), stream: Stream, peer: String| {
        next_id += 1;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            if let Some(closed) = over_limit.note() {
                warn!(
                    peer,
                    closed,
                    "connection limit reached ({max_connections} open): closed new connections at once; raise --max-connections if this is expected load"
                );
            }
            return;
        };
        let span = tracing::info_span!("conn", id = next_id, peer = %peer);
        let task = handle(stream, peer);
        tokio::spawn(
            async move {
                task.await;
                drop(permit);
            }
            .instrument(span),
        );
    };
    run(
        &mut listeners,
        &mut commands,
        &mut Pulse::new(None),
        |_, ()| {},
        on_accept,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn over_limit_lines_are_at_most_one_a_second_and_count_what_they_skipped() {
        let mut log = OverLimitLog::default();
        assert_eq!(log.note(), Some(1));
        assert_eq!(log.note(), None);
        assert_eq!(log.note(), None);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(log.note(), Some(3));
        assert_eq!(log.note(), None);
    }
}
