//! Cross-cutting operations: logs, the journal, metrics and their endpoint (with `/healthz`), the
//! process's own figures from `/proc`, the audit trail, systemd's protocols and the heap's trim. What an operator sees of the daemon.
//!
//! Imports: [`crate::net`] only (the metrics endpoint listens on an [`crate::net::endpoint`]);
//! nothing here knows about policy, configuration or proxying. The logger, the journal, systemd
//! and the heap are also what enclave-app takes from this crate; the rest needs the `daemon`
//! feature (prometheus-client, hyper).

#[cfg(feature = "daemon")]
pub mod audit;
pub mod batch;
pub mod heap;
pub mod journal;
pub mod logging;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod metrics_server;
#[cfg(feature = "daemon")]
pub mod process;
pub mod systemd;
