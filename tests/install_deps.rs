//! `scripts/install-deps.sh`, run against stand-ins for dpkg-query and apt-get that report every
//! package missing and record what would be installed: `make demo` asks only for what the demo
//! needs, `make test` for everything.

use std::path::Path;
use std::process::Command;

fn requested(args: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("apt.log");
    let fake = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).unwrap();
    };
    fake("dpkg-query", "exit 1");
    fake("apt-get", &format!("echo \"$@\" >>{}", log.display()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps.sh");
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let status = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("PATH", path)
        .status()
        .unwrap();
    assert!(status.success(), "install-deps.sh {args:?} failed");
    let log = std::fs::read_to_string(&log).unwrap();
    let install = log
        .lines()
        .find(|l| l.contains("install"))
        .unwrap_or_else(|| panic!("no apt-get install in {log:?}"));
    install
        .split_whitespace()
        .filter(|w| !w.starts_with('-') && *w != "install")
        .map(str::to_owned)
        .collect()
}

#[test]
fn make_demo_installs_only_what_the_demo_needs() {
    let mut demo = requested(&["demo"]);
    demo.sort();
    assert_eq!(
        demo,
        ["iproute2", "libsystemd-dev", "pkg-config", "util-linux"]
    );
    let all = requested(&[]);
    for heavy in ["rpm", "lintian", "debootstrap", "rpmlint"] {
        assert!(
            all.iter().any(|p| p == heavy),
            "make test needs {heavy}: {all:?}"
        );
        assert!(
            !demo.iter().any(|p| p == heavy),
            "make demo installs {heavy}"
        );
    }
}
