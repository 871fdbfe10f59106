//! The audit trail: one structured event per decision about a connection, rate-limited.
//!
//! This module owns what a decision record says and how often it is written. Every refusal
//! (policy denial, DNS failure, unreachable, over a limit, a CONNECT/SNI refusal, a revocation
//! on reload) is one `target: "audit"` event at WARN with the fields `route`, `peer`,
//! `requested` (the route's remote, the CONNECT host or the TLS server name), `port`,
//! `addresses` (each address tried and the rule that allowed or denied it), `reason` (the
//! outcome label of [`crate::ops::metrics::Outcome`], or a finer one such as an ingress route's
//! `source_not_allowed`) and `decision="refused"`; with `--audit allowed`
//! every allowed connection is one such event at INFO with `decision="allowed"`.
//!
//! Refusals are rate-limited per (route, peer, reason), the peer being the enclave's CID (or a
//! stand-in's source IP, see [`peer_key`]): the first one in a second is written, the rest of
//! that second are counted and then summarised in one line, "N more refused like this in the
//! last 1s" — a retrying enclave cannot flood journald, and nothing goes unaccounted. Allowed
//! records are not rate-limited (each is a connection that was served).

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::ops::metrics::Outcome;

/// At most one refusal line per key in this long.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Keys tracked at once; refusals beyond are counted under one catch-all key.
const MAX_KEYS: usize = 4096;

/// One decision, as recorded.
pub struct Decision<'a> {
    pub route: &'a str,
    /// As accepted: `vsock:CID:PORT`, `tcp:IP:PORT` or `unix:PATH`.
    pub peer: &'a str,
    /// The route's remote, the CONNECT host or the TLS server name, as requested.
    pub requested: Option<&'a dyn fmt::Display>,
    pub port: Option<u16>,
    /// Each address tried and the rule that allowed or denied it, e.g.
    /// `169.254.169.254 denied (metadata address ...); 10.0.0.7 allowed (allowlisted name x)`.
    pub addresses: &'a str,
    pub outcome: Outcome,
    /// A finer reason than the outcome's label, where one outcome has several (an ingress
    /// route's `source_not_allowed` and `bad_proxy_header` are both `denied`); `None`: the label.
    pub reason: Option<&'static str>,
    /// The operator-facing reason.
    pub message: &'a str,
}

impl Decision<'_> {
    /// The `reason` field: [`Decision::reason`], else the outcome's label.
    pub fn reason(&self) -> &'static str {
        self.reason.unwrap_or(self.outcome.label())
    }
}

/// The rate-limit key of a peer: `vsock:CID` (any port), `tcp:IP`, or `unix` (all unix peers
/// are one, as nothing tells them apart).
pub fn peer_key(peer: &str) -> String {
    if let Some(rest) = peer.strip_prefix("vsock:") {
        let cid = rest.split(':').next().unwrap_or(rest);
        return format!("vsock:{cid}");
    }
    if let Some(rest) = peer.strip_prefix("tcp:") {
        // An IPv4-mapped peer of a dual-stack listener is that IPv4 peer.
        if let Ok(addr) = rest.parse::<std::net::SocketAddr>() {
            return format!("tcp:{}", addr.ip().to_canonical());
        }
        if let Ok(ip) = rest.parse::<IpAddr>() {
            return format!("tcp:{ip}");
        }
        return peer.to_owned();
    }
    "unix".to_owned()
}

/// The addresses field of a refusal that tried none.
pub const NO_ADDRESSES: &str = "";

#[derive(Debug)]
struct Window {
    started: Instant,
    suppressed: u64,
}

type Key = (String, String, &'static str);

/// The rate limiter's state, process-wide like the logger it protects.
#[derive(Debug, Default)]
struct Limiter {
    windows: HashMap<Key, Window>,
}

static LIMITER: LazyLock<Mutex<Limiter>> = LazyLock::new(|| Mutex::new(Limiter::default()));
static RECORD_ALLOWED: AtomicBool = AtomicBool::new(false);

/// Whether allowed decisions are recorded too (`--audit allowed`).
pub fn set_record_allowed(on: bool) {
    RECORD_ALLOWED.store(on, Ordering::Relaxed);
}

/// Whether [`allowed`] records anything (saves formatting the addresses when it does not).
pub fn records_allowed() -> bool {
    RECORD_ALLOWED.load(Ordering::Relaxed)
}

/// What the limiter says about one refusal.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// Write it, after a summary of `summarise` refusals folded since the last line.
    Write { summarise: u64, over: Duration },
    /// Counted, not written.
    Suppress,
}

impl Limiter {
    fn admit(&mut self, key: Key, now: Instant) -> Admit {
        let full = self.windows.len() >= MAX_KEYS;
        let key = if full && !self.windows.contains_key(&key) {
            ("*".to_owned(), "*".to_owned(), key.2)
        } else {
            key
        };
        match self.windows.get_mut(&key) {
            Some(w) if now.duration_since(w.started) < WINDOW => {
                w.suppressed += 1;
                Admit::Suppress
            }
            Some(w) => {
                let admit = Admit::Write {
                    summarise: w.suppressed,
                    over: now.duration_since(w.started),
                };
                *w = Window {
                    started: now,
                    suppressed: 0,
                };
                admit
            }
            None => {
                self.windows.insert(
                    key,
                    Window {
                        started: now,
                        suppressed: 0,
                    },
                );
                Admit::Write {
                    summarise: 0,
                    over: Duration::ZERO,
                }
            }
        }
    }

    /// Ends the windows that are over: their suppressed counts, to summarise.
    fn sweep(&mut self, now: Instant) -> Vec<(Key, u64, Duration)> {
        let mut due = Vec::new();
        self.windows.retain(|key, w| {
            let age = now.duration_since(w.started);
            if age < WINDOW {
                return true;
            }
            if w.suppressed > 0 {
                due.push((key.clone(), w.suppressed, age));
            }
            false
        });
        due
    }
}

fn lock() -> std::sync::MutexGuard<'static, Limiter> {
    // A panic elsewhere while holding it leaves the map usable: it is only counts.
    LIMITER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records a refusal (rate-limited).
pub fn refused(d: &Decision<'_>) {
    let key = (d.route.to_owned(), peer_key(d.peer), d.reason());
    let admit = lock().admit(key, Instant::now());
    match admit {
        Admit::Suppress => crate::ops::metrics::global().audit_suppressed(1),
        Admit::Write { summarise, over } => {
            if summarise > 0 {
                summary(d.route, &peer_key(d.peer), d.reason(), summarise, over);
            }
            warn!(
                target: "audit",
                decision = "refused",
                route = d.route,
                peer = d.peer,
                requested = d.requested.map(tracing::field::display),
                port = d.port,
                addresses = d.addresses,
                reason = d.reason(),
                "{}: {}", lead(d.outcome), d.message
            );
        }
    }
}

/// How a refused (or revoked) connection's audit line begins. Only a decision to refuse reads
/// `connection refused:`; a DNS failure, an unreachable upstream and a revocation by reload say
/// what they are, so that none reads as the upstream's ECONNREFUSED.
fn lead(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::DnsFailure => "connection not made: DNS lookup failed",
        Outcome::Unreachable => "connection not made: upstream unreachable",
        Outcome::Revoked => "connection revoked",
        Outcome::Refused("dns_blocked") => "DNS query blocked",
        _ => "connection refused",
    }
}

/// Records an allowed connection (with `--audit allowed` only).
pub fn allowed(d: &Decision<'_>) {
    if !records_allowed() {
        return;
    }
    info!(
        target: "audit",
        decision = "allowed",
        route = d.route,
        peer = d.peer,
        requested = d.requested.map(tracing::field::display),
        port = d.port,
        addresses = d.addresses,
        reason = "allowed",
        "connection allowed: {}", d.message
    );
}

fn summary(route: &str, peer: &str, reason: &'static str, n: u64, over: Duration) {
    let secs = over.as_secs().max(1);
    warn!(
        target: "audit",
        decision = "refused",
        route,
        peer,
        reason,
        suppressed = n,
        "{n} more refused like this in the last {secs}s"
    );
}

/// Writes the summaries of windows that are over; run it about every [`WINDOW`] so a storm's
/// last second is summarised even when no further refusal comes.
pub fn flush_due() {
    let due = lock().sweep(Instant::now());
    for ((route, peer, reason), n, over) in due {
        summary(&route, &peer, reason, n, over);
    }
}

/// Runs [`flush_due`] every [`WINDOW`] until the runtime stops.
pub fn spawn_flusher() {
    tokio::spawn(async {
        let mut every = tokio::time::interval(WINDOW);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            flush_due();
        }
    });
}

/// Joins `items` with `"; "` into one field value.
pub fn join<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut out = String::new();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{item}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(peer: &str) -> Key {
        ("vsock:8000".into(), peer.into(), "denied")
    }

    #[test]
    fn peers_are_keyed_by_cid_or_source_ip() {
        assert_eq!(peer_key("vsock:16:1034"), "vsock:16");
        assert_eq!(peer_key("tcp:127.0.0.2:5555"), "tcp:127.0.0.2");
        assert_eq!(peer_key("tcp:[::1]:5555"), "tcp:::1");
        assert_eq!(peer_key("tcp:[::ffff:127.0.0.2]:5555"), "tcp:127.0.0.2");
        assert_eq!(peer_key("unix:/run/x.sock"), "unix");
    }

    #[tokio::test(start_paused = true)]
    async fn one_line_a_second_per_key_then_a_summary() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        assert_eq!(
            l.admit(key("vsock:16"), t0),
            Admit::Write {
                summarise: 0,
                over: Duration::ZERO
            }
        );
        for _ in 0..999 {
            assert_eq!(l.admit(key("vsock:16"), t0), Admit::Suppress);
        }
        // Another peer has its own window.
        assert!(matches!(
            l.admit(key("vsock:17"), t0),
            Admit::Write { summarise: 0, .. }
        ));
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(
            l.admit(key("vsock:16"), t1),
            Admit::Write {
                summarise: 999,
                over: Duration::from_millis(1500)
            }
        );
        // The sweep summarises windows that are over, even with no refusal after them.
        l.admit(key("vsock:16"), t1);
        let due = l.sweep(t1 + Duration::from_secs(1));
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(due[0].1, 1);
        assert!(l.windows.is_empty());
    }

    #[test]
    fn the_key_map_is_bounded() {
        let mut l = Limiter::default();
        let now = Instant::now();
        for i in 0..MAX_KEYS + 10 {
            l.admit(key(&format!("vsock:{i}")), now);
        }
        assert_eq!(l.windows.len(), MAX_KEYS + 1);
    }
}
