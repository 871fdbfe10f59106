//! `--max-connections-per-peer`: how many connections one peer may hold at once.
//!
//! This module owns counting open connections per peer — the enclave's CID on vsock, the source
//! IP on `tcp:` stand-ins, one peer for all of `unix:` ([`crate::ops::audit::peer_key`]) — and the
//! [`PeerSlot`] guard that gives a slot back however the connection ends, so one enclave
//! cannot take every slot of `--max-connections` and the count cannot leak.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Open connections per peer key; a peer with none has no entry.
#[derive(Debug, Default)]
pub struct PeerLimits {
    limit: Option<u32>,
    open: Arc<Mutex<HashMap<String, u32>>>,
}

/// One connection's place in its peer's count.
#[derive(Debug)]
pub struct PeerSlot {
    key: String,
    open: Arc<Mutex<HashMap<String, u32>>>,
}

impl PeerLimits {
    /// `limit`: `None` is no per-peer limit (slots are still counted, for the log).
    pub fn new(limit: Option<u32>) -> PeerLimits {
        PeerLimits {
            limit,
            open: Arc::default(),
        }
    }

    /// Takes a slot for `peer_key`, or returns the limit it is at.
    pub fn try_reserve(&self, peer_key: String) -> Result<PeerSlot, u32> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(peer_key.clone()).or_insert(0);
        if let Some(limit) = self.limit {
            if *count >= limit {
                return Err(limit);
            }
        }
        *count += 1;
        Ok(PeerSlot {
            key: peer_key,
            open: self.open.clone(),
        })
    }

    /// How many connections `peer_key` has open.
    pub fn open(&self, peer_key: &str) -> u32 {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(peer_key).copied().unwrap_or(0)
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_has_its_own_limit_and_slots_come_back() {
        let limits = PeerLimits::new(Some(2));
        let a1 = limits.try_reserve("vsock:16".into()).unwrap();
        let _a2 = limits.try_reserve("vsock:16".into()).unwrap();
        assert_eq!(limits.try_reserve("vsock:16".into()).unwrap_err(), 2);
        let _b = limits.try_reserve("vsock:17".into()).unwrap();
        drop(a1);
        let _a3 = limits.try_reserve("vsock:16".into()).unwrap();
        assert_eq!(limits.open("vsock:16"), 2);
        assert_eq!(limits.open("vsock:18"), 0);
    }

    #[test]
    fn no_limit_still_counts_and_forgets_idle_peers() {
        let limits = PeerLimits::new(None);
        let slots: Vec<_> = (0..100)
            .map(|_| limits.try_reserve("tcp:127.0.0.2".into()).unwrap())
            .collect();
        assert_eq!(limits.open("tcp:127.0.0.2"), 100);
        drop(slots);
        assert!(limits.open.lock().unwrap().is_empty());
    }
}
