//! From the configuration file and the command line to routes checked against the allowlist.
//!
//! This module owns loading ([`load`]: the file, the routes of the file and of the command line,
//! `{region}` templates filled from the instance metadata service), the start-up check that every
//! route's remote is allowed at all ([`check_routes`], done again on every reload), and
//! `--check-config`'s report ([`check_config`]), which prints each route and the allowlist
//! entries it relies on. As AWS's proxy does, a remote that is not allowlisted is a
//! configuration error; unlike AWS's, every connection is checked again later.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tracing::info;

use crate::config::cli::Options;
use crate::config::imds::InstanceInfo;
use crate::config::RouteKind;
use crate::config::{self, Config};
use crate::policy::dns::{Dns, DnsFailure, DnsSettings, Family};
use crate::policy::host::Host;
use crate::policy::Policy;
use crate::proxy::route::{self, Destination, Settings};
use crate::proxy::upstream::allowed_addresses;

/// A reason to stop before serving (or to refuse a reload).
#[derive(Debug)]
pub enum Fatal {
    /// The configuration (file or arguments) is wrong: exit status 2.
    Config(String),
    /// Something outside the configuration failed: exit status 1.
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
}

/// Reads the file (off the async workers, within [`CONFIG_READ_TIMEOUT`]) and builds the
/// routes. Errors in the file or the arguments are [`Fatal::Config`]; an unreachable metadata
/// service or a read that missed its deadline is [`Fatal::Runtime`].
pub async fn load(options: &Options, metadata: &mut Metadata) -> Result<Loaded, Fatal> {
    let path = &options.config;
    let config = load_file(path).await?;
    let specs = route::specs(options.positional_route(), &config, path).map_err(Fatal::Config)?;
    let mut routes = Vec::with_capacity(specs.len());
    for spec in specs {
        let (remote, require_sni) = match &spec.kind {
            RouteKind::Connect => {
                routes.push(Settings::new(
                    spec,
                    Destination::Connect,
                    options.idle_timeout,
                ));
                continue;
            }
            RouteKind::Sni { port } => {
                let port = *port;
                routes.push(Settings::new(
                    spec,
                    Destination::Sni { port },
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
    Ok(Loaded {
        config,
        policy,
        routes,
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
        Ok(Err(e)) => Err(Fatal::Config(e.to_string())),
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

/// The resolver settings the command line asks for.
pub fn dns_settings(options: &Options) -> DnsSettings {
    let family = match (options.ipv4, options.ipv6) {
        (true, _) => Family::V4Only,
        (_, true) => Family::V6Only,
        _ => Family::Both,
    };
    DnsSettings {
        nameservers: options.nameservers.clone(),
        family,
        timeout: options.dns_timeout,
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
    let target = match &route.destination {
        Destination::Fixed { target, .. } => target,
        // Decided per connection; what may be asked for is what the entries name.
        Destination::Connect => {
            return Ok(Reliance {
                entries: (0..policy.entries().len()).collect(),
                via_dns: false,
            })
        }
        Destination::Sni { port } => {
            let entries: Vec<usize> = policy
                .entries()
                .iter()
                .enumerate()
                .filter(|(_, e)| e.port == *port)
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
            return Ok(Reliance {
                entries,
                via_dns: false,
            });
        }
    };
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
            Err(Fatal::Config(format!(
                "{which}: {host} {absent} ({e}), and no allowlist entry in {} allows it; \
                 {entries}. Check the spelling of the remote and of the allowlist, or add \
                 `- {{address: {host}, port: {port}}}` to allow it by name.",
                config_path.display()
            )))
        }
        Err(e) => Err(Fatal::Runtime(format!(
            "{which}: cannot tell whether {target} is allowed by the allowlist in {}: {e}; \
             {entries}. Check DNS, or add `- {{address: {host}, port: {port}}}` so that no \
             lookup is needed.",
            config_path.display()
        ))),
        _ => Err(Fatal::Config(format!(
            "{which}: {target} is not allowed by the allowlist in {}; {entries}. \
             Add `- {{address: {host}, port: {port}}}` to allow it.",
            config_path.display()
        ))),
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

/// `--check-config`: prints the effective routes and the entries each relies on to standard
/// output, problems to standard error; returns the exit status (0 or 2). Binds nothing.
pub async fn check_config(options: &Options) -> u8 {
    let path = &options.config;
    let mut metadata = Metadata::new(options.imds_endpoint);
    let loaded = match load(options, &mut metadata).await {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{}", e.message());
            eprintln!("{}: configuration NOT OK", path.display());
            return 2;
        }
    };
    let dns = match Dns::new(&dns_settings(options)) {
        Ok(dns) => dns,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let mut out = String::new();
    let n = loaded.routes.len();
    let _ = writeln!(
        out,
        "{}: {n} route{}, {} allowlist entr{}",
        path.display(),
        if n == 1 { "" } else { "s" },
        loaded.policy.entries().len(),
        if loaded.policy.entries().len() == 1 {
            "y"
        } else {
            "ies"
        }
    );
    let mut problems = 0;
    for route in &loaded.routes {
        let mut limits = Vec::new();
        if let Some(max) = route.max_connections {
            limits.push(format!("max_connections {max}"));
        }
        if let Some(idle) = route.idle_timeout {
            limits.push(format!("idle_timeout {}", humantime::format_duration(idle)));
        }
        let limits = if limits.is_empty() {
            String::new()
        } else {
            format!(", {}", limits.join(", "))
        };
        let _ = writeln!(out, "route {route} ({}{limits})", route.spec.origin);
        match check_route(&loaded.policy, &dns, route, path).await {
            Ok(reliance) => {
                let how = if reliance.via_dns {
                    "allowed through the current DNS answers of"
                } else if matches!(route.destination, Destination::Fixed { .. }) {
                    "allowed by"
                } else {
                    "may reach, per connection,"
                };
                for index in reliance.entries {
                    let entry = &loaded.policy.entries()[index];
                    let line = loaded
                        .config
                        .allowlist_lines
                        .get(index)
                        .copied()
                        .flatten()
                        .map_or_else(String::new, |l| format!(", line {l}"));
                    let _ = writeln!(out, "  {how} {entry} (allowlist[{index}]{line})");
                }
            }
            Err(e) => {
                problems += 1;
                let verdict = match e {
                    Fatal::Config(_) => "NOT ALLOWED",
                    // DNS could not answer for a remote only DNS can vouch for.
                    Fatal::Runtime(_) => "NOT CHECKED (DNS did not answer; see the error)",
                };
                let _ = writeln!(out, "  {verdict}");
                eprintln!("{}", e.message());
            }
        }
    }
    print!("{out}");
    if problems == 0 {
        println!("{}: configuration OK", path.display());
        0
    } else {
        println!(
            "{}: configuration NOT OK: {problems} route{} not allowed or not checked",
            path.display(),
            if problems == 1 { "" } else { "s" }
        );
        2
    }
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
