//! The transparent listener of `enclave-app egress` (`--listen`, 127.0.0.1:15001): where the
//! enclave's nftables rules (`egress.nft`) redirect every outbound TCP connection to a
//! non-loopback address.
//!
//! This module owns one redirected connection: its original destination (`SO_ORIGINAL_DST`,
//! read with socket2), the name it stands for (a synthetic address, through the name table; any
//! other address as itself, for the parent's IP entries to decide), a `CONNECT name:port` to the
//! parent's connect route (`--connect-via`), and then either the relay (the daemon's, as the
//! forwarder uses) or a reset. The parent decides everything; this side never refuses a name on
//! its own, except a synthetic address that no name holds (a stale answer the app kept past
//! the table's recycling), which is reset at once.
//!
//! A refusal by the parent (any status but 200, or no answer within `--setup-timeout`) resets
//! the app's connection (`SO_LINGER` 0, so the app fails at once instead of waiting) and is
//! logged with the name, the port and the parent's status line, rate-limited. A refusal after
//! `200` (the parent's `sni: require` closing the tunnel) reaches the app as the parent's close.

use std::net::{IpAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use nitro_vsock_proxy::net::endpoint::{Endpoint, Stream};
use nitro_vsock_proxy::net::prefix::{read_prefix, PrefixError};
use nitro_vsock_proxy::net::relay::{relay_streams, RelayEnd};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::names::{Names, Open};
use super::RateLimited;

/// The longest answer head read from the parent (its heads are one line and a few headers).
const MAX_HEAD: usize = 8 * 1024;
/// The most of a refusal's body read for the log line (the parent's is one line).
const MAX_REASON: usize = 512;
/// How long the reason may take once the head is in.
const REASON_TIMEOUT: Duration = Duration::from_millis(500);

/// What every redirected connection needs.
pub struct Context {
    pub names: Names,
    /// The parent's connect route.
    pub connect_via: Endpoint,
    /// Reaching the parent and its answer to the CONNECT.
    pub setup_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Refusal lines, at most a few a second.
    pub refusals: RateLimited,
}

/// Handles one connection accepted on the transparent listener.
pub async fn handle(client: Stream, ctx: Arc<Context>) {
    let Stream::Tcp(client) = client else {
        return;
    };
    let original = match SockRef::from(&client).original_dst_v4() {
        Ok(addr) => addr.as_socket_ipv4(),
        Err(e) => {
            ctx.refusals.warn(format_args!(
                "a connection with no original destination ({e}): it was made to the listener itself, not redirected by egress.nft; reset"
            ));
            reset(client);
            return;
        }
    };
    let Some(original) = original else {
        reset(client);
        return;
    };
    let (target, _open) = match target(&ctx.names, original) {
        Ok(found) => found,
        Err(addr) => {
            ctx.refusals.warn(format_args!(
                "connection to {addr} reset: no name holds this synthetic address (an answer kept after its address was recycled; resolve the name again)"
            ));
            reset(client);
            return;
        }
    };
    let asked = ask_parent(&ctx.connect_via, &target, ctx.setup_timeout);
    let answer = tokio::time::timeout(ctx.setup_timeout, asked)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer from the parent's connect route on {} within --setup-timeout {}",
                ctx.connect_via,
                humantime::format_duration(ctx.setup_timeout)
            ))
        });
    let (upstream, early) = match answer {
        Ok(tunnel) => tunnel,
        Err(why) => {
            ctx.refusals
                .warn(format_args!("connection to {target} refused: {why}; reset"));
            reset(client);
            return;
        }
    };
    let mut client = client;
    if !early.is_empty() {
        // Bytes the upstream sent right after the answer (a server that speaks first).
        if let Err(e) = client.write_all(&early).await {
            warn!(%target, "the app closed before the first bytes reached it: {e}");
            return;
        }
    }
    let report = relay_streams(Stream::Tcp(client), upstream, ctx.idle_timeout).await;
    let (to_parent, to_app) = (report.to_upstream, report.to_client);
    match report.end {
        RelayEnd::Completed | RelayEnd::IdleTimeout => {
            info!(%target, bytes_to_parent = to_parent, bytes_to_app = to_app, end = %report.end, "connection closed")
        }
        RelayEnd::ClientError(_) | RelayEnd::UpstreamError(_) => {
            warn!(%target, bytes_to_parent = to_parent, bytes_to_app = to_app, end = %report.end, "connection failed")
        }
    }
}

/// What to ask the parent for: `name:port` for a synthetic address (with the guard that keeps
/// the name while the connection is open), `ip:port` for any other address. The address back
/// when it is synthetic but no name holds it.
fn target(names: &Names, original: SocketAddrV4) -> Result<(String, Option<Open>), IpAddr> {
    let (ip, port) = (*original.ip(), original.port());
    if !names.pool().contains(&ip) {
        return Ok((format!("{ip}:{port}"), None));
    }
    match names.open(ip) {
        Some((name, open)) => Ok((format!("{name}:{port}"), Some(open))),
        None => Err(IpAddr::V4(ip)),
    }
}

/// Connects to the parent's connect route and asks for `target`; the tunnel and any bytes that
/// came after the `200` head, or why not (the parent's status line and reason).
async fn ask_parent(
    via: &Endpoint,
    target: &str,
    timeout: Duration,
) -> Result<(Stream, Vec<u8>), String> {
    let mut parent = via.connect().await.map_err(|e| {
        format!(
            "cannot reach the parent's connect route on {via}: {e} ({})",
            super::unreachable_hint(via, "mode: connect")
        )
    })?;
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    parent
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the CONNECT to {via}: {e}"))?;
    // The caller's --setup-timeout bounds the whole exchange; this one only the head.
    let read = read_prefix(&mut parent, Vec::new(), MAX_HEAD, timeout, parse_head).await;
    let ((status, reason, head_len), bytes) = match read {
        Ok(read) => read,
        Err(PrefixError::Parse(e)) => {
            return Err(format!(
                "the parent's answer is not HTTP ({e}); is {via} a `mode: connect` route?"
            ))
        }
        Err(PrefixError::TooLarge) => {
            return Err(format!("the parent's answer head is over {MAX_HEAD} bytes"))
        }
        Err(PrefixError::Timeout) => return Err("no answer from the parent".to_owned()),
        Err(PrefixError::Closed) => {
            return Err(format!(
            "the parent closed the connection without an answer; is {via} a `mode: connect` route?"
        ))
        }
    };
    let rest = bytes.get(head_len..).unwrap_or_default().to_vec();
    if status == 200 {
        return Ok((parent, rest));
    }
    let body = refusal_body(&mut parent, rest).await;
    Err(if body.is_empty() {
        format!("the parent answered {status} {reason}")
    } else {
        format!("the parent answered {status} {reason}: {body}")
    })
}

/// The status code, reason phrase and head length of a whole answer head; `None` until it is.
fn parse_head(bytes: &[u8]) -> Result<Option<(u16, String, usize)>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes)? {
        httparse::Status::Complete(len) => Ok(Some((
            response.code.unwrap_or(0),
            response.reason.unwrap_or("").to_owned(),
            len,
        ))),
        httparse::Status::Partial => Ok(None),
    }
}

/// The first line of a refusal's body (the parent's reason), read briefly; empty if none.
async fn refusal_body(parent: &mut Stream, mut body: Vec<u8>) -> String {
    let more = async {
        let mut chunk = [0u8; MAX_REASON];
        while body.len() < MAX_REASON && !body.contains(&b'\n') {
            match parent.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(REASON_TIMEOUT, more).await;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(MAX_REASON)
        .collect()
}

/// Closes with RST: the app's connect or first read fails at once, rather than after a
/// handshake that leads nowhere.
fn reset(client: TcpStream) {
    // If SO_LINGER cannot be set the close is an ordinary FIN: the app still sees its
    // connection end, only less abruptly.
    let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
    drop(client);
}
