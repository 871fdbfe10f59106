//! SIGTERM and SIGINT through the real binaries: the forwarder and the server stop accepting at
//! once (new connections are refused), let a connection that is mid-request finish, and exit 0;
//! a connection that outlasts `--drain-timeout` does not hold the process up. Each test has its
//! own network namespace.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::chain::{Chain, Setup};
use support::netns::{run_in_netns, tcp_listening};
use support::process::{Proc, APP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

const FORWARDER: &str = "127.0.0.1:443";
/// Far longer than any step needs: these tests are about what happens, not how fast.
const WAIT: Duration = Duration::from_secs(30);

async fn start_forwarder(target: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "forwarder".to_owned(),
        "127.0.0.1".to_owned(),
        "443".to_owned(),
        "3".to_owned(),
        "8001".to_owned(),
        "--stand-in".to_owned(),
        format!("unix:{}", target.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut forwarder = Proc::spawn("forwarder", APP, &args, &[]);
    let addr: SocketAddr = FORWARDER.parse().unwrap();
    forwarder.wait_ready(|| tcp_listening(addr)).await;
    forwarder
}

/// A proxy stand-in that accepts one connection, says when it has, reads the request to EOF
/// and answers with its size.
async fn request_response_peer(
    path: &Path,
) -> (
    tokio::sync::oneshot::Receiver<()>,
    tokio::task::JoinHandle<Vec<u8>>,
) {
    let listener = UnixListener::bind(path).unwrap();
    let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = accepted_tx.send(());
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap();
        s.write_all(format!("got {} bytes", request.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        request
    });
    (accepted_rx, peer)
}

#[test]
fn forwarder_on_sigterm_refuses_new_connections_finishes_the_open_one_and_exits_0() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let proxy_sock = dir.path().join("proxy.sock");
        let (accepted, peer) = request_response_peer(&proxy_sock).await;
        let mut forwarder = start_forwarder(&proxy_sock, &["--drain-timeout", "5m"]).await;

        let mut conn = TcpStream::connect(FORWARDER).await.unwrap();
        conn.write_all(b"first half of the request, ")
            .await
            .unwrap();
        tokio::time::timeout(WAIT, accepted)
            .await
            .expect("the forwarder did not connect to the proxy")
            .unwrap();

        forwarder.signal(libc::SIGTERM);
        assert!(
            forwarder.wait_for_log("stopped accepting", WAIT).await,
            "{}",
            forwarder.logs()
        );
        assert!(forwarder.logs().contains("open=1"), "{}", forwarder.logs());
        let refused = TcpStream::connect(FORWARDER).await;
        assert!(
            matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "a new connection after SIGTERM: {refused:?}"
        );
        assert!(
            forwarder.exited().is_none(),
            "exited with a connection open"
        );

        // The open connection is still forwarded both ways, to the end.
        conn.write_all(b"second half").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(WAIT, conn.read_to_end(&mut reply))
            .await
            .expect("no reply after SIGTERM")
            .unwrap();
        assert_eq!(reply, b"got 38 bytes");
        assert_eq!(
            peer.await.unwrap(),
            b"first half of the request, second half"
        );
        let status = forwarder.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "{}", forwarder.logs());
        assert!(
            forwarder.logs().contains("open connections finished"),
            "{}",
            forwarder.logs()
        );
    });
}

#[test]
fn forwarder_exits_0_when_a_connection_outlasts_the_drain_timeout() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let proxy_sock = dir.path().join("proxy.sock");
        let (accepted, _peer) = request_response_peer(&proxy_sock).await;
        let mut forwarder = start_forwarder(&proxy_sock, &["--drain-timeout", "1s"]).await;
        let mut conn = TcpStream::connect(FORWARDER).await.unwrap();
        conn.write_all(b"never finished").await.unwrap();
        tokio::time::timeout(WAIT, accepted).await.unwrap().unwrap();

        forwarder.signal(libc::SIGINT);
        let status = forwarder.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "{}", forwarder.logs());
        assert!(
            forwarder.logs().contains("drain timeout reached"),
            "{}",
            forwarder.logs()
        );
        // The process is gone, so is the connection.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest))
            .await
            .expect("the connection outlived the process");
    });
}

#[test]
fn server_on_sigterm_answers_the_query_in_progress_refuses_new_clients_and_exits_0() {
    run_in_netns(|| async {
        let mut chain = Chain::start(Setup::default()).await;
        let sock = chain.path("server.sock");
        // Half a query: the server is waiting for the rest when SIGTERM arrives.
        let sockets = chain.server.open_sockets();
        let mut conn = UnixStream::connect(&sock).await.unwrap();
        conn.write_all(b"eu-").await.unwrap();
        assert!(
            support::wait_until(WAIT, || chain.server.open_sockets() > sockets).await,
            "the server did not accept the connection"
        );

        chain.server.signal(libc::SIGTERM);
        assert!(
            chain.server.wait_for_log("stopped accepting", WAIT).await,
            "{}",
            chain.server.logs()
        );
        assert!(
            chain.server.logs().contains("open=1"),
            "the half-sent query is waited for: {}",
            chain.server.logs()
        );
        assert!(
            UnixStream::connect(&sock).await.is_err(),
            "a new client was accepted after SIGTERM"
        );

        conn.write_all(b"west-1\n").await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(WAIT, conn.read_to_end(&mut reply))
            .await
            .expect("no reply after SIGTERM")
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply),
            r#"["3.5.64.0/21","52.218.0.0/17","52.92.40.0/21"]"#
        );
        drop(conn);
        let status = chain.server.wait_exit(WAIT).await;
        assert_eq!(status.code(), Some(0), "{}", chain.server.logs());
    });
}
