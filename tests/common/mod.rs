//! Shared integration-test harness (`mod common;` in each `tests/*.rs`).
//!
//! Ties together the pieces every test uses:
//! * [`netns`]: a private network namespace per test ([`run_in_netns`]), so fixed
//!   addresses and ports never collide;
//! * [`dns`]: an in-process authoritative DNS server with mutable answers ([`TestDns`]);
//! * [`hello`]: TLS ClientHellos built by hand (two server names, an extension twice);
//! * [`upstream`]: echo / request-response / bulk upstream servers ([`UpstreamHandle`]);
//! * [`metrics`]: scraping `/metrics` through Prometheus' own OpenMetrics parser;
//! * [`proxy`]: the real `nitro-vsock-proxy` binary ([`Proxy`], [`run_to_exit`]) and the
//!   enclave-side client connection ([`connect`], [`Conn`]).
//!
//! Each test file uses a subset, hence `dead_code` is allowed here.

#![allow(dead_code, unused_imports)]

pub mod dns;
pub mod hello;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod tls;
pub mod upstream;
pub mod vm;

/// The allowlist most tests use: the test upstream 192.0.2.10:443, by IP.
pub const UPSTREAM_ALLOWLIST: &str = "allowlist:\n- {address: 192.0.2.10, port: 443}\n";

/// Writes `yaml` as `allowlist.yaml` in `dir`; returns its path, for `--config`.
pub fn write_allowlist(dir: &tempfile::TempDir, yaml: &str) -> String {
    let path = dir.path().join("allowlist.yaml");
    std::fs::write(&path, yaml).expect("cannot write the test allowlist");
    path.display().to_string()
}

use std::time::{Duration, Instant};

pub use dns::TestDns;
pub use netns::{add_lo_addr, enter_private_netns, run_in_netns};
pub use proxy::{connect, run_to_exit, try_connect, Conn, Exit, Proxy};
pub use upstream::{echo_server, response_server, sink_source_server, UpstreamHandle};

/// Polls `done` every 10 ms until it returns true (→ `true`) or `timeout` elapses
/// (→ `false`, after one last check).
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
