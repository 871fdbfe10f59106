//! `--tcp-keepalive` through the real binary: an upstream that goes silent (its packets dropped by
//! an nftables rule in the test's own network namespace, as when its host dies or a route
//! vanishes: no FIN, no RST) frees its connection slot, and a healthy idle connection outlives the
//! keepalive time (the client side is a `unix:` stand-in there, so only the upstream leg is TCP);
//! accepted `tcp:` stand-in clients get keepalive too.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, Conn, Proxy};
use common::upstream::{echo_server, UpstreamHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UPSTREAM: &str = "192.0.2.10:443";

/// With `--tcp-keepalive 1s`, a dead upstream is given up after 1s + 3 probes x 1s = 4s.
const KEEPALIVE: &str = "1s";
const DEAD_PEER_NOTICED: Duration = Duration::from_secs(4);

/// Comfortably above [`DEAD_PEER_NOTICED`] on a loaded machine, and well below what the default
/// keepalive (30s: 60s to notice) or none at all would give.
const CLOSE_BOUND: Duration = Duration::from_secs(20);

/// A proxy from a unix socket in `dir` to the echo upstream at [`UPSTREAM`], one connection at a
/// time. Returns the proxy, its listen address and the upstream.
async fn start(dir: &tempfile::TempDir) -> (Proxy, String, UpstreamHandle) {
    add_lo_addr("192.0.2.10".parse::<IpAddr>().unwrap());
    let upstream = echo_server(UPSTREAM.parse::<SocketAddr>().unwrap()).await;
    let config = common::write_allowlist(dir, common::UPSTREAM_ALLOWLIST);
    let listen = format!("unix:{}", dir.path().join("proxy.sock").display());
    let proxy = Proxy::spawn(&[
        listen.as_str(),
        "192.0.2.10",
        "443",
        "--config",
        &config,
        "--max-connections",
        "1",
        "--tcp-keepalive",
        KEEPALIVE,
    ]);
    proxy.wait_ready(&listen).await;
    (proxy, listen, upstream)
}

/// Sends `message` and reads its echo, leaving the connection open.
async fn echo(conn: &mut Conn, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        conn.write_all(message).await?;
        let mut back = vec![0; message.len()];
        conn.read_exact(&mut back).await?;
        Ok(back)
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Loads an nftables ruleset into the current thread's network namespace (the test's own).
fn nft(ruleset: &str) {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run nft (scripts/install-deps.sh installs nftables): {e}")
        });
    child
        .stdin
        .take()
        .expect("nft's stdin is piped")
        .write_all(ruleset.as_bytes())
        .expect("cannot write the ruleset to nft");
    let out = child.wait_with_output().expect("nft did not finish");
    assert!(
        out.status.success(),
        "nft -f failed ({}) for {ruleset:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Drops every packet to and from the upstream's port, both ways: the upstream goes silent.
fn silence_upstream() {
    nft("table inet keepalive_test {\n\
         chain input {\n\
         type filter hook input priority 0; policy accept;\n\
         tcp dport 443 drop\n\
         tcp sport 443 drop\n\
         }\n\
         }\n");
}

fn revive_upstream() {
    nft("delete table inet keepalive_test\n");
}

/// `addr` as `/proc/net/tcp` prints it: the address as a native-endian word, the port in hex.
fn proc_addr(addr: SocketAddr) -> String {
    let SocketAddr::V4(v4) = addr else {
        panic!("{addr}: only IPv4 here")
    };
    format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    )
}

/// The kernel timer armed on the established TCP socket whose local (`column` 1) or remote
/// (`column` 2) address is `addr`, from `/proc/thread-self/net/tcp` (the `tr` column: 0 none,
/// 1 retransmit, 2 keepalive, ...).
fn socket_timer(column: usize, addr: SocketAddr) -> Option<u32> {
    const ESTABLISHED: &str = "01";
    let wanted = proc_addr(addr);
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(column) != Some(&wanted.as_str()) || fields.get(3) != Some(&ESTABLISHED) {
            return None;
        }
        let timer = fields.get(5)?.split(':').next()?;
        u32::from_str_radix(timer, 16).ok()
    })
}

/// Whether the socket's keepalive timer gets armed (polled: right after traffic, a retransmit
/// timer may be pending for a moment instead).
async fn keepalive_armed(column: usize, addr: SocketAddr) -> bool {
    common::wait_until(Duration::from_secs(2), || {
        socket_timer(column, addr) == Some(KEEPALIVE_TIMER)
    })
    .await
}

const KEEPALIVE_TIMER: u32 = 2;
const REMOTE: usize = 2;
const LOCAL: usize = 1;

#[test]
fn keepalive_frees_the_slot_a_silent_dead_upstream_held() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (proxy, listen, upstream) = start(&dir).await;
        let mut held = connect(&listen).await;
        assert_eq!(echo(&mut held, b"hello").await.unwrap(), b"hello");

        silence_upstream();
        let silenced = Instant::now();
        // The dead connection holds the only slot: a second one is closed at once.
        let mut refused = connect(&listen).await;
        let got = refused.read_to_eof(Duration::from_secs(10)).await;
        assert!(
            got.as_ref().map_or(true, |data| data.is_empty()),
            "a second connection was served while the first held the only slot: {got:?}"
        );
        assert!(
            proxy
                .wait_for_log("connection limit reached", Duration::from_secs(10))
                .await,
            "the second connection was not refused for the limit:\n{}",
            proxy.logs()
        );

        // Keepalive gives the silent upstream up, and the proxy closes the enclave's side.
        let end = held.read_to_eof(CLOSE_BOUND).await;
        let waited = silenced.elapsed();
        assert!(
            end.as_ref().map_or_else(
                |e| e.kind() != std::io::ErrorKind::TimedOut,
                |data| data.is_empty()
            ),
            "the connection to the silent upstream was still open {CLOSE_BOUND:?} later: {end:?}\n{}",
            proxy.logs()
        );
        assert!(
            waited >= DEAD_PEER_NOTICED - Duration::from_secs(1),
            "closed after {waited:?}, before keepalive could have noticed anything: \
             something else closed it\n{}",
            proxy.logs()
        );
        assert!(
            proxy
                .wait_for_log(
                    "upstream error: Connection timed out",
                    Duration::from_secs(5)
                )
                .await,
            "the proxy did not log the upstream timing out:\n{}",
            proxy.logs()
        );

        // The slot is free again: the next connection is served.
        revive_upstream();
        let mut next = connect(&listen).await;
        assert_eq!(echo(&mut next, b"again").await.unwrap(), b"again");
        assert_eq!(upstream.accepted(), 2, "{}", proxy.logs());
    });
}

#[test]
fn keepalive_keeps_a_healthy_idle_connection_open() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (proxy, listen, upstream) = start(&dir).await;
        let mut conn = connect(&listen).await;
        assert_eq!(echo(&mut conn, b"hello").await.unwrap(), b"hello");
        // The proxy's socket to the upstream (the one whose remote is the upstream).
        assert!(
            keepalive_armed(REMOTE, UPSTREAM.parse().unwrap()).await,
            "the proxy's socket to the upstream has no keepalive timer armed (timer {:?})",
            socket_timer(REMOTE, UPSTREAM.parse().unwrap())
        );

        // Idle for longer than a dead peer takes to be noticed: the probes are answered.
        tokio::time::sleep(DEAD_PEER_NOTICED * 2).await;
        assert_eq!(
            echo(&mut conn, b"still here").await.unwrap(),
            b"still here",
            "{}",
            proxy.logs()
        );
        assert!(
            !proxy.logs().contains("connection closed"),
            "{}",
            proxy.logs()
        );
        assert_eq!(upstream.accepted(), 1);
    });
}

#[test]
fn accepted_tcp_stand_in_clients_get_keepalive_too() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        add_lo_addr("192.0.2.10".parse::<IpAddr>().unwrap());
        let _upstream = echo_server(UPSTREAM.parse::<SocketAddr>().unwrap()).await;
        let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
        let listen = "tcp:127.0.0.1:8001";
        let proxy = Proxy::spawn(&[
            listen,
            "192.0.2.10",
            "443",
            "--config",
            &config,
            "--tcp-keepalive",
            KEEPALIVE,
        ]);
        proxy.wait_ready(listen).await;
        let mut conn = connect(listen).await;
        assert_eq!(echo(&mut conn, b"hello").await.unwrap(), b"hello");
        // The proxy's accepted socket is the one whose local address is the listen address.
        let accepted = "127.0.0.1:8001".parse().unwrap();
        assert!(
            keepalive_armed(LOCAL, accepted).await,
            "the proxy's accepted tcp: socket has no keepalive timer armed (timer {:?})\n{}",
            socket_timer(LOCAL, accepted),
            proxy.logs()
        );
    });
}
