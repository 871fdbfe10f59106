//! `enclave-app egress --print-setup`: the enclave's network set-up for transparent egress, as
//! a shell script, for people building their own images.
//!
//! This module owns the three parts of that set-up and how they follow from the options: the
//! nftables ruleset (`enclave-app/egress.nft`, built in, with `--listen`'s port), the address and
//! routes that let a `connect()` to a non-loopback address reach the redirect in an enclave that
//! has only `lo` (with `src 127.0.0.1`: without it the kernel picks 0.0.0.0 and connections
//! hang), and the resolv.conf line pointing at the stub. `enclave-app/run.sh` does the same with the shipped
//! file.

use std::net::SocketAddr;

use ipnet::Ipv4Net;

/// The shipped ruleset, redirecting to port [`SHIPPED_PORT`].
pub const RULESET: &str = include_str!("../../egress.nft");
/// The redirect's port as written in [`RULESET`] (`--listen`'s default).
pub const SHIPPED_PORT: u16 = 15001;

/// The ruleset for a transparent listener on `listen`.
pub fn ruleset(listen: SocketAddr) -> String {
    RULESET.replace(&format!(":{SHIPPED_PORT}"), &format!(":{}", listen.port()))
}

/// The `ip` commands: an IPv4 address that is not loopback (the pool's network address, never
/// handed out), then routes for the synthetic pool and every other destination via `lo`.
///
/// The address is there for getaddrinfo: with `AI_ADDRCONFIG` (getent, many apps asking for
/// IPv4 only) glibc answers nothing at all when no interface has an IPv4 address other than
/// loopback, before it even asks the resolver.
pub fn ip_commands(pool: Ipv4Net) -> [String; 3] {
    [
        format!("ip address replace {}/32 dev lo", pool.network()),
        format!("ip route replace {pool} dev lo src 127.0.0.1"),
        "ip route replace default dev lo src 127.0.0.1".to_owned(),
    ]
}

/// The whole set-up as a shell script (`enclave-app egress --print-setup | sh`, as root, in the
/// enclave).
pub fn script(listen: SocketAddr, dns_listen: SocketAddr, pool: Ipv4Net) -> String {
    let mut out = String::from(
        "#!/bin/sh\n\
         # The enclave's network set-up for `enclave-app egress` (run as root in the enclave, before\n\
         # the app; enclave-app egress itself runs alongside with the same options).\n\
         set -eu\n\
         ip link set dev lo up\n\
         # 1. nftables: every outbound TCP connection to a non-loopback address goes to the\n\
         #    transparent listener; nothing else leaves.\n\
         nft -f - <<'EGRESS_NFT'\n",
    );
    out.push_str(&ruleset(listen));
    out.push_str(
        "EGRESS_NFT\n\
         # 2. An IPv4 address that is not loopback (glibc's getaddrinfo with AI_ADDRCONFIG answers\n\
         #    nothing without one), and routes via lo (an enclave has no other interface) with a\n\
         #    source address (without it the kernel picks 0.0.0.0 and connections hang).\n",
    );
    for route in ip_commands(pool) {
        out.push_str(&route);
        out.push('\n');
    }
    out.push_str("# 3. The resolver: the DNS stub.\n");
    if dns_listen.port() == 53 {
        out.push_str(&format!(
            "echo 'nameserver {}' >/etc/resolv.conf\n",
            dns_listen.ip()
        ));
    } else {
        out.push_str(&format!(
            "# --dns-listen {dns_listen} is not on port 53, which resolv.conf cannot name: listen on\n\
             # port 53 for apps that use the system resolver.\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_has_the_ruleset_the_routes_and_the_resolver() {
        let s = script(
            "127.0.0.1:15001".parse().unwrap(),
            "127.0.0.1:53".parse().unwrap(),
            "198.18.0.0/15".parse().unwrap(),
        );
        assert!(s.contains(RULESET), "{s}");
        assert!(s.contains("ip address replace 198.18.0.0/32 dev lo\n"));
        assert!(s.contains("ip route replace 198.18.0.0/15 dev lo src 127.0.0.1\n"));
        assert!(s.contains("ip route replace default dev lo src 127.0.0.1\n"));
        assert!(s.contains("echo 'nameserver 127.0.0.1' >/etc/resolv.conf\n"));
        let other = script(
            "127.0.0.1:16000".parse().unwrap(),
            "127.0.0.1:5353".parse().unwrap(),
            "100.64.0.0/16".parse().unwrap(),
        );
        assert!(other.contains("redirect to :16000") && !other.contains(":15001"));
        assert!(other.contains("100.64.0.0/16 dev lo"));
        assert!(!other.contains("resolv.conf\n") || other.contains("# --dns-listen"));
    }
}
