//! The daemon's Prometheus metrics: what they are, and the one registry that holds them.
//!
//! This module owns the metric names, their labels and help texts, and the process-wide
//! [`Metrics`] every part of the daemon counts into ([`global`]); serving them over HTTP is
//! [`crate::ops::metrics_server`]'s. Everything here is an atomic add on a metric the caller already
//! holds, so counting is safe on the accept loop and the data path.
//!
//! Names (each `route` label is the route's listen address, e.g. `vsock:8000`):
//! - `nitro_vsock_proxy_connections_total{route,outcome}`: connections by how they ended, one
//!   of [`Outcome::label`]'s values.
//! - `nitro_vsock_proxy_connections_open{route}`: connections being served now.
//! - `nitro_vsock_proxy_bytes_total{route,direction}`: bytes relayed, `to_upstream` or
//!   `to_client`, counted as they move (a long transfer shows up while it runs).
//! - `nitro_vsock_proxy_connect_duration_seconds{route}`: DNS + policy + TCP connect, for the
//!   connections that reached an upstream.
//! - `nitro_vsock_proxy_dns_lookups_total{result}`: `ok`, `nxdomain`, `no_records`, `timeout`,
//!   `error` (answers from the cache count too: each is one lookup the policy made).
//! - `nitro_vsock_proxy_config_reloads_total{result}`: `ok` or `error`.
//! - `nitro_vsock_proxy_audit_lines_suppressed_total`: refusal log lines folded into a summary by
//!   the rate limit ([`crate::ops::audit`]).
//! - `nitro_vsock_proxy_build_info{version}`: always 1.
//! - `nitro_vsock_proxy_config_last_reload_successful`: 1 if the last configuration load (the
//!   start-up one or a SIGHUP reload) succeeded, else 0; and
//!   `nitro_vsock_proxy_config_last_reload_success_timestamp_seconds`, when the last good one
//!   happened (Unix time), as Prometheus itself names them.
//! - `nitro_vsock_proxy_max_connections`: the `--max-connections` value.
//! - `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
//!   `process_cpu_seconds_total`, `process_start_time_seconds`: read from `/proc` at each scrape
//!   ([`crate::ops::process`]), named as the Prometheus client libraries name them.
//!
//! [`Metrics::encode`] writes the Prometheus text format 0.0.4 (what `promtool check metrics`
//! and a scraper that asks for `text/plain` read), [`Metrics::encode_openmetrics`] OpenMetrics
//! 1.0 text; both are prometheus-client's encoders.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::net::relay::RelayEnd;

/// The content type of [`Metrics::encode`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The content type of [`Metrics::encode_openmetrics`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How a connection ended: the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Both directions ended and were passed on.
    Completed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// The client (enclave) side failed or left before the relay started.
    ClientError,
    /// The upstream side failed.
    UpstreamError,
    /// The policy refused the destination.
    Denied,
    /// The destination's name could not be resolved.
    DnsFailure,
    /// Every allowed address failed to connect.
    Unreachable,
    /// A connection limit was reached; closed at once.
    OverLimit,
    /// A reload's allowlist no longer allows its upstream address; closed.
    Revoked,
    /// `--max-lifetime` ran out.
    MaxLifetime,
    /// `--setup-timeout` ran out before relaying started.
    SetupTimeout,
    /// Closed because the daemon stopped or its route was removed, after the drain timeout.
    Drained,
    /// A CONNECT or SNI route refused what the client sent (the reason is the label).
    Refused(&'static str),
}

impl From<&RelayEnd> for Outcome {
    /// How a relayed connection ended, as counted.
    fn from(end: &RelayEnd) -> Outcome {
        match end {
            RelayEnd::Completed => Outcome::Completed,
            RelayEnd::IdleTimeout => Outcome::IdleTimeout,
            RelayEnd::ClientError(_) => Outcome::ClientError,
            RelayEnd::UpstreamError(_) => Outcome::UpstreamError,
        }
    }
}

impl Outcome {
    /// The label value: `completed`, `idle_timeout`, ..., or a CONNECT/SNI refusal's reason
    /// (`bad_request`, `method_not_allowed`, `head_too_large`, `head_timeout`, `not_tls`,
    /// `malformed_hello`, `no_sni`, `bad_sni`, `hello_too_large`, `hello_timeout`,
    /// `hello_truncated`, `sni_mismatch`, `ech`, `client_closed`).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Denied => "denied",
            Outcome::DnsFailure => "dns_failure",
            Outcome::Unreachable => "unreachable",
            Outcome::OverLimit => "over_limit",
            Outcome::Revoked => "revoked",
            Outcome::MaxLifetime => "max_lifetime",
            Outcome::SetupTimeout => "setup_timeout",
            Outcome::Drained => "drained",
            Outcome::Refused(reason) => reason,
        }
    }

    /// Whether the connection was refused by a decision (the audit trail's business), rather
    /// than ended by the network, a timeout or the operator.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            Outcome::Denied
                | Outcome::DnsFailure
                | Outcome::Unreachable
                | Outcome::OverLimit
                | Outcome::Refused(_)
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOutcome {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteDirection {
    route: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteResult {
    route: String,
    result: &'static str,
}

/// The results of a DNS route's queries, as `nitro_vsock_proxy_dns_queries_total{result}` labels
/// them: `answered` (addresses), `nodata` (the name is allowed, no address of that type is, or
/// the type is not answered: HTTPS, SVCB, ...), `nxdomain` (upstream said the name does not
/// exist), `blocked` (the allowlist does not allow the name by name), `servfail`, `refused` (PTR,
/// a class other than IN, an opcode other than QUERY), `formerr` (a malformed query).
pub const DNS_RESULTS: [&str; 7] = [
    "answered", "nodata", "nxdomain", "blocked", "servfail", "refused", "formerr",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnclaveOutcome {
    enclave: String,
    outcome: &'static str,
}

/// The results of `--enclaves-command`, as `nitro_vsock_proxy_enclaves_command_runs_total{result}`
/// labels them: `ok`, `failed` (could not start, or exited non-zero), `timeout` (killed after
/// 5 s), `invalid` (printed something that is not describe-enclaves' JSON).
pub const ENCLAVES_COMMAND_RESULTS: [&str; 4] = ["ok", "failed", "timeout", "invalid"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

type DurationFamily = Family<RouteLabel, Histogram, fn() -> Histogram>;

/// Every metric of the daemon.
pub struct Metrics {
    registry: Registry,
    connections: Family<RouteOutcome, Counter>,
    open: Family<RouteLabel, Gauge>,
    bytes: Family<RouteDirection, Counter>,
    connect_duration: DurationFamily,
    dns_lookups: Family<ResultLabel, Counter>,
    dns_queries: Family<RouteResult, Counter>,
    enclave_connections: Family<EnclaveOutcome, Counter>,
    enclaves_command_runs: Family<ResultLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    audit_suppressed: Counter,
    log_lines_dropped: Counter,
    last_reload_successful: Gauge,
    last_reload_success_timestamp: Gauge<f64, AtomicU64>,
    max_connections: Gauge,
}

/// 0.5 ms to ≈ 16 s: a cached loopback connect to a connect timeout.
fn connect_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    fn new() -> Metrics {
        let mut root = Registry::default();
        // process_*: no prefix, as every Prometheus client library names them.
        root.register_collector(Box::new(crate::ops::process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("nitro_vsock_proxy");
        let connections = Family::<RouteOutcome, Counter>::default();
        registry.register(
            "connections",
            "Connections by route and by how they ended",
            connections.clone(),
        );
        let open = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "connections_open",
            "Connections being served now, by route",
            open.clone(),
        );
        let bytes = Family::<RouteDirection, Counter>::default();
        registry.register(
            "bytes",
            "Bytes relayed, by route and direction (to_upstream, to_client), counted as they move",
            bytes.clone(),
        );
        let connect_duration: DurationFamily =
            Family::new_with_constructor(connect_duration_histogram as fn() -> Histogram);
        registry.register(
            "connect_duration_seconds",
            "Time from knowing the destination to a connected upstream: DNS, policy and TCP connect",
            connect_duration.clone(),
        );
        let dns_lookups = Family::<ResultLabel, Counter>::default();
        registry.register(
            "dns_lookups",
            "DNS lookups made for the policy, by result (ok, nxdomain, no_records, timeout, error)",
            dns_lookups.clone(),
        );
        let dns_queries = Family::<RouteResult, Counter>::default();
        registry.register(
            "dns_queries",
            "Queries answered by dns routes, by route and result (answered, nodata, nxdomain, \
             blocked, servfail, refused, formerr)",
            dns_queries.clone(),
        );
        let enclave_connections = Family::<EnclaveOutcome, Counter>::default();
        registry.register(
            "enclave_connections",
            "Connections by the enclaves: entry they matched (one per entry; - for none) and by \
             how they ended",
            enclave_connections.clone(),
        );
        let enclaves_command_runs = Family::<ResultLabel, Counter>::default();
        registry.register(
            "enclaves_command_runs",
            "Runs of --enclaves-command, by result (ok, failed, timeout, invalid)",
            enclaves_command_runs.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result (ok, error)",
            reloads.clone(),
        );
        let audit_suppressed = Counter::default();
        registry.register(
            "audit_lines_suppressed",
            "Refusal log lines folded into a summary by the per (route, peer, reason) rate limit",
            audit_suppressed.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because standard error or the journal did not keep up",
            log_lines_dropped.clone(),
        );
        let last_reload_successful = Gauge::default();
        registry.register(
            "config_last_reload_successful",
            "Whether the last configuration load (at start-up or on SIGHUP) succeeded: 1 or 0",
            last_reload_successful.clone(),
        );
        let last_reload_success_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load (at start-up or on SIGHUP)",
            last_reload_success_timestamp.clone(),
        );
        let max_connections = Gauge::default();
        registry.register(
            "max_connections",
            "The --max-connections limit: connections served at once over all routes",
            max_connections.clone(),
        );
        let build_info = Family::<VersionLabel, Gauge>::default();
        registry.register(
            "build_info",
            "The running build: always 1, with the version as a label",
            build_info.clone(),
        );
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        // Known results show up as 0 before the first one happens, so rate() works from the start.
        for result in ["ok", "nxdomain", "no_records", "timeout", "error"] {
            drop(dns_lookups.get_or_create(&ResultLabel { result }));
        }
        for result in ["ok", "error"] {
            drop(reloads.get_or_create(&ResultLabel { result }));
        }
        Metrics {
            registry: root,
            connections,
            open,
            bytes,
            connect_duration,
            dns_lookups,
            dns_queries,
            enclave_connections,
            enclaves_command_runs,
            reloads,
            audit_suppressed,
            log_lines_dropped,
            last_reload_successful,
            last_reload_success_timestamp,
            max_connections,
        }
    }

    /// The metrics of one route, to hold for as long as the route is served.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let label = RouteLabel {
            route: route.to_owned(),
        };
        let bytes = |direction| {
            self.bytes.get_or_create_owned(&RouteDirection {
                route: route.to_owned(),
                direction,
            })
        };
        // Every outcome a fixed route can have is shown from the start, at 0.
        for outcome in [
            Outcome::Completed,
            Outcome::IdleTimeout,
            Outcome::ClientError,
            Outcome::UpstreamError,
            Outcome::Denied,
            Outcome::DnsFailure,
            Outcome::Unreachable,
            Outcome::OverLimit,
            Outcome::Revoked,
            Outcome::SetupTimeout,
            Outcome::MaxLifetime,
            Outcome::Drained,
        ] {
            drop(self.connections.get_or_create(&RouteOutcome {
                route: route.to_owned(),
                outcome: outcome.label(),
            }));
        }
        RouteMetrics {
            route: route.to_owned(),
            open: self.open.get_or_create_owned(&label),
            to_upstream: bytes("to_upstream"),
            to_client: bytes("to_client"),
            connect_duration: self.connect_duration.get_or_create_owned(&label),
        }
    }

    /// Shows every result of a dns route's queries at 0, so that rate() works from the start.
    pub fn dns_route(&self, route: &str) {
        for result in DNS_RESULTS {
            drop(self.dns_queries.get_or_create(&RouteResult {
                route: route.to_owned(),
                result,
            }));
        }
    }

    /// Counts one query a dns route answered (or left unanswered: a malformed header), by
    /// its result, one of [`DNS_RESULTS`].
    pub fn dns_query(&self, route: &str, result: &'static str) {
        self.dns_queries
            .get_or_create(&RouteResult {
                route: route.to_owned(),
                result,
            })
            .inc();
    }

    /// Shows every result of `--enclaves-command` at 0, once it is used.
    pub fn enclaves_command_used(&self) {
        for result in ENCLAVES_COMMAND_RESULTS {
            drop(
                self.enclaves_command_runs
                    .get_or_create(&ResultLabel { result }),
            );
        }
    }

    /// Counts one run of `--enclaves-command`, by one of [`ENCLAVES_COMMAND_RESULTS`].
    pub fn enclaves_command_run(&self, result: &'static str) {
        self.enclaves_command_runs
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one connection's end once for each `enclaves:` id it matched (`-` for none).
    pub fn enclave_connection_ended<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
        outcome: Outcome,
    ) {
        let mut any = false;
        for id in ids {
            any = true;
            self.enclave_connections
                .get_or_create(&EnclaveOutcome {
                    enclave: id.to_owned(),
                    outcome: outcome.label(),
                })
                .inc();
        }
        if !any {
            self.enclave_connections
                .get_or_create(&EnclaveOutcome {
                    enclave: "-".to_owned(),
                    outcome: outcome.label(),
                })
                .inc();
        }
    }

    /// Counts one connection's end.
    pub fn connection_ended(&self, route: &RouteMetrics, outcome: Outcome) {
        self.connections
            .get_or_create(&RouteOutcome {
                route: route.route.clone(),
                outcome: outcome.label(),
            })
            .inc();
    }

    /// Counts one DNS lookup by its result label.
    pub fn dns_lookup(&self, result: &'static str) {
        self.dns_lookups
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one reload, and sets the last-reload gauges.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
        self.config_loaded(ok);
    }

    /// Sets the last-reload gauges for a configuration load (the start-up one, or a reload's)
    /// without counting a reload.
    pub fn config_loaded(&self, ok: bool) {
        self.last_reload_successful.set(i64::from(ok));
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.last_reload_success_timestamp.set(now);
        }
    }

    /// Sets the `--max-connections` gauge.
    pub fn set_max_connections(&self, limit: u32) {
        self.max_connections.set(i64::from(limit));
    }

    /// Counts refusal lines the audit rate limit folded into a summary.
    pub fn audit_suppressed(&self, n: u64) {
        self.audit_suppressed.inc_by(n);
    }

    /// Sets the log lines dropped so far (the logger keeps the total; this mirrors it).
    pub fn set_log_lines_dropped(&self, total: u64) {
        let now = self.log_lines_dropped.get();
        if total > now {
            self.log_lines_dropped.inc_by(total - now);
        }
    }

    /// The Prometheus text exposition, format 0.0.4 ([`PROMETHEUS_CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The OpenMetrics 1.0 text exposition, ending in `# EOF` ([`OPENMETRICS_CONTENT_TYPE`]).
    pub fn encode_openmetrics(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// One route's metrics, held by the route and cloned into each connection: counting is an
/// atomic add, no label lookup.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    route: String,
    pub open: Gauge,
    pub to_upstream: Counter,
    pub to_client: Counter,
    pub connect_duration: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The daemon's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_the_documented_ones() {
        let m = Metrics::new();
        let r = m.route("vsock:8000");
        m.connection_ended(&r, Outcome::Refused("no_sni"));
        r.to_upstream.inc_by(5);
        r.open.inc();
        r.connect_duration.observe(0.002);
        m.dns_lookup("nxdomain");
        m.reload(false);
        m.set_max_connections(77);
        let text = m.encode().unwrap();
        for line in [
            "nitro_vsock_proxy_connections_total{route=\"vsock:8000\",outcome=\"drained\"} 0",
            "nitro_vsock_proxy_connections_total{route=\"vsock:8000\",outcome=\"setup_timeout\"} 0",
            "nitro_vsock_proxy_connections_total{route=\"vsock:8000\",outcome=\"max_lifetime\"} 0",
            "nitro_vsock_proxy_config_last_reload_successful 0",
            "nitro_vsock_proxy_config_last_reload_success_timestamp_seconds 0.0",
            "nitro_vsock_proxy_max_connections 77",
            "process_open_fds ",
            "nitro_vsock_proxy_connections_total{route=\"vsock:8000\",outcome=\"no_sni\"} 1",
            "nitro_vsock_proxy_connections_total{route=\"vsock:8000\",outcome=\"revoked\"} 0",
            "nitro_vsock_proxy_bytes_total{route=\"vsock:8000\",direction=\"to_upstream\"} 5",
            "nitro_vsock_proxy_connections_open{route=\"vsock:8000\"} 1",
            "nitro_vsock_proxy_connect_duration_seconds_count{route=\"vsock:8000\"} 1",
            "nitro_vsock_proxy_dns_lookups_total{result=\"nxdomain\"} 1",
            "nitro_vsock_proxy_config_reloads_total{result=\"error\"} 1",
            "nitro_vsock_proxy_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        m.config_loaded(true);
        assert!(m
            .encode()
            .unwrap()
            .contains("nitro_vsock_proxy_config_last_reload_successful 1"));
    }

    #[test]
    fn prometheus_text_by_default_openmetrics_when_asked() {
        let m = Metrics::new();
        drop(m.route("vsock:8000"));
        let text = m.encode().unwrap();
        // 0.0.4: HELP and TYPE name the counter's samples (`_total`), no `# EOF`.
        assert!(
            text.contains("# HELP nitro_vsock_proxy_connections_total "),
            "{text}"
        );
        assert!(
            text.contains("# TYPE nitro_vsock_proxy_connections_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        let open = m.encode_openmetrics().unwrap();
        assert!(
            open.contains("# TYPE nitro_vsock_proxy_connections counter"),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"), "{open}");
    }
}
