//! The accept loop shared by the forwarder, the server and the demo's HTTPS stand-in.
//!
//! This module owns binding (with an error that says how to fix it), accepting and the
//! connection limit: every connection runs in its own task inside a `conn{id peer}` span, so a
//! slow, failing or panicking connection never stops the listener; at most `max_connections`
//! run at once and any beyond that are closed at once (the peer sees a close, not a hang) and
//! logged at most once a second; accept errors such as EMFILE are logged and retried with a
//! growing pause instead of spinning or exiting.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use nitro_vsock_proxy::endpoint::{Endpoint, Listener, Stream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{warn, Instrument};

const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const OVER_LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Binds `endpoint`; the error names the address and the likely fix.
pub async fn bind(endpoint: &Endpoint) -> Result<Listener, String> {
    endpoint.bind().await.map_err(|e| {
        let hint = match (endpoint, e.kind()) {
            (_, io::ErrorKind::AddrInUse) => "another process already listens there",
            (Endpoint::Tcp(_), io::ErrorKind::PermissionDenied) => {
                "ports below 1024 need root or CAP_NET_BIND_SERVICE"
            }
            (Endpoint::Tcp(_), io::ErrorKind::AddrNotAvailable) => {
                "no interface has that address; is lo up (ip link set lo up)?"
            }
            (Endpoint::Vsock { .. }, _) => {
                "vsock needs an enclave or a VM with a vsock device (/dev/vsock); elsewhere use --stand-in"
            }
            _ => "check the address",
        };
        format!("cannot listen on {endpoint}: {e} ({hint})")
    })
}

/// Accepts connections forever, running `handle(stream, peer)` for each in its own task.
pub async fn serve<H, F>(listener: Listener, max_connections: usize, handle: H)
where
    H: Fn(Stream, String) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut backoff = BACKOFF_START;
    let mut next_id: u64 = 0;
    let mut over_limit = OverLimitLog::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = BACKOFF_START;
                accepted
            }
            Err(e) => {
                warn!(
                    "accept failed: {e}; retrying in {}",
                    humantime::format_duration(backoff)
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        next_id += 1;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            over_limit.note(&peer, max_connections);
            continue;
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
    }
}

/// Logs connections closed over the limit, at most once per interval.
#[derive(Default)]
struct OverLimitLog {
    last: Option<Instant>,
    since_last: u64,
}

impl OverLimitLog {
    fn note(&mut self, peer: &str, max: usize) {
        self.since_last += 1;
        if self
            .last
            .is_some_and(|at| at.elapsed() < OVER_LIMIT_LOG_INTERVAL)
        {
            return;
        }
        warn!(
            peer,
            closed = self.since_last,
            "connection limit reached ({max} open): closed new connections at once; raise --max-connections if this is expected load"
        );
        self.last = Some(Instant::now());
        self.since_last = 0;
    }
}
