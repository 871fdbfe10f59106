//! Tier 1 of the VM test tier: the real daemon over real AF_VSOCK, inside a throwaway qemu VM.
//!
//! The host kernel has no vsock loopback transport, and vsock CIDs 2 and 3 on the host are the
//! machine's own hypervisor channel, so these tests do their work only inside the VM that
//! `make vm-test` (`tests/vm/run.sh`) boots: its `/init` loads `vsock_loopback` and sets
//! `NVP_VM_TIER=1`. There the daemon listens on `vsock:PORT` (VMADDR_CID_ANY) and each test
//! connects to CID 1 (VMADDR_CID_LOCAL). Run by `cargo test` on the host, every test returns at
//! once and the file prints one line saying it was skipped; the VM runner fails if that line
//! ever appears inside the VM.
//!
//! Each test proves it used vsock, so a fallback to a stand-in transport cannot pass it: the
//! client socket's domain is `AF_VSOCK` and its peer is CID 1 at the daemon's port, the daemon
//! logs `listen=vsock:PORT`, and the daemon's log line for the connection names the peer
//! `vsock:1:LOCAL_PORT` with the client socket's own local port.
//!
//! Everything else is as in the host integration tests (`tests/common`): each test gets its own
//! network namespace (vsock itself is not namespaced, so every test uses its own vsock port)
//! with an in-process DNS server on 127.0.0.1:53 and real upstream servers on test addresses
//! added to `lo`, including listeners on addresses the daemon must never reach.
//!
//! Transparent egress runs here too, whole: an "enclave" network namespace with only `lo`,
//! `enclave-app/egress.nft` and the routes `enclave-app egress --print-setup` prints,
//! `enclave-app egress` asking the daemon's dns and connect routes over vsock to CID 1, and curl,
//! unmodified, reaching a TLS upstream by name
//! (`egress_over_vsock_reaches_an_allowed_name_and_not_an_unlisted_one`).
//!
//! The enclave-app chain test (forwarder → daemon → HTTPS stand-in, server ← client) belongs in
//! this VM too; see "Hooks" in `tests/vm/README.md`.

mod common;
#[path = "../enclave-app/tests/support/enclave.rs"]
#[allow(dead_code)]
mod enclave;

use std::collections::BTreeSet;
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::time::Duration;

use common::dns::TestDns;
use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::Proxy;
use common::upstream::{
    echo_server, receive_hashed, response_server, send_pattern, sink_source_server,
};
use common::vm::{in_vm, socket_domain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_LOCAL};

const DNS_ADDR: &str = "127.0.0.1:53";

/// Generous: everything runs under software CPU emulation.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Connects to the daemon's vsock port on CID 1 and proves the connection is AF_VSOCK: the
/// socket's domain, and its peer being CID 1 at `port`. Returns the stream and its local port
/// (what the daemon logs as `peer=vsock:1:PORT`).
async fn vsock_connect(port: u32) -> (VsockStream, u32) {
    let stream = tokio::time::timeout(
        IO_TIMEOUT,
        VsockStream::connect(VsockAddr::new(VMADDR_CID_LOCAL, port)),
    )
    .await
    .unwrap_or_else(|_| panic!("vsock connect to 1:{port} timed out"))
    .unwrap_or_else(|e| panic!("vsock connect to 1:{port} failed: {e}"));
    assert_eq!(
        socket_domain(&stream),
        libc::AF_VSOCK,
        "the client socket is not AF_VSOCK"
    );
    let peer = stream.peer_addr().expect("vsock peer_addr");
    assert_eq!(
        (peer.cid(), peer.port()),
        (VMADDR_CID_LOCAL, port),
        "the vsock peer is not CID 1 at the daemon's port"
    );
    let local = stream.local_addr().expect("vsock local_addr");
    (stream, local.port())
}

/// The usual daemon of these tests: vsock `port` to 192.0.2.10:443, with an allowlist naming
/// exactly that and `extra` arguments.
async fn start_daemon_to_test_upstream(
    dir: &tempfile::TempDir,
    port: u32,
    extra: &[&str],
) -> Proxy {
    start_daemon(
        dir,
        &format!("vsock:{port}"),
        port,
        "allowlist:\n- {address: 192.0.2.10, port: 443}\n",
        "192.0.2.10",
        extra,
    )
    .await
}

/// Starts the daemon listening on `listen` (a vsock listen address) for `remote`:443 with
/// `yaml` as its allowlist, asking the test's DNS server, and waits until it logs that it
/// listens on vsock port `port` of any CID.
async fn start_daemon(
    dir: &tempfile::TempDir,
    listen: &str,
    port: u32,
    yaml: &str,
    remote: &str,
    extra: &[&str],
) -> Proxy {
    let config = common::write_allowlist(dir, yaml);
    let mut args: Vec<String> = vec![
        listen.into(),
        remote.into(),
        "443".into(),
        "--config".into(),
        config,
        "--nameserver".into(),
        DNS_ADDR.into(),
        "--dns-timeout".into(),
        "2s".into(),
        "--connect-timeout".into(),
        "5s".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let proxy = Proxy::spawn(&args);
    let listening = format!("listen=vsock:{port}");
    assert!(
        proxy.wait_for_log(&listening, LOG_TIMEOUT).await,
        "the daemon did not log `{listening}`:\n{}",
        proxy.logs()
    );
    proxy
}

/// Starts the daemon with `yaml` (allowlist and `routes:`, no positional route), asking the
/// test's DNS server, and waits until it logs that it listens on each of `ports`.
async fn start_routes_daemon(dir: &tempfile::TempDir, yaml: &str, ports: &[u32]) -> Proxy {
    let config = common::write_allowlist(dir, yaml);
    let proxy = Proxy::spawn(&[
        "--config",
        &config,
        "--nameserver",
        DNS_ADDR,
        "--dns-timeout",
        "2s",
    ]);
    let shown: Vec<String> = ports.iter().map(|p| format!("vsock:{p}")).collect();
    let listening = format!("listen={}", shown.join(" "));
    assert!(
        proxy.wait_for_log(&listening, LOG_TIMEOUT).await,
        "the daemon did not log `{listening}`:\n{}",
        proxy.logs()
    );
    proxy
}

/// The vsock ports of the CID-1 peers a daemon log line names (`peer=vsock:1:PORT`).
fn vsock_peer_ports(line: &str) -> impl Iterator<Item = u32> + '_ {
    // Span fields are bare (`peer=vsock:1:P`); audit events quote theirs (`peer="vsock:1:P"`).
    line.split("peer=").skip(1).filter_map(|rest| {
        let rest = rest.trim_start_matches('"').strip_prefix("vsock:1:")?;
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        rest[..digits].parse().ok()
    })
}

/// Waits until one daemon log line names the vsock peer CID 1 at `peer_port` (the client's
/// local port) and contains every needle; panics with the logs otherwise.
async fn assert_log_line(proxy: &Proxy, peer_port: u32, needles: &[&str]) {
    let found = common::wait_until(LOG_TIMEOUT, || {
        proxy.logs().lines().any(|line| {
            vsock_peer_ports(line).any(|p| p == peer_port)
                && needles.iter().all(|n| line.contains(n))
        })
    })
    .await;
    assert!(
        found,
        "no daemon log line names peer=vsock:1:{peer_port} and contains all of {needles:?}:\n{}",
        proxy.logs()
    );
}

/// Writes `msg` over vsock, half-closes, and returns what came back before the close.
async fn round_trip(port: u32, msg: &[u8]) -> (Vec<u8>, u32) {
    let (mut conn, local_port) = vsock_connect(port).await;
    // A denied connection may already be closed: a failed write or half-close is part of the
    // outcome.
    let _ = conn.write_all(msg).await;
    let _ = conn.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let read = tokio::time::timeout(IO_TIMEOUT, conn.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the daemon neither answered nor closed");
    (reply, local_port)
}

#[test]
fn vsock_loopback_transport_works_without_the_daemon() {
    // Checks the VM itself, so a failure of the daemon tests cannot be the transport's.
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const PORT: u32 = 7000;
        let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, PORT)).unwrap();
        assert_eq!(socket_domain(&listener), libc::AF_VSOCK);
        let server = tokio::spawn(async move {
            let (mut s, peer) = listener.accept().await.unwrap();
            let mut data = Vec::new();
            s.read_to_end(&mut data).await.unwrap();
            s.write_all(&data).await.unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            peer
        });
        let (mut conn, local_port) = vsock_connect(PORT).await;
        let data = common::upstream::pattern(1, 1 << 20);
        conn.write_all(&data).await.unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        conn.read_to_end(&mut back).await.unwrap();
        assert!(back == data, "1 MiB echo over vsock differs");
        let peer = server.await.unwrap();
        assert_eq!((peer.cid(), peer.port()), (VMADDR_CID_LOCAL, local_port));
    });
}

#[test]
fn allowed_connection_is_relayed_and_logged_with_its_vsock_peer() {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dns = TestDns::start(DNS_ADDR.parse().unwrap()).await;
        dns.set("api.test", &[ip("192.0.2.10")], 60);
        let dir = tempfile::tempdir().unwrap();
        // `8001`: AWS's form, vsock port 8001 on any CID.
        let proxy = start_daemon(
            &dir,
            "8001",
            8001,
            "allowlist:\n- {address: api.test, port: 443}\n",
            "api.test",
            &[],
        )
        .await;

        let (reply, local_port) = round_trip(8001, b"hello over vsock").await;
        assert_eq!(reply, b"hello over vsock");
        assert_eq!(up.accepted(), 1);
        assert!(dns.queries("api.test") >= 1, "the daemon did not ask DNS");
        assert_log_line(
            &proxy,
            local_port,
            &[
                "upstream=192.0.2.10:443",
                "connection closed",
                "bytes_to_upstream=16 bytes_to_client=16",
                "end=completed",
            ],
        )
        .await;
    });
}

#[test]
fn denied_connections_are_closed_and_logged_with_their_vsock_peer() {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const PORT: u32 = 8002;
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("169.254.169.254"));
        add_lo_addr(ip("198.51.100.20"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        // Listeners where a wrong connect would land, so it is caught, not sent anywhere.
        let metadata = echo_server("169.254.169.254:443".parse().unwrap()).await;
        let unlisted = echo_server("198.51.100.20:443".parse().unwrap()).await;
        let dns = TestDns::start(DNS_ADDR.parse().unwrap()).await;
        dns.set("api.test", &[ip("192.0.2.10")], 1);
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_daemon(
            &dir,
            &format!("vsock:{PORT}"),
            PORT,
            "allowlist:\n- {address: 192.0.2.0/24, port: 443}\n",
            "api.test",
            &[],
        )
        .await;
        assert_eq!(round_trip(PORT, b"allowed").await.0, b"allowed");

        // The name now points at the instance metadata service: denied whatever DNS says.
        dns.set("api.test", &[ip("169.254.169.254")], 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (reply, local_port) = round_trip(PORT, b"steal credentials").await;
        assert_eq!(reply, b"", "a denied connection got data");
        assert_log_line(
            &proxy,
            local_port,
            &["WARN", "connection refused", "169.254.169.254 denied"],
        )
        .await;

        // ... and at an address outside the allowlisted block.
        dns.set("api.test", &[ip("198.51.100.20")], 1);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (reply, local_port) = round_trip(PORT, b"elsewhere").await;
        assert_eq!(reply, b"", "a denied connection got data");
        assert_log_line(
            &proxy,
            local_port,
            &["WARN", "connection refused", "198.51.100.20 denied"],
        )
        .await;

        assert_eq!(
            metadata.accepted(),
            0,
            "the daemon connected to 169.254.169.254"
        );
        assert_eq!(
            unlisted.accepted(),
            0,
            "the daemon connected to 198.51.100.20"
        );
        assert_eq!(up.accepted(), 1);
    });
}

#[test]
fn two_routes_over_vsock_each_reach_their_own_upstream() {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const KMS: u32 = 8010;
        const SECRETS: u32 = 8013;
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("192.0.2.20"));
        let kms = response_server("192.0.2.10:443".parse().unwrap(), b"kms".to_vec()).await;
        let secrets = response_server("192.0.2.20:443".parse().unwrap(), b"secrets".to_vec()).await;
        let dns = TestDns::start(DNS_ADDR.parse().unwrap()).await;
        dns.set("kms.test", &[ip("192.0.2.10")], 60);
        dns.set("secrets.test", &[ip("192.0.2.20")], 60);
        let dir = tempfile::tempdir().unwrap();
        // No positional route: both come from the file's `routes:`, one by port alone (AWS's
        // form, any CID), one as vsock:CID:PORT with any CID spelled out.
        let yaml = &format!(
                "allowlist:\n- {{address: kms.test, port: 443}}\n- {{address: secrets.test, port: 443}}\n\
                 routes:\n- {{listen: {KMS}, remote: 'kms.test:443'}}\n\
                 - {{listen: 'vsock:any:{SECRETS}', remote: 'secrets.test:443', max_connections: 8}}\n"
            );
        let proxy = start_routes_daemon(&dir, yaml, &[KMS, SECRETS]).await;
        for _ in 0..2 {
            let (reply, kms_port) = round_trip(KMS, b"encrypt").await;
            assert_eq!(reply, b"kms");
            assert_log_line(
                &proxy,
                kms_port,
                &[
                    &format!("route=vsock:{KMS} "),
                    "upstream=192.0.2.10:443",
                    "connection closed",
                ],
            )
            .await;
            let (reply, secrets_port) = round_trip(SECRETS, b"get secret").await;
            assert_eq!(reply, b"secrets");
            assert_log_line(
                &proxy,
                secrets_port,
                &[
                    &format!("route=vsock:{SECRETS} "),
                    "upstream=192.0.2.20:443",
                    "connection closed",
                ],
            )
            .await;
        }
        assert_eq!((kms.accepted(), secrets.accepted()), (2, 2));
    });
}

#[test]
fn connect_and_sni_routes_over_vsock() {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const CONNECT: u32 = 8030;
        const SNI: u32 = 8031;
        add_lo_addr(ip("192.0.2.10"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dns = TestDns::start(DNS_ADDR.parse().unwrap()).await;
        dns.set("api.test", &[ip("192.0.2.10")], 60);
        dns.set("bucket.s3.test", &[ip("192.0.2.10")], 60);
        dns.set("evil.test", &[ip("192.0.2.10")], 60);
        let dir = tempfile::tempdir().unwrap();
        let yaml = &format!(
                "allowlist:\n- {{address: api.test, port: 443}}\n- {{address: '*.s3.test', port: 443}}\n\
                 routes:\n- {{listen: {CONNECT}, mode: connect}}\n- {{listen: {SNI}, mode: sni, port: 443}}\n"
            );
        let proxy = start_routes_daemon(&dir, yaml, &[CONNECT, SNI]).await;
        // CONNECT: 200, then the tunnel (the echo upstream sends the bytes back).
        let (mut conn, connect_port) = vsock_connect(CONNECT).await;
        conn.write_all(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\ntunnelled")
            .await
            .unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(IO_TIMEOUT, conn.read_to_end(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "HTTP/1.1 200 Connection Established\r\n\r\ntunnelled"
        );
        assert_log_line(
            &proxy,
            connect_port,
            &[
                &format!("route=vsock:{CONNECT} "),
                "upstream=192.0.2.10:443",
                "connection closed",
            ],
        )
        .await;
        let (mut conn, _) = vsock_connect(CONNECT).await;
        conn.write_all(b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(IO_TIMEOUT, conn.read_to_end(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 403 "),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        // SNI: the ClientHello is read, checked and sent on unchanged.
        let hello = nitro_vsock_proxy::proxy::request::sni::example_client_hello("bucket.s3.test");
        let (reply, sni_port) = round_trip(SNI, &hello).await;
        assert!(reply == hello, "the ClientHello did not arrive unchanged");
        assert_log_line(
            &proxy,
            sni_port,
            &[
                &format!("route=vsock:{SNI} "),
                "upstream=192.0.2.10:443",
                "connection closed",
            ],
        )
        .await;
        let (reply, _) = round_trip(
            SNI,
            &nitro_vsock_proxy::proxy::request::sni::example_client_hello("evil.test"),
        )
        .await;
        assert_eq!(reply, b"");
        assert_eq!(
            up.accepted(),
            2,
            "only the two allowed connections reached the upstream"
        );
    });
}

#[test]
fn dns_route_over_vsock_answers_an_allowed_name_and_blocks_an_unlisted_one() {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
        use hickory_proto::rr::{Name, RData, RecordType};
        const DNS: u32 = 8053;
        let dns = TestDns::start(DNS_ADDR.parse().unwrap()).await;
        dns.set("api.test", &[ip("192.0.2.10")], 60);
        dns.set("unlisted.test", &[ip("192.0.2.10")], 60);
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "allowlist:\n- {{address: api.test, port: 443}}\nroutes:\n- {{listen: {DNS}, mode: dns}}\n"
        );
        let proxy = start_routes_daemon(&dir, &yaml, &[DNS]).await;
        let (mut conn, peer_port) = vsock_connect(DNS).await;
        // Two queries pipelined on one vsock stream, each behind its two-byte length.
        for (id, name) in [(1u16, "api.test."), (2, "unlisted.test.")] {
            let mut query = Message::new(id, MessageType::Query, OpCode::Query);
            query.metadata.recursion_desired = true;
            query.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            query.set_edns(Edns::new());
            let bytes = query.to_vec().unwrap();
            let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            conn.write_all(&framed).await.unwrap();
        }
        let mut answers = std::collections::HashMap::new();
        for _ in 0..2 {
            let mut len = [0u8; 2];
            tokio::time::timeout(IO_TIMEOUT, conn.read_exact(&mut len))
                .await
                .expect("an answer in time")
                .unwrap();
            let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
            conn.read_exact(&mut body).await.unwrap();
            let m = Message::from_vec(&body).unwrap();
            answers.insert(m.metadata.id, m);
        }
        let allowed = &answers[&1];
        assert_eq!(allowed.metadata.response_code, ResponseCode::NoError);
        let ips: Vec<IpAddr> = allowed
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect();
        assert_eq!(ips, [ip("192.0.2.10")]);
        assert_eq!(answers[&2].metadata.response_code, ResponseCode::NXDomain);
        assert!(answers[&2].edns.is_some(), "EDE rides in an OPT record");
        drop(conn);
        assert_log_line(
            &proxy,
            peer_port,
            &[
                &format!("route=vsock:{DNS} "),
                "queries=2",
                "connection closed",
            ],
        )
        .await;
        assert!(
            proxy
                .logs()
                .contains("DNS query blocked: unlisted.test A is not in the allowlist"),
            "{}",
            proxy.logs()
        );
    });
}

/// nitro-cli's JSON naming the enclave at CID 1 (the loopback transport's peer) `signer`, with
/// `pcr0`.
fn described_at_cid_1(pcr0: &str) -> String {
    format!(
        "[{{\"EnclaveName\": \"signer\", \"EnclaveID\": \"i-0-enc1\", \"ProcessID\": 7, \
         \"EnclaveCID\": 1, \"NumberOfCPUs\": 2, \"CPUIDs\": [1, 3], \"MemoryMiB\": 512, \
         \"State\": \"RUNNING\", \"Flags\": \"NONE\", \"Measurements\": {{\"HashAlgorithm\": \
         \"Sha384 {{ ... }}\", \"PCR0\": \"{pcr0}\", \"PCR1\": \"{pcr0}\", \"PCR2\": \"{pcr0}\"}}}}]"
    )
}

#[test]
fn per_enclave_policy_matches_the_kernels_peer_cid_by_cid_and_by_name_and_pcr0_and_revokes_a_replaced_image(
) {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const SIGNER: u32 = 8040;
        const BATCH: u32 = 8041;
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("192.0.2.20"));
        let kms = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let s3 = echo_server("192.0.2.20:443".parse().unwrap()).await;
        let _dns = TestDns::start(DNS_ADDR.parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let image_a = "a".repeat(96);
        let image_b = "b".repeat(96);
        // The stand-in --enclaves-command: prints what the test last wrote, as nitro-cli would.
        let described = dir.path().join("described.json");
        std::fs::write(&described, described_at_cid_1(&image_a)).unwrap();
        let script = dir.path().join("describe-enclaves");
        std::fs::write(&script, format!("#!/bin/sh\ncat {}\n", described.display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Nothing at the top level: what a peer reaches comes from the entries it matches.
        let yaml = format!(
            "allowlist: []\n\
             enclaves:\n\
             - id: batch\n  match: {{cid: 1}}\n  allowlist:\n  - {{address: 192.0.2.20, port: 443}}\n\
             - id: signer\n  match: {{name: signer, pcr0: \"{}\"}}\n  allowlist:\n  - {{address: 192.0.2.10, port: 443}}\n\
             routes:\n\
             - {{listen: {SIGNER}, remote: '192.0.2.10:443'}}\n\
             - {{listen: {BATCH}, remote: '192.0.2.20:443', enclaves: [batch]}}\n",
            image_a.to_uppercase()
        );
        let config = common::write_allowlist(&dir, &yaml);
        let command = script.display().to_string();
        let proxy = Proxy::spawn(&[
            "--config",
            &config,
            "--nameserver",
            DNS_ADDR,
            "--enclaves-command",
            &command,
            "--enclaves-refresh",
            "1s",
        ]);
        let listening = format!("listen=vsock:{SIGNER} vsock:{BATCH}");
        assert!(
            proxy.wait_for_log(&listening, LOG_TIMEOUT).await,
            "{}",
            proxy.logs()
        );

        // The kernel's peer CID (1) is looked up in the command's output: name and PCR0 (given
        // in upper case in the file) match signer, the CID matches batch.
        let (reply, port) = round_trip(SIGNER, b"sign").await;
        assert_eq!(reply, b"sign", "{}", proxy.logs());
        assert_log_line(&proxy, port, &["enclave=batch,signer", "connection closed"]).await;
        let (reply, _) = round_trip(BATCH, b"list").await;
        assert_eq!(reply, b"list");

        // An open connection of the image, then another image under the same name.
        let (mut open, open_port) = vsock_connect(SIGNER).await;
        open.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        tokio::time::timeout(IO_TIMEOUT, open.read_exact(&mut echo))
            .await
            .expect("no echo")
            .unwrap();
        std::fs::write(&described, described_at_cid_1(&image_b)).unwrap();
        // The refresh (every second) notices, and the connection is closed.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(IO_TIMEOUT, open.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "the replaced image's connection stayed open"
        );
        assert_log_line(&proxy, open_port, &["reason=\"revoked\""]).await;
        // New connections of the new image: not signer's any more, still batch's by CID.
        let (reply, _) = round_trip(SIGNER, b"sign").await;
        assert!(reply.is_empty(), "the new image reached signer's upstream");
        let (reply, _) = round_trip(BATCH, b"list").await;
        assert_eq!(reply, b"list");
        assert_eq!(
            kms.accepted(),
            2,
            "the new image's connection reached nothing"
        );
        assert!(s3.accepted() >= 2);
    });
}

#[test]
fn half_close_over_vsock_lets_the_response_through() {
    half_close_over_vsock(8003, "auto");
}

#[test]
fn half_close_over_vsock_lets_the_response_through_copy() {
    half_close_over_vsock(8033, "copy");
}

/// A request, a half-close, then the whole response, through the daemon on vsock `port` with
/// `--relay relay`.
fn half_close_over_vsock(port: u32, relay: &'static str) {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(move || async move {
        add_lo_addr(ip("192.0.2.10"));
        // Answers only after it reads the client's EOF: the half-close must be passed on.
        let up = response_server(
            "192.0.2.10:443".parse().unwrap(),
            b"the whole response".to_vec(),
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_daemon_to_test_upstream(&dir, port, &["--relay", relay]).await;
        let (mut conn, local_port) = vsock_connect(port).await;
        conn.write_all(b"GET /ip-ranges.json").await.unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(IO_TIMEOUT, conn.read_to_end(&mut reply))
            .await
            .expect("no response after the half-close")
            .unwrap();
        assert_eq!(reply, b"the whole response");
        let report = up.wait_result(IO_TIMEOUT).await;
        assert_eq!(report.head, b"GET /ip-ranges.json");
        assert_log_line(
            &proxy,
            local_port,
            &[
                "connection closed",
                "bytes_to_upstream=19 bytes_to_client=18",
            ],
        )
        .await;
    });
}

#[test]
fn sixty_four_mib_each_way_over_vsock_arrive_intact() {
    sixty_four_mib_each_way_over_vsock(8004, "auto");
}

#[test]
fn sixty_four_mib_each_way_over_vsock_arrive_intact_copy() {
    sixty_four_mib_each_way_over_vsock(8034, "copy");
}

/// 64 MiB each way at once through the daemon on vsock `port` with `--relay relay`, each
/// direction checked with SHA-256.
fn sixty_four_mib_each_way_over_vsock(port: u32, relay: &'static str) {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(move || async move {
        const SIZE: usize = 64 * 1024 * 1024;
        const CLIENT_SEED: u64 = 0xC11E_4700;
        add_lo_addr(ip("192.0.2.10"));
        let up = sink_source_server("192.0.2.10:443".parse().unwrap(), SIZE).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_daemon_to_test_upstream(&dir, port, &["--relay", relay]).await;
        let (conn, local_port) = vsock_connect(port).await;
        let (rd, wr) = conn.into_split();

        let sender = tokio::spawn(send_pattern(wr, CLIENT_SEED, SIZE, None));
        let receiver = tokio::spawn(receive_hashed(rd, None));
        let long = Duration::from_secs(120);
        let sent_hash = tokio::time::timeout(long, sender)
            .await
            .expect("sending 64 MiB timed out")
            .unwrap();
        let (received, received_hash) = tokio::time::timeout(long, receiver)
            .await
            .expect("receiving 64 MiB timed out")
            .unwrap();
        let upstream = up.wait_result(long).await;

        assert_eq!(upstream.received, SIZE as u64, "bytes to upstream");
        assert_eq!(
            upstream.received_sha256, sent_hash,
            "upstream got different bytes"
        );
        assert_eq!(received, SIZE, "bytes to the vsock client");
        assert_eq!(
            received_hash, upstream.sent_sha256,
            "the vsock client got different bytes"
        );
        assert_log_line(
            &proxy,
            local_port,
            &[
                &format!("bytes_to_upstream={SIZE} bytes_to_client={SIZE}"),
                "end=completed",
            ],
        )
        .await;
    });
}

#[test]
fn two_hundred_concurrent_vsock_connections() {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const PORT: u32 = 8005;
        const N: usize = 200;
        const CONNECTING: usize = 64;
        add_lo_addr(ip("192.0.2.10"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_daemon_to_test_upstream(&dir, PORT, &[]).await;
        // All of them are open at once: each gets its echo, then waits for every other. At
        // most CONNECTING connections are waiting to be accepted at a time, below the daemon's
        // listen backlog (see `a_burst_of_connects_while_the_daemon_is_busy_is_queued_not_reset`).
        let barrier = Arc::new(tokio::sync::Barrier::new(N));
        let connecting = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
        let mut tasks = Vec::new();
        for i in 0..N {
            let barrier = barrier.clone();
            let connecting = connecting.clone();
            tasks.push(tokio::spawn(async move {
                // Held until the echo proves the daemon accepted this one.
                let permit = connecting.acquire().await.unwrap();
                let (mut conn, local_port) = vsock_connect(PORT).await;
                let msg = format!("vsock connection {i} says hello");
                conn.write_all(msg.as_bytes()).await.unwrap();
                let mut buf = vec![0u8; msg.len()];
                conn.read_exact(&mut buf).await.unwrap();
                assert_eq!(buf, msg.as_bytes());
                drop(permit);
                barrier.wait().await;
                conn.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                conn.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                local_port
            }));
        }
        let mut client_ports = BTreeSet::new();
        for t in tasks {
            let port = tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("a vsock connection hung")
                .unwrap();
            client_ports.insert(port);
        }
        assert_eq!(client_ports.len(), N, "client ports are not distinct");
        assert_eq!(up.accepted(), N);

        // One "connection closed" line per connection, each naming its vsock peer.
        let logged_ports = || -> BTreeSet<u32> {
            proxy
                .logs()
                .lines()
                .filter(|l| l.contains("connection closed"))
                .flat_map(|l| vsock_peer_ports(l).collect::<Vec<_>>())
                .collect()
        };
        common::wait_until(LOG_TIMEOUT, || logged_ports().len() >= N).await;
        assert_eq!(
            logged_ports(),
            client_ports,
            "the daemon's peers are not the clients' vsock ports:\n{}",
            proxy.logs()
        );
        assert!(
            !proxy.logs().contains("connection refused"),
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn max_connections_closes_excess_vsock_connections_at_once_and_recovers() {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const PORT: u32 = 8006;
        add_lo_addr(ip("192.0.2.10"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_daemon_to_test_upstream(&dir, PORT, &["--max-connections", "2"]).await;
        let mut held = Vec::new();
        for i in 0..2u8 {
            let (mut c, _) = vsock_connect(PORT).await;
            c.write_all(&[i]).await.unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.unwrap();
            held.push(c);
        }
        // Excess connections are closed, not queued: EOF (or a reset) instead of a hang.
        let mut excess_ports = Vec::new();
        for _ in 0..5 {
            let (mut c, local_port) = vsock_connect(PORT).await;
            let mut buf = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await;
            assert!(r.is_ok(), "an excess vsock connection was left hanging");
            assert!(buf.is_empty());
            excess_ports.push(local_port);
        }
        assert_eq!(up.accepted(), 2);
        // The (rate-limited) warning names the vsock peer of one of the excess connections.
        let found = common::wait_until(LOG_TIMEOUT, || {
            proxy.logs().lines().any(|l| {
                l.contains("connection limit reached")
                    && vsock_peer_ports(l).any(|p| excess_ports.contains(&p))
            })
        })
        .await;
        assert!(
            found,
            "no limit warning naming an excess vsock peer {excess_ports:?}:\n{}",
            proxy.logs()
        );

        // Freeing a slot lets a new connection through.
        drop(held.pop());
        let mut served = false;
        for _ in 0..50 {
            let (mut c, _) = vsock_connect(PORT).await;
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
        assert!(
            served,
            "the daemon did not serve again after a slot was freed:\n{}",
            proxy.logs()
        );
    });
}

/// vsock, unlike TCP, resets a connect that finds the listener's accept queue full (the client
/// gets ECONNRESET at once; TCP would retry the SYN), so a burst of connects while the daemon is
/// busy must fit into its listen backlog. The daemon is stopped (SIGSTOP) while 200 connects
/// arrive, so none is accepted until all are queued.
#[test]
fn a_burst_of_connects_while_the_daemon_is_busy_is_queued_not_reset() {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const PORT: u32 = 8007;
        const N: usize = 200;
        add_lo_addr(ip("192.0.2.10"));
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let proxy = start_daemon_to_test_upstream(&dir, PORT, &[]).await;
        proxy.signal(libc::SIGSTOP);
        let connects: Vec<_> = (0..N)
            .map(|_| tokio::spawn(VsockStream::connect(VsockAddr::new(VMADDR_CID_LOCAL, PORT))))
            .collect();
        let mut conns = Vec::new();
        let mut failed = 0;
        for c in connects {
            match c.await.unwrap() {
                Ok(conn) => conns.push(conn),
                Err(_) => failed += 1,
            }
        }
        proxy.signal(libc::SIGCONT);
        assert_eq!(
            failed, 0,
            "{failed} of {N} connects were reset while the daemon was busy (listen backlog too small)"
        );
        for (i, conn) in conns.iter_mut().enumerate() {
            let msg = format!("queued {i}");
            conn.write_all(msg.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; msg.len()];
            tokio::time::timeout(IO_TIMEOUT, conn.read_exact(&mut buf))
                .await
                .expect("a queued connection was not served")
                .unwrap();
            assert_eq!(buf, msg.as_bytes());
        }
        assert_eq!(up.accepted(), N);
    });
}

/// Moves `size` bytes each way at once over `conn` (send a pattern, half-close, read to the
/// end; either end of a connection may run it); returns the bytes received and the seconds it
/// took.
async fn both_ways(conn: VsockStream, size: usize) -> (usize, f64) {
    let start = std::time::Instant::now();
    let (mut rd, mut wr) = conn.into_split();
    let sender = tokio::spawn(async move {
        let chunk = common::upstream::pattern(7, 256 * 1024);
        let mut sent = 0;
        while sent < size {
            let n = chunk.len().min(size - sent);
            wr.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
        wr.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(120), rd.read(&mut buf))
            .await
            .expect("the transfer stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        received += n;
    }
    sender.await.unwrap();
    (received, start.elapsed().as_secs_f64())
}

#[test]
fn throughput_shape_over_vsock_proxy_against_a_direct_vsock_connection() {
    // A shape check, not a speed test (software emulation, shared machines): the same
    // transfer over vsock straight to a vsock server and through the daemon to a TCP server,
    // every byte counted; the figures are printed to the console log for the README's
    // performance table. It fails only if bytes go missing.
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const PORT: u32 = 8009;
        const DIRECT_PORT: u32 = 7009;
        const SIZE: usize = 32 * 1024 * 1024;
        add_lo_addr(ip("192.0.2.10"));
        let up = sink_source_server("192.0.2.10:443".parse().unwrap(), SIZE).await;
        let dir = tempfile::tempdir().unwrap();
        let _proxy = start_daemon_to_test_upstream(&dir, PORT, &[]).await;
        // The direct peer: a vsock server doing what the TCP sink/source does.
        let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, DIRECT_PORT)).unwrap();
        let direct_server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            both_ways(s, SIZE).await.0
        });
        let (direct_conn, _) = vsock_connect(DIRECT_PORT).await;
        let (direct_received, direct_seconds) = both_ways(direct_conn, SIZE).await;
        assert_eq!(direct_received, SIZE, "direct: bytes to the client");
        assert_eq!(
            direct_server.await.unwrap(),
            SIZE,
            "direct: bytes to the server"
        );

        let (proxy_conn, _) = vsock_connect(PORT).await;
        let (proxy_received, proxy_seconds) = both_ways(proxy_conn, SIZE).await;
        assert_eq!(proxy_received, SIZE, "proxy: bytes to the client");
        let upstream = up.wait_result(Duration::from_secs(30)).await;
        assert_eq!(
            upstream.received, SIZE as u64,
            "proxy: bytes to the upstream"
        );

        let mib_s = |seconds: f64| 2.0 * SIZE as f64 / (1024.0 * 1024.0) / seconds;
        // Straight to stderr, past libtest's capture, so the console log always has it.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "vsock shape check: {} MiB each way at once: direct vsock {:.0} MiB/s, through the \
             proxy (vsock -> TCP) {:.0} MiB/s, ratio {:.2}",
            SIZE >> 20,
            mib_s(direct_seconds),
            mib_s(proxy_seconds),
            direct_seconds / proxy_seconds
        );
    });
}

/// `enclave-app`, built by cargo next to the daemon (tests/vm/run.sh builds both into the VM).
fn enclave_app_bin() -> std::path::PathBuf {
    let path =
        std::path::Path::new(env!("CARGO_BIN_EXE_nitro-vsock-proxy")).with_file_name("enclave-app");
    assert!(
        path.exists(),
        "{} is missing: tests/vm/run.sh builds it with the daemon (cargo build --workspace \
         --bin nitro-vsock-proxy --bin enclave-app)",
        path.display()
    );
    path
}

/// A process started in the enclave, its stdout and stderr in a file; killed when dropped.
struct EnclaveProcess {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl EnclaveProcess {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        common::wait_until(timeout, || self.logs().contains(needle)).await
    }
}

impl Drop for EnclaveProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client's outcome, for assertion messages.
fn said(out: &std::process::Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Transparent egress over real vsock: the host tier's chain (enclave-app/tests/egress.rs) with
/// `vsock:1:PORT` where that uses `unix:` stand-ins. The test's own namespace is the parent (the
/// daemon with a `mode: dns` route and a `mode: connect` route with `sni: require` on vsock, the
/// test's DNS server, a TLS upstream and a trap listener); the "enclave" is a network namespace
/// with only `lo`, `egress.nft`, the address and routes `enclave-app egress --print-setup`
/// prints, its own resolv.conf naming the stub, and `enclave-app egress --parent-dns
/// vsock:1:DNS --connect-via vsock:1:CONNECT`. vsock is not namespaced, so the enclave reaches the
/// parent's daemon exactly as a Nitro enclave reaches its parent, and only over vsock: the
/// enclave has no route to the parent's addresses.
#[test]
fn egress_over_vsock_reaches_an_allowed_name_and_not_an_unlisted_one() {
    if !in_vm("vsock_vm") {
        return;
    }
    run_in_netns(|| async {
        const DNS_ROUTE: u32 = 8070;
        const CONNECT_ROUTE: u32 = 8071;
        const CLIENT: Duration = Duration::from_secs(60);
        const NFT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/enclave-app/egress.nft");
        let app = enclave_app_bin();

        // The parent.
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("192.0.2.30"));
        let dns = TestDns::start(DNS_ADDR.parse().unwrap()).await;
        dns.set("api.allowed.test", &[ip("192.0.2.10")], 60);
        // The unlisted name resolves too, to the same upstream, which holds a certificate for
        // it: only the allowlist stands between it and the app.
        dns.set("unlisted.test", &[ip("192.0.2.10")], 60);
        let dir = tempfile::tempdir().unwrap();
        let tls = enclave::TlsUpstream::start(
            "192.0.2.10:443".parse().unwrap(),
            &["api.allowed.test", "unlisted.test"],
            dir.path().join("ca.pem"),
        )
        .await;
        let ca = tls.ca_pem.display().to_string();
        // Where a raw IP the allowlist lacks would land.
        let trap = echo_server("192.0.2.30:443".parse().unwrap()).await;
        let yaml = format!(
            "allowlist:\n- {{address: api.allowed.test, port: 443}}\n\
             routes:\n- {{listen: {DNS_ROUTE}, mode: dns}}\n\
             - {{listen: {CONNECT_ROUTE}, mode: connect, sni: require}}\n"
        );
        let proxy = start_routes_daemon(&dir, &yaml, &[DNS_ROUTE, CONNECT_ROUTE]).await;

        // The enclave, set up as an image would be.
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
        let enclave = enclave::Enclave::start(&resolv);
        enclave.must("nft", &["-f", NFT]).await;
        let ruleset = enclave.must("nft", &["list", "ruleset"]).await;
        assert!(
            ruleset.contains("redirect to :15001"),
            "egress.nft is not in effect in the enclave:\n{ruleset}"
        );
        let app_path = app.display().to_string();
        let setup = enclave.must(&app_path, &["egress", "--print-setup"]).await;
        let commands: Vec<&str> = setup
            .lines()
            .filter(|l| l.starts_with("ip route ") || l.starts_with("ip address "))
            .collect();
        assert_eq!(commands.len(), 3, "{setup}");
        for command in commands {
            let args: Vec<&str> = command.split_whitespace().skip(1).collect();
            enclave.must("ip", &args).await;
        }
        let links = enclave.must("ip", &["-o", "link"]).await;
        assert_eq!(
            links.lines().count(),
            1,
            "the enclave has only lo:\n{links}"
        );

        let log = dir.path().join("egress.log");
        let args = [
            "egress".to_owned(),
            "--parent-dns".to_owned(),
            format!("vsock:1:{DNS_ROUTE}"),
            "--connect-via".to_owned(),
            format!("vsock:1:{CONNECT_ROUTE}"),
        ];
        let (program, log_file) = (app.clone(), log.clone());
        let egress = EnclaveProcess {
            child: enclave
                .run(move || {
                    let out = std::fs::File::create(&log_file).unwrap();
                    std::process::Command::new(&program)
                        .args(&args)
                        .env("RUST_LOG", "info")
                        .env("NO_COLOR", "1")
                        .stdin(std::process::Stdio::null())
                        .stdout(out.try_clone().unwrap())
                        .stderr(out)
                        .spawn()
                        .expect("cannot start enclave-app egress in the enclave")
                })
                .await,
            log,
        };
        let ready = enclave
            .wait_until(LOG_TIMEOUT, || {
                use common::netns::{tcp_listening, udp_bound};
                tcp_listening("127.0.0.1:15001".parse().unwrap())
                    && udp_bound("127.0.0.1:53".parse().unwrap())
                    && tcp_listening("127.0.0.1:53".parse().unwrap())
            })
            .await;
        assert!(
            ready,
            "enclave-app egress is not listening in the enclave; its log:\n{}",
            egress.logs()
        );

        // An unmodified client, by name, no proxy settings: the upstream's body.
        let out = enclave
            .output(
                "curl",
                &[
                    "-sS",
                    "--fail",
                    "--cacert",
                    &ca,
                    "https://api.allowed.test/",
                ],
                CLIENT,
            )
            .await;
        assert!(
            out.status.success(),
            "curl https://api.allowed.test/ in the enclave: {}\negress log:\n{}\ndaemon log:\n{}",
            said(&out),
            egress.logs(),
            proxy.logs()
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello api.allowed.test\n"
        );
        assert_eq!(tls.names_seen(), ["api.allowed.test"]);
        // Over vsock: both routes name their peer as CID 1, the connect route the upstream.
        for (route, needles) in [
            (DNS_ROUTE, vec!["peer=vsock:1:"]),
            (
                CONNECT_ROUTE,
                vec![
                    "peer=vsock:1:",
                    "upstream=192.0.2.10:443",
                    "connection closed",
                ],
            ),
        ] {
            let route_tag = format!("route=vsock:{route} ");
            let found = common::wait_until(LOG_TIMEOUT, || {
                proxy
                    .logs()
                    .lines()
                    .any(|l| l.contains(&route_tag) && needles.iter().all(|n| l.contains(n)))
            })
            .await;
            assert!(
                found,
                "no daemon log line with `{route_tag}` and {needles:?}:\n{}",
                proxy.logs()
            );
        }
        assert!(
            egress
                .wait_for_log("api.allowed.test:443", LOG_TIMEOUT)
                .await,
            "the egress side names the connection's target: {}",
            egress.logs()
        );

        // An unlisted name fails at resolution (curl: 6, couldn't resolve host): the parent
        // blocks the query, and nothing reaches the upstream.
        let out = enclave
            .output(
                "curl",
                &["-sS", "--cacert", &ca, "https://unlisted.test/"],
                CLIENT,
            )
            .await;
        assert_eq!(out.status.code(), Some(6), "{}", said(&out));
        assert!(
            proxy
                .wait_for_log("DNS query blocked: unlisted.test", LOG_TIMEOUT)
                .await,
            "{}",
            proxy.logs()
        );
        assert_eq!(
            dns.queries("unlisted.test"),
            0,
            "the parent resolved a blocked name"
        );

        // A raw IP the allowlist lacks: the parent refuses the CONNECT, the app's connection is
        // reset (7: could not connect, 35: TLS connect error, 52: empty reply, 56: receive
        // failure), and nothing connects to that address.
        let out = enclave
            .output(
                "curl",
                &["-sS", "--cacert", &ca, "https://192.0.2.30/"],
                CLIENT,
            )
            .await;
        assert!(
            matches!(out.status.code(), Some(7 | 35 | 52 | 56)),
            "curl https://192.0.2.30/: {}",
            said(&out)
        );
        assert!(
            egress
                .wait_for_log(
                    "connection to 192.0.2.30:443 refused: the parent answered 403",
                    LOG_TIMEOUT
                )
                .await,
            "{}",
            egress.logs()
        );
        assert_eq!(trap.accepted(), 0, "something reached 192.0.2.30:443");
        assert_eq!(
            tls.names_seen(),
            ["api.allowed.test"],
            "only the allowed name reached the upstream"
        );
        drop(egress);
    });
}
