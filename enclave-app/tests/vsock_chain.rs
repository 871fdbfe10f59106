//! Tier 1 of the VM test tier, enclave side: the workshop chain over real AF_VSOCK.
//!
//! ```text
//! enclave-app client 1 SERVER_PORT --vsock--> enclave-app server SERVER_PORT
//!   --HTTPS, pinned to 127.0.0.1:443--> enclave-app forwarder 127.0.0.1 443 1 DAEMON_PORT
//!   --vsock--> nitro-vsock-proxy vsock:DAEMON_PORT ip-ranges.amazonaws.com 443
//!   --DNS (TestDns on 127.0.0.1:53: ip-ranges.amazonaws.com -> 192.0.2.10)-->
//!   HTTPS stand-in (enclave-app demo-https) on 192.0.2.10:443
//! ```
//!
//! And the way in: a client on the parent's network → nitro-vsock-proxy's `mode: ingress` route
//! → vsock → `enclave-app ingress` → a TCP HTTP server in the enclave that reads the route's
//! PROXY v2 header (with `proxy-header`, not the daemon's parser) and reports the client.
//!
//! The same chain as `chain.rs` with every stand-in transport replaced by vsock: no piece gets a
//! `--stand-in` option. The daemon and the server listen on VMADDR_CID_ANY; the forwarder and the
//! client connect to CID 1 (VMADDR_CID_LOCAL). The host kernel has no vsock loopback transport,
//! and vsock CIDs 2 and 3 on the host are the machine's own hypervisor channel, so these tests do
//! their work only inside the VM that `make vm-test` (`tests/vm/run.sh`) boots, whose `/init`
//! loads `vsock_loopback` and sets `NVP_VM_TIER=1` (the gate of `tests/vsock_vm.rs`). On the host
//! every test returns at once and the file prints one line saying it was skipped; the VM runner
//! fails if that line ever appears inside the VM.
//!
//! Each test proves it used vsock, so a fallback to a stand-in cannot pass it: the daemon logs
//! `listen=vsock:PORT` and the connection it served with `peer=vsock:1:PORT`; the forwarder
//! logs `target=vsock:1:DAEMON_PORT` and the same byte counts as the daemon's connection; the
//! server logs `listen=vsock:PORT` and answers (or fails) inside a span naming a `vsock:1:`
//! peer; the client names `vsock:1:SERVER_PORT` when it fails. Each test has its own network
//! namespace (loopback, DNS server, stand-in address) and, since vsock is not namespaced, its own
//! vsock ports.

mod support;

use std::net::{IpAddr, SocketAddr};

use std::time::{Duration, Instant};

use nitro_vsock_proxy::net::endpoint::Endpoint;
use support::chain::{
    start_standin, CLIENT_TIMEOUT, FORWARDER, NAME, SAMPLE, SHIPPED_ALLOWLIST, US_EAST_1,
};
use support::dns::TestDns;
use support::netns::{self, run_in_netns};
use support::process::{proxy_bin, run, Output, Proc, APP};
use support::vm::{in_vm, socket_domain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// VMADDR_CID_LOCAL: the only CID these tests connect to.
const LOCAL_CID: u32 = 1;

/// How long to wait for a process to log what it must log (generous: the VM may be emulated).
const WAIT: Duration = Duration::from_secs(30);

/// What to start.
struct Setup {
    /// The daemon's vsock port (it listens on `vsock:PORT`, the forwarder connects to 1:PORT).
    daemon_port: u32,
    /// The server's vsock port (the client connects to 1:PORT).
    server_port: u32,
    /// The daemon's allowlist; `None`: the shipped config/your-vsock-proxy.yaml.
    allowlist: Option<&'static str>,
    /// What TestDns answers for ip-ranges.amazonaws.com when the daemon starts, and the TTL.
    dns_answer: IpAddr,
    dns_ttl: u32,
    /// A `mode: connect` route instead of the positional one, and the server downloading
    /// through it (`--proxy`) instead of pinned to the forwarder (`--connect-to`).
    via_connect: bool,
}

/// The chain over vsock, inside the calling test's network namespace. Everything stops when it
/// is dropped.
struct VsockChain {
    setup: Setup,
    dns: TestDns,
    standin: Proc,
    daemon: Proc,
    forwarder: Proc,
    server: Proc,
    /// Last, so the files outlive the processes.
    _dir: tempfile::TempDir,
}

impl VsockChain {
    /// Starts every piece and waits until each has logged that it listens, on vsock where it
    /// should. Call inside `run_in_netns`.
    async fn start(setup: Setup) -> VsockChain {
        let dir = tempfile::tempdir().expect("cannot make a temporary directory");
        netns::add_lo_addr("192.0.2.10".parse().unwrap());
        let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        dns.set(NAME, &[setup.dns_answer], setup.dns_ttl);

        let ca = dir.path().join("ca.pem");
        let standin = start_standin(ca.clone(), support::chain::STAND_IN, SAMPLE.as_ref()).await;

        let allowlist = dir.path().join("allowlist.yaml");
        match setup.allowlist {
            Some(text) => std::fs::write(&allowlist, text).unwrap(),
            None => {
                std::fs::copy(SHIPPED_ALLOWLIST, &allowlist).unwrap();
            }
        }

        // The parent's proxy, as in the workshop but with the test's DNS server.
        let listen = format!("vsock:{}", setup.daemon_port);
        let mut daemon_args = vec![
            "--config".to_owned(),
            allowlist.display().to_string(),
            "--nameserver".to_owned(),
            "127.0.0.1".to_owned(),
            "--dns-timeout".to_owned(),
            "2s".to_owned(),
        ];
        if setup.via_connect {
            let mut config = std::fs::read_to_string(&allowlist).unwrap();
            config.push_str(&format!(
                "routes:\n  - {{listen: '{listen}', mode: connect}}\n"
            ));
            std::fs::write(&allowlist, config).unwrap();
        } else {
            daemon_args.splice(0..0, [listen.clone(), NAME.to_owned(), "443".to_owned()]);
        }
        let mut daemon = Proc::spawn("nitro-vsock-proxy", proxy_bin(), &daemon_args, &[]);
        wait_logged(&mut daemon, &format!("listen=vsock:{}", setup.daemon_port)).await;

        // The enclave's forwarder: TCP 127.0.0.1:443 to vsock CID 1 at the daemon's port.
        let mut forwarder = Proc::spawn(
            "forwarder",
            APP,
            &[
                "forwarder".to_owned(),
                "127.0.0.1".to_owned(),
                "443".to_owned(),
                LOCAL_CID.to_string(),
                setup.daemon_port.to_string(),
            ],
            &[],
        );
        wait_logged(
            &mut forwarder,
            &format!("target=vsock:{LOCAL_CID}:{}", setup.daemon_port),
        )
        .await;
        let forwarder_addr: SocketAddr = FORWARDER.parse().unwrap();
        forwarder
            .wait_ready(|| netns::tcp_listening(forwarder_addr))
            .await;

        // The enclave's server on vsock, trusting only the stand-in's CA and pinned to the
        // forwarder (as the enclave's /etc/hosts does).
        let (how, to) = if setup.via_connect {
            ("--proxy", format!("http://{FORWARDER}"))
        } else {
            ("--connect-to", FORWARDER.to_owned())
        };
        let mut server = Proc::spawn(
            "server",
            APP,
            &[
                "server".to_owned(),
                setup.server_port.to_string(),
                how.to_owned(),
                to,
                "--ca-file".to_owned(),
                ca.display().to_string(),
            ],
            &[],
        );
        wait_logged(&mut server, &format!("listen=vsock:{}", setup.server_port)).await;

        VsockChain {
            setup,
            dns,
            standin,
            daemon,
            forwarder,
            server,
            _dir: dir,
        }
    }

    /// `enclave-app client 1 SERVER_PORT QUERY`: real vsock, no stand-in.
    async fn client(&self, query: &str) -> Output {
        run(
            APP,
            &[
                "client".to_owned(),
                LOCAL_CID.to_string(),
                self.setup.server_port.to_string(),
                query.to_owned(),
                "--timeout".to_owned(),
                "30s".to_owned(),
            ],
            CLIENT_TIMEOUT,
        )
        .await
    }
}

/// Waits until `proc` has logged `needle`.
///
/// # Panics
/// With its logs, if it exits first or [`WAIT`] passes.
async fn wait_logged(proc: &mut Proc, needle: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if proc.logs().contains(needle) {
            return;
        }
        if let Some(status) = proc.exited() {
            // Lets the reader threads take the last lines.
            tokio::time::sleep(Duration::from_millis(200)).await;
            panic!(
                "the process exited ({status}) without logging `{needle}`; logs:\n{}",
                proc.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no `{needle}` logged within {WAIT:?}; logs:\n{}",
            proc.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The vsock port of the CID-1 peer a log line names (`peer=vsock:1:PORT`), if it names one.
fn vsock_peer_port(line: &str) -> Option<u32> {
    // Span fields are bare (`peer=vsock:1:P`); the daemon's audit events quote theirs.
    let rest = line
        .split("peer=")
        .skip(1)
        .find_map(|rest| rest.trim_start_matches('"').strip_prefix("vsock:1:"))?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    rest[..digits].parse().ok()
}

/// The number after `key` (e.g. `bytes_to_client=`) in a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let rest = line.split_once(key)?.1;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    rest[..digits].parse().ok()
}

/// The lines `proc` has logged so far that name a vsock CID-1 peer and contain every needle.
fn vsock_lines_now(proc: &Proc, needles: &[&str]) -> Vec<String> {
    proc.logs()
        .lines()
        .filter(|l| vsock_peer_port(l).is_some() && needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// Waits until `proc` has logged at least `n` lines that name a vsock CID-1 peer and contain
/// every needle; returns them.
///
/// # Panics
/// With its logs, if fewer come within [`WAIT`].
async fn vsock_lines(proc: &Proc, needles: &[&str], n: usize) -> Vec<String> {
    support::wait_until(WAIT, || vsock_lines_now(proc, needles).len() >= n).await;
    let lines = vsock_lines_now(proc, needles);
    assert!(
        lines.len() >= n,
        "fewer than {n} lines name peer=vsock:{LOCAL_CID}:PORT and contain all of {needles:?}; \
         logs:\n{}",
        proc.logs()
    );
    lines
}

/// Sends `query` to the server on vsock 1:`port` from this process, as the workshop's client
/// does (one write, the write side left open), after checking the socket is AF_VSOCK; returns
/// the whole reply.
async fn raw_vsock_query(port: u32, query: &[u8]) -> Vec<u8> {
    let endpoint = Endpoint::Vsock {
        cid: LOCAL_CID,
        port,
    };
    let mut stream = tokio::time::timeout(WAIT, endpoint.connect())
        .await
        .unwrap_or_else(|_| panic!("vsock connect to {endpoint} timed out"))
        .unwrap_or_else(|e| panic!("vsock connect to {endpoint} failed: {e}"));
    assert_eq!(
        socket_domain(&stream),
        libc::AF_VSOCK,
        "the query socket is not AF_VSOCK"
    );
    stream.write_all(query).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut reply))
        .await
        .expect("the server neither replied nor closed")
        .unwrap();
    reply
}

#[test]
fn the_chain_over_vsock_answers_s3_prefixes_through_the_allowlist() {
    if !in_vm("vsock_chain") {
        return;
    }
    run_in_netns(|| async {
        // Acceptance: the daemon on vsock:8001 (VMADDR_CID_ANY), the forwarder to CID 1, the
        // server on vsock 5005, the client to CID 1, the shipped workshop allowlist.
        let chain = VsockChain::start(Setup {
            daemon_port: 8001,
            server_port: 5005,
            allowlist: None,
            dns_answer: "192.0.2.10".parse().unwrap(),
            dns_ttl: 300,
            via_connect: false,
        })
        .await;

        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert_eq!(out.stdout, format!("{US_EAST_1}\n"), "{out:?}");

        // The server answered a vsock client (CID 1).
        let answered = vsock_lines(&chain.server, &["answered", "prefixes=7"], 1).await;
        assert_eq!(answered.len(), 1, "one query, one answer: {answered:?}");

        // The download went through the daemon: a vsock peer, relayed to the stand-in's
        // address, which only the in-VM DNS server gives the name.
        let relayed = vsock_lines(
            &chain.daemon,
            &[
                "upstream=192.0.2.10:443",
                "connection closed",
                "end=completed",
            ],
            1,
        )
        .await;
        assert_eq!(
            relayed.len(),
            1,
            "one download, one connection: {relayed:?}"
        );
        assert!(chain.dns.queries(NAME) >= 1, "the daemon did not ask DNS");
        assert_eq!(
            chain.standin.wait_lines(&["served", "status=200"], 1).await,
            1
        );
        let daemon_logs = chain.daemon.logs();
        assert!(
            daemon_logs
                .lines()
                .filter(|l| l.contains("conn{"))
                .all(|l| vsock_peer_port(l).is_some()),
            "every connection the daemon served came over vsock from CID 1:\n{daemon_logs}"
        );

        // The daemon's vsock connection is the forwarder's: the same bytes each way.
        let forwarded = chain
            .forwarder
            .wait_lines(&["connection closed", "end=completed"], 1)
            .await;
        assert_eq!(forwarded, 1, "{}", chain.forwarder.logs());
        let forwarder_logs = chain.forwarder.logs();
        let forwarder_line = forwarder_logs
            .lines()
            .find(|l| l.contains("connection closed") && l.contains("end=completed"))
            .unwrap();
        let to_parent = field(forwarder_line, "bytes_to_parent=");
        let to_enclave = field(forwarder_line, "bytes_to_client=");
        assert!(
            to_parent.is_some_and(|n| n > 0) && to_enclave.is_some_and(|n| n > 0),
            "{forwarder_line}"
        );
        assert_eq!(
            (to_parent, to_enclave),
            (
                field(&relayed[0], "bytes_to_upstream="),
                field(&relayed[0], "bytes_to_client=")
            ),
            "the forwarder's and the daemon's byte counts differ:\n{forwarder_line}\n{}",
            relayed[0]
        );
    });
}

#[test]
fn the_chain_over_vsock_answers_through_a_connect_route() {
    if !in_vm("vsock_chain") {
        return;
    }
    run_in_netns(|| async {
        let chain = VsockChain::start(Setup {
            daemon_port: 8005,
            server_port: 5007,
            allowlist: None,
            dns_answer: "192.0.2.10".parse().unwrap(),
            dns_ttl: 300,
            via_connect: true,
        })
        .await;
        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert_eq!(out.stdout, format!("{US_EAST_1}\n"), "{out:?}");
        let relayed = vsock_lines(
            &chain.daemon,
            &[
                "route=vsock:8005 ",
                "upstream=192.0.2.10:443",
                "connection closed",
            ],
            1,
        )
        .await;
        assert_eq!(relayed.len(), 1, "{}", chain.daemon.logs());
    });
}

#[test]
fn an_endpoint_outside_the_allowlist_gives_an_error_reply_over_vsock() {
    if !in_vm("vsock_chain") {
        return;
    }
    run_in_netns(|| async {
        // The daemon starts while the name resolves inside the allowed block; then DNS moves it
        // to the stand-in's address, which the allowlist does not cover.
        let chain = VsockChain::start(Setup {
            daemon_port: 8002,
            server_port: 5006,
            allowlist: Some("allowlist:\n  - {address: 198.51.100.0/24, port: 443}\n"),
            dns_answer: "198.51.100.10".parse().unwrap(),
            dns_ttl: 0,
            via_connect: false,
        })
        .await;
        chain.dns.set(NAME, &["192.0.2.10".parse().unwrap()], 0);
        let denial = ["WARN", "connection refused", "192.0.2.10 denied"];

        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        assert!(
            out.stderr.contains(&format!(
                "the server at vsock:{LOCAL_CID}:5006 could not answer \"us-east-1\""
            )),
            "the client reports the server's error reply: {}",
            out.stderr
        );
        // The daemon logged the denial with its vsock peer; the server its failure with its
        // client's.
        vsock_lines(&chain.daemon, &denial, 1).await;
        vsock_lines(&chain.server, &["WARN", "cannot answer"], 1).await;

        // The reply itself, on the wire: an {"error": ...} object (a failure is not cached, so
        // this query is denied again).
        let reply = raw_vsock_query(5006, b"us-east-1").await;
        let value: serde_json::Value = serde_json::from_slice(&reply)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&reply)));
        let message = value["error"].as_str().unwrap_or_default();
        assert!(
            message.contains("cannot download https://ip-ranges.amazonaws.com/ip-ranges.json"),
            "{value}"
        );
        // Two queries, two denials: the daemon writes at most one refusal line a second per
        // (route, peer CID, reason), so the second is its own line or counted in the summary
        // ("N more refused like this") that follows the second.
        let accounted = || {
            let logs = chain.daemon.logs();
            let lines = vsock_lines_now(&chain.daemon, &denial).len() as u64;
            let summarised: u64 = logs
                .lines()
                .filter(|l| {
                    l.contains("more refused like this")
                        && l.contains("route=\"vsock:8002\"")
                        && l.contains("reason=\"denied\"")
                })
                .filter_map(|l| field(l, "suppressed="))
                .sum();
            lines + summarised
        };
        support::wait_until(WAIT, || accounted() >= 2).await;
        assert_eq!(
            accounted(),
            2,
            "two queries, two denials logged or summarised:\n{}",
            chain.daemon.logs()
        );

        assert!(
            !chain.daemon.logs().contains("upstream=192.0.2.10"),
            "the daemon connected to the denied address:\n{}",
            chain.daemon.logs()
        );
        assert!(
            !chain.standin.logs().contains("conn{"),
            "nothing reached the stand-in: {}",
            chain.standin.logs()
        );
    });
}

/// A TCP HTTP server on `addr`, the enclave's own: reads the PROXY header with `proxy-header`,
/// then the request head, and answers `client=IP:PORT` (the client the header names). Returns
/// how many connections it accepted.
async fn client_reporting_http_server(
    addr: SocketAddr,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use proxy_header::{ParseConfig, ProxyHeader};
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 2048];
                let client = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    match ProxyHeader::parse(&buf, ParseConfig::default()) {
                        Ok((header, used)) => {
                            let client = header
                                .proxied_address()
                                .map_or_else(|| "local".to_owned(), |a| a.source.to_string());
                            buf.drain(..used);
                            break client;
                        }
                        Err(proxy_header::Error::BufferTooShort) => continue,
                        Err(e) => panic!("the enclave's server got no PROXY header: {e}"),
                    }
                };
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = format!("client={client}\n");
                let reply = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    accepted
}

#[test]
fn an_ingress_route_reaches_a_tcp_server_in_the_enclave_over_vsock() {
    if !in_vm("vsock_chain") {
        return;
    }
    run_in_netns(|| async {
        const BRIDGE_PORT: u32 = 8443;
        let route: SocketAddr = "127.0.0.1:9443".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let accepted = client_reporting_http_server(server).await;

        // The enclave's end: vsock BRIDGE_PORT to its TCP server, the header kept.
        let mut bridge = Proc::spawn(
            "ingress",
            APP,
            &[
                "ingress".to_owned(),
                "--listen".to_owned(),
                format!("vsock:{BRIDGE_PORT}"),
                "--to".to_owned(),
                format!("tcp:{server}"),
            ],
            &[],
        );
        wait_logged(&mut bridge, &format!("listen=vsock:{BRIDGE_PORT}")).await;

        // The parent's: the network side to the enclave (CID 1 here) over vsock.
        let config = dir.path().join("routes.yaml");
        std::fs::write(
            &config,
            format!(
                "routes:\n  - listen: \"tcp:{route}\"\n    mode: ingress\n    to: \"vsock:{LOCAL_CID}:{BRIDGE_PORT}\"\n    allow_from: [\"127.0.0.2\"]\n    proxy_protocol: v2\n"
            ),
        )
        .unwrap();
        let mut daemon = Proc::spawn(
            "nitro-vsock-proxy",
            proxy_bin(),
            &["--config".to_owned(), config.display().to_string()],
            &[("RUST_LOG", "debug")],
        );
        daemon.wait_ready(|| netns::tcp_listening(route)).await;

        let connect_from = |source: &'static str| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
            socket.connect(route).await.unwrap()
        };
        let mut conn = connect_from("127.0.0.2").await;
        let port = conn.local_addr().unwrap().port();
        conn.write_all(b"GET / HTTP/1.0\r\nHost: enclave\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(WAIT, conn.read_to_end(&mut reply))
            .await
            .expect("no reply through the ingress route")
            .unwrap();
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.0 200 OK"), "{reply}");
        assert!(
            reply.ends_with(&format!("client=127.0.0.2:{port}\n")),
            "the enclave's server names the client: {reply}"
        );
        // Over vsock: the daemon's connection reached the bridge's vsock port.
        wait_logged(
            &mut daemon,
            &format!("upstream=vsock:{LOCAL_CID}:{BRIDGE_PORT}"),
        )
        .await;

        // A source outside allow_from reaches nothing in the enclave.
        let mut refused = connect_from("127.0.0.3").await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, refused.read_to_end(&mut rest)).await;
        assert!(rest.is_empty(), "{rest:?}");
        wait_logged(&mut daemon, "reason=\"source_not_allowed\"").await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    });
}
