//! nitro-vsock-proxy: a drop-in replacement for AWS Nitro Enclaves' `vsock-proxy` that enforces
//! its YAML allowlist on every connection.
//!
//! The binary (`src/main.rs`) is a thin shell over these modules:
//! - [`cli`]: the command line; [`config`]: the configuration file; [`host`]: names, patterns
//!   and special addresses; [`policy`]: the pure allow/deny decision;
//! - [`route`]: what a route is, built from the command line and `routes:`, and the reload diff;
//!   [`remote`]: a route's `HOST:PORT`;
//! - [`dns`]: the shared resolver; [`upstream`]: resolve, decide and connect for one connection;
//! - [`endpoint`]: vsock and its `unix:`/`tcp:` stand-ins; [`relay`]: the data path;
//! - [`accept`]: the one accept loop (the daemon's and enclave-app's); [`server`]: the
//!   daemon's listeners, limits and draining; [`app`]: start-up, reload and shutdown;
//! - [`logging`]: the subscriber, never blocking; [`journal`]: entries with fields for journald;
//! - [`systemd`]: readiness, status, watchdog, socket activation and journal detection;
//!   [`imds`]: `{region}` in a remote from the EC2 instance metadata service.

pub mod accept;
pub mod app;
pub mod audit;
pub mod check;
pub mod cli;
pub mod config;
pub mod connect;
pub mod current;
pub mod dns;
pub mod endpoint;
pub mod heap;
pub mod host;
pub mod imds;
pub mod journal;
pub mod locate;
pub mod logging;
pub mod metrics;
pub mod metrics_server;
pub mod peers;
pub mod policy;
pub mod prefix;
pub mod relay;
pub mod remote;
pub mod revoke;
pub mod rlimit;
pub mod route;
pub mod server;
pub mod sni;
pub mod systemd;
pub mod upstream;
