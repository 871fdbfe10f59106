//! `mode: connect`, `mode: sni` and `sni: require` (on fixed and CONNECT routes) through the
//! real binary, with real clients (curl through the CONNECT routes, `openssl s_client` for SNI)
//! and a real TLS upstream, and ClientHellos carrying ECH. Each test has its own network
//! namespace, DNS server and a trap listener on the instance metadata address, which must never
//! see a connection. A recording raw TCP upstream (`raw.test`, `also-raw.test`: two names on one
//! address, as a CDN serves them) shows byte for byte what a route sent on.

mod common;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::dns::TestDns;
use common::hello::{
    application_data, client_hello_naming, client_hello_with_extension_per_name, outer_ech_payload,
    with_extension, CHANGE_CIPHER_SPEC, ENCRYPTED_CLIENT_HELLO,
};
use common::metrics::{scrape, value};
use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, Proxy};
use common::tls::{tls_server, TlsServer};
use common::upstream::{echo_server, response_server, UpstreamHandle};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);
const CONNECT: &str = "tcp:127.0.0.1:8010";
const SNI: &str = "tcp:127.0.0.1:8011";
const REQUIRE: &str = "tcp:127.0.0.1:8012";
/// `mode: connect` with `sni: require`.
const CONNECT_REQUIRE: &str = "tcp:127.0.0.1:8013";
/// `mode: sni` with `ech: allow`.
const SNI_ECH: &str = "tcp:127.0.0.1:8014";
const METRICS_URL: &str = "http://127.0.0.1:9190/metrics";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Setup {
    proxy: Proxy,
    tls: TlsServer,
    trap: UpstreamHandle,
    /// `raw.test`: records what it receives until EOF, then answers `recorded` and closes.
    raw: UpstreamHandle,
    /// The configuration file and its text, for a reload.
    config: String,
    yaml: String,
    _dns: TestDns,
    _dir: tempfile::TempDir,
}

/// The TLS upstream on 192.0.2.10:443 for every test name; DNS: api.test, bucket.s3.test and
/// evil.test there, rebind.test at the instance metadata address (a trap listens there),
/// raw.test and also-raw.test at 192.0.2.11 (a recording raw TCP upstream listens there).
async fn setup() -> Setup {
    add_lo_addr(ip("192.0.2.10"));
    add_lo_addr(ip("192.0.2.11"));
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
    let raw = response_server("192.0.2.11:443".parse().unwrap(), b"recorded".to_vec()).await;
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
    dns.set("raw.test", &[ip("192.0.2.11")], 60);
    dns.set("also-raw.test", &[ip("192.0.2.11")], 60);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "allowlist:\n\
             - {{address: api.test, port: 443}}\n\
             - {{address: '*.s3.test', port: 443}}\n\
             - {{address: rebind.test, port: 443}}\n\
             - {{address: raw.test, port: 443}}\n\
             - {{address: also-raw.test, port: 443}}\n\
             - {{address: 192.0.2.10, port: 443}}\n\
             - {{address: 192.0.2.11, port: 443}}\n\
             routes:\n\
             - {{listen: '{CONNECT}', mode: connect}}\n\
             - {{listen: '{SNI}', mode: sni, port: 443}}\n\
             - {{listen: '{REQUIRE}', remote: 'api.test:443', sni: require}}\n\
             - {{listen: '{CONNECT_REQUIRE}', mode: connect, sni: require}}\n\
             - {{listen: '{SNI_ECH}', mode: sni, port: 443, ech: allow}}\n"
    );
    let config = common::write_allowlist(&dir, &yaml);
    let proxy = Proxy::spawn(&[
        "--config",
        &config,
        "--nameserver",
        "127.0.0.1:53",
        "--metrics-listen",
        "tcp:127.0.0.1:9190",
    ]);
    for listen in [CONNECT, SNI, REQUIRE, CONNECT_REQUIRE, SNI_ECH] {
        proxy.wait_ready(listen).await;
    }
    Setup {
        proxy,
        tls,
        trap,
        raw,
        config,
        yaml,
        _dns: dns,
        _dir: dir,
    }
}

/// `curl -x` through the CONNECT route: (the CONNECT status curl saw, the body).
async fn curl_via_connect(url: &str) -> (String, String) {
    curl_via(CONNECT, url, &[]).await
}

/// `curl -x` through the CONNECT route on `listen`, with `extra` options (`--connect-to`):
/// (the CONNECT status curl saw, the body).
async fn curl_via(listen: &str, url: &str, extra: &[&str]) -> (String, String) {
    let proxy = format!("http://{}", listen.strip_prefix("tcp:").unwrap());
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-k", "--max-time", "15", "--noproxy", ""])
        .args(extra)
        .args(["-x", &proxy, "-w", "\n%{http_connect}", url])
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
    nitro_vsock_proxy::ops::audit::WINDOW + Duration::from_millis(100)
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
    while nitro_vsock_proxy::proxy::request::sni::server_name(&hello) == Ok(None) {
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

/// Trusts any certificate (its signatures still checked): these tests are about the path the
/// bytes take, not about the test upstream's throwaway certificate.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A rustls TLS 1.3 client connection to `name`, not yet started.
fn rustls_tls13_client(name: &str) -> rustls::ClientConnection {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    rustls::ClientConnection::new(Arc::new(config), name).unwrap()
}

/// The ClientHello a real rustls TLS 1.3 client sends first.
fn rustls_client_hello(client: &mut rustls::ClientConnection) -> Vec<u8> {
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    assert_eq!(hello.first(), Some(&0x16), "{hello:?}");
    assert_eq!(
        nitro_vsock_proxy::proxy::request::sni::server_name(&hello).map(|n| n.is_some()),
        Ok(true),
        "not one whole ClientHello: {hello:?}"
    );
    hello
}

#[test]
fn sni_route_relays_a_tls13_first_flight_sent_in_one_write() {
    run_in_netns(|| async {
        let s = setup().await;
        // ClientHello, ChangeCipherSpec and an early-data record in one write, as a TLS 1.3
        // client sending 0-RTT data does. The recording upstream gets all of it, unchanged.
        let hello = rustls_client_hello(&mut rustls_tls13_client("raw.test"));
        let flight = [
            &hello[..],
            &CHANGE_CIPHER_SPEC,
            &application_data(64, 0xee),
            &application_data(3, 0x01),
        ]
        .concat();
        let mut conn = connect(SNI).await;
        assert_eq!(conn.write(&flight).await.unwrap(), flight.len());
        conn.shutdown().await.unwrap();
        let reply = conn.read_to_eof(WAIT).await.unwrap();
        assert_eq!(reply, b"recorded", "{}", s.proxy.logs());
        let report = s.raw.wait_result(WAIT).await;
        assert_eq!(report.received, flight.len() as u64, "{}", s.proxy.logs());
        assert_eq!(report.head, flight, "not relayed byte for byte");
        assert!(report.error.is_none(), "{report:?}");

        // A real TLS 1.3 server behind the route: the hello and a ChangeCipherSpec (which TLS
        // 1.3 servers drop) in one write, then the rest of the handshake and a request.
        let (reply, version) = tokio::task::spawn_blocking(|| {
            let mut client = rustls_tls13_client("api.test");
            let mut tcp = std::net::TcpStream::connect(SNI.strip_prefix("tcp:").unwrap()).unwrap();
            tcp.set_read_timeout(Some(WAIT)).unwrap();
            let flight = [
                rustls_client_hello(&mut client),
                CHANGE_CIPHER_SPEC.to_vec(),
            ]
            .concat();
            assert_eq!(tcp.write(&flight).unwrap(), flight.len());
            let mut tls = rustls::Stream::new(&mut client, &mut tcp);
            tls.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut reply = Vec::new();
            let _ = tls.read_to_end(&mut reply);
            (
                String::from_utf8_lossy(&reply).to_string(),
                client.protocol_version(),
            )
        })
        .await
        .unwrap();
        assert!(
            reply.contains("hello api.test"),
            "{reply:?} {}",
            s.proxy.logs()
        );
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(s.tls.names_seen(), ["api.test"]);
        assert!(!s.proxy.logs().contains("not_tls"), "{}", s.proxy.logs());
        assert_eq!(s.trap.accepted(), 0);
    });
}

/// Waits until one line of the daemon's logs holds every needle.
async fn wait_for_line(proxy: &Proxy, needles: &[&str]) -> bool {
    common::wait_until(WAIT, || {
        proxy
            .logs()
            .lines()
            .any(|line| needles.iter().all(|n| line.contains(n)))
    })
    .await
}

#[test]
fn sni_routes_refuse_a_hello_with_two_server_names() {
    run_in_netns(|| async {
        let s = setup().await;
        // The allowlisted or required name first, then another, and the other way round: in
        // one server_name extension (two host_name entries) or in two server_name extensions.
        type Build = fn(&[&str]) -> Vec<u8>;
        let forms: [(Build, &str); 2] = [
            (
                client_hello_naming,
                "two host_name entries in the server_name extension",
            ),
            (
                client_hello_with_extension_per_name,
                "extension 0 appears twice",
            ),
        ];
        for (hello, why) in forms {
            for (route, names) in [
                (SNI, ["raw.test", "api.test"]),
                (SNI, ["api.test", "raw.test"]),
                (REQUIRE, ["api.test", "raw.test"]),
                (REQUIRE, ["raw.test", "api.test"]),
            ] {
                let hello = hello(&names);
                assert_eq!(raw(route, &hello).await, "", "{route} {names:?}");
            }
            for route in [SNI, REQUIRE] {
                let needles = [
                    &format!("route={route}")[..],
                    "reason=\"malformed_hello\"",
                    why,
                ];
                assert!(
                    wait_for_line(&s.proxy, &needles).await,
                    "{needles:?}: {}",
                    s.proxy.logs()
                );
            }
            // Refusals per route, peer and reason are logged once a second: let the next
            // form's be written too.
            tokio::time::sleep(audit_window()).await;
        }
        // Nothing connected anywhere: not the TLS upstream, not the recording one.
        assert_eq!(s.tls.accepted(), 0, "{}", s.proxy.logs());
        assert_eq!(s.raw.accepted(), 0, "{}", s.proxy.logs());
        assert_eq!(s.trap.accepted(), 0);
        // The same hellos with one name each still connect.
        for hello in [
            client_hello_naming(&["raw.test"]),
            client_hello_with_extension_per_name(&["raw.test"]),
        ] {
            let reply = connect(SNI).await.round_trip(&hello, WAIT).await;
            assert_eq!(reply.unwrap(), b"recorded", "{}", s.proxy.logs());
        }
    });
}

/// `CONNECT host:443` followed, in the same write, by `tunnel` (the tunnel's first bytes).
fn connect_then(host: &str, tunnel: &[u8]) -> Vec<u8> {
    [
        format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes(),
        tunnel,
    ]
    .concat()
}

const ESTABLISHED: &str = "HTTP/1.1 200 Connection Established\r\n\r\n";

/// The connections counted under `outcome` on `route`, as Prometheus scrapes them.
fn outcomes(route: &str, outcome: &str) -> f64 {
    value(
        &scrape(METRICS_URL, None),
        &format!("nitro_vsock_proxy_connections_total{{outcome=\"{outcome}\",route=\"{route}\"}}"),
    )
}

#[test]
fn connect_route_with_sni_require_tunnels_only_the_connect_hosts_server_name() {
    run_in_netns(|| async {
        let s = setup().await;
        // The CONNECT host's own name, exact and through a wildcard: end to end.
        for name in ["api.test", "bucket.s3.test"] {
            let (status, body) = curl_via(CONNECT_REQUIRE, &format!("https://{name}/"), &[]).await;
            assert_eq!(
                (status.as_str(), body.as_str()),
                ("200", format!("hello {name}\n").as_str()),
                "{}",
                s.proxy.logs()
            );
        }
        // CONNECT api.test:443, then a ClientHello for bucket.s3.test: allowlisted too, and
        // served from the same address, which is exactly what must not pass.
        let (status, body) = curl_via(
            CONNECT_REQUIRE,
            "https://bucket.s3.test/",
            &["--connect-to", "bucket.s3.test:443:api.test:443"],
        )
        .await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("200", ""),
            "{}",
            s.proxy.logs()
        );
        assert!(
            wait_for_line(
                &s.proxy,
                &[
                    "reason=\"sni_mismatch\"",
                    "route=\"tcp:127.0.0.1:8013\"",
                    "requested=api.test",
                    "in the CONNECT tunnel to api.test:443: the TLS server name bucket.s3.test \
                     is not the CONNECT host api.test (sni: require)",
                ]
            )
            .await,
            "{}",
            s.proxy.logs()
        );
        tokio::time::sleep(audit_window()).await;
        // An IP address: no server name passes, a name allowlisted by name passes, another
        // name (evil.test is not allowlisted, though its address is) does not.
        let (status, body) = curl_via(CONNECT_REQUIRE, "https://192.0.2.10/", &[]).await;
        assert_eq!((status.as_str(), body.as_str()), ("200", "hello -\n"));
        let to_ip = |name: &str| format!("{name}:443:192.0.2.10:443");
        let (status, body) = curl_via(
            CONNECT_REQUIRE,
            "https://api.test/",
            &["--connect-to", &to_ip("api.test")],
        )
        .await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("200", "hello api.test\n")
        );
        let (status, body) = curl_via(
            CONNECT_REQUIRE,
            "https://evil.test/",
            &["--connect-to", &to_ip("evil.test")],
        )
        .await;
        assert_eq!((status.as_str(), body.as_str()), ("200", ""));
        assert!(
            wait_for_line(
                &s.proxy,
                &[
                    "reason=\"sni_mismatch\"",
                    "requested=192.0.2.10",
                    "the TLS server name evil.test is not allowlisted by name for port 443",
                ]
            )
            .await,
            "{}",
            s.proxy.logs()
        );
        assert_eq!(
            s.tls.names_seen(),
            ["api.test", "bucket.s3.test", "-", "api.test"],
            "{}",
            s.proxy.logs()
        );
        assert_eq!(outcomes(CONNECT_REQUIRE, "sni_mismatch"), 2.0);
        // Without `sni: require`, the same tunnel carries the other name: why it is there.
        let (status, body) = curl_via(
            CONNECT,
            "https://bucket.s3.test/",
            &["--connect-to", "bucket.s3.test:443:api.test:443"],
        )
        .await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("200", "hello bucket.s3.test\n")
        );
        assert_eq!(s.trap.accepted(), 0);
    });
}

#[test]
fn connect_route_with_sni_require_judges_the_tunnels_first_bytes_before_the_upstream_sees_any() {
    run_in_netns(|| async {
        let s = setup().await;
        let hello = client_hello_naming(&["raw.test"]);
        let nameless = client_hello_naming(&[]);
        // The hello right behind the head, in one write, and what follows it: relayed whole.
        let flight = [&hello[..], &CHANGE_CIPHER_SPEC].concat();
        let reply = connect(CONNECT_REQUIRE)
            .await
            .round_trip(&connect_then("raw.test", &flight), WAIT)
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("{ESTABLISHED}recorded"),
            "{}",
            s.proxy.logs()
        );
        let report = s.raw.wait_result(WAIT).await;
        assert_eq!(report.head, flight, "not relayed byte for byte");
        // An IP address and no server name.
        let reply = connect(CONNECT_REQUIRE)
            .await
            .round_trip(&connect_then("192.0.2.11", &nameless), WAIT)
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply),
            format!("{ESTABLISHED}recorded")
        );
        assert_eq!(s.raw.wait_reports(2, WAIT).await[1].head, nameless);

        // Each refused after its 200, with its reason; the hello sent in one write with the
        // head, or after the 200 as a client that waits for it does.
        let ech = with_extension(&hello, ENCRYPTED_CLIENT_HELLO, &outer_ech_payload());
        let refused: [(&str, &[u8], &str); 5] = [
            (
                "raw.test",
                &client_hello_naming(&["also-raw.test"]),
                "sni_mismatch",
            ),
            (
                "raw.test",
                b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n",
                "not_tls",
            ),
            ("raw.test", &nameless, "no_sni"),
            ("raw.test", &ech, "ech"),
            (
                "192.0.2.11",
                &client_hello_naming(&["evil.test"]),
                "sni_mismatch",
            ),
        ];
        for (i, (host, tunnel, reason)) in refused.iter().enumerate() {
            let mut conn = connect(CONNECT_REQUIRE).await;
            if i % 2 == 0 {
                conn.write_all(&connect_then(host, tunnel)).await.unwrap();
            } else {
                conn.write_all(&connect_then(host, b"")).await.unwrap();
                let mut established = vec![0u8; ESTABLISHED.len()];
                tokio::time::timeout(WAIT, conn.read_exact(&mut established))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(String::from_utf8_lossy(&established), ESTABLISHED);
                conn.write_all(tunnel).await.unwrap();
            }
            let reply = conn.read_to_eof(WAIT).await.unwrap_or_default();
            let expected = if i % 2 == 0 { ESTABLISHED } else { "" };
            assert_eq!(String::from_utf8_lossy(&reply), expected, "{reason}");
            let needles = [
                &format!("reason=\"{reason}\"")[..],
                "route=\"tcp:127.0.0.1:8013\"",
                &format!("requested={host}"),
                "decision=\"refused\"",
            ];
            assert!(
                wait_for_line(&s.proxy, &needles).await,
                "{needles:?}: {}",
                s.proxy.logs()
            );
            // The next one with the same reason must get its own line.
            tokio::time::sleep(audit_window()).await;
        }
        // The upstream was connected to (the 200 comes after the connect), but got nothing.
        let reports = s.raw.wait_reports(2 + refused.len(), WAIT).await;
        let received: Vec<u64> = reports.iter().map(|r| r.received).collect();
        assert_eq!(
            received.iter().filter(|&&n| n > 0).count(),
            2,
            "{received:?} {}",
            s.proxy.logs()
        );
        for (outcome, count) in [
            ("sni_mismatch", 2.0),
            ("not_tls", 1.0),
            ("no_sni", 1.0),
            ("ech", 1.0),
        ] {
            assert_eq!(outcomes(CONNECT_REQUIRE, outcome), count, "{outcome}");
        }
        assert_eq!(s.trap.accepted(), 0);
    });
}

#[test]
fn a_hello_with_ech_is_refused_where_server_names_are_checked_unless_ech_allow() {
    run_in_netns(|| async {
        let s = setup().await;
        // A real ClientHello (rustls TLS 1.3) with an outer encrypted_client_hello added.
        let ech_hello = |name: &str| {
            let hello = rustls_client_hello(&mut rustls_tls13_client(name));
            with_extension(&hello, ENCRYPTED_CLIENT_HELLO, &outer_ech_payload())
        };
        let hello = ech_hello("raw.test");
        assert_eq!(
            nitro_vsock_proxy::proxy::request::sni::parse(&hello)
                .unwrap()
                .map(|p| p.ech),
            Some(true)
        );
        // Refused by default: `mode: sni`, and `sni: require` on a fixed route.
        assert_eq!(raw(SNI, &hello).await, "", "{}", s.proxy.logs());
        assert_eq!(raw(REQUIRE, &ech_hello("api.test")).await, "");
        for (route, name) in [(SNI, "raw.test"), (REQUIRE, "api.test")] {
            let needles = [
                &format!("route={route}")[..],
                "reason=\"ech\"",
                &format!("its server name {name} is only the public name"),
            ];
            assert!(
                wait_for_line(&s.proxy, &needles).await,
                "{needles:?}: {}",
                s.proxy.logs()
            );
        }
        assert_eq!(s.raw.accepted(), 0, "{}", s.proxy.logs());
        assert_eq!(s.tls.accepted(), 0, "{}", s.proxy.logs());
        assert_eq!(outcomes(SNI, "ech"), 1.0);
        assert_eq!(outcomes(REQUIRE, "ech"), 1.0);
        // `ech: allow`: relayed byte for byte, the outer name checked as any server name.
        let reply = connect(SNI_ECH).await.round_trip(&hello, WAIT).await;
        assert_eq!(reply.unwrap(), b"recorded", "{}", s.proxy.logs());
        let report = s.raw.wait_result(WAIT).await;
        assert_eq!(report.head, hello, "not relayed byte for byte");
        assert_eq!(raw(SNI_ECH, &ech_hello("evil.test")).await, "");
        assert!(
            wait_for_line(
                &s.proxy,
                &[
                    "route=tcp:127.0.0.1:8014",
                    "reason=\"denied\"",
                    "evil.test:443 is not allowed"
                ]
            )
            .await,
            "{}",
            s.proxy.logs()
        );
        assert_eq!(s.tls.accepted(), 0);
        assert_eq!(s.trap.accepted(), 0);
    });
}

#[test]
fn a_reload_revokes_a_tunnel_to_an_ip_address_whose_server_name_is_no_longer_allowlisted() {
    run_in_netns(|| async {
        let s = setup().await;
        // Two open tunnels to 192.0.2.11: one carrying also-raw.test, one no server name.
        let mut named = connect(CONNECT_REQUIRE).await;
        let mut nameless = connect(CONNECT_REQUIRE).await;
        for (conn, hello) in [
            (&mut named, client_hello_naming(&["also-raw.test"])),
            (&mut nameless, client_hello_naming(&[])),
        ] {
            conn.write_all(&connect_then("192.0.2.11", &hello))
                .await
                .unwrap();
            let mut established = vec![0u8; ESTABLISHED.len()];
            tokio::time::timeout(WAIT, conn.read_exact(&mut established))
                .await
                .unwrap()
                .unwrap();
        }
        assert!(s.raw.wait_accepted(2, WAIT).await, "{}", s.proxy.logs());
        // The address stays allowlisted, the name does not.
        let yaml = s
            .yaml
            .replace("- {address: also-raw.test, port: 443}\n", "");
        assert_ne!(yaml, s.yaml);
        s.proxy
            .reload_with(
                std::path::Path::new(&s.config),
                &yaml,
                "allowlist reloaded",
                1,
            )
            .await;
        assert_eq!(named.read_to_eof(WAIT).await.unwrap_or_default(), b"");
        assert!(
            wait_for_line(
                &s.proxy,
                &[
                    "reason=\"revoked\"",
                    "the TLS server name also-raw.test in the tunnel to 192.0.2.11:443 is no \
                     longer allowed",
                ]
            )
            .await,
            "{}",
            s.proxy.logs()
        );
        // The tunnel without a server name is still up: it relays to the end.
        nameless.shutdown().await.unwrap();
        let reply = nameless.read_to_eof(WAIT).await.unwrap();
        assert_eq!(reply, b"recorded", "{}", s.proxy.logs());
    });
}
