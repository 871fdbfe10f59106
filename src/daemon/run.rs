//! The daemon from parsed [`Options`] to an exit status: the async runtime, start-up, serving,
//! the stop and the exit status.
//!
//! This module owns the order of it all. `serve` is build → spawn → drain: signal handlers
//! first ([`crate::daemon::signals`]); then the configuration prepared and the listeners bound
//! ([`crate::daemon::startup`]: load, resolver, the check of every route, file limit, listeners —
//! passed by systemd and matched to routes by listen address, or bound); readiness; the
//! background tasks (audit flusher, metrics endpoint, reload on SIGHUP —
//! [`crate::daemon::reload`] —, STATUS= refresh — [`crate::daemon::status`]); serving until
//! SIGTERM/SIGINT; the drain and the totals. It also owns the mapping of failures to exit
//! statuses (2: usage or configuration, 1: fatal runtime error, 0: clean stop on SIGTERM/SIGINT)
//! and what the service manager is told along the way (READY=1 only once the configuration is
//! loaded and the listeners are bound, STATUS= with the routes and live totals, RELOADING=1/
//! READY=1 around a reload, STOPPING=1 on SIGTERM, WATCHDOG=1 from the accept loop).
//!
//! Imports every other module of the daemon; none imports it.

use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::Signal;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{error, info};

use crate::config::cli::Options;
use crate::daemon::check_config::check_config;
use crate::daemon::reload::{reload_on_sighup, Reloader};
use crate::daemon::signals::{wait_for_stop, Signals, StopSignals};
use crate::daemon::startup::{self, Bound, Fatal, Metadata, Prepared};
use crate::daemon::status::{refresh_status, StatusLine};
use crate::net::accept::Heartbeat;
use crate::net::endpoint::{Endpoint, Listener};
use crate::ops::systemd::Notifier;
use crate::proxy::identity::Identity;
use crate::proxy::route::Route;
use crate::proxy::server::{self, ServerLimits};
use crate::proxy::shared::Shared;

/// Runs the daemon to completion.
pub fn run(options: Options) -> ExitCode {
    let _log = crate::ops::logging::init(crate::ops::logging::choose(options.log_format));
    let notifier = Arc::new(Notifier::from_env());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = options.num_workers {
        builder.worker_threads(usize::from(n));
        // Operators coming from AWS's proxy read -w as "connections at once"; say what it is here.
        info!(
            "-w {n}: {n} runtime worker thread{} (in AWS's vsock-proxy -w is a pool of workers, \
             one connection each; here connections are bounded by --max-connections, now {})",
            if n == 1 { "" } else { "s" },
            options.max_connections
        );
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
        let status = runtime.block_on(check_config(&options));
        // Not joined: a read that missed its deadline may still be stuck on a blocking thread.
        runtime.shutdown_background();
        return ExitCode::from(status);
    }
    // The daemon runs as a task on a worker thread, not on this one: its accept loop then wakes
    // up on the worker that took the listener's readiness from the kernel, and spawns each
    // connection onto that worker's own queue. On this thread every accept would be handed
    // over twice, worker to here and here to a worker, each a futex wake-up and a context switch.
    let daemon = serve(options, notifier.clone());
    let result = runtime.block_on(async {
        tokio::spawn(daemon).await.unwrap_or_else(|e| {
            Err(Fatal::Runtime(format!(
                "the daemon's task ended before it stopped serving: {e}"
            )))
        })
    });
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

/// Serves until SIGTERM or SIGINT, then drains: build → spawn → drain.
async fn serve(options: Options, notifier: Arc<Notifier>) -> Result<(), Fatal> {
    let signals = Signals::install();
    let mut metadata = Metadata::new(options.imds_endpoint);
    let built = build(&options, &mut metadata).await?;
    let status = StatusLine::new(built.shared.clone());
    let metrics_file = metrics_socket_file(&built);
    notifier.ready(&status.render());

    let (stop, hup) = Signals::split(signals);
    let enclaves = tokio::spawn(refresh_enclaves(
        built.shared.clone(),
        options.enclaves_refresh,
        !options.no_revoke_on_reload,
    ));
    let (commands, command_queue) = mpsc::unbounded_channel();
    let reloader = Reloader {
        options,
        metadata,
        shared: built.shared.clone(),
        commands,
        notifier: notifier.clone(),
        status: status.clone(),
        metrics_listen: built.metrics_listen,
    };
    let mut tasks = spawn(built.metrics, hup, reloader, &notifier, &status);
    tasks.push(enclaves.abort_handle());
    let shutdown = stopping(stop, tasks, notifier.clone(), status);
    let left = server::serve(
        built.served,
        built.shared.clone(),
        built.limits,
        command_queue,
        shutdown,
        heartbeat(&notifier),
    )
    .await;
    log_totals(&built.shared, left);
    if let Some(path) = metrics_file {
        // Ours to remove, as the routes' socket files are when they stop (a later start would
        // replace a stale one anyway, but a file nobody serves should not be left behind).
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// The unix socket file the metrics endpoint listens on, if this process bound one.
fn metrics_socket_file(built: &Built) -> Option<std::path::PathBuf> {
    match (&built.metrics, &built.metrics_listen) {
        (Some(_), Some(Endpoint::Unix(path))) => Some(path.clone()),
        _ => None,
    }
}

/// What start-up built, ready to serve.
struct Built {
    /// What every connection shares: allowlist, resolver, routes, counters.
    shared: Arc<Shared>,
    /// The routes' listeners.
    served: Vec<server::Served>,
    /// The metrics endpoint's listener, if metrics are served.
    metrics: Option<Listener>,
    /// Where metrics are served (a reload only warns when the file moves it).
    metrics_listen: Option<Endpoint>,
    limits: ServerLimits,
}

/// Start-up up to readiness: the configuration prepared ([`startup::prepare`]), the open-file
/// limit raised, the listeners bound, the state every connection shares built.
async fn build(options: &Options, metadata: &mut Metadata) -> Result<Built, Fatal> {
    let Prepared {
        loaded,
        dns,
        settings,
    } = startup::prepare(options, metadata).await?;
    startup::raise_open_file_limit(options.max_connections, loaded.routes.len());
    let routes: Vec<Arc<Route>> = loaded
        .routes
        .into_iter()
        .map(|settings| Arc::new(Route::new(settings)))
        .collect();
    let Bound { served, metrics } =
        startup::bind(&routes, settings.metrics_listen.as_ref()).await?;
    let allowlist_entries = loaded.policy.entries().len();
    let needs_table = loaded.policies.needs_table();
    log_enclaves(&loaded.policies);
    let mut shared = Shared::new(loaded.policies, dns, settings.upstream);
    shared.enclaves = Identity::new(&options.enclaves_command);
    shared.enclaves.set_needed(needs_table);
    if needs_table {
        // Before READY=1, so that the first connections are matched by name and PCR; a
        // failure is logged and leaves those matches failing closed, never a failed start.
        shared.enclaves.refresh().await;
    }
    shared.lifetimes = settings.lifetimes;
    shared.peers = settings.peers;
    let shared = Arc::new(shared);
    shared.routes.set(routes);
    crate::ops::audit::set_record_allowed(settings.audit_allowed);
    let metrics_now = crate::ops::metrics::global();
    metrics_now.config_loaded(true);
    metrics_now.set_max_connections(options.max_connections);
    log_listening(&served, allowlist_entries, options);
    Ok(Built {
        shared,
        served,
        metrics,
        metrics_listen: settings.metrics_listen,
        limits: settings.limits,
    })
}

/// The start-up line: every address listened on, the allowlist's size, the file.
fn log_listening(served: &[server::Served], allowlist_entries: usize, options: &Options) {
    let listening: Vec<String> = served
        .iter()
        .map(|(listener, s)| {
            listener
                .local_endpoint()
                .map(|e| e.to_string())
                .unwrap_or_else(|_| s.route.listen.to_string())
        })
        .collect();
    info!(
        listen = %listening.join(" "),
        routes = listening.len(),
        allowlist_entries,
        config = %options.config.display(),
        max_connections = options.max_connections,
        "nitro-vsock-proxy {} listening", env!("CARGO_PKG_VERSION")
    );
}

/// Every background task, started here once READY=1 is sent: the audit flusher, the metrics
/// endpoint, the reloader (only with a SIGHUP handler) and the STATUS= refresher (only under a
/// service manager). Returns the tasks a stop aborts (the reloader and the refresher).
fn spawn(
    metrics: Option<Listener>,
    hup: Option<Signal>,
    reloader: Reloader,
    notifier: &Arc<Notifier>,
    status: &StatusLine,
) -> Vec<AbortHandle> {
    crate::ops::audit::spawn_flusher();
    if let Some(listener) = metrics {
        tokio::spawn(crate::ops::metrics_server::serve(listener));
    }
    let reload = hup.map(|hup| tokio::spawn(reload_on_sighup(hup, reloader)));
    let refresh = notifier
        .is_enabled()
        .then(|| tokio::spawn(refresh_status(notifier.clone(), status.clone())));
    [reload, refresh]
        .into_iter()
        .flatten()
        .map(|task| task.abort_handle())
        .collect()
}

/// Resolves on SIGTERM or SIGINT, once the reloader and the status refresher are stopped and the
/// service manager told STOPPING=1: the accept loop then stops and the drain starts.
async fn stopping(
    stop: StopSignals,
    tasks: Vec<AbortHandle>,
    notifier: Arc<Notifier>,
    status: StatusLine,
) {
    let name = wait_for_stop(stop).await;
    info!(signal = name, "stopping");
    // /healthz answers 503 for the rest of the drain.
    crate::ops::metrics_server::set_draining();
    // Nothing but STOPPING=1 from here on: no reload, no status refresh.
    for task in tasks {
        task.abort();
    }
    notifier.stopping(&format!("stopping ({name}): {}", status.render()));
}

/// One line per `enclaves:` entry at start-up: its id, what it matches, its allowlist's size.
fn log_enclaves(policies: &crate::policy::enclaves::PolicySet) {
    for (id, matcher, entries) in policies.entries() {
        info!(
            enclave = id,
            "enclaves: entry {id} matches {matcher}; {entries} allowlist entr{} beside the top-level allowlist",
            if entries == 1 { "y" } else { "ies" }
        );
    }
}

/// Runs `--enclaves-command` every `every` (while an entry needs it) and, when the running
/// enclaves changed, closes the open connections their peers may no longer have (an enclave
/// replaced by another image under the same name or CID loses what its entry gave), as a
/// reload does, unless `--no-revoke-on-reload`.
async fn refresh_enclaves(shared: Arc<Shared>, every: std::time::Duration, revoke: bool) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        if !shared.enclaves.refresh().await || !revoke {
            continue;
        }
        let policies = shared.policy.get();
        let table = shared.enclaves.table();
        let dns = shared.dns.get();
        let settings: Vec<Arc<crate::proxy::route::Settings>> =
            shared.routes.get().iter().map(|r| r.settings()).collect();
        let checks = crate::proxy::route::checks(settings.iter().map(|s| s.as_ref()));
        let revoked = shared
            .relayed
            .revoke_denied(&policies, &table, &dns, &checks)
            .await;
        if revoked.by_allowlist > 0 {
            info!(
                revoked = revoked.by_allowlist,
                "the running enclaves changed: closed {} open connection{} their peers may no longer have",
                revoked.by_allowlist,
                if revoked.by_allowlist == 1 { "" } else { "s" }
            );
        }
    }
}

/// WATCHDOG=1 from the accept loop, when the service manager asks for it.
fn heartbeat(notifier: &Arc<Notifier>) -> Option<Heartbeat> {
    notifier.watchdog_interval().map(|every| {
        let notifier = notifier.clone();
        info!(every = ?every, "sending watchdog pings from the accept loop");
        Heartbeat {
            every,
            beat: Box::new(move || notifier.watchdog()),
        }
    })
}

/// The last lines: each route's totals, then the whole daemon's.
fn log_totals(shared: &Shared, closed_at_stop: usize) {
    for route in shared.routes.get().iter() {
        route
            .counters
            .log("route totals", Some(&route.listen), None);
    }
    shared.counters.log("stopped", None, Some(closed_at_stop));
}
