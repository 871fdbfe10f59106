//! A `mode: dns` route: the allowlist as a resolver, for an enclave that has no DNS of its own.
//!
//! This module owns one DNS connection's life: DNS over a stream (each message behind a
//! two-byte length, RFC 1035 §4.2.2 and RFC 7766), several queries per connection answered as
//! they complete with their ids kept, at most [`MAX_OUTSTANDING`] at once (reading pauses until
//! one completes), a query over [`MAX_QUERY_LEN`] or a connection idle for the route's idle
//! timeout ([`DEFAULT_IDLE`] unless the route sets one) closed. Messages are parsed and built
//! with hickory-proto; only the Extended DNS Error option (RFC 8914), which it has no type for,
//! is written here, as the option's four-byte code and its text.
//!
//! What a query is answered, in this order ([`answer`]):
//! 1. a message that does not parse: FORMERR when its header is readable, else the connection
//!    closes; a message that is not one standard query (a response, another opcode, not exactly
//!    one question): FORMERR or REFUSED;
//! 2. PTR, and any class other than IN: REFUSED;
//! 3. a name the allowlist does not allow by name (an exact host-name entry or a wildcard, any
//!    port), whatever its addresses: NXDOMAIN, with EDE 15 "Blocked" (`not in the allowlist`)
//!    when the query has EDNS, and an audit event (`reason="dns_blocked"`);
//! 4. A and AAAA: the daemon's resolver (the cache and TTLs connections use, `-4`/`-6`),
//!    keeping only the addresses the policy would connect to for one of the ports the name is
//!    allowed for (so loopback, the metadata service and the other special ranges go unless an
//!    IP or CIDR entry names them), under the query name, TTL the remaining cache TTL at most
//!    [`MAX_TTL`]; nothing left: NODATA. Upstream NXDOMAIN stays NXDOMAIN (no EDE); no records
//!    is NODATA; no answer in time is SERVFAIL with EDE 22 "No Reachable Authority"; any other
//!    failure SERVFAIL;
//! 5. every other type, HTTPS and SVCB included: NODATA, so that a client never gets ECH
//!    configurations or alternative endpoints the parent did not decide on.
//!
//! The policy is read per query, so a reload applies to the next query of an open connection.

use std::net::IpAddr;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use hickory_resolver::proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::opt::EdnsOption;
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_resolver::proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tracing::{debug, info, warn};

use crate::net::endpoint::Stream;
use crate::ops::audit;
use crate::ops::metrics::Outcome;
use crate::policy::dns::DnsFailure;
use crate::policy::host::HostName;
use crate::proxy::shared::Shared;

/// Queries of one connection being answered at once; the next waits (reading pauses).
pub const MAX_OUTSTANDING: usize = 64;
/// The longest query read; a longer one closes the connection.
pub const MAX_QUERY_LEN: usize = 4096;
/// A connection with no query for this long is closed (unless the route sets `idle_timeout`).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30);
/// The longest TTL given, whatever the cache holds.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// RFC 8914 INFO-CODEs.
const EDE_BLOCKED: u16 = 15;
const EDE_NO_REACHABLE_AUTHORITY: u16 = 22;
/// The EDNS option code of an Extended DNS Error (RFC 8914 §2).
const EDNS_OPTION_EDE: u16 = 15;
/// Our EDNS payload size in replies (RFC 9715's advice; over a stream it only informs).
const EDNS_PAYLOAD: u16 = 1232;

/// What a connection is answered for one query.
struct Reply {
    /// The response message, or `None` when the query's header was unreadable: the connection
    /// closes, as there is no id to answer to.
    message: Option<Vec<u8>>,
    /// The `result` label of `nitro_vsock_proxy_dns_queries_total`.
    result: &'static str,
}

/// Serves one connection of a dns route until the client closes it, it idles out or sends what
/// cannot be a query. Returns how it ended.
pub async fn serve(
    client: Stream,
    peer: &str,
    route: &str,
    idle_timeout: Option<Duration>,
    shared: &Shared,
) -> Outcome {
    let started = Instant::now();
    let idle_timeout = idle_timeout.unwrap_or(DEFAULT_IDLE);
    let (reader, mut writer) = tokio::io::split(client);
    let codec = LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(MAX_QUERY_LEN)
        .new_codec();
    let mut queries = FramedRead::new(reader, codec);
    let mut pending = FuturesUnordered::new();
    let mut answered: u64 = 0;
    let mut reading = true;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let end = loop {
        if !reading && pending.is_empty() {
            break Outcome::Completed;
        }
        tokio::select! {
            // Answers first: they free a slot and may be what the client waits for.
            biased;
            Some(reply) = pending.next(), if !pending.is_empty() => {
                let Reply { message, result } = reply;
                crate::ops::metrics::global().dns_query(route, result);
                let Some(message) = message else {
                    debug!("connection closed: a DNS message too short to have a header");
                    break Outcome::ClientError;
                };
                if let Err(e) = write_framed(&mut writer, &message).await {
                    debug!(error = %e, "connection closed: cannot send a DNS answer");
                    break Outcome::ClientError;
                }
                answered += 1;
                idle.as_mut().reset(Instant::now() + idle_timeout);
            }
            query = queries.next(), if reading && pending.len() < MAX_OUTSTANDING => {
                match query {
                    Some(Ok(query)) => {
                        pending.push(answer(query.to_vec(), peer, route, shared));
                        idle.as_mut().reset(Instant::now() + idle_timeout);
                    }
                    Some(Err(e)) => {
                        // Over MAX_QUERY_LEN (the codec's limit) or a read error: nothing after
                        // it can be trusted to be framed.
                        warn!(error = %e, max_bytes = MAX_QUERY_LEN, "connection closed: a DNS query over the limit, or a read error");
                        break Outcome::ClientError;
                    }
                    // The client is done asking; what it asked is still answered.
                    None => reading = false,
                }
            }
            _ = &mut idle, if pending.is_empty() => {
                break Outcome::IdleTimeout;
            }
        }
    };
    // Best effort: the client may be gone.
    let _ = writer.shutdown().await;
    info!(
        queries = answered,
        duration_ms = started.elapsed().as_millis() as u64,
        end = %end.label(),
        "connection closed"
    );
    end
}

async fn write_framed(
    writer: &mut (impl AsyncWrite + Unpin),
    message: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "DNS answer over 65,535 bytes",
        )
    })?;
    // One write: the length and the message in one segment where the socket allows.
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    writer.write_all(&framed).await?;
    writer.flush().await
}

/// The answer to one query, by the rules in the module docs, within `--setup-timeout`.
async fn answer(query: Vec<u8>, peer: &str, route: &str, shared: &Shared) -> Reply {
    let request = match Message::from_vec(&query) {
        Ok(request) => request,
        Err(e) => {
            // The id and opcode are enough to say FORMERR to the right query.
            return match Header::read(&mut BinDecoder::new(&query)) {
                Ok(header) => {
                    debug!(error = %e, "malformed DNS query: FORMERR");
                    let id = header.metadata.id;
                    let op_code = header.metadata.op_code;
                    Reply {
                        message: encode(&Message::error_msg(id, op_code, ResponseCode::FormErr)),
                        result: "formerr",
                    }
                }
                Err(_) => Reply {
                    message: None,
                    result: "formerr",
                },
            };
        }
    };
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.checking_disabled = request.metadata.checking_disabled;
    response.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    let (code, ede, result) = match tokio::time::timeout(
        shared.lifetimes.setup_timeout,
        decide(&request, &mut response, peer, route, shared),
    )
    .await
    {
        Ok(decided) => decided,
        Err(_) => {
            warn!(setup_timeout = %humantime::format_duration(shared.lifetimes.setup_timeout), "DNS query not answered within --setup-timeout: SERVFAIL");
            response.answers.clear();
            (
                ResponseCode::ServFail,
                Some((EDE_NO_REACHABLE_AUTHORITY, "")),
                "servfail",
            )
        }
    };
    response.metadata.response_code = code;
    if let (Some(edns), Some((info_code, text))) = (response.edns.as_mut(), ede) {
        let mut data = info_code.to_be_bytes().to_vec();
        data.extend_from_slice(text.as_bytes());
        edns.options_mut()
            .insert(EdnsOption::Unknown(EDNS_OPTION_EDE, data));
    }
    Reply {
        message: encode(&response),
        result,
    }
}

/// The response code, the Extended DNS Error to attach (when the query has EDNS) and the
/// metrics result of one parsed query; answer records go into `response`.
async fn decide(
    request: &Message,
    response: &mut Message,
    peer: &str,
    route: &str,
    shared: &Shared,
) -> (ResponseCode, Option<(u16, &'static str)>, &'static str) {
    if request.metadata.message_type != MessageType::Query {
        return (ResponseCode::FormErr, None, "formerr");
    }
    if request.metadata.op_code != OpCode::Query {
        return (ResponseCode::Refused, None, "refused");
    }
    let [question] = request.queries.as_slice() else {
        return (ResponseCode::FormErr, None, "formerr");
    };
    let query_type = question.query_type();
    if query_type == RecordType::PTR || question.query_class() != DNSClass::IN {
        return (ResponseCode::Refused, None, "refused");
    }
    let policy = shared.policy.get();
    let asked = question.name().to_ascii();
    let name = HostName::parse(&asked).ok();
    let ports = name
        .as_ref()
        .map(|name| policy.ports_allowing_name(name))
        .unwrap_or_default();
    let Some(name) = name.filter(|_| !ports.is_empty()) else {
        audit::refused(&audit::Decision {
            route,
            peer,
            requested: Some(&asked.trim_end_matches('.')),
            port: None,
            addresses: audit::NO_ADDRESSES,
            outcome: Outcome::Refused("dns_blocked"),
            reason: None,
            message: &format!(
                "{} {query_type} is not in the allowlist (answered NXDOMAIN)",
                asked.trim_end_matches('.')
            ),
        });
        return (
            ResponseCode::NXDomain,
            Some((EDE_BLOCKED, "not in the allowlist")),
            "blocked",
        );
    };
    let wanted_v4 = match query_type {
        RecordType::A => true,
        RecordType::AAAA => false,
        // HTTPS, SVCB and the rest: an empty answer, never the upstream's.
        _ => return (ResponseCode::NoError, None, "nodata"),
    };
    let dns = shared.dns.get();
    match dns.lookup_with_ttl(&name).await {
        Ok((ips, ttl)) => {
            let ttl = ttl.min(MAX_TTL).as_secs() as u32;
            for ip in ips {
                if ip.is_ipv4() != wanted_v4 || !policy.would_connect(&name, &ports, ip) {
                    continue;
                }
                let data = match ip {
                    IpAddr::V4(v4) => RData::A(A(v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                };
                // Under the query name, as the client asked it: a CNAME chain upstream is the
                // resolver's business.
                response.add_answer(Record::from_rdata(question.name().clone(), ttl, data));
            }
            if response.answers.is_empty() {
                (ResponseCode::NoError, None, "nodata")
            } else {
                (ResponseCode::NoError, None, "answered")
            }
        }
        Err(e) => match e.kind {
            DnsFailure::NxDomain => (ResponseCode::NXDomain, None, "nxdomain"),
            DnsFailure::NoRecords => (ResponseCode::NoError, None, "nodata"),
            DnsFailure::Timeout => {
                debug!(error = %e, "DNS query: SERVFAIL");
                (
                    ResponseCode::ServFail,
                    Some((EDE_NO_REACHABLE_AUTHORITY, "")),
                    "servfail",
                )
            }
            DnsFailure::Error => {
                debug!(error = %e, "DNS query: SERVFAIL");
                (ResponseCode::ServFail, None, "servfail")
            }
        },
    }
}

/// The message's bytes; one that cannot be encoded (it never should) closes the connection.
fn encode(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            warn!(error = %e, "cannot encode a DNS answer; closing the connection");
            None
        }
    }
}
