//! The data path through the real binary: half-close, large transfers, concurrency, limits,
//! idle timeout, the unix stand-in and a clean stop. Each test has its own network namespace.
//! The byte-moving tests run on both relay paths: `_splice` (`--relay auto`, the default) and
//! `_copy` (`--relay copy`), and one runs the splice path out of descriptors for pipes.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, Proxy};
use common::upstream::{
    echo_server, receive_hashed, response_server, send_pattern, sink_source_server,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LISTEN: &str = "tcp:127.0.0.1:8001";
const UPSTREAM: &str = "192.0.2.10:443";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A proxy to 192.0.2.10:443 (an IP literal: these tests are about bytes, not DNS).
async fn start_proxy(dir: &tempfile::TempDir, listen: &str, extra: &[&str]) -> Proxy {
    add_lo_addr(ip("192.0.2.10"));
    let config = common::write_allowlist(dir, common::UPSTREAM_ALLOWLIST);
    let mut args: Vec<String> = vec![
        listen.into(),
        "192.0.2.10".into(),
        "443".into(),
        "--config".into(),
        config,
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let proxy = Proxy::spawn(&args);
    proxy.wait_ready(listen).await;
    proxy
}

#[test]
fn half_close_request_response_completes_splice() {
    half_close_request_response_completes("auto");
}

#[test]
fn half_close_request_response_completes_copy() {
    half_close_request_response_completes("copy");
}

fn half_close_request_response_completes(relay: &'static str) {
    run_in_netns(|| async move {
        let dir = tempfile::tempdir().unwrap();
        let _proxy = start_proxy(&dir, LISTEN, &["--relay", relay]).await;
        let up = response_server(UPSTREAM.parse().unwrap(), b"the whole response".to_vec()).await;
        let mut conn = connect(LISTEN).await;
        conn.write_all(b"GET /ip-ranges.json").await.unwrap();
        // The server answers only after it sees our EOF: the half-close must be passed on.
        conn.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply))
            .await
            .expect("no reply after a half-close")
            .unwrap();
        assert_eq!(reply, b"the whole response");
        assert_eq!(up.accepted(), 1);
    });
}

#[test]
fn sixty_four_mib_each_way_at_once_arrive_intact_splice() {
    sixty_four_mib_each_way_at_once_arrive_intact("auto");
}

#[test]
fn sixty_four_mib_each_way_at_once_arrive_intact_copy() {
    sixty_four_mib_each_way_at_once_arrive_intact("copy");
}

fn sixty_four_mib_each_way_at_once_arrive_intact(relay: &'static str) {
    run_in_netns(|| async move {
        const SIZE: usize = 64 * 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(&dir, LISTEN, &["--relay", relay]).await;
        let up = sink_source_server(UPSTREAM.parse().unwrap(), SIZE).await;
        let conn = connect(LISTEN).await;
        let (rd, wr) = tokio::io::split(conn);

        let sender = tokio::spawn(send_pattern(wr, 0xC11E_4700, SIZE, None));
        let receiver = tokio::spawn(receive_hashed(rd, None));
        let sent_hash = tokio::time::timeout(Duration::from_secs(120), sender)
            .await
            .unwrap()
            .unwrap();
        let (received, received_hash) = tokio::time::timeout(Duration::from_secs(120), receiver)
            .await
            .unwrap()
            .unwrap();
        let upstream = up.wait_result(Duration::from_secs(120)).await;

        assert_eq!(upstream.received, SIZE as u64, "bytes to upstream");
        assert_eq!(
            upstream.received_sha256, sent_hash,
            "upstream got different bytes"
        );
        assert_eq!(received, SIZE, "bytes to client");
        assert_eq!(
            received_hash, upstream.sent_sha256,
            "client got different bytes"
        );
        assert!(
            proxy
                .wait_for_log(
                    &format!("bytes_to_upstream={SIZE} bytes_to_client={SIZE}"),
                    Duration::from_secs(5)
                )
                .await,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn five_hundred_concurrent_connections() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(&dir, LISTEN, &[]).await;
        let up = echo_server(UPSTREAM.parse().unwrap()).await;
        // All 500 are open at the same time: each writes, waits for every other to be connected,
        // then reads its echo.
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(500));
        let mut tasks = Vec::new();
        for i in 0..500u32 {
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                // Each step names itself: a failure under a loaded CI machine must say which
                // connection failed where, not just that one did.
                let step = |what: &'static str| {
                    move |e: std::io::Error| format!("connection {i}: {what}: {e}")
                };
                let msg = format!("connection {i} says hello");
                let mut buf = vec![0u8; msg.len()];
                let opened = async {
                    let mut conn = common::proxy::try_connect(LISTEN)
                        .await
                        .map_err(step("connect"))?;
                    conn.write_all(msg.as_bytes())
                        .await
                        .map_err(step("write"))?;
                    conn.read_exact(&mut buf)
                        .await
                        .map_err(step("read the echo"))?;
                    Ok::<_, String>(conn)
                }
                .await;
                // Every task reaches the barrier, failed or not, so one failure cannot hang
                // the other 499.
                barrier.wait().await;
                let mut conn = opened?;
                conn.shutdown().await.map_err(step("half-close"))?;
                let mut rest = Vec::new();
                conn.read_to_end(&mut rest)
                    .await
                    .map_err(step("read to EOF"))?;
                if !rest.is_empty() || buf != msg.as_bytes() {
                    return Err(format!("connection {i}: echo {buf:?} then {rest:?}"));
                }
                Ok::<(), String>(())
            }));
        }
        let mut failures = Vec::new();
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(60), t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(failure))) => failures.push(failure),
                Ok(Err(panic)) => failures.push(format!("a task panicked: {panic}")),
                Err(_) => failures.push("a connection hung for 60 s".to_string()),
            }
        }
        assert!(
            failures.is_empty(),
            "{} of 500 connections failed (upstream accepted {}): {failures:#?}",
            failures.len(),
            up.accepted()
        );
        assert_eq!(up.accepted(), 500);
        let closed = || proxy.logs().matches("connection closed").count();
        // Generous: the last log lines trail the last echo, and the whole suite runs at once.
        for _ in 0..400 {
            if closed() == 500 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(closed(), 500, "one log line per connection");
        assert!(
            !proxy.logs().contains("connection refused"),
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn connection_limit_closes_excess_at_once_and_recovers() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(&dir, LISTEN, &["--max-connections", "2"]).await;
        let up = echo_server(UPSTREAM.parse().unwrap()).await;
        let mut held = Vec::new();
        for i in 0..2u8 {
            let mut c = connect(LISTEN).await;
            c.write_all(&[i]).await.unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.unwrap();
            held.push(c);
        }
        // Excess connections are closed, not queued: EOF (or a reset) instead of a hang.
        for _ in 0..5 {
            let mut c = connect(LISTEN).await;
            let mut buf = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await;
            assert!(r.is_ok(), "an excess connection was left hanging");
            assert!(buf.is_empty());
        }
        assert_eq!(up.accepted(), 2);
        assert!(
            proxy
                .wait_for_log("connection limit reached", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
        let warnings = proxy.logs().matches("connection limit reached").count();
        assert!(
            warnings <= 2,
            "over-limit warnings are rate limited, got {warnings}"
        );

        // Freeing a slot lets a new connection through.
        drop(held.pop());
        let mut served = false;
        for _ in 0..50 {
            let mut c = connect(LISTEN).await;
            let _ = c.write_all(b"z").await;
            let mut b = [0u8; 1];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut b)).await
            {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(served, "the service did not continue after the limit");
    });
}

#[test]
fn idle_timeout_closes_a_silent_connection_splice() {
    idle_timeout_closes_a_silent_connection("auto");
}

#[test]
fn idle_timeout_closes_a_silent_connection_copy() {
    idle_timeout_closes_a_silent_connection("copy");
}

fn idle_timeout_closes_a_silent_connection(relay: &'static str) {
    run_in_netns(|| async move {
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(&dir, LISTEN, &["--idle-timeout", "1s", "--relay", relay]).await;
        let _up = echo_server(UPSTREAM.parse().unwrap()).await;
        let mut c = connect(LISTEN).await;
        c.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.unwrap();
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "the idle connection was not closed");
        assert!(
            proxy
                .wait_for_log("end=idle timeout", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn unix_stand_in_listener_relays_splice() {
    unix_stand_in_listener_relays("auto");
}

#[test]
fn unix_stand_in_listener_relays_copy() {
    unix_stand_in_listener_relays("copy");
}

fn unix_stand_in_listener_relays(relay: &'static str) {
    run_in_netns(|| async move {
        let dir = tempfile::tempdir().unwrap();
        let listen = format!("unix:{}", dir.path().join("proxy.sock").display());
        let proxy = start_proxy(&dir, &listen, &["--relay", relay]).await;
        let _up = echo_server(UPSTREAM.parse().unwrap()).await;
        let mut c = connect(&listen).await;
        c.write_all(b"over unix").await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"over unix");
        assert!(
            proxy
                .wait_for_log("peer=unix:", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn sigterm_drains_an_open_connection_then_exits_0() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut proxy = start_proxy(&dir, LISTEN, &[]).await;
        let up = response_server(UPSTREAM.parse().unwrap(), b"late reply".to_vec()).await;
        let mut c = connect(LISTEN).await;
        c.write_all(b"request").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.signal(libc::SIGTERM);
        assert!(
            proxy.wait_for_log("stopping", Duration::from_secs(5)).await,
            "{}",
            proxy.logs()
        );
        // New connections are no longer accepted (the listener closes right after the log line)...
        let refused = common::wait_until(Duration::from_secs(5), || {
            !common::netns::tcp_listening("127.0.0.1:8001".parse().unwrap())
        })
        .await;
        assert!(refused, "the listener stayed open after SIGTERM");
        // ...but the open one still completes.
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"late reply");
        let status = proxy
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("did not exit after SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", proxy.logs());
        assert_eq!(up.accepted(), 1);
    });
}

#[test]
fn sigint_with_nothing_open_exits_0() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let mut proxy = start_proxy(&dir, LISTEN, &[]).await;
        proxy.signal(libc::SIGINT);
        let status = proxy
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("did not exit after SIGINT");
        assert_eq!(status.code(), Some(0), "{}", proxy.logs());
    });
}

#[test]
fn accept_errors_from_emfile_back_off_and_service_continues() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let dir = tempfile::tempdir().unwrap();
        let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
        // Room for the runtime's own descriptors and a few connections, then EMFILE.
        let proxy =
            Proxy::spawn_with_nofile_limit(&[LISTEN, "192.0.2.10", "443", "--config", &config], 32);
        proxy.wait_ready(LISTEN).await;
        let _up = echo_server(UPSTREAM.parse().unwrap()).await;

        let mut held = Vec::new();
        for _ in 0..40 {
            held.push(connect(LISTEN).await);
        }
        assert!(
            proxy
                .wait_for_log("accept failed", Duration::from_secs(10))
                .await,
            "expected EMFILE on accept:\n{}",
            proxy.logs()
        );
        drop(held);
        // Once descriptors are free again, the backlog drains and new connections are served.
        let mut served = false;
        for _ in 0..100 {
            let mut c = connect(LISTEN).await;
            let _ = c.write_all(b"again").await;
            let _ = c.shutdown().await;
            let mut reply = Vec::new();
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut reply)).await
            {
                if reply == b"again" {
                    served = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            served,
            "the proxy stopped serving after EMFILE:\n{}",
            proxy.logs()
        );
        let mut proxy = proxy;
        assert!(proxy.is_running());
        assert!(
            proxy.logs().contains("Too many open files"),
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn json_logs_carry_the_connection_fields() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(&dir, LISTEN, &["--log-format", "json"]).await;
        let _up = echo_server(UPSTREAM.parse().unwrap()).await;
        let mut c = connect(LISTEN).await;
        c.write_all(b"json").await.unwrap();
        c.shutdown().await.unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        assert!(
            proxy
                .wait_for_log("connection closed", Duration::from_secs(5))
                .await
        );
        let line = proxy
            .logs()
            .lines()
            .find(|l| l.contains("connection closed"))
            .unwrap()
            .to_owned();
        for field in [
            "\"level\":\"INFO\"",
            "\"bytes_to_upstream\":4",
            "\"bytes_to_client\":4",
            "\"end\":\"completed\"",
            "\"upstream\":\"192.0.2.10:443\"",
            "\"peer\":\"tcp:127.0.0.1:",
        ] {
            assert!(line.contains(field), "{field} missing in {line}");
        }
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    });
}

/// Lowers a running process's open-file limit (prlimit(2); the tests run as root).
fn set_nofile_limit(pid: u32, limit: u64) {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit on a child process with a valid rlimit; the old value is not wanted.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn open_descriptors(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

#[test]
fn without_descriptors_for_pipes_splice_falls_back_to_copying() {
    run_in_netns(|| async {
        const STREAMS: usize = 8;
        const SIZE: usize = 4 * 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_proxy(&dir, LISTEN, &[]).await;
        let _up = echo_server(UPSTREAM.parse().unwrap()).await;
        // Room for every stream's two sockets and one pipe more: the rest of the 16 bursts
        // moving at once cannot have a pipe.
        let base = open_descriptors(proxy.pid());
        set_nofile_limit(proxy.pid(), base + 2 * STREAMS as u64 + 2);
        let mut conns = Vec::new();
        for _ in 0..STREAMS {
            conns.push(connect(LISTEN).await);
        }
        let transfers = conns.into_iter().enumerate().map(|(i, conn)| async move {
            let data: Vec<u8> = (0..SIZE).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
            let (mut rd, mut wr) = tokio::io::split(conn);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&sent).await.unwrap();
                wr.shutdown().await.unwrap();
            });
            let mut got = Vec::with_capacity(SIZE);
            rd.read_to_end(&mut got).await.unwrap();
            writer.await.unwrap();
            got == data
        });
        let results = tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::future::join_all(transfers),
        )
        .await
        .expect("transfers did not finish");
        assert!(results.iter().all(|ok| *ok), "{results:?} {}", proxy.logs());
        assert!(
            proxy
                .wait_for_log("cannot open a pipe for splice", Duration::from_secs(5))
                .await,
            "{}",
            proxy.logs()
        );
    });
}
