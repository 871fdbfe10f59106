//! Start-up, reload and shutdown of the daemon: from parsed [`Options`] to an exit status.
//!
//! This module owns the order of start-up (signal handlers, configuration and routes —
//! [`crate::daemon::startup`] —, resolver, the check of every route, file limit, listeners — passed by
//! systemd and matched to routes by listen address, or bound —, readiness, serve), the mapping of
//! failures to exit statuses (2: usage or configuration, 1: fatal runtime error, 0: clean stop on
//! SIGTERM/SIGINT), the reload on SIGHUP (allowlist and routes: new routes listen, removed ones
//! stop accepting and drain, changed ones apply to new connections; an invalid file changes
//! nothing) and what the service manager is told along the way (READY=1 only once the
//! configuration is loaded and the listeners are bound, STATUS= with the routes and live totals,
//! RELOADING=1/READY=1 around a reload, STOPPING=1 on SIGTERM, WATCHDOG=1 from the accept loop).

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::config::cli::{AuditLevel, Options};
use crate::daemon::startup::{self, Fatal, Metadata};
use crate::net::endpoint::{Endpoint, Listener};
use crate::ops::systemd::Notifier;
use crate::policy::dns::Dns;
use crate::proxy::peers::PeerLimits;
use crate::proxy::route::{self, Route, Settings};
use crate::proxy::server::{
    self, Command, Heartbeat, Lifetimes, ServedRoute, ServerLimits, Shared,
};
use crate::proxy::upstream::UpstreamSettings;

/// How often STATUS= is refreshed (only when it changed, only under a service manager).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the daemon to completion.
pub fn run(options: Options) -> ExitCode {
    let _log = crate::ops::logging::init(crate::ops::logging::choose(options.log_format));
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
    if options.check_config {
        let status = runtime.block_on(startup::check_config(&options));
        // Not joined: a read that missed its deadline may still be stuck on a blocking thread.
        runtime.shutdown_background();
        return ExitCode::from(status);
    }
    let result = runtime.block_on(serve(options, notifier.clone()));
    // Connections still open after the drain timeout must not hold the process up, nor a
    // configuration read stuck in the kernel on a blocking thread (dropping the runtime would
    // join the blocking pool; a stop must not wait for a hung file system).
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(fatal) => {
            notifier.status(&format!("failed: {}", fatal.message()));
            error!("{}", fatal.message());
            ExitCode::from(fatal.exit_status())
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
    let mut metadata = Metadata::new(options.imds_endpoint);
    let loaded = startup::load(&options, &mut metadata).await?;
    let dns = Dns::new(&startup::dns_settings(&options)).map_err(Fatal::Runtime)?;
    startup::check_routes(&loaded.policy, &dns, &loaded.routes, &options.config).await?;

    match crate::net::rlimit::raise_nofile_limit() {
        Ok(limit) => {
            // Per connection two sockets and, while both directions move bytes, two pipes; the
            // pipe pool; the listeners; a margin for DNS, metrics and the journal.
            let needed = u64::from(options.max_connections)
                * crate::net::relay::DESCRIPTORS_PER_CONNECTION
                + crate::net::relay::POOL_DESCRIPTORS
                + 32
                + loaded.routes.len() as u64;
            if limit < needed {
                warn!(nofile = limit, needed, "the open-file limit is below what --max-connections needs; accepts may fail with EMFILE (raise LimitNOFILE= in the unit)");
            }
        }
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }

    let routes: Vec<Arc<Route>> = loaded
        .routes
        .into_iter()
        .map(|settings| Arc::new(Route::new(settings)))
        .collect();
    let served = listen(&routes).await?;
    let listening: Vec<String> = served
        .iter()
        .map(|(listener, s)| {
            listener
                .local_endpoint()
                .map(|e| e.to_string())
                .unwrap_or_else(|_| s.route.listen.to_string())
        })
        .collect();
    for route in &routes {
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
    let allowlist_entries = loaded.policy.entries().len();
    let metrics_listen_in_file = loaded.config.metrics_listen.clone();
    let metrics_listener = match options
        .metrics_listen
        .as_ref()
        .or(loaded.config.metrics_listen.as_ref())
    {
        Some(endpoint) => Some(
            crate::ops::metrics_server::bind(endpoint)
                .await
                .map_err(Fatal::Runtime)?,
        ),
        None => None,
    };
    let upstream = UpstreamSettings {
        connect_timeout: options.connect_timeout,
        keepalive: options.tcp_keepalive,
    };
    let mut shared = Shared::new(loaded.policy, dns, upstream);
    shared.lifetimes = Lifetimes {
        setup_timeout: options.setup_timeout,
        max_lifetime: options.max_lifetime,
        relay_mode: options.relay,
    };
    shared.peers = PeerLimits::new(options.max_connections_per_peer);
    let shared = Arc::new(shared);
    shared.routes.set(routes);
    crate::ops::audit::set_record_allowed(options.audit == AuditLevel::Allowed);
    crate::ops::audit::spawn_flusher();
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::ops::metrics_server::serve(listener));
    }
    info!(
        listen = %listening.join(" "),
        routes = listening.len(),
        allowlist_entries,
        config = %options.config.display(),
        max_connections = options.max_connections,
        "nitro-vsock-proxy {} listening", env!("CARGO_PKG_VERSION")
    );

    let status = StatusLine {
        shared: shared.clone(),
    };
    notifier.ready(&status.render());

    let (term_int, hup) = match signals {
        Some(Signals { term, int, hup }) => (Some((term, int)), Some(hup)),
        None => (None, None),
    };
    let (commands, command_queue) = mpsc::unbounded_channel();
    let reloader = hup.map(|hup| {
        tokio::spawn(reload_on_sighup(
            hup,
            Reloader {
                options: options.clone(),
                metadata,
                shared: shared.clone(),
                commands,
                notifier: notifier.clone(),
                status: status.clone(),
                metrics_listen: options
                    .metrics_listen
                    .clone()
                    .or(metrics_listen_in_file.clone()),
            },
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
    let left = server::serve(
        served,
        shared.clone(),
        limits,
        command_queue,
        shutdown,
        heartbeat,
    )
    .await;
    for route in shared.routes.get().iter() {
        let c = &route.counters;
        info!(
            route = %route.listen,
            accepted = c.accepted.load(Ordering::Relaxed),
            denied = c.denied.load(Ordering::Relaxed),
            over_limit = c.rejected_over_limit.load(Ordering::Relaxed),
            "route totals"
        );
    }
    info!(
        accepted = shared.counters.accepted.load(Ordering::Relaxed),
        denied = shared.counters.denied.load(Ordering::Relaxed),
        closed_at_stop = left,
        "stopped"
    );
    Ok(())
}

/// Binds `endpoint` for a route; also returns the unix socket file this process created, to
/// remove when the route stops.
async fn bind(endpoint: &Endpoint) -> Result<(Listener, Option<std::path::PathBuf>), String> {
    let listener = endpoint.bind().await.map_err(|e| {
        format!("cannot listen on {endpoint}: {e} (is another proxy already using it?)")
    })?;
    let socket_file = match endpoint {
        Endpoint::Unix(path) => Some(path.clone()),
        _ => None,
    };
    Ok((listener, socket_file))
}

/// The listeners: each socket systemd passed (socket activation) serves the route with the same
/// listen address; every other route's address is bound here. A passed socket that matches no
/// route is a configuration error (the .socket unit and the routes disagree).
async fn listen(routes: &[Arc<Route>]) -> Result<Vec<server::Served>, Fatal> {
    let passed = crate::ops::systemd::take_listen_fds().map_err(Fatal::Config)?;
    let adopted = passed
        .into_iter()
        .map(Listener::from_passed_fd)
        .collect::<Result<Vec<_>, _>>()
        .map_err(Fatal::Config)?;
    let mut served: Vec<server::Served> = Vec::new();
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
            _ => {
                let shown = at.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
                let listens: Vec<String> = routes.iter().map(|r| r.listen.to_string()).collect();
                return Err(Fatal::Config(format!(
                    "systemd passed a socket listening on {shown} (socket activation), but no                      route listens there (the routes listen on {}); make the .socket unit's                      ListenStream= name a route's listen address, or add a route with that                      listen address (LISTEN on the command line, or `listen:` in `routes:`)",
                    listens.join(", ")
                )));
            }
        }
    }
    if activated {
        let shown: Vec<String> = served
            .iter()
            .map(|(_, s)| s.route.listen.to_string())
            .collect();
        info!(sockets = %shown.join(" "), "using the sockets passed by systemd (socket activation)");
    }
    for route in routes {
        if served.iter().any(|(_, s)| s.route.listen == route.listen) {
            continue;
        }
        if activated {
            info!(route = %route.listen, "no socket passed by systemd for this route; listening on it here");
        }
        let (listener, socket_file) = bind(&route.listen).await.map_err(Fatal::Runtime)?;
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

/// The STATUS= text: the routes and the live totals.
#[derive(Clone)]
struct StatusLine {
    shared: Arc<Shared>,
}

/// STATUS= names at most this many routes, then says how many more.
const STATUS_ROUTES_SHOWN: usize = 4;

impl StatusLine {
    fn render(&self) -> String {
        let routes = self.shared.routes.get();
        let mut shown: Vec<String> = routes
            .iter()
            .take(STATUS_ROUTES_SHOWN)
            .map(|r| r.settings().to_string())
            .collect();
        if routes.len() > STATUS_ROUTES_SHOWN {
            shown.push(format!("{} more", routes.len() - STATUS_ROUTES_SHOWN));
        }
        let c = &self.shared.counters;
        format!(
            "{} route{}: {}; {} open, {} accepted, {} denied, {} over the limit",
            routes.len(),
            if routes.len() == 1 { "" } else { "s" },
            shown.join(", "),
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

/// What a reload needs.
struct Reloader {
    options: Options,
    metadata: Metadata,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    notifier: Arc<Notifier>,
    status: StatusLine,
    /// Where metrics are served (fixed at start-up).
    metrics_listen: Option<Endpoint>,
}

/// Re-reads the configuration on each SIGHUP (see [`reload`]).
async fn reload_on_sighup(mut hup: Signal, mut reloader: Reloader) {
    while hup.recv().await.is_some() {
        reloader.notifier.reloading();
        let path = reloader.options.config.display().to_string();
        info!(config = %path, "SIGHUP: reloading the allowlist and the routes");
        let reloaded = reload(&mut reloader).await;
        crate::ops::metrics::global().reload(reloaded.is_ok());
        match reloaded {
            Ok(summary) => {
                info!(config = %path, "allowlist reloaded; {summary}; new connections use them");
                reloader.notifier.ready(&reloader.status.render());
            }
            Err(e) => {
                error!("reload failed, keeping the previous allowlist: {e}; the routes stay as they are");
                reloader.notifier.ready(&format!(
                    "reload failed, serving with the previous configuration: {e}; {}",
                    reloader.status.render()
                ));
            }
        }
    }
}

/// One reload. A file that cannot be used (unreadable, invalid, or with a route the allowlist
/// does not allow) changes nothing: `Err`. Otherwise the new allowlist applies to new
/// connections (open ones keep the one they were checked against), new routes start listening
/// (one that cannot be bound is logged at ERROR and the rest applies), removed routes stop
/// accepting and drain as on SIGTERM, changed routes apply to new connections.
async fn reload(r: &mut Reloader) -> Result<String, String> {
    let loaded = startup::load(&r.options, &mut r.metadata)
        .await
        .map_err(|e| e.message().to_owned())?;
    // A new resolver: /etc/hosts and /etc/resolv.conf are read again (and the cache starts empty).
    let dns = Dns::new(&startup::dns_settings(&r.options))?;
    startup::check_routes(&loaded.policy, &dns, &loaded.routes, &r.options.config)
        .await
        .map_err(|e| e.message().to_owned())?;
    let entries = loaded.policy.entries().len();
    let metrics_listen = r
        .options
        .metrics_listen
        .as_ref()
        .or(loaded.config.metrics_listen.as_ref());
    if metrics_listen != r.metrics_listen.as_ref() {
        warn!("metrics_listen: changed in the file; the metrics endpoint moves only on restart");
    }
    r.shared.policy.set(loaded.policy);
    r.shared.dns.set(dns);
    let revoked = if r.options.no_revoke_on_reload {
        0
    } else {
        let policy = r.shared.policy.get();
        let dns = r.shared.dns.get();
        r.shared.relayed.revoke_denied(&policy, &dns).await
    };
    let revoked = if revoked > 0 {
        format!("; {revoked} open connection(s) the new allowlist denies closed")
    } else {
        String::new()
    };

    let order: Vec<Endpoint> = loaded
        .routes
        .iter()
        .map(|s| s.spec.listen.clone())
        .collect();
    let current = r.shared.routes.get();
    let current_settings: Vec<Arc<Settings>> = current.iter().map(|r| r.settings()).collect();
    let plan = route::plan(&current_settings, loaded.routes);
    let summary = plan.summary();
    let mut serving: Vec<Arc<Route>> = current
        .iter()
        .filter(|r| !plan.removed.contains(&r.listen))
        .cloned()
        .collect();

    for listen in &plan.removed {
        let (done, closed) = oneshot::channel();
        if r.commands
            .send(Command::Remove(listen.clone(), done))
            .is_ok()
        {
            let _ = closed.await;
        }
        if let Some(route) = current.iter().find(|r| &r.listen == listen) {
            info!(route = %route.settings(), "route removed by reload: no longer accepting");
            tokio::spawn(server::drain_removed_route(
                route.clone(),
                r.options.drain_timeout,
            ));
        }
    }
    for settings in plan.changed {
        if let Some(route) = current.iter().find(|r| r.listen == settings.spec.listen) {
            info!(route = %route.listen, was = %route.settings().destination, now = %settings.destination, "route changed by reload: new connections use the new settings");
            route.replace_settings(settings);
        }
    }
    let mut unbound = Vec::new();
    for settings in plan.added {
        let listen = settings.spec.listen.clone();
        match bind(&listen).await {
            Ok((listener, socket_file)) => {
                info!(route = %settings, from = %settings.spec.origin, "route added by reload");
                let route = Arc::new(Route::new(settings));
                let served = (
                    listener,
                    ServedRoute {
                        route: route.clone(),
                        socket_file,
                    },
                );
                if r.commands.send(Command::Add(served)).is_ok() {
                    serving.push(route);
                }
            }
            Err(e) => {
                error!(route = %settings, "new route not served: {e}; the rest of the reload applies");
                unbound.push(listen.to_string());
            }
        }
    }
    serving.sort_by_key(|route| order.iter().position(|l| l == &route.listen));
    r.shared.routes.set(serving);
    let unbound = if unbound.is_empty() {
        String::new()
    } else {
        format!(
            " ({} could not be bound: {})",
            unbound.len(),
            unbound.join(", ")
        )
    };
    Ok(format!(
        "{entries} allowlist entries; {summary}{unbound}{revoked}"
    ))
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
