//! `enclave-app forwarder`: TCP inside the enclave to the parent's proxy over vsock.
//!
//! This module owns the forwarder's per-connection behaviour: for each TCP connection accepted
//! on LOCAL_IP:LOCAL_PORT it opens a stream to the target (vsock REMOTE_CID:REMOTE_PORT, or a
//! `--stand-in`) within the connect timeout and relays both ways with the daemon's
//! [`relay_streams`](nitro_vsock_proxy::net::relay::relay_streams) (half-closes passed through, optional idle
//! timeout). When the target cannot be reached, that one connection is closed and logged with
//! what to check; the listener keeps accepting, and the next connection tries again. On
//! SIGTERM/SIGINT it stops accepting and lets open connections finish (`--drain-timeout`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nitro_vsock_proxy::net::endpoint::{Endpoint, Stream};
use nitro_vsock_proxy::net::relay::{relay_streams, RelayEnd};
use tracing::{info, warn};

use crate::accept;

/// What the forwarder does.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    /// The parent's proxy: vsock CID:PORT, or a stand-in.
    pub target: Endpoint,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// After the stop signal, how long open connections may take to finish.
    pub drain_timeout: Duration,
}

/// Listens and forwards until `stop` resolves, then drains. Fails only if it cannot listen.
pub async fn run(options: Options, stop: impl Future<Output = ()>) -> Result<(), String> {
    let listener = accept::bind(&Endpoint::Tcp(options.listen)).await?;
    info!(
        listen = %options.listen,
        target = %options.target,
        max_connections = options.max_connections,
        "forwarder listening"
    );
    let options = Arc::new(options);
    let (max, drain) = (options.max_connections, options.drain_timeout);
    let handle = move |client, _peer| {
        let options = options.clone();
        async move { forward(client, &options).await }
    };
    accept::serve_until_stopped(listener, max, handle, stop, drain).await;
    Ok(())
}

async fn forward(client: Stream, options: &Options) {
    let target = &options.target;
    let upstream = match tokio::time::timeout(options.connect_timeout, target.connect()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            warn!(%target, "cannot reach the parent's proxy: {e}; closed this connection ({})", unreachable_hint(target));
            return;
        }
        Err(_) => {
            warn!(%target, "cannot reach the parent's proxy: no connection within {}; closed this connection ({})",
                    humantime::format_duration(options.connect_timeout), unreachable_hint(target));
            return;
        }
    };
    let report = relay_streams(client, upstream, options.idle_timeout).await;
    let (to_parent, to_client) = (report.to_upstream, report.to_client);
    match report.end {
        RelayEnd::Completed | RelayEnd::IdleTimeout => {
            info!(bytes_to_parent = to_parent, bytes_to_client = to_client, end = %report.end, "connection closed")
        }
        RelayEnd::ClientError(_) | RelayEnd::UpstreamError(_) => {
            warn!(bytes_to_parent = to_parent, bytes_to_client = to_client, end = %report.end, "connection failed")
        }
    }
}

/// What to check when the target refuses or does not answer.
fn unreachable_hint(target: &Endpoint) -> String {
    match target {
        Endpoint::Vsock { cid, port } => format!(
            "is nitro-vsock-proxy running on the parent (CID {cid}) and listening on vsock port {port}, e.g. `nitro-vsock-proxy {port} ip-ranges.amazonaws.com 443`?"
        ),
        other => format!("is the proxy stand-in listening on {other}?"),
    }
}
