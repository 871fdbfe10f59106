//! The allowlist enforced on every connection, through the real binary.
//!
//! Each test runs in its own network namespace: a DNS server on 127.0.0.1:53 whose answers the
//! test changes, upstream listeners on test addresses added to `lo`, and the proxy listening on
//! the `tcp:` stand-in. Addresses the proxy must NOT reach (169.254.169.254, 127.0.0.1:443, a
//! changed answer) also get a listener, so a wrong connect is caught, not sent anywhere.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::dns::TestDns;
use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, Proxy};
use common::upstream::echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LISTEN: &str = "tcp:127.0.0.1:8001";
const DNS_ADDR: &str = "127.0.0.1:53";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Starts the proxy for `remote`:443 with `yaml`, asking our DNS server, and waits until it listens.
async fn start_proxy(dir: &tempfile::TempDir, yaml: &str, remote: &str, extra: &[&str]) -> Proxy {
    let config = common::write_allowlist(dir, yaml);
    let mut args: Vec<String> = vec![
        LISTEN.into(),
        remote.into(),
        "443".into(),
        "--config".into(),
        config,
        "--nameserver".into(),
        DNS_ADDR.into(),
        "--dns-timeout".into(),
        "500ms".into(),
        "--connect-timeout".into(),
        "2s".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let proxy = Proxy::spawn(&args);
    proxy.wait_ready(LISTEN).await;
    proxy
}

/// Sends `msg` through the proxy and returns what came back before the connection closed.
async fn round_trip(msg: &[u8]) -> Vec<u8> {
    let mut conn = connect(LISTEN).await;
    // A denied connection may already be closed: a failed write is part of the outcome.
    let _ = conn.write_all(msg).await;
    let _ = conn.shutdown().await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply)).await;
    assert!(
        read.is_ok(),
        "the proxy neither answered nor closed within 10 s"
    );
    reply
}

async fn dns_with(name: &str, ips: &[IpAddr], ttl: u32) -> TestDns {
    let dns = TestDns::start(DNS_ADDR.parse().unwrap()).await;
    dns.set(name, ips, ttl);
    dns
}

#[test]
fn allowed_by_hostname() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let _dns = dns_with("api.test", &[ip("192.0.2.10")], 60).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(
            &dir,
            "allowlist:\n- {address: API.test., port: 443}\n",
            "api.test",
            &[],
        )
        .await;

        assert_eq!(round_trip(b"hello").await, b"hello");
        assert_eq!(up.accepted(), 1);
        assert!(
            proxy
                .wait_for_log("upstream=192.0.2.10:443", Duration::from_secs(5))
                .await,
            "the connection span names the upstream:\n{}",
            proxy.logs()
        );
        assert!(
            proxy
                .wait_for_log("bytes_to_upstream=5", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
        assert!(
            proxy.logs().contains("peer=tcp:127.0.0.1:"),
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn allowed_by_ip_entry_and_by_ip_literal() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let _dns = dns_with("api.test", &[ip("192.0.2.10")], 60).await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = "allowlist:\n- {address: 192.0.2.10, port: 443}\n";
        {
            let _proxy = start_proxy(&dir, yaml, "api.test", &[]).await;
            assert_eq!(round_trip(b"by-name").await, b"by-name");
        }
        let _proxy = start_proxy(&dir, yaml, "192.0.2.10", &[]).await;
        assert_eq!(round_trip(b"by-literal").await, b"by-literal");
        assert_eq!(up.accepted(), 2);
    });
}

#[test]
fn allowed_by_another_entrys_current_resolution() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("192.0.2.66"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let wrong = echo_server("192.0.2.66:443".parse().unwrap()).await;
        let dns = dns_with("alias.test", &[ip("192.0.2.10")], 1).await;
        dns.set("real.test", &[ip("192.0.2.10")], 1);
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(
            &dir,
            "allowlist:\n- {address: real.test, port: 443}\n",
            "alias.test",
            &[],
        )
        .await;
        assert_eq!(round_trip(b"one").await, b"one");

        // alias.test moves away from real.test's address: no longer vouched for.
        dns.set("alias.test", &[ip("192.0.2.66")], 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            round_trip(b"two").await,
            b"",
            "denied: closed without a reply"
        );
        assert_eq!(up.accepted(), 1);
        assert_eq!(
            wrong.accepted(),
            0,
            "the proxy connected to a non-allowlisted address"
        );
        assert!(
            proxy
                .wait_for_log("no allowlist entry allows it", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn not_allowlisted_remote_exits_2_naming_the_entries() {
    run_in_netns(|| async {
        let _dns = dns_with("other.test", &[ip("192.0.2.10")], 60).await;
        let dir = tempfile::tempdir().unwrap();
        let config = common::write_allowlist(
            &dir,
            "allowlist:\n- {address: api.test, port: 443}\n- {address: api.test, port: 8443}\n",
        );
        let out = common::proxy::run_to_exit(
            &[
                LISTEN,
                "other.test",
                "443",
                "--config",
                &config,
                "--nameserver",
                DNS_ADDR,
            ],
            Duration::from_secs(20),
        );
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains("other.test:443 is not allowed"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("api.test:443"),
            "names the entries with that port: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("api.test:8443"), "{}", out.stderr);
        assert!(out.stderr.contains(&config), "{}", out.stderr);
    });
}

#[test]
fn answer_changed_after_ttl_to_unlisted_address_is_denied() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("198.51.100.20"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let wrong = echo_server("198.51.100.20:443".parse().unwrap()).await;
        let dns = dns_with("api.test", &[ip("192.0.2.10")], 1).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(
            &dir,
            "allowlist:\n- {address: 192.0.2.0/24, port: 443}\n",
            "api.test",
            &[],
        )
        .await;
        assert_eq!(round_trip(b"before").await, b"before");

        dns.set("api.test", &[ip("198.51.100.20")], 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(round_trip(b"after").await, b"");
        assert_eq!(
            wrong.accepted(),
            0,
            "the proxy connected to the changed, unlisted address"
        );
        assert!(
            dns.queries("api.test") >= 2,
            "the TTL expiry caused a new lookup"
        );
        assert!(
            proxy
                .wait_for_log("198.51.100.20 denied", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );

        // Still serving: the answer changes back and connections work again.
        dns.set("api.test", &[ip("192.0.2.10")], 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(round_trip(b"again").await, b"again");
        assert_eq!(up.accepted(), 2);
    });
}

/// An answer pointing an allowlisted name at a special address is denied, even though the name
/// itself is allowlisted, and a listener on that address proves no connect happened.
fn special_answer_is_denied(special: &str, listen_on: &str, kind_in_log: &str) {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let special_ip = ip(special);
        if !special_ip.is_loopback() {
            add_lo_addr(special_ip);
        }
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let trap = echo_server(listen_on.parse().unwrap()).await;
        let dns = dns_with("api.test", &[ip("192.0.2.10")], 1).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(
            &dir,
            "allowlist:\n- {address: api.test, port: 443}\n",
            "api.test",
            &[],
        )
        .await;
        assert_eq!(round_trip(b"ok").await, b"ok");

        dns.set("api.test", &[special_ip], 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(round_trip(b"steal").await, b"");
        assert_eq!(trap.accepted(), 0, "the proxy connected to {special}");
        assert_eq!(up.accepted(), 1);
        assert!(
            proxy
                .wait_for_log(kind_in_log, Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
        // The reason also appears in an earlier DEBUG line: wait for the WARN line itself.
        assert!(
            proxy.wait_for_log("WARN", Duration::from_secs(5)).await,
            "denials are logged at WARN:\n{}",
            proxy.logs()
        );
    });
}

#[test]
fn answer_changed_to_instance_metadata_is_denied() {
    special_answer_is_denied(
        "169.254.169.254",
        "169.254.169.254:443",
        "instance metadata service address",
    );
}

#[test]
fn answer_changed_to_loopback_is_denied() {
    special_answer_is_denied("127.0.0.1", "127.0.0.1:443", "loopback address");
}

#[test]
fn answer_changed_to_ipv4_mapped_metadata_is_denied() {
    // The IPv6 form of the metadata address; a proxy that connects to it reaches the IPv4 listener.
    special_answer_is_denied(
        "::ffff:169.254.169.254",
        "169.254.169.254:443",
        "instance metadata service address",
    );
}

#[test]
fn explicit_ip_entry_allows_loopback() {
    run_in_netns(|| async {
        let up = echo_server("127.0.0.2:443".parse().unwrap()).await;
        let _dns = dns_with("local.test", &[ip("127.0.0.2")], 60).await;
        let dir = tempfile::tempdir().unwrap();
        let _proxy = start_proxy(
            &dir,
            "allowlist:\n- {address: local.test, port: 443}\n- {address: 127.0.0.2, port: 443}\n",
            "local.test",
            &[],
        )
        .await;
        assert_eq!(round_trip(b"loop").await, b"loop");
        assert_eq!(up.accepted(), 1);
    });
}

#[test]
fn dns_down_closes_the_connection_and_recovers() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let mut dns = dns_with("api.test", &[ip("192.0.2.10")], 1).await;
        let dir = tempfile::tempdir().unwrap();
        let mut proxy = start_proxy(
            &dir,
            "allowlist:\n- {address: api.test, port: 443}\n",
            "api.test",
            &[],
        )
        .await;
        assert_eq!(round_trip(b"up").await, b"up");

        dns.stop().await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(round_trip(b"down").await, b"");
        assert!(
            proxy
                .wait_for_log("DNS lookup of api.test failed", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
        assert!(proxy.is_running(), "a DNS failure must not stop the daemon");

        dns.restart().await;
        assert_eq!(round_trip(b"recovered").await, b"recovered");
        assert_eq!(up.accepted(), 2);
    });
}

#[test]
fn dns_down_at_start_does_not_stop_a_name_allowlisted_remote() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        // No DNS server yet: the proxy must still start.
        let mut proxy = start_proxy(
            &dir,
            "allowlist:\n- {address: api.test, port: 443}\n",
            "api.test",
            &[],
        )
        .await;
        assert_eq!(round_trip(b"x").await, b"");
        assert!(proxy.is_running());
        let _dns = dns_with("api.test", &[ip("192.0.2.10")], 60).await;
        assert_eq!(round_trip(b"later").await, b"later");
    });
}

#[test]
fn first_address_refusing_falls_through_to_the_next() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("192.0.2.11"));
        // Nothing listens on 192.0.2.10:443, so it refuses.
        let up = echo_server("192.0.2.11:443".parse().unwrap()).await;
        let _dns = dns_with("api.test", &[ip("192.0.2.10"), ip("192.0.2.11")], 60).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(
            &dir,
            "allowlist:\n- {address: api.test, port: 443}\n",
            "api.test",
            &[],
        )
        .await;
        assert_eq!(round_trip(b"second").await, b"second");
        assert_eq!(up.accepted(), 1);
        assert!(
            proxy
                .wait_for_log("upstream=192.0.2.11:443", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn all_addresses_failing_closes_and_keeps_serving() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _dns = dns_with("api.test", &[ip("192.0.2.10")], 60).await;
        let dir = tempfile::tempdir().unwrap();
        let mut proxy = start_proxy(
            &dir,
            "allowlist:\n- {address: api.test, port: 443}\n",
            "api.test",
            &[],
        )
        .await;
        assert_eq!(round_trip(b"nobody home").await, b"");
        assert!(
            proxy
                .wait_for_log("every allowed address failed", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
        let _up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        assert_eq!(round_trip(b"home").await, b"home");
        assert!(proxy.is_running());
    });
}

#[test]
fn address_family_order_and_selection() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("2001:db8::10"));
        let v4 = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let v6 = echo_server("[2001:db8::10]:443".parse().unwrap()).await;
        let _dns = dns_with("api.test", &[ip("2001:db8::10"), ip("192.0.2.10")], 60).await;
        let dir = tempfile::tempdir().unwrap();
        let yaml = "allowlist:\n- {address: api.test, port: 443}\n";
        {
            // Default: IPv4 first, whatever order the answers came in.
            let _proxy = start_proxy(&dir, yaml, "api.test", &[]).await;
            assert_eq!(round_trip(b"default").await, b"default");
            assert_eq!((v4.accepted(), v6.accepted()), (1, 0));
        }
        {
            let proxy = start_proxy(&dir, yaml, "api.test", &["-6"]).await;
            assert_eq!(round_trip(b"six").await, b"six");
            assert_eq!((v4.accepted(), v6.accepted()), (1, 1));
            assert!(
                proxy
                    .wait_for_log("upstream=[2001:db8::10]:443", Duration::from_secs(5))
                    .await,
                "{}",
                proxy.logs()
            );
        }
        let _proxy = start_proxy(&dir, yaml, "api.test", &["--ipv4"]).await;
        assert_eq!(round_trip(b"four").await, b"four");
        assert_eq!((v4.accepted(), v6.accepted()), (2, 1));
    });
}

/// With the system configuration, a name in /etc/hosts is answered from that file alone: no DNS
/// query (not even for the IPv6 address the file does not list), as glibc does.
#[test]
fn hosts_file_names_are_not_sent_to_dns() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        // The system resolver's server: it knows other.test only, and counts what it is asked.
        let dns = dns_with("other.test", &[ip("192.0.2.10")], 60).await;
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n192.0.2.10 api.test\n").unwrap();
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
        let config =
            common::write_allowlist(&dir, "allowlist:\n- {address: api.test, port: 443}\n");
        let proxy = Proxy::spawn_with_bind_mounts(
            &[LISTEN, "api.test", "443", "--config", &config],
            &[(&hosts, "/etc/hosts"), (&resolv, "/etc/resolv.conf")],
        );
        proxy.wait_ready(LISTEN).await;
        assert_eq!(round_trip(b"from hosts").await, b"from hosts");
        assert_eq!(up.accepted(), 1);
        assert_eq!(
            dns.queries("api.test"),
            0,
            "api.test is in /etc/hosts: DNS must not be asked"
        );

        // A name not in the file goes to DNS as usual.
        drop(proxy);
        let proxy = Proxy::spawn_with_bind_mounts(
            &[
                LISTEN,
                "other.test",
                "443",
                "--config",
                &common::write_allowlist(&dir, "allowlist:\n- {address: other.test, port: 443}\n"),
            ],
            &[(&hosts, "/etc/hosts"), (&resolv, "/etc/resolv.conf")],
        );
        proxy.wait_ready(LISTEN).await;
        assert_eq!(round_trip(b"from dns").await, b"from dns");
        assert!(dns.queries("other.test") >= 1);
    });
}
