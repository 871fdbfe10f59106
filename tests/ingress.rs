//! `mode: ingress` through the real binary: clients on chosen 127.0.0.x sources in the test's own
//! network namespace, the enclave a `tcp:` stand-in server that reads the PROXY header with a
//! parser independent of the daemon's (`proxy-header`; the daemon writes with `ppp`) and echoes
//! the client address it saw. An allowed source reaches it with its address; a refused one is
//! closed before anything reaches it; a trusted load balancer's header is honoured and an
//! untrusted one's never is; a reload that tightens `allow_from` revokes; 64 MiB each way and a
//! half-close pass intact.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::netns::run_in_netns;
use common::proxy::{closed_without_a_byte, connect_from, run_to_exit, Proxy};
use common::upstream::{receive_hashed, response_server, send_pattern, sink_source_server};
use proxy_header::{ParseConfig, ProxiedAddress, ProxyHeader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LISTEN: &str = "tcp:127.0.0.1:8443";
const ENCLAVE: &str = "127.0.0.1:9443";
const WAIT: Duration = Duration::from_secs(10);

/// The stand-in enclave server: reads a PROXY header with `proxy-header`, answers
/// `client=IP:PORT dest=IP:PORT\n` (or `local\n` for a header without addresses), then echoes
/// everything after the header until EOF.
struct Enclave {
    accepted: Arc<AtomicUsize>,
    /// Every byte each connection sent, header included, in accept order.
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Enclave {
    async fn start() -> Enclave {
        let listener = TcpListener::bind(ENCLAVE).await.unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (a, r) = (accepted.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let index = {
                    let mut r = r.lock().unwrap();
                    r.push(Vec::new());
                    r.len() - 1
                };
                tokio::spawn(serve_enclave(stream, r.clone(), index));
            }
        });
        Enclave { accepted, received }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn received(&self, index: usize) -> Vec<u8> {
        self.received.lock().unwrap()[index].clone()
    }
}

async fn serve_enclave(mut stream: TcpStream, received: Arc<Mutex<Vec<Vec<u8>>>>, index: usize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (answer, used) = loop {
        match ProxyHeader::parse(&buf, ParseConfig::default()) {
            Ok((header, used)) => {
                let answer = match header.proxied_address() {
                    Some(a) => format!("client={} dest={}\n", a.source, a.destination),
                    None => "local\n".to_owned(),
                };
                break (answer, used);
            }
            Err(proxy_header::Error::BufferTooShort) => {}
            Err(e) => {
                let _ = stream
                    .write_all(format!("bad header: {e}\n").as_bytes())
                    .await;
                return;
            }
        }
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        received.lock().unwrap()[index].extend_from_slice(&chunk[..n]);
    };
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    if stream.write_all(&buf[used..]).await.is_err() {
        return;
    }
    loop {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            let _ = stream.shutdown().await;
            return;
        }
        received.lock().unwrap()[index].extend_from_slice(&chunk[..n]);
        if stream.write_all(&chunk[..n]).await.is_err() {
            return;
        }
    }
}

/// A load balancer's connection from 127.0.0.5 that names `client` in a v2 header, with `data`
/// after it; returns the enclave's answer line and the stream.
async fn through_lb(client: &str, data: &[u8]) -> (String, TcpStream) {
    let mut lb = connect_from("127.0.0.5", LISTEN).await;
    let mut first = v2_header(client, "203.0.113.1:443");
    first.extend_from_slice(data);
    lb.write_all(&first).await.unwrap();
    let line = read_line(&mut lb).await;
    (line, lb)
}

/// Reads one line (the enclave's answer) within [`WAIT`]; empty if the connection closed first.
async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        loop {
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => line.push(byte[0]),
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("no line from the enclave in time");
    String::from_utf8(line).unwrap()
}

fn write_config(dir: &tempfile::TempDir, yaml: &str) -> String {
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

fn route(extra: &str) -> String {
    format!(
        "routes:\n  - listen: \"{LISTEN}\"\n    mode: ingress\n    to: \"tcp:{ENCLAVE}\"\n{extra}"
    )
}

async fn start(dir: &tempfile::TempDir, yaml: &str, extra_args: &[&str]) -> (Proxy, String) {
    let config = write_config(dir, yaml);
    let mut args = vec!["--config".to_owned(), config.clone()];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    let proxy = Proxy::spawn(&args);
    proxy.wait_ready(LISTEN).await;
    (proxy, config)
}

fn v2_header(client: &str, destination: &str) -> Vec<u8> {
    let header = ProxyHeader::with_address(ProxiedAddress::stream(
        client.parse().unwrap(),
        destination.parse().unwrap(),
    ));
    let mut buf = Vec::new();
    header.encode_v2(&mut buf).unwrap();
    buf
}

fn v1_header(client: &str, destination: &str) -> Vec<u8> {
    let header = ProxyHeader::with_address(ProxiedAddress::stream(
        client.parse().unwrap(),
        destination.parse().unwrap(),
    ));
    let mut buf = Vec::new();
    header.encode_v1(&mut buf).unwrap();
    buf
}

#[test]
fn an_allowed_source_reaches_the_enclave_with_its_address_and_a_refused_one_reaches_nothing() {
    run_in_netns(|| async {
        let enclave = Enclave::start().await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = route(
            "    allow_from: [\"127.0.0.2/32\", \"2001:db8::/32\"]\n    proxy_protocol: v2\n",
        );
        let (proxy, _) = start(&dir, &yaml, &["--metrics-listen", "tcp:127.0.0.1:9190"]).await;

        let mut allowed = connect_from("127.0.0.2", LISTEN).await;
        let port = allowed.local_addr().unwrap().port();
        allowed.write_all(b"hello enclave").await.unwrap();
        assert_eq!(
            read_line(&mut allowed).await,
            format!("client=127.0.0.2:{port} dest=127.0.0.1:8443")
        );
        let mut echo = [0u8; 13];
        allowed.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"hello enclave");

        // An untrusted source's forged header is its data, behind the proxy's own header.
        let mut forger = connect_from("127.0.0.2", LISTEN).await;
        let forger_port = forger.local_addr().unwrap().port();
        let forged = v2_header("10.9.9.9:1234", "10.0.0.1:443");
        forger.write_all(&forged).await.unwrap();
        assert_eq!(
            read_line(&mut forger).await,
            format!("client=127.0.0.2:{forger_port} dest=127.0.0.1:8443")
        );
        let mut echoed = vec![0u8; forged.len()];
        forger.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, forged, "the forged header passed on as data");
        assert_eq!(enclave.accepted(), 2);
        // What the enclave read: the proxy's header, then the client's bytes untouched.
        assert!(enclave.received(0).ends_with(b"hello enclave"));
        let second = enclave.received(1);
        assert_eq!(&second[second.len() - forged.len()..], &forged[..]);
        assert!(
            second.len() > forged.len(),
            "the proxy's own header comes first"
        );

        // A source outside allow_from: closed, and the enclave never hears of it.
        let mut refused = connect_from("127.0.0.3", LISTEN).await;
        let _ = refused.write_all(b"let me in").await;
        assert!(closed_without_a_byte(&mut refused, WAIT).await);
        let line = proxy
            .wait_for_line("reason=\"source_not_allowed\"", WAIT)
            .await;
        assert!(line.contains("WARN"), "{line}");
        assert!(
            line.contains(
                "source 127.0.0.3 is not in the route's allow_from (127.0.0.2/32, 2001:db8::/32)"
            ),
            "{line}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            enclave.accepted(),
            2,
            "nothing connected for a refused source"
        );

        let samples = tokio::task::spawn_blocking(|| {
            common::metrics::scrape("http://127.0.0.1:9190/metrics", None)
        })
        .await
        .unwrap();
        let key =
            format!("nitro_vsock_proxy_connections_total{{outcome=\"denied\",route=\"{LISTEN}\"}}");
        assert_eq!(common::metrics::value(&samples, &key), 1.0, "{samples:?}");
        drop((allowed, forger));
    });
}

#[test]
fn a_trusted_load_balancers_header_is_honoured_and_a_bad_one_closes() {
    run_in_netns(|| async {
        let enclave = Enclave::start().await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = route(
            "    allow_from: [\"10.1.0.0/16\", \"2001:db8::/32\"]\n    proxy_protocol: v2\n    accept_proxy_protocol: [\"127.0.0.5\"]\n",
        );
        let (proxy, _) = start(&dir, &yaml, &["--setup-timeout", "2s"]).await;

        // A v2 header over two reads, then the client's bytes: the enclave sees the client the
        // load balancer named, and the address it connected to.
        let mut lb = connect_from("127.0.0.5", LISTEN).await;
        let header = v2_header("10.1.2.3:4444", "203.0.113.1:443");
        lb.write_all(&header[..10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        lb.write_all(&header[10..]).await.unwrap();
        lb.write_all(b"ping").await.unwrap();
        assert_eq!(
            read_line(&mut lb).await,
            "client=10.1.2.3:4444 dest=203.0.113.1:443"
        );
        let mut echo = [0u8; 4];
        lb.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        assert!(
            proxy.wait_for_log("client=10.1.2.3:4444", WAIT).await,
            "the log names the real client: {}",
            proxy.logs()
        );

        // A v1 header for an IPv6 client, in the same write as its data.
        let mut lb6 = connect_from("127.0.0.5", LISTEN).await;
        let mut first = v1_header("[2001:db8::7]:5555", "[2001:db8::1]:443");
        first.extend_from_slice(b"six");
        lb6.write_all(&first).await.unwrap();
        assert_eq!(
            read_line(&mut lb6).await,
            "client=[2001:db8::7]:5555 dest=[2001:db8::1]:443"
        );
        let mut echo = [0u8; 3];
        lb6.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"six");
        assert_eq!(enclave.accepted(), 2);

        // The load balancer's client outside allow_from: refused by that client's address.
        let mut outside = connect_from("127.0.0.5", LISTEN).await;
        outside
            .write_all(&v2_header("192.0.2.99:1000", "203.0.113.1:443"))
            .await
            .unwrap();
        assert!(closed_without_a_byte(&mut outside, WAIT).await);
        assert!(
            proxy
                .wait_for_log("source 192.0.2.99 is not in the route's allow_from", WAIT)
                .await,
            "{}",
            proxy.logs()
        );

        // No header, a malformed one, a late one: bad_proxy_header, and nothing reaches the
        // enclave.
        let mut plain = connect_from("127.0.0.5", LISTEN).await;
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(closed_without_a_byte(&mut plain, WAIT).await);
        let mut malformed = connect_from("127.0.0.5", LISTEN).await;
        malformed
            .write_all(b"PROXY TCP4 10.1.2.300 10.0.0.1 1 2\r\n")
            .await
            .unwrap();
        assert!(closed_without_a_byte(&mut malformed, WAIT).await);
        let mut late = connect_from("127.0.0.5", LISTEN).await;
        late.write_all(&header[..10]).await.unwrap();
        let started = std::time::Instant::now();
        assert!(closed_without_a_byte(&mut late, WAIT).await);
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert!(
            proxy
                .wait_for_log("no whole PROXY header within --setup-timeout", WAIT)
                .await,
            "{}",
            proxy.logs()
        );
        let bad = proxy
            .logs()
            .lines()
            .filter(|l| l.contains("reason=\"bad_proxy_header\""))
            .count();
        // The first is written; the others of the same second may be folded into a summary.
        assert!(bad >= 1, "{}", proxy.logs());
        assert!(
            proxy
                .logs()
                .contains("no PROXY header: the connection starts with other bytes"),
            "{}",
            proxy.logs()
        );
        assert_eq!(enclave.accepted(), 2);
        drop((lb, lb6));
    });
}

#[test]
fn a_load_balancers_clients_each_have_their_own_per_peer_slots() {
    run_in_netns(|| async {
        let _enclave = Enclave::start().await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = route(
            "    allow_from: [\"10.0.0.0/8\"]\n    proxy_protocol: v2\n    accept_proxy_protocol: [\"127.0.0.5\"]\n",
        );
        let (proxy, _) = start(&dir, &yaml, &["--max-connections-per-peer", "1"]).await;
        // Two clients through one load balancer: the limit is per client, not per balancer.
        let (a, _conn_a) = through_lb("10.1.1.1:1000", b"").await;
        assert_eq!(a, "client=10.1.1.1:1000 dest=203.0.113.1:443");
        let (b, _conn_b) = through_lb("10.1.1.2:1000", b"").await;
        assert_eq!(b, "client=10.1.1.2:1000 dest=203.0.113.1:443");
        // A second connection of the first client is over its limit.
        let (c, _conn_c) = through_lb("10.1.1.1:1001", b"").await;
        assert_eq!(c, "", "closed without an answer");
        assert!(
            proxy
                .wait_for_log("--max-connections-per-peer (1) for client 10.1.1.1", WAIT)
                .await,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn a_dual_stack_listeners_ipv4_client_is_judged_and_named_as_ipv4() {
    run_in_netns(|| async {
        let enclave = Enclave::start().await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "routes:\n  - listen: \"tcp:[::]:8443\"\n    mode: ingress\n    to: \"tcp:{ENCLAVE}\"\n    allow_from: [\"127.0.0.2\"]\n    proxy_protocol: v1\n"
        );
        let config = write_config(&dir, &yaml);
        let proxy = Proxy::spawn(&["--config", &config]);
        proxy.wait_ready("tcp:[::]:8443").await;
        let mut conn = connect_from("127.0.0.2", LISTEN).await;
        let port = conn.local_addr().unwrap().port();
        conn.write_all(b"v4").await.unwrap();
        assert_eq!(
            read_line(&mut conn).await,
            format!("client=127.0.0.2:{port} dest=127.0.0.1:8443")
        );
        assert!(enclave
            .received(0)
            .starts_with(b"PROXY TCP4 127.0.0.2 127.0.0.1 "));
        let mut refused = connect_from("127.0.0.3", LISTEN).await;
        assert!(closed_without_a_byte(&mut refused, WAIT).await);
        assert_eq!(enclave.accepted(), 1);
        drop(proxy);
    });
}

#[test]
fn a_unix_listeners_clients_are_judged_by_the_header_they_must_send() {
    run_in_netns(|| async {
        let enclave = Enclave::start().await;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("in.sock");
        let listen = format!("unix:{}", sock.display());
        let yaml = |accept: &str| {
            format!(
                "routes:\n  - listen: \"{listen}\"\n    mode: ingress\n    to: \"tcp:{ENCLAVE}\"\n    allow_from: [\"10.0.0.0/8\"]\n    proxy_protocol: v2\n{accept}"
            )
        };
        let config = write_config(&dir, &yaml("    accept_proxy_protocol: [\"127.0.0.1\"]\n"));
        let proxy = Proxy::spawn(&["--config", &config]);
        proxy.wait_ready(&listen).await;
        let mut conn = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let mut first = v1_header("10.1.2.3:4444", "10.0.0.1:443");
        first.extend_from_slice(b"via unix");
        conn.write_all(&first).await.unwrap();
        assert_eq!(
            read_line(&mut conn).await,
            "client=10.1.2.3:4444 dest=10.0.0.1:443"
        );
        // The header's client outside allow_from is refused like any other.
        let mut outside = tokio::net::UnixStream::connect(&sock).await.unwrap();
        outside
            .write_all(&v1_header("192.0.2.1:1", "10.0.0.1:443"))
            .await
            .unwrap();
        assert_eq!(read_line(&mut outside).await, "");
        assert_eq!(enclave.accepted(), 1);
        // Without accept_proxy_protocol a unix client has no address to judge: refused.
        proxy
            .reload_with(
                std::path::Path::new(&config),
                &yaml(""),
                "allowlist reloaded",
                1,
            )
            .await;
        let mut bare = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let _ = bare.write_all(b"hello").await;
        assert_eq!(read_line(&mut bare).await, "");
        assert!(
            proxy
                .wait_for_log("has no address to judge by allow_from", WAIT)
                .await,
            "{}",
            proxy.logs()
        );
        assert_eq!(enclave.accepted(), 1);
    });
}

#[test]
fn a_reload_that_tightens_allow_from_revokes_open_connections() {
    run_in_netns(|| async {
        let _enclave = Enclave::start().await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = route("    allow_from: [\"127.0.0.0/8\"]\n    proxy_protocol: v1\n");
        let (proxy, config) = start(&dir, &yaml, &[]).await;
        let mut two = connect_from("127.0.0.2", LISTEN).await;
        let mut three = connect_from("127.0.0.3", LISTEN).await;
        for c in [&mut two, &mut three] {
            c.write_all(b"x").await.unwrap();
            assert!(read_line(c).await.starts_with("client=127.0.0."));
            let mut echo = [0u8; 1];
            c.read_exact(&mut echo).await.unwrap();
        }
        let tighter = route("    allow_from: [\"127.0.0.3\"]\n    proxy_protocol: v1\n");
        proxy
            .reload_with(
                std::path::Path::new(&config),
                &tighter,
                "allowlist reloaded",
                1,
            )
            .await;
        assert!(
            proxy
                .logs()
                .contains("1 open ingress connection the new allow_from refuses closed"),
            "{}",
            proxy.logs()
        );
        assert!(closed_without_a_byte(&mut two, WAIT).await, "revoked");
        assert!(
            proxy.logs().contains("connection revoked: closed by reload: the reloaded route's source 127.0.0.2 is not in the route's allow_from (127.0.0.3/32)"),
            "{}",
            proxy.logs()
        );
        // The one still allowed keeps relaying.
        three.write_all(b"still here").await.unwrap();
        let mut echo = [0u8; 10];
        tokio::time::timeout(WAIT, three.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echo, b"still here");
        // And a new connection from the refused source is refused.
        let mut again = connect_from("127.0.0.2", LISTEN).await;
        assert!(closed_without_a_byte(&mut again, WAIT).await);
    });
}

#[test]
fn sixty_four_mib_each_way_and_a_half_close_pass_intact() {
    run_in_netns(|| async {
        const SIZE: usize = 64 * 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let yaml = route("    allow_from: [\"127.0.0.2\"]\n");
        let (_proxy, _) = start(&dir, &yaml, &[]).await;

        // Half-close: the enclave answers only after the client's EOF.
        let up = response_server(ENCLAVE.parse().unwrap(), b"the whole answer".to_vec()).await;
        let mut conn = connect_from("127.0.0.2", LISTEN).await;
        conn.write_all(b"request").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(WAIT, conn.read_to_end(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, b"the whole answer");
        up.stop().await;

        let up = sink_source_server(ENCLAVE.parse().unwrap(), SIZE).await;
        let conn = connect_from("127.0.0.2", LISTEN).await;
        let (rd, wr) = conn.into_split();
        let sender = tokio::spawn(send_pattern(wr, 0xC11E_4700, SIZE, None));
        let receiver = tokio::spawn(receive_hashed(rd, None));
        let long = Duration::from_secs(120);
        let sent_hash = tokio::time::timeout(long, sender).await.unwrap().unwrap();
        let (received, received_hash) =
            tokio::time::timeout(long, receiver).await.unwrap().unwrap();
        let upstream = up.wait_result(long).await;
        assert_eq!(upstream.received, SIZE as u64, "bytes to the enclave");
        assert_eq!(upstream.received_sha256, sent_hash);
        assert_eq!(received, SIZE, "bytes to the client");
        assert_eq!(received_hash, upstream.sent_sha256);
    });
}

#[test]
fn check_config_shows_the_route_and_warns_about_an_empty_allow_from() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            &dir,
            "routes:\n  - listen: \"tcp:0.0.0.0:443\"\n    mode: ingress\n    to: \"vsock:16:443\"\n    allow_from: [\"10.0.0.0/8\", \"2001:db8::/32\"]\n    proxy_protocol: v2\n    accept_proxy_protocol: [\"10.0.5.0/24\"]\n  - {listen: 'tcp:0.0.0.0:8443', mode: ingress, to: 'vsock:16:8443', allow_from: []}\n",
        );
        let out = run_to_exit(&["--config", &config, "--check-config"], WAIT);
        assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains("route tcp:0.0.0.0:443 -> ingress vsock:16:443 (allow_from 10.0.0.0/8, 2001:db8::/32; proxy_protocol v2; accept_proxy_protocol 10.0.5.0/24) (routes[0], line 2)"),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout.contains("route tcp:0.0.0.0:8443 -> ingress vsock:16:8443 (allow_from no one (allow_from is empty))"),
            "{}",
            out.stdout
        );
        assert!(
            out.stderr
                .contains("`allow_from` is empty, so it admits no one"),
            "{}",
            out.stderr
        );
        // Without allow_from: an error naming the line.
        let config = write_config(
            &dir,
            "routes:\n  - listen: \"tcp:0.0.0.0:443\"\n    mode: ingress\n    to: \"vsock:16:443\"\n",
        );
        let out = run_to_exit(&["--config", &config, "--check-config"], WAIT);
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(out.stderr.contains("line 2"), "{}", out.stderr);
        assert!(out.stderr.contains("needs `allow_from:`"), "{}", out.stderr);
    });
}
