//! The sd_notify protocol through the real binary, against a fake `NOTIFY_SOCKET`: READY=1 only
//! once the listener is bound, STATUS= with live counters, RELOADING=1 then READY=1 on SIGHUP,
//! STOPPING=1 on SIGTERM, WATCHDOG=1 only when the watchdog is enabled for this process, nothing
//! but a failure STATUS when the configuration is invalid; journal-format logs when standard
//! error is the journal stream (`<N>` lines without a journal socket); and the journal's native
//! protocol with every field as `NVP_<NAME>`, read from a datagram socket standing in for
//! journald's. Each test has its own network namespace.

mod common;
mod systemd_support;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, is_listening, Proxy, PROXY_BIN};
use common::upstream::echo_server;
use systemd_support::{Daemon, NotifySocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LISTEN: &str = "tcp:127.0.0.1:8001";
/// The variable that points the journal format at a socket of the test's own.
const JOURNAL_SOCKET_ENV: &str = "NVP_TEST_JOURNAL_SOCKET";
const WAIT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn args(config: &str) -> Vec<String> {
    [LISTEN, "192.0.2.10", "443", "--config", config]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

async fn echo_once(msg: &[u8]) -> Vec<u8> {
    connect(LISTEN)
        .await
        .round_trip(msg, WAIT)
        .await
        .expect("no reply through the proxy")
}

#[test]
fn ready_after_bind_then_status_reload_and_stopping() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let notify = NotifySocket::bind(dir.path());
        let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
        let mut proxy = Proxy::spawn_with_env(&args(&config), &[("NOTIFY_SOCKET", notify.path())]);

        // READY=1 arrives, and by then the listener is bound.
        let (ready_at, ready) = notify
            .wait_for(WAIT, |m| m.lines().any(|l| l == "READY=1"))
            .await
            .unwrap_or_else(|| panic!("no READY=1: {:?}\n{}", notify.messages(), proxy.logs()));
        assert!(
            is_listening(LISTEN),
            "READY=1 was sent before the listener was bound"
        );
        assert!(
            proxy.logs().contains("listening"),
            "READY=1 before the start-up log line: {}",
            proxy.logs()
        );
        assert!(
            ready.contains(
                "STATUS=1 route: tcp:127.0.0.1:8001 -> 192.0.2.10:443; 0 open, 0 accepted, 0 denied"
            ),
            "{ready}"
        );
        assert_eq!(
            notify.with_line("READY=1").len(),
            1,
            "{:?}",
            notify.messages()
        );

        // Live counters reach STATUS=.
        assert_eq!(echo_once(b"counted").await, b"counted");
        let status = notify
            .wait_for(WAIT, |m| m.contains("STATUS=") && m.contains("1 accepted"))
            .await;
        assert!(
            status.is_some(),
            "no STATUS with the connection counted: {:?}",
            notify.messages()
        );

        // SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
        proxy.signal(libc::SIGHUP);
        let reloading = notify
            .wait_for_line_after(Some(ready_at), "RELOADING=1", WAIT)
            .await
            .unwrap_or_else(|| panic!("no RELOADING=1 after SIGHUP: {:?}", notify.messages()));
        assert!(
            notify.messages()[reloading].contains("MONOTONIC_USEC="),
            "{:?}",
            notify.messages()
        );
        let ready_again = notify
            .wait_for_line_after(Some(reloading), "READY=1", WAIT)
            .await;
        assert!(
            ready_again.is_some(),
            "no READY=1 after the reload: {:?}",
            notify.messages()
        );
        assert!(proxy.is_running(), "SIGHUP must not stop the daemon");

        // SIGTERM: STOPPING=1, then exit 0.
        proxy.signal(libc::SIGTERM);
        let stopping = notify.wait_for_line_after(None, "STOPPING=1", WAIT).await;
        assert!(
            stopping.is_some(),
            "no STOPPING=1 after SIGTERM: {:?}",
            notify.messages()
        );
        let status = proxy
            .wait_exit(WAIT)
            .await
            .expect("did not exit after SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", proxy.logs());

        // Without WatchdogSec (no WATCHDOG_USEC) there are no pings.
        assert!(
            notify.with_line("WATCHDOG=1").is_empty(),
            "{:?}",
            notify.messages()
        );
    });
}

#[test]
fn watchdog_pings_only_when_enabled_for_this_process() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);

        // WATCHDOG_USEC=300ms: a ping at least every 150 ms, from start-up on.
        let notify = NotifySocket::bind(dir.path());
        let proxy = Proxy::spawn_with_env(
            &args(&config),
            &[
                ("NOTIFY_SOCKET", notify.path()),
                ("WATCHDOG_USEC", "300000"),
            ],
        );
        proxy.wait_ready(LISTEN).await;
        let pings = || notify.with_line("WATCHDOG=1").len();
        assert!(
            common::wait_until(WAIT, || pings() >= 5).await,
            "expected repeated WATCHDOG=1: {:?}\n{}",
            notify.messages(),
            proxy.logs()
        );
        drop(proxy);

        // The same, but WATCHDOG_PID names another process: the watchdog is not ours.
        let dir2 = tempfile::tempdir().unwrap();
        let notify = NotifySocket::bind(dir2.path());
        let mut proxy = Proxy::spawn_with_env(
            &args(&config),
            &[
                ("NOTIFY_SOCKET", notify.path()),
                ("WATCHDOG_USEC", "300000"),
                ("WATCHDOG_PID", "1"),
            ],
        );
        proxy.wait_ready(LISTEN).await;
        assert!(
            notify
                .wait_for(WAIT, |m| m.contains("READY=1"))
                .await
                .is_some(),
            "{:?}",
            notify.messages()
        );
        // Long enough for several pings had the watchdog been (wrongly) enabled.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            notify.with_line("WATCHDOG=1").is_empty(),
            "pinged a watchdog meant for another process: {:?}",
            notify.messages()
        );
        proxy.signal(libc::SIGTERM);
        assert_eq!(proxy.wait_exit(WAIT).await.and_then(|s| s.code()), Some(0));
    });
}

#[test]
fn failed_start_up_sends_no_ready_but_a_failure_status() {
    run_in_netns(|| async {
        // An invalid configuration: exit 2.
        let dir = tempfile::tempdir().unwrap();
        let notify = NotifySocket::bind(dir.path());
        let config = dir.path().join("broken.yaml");
        std::fs::write(&config, "allowlist:\n- {address: 192.0.2.10, port: 443x}\n").unwrap();
        let config = config.display().to_string();
        let mut proxy = Proxy::spawn_with_env(&args(&config), &[("NOTIFY_SOCKET", notify.path())]);
        let status = proxy.wait_exit(WAIT).await.expect("did not exit");
        assert_eq!(status.code(), Some(2), "{}", proxy.logs());
        let failed = notify
            .wait_for(WAIT, |m| m.starts_with("STATUS=failed:"))
            .await
            .unwrap_or_else(|| panic!("no failure STATUS: {:?}", notify.messages()))
            .1;
        assert!(
            failed.contains(&config) && failed.contains("line 2"),
            "{failed}"
        );
        assert!(
            notify.with_line("READY=1").is_empty(),
            "READY=1 with an invalid configuration: {:?}",
            notify.messages()
        );

        // A valid configuration but LISTEN cannot be bound: exit 1, and no READY=1 either —
        // READY=1 must wait for the bind, not just for the configuration.
        let dir = tempfile::tempdir().unwrap();
        let notify = NotifySocket::bind(dir.path());
        let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
        let _taken = std::net::TcpListener::bind("127.0.0.1:8001").unwrap();
        let mut proxy = Proxy::spawn_with_env(&args(&config), &[("NOTIFY_SOCKET", notify.path())]);
        let status = proxy.wait_exit(WAIT).await.expect("did not exit");
        assert_eq!(status.code(), Some(1), "{}", proxy.logs());
        let failed = notify
            .wait_for(WAIT, |m| m.starts_with("STATUS=failed:"))
            .await
            .unwrap_or_else(|| panic!("no failure STATUS: {:?}", notify.messages()))
            .1;
        assert!(
            failed.contains("cannot listen on tcp:127.0.0.1:8001"),
            "{failed}"
        );
        assert!(
            notify.with_line("READY=1").is_empty(),
            "READY=1 before the listener was bound: {:?}",
            notify.messages()
        );
    });
}

#[test]
fn journal_stream_on_stderr_selects_priority_prefixed_lines() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
        // Nothing listens on 192.0.2.10:443 here: a connection is not made, with a WARN line
        // (`connection not made: upstream unreachable:`, not `connection refused:`, which is for
        // the policy's refusals).
        add_lo_addr(ip("192.0.2.10"));

        // No journal socket (a path where none is): the entries come as `<N>` lines on stderr.
        let no_socket = dir.path().join("no-journal.socket");
        let mut cmd = Command::new(PROXY_BIN);
        cmd.args(args(&config))
            .env("RUST_LOG", "info")
            .env(JOURNAL_SOCKET_ENV, &no_socket);
        let mut journal = Daemon::spawn(cmd, true);
        assert!(
            journal.wait_for_log("listening", WAIT).await,
            "{}",
            journal.logs()
        );
        // Refused: the proxy closes the connection (EOF or, with unread data, a reset).
        let mut c = connect(LISTEN).await;
        let _ = c.write_all(b"x").await;
        let _ = c.read_to_eof(WAIT).await;
        assert!(
            journal
                .wait_for_log("connection not made: upstream unreachable", WAIT)
                .await,
            "{}",
            journal.logs()
        );
        journal.signal(libc::SIGTERM);
        assert_eq!(
            journal.wait_exit(WAIT).await.and_then(|s| s.code()),
            Some(0)
        );
        let logs = journal.logs();
        for line in logs.lines() {
            assert!(
                line.starts_with("<6>") || line.starts_with("<4>"),
                "every journal line has its priority: {line:?} in\n{logs}"
            );
        }
        let listening = logs.lines().find(|l| l.contains("listening")).unwrap();
        assert!(
            listening.starts_with("<6>nitro-vsock-proxy "),
            "{listening}"
        );
        let refused = logs
            .lines()
            .find(|l| l.contains("connection not made: upstream unreachable"))
            .unwrap();
        assert!(
            refused.starts_with("<4>conn{route=tcp:127.0.0.1:8001 id=1 "),
            "{refused}"
        );
        // Why there are no journal fields, at WARN, naming the socket.
        let fallback = logs
            .lines()
            .find(|l| l.contains("cannot use the journal socket"))
            .unwrap_or_else(|| panic!("no word about the missing journal socket:\n{logs}"));
        assert!(
            fallback.starts_with("<4>") && fallback.contains(&no_socket.display().to_string()),
            "{fallback}"
        );

        // A usage error, reported before the logger exists, is an error in the journal too.
        let mut cmd = Command::new(PROXY_BIN);
        cmd.args(["8001", "19", "443"]);
        let mut usage = Daemon::spawn(cmd, true);
        assert_eq!(usage.wait_exit(WAIT).await.and_then(|s| s.code()), Some(2));
        let logs = usage.logs();
        assert!(logs.contains("not the enclave's CID"), "{logs}");
        for line in logs.lines().filter(|l| !l.is_empty()) {
            assert!(line.starts_with("<3>"), "{line:?} in\n{logs}");
        }

        // A JOURNAL_STREAM that is not this stderr (inherited by a redirected child): text.
        let mut cmd = Command::new(PROXY_BIN);
        cmd.args(args(&config))
            .env("RUST_LOG", "info")
            .env("JOURNAL_STREAM", "1:1");
        let mut text = Daemon::spawn(cmd, false);
        assert!(
            text.wait_for_log("listening", WAIT).await,
            "{}",
            text.logs()
        );
        text.signal(libc::SIGTERM);
        assert_eq!(text.wait_exit(WAIT).await.and_then(|s| s.code()), Some(0));
        assert!(!text.logs().contains("<6>"), "{}", text.logs());
        assert!(text.logs().contains(" INFO "), "{}", text.logs());

        // An explicit --log-format wins over the detection.
        let mut cmd = Command::new(PROXY_BIN);
        cmd.args(args(&config))
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info");
        let mut json = Daemon::spawn(cmd, true);
        assert!(
            json.wait_for_log("listening", WAIT).await,
            "{}",
            json.logs()
        );
        json.signal(libc::SIGTERM);
        assert_eq!(json.wait_exit(WAIT).await.and_then(|s| s.code()), Some(0));
        assert!(json.logs().starts_with('{'), "{}", json.logs());
    });
}

/// The journal entry (one datagram, `KEY=value` lines) whose MESSAGE contains `needle`.
fn entry_with<'a>(entries: &'a [String], needle: &str) -> Option<&'a String> {
    entries.iter().find(|e| {
        e.lines()
            .any(|l| l.starts_with("MESSAGE=") && l.contains(needle))
    })
}

#[test]
fn journal_format_sends_every_field_as_an_nvp_journal_field() {
    run_in_netns(|| async {
        const CONNECT_ROUTE: &str = "tcp:127.0.0.1:8010";
        let dir = tempfile::tempdir().unwrap();
        // A fake journald: every datagram the proxy sends, as text.
        let journal = NotifySocket::bind(dir.path());
        let config = common::write_allowlist(
            &dir,
            &format!(
                "allowlist:\n- {{address: 192.0.2.10, port: 443}}\n\
                 routes:\n- {{listen: '{CONNECT_ROUTE}', mode: connect}}\n"
            ),
        );
        let mut proxy = Proxy::spawn_with_env(
            &["--config", &config, "--log-format", "journal"],
            &[("RUST_LOG", "info"), (JOURNAL_SOCKET_ENV, journal.path())],
        );
        proxy.wait_ready(CONNECT_ROUTE).await;
        let listening = journal
            .wait_for(WAIT, |e| e.contains("listening"))
            .await
            .unwrap_or_else(|| panic!("no start-up entry: {:?}", journal.messages()))
            .1;
        for line in [
            "PRIORITY=6",
            "SYSLOG_IDENTIFIER=nitro-vsock-proxy",
            "NVP_ROUTES=1",
        ] {
            assert!(listening.lines().any(|l| l == line), "{line}: {listening}");
        }

        // A CONNECT to an address the allowlist does not name: 403, logged at WARN.
        let mut c = connect(CONNECT_ROUTE).await;
        c.write_all(b"CONNECT 192.0.2.99:443 HTTP/1.1\r\nHost: 192.0.2.99:443\r\n\r\n")
            .await
            .unwrap();
        let answer = c.read_to_eof(WAIT).await.unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 403"),
            "{answer:?}"
        );
        let refused = journal
            .wait_for(WAIT, |e| e.contains("connection refused"))
            .await
            .unwrap_or_else(|| panic!("no refusal entry: {:?}", journal.messages()))
            .1;
        let lines: Vec<&str> = refused.lines().collect();
        for want in [
            "PRIORITY=4",
            "SYSLOG_IDENTIFIER=nitro-vsock-proxy",
            "NVP_REASON=denied",
            "NVP_ROUTE=tcp:127.0.0.1:8010",
            "NVP_ID=1",
            "NVP_ENCLAVE=-",
            "NVP_REQUESTED=192.0.2.99",
            "NVP_DECISION=refused",
            "TARGET=audit",
            "NVP_PORT=443",
        ] {
            assert!(lines.contains(&want), "{want} missing from {refused:?}");
        }
        let peer = lines
            .iter()
            .find_map(|l| l.strip_prefix("NVP_PEER="))
            .unwrap_or_else(|| panic!("no NVP_PEER in {refused:?}"));
        assert!(peer.starts_with("tcp:127.0.0.1:"), "{refused:?}");
        // MESSAGE is the text of the `<N>` line: the span, the message, the fields.
        let message = lines
            .iter()
            .find_map(|l| l.strip_prefix("MESSAGE="))
            .unwrap();
        assert!(
            message.starts_with(&format!(
                "conn{{route=tcp:127.0.0.1:8010 id=1 peer={peer} enclave=-}}: connection refused: "
            )),
            "{message}"
        );
        assert!(
            message.contains("192.0.2.99:443 is not allowed"),
            "{message}"
        );

        // A relayed connection's close line (written outside any span at INFO) keeps every
        // field as a journal field.
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let mut tunnel = connect(CONNECT_ROUTE).await;
        tunnel
            .write_all(b"CONNECT 192.0.2.10:443 HTTP/1.1\r\nHost: 192.0.2.10:443\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 39];
        tokio::time::timeout(WAIT, tunnel.read_exact(&mut head))
            .await
            .expect("no answer to CONNECT in time")
            .unwrap();
        assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
        let echoed = tunnel.round_trip(b"ping", WAIT).await.unwrap();
        assert_eq!(echoed, b"ping");
        let closed = journal
            .wait_for(WAIT, |e| e.contains("MESSAGE=connection closed"))
            .await
            .unwrap_or_else(|| panic!("no close entry: {:?}", journal.messages()))
            .1;
        let lines: Vec<&str> = closed.lines().collect();
        for want in [
            "PRIORITY=6",
            "NVP_ROUTE=tcp:127.0.0.1:8010",
            "NVP_ID=2",
            "NVP_ENCLAVE=-",
            "NVP_UPSTREAM=192.0.2.10:443",
            "NVP_BYTES_TO_UPSTREAM=4",
            "NVP_BYTES_TO_CLIENT=4",
            "NVP_END=completed",
        ] {
            assert!(lines.contains(&want), "{want} missing from {closed:?}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("NVP_PEER=tcp:127.0.0.1:"))
                && lines.iter().any(|l| l.starts_with("NVP_DURATION_MS=")),
            "{closed:?}"
        );

        // Entries go to the journal, not to stderr; the last ones are flushed at exit.
        proxy.signal(libc::SIGTERM);
        let status = proxy.wait_exit(WAIT).await.expect("did not exit");
        assert_eq!(status.code(), Some(0), "{}", proxy.logs());
        let entries = journal.messages();
        assert!(entry_with(&entries, "stopped").is_some(), "{entries:?}");
        assert!(
            !proxy.logs().contains("connection refused"),
            "{}",
            proxy.logs()
        );
        assert!(
            entries.iter().all(|e| !e.contains("MESSAGE=<")),
            "{entries:?}"
        );
    });
}
