//! `enclave-app server`: answers region queries with the S3 prefixes of that region.
//!
//! This module owns one exchange with a client: read the whole query (at most the client
//! timeout; see `query_reader` for where a query ends), parse it (see `protocol`), get the
//! document from the cache (see `cache` and `fetch`), write the reply (again within the client timeout), half-close, and drain what
//! the client may still send for a moment before closing, so the close is a FIN and never a
//! reset that could cost the client the end of its reply. Clients are served concurrently by
//! `accept`, so a silent client only ever holds its own connection. A client that sends nothing,
//! or a query that does not end, within the timeout gets an `{"error": ...}` reply; every
//! failure is one WARN line. With `--proxy-protocol` each connection first sends a PROXY header
//! (the parent's ingress route's), read with the daemon's reader within the client timeout; the
//! client it names is logged, and a connection without a whole header is closed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nitro_vsock_proxy::net::endpoint::{Endpoint, Stream};
use nitro_vsock_proxy::net::proxy_header::{self, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::accept;
use crate::cache::Cache;
use crate::protocol;
use crate::query_reader::{self, ReadError};

/// How long the server keeps reading (and discarding) after its reply, waiting for the client
/// to close first.
const LINGER: Duration = Duration::from_secs(2);
/// The most it discards while lingering.
const LINGER_BYTES: u64 = 64 * 1024;

/// What the server does.
#[derive(Clone, Debug)]
pub struct Options {
    /// vsock VMADDR_CID_ANY:PORT, or a stand-in.
    pub listen: Endpoint,
    /// Answer IPv6 prefixes too.
    pub ipv6: bool,
    /// Each connection starts with a PROXY header naming the real client (`--proxy-protocol`).
    pub proxy_protocol: bool,
    /// How long a client may take to send its query, and to take the reply.
    pub client_timeout: Duration,
    pub max_connections: usize,
    /// After the stop signal, how long open exchanges may take to finish.
    pub drain_timeout: Duration,
}

struct Context {
    options: Options,
    cache: Cache,
}

/// Listens and answers until `stop` resolves, then drains. Fails only if it cannot listen.
pub async fn run(
    options: Options,
    cache: Cache,
    source: String,
    stop: impl Future<Output = ()>,
) -> Result<(), String> {
    let listener = accept::bind(&options.listen).await?;
    let bound = listener
        .local_endpoint()
        .map(|e| e.to_string())
        .unwrap_or_else(|_| options.listen.to_string());
    info!(
        listen = %bound,
        source = %source,
        ipv6 = options.ipv6,
        proxy_protocol = options.proxy_protocol,
        max_connections = options.max_connections,
        "server listening"
    );
    let (max, drain) = (options.max_connections, options.drain_timeout);
    let context = Arc::new(Context { options, cache });
    let handle = move |stream, _peer| {
        let context = context.clone();
        async move { exchange(stream, &context).await }
    };
    accept::serve_until_stopped(listener, max, handle, stop, drain).await;
    Ok(())
}

async fn exchange(mut stream: Stream, context: &Context) {
    let wait = context.options.client_timeout;
    let mut early = Vec::new();
    if context.options.proxy_protocol {
        match proxy_header::read_header(&mut stream, wait).await {
            Ok((Header::Proxied(a), after)) => {
                info!(client = %a.client, "client address from the PROXY header");
                early = after;
            }
            Ok((Header::Local, after)) => {
                debug!("a PROXY header without a client (the sender's own connection)");
                early = after;
            }
            Err(e) => {
                warn!("closed a connection: {e} (--proxy-protocol expects the header of the parent's ingress route, `proxy_protocol: v1` or `v2`)");
                return;
            }
        }
    }
    // The query may have begun in the same read as the header.
    let mut reader = (&early[..]).chain(&mut stream);
    let reply = match query_reader::read_query(&mut reader, wait).await {
        Ok(raw) => answer(&raw, context).await,
        Err(e @ ReadError::ClosedEmpty) => {
            debug!("{e}");
            return;
        }
        Err(e @ ReadError::Io(_)) => {
            warn!("{e}");
            return;
        }
        // Still connected: tell the client what was wrong.
        Err(e @ (ReadError::Silent(_) | ReadError::Unfinished { .. })) => {
            let message = e.to_string();
            warn!("{message}; closing");
            protocol::error_reply(&message)
        }
    };
    match timeout(wait, async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            warn!(reply_bytes = reply.len(), "sending the reply failed: {e}");
            return;
        }
        Err(_) => {
            warn!(
                reply_bytes = reply.len(),
                "the client did not take the reply within {}; closing",
                humantime::format_duration(wait)
            );
            return;
        }
    }
    let mut rest = (&mut stream).take(LINGER_BYTES);
    let _ = timeout(LINGER, tokio::io::copy(&mut rest, &mut tokio::io::sink())).await;
}

/// The reply to the bytes a client sent.
async fn answer(raw: &[u8], context: &Context) -> Vec<u8> {
    let region = match protocol::parse_query(raw) {
        Ok(region) => region,
        Err(e) => {
            warn!("bad query: {e}");
            return protocol::error_reply(&e.to_string());
        }
    };
    match context.cache.get().await {
        Ok(index) => {
            let prefixes = index.s3_prefixes(region, context.options.ipv6);
            let reply = protocol::prefixes_reply(&prefixes);
            info!(
                query = region,
                prefixes = prefixes.len(),
                reply_bytes = reply.len(),
                "answered"
            );
            reply
        }
        Err(e) => {
            warn!(query = region, "cannot answer: {e}");
            protocol::error_reply(&e)
        }
    }
}
