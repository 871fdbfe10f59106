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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::opt::EdnsOption;
    use hickory_proto::rr::Name;

    use super::*;

    /// A stand-in for the parent's dns route on a unix socket in `dir`: each query of
    /// connection `n` (0, 1, ...) is answered with what `answer(n, query)` gives, or the
    /// connection is dropped on `None`. Counts queries.
    async fn fake_parent(
        dir: &Path,
        answer: impl Fn(usize, &Message) -> Option<Message> + Send + Sync + 'static,
    ) -> (Endpoint, Arc<AtomicUsize>) {
        let endpoint = Endpoint::Unix(dir.join("dns.sock"));
        let listener = endpoint.bind().await.unwrap();
        let answer = Arc::new(answer);
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (answer, counted) = (answer.clone(), counted.clone());
                tokio::spawn(async move {
                    let (r, w) = tokio::io::split(stream);
                    let codec = || {
                        LengthDelimitedCodec::builder()
                            .length_field_length(2)
                            .new_codec()
                    };
                    let (mut r, mut w) =
                        (FramedRead::new(r, codec()), FramedWrite::new(w, codec()));
                    while let Some(Ok(frame)) = r.next().await {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let query = Message::from_vec(&frame).unwrap();
                        let Some(reply) = answer(n, &query) else {
                            return;
                        };
                        w.send(Bytes::from(reply.to_vec().unwrap())).await.unwrap();
                    }
                });
            }
        });
        (endpoint, queries)
    }

    fn new_stub(parent: Endpoint, timeout: Duration) -> Stub {
        Stub {
            parent: ParentDns::start(parent, timeout),
            names: Names::new("198.18.0.0/15".parse().unwrap()),
            timeout,
            slots: Semaphore::new(8),
            max_queries: 8,
            overloaded: RateLimited::default(),
        }
    }

    fn query(name: &str, record_type: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        if edns {
            m.set_edns(Edns::new());
        }
        m.to_vec().unwrap()
    }

    /// The parent's answer to `q`: `code`, with an A record of TTL 42 when `address` is set,
    /// and EDE 15 when the code is NXDOMAIN and the query has EDNS.
    fn reply(q: &Message, code: ResponseCode, address: Option<&str>) -> Message {
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.queries = q.queries.clone();
        m.metadata.response_code = code;
        if let Some(a) = address {
            m.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                42,
                RData::A(A(a.parse().unwrap())),
            ));
        }
        if q.edns.is_some() {
            let mut edns = Edns::new();
            if code == ResponseCode::NXDomain {
                let mut ede = 15u16.to_be_bytes().to_vec();
                ede.extend_from_slice(b"not in the allowlist");
                edns.options_mut().insert(EdnsOption::Unknown(15, ede));
            }
            m.set_edns(edns);
        }
        m
    }

    async fn ask(stub: &Stub, name: &str, t: RecordType, edns: bool) -> Message {
        Message::from_vec(&stub.answer(&query(name, t, edns)).await.unwrap()).unwrap()
    }

    fn addresses(m: &Message) -> Vec<(String, u32)> {
        m.answers
            .iter()
            .map(|r| (r.data.to_string(), r.ttl))
            .collect()
    }

    #[tokio::test]
    async fn a_question_in_flight_on_a_lost_connection_is_asked_once_more() {
        let dir = tempfile::tempdir().unwrap();
        // The first connection drops its first query; the next one answers.
        let (parent, queries) = fake_parent(dir.path(), |n, q| {
            (n > 0).then(|| reply(q, ResponseCode::NoError, Some("192.0.2.1")))
        })
        .await;
        let stub = new_stub(parent, Duration::from_secs(5));
        let m = ask(&stub, "api.test", RecordType::A, false).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.metadata.id, 7, "the app's id is kept");
        assert_eq!(addresses(&m), [("198.18.0.1".to_owned(), 42)]);
        assert_eq!(queries.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_parents_refusals_pass_with_their_reason_only_to_edns_queries() {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (parent, _) = fake_parent(dir.path(), |_, q| {
                let name = q.queries[0].name().to_ascii();
                Some(match name.as_str() {
                    "blocked.test." => reply(q, ResponseCode::NXDomain, None),
                    "broken.test." => reply(q, ResponseCode::ServFail, None),
                    _ => reply(q, ResponseCode::NoError, None),
                })
            })
            .await;
            let stub = new_stub(parent, Duration::from_secs(5));
            for t in [RecordType::A, RecordType::AAAA, RecordType::HTTPS] {
                let m = ask(&stub, "blocked.test", t, true).await;
                assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{t}");
                let edns = m.edns.as_ref().expect("EDNS answered with EDNS");
                assert!(edns.options().get(EDE).is_some(), "{t}: EDE 15 passed on");
            }
            let plain = ask(&stub, "blocked.test", RecordType::A, false).await;
            assert_eq!(plain.metadata.response_code, ResponseCode::NXDomain);
            assert!(plain.edns.is_none());
            let broken = ask(&stub, "broken.test", RecordType::A, true).await;
            assert_eq!(broken.metadata.response_code, ResponseCode::ServFail);
            // Allowed, but no address the parent would connect to (the metadata service):
            // NODATA, and no synthetic address spent on it.
            let empty = ask(&stub, "rebind.test", RecordType::A, false).await;
            assert_eq!(empty.metadata.response_code, ResponseCode::NoError);
            assert!(empty.answers.is_empty());
            assert!(!stub.names.holds("rebind.test"));
        });
    }

    #[tokio::test]
    async fn other_types_are_nodata_ptr_is_refused_and_garbage_is_formerr() {
        let dir = tempfile::tempdir().unwrap();
        let (parent, queries) = fake_parent(dir.path(), |_, q| {
            assert_eq!(q.queries[0].query_type(), RecordType::A, "only A is asked");
            Some(reply(q, ResponseCode::NoError, Some("192.0.2.1")))
        })
        .await;
        let stub = new_stub(parent, Duration::from_secs(5));
        let a = ask(&stub, "Api.Test.", RecordType::A, false).await;
        assert_eq!(addresses(&a), [("198.18.0.1".to_owned(), 42)]);
        assert_eq!(
            a.answers[0].name.to_ascii(),
            "Api.Test.",
            "as the app spelled it"
        );
        assert_eq!(queries.load(Ordering::SeqCst), 1);
        // The name holds an address: NODATA without asking again.
        for t in [RecordType::AAAA, RecordType::HTTPS, RecordType::SVCB] {
            let m = ask(&stub, "api.test", t, false).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{t}");
            assert!(m.answers.is_empty(), "{t}");
        }
        assert_eq!(queries.load(Ordering::SeqCst), 1);
        // A name the table does not hold: the parent is asked for A, to know it exists.
        let m = ask(&stub, "new.test", RecordType::AAAA, false).await;
        assert!(m.answers.is_empty() && m.metadata.response_code == ResponseCode::NoError);
        assert_eq!(queries.load(Ordering::SeqCst), 2);
        assert!(
            !stub.names.holds("new.test"),
            "no address for an AAAA question"
        );
        let ptr = ask(&stub, "1.0.18.198.in-addr.arpa", RecordType::PTR, false).await;
        assert_eq!(ptr.metadata.response_code, ResponseCode::Refused);
        assert_eq!(queries.load(Ordering::SeqCst), 2);
        assert!(
            stub.answer(b"\x00\x07").await.is_none(),
            "no header: nothing to answer"
        );
        let mut garbage = query("api.test", RecordType::A, false);
        garbage.truncate(garbage.len() - 3);
        let m = Message::from_vec(&stub.answer(&garbage).await.unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.metadata.id, 7);
    }

    #[tokio::test]
    async fn no_answer_in_time_or_no_parent_is_servfail_in_time() {
        let dir = tempfile::tempdir().unwrap();
        // A parent that takes the connection and never answers.
        let parent = Endpoint::Unix(dir.path().join("silent.sock"));
        let listener = parent.bind().await.unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let stub = new_stub(parent, Duration::from_millis(300));
        let started = std::time::Instant::now();
        let m = ask(&stub, "api.test", RecordType::A, false).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "{:?}",
            started.elapsed()
        );

        let gone = new_stub(
            Endpoint::Unix(dir.path().join("nobody.sock")),
            Duration::from_secs(5),
        );
        let started = std::time::Instant::now();
        let m = ask(&gone, "api.test", RecordType::A, false).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a refused connect fails at once"
        );
    }
}
