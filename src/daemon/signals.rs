//! The signals the daemon handles: installed first thing at start-up ([`Signals::install`]),
//! then split into what stops the daemon (SIGTERM, SIGINT: [`wait_for_stop`]) and what reloads
//! it (SIGHUP, handed to the reloader by the caller).
//!
//! Imports nothing from the rest of the daemon.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::warn;

/// The signals the daemon handles. Installed first thing, so that a SIGHUP during start-up does
/// not kill the process (the default action) but is taken as a reload once serving.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// SIGTERM and SIGINT, or `None` when the handlers could not be installed.
pub type StopSignals = Option<(Signal, Signal)>;

impl Signals {
    /// `None` (and a warning) when a handler cannot be installed: the daemon still serves, but
    /// only SIGKILL stops it and there is no reload.
    pub fn install() -> Option<Signals> {
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

    /// The stop signals (for [`wait_for_stop`]) and SIGHUP (for the reloader).
    pub fn split(signals: Option<Signals>) -> (StopSignals, Option<Signal>) {
        match signals {
            Some(Signals { term, int, hup }) => (Some((term, int)), Some(hup)),
            None => (None, None),
        }
    }
}

/// Resolves on SIGTERM or SIGINT with the signal's name. Without handlers it never resolves (the
/// daemon can still be killed).
pub async fn wait_for_stop(signals: StopSignals) -> &'static str {
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
