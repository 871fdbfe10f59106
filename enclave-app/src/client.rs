//! `enclave-app client`: asks the enclave's server one query and prints the whole reply.
//!
//! This module owns the parent-side exchange: connect to vsock CID:PORT (or a `--stand-in`)
//! within the connect timeout, send the query in one write without closing the write side (as
//! the workshop's client does), read until the server closes (no truncation; at most
//! `--max-reply-size` bytes, within `--timeout`), and print the reply. The exit status is 0 for
//! an answer, 1 for any failure (no connection, timeout, an `{"error": ...}` reply, a close
//! without a reply) with one line on standard error saying what happened and what to check,
//! and 2 for a bad query.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use nitro_vsock_proxy::net::endpoint::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use crate::protocol::{self, Reply, MAX_QUERY_BYTES};

/// What the client does.
#[derive(Clone, Debug)]
pub struct Options {
    /// The enclave's server: vsock CID:PORT, or a stand-in.
    pub target: Endpoint,
    pub query: String,
    pub connect_timeout: Duration,
    /// For sending the query and reading the whole reply.
    pub timeout: Duration,
    pub max_reply_bytes: u64,
}

/// A failure and its exit status.
struct Failure {
    status: u8,
    message: String,
}

fn fail(message: String) -> Failure {
    Failure { status: 1, message }
}

/// Runs the exchange on its own small runtime and returns the exit status.
pub fn main(options: Options) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("enclave-app client: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(exchange(&options)) {
        Ok(reply) => {
            let mut out = std::io::stdout().lock();
            let written = out
                .write_all(&reply)
                .and_then(|_| out.write_all(b"\n"))
                .and_then(|_| out.flush());
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("enclave-app client: cannot write the reply to standard output: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Err(failure) => {
            eprintln!("enclave-app client: {}", failure.message);
            ExitCode::from(failure.status)
        }
    }
}

async fn exchange(options: &Options) -> Result<Vec<u8>, Failure> {
    let target = &options.target;
    let query = options.query.as_bytes();
    if query.len() > MAX_QUERY_BYTES {
        return Err(Failure {
            status: 2,
            message: format!(
                "the query is {} bytes; the protocol allows at most {MAX_QUERY_BYTES}",
                query.len()
            ),
        });
    }
    if let Err(e) = protocol::parse_query(query) {
        return Err(Failure {
            status: 2,
            message: e.to_string(),
        });
    }
    let mut stream = match timeout(options.connect_timeout, target.connect()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return Err(fail(format!(
                "cannot connect to {target}: {e} ({})",
                connect_hint(target)
            )))
        }
        Err(_) => {
            return Err(fail(format!(
                "cannot connect to {target}: no answer within {} ({})",
                humantime::format_duration(options.connect_timeout),
                connect_hint(target)
            )))
        }
    };
    let limit = options.max_reply_bytes;
    let mut reply = Vec::new();
    let exchanged = timeout(options.timeout, async {
        stream.write_all(query).await?;
        (&mut stream)
            .take(limit.saturating_add(1))
            .read_to_end(&mut reply)
            .await
    })
    .await;
    match exchanged {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(fail(format!(
                "the exchange with {target} failed after {} reply bytes: {e}",
                reply.len()
            )))
        }
        Err(_) => {
            return Err(fail(format!(
                "no complete reply from {target} within {} ({} bytes so far); the server may still be downloading: raise --timeout, or check the server's log",
                humantime::format_duration(options.timeout),
                reply.len()
            )))
        }
    }
    if reply.len() as u64 > limit {
        return Err(fail(format!(
            "the reply from {target} is larger than --max-reply-size ({limit} bytes); raise it"
        )));
    }
    match protocol::interpret_reply(&reply) {
        Reply::Answer => Ok(reply),
        Reply::Error(message) => Err(fail(format!(
            "the server at {target} could not answer {:?}: {message}",
            options.query
        ))),
        Reply::Empty => Err(fail(format!(
            "the server at {target} closed the connection without a reply; see its log (nitro-cli console)"
        ))),
    }
}

fn connect_hint(target: &Endpoint) -> String {
    match target {
        Endpoint::Vsock { cid, port } => format!(
            "is the enclave with CID {cid} running (nitro-cli describe-enclaves) and its server listening on port {port}?"
        ),
        other => format!("is the server stand-in listening on {other}?"),
    }
}
