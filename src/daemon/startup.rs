//! From the configuration file and the command line to routes checked against the allowlist,
//! then to listeners: start-up's steps, of which reload repeats the first.
//!
//! This module owns loading ([`load`]: the file, the routes of the file and of the command line,
//! `{region}` templates filled from the instance metadata service), the check that every route's
//! remote is allowed at all ([`check_route`], [`check_routes`]), the two together with a new
//! resolver ([`prepare`], done at start-up and again on every reload), the open-file limit
//! ([`raise_open_file_limit`]) and the listeners ([`bind`]: systemd's sockets adopted, every
//! other route's address bound, then the metrics endpoint). As AWS's proxy does, a remote that is
//! not allowlisted is a configuration error; unlike AWS's, every connection is checked again
//! later.
//!
//! Imports [`crate::daemon::settings`] only, from the rest of the daemon.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::cli::Options;
use crate::config::imds::InstanceInfo;
use crate::config::remote::Target;
use crate::config::RouteKind;
use crate::config::{self, Config};
use crate::daemon::settings::Settings as DaemonSettings;
use crate::net::endpoint::{Endpoint, Listener};
use crate::policy::dns::{Dns, DnsFailure, LookupError};
use crate::policy::host::{special_kind, Host, HostPattern, SpecialKind};
use crate::policy::overlap::{overlaps, OverlapKind};
use crate::policy::{Allowance, Policy};
use crate::proxy::route::{self, Destination, Route, Settings};
use crate::proxy::server::{Served, ServedRoute};
use crate::proxy::upstream::allowed_addresses;

/// A reason to stop before serving (or to refuse a reload). Its `Display` is the message.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// The configuration (file or arguments) is wrong: exit status 2.
    #[error("{0}")]
    Config(String),
    /// Something outside the configuration failed: exit status 1.
    #[error("{0}")]
    Runtime(String),
}

impl Fatal {
    pub fn exit_status(&self) -> u8 {
        match self {
            Fatal::Config(_) => 2,
            Fatal::Runtime(_) => 1,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Fatal::Config(m) | Fatal::Runtime(m) => m,
        }
    }
}

/// The instance metadata service, asked at most once for what templates need.
pub struct Metadata {
    endpoint: SocketAddr,
    info: Option<InstanceInfo>,
}

impl Metadata {
    pub fn new(endpoint: SocketAddr) -> Metadata {
        Metadata {
            endpoint,
            info: None,
        }
    }

    async fn info(&mut self, with_domain: bool, needed_by: &str) -> Result<&InstanceInfo, String> {
        let have = self
            .info
            .as_ref()
            .is_some_and(|i| !with_domain || !i.domain.is_empty());
        if !have {
            let info = crate::config::imds::instance_info_with_retries(
                self.endpoint,
                with_domain,
                needed_by,
            )
            .await?;
            info!(region = %info.region, "read the instance's region from the instance metadata service");
            self.info = Some(info);
        }
        self.info
            .as_ref()
            .ok_or_else(|| "no instance metadata".to_owned())
    }
}

/// The configuration, loaded.
pub struct Loaded {
    pub config: Config,
    pub policy: Policy,
    /// Every route to serve, its remote filled, in order: the positional one first.
    pub routes: Vec<Settings>,
    /// Allowlist entries that add nothing (duplicates, shadowed by a wider entry), one message
    /// each: warnings, logged at start-up and on reload and printed by `--check-config`.
    pub warnings: Vec<String>,
}

/// One message per allowlist entry that adds nothing (see [`overlaps`]), naming both entries
/// with their lines, in the file's order.
pub fn overlap_warnings(config: &Config, path: &Path) -> Vec<String> {
    let entries = &config.allowlist.entries;
    let name = |i: usize| {
        let line = config
            .allowlist_lines
            .get(i)
            .copied()
            .flatten()
            .map_or_else(String::new, |l| format!(", line {l}"));
        entries
            .get(i)
            .map_or_else(String::new, |e| format!("{e} (allowlist[{i}]{line})"))
    };
    overlaps(entries)
        .into_iter()
        .map(|o| {
            let (entry, by) = (name(o.entry), name(o.by));
            let what = match o.kind {
                OverlapKind::Duplicate => {
                    format!("{entry} duplicates {by}; drop one of them")
                }
                OverlapKind::InsideBlock => {
                    // An IP beside the single-address block of the same address is not "inside
                    // a wider" one, but the block allows all it allows all the same.
                    let single = matches!(entries.get(o.by).map(|e| &e.address),
                        Some(HostPattern::Cidr(net)) if net.prefix_len() == net.max_prefix_len());
                    let (wider, goes) = if single {
                        ("block", "the block")
                    } else {
                        ("wider", "the wider entry")
                    };
                    format!(
                        "{entry} is shadowed by the {wider} {by}, which already allows all it \
                         allows; drop it, unless it is there for when {goes} goes"
                    )
                }
                OverlapKind::MatchedByWildcard => format!(
                    "{entry} is shadowed by the wildcard {by}, which already allows the name; \
                     drop it, unless a route relies on its DNS answers vouching for an IP remote"
                ),
            };
            format!("configuration file {}: {what}", path.display())
        })
        .collect()
}

/// One message per ingress route whose `allow_from` is empty: valid (a route being readied, or
/// closed for now), but it admits no one, which is rarely what was meant.
fn ingress_warnings(routes: &[Settings], path: &Path) -> Vec<String> {
    routes
        .iter()
        .filter(|r| {
            matches!(&r.destination, Destination::Ingress(i) if i.sources.allow_from.is_empty())
        })
        .map(|r| {
            format!(
                "configuration file {}: route {} ({}): `allow_from` is empty, so it admits no \
                 one: every connection is refused; add the client blocks that may connect, like \
                 [\"10.0.0.0/8\"]",
                path.display(),
                r.spec.listen,
                r.spec.origin
            )
        })
        .collect()
}

/// What [`load`] may come back with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    /// At least one route (the daemon serves routes): none at all is a configuration error.
    Required,
    /// No route at all is fine: `--check-config` then checks the file alone, as `nginx -t`.
    Optional,
}

/// Reads the file (off the async workers, within [`CONFIG_READ_TIMEOUT`]) and builds the
/// routes. Errors in the file or the arguments are [`Fatal::Config`]; an unreachable metadata
/// service or a read that missed its deadline is [`Fatal::Runtime`].
pub async fn load(
    options: &Options,
    metadata: &mut Metadata,
    need: Routes,
) -> Result<Loaded, Fatal> {
    let path = &options.config;
    let config = load_file(path).await?;
    let positional = options.positional_route();
    if need == Routes::Optional && positional.is_none() && config.routes.is_empty() {
        let policy = Policy::new(config.allowlist.clone());
        let warnings = overlap_warnings(&config, path);
        return Ok(Loaded {
            config,
            policy,
            routes: Vec::new(),
            warnings,
        });
    }
    let specs = route::specs(positional, &config, path).map_err(Fatal::Config)?;
    let mut routes = Vec::with_capacity(specs.len());
    for spec in specs {
        let (remote, require_sni) = match &spec.kind {
            RouteKind::Connect { require_sni } => {
                let require_sni = *require_sni;
                routes.push(Settings::new(
                    spec,
                    Destination::Connect { require_sni },
                    options.idle_timeout,
                ));
                continue;
            }
            RouteKind::Dns => {
                routes.push(Settings::new(spec, Destination::Dns, options.idle_timeout));
                continue;
            }
            RouteKind::Ingress(ingress) => {
                let destination = Destination::Ingress(ingress.clone());
                routes.push(Settings::new(spec, destination, options.idle_timeout));
                continue;
            }
            RouteKind::Sni { port, ech } => {
                let (port, ech) = (*port, *ech);
                routes.push(Settings::new(
                    spec,
                    Destination::Sni { port, ech },
                    options.idle_timeout,
                ));
                continue;
            }
            RouteKind::Fixed {
                remote,
                require_sni,
            } => (remote.clone(), *require_sni),
        };
        let info = match remote.metadata_needed() {
            None => None,
            Some(with_domain) => {
                let needed_by = format!("the remote {remote} of route {}", spec.listen);
                Some(
                    metadata
                        .info(with_domain, &needed_by)
                        .await
                        .map_err(Fatal::Runtime)?
                        .clone(),
                )
            }
        };
        let target = remote.target(info.as_ref()).map_err(Fatal::Runtime)?;
        if let Some(info) = &info {
            info!(region = %info.region, remote = %target.host, route = %spec.listen, "{remote} filled from the instance metadata service");
        }
        let destination = Destination::Fixed {
            target,
            require_sni,
        };
        routes.push(Settings::new(spec, destination, options.idle_timeout));
    }
    let policy = Policy::new(config.allowlist.clone());
    let mut warnings = overlap_warnings(&config, path);
    warnings.extend(ingress_warnings(&routes, path));
    Ok(Loaded {
        config,
        policy,
        routes,
        warnings,
    })
}

/// How long reading and parsing the configuration file may take, at start-up, on reload and in
/// `--check-config`. A local file takes milliseconds; this only bounds a file system that stopped
/// answering (a hung network mount), where even stat() can block.
pub const CONFIG_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// [`config::load`] on a blocking thread within [`CONFIG_READ_TIMEOUT`]: it does blocking I/O,
/// and on an async worker it would stall every connection that worker serves (with `-w 1`, all
/// of them, and the signal handling with them).
async fn load_file(path: &Path) -> Result<Config, Fatal> {
    let owned = path.to_owned();
    match off_runtime(CONFIG_READ_TIMEOUT, move || config::load(&owned)).await {
        Ok(Ok(config)) => Ok(config),
        Ok(Err(e)) => Err(Fatal::Config(with_default_hint(path, e))),
        // Not the file's content that is wrong, so exit status 1: systemd tries again later.
        Err(OffRuntime::TimedOut) => Err(Fatal::Runtime(format!(
            "cannot read configuration file {}: reading and parsing it took longer than {}, so \
             it was given up; check that the file system it is on answers (a hung network mount?)",
            path.display(),
            humantime::format_duration(CONFIG_READ_TIMEOUT)
        ))),
        Err(OffRuntime::Failed(e)) => Err(Fatal::Runtime(format!(
            "cannot read configuration file {}: the thread reading it failed: {e}",
            path.display()
        ))),
    }
}

/// The error, and for a missing default file where else the allowlist may be: the default
/// `--config` is AWS's path, which a host without AWS's package does not have, while this
/// project's units and packages keep theirs in /etc/nitro-vsock-proxy/.
fn with_default_hint(path: &Path, e: config::ConfigError) -> String {
    let missing = matches!(&e, config::ConfigError::Read { source, .. }
        if source.kind() == std::io::ErrorKind::NotFound);
    if missing && path == Path::new(crate::config::cli::DEFAULT_CONFIG) {
        format!(
            "{e}; that is AWS's default path (from AWS's Nitro Enclaves CLI package); this \
             project's packages install /etc/nitro-vsock-proxy/vsock-proxy.yaml and \
             /etc/nitro-vsock-proxy/routes.yaml: name the file with --config FILE"
        )
    } else {
        e.to_string()
    }
}

/// Why [`off_runtime`] has no result.
#[derive(Debug)]
enum OffRuntime {
    /// The deadline passed; the thread is left to finish (or not) on its own.
    TimedOut,
    /// The work panicked or the runtime is shutting down.
    Failed(tokio::task::JoinError),
}

/// Runs blocking `work` on tokio's blocking pool and waits for it at most `deadline`. On timeout
/// the thread is abandoned, not joined: nothing here can interrupt a blocked system call, and
/// the caller (a reload, or SIGTERM's handling waiting behind it) must go on. Exiting does not
/// wait for it either: the runtime is shut down with `shutdown_background` (see `daemon::run::run`).
async fn off_runtime<T: Send + 'static>(
    deadline: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OffRuntime> {
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(work)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(OffRuntime::Failed(e)),
        Err(_) => Err(OffRuntime::TimedOut),
    }
}

/// How a route is allowed: the indexes of the allowlist entries it relies on, and whether it
/// took DNS to tell.
#[derive(Debug, Default)]
pub struct Reliance {
    pub entries: Vec<usize>,
    pub via_dns: bool,
}

/// Checks that `route`'s remote is allowed at all. A name allowlisted as such needs no DNS, so a
/// DNS outage at boot does not stop the daemon. For a remote that only DNS can vouch for, DNS
/// answering that the name does not exist or has no address is [`Fatal::Config`] (exit 2: a
/// misspelt remote or a missing entry, which no restart fixes); DNS not answering (timeout,
/// SERVFAIL, ...) is [`Fatal::Runtime`] (exit 1, so systemd retries).
pub async fn check_route(
    policy: &Policy,
    dns: &Dns,
    route: &Settings,
    config_path: &Path,
) -> Result<Reliance, Fatal> {
    match &route.destination {
        Destination::Fixed { target, .. } => {
            check_fixed(policy, dns, route, target, config_path).await
        }
        // Decided per connection; what may be asked for is what the entries name.
        Destination::Connect { .. } => Ok(Reliance {
            entries: (0..policy.entries().len()).collect(),
            via_dns: false,
        }),
        Destination::Sni { port, .. } => check_sni(policy, route, *port, config_path),
        Destination::Dns => check_dns(policy, route, config_path),
        // Judged by its sources, per connection; the allowlist is not involved.
        Destination::Ingress(_) => Ok(Reliance::default()),
    }
}

/// A DNS route answers the names of host-name and wildcard entries (any port); with none, every
/// query would be blocked.
fn check_dns(policy: &Policy, route: &Settings, config_path: &Path) -> Result<Reliance, Fatal> {
    let entries: Vec<usize> = policy
        .entries()
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.address, HostPattern::Name(_) | HostPattern::Wildcard(_)))
        .map(|(i, _)| i)
        .collect();
    if entries.is_empty() {
        return Err(Fatal::Config(format!(
            "route {route} ({}): no host-name or wildcard entry in {}, so every query would be \
             answered NXDOMAIN; a dns route answers only names the allowlist allows by name",
            route.spec.origin,
            config_path.display()
        )));
    }
    Ok(Reliance {
        entries,
        via_dns: false,
    })
}

/// An SNI route relies on the entries with its port; with none, nothing could be reached.
fn check_sni(
    policy: &Policy,
    route: &Settings,
    port: u16,
    config_path: &Path,
) -> Result<Reliance, Fatal> {
    let entries: Vec<usize> = policy
        .entries()
        .iter()
        .enumerate()
        .filter(|(_, e)| e.port == port)
        .map(|(i, _)| i)
        .collect();
    if entries.is_empty() {
        return Err(Fatal::Config(format!(
            "route {route} ({}): no allowlist entry in {} has port {port}, so nothing \
             could ever be reached through it",
            route.spec.origin,
            config_path.display()
        )));
    }
    Ok(Reliance {
        entries,
        via_dns: false,
    })
}

/// A route with one remote: allowed as written, else through DNS answers of allowlisted names.
async fn check_fixed(
    policy: &Policy,
    dns: &Dns,
    route: &Settings,
    target: &Target,
    config_path: &Path,
) -> Result<Reliance, Fatal> {
    let (host, port) = (&target.host, target.port);
    let statically = policy.static_allowance(host, port);
    if let Some(allowance) = statically {
        return Ok(Reliance {
            entries: policy.entry_for(&allowance, port).into_iter().collect(),
            via_dns: false,
        });
    }
    let via_dns = match host {
        // An IP literal is decided without DNS unless another entry's name vouches for it.
        Host::Ip(_) if policy.names_to_resolve(host, port).is_empty() => Ok(Vec::new()),
        _ => allowed_addresses(policy, dns, host, port)
            .await
            .map(|(allowed, _)| allowed),
    };
    if let Ok(allowed) = &via_dns {
        if !allowed.is_empty() {
            let mut entries: Vec<usize> = allowed
                .iter()
                .filter_map(|(_, why)| policy.entry_for(why, port))
                .collect();
            entries.sort_unstable();
            entries.dedup();
            return Ok(Reliance {
                entries,
                via_dns: true,
            });
        }
    }
    Err(not_allowed(policy, route, target, via_dns, config_path))
}

/// Why a fixed remote is not allowed, from what DNS said (`via_dns`: the allowed addresses it
/// gave, none here, or how it failed), with the entries that have its port.
fn not_allowed(
    policy: &Policy,
    route: &Settings,
    target: &Target,
    via_dns: Result<Vec<(std::net::IpAddr, Allowance)>, LookupError>,
    config_path: &Path,
) -> Fatal {
    let (host, port) = (&target.host, target.port);
    let with_port: Vec<String> = policy
        .entries_with_port(port)
        .iter()
        .map(|e| e.to_string())
        .collect();
    let entries = if with_port.is_empty() {
        format!("no entry has port {port}")
    } else {
        format!("entries with port {port}: {}", with_port.join(", "))
    };
    let which = format!("route {route} ({})", route.spec.origin);
    match via_dns {
        // DNS answered, and will answer the same again: the remote is misspelt or missing from
        // the allowlist, which no restart fixes.
        Err(e) if e.kind.is_negative_answer() => {
            let absent = match e.kind {
                DnsFailure::NxDomain => "does not exist in DNS",
                _ => "has no address in DNS",
            };
            Fatal::Config(format!(
                "{which}: {host} {absent} ({e}), and no allowlist entry in {} allows it; \
                 {entries}. Check the spelling of the remote and of the allowlist, or add \
                 `- {{address: {host}, port: {port}}}` to allow it by name.",
                config_path.display()
            ))
        }
        Err(e) => Fatal::Runtime(format!(
            "{which}: cannot tell whether {target} is allowed by the allowlist in {}: {e}; \
             {entries}. Check DNS, or add `- {{address: {host}, port: {port}}}` so that no \
             lookup is needed.",
            config_path.display()
        )),
        _ if matches!(host, Host::Ip(ip) if special_kind(*ip) == Some(SpecialKind::InstanceMetadata)) =>
        {
            let single = if matches!(host, Host::Ip(ip) if ip.is_ipv4()) {
                32
            } else {
                128
            };
            Fatal::Config(format!(
                "{which}: {target} is the instance metadata service (IMDS), which the allowlist \
                 in {} does not allow; {entries}. Allowing it gives the enclave the instance's \
                 credentials (the temporary keys of its IAM role) and everything else the \
                 metadata service tells the instance, so only do it if the enclave must have \
                 them: then add `- {{address: {host}, port: {port}}}` (an explicit IP entry; a \
                 CIDR block other than {host}/{single} never allows it).",
                config_path.display()
            ))
        }
        _ => Fatal::Config(format!(
            "{which}: {target} is not allowed by the allowlist in {}; {entries}. \
             Add `- {{address: {host}, port: {port}}}` to allow it.",
            config_path.display()
        )),
    }
}

/// Checks every route; all problems are reported at once. The result is a configuration error
/// if any route is not allowed, a runtime error if only DNS kept us from telling.
pub async fn check_routes(
    policy: &Policy,
    dns: &Dns,
    routes: &[Settings],
    config_path: &Path,
) -> Result<Vec<Reliance>, Fatal> {
    let mut reliances = Vec::new();
    let mut config_errors = Vec::new();
    let mut runtime_errors = Vec::new();
    for route in routes {
        match check_route(policy, dns, route, config_path).await {
            Ok(r) => {
                if r.via_dns {
                    info!(route = %route.spec.listen, remote = %route.destination, "the remote is allowed through the current DNS answers of allowlisted entries");
                }
                reliances.push(r);
            }
            Err(Fatal::Config(e)) => config_errors.push(e),
            Err(Fatal::Runtime(e)) => runtime_errors.push(e),
        }
    }
    if !config_errors.is_empty() {
        config_errors.extend(runtime_errors);
        return Err(Fatal::Config(config_errors.join("\n")));
    }
    if !runtime_errors.is_empty() {
        return Err(Fatal::Runtime(runtime_errors.join("\n")));
    }
    Ok(reliances)
}

/// A configuration ready to serve: loaded, with the resolver that checked it.
pub struct Prepared {
    pub loaded: Loaded,
    /// A new resolver: /etc/hosts and /etc/resolv.conf read again, the cache empty.
    pub dns: Dns,
    pub settings: DaemonSettings,
}

/// At most this many allowlist warnings are logged at start-up or on reload; `--check-config`
/// prints them all.
const LOGGED_WARNINGS: usize = 20;

/// Logs the allowlist's warnings at WARN, the first [`LOGGED_WARNINGS`] of them.
fn log_warnings(warnings: &[String]) {
    for w in warnings.iter().take(LOGGED_WARNINGS) {
        warn!("{w}");
    }
    if let Some(more) = warnings
        .len()
        .checked_sub(LOGGED_WARNINGS)
        .filter(|&n| n > 0)
    {
        warn!(
            "{more} more allowlist warning{} not logged; `--check-config` prints them all",
            if more == 1 { "" } else { "s" }
        );
    }
}

/// Start-up's first steps, and all of a reload's checking: load the file and the routes, build
/// the settings and a new resolver, check every route. A resolver that cannot be built is
/// [`Fatal::Runtime`].
pub async fn prepare(options: &Options, metadata: &mut Metadata) -> Result<Prepared, Fatal> {
    let loaded = load(options, metadata, Routes::Required).await?;
    log_warnings(&loaded.warnings);
    let settings = DaemonSettings::from_options(options, &loaded.config);
    let dns = Dns::new(&settings.dns).map_err(Fatal::Runtime)?;
    check_routes(&loaded.policy, &dns, &loaded.routes, &options.config).await?;
    Ok(Prepared {
        loaded,
        dns,
        settings,
    })
}

/// Raises the soft open-file limit to the hard one, and warns when even that is below what
/// `max_connections` connections on `routes` routes need. Never fatal: accepts fail with EMFILE
/// only when that many connections are open.
pub fn raise_open_file_limit(max_connections: u32, routes: usize) {
    match crate::net::rlimit::raise_nofile_limit() {
        Ok(limit) => {
            // Per connection two sockets and, while both directions move bytes, two pipes; the
            // pipe pool; the listeners; a margin for DNS, metrics and the journal.
            let needed = u64::from(max_connections) * crate::net::relay::DESCRIPTORS_PER_CONNECTION
                + crate::net::relay::POOL_DESCRIPTORS
                + 32
                + routes as u64;
            if limit < needed {
                warn!(nofile = limit, needed, "the open-file limit is below what --max-connections needs; accepts may fail with EMFILE (raise LimitNOFILE= in the unit)");
            }
        }
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}

/// Every listener the daemon starts with.
pub struct Bound {
    /// One per route, in the routes' order for bound ones (adopted ones first).
    pub served: Vec<Served>,
    /// The metrics endpoint's, if metrics are served.
    pub metrics: Option<Listener>,
}

/// The listeners: systemd's sockets adopted and every other route's address bound (`listen`),
/// each route logged, then the metrics endpoint bound at `metrics_listen`.
pub async fn bind(
    routes: &[Arc<Route>],
    metrics_listen: Option<&Endpoint>,
) -> Result<Bound, Fatal> {
    let served = listen(routes).await?;
    for route in routes {
        let settings = route.settings();
        info!(
            route = %route.listen,
            remote = %settings.destination,
            max_connections = settings.max_connections,
            idle_timeout = settings
                .idle_timeout
                .map(|d| tracing::field::display(humantime::format_duration(d))),
            from = %settings.spec.origin,
            "serving route"
        );
    }
    let metrics = match metrics_listen {
        Some(endpoint) => Some(
            crate::ops::metrics_server::bind(endpoint)
                .await
                .map_err(Fatal::Runtime)?,
        ),
        None => None,
    };
    Ok(Bound { served, metrics })
}

/// Binds `endpoint` for a route (at start-up, or one a reload adds); also returns the unix
/// socket file this process created, to remove when the route stops.
pub async fn bind_endpoint(endpoint: &Endpoint) -> Result<(Listener, Option<PathBuf>), String> {
    let listener = endpoint
        .bind()
        .await
        .map_err(|e| endpoint.bind_error("listen", &e, "is another proxy already using it?"))?;
    let socket_file = match endpoint {
        Endpoint::Unix(path) => Some(path.clone()),
        _ => None,
    };
    Ok((listener, socket_file))
}

/// The routes' listeners: each socket systemd passed (socket activation) serves the route with
/// the same listen address; every other route's address is bound here.
async fn listen(routes: &[Arc<Route>]) -> Result<Vec<Served>, Fatal> {
    let mut served = adopt(routes)?;
    let activated = !served.is_empty();
    for route in routes {
        if served.iter().any(|(_, s)| s.route.listen == route.listen) {
            continue;
        }
        if activated {
            info!(route = %route.listen, "no socket passed by systemd for this route; listening on it here");
        }
        let (listener, socket_file) = bind_endpoint(&route.listen).await.map_err(Fatal::Runtime)?;
        served.push((
            listener,
            ServedRoute {
                route: route.clone(),
                socket_file,
            },
        ));
    }
    Ok(served)
}

/// The sockets systemd passed, each matched to the route with its listen address. A passed
/// socket that matches no route (or a second one for the same route) is a configuration error:
/// the .socket unit and the routes disagree.
fn adopt(routes: &[Arc<Route>]) -> Result<Vec<Served>, Fatal> {
    let passed = crate::ops::systemd::take_listen_fds().map_err(Fatal::Config)?;
    let adopted = passed
        .into_iter()
        .map(Listener::from_passed_fd)
        .collect::<Result<Vec<_>, _>>()
        .map_err(Fatal::Config)?;
    let mut served: Vec<Served> = Vec::new();
    let activated = !adopted.is_empty();
    for listener in adopted {
        let at = listener.local_endpoint().ok();
        let route = at
            .as_ref()
            .and_then(|at| routes.iter().find(|r| &r.listen == at));
        match route {
            Some(route) if !served.iter().any(|(_, s)| s.route.listen == route.listen) => served
                .push((
                    listener,
                    ServedRoute {
                        route: route.clone(),
                        socket_file: None,
                    },
                )),
            _ => return Err(unmatched_socket(at, routes)),
        }
    }
    if activated {
        let shown: Vec<String> = served
            .iter()
            .map(|(_, s)| s.route.listen.to_string())
            .collect();
        info!(sockets = %shown.join(" "), "using the sockets passed by systemd (socket activation)");
    }
    Ok(served)
}

/// The error for a socket systemd passed, listening `at`, that no route can take.
fn unmatched_socket(at: Option<Endpoint>, routes: &[Arc<Route>]) -> Fatal {
    let shown = at.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
    let listens: Vec<String> = routes.iter().map(|r| r.listen.to_string()).collect();
    Fatal::Config(format!(
        "systemd passed a socket listening on {shown} (socket activation), but no \
         route listens there (the routes listen on {}); make the .socket unit's \
         ListenStream= name a route's listen address, or add a route with that \
         listen address (LISTEN on the command line, or `listen:` in `routes:`)",
        listens.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn blocking_work_past_the_deadline_is_given_up_without_blocking_the_worker() {
        let started = std::time::Instant::now();
        // Stands for a read stuck in the kernel; the one worker must stay free meanwhile.
        let stuck = off_runtime(Duration::from_millis(100), || {
            std::thread::sleep(Duration::from_secs(1))
        });
        let worker_free = tokio::spawn(async { 42 });
        assert!(matches!(stuck.await, Err(OffRuntime::TimedOut)));
        assert_eq!(worker_free.await.unwrap(), 42);
        assert!(started.elapsed() < Duration::from_millis(800));
        assert_eq!(off_runtime(Duration::from_secs(5), || 7).await.unwrap(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_fifo_as_the_configuration_file_is_a_configuration_error_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        let c = std::ffi::CString::new(path.display().to_string()).unwrap();
        // SAFETY: a plain system call on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        match load_file(&path).await {
            Err(Fatal::Config(m)) => assert!(m.contains("is a FIFO (named pipe)"), "{m}"),
            other => panic!("expected a configuration error, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
