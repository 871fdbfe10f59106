//! What the service manager is shown in STATUS=: the routes and the live totals
//! ([`StatusLine`]), refreshed at most once a second and only when they changed
//! ([`refresh_status`]).
//!
//! Imports nothing from the rest of the daemon.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::ops::systemd::Notifier;
use crate::proxy::shared::Shared;

/// How often STATUS= is refreshed (only when it changed, only under a service manager).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// STATUS= names at most this many routes, then says how many more.
const STATUS_ROUTES_SHOWN: usize = 4;

/// The STATUS= text: the routes and the live totals.
#[derive(Clone)]
pub struct StatusLine {
    shared: Arc<Shared>,
}

impl StatusLine {
    pub fn new(shared: Arc<Shared>) -> StatusLine {
        StatusLine { shared }
    }

    pub fn render(&self) -> String {
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
        // The metrics' outcome names; `over_limit` reads "over the limit" as it always did.
        let totals: Vec<String> = c
            .totals()
            .iter()
            .map(|(name, n)| match *name {
                "over_limit" => format!("{n} over the limit"),
                name => format!("{n} {name}"),
            })
            .collect();
        format!(
            "{} route{}: {}; {} open, {}",
            routes.len(),
            if routes.len() == 1 { "" } else { "s" },
            shown.join(", "),
            c.open.load(Ordering::Relaxed),
            totals.join(", "),
        )
    }
}

/// Sends STATUS= when the counters changed, at most once per `STATUS_INTERVAL` (a second): the
/// per-connection path only bumps atomics.
pub async fn refresh_status(notifier: Arc<Notifier>, status: StatusLine) {
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
