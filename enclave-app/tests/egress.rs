//! `enclave-app egress` end to end, host tier: an "enclave" network namespace with only `lo`,
//! the shipped `egress.nft` and the routes `--print-setup` prints, `enclave-app egress` talking
//! over `unix:` stand-ins to the real nitro-vsock-proxy in the test's own namespace (the
//! "parent": a connect route with `sni: require`, a dns route, the test's DNS server and a real
//! TLS upstream). Unmodified clients in the enclave, with no proxy settings (curl, python3's
//! urllib, openssl s_client, getent, dig): allowed names work by exact name and by wildcard; an
//! unlisted name fails at resolution; a raw IP the allowlist lacks is refused by the parent and
//! reset; a name pointing at the metadata service reaches nothing; another name's ClientHello
//! inside an allowed name's tunnel is refused; 64 MiB each way and a half-close pass intact.
//! Trap listeners on the parent count every refused address: they must stay at 0.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use support::dns::TestDns;
use support::enclave::{Enclave, TlsUpstream};
use support::netns::{self, add_lo_addr, run_in_netns};
use support::process::{proxy_bin, Proc, APP};
use support::upstream::{echo_server, pattern, UpstreamHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NFT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/egress.nft");
/// How long a client may take (far more than it needs).
const CLIENT: Duration = Duration::from_secs(30);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The parent: the daemon with a connect route (with or without `sni: require`) and a dns
/// route on unix sockets, the DNS server, the upstreams and the traps.
struct Parent {
    dir: tempfile::TempDir,
    dns: TestDns,
    tls: TlsUpstream,
    /// Listeners on addresses the enclave must never reach: the metadata service (80 and 443)
    /// and an address no entry allows.
    traps: Vec<UpstreamHandle>,
    echo: UpstreamHandle,
    proxy: Proc,
}

impl Parent {
    /// `dns_options`: more of the dns route's settings, e.g. `, idle_timeout: 1s`.
    async fn start(sni_require: bool, dns_options: &str) -> Parent {
        let dir = tempfile::tempdir().unwrap();
        for a in [
            "192.0.2.10",
            "192.0.2.20",
            "192.0.2.30",
            "192.0.2.40",
            "169.254.169.254",
        ] {
            add_lo_addr(ip(a));
        }
        let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        dns.set("api.allowed.test", &[ip("192.0.2.10")], 60);
        dns.set("other.allowed.test", &[ip("192.0.2.10")], 60);
        dns.set("x.wild.test", &[ip("192.0.2.10")], 60);
        dns.set("unlisted.test", &[ip("192.0.2.10")], 60);
        dns.set("rebind.allowed.test", &[ip("169.254.169.254")], 60);
        dns.set("bulk.allowed.test", &[ip("192.0.2.20")], 60);
        dns.set("slow.allowed.test", &[ip("192.0.2.10")], 60);
        dns.set_delay("slow.allowed.test", Duration::from_secs(10));
        dns.set("ip-ranges.amazonaws.com", &[ip("192.0.2.40")], 60);
        let tls = TlsUpstream::start(
            "192.0.2.10:443".parse().unwrap(),
            &[
                "api.allowed.test",
                "other.allowed.test",
                "*.wild.test",
                "unlisted.test",
            ],
            dir.path().join("ca.pem"),
        )
        .await;
        let mut traps = Vec::new();
        for a in [
            "169.254.169.254:443",
            "169.254.169.254:80",
            "192.0.2.30:443",
        ] {
            traps.push(echo_server(a.parse().unwrap()).await);
        }
        let echo = echo_server("192.0.2.20:9000".parse().unwrap()).await;
        let sni = if sni_require { ", sni: require" } else { "" };
        let config = format!(
            "allowlist:\n\
             \x20 - {{address: api.allowed.test, port: 443}}\n\
             \x20 - {{address: other.allowed.test, port: 443}}\n\
             \x20 - {{address: '*.wild.test', port: 443}}\n\
             \x20 - {{address: rebind.allowed.test, port: 443}}\n\
             \x20 - {{address: bulk.allowed.test, port: 9000}}\n\
             \x20 - {{address: slow.allowed.test, port: 443}}\n\
             \x20 - {{address: ip-ranges.amazonaws.com, port: 443}}\n\
             routes:\n\
             \x20 - {{listen: 'unix:{connect}', mode: connect{sni}}}\n\
             \x20 - {{listen: 'unix:{dns}', mode: dns{dns_options}}}\n",
            connect = dir.path().join("connect.sock").display(),
            dns = dir.path().join("dns.sock").display(),
        );
        let path = dir.path().join("routes.yaml");
        std::fs::write(&path, config).unwrap();
        let mut proxy = Proc::spawn(
            "nitro-vsock-proxy",
            proxy_bin(),
            &[
                "--config",
                &path.display().to_string(),
                "--nameserver",
                "127.0.0.1",
            ],
            &[],
        );
        let (c, d) = (dir.path().join("connect.sock"), dir.path().join("dns.sock"));
        proxy
            .wait_ready(|| netns::unix_listening(&c) && netns::unix_listening(&d))
            .await;
        Parent {
            dir,
            dns,
            tls,
            traps,
            echo,
            proxy,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self) -> String {
        self.tls.ca_pem.display().to_string()
    }

    /// Every trap still at 0 connections.
    fn assert_traps_untouched(&self) {
        for trap in &self.traps {
            assert_eq!(
                trap.accepted(),
                0,
                "something reached {}; the proxy's log:\n{}",
                trap.addr(),
                self.proxy.logs()
            );
        }
    }
}

/// The enclave, set up as an image would be: egress.nft, the routes --print-setup prints,
/// resolv.conf naming the stub, and `enclave-app egress` on unix: stand-ins to `parent`.
struct Egress {
    enclave: Enclave,
    app: Proc,
}

/// The enclave's namespace with the ruleset, the address and routes `--print-setup` prints for
/// `extra` options, and resolv.conf naming the stub; nothing running yet.
async fn bare_enclave(parent: &Parent, extra: &[&str]) -> Enclave {
    let resolv = parent.path("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
    let enclave = Enclave::start(&resolv);
    enclave.must("nft", &["-f", NFT]).await;
    let mut print = vec!["egress", "--print-setup"];
    print.extend_from_slice(extra);
    let setup = enclave.must(APP, &print).await;
    // The address and routes, as printed (`ip link set lo up` is done already).
    let routes: Vec<&str> = setup
        .lines()
        .filter(|l| l.starts_with("ip route ") || l.starts_with("ip address "))
        .collect();
    assert_eq!(routes.len(), 3, "{setup}");
    for route in routes {
        let args: Vec<&str> = route.split_whitespace().skip(1).collect();
        enclave.must("ip", &args).await;
    }
    enclave
}

/// [`bare_enclave`] with `enclave-app egress` running (`extra` options added), listening.
async fn enclave(parent: &Parent, extra: &[&str]) -> Egress {
    let enclave = bare_enclave(parent, extra).await;
    let mut args = vec![
        "egress".to_owned(),
        "--parent-dns".to_owned(),
        format!("unix:{}", parent.path("dns.sock").display()),
        "--connect-via".to_owned(),
        format!("unix:{}", parent.path("connect.sock").display()),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let app = enclave
        .run(move || Proc::spawn("enclave-app egress", APP, &args, &[]))
        .await;
    let ready = enclave
        .wait_until(Duration::from_secs(15), || {
            netns::tcp_listening("127.0.0.1:15001".parse().unwrap())
                && netns::udp_bound("127.0.0.1:53".parse().unwrap())
                && netns::tcp_listening("127.0.0.1:53".parse().unwrap())
        })
        .await;
    assert!(
        ready,
        "enclave-app egress is not listening; its log:\n{}",
        app.logs()
    );
    Egress { enclave, app }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn unmodified_clients_reach_allowed_names_and_nothing_else() {
    run_in_netns(|| async {
        let parent = Parent::start(true, "").await;
        let e = enclave(&parent, &[]).await;
        let ca = parent.ca();

        // The stub: a synthetic address for an allowed name, NODATA for AAAA, NXDOMAIN with
        // the parent's reason (EDE 15) for an unlisted one.
        let a = e
            .enclave
            .must(
                "dig",
                &[
                    "+short",
                    "+tries=1",
                    "+time=5",
                    "@127.0.0.1",
                    "api.allowed.test",
                    "A",
                ],
            )
            .await;
        let synthetic: Ipv4Addr = a
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not an address: {a:?}"));
        assert!(
            "198.18.0.0/15"
                .parse::<ipnet::Ipv4Net>()
                .unwrap()
                .contains(&synthetic),
            "{synthetic} is not in the synthetic pool"
        );
        let again = e
            .enclave
            .must(
                "dig",
                &["+short", "+tcp", "@127.0.0.1", "API.allowed.test.", "A"],
            )
            .await;
        assert_eq!(
            again.trim(),
            synthetic.to_string(),
            "one address per name, over TCP too"
        );
        let aaaa = e
            .enclave
            .must(
                "dig",
                &["+tries=1", "@127.0.0.1", "api.allowed.test", "AAAA"],
            )
            .await;
        assert!(
            aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"),
            "{aaaa}"
        );
        let https = e
            .enclave
            .must(
                "dig",
                &["+tries=1", "@127.0.0.1", "api.allowed.test", "HTTPS"],
            )
            .await;
        assert!(
            https.contains("status: NOERROR") && https.contains("ANSWER: 0"),
            "{https}"
        );
        let blocked = e
            .enclave
            .must("dig", &["+tries=1", "@127.0.0.1", "unlisted.test", "A"])
            .await;
        assert!(blocked.contains("status: NXDOMAIN"), "{blocked}");
        assert!(blocked.contains("EDE: 15 (Blocked)"), "{blocked}");
        let blocked6 = e
            .enclave
            .must("dig", &["+tries=1", "@127.0.0.1", "unlisted.test", "AAAA"])
            .await;
        assert!(blocked6.contains("status: NXDOMAIN"), "{blocked6}");

        // curl by exact name and by wildcard, with the test's CA and no proxy settings.
        for name in ["api.allowed.test", "x.wild.test"] {
            let url = format!("https://{name}/");
            let out = e
                .enclave
                .output(
                    "curl",
                    &["-sS", "--fail", "--noproxy", "*", "--cacert", &ca, &url],
                    CLIENT,
                )
                .await;
            assert!(
                out.status.success(),
                "curl {url}: {}\negress log:\n{}",
                text(&out),
                e.app.logs()
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("hello {name}\n")
            );
        }

        // python3's urllib.
        let script = format!(
            "import ssl, urllib.request\n\
             ctx = ssl.create_default_context(cafile={ca:?})\n\
             print(urllib.request.urlopen('https://other.allowed.test/', context=ctx, timeout=20).read().decode(), end='')\n"
        );
        let out = e.enclave.output("python3", &["-c", &script], CLIENT).await;
        assert!(out.status.success(), "python3: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello other.allowed.test\n"
        );

        // openssl s_client, verified against the CA.
        let request = b"GET / HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n";
        let out = e
            .enclave
            .output_with_input(
                "openssl",
                &[
                    "s_client",
                    "-connect",
                    "api.allowed.test:443",
                    "-servername",
                    "api.allowed.test",
                    "-CAfile",
                    &ca,
                    "-verify_return_error",
                    "-ign_eof",
                ],
                Some(request),
                CLIENT,
            )
            .await;
        let said = text(&out);
        assert!(out.status.success(), "openssl s_client: {said}");
        assert!(
            said.contains("hello api.allowed.test") && said.contains("Verify return code: 0 (ok)"),
            "{said}"
        );

        // An unlisted name fails at resolution (curl: 6, couldn't resolve host).
        let out = e
            .enclave
            .output(
                "curl",
                &["-sS", "--cacert", &ca, "https://unlisted.test/"],
                CLIENT,
            )
            .await;
        assert_eq!(out.status.code(), Some(6), "{}", text(&out));
        let out = e
            .enclave
            .output("getent", &["hosts", "unlisted.test"], CLIENT)
            .await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "getent finds nothing: {}",
            text(&out)
        );

        // A name whose DNS points at the metadata service: the parent answers no address, so
        // the app has nothing to connect to.
        let out = e
            .enclave
            .output(
                "curl",
                &["-sS", "--cacert", &ca, "https://rebind.allowed.test/"],
                CLIENT,
            )
            .await;
        assert_eq!(out.status.code(), Some(6), "{}", text(&out));

        // Raw IPs the allowlist lacks: the parent refuses, the app's connection is reset at
        // once, and the egress side logs the parent's answer.
        for url in [
            "https://192.0.2.30/",
            "http://169.254.169.254/latest/meta-data/",
        ] {
            let started = std::time::Instant::now();
            let out = e
                .enclave
                .output("curl", &["-sS", "--cacert", &ca, url], CLIENT)
                .await;
            assert!(!out.status.success(), "{url}: {}", text(&out));
            // The reset arrives as curl connects or as it first reads: 7 (could not connect),
            // 35 (TLS connect error), 52 (empty reply) or 56 (receive failure), never a timeout.
            assert!(
                matches!(out.status.code(), Some(7 | 35 | 52 | 56)),
                "{url}: {}",
                text(&out)
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{url}: the refusal took {:?}",
                started.elapsed()
            );
        }
        assert!(
            e.app
                .wait_for_log(
                    "connection to 192.0.2.30:443 refused: the parent answered 403",
                    Duration::from_secs(5)
                )
                .await,
            "{}",
            e.app.logs()
        );

        // sni: require: a ClientHello for another (even allowed) name inside api.allowed.test's
        // tunnel is refused by the parent after its 200; the upstream never sees that name.
        let out = e
            .enclave
            .output_with_input(
                "openssl",
                &[
                    "s_client",
                    "-connect",
                    "api.allowed.test:443",
                    "-servername",
                    "other.allowed.test",
                    "-CAfile",
                    &ca,
                ],
                Some(b"GET / HTTP/1.1\r\n\r\n"),
                CLIENT,
            )
            .await;
        let said = text(&out);
        assert!(!said.contains("hello other.allowed.test"), "{said}");
        assert!(
            said.contains("Cipher is (NONE)") && said.contains("no peer certificate available"),
            "the handshake must not complete: {said}"
        );
        assert!(
            parent
                .proxy
                .wait_for_log("sni_mismatch", Duration::from_secs(5))
                .await,
            "the parent logs the mismatch: {}",
            parent.proxy.logs()
        );

        let seen = parent.tls.names_seen();
        assert!(!seen.iter().any(|n| n == "unlisted.test"), "{seen:?}");
        assert_eq!(
            seen.iter()
                .filter(|n| n.as_str() == "other.allowed.test")
                .count(),
            1,
            "other.allowed.test reached the upstream only through its own name (python3): {seen:?}"
        );
        parent.assert_traps_untouched();
        assert_eq!(
            parent.dns.queries("unlisted.test"),
            0,
            "a blocked name is never resolved by the parent"
        );
    });
}

#[test]
fn sixty_four_mib_each_way_and_a_half_close_pass_intact() {
    run_in_netns(|| async {
        let parent = Parent::start(false, "").await;
        let e = enclave(&parent, &[]).await;
        let resolved = e
            .enclave
            .must("getent", &["ahostsv4", "bulk.allowed.test"])
            .await;
        let synthetic: Ipv4Addr = resolved
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("getent: {resolved}"));
        // A plain connect() from the enclave: the kernel, not the test, sends it to the
        // transparent listener.
        let std_stream = e
            .enclave
            .run(move || std::net::TcpStream::connect(SocketAddr::from((synthetic, 9000))))
            .await
            .expect("connect from the enclave");
        std_stream.set_nonblocking(true).unwrap();
        let stream = tokio::net::TcpStream::from_std(std_stream).unwrap();
        let (mut r, mut w) = stream.into_split();
        const SIZE: usize = 64 * 1024 * 1024;
        let data = pattern(7, SIZE);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            // The half-close: the echo server sees EOF, echoes the rest and closes its side.
            w.shutdown().await.unwrap();
            w
        });
        let mut back = Vec::with_capacity(SIZE);
        tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut back))
            .await
            .expect("the echo did not end within 120 s")
            .unwrap();
        let _w = writer.await.unwrap();
        assert_eq!(back.len(), SIZE, "bytes back");
        assert!(back == data, "the 64 MiB came back changed");
        let report = parent.echo.wait_result(Duration::from_secs(10)).await;
        assert_eq!(report.received, SIZE as u64, "{report:?}");
        assert!(
            e.app
                .wait_for_log("bulk.allowed.test:9000", Duration::from_secs(5))
                .await,
            "{}",
            e.app.logs()
        );
        parent.assert_traps_untouched();
    });
}

/// What `dig` (UDP, one try) says about `name`'s A record in the enclave: the status and the
/// addresses.
async fn dig_a(e: &Egress, name: &str) -> (String, Vec<String>) {
    let out = e
        .enclave
        .must(
            "dig",
            &[
                "+tries=1",
                "+time=10",
                "@127.0.0.1",
                name,
                "A",
                "+noall",
                "+comments",
                "+answer",
            ],
        )
        .await;
    let status = out
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no status from dig: {out}"))
        .to_owned();
    let addresses = out
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect();
    (status, addresses)
}

/// A connection from the enclave (a plain connect(), redirected by the kernel), as tokio's.
async fn connect_from(e: &Egress, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let std_stream = e
        .enclave
        .run(move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10)))
        .await?;
    std_stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(std_stream)
}

async fn echo_round(stream: &mut tokio::net::TcpStream, what: &[u8]) {
    stream.write_all(what).await.unwrap();
    let mut back = vec![0u8; what.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .expect("no echo within 10 s")
        .unwrap();
    assert_eq!(back, what);
}

#[test]
fn the_stub_reconnects_answers_in_time_never_recycles_an_address_in_use_and_stops_on_sigterm() {
    run_in_netns(|| async {
        // The parent closes an idle DNS connection after 1 s; the pool has two addresses.
        let parent = Parent::start(false, ", idle_timeout: 1s").await;
        let e = enclave(&parent, &["--fake-ip", "198.18.0.0/30"]).await;

        let (status, bulk) = dig_a(&e, "bulk.allowed.test").await;
        assert_eq!(
            (status.as_str(), bulk.as_slice()),
            ("NOERROR", &["198.18.0.1".to_owned()][..])
        );
        let mut open = connect_from(&e, "198.18.0.1:9000".parse().unwrap())
            .await
            .unwrap();
        echo_round(&mut open, b"ping").await;

        // Past the parent's idle timeout: the stub's connection is gone, and the next question
        // is asked on a new one.
        assert!(
            parent
                .proxy
                .wait_for_log("end=idle_timeout", Duration::from_secs(5))
                .await,
            "the parent closes the idle DNS connection: {}",
            parent.proxy.logs()
        );
        let (status, api) = dig_a(&e, "api.allowed.test").await;
        assert_eq!(
            (status.as_str(), api.as_slice()),
            ("NOERROR", &["198.18.0.2".to_owned()][..])
        );

        // The pool is full: new names take the least recently used free address, never the
        // one with an open connection.
        for name in ["other.allowed.test", "x.wild.test"] {
            let (status, got) = dig_a(&e, name).await;
            assert_eq!(
                (status.as_str(), got.as_slice()),
                ("NOERROR", &["198.18.0.2".to_owned()][..]),
                "{name}"
            );
        }
        let (_, bulk_again) = dig_a(&e, "bulk.allowed.test").await;
        assert_eq!(bulk_again, bulk, "bulk.allowed.test kept its address");
        echo_round(&mut open, b"still bulk.allowed.test").await;
        open.shutdown().await.unwrap();
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        // A synthetic address no name holds (the /30's last address is never handed out):
        // reset at once, the parent never asked.
        let started = std::time::Instant::now();
        let refused = async {
            let mut s = connect_from(&e, "198.18.0.3:443".parse().unwrap()).await?;
            let mut buf = [0u8; 1];
            s.read(&mut buf).await
        };
        let result = tokio::time::timeout(Duration::from_secs(5), refused)
            .await
            .expect("not reset at once");
        assert!(
            matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset || e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            e.app
                .wait_for_log(
                    "connection to 198.18.0.3 reset: no name holds",
                    Duration::from_secs(5)
                )
                .await,
            "{}",
            e.app.logs()
        );

        // The parent's resolver is slow for this name: SERVFAIL within --dns-timeout (2 s).
        let started = std::time::Instant::now();
        let (status, _) = dig_a(&e, "slow.allowed.test").await;
        assert_eq!(status, "SERVFAIL");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
            "{took:?}"
        );
        // And the stub still answers afterwards.
        let (status, _) = dig_a(&e, "api.allowed.test").await;
        assert_eq!(status, "NOERROR");
        parent.assert_traps_untouched();

        // SIGTERM with nothing open: it stops accepting and exits 0 at once.
        let mut app = e.app;
        app.signal(libc::SIGTERM);
        let status = app.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success(), "{status}: {}", app.logs());
        assert!(app.logs().contains("stopped accepting"), "{}", app.logs());
    });
}

#[test]
fn print_setup_follows_the_options_and_the_shipped_ruleset() {
    let out = std::process::Command::new(APP)
        .args([
            "egress",
            "--print-setup",
            "--listen",
            "127.0.0.1:16000",
            "--fake-ip",
            "100.64.0.0/16",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    let shipped = std::fs::read_to_string(NFT).unwrap();
    assert!(
        script.contains(&shipped.replace(":15001", ":16000")),
        "{script}"
    );
    for line in [
        "ip address replace 100.64.0.0/32 dev lo",
        "ip route replace 100.64.0.0/16 dev lo src 127.0.0.1",
        "ip route replace default dev lo src 127.0.0.1",
        "echo 'nameserver 127.0.0.1' >/etc/resolv.conf",
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "{line:?} missing:\n{script}"
        );
    }
    let check = std::process::Command::new("sh")
        .args(["-n", "-c", &script])
        .status()
        .unwrap();
    assert!(check.success(), "not valid sh:\n{script}");
}

#[test]
fn the_example_parent_configuration_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/egress.example.yaml");
    let out = std::process::Command::new(proxy_bin())
        .args(["--config", example, "--check-config"])
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("-> dns") && said.contains("HTTP CONNECT (sni: require)"),
        "{said}"
    );
}

/// Kills, when dropped, every process whose parent is `0` (what a script started in the
/// background and left running when it exec'd).
struct KillChildren(u32);

impl Drop for KillChildren {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command name (which may hold spaces): state, ppid, ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(self.0) {
                // SAFETY: kill(2) on a pid we just read; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[test]
fn the_images_run_sh_with_egress_serves_the_workshop_by_name() {
    run_in_netns(|| async {
        let parent = Parent::start(true, "").await;
        let document = parent.path("ip-ranges.json");
        std::fs::copy(support::chain::SAMPLE, &document).unwrap();
        let standin_ca = parent.path("standin-ca.pem");
        let _standin =
            support::chain::start_standin(standin_ca.clone(), "192.0.2.40:443", &document).await;
        let enclave = bare_enclave(&parent, &[]).await;
        let server_sock = parent.path("server.sock");
        let env: Vec<(String, String)> = vec![
            ("ENCLAVE_APP".into(), APP.into()),
            ("EGRESS".into(), "1".into()),
            ("EGRESS_NFT".into(), NFT.into()),
            (
                "EGRESS_PARENT_DNS".into(),
                format!("unix:{}", parent.path("dns.sock").display()),
            ),
            (
                "EGRESS_CONNECT_VIA".into(),
                format!("unix:{}", parent.path("connect.sock").display()),
            ),
            (
                "SERVER_ARGS".into(),
                format!(
                    "--stand-in unix:{} --ca-file {}",
                    server_sock.display(),
                    standin_ca.display()
                ),
            ),
        ];
        let run_sh = concat!(env!("CARGO_MANIFEST_DIR"), "/run.sh");
        let image = enclave
            .run(move || {
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Proc::spawn("run.sh (EGRESS=1)", "sh", &[run_sh], &env)
            })
            .await;
        let _egress = KillChildren(image.pid());
        let sock = server_sock.clone();
        let ready = enclave
            .wait_until(Duration::from_secs(15), move || {
                netns::unix_listening(&sock)
            })
            .await;
        assert!(
            ready,
            "the server is not listening; run.sh's log:\n{}",
            image.logs()
        );

        let out =
            support::chain::client(&format!("unix:{}", server_sock.display()), "us-east-1").await;
        assert_eq!(
            out.code(),
            Some(0),
            "{out:?}\nrun.sh's log:\n{}",
            image.logs()
        );
        assert_eq!(out.stdout, format!("{}\n", support::chain::US_EAST_1));
        assert!(
            image
                .wait_for_log("target=ip-ranges.amazonaws.com:443", Duration::from_secs(5))
                .await,
            "the download went through egress by name: {}",
            image.logs()
        );
        parent.assert_traps_untouched();
    });
}
