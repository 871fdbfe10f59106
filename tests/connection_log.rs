//! A connection's log lines at the level operators run (`RUST_LOG=info`), through the real
//! binary: one close line per relayed connection carrying every field itself (route, id, peer,
//! enclave, upstream, bytes each way, duration, how it ended) and written outside any span,
//! because at INFO a relayed connection makes none; a refusal still names its connection in a
//! `conn{...}` span made for that line; the same lines as journal entries keep every field
//! (`NVP_*`); and at `debug` the connection's set-up lines are written inside its span.
//! Runs in its own network namespace.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, Proxy};
use common::upstream::echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FIXED: &str = "tcp:127.0.0.1:8001";
const CONNECT: &str = "tcp:127.0.0.1:8002";
const WAIT: Duration = Duration::from_secs(20);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn config(dir: &tempfile::TempDir) -> String {
    common::write_allowlist(
        dir,
        &format!(
            "allowlist:\n- {{address: 192.0.2.10, port: 443}}\n\
             routes:\n\
             - {{listen: '{FIXED}', remote: '192.0.2.10:443'}}\n\
             - {{listen: '{CONNECT}', mode: connect}}\n"
        ),
    )
}

/// Sends `CONNECT target` and returns the status code.
async fn connect_status(target: &str) -> u16 {
    let mut s = connect(CONNECT).await;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(WAIT, async {
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) => head.push(byte[0]),
            }
        }
    })
    .await
    .expect("no answer to CONNECT in time");
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"))
}

/// One relayed connection through the fixed route: 4 bytes there and back, then closed.
async fn echo_once() {
    let mut conn = connect(FIXED).await;
    let reply = conn.round_trip(b"ping", WAIT).await.unwrap();
    assert_eq!(reply, b"ping");
}

async fn wait_line(proxy: &Proxy, needles: &[&str]) -> String {
    let found = common::wait_until(WAIT, || {
        proxy
            .logs()
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
    })
    .await;
    assert!(found, "no line with {needles:?}:\n{}", proxy.logs());
    proxy
        .logs()
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap()
        .to_owned()
}

#[test]
fn at_info_a_relayed_connection_is_one_line_with_every_field_and_no_span() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = Proxy::spawn_with_env(&["--config", &config(&dir)], &[("RUST_LOG", "info")]);
        proxy.wait_ready(FIXED).await;
        proxy.wait_ready(CONNECT).await;

        echo_once().await;
        let closed = wait_line(&proxy, &["connection closed", &format!("route={FIXED} ")]).await;
        for field in [
            "INFO",
            "id=",
            "peer=tcp:127.0.0.1:",
            "enclave=-",
            "upstream=192.0.2.10:443",
            "bytes_to_upstream=4",
            "bytes_to_client=4",
            "duration_ms=",
            "end=",
        ] {
            assert!(closed.contains(field), "{field} missing: {closed}");
        }
        assert!(
            !closed.contains("conn{"),
            "written outside any span: {closed}"
        );
        let lines: Vec<String> = proxy
            .logs()
            .lines()
            .filter(|l| l.contains(&format!("route={FIXED}")) && !l.contains("serving route"))
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 1, "one line per connection: {lines:#?}");

        // A refusal names its connection: the span is made for that line.
        assert_eq!(connect_status("192.0.2.11:443").await, 403);
        let refused = wait_line(&proxy, &["connection refused", "192.0.2.11"]).await;
        assert!(
            refused.contains(&format!("conn{{route={CONNECT} id="))
                && refused.contains(" peer=tcp:127.0.0.1:")
                && refused.contains(" enclave=-}: connection refused"),
            "{refused}"
        );
        assert!(refused.contains("reason=\"denied\""), "{refused}");

        // A tunnel's close line carries the same fields.
        assert_eq!(connect_status("192.0.2.10:443").await, 200);
        let tunnel = wait_line(&proxy, &["connection closed", &format!("route={CONNECT} ")]).await;
        assert!(
            tunnel.contains("upstream=192.0.2.10:443") && tunnel.contains("enclave=-"),
            "{tunnel}"
        );
    });
}

#[test]
fn at_debug_the_set_up_is_written_inside_the_connections_span() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = Proxy::spawn_with_env(&["--config", &config(&dir)], &[("RUST_LOG", "debug")]);
        proxy.wait_ready(FIXED).await;
        echo_once().await;
        let relaying = wait_line(&proxy, &["relaying", &format!("conn{{route={FIXED} id=")]).await;
        assert!(
            relaying.contains("enclave=-") && relaying.contains("upstream=192.0.2.10:443}"),
            "{relaying}"
        );
        let closed = wait_line(&proxy, &["connection closed", &format!("route={FIXED} ")]).await;
        assert!(
            closed.contains("upstream=192.0.2.10:443") && !closed.contains("conn{"),
            "the close line is the same at every level: {closed}"
        );
    });
}
