//! Why a connection was turned away before relaying, and everything that follows from it.
//!
//! This module owns [`Refusal`]: one value for each way a connection is refused before any byte
//! is relayed (a CONNECT head that cannot be used, a ClientHello without a usable server name, a
//! server name that is not the route's, a requested host the allowlist cannot allow, no upstream
//! connection), and the one place each is turned into what the rest of the daemon sees: the
//! reason in logs and the audit trail ([`Refusal::reason`]), the message ([`fmt::Display`]), the
//! metrics outcome ([`Refusal::outcome`]), the HTTP status a CONNECT client is answered with
//! ([`Refusal::status`]) and the audit trail's requested host and addresses.
//!
//! A CONNECT route with `sni: require` reads the ClientHello only after `200 Connection
//! Established`: a refusal then is [`Refusal::InTunnel`], which is recorded like any other but
//! has no status to send, since the client already has its answer.

use std::fmt;

use crate::config::remote::Target;
use crate::ops::audit;
use crate::ops::metrics::Outcome;
use crate::policy::host::{Host, HostName};
use crate::policy::Denial;
use crate::proxy::request::{connect, sni};
use crate::proxy::upstream::UpstreamError;

/// A connection refused before relaying; see the module docs.
#[derive(Debug)]
pub enum Refusal {
    /// A CONNECT route's request head cannot be used, or the client left before it was whole.
    BadRequest(connect::BadRequest),
    /// An SNI route's (or `sni: require` route's) ClientHello names no usable server.
    Hello(sni::HelloError),
    /// `sni: require`: the ClientHello names a server the route does not let through.
    SniMismatch {
        server_name: HostName,
        expected: Expected,
    },
    /// The ClientHello carries `encrypted_client_hello` and the route does not have
    /// `ech: allow`: its server name (`None`: it has none) is only the outer, public name.
    Ech { server_name: Option<HostName> },
    /// A CONNECT route with `sni: require`: the tunnel to `target` was answered `200`, and then
    /// its first bytes were refused (any of the ClientHello refusals above).
    InTunnel {
        target: Target,
        refusal: Box<Refusal>,
    },
    /// The CONNECT host or TLS server name is not one the allowlist could allow (checked before
    /// any lookup).
    Denied { target: Target, denial: Denial },
    /// No upstream connection to `target`: its lookup failed, the policy denied every address,
    /// or every allowed address failed to connect.
    Upstream {
        target: Target,
        error: UpstreamError,
    },
}

/// What an `sni: require` route wanted the server name to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// A fixed route's remote.
    Remote(Host),
    /// The host name of the CONNECT request.
    ConnectHost(HostName),
    /// A CONNECT to an IP address: a name the allowlist allows by name (a host-name or wildcard
    /// entry) at this port, since no address entry vouches for a name.
    AllowlistedName { port: u16 },
}

impl Refusal {
    /// A short machine-friendly reason for logs and the audit trail: `bad_request`,
    /// `malformed_hello`, `sni_mismatch`, `ech`, `denied`, `dns_failure`, `unreachable`, ...
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadRequest(bad) => bad.kind(),
            Refusal::Hello(e) => e.kind(),
            Refusal::SniMismatch { .. } => "sni_mismatch",
            Refusal::Ech { .. } => "ech",
            Refusal::InTunnel { refusal, .. } => refusal.reason(),
            Refusal::Denied { .. } => "denied",
            Refusal::Upstream { error, .. } => error.kind(),
        }
    }

    /// How the connection counts in the metrics; also says whether this is a decision for the
    /// audit trail ([`Outcome::is_refusal`]) or a client that left.
    pub fn outcome(&self) -> Outcome {
        match self {
            // The client left before saying where to: not a decision.
            Refusal::BadRequest(connect::BadRequest::Closed) => Outcome::ClientError,
            Refusal::Denied { .. }
            | Refusal::Upstream {
                error: UpstreamError::Denied(_),
                ..
            } => Outcome::Denied,
            Refusal::Upstream {
                error: UpstreamError::Dns(_),
                ..
            } => Outcome::DnsFailure,
            Refusal::Upstream {
                error: UpstreamError::Unreachable(..),
                ..
            } => Outcome::Unreachable,
            Refusal::InTunnel { refusal, .. } => refusal.outcome(),
            Refusal::BadRequest(_)
            | Refusal::Hello(_)
            | Refusal::SniMismatch { .. }
            | Refusal::Ech { .. } => Outcome::Refused(self.reason()),
        }
    }

    /// The status a CONNECT client is answered with: the bad request's own, 403 denied, 504
    /// when every address timed out, 502 for any other upstream failure (DNS, every address
    /// failed). `None` for a client already gone, for the refusals only TLS routes make and for
    /// a tunnel already answered `200`.
    pub fn status(&self) -> Option<u16> {
        match self {
            Refusal::BadRequest(connect::BadRequest::Closed) => None,
            Refusal::BadRequest(bad) => Some(bad.status()),
            Refusal::Hello(_)
            | Refusal::SniMismatch { .. }
            | Refusal::Ech { .. }
            | Refusal::InTunnel { .. } => None,
            Refusal::Denied { .. } => Some(403),
            Refusal::Upstream { error, .. } => Some(match error {
                UpstreamError::Denied(_) => 403,
                UpstreamError::Unreachable(failures, _)
                    if !failures.is_empty()
                        && failures
                            .iter()
                            .all(|(_, e)| e.kind() == std::io::ErrorKind::TimedOut) =>
                {
                    504
                }
                UpstreamError::Unreachable(..) | UpstreamError::Dns(_) => 502,
            }),
        }
    }

    /// The host and port requested, for the audit trail: known once the request was read and
    /// taken (`None` for a request that could not be read or a refused ClientHello, except in a
    /// CONNECT tunnel, whose target is the CONNECT request's).
    pub fn target(&self) -> Option<&Target> {
        match self {
            Refusal::Denied { target, .. }
            | Refusal::Upstream { target, .. }
            | Refusal::InTunnel { target, .. } => Some(target),
            Refusal::BadRequest(_)
            | Refusal::Hello(_)
            | Refusal::SniMismatch { .. }
            | Refusal::Ech { .. } => None,
        }
    }

    /// Each address tried and what became of it, for the audit trail (none before a lookup; a
    /// tunnel refused after `200` reached its upstream, which the span's `upstream` names, but
    /// sent it nothing).
    pub fn addresses(&self) -> String {
        match self {
            Refusal::Upstream { error, .. } => error.addresses(),
            Refusal::BadRequest(_)
            | Refusal::Hello(_)
            | Refusal::SniMismatch { .. }
            | Refusal::Ech { .. }
            | Refusal::InTunnel { .. }
            | Refusal::Denied { .. } => audit::NO_ADDRESSES.to_owned(),
        }
    }
}

/// The message logged, audited and sent after a CONNECT client's status line.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadRequest(bad) => write!(f, "{bad}"),
            Refusal::Hello(e) => write!(f, "{e}"),
            Refusal::SniMismatch {
                server_name,
                expected: Expected::Remote(remote),
            } => write!(
                f,
                "the TLS server name {server_name} is not the route's remote {remote} (sni: require)"
            ),
            Refusal::SniMismatch {
                server_name,
                expected: Expected::ConnectHost(host),
            } => write!(
                f,
                "the TLS server name {server_name} is not the CONNECT host {host} (sni: require)"
            ),
            Refusal::SniMismatch {
                server_name,
                expected: Expected::AllowlistedName { port },
            } => write!(
                f,
                "the TLS server name {server_name} is not allowlisted by name for port {port} \
                 (sni: require; a CONNECT to an IP address may carry no server name, or one the \
                 allowlist names)"
            ),
            Refusal::Ech {
                server_name: Some(name),
            } => write!(
                f,
                "the TLS ClientHello carries encrypted_client_hello (ECH): its server name \
                 {name} is only the public name, the real one is hidden (ech: allow lets it through)"
            ),
            Refusal::Ech { server_name: None } => f.write_str(
                "the TLS ClientHello carries encrypted_client_hello (ECH): the real server name \
                 is hidden (ech: allow lets it through)",
            ),
            Refusal::InTunnel { target, refusal } => {
                write!(f, "in the CONNECT tunnel to {target}: {refusal}")
            }
            Refusal::Denied { target, denial } => write!(f, "{target} is not allowed: {denial}"),
            Refusal::Upstream { error, .. } => write!(f, "{error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    fn target() -> Target {
        Target {
            host: Host::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))),
            port: 443,
        }
    }

    fn name(text: &str) -> HostName {
        HostName::parse(text).unwrap()
    }

    fn in_tunnel(refusal: Refusal) -> Refusal {
        Refusal::InTunnel {
            target: target(),
            refusal: Box::new(refusal),
        }
    }

    fn unreachable(kinds: &[io::ErrorKind]) -> Refusal {
        let failures = kinds
            .iter()
            .map(|kind| {
                (
                    SocketAddr::from(([10, 0, 0, 7], 443)),
                    io::Error::new(*kind, "x"),
                )
            })
            .collect();
        Refusal::Upstream {
            target: target(),
            error: UpstreamError::Unreachable(failures, String::new()),
        }
    }

    /// The reason, the metrics label and the CONNECT status of each kind of refusal, as they
    /// were when these were a tuple and a string match.
    #[test]
    fn each_refusal_says_its_reason_outcome_and_status() {
        let cases: Vec<(Refusal, &str, &str, Option<u16>)> = vec![
            (
                Refusal::BadRequest(connect::BadRequest::Malformed("x".into())),
                "bad_request",
                "bad_request",
                Some(400),
            ),
            (
                Refusal::BadRequest(connect::BadRequest::Method("GET".into())),
                "method_not_allowed",
                "method_not_allowed",
                Some(405),
            ),
            (
                Refusal::BadRequest(connect::BadRequest::TooLarge),
                "head_too_large",
                "head_too_large",
                Some(431),
            ),
            (
                Refusal::BadRequest(connect::BadRequest::Timeout),
                "head_timeout",
                "head_timeout",
                Some(408),
            ),
            (
                Refusal::BadRequest(connect::BadRequest::Closed),
                "client_closed",
                "client_error",
                None,
            ),
            (
                Refusal::Hello(sni::HelloError::NotTls),
                "not_tls",
                "not_tls",
                None,
            ),
            (
                Refusal::Hello(sni::HelloError::Malformed("x".into())),
                "malformed_hello",
                "malformed_hello",
                None,
            ),
            (
                Refusal::Hello(sni::HelloError::NoServerName),
                "no_sni",
                "no_sni",
                None,
            ),
            (
                Refusal::Hello(sni::HelloError::BadServerName("x".into())),
                "bad_sni",
                "bad_sni",
                None,
            ),
            (
                Refusal::Hello(sni::HelloError::TooLarge),
                "hello_too_large",
                "hello_too_large",
                None,
            ),
            (
                Refusal::Hello(sni::HelloError::Timeout),
                "hello_timeout",
                "hello_timeout",
                None,
            ),
            (
                Refusal::Hello(sni::HelloError::Truncated),
                "hello_truncated",
                "hello_truncated",
                None,
            ),
            (
                Refusal::Denied {
                    target: target(),
                    denial: Denial::NotAllowlisted,
                },
                "denied",
                "denied",
                Some(403),
            ),
            (
                Refusal::Upstream {
                    target: target(),
                    error: UpstreamError::Denied(Vec::new()),
                },
                "denied",
                "denied",
                Some(403),
            ),
            (
                unreachable(&[io::ErrorKind::TimedOut, io::ErrorKind::TimedOut]),
                "unreachable",
                "unreachable",
                Some(504),
            ),
            (
                unreachable(&[io::ErrorKind::TimedOut, io::ErrorKind::ConnectionRefused]),
                "unreachable",
                "unreachable",
                Some(502),
            ),
            (unreachable(&[]), "unreachable", "unreachable", Some(502)),
            (
                Refusal::SniMismatch {
                    server_name: name("b.example"),
                    expected: Expected::ConnectHost(name("a.example")),
                },
                "sni_mismatch",
                "sni_mismatch",
                None,
            ),
            (
                Refusal::Ech {
                    server_name: Some(name("public.example")),
                },
                "ech",
                "ech",
                None,
            ),
            // After 200 the client has its answer: the inner refusal's reason, no status.
            (
                in_tunnel(Refusal::Hello(sni::HelloError::NotTls)),
                "not_tls",
                "not_tls",
                None,
            ),
            (
                in_tunnel(Refusal::Ech { server_name: None }),
                "ech",
                "ech",
                None,
            ),
        ];
        for (refusal, reason, label, status) in cases {
            assert_eq!(
                (
                    refusal.reason(),
                    refusal.outcome().label(),
                    refusal.status()
                ),
                (reason, label, status),
                "{refusal:?}"
            );
        }
    }

    #[test]
    fn only_a_client_that_left_is_not_a_decision() {
        assert!(!Refusal::BadRequest(connect::BadRequest::Closed)
            .outcome()
            .is_refusal());
        assert!(Refusal::Hello(sni::HelloError::Truncated)
            .outcome()
            .is_refusal());
    }

    #[test]
    fn the_messages_are_the_errors_own_or_name_the_target() {
        let denied = Refusal::Denied {
            target: target(),
            denial: Denial::NotAllowlisted,
        };
        assert_eq!(
            denied.to_string(),
            format!("10.0.0.7:443 is not allowed: {}", Denial::NotAllowlisted)
        );
        assert_eq!(denied.target(), Some(&target()));
        assert_eq!(denied.addresses(), "");
        let hello = Refusal::Hello(sni::HelloError::NotTls);
        assert_eq!(hello.to_string(), sni::HelloError::NotTls.to_string());
        assert_eq!(hello.target(), None);
        // A refusal in a CONNECT tunnel is audited with the CONNECT request's target.
        let tunnel = in_tunnel(Refusal::SniMismatch {
            server_name: name("b.example"),
            expected: Expected::ConnectHost(name("a.example")),
        });
        assert_eq!(tunnel.target(), Some(&target()));
        assert_eq!(
            tunnel.to_string(),
            "in the CONNECT tunnel to 10.0.0.7:443: the TLS server name b.example is not the \
             CONNECT host a.example (sni: require)"
        );
        assert!(
            !tunnel.outcome().label().is_empty() && tunnel.outcome().is_refusal(),
            "{tunnel:?}"
        );
    }
}
