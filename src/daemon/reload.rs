//! Reload on SIGHUP: the allowlist and the routes. The file is prepared as at start-up
//! ([`crate::daemon::startup::prepare`]); one that cannot be used changes nothing
//! ([`ReloadError`]). Otherwise new routes listen, removed ones stop accepting and drain, changed
//! ones apply to new connections, and open connections the new allowlist denies are closed
//! (unless `--no-revoke-on-reload`). The service manager is told RELOADING=1, then READY=1 with
//! the outcome.
//!
//! Imports [`crate::daemon::startup`] and [`crate::daemon::status`].

use std::sync::Arc;

use tokio::signal::unix::Signal;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::config::cli::Options;
use crate::daemon::startup::{self, Fatal, Metadata, Prepared};
use crate::daemon::status::StatusLine;
use crate::net::endpoint::Endpoint;
use crate::ops::systemd::Notifier;
use crate::proxy::revoke::IngressSources;
use crate::proxy::route::{self, Destination, ReloadPlan, Route, Settings};
use crate::proxy::server::{self, Command, ServedRoute};
use crate::proxy::shared::Shared;

/// Why a reload changed nothing. Its `Display` is the message logged and sent in STATUS=.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file or the arguments are wrong (exit status 2 at start-up): unreadable content,
    /// invalid YAML, or a route the allowlist does not allow.
    // The message may end a sentence; it is followed by `; ...` here, so its period goes.
    #[error("{}", .0.trim_end_matches('.'))]
    Config(String),
    /// Something outside the file failed (exit status 1 at start-up): the metadata service, DNS,
    /// the resolver's set-up, or a read that missed its deadline.
    #[error("{}", .0.trim_end_matches('.'))]
    Unavailable(String),
}

impl From<Fatal> for ReloadError {
    fn from(fatal: Fatal) -> ReloadError {
        match fatal {
            Fatal::Config(m) => ReloadError::Config(m),
            Fatal::Runtime(m) => ReloadError::Unavailable(m),
        }
    }
}

/// What a reload needs.
pub struct Reloader {
    pub options: Options,
    pub metadata: Metadata,
    pub shared: Arc<Shared>,
    /// To the accept loop: listeners to add and remove.
    pub commands: mpsc::UnboundedSender<Command>,
    pub notifier: Arc<Notifier>,
    pub status: StatusLine,
    /// Where metrics are served (fixed at start-up).
    pub metrics_listen: Option<Endpoint>,
}

/// Re-reads the configuration on each SIGHUP (see [`reload`]).
pub async fn reload_on_sighup(mut hup: Signal, mut reloader: Reloader) {
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
/// accepting and drain as on SIGTERM, changed routes apply to new connections. Returns the
/// summary logged.
pub async fn reload(r: &mut Reloader) -> Result<String, ReloadError> {
    let Prepared {
        loaded,
        dns,
        settings,
    } = startup::prepare(&r.options, &mut r.metadata).await?;
    let entries = loaded.policy.entries().len();
    if settings.metrics_listen != r.metrics_listen {
        warn!("metrics_listen: changed in the file; the metrics endpoint moves only on restart");
    }
    r.shared.policy.set(loaded.policy);
    r.shared.dns.set(dns);
    let ingress: IngressSources = loaded
        .routes
        .iter()
        .filter_map(|s| match &s.destination {
            Destination::Ingress(i) => Some((s.spec.listen.to_string(), i.sources.clone())),
            _ => None,
        })
        .collect();
    let revoked = revoke(r, &ingress).await;
    let order: Vec<Endpoint> = loaded
        .routes
        .iter()
        .map(|s| s.spec.listen.clone())
        .collect();
    let current = r.shared.routes.get();
    let current_settings: Vec<Arc<Settings>> = current.iter().map(|r| r.settings()).collect();
    let plan = route::plan(&current_settings, loaded.routes);
    let summary = plan.summary();
    let (mut serving, unbound) = apply(r, &current, plan).await;
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
        "{entries} allowlist entr{}; {summary}{unbound}{revoked}",
        if entries == 1 { "y" } else { "ies" }
    ))
}

/// Closes the open connections the new allowlist denies, and the ingress connections whose
/// client the route's new `allow_from` refuses (unless `--no-revoke-on-reload`); the summary's
/// part about them.
async fn revoke(r: &Reloader, ingress: &IngressSources) -> String {
    if r.options.no_revoke_on_reload {
        return String::new();
    }
    let policy = r.shared.policy.get();
    let dns = r.shared.dns.get();
    let revoked = r.shared.relayed.revoke_denied(&policy, &dns, ingress).await;
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let mut summary = String::new();
    if revoked.by_allowlist > 0 {
        let n = revoked.by_allowlist;
        summary.push_str(&format!(
            "; {n} open connection{} the new allowlist denies closed",
            plural(n)
        ));
    }
    if revoked.by_allow_from > 0 {
        let n = revoked.by_allow_from;
        summary.push_str(&format!(
            "; {n} open ingress connection{} the new allow_from refuses closed",
            plural(n)
        ));
    }
    summary
}

/// Applies `plan` to the `current` routes: removed ones stop accepting and drain, changed ones
/// take their new settings, added ones are bound and handed to the accept loop. Returns the
/// routes now served (not yet in the file's order) and the listen addresses that could not be
/// bound.
async fn apply(
    r: &Reloader,
    current: &[Arc<Route>],
    plan: ReloadPlan,
) -> (Vec<Arc<Route>>, Vec<String>) {
    let mut serving: Vec<Arc<Route>> = current
        .iter()
        .filter(|r| !plan.removed.contains(&r.listen))
        .cloned()
        .collect();
    for listen in &plan.removed {
        remove(r, current, listen).await;
    }
    for settings in plan.changed {
        if let Some(route) = current.iter().find(|r| r.listen == settings.spec.listen) {
            info!(route = %route.listen, was = %route.settings().destination, now = %settings.destination, "route changed by reload: new connections use the new settings");
            route.replace_settings(settings);
        }
    }
    let mut unbound = Vec::new();
    for settings in plan.added {
        if let Some(route) = add(r, settings, &mut unbound).await {
            serving.push(route);
        }
    }
    (serving, unbound)
}

/// Stops accepting on `listen` (waits until the accept loop closed its listener), then drains
/// the route's connections in the background.
async fn remove(r: &Reloader, current: &[Arc<Route>], listen: &Endpoint) {
    let (done, closed) = oneshot::channel();
    if r.commands
        .send(Command::Remove(listen.clone(), done))
        .is_ok()
    {
        // An error only means the accept loop is gone (stopping): the listener is closed anyway.
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

/// Binds a route a reload adds and hands it to the accept loop; the route once served. `None`
/// when the accept loop is gone, or when the address cannot be bound (logged here and added to
/// `unbound`).
async fn add(r: &Reloader, settings: Settings, unbound: &mut Vec<String>) -> Option<Arc<Route>> {
    match startup::bind_endpoint(&settings.spec.listen).await {
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
            r.commands
                .send(Command::Add(served))
                .is_ok()
                .then_some(route)
        }
        Err(e) => {
            error!(route = %settings, "new route not served: {e}; the rest of the reload applies");
            unbound.push(settings.spec.listen.to_string());
            None
        }
    }
}
