//! Start-up failures through the real binary: every bad configuration exits 2 naming the file
//! (and the line where there is one), usage errors exit 2, a bind failure exits 1 naming the
//! address and the OS error. None of these needs a network, but they run in a private network
//! namespace anyway so a proxy that wrongly starts serving cannot touch the host's ports.

mod common;

use std::time::Duration;

use common::netns::run_in_netns;
use common::proxy::run_to_exit;

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
