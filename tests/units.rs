//! The unit files in `systemd/`: `systemd-analyze verify` prints nothing for each of them, and
//! `systemd-analyze security --offline=true` rates each service unit at most 2.0.
//!
//! `verify` checks that ExecStart's binary exists and is executable, and the units name the
//! installed path `/usr/bin/nitro-vsock-proxy`, which a development machine does not have. So
//! each unit is verified as a copy in a temporary directory whose `/usr/bin/nitro-vsock-proxy`
//! is rewritten to the binary cargo built for these tests; nothing else is changed. (A `--root`
//! tree would need the whole of /usr/lib/systemd copied into it for the unit to load.) The
//! socket unit is verified beside a copy of its service, which it loads.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_nitro-vsock-proxy");
const INSTALLED_BIN: &str = "/usr/bin/nitro-vsock-proxy";
const UNITS: [&str; 4] = [
    "nitro-vsock-proxy.service",
    "nitro-vsock-proxy@.service",
    "nitro-vsock-proxy.socket",
    "nitro-vsock-proxy-routes.service",
];

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

fn read_unit(name: &str) -> String {
    let path = unit_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path:?}: {e}"))
}

/// Copies every unit into a temporary directory with ExecStart pointing at the built binary.
fn copies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        let text = read_unit(name);
        assert!(
            name.ends_with(".socket") || text.contains(&format!("ExecStart={INSTALLED_BIN} ")),
            "{name}: ExecStart must run {INSTALLED_BIN}"
        );
        std::fs::write(dir.path().join(name), text.replace(INSTALLED_BIN, BIN)).unwrap();
    }
    dir
}

fn systemd_analyze(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze (install the `systemd` package: make deps): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn systemd_analyze_verify_prints_nothing_for_every_unit() {
    let dir = copies();
    for name in UNITS {
        let unit = format!("./{name}");
        let (code, output) = systemd_analyze(&["verify", "--man=no", &unit], dir.path());
        assert_eq!(code, Some(0), "systemd-analyze verify {name}:\n{output}");
        assert!(
            output.trim().is_empty(),
            "systemd-analyze verify {name}:\n{output}"
        );
    }
    // The check can fail: a unit with a typo in a key is reported.
    let typo = dir.path().join("typo.service");
    let broken = read_unit("nitro-vsock-proxy.service")
        .replace(INSTALLED_BIN, BIN)
        .replace("NoNewPrivileges=", "NoNewPrivilege=");
    std::fs::write(&typo, broken).unwrap();
    let (_, output) = systemd_analyze(&["verify", "--man=no", "./typo.service"], dir.path());
    assert!(output.contains("NoNewPrivilege"), "{output}");
}

#[test]
fn security_exposure_of_each_service_is_at_most_2() {
    let dir = copies();
    for name in UNITS.iter().filter(|n| n.ends_with(".service")) {
        let unit = format!("./{name}");
        // --threshold is in tenths of the printed score: 20 means 2.0.
        let (code, output) = systemd_analyze(
            &[
                "security",
                "--offline=true",
                "--threshold=20",
                "--no-pager",
                &unit,
            ],
            dir.path(),
        );
        let score: f64 = output
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no overall exposure level for {name}:\n{output}"));
        eprintln!("{name}: exposure {score}");
        assert!(score <= 2.0, "{name}: exposure {score} > 2.0:\n{output}");
        assert_eq!(code, Some(0), "{name} over the threshold:\n{output}");
    }
}

#[test]
fn units_carry_the_issue_s_contract() {
    let service = read_unit("nitro-vsock-proxy.service");
    let template = read_unit("nitro-vsock-proxy@.service");
    let socket = read_unit("nitro-vsock-proxy.socket");
    let routes = read_unit("nitro-vsock-proxy-routes.service");
    for (name, text) in [
        ("service", &service),
        ("template", &template),
        ("routes", &routes),
    ] {
        for line in [
            "Type=notify",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            // A port another process holds is retried ten times within 100 s, then given up.
            "StartLimitIntervalSec=100s",
            "StartLimitBurst=10",
            "DynamicUser=yes",
            "CapabilityBoundingSet=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "RestrictAddressFamilies=AF_VSOCK AF_INET AF_INET6 AF_UNIX",
            "SystemCallFilter=@system-service",
            "WatchdogSec=20s",
            "LimitNOFILE=8192",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{name} unit lacks {line:?}"
            );
        }
    }
    // Every service: `systemctl reload` fails on an invalid file (the check, with ExecStart='s
    // arguments, runs before the signal), and metrics can be turned on in either form.
    let start_and_reload = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("ExecStart=") || l.starts_with("ExecReload="))
            .map(str::to_owned)
            .collect()
    };
    // $OPTIONS from /etc/sysconfig/nitro-vsock-proxy (optional: `EnvironmentFile=-`), unbraced so
    // that systemd splits it into words.
    let default_args =
        "8000 kms.{region}.{domain} 443 --config /etc/nitro-vsock-proxy/vsock-proxy.yaml $OPTIONS";
    for (name, text) in [("service", &service), ("routes", &routes)] {
        assert!(
            text.lines()
                .any(|l| l == "EnvironmentFile=-/etc/sysconfig/nitro-vsock-proxy"),
            "{name} unit does not read /etc/sysconfig/nitro-vsock-proxy"
        );
    }
    for (name, text) in [
        ("service", &service),
        ("template", &template),
        ("routes", &routes),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("Documentation=man:nitro-vsock-proxy(8) https://")),
            "{name} unit has no Documentation= with the man page and the README"
        );
    }
    assert_eq!(
        start_and_reload(&service),
        [
            format!("ExecStart={INSTALLED_BIN} {default_args}"),
            format!("ExecReload={INSTALLED_BIN} {default_args} --check-config"),
            "ExecReload=/bin/kill -HUP $MAINPID".to_owned(),
        ]
    );
    let template_args =
        "${LISTEN} ${REMOTE_ADDR} ${REMOTE_PORT} --config /etc/nitro-vsock-proxy/%i.yaml $OPTIONS";
    assert_eq!(
        start_and_reload(&template),
        [
            format!("ExecStart={INSTALLED_BIN} {template_args}"),
            format!("ExecReload={INSTALLED_BIN} {template_args} --check-config"),
            "ExecReload=/bin/kill -HUP $MAINPID".to_owned(),
        ]
    );
    for (name, text, runtime_dir) in [
        ("service", &service, "nitro-vsock-proxy"),
        ("template", &template, "nitro-vsock-proxy-%i"),
        ("routes", &routes, "nitro-vsock-proxy"),
    ] {
        let comments: Vec<&str> = text.lines().filter(|l| l.starts_with('#')).collect();
        for form in [
            "--metrics-listen tcp:127.0.0.1:",
            "--metrics-listen unix:/run/",
        ] {
            assert!(
                comments.iter().any(|l| l.contains(form)),
                "{name} unit has no commented {form:?} example"
            );
        }
        // The unix: form's directory is writable under ProtectSystem=strict.
        assert!(
            text.lines()
                .any(|l| l == format!("RuntimeDirectory={runtime_dir}")),
            "{name} unit lacks RuntimeDirectory={runtime_dir}"
        );
        let unix_example = comments
            .iter()
            .find(|l| l.contains("--metrics-listen unix:"))
            .unwrap();
        let in_runtime_dir = format!("unix:/run/{}/", runtime_dir.replace("%i", "NAME"));
        assert!(
            unix_example.contains(&in_runtime_dir),
            "{name}: {unix_example:?} is not in {in_runtime_dir}"
        );
    }
    assert!(
        socket.contains("--metrics-listen"),
        "the socket unit says where metrics are set"
    );
    assert!(service.contains("Conflicts=nitro-enclaves-vsock-proxy.service"));
    assert!(template.contains("EnvironmentFile=/etc/nitro-vsock-proxy/%i.env"));
    assert!(template.contains("--config /etc/nitro-vsock-proxy/%i.yaml"));
    assert!(socket.lines().any(|l| l == "ListenStream=vsock::8000"));
    // The routes service: the file's routes only, and a reload that fails on an invalid file
    // (the check runs before the signal).
    let exec: Vec<&str> = routes
        .lines()
        .filter(|l| l.starts_with("ExecStart=") || l.starts_with("ExecReload="))
        .collect();
    assert_eq!(
        exec,
        [
            format!("ExecStart={INSTALLED_BIN} --config /etc/nitro-vsock-proxy/routes.yaml $OPTIONS"),
            format!("ExecReload={INSTALLED_BIN} --config /etc/nitro-vsock-proxy/routes.yaml $OPTIONS --check-config"),
            "ExecReload=/bin/kill -HUP $MAINPID".to_owned(),
        ]
    );

    // The shipped files the units read (the allowlist is also loaded by the real binary in
    // tests/region.rs).
    let env =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/workshop.env"))
            .unwrap();
    for key in [
        "LISTEN=8001",
        "REMOTE_ADDR=ip-ranges.amazonaws.com",
        "REMOTE_PORT=443",
        "OPTIONS=",
    ] {
        assert!(
            env.lines().any(|l| l == key),
            "config/workshop.env lacks {key}"
        );
    }
    let allowlist = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/vsock-proxy.yaml"),
    )
    .unwrap();
    for entry in [
        "kms.us-east-1.amazonaws.com",
        "kms-fips.us-east-1.amazonaws.com",
        "kms.us-gov-west-1.amazonaws.com",
        "kms.cn-north-1.amazonaws.com.cn",
        "kms.cn-northwest-1.amazonaws.com.cn",
    ] {
        assert!(
            allowlist.contains(&format!("{{address: {entry}, port: 443}}")),
            "config/vsock-proxy.yaml lacks {entry}"
        );
    }
}

#[test]
fn the_shipped_routes_example_passes_check_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/routes.example.yaml");
    let out = Command::new(BIN)
        .args(["--check-config", "--config"])
        .arg(&example)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for route in [
        "route vsock:8000 -> kms.us-east-1.amazonaws.com:443",
        "route vsock:8003 -> secretsmanager.us-east-1.amazonaws.com:443",
        "route vsock:8004 -> s3.us-east-1.amazonaws.com:443",
    ] {
        assert!(stdout.contains(route), "{route}: {stdout}");
    }
}

/// The example's commented CONNECT route, uncommented as an operator would, is valid and shown
/// with its `sni: require`.
#[test]
fn the_routes_examples_commented_connect_route_passes_check_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/routes.example.yaml");
    let text = std::fs::read_to_string(&example).unwrap();
    let commented = "  # - listen: 8010\n  #   mode: connect\n  #   sni: require\n";
    assert!(text.contains(commented), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(
        &path,
        text.replace(
            commented,
            "  - listen: 8010\n    mode: connect\n    sni: require\n",
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("route vsock:8010 -> HTTP CONNECT (sni: require)"),
        "{stdout}"
    );
}

/// The per-enclave drop-in (`systemd/enclaves.conf`, shipped in the docs' examples) applied to
/// the routes unit: still valid, still rated at most 2.0, and it gives what nitro-cli needs.
#[test]
fn the_enclaves_drop_in_keeps_the_routes_unit_valid_and_sandboxed() {
    let drop_in = read_unit("enclaves.conf");
    for needed in [
        "SupplementaryGroups=ne",
        "PrivateUsers=no",
        "ReadWritePaths=-/var/log/nitro_enclaves",
    ] {
        assert!(
            drop_in.lines().any(|l| l == needed),
            "enclaves.conf lacks {needed}"
        );
    }
    let settings: String = drop_in
        .lines()
        .filter(|l| !l.starts_with('#') && *l != "[Service]")
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let unit = read_unit("nitro-vsock-proxy-routes.service")
        .replace(INSTALLED_BIN, BIN)
        .replace("[Install]", &format!("{settings}\n[Install]"));
    assert!(unit.contains("SupplementaryGroups=ne"));
    std::fs::write(dir.path().join("with-enclaves.service"), unit).unwrap();
    let (code, output) = systemd_analyze(
        &["verify", "--man=no", "./with-enclaves.service"],
        dir.path(),
    );
    assert_eq!(code, Some(0), "{output}");
    assert!(output.trim().is_empty(), "{output}");
    let (code, output) = systemd_analyze(
        &[
            "security",
            "--offline=true",
            "--threshold=20",
            "--no-pager",
            "./with-enclaves.service",
        ],
        dir.path(),
    );
    assert_eq!(code, Some(0), "over 2.0 with the drop-in:\n{output}");
}
