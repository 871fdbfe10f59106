//! The ingress chain on stand-ins, through the real binaries, in the test's own network
//! namespace: a client on 127.0.0.2 → nitro-vsock-proxy's `mode: ingress` route (tcp) → unix
//! socket (the vsock stand-in) → `enclave-app ingress` → a TCP server in the "enclave". With
//! `--proxy-protocol strip` the server gets the client's bytes only and the bridge logs the
//! client; with `keep` the route's header reaches the server ahead of them. The workshop
//! `server --proxy-protocol` logs the client a header names and closes a connection without one.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::netns::{run_in_netns, tcp_listening, unix_listening};
use support::process::{proxy_bin, Proc, APP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixStream};

const ROUTE: &str = "127.0.0.1:8443";
const SERVER: &str = "127.0.0.1:9443";
const WAIT: Duration = Duration::from_secs(30);
/// The PROXY v2 signature (the protocol's first 12 bytes), to recognise a kept header.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A TCP server that records everything each connection sends and echoes it back.
async fn recording_echo_server() -> tokio::sync::mpsc::UnboundedReceiver<Vec<u8>> {
    let listener = TcpListener::bind(SERVER).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            all.extend_from_slice(&buf[..n]);
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
                let _ = tx.send(all);
            });
        }
    });
    rx
}

async fn chain(dir: &tempfile::TempDir, mode: &str) -> (Proc, Proc) {
    let sock = dir.path().join("enclave.sock");
    let config = dir.path().join("routes.yaml");
    std::fs::write(
        &config,
        format!(
            "routes:\n  - listen: \"tcp:{ROUTE}\"\n    mode: ingress\n    to: \"unix:{}\"\n    allow_from: [\"127.0.0.2\"]\n    proxy_protocol: v2\n",
            sock.display()
        ),
    )
    .unwrap();
    let mut bridge = Proc::spawn(
        "ingress",
        APP,
        &[
            "ingress".to_owned(),
            "--listen".to_owned(),
            format!("unix:{}", sock.display()),
            "--to".to_owned(),
            format!("tcp:{SERVER}"),
            "--proxy-protocol".to_owned(),
            mode.to_owned(),
        ],
        &[],
    );
    bridge.wait_ready(|| unix_listening(&sock)).await;
    let mut proxy = Proc::spawn(
        "nitro-vsock-proxy",
        proxy_bin(),
        &["--config".to_owned(), config.display().to_string()],
        &[],
    );
    let route: SocketAddr = ROUTE.parse().unwrap();
    proxy.wait_ready(|| tcp_listening(route)).await;
    (proxy, bridge)
}

async fn client() -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    socket.connect(ROUTE.parse().unwrap()).await.unwrap()
}

/// Sends `data`, half-closes, and reads the echo to EOF.
async fn exchange(conn: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    conn.write_all(data).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut echo = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut echo))
        .await
        .expect("no echo in time")
        .unwrap();
    echo
}

#[test]
fn strip_hands_the_server_the_clients_bytes_and_logs_the_client() {
    run_in_netns(|| async {
        let mut received = recording_echo_server().await;
        let dir = tempfile::tempdir().unwrap();
        let (_proxy, bridge) = chain(&dir, "strip").await;
        let mut conn = client().await;
        let port = conn.local_addr().unwrap().port();
        assert_eq!(
            exchange(&mut conn, b"GET / HTTP/1.0\r\n\r\n").await,
            b"GET / HTTP/1.0\r\n\r\n"
        );
        let seen = tokio::time::timeout(WAIT, received.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, b"GET / HTTP/1.0\r\n\r\n", "the header was consumed");
        let needle = format!("client address from the PROXY header client=127.0.0.2:{port}");
        assert!(
            bridge.wait_for_log(&needle, WAIT).await,
            "{}",
            bridge.logs()
        );
    });
}

#[test]
fn keep_hands_the_server_the_routes_header_first() {
    run_in_netns(|| async {
        let mut received = recording_echo_server().await;
        let dir = tempfile::tempdir().unwrap();
        let (_proxy, _bridge) = chain(&dir, "keep").await;
        let mut conn = client().await;
        let echo = exchange(&mut conn, b"hello").await;
        let seen = tokio::time::timeout(WAIT, received.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(seen.starts_with(V2_SIGNATURE), "{seen:?}");
        assert!(seen.ends_with(b"hello"), "{seen:?}");
        assert!(seen.len() > V2_SIGNATURE.len() + 5);
        // The echo carries the header back too: the bridge passes bytes untouched both ways.
        assert_eq!(echo, seen);
    });
}

#[test]
fn the_workshop_server_logs_the_client_a_header_names() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("server.sock");
        let mut server = Proc::spawn(
            "server",
            APP,
            &[
                "server".to_owned(),
                "5005".to_owned(),
                "--stand-in".to_owned(),
                format!("unix:{}", sock.display()),
                "--proxy-protocol".to_owned(),
                "--connect-timeout".to_owned(),
                "1s".to_owned(),
            ],
            &[],
        );
        server.wait_ready(|| unix_listening(&sock)).await;
        // A v1 header and the query in one write, as the parent's route sends them.
        let mut conn = UnixStream::connect(&sock).await.unwrap();
        conn.write_all(b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 443\r\nus-east-1")
            .await
            .unwrap();
        conn.shutdown().await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut reply)).await;
        assert!(
            server
                .wait_for_log(
                    "client address from the PROXY header client=10.1.2.3:5555",
                    WAIT
                )
                .await,
            "{}",
            server.logs()
        );
        // The query after the header was read as the query (the download then fails here).
        assert!(
            server.wait_for_log("query=\"us-east-1\"", WAIT).await,
            "{}",
            server.logs()
        );
        // Without a header: closed, with a WARN that says what was expected.
        let mut bare = UnixStream::connect(&sock).await.unwrap();
        bare.write_all(b"us-east-1").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, bare.read_to_end(&mut rest)).await;
        assert!(rest.is_empty(), "{rest:?}");
        assert!(
            server
                .wait_for_log(
                    "no PROXY header: the connection starts with other bytes",
                    WAIT
                )
                .await,
            "{}",
            server.logs()
        );
    });
}
