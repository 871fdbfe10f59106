//! The sd_notify protocol through the real binary, against a fake `NOTIFY_SOCKET`: READY=1 only
//! once the listener is bound, STATUS= with live counters, RELOADING=1 then READY=1 on SIGHUP,
//! STOPPING=1 on SIGTERM, WATCHDOG=1 only when the watchdog is enabled for this process, nothing
//! but a failure STATUS when the configuration is invalid; and journal-format logs when standard
//! error is the journal stream. Each test has its own network namespace.

mod common;
mod systemd_support;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, is_listening, Proxy, PROXY_BIN};
use common::upstream::echo_server;
use systemd_support::{Daemon, NotifySocket};
use tokio::io::AsyncWriteExt;

const LISTEN: &str = "tcp:127.0.0.1:8001";
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
        // Nothing listens on 192.0.2.10:443 here: a connection is refused with a WARN line.
        add_lo_addr(ip("192.0.2.10"));

        let mut cmd = Command::new(PROXY_BIN);
        cmd.args(args(&config)).env("RUST_LOG", "info");
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
            journal.wait_for_log("<4>", WAIT).await,
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
            .find(|l| l.contains("connection refused"))
            .unwrap();
        assert!(
            refused.starts_with("<4>conn{route=tcp:127.0.0.1:8001 id=1 "),
            "{refused}"
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
