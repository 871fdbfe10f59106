//! Operating the daemon: metrics, the audit trail and its rate limit, per-peer limits,
//! lifetimes and revocation on reload — through the real binary, each test in its own network
//! namespace (upstreams on 192.0.2.x added to `lo`, a DNS server on 127.0.0.1:53).

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::metrics::{fetch, scrape, value};
use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, connect_from, Proxy};
use common::upstream::echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const METRICS: &str = "tcp:127.0.0.1:9190";
const METRICS_URL: &str = "http://127.0.0.1:9190/metrics";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Starts the daemon on `yaml`'s routes with `extra` options and waits for `wait_on`.
async fn start(dir: &tempfile::TempDir, yaml: &str, extra: &[&str], wait_on: &str) -> Proxy {
    let config = common::write_allowlist(dir, yaml);
    let mut args: Vec<String> = vec![
        "--config".into(),
        config,
        "--nameserver".into(),
        "127.0.0.1:53".into(),
        "--dns-timeout".into(),
        "500ms".into(),
        "--connect-timeout".into(),
        "2s".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let proxy = Proxy::spawn(&args);
    proxy.wait_ready(wait_on).await;
    proxy
}

/// Sends an HTTP CONNECT for `target` on `listen` and returns the status line's code and the
/// stream.
async fn connect_to(listen: &str, target: &str) -> (u16, TcpStream) {
    let port = listen.rsplit(':').next().unwrap();
    let mut s = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head);
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, s)
}

/// Whether `s` carries an echo of `msg` (false if the proxy closed it).
async fn echoes(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).await.is_err() {
        return false;
    }
    let mut got = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await,
        Ok(Ok(_))
    ) && got == msg
}

/// Whether the proxy closes `s` within `within` (EOF or reset).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

fn connections(samples: &BTreeMap<String, f64>, route: &str, outcome: &str) -> f64 {
    value(
        samples,
        &format!("nitro_vsock_proxy_connections_total{{outcome=\"{outcome}\",route=\"{route}\"}}"),
    )
}

/// Scrapes until `check` holds (the daemon counts a connection when its task ends, a moment
/// after the client saw the close), or returns the last scrape for the assertion message.
async fn scrape_until(check: impl Fn(&BTreeMap<String, f64>) -> bool) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(METRICS_URL, None);
        if check(&samples) || Instant::now() > deadline {
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const OUTCOMES_YAML: &str = "\
allowlist:
- {address: 192.0.2.10, port: 443}
- {address: 192.0.2.11, port: 443}
- {address: 192.0.2.12, port: 443}
- {address: missing.test, port: 443}
routes:
- {listen: 'tcp:127.0.0.1:8001', remote: '192.0.2.10:443'}
- {listen: 'tcp:127.0.0.1:8002', remote: '192.0.2.10:443', idle_timeout: 300ms}
- {listen: 'tcp:127.0.0.1:8003', mode: connect}
- {listen: 'tcp:127.0.0.1:8004', mode: sni, port: 443}
- {listen: 'tcp:127.0.0.1:8005', remote: '192.0.2.11:443'}
- {listen: 'tcp:127.0.0.1:8006', remote: '192.0.2.12:443'}
- {listen: 'tcp:127.0.0.1:8007', remote: '192.0.2.10:443', max_connections: 1}
metrics_listen: 'tcp:127.0.0.1:9190'
";

/// An upstream that reads a little, then resets the connection.
async fn resetting_server(at: SocketAddr) {
    let listener = TcpListener::bind(at).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
}

#[test]
fn metrics_count_every_outcome_and_parse_as_openmetrics() {
    run_in_netns(|| async {
        for a in ["192.0.2.10", "192.0.2.11", "192.0.2.12"] {
            add_lo_addr(ip(a));
        }
        let _up = echo_server(addr("192.0.2.10:443")).await;
        resetting_server(addr("192.0.2.12:443")).await;
        let _dns = TestDns::start(addr("127.0.0.1:53")).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start(&dir, OUTCOMES_YAML, &[], METRICS).await;

        // Before any connection: every route's outcomes are there at 0, and the build info.
        let s = scrape(METRICS_URL, None);
        assert_eq!(
            connections(&s, "tcp:127.0.0.1:8001", "completed"),
            0.0,
            "{s:#?}"
        );
        assert!(s.contains_key(
            "nitro_vsock_proxy_connections_total{outcome=\"revoked\",route=\"tcp:127.0.0.1:8001\"}"
        ));
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            value(
                &s,
                &format!("nitro_vsock_proxy_build_info{{version=\"{version}\"}}")
            ),
            1.0,
            "{s:#?}"
        );
        assert!(fetch("http://127.0.0.1:9190/", None, 404).contains("/metrics"));

        // completed, with bytes counted while the connection is still open.
        let mut c = TcpStream::connect("127.0.0.1:8001").await.unwrap();
        assert!(echoes(&mut c, &[7u8; 1000]).await);
        let s = scrape(METRICS_URL, None);
        let open = "nitro_vsock_proxy_connections_open{route=\"tcp:127.0.0.1:8001\"}";
        assert_eq!(value(&s, open), 1.0, "{s:#?}");
        let up =
            "nitro_vsock_proxy_bytes_total{direction=\"to_upstream\",route=\"tcp:127.0.0.1:8001\"}";
        let down =
            "nitro_vsock_proxy_bytes_total{direction=\"to_client\",route=\"tcp:127.0.0.1:8001\"}";
        assert_eq!(value(&s, up), 1000.0, "counted while open: {s:#?}");
        assert_eq!(value(&s, down), 1000.0, "{s:#?}");
        c.shutdown().await.unwrap();
        assert!(closed_within(&mut c, Duration::from_secs(5)).await);

        // idle_timeout.
        let mut idle = TcpStream::connect("127.0.0.1:8002").await.unwrap();
        assert!(closed_within(&mut idle, Duration::from_secs(5)).await);

        // client_error: the client resets mid-relay.
        let c = TcpStream::connect("127.0.0.1:8001").await.unwrap();
        let mut c = c;
        assert!(echoes(&mut c, b"x").await);
        c.set_zero_linger().unwrap();
        drop(c);

        // upstream_error: the upstream resets.
        let mut r = TcpStream::connect("127.0.0.1:8006").await.unwrap();
        r.write_all(b"hello").await.unwrap();
        assert!(closed_within(&mut r, Duration::from_secs(5)).await);

        // unreachable: nothing listens on 192.0.2.11:443.
        let mut u = TcpStream::connect("127.0.0.1:8005").await.unwrap();
        assert!(closed_within(&mut u, Duration::from_secs(5)).await);

        // denied, dns_failure and a CONNECT refusal, with their HTTP answers.
        assert_eq!(
            connect_to("tcp:127.0.0.1:8003", "evil.test:443").await.0,
            403
        );
        assert_eq!(
            connect_to("tcp:127.0.0.1:8003", "missing.test:443").await.0,
            502
        );
        let mut bad = TcpStream::connect("127.0.0.1:8003").await.unwrap();
        bad.write_all(b"hello there\r\n\r\n").await.unwrap();
        assert!(closed_within(&mut bad, Duration::from_secs(5)).await);
        // An SNI refusal: not TLS at all.
        let mut not_tls = TcpStream::connect("127.0.0.1:8004").await.unwrap();
        not_tls.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        assert!(closed_within(&mut not_tls, Duration::from_secs(5)).await);

        // over_limit: the route's max_connections is 1.
        let mut held = TcpStream::connect("127.0.0.1:8007").await.unwrap();
        assert!(echoes(&mut held, b"held").await);
        let mut over = TcpStream::connect("127.0.0.1:8007").await.unwrap();
        assert!(closed_within(&mut over, Duration::from_secs(5)).await);

        let expected = [
            ("tcp:127.0.0.1:8001", "completed"),
            ("tcp:127.0.0.1:8001", "client_error"),
            ("tcp:127.0.0.1:8002", "idle_timeout"),
            ("tcp:127.0.0.1:8006", "upstream_error"),
            ("tcp:127.0.0.1:8005", "unreachable"),
            ("tcp:127.0.0.1:8003", "denied"),
            ("tcp:127.0.0.1:8003", "dns_failure"),
            ("tcp:127.0.0.1:8003", "bad_request"),
            ("tcp:127.0.0.1:8004", "not_tls"),
            ("tcp:127.0.0.1:8007", "over_limit"),
        ];
        let s = scrape_until(|s| expected.iter().all(|(r, o)| connections(s, r, o) == 1.0)).await;
        for (route, outcome) in expected {
            assert_eq!(
                connections(&s, route, outcome),
                1.0,
                "{route} {outcome}: {s:#?}\n{}",
                proxy.logs()
            );
        }
        assert_eq!(value(&s, open), 0.0);
        assert_eq!(value(&s, up), 1001.0, "{s:#?}");
        let durations =
            "nitro_vsock_proxy_connect_duration_seconds_count{route=\"tcp:127.0.0.1:8001\"}";
        assert_eq!(value(&s, durations), 2.0, "{s:#?}");
        let lookups: f64 = s
            .iter()
            .filter(|(k, _)| k.starts_with("nitro_vsock_proxy_dns_lookups_total{"))
            .map(|(_, v)| v)
            .sum();
        assert!(lookups >= 1.0, "the missing.test lookup is counted: {s:#?}");

        // A reload is counted by its result.
        let config = dir.path().join("allowlist.yaml");
        proxy
            .reload_with(&config, OUTCOMES_YAML, "allowlist reloaded", 1)
            .await;
        let s = scrape(METRICS_URL, None);
        assert_eq!(
            value(&s, "nitro_vsock_proxy_config_reloads_total{result=\"ok\"}"),
            1.0,
            "{s:#?}"
        );
        proxy
            .reload_with(&config, "allowlist: [", "reload failed", 1)
            .await;
        let s = scrape(METRICS_URL, None);
        assert_eq!(
            value(
                &s,
                "nitro_vsock_proxy_config_reloads_total{result=\"error\"}"
            ),
            1.0,
            "{s:#?}"
        );
        drop(held);
    });
}

#[test]
fn metrics_on_a_unix_socket_and_never_on_vsock() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server(addr("192.0.2.10:443")).await;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("metrics.sock");
        let metrics = format!("unix:{}", sock.display());
        let yaml = "allowlist:\n- {address: 192.0.2.10, port: 443}\n";
        let config = common::write_allowlist(&dir, yaml);
        let proxy = Proxy::spawn(&[
            "tcp:127.0.0.1:8001",
            "192.0.2.10",
            "443",
            "--config",
            &config,
            "--metrics-listen",
            &metrics,
        ]);
        proxy.wait_ready(&metrics).await;
        let mut c = connect("tcp:127.0.0.1:8001").await;
        assert_eq!(
            c.round_trip(b"ping", Duration::from_secs(5)).await.unwrap(),
            b"ping"
        );
        let sock = sock.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = scrape("http://localhost/metrics", Some(&sock));
            let done = connections(&s, "tcp:127.0.0.1:8001", "completed");
            if done == 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "{s:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        fetch("http://localhost/nope", Some(&sock), 404);

        for vsock in ["vsock:9190", "9190"] {
            let exit = common::proxy::run_to_exit(
                &[
                    "tcp:127.0.0.1:8002",
                    "192.0.2.10",
                    "443",
                    "--config",
                    &config,
                    "--metrics-listen",
                    vsock,
                ],
                Duration::from_secs(10),
            );
            assert_eq!(exit.status.code(), Some(2), "{vsock}: {}", exit.stderr);
            assert!(
                exit.stderr.contains("cannot listen on vsock"),
                "{}",
                exit.stderr
            );
        }
    });
}

#[test]
fn a_storm_of_refusals_is_a_few_lines_a_second_and_every_one_is_accounted_for() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server(addr("192.0.2.10:443")).await;
        let _dns = TestDns::start(addr("127.0.0.1:53")).await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = "allowlist:\n- {address: 192.0.2.10, port: 443}\nroutes:\n\
                    - {listen: 'tcp:127.0.0.1:8003', mode: connect}\n";
        let proxy = start(&dir, yaml, &["--log-format", "json"], "tcp:127.0.0.1:8003").await;

        const STORM: usize = 1000;
        let started = Instant::now();
        for _ in 0..STORM {
            assert_eq!(
                connect_to("tcp:127.0.0.1:8003", "169.254.169.254:80")
                    .await
                    .0,
                403
            );
        }
        let storm = started.elapsed();
        // Still serving, at once.
        let (code, mut ok) = connect_to("tcp:127.0.0.1:8003", "192.0.2.10:443").await;
        assert_eq!(code, 200);
        assert!(echoes(&mut ok, b"still serving").await);
        // The last window's summary comes within a second or two of the storm's end.
        tokio::time::sleep(Duration::from_millis(2500)).await;

        let logs = proxy.stderr();
        let audit: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("\"target\":\"audit\"") && l.contains("\"reason\":\"denied\""))
            .collect();
        let lines = audit
            .iter()
            .filter(|l| l.contains("connection refused"))
            .count();
        let summarised: u64 = audit
            .iter()
            .filter_map(|l| {
                let at = l.find("\"suppressed\":")? + "\"suppressed\":".len();
                l[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        let seconds = storm.as_secs() as usize + 1;
        assert!(
            lines <= 2 * seconds + 2,
            "{lines} refusal lines for a {storm:?} storm:\n{}",
            audit.join("\n")
        );
        assert_eq!(
            lines as u64 + summarised,
            STORM as u64,
            "every refusal is a line or counted in a summary:\n{}",
            audit.join("\n")
        );
        let one = audit
            .iter()
            .find(|l| l.contains("connection refused"))
            .unwrap();
        for field in [
            "\"route\":\"tcp:127.0.0.1:8003\"",
            "\"peer\":\"tcp:127.0.0.1:",
            "\"requested\":\"169.254.169.254\"",
            "\"port\":80",
            "\"decision\":\"refused\"",
        ] {
            assert!(one.contains(field), "{field} in {one}");
        }
        assert!(
            audit
                .iter()
                .any(|l| l.contains("more refused like this in the last")),
            "{}",
            audit.join("\n")
        );
    });
}

#[test]
fn one_peer_cannot_take_every_slot() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server(addr("192.0.2.10:443")).await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = "allowlist:\n- {address: 192.0.2.10, port: 443}\nroutes:\n\
                    - {listen: 'tcp:127.0.0.1:8001', remote: '192.0.2.10:443'}\n";
        let proxy = start(
            &dir,
            yaml,
            &["--max-connections-per-peer", "2"],
            "tcp:127.0.0.1:8001",
        )
        .await;
        let mut a1 = connect_from("127.0.0.2", "127.0.0.1:8001").await;
        let mut a2 = connect_from("127.0.0.2", "127.0.0.1:8001").await;
        assert!(echoes(&mut a1, b"a1").await && echoes(&mut a2, b"a2").await);
        let mut a3 = connect_from("127.0.0.2", "127.0.0.1:8001").await;
        assert!(
            closed_within(&mut a3, Duration::from_secs(5)).await,
            "a third connection from 127.0.0.2 is closed"
        );
        // Another peer is served while the first holds its two.
        let mut b = connect_from("127.0.0.3", "127.0.0.1:8001").await;
        assert!(echoes(&mut b, b"b").await, "{}", proxy.logs());
        assert!(
            proxy
                .wait_for_log("--max-connections-per-peer (2)", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
        // The slot comes back when a connection ends.
        drop(a1);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut again = connect_from("127.0.0.2", "127.0.0.1:8001").await;
            if echoes(&mut again, b"again").await {
                break;
            }
            assert!(Instant::now() < deadline, "the slot never came back");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(a2);
    });
}

#[test]
fn reload_revokes_what_it_now_forbids_and_keeps_the_rest() {
    run_in_netns(|| async {
        for a in ["192.0.2.10", "192.0.2.11"] {
            add_lo_addr(ip(a));
        }
        let _a = echo_server(addr("192.0.2.10:443")).await;
        let _b = echo_server(addr("192.0.2.11:443")).await;
        let dir = tempfile::tempdir().unwrap();
        let both =
            "allowlist:\n- {address: 192.0.2.10, port: 443}\n- {address: 192.0.2.11, port: 443}\n\
                    routes:\n- {listen: 'tcp:127.0.0.1:8003', mode: connect}\n\
                    metrics_listen: 'tcp:127.0.0.1:9190'\n";
        let only_a = "allowlist:\n- {address: 192.0.2.10, port: 443}\n\
                      routes:\n- {listen: 'tcp:127.0.0.1:8003', mode: connect}\n\
                      metrics_listen: 'tcp:127.0.0.1:9190'\n";
        let config = dir.path().join("allowlist.yaml");

        // Without --no-revoke-on-reload: the connection to .11 is closed, .10's keeps going.
        let proxy = start(&dir, both, &[], "tcp:127.0.0.1:8003").await;
        let (_, mut keep) = connect_to("tcp:127.0.0.1:8003", "192.0.2.10:443").await;
        let (_, mut gone) = connect_to("tcp:127.0.0.1:8003", "192.0.2.11:443").await;
        assert!(echoes(&mut keep, b"k").await && echoes(&mut gone, b"g").await);
        proxy
            .reload_with(&config, only_a, "allowlist reloaded", 1)
            .await;
        assert!(
            closed_within(&mut gone, Duration::from_secs(5)).await,
            "{}",
            proxy.logs()
        );
        assert!(echoes(&mut keep, b"still").await, "{}", proxy.logs());
        assert!(proxy
            .logs()
            .contains("1 open connection the new allowlist denies closed"));
        let s = scrape_until(|s| connections(s, "tcp:127.0.0.1:8003", "revoked") == 1.0).await;
        assert_eq!(
            connections(&s, "tcp:127.0.0.1:8003", "revoked"),
            1.0,
            "{s:#?}"
        );
        assert!(
            proxy.logs().contains("closed by reload"),
            "{}",
            proxy.logs()
        );
        drop((keep, proxy));

        // With it: both stay.
        let proxy = start(&dir, both, &["--no-revoke-on-reload"], "tcp:127.0.0.1:8003").await;
        let (_, mut a) = connect_to("tcp:127.0.0.1:8003", "192.0.2.10:443").await;
        let (_, mut b) = connect_to("tcp:127.0.0.1:8003", "192.0.2.11:443").await;
        proxy
            .reload_with(&config, only_a, "allowlist reloaded", 1)
            .await;
        assert!(
            echoes(&mut a, b"a").await && echoes(&mut b, b"b").await,
            "{}",
            proxy.logs()
        );
        // New connections follow the new allowlist either way.
        assert_eq!(
            connect_to("tcp:127.0.0.1:8003", "192.0.2.11:443").await.0,
            403
        );
    });
}

#[test]
fn max_lifetime_and_setup_timeout_end_connections() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server(addr("192.0.2.10:443")).await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = "allowlist:\n- {address: 192.0.2.10, port: 443}\nroutes:\n\
                    - {listen: 'tcp:127.0.0.1:8001', remote: '192.0.2.10:443'}\n\
                    - {listen: 'tcp:127.0.0.1:8003', mode: connect}\n";
        let proxy = start(
            &dir,
            yaml,
            &["--max-lifetime", "1s", "--setup-timeout", "500ms"],
            "tcp:127.0.0.1:8001",
        )
        .await;
        // A busy connection still ends at its lifetime.
        let mut busy = TcpStream::connect("127.0.0.1:8001").await.unwrap();
        let started = Instant::now();
        let mut ended = false;
        while started.elapsed() < Duration::from_secs(5) {
            if !echoes(&mut busy, b"busy").await {
                ended = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ended, "--max-lifetime 1s did not close a busy connection");
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert!(
            proxy
                .wait_for_log("--max-lifetime reached", Duration::from_secs(5))
                .await
        );

        // A CONNECT client that never sends its request is closed at the setup timeout.
        let mut silent = TcpStream::connect("127.0.0.1:8003").await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
        assert!(
            proxy
                .wait_for_log("--setup-timeout", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn sighup_reads_etc_hosts_again_and_audit_allowed_records_each_decision() {
    run_in_netns(|| async {
        for a in ["192.0.2.10", "192.0.2.11"] {
            add_lo_addr(ip(a));
        }
        let first = echo_server(addr("192.0.2.10:443")).await;
        let second = echo_server(addr("192.0.2.11:443")).await;
        let _dns = TestDns::start(addr("127.0.0.1:53")).await;
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&hosts, "127.0.0.1 localhost\n192.0.2.10 api.test\n").unwrap();
        std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
        let yaml = "allowlist:\n- {address: api.test, port: 443}\nroutes:\n\
                    - {listen: 'tcp:127.0.0.1:8003', mode: connect}\n";
        let config = common::write_allowlist(&dir, yaml);
        // The system configuration (no --nameserver): /etc/hosts and /etc/resolv.conf are the
        // test's own, bind-mounted for the proxy alone.
        let proxy = Proxy::spawn_with_bind_mounts(
            &["--config", &config, "--audit", "allowed"],
            &[(&hosts, "/etc/hosts"), (&resolv, "/etc/resolv.conf")],
        );
        proxy.wait_ready("tcp:127.0.0.1:8003").await;
        let (code, mut c) = connect_to("tcp:127.0.0.1:8003", "api.test:443").await;
        assert_eq!(code, 200, "{}", proxy.logs());
        assert!(echoes(&mut c, b"one").await);
        assert_eq!((first.accepted(), second.accepted()), (1, 0));
        assert!(
            proxy
                .wait_for_log(
                    "connection allowed: relaying to 192.0.2.10:443",
                    Duration::from_secs(5)
                )
                .await,
            "{}",
            proxy.logs()
        );
        for field in [
            "decision=\"allowed\"",
            "addresses=\"192.0.2.10 allowed (allowlisted name api.test), connected\"",
            "requested=api.test",
        ] {
            assert!(proxy.logs().contains(field), "{field}: {}", proxy.logs());
        }

        // The same file, rewritten in place (the bind mount shows it): api.test moved.
        std::fs::write(&hosts, "127.0.0.1 localhost\n192.0.2.11 api.test\n").unwrap();
        proxy.signal(libc::SIGHUP);
        assert!(
            proxy
                .wait_for_log("allowlist reloaded", Duration::from_secs(10))
                .await,
            "{}",
            proxy.logs()
        );
        let (code, mut c2) = connect_to("tcp:127.0.0.1:8003", "api.test:443").await;
        assert_eq!(code, 200, "{}", proxy.logs());
        assert!(echoes(&mut c2, b"two").await);
        assert_eq!(
            (first.accepted(), second.accepted()),
            (1, 1),
            "after SIGHUP the new /etc/hosts answer is used"
        );
        // Allowed by the name itself, the first connection is not revoked.
        assert!(echoes(&mut c, b"still").await);
    });
}
