//! The DNS stub of `enclave-app egress`, on `--dns-listen` (UDP and TCP): the enclave's
//! resolver (`/etc/resolv.conf`: `nameserver 127.0.0.1`).
//!
//! This module owns what an app in the enclave is answered. Each question is asked of the
//! parent's `mode: dns` route ([`super::parent`]), which decides; the stub only translates:
//! - `A` for a name the parent answers with addresses: one synthetic address from the name
//!   table ([`super::names`]), TTL the parent's; the real addresses stay on the parent, which
//!   resolves the name again when the app connects;
//! - `A` answered without addresses (the parent dropped special ones such as the metadata
//!   service): NODATA;
//! - `AAAA`, `HTTPS`, `SVCB` and every other type, for a name the parent answers: NODATA (v4 only
//!   inside; the parent's side is the parent's business). The parent is asked for `A` to learn
//!   whether the name exists, unless it holds a synthetic address already;
//! - a blocked name (NXDOMAIN from the parent, with its Extended DNS Error when the app asked
//!   with EDNS): NXDOMAIN for every type; SERVFAIL passes;
//! - PTR and classes other than IN: REFUSED (as the parent does); malformed queries: FORMERR;
//! - no answer from the parent within `--dns-timeout`, or no free synthetic address: SERVFAIL.
//!
//! Bounded: at most [`MAX_TCP_CONNECTIONS`] TCP connections, each with at most
//! [`MAX_PER_CONNECTION`] queries being answered and closed after [`TCP_IDLE`] without one;
//! queries over [`MAX_QUERY_LEN`] dropped (UDP) or closing the connection (TCP); at most
//! `--max-dns-queries` questions being answered at once in all, the rest answered SERVFAIL at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsCode;
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use nitro_vsock_proxy::net::endpoint::{Endpoint, Listener, Stream};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tracing::{debug, info, warn};

use super::names::Names;
use super::parent::ParentDns;
use super::RateLimited;
use crate::accept;

/// The longest query read (a question is far smaller); over UDP a longer datagram is dropped.
pub const MAX_QUERY_LEN: usize = 4096;
/// TCP connections to the stub at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Queries of one TCP connection being answered at once (reading pauses beyond).
pub const MAX_PER_CONNECTION: usize = 16;
/// A TCP connection with no query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Our EDNS payload size in replies (RFC 9715's advice).
const EDNS_PAYLOAD: u16 = 1232;
/// The Extended DNS Error option (RFC 8914), passed on from the parent's answers.
const EDE: EdnsCode = EdnsCode::Unknown(15);

/// What answering needs; shared by the UDP and TCP servers.
pub struct Stub {
    pub parent: ParentDns,
    pub names: Names,
    pub timeout: Duration,
    /// Questions being answered at once, in all (`--max-dns-queries`).
    pub slots: Semaphore,
    pub max_queries: usize,
    /// The line said when there are more.
    pub overloaded: RateLimited,
}

/// Serves UDP on `udp` until the task is dropped.
pub async fn serve_udp(udp: UdpSocket, stub: Arc<Stub>) {
    let udp = Arc::new(udp);
    let mut buf = vec![0u8; MAX_QUERY_LEN];
    loop {
        let (len, peer) = match udp.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                // An ICMP error for an earlier answer, or memory pressure: not fatal.
                debug!(error = %e, "DNS stub: UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let query = buf[..len].to_vec();
        let (udp, stub) = (udp.clone(), stub.clone());
        tokio::spawn(async move {
            if let Some(answer) = stub.answer(&query).await {
                if let Err(e) = udp.send_to(&answer, peer).await {
                    debug!(error = %e, %peer, "DNS stub: cannot send a UDP answer");
                }
            }
        });
    }
}

/// Serves TCP on `listener` until the task is dropped.
pub async fn serve_tcp(listener: Listener, stub: Arc<Stub>) {
    accept::serve(listener, MAX_TCP_CONNECTIONS, move |stream, _peer| {
        let stub = stub.clone();
        async move { serve_connection(stream, &stub).await }
    })
    .await;
}

/// One TCP connection: queries answered as they complete, ids kept.
async fn serve_connection(stream: Stream, stub: &Stub) {
    let (r, w) = tokio::io::split(stream);
    let codec = || {
        LengthDelimitedCodec::builder()
            .length_field_length(2)
            .max_frame_length(MAX_QUERY_LEN)
            .new_codec()
    };
    let mut queries = FramedRead::new(r, codec());
    let mut answers = FramedWrite::new(w, codec());
    let mut pending = FuturesUnordered::new();
    let mut reading = true;
    let idle = tokio::time::sleep(TCP_IDLE);
    tokio::pin!(idle);
    loop {
        if !reading && pending.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(answer) = pending.next(), if !pending.is_empty() => {
                let Some(answer): Option<Vec<u8>> = answer else { break };
                if let Err(e) = answers.send(Bytes::from(answer)).await {
                    debug!(error = %e, "DNS stub: cannot send a TCP answer; closing");
                    break;
                }
                idle.as_mut().reset(Instant::now() + TCP_IDLE);
            }
            query = queries.next(), if reading && pending.len() < MAX_PER_CONNECTION => {
                match query {
                    Some(Ok(query)) => {
                        pending.push(async move { stub.answer(&query).await });
                        idle.as_mut().reset(Instant::now() + TCP_IDLE);
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, max_bytes = MAX_QUERY_LEN, "DNS stub: a TCP query over the limit or a read error; closing");
                        break;
                    }
                    None => reading = false,
                }
            }
            _ = &mut idle, if pending.is_empty() => break,
        }
    }
}

impl Stub {
    /// The answer to one query, or `None` when it has no readable header (nothing to answer).
    pub async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = match Message::from_vec(query) {
            Ok(request) => request,
            Err(e) => {
                let header = Header::read(&mut BinDecoder::new(query)).ok()?;
                debug!(error = %e, "DNS stub: malformed query: FORMERR");
                return encode(&Message::error_msg(
                    header.metadata.id,
                    header.metadata.op_code,
                    ResponseCode::FormErr,
                ));
            }
        };
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        response.queries = request.queries.clone();
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.set_edns(edns);
        }
        let code = match self.slots.try_acquire() {
            Ok(_slot) => {
                match tokio::time::timeout(self.timeout, self.decide(&request, &mut response)).await
                {
                    Ok(code) => code,
                    Err(_) => {
                        let name = request.queries.first().map(|q| q.name().to_ascii());
                        warn!(name = name.as_deref().unwrap_or("-"), dns_timeout = %humantime::format_duration(self.timeout),
                            "DNS stub: no answer from the parent within --dns-timeout: SERVFAIL (is the parent's dns route up?)");
                        response.answers.clear();
                        ResponseCode::ServFail
                    }
                }
            }
            Err(_) => {
                self.overloaded.warn(format_args!(
                    "DNS stub: {} queries being answered at once already: SERVFAIL (raise --max-dns-queries if this is expected load)",
                    self.max_queries
                ));
                ResponseCode::ServFail
            }
        };
        response.metadata.response_code = code;
        encode(&response)
    }

    /// The response code for one parsed query; answer records (and the parent's Extended DNS
    /// Error) go into `response`.
    async fn decide(&self, request: &Message, response: &mut Message) -> ResponseCode {
        if request.metadata.message_type != MessageType::Query {
            return ResponseCode::FormErr;
        }
        if request.metadata.op_code != OpCode::Query {
            return ResponseCode::NotImp;
        }
        let [question] = request.queries.as_slice() else {
            return ResponseCode::FormErr;
        };
        let record_type = question.query_type();
        if record_type == RecordType::PTR || question.query_class() != DNSClass::IN {
            return ResponseCode::Refused;
        }
        let key = question
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if record_type != RecordType::A && self.names.holds(&key) {
            // The parent answered this name: v4 only inside.
            return ResponseCode::NoError;
        }
        let parent = match self.parent.ask(question.name(), RecordType::A).await {
            Ok(parent) => parent,
            Err(e) => {
                warn!(name = %key, "DNS stub: no answer from the parent: {e}; SERVFAIL");
                return ResponseCode::ServFail;
            }
        };
        let code = parent.metadata.response_code;
        if code != ResponseCode::NoError {
            // NXDOMAIN (a blocked or unknown name), SERVFAIL, REFUSED: as the parent said, with
            // its reason when the app can read one.
            if let (Some(ours), Some(theirs)) = (response.edns.as_mut(), parent.edns.as_ref()) {
                for ede in theirs.options().get_all(EDE) {
                    ours.options_mut().insert(ede.clone());
                }
            }
            return code;
        }
        let ttl = parent
            .answers
            .iter()
            .filter(|r| matches!(r.data, RData::A(_)))
            .map(|r| r.ttl)
            .min();
        let (Some(ttl), RecordType::A) = (ttl, record_type) else {
            // No address the parent would connect to, or not an A question: NODATA.
            return ResponseCode::NoError;
        };
        let Some(synthetic) = self.names.assign(&key) else {
            warn!(name = %key, pool = %self.names.pool(), capacity = self.names.capacity(),
                "DNS stub: every synthetic address has an open connection: SERVFAIL (give --fake-ip a larger pool)");
            return ResponseCode::ServFail;
        };
        response.add_answer(Record::from_rdata(
            question.name().clone(),
            ttl,
            RData::A(A(synthetic)),
        ));
        ResponseCode::NoError
    }
}

/// The message's bytes; one that cannot be encoded (it never should) is not answered.
fn encode(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            warn!(error = %e, "DNS stub: cannot encode an answer");
            None
        }
    }
}

/// Binds the stub's UDP socket and TCP listener on `addr`; errors say how to fix them.
pub async fn bind(addr: std::net::SocketAddr) -> Result<(UdpSocket, Listener), String> {
    let udp = UdpSocket::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => "another resolver already listens there",
            std::io::ErrorKind::PermissionDenied => {
                "ports below 1024 need root or CAP_NET_BIND_SERVICE"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "no interface has that address; is lo up (ip link set lo up)?"
            }
            _ => "check --dns-listen",
        };
        format!("cannot listen for DNS on udp:{addr}: {e} ({hint})")
    })?;
    let tcp = accept::bind(&Endpoint::Tcp(addr)).await?;
    info!(dns_listen = %addr, "DNS stub listening (UDP and TCP)");
    Ok((udp, tcp))
}
