//! The pieces one at a time, through the real binary: the forwarder (half-close, proxy down and
//! back, connection limit), the client (the Python server's reply format, every failure and its
//! exit status) and the shell scripts (shellcheck). Each network test has its own namespace.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use support::netns::{run_in_netns, tcp_listening};
use support::process::{run, Proc, APP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};

const FORWARDER: &str = "127.0.0.1:443";
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

/// Reads until EOF; a reset counts as a close too. What was read before it.
async fn read_until_closed(conn: &mut TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut data))
        .await
        .expect("the connection was not closed");
    data
}

#[test]
fn forwarder_closes_one_connection_while_the_proxy_is_down_then_forwards_with_half_close() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let proxy_sock = dir.path().join("proxy.sock");
        let mut forwarder = start_forwarder(&proxy_sock, &[]).await;

        let mut conn = TcpStream::connect(FORWARDER).await.unwrap();
        assert!(read_until_closed(&mut conn).await.is_empty());
        assert!(
            forwarder
                .wait_for_log("cannot reach the parent's proxy", WAIT)
                .await,
            "{}",
            forwarder.logs()
        );

        // The proxy comes up: a request/response peer that answers only after the client's EOF.
        let listener = UnixListener::bind(&proxy_sock).unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            s.read_to_end(&mut request).await.unwrap();
            s.write_all(format!("got {} bytes", request.len()).as_bytes())
                .await
                .unwrap();
            s.shutdown().await.unwrap();
            request
        });
        let request: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut conn = TcpStream::connect(FORWARDER).await.unwrap();
        conn.write_all(&request).await.unwrap();
        conn.shutdown().await.unwrap();
        let reply = read_until_closed(&mut conn).await;
        assert_eq!(reply, b"got 300000 bytes");
        assert!(
            peer.await.unwrap() == request,
            "the request arrived changed"
        );
        assert!(forwarder.exited().is_none(), "the forwarder kept running");
    });
}

#[test]
fn forwarder_closes_connections_over_its_limit_and_keeps_the_others() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let proxy_sock = dir.path().join("proxy.sock");
        let listener = UnixListener::bind(&proxy_sock).unwrap();
        // An echo peer, one task per connection.
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut rd, mut wr) = s.split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    let _ = wr.shutdown().await;
                });
            }
        });
        let forwarder = start_forwarder(&proxy_sock, &["--max-connections", "2"]).await;

        async fn echo(conn: &mut TcpStream, byte: u8) {
            conn.write_all(&[byte]).await.unwrap();
            let mut got = [0u8; 1];
            tokio::time::timeout(WAIT, conn.read_exact(&mut got))
                .await
                .expect("no echo")
                .unwrap();
            assert_eq!(got[0], byte);
        }
        let mut first = TcpStream::connect(FORWARDER).await.unwrap();
        echo(&mut first, 1).await;
        let mut second = TcpStream::connect(FORWARDER).await.unwrap();
        echo(&mut second, 2).await;

        let mut third = TcpStream::connect(FORWARDER).await.unwrap();
        let _ = third.write_all(b"x").await;
        assert!(read_until_closed(&mut third).await.is_empty());
        assert!(
            forwarder
                .wait_for_log("connection limit reached (2 open)", WAIT)
                .await,
            "{}",
            forwarder.logs()
        );
        echo(&mut first, 3).await;
        echo(&mut second, 4).await;

        // Once one ends, a new connection is forwarded again.
        first.shutdown().await.unwrap();
        assert!(read_until_closed(&mut first).await.is_empty());
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut next = TcpStream::connect(FORWARDER).await.unwrap();
            next.write_all(&[5]).await.unwrap();
            let mut got = [0u8; 1];
            match tokio::time::timeout(WAIT, next.read(&mut got)).await {
                Ok(Ok(1)) => {
                    assert_eq!(got[0], 5);
                    break;
                }
                _ => assert!(
                    tokio::time::Instant::now() < deadline,
                    "the slot of the closed connection was not freed"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// A one-shot server on a unix socket: reads the query with one read, as the workshop's
/// server does, writes `reply` and closes. Returns the query it received.
async fn one_shot_server(path: &Path, reply: &'static [u8]) -> tokio::task::JoinHandle<Vec<u8>> {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        s.write_all(reply).await.unwrap();
        s.shutdown().await.unwrap();
        buf.truncate(n);
        buf
    })
}

async fn client(path: &Path, query: &str) -> support::process::Output {
    let endpoint = format!("unix:{}", path.display());
    run(
        APP,
        &["client", "16", "5005", query, "--stand-in", &endpoint],
        WAIT,
    )
    .await
}

#[test]
fn client_prints_the_python_servers_list_reply() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("server.sock");
        let server = one_shot_server(&sock, b"['3.5.0.0/19', '52.216.0.0/15']").await;
        let out = client(&sock, "us-east-1").await;
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert_eq!(out.stdout, "['3.5.0.0/19', '52.216.0.0/15']\n");
        assert_eq!(server.await.unwrap(), b"us-east-1", "the query as sent");
    });
}

#[test]
fn client_reports_an_error_reply_and_a_silent_close_with_status_1() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("error.sock");
        let _server = one_shot_server(&sock, br#"{"error": "proxy down"}"#).await;
        let out = client(&sock, "us-east-1").await;
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(out.stdout.is_empty());
        assert!(
            out.stderr
                .contains("could not answer \"us-east-1\": proxy down"),
            "{}",
            out.stderr
        );

        let sock = dir.path().join("silent.sock");
        let _server = one_shot_server(&sock, b"").await;
        let out = client(&sock, "us-east-1").await;
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(
            out.stderr.contains("closed the connection without a reply"),
            "{}",
            out.stderr
        );
    });
}

#[test]
fn client_reports_a_missing_server_with_status_1_and_a_bad_query_with_status_2() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nobody.sock");
        let out = client(&sock, "us-east-1").await;
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(
            out.stderr
                .contains(&format!("cannot connect to unix:{}", sock.display())),
            "{}",
            out.stderr
        );

        let long = "a".repeat(1025);
        let out = client(&sock, &long).await;
        assert_eq!(out.code(), Some(2), "{out:?}");
        assert!(out.stderr.contains("at most 1024"), "{}", out.stderr);
        let out = client(&sock, "  ").await;
        assert_eq!(out.code(), Some(2), "{out:?}");
        assert!(out.stderr.contains("empty query"), "{}", out.stderr);
    });
}

#[test]
fn scripts_pass_shellcheck_and_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run_sh = root.join("enclave-app/run.sh");
    let demo_sh = root.join("scripts/demo.sh");
    let first_line = std::fs::read_to_string(&run_sh).unwrap();
    assert!(
        first_line.starts_with("#!/bin/sh\n"),
        "run.sh needs its shebang on line 1"
    );
    for (shell, script) in [("sh", &run_sh), ("bash", &demo_sh)] {
        let status = std::process::Command::new(shell)
            .arg("-n")
            .arg(script)
            .status()
            .unwrap();
        assert!(status.success(), "{shell} -n {}", script.display());
    }
    let out = std::process::Command::new("shellcheck")
        .arg(&run_sh)
        .arg(&demo_sh)
        .output()
        .unwrap_or_else(|e| panic!("cannot run shellcheck ({e}): `make deps` installs it"));
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
