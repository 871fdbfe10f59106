//! Reloading the allowlist on SIGHUP through the real binary: a changed file changes which
//! addresses new connections may reach; a broken file, or one that no longer allows
//! REMOTE_ADDR:REMOTE_PORT, is refused with an ERROR naming the file (and line) and the previous
//! allowlist stays in force. Runs in its own network namespace with its own DNS server.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::dns::TestDns;
use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, Proxy};
use common::upstream::response_server;

const LISTEN: &str = "tcp:127.0.0.1:8001";
const WAIT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Which upstream answered a request through the proxy ("" when the proxy closed it).
async fn who_answers() -> String {
    let reply = connect(LISTEN)
        .await
        .round_trip(b"who?", WAIT)
        .await
        .expect("no answer through the proxy");
    String::from_utf8(reply).unwrap()
}

async fn reload(proxy: &Proxy, config: &std::path::Path, yaml: &str, outcome: &str, nth: usize) {
    proxy.reload_with(config, yaml, outcome, nth).await;
}

#[test]
fn sighup_applies_a_changed_allowlist_and_keeps_the_old_one_when_the_new_is_bad() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        add_lo_addr(ip("192.0.2.20"));
        let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        // api.test has two addresses; the allowlist decides which one may be used.
        dns.set("api.test", &[ip("192.0.2.10"), ip("192.0.2.20")], 60);
        let a = response_server("192.0.2.10:443".parse().unwrap(), b"A".to_vec()).await;
        let b = response_server("192.0.2.20:443".parse().unwrap(), b"B".to_vec()).await;

        let dir = tempfile::tempdir().unwrap();
        let path = common::write_allowlist(&dir, common::UPSTREAM_ALLOWLIST);
        let config = std::path::PathBuf::from(&path);
        let proxy = Proxy::spawn(&[
            LISTEN,
            "api.test",
            "443",
            "--config",
            &path,
            "--nameserver",
            "127.0.0.1:53",
        ]);
        proxy.wait_ready(LISTEN).await;
        assert_eq!(who_answers().await, "A");

        // A changed allowlist: new connections may only use 192.0.2.20.
        reload(
            &proxy,
            &config,
            "allowlist:\n- {address: 192.0.2.20, port: 443}\n",
            "allowlist reloaded",
            1,
        )
        .await;
        assert_eq!(who_answers().await, "B");
        assert!(
            proxy
                .wait_for_log(
                    "address denied by policy address=192.0.2.10",
                    Duration::from_secs(5)
                )
                .await,
            "the old address is now denied: {}",
            proxy.logs()
        );

        // A broken file: refused with file and line; the allowlist of the last reload stays.
        reload(
            &proxy,
            &config,
            "allowlist:\n- {address: 192.0.2.10, port: 443x}\n",
            "reload failed",
            1,
        )
        .await;
        let failure = proxy
            .logs()
            .lines()
            .find(|l| l.contains("reload failed"))
            .unwrap()
            .to_owned();
        assert!(failure.contains("ERROR"), "{failure}");
        assert!(
            failure.contains(&path) && failure.contains("line 2"),
            "names file and line: {failure}"
        );
        assert_eq!(who_answers().await, "B");

        // A valid file that no longer allows REMOTE_ADDR at all is refused the same way.
        reload(
            &proxy,
            &config,
            "allowlist:\n- {address: 198.51.100.1, port: 443}\n",
            "reload failed",
            2,
        )
        .await;
        assert!(
            proxy.logs().contains("api.test:443 is not allowed"),
            "{}",
            proxy.logs()
        );
        assert_eq!(who_answers().await, "B");

        // And a good file after bad ones is applied again.
        reload(
            &proxy,
            &config,
            "allowlist:\n- {address: 192.0.2.0/24, port: 443}\n",
            "allowlist reloaded",
            2,
        )
        .await;
        assert_eq!(who_answers().await, "A");
        assert_eq!(a.accepted(), 2);
        assert_eq!(b.accepted(), 3);
        let mut proxy = proxy;
        assert!(proxy.is_running());
    });
}
