//! `enclave-app egress`: transparent egress from the enclave. Any unmodified client reaches
//! what the parent allows, by name, with no proxy settings.
//!
//! One process, three parts sharing one name table ([`names`]):
//! - the DNS stub ([`stub`], `--dns-listen`, UDP and TCP), which asks the parent's `mode: dns`
//!   route ([`parent`], `--parent-dns`) and answers the app with synthetic addresses from
//!   `--fake-ip`;
//! - the transparent listener ([`transparent`], `--listen`), where `egress.nft` redirects every
//!   outbound TCP connection; it maps the original destination back to its name and asks the
//!   parent's connect route (`--connect-via`) for `name:port`;
//! - the set-up ([`setup`], `--print-setup`): the ruleset, the routes and the resolv.conf line.
//!
//! The allowlist stays on the parent: this side only carries names there, and the parent
//! decides (and counts: the metrics are the parent's). This file owns the options, starting the
//! parts, the stop (SIGTERM/SIGINT: stop accepting, drain the open connections) and the
//! rate-limited warning lines the parts share.

pub mod names;
pub mod parent;
pub mod setup;
pub mod stub;
pub mod transparent;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nitro_vsock_proxy::net::endpoint::Endpoint;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::accept;
use names::Names;
use parent::ParentDns;
use stub::Stub;
use transparent::Context;

/// What `enclave-app egress` does.
#[derive(Clone, Debug)]
pub struct Options {
    pub dns_listen: SocketAddr,
    pub parent_dns: Endpoint,
    pub fake_ip: Ipv4Net,
    pub listen: SocketAddr,
    pub connect_via: Endpoint,
    /// The stub answers within this, or SERVFAIL.
    pub dns_timeout: Duration,
    /// Reaching the parent's connect route and its answer.
    pub setup_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub max_connections: usize,
    /// Questions the stub answers at once.
    pub max_dns_queries: usize,
    pub drain_timeout: Duration,
}

/// Serves until `stop` resolves, then drains. Fails only if it cannot listen.
pub async fn run(options: Options, stop: impl Future<Output = ()>) -> Result<(), String> {
    let names = Names::new(options.fake_ip);
    let (udp, tcp) = stub::bind(options.dns_listen).await?;
    let listener = accept::bind(&Endpoint::Tcp(options.listen)).await?;
    let stub = Arc::new(Stub {
        parent: ParentDns::start(options.parent_dns.clone(), options.dns_timeout),
        names: names.clone(),
        timeout: options.dns_timeout,
        slots: Semaphore::new(options.max_dns_queries),
        max_queries: options.max_dns_queries,
        overloaded: RateLimited::default(),
    });
    let context = Arc::new(Context {
        names,
        connect_via: options.connect_via.clone(),
        setup_timeout: options.setup_timeout,
        idle_timeout: options.idle_timeout,
        refusals: RateLimited::default(),
    });
    info!(
        dns_listen = %options.dns_listen,
        parent_dns = %options.parent_dns,
        fake_ip = %options.fake_ip,
        listen = %options.listen,
        connect_via = %options.connect_via,
        max_connections = options.max_connections,
        "egress listening"
    );
    // The stub answers until the drain is over (an open connection's app may still resolve a
    // name), then stops with everything else.
    let dns = async {
        tokio::join!(
            stub::serve_udp(udp, stub.clone()),
            stub::serve_tcp(tcp, stub.clone())
        );
    };
    let handle = move |client, _peer| transparent::handle(client, context.clone());
    let serve = accept::serve_until_stopped(
        listener,
        options.max_connections,
        handle,
        stop,
        options.drain_timeout,
    );
    tokio::select! {
        _ = serve => {}
        () = dns => {}
    }
    Ok(())
}

/// What to check when a parent route cannot be reached.
pub fn unreachable_hint(target: &Endpoint, mode: &str) -> String {
    match target {
        Endpoint::Vsock { cid, port } => format!(
            "is nitro-vsock-proxy running on the parent (CID {cid}) with a `{mode}` route listening on vsock port {port}?"
        ),
        other => format!("is a `{mode}` route of nitro-vsock-proxy listening on {other}?"),
    }
}

/// Warning lines at most [`RateLimited::PER_SECOND`] a second; the first line after a quiet
/// spell says how many were left out.
#[derive(Debug, Default)]
pub struct RateLimited {
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    skipped: u64,
}

impl RateLimited {
    pub const PER_SECOND: u32 = 10;

    /// Logs `message` at WARN unless the limit for this second is reached.
    pub fn warn(&self, message: fmt::Arguments<'_>) {
        match self.admit(Instant::now()) {
            None => {}
            Some(0) => warn!("{message}"),
            Some(skipped) => warn!(
                skipped,
                "{message} ({skipped} similar lines left out in the last second)"
            ),
        }
    }

    /// Whether a line at `now` is logged (`Some`, with how many were left out since the last
    /// one logged) or left out (`None`).
    fn admit(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if w.start
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1))
        {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged >= Self::PER_SECOND {
            w.skipped += 1;
            return None;
        }
        w.logged += 1;
        Some(std::mem::take(&mut w.skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_ten_lines_a_second_and_the_next_one_counts_the_rest() {
        let limit = RateLimited::default();
        let t0 = Instant::now();
        for _ in 0..RateLimited::PER_SECOND {
            assert_eq!(limit.admit(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(limit.admit(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(limit.admit(t0 + Duration::from_millis(1000)), Some(5));
        assert_eq!(limit.admit(t0 + Duration::from_millis(1001)), Some(0));
    }
}
