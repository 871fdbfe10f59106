//! Opening the upstream connection for one enclave connection, under the policy.
//!
//! This module owns the per-connection enforcement sequence: resolve the route's remote (from the
//! shared cache while its TTL lasts), ask [`Policy::decide`] about every address (resolving the
//! other allowlisted names only if rule 5 is needed), then connect to the allowed addresses in
//! order, each with the connect timeout, until one succeeds. Every way this can fail is an
//! [`UpstreamError`] whose `Display` is the reason logged for the operator.
//!
//! It also owns how long a dead peer can hold a connection ([`UpstreamSettings`],
//! [`set_keepalive`]): keepalive probes and `TCP_USER_TIMEOUT` on every upstream socket, so an
//! upstream that vanished without a FIN or RST (a crashed host, a dropped route) frees its
//! connection slot instead of holding it until `--idle-timeout`, or forever.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::policy::dns::{Dns, LookupError};
use crate::policy::host::Host;
use crate::policy::{Allowance, Denial, Policy, Resolutions};

/// `--tcp-keepalive`'s default: a dead peer is noticed after about a minute
/// ([`UpstreamSettings::dead_peer_timeout`]).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);

/// Unanswered keepalive probes after which the connection is given up.
pub const KEEPALIVE_PROBES: u32 = 3;

/// At most this many rule-5 lookups run at once for one connection: all of them for any
/// plausible allowlist, without flooding the name server for a huge one.
const CONCURRENT_LOOKUPS: usize = 16;

/// How upstream connections are opened and kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// Time allowed for one TCP connect, per address (`--connect-timeout`).
    pub connect_timeout: Duration,
    /// Time without traffic before the first keepalive probe (`--tcp-keepalive`). The kernel
    /// counts whole seconds, at least one.
    pub keepalive: Duration,
}

impl UpstreamSettings {
    /// Time between keepalive probes: a third of [`Self::keepalive`] in whole seconds, at
    /// least 1s, so the probes fit in about the time the first one waited.
    pub fn keepalive_interval(&self) -> Duration {
        Duration::from_secs((self.keepalive.as_secs() / 3).max(1))
    }

    /// How long a peer that stopped answering can hold a connection: the first probe after
    /// [`Self::keepalive`], then [`KEEPALIVE_PROBES`] unanswered intervals. Also the
    /// `TCP_USER_TIMEOUT`, so data that is never acknowledged fails in the same time instead of
    /// after the kernel's ~15 minutes of retransmissions.
    pub fn dead_peer_timeout(&self) -> Duration {
        self.keepalive + self.keepalive_interval() * KEEPALIVE_PROBES
    }
}

/// Turns on keepalive probes and `TCP_USER_TIMEOUT` on a TCP socket, per `settings`. A socket
/// that refuses either still works, only slower to notice a dead peer: logged at debug, never
/// an error.
pub fn set_keepalive(socket: &impl AsFd, settings: &UpstreamSettings) {
    let socket = SockRef::from(socket);
    let keepalive = TcpKeepalive::new()
        .with_time(settings.keepalive)
        .with_interval(settings.keepalive_interval())
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set SO_KEEPALIVE; a dead peer is noticed only by --idle-timeout");
    }
    if let Err(e) = socket.set_tcp_user_timeout(Some(settings.dead_peer_timeout())) {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT; unacknowledged data fails only after the kernel's retransmissions");
    }
}

/// Why no upstream connection was made.
#[derive(Debug)]
pub enum UpstreamError {
    /// The route's remote host could not be resolved.
    Dns(LookupError),
    /// Every address the remote host resolved to was denied by the policy.
    Denied(Vec<(IpAddr, Denial)>),
    /// Every allowed address failed to connect.
    /// `.1`: every address tried and denied, with its rule or error (the audit trail's field).
    Unreachable(Vec<(SocketAddr, io::Error)>, String),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Dns(e) => e.fmt(f),
            UpstreamError::Denied(denials) => {
                f.write_str("no allowed address: ")?;
                for (i, (ip, why)) in denials.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}{ip} denied ({why})")?;
                }
                Ok(())
            }
            UpstreamError::Unreachable(failures, _) => {
                f.write_str("every allowed address failed: ")?;
                for (i, (addr, e)) in failures.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}{addr}: {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl UpstreamError {
    /// The addresses tried and what became of each, for the audit trail (empty for a failed
    /// lookup: no address was tried).
    pub fn addresses(&self) -> String {
        match self {
            UpstreamError::Dns(_) => String::new(),
            UpstreamError::Denied(denials) => crate::ops::audit::join(
                denials
                    .iter()
                    .map(|(ip, why)| format!("{ip} denied ({why})")),
            ),
            UpstreamError::Unreachable(_, tried) => tried.clone(),
        }
    }

    /// A short machine-friendly reason for structured logs.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Dns(_) => "dns_failure",
            UpstreamError::Denied(_) => "denied",
            UpstreamError::Unreachable(..) => "unreachable",
        }
    }
}

/// The addresses of `remote` the policy allows, in connection order, with the reason for each,
/// and the denied ones. `Err` only for a failed lookup of `remote` itself.
pub async fn allowed_addresses(
    policy: &Policy,
    dns: &Dns,
    remote: &Host,
    port: u16,
) -> Result<(Vec<(IpAddr, Allowance)>, Vec<(IpAddr, Denial)>), LookupError> {
    let candidates = match remote {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => dns.lookup(name).await?,
    };
    let mut resolutions = Resolutions::new();
    let mut decisions: Vec<_> = candidates
        .iter()
        .map(|ip| (*ip, policy.decide(remote, port, *ip, &resolutions)))
        .collect();
    let needs_rule5 = decisions
        .iter()
        .any(|(_, d)| matches!(d, Err(Denial::NotAllowlisted)));
    if needs_rule5 {
        // At once: one slow name server answer must not add up over every allowlisted name.
        // `buffered` keeps the names' order, so the outcome does not depend on who answers first.
        let names = policy.names_to_resolve(remote, port);
        // Owned names: a closure over borrowed ones makes the connection task's future not
        // provably `Send` (rust-lang/rust#102211).
        let answers: Vec<_> = stream::iter(names.clone())
            .map(|name| async move { dns.lookup(&name).await })
            .buffered(CONCURRENT_LOOKUPS)
            .collect()
            .await;
        for (name, answer) in names.iter().zip(answers) {
            match answer {
                Ok(ips) => {
                    resolutions.insert(name.clone(), ips);
                }
                // That name cannot vouch for anything now; the others still may.
                Err(e) => tracing::debug!(error = %e, "allowlisted name did not resolve"),
            }
        }
        for (ip, decision) in &mut decisions {
            if matches!(decision, Err(Denial::NotAllowlisted)) {
                *decision = policy.decide(remote, port, *ip, &resolutions);
            }
        }
    }
    let mut allowed = Vec::new();
    let mut denied = Vec::new();
    for (ip, decision) in decisions {
        match decision {
            Ok(why) => allowed.push((ip, why)),
            Err(why) => denied.push((ip, why)),
        }
    }
    Ok((allowed, denied))
}

/// Resolves, checks and connects: the upstream stream (keepalive set, see [`set_keepalive`])
/// and the address it reached.
pub async fn connect(
    policy: &Policy,
    dns: &Dns,
    remote: &Host,
    port: u16,
    settings: &UpstreamSettings,
) -> Result<(TcpStream, SocketAddr, String), UpstreamError> {
    let connect_timeout = settings.connect_timeout;
    let (allowed, denied) = allowed_addresses(policy, dns, remote, port)
        .await
        .map_err(UpstreamError::Dns)?;
    for (ip, why) in &denied {
        tracing::debug!(address = %ip, reason = %why, "address denied by policy");
    }
    if allowed.is_empty() {
        return Err(UpstreamError::Denied(denied));
    }
    let mut failures = Vec::new();
    // What became of each address, for the audit trail: denied ones first, then each attempt.
    let mut tried: Vec<String> = denied
        .iter()
        .map(|(ip, why)| format!("{ip} denied ({why})"))
        .collect();
    for (ip, why) in allowed {
        let addr = SocketAddr::new(ip, port);
        let attempt = tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await;
        match attempt {
            Ok(Ok(stream)) => {
                // Small writes (TLS handshakes) should not wait for Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                set_keepalive(&stream, settings);
                tracing::debug!(upstream = %addr, allowed_by = %why, "connected");
                tried.push(format!("{ip} allowed ({why}), connected"));
                return Ok((stream, addr, crate::ops::audit::join(tried)));
            }
            Ok(Err(e)) => {
                tracing::debug!(upstream = %addr, error = %e, "connect failed, trying the next address");
                tried.push(format!("{ip} allowed ({why}), connect failed: {e}"));
                failures.push((addr, e));
            }
            Err(_) => {
                tracing::debug!(upstream = %addr, "connect timed out, trying the next address");
                tried.push(format!("{ip} allowed ({why}), connect timed out"));
                failures.push((
                    addr,
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no answer within {}",
                            humantime::format_duration(connect_timeout)
                        ),
                    ),
                ));
            }
        }
    }
    Err(UpstreamError::Unreachable(
        failures,
        crate::ops::audit::join(tried),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use hickory_resolver::proto::op::{Message, OpCode, ResponseCode};
    use hickory_resolver::proto::rr::{RData, Record};
    use tokio::net::UdpSocket;
    use tokio::sync::watch;

    use crate::policy::dns::{DnsSettings, Family};
    use crate::policy::host::HostName;

    fn policy(yaml: &str) -> Policy {
        Policy::new(
            crate::config::parse(yaml, Path::new("test.yaml"))
                .unwrap()
                .allowlist,
        )
    }

    fn dns_at(server: SocketAddr) -> Dns {
        Dns::new(&DnsSettings {
            nameservers: vec![server],
            family: Family::V4Only,
            timeout: None,
        })
        .unwrap()
    }

    #[test]
    fn probes_fit_in_about_the_keepalive_time() {
        let cases = [
            // keepalive, interval, dead peer noticed after
            (1, 1, 4),
            (2, 1, 5),
            (10, 3, 19),
            (30, 10, 60),
        ];
        for (keepalive, interval, dead) in cases {
            let s = UpstreamSettings {
                connect_timeout: Duration::from_secs(5),
                keepalive: Duration::from_secs(keepalive),
            };
            assert_eq!(s.keepalive_interval(), Duration::from_secs(interval));
            assert_eq!(s.dead_peer_timeout(), Duration::from_secs(dead));
        }
        let default = UpstreamSettings {
            connect_timeout: Duration::from_secs(5),
            keepalive: DEFAULT_KEEPALIVE,
        };
        assert_eq!(default.dead_peer_timeout(), Duration::from_secs(60));
    }

    #[tokio::test]
    async fn the_upstream_socket_gets_keepalive_and_user_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let policy = policy(&format!(
            "allowlist:\n- {{address: 127.0.0.1, port: {port}}}\n"
        ));
        // An IP literal: the resolver is never asked.
        let dns = dns_at("127.0.0.1:9".parse().unwrap());
        let settings = UpstreamSettings {
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(7),
        };
        let remote = Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let (stream, addr, _) = connect(&policy, &dns, &remote, port, &settings)
            .await
            .unwrap();
        assert_eq!(addr, listener.local_addr().unwrap());
        let socket = SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(13))
        );
    }

    /// A name server that holds every answer until queries for `expected` different names are
    /// waiting at once (or 3s passed, well inside the resolver's 5s timeout), so queries asked
    /// one after another never overlap there. Returns its address and the most names that were
    /// waiting at once. `answers`: the A record of each name; a name without one is NXDOMAIN.
    async fn holding_name_server(
        answers: HashMap<String, Ipv4Addr>,
        expected: usize,
    ) -> (SocketAddr, watch::Receiver<usize>) {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let waiting = Arc::new(Mutex::new(HashSet::<String>::new()));
        let (most_at_once, seen) = watch::channel(0usize);
        let most_at_once = Arc::new(most_at_once);
        let answers = Arc::new(answers);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(question) = query.queries.first().cloned() else {
                    continue;
                };
                let name = question
                    .name()
                    .to_ascii()
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                let (socket, waiting, most_at_once, answers) = (
                    socket.clone(),
                    waiting.clone(),
                    most_at_once.clone(),
                    answers.clone(),
                );
                tokio::spawn(async move {
                    {
                        let mut waiting = waiting.lock().unwrap();
                        waiting.insert(name.clone());
                        let now = waiting.len();
                        most_at_once.send_modify(|most| *most = (*most).max(now));
                    }
                    let mut all_there = most_at_once.subscribe();
                    let _ = tokio::time::timeout(
                        Duration::from_secs(3),
                        all_there.wait_for(|most| *most >= expected),
                    )
                    .await;
                    // Before the answer leaves: the next query cannot overlap with this one.
                    waiting.lock().unwrap().remove(&name);
                    let mut response = Message::response(query.metadata.id, OpCode::Query);
                    response.metadata.recursion_desired = query.metadata.recursion_desired;
                    response.metadata.recursion_available = true;
                    response.add_query(question.clone());
                    match answers.get(&name) {
                        Some(ip) => {
                            response.add_answer(Record::from_rdata(
                                question.name().clone(),
                                60,
                                RData::from(IpAddr::V4(*ip)),
                            ));
                        }
                        None => response.metadata.response_code = ResponseCode::NXDomain,
                    }
                    let _ = socket.send_to(&response.to_vec().unwrap(), from).await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn rule_5_asks_every_allowlisted_name_at_once() {
        let policy = policy(
            "allowlist:\n\
             - {address: a.example, port: 443}\n\
             - {address: b.example, port: 443}\n\
             - {address: c.example, port: 443}\n",
        );
        let answers = HashMap::from([
            ("a.example".to_string(), Ipv4Addr::new(198, 51, 100, 1)),
            ("b.example".to_string(), Ipv4Addr::new(198, 51, 100, 7)),
            // c.example: NXDOMAIN, which must not stop b.example from vouching.
        ]);
        let (server, most_at_once) = holding_name_server(answers, 3).await;
        let dns = dns_at(server);
        let remote = Host::Ip("198.51.100.7".parse().unwrap());
        let (allowed, denied) = allowed_addresses(&policy, &dns, &remote, 443)
            .await
            .unwrap();
        assert_eq!(
            *most_at_once.borrow(),
            3,
            "the three allowlisted names were not all being looked up at the same time"
        );
        assert_eq!(
            allowed,
            vec![(
                "198.51.100.7".parse().unwrap(),
                Allowance::Resolution(HostName::parse("b.example").unwrap())
            )]
        );
        assert!(denied.is_empty(), "{denied:?}");
    }
}
