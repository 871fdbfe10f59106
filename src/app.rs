//! Start-up, reload and shutdown of the daemon: from parsed [`Options`] to an exit status.
//!
//! This module owns the order of start-up (signal handlers, configuration, REMOTE_ADDR from
//! instance metadata if it is a template, REMOTE_ADDR check, resolver, file limit, listeners —
//! passed by systemd or bound —, readiness, serve), the mapping of failures to exit statuses
//! (2: usage or configuration, 1: fatal runtime error, 0: clean stop on SIGTERM/SIGINT), the
//! allowlist reload on SIGHUP and what the service manager is told along the way (READY=1 only
//! once the configuration is loaded and the listeners are bound, STATUS= with live counters,
//! RELOADING=1/READY=1 around a reload, STOPPING=1 on SIGTERM, WATCHDOG=1 from the accept loop).

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use crate::cli::{Options, RemoteAddr};
use crate::config;
use crate::dns::{Dns, DnsSettings, Family};
use crate::endpoint::{Endpoint, Listener};
use crate::policy::{Policy, Remote};
use crate::server::{self, Counters, Heartbeat, ServerLimits, Shared};
use crate::systemd::Notifier;
use crate::upstream::allowed_addresses;

/// How often STATUS= is refreshed (only when it changed, only under a service manager).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// A reason to stop before serving.
#[derive(Debug)]
pub enum Fatal {
    /// The configuration (file or arguments) is wrong: exit status 2.
    Config(String),
    /// Something outside the configuration failed: exit status 1.
    Runtime(String),
}

impl Fatal {
    fn exit_code(&self) -> ExitCode {
        match self {
            Fatal::Config(_) => ExitCode::from(2),
            Fatal::Runtime(_) => ExitCode::from(1),
        }
    }

    fn message(&self) -> &str {
        match self {
            Fatal::Config(m) | Fatal::Runtime(m) => m,
        }
    }
}

/// Runs the daemon to completion.
pub fn run(options: Options) -> ExitCode {
    crate::logging::init(crate::logging::choose(options.log_format));
    let notifier = Arc::new(Notifier::from_env());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = options.num_workers {
        builder.worker_threads(usize::from(n));
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            let message = format!("cannot start the async runtime: {e}");
            notifier.status(&format!("failed: {message}"));
            error!("{message}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(serve(options, notifier.clone()));
    // Connections still open after the drain timeout must not hold the process up.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(fatal) => {
            notifier.status(&format!("failed: {}", fatal.message()));
            error!("{}", fatal.message());
            fatal.exit_code()
        }
    }
}

/// The signals the daemon handles. Installed first thing, so that a SIGHUP during start-up does
/// not kill the process (the default action) but is taken as a reload once serving.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> Option<Signals> {
        let installed = (|| {
            Ok::<_, std::io::Error>(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
            })
        })();
        match installed {
            Ok(signals) => Some(signals),
            Err(e) => {
                warn!("cannot install signal handlers: {e}; stop the daemon with SIGKILL, reload is unavailable");
                None
            }
        }
    }
}

async fn serve(options: Options, notifier: Arc<Notifier>) -> Result<(), Fatal> {
    let signals = Signals::install();
    let allowlist = config::load(&options.config).map_err(|e| Fatal::Config(e.to_string()))?;
    let policy = Policy::new(allowlist);
    let remote = match &options.remote_addr {
        RemoteAddr::Fixed(remote) => remote.clone(),
        RemoteAddr::Template(template) => {
            let (remote, info) = crate::imds::fill_from_metadata(template, options.imds_endpoint)
                .await
                .map_err(Fatal::Runtime)?;
            info!(region = %info.region, remote = %remote, "REMOTE_ADDR {template} filled from the instance metadata service");
            remote
        }
    };
    let family = match (options.ipv4, options.ipv6) {
        (true, _) => Family::V4Only,
        (_, true) => Family::V6Only,
        _ => Family::Both,
    };
    let dns = Dns::new(&DnsSettings {
        nameservers: options.nameservers.clone(),
        family,
        timeout: options.dns_timeout,
    })
    .map_err(Fatal::Runtime)?;

    check_remote_is_allowlisted(&policy, &dns, &remote, options.remote_port, &options.config)
        .await?;

    match crate::rlimit::raise_nofile_limit() {
        Ok(limit) => {
            let needed = u64::from(options.max_connections) * 2 + 32;
            if limit < needed {
                warn!(nofile = limit, needed, "the open-file limit is below what --max-connections needs; accepts may fail with EMFILE (raise LimitNOFILE= in the unit)");
            }
        }
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }

    let (listeners, bound_unix) = listen(&options.listen).await?;
    let listening: Vec<String> = listeners
        .iter()
        .map(|l| {
            l.local_endpoint()
                .map(|e| e.to_string())
                .unwrap_or_else(|_| options.listen.to_string())
        })
        .collect();
    let listening = listening.join(" ");
    info!(
        listen = %listening,
        remote = %remote,
        port = options.remote_port,
        allowlist_entries = policy.entries().len(),
        config = %options.config.display(),
        max_connections = options.max_connections,
        "nitro-vsock-proxy {} listening", env!("CARGO_PKG_VERSION")
    );

    let shared = Arc::new(Shared {
        policy: RwLock::new(Arc::new(policy)),
        dns,
        remote,
        remote_port: options.remote_port,
        connect_timeout: options.connect_timeout,
        idle_timeout: options.idle_timeout,
        counters: Counters::default(),
    });
    let status = StatusLine {
        prefix: format!("{listening} -> {}:{}", shared.remote, shared.remote_port),
        shared: shared.clone(),
    };
    notifier.ready(&status.render());

    let (term_int, hup) = match signals {
        Some(Signals { term, int, hup }) => (Some((term, int)), Some(hup)),
        None => (None, None),
    };
    let reloader = hup.map(|hup| {
        tokio::spawn(reload_on_sighup(
            hup,
            options.config.clone(),
            shared.clone(),
            notifier.clone(),
            status.clone(),
        ))
    });
    let status_task = notifier
        .is_enabled()
        .then(|| tokio::spawn(refresh_status(notifier.clone(), status.clone())));
    let heartbeat = notifier.watchdog_interval().map(|every| {
        let notifier = notifier.clone();
        info!(every = ?every, "sending watchdog pings from the accept loop");
        Heartbeat {
            every,
            beat: Box::new(move || notifier.watchdog()),
        }
    });
    let limits = ServerLimits {
        max_connections: options.max_connections as usize,
        drain_timeout: options.drain_timeout,
    };
    let shutdown = {
        let notifier = notifier.clone();
        let status = status.clone();
        let reloader = reloader.as_ref().map(|task| task.abort_handle());
        async move {
            let name = wait_for_stop(term_int).await;
            info!(signal = name, "stopping");
            // Nothing but STOPPING=1 from here on: no reload, no status refresh.
            for task in [reloader, status_task.map(|t| t.abort_handle())]
                .into_iter()
                .flatten()
            {
                task.abort();
            }
            notifier.stopping(&format!("stopping ({name}): {}", status.render()));
        }
    };
    let left = server::serve(listeners, shared.clone(), limits, shutdown, heartbeat).await;
    // A socket file systemd created stays: it belongs to the .socket unit.
    if let Some(path) = bound_unix {
        let _ = std::fs::remove_file(path);
    }
    info!(
        accepted = shared.counters.accepted.load(Ordering::Relaxed),
        denied = shared.counters.denied.load(Ordering::Relaxed),
        closed_at_stop = left,
        "stopped"
    );
    Ok(())
}

/// The listeners: the sockets systemd passed (socket activation), or else LISTEN bound here.
/// Also returns the unix socket path this process created, to remove at exit.
async fn listen(endpoint: &Endpoint) -> Result<(Vec<Listener>, Option<std::path::PathBuf>), Fatal> {
    let passed = crate::systemd::take_listen_fds().map_err(Fatal::Config)?;
    if passed.is_empty() {
        let listener = endpoint.bind().await.map_err(|e| {
            Fatal::Runtime(format!(
                "cannot listen on {endpoint}: {e} (is another proxy already using it?)"
            ))
        })?;
        let bound_unix = match endpoint {
            Endpoint::Unix(path) => Some(path.clone()),
            _ => None,
        };
        return Ok((vec![listener], bound_unix));
    }
    let listeners = passed
        .into_iter()
        .map(Listener::from_passed_fd)
        .collect::<Result<Vec<_>, _>>()
        .map_err(Fatal::Config)?;
    let addresses: Vec<Option<Endpoint>> =
        listeners.iter().map(|l| l.local_endpoint().ok()).collect();
    let shown: Vec<String> = addresses
        .iter()
        .map(|a| a.as_ref().map_or_else(|| "?".to_owned(), |a| a.to_string()))
        .collect();
    if addresses.iter().flatten().any(|a| a == endpoint) {
        info!(sockets = %shown.join(" "), "using the sockets passed by systemd (socket activation)");
    } else {
        warn!(
            sockets = %shown.join(" "),
            listen = %endpoint,
            "LISTEN is not among the sockets passed by systemd; serving on the passed sockets \
             (make the .socket unit's ListenStream= and LISTEN agree)"
        );
    }
    Ok((listeners, None))
}

/// The STATUS= text: where, to where, and the live counters.
#[derive(Clone)]
struct StatusLine {
    prefix: String,
    shared: Arc<Shared>,
}

impl StatusLine {
    fn render(&self) -> String {
        let c = &self.shared.counters;
        format!(
            "{}; {} open, {} accepted, {} denied, {} over the limit",
            self.prefix,
            c.open.load(Ordering::Relaxed),
            c.accepted.load(Ordering::Relaxed),
            c.denied.load(Ordering::Relaxed),
            c.rejected_over_limit.load(Ordering::Relaxed),
        )
    }
}

/// Sends STATUS= when the counters changed, at most once per [`STATUS_INTERVAL`]: the
/// per-connection path only bumps atomics.
async fn refresh_status(notifier: Arc<Notifier>, status: StatusLine) {
    let mut last = status.render();
    let mut interval = tokio::time::interval(STATUS_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = status.render();
        if now != last {
            notifier.status(&now);
            last = now;
        }
    }
}

/// Re-reads the allowlist on each SIGHUP. New connections use the new allowlist; connections
/// already open keep the one they were checked against. A file that cannot be used (unreadable,
/// invalid, or no longer allowing REMOTE_ADDR:REMOTE_PORT) leaves the current allowlist in
/// place and is logged at ERROR with the file and line.
async fn reload_on_sighup(
    mut hup: Signal,
    path: std::path::PathBuf,
    shared: Arc<Shared>,
    notifier: Arc<Notifier>,
    status: StatusLine,
) {
    while hup.recv().await.is_some() {
        notifier.reloading();
        info!(config = %path.display(), "SIGHUP: reloading the allowlist");
        let outcome = async {
            let allowlist = config::load(&path).map_err(|e| e.to_string())?;
            let policy = Policy::new(allowlist);
            check_remote_is_allowlisted(
                &policy,
                &shared.dns,
                &shared.remote,
                shared.remote_port,
                &path,
            )
            .await
            .map_err(|e| e.message().to_owned())?;
            Ok::<_, String>(policy)
        }
        .await;
        match outcome {
            Ok(policy) => {
                let entries = policy.entries().len();
                shared.replace_policy(policy);
                info!(allowlist_entries = entries, config = %path.display(), "allowlist reloaded; new connections use it");
                notifier.ready(&status.render());
            }
            Err(e) => {
                error!("reload failed, keeping the previous allowlist: {e}");
                notifier.ready(&format!(
                    "reload failed, serving with the previous allowlist: {e}; {}",
                    status.render()
                ));
            }
        }
    }
}

/// As AWS's proxy does, refuse to start when REMOTE_ADDR:REMOTE_PORT is not allowlisted at all.
/// A name allowlisted as such needs no DNS, so a DNS outage at boot does not stop the daemon. A
/// DNS failure while checking a remote that only DNS can vouch for is a runtime error (exit 1, so
/// systemd retries), not a configuration error.
async fn check_remote_is_allowlisted(
    policy: &Policy,
    dns: &Dns,
    remote: &Remote,
    port: u16,
    config_path: &std::path::Path,
) -> Result<(), Fatal> {
    if policy.allows_remote_statically(remote, port) {
        return Ok(());
    }
    let via_dns = match remote {
        // An IP literal is decided without DNS unless another entry's name vouches for it.
        Remote::Ip(_) if policy.names_to_resolve(remote, port).is_empty() => Ok(false),
        _ => allowed_addresses(policy, dns, remote, port)
            .await
            .map(|(allowed, _)| !allowed.is_empty()),
    };
    if let Ok(true) = via_dns {
        info!(remote = %remote, "REMOTE_ADDR is allowed through the current DNS answers of allowlisted entries");
        return Ok(());
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
    match via_dns {
        Err(e) => Err(Fatal::Runtime(format!(
            "cannot tell whether {remote}:{port} is allowed by the allowlist in {}: {e}; \
             {entries}. Check DNS, or add `- {{address: {remote}, port: {port}}}` so that no \
             lookup is needed.",
            config_path.display()
        ))),
        _ => Err(Fatal::Config(format!(
            "{remote}:{port} is not allowed by the allowlist in {}; {entries}. \
             Add `- {{address: {remote}, port: {port}}}` to allow it.",
            config_path.display()
        ))),
    }
}

/// Resolves on SIGTERM or SIGINT with the signal's name. Without handlers it never resolves (the
/// daemon can still be killed).
async fn wait_for_stop(signals: Option<(Signal, Signal)>) -> &'static str {
    match signals {
        Some((mut term, mut int)) => {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        }
        None => std::future::pending().await,
    }
}
