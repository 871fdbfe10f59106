//! Proxying: the listeners, admission and draining ([`server`]), one connection's life
//! ([`connection`]: route kind → request → policy → connect → answer → relay), why a connection
//! is refused and what each refusal logs, counts and answers ([`refusal`]), what every
//! connection shares ([`shared`]), what a route is ([`route`]), a dns route's connections
//! ([`dns`]: DNS queries answered from the allowlist), an ingress route's ([`ingress`]: the
//! network's clients to the enclave, judged by their source), the requests a route reads
//! ([`request`]: HTTP CONNECT, the TLS ClientHello), resolving and connecting upstream
//! ([`upstream`]), revoking on reload ([`revoke`]), per-peer limits ([`peers`]) and the
//! swap-on-reload cell ([`current`]).
//!
//! Imports: [`crate::net`], [`crate::ops`], [`crate::policy`], [`crate::config`]. Within it,
//! imports go one way: `server` → `connection` → `dns`, `ingress`, `refusal` → `request`, `upstream`; `shared` is
//! read by both `server` and `connection`.

pub mod connection;
pub mod current;
pub mod dns;
pub mod ingress;
pub mod peers;
pub mod refusal;
pub mod request;
pub mod revoke;
pub mod route;
pub mod server;
pub mod shared;
pub mod upstream;
