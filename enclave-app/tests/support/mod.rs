//! Harness of enclave-app's integration tests (`mod support;` in each `tests/*.rs`).
//!
//! Reuses the daemon's harness files for what is the same: [`netns`] (a private network
//! namespace per test, socket-state checks without connecting) and [`dns`] (an in-process DNS
//! server with mutable answers). Adds what is enclave-app's own:
//! * [`process`]: running `enclave-app` and `nitro-vsock-proxy` as processes, with their logs;
//! * [`chain`]: the whole workshop chain on stand-ins (client → server → forwarder → proxy →
//!   HTTPS stand-in), one per test;
//! * [`enclave`]: an "enclave" network namespace with only `lo` (and its own resolv.conf) next to
//!   the test's own "parent" namespace, and a TLS upstream with a CA for unmodified clients.
//!
//! The daemon's [`upstream`] servers (echo, and as trap listeners) are shared too.
//!
//! Each test file uses a subset, hence `dead_code` is allowed here.

#![allow(dead_code, unused_imports)]

#[path = "../../../tests/common/dns.rs"]
pub mod dns;
#[path = "../../../tests/common/netns.rs"]
pub mod netns;
#[path = "../../../tests/common/upstream.rs"]
pub mod upstream;
#[path = "../../../tests/common/vm.rs"]
pub mod vm;

pub mod chain;
pub mod enclave;
pub mod process;

use std::time::{Duration, Instant};

/// Polls `done` every 10 ms until it returns true (→ `true`) or `timeout` elapses (→ `false`,
/// after one last check). (`dns` uses it as `super::wait_until`.)
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
