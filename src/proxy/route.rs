//! Routes: the unit the daemon serves (listener → route → policy → upstream → relay).
//!
//! This module owns what a route is, how routes are built from the command line's positional
//! route and the configuration file's `routes:` ([`specs`]), the per-route state that lives with
//! a route while it is served ([`Route`]: its current [`Settings`], counters, connection limit,
//! and the tasks of its open connections), and how a reload turns the routes being served into
//! the routes of a new file ([`plan`], a pure diff by listen address). Accepting lives in
//! [`crate::proxy::server`], the decision in [`crate::policy`].

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::remote::{Remote, Target};
use crate::config::{Config, Ech, Ingress, RouteKind};
use crate::net::endpoint::Endpoint;
use crate::net::proxy_header::Version as ProxyProtocol;
use crate::ops::metrics::{Outcome, RouteMetrics};
use crate::policy::host::HostPattern;
use crate::policy::source;
use crate::proxy::current::Current;
use crate::proxy::revoke::RouteChecks;

/// Where a route was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// LISTEN REMOTE_ADDR REMOTE_PORT.
    CommandLine,
    /// `routes[index]` of the configuration file, at `line`.
    File { index: usize, line: Option<usize> },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::CommandLine => {
                f.write_str("LISTEN REMOTE_ADDR REMOTE_PORT on the command line")
            }
            Origin::File {
                index,
                line: Some(line),
            } => write!(f, "routes[{index}], line {line}"),
            Origin::File { index, line: None } => write!(f, "routes[{index}]"),
        }
    }
}

/// A route as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub listen: Endpoint,
    pub kind: RouteKind,
    pub max_connections: Option<u32>,
    /// `None`: the command line's `--idle-timeout`.
    pub idle_timeout: Option<Duration>,
    pub origin: Origin,
    /// `enclaves:`: only peers matching one of these `enclaves:` ids may use the route.
    pub enclaves: Option<Vec<String>>,
}

/// The routes to serve: the positional one (if given) beside the file's, in that order. Two
/// routes on one listen address, or no route at all, is a configuration error.
pub fn specs(
    positional: Option<(Endpoint, Remote)>,
    config: &Config,
    config_path: &Path,
) -> Result<Vec<RouteSpec>, String> {
    let mut specs = Vec::new();
    if let Some((listen, remote)) = positional {
        specs.push(RouteSpec {
            listen,
            kind: RouteKind::Fixed {
                remote,
                require_sni: None,
            },
            max_connections: None,
            idle_timeout: None,
            origin: Origin::CommandLine,
            enclaves: None,
        });
    }
    for (index, r) in config.routes.iter().enumerate() {
        let origin = Origin::File {
            index,
            line: r.line,
        };
        if specs.iter().any(|s: &RouteSpec| s.listen == r.listen) {
            return Err(format!(
                "configuration file {}, {origin}: listen address {} is already LISTEN on the \
                 command line; each route needs a listen address of its own (drop the \
                 positional route or this one)",
                config_path.display(),
                r.listen
            ));
        }
        specs.push(RouteSpec {
            listen: r.listen.clone(),
            kind: r.kind.clone(),
            max_connections: r.max_connections,
            idle_timeout: r.idle_timeout,
            origin,
            enclaves: r.enclaves.clone(),
        });
    }
    if specs.is_empty() {
        // The example is a remote the file allows (its first name or IP entry), so that
        // following it works; AWS's KMS endpoint when the file has only CIDRs and wildcards.
        let (host, port) = config
            .allowlist
            .entries
            .iter()
            .find_map(|e| match &e.address {
                HostPattern::Name(name) => Some((name.to_string(), e.port)),
                HostPattern::Ip(IpAddr::V4(ip)) => Some((ip.to_string(), e.port)),
                HostPattern::Ip(IpAddr::V6(ip)) => Some((format!("[{ip}]"), e.port)),
                _ => None,
            })
            .unwrap_or_else(|| ("kms.us-east-1.amazonaws.com".to_owned(), 443));
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        return Err(format!(
            "no route to serve: give one on the command line (nitro-vsock-proxy LISTEN \
             REMOTE_ADDR REMOTE_PORT, e.g. nitro-vsock-proxy 8000 {bare} {port} --config {0}) \
             or add `routes:` to {0}, e.g. `routes: [{{listen: 8000, remote: '{host}:{port}'}}]`",
            config_path.display()
        ));
    }
    Ok(specs)
}

/// What `routes` say about who may keep a connection (see [`RouteChecks`]): each ingress
/// route's sources and each route's `enclaves:`, by listen address.
pub fn checks<'a>(routes: impl IntoIterator<Item = &'a Settings>) -> RouteChecks {
    let mut checks = RouteChecks::default();
    for route in routes {
        let listen = route.spec.listen.to_string();
        if let Destination::Ingress(i) = &route.destination {
            checks.ingress.insert(listen.clone(), i.sources.clone());
        }
        if let Some(ids) = &route.spec.enclaves {
            checks.route_enclaves.insert(listen, ids.clone());
        }
    }
    checks
}

/// Where a route's connections go, its remote filled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// One target; with `require_sni`, the ClientHello's server name must be the target's name
    /// (and a hello with ECH is let through only with [`Ech::Allow`]).
    Fixed {
        target: Target,
        require_sni: Option<Ech>,
    },
    /// Each connection's HTTP CONNECT request names it; with `require_sni`, the first bytes in
    /// the tunnel must be a ClientHello naming the CONNECT host (see
    /// [`crate::proxy::connection`]).
    Connect { require_sni: Option<Ech> },
    /// Each connection's TLS server name, at `port`.
    Sni { port: u16, ech: Ech },
    /// No upstream: DNS queries answered from the allowlist (see [`crate::proxy::dns`]).
    Dns,
    /// The network to the enclave: each client judged by its source (see
    /// [`crate::proxy::ingress`]).
    Ingress(Ingress),
}

/// ` (sni: require)`, ` (sni: require, ech: allow)`, ` (ech: allow)` or nothing: the options
/// that check the server name, as written in the file.
fn name_check(f: &mut fmt::Formatter<'_>, require_sni: bool, ech: Ech) -> fmt::Result {
    match (require_sni, ech) {
        (false, Ech::Refuse) => Ok(()),
        (false, Ech::Allow) => f.write_str(" (ech: allow)"),
        (true, Ech::Refuse) => f.write_str(" (sni: require)"),
        (true, Ech::Allow) => f.write_str(" (sni: require, ech: allow)"),
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Fixed {
                target,
                require_sni,
            } => {
                target.fmt(f)?;
                name_check(f, require_sni.is_some(), require_sni.unwrap_or_default())
            }
            Destination::Connect { require_sni } => {
                f.write_str("HTTP CONNECT")?;
                name_check(f, require_sni.is_some(), require_sni.unwrap_or_default())
            }
            Destination::Sni { port, ech } => {
                write!(f, "TLS server name:{port}")?;
                name_check(f, false, *ech)
            }
            Destination::Dns => f.write_str("dns (names the allowlist allows by name)"),
            Destination::Ingress(ingress) => {
                let allow = if ingress.sources.allow_from.is_empty() {
                    "no one (allow_from is empty)".to_owned()
                } else {
                    source::list(&ingress.sources.allow_from)
                };
                write!(f, "ingress {} (allow_from {allow}", ingress.to)?;
                if ingress.proxy_protocol != ProxyProtocol::None {
                    write!(f, "; proxy_protocol {}", ingress.proxy_protocol)?;
                }
                if !ingress.sources.trusted.is_empty() {
                    write!(
                        f,
                        "; accept_proxy_protocol {}",
                        source::list(&ingress.sources.trusted)
                    )?;
                }
                f.write_str(")")
            }
        }
    }
}

/// What new connections on a route use: the spec with its remote filled and its defaults
/// applied. Replaced whole when a reload changes the route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub spec: RouteSpec,
    pub destination: Destination,
    pub max_connections: Option<u32>,
    pub idle_timeout: Option<Duration>,
}

impl Settings {
    /// `default_idle` is the command line's `--idle-timeout`.
    pub fn new(
        spec: RouteSpec,
        destination: Destination,
        default_idle: Option<Duration>,
    ) -> Settings {
        Settings {
            max_connections: spec.max_connections,
            idle_timeout: spec.idle_timeout.or(default_idle),
            destination,
            spec,
        }
    }

    /// Whether connections would be served differently (where it was written does not count).
    fn serves_like(&self, other: &Settings) -> bool {
        self.destination == other.destination
            && self.max_connections == other.max_connections
            && self.idle_timeout == other.idle_timeout
    }
}

impl fmt::Display for Settings {
    /// `vsock:8003 -> secretsmanager.us-east-1.amazonaws.com:443`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.spec.listen, self.destination)
    }
}

/// Live counters, per route and (in [`crate::proxy::shared::Shared`]) for the whole daemon.
/// Refusals are counted under the names the metrics give their outcomes: `denied` is the
/// policy's refusals only, not DNS failures or a CONNECT route's 405s.
#[derive(Default, Debug)]
pub struct Counters {
    pub accepted: AtomicU64,
    /// The policy refused the destination (`denied`).
    pub denied: AtomicU64,
    /// The destination's name could not be resolved (`dns_failure`).
    pub dns_failure: AtomicU64,
    /// Every allowed address failed to connect (`unreachable`).
    pub unreachable: AtomicU64,
    /// A CONNECT route's request with another method, answered 405 (`method_not_allowed`).
    pub method_not_allowed: AtomicU64,
    /// Any other CONNECT or TLS request refused (`bad_request`, `no_sni`, `sni_mismatch`, ...).
    pub refused_request: AtomicU64,
    pub rejected_over_limit: AtomicU64,
    pub open: AtomicU64,
}

impl Counters {
    /// Counts a connection refused before relaying under its outcome's name; a client that
    /// left before its request (not a decision) is not counted.
    pub fn count_refusal(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Denied => &self.denied,
            Outcome::DnsFailure => &self.dns_failure,
            Outcome::Unreachable => &self.unreachable,
            Outcome::OverLimit => &self.rejected_over_limit,
            Outcome::Refused("method_not_allowed") => &self.method_not_allowed,
            Outcome::Refused(_) => &self.refused_request,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `accepted=.. denied=.. dns_failure=.. ...` values for the totals lines and STATUS=, in
    /// one order: (name, value).
    pub fn totals(&self) -> [(&'static str, u64); 7] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("accepted", get(&self.accepted)),
            ("denied", get(&self.denied)),
            ("dns_failure", get(&self.dns_failure)),
            ("unreachable", get(&self.unreachable)),
            ("method_not_allowed", get(&self.method_not_allowed)),
            ("refused_request", get(&self.refused_request)),
            ("over_limit", get(&self.rejected_over_limit)),
        ]
    }

    /// Logs the totals at INFO as one line: `what` (`route totals`, `route removed`, `stopped`),
    /// the route's listen address when these are one route's counters, and, on the last line,
    /// how many connections the stop closed.
    pub fn log(&self, what: &'static str, route: Option<&Endpoint>, closed_at_stop: Option<usize>) {
        let [accepted, denied, dns_failure, unreachable, method_not_allowed, refused_request, over_limit] =
            self.totals().map(|(_, n)| n);
        tracing::info!(
            route = route.map(tracing::field::display),
            accepted,
            denied,
            dns_failure,
            unreachable,
            method_not_allowed,
            refused_request,
            over_limit,
            closed_at_stop,
            "{what}"
        );
    }
}

/// A route being served.
#[derive(Debug)]
pub struct Route {
    pub listen: Endpoint,
    /// `listen` as logged, audited and registered: made once, shared by every connection.
    pub name: Arc<str>,
    settings: Current<Settings>,
    pub counters: Counters,
    /// The route's open connections, to wait for when it is removed.
    pub tasks: TaskTracker,
    /// Cancelled when a removed route's drain time is up: its connections close.
    pub closed: CancellationToken,
    /// The route's Prometheus metrics (labelled with its listen address).
    pub metrics: RouteMetrics,
}

/// A dns route's query results are shown at 0 from the start (and from a reload that makes a
/// route one).
fn show_dns_results(settings: &Settings) {
    if settings.destination == Destination::Dns {
        crate::ops::metrics::global().dns_route(&settings.spec.listen.to_string());
    }
}

impl Route {
    pub fn new(settings: Settings) -> Route {
        show_dns_results(&settings);
        Route {
            listen: settings.spec.listen.clone(),
            name: settings.spec.listen.to_string().into(),
            counters: Counters::default(),
            tasks: TaskTracker::new(),
            closed: CancellationToken::new(),
            metrics: crate::ops::metrics::global().route(&settings.spec.listen.to_string()),
            settings: Current::new(settings),
        }
    }

    /// The settings as of now.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.get()
    }

    /// Makes `settings` the ones new connections use.
    pub fn replace_settings(&self, settings: Settings) {
        show_dns_results(&settings);
        self.settings.set(settings);
    }

    /// Takes one of the route's connection slots, or says the route's limit. The slot is given
    /// back when the returned guard is dropped, however the connection ends.
    pub fn try_reserve(self: &Arc<Route>) -> Result<RouteSlot, u32> {
        let limit = self.settings().max_connections;
        let taken = self
            .counters
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| match limit {
                Some(max) if open >= u64::from(max) => None,
                _ => Some(open + 1),
            });
        match (taken, limit) {
            (Ok(_), _) => Ok(RouteSlot {
                route: self.clone(),
            }),
            (Err(_), Some(max)) => Err(max),
            (Err(_), None) => Err(u32::MAX),
        }
    }
}

/// One open connection's place on its route (see [`Route::try_reserve`]).
#[derive(Debug)]
pub struct RouteSlot {
    route: Arc<Route>,
}

impl Drop for RouteSlot {
    fn drop(&mut self) {
        self.route.counters.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a reload does to the routes being served.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// New listen addresses: bind and serve.
    pub added: Vec<Settings>,
    /// Listen addresses no longer in the file: stop accepting, drain.
    pub removed: Vec<Endpoint>,
    /// Same listen address, served differently: new connections use the new settings.
    pub changed: Vec<Settings>,
    /// Same listen address, served the same.
    pub unchanged: Vec<Endpoint>,
}

impl ReloadPlan {
    /// `3 routes: 1 added, 1 removed, 1 changed, 1 unchanged`.
    pub fn summary(&self) -> String {
        let total = self.added.len() + self.changed.len() + self.unchanged.len();
        format!(
            "{total} route{}: {} added, {} removed, {} changed, {} unchanged",
            if total == 1 { "" } else { "s" },
            self.added.len(),
            self.removed.len(),
            self.changed.len(),
            self.unchanged.len()
        )
    }
}

/// The diff between the routes being served and the routes wanted, by listen address.
pub fn plan(current: &[Arc<Settings>], wanted: Vec<Settings>) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    for old in current {
        if !wanted.iter().any(|w| w.spec.listen == old.spec.listen) {
            plan.removed.push(old.spec.listen.clone());
        }
    }
    for new in wanted {
        match current.iter().find(|c| c.spec.listen == new.spec.listen) {
            None => plan.added.push(new),
            Some(old) if old.serves_like(&new) => plan.unchanged.push(new.spec.listen),
            Some(_) => plan.changed.push(new),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::host::Host;

    fn config(yaml: &str) -> Config {
        crate::config::parse(yaml, Path::new("/etc/p.yaml")).unwrap()
    }

    fn settings(listen: &str, remote: &str, idle: Option<u64>) -> Settings {
        let remote = Remote::parse_host_port(remote).unwrap();
        let target = remote.target(None).unwrap();
        let spec = RouteSpec {
            listen: listen.parse().unwrap(),
            kind: RouteKind::Fixed {
                remote,
                require_sni: None,
            },
            max_connections: None,
            idle_timeout: idle.map(Duration::from_secs),
            origin: Origin::CommandLine,
            enclaves: None,
        };
        Settings::new(
            spec,
            Destination::Fixed {
                target,
                require_sni: None,
            },
            None,
        )
    }

    const ALLOW: &str = "allowlist:\n- {address: a.example, port: 443}\n";

    #[test]
    fn the_positional_route_comes_first_beside_the_files() {
        let c = config(&format!(
            "{ALLOW}routes:\n- {{listen: 8000, remote: 'a.example:443'}}\n"
        ));
        let positional = Some((
            "8001".parse().unwrap(),
            Remote::parse_host_port("b.example:443").unwrap(),
        ));
        let s = specs(positional, &c, Path::new("/etc/p.yaml")).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].origin, Origin::CommandLine);
        assert_eq!(
            s[1].origin,
            Origin::File {
                index: 0,
                line: Some(4)
            }
        );
        assert_eq!(s[1].listen.to_string(), "vsock:8000");
    }

    #[test]
    fn a_positional_route_on_a_files_listen_address_is_an_error() {
        let c = config(&format!(
            "{ALLOW}routes:\n- {{listen: 'vsock:8000', remote: 'a.example:443'}}\n"
        ));
        let positional = Some((
            "8000".parse().unwrap(),
            Remote::parse_host_port("b.example:443").unwrap(),
        ));
        let e = specs(positional, &c, Path::new("/etc/p.yaml")).unwrap_err();
        assert!(e.contains("/etc/p.yaml, routes[0], line 4"), "{e}");
        assert!(e.contains("vsock:8000 is already LISTEN"), "{e}");
    }

    #[test]
    fn no_route_anywhere_says_how_to_give_one() {
        let e = specs(None, &config(ALLOW), Path::new("/etc/p.yaml")).unwrap_err();
        assert!(e.contains("LISTEN REMOTE_ADDR REMOTE_PORT"), "{e}");
        assert!(e.contains("routes:"), "{e}");
    }

    #[test]
    fn the_route_idle_timeout_overrides_the_command_lines() {
        let spec = settings("8000", "a.example:443", Some(600)).spec;
        let target = Destination::Fixed {
            target: Target {
                host: Host::parse("a.example").unwrap(),
                port: 443,
            },
            require_sni: None,
        };
        let s = Settings::new(spec.clone(), target.clone(), Some(Duration::from_secs(5)));
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(600)));
        let spec = RouteSpec {
            idle_timeout: None,
            ..spec
        };
        let s = Settings::new(spec, target, Some(Duration::from_secs(5)));
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.to_string(), "vsock:8000 -> a.example:443");
    }

    #[test]
    fn destinations_show_the_options_that_check_the_server_name() {
        let target = Target {
            host: Host::parse("a.example").unwrap(),
            port: 443,
        };
        for (destination, shown) in [
            (
                Destination::Fixed {
                    target: target.clone(),
                    require_sni: Some(Ech::Refuse),
                },
                "a.example:443 (sni: require)",
            ),
            (
                Destination::Fixed {
                    target,
                    require_sni: Some(Ech::Allow),
                },
                "a.example:443 (sni: require, ech: allow)",
            ),
            (Destination::Connect { require_sni: None }, "HTTP CONNECT"),
            (
                Destination::Connect {
                    require_sni: Some(Ech::Refuse),
                },
                "HTTP CONNECT (sni: require)",
            ),
            (
                Destination::Connect {
                    require_sni: Some(Ech::Allow),
                },
                "HTTP CONNECT (sni: require, ech: allow)",
            ),
            (
                Destination::Sni {
                    port: 443,
                    ech: Ech::Refuse,
                },
                "TLS server name:443",
            ),
            (
                Destination::Sni {
                    port: 443,
                    ech: Ech::Allow,
                },
                "TLS server name:443 (ech: allow)",
            ),
        ] {
            assert_eq!(destination.to_string(), shown);
        }
    }

    #[test]
    fn plan_diffs_by_listen_address() {
        let current: Vec<Arc<Settings>> = [
            settings("8000", "a.example:443", None),
            settings("8001", "b.example:443", None),
            settings("8002", "c.example:443", None),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let mut moved = settings("8001", "b.example:443", None);
        moved.spec.origin = Origin::File {
            index: 3,
            line: Some(9),
        };
        let wanted = vec![
            settings("8000", "a.example:443", Some(60)),
            moved,
            settings("8003", "d.example:443", None),
        ];
        let p = plan(&current, wanted);
        assert_eq!(p.removed, vec!["8002".parse().unwrap()]);
        assert_eq!(p.unchanged, vec!["8001".parse().unwrap()]);
        assert_eq!(p.changed.len(), 1);
        assert_eq!(p.changed[0].spec.listen.to_string(), "vsock:8000");
        assert_eq!(p.added.len(), 1);
        assert_eq!(p.added[0].destination.to_string(), "d.example:443");
        assert_eq!(
            p.summary(),
            "3 routes: 1 added, 1 removed, 1 changed, 1 unchanged"
        );
    }

    #[test]
    fn route_slots_respect_the_limit_and_are_given_back() {
        let mut s = settings("8000", "a.example:443", None);
        s.max_connections = Some(2);
        let route = Arc::new(Route::new(s));
        let a = route.try_reserve().unwrap();
        let _b = route.try_reserve().unwrap();
        assert_eq!(route.try_reserve().unwrap_err(), 2);
        drop(a);
        let _c = route.try_reserve().unwrap();
        assert_eq!(route.counters.open.load(Ordering::Relaxed), 2);
        // A reload that raises the limit applies to the next connection.
        let mut raised = (*route.settings()).clone();
        raised.max_connections = Some(3);
        route.replace_settings(raised);
        let _d = route.try_reserve().unwrap();
        assert_eq!(route.counters.open.load(Ordering::Relaxed), 3);
    }
}
