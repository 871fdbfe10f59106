//! Listening for the forwarder, the server and the demo's HTTPS stand-in, and stopping them.
//!
//! This module owns binding, with an error that names the address and says how to fix it, and
//! the graceful stop: [`serve_until_stopped`] accepts until the stop signal, then closes the
//! listener (new connections are refused) and waits, at most the drain timeout, for the open
//! connections to finish. Accepting itself is the daemon's own loop
//! ([`nitro_vsock_proxy::net::accept::serve`]): every connection runs in its own task inside a
//! `conn{id peer}` span, at most `max_connections` at once (any beyond that are closed at once
//! and logged at most once a second), and accept errors such as EMFILE are retried with a
//! growing pause instead of spinning or exiting.

use std::future::Future;
use std::io;
use std::time::Duration;

use nitro_vsock_proxy::net::endpoint::{Endpoint, Listener, Stream};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

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

/// Accepts connections forever, running `handle(stream, peer)` for each in its own task: the
/// daemon's own accept loop ([`nitro_vsock_proxy::net::accept::serve`]).
pub use nitro_vsock_proxy::net::accept::serve;

/// Serves `listener` like [`serve`] until `stop` resolves; then closes the listener and waits
/// up to `drain_timeout` for the open connections. Returns how many were still open when the
/// drain time ran out (the caller's runtime ends them when it stops).
pub async fn serve_until_stopped<H, F>(
    listener: Listener,
    max_connections: usize,
    handle: H,
    stop: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> usize
where
    H: Fn(Stream, String) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let open = TaskTracker::new();
    let tracked = |stream, peer| {
        // Taken when the connection is accepted, not when its task first runs, so a
        // connection accepted just before the stop is waited for too.
        let token = open.token();
        let connection = handle(stream, peer);
        async move {
            connection.await;
            drop(token);
        }
    };
    tokio::select! {
        () = serve(listener, max_connections, tracked) => {}
        () = stop => {}
    }
    // Leaving the select dropped the accept loop and with it the listener: new connections
    // are refused from here on.
    open.close();
    let waiting = open.len();
    if waiting == 0 {
        info!("stopped accepting; no open connections");
        return 0;
    }
    info!(
        open = waiting,
        drain_timeout = %humantime::format_duration(drain_timeout),
        "stopped accepting; waiting for open connections"
    );
    match tokio::time::timeout(drain_timeout, open.wait()).await {
        Ok(()) => {
            info!("open connections finished");
            0
        }
        Err(_) => {
            let left = open.len();
            warn!(
                open = left,
                "drain timeout reached; closing the remaining connections (raise --drain-timeout if they need longer)"
            );
            left
        }
    }
}
