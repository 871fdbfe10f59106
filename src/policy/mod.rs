//! Deciding: names, patterns and special addresses ([`host`]), the allowlist ([`allowlist`]),
//! the pure allow/deny decision ([`decision`]), the resolver whose answers it is given
//! ([`dns`]) and an ingress route's sources ([`source`]).
//!
//! Imports: [`crate::ops`] (the resolver counts its lookups). The decision itself does no I/O: it
//! is a function of the allowlist, the requested name, DNS answers and the destination.

pub mod allowlist;
pub mod decision;
pub mod dns;
pub mod host;
pub mod overlap;
pub mod source;

pub use allowlist::{Allowlist, Entry};
pub use decision::{Allowance, Denial, Policy, Resolutions};
