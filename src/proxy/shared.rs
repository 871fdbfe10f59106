//! What every connection shares: the state the daemon builds once and reload updates.
//!
//! This module owns [`Shared`] (the current policies (the top-level allowlist and each
//! `enclaves:` entry's) and resolver, the running enclaves' table, upstream socket settings, the
//! daemon-wide counters, the routes being served, per-peer limits and the registry of relayed
//! connections) and [`Lifetimes`] (how long one connection may take). It is its own module so
//! that [`crate::proxy::server`], which admits connections, and [`crate::proxy::connection`],
//! which runs them, both read it without importing each other both ways.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use crate::net::relay::RelayMode;
use crate::policy::dns::Dns;
use crate::policy::enclaves::PolicySet;
use crate::proxy::current::Current;
use crate::proxy::identity::Identity;
use crate::proxy::peers::PeerLimits;
use crate::proxy::revoke::Registry;
use crate::proxy::route::{Counters, Route};
use crate::proxy::upstream::UpstreamSettings;

/// Everything a connection needs, shared by all of them.
pub struct Shared {
    /// The current policies; replaced whole on reload, so a connection sees one consistent
    /// version.
    pub policy: Current<PolicySet>,
    /// Which enclave runs at a CID (`--enclaves-command`).
    pub enclaves: Identity,
    /// The resolver; replaced on reload, which re-reads /etc/hosts and /etc/resolv.conf.
    pub dns: Current<Dns>,
    /// Connect timeout and keepalive of upstream sockets.
    pub upstream: UpstreamSettings,
    /// Totals over every route, including removed ones.
    pub counters: Counters,
    /// The routes being served, in configuration order (for reload and STATUS=).
    pub routes: Current<Vec<Arc<Route>>>,
    /// The time limits of one connection.
    pub lifetimes: Lifetimes,
    /// `--max-connections-per-peer`.
    pub peers: PeerLimits,
    /// The connections being relayed, for reload to re-check.
    pub relayed: Registry,
}

/// How long one connection may take.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// From accept to relaying: reading the request, DNS, the policy, the connects.
    pub setup_timeout: Duration,
    /// From accept to close, however busy (`--max-lifetime`).
    pub max_lifetime: Option<Duration>,
    /// How the relay moves bytes (`--relay`).
    pub relay_mode: RelayMode,
}

impl Lifetimes {
    /// Completes when a connection accepted at `started` reaches `--max-lifetime`; never,
    /// without one. The timer is boxed and made only when there is one: a relaying
    /// connection's task carries a pointer for it.
    pub fn expiry(&self, started: Instant) -> impl Future<Output = ()> + Send + 'static {
        let mut sleep = self
            .max_lifetime
            .map(|max| Box::pin(tokio::time::sleep_until(started + max)));
        std::future::poll_fn(move |cx| match &mut sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        })
    }
}

impl Default for Lifetimes {
    fn default() -> Lifetimes {
        Lifetimes {
            setup_timeout: Duration::from_secs(15),
            max_lifetime: None,
            relay_mode: RelayMode::Auto,
        }
    }
}

impl Shared {
    pub fn new(policy: PolicySet, dns: Dns, upstream: UpstreamSettings) -> Shared {
        Shared {
            policy: Current::new(policy),
            enclaves: Identity::new(crate::config::cli::DEFAULT_ENCLAVES_COMMAND),
            dns: Current::new(dns),
            upstream,
            counters: Counters::default(),
            routes: Current::new(Vec::new()),
            lifetimes: Lifetimes::default(),
            peers: PeerLimits::new(None),
            relayed: Registry::default(),
        }
    }
}
