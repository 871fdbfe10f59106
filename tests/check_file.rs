//! The operator-facing points through the real binary: `--check-config` with no route
//! checks the file alone (as `nginx -t`), shadowed and duplicate allowlist entries are warnings,
//! YAML mistakes get hints, the metadata service's refusal says what it gives away, `--help`
//! on `--log-format journal`, one vocabulary for refusals, and plurals.

mod common;

use std::path::Path;
use std::time::Duration;

use common::netns::run_in_netns;
use common::proxy::run_to_exit;

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
