//! Operator-facing messages through the real binary: a missing default configuration says where
//! else the file may be, `-w` says what it means here, a URL given as REMOTE_ADDR is named as
//! such, a bind failure's hint fits its OS error, and no message of ours has a run of spaces
//! inside it (a string continued across source lines without `\`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::netns::run_in_netns;
use common::proxy::run_to_exit;

const TIMEOUT: Duration = Duration::from_secs(20);
const AWS_DEFAULT: &str = "/etc/nitro_enclaves/vsock-proxy.yaml";

fn config(dir: &Path) -> String {
    let path = dir.join("c.yaml");
    std::fs::write(&path, "allowlist:\n- {address: api.test, port: 443}\n").unwrap();
    path.display().to_string()
}

#[test]
fn a_missing_default_config_names_both_places_and_the_option() {
    assert!(
        !Path::new(AWS_DEFAULT).exists(),
        "this test needs a host without AWS's package ({AWS_DEFAULT} exists)"
    );
    run_in_netns(|| async {
        let out = run_to_exit(&["tcp:127.0.0.1:8001", "api.test", "443"], TIMEOUT);
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        for needle in [
            AWS_DEFAULT,
            "No such file or directory",
            "/etc/nitro-vsock-proxy/vsock-proxy.yaml",
            "/etc/nitro-vsock-proxy/routes.yaml",
            "--config FILE",
        ] {
            assert!(
                out.stderr.contains(needle),
                "says {needle:?}: {}",
                out.stderr
            );
        }
        // Another missing file is named alone: the hint is about the default only.
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("absent.yaml").display().to_string();
        let out = run_to_exit(
            &["tcp:127.0.0.1:8001", "api.test", "443", "--config", &other],
            TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(out.stderr.contains(&other), "{}", out.stderr);
        assert!(
            !out.stderr.contains("/etc/nitro-vsock-proxy/"),
            "{}",
            out.stderr
        );
    });
}

#[test]
fn w_says_once_that_it_is_threads_here_and_what_bounds_connections() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let path = config(dir.path());
        let args = [
            "tcp:127.0.0.1:8001",
            "api.test",
            "443",
            "--config",
            &path,
            "--check-config",
        ];
        let with = run_to_exit(&[&args[..], &["-w", "3"]].concat(), TIMEOUT);
        let line = "-w 3: 3 runtime worker threads";
        assert_eq!(with.stderr.matches(line).count(), 1, "{}", with.stderr);
        assert!(
            with.stderr.contains("--max-connections, now 1024"),
            "{}",
            with.stderr
        );
        let without = run_to_exit(&args, TIMEOUT);
        assert!(
            !without.stderr.contains("runtime worker thread"),
            "{}",
            without.stderr
        );
    });
}

#[test]
fn a_url_as_remote_addr_is_named_as_a_url() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let path = config(dir.path());
        let out = run_to_exit(
            &[
                "8000",
                "https://ip-ranges.amazonaws.com/ip-ranges.json",
                "443",
                "--config",
                &path,
            ],
            TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
        assert!(
            out.stderr.contains("give a host name, not a URL"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("\"ip-ranges.amazonaws.com\""),
            "{}",
            out.stderr
        );
    });
}

#[test]
fn a_bind_failure_guesses_another_proxy_only_when_the_address_is_in_use() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let path = config(dir.path());
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = format!("tcp:{}", taken.local_addr().unwrap());
        let missing_dir = format!("unix:{}", dir.path().join("no/such/dir.sock").display());
        let cases = [
            (
                taken.as_str(),
                "Address already in use",
                "is another proxy already using it?",
            ),
            (
                "tcp:192.0.2.1:8001",
                "Cannot assign requested address",
                "not one of this host's",
            ),
            (
                missing_dir.as_str(),
                "No such file or directory",
                "directory does not exist",
            ),
        ];
        for (listen, os_error, hint) in cases {
            let out = run_to_exit(&[listen, "api.test", "443", "--config", &path], TIMEOUT);
            let what = format!("{listen}: {}", out.stderr);
            assert_eq!(out.status.code(), Some(1), "{what}");
            assert!(
                out.stderr.contains(&format!("cannot listen on {listen}")),
                "{what}"
            );
            assert!(out.stderr.contains(os_error), "{what}");
            assert!(out.stderr.contains(hint), "{what}");
            if hint != "is another proxy already using it?" {
                assert!(!out.stderr.contains("another proxy"), "{what}");
            }
        }
        // The metrics listener follows the same rule.
        let out = run_to_exit(
            &[
                "tcp:127.0.0.1:8001",
                "api.test",
                "443",
                "--config",
                &path,
                "--metrics-listen",
                "tcp:192.0.2.1:9190",
            ],
            TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        assert!(
            out.stderr.contains("not one of this host's"),
            "{}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("another process on that address"),
            "{}",
            out.stderr
        );
    });
}

/// The string literals of `src/`, outside tests, with their file and line.
fn string_literals(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let (mut i, mut line) = (0, 1);
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => line += 1,
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'\'' if bytes.get(i + 2) == Some(&b'\'') || bytes.get(i + 1) == Some(&b'\\') => {
                // A char literal such as '"' or '\n': skip it whole.
                let end = code[i + 1..].find('\'').map_or(bytes.len(), |e| i + 2 + e);
                i = end;
                continue;
            }
            b'"' => {
                let start_line = line;
                let mut text = String::new();
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        // `\` then a line break: the break and the next line's indentation are
                        // not part of the string.
                        if bytes.get(i + 1) == Some(&b'\n') {
                            line += 1;
                            i += 2;
                            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                                if bytes[i] == b'\n' {
                                    line += 1;
                                }
                                i += 1;
                            }
                            continue;
                        }
                        text.push(bytes[i] as char);
                        i += 1;
                    }
                    if bytes[i] == b'\n' {
                        line += 1;
                    }
                    text.push(bytes[i] as char);
                    i += 1;
                }
                found.push((start_line, text));
            }
            _ => {}
        }
        i += 1;
    }
    found
}

#[test]
fn no_message_has_a_run_of_spaces_inside_it() {
    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut all = Vec::new();
    files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut all);
    let mut bad = Vec::new();
    for file in &all {
        let text = std::fs::read_to_string(file).unwrap();
        let code = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or(&text);
        for (line, literal) in string_literals(code) {
            let trimmed = literal.trim_matches(|c: char| c == ' ' || c == '\n');
            if trimmed.contains("  ") || trimmed.contains('\n') {
                bad.push(format!("{}:{line}: {literal:?}", file.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "messages with a run of spaces inside:\n{}",
        bad.join("\n")
    );
    // The scanner sees what it must: a literal continued without `\` keeps its indentation.
    let broken = "let m = \"no\n          route\";\nlet ok = \"a \\\n          b\";\n";
    let literals = string_literals(broken);
    assert_eq!(literals[0].1, "no\n          route");
    assert_eq!(literals[1].1, "a b");
}

#[test]
fn a_unix_socket_a_live_process_serves_is_refused_a_stale_one_replaced_and_ours_removed_at_exit() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let path = config(dir.path());
        // Served by a live process (this test): refused, for a route and for metrics alike.
        let live = dir.path().join("live.sock");
        let other = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let live_ep = format!("unix:{}", live.display());
        for args in [
            vec![live_ep.as_str(), "api.test", "443", "--config", &path],
            vec![
                "tcp:127.0.0.1:8001",
                "api.test",
                "443",
                "--config",
                &path,
                "--metrics-listen",
                &live_ep,
            ],
        ] {
            let out = run_to_exit(&args, TIMEOUT);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {}", out.stderr);
            assert!(
                out.stderr.contains("in use by another process"),
                "{args:?}: {}",
                out.stderr
            );
            assert!(live.exists(), "the live socket file was removed");
            let _client = std::os::unix::net::UnixStream::connect(&live).unwrap();
            other.accept().unwrap();
        }
        // A stale file (its listener gone) is replaced; at exit the daemon removes its own.
        let stale = dir.path().join("stale.sock");
        let metrics = dir.path().join("metrics.sock");
        for file in [&stale, &metrics] {
            drop(std::os::unix::net::UnixListener::bind(file).unwrap());
            assert!(file.exists());
        }
        let listen = format!("unix:{}", stale.display());
        let metrics_ep = format!("unix:{}", metrics.display());
        let mut proxy = common::proxy::Proxy::spawn(&[
            listen.as_str(),
            "api.test",
            "443",
            "--config",
            &path,
            "--metrics-listen",
            &metrics_ep,
        ]);
        proxy.wait_ready(&listen).await;
        proxy.signal(libc::SIGTERM);
        let status = proxy.wait_exit(TIMEOUT).await.expect("exits on SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", proxy.logs());
        assert!(!stale.exists(), "the route's socket file is left behind");
        assert!(!metrics.exists(), "the metrics socket file is left behind");
    });
}
