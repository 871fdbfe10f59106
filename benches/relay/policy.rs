//! The policy's figures: loading a large allowlist, and what one decision costs as it grows.
//!
//! * `--check-config` of the real binary on a generated file of 100,000 CIDR entries and 10,000
//!   host names (AWS's ip-ranges list is a few thousand prefixes; this is well past it): the
//!   whole load — read, parse, locate every entry, compile the policy, check the route.
//! * Decisions per second of [`Policy::decide`] at 10 entries and at 100,000, for addresses that
//!   the allowlist allows and that it does not: the ratio shows whether a decision grows with
//!   the list (a scan would make it ~10,000× slower).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use nitro_vsock_proxy::policy::host::{Host, HostPattern};
use nitro_vsock_proxy::policy::{Allowlist, Entry};
use nitro_vsock_proxy::policy::{Policy, Resolutions};

/// The `i`th /24 block of 10.0.0.0/8 (i < 65,536).
fn block(i: usize) -> String {
    format!("10.{}.{}.0/24", (i >> 8) & 0xff, i & 0xff)
}

/// A configuration of `cidrs` CIDR entries and `names` host names, with one route whose remote
/// is the first name (allowed by name: checking it needs no DNS).
pub fn large_config(cidrs: usize, names: usize) -> String {
    let mut text = String::with_capacity((cidrs + names) * 48);
    text.push_str(
        "routes:\n  - {listen: 'tcp:127.0.0.1:1', remote: 'name0.example.com:443'}\nallowlist:\n",
    );
    for i in 0..cidrs {
        // Beyond 65,536 /24s, /32s keep every entry distinct.
        let address = if i < 65_536 {
            block(i)
        } else {
            let n = i - 65_536;
            format!("172.16.{}.{}/32", (n >> 8) & 0xff, n & 0xff)
        };
        text.push_str(&format!("  - {{address: {address}, port: 443}}\n"));
    }
    for i in 0..names {
        text.push_str(&format!(
            "  - {{address: name{i}.example.com, port: 443}}\n"
        ));
    }
    text
}

/// How long `--check-config` takes on [`large_config`] of that size, in seconds.
pub fn check_config_seconds(cidrs: usize, names: usize) -> f64 {
    let dir = std::env::temp_dir().join(format!("nvp-bench-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the bench's directory");
    let path = dir.join("large.yaml");
    std::fs::write(&path, large_config(cidrs, names)).expect("write the large configuration");
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_nitro-vsock-proxy"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run nitro-vsock-proxy --check-config");
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "--check-config on {cidrs} CIDRs + {names} names failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    seconds
}

fn policy_of(cidrs: usize) -> Policy {
    let entries = (0..cidrs)
        .map(|i| Entry {
            address: block(i).parse::<HostPattern>().expect("a CIDR block"),
            port: 443,
        })
        .collect();
    Policy::new(Allowlist { entries })
}

/// Decisions per second against an allowlist of `cidrs` CIDR entries, half of them for
/// addresses it allows (spread over the whole list) and half for ones it does not.
pub fn decisions_per_second(cidrs: usize, time: Duration) -> f64 {
    let policy = policy_of(cidrs);
    let remote = Host::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    let resolutions = Resolutions::new();
    let addresses: Vec<IpAddr> = (0..1024usize)
        .map(|k| {
            let i = (k * 7919) % cidrs;
            if k % 2 == 0 {
                IpAddr::V4(Ipv4Addr::new(
                    10,
                    ((i >> 8) & 0xff) as u8,
                    (i & 0xff) as u8,
                    9,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, (k & 0xff) as u8))
            }
        })
        .collect();
    let started = Instant::now();
    let mut decisions = 0u64;
    while started.elapsed() < time {
        for addr in &addresses {
            black_box(policy.decide(&remote, 443, black_box(*addr), &resolutions)).ok();
        }
        decisions += addresses.len() as u64;
    }
    decisions as f64 / started.elapsed().as_secs_f64()
}
