//! `mode: connect`, `mode: sni` and `sni: require` through the real binary, with real clients
//! (curl through the CONNECT route, `openssl s_client` for SNI) and a real TLS upstream. Each
//! test has its own network namespace, DNS server and a trap listener on the instance metadata
//! address, which must never see a connection.

mod common;

use std::net::IpAddr;
use std::process::Stdio;
use std::time::Duration;

use common::dns::TestDns;
use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, Proxy};
use common::tls::{tls_server, TlsServer};
use common::upstream::{echo_server, UpstreamHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);
const CONNECT: &str = "tcp:127.0.0.1:8010";
const SNI: &str = "tcp:127.0.0.1:8011";
const REQUIRE: &str = "tcp:127.0.0.1:8012";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Setup {
    proxy: Proxy,
    tls: TlsServer,
    trap: UpstreamHandle,
    _dns: TestDns,
    _dir: tempfile::TempDir,
}

/// The TLS upstream on 192.0.2.10:443 for every test name; DNS: api.test, bucket.s3.test and
/// evil.test there, rebind.test at the instance metadata address (a trap listens there).
async fn setup() -> Setup {
    add_lo_addr(ip("192.0.2.10"));
    add_lo_addr(ip("169.254.169.254"));
    let names = [
        "api.test",
        "bucket.s3.test",
        "a.b.s3.test",
        "s3.test",
        "evil.test",
        "rebind.test",
    ];
    let tls = tls_server("192.0.2.10:443".parse().unwrap(), &names).await;
    let trap = echo_server("169.254.169.254:443".parse().unwrap()).await;
    let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
    for name in [
        "api.test",
        "bucket.s3.test",
        "a.b.s3.test",
        "s3.test",
        "evil.test",
    ] {
        dns.set(name, &[ip("192.0.2.10")], 60);
    }
    dns.set("rebind.test", &[ip("169.254.169.254")], 60);
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_allowlist(
        &dir,
        &format!(
            "allowlist:\n\
             - {{address: api.test, port: 443}}\n\
             - {{address: '*.s3.test', port: 443}}\n\
             - {{address: rebind.test, port: 443}}\n\
             - {{address: 192.0.2.10, port: 443}}\n\
             routes:\n\
             - {{listen: '{CONNECT}', mode: connect}}\n\
             - {{listen: '{SNI}', mode: sni, port: 443}}\n\
             - {{listen: '{REQUIRE}', remote: 'api.test:443', sni: require}}\n"
        ),
    );
    let proxy = Proxy::spawn(&["--config", &config, "--nameserver", "127.0.0.1:53"]);
    for listen in [CONNECT, SNI, REQUIRE] {
        proxy.wait_ready(listen).await;
    }
    Setup {
        proxy,
        tls,
        trap,
        _dns: dns,
        _dir: dir,
    }
}

/// `curl -x` through the CONNECT route: (the CONNECT status curl saw, the body).
async fn curl_via_connect(url: &str) -> (String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-k", "--max-time", "15", "--noproxy", ""])
        .args([
            "-x",
            "http://127.0.0.1:8010",
            "-w",
            "\n%{http_connect}",
            url,
        ])
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .output()
        .await
        .expect("cannot run curl (make deps installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (status.to_owned(), body.to_owned())
}

/// `openssl s_client` to `listen` with `server_name` (None: no SNI); what came back.
async fn s_client(listen: &str, server_name: Option<&str>) -> String {
    let addr = listen.strip_prefix("tcp:").unwrap();
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-quiet", "-connect", addr]);
    match server_name {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run openssl (make deps installs it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("openssl s_client did not finish")
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Writes `bytes` to `listen` and returns what came back before the close.
async fn raw(listen: &str, bytes: &[u8]) -> String {
    let mut conn = connect(listen).await;
    let _ = conn.write_all(bytes).await;
    let reply = conn.read_to_eof(WAIT).await.unwrap_or_default();
    String::from_utf8_lossy(&reply).to_string()
}

/// A little over the audit trail's rate-limit window.
fn audit_window() -> Duration {
    nitro_vsock_proxy::audit::WINDOW + Duration::from_millis(100)
}

#[test]
fn connect_route_tunnels_to_allowlisted_names_and_refuses_the_rest() {
    run_in_netns(|| async {
        let s = setup().await;
        // Exact name, wildcard (one and two labels deep), IP literal with an IP entry.
        for (url, name) in [
            ("https://api.test/", "api.test"),
            ("https://bucket.s3.test/", "bucket.s3.test"),
            ("https://a.b.s3.test/", "a.b.s3.test"),
        ] {
            let (status, body) = curl_via_connect(url).await;
            assert_eq!(
                (status.as_str(), body.as_str()),
                ("200", format!("hello {name}\n").as_str()),
                "{url}: {}",
                s.proxy.logs()
            );
        }
        let (status, body) = curl_via_connect("https://192.0.2.10/").await;
        assert_eq!(status, "200", "{body} {}", s.proxy.logs());
        // Not allowlisted: the name, even though its address is (that is the point); the
        // wildcard's own suffix; a name that now resolves to the metadata service.
        for url in [
            "https://evil.test/",
            "https://s3.test/",
            "https://rebind.test/",
        ] {
            let (status, _) = curl_via_connect(url).await;
            assert_eq!(status, "403", "{url}: {}", s.proxy.logs());
            // Refusals from one peer with one reason are logged once a second (the rest are
            // summarised): space them so each one's line is there to check below.
            tokio::time::sleep(audit_window()).await;
        }
        let seen = s.tls.names_seen();
        assert!(
            !seen.iter().any(|n| n == "evil.test" || n == "s3.test"),
            "{seen:?}"
        );
        assert_eq!(s.trap.accepted(), 0, "the metadata trap was reached");
        for needle in [
            "route=tcp:127.0.0.1:8010",
            "connection refused: evil.test:443 is not allowed",
            "169.254.169.254 denied",
        ] {
            assert!(
                s.proxy.wait_for_log(needle, WAIT).await,
                "{needle}: {}",
                s.proxy.logs()
            );
        }
    });
}

#[test]
fn connect_route_answers_bad_requests_with_their_status() {
    run_in_netns(|| async {
        let s = setup().await;
        let status_of = |reply: String| reply.split(' ').nth(1).unwrap_or_default().to_owned();
        for (request, status) in [
            (
                &b"GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n"[..],
                "405",
            ),
            (b"CONNECT api.test:0 HTTP/1.1\r\n\r\n", "400"),
            (b"CONNECT api.test HTTP/1.1\r\n\r\n", "400"),
            (b"CONNECT api.test:8443 HTTP/1.1\r\n\r\n", "403"),
            (b"\x00\x01garbage\r\n\r\n", "400"),
        ] {
            let reply = raw(CONNECT, request).await;
            assert_eq!(
                status_of(reply.clone()),
                status,
                "{:?} -> {reply}",
                String::from_utf8_lossy(request)
            );
            assert!(reply.contains("Connection: close"), "{reply}");
        }
        let huge = [&b"CONNECT api.test:443 HTTP/1.1\r\nX: "[..], &[b'a'; 9000]].concat();
        assert_eq!(status_of(raw(CONNECT, &huge).await), "431");
        // Bytes sent after the head are passed on: a TLS session right behind CONNECT works.
        let (status, _) = curl_via_connect("https://api.test/").await;
        assert_eq!(status, "200");
        assert_eq!(s.trap.accepted(), 0);
    });
}

#[test]
fn a_connect_client_that_stalls_gets_408_in_bounded_time() {
    run_in_netns(|| async {
        let _s = setup().await;
        let started = std::time::Instant::now();
        let mut conn = connect(CONNECT).await;
        conn.write_all(b"CONNECT api.test:443 HTTP/1.1\r\nHost: ap")
            .await
            .unwrap();
        let reply = conn.read_to_eof(Duration::from_secs(15)).await.unwrap();
        assert!(
            String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 408 "),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        assert!(started.elapsed() < Duration::from_secs(12));
        let (status, _) = curl_via_connect("https://api.test/").await;
        assert_eq!(status, "200", "still serving");
    });
}

#[test]
fn sni_route_connects_to_the_allowlisted_server_name_only() {
    run_in_netns(|| async {
        let s = setup().await;
        assert!(
            s_client(SNI, Some("api.test"))
                .await
                .contains("hello api.test"),
            "{}",
            s.proxy.logs()
        );
        assert!(s_client(SNI, Some("Bucket.S3.test."))
            .await
            .contains("hello bucket.s3.test"));
        for name in [
            Some("evil.test"),
            Some("s3.test"),
            Some("rebind.test"),
            None,
        ] {
            let reply = s_client(SNI, name).await;
            assert!(!reply.contains("hello"), "{name:?}: {reply}");
        }
        // Not TLS at all: closed, nothing connected.
        assert_eq!(
            raw(SNI, b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n").await,
            ""
        );
        let seen = s.tls.names_seen();
        assert_eq!(seen, ["api.test", "bucket.s3.test"], "{}", s.proxy.logs());
        assert_eq!(s.trap.accepted(), 0);
        // The daemon's log lines reach the test through a pipe: wait for them.
        for reason in [
            "reason=\"denied\"",
            "reason=\"no_sni\"",
            "reason=\"not_tls\"",
        ] {
            assert!(
                s.proxy.wait_for_log(reason, WAIT).await,
                "{reason}: {}",
                s.proxy.logs()
            );
        }
    });
}

/// A real ClientHello for `name`, as openssl sends it (captured on a local listener).
async fn captured_client_hello(name: &str) -> Vec<u8> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:9443")
        .await
        .unwrap();
    let mut child = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            "127.0.0.1:9443",
            "-servername",
            name,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().await.unwrap();
    let mut hello = Vec::new();
    let mut chunk = [0u8; 4096];
    while nitro_vsock_proxy::sni::server_name(&hello) == Ok(None) {
        let n = tokio::time::timeout(WAIT, conn.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "openssl closed before its ClientHello was whole");
        hello.extend_from_slice(&chunk[..n]);
    }
    let _ = child.kill().await;
    hello
}

#[test]
fn sni_route_reassembles_a_hello_sent_a_byte_at_a_time_and_bounds_its_size() {
    run_in_netns(|| async {
        let s = setup().await;
        let hello = captured_client_hello("api.test").await;
        let mut conn = connect(SNI).await;
        for byte in &hello {
            conn.write_all(std::slice::from_ref(byte)).await.unwrap();
            conn.flush().await.unwrap();
        }
        // The upstream answers the forwarded hello with its ServerHello (a TLS handshake record).
        let mut first = [0u8; 1];
        tokio::time::timeout(WAIT, conn.read_exact(&mut first))
            .await
            .expect("no ServerHello through the proxy")
            .unwrap();
        assert_eq!(first[0], 0x16, "{}", s.proxy.logs());
        drop(conn);
        // A handshake message longer than 16 KiB: closed without connecting.
        let mut big = Vec::new();
        let mut data = vec![1u8, 0x00, 0x4e, 0x20];
        data.resize(4000, 0);
        for _ in 0..5 {
            big.extend_from_slice(&[22, 3, 1]);
            big.extend_from_slice(&(data.len() as u16).to_be_bytes());
            big.extend_from_slice(&data);
            data = vec![0u8; 4000];
        }
        assert_eq!(raw(SNI, &big).await, "");
        assert!(
            s.proxy
                .wait_for_log("reason=\"hello_too_large\"", WAIT)
                .await,
            "{}",
            s.proxy.logs()
        );
    });
}

#[test]
fn sni_require_checks_the_server_name_against_the_fixed_remote() {
    run_in_netns(|| async {
        let s = setup().await;
        assert!(s_client(REQUIRE, Some("api.test"))
            .await
            .contains("hello api.test"));
        // Another allowlisted name is still the wrong one for this route.
        assert!(!s_client(REQUIRE, Some("bucket.s3.test"))
            .await
            .contains("hello"));
        assert!(!s_client(REQUIRE, None).await.contains("hello"));
        assert_eq!(s.tls.names_seen(), ["api.test"]);
        assert!(
            s.proxy
                .wait_for_log(
                    "the TLS server name bucket.s3.test is not the route's remote api.test",
                    WAIT
                )
                .await,
            "{}",
            s.proxy.logs()
        );
    });
}
