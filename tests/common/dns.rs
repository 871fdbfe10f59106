//! In-process authoritative DNS server for integration tests.
//!
//! Owns [`TestDns`]: a hickory-server 0.26 [`Server`] with a custom [`RequestHandler`]
//! answering A/AAAA queries from a mutable in-memory table, on UDP *and* TCP at one
//! address. Tests change answers with [`TestDns::set`] / [`TestDns::remove`], prove
//! (re-)resolutions with [`TestDns::queries`], and simulate a dead resolver with
//! [`TestDns::stop`] / [`TestDns::restart`].
//!
//! Answer rules:
//! * names are case-insensitive and the trailing dot is optional (`Example.COM.` ==
//!   `example.com`);
//! * a name that was never `set` (or was `remove`d) answers NXDOMAIN;
//! * an alias ([`TestDns::set_cname`]) answers its CNAME record and then its target's records;
//! * a name given a delay ([`TestDns::set_delay`]) is answered that much later;
//! * a known name with no record of the queried type (e.g. AAAA for a v4-only name, or
//!   any type other than A/AAAA) answers NOERROR with an empty answer (NODATA);
//! * every negative answer carries an SOA (owner `.`, TTL 1 s, minimum 1 s) in the
//!   authority section so resolvers cache it for at most 1 s.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};

use super::{netns, wait_until};

/// TTL and SOA minimum of negative answers (NXDOMAIN / NODATA), in seconds.
pub const NEGATIVE_TTL: u32 = 1;

/// Idle timeout for TCP connections to the test server.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The records of one name (A and AAAA share the TTL), or an alias of another name.
#[derive(Clone, Debug)]
struct Entry {
    ips: Vec<IpAddr>,
    ttl: u32,
    /// `set_cname`: answered as a CNAME record to this name, then that name's records.
    cname: Option<String>,
    /// `set_delay`: how long queries for the name wait before they are answered.
    delay: Duration,
}

/// Shared, mutable state: the records and per-name query counters.
#[derive(Default, Debug)]
struct Table {
    entries: HashMap<String, Entry>,
    queries: HashMap<String, usize>,
}

/// Lower-cases and strips the trailing dot, so every spelling of a name is one key.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// An in-process DNS server on UDP and TCP at one address. See the module docs.
///
/// Dropping it aborts the server tasks (the sockets close shortly after).
pub struct TestDns {
    addr: SocketAddr,
    table: Arc<Mutex<Table>>,
    server: Option<Server<Handler>>,
}

impl TestDns {
    /// Starts serving on `addr` (UDP and TCP). With port 0, a free port is picked (the
    /// same one for UDP and TCP); [`TestDns::addr`] returns it.
    ///
    /// # Panics
    /// If either socket cannot be bound.
    pub async fn start(addr: SocketAddr) -> TestDns {
        let mut dns = TestDns {
            addr,
            table: Arc::default(),
            server: None,
        };
        dns.serve().await;
        dns
    }

    /// The address the server listens on (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the server is currently serving (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Replaces the A and AAAA records of `name`: IPv4 entries become A records, IPv6
    /// entries AAAA records, all with `ttl`. Takes effect for the next query. An empty
    /// `ips` makes the name exist with no records (NODATA for every type).
    pub fn set(&self, name: &str, ips: &[IpAddr], ttl: u32) {
        self.lock().entries.insert(
            normalize(name),
            Entry {
                ips: ips.to_vec(),
                ttl,
                cname: None,
                delay: Duration::ZERO,
            },
        );
    }

    /// Makes `name` an alias: a CNAME record to `target` (TTL `ttl`), followed in the same
    /// answer by `target`'s records of the queried type, as a recursive resolver answers.
    pub fn set_cname(&self, name: &str, target: &str, ttl: u32) {
        self.lock().entries.insert(
            normalize(name),
            Entry {
                ips: Vec::new(),
                ttl,
                cname: Some(normalize(target)),
                delay: Duration::ZERO,
            },
        );
    }

    /// Makes queries for `name` (already `set`) wait `delay` before they are answered.
    pub fn set_delay(&self, name: &str, delay: Duration) {
        if let Some(entry) = self.lock().entries.get_mut(&normalize(name)) {
            entry.delay = delay;
        }
    }

    /// Removes every record of `name`: it answers NXDOMAIN from the next query on.
    pub fn remove(&self, name: &str) {
        self.lock().entries.remove(&normalize(name));
    }

    /// How many queries (of any type, over UDP or TCP) arrived for `name` so far. A
    /// dual-stack lookup typically sends one A and one AAAA query.
    pub fn queries(&self, name: &str) -> usize {
        self.lock()
            .queries
            .get(&normalize(name))
            .copied()
            .unwrap_or(0)
    }

    /// How many queries arrived in total, for any name.
    pub fn total_queries(&self) -> usize {
        self.lock().queries.values().sum()
    }

    /// Polls until at least `n` queries for `name` arrived or `timeout` elapsed; returns
    /// whether the count was reached. Lets tests wait for a background re-resolution.
    pub async fn wait_for_queries(&self, name: &str, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.queries(name) >= n).await
    }

    /// Stops serving and closes both sockets (open TCP connections are dropped too), so
    /// resolvers see a dead server: UDP queries get ICMP port-unreachable, TCP connects
    /// are refused. Returns once neither socket is open any more. Records and counters
    /// are kept. A no-op if already stopped.
    ///
    /// # Panics
    /// If a socket is still open 2 s after the server tasks ended.
    pub async fn stop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        if let Err(e) = server.shutdown_gracefully().await {
            // A task ending with an error still ended; its socket is closed.
            eprintln!(
                "TestDns({}): server task ended with an error: {e}",
                self.addr
            );
        }
        drop(server);
        // The server tasks have returned, but a fork elsewhere in the test process can
        // hold a copy of the fds until it execs: wait until the kernel has really
        // released both sockets.
        let addr = self.addr;
        let closed = wait_until(Duration::from_secs(2), || {
            !netns::udp_bound(addr) && !netns::tcp_listening(addr)
        })
        .await;
        assert!(
            closed,
            "TestDns({addr}): sockets still open 2 s after stop()"
        );
    }

    /// Serves again on the same address with the same records (stopping first if it is
    /// still running).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.serve().await;
    }

    /// Binds both sockets on `self.addr` and starts the server tasks.
    async fn serve(&mut self) {
        let (udp, tcp) = bind_both(self.addr).await;
        self.addr = udp
            .local_addr()
            .expect("TestDns: bound UDP socket has no local address");
        let mut server = Server::new(Handler {
            table: self.table.clone(),
        });
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, 32);
        self.server = Some(server);
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }
}

/// Locks the table, ignoring poisoning (a panicking test must not hide its real error
/// behind a PoisonError in the server task).
fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds UDP and TCP on `addr` (with port 0: UDP picks a port, TCP takes the same).
/// Retries `EADDRINUSE` for up to 2 s: after `stop()`, the aborted server tasks release
/// their sockets asynchronously.
async fn bind_both(addr: SocketAddr) -> (UdpSocket, TcpListener) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let attempt: io::Result<(UdpSocket, TcpListener)> = async {
            let udp = UdpSocket::bind(addr).await?;
            let tcp = TcpListener::bind(udp.local_addr()?).await?;
            Ok((udp, tcp))
        }
        .await;
        match attempt {
            Ok(sockets) => return sockets,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!(
                "TestDns: cannot bind UDP+TCP {addr}: {e} (inside run_in_netns? for IPs \
                 other than 127.0.0.1 call netns::add_lo_addr first)"
            ),
        }
    }
}

/// The SOA put in the authority section of negative answers (owner: the root, so it
/// covers every name; TTL and minimum: [`NEGATIVE_TTL`]).
fn negative_soa() -> Record {
    let soa = SOA::new(
        Name::from_ascii("ns.test-dns.").expect("static SOA mname is a valid name"),
        Name::from_ascii("hostmaster.test-dns.").expect("static SOA rname is a valid name"),
        1,
        60,
        60,
        600,
        NEGATIVE_TTL,
    );
    Record::from_rdata(Name::root(), NEGATIVE_TTL, RData::SOA(soa))
}

/// The request handler: answers from the shared table and counts queries.
#[derive(Clone)]
struct Handler {
    table: Arc<Mutex<Table>>,
}

impl Handler {
    /// Counts the query and computes (response code, answers, how long to wait first).
    fn answer(&self, name: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>, Duration) {
        let key = normalize(&name.to_ascii());
        let mut table = lock(&self.table);
        *table.queries.entry(key.clone()).or_insert(0) += 1;
        let Some(entry) = table.entries.get(&key) else {
            return (ResponseCode::NXDomain, Vec::new(), Duration::ZERO);
        };
        let delay = entry.delay;
        let mut answers = Vec::new();
        let (owner, records) = match &entry.cname {
            Some(target) => {
                let target_name = Name::from_ascii(format!("{target}."))
                    .expect("TestDns: a CNAME target is a valid name");
                answers.push(Record::from_rdata(
                    name.clone(),
                    entry.ttl,
                    RData::CNAME(hickory_proto::rr::rdata::CNAME(target_name.clone())),
                ));
                match table.entries.get(target) {
                    Some(target_entry) => (target_name, target_entry),
                    None => return (ResponseCode::NXDomain, answers, delay),
                }
            }
            None => (name.clone(), entry),
        };
        answers.extend(
            records
                .ips
                .iter()
                .filter(|ip| match qtype {
                    RecordType::A => ip.is_ipv4(),
                    RecordType::AAAA => ip.is_ipv6(),
                    _ => false,
                })
                .map(|ip| Record::from_rdata(owner.clone(), records.ttl, RData::from(*ip))),
        );
        (ResponseCode::NoError, answers, delay)
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let queries = request.queries.queries();
        if request.metadata.op_code != OpCode::Query || queries.len() != 1 {
            let code = if request.metadata.op_code != OpCode::Query {
                ResponseCode::NotImp
            } else {
                ResponseCode::FormErr
            };
            let response = MessageResponseBuilder::from_message_request(request)
                .error_msg(&request.metadata, code);
            return send(&mut response_handle, response, &request.metadata).await;
        }

        let query = &queries[0];
        // Answer with the name as the client spelled it (0x20 case randomisation safe).
        let name = query.original().name().clone();
        let (code, answers, delay) = self.answer(&name, query.query_type());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let soa = if answers.is_empty() {
            vec![negative_soa()]
        } else {
            Vec::new()
        };

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = true;
        metadata.response_code = code;

        let response_edns = request.edns.as_ref().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            edns
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &response_edns {
            builder.edns(edns);
        }
        let response = builder.build(
            metadata,
            answers.iter(),
            std::iter::empty::<&Record>(),
            soa.iter(),
            std::iter::empty::<&Record>(),
        );
        send(&mut response_handle, response, &request.metadata).await
    }
}

/// Sends `response`; on failure, reports SERVFAIL as the outcome (nothing was sent).
async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request_metadata: &Metadata,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            eprintln!("TestDns: failed to send a response: {e}");
            let mut metadata = Metadata::response_from_request(request_metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}
