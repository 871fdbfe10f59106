//! `enclave-app ingress`: the parent's ingress route, over vsock, into a TCP server inside the
//! enclave (most enclave servers listen on TCP, not vsock).
//!
//! This module owns the bridge's per-connection behaviour: for each connection accepted on
//! `--listen` (a vsock port, from the parent's `mode: ingress` route) it opens a stream to `--to`
//! within the connect timeout and relays both ways with the daemon's relay (half-closes passed
//! through, optional idle timeout). With `--proxy-protocol keep` (the default) the bytes pass
//! untouched, the route's PROXY header included, for a server that reads it (nginx
//! `proxy_protocol`, HAProxy `accept-proxy`); with `strip` the header is read here (with the
//! daemon's own reader: v1 or v2, at most 4 KiB, within `--header-timeout`), the client it names
//! is logged, and the server gets the client's bytes only. A connection without a whole header
//! under `strip` is closed with one WARN line. On SIGTERM/SIGINT it stops accepting and lets open
//! connections finish (`--drain-timeout`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nitro_vsock_proxy::net::endpoint::{Endpoint, Stream};
use nitro_vsock_proxy::net::proxy_header::{self, Header};
use nitro_vsock_proxy::net::relay::{relay_streams, RelayEnd};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::accept;

/// What to do with the PROXY header the parent's route sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HeaderMode {
    /// Pass it on to the server with the client's bytes.
    Keep,
    /// Read it, log the client it names, and pass on the client's bytes only.
    Strip,
}

/// What the bridge does.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the parent's ingress route connects: a vsock port (any CID), or a stand-in.
    pub listen: Endpoint,
    /// The enclave's own server.
    pub to: Endpoint,
    pub proxy_protocol: HeaderMode,
    /// Under `strip`: how long a connection may take to send its whole header.
    pub header_timeout: Duration,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// After the stop signal, how long open connections may take to finish.
    pub drain_timeout: Duration,
}

/// Listens and bridges until `stop` resolves, then drains. Fails only if it cannot listen.
pub async fn run(options: Options, stop: impl Future<Output = ()>) -> Result<(), String> {
    let listener = accept::bind(&options.listen).await?;
    let bound = listener
        .local_endpoint()
        .map(|e| e.to_string())
        .unwrap_or_else(|_| options.listen.to_string());
    info!(
        listen = %bound,
        to = %options.to,
        proxy_protocol = ?options.proxy_protocol,
        max_connections = options.max_connections,
        "ingress bridge listening"
    );
    let options = Arc::new(options);
    let (max, drain) = (options.max_connections, options.drain_timeout);
    let handle = move |client, _peer| {
        let options = options.clone();
        async move { bridge(client, &options).await }
    };
    accept::serve_until_stopped(listener, max, handle, stop, drain).await;
    Ok(())
}

async fn bridge(mut client: Stream, options: &Options) {
    let early = match options.proxy_protocol {
        HeaderMode::Keep => Vec::new(),
        HeaderMode::Strip => {
            match proxy_header::read_header(&mut client, options.header_timeout).await {
                Ok((Header::Proxied(a), early)) => {
                    info!(client = %a.client, destination = %a.destination, "client address from the PROXY header");
                    early
                }
                Ok((Header::Local, early)) => {
                    info!("a PROXY header without a client (the sender's own connection)");
                    early
                }
                Err(e) => {
                    warn!("closed a connection: {e} (--proxy-protocol strip expects the header the parent's route sends: `proxy_protocol: v1` or `v2`)");
                    return;
                }
            }
        }
    };
    let to = &options.to;
    let mut server = match tokio::time::timeout(options.connect_timeout, to.connect()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            warn!(%to, "cannot reach the enclave's server: {e}; closed this connection (is it listening on {to}?)");
            return;
        }
        Err(_) => {
            warn!(%to, "cannot reach the enclave's server: no connection within {}; closed this connection",
                humantime::format_duration(options.connect_timeout));
            return;
        }
    };
    if !early.is_empty() {
        if let Err(e) = server.write_all(&early).await {
            warn!(%to, "cannot send the client's first bytes to the server: {e}");
            return;
        }
    }
    let report = relay_streams(client, server, options.idle_timeout).await;
    let (to_server, to_client) = (report.to_upstream + early.len() as u64, report.to_client);
    match report.end {
        RelayEnd::Completed | RelayEnd::IdleTimeout => {
            info!(bytes_to_server = to_server, bytes_to_client = to_client, end = %report.end, "connection closed")
        }
        RelayEnd::ClientError(_) | RelayEnd::UpstreamError(_) => {
            warn!(bytes_to_server = to_server, bytes_to_client = to_client, end = %report.end, "connection failed")
        }
    }
}
