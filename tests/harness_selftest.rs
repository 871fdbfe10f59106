//! Self-test of the integration-test harness in `tests/common/`: namespace isolation,
//! the test DNS server (answers, TTLs, negative answers, stop/restart), the upstream
//! servers and the listen-address helpers. It does not run the proxy binary.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::netns::{current_netns_id, tcp_listening, udp_bound};
use common::proxy::{is_listening, ListenAddr};
use common::upstream::{pattern, sha256_hex, PatternGen, SINK_SOURCE_SEED};
use common::{
    add_lo_addr, connect, echo_server, response_server, run_in_netns, sink_source_server,
    try_connect, wait_until, TestDns,
};
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DNS_ADDR: &str = "127.0.0.1:53";

fn dns_addr() -> SocketAddr {
    DNS_ADDR
        .parse()
        .expect("DNS_ADDR is a valid socket address")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP literal is valid")
}

/// A resolver that only talks to `server` (UDP+TCP, or TCP only), fails fast (500 ms,
/// one attempt) and ignores /etc/hosts.
fn resolver(server: SocketAddr, tcp_only: bool) -> TokioResolver {
    let mut ns = if tcp_only {
        NameServerConfig::tcp(server.ip())
    } else {
        NameServerConfig::udp_and_tcp(server.ip())
    };
    for conn in &mut ns.connections {
        conn.port = server.port();
    }
    let mut builder = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    let opts = builder.options_mut();
    opts.timeout = Duration::from_millis(500);
    opts.attempts = 1;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.use_hosts_file = ResolveHosts::Never;
    builder.build().expect("resolver config is valid")
}

/// Looks up `name`/`rtype`; returns the addresses and TTLs of the answers.
async fn lookup(
    r: &TokioResolver,
    name: &str,
    rtype: RecordType,
) -> Result<Vec<(IpAddr, u32)>, NetError> {
    let lookup = r.lookup(name, rtype).await?;
    Ok(lookup
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::A(a) => Some((IpAddr::V4(a.0), rec.ttl)),
            RData::AAAA(aaaa) => Some((IpAddr::V6(aaaa.0), rec.ttl)),
            _ => None,
        })
        .collect())
}

/// The (response code, negative TTL) of a "no records" error; panics on anything else.
fn no_records(result: Result<Vec<(IpAddr, u32)>, NetError>) -> (ResponseCode, Option<u32>) {
    match result {
        Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => (nr.response_code, nr.negative_ttl),
        other => panic!("expected a NoRecordsFound error, got {other:?}"),
    }
}

#[test]
fn netns_is_private_and_inherited_by_workers_threads_and_children() {
    let test_ip = ip("192.0.2.10");
    let outer_ns = current_netns_id();
    assert!(
        std::net::TcpListener::bind((test_ip, 0)).is_err(),
        "192.0.2.10 must not be bindable in the host namespace (else this test proves nothing)"
    );

    run_in_netns(|| async move {
        let main_ns = current_netns_id();
        assert_ne!(main_ns, outer_ns, "run_in_netns did not switch namespace");
        add_lo_addr(test_ip);
        add_lo_addr(ip("2001:db8::10"));

        // A spawned task runs on a runtime worker thread, never on the block_on thread.
        let (worker_name, worker_ns, bound) = tokio::spawn(async move {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            let listener = tokio::net::TcpListener::bind((test_ip, 4000)).await;
            (name, current_netns_id(), listener.is_ok())
        })
        .await
        .expect("worker task panicked");
        assert!(
            worker_name.starts_with("netns-test-worker"),
            "ran on {worker_name:?}"
        );
        assert_eq!(
            worker_ns, main_ns,
            "worker thread is not in the private netns"
        );
        assert!(
            bound,
            "worker could not bind 192.0.2.10 (only exists in the netns)"
        );

        // Blocking-pool threads and plain threads spawned from workers inherit it too.
        let blocking_ns = tokio::task::spawn_blocking(current_netns_id)
            .await
            .expect("blocking task panicked");
        assert_eq!(blocking_ns, main_ns);
        let thread_ns = tokio::spawn(async {
            std::thread::spawn(current_netns_id)
                .join()
                .expect("thread panicked")
        })
        .await
        .expect("task panicked");
        assert_eq!(thread_ns, main_ns);

        // Child processes (like the proxy binary) are in it as well.
        let out = tokio::process::Command::new("ip")
            .args(["-o", "addr", "show", "dev", "lo"])
            .output()
            .await
            .expect("run ip addr show");
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(shown.contains("192.0.2.10/32"), "child sees: {shown}");
        assert!(shown.contains("2001:db8::10/128"), "child sees: {shown}");
        std::net::TcpListener::bind((ip("2001:db8::10"), 0)).expect("bind the added IPv6");

        // A v4-mapped address adds its IPv4 form, which the mapped form then reaches.
        add_lo_addr(ip("::ffff:169.254.169.254"));
        let trap = tokio::net::TcpListener::bind("169.254.169.254:443")
            .await
            .expect("bind the IPv4 form of the mapped address");
        tokio::net::TcpStream::connect("[::ffff:169.254.169.254]:443")
            .await
            .expect("connect via the mapped form");
        let (_, peer) = trap.accept().await.expect("accept");
        assert_eq!(peer.ip(), ip("169.254.169.254"));
    });
}

#[test]
fn netns_lets_two_concurrent_tests_use_127_0_0_1_53() {
    // Two threads, each in its own netns with its own TestDns on 127.0.0.1:53, serving
    // different answers for the same name at the same time.
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = ["192.0.2.1", "192.0.2.2"]
        .into_iter()
        .map(|answer| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                run_in_netns(|| async move {
                    let dns = TestDns::start(dns_addr()).await;
                    dns.set("who.test", &[ip(answer)], 60);
                    let wait = |b: Arc<Barrier>| async move {
                        tokio::task::spawn_blocking(move || {
                            b.wait();
                        })
                        .await
                        .expect("barrier wait")
                    };
                    wait(barrier.clone()).await; // both servers are bound now
                    let got = lookup(&resolver(dns.addr(), false), "who.test.", RecordType::A)
                        .await
                        .expect("lookup in own netns");
                    wait(barrier).await; // both looked up while both were bound
                    assert_eq!(got, vec![(ip(answer), 60)]);
                    assert_eq!(dns.queries("who.test"), 1);
                })
            })
        })
        .collect();
    for t in threads {
        t.join().expect("netns thread failed");
    }
}

#[test]
fn dns_answers_follow_set_and_remove() {
    run_in_netns(|| async {
        let dns = TestDns::start(dns_addr()).await;
        assert_eq!(dns.addr(), dns_addr());
        let r = resolver(dns.addr(), false);

        // Case-insensitive, trailing dot optional, A and AAAA split by family, TTL as set.
        dns.set(
            "Svc.Example.TEST.",
            &[ip("192.0.2.1"), ip("192.0.2.3"), ip("2001:db8::1")],
            300,
        );
        let mut a = lookup(&r, "svc.example.test.", RecordType::A)
            .await
            .expect("A lookup");
        a.sort();
        assert_eq!(a, vec![(ip("192.0.2.1"), 300), (ip("192.0.2.3"), 300)]);
        let aaaa = lookup(&r, "SVC.example.test.", RecordType::AAAA)
            .await
            .expect("AAAA lookup");
        assert_eq!(aaaa, vec![(ip("2001:db8::1"), 300)]);
        assert_eq!(dns.queries("svc.example.test"), 2);
        assert_eq!(dns.queries("SVC.EXAMPLE.TEST."), 2);

        let both = r.lookup_ip("svc.example.test.").await.expect("lookup_ip");
        assert_eq!(both.iter().count(), 3);

        // Replace: v4 only. The next query sees it; AAAA is NODATA with a 1 s negative TTL.
        dns.set("svc.example.test", &[ip("192.0.2.2")], 5);
        r.clear_cache();
        let a = lookup(&r, "svc.example.test.", RecordType::A).await;
        assert_eq!(a.expect("A after set"), vec![(ip("192.0.2.2"), 5)]);
        let nodata = lookup(&r, "svc.example.test.", RecordType::AAAA).await;
        assert_eq!(no_records(nodata), (ResponseCode::NoError, Some(1)));
        let other = lookup(&r, "svc.example.test.", RecordType::MX).await;
        assert_eq!(no_records(other), (ResponseCode::NoError, Some(1)));

        // Remove: NXDOMAIN (negative TTL 1 s), same for a never-set name.
        dns.remove("SVC.example.test.");
        r.clear_cache();
        let gone = lookup(&r, "svc.example.test.", RecordType::A).await;
        assert_eq!(no_records(gone), (ResponseCode::NXDomain, Some(1)));
        let unknown = lookup(&r, "never.example.test.", RecordType::AAAA).await;
        assert_eq!(no_records(unknown), (ResponseCode::NXDomain, Some(1)));
        assert_eq!(dns.queries("never.example.test"), 1);
        assert_eq!(dns.queries("unasked.example.test"), 0);

        // TCP serves the same data.
        dns.set("tcp.example.test", &[ip("198.51.100.7")], 42);
        let tcp = resolver(dns.addr(), true);
        let a = lookup(&tcp, "tcp.example.test.", RecordType::A).await;
        assert_eq!(a.expect("A over TCP"), vec![(ip("198.51.100.7"), 42)]);
    });
}

#[test]
fn dns_ttl_expiry_causes_a_counted_re_resolution() {
    run_in_netns(|| async {
        let dns = TestDns::start(dns_addr()).await;
        let r = resolver(dns.addr(), false);
        dns.set("short.test", &[ip("192.0.2.1")], 1);
        let first = lookup(&r, "short.test.", RecordType::A)
            .await
            .expect("first");
        assert_eq!(first, vec![(ip("192.0.2.1"), 1)]);
        dns.set("short.test", &[ip("192.0.2.2")], 1);

        // Within the TTL the resolver's cache answers: no new query, old address.
        let cached = lookup(&r, "short.test.", RecordType::A)
            .await
            .expect("cached");
        assert_eq!(cached[0].0, ip("192.0.2.1"));
        assert_eq!(dns.queries("short.test"), 1);

        tokio::time::sleep(Duration::from_millis(1100)).await;
        let fresh = lookup(&r, "short.test.", RecordType::A)
            .await
            .expect("fresh");
        assert_eq!(fresh, vec![(ip("192.0.2.2"), 1)]);
        assert_eq!(dns.queries("short.test"), 2);
        assert!(dns.wait_for_queries("short.test", 2, Duration::ZERO).await);
        assert_eq!(dns.total_queries(), 2);
    });
}

#[test]
fn dns_stop_closes_both_sockets_and_restart_keeps_records() {
    run_in_netns(|| async {
        let mut dns = TestDns::start(dns_addr()).await;
        dns.set("svc.test", &[ip("192.0.2.1")], 60);
        let r = resolver(dns.addr(), false);
        assert!(lookup(&r, "svc.test.", RecordType::A).await.is_ok());

        dns.stop().await;
        assert!(!dns.is_running());
        assert!(!udp_bound(dns_addr()) && !tcp_listening(dns_addr()));
        // Both sockets are really gone: the address can be bound again right away.
        drop(std::net::UdpSocket::bind(dns_addr()).expect("UDP 53 free after stop"));
        drop(std::net::TcpListener::bind(dns_addr()).expect("TCP 53 free after stop"));
        for tcp_only in [false, true] {
            let r = resolver(dns.addr(), tcp_only);
            let started = Instant::now();
            let err = lookup(&r, "svc.test.", RecordType::A).await;
            assert!(
                err.is_err(),
                "lookup succeeded against a stopped server: {err:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(3));
        }
        assert_eq!(
            dns.queries("svc.test"),
            1,
            "a stopped server must not count queries"
        );

        dns.restart().await;
        assert!(dns.is_running());
        assert_eq!(dns.addr(), dns_addr());
        r.clear_cache();
        let again = lookup(&r, "svc.test.", RecordType::A).await;
        assert_eq!(
            again.expect("lookup after restart"),
            vec![(ip("192.0.2.1"), 60)]
        );
        let tcp = lookup(&resolver(dns.addr(), true), "svc.test.", RecordType::A).await;
        assert!(tcp.is_ok(), "TCP after restart: {tcp:?}");
        assert_eq!(dns.queries("svc.test"), 3);

        // stop() twice and restart() while running are fine.
        dns.stop().await;
        dns.stop().await;
        dns.restart().await;
        dns.restart().await;
        r.clear_cache();
        assert!(lookup(&r, "svc.test.", RecordType::A).await.is_ok());
    });
}

#[test]
fn dns_on_another_loopback_address_and_port() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.53"));
        let dns = TestDns::start("192.0.2.53:5353".parse().expect("addr")).await;
        dns.set("x.test", &[ip("192.0.2.9")], 7);
        let a = lookup(&resolver(dns.addr(), false), "x.test.", RecordType::A).await;
        assert_eq!(a.expect("lookup"), vec![(ip("192.0.2.9"), 7)]);

        let any_port = TestDns::start("127.0.0.1:0".parse().expect("addr")).await;
        assert_ne!(any_port.addr().port(), 0);
        any_port.set("y.test", &[ip("::1")], 9);
        let aaaa = lookup(
            &resolver(any_port.addr(), true),
            "y.test.",
            RecordType::AAAA,
        )
        .await;
        assert_eq!(
            aaaa.expect("lookup"),
            vec![(IpAddr::V6(Ipv6Addr::LOCALHOST), 9)]
        );
    });
}

#[test]
fn upstream_echo_server_supports_half_close() {
    run_in_netns(|| async {
        let echo = echo_server("127.0.0.1:7000".parse().expect("addr")).await;
        let mut conn = connect("tcp:127.0.0.1:7000").await;
        let local = match &conn {
            common::Conn::Tcp(s) => s.local_addr().expect("local addr"),
            common::Conn::Unix(_) => unreachable!(),
        };
        let reply = conn
            .round_trip(b"hello, half-closed world", Duration::from_secs(5))
            .await
            .expect("round trip");
        assert_eq!(reply, b"hello, half-closed world");

        let reports = echo.wait_reports(1, Duration::from_secs(5)).await;
        assert_eq!(echo.accepted(), 1);
        assert_eq!(echo.peers(), vec![local]);
        assert_eq!(reports[0].peer, local);
        assert_eq!(reports[0].received, 24);
        assert_eq!(reports[0].sent, 24);
        assert_eq!(reports[0].head, b"hello, half-closed world");
        assert!(reports[0].error.is_none(), "{:?}", reports[0].error);
        assert_eq!(reports[0].sent_sha256, reports[0].received_sha256);

        // A bigger transfer, written and read concurrently.
        let data = pattern(1, 3 * 1024 * 1024 + 17);
        let conn = connect("tcp:127.0.0.1:7000").await;
        let (mut rd, mut wr) = tokio::io::split(conn);
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                wr.write_all(&data).await.expect("write");
                wr.shutdown().await.expect("half-close");
            })
        };
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await.expect("read echo");
        writer.await.expect("writer task");
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed data differs");
        let reports = echo.wait_reports(2, Duration::from_secs(5)).await;
        assert_eq!(reports[1].received_sha256, sha256_hex(&data));
        assert_eq!(echo.accepted(), 2);

        // stop() returns once the port refuses connections.
        echo.stop().await;
        let refused = try_connect("tcp:127.0.0.1:7000").await;
        assert!(refused.is_err(), "connected to a stopped upstream");
    });
}

#[test]
fn upstream_response_server_replies_after_eof() {
    run_in_netns(|| async {
        let srv = response_server(
            "127.0.0.1:7001".parse().expect("addr"),
            b"HTTP/1.0 200 OK\r\n\r\npong".to_vec(),
        )
        .await;
        let mut conn = connect("tcp:127.0.0.1:7001").await;
        let reply = conn
            .round_trip(b"GET /ping HTTP/1.0\r\n\r\n", Duration::from_secs(5))
            .await
            .expect("round trip");
        assert_eq!(reply, b"HTTP/1.0 200 OK\r\n\r\npong");
        let report = srv.wait_result(Duration::from_secs(5)).await;
        assert_eq!(report.head, b"GET /ping HTTP/1.0\r\n\r\n");
        assert_eq!(report.sent, 23);
        assert_eq!(
            report.sent_sha256,
            sha256_hex(b"HTTP/1.0 200 OK\r\n\r\npong")
        );
    });
}

#[test]
fn upstream_sink_source_server_hashes_both_directions() {
    run_in_netns(|| async {
        const DOWN: usize = 5 * 1024 * 1024 + 3;
        const UP: usize = 4 * 1024 * 1024 + 11;
        let srv = sink_source_server("127.0.0.1:7002".parse().expect("addr"), DOWN).await;

        let conn = connect("tcp:127.0.0.1:7002").await;
        let (mut rd, mut wr) = tokio::io::split(conn);
        let writer = tokio::spawn(async move {
            let mut gen = PatternGen::new(99);
            let mut chunk = vec![0u8; 100_000];
            let mut left = UP;
            while left > 0 {
                let n = left.min(chunk.len());
                gen.fill(&mut chunk[..n]);
                wr.write_all(&chunk[..n]).await.expect("write");
                left -= n;
            }
            wr.shutdown().await.expect("half-close");
        });
        let mut down = Vec::new();
        rd.read_to_end(&mut down).await.expect("read");
        writer.await.expect("writer");

        assert_eq!(down.len(), DOWN);
        let report = srv.wait_result(Duration::from_secs(5)).await;
        assert_eq!(sha256_hex(&down), report.sent_sha256);
        assert_eq!(
            report.sent_sha256,
            sha256_hex(&pattern(SINK_SOURCE_SEED, DOWN))
        );
        assert_eq!(report.received, UP as u64);
        assert_eq!(report.received_sha256, sha256_hex(&pattern(99, UP)));
        assert_eq!(report.sent, DOWN as u64);
        assert!(report.error.is_none(), "{:?}", report.error);
    });
}

#[test]
fn pattern_is_deterministic_and_chunking_independent() {
    let whole = pattern(7, 1000);
    let mut gen = PatternGen::new(7);
    let mut pieces = vec![0u8; 1000];
    for chunk in pieces.chunks_mut(13) {
        gen.fill(chunk);
    }
    assert_eq!(whole, pieces);
    let mut gen = PatternGen::new(7);
    let mut pieces = vec![0u8; 1000];
    let (mut at, mut step) = (0, 1);
    while at < pieces.len() {
        let end = (at + step).min(pieces.len());
        gen.fill(&mut pieces[at..end]);
        at = end;
        step = step % 19 + 1;
    }
    assert_eq!(whole, pieces);
    // Little-endian SplitMix64 words: pinned so both directions of a test agree forever.
    assert_eq!(&pattern(0, 8), &0xE220_A839_7B1D_CDAFu64.to_le_bytes());
    assert_ne!(pattern(7, 64), pattern(8, 64));
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn listen_addresses_parse_and_listening_is_detected_without_connecting() {
    assert_eq!(
        ListenAddr::parse("tcp:127.0.0.1:8000"),
        ListenAddr::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8000))
    );
    assert_eq!(
        ListenAddr::parse("tcp:[::1]:8000"),
        ListenAddr::Tcp(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 8000))
    );
    assert_eq!(
        ListenAddr::parse("tcp:::1:8000"),
        ListenAddr::parse("tcp:[::1]:8000")
    );
    assert_eq!(
        ListenAddr::parse("unix:/run/x.sock"),
        ListenAddr::Unix("/run/x.sock".into())
    );

    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.20"));
        assert!(!is_listening("tcp:127.0.0.1:9000"));
        let l4 = tokio::net::TcpListener::bind("127.0.0.1:9000")
            .await
            .expect("bind");
        assert!(is_listening("tcp:127.0.0.1:9000"));
        assert!(!is_listening("tcp:127.0.0.1:9001"));
        assert!(!is_listening("tcp:192.0.2.20:9000"));
        // Wildcard listeners match a specific address of their family.
        let _any4 = tokio::net::TcpListener::bind("0.0.0.0:9002")
            .await
            .expect("bind");
        assert!(is_listening("tcp:192.0.2.20:9002"));
        let _l6 = tokio::net::TcpListener::bind("[::1]:9003")
            .await
            .expect("bind");
        assert!(is_listening("tcp:[::1]:9003"));
        assert!(!is_listening("tcp:127.0.0.1:9003"));
        // A bound-but-not-listening socket does not count.
        let bound_only = tokio::net::TcpSocket::new_v4().expect("socket");
        bound_only
            .bind("127.0.0.1:9004".parse().expect("addr"))
            .expect("bind");
        assert!(!is_listening("tcp:127.0.0.1:9004"));
        // Checked on a worker thread too (where Proxy::wait_ready runs).
        let seen = tokio::spawn(async { is_listening("tcp:127.0.0.1:9000") })
            .await
            .expect("task");
        assert!(seen);
        drop(l4);
        // Polled: a concurrent fork in another test may hold the fd for a moment.
        assert!(
            wait_until(Duration::from_secs(2), || !is_listening(
                "tcp:127.0.0.1:9000"
            ))
            .await
        );

        assert!(!udp_bound("127.0.0.1:9005".parse().expect("addr")));
        let udp = std::net::UdpSocket::bind("127.0.0.1:9005").expect("bind udp");
        assert!(udp_bound("127.0.0.1:9005".parse().expect("addr")));
        assert!(!tcp_listening("127.0.0.1:9005".parse().expect("addr")));
        drop(udp);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("enclave.sock");
        let listen = format!("unix:{}", path.display());
        assert!(!is_listening(&listen));
        let unix = tokio::net::UnixListener::bind(&path).expect("bind unix");
        assert!(is_listening(&listen));
        let accept = tokio::spawn(async move {
            let (mut s, _) = unix.accept().await.expect("accept");
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.expect("read");
            s.write_all(&buf).await.expect("write");
        });
        let mut conn = connect(&listen).await;
        let back = conn
            .round_trip(b"over unix", Duration::from_secs(5))
            .await
            .expect("unix round trip");
        assert_eq!(back, b"over unix");
        accept.await.expect("accept task");
    });
}
