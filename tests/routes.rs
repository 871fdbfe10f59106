//! Routes through the real binary: one daemon serving every route of `routes:` (and the
//! positional one beside them), each to its own upstream; start-up errors that name the file,
//! the line and the route; `--check-config`; and SIGHUP reloads that add, remove and change
//! routes, or change nothing when the new file is bad. Each test has its own network namespace,
//! upstreams on 192.0.2.x and, where names are used, its own DNS server.

mod common;
mod systemd_support;

use std::net::IpAddr;
use std::time::Duration;

use common::dns::TestDns;
use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, is_listening, run_to_exit, try_connect, Proxy};
use common::upstream::{echo_server, response_server, UpstreamHandle};
use systemd_support::wait_for_count;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);
const A: &str = "tcp:127.0.0.1:8001";
const B: &str = "tcp:127.0.0.1:8002";
const C: &str = "tcp:127.0.0.1:8003";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Response servers "a" on 192.0.2.10:443, "b" on 192.0.2.20:443 and "c" on 192.0.2.30:443.
async fn three_upstreams() -> Vec<UpstreamHandle> {
    let mut servers = Vec::new();
    for (addr, reply) in [
        ("192.0.2.10", "a"),
        ("192.0.2.20", "b"),
        ("192.0.2.30", "c"),
    ] {
        add_lo_addr(ip(addr));
        servers.push(response_server(format!("{addr}:443").parse().unwrap(), reply.into()).await);
    }
    servers
}

const ALLOW_ABC: &str = "allowlist:\n\
     - {address: a.test, port: 443}\n\
     - {address: 192.0.2.20, port: 443}\n\
     - {address: 192.0.2.30, port: 443}\n";

/// Which upstream answered through `listen`.
async fn who_answers(listen: &str) -> String {
    let reply = connect(listen)
        .await
        .round_trip(b"who?", WAIT)
        .await
        .unwrap_or_else(|e| panic!("no answer through {listen}: {e}"));
    String::from_utf8(reply).unwrap()
}

fn proxy_with(config: &str, extra: &[&str]) -> Proxy {
    let mut args = vec!["--config", config, "--nameserver", "127.0.0.1:53"];
    args.extend_from_slice(extra);
    Proxy::spawn(&args)
}

#[test]
fn three_routes_are_served_at_once_each_to_its_own_upstream() {
    run_in_netns(|| async {
        let up = three_upstreams().await;
        let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        dns.set("a.test", &[ip("192.0.2.10")], 60);
        let dir = tempfile::tempdir().unwrap();
        let unix = format!("unix:{}", dir.path().join("c.sock").display());
        let config = common::write_allowlist(
            &dir,
            &format!(
                "{ALLOW_ABC}routes:\n\
                 - listen: {A}\n  remote: a.test:443\n\
                 - listen: {B}\n  remote: 192.0.2.20:443\n  idle_timeout: 10m\n\
                 - {{listen: '{unix}', remote: '192.0.2.30:443', max_connections: 5}}\n"
            ),
        );
        let proxy = proxy_with(&config, &[]);
        for listen in [A, B, unix.as_str()] {
            proxy.wait_ready(listen).await;
        }
        for _ in 0..2 {
            assert_eq!(who_answers(A).await, "a");
            assert_eq!(who_answers(B).await, "b");
            assert_eq!(who_answers(&unix).await, "c");
        }
        assert_eq!(
            up.iter().map(|u| u.accepted()).collect::<Vec<_>>(),
            [2, 2, 2]
        );
        assert!(
            wait_for_count(|| proxy.logs(), "connection closed", 6, WAIT).await,
            "{}",
            proxy.logs()
        );
        let logs = proxy.logs();
        // Every log line of a connection carries its route.
        for (route, upstream) in [(A, "192.0.2.10:443"), (B, "192.0.2.20:443")] {
            assert!(
                logs.contains(&format!("conn{{route={route} id="))
                    && logs.lines().any(|l| l.contains(&format!("route={route} "))
                        && l.contains("connection closed")
                        && l.contains(&format!("upstream={upstream} "))),
                "{route}: {logs}"
            );
        }
        assert!(logs.contains(&format!("conn{{route={unix} id=")), "{logs}");
        assert!(
            logs.contains("routes=3") && logs.contains("idle_timeout=10m"),
            "{logs}"
        );
    });
}

#[test]
fn the_positional_route_is_served_beside_the_files_routes() {
    run_in_netns(|| async {
        let _up = three_upstreams().await;
        let dir = tempfile::tempdir().unwrap();
        let config = common::write_allowlist(
            &dir,
            &format!("{ALLOW_ABC}routes:\n- {{listen: '{B}', remote: '192.0.2.20:443'}}\n"),
        );
        let proxy = Proxy::spawn(&[A, "192.0.2.30", "443", "--config", &config]);
        proxy.wait_ready(A).await;
        proxy.wait_ready(B).await;
        assert_eq!(who_answers(A).await, "c");
        assert_eq!(who_answers(B).await, "b");

        // The positional route on a listen address of the file is an error.
        let out = run_to_exit(&[B, "192.0.2.30", "443", "--config", &config], WAIT);
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains(&config)
                && out.stderr.contains("routes[0], line 6")
                && out.stderr.contains("tcp:127.0.0.1:8002 is already LISTEN"),
            "{}",
            out.stderr
        );
    });
}

#[test]
fn start_up_refuses_bad_routes_naming_the_file_line_and_route() {
    run_in_netns(|| async {
        // a.test's current address could vouch for an IP remote, so the check asks DNS.
        let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        dns.set("a.test", &[ip("192.0.2.10")], 60);
        let dir = tempfile::tempdir().unwrap();
        let run = |yaml: &str, extra: &[&str]| {
            let config = common::write_allowlist(&dir, yaml);
            let mut args = vec!["--config", config.as_str(), "--nameserver", "127.0.0.1:53"];
            args.extend_from_slice(extra);
            let out = run_to_exit(&args, WAIT);
            assert_eq!(out.status.code(), Some(2), "{yaml}: {}", out.stderr);
            assert!(
                out.stderr.contains(&config),
                "names the file: {}",
                out.stderr
            );
            assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
            assert!(!is_listening(A), "bound despite the error");
            out.stderr
        };
        // A remote the allowlist does not allow: the route, its line and the fix.
        let e = run(
            &format!(
                "{ALLOW_ABC}routes:\n- {{listen: '{A}', remote: 'a.test:443'}}\n\
                 - listen: {B}\n  remote: 192.0.2.99:443\n"
            ),
            &[],
        );
        assert!(
            e.contains("route tcp:127.0.0.1:8002 -> 192.0.2.99:443 (routes[1], line 7)")
                && e.contains("is not allowed by the allowlist")
                && e.contains("Add `- {address: 192.0.2.99, port: 443}`"),
            "{e}"
        );
        assert!(
            !e.contains("route tcp:127.0.0.1:8001"),
            "a.test is fine: {e}"
        );
        // Two routes on one listen address: line, column and key.
        let e = run(
            &format!(
                "{ALLOW_ABC}routes:\n- {{listen: '{A}', remote: 'a.test:443'}}\n\
                 - {{listen: '{A}', remote: '192.0.2.20:443'}}\n"
            ),
            &[],
        );
        assert!(
            e.contains("line 7, column 12")
                && e.contains("routes[1].listen: tcp:127.0.0.1:8001 is already the listen address of routes[0] (line 6)"),
            "{e}"
        );
        // Bad listen syntax, a bad remote, an unknown key: line, column and key.
        for (route, needle, at) in [
            (
                "- {listen: 'udp:1', remote: 'a.test:443'}",
                "routes[0].listen",
                "line 6, column 12",
            ),
            (
                "- {listen: 8000, remote: 'a.test'}",
                "routes[0].remote: remote \"a.test\" has no port",
                "line 6, column 26",
            ),
            (
                "- {listen: 8000, remote: 'a.test:443', moed: sni}",
                "unknown field `moed`",
                "line 6",
            ),
        ] {
            let e = run(&format!("{ALLOW_ABC}routes:\n{route}\n"), &[]);
            assert!(e.contains(needle) && e.contains(at), "{route}: {e}");
        }
        // No route anywhere says how to give one.
        let e = run(ALLOW_ABC, &[]);
        assert!(
            e.contains("no route to serve")
                && e.contains("LISTEN REMOTE_ADDR REMOTE_PORT")
                && e.contains("routes:"),
            "{e}"
        );
    });
}

/// `nitro-vsock-proxy [positional] --config CONFIG --check-config --nameserver 127.0.0.1:53`.
fn check_config(config: &str, positional: &[&str]) -> common::proxy::Exit {
    let mut args = positional.to_vec();
    args.extend([
        "--config",
        config,
        "--check-config",
        "--nameserver",
        "127.0.0.1:53",
    ]);
    run_to_exit(&args, WAIT)
}

#[test]
fn check_config_prints_routes_and_the_entries_they_rely_on() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let good = format!(
            "{ALLOW_ABC}- {{address: 'api.test', port: 8443}}\n\
             routes:\n- {{listen: '{A}', remote: 'a.test:443', max_connections: 7}}\n\
             - {{listen: 8000, remote: '192.0.2.20:443'}}\n"
        );
        let config = common::write_allowlist(&dir, &good);
        // No DNS server runs: name-allowed and IP-allowed routes need none. vsock:8000 and
        // tcp:127.0.0.1:8001 are not bound (the check binds nothing).
        let out = check_config(&config, &[C, "192.0.2.30", "443"]);
        assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
        let expected = format!(
            "{config}: 3 routes, 4 allowlist entries\n\
             route tcp:127.0.0.1:8003 -> 192.0.2.30:443 (LISTEN REMOTE_ADDR REMOTE_PORT on the command line)\n\
             \x20 allowed by 192.0.2.30:443 (allowlist[2], line 4)\n\
             route tcp:127.0.0.1:8001 -> a.test:443 (routes[0], line 7, max_connections 7)\n\
             \x20 allowed by a.test:443 (allowlist[0], line 2)\n\
             route vsock:8000 -> 192.0.2.20:443 (routes[1], line 8)\n\
             \x20 allowed by 192.0.2.20:443 (allowlist[1], line 3)\n\
             {config}: configuration OK\n"
        );
        assert_eq!(out.stdout, expected, "stderr: {}", out.stderr);

        // From here on a DNS server answers: a.test's address could vouch for an IP remote.
        let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        dns.set("a.test", &[ip("192.0.2.10")], 60);
        // A bad file: exit 2, the route that is not allowed named.
        let bad = good.replace("remote: '192.0.2.20:443'", "remote: '192.0.2.99:443'");
        let config = common::write_allowlist(&dir, &bad);
        let out = check_config(&config, &[]);
        assert_eq!(out.status.code(), Some(2), "{}", out.stdout);
        assert!(
            out.stdout.contains(
                "route vsock:8000 -> 192.0.2.99:443 (routes[1], line 8)\n  NOT ALLOWED\n"
            ) && out
                .stdout
                .ends_with("configuration NOT OK: 1 route not allowed or not checked\n"),
            "{}",
            out.stdout
        );
        assert!(
            out.stderr.contains("192.0.2.99:443 is not allowed"),
            "{}",
            out.stderr
        );
        // A file that does not parse: exit 2 with the line.
        let config =
            common::write_allowlist(&dir, &format!("{ALLOW_ABC}routes:\n- {{listen: 8000}}\n"));
        let out = check_config(&config, &[]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            out.stderr.contains("a route needs `remote: HOST:PORT`")
                && out.stderr.contains("line 6"),
            "{}",
            out.stderr
        );

        // A route only DNS can vouch for (an IP allowed as a name's current address).
        dns.set("api.test", &[ip("192.0.2.40")], 60);
        let config = common::write_allowlist(
            &dir,
            "allowlist:\n- {address: api.test, port: 8443}\nroutes:\n- {listen: 8000, remote: '192.0.2.40:8443'}\n",
        );
        let out = check_config(&config, &[]);
        assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
        assert!(
            out.stdout.contains("  allowed through the current DNS answers of api.test:8443 (allowlist[0], line 2)\n"),
            "{}",
            out.stdout
        );
    });
}

#[test]
fn a_route_limit_closes_its_excess_connections_and_leaves_other_routes_alone() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _echo = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let config = common::write_allowlist(
            &dir,
            &format!(
                "{}routes:\n- {{listen: '{A}', remote: '192.0.2.10:443', max_connections: 1}}\n\
                 - {{listen: '{B}', remote: '192.0.2.10:443'}}\n",
                common::UPSTREAM_ALLOWLIST
            ),
        );
        let proxy = proxy_with(&config, &[]);
        proxy.wait_ready(A).await;
        proxy.wait_ready(B).await;
        let mut held = connect(A).await;
        held.write_all(b"hold").await.unwrap();
        let mut echoed = [0u8; 4];
        tokio::time::timeout(WAIT, held.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        // The second connection on route A is closed at once; route B still serves.
        let mut excess = connect(A).await;
        assert_eq!(excess.read_to_eof(WAIT).await.unwrap_or_default(), b"");
        assert!(
            proxy
                .wait_for_log(
                    "connection limit reached (the route's max_connections (1))",
                    WAIT
                )
                .await,
            "{}",
            proxy.logs()
        );
        let mut b = connect(B).await;
        assert_eq!(b.round_trip(b"b works", WAIT).await.unwrap(), b"b works");
        // When the held one ends, the slot is free again.
        assert_eq!(held.round_trip(b"", WAIT).await.unwrap(), b"");
        assert!(
            common::wait_until(WAIT, || proxy
                .logs()
                .matches("route=tcp:127.0.0.1:8001 id=1 ")
                .count()
                > 0
                && proxy.logs().contains("id=1 peer=")
                && proxy
                    .logs()
                    .lines()
                    .any(|l| l.contains("id=1 ") && l.contains("connection closed")))
            .await
        );
        let mut again = connect(A).await;
        assert_eq!(again.round_trip(b"again", WAIT).await.unwrap(), b"again");
    });
}

async fn reload(proxy: &Proxy, config: &str, yaml: &str, outcome: &str, nth: usize) {
    proxy
        .reload_with(std::path::Path::new(config), yaml, outcome, nth)
        .await;
}

#[test]
fn reload_adds_removes_and_changes_routes_and_a_bad_file_changes_nothing() {
    run_in_netns(|| async {
        let up = three_upstreams().await;
        let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        dns.set("a.test", &[ip("192.0.2.10")], 60);
        add_lo_addr(ip("192.0.2.50"));
        let echo = echo_server("192.0.2.50:443".parse().unwrap()).await;
        let allow = format!(
            "{ALLOW_ABC}- {{address: 192.0.2.10, port: 443}}\n- {{address: 192.0.2.50, port: 443}}\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let first = format!(
            "{allow}routes:\n- {{listen: '{A}', remote: '192.0.2.10:443'}}\n\
             - {{listen: '{B}', remote: '192.0.2.50:443'}}\n"
        );
        let config = common::write_allowlist(&dir, &first);
        let proxy = proxy_with(&config, &["--drain-timeout", "30s"]);
        proxy.wait_ready(A).await;
        proxy.wait_ready(B).await;
        assert_eq!(who_answers(A).await, "a");

        // An open connection on B, which the reload removes.
        let mut open = connect(B).await;
        open.write_all(b"before ").await.unwrap();
        let mut got = [0u8; 7];
        tokio::time::timeout(WAIT, open.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo.accepted(), 1);

        // Adds C, removes B, changes A's remote to b's upstream.
        let second = format!(
            "{allow}routes:\n- {{listen: '{A}', remote: '192.0.2.20:443'}}\n\
             - {{listen: '{C}', remote: '192.0.2.30:443'}}\n"
        );
        reload(&proxy, &config, &second, "allowlist reloaded", 1).await;
        assert!(
            proxy
                .logs()
                .contains("2 routes: 1 added, 1 removed, 1 changed, 0 unchanged"),
            "{}",
            proxy.logs()
        );
        proxy.wait_ready(C).await;
        assert_eq!(who_answers(C).await, "c");
        assert_eq!(
            who_answers(A).await,
            "b",
            "a changed route applies to new connections"
        );
        assert!(!is_listening(B), "a removed route stops listening");
        assert!(try_connect(B).await.is_err(), "a removed route refuses");
        // ...but its open connection finishes.
        assert_eq!(
            open.round_trip(b"after", WAIT).await.unwrap(),
            b"after",
            "{}",
            proxy.logs()
        );
        assert!(
            proxy
                .wait_for_log("route removed route=tcp:127.0.0.1:8002", WAIT)
                .await,
            "{}",
            proxy.logs()
        );

        // Bad files change nothing: unparsable, a duplicate listen, a route not allowed, a
        // route that cannot be served at all.
        for (n, bad) in [
            format!("{allow}routes:\n- {{listen: '{A}', remote: '192.0.2.20:443x'}}\n"),
            format!("{allow}routes:\n- {{listen: '{A}', remote: '192.0.2.20:443'}}\n- {{listen: '{A}', remote: '192.0.2.30:443'}}\n"),
            format!("{allow}routes:\n- {{listen: '{A}', remote: '192.0.2.99:443'}}\n"),
            allow.clone(),
        ]
        .iter()
        .enumerate()
        {
            reload(&proxy, &config, bad, "reload failed", n + 1).await;
            assert_eq!(who_answers(A).await, "b", "{bad}");
            assert_eq!(who_answers(C).await, "c", "{bad}");
            assert!(!is_listening(B));
        }
        let logs = proxy.logs();
        assert!(logs.contains("ERROR") && logs.contains(&config), "{logs}");
        assert!(logs.contains("192.0.2.99:443 is not allowed"), "{logs}");

        // A new route whose address cannot be bound is logged at ERROR; the rest applies.
        let _squatter = std::net::TcpListener::bind("127.0.0.1:8004").unwrap();
        let third = format!(
            "{allow}routes:\n- {{listen: '{A}', remote: '192.0.2.10:443'}}\n\
             - {{listen: '{C}', remote: '192.0.2.30:443'}}\n\
             - {{listen: 'tcp:127.0.0.1:8004', remote: '192.0.2.20:443'}}\n"
        );
        reload(&proxy, &config, &third, "allowlist reloaded", 2).await;
        let logs = proxy.logs();
        assert!(
            logs.lines().any(|l| l.contains("ERROR")
                && l.contains("new route not served: cannot listen on tcp:127.0.0.1:8004")
                && l.contains("Address already in use")),
            "{logs}"
        );
        assert_eq!(who_answers(A).await, "a");
        assert_eq!(up[0].accepted(), 2);
        let mut proxy = proxy;
        assert!(proxy.is_running());
    });
}

#[test]
fn a_removed_route_that_does_not_finish_is_closed_after_the_drain_timeout() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _echo = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let routes = |with_b: bool| {
            let mut yaml = format!(
                "{}routes:\n- {{listen: '{A}', remote: '192.0.2.10:443'}}\n",
                common::UPSTREAM_ALLOWLIST
            );
            if with_b {
                yaml.push_str(&format!("- {{listen: '{B}', remote: '192.0.2.10:443'}}\n"));
            }
            yaml
        };
        let config = common::write_allowlist(&dir, &routes(true));
        let proxy = proxy_with(&config, &["--drain-timeout", "1s"]);
        proxy.wait_ready(B).await;
        let mut stuck = connect(B).await;
        stuck.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        tokio::time::timeout(WAIT, stuck.read_exact(&mut one))
            .await
            .unwrap()
            .unwrap();
        reload(&proxy, &config, &routes(false), "allowlist reloaded", 1).await;
        // The connection is closed by the proxy once the drain time is up.
        assert_eq!(stuck.read_to_eof(WAIT).await.unwrap_or_default(), b"");
        assert!(
            proxy
                .wait_for_log("drain timeout reached for a removed route", WAIT)
                .await,
            "{}",
            proxy.logs()
        );
        assert_eq!(who_answers_echo(A).await, b"still");
    });
}

async fn who_answers_echo(listen: &str) -> Vec<u8> {
    connect(listen)
        .await
        .round_trip(b"still", WAIT)
        .await
        .unwrap()
}
