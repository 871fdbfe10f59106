//! Graceful stop through the real binary: a 64 MiB transfer in each direction that is in flight
//! when SIGTERM arrives completes whole (both SHA-256 sums match), the listener closes at once,
//! and the proxy exits 0 once the transfer is done. Runs in its own network namespace.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::netns::{add_lo_addr, run_in_netns, tcp_listening};
use common::proxy::{connect, Proxy};
use common::upstream::{receive_hashed, send_pattern, sink_source_server};

const LISTEN: &str = "tcp:127.0.0.1:8001";
const SIZE: usize = 64 * 1024 * 1024;
/// How much goes each way before SIGTERM.
const BEFORE: usize = 4 * 1024 * 1024;
const WAIT: Duration = Duration::from_secs(120);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn sigterm_during_a_64_mib_transfer_lets_it_complete_then_exits_0() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let dir = tempfile::tempdir().unwrap();
        let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
        // A drain timeout far above the transfer time even on a slow, loaded machine: the test
        // is about completeness, not speed.
        let mut proxy = Proxy::spawn_with_env(
            &[
                LISTEN,
                "192.0.2.10",
                "443",
                "--config",
                &config,
                "--drain-timeout",
                "10m",
            ],
            &[("RUST_LOG", "info")],
        );
        proxy.wait_ready(LISTEN).await;
        let up = sink_source_server("192.0.2.10:443".parse().unwrap(), SIZE).await;
        let conn = connect(LISTEN).await;
        let (rd, wr) = tokio::io::split(conn);

        // The client sends BEFORE bytes, then waits for the go-ahead, then sends the rest.
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let sender = tokio::spawn(send_pattern(wr, 0xC0FFEE, SIZE, Some((BEFORE, go_rx))));
        // The client reads BEFORE bytes, reports that, then reads until EOF.
        let (got_tx, got_rx) = tokio::sync::oneshot::channel::<()>();
        let receiver = tokio::spawn(receive_hashed(rd, Some((BEFORE, got_tx))));
        tokio::time::timeout(WAIT, got_rx)
            .await
            .expect("the first bytes never arrived")
            .unwrap();

        // SIGTERM while the transfer is in flight (the client has not sent everything yet).
        proxy.signal(libc::SIGTERM);
        assert!(
            proxy.wait_for_log("stopping", WAIT).await,
            "{}",
            proxy.logs()
        );
        assert!(
            common::wait_until(Duration::from_secs(10), || !tcp_listening(
                "127.0.0.1:8001".parse().unwrap()
            ))
            .await,
            "the listener stayed open after SIGTERM"
        );
        assert!(
            proxy.is_running(),
            "exited with the transfer in flight:\n{}",
            proxy.logs()
        );
        go_tx.send(()).unwrap();

        let sent_hash = tokio::time::timeout(WAIT, sender).await.unwrap().unwrap();
        let (received, received_hash) =
            tokio::time::timeout(WAIT, receiver).await.unwrap().unwrap();
        let upstream = up.wait_result(WAIT).await;
        assert_eq!(upstream.received, SIZE as u64, "bytes to upstream");
        assert_eq!(
            upstream.received_sha256, sent_hash,
            "upstream got other bytes"
        );
        assert_eq!(received, SIZE, "bytes to client");
        assert_eq!(
            received_hash, upstream.sent_sha256,
            "client got other bytes"
        );

        let status = proxy
            .wait_exit(WAIT)
            .await
            .expect("did not exit after the transfer completed");
        assert_eq!(status.code(), Some(0), "{}", proxy.logs());
        let logs = proxy.logs();
        assert!(
            logs.contains(&format!("bytes_to_upstream={SIZE} bytes_to_client={SIZE}")),
            "{logs}"
        );
        assert!(logs.contains("closed_at_stop=0"), "{logs}");
        assert!(logs.contains("waiting for open connections"), "{logs}");
    });
}
