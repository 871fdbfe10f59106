//! nitro-vsock-proxy: a drop-in replacement for AWS Nitro Enclaves' `vsock-proxy` that enforces
//! its YAML allowlist on every connection.
//!
//! The folders are layers; each imports only from the ones below it (`tests/layers.rs` checks):
//! - [`daemon`]: start-up, reload, `--check-config`, shutdown and exit statuses;
//! - [`proxy`]: listeners, one connection's life, routes, requests, upstream connects;
//! - [`config`]: the configuration file, the command line, remotes and `{region}`;
//! - [`policy`]: names and addresses, the allowlist, the pure decision, the resolver;
//! - [`ops`]: logs, the journal, metrics, the audit trail, systemd, the heap;
//! - [`net`]: vsock and its stand-ins, the accept loop, the relay.
//!
//! Without the default `daemon` feature only [`net`] and the logging half of [`ops`] are built:
//! what enclave-app needs, without the resolver, YAML, HTTP server or metrics crates.

#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod net;
pub mod ops;
#[cfg(feature = "daemon")]
pub mod policy;
#[cfg(feature = "daemon")]
pub mod proxy;
