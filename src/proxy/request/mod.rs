//! What a dynamic route reads from the client before it can decide: an HTTP CONNECT request
//! head ([`connect`]) or a TLS ClientHello's server name ([`sni`]). Pure parsers over a bounded
//! prefix ([`crate::net::prefix`]).
//!
//! Imports: [`crate::net`], [`crate::policy`] (host names), [`crate::config`] (remotes).

pub mod connect;
pub mod sni;
