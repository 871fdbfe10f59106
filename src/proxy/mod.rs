//! Proxying: the listeners, admission and draining ([`server`]), one connection's life
//! ([`connection`]: route kind → request → policy → connect → answer → relay), what a route is
//! ([`route`]), the requests a route reads ([`request`]: HTTP CONNECT, the TLS ClientHello),
//! resolving and connecting upstream ([`upstream`]), revoking on reload ([`revoke`]), per-peer
//! limits ([`peers`]) and the swap-on-reload cell ([`current`]).
//!
//! Imports: [`crate::net`], [`crate::ops`], [`crate::policy`], [`crate::config`].

pub mod current;
pub mod peers;
pub mod request;
pub mod revoke;
pub mod route;
pub mod server;
pub mod upstream;
