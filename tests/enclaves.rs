//! Per-enclave policy (`enclaves:`) through the real binary, in the test's own network
//! namespace. The peers are `tcp:` clients bound to chosen 127.0.0.x sources, matched by
//! `source` (on the host there is no vsock peer to have a CID; the VM tier matches real CIDs):
//! two peers reach different upstreams through one CONNECT route, a route with `enclaves:`
//! refuses the other peer at once, a peer matching nothing gets the top-level allowlist only,
//! and a reload that tightens an entry revokes its open connection. A stand-in
//! `--enclaves-command` (a script printing nitro-cli's JSON, or failing, hanging, printing
//! garbage) is run, counted, and a failure leaves the `source` matches working.

mod common;

use std::time::Duration;

use common::netns::run_in_netns;
use common::proxy::{closed_without_a_byte, connect_from, run_to_exit, Proxy};
use common::upstream::echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONNECT_ROUTE: &str = "tcp:127.0.0.1:8010";
const FIXED_ROUTE: &str = "tcp:127.0.0.1:8000";
const METRICS: &str = "127.0.0.1:9190";
const WAIT: Duration = Duration::from_secs(10);

/// signer (peer 127.0.0.5) may reach 127.0.0.10:443, batch (127.0.0.6) 127.0.0.11:443, every
/// peer 127.0.0.12:443; the fixed route to 127.0.0.10 is signer's alone.
fn config(signer_allowlist: &str) -> String {
    format!(
        "allowlist:\n  - {{address: 127.0.0.12, port: 443}}\n\
         enclaves:\n\
         \x20 - id: signer\n    match: {{source: \"127.0.0.5/32\"}}\n    allowlist:\n{signer_allowlist}\
         \x20 - id: batch\n    match: {{source: \"127.0.0.6/32\"}}\n    allowlist:\n      - {{address: 127.0.0.11, port: 443}}\n\
         routes:\n\
         \x20 - listen: \"{CONNECT_ROUTE}\"\n    mode: connect\n\
         \x20 - listen: \"{FIXED_ROUTE}\"\n    remote: \"127.0.0.10:443\"\n    enclaves: [signer]\n"
    )
}

const SIGNER_ALLOWLIST: &str = "      - {address: 127.0.0.10, port: 443}\n";

/// `CONNECT target` from `source`: the status code, and the tunnel when it is 200.
async fn connect_request(source: &str, target: &str) -> (u16, TcpStream) {
    let mut s = connect_from(source, CONNECT_ROUTE).await;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) => head.push(byte[0]),
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("no answer to CONNECT in time");
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    if status == 200 {
        // The body of a refusal is not read: only a tunnel is used.
    }
    (status, s)
}

/// Sends `ping` through `stream` and expects it back from the echo upstream.
async fn echoes(stream: &mut TcpStream) -> bool {
    if stream.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(WAIT, stream.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"ping"
}

async fn start_upstreams() -> Vec<common::upstream::UpstreamHandle> {
    let mut ups = Vec::new();
    for ip in ["127.0.0.10", "127.0.0.11", "127.0.0.12"] {
        ups.push(echo_server(format!("{ip}:443").parse().unwrap()).await);
    }
    ups
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn scrape() -> std::collections::BTreeMap<String, f64> {
    tokio::task::spawn_blocking(|| {
        common::metrics::scrape(&format!("http://{METRICS}/metrics"), None)
    })
    .await
    .unwrap()
}

#[test]
fn two_peers_reach_what_their_entries_allow_and_a_route_with_enclaves_refuses_the_other() {
    run_in_netns(|| async {
        let _ups = start_upstreams().await;
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "p.yaml", &config(SIGNER_ALLOWLIST));
        let proxy = Proxy::spawn(&[
            "--config",
            path.to_str().unwrap(),
            "--metrics-listen",
            &format!("tcp:{METRICS}"),
        ]);
        proxy.wait_ready(CONNECT_ROUTE).await;
        proxy.wait_ready(FIXED_ROUTE).await;

        // signer: its own entry and the top-level one; not batch's.
        let (status, mut tunnel) = connect_request("127.0.0.5", "127.0.0.10:443").await;
        assert_eq!(status, 200, "{}", proxy.logs());
        assert!(echoes(&mut tunnel).await);
        assert_eq!(connect_request("127.0.0.5", "127.0.0.11:443").await.0, 403);
        let (status, mut top) = connect_request("127.0.0.5", "127.0.0.12:443").await;
        assert_eq!(status, 200);
        assert!(echoes(&mut top).await);
        // batch: the other way round.
        let (status, mut tunnel_b) = connect_request("127.0.0.6", "127.0.0.11:443").await;
        assert_eq!(status, 200, "{}", proxy.logs());
        assert!(echoes(&mut tunnel_b).await);
        assert_eq!(connect_request("127.0.0.6", "127.0.0.10:443").await.0, 403);
        // A peer matching no entry: the top-level allowlist only.
        assert_eq!(connect_request("127.0.0.7", "127.0.0.10:443").await.0, 403);
        assert_eq!(connect_request("127.0.0.7", "127.0.0.11:443").await.0, 403);
        let (status, mut top7) = connect_request("127.0.0.7", "127.0.0.12:443").await;
        assert_eq!(status, 200);
        assert!(echoes(&mut top7).await);

        // The fixed route is signer's: batch is closed at once, nothing connected.
        let mut fixed = connect_from("127.0.0.5", FIXED_ROUTE).await;
        assert!(echoes(&mut fixed).await, "{}", proxy.logs());
        let mut refused = connect_from("127.0.0.6", FIXED_ROUTE).await;
        let _ = refused.write_all(b"ping").await;
        assert!(closed_without_a_byte(&mut refused, WAIT).await);
        let line = proxy
            .wait_for_line("reason=\"enclave_not_allowed\"", WAIT)
            .await;
        assert!(line.contains("enclave=\"batch\""), "{line}");
        assert!(
            line.contains("the route admits only the enclaves signer"),
            "{line}"
        );
        // Log lines carry the ids the peer matched.
        assert!(
            proxy.logs().lines().any(|l| l.contains("enclave=signer")
                && l.contains("connection closed")
                || l.contains("enclave=signer") && l.contains("conn{")),
            "{}",
            proxy.logs()
        );

        drop((tunnel, top, tunnel_b, top7, fixed));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let samples = scrape().await;
        let count = |enclave: &str, outcome: &str| {
            common::metrics::value(
                &samples,
                &format!(
                    "nitro_vsock_proxy_enclave_connections_total{{enclave=\"{enclave}\",outcome=\"{outcome}\"}}"
                ),
            )
        };
        // signer: two tunnels and the fixed route completed, one CONNECT denied.
        assert_eq!(count("signer", "completed"), 3.0, "{samples:?}");
        assert_eq!(count("signer", "denied"), 1.0, "{samples:?}");
        // batch: one tunnel, one CONNECT denied, one refused by the fixed route.
        assert_eq!(count("batch", "completed"), 1.0, "{samples:?}");
        assert_eq!(count("batch", "denied"), 2.0, "{samples:?}");
        assert_eq!(count("-", "denied"), 2.0, "{samples:?}");
        assert_eq!(count("-", "completed"), 1.0, "{samples:?}");
    });
}

#[test]
fn a_reload_that_tightens_an_entry_revokes_its_open_connection() {
    run_in_netns(|| async {
        let _ups = start_upstreams().await;
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "p.yaml", &config(SIGNER_ALLOWLIST));
        let proxy = Proxy::spawn(&["--config", path.to_str().unwrap()]);
        proxy.wait_ready(CONNECT_ROUTE).await;
        let (status, mut signer) = connect_request("127.0.0.5", "127.0.0.10:443").await;
        assert_eq!(status, 200, "{}", proxy.logs());
        assert!(echoes(&mut signer).await);
        let (status, mut batch) = connect_request("127.0.0.6", "127.0.0.11:443").await;
        assert_eq!(status, 200);
        assert!(echoes(&mut batch).await);

        // signer's entry loses 127.0.0.10; batch's is unchanged.
        // (The fixed route moves to what the entry still allows: a route no allowlist allows
        // would fail the reload.)
        let tightened = config("      - {address: 127.0.0.13, port: 443}\n")
            .replace("remote: \"127.0.0.10:443\"", "remote: \"127.0.0.13:443\"");
        proxy
            .reload_with(&path, &tightened, "allowlist reloaded", 1)
            .await;
        assert!(closed_without_a_byte(&mut signer, WAIT).await);
        assert!(
            proxy.wait_for_log("reason=\"revoked\"", WAIT).await,
            "{}",
            proxy.logs()
        );
        assert!(echoes(&mut batch).await, "batch's connection stays open");
        assert!(
            proxy
                .logs()
                .contains("1 open connection the new allowlist denies closed"),
            "{}",
            proxy.logs()
        );
    });
}

/// nitro-cli's JSON for one running enclave.
const DESCRIBED: &str = r#"[{"EnclaveName": "signer", "EnclaveID": "i-0123-enc1", "ProcessID": 7,
 "EnclaveCID": 16, "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 512, "State": "RUNNING",
 "Flags": "NONE", "Measurements": {"HashAlgorithm": "Sha384 { ... }",
 "PCR0": "aa", "PCR1": "bb", "PCR2": "cc"}}]"#;

/// A stand-in `--enclaves-command`: a script whose behaviour the test switches by rewriting
/// `mode` (ok, fail, hang, garbage).
fn stand_in_command(dir: &tempfile::TempDir) -> std::path::PathBuf {
    write(dir, "described.json", DESCRIBED);
    write(dir, "mode", "ok");
    let script = write(
        dir,
        "describe-enclaves",
        &format!(
            "#!/bin/sh\nd={}\ncase $(cat \"$d/mode\") in\n  ok) cat \"$d/described.json\" ;;\n  fail) echo 'Error: cannot connect' >&2; exit 1 ;;\n  hang) exec sleep 60 ;;\n  *) echo 'not json' ;;\nesac\n",
            dir.path().display()
        ),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn a_failing_hanging_or_garbled_command_leaves_only_cid_and_source_matches() {
    run_in_netns(|| async {
        let _ups = start_upstreams().await;
        let dir = tempfile::tempdir().unwrap();
        let script = stand_in_command(&dir);
        // signer matches by name (needs the command); local by source (never needs it).
        let yaml = format!(
            "allowlist:\n  - {{address: 127.0.0.12, port: 443}}\n\
             enclaves:\n\
             \x20 - id: signer\n    match: {{name: signer}}\n    allowlist:\n      - {{address: 127.0.0.11, port: 443}}\n\
             \x20 - id: local\n    match: {{source: \"127.0.0.5/32\"}}\n    allowlist:\n      - {{address: 127.0.0.10, port: 443}}\n\
             routes:\n  - listen: \"{CONNECT_ROUTE}\"\n    mode: connect\n"
        );
        let path = write(&dir, "p.yaml", &yaml);

        // --check-config runs it once; a failure there is a warning, not an error.
        let checked = run_to_exit(
            &[
                "--check-config",
                "--config",
                path.to_str().unwrap(),
                "--enclaves-command",
                script.to_str().unwrap(),
            ],
            WAIT,
        );
        assert_eq!(checked.status.code(), Some(0), "{checked:?}");
        assert!(
            checked.stdout.contains("lists 1 running enclave"),
            "{checked:?}"
        );
        assert!(
            checked
                .stdout
                .contains("enclave signer (enclaves[0], line 4): matches name signer"),
            "{checked:?}"
        );
        write(&dir, "mode", "fail");
        let checked = run_to_exit(
            &[
                "--check-config",
                "--config",
                path.to_str().unwrap(),
                "--enclaves-command",
                script.to_str().unwrap(),
            ],
            WAIT,
        );
        assert_eq!(checked.status.code(), Some(0), "{checked:?}");
        assert!(
            checked.stderr.contains("warning: --enclaves-command")
                && checked.stderr.contains("cannot connect"),
            "{checked:?}"
        );

        write(&dir, "mode", "ok");
        let command = script.display().to_string();
        let proxy = Proxy::spawn(&[
            "--config",
            path.to_str().unwrap(),
            "--enclaves-command",
            &command,
            "--enclaves-refresh",
            "1s",
            "--metrics-listen",
            &format!("tcp:{METRICS}"),
        ]);
        proxy.wait_ready(CONNECT_ROUTE).await;
        assert!(
            proxy.wait_for_log("lists 1 running enclave", WAIT).await,
            "{}",
            proxy.logs()
        );
        let runs = |samples: &std::collections::BTreeMap<String, f64>, result: &str| {
            common::metrics::value(
                samples,
                &format!("nitro_vsock_proxy_enclaves_command_runs_total{{result=\"{result}\"}}"),
            )
        };
        for (mode, result, log) in [
            ("fail", "failed", "--enclaves-command failed"),
            ("hang", "timeout", "did not finish within 5s"),
            ("garbage", "invalid", "printed something else"),
        ] {
            write(&dir, "mode", mode);
            assert!(
                proxy.wait_for_log(log, Duration::from_secs(15)).await,
                "{mode}: {}",
                proxy.logs()
            );
            assert!(runs(&scrape().await, result) >= 1.0, "{mode}");
            // The source match holds whatever the command does.
            let (status, mut tunnel) = connect_request("127.0.0.5", "127.0.0.10:443").await;
            assert_eq!(status, 200, "{mode}: {}", proxy.logs());
            assert!(echoes(&mut tunnel).await);
        }
        // Logged once per change of state, not per run: several failed runs, one line.
        let samples = scrape().await;
        assert!(runs(&samples, "ok") >= 1.0, "{samples:?}");
        assert_eq!(
            proxy.logs().matches("--enclaves-command failed").count(),
            1,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn bad_enclaves_entries_name_the_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, needle) in [
        (
            "allowlist: [{address: a.example, port: 443}]\nenclaves:\n  - id: x\n    match: {}\n",
            "enclaves[0].match: `match` needs at least one key",
        ),
        (
            "allowlist: [{address: a.example, port: 443}]\nenclaves:\n  - id: x\n    match: {pcr0: abc}\n",
            "is not a PCR: 96 hex digits",
        ),
        (
            "allowlist: [{address: a.example, port: 443}]\nenclaves:\n  - {id: x, match: {cid: 16}}\n  - {id: x, match: {cid: 17}}\n",
            "enclaves[1].id: id \"x\" is already the id of enclaves[0]",
        ),
        (
            "allowlist: [{address: a.example, port: 443}]\nenclaves:\n  - {id: x, match: {cid: 16}}\nroutes:\n  - {listen: 8000, remote: 'a.example:443', enclaves: [y]}\n",
            "routes[0].enclaves: \"y\" is not the id of an `enclaves:` entry (the ids are x)",
        ),
        (
            "allowlist: [{address: a.example, port: 443}]\nenclaves:\n  - {id: x, match: {colour: red}}\n",
            "unknown field `colour`",
        ),
    ] {
        let path = write(&dir, "bad.yaml", yaml);
        let exit = run_to_exit(&["--check-config", "--config", path.to_str().unwrap()], WAIT);
        assert_eq!(exit.status.code(), Some(2), "{yaml}: {exit:?}");
        assert!(exit.stderr.contains(needle), "{yaml}: {exit:?}");
        assert!(exit.stderr.contains("line "), "{yaml}: {exit:?}");
    }
}

/// `dig +tcp` from `source` to the dns route on 127.0.0.1:8053: its status and addresses.
async fn dig_from(source: &str, name: &str) -> (String, Vec<String>) {
    let out = tokio::process::Command::new("dig")
        .args([
            "+tcp",
            "+tries=1",
            "+time=10",
            "-b",
            source,
            "-p",
            "8053",
            "@127.0.0.1",
            name,
            "A",
        ])
        .output()
        .await
        .expect("cannot run dig (scripts/install-deps.sh installs bind9-dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "dig {name} from {source}: {text}");
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no status: {text}"))
        .to_owned();
    let addresses = text
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|section| {
            section
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (status, addresses)
}

#[test]
fn the_dns_route_answers_per_enclave() {
    run_in_netns(|| async {
        let dns = common::dns::TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        dns.set("kms.test", &["192.0.2.10".parse().unwrap()], 60);
        dns.set("common.test", &["192.0.2.20".parse().unwrap()], 60);
        let dir = tempfile::tempdir().unwrap();
        let yaml = "allowlist:\n  - {address: common.test, port: 443}\n\
                    enclaves:\n  - id: signer\n    match: {source: \"127.0.0.5/32\"}\n    allowlist:\n      - {address: kms.test, port: 443}\n\
                    routes:\n  - {listen: 'tcp:127.0.0.1:8053', mode: dns}\n";
        let path = write(&dir, "p.yaml", yaml);
        let proxy = Proxy::spawn(&[
            "--config",
            path.to_str().unwrap(),
            "--nameserver",
            "127.0.0.1:53",
        ]);
        proxy.wait_ready("tcp:127.0.0.1:8053").await;
        // A name only signer's entry allows: answered to signer, blocked for everyone else.
        assert_eq!(
            dig_from("127.0.0.5", "kms.test").await,
            ("NOERROR".to_owned(), vec!["192.0.2.10".to_owned()])
        );
        assert_eq!(dig_from("127.0.0.6", "kms.test").await.0, "NXDOMAIN");
        assert!(
            proxy.wait_for_log("reason=\"dns_blocked\"", WAIT).await,
            "{}",
            proxy.logs()
        );
        let blocked = proxy
            .logs()
            .lines()
            .find(|l| l.contains("dns_blocked"))
            .unwrap()
            .to_owned();
        assert!(blocked.contains("enclave=\"-\""), "{blocked}");
        // The top-level allowlist's names are everyone's.
        for source in ["127.0.0.5", "127.0.0.6"] {
            assert_eq!(
                dig_from(source, "common.test").await,
                ("NOERROR".to_owned(), vec!["192.0.2.20".to_owned()])
            );
        }
    });
}

#[test]
fn the_shipped_enclaves_example_passes_check_config_and_a_missing_nitro_cli_is_a_warning() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/enclaves.example.yaml");
    let exit = run_to_exit(
        &[
            "--check-config",
            "--config",
            example,
            "--enclaves-command",
            "/nonexistent/nitro-cli describe-enclaves --metadata",
        ],
        WAIT,
    );
    assert_eq!(exit.status.code(), Some(0), "{exit:?}");
    assert!(
        exit.stdout
            .contains("allowed by the allowlist of enclave signer (enclaves[0])"),
        "{exit:?}"
    );
    assert!(
        exit.stdout
            .contains("enclave batch (enclaves[1], line 23): matches cid 17"),
        "{exit:?}"
    );
    assert!(
        exit.stderr.contains("warning: --enclaves-command")
            && exit.stderr.contains("cannot run /nonexistent/nitro-cli"),
        "{exit:?}"
    );
}
