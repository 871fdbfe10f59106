//! Socket activation through the real binary: `systemd-socket-activate` (systemd's own tool)
//! binds the sockets, waits for the first connection, then execs the proxy with them as
//! `LISTEN_FDS`, exactly as a `.socket` unit does. The proxy must serve every passed socket
//! instead of binding LISTEN, leave a passed unix socket's file alone at exit, adopt a vsock
//! listener (bound here, never connected to: the host has no vsock loopback), and refuse a
//! socket it cannot serve with exit status 2. Each test has its own network namespace.

mod common;
mod systemd_support;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, is_listening, try_connect, PROXY_BIN};
use common::upstream::{echo_server, response_server};
use systemd_support::{Daemon, NotifySocket};
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `systemd-socket-activate -l ADDR... [-d] -E RUST_LOG=debug [-E NOTIFY_SOCKET=...] -- proxy ARGS`.
fn activate(listen: &[&str], datagram: bool, env: &[(&str, &str)], proxy_args: &[&str]) -> Daemon {
    let mut cmd = Command::new("systemd-socket-activate");
    for l in listen {
        cmd.arg("-l").arg(l);
    }
    if datagram {
        cmd.arg("--datagram");
    }
    cmd.args(["-E", "RUST_LOG=debug"]);
    for (k, v) in env {
        cmd.arg("-E").arg(format!("{k}={v}"));
    }
    cmd.arg("--").arg(PROXY_BIN).args(proxy_args);
    Daemon::spawn(cmd, false)
}

async fn round_trip(listen: &str, msg: &[u8]) -> Vec<u8> {
    connect(listen)
        .await
        .round_trip(msg, WAIT)
        .await
        .expect("no reply through the proxy")
}

#[test]
fn two_passed_sockets_each_serve_the_route_with_their_listen_address() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("192.0.2.20"));
        let _echo = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let unix_upstream =
            response_server("192.0.2.20:443".parse().unwrap(), b"unix route".to_vec()).await;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("proxy.sock");
        let tcp = "tcp:127.0.0.1:8001";
        let unix = format!("unix:{}", sock.display());
        // The tcp route is the positional one, the unix route comes from the file.
        let config = common::write_allowlist(
            &dir,
            &format!(
                "allowlist:\n- {{address: 192.0.2.10, port: 443}}\n- {{address: 192.0.2.20, port: 443}}\n\
                 routes:\n- {{listen: '{unix}', remote: '192.0.2.20:443'}}\n"
            ),
        );
        let notify = NotifySocket::bind(dir.path());
        let mut daemon = activate(
            &["127.0.0.1:8001", sock.to_str().unwrap()],
            false,
            &[("NOTIFY_SOCKET", notify.path())],
            &[tcp, "192.0.2.10", "443", "--config", &config],
        );
        assert!(
            common::wait_until(WAIT, || is_listening(tcp) && is_listening(&unix)).await,
            "systemd-socket-activate did not listen: {}",
            daemon.logs()
        );
        // The first connection makes systemd-socket-activate exec the proxy, which must accept
        // it from the passed socket's backlog.
        assert_eq!(
            round_trip(tcp, b"first, over tcp").await,
            b"first, over tcp"
        );
        assert_eq!(round_trip(&unix, b"then over unix").await, b"unix route");
        assert_eq!(round_trip(tcp, b"and tcp again").await, b"and tcp again");
        assert_eq!(unix_upstream.accepted(), 1);
        // The log lines come through a pipe and a reader thread: wait for the last of them, the
        // unix connection's, before reading them all (on a loaded machine they trail the bytes).
        let sockets = format!("sockets={tcp} {unix}\n");
        let served = daemon.wait_for_log(&sockets, WAIT).await
            && daemon.wait_for_log("peer=unix:", WAIT).await;
        let logs = daemon.logs();
        assert!(served, "both passed sockets matched to routes: {logs}");
        assert!(
            !logs.contains("listening on it here"),
            "bound a route that systemd passed: {logs}"
        );
        assert!(
            logs.contains(&format!("route={unix} ")) && logs.contains("peer=unix:"),
            "{logs}"
        );
        assert!(
            notify
                .wait_for(WAIT, |m| m.contains("READY=1") && m.contains("2 routes"))
                .await
                .is_some(),
            "{:?}",
            notify.messages()
        );

        daemon.signal(libc::SIGTERM);
        let status = daemon
            .wait_exit(WAIT)
            .await
            .expect("did not exit after SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", daemon.logs());
        assert!(
            sock.exists(),
            "the proxy removed a socket file it did not create (it belongs to the .socket unit)"
        );
    });
}

#[test]
fn passed_vsock_listener_is_adopted_for_its_route_and_other_routes_are_bound() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        // A vsock port unlikely to be used by anything else on this machine (vsock has no
        // network namespaces). Nothing ever connects to it.
        let vsock_port = 40000 + (std::process::id() % 20000);
        let config = common::write_allowlist(
            &dir,
            &format!(
                "{}routes:\n- {{listen: 'tcp:127.0.0.1:8001', remote: '192.0.2.10:443'}}\n\
                 - {{listen: 'tcp:127.0.0.1:8002', remote: '192.0.2.10:443'}}\n",
                common::UPSTREAM_ALLOWLIST
            ),
        );
        let vsock = format!("vsock::{vsock_port}");
        let args = [
            vsock_port.to_string(),
            "192.0.2.10".into(),
            "443".into(),
            "--config".into(),
            config.clone(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut daemon = activate(&[&vsock, "127.0.0.1:8001"], false, &[], &args);
        assert!(
            common::wait_until(WAIT, || is_listening("tcp:127.0.0.1:8001")).await,
            "{}",
            daemon.logs()
        );
        // Any connection triggers the exec; this one is then served (and refused upstream).
        let mut c = connect("tcp:127.0.0.1:8001").await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut rest)).await;
        assert!(
            daemon
                .wait_for_log(
                    &format!("sockets=vsock:{vsock_port} tcp:127.0.0.1:8001\n"),
                    WAIT
                )
                .await,
            "the vsock and tcp listeners were not adopted for their routes: {}",
            daemon.logs()
        );
        assert!(
            daemon
                .wait_for_log(
                    "no socket passed by systemd for this route; listening on it here route=tcp:127.0.0.1:8002",
                    WAIT
                )
                .await
                && common::wait_until(WAIT, || is_listening("tcp:127.0.0.1:8002")).await,
            "the route systemd did not pass is bound here: {}",
            daemon.logs()
        );
        daemon.signal(libc::SIGTERM);
        let status = daemon
            .wait_exit(WAIT)
            .await
            .expect("did not exit after SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", daemon.logs());

        // A passed socket that matches no route: exit 2 naming it and the .socket setting.
        let mut daemon = activate(&["127.0.0.1:8003"], false, &[], &args);
        assert!(
            common::wait_until(WAIT, || is_listening("tcp:127.0.0.1:8003")).await,
            "{}",
            daemon.logs()
        );
        // Any connection triggers the exec (the listening check above may already have); the
        // daemon then exits at once, so this one may be refused or reset: either is fine.
        if let Ok(mut c) = try_connect("tcp:127.0.0.1:8003").await {
            let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut rest)).await;
        }
        let status = daemon.wait_exit(WAIT).await.expect("did not exit");
        assert_eq!(status.code(), Some(2), "{}", daemon.logs());
        let logs = daemon.logs();
        assert!(
            logs.contains("systemd passed a socket listening on tcp:127.0.0.1:8003")
                && logs.contains("ListenStream=")
                && logs.contains(&format!(
                    "vsock:{vsock_port}, tcp:127.0.0.1:8001, tcp:127.0.0.1:8002"
                )),
            "names the socket, the routes and the .socket setting: {logs}"
        );
        assert!(!is_listening("tcp:127.0.0.1:8002"), "bound despite exit 2");
    });
}

#[test]
fn passed_datagram_socket_is_refused_with_exit_2() {
    run_in_netns(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
        let mut daemon = activate(
            &["127.0.0.1:8001"],
            true,
            &[],
            &[
                "tcp:127.0.0.1:8001",
                "192.0.2.10",
                "443",
                "--config",
                &config,
            ],
        );
        assert!(
            systemd_support::wait_for_count(|| daemon.logs(), "Listening on", 1, WAIT).await,
            "{}",
            daemon.logs()
        );
        // A datagram triggers the exec.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.send_to(b"wake up", "127.0.0.1:8001").unwrap();
        let status = daemon.wait_exit(WAIT).await.expect("did not exit");
        assert_eq!(status.code(), Some(2), "{}", daemon.logs());
        let logs = daemon.logs();
        assert!(
            logs.contains("socket-activation descriptor 3: is not a stream socket")
                && logs.contains("ListenStream="),
            "{logs}"
        );
    });
}
