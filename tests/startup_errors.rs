//! Start-up failures through the real binary: every bad configuration exits 2 naming the file
//! (and the line where there is one), usage errors exit 2, a bind failure exits 1 naming the
//! address and the OS error. A remote that DNS says does not exist (NXDOMAIN, or no address
//! records) is a configuration error too (exit 2), at start-up, in `--check-config` and on reload;
//! only DNS not answering is exit 1. They run in a private network namespace so a proxy that
//! wrongly starts serving cannot touch the host's ports; DNS is an in-process server there.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::dns::TestDns;
use common::netns::run_in_netns;
use common::proxy::{run_to_exit, Proxy};

const TIMEOUT: Duration = Duration::from_secs(20);

fn run_with_config(yaml: Option<&str>) -> (common::proxy::Exit, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vsock-proxy.yaml");
    if let Some(yaml) = yaml {
        std::fs::write(&path, yaml).unwrap();
    }
    let path = path.display().to_string();
    let out = run_to_exit(
        &["tcp:127.0.0.1:8001", "api.test", "443", "--config", &path],
        TIMEOUT,
    );
    (out, path)
}

#[test]
fn every_bad_configuration_exits_2_naming_the_file() {
    run_in_netns(|| async {
        let cases: &[(Option<&str>, &str, Option<u32>)] = &[
            (None, "No such file", None),
            (Some(""), "is empty", None),
            (Some("allowlist: [ {address: a.test, port: 443\n"), "", Some(2)),
            (Some("just some text\n"), "", Some(1)),
            (Some("other: 1\n"), "allowlist", Some(1)),
            (Some("allowlst:\n- {address: api.test, port: 443}\n"), "unknown field `allowlst`", Some(1)),
            (Some("allowlist:\n- {address: api.test, port: 443}\n- {adress: api.test, port: 443}\n"), "unknown field `adress`", Some(3)),
            (Some("allowlist:\n- address: api.test\n  port: 0\n"), "got 0", Some(3)),
            (Some("allowlist:\n- address: api.test\n  port: 70000\n"), "got 70000", Some(3)),
            (Some("allowlist:\n- address: api.test\n  port: 443x\n"), "443x", Some(3)),
            (Some("allowlist:\n- port: 443\n  address: 'bad host!'\n"), "allowlist[0].address", Some(3)),
            (Some("allowlist:\n- port: 443\n  address: 10.0.0.0/33\n"), "CIDR", Some(3)),
            (Some("allowlist:\n- port: 443\n  address: 10.0.0.1/8\n"), "did you mean 10.0.0.0/8", Some(3)),
            (Some("allowlist: []\n"), "empty", None),
        ];
        for (yaml, needle, line) in cases {
            let (out, path) = run_with_config(*yaml);
            let what = format!("config {yaml:?}: stderr: {}", out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what}");
            assert!(out.stderr.contains(&path), "names the file: {what}");
            assert!(out.stderr.contains(needle), "says {needle:?}: {what}");
            if let Some(line) = line {
                assert!(
                    out.stderr.contains(&format!("line {line}")),
                    "names line {line}: {what}"
                );
            }
            assert!(!out.stderr.contains("panicked"), "{what}");
        }
    });
}

#[test]
fn usage_errors_exit_2() {
    run_in_netns(|| async {
        for (args, needle) in [
            (&["8001", "19", "443"][..], "not the enclave's CID"),
            (&["8001", "api.test", "443", "-w", "0"], "num_workers"),
            (
                &["8001", "api.test", "443", "-4", "-6"],
                "cannot be used with",
            ),
            (&["8001", "api.test"], "REMOTE_PORT"),
            (&["8001", "api.test", "99999"], "not a TCP port"),
        ] {
            let out = run_to_exit(args, TIMEOUT);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
            assert!(
                out.stderr.contains(needle),
                "{args:?} should say {needle:?}: {}",
                out.stderr
            );
        }
        let out = run_to_exit(&["--version"], TIMEOUT);
        assert_eq!(out.status.code(), Some(0));
        assert!(
            out.stdout.contains(env!("CARGO_PKG_VERSION")),
            "{}",
            out.stdout
        );
    });
}

#[test]
fn bind_failure_exits_1_naming_address_and_os_error() {
    run_in_netns(|| async {
        let _taken = std::net::TcpListener::bind("127.0.0.1:8001").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, "allowlist:\n- {address: 192.0.2.10, port: 443}\n").unwrap();
        let out = run_to_exit(
            &[
                "tcp:127.0.0.1:8001",
                "192.0.2.10",
                "443",
                "--config",
                &path.display().to_string(),
            ],
            TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        assert!(out.stderr.contains("tcp:127.0.0.1:8001"), "{}", out.stderr);
        assert!(
            out.stderr.contains("Address already in use"),
            "{}",
            out.stderr
        );
    });
}

/// The new user's typo: a remote that only DNS could vouch for, under an allowlist that names an
/// IP address for its port. `dns` is the `--nameserver`; `extra` more arguments.
fn run_typo(dns: &str, extra: &[&str]) -> (common::proxy::Exit, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_allowlist(&dir, "allowlist:\n- {address: 192.0.2.10, port: 9443}\n");
    let mut args = vec![
        "tcp:127.0.0.1:9000",
        "typo.example",
        "9443",
        "--config",
        &config,
        "--nameserver",
        dns,
    ];
    args.extend_from_slice(extra);
    (run_to_exit(&args, TIMEOUT), config)
}

fn assert_says_not_in_dns(out: &common::proxy::Exit, config: &str, absent: &str, detail: &str) {
    let what = format!("stderr: {}", out.stderr);
    assert_eq!(out.status.code(), Some(2), "{what}");
    assert!(
        out.stderr.contains(&format!("typo.example {absent}")),
        "says {absent:?}: {what}"
    );
    assert!(out.stderr.contains(detail), "says {detail:?}: {what}");
    assert!(out.stderr.contains("spelling"), "{what}");
    assert!(out.stderr.contains(config), "names the file: {what}");
    assert!(
        out.stderr.contains("192.0.2.10:9443"),
        "lists the entries with the port: {what}"
    );
    assert!(!out.stderr.contains("panicked"), "{what}");
}

#[test]
fn remote_that_does_not_exist_in_dns_exits_2() {
    run_in_netns(|| async {
        // The server knows no name, so it answers NXDOMAIN for typo.example.
        let dns = TestDns::start("127.0.0.1:0".parse().unwrap()).await;
        let server = dns.addr().to_string();
        let (out, config) = run_typo(&server, &[]);
        assert_says_not_in_dns(&out, &config, "does not exist in DNS", "NXDOMAIN");
        assert!(dns.queries("typo.example") > 0, "asked DNS");

        let (out, config) = run_typo(&server, &["--check-config"]);
        assert_says_not_in_dns(&out, &config, "does not exist in DNS", "NXDOMAIN");
        assert!(out.stdout.contains("NOT ALLOWED"), "{}", out.stdout);
    });
}

#[test]
fn remote_with_no_address_records_exits_2() {
    run_in_netns(|| async {
        let dns = TestDns::start("127.0.0.1:0".parse().unwrap()).await;
        // The name exists (NOERROR) but has neither an A nor an AAAA record.
        dns.set("typo.example", &[], 60);
        let server = dns.addr().to_string();
        let (out, config) = run_typo(&server, &[]);
        assert_says_not_in_dns(&out, &config, "has no address in DNS", "no address records");

        // With -6 only the AAAA answer counts: an IPv4-only name has no address either.
        let v4: IpAddr = "192.0.2.99".parse().unwrap();
        dns.set("typo.example", &[v4], 60);
        let (out, config) = run_typo(&server, &["-6", "--check-config"]);
        assert_says_not_in_dns(&out, &config, "has no address in DNS", "AAAA");
    });
}

#[test]
fn dns_that_does_not_answer_exits_1() {
    run_in_netns(|| async {
        // A name server that receives every query and never answers, over UDP and TCP.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let _tcp = std::net::TcpListener::bind(addr).unwrap();
        let server = addr.to_string();
        let (out, config) = run_typo(&server, &["--dns-timeout", "300ms"]);
        let what = format!("stderr: {}", out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert!(
            out.stderr.contains("cannot tell whether typo.example:9443"),
            "{what}"
        );
        assert!(
            out.stderr.contains("no name server answered in time"),
            "{what}"
        );
        assert!(out.stderr.contains(&config), "{what}");
        assert!(!out.stderr.contains("does not exist"), "{what}");
        let mut buf = [0u8; 512];
        udp.set_nonblocking(true).unwrap();
        assert!(
            udp.recv_from(&mut buf).is_ok(),
            "the query reached the silent server"
        );
    });
}

#[test]
fn reload_refuses_a_remote_that_does_not_exist_in_dns() {
    run_in_netns(|| async {
        let dns = TestDns::start("127.0.0.1:0".parse().unwrap()).await;
        let server = dns.addr().to_string();
        let dir = tempfile::tempdir().unwrap();
        let routes = |remote: &str| {
            format!(
                "allowlist:\n- {{address: 192.0.2.10, port: 9443}}\n\
                 routes:\n- {{listen: 'tcp:127.0.0.1:9000', remote: '{remote}:9443'}}\n"
            )
        };
        let path = common::write_allowlist(&dir, &routes("192.0.2.10"));
        let config = std::path::PathBuf::from(&path);
        let mut proxy = Proxy::spawn(&["--config", &path, "--nameserver", &server]);
        proxy.wait_ready("tcp:127.0.0.1:9000").await;

        proxy
            .reload_with(&config, &routes("typo.example"), "reload failed", 1)
            .await;
        // The name exists now, without an address: still refused, for that reason once the
        // cached NXDOMAIN (negative TTL 1 s) has expired.
        dns.set("typo.example", &[], 60);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut nth = 1;
        while !proxy.logs().contains("typo.example has no address in DNS") {
            assert!(std::time::Instant::now() < deadline, "{}", proxy.logs());
            nth += 1;
            proxy
                .reload_with(&config, &routes("typo.example"), "reload failed", nth)
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let logs = proxy.logs();
        assert!(
            logs.contains("typo.example does not exist in DNS"),
            "{logs}"
        );
        assert!(
            logs.contains("typo.example has no address in DNS"),
            "{logs}"
        );
        assert!(proxy.is_running(), "{logs}");
        assert!(common::proxy::is_listening("tcp:127.0.0.1:9000"), "{logs}");
    });
}
