//! The operator-facing points through the real binary: `--check-config` with no route
//! checks the file alone (as `nginx -t`), shadowed and duplicate allowlist entries are warnings,
//! YAML mistakes get hints, the metadata service's refusal says what it gives away, `--help`
//! on `--log-format journal`, one vocabulary for refusals, and plurals.

mod common;

use std::path::Path;
use std::time::Duration;

use common::netns::run_in_netns;
use common::proxy::{run_to_exit, Proxy};

const TIMEOUT: Duration = Duration::from_secs(20);

fn shipped(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
        .display()
        .to_string()
}

fn write(dir: &tempfile::TempDir, yaml: &str) -> String {
    common::write_allowlist(dir, yaml)
}

#[test]
fn check_config_without_any_route_checks_the_file_alone() {
    run_in_netns(|| async {
        for (sample, entries) in [
            ("vsock-proxy.yaml", "allowlist entries"),
            ("your-vsock-proxy.yaml", "1 allowlist entry,"),
        ] {
            let path = shipped(sample);
            let out = run_to_exit(&["--check-config", "--config", &path], TIMEOUT);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{sample}: {}\n{}",
                out.stdout,
                out.stderr
            );
            assert!(out.stdout.contains(entries), "{}", out.stdout);
            assert!(out.stdout.contains("checked alone"), "{}", out.stdout);
            assert!(
                out.stdout.ends_with(&format!("{path}: configuration OK\n")),
                "{}",
                out.stdout
            );
            assert!(!out.stdout.contains("NOT OK"), "{}", out.stdout);
            assert!(!out.stderr.contains("no route to serve"), "{}", out.stderr);
        }
        // An invalid file is still NOT OK, exit 2.
        let dir = tempfile::tempdir().unwrap();
        let bad = write(&dir, "allowlist:\n- {address: a.test, port: 0}\n");
        let out = run_to_exit(&["--check-config", "--config", &bad], TIMEOUT);
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains("configuration NOT OK"),
            "{}",
            out.stderr
        );
        // Starting the daemon without any route stays an error, and its example is a remote
        // the file allows.
        let path = shipped("your-vsock-proxy.yaml");
        let out = run_to_exit(&["--config", &path], TIMEOUT);
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(out.stderr.contains("no route to serve"), "{}", out.stderr);
        assert!(
            out.stderr.contains("ip-ranges.amazonaws.com:443"),
            "{}",
            out.stderr
        );
    });
}

/// Duplicates and entries a wider one of the same port allows in full; 169.254.169.254 beside
/// 169.254.0.0/16 is not one of them (a block does not allow the metadata service).
const OVERLAPPING: &str = "allowlist:\n\
  - {address: 10.0.0.0/8, port: 443}\n\
  - {address: 10.1.2.3, port: 443}\n\
  - {address: a.example.com, port: 443}\n\
  - {address: '*.example.com', port: 443}\n\
  - {address: a.example.com, port: 443}\n\
  - {address: 169.254.169.254, port: 80}\n\
  - {address: 169.254.0.0/16, port: 80}\n\
  - {address: 192.0.2.10, port: 443}\n";

const OVERLAP_WARNINGS: [&str; 3] = [
    "10.1.2.3:443 (allowlist[1], line 3) is shadowed by the wider 10.0.0.0/8:443 (allowlist[0], line 2)",
    "a.example.com:443 (allowlist[2], line 4) is shadowed by the wildcard *.example.com:443 (allowlist[3], line 5)",
    "a.example.com:443 (allowlist[4], line 6) duplicates a.example.com:443 (allowlist[2], line 4)",
];

#[test]
fn duplicate_and_shadowed_entries_are_warnings_naming_both_entries_and_lines() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, OVERLAPPING);
        let out = run_to_exit(&["--check-config", "--config", &path], TIMEOUT);
        assert_eq!(out.status.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
        for w in OVERLAP_WARNINGS {
            assert!(
                out.stderr
                    .contains(&format!("warning: configuration file {path}: {w}")),
                "{w}: {}",
                out.stderr
            );
        }
        assert_eq!(out.stderr.matches("warning:").count(), 3, "{}", out.stderr);
        assert!(
            !out.stderr.contains("169.254.169.254:80 (allowlist"),
            "{}",
            out.stderr
        );
        assert!(
            out.stdout.ends_with(&format!(
                "{path}: configuration OK, with 3 warnings (on standard error)\n"
            )),
            "{}",
            out.stdout
        );

        // At start-up and on reload: logged at WARN, and the proxy serves.
        let listen = "tcp:127.0.0.1:8001";
        let proxy = Proxy::spawn(&[listen, "192.0.2.10", "443", "--config", &path]);
        proxy.wait_ready(listen).await;
        for w in OVERLAP_WARNINGS {
            assert!(
                proxy.wait_for_log(w, TIMEOUT).await,
                "{w}: {}",
                proxy.logs()
            );
        }
        let logs = proxy.logs();
        let line = logs
            .lines()
            .find(|l| l.contains(OVERLAP_WARNINGS[0]))
            .unwrap_or_default();
        assert!(line.contains("WARN"), "{line}");
        proxy
            .reload_with(Path::new(&path), OVERLAPPING, "allowlist reloaded", 1)
            .await;
        assert_eq!(
            proxy.logs().matches(OVERLAP_WARNINGS[2]).count(),
            2,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn yaml_mistakes_get_a_hint_and_the_position_once() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        for (yaml, hint, line) in [
            ("allowlist:\n\t- {address: a.example, port: 443}\n", "YAML does not allow tabs for indentation", 2),
            ("allowlist:\n  - address: a.example\n\tport: 443\n", "YAML does not allow tabs for indentation", 3),
            ("allowlist:\n  - address: *.example.com\n    port: 443\n", "quote wildcard names: '*.example.com'", 2),
            ("allowlist:\n  - {address: *.example.com, port: 443}\n", "quote wildcard names: '*.example.com'", 2),
            ("allowlist:\n  address: a.example\n  port: 443\n", "expected a list: start each entry with '- '", 2),
            (
                "allowlist:\n- {address: a.example, port: 443}\nroutes:\n  listen: 8000\n  remote: a.example:443\n",
                "expected a list: start each entry with '- '",
                4,
            ),
        ] {
            let path = write(&dir, yaml);
            for extra in [&[][..], &["--check-config"][..]] {
                let args = [&["8000", "a.example", "443", "--config", &path][..], extra].concat();
                let out = run_to_exit(&args, TIMEOUT);
                assert_eq!(out.status.code(), Some(2), "{yaml:?}: {}", out.stderr);
                assert!(out.stderr.contains(hint), "{yaml:?}: {}", out.stderr);
                assert!(
                    out.stderr.contains(&format!("{path}, line {line}, column ")),
                    "{yaml:?}: {}",
                    out.stderr
                );
                assert_eq!(out.stderr.matches(" line ").count(), 1, "{yaml:?}: {}", out.stderr);
                assert!(!out.stderr.contains(" at line "), "{yaml:?}: {}", out.stderr);
            }
        }
    });
}

#[test]
fn the_metadata_service_refused_at_start_up_says_what_allowing_it_gives_away() {
    run_in_netns(|| async {
        let path = shipped("your-vsock-proxy.yaml");
        for extra in [&[][..], &["--check-config"][..]] {
            let args = [
                &["8000", "169.254.169.254", "80", "--config", &path][..],
                extra,
            ]
            .concat();
            let out = run_to_exit(&args, TIMEOUT);
            assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
            for needle in [
                "169.254.169.254:80 is the instance metadata service",
                "gives the enclave the instance's credentials",
                "add `- {address: 169.254.169.254, port: 80}`",
            ] {
                assert!(out.stderr.contains(needle), "{needle}: {}", out.stderr);
            }
        }
    });
}

#[test]
fn help_on_log_format_journal_says_what_the_readme_says() {
    let out = run_to_exit(&["--help"], TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let help = out.stdout.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        "native journal entries with fields",
        "text lines with syslog priority prefixes to standard error only when journald is absent",
    ] {
        assert!(help.contains(needle), "{needle}: {help}");
    }
    assert!(!help.contains("Text lines with a syslog priority prefix (`<4>` for WARN...) and no timestamp, for systemd's journal"), "{help}");
}

/// An HTTP CONNECT request for `target` on 127.0.0.1:`port`; the status code of the answer.
async fn connect_status(port: u16, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn dns_failures_and_405s_are_counted_and_logged_under_their_own_names() {
    run_in_netns(|| async {
        let _dns = common::dns::TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "allowlist:\n- {address: missing.test, port: 443}\n\
             routes:\n- {listen: 'tcp:127.0.0.1:8003', mode: connect}\n",
        );
        let mut proxy = Proxy::spawn(&[
            "--config",
            &path,
            "--nameserver",
            "127.0.0.1:53",
            "--dns-timeout",
            "500ms",
        ]);
        proxy.wait_ready("tcp:127.0.0.1:8003").await;
        let connect = "CONNECT missing.test:443 HTTP/1.1\r\nHost: missing.test:443\r\n\r\n";
        assert_eq!(connect_status(8003, connect).await, 502);
        assert_eq!(
            connect_status(8003, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await,
            405
        );
        let denied = "CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n";
        assert_eq!(connect_status(8003, denied).await, 403);
        assert!(
            proxy.wait_for_log("reason=\"denied\"", TIMEOUT).await,
            "{}",
            proxy.logs()
        );
        proxy.signal(libc::SIGTERM);
        assert!(proxy.wait_exit(TIMEOUT).await.is_some());
        let logs = proxy.logs();
        let totals = logs
            .lines()
            .find(|l| l.contains("route totals"))
            .unwrap_or_default();
        for field in [
            "accepted=3",
            "denied=1",
            "dns_failure=1",
            "method_not_allowed=1",
        ] {
            assert!(totals.contains(field), "{field}: {totals}\n{logs}");
        }
        let stopped = logs
            .lines()
            .find(|l| l.contains("stopped"))
            .unwrap_or_default();
        assert!(
            stopped.contains("dns_failure=1") && stopped.contains("denied=1"),
            "{stopped}"
        );
        // Only the policy's refusal reads `connection refused:`.
        let dns_line = logs
            .lines()
            .find(|l| l.contains("reason=\"dns_failure\""))
            .unwrap_or_default();
        assert!(!dns_line.contains("connection refused"), "{dns_line}");
        assert!(dns_line.contains("DNS lookup failed"), "{dns_line}");
        assert_eq!(logs.matches("connection refused: ").count(), 2, "{logs}");
    });
}

#[test]
fn plurals_and_punctuation_of_the_reload_messages() {
    run_in_netns(|| async {
        let _dns = common::dns::TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let one = "allowlist:\n- {address: api.test, port: 443}\n";
        let path = write(&dir, one);
        let listen = "tcp:127.0.0.1:8001";
        let proxy = Proxy::spawn(&[
            listen,
            "api.test",
            "443",
            "--config",
            &path,
            "--nameserver",
            "127.0.0.1:53",
        ]);
        proxy.wait_ready(listen).await;
        proxy
            .reload_with(Path::new(&path), one, "allowlist reloaded", 1)
            .await;
        let logs = proxy.logs();
        assert!(logs.contains("1 allowlist entry; 1 route:"), "{logs}");
        assert!(!logs.contains("1 allowlist entries"), "{logs}");
        // api.test no longer allowed, and DNS says it does not exist: the message ends a
        // sentence, and the reload's own words follow without ".;".
        let other = "allowlist:\n- {address: other.test, port: 443}\n";
        proxy
            .reload_with(Path::new(&path), other, "reload failed", 1)
            .await;
        let logs = proxy.logs();
        assert!(
            logs.contains("to allow it by name; the routes stay as they are"),
            "{logs}"
        );
        assert!(!logs.contains(".;"), "{logs}");
    });
}
