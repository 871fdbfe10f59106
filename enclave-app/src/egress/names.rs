//! The name table of `enclave-app egress`: which synthetic address stands for which name.
//!
//! This module owns the mapping between names the parent answered and the addresses of the
//! `--fake-ip` pool, shared by the DNS stub (which hands addresses out) and the transparent
//! listener (which maps an original destination back to its name). Rules:
//! - one address per name: asking again for a name gives the address it already holds;
//! - an address is never handed to another name while a connection to it is open (each open
//!   connection holds an [`Open`] guard; the address is free again when the last one drops);
//! - addresses never used come first; once the pool has been used up, the least recently used
//!   free address is recycled, even if a TTL given for it has not run out (the table is bounded
//!   by the pool's size, never by TTLs an app may or may not honour);
//! - when every address has an open connection, no address is given (the stub says SERVFAIL).
//!
//! Pure bookkeeping, no I/O; every operation is O(log n) under one short-held lock.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::Ipv4Net;

/// One address in use by a name.
#[derive(Debug)]
struct Slot {
    name: String,
    /// Connections to this address open now.
    open: u32,
    /// When it was last handed out or connected to (a tick of [`Table::tick`]).
    used: u64,
}

#[derive(Debug)]
struct Table {
    /// The first usable address, as a number, and how many there are.
    first: u32,
    size: u32,
    /// Addresses `first .. first + fresh` have been handed out at least once.
    fresh: u32,
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, Slot>,
    /// Addresses with no open connection, by last use: the first is the one to recycle.
    free: BTreeMap<u64, Ipv4Addr>,
    tick: u64,
}

/// The shared name table; cheap to clone.
#[derive(Clone, Debug)]
pub struct Names {
    pool: Ipv4Net,
    table: Arc<Mutex<Table>>,
}

/// An open connection to a synthetic address: while it lives, the address keeps its name.
#[derive(Debug)]
pub struct Open {
    names: Names,
    addr: Ipv4Addr,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.names.lock().close(self.addr);
    }
}

impl Names {
    /// A table over `pool`'s usable addresses (without the network and broadcast addresses when
    /// the prefix leaves room for them).
    pub fn new(pool: Ipv4Net) -> Names {
        let (first, size) = usable(pool);
        Names {
            pool,
            table: Arc::new(Mutex::new(Table {
                first,
                size,
                fresh: 0,
                by_name: HashMap::new(),
                by_addr: HashMap::new(),
                free: BTreeMap::new(),
                tick: 0,
            })),
        }
    }

    /// The pool the addresses come from.
    pub fn pool(&self) -> Ipv4Net {
        self.pool
    }

    /// How many names the table can hold at once.
    pub fn capacity(&self) -> u32 {
        usable(self.pool).1
    }

    /// The address of `name` (lower case, no trailing dot): the one it holds, else a fresh one,
    /// else the least recently used free one (taken from its old name). `None` when every
    /// address has an open connection.
    pub fn assign(&self, name: &str) -> Option<Ipv4Addr> {
        self.lock().assign(name)
    }

    /// Whether `name` holds an address now.
    pub fn holds(&self, name: &str) -> bool {
        self.lock().by_name.contains_key(name)
    }

    /// The name `addr` stands for, with a guard that keeps it so while the connection is open;
    /// `None` when no name holds it.
    pub fn open(&self, addr: Ipv4Addr) -> Option<(String, Open)> {
        let name = self.lock().open(addr)?;
        Some((
            name,
            Open {
                names: self.clone(),
                addr,
            },
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent whatever panicked while holding it (every operation
        // finishes its updates before anything can fail), so poisoning is ignored.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The first usable address of `pool` as a number, and how many usable addresses it has.
fn usable(pool: Ipv4Net) -> (u32, u32) {
    let network = u32::from(pool.network());
    let total = 1u64 << (32 - u32::from(pool.prefix_len()));
    if pool.prefix_len() >= 31 {
        // /31 and /32 have no network or broadcast address to skip (RFC 3021).
        (network, total as u32)
    } else {
        (network + 1, (total - 2) as u32)
    }
}

impl Table {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks `addr` as just used, keeping the free list's order.
    fn touch(&mut self, addr: Ipv4Addr) {
        let tick = self.next_tick();
        if let Some(slot) = self.by_addr.get_mut(&addr) {
            if slot.open == 0 {
                self.free.remove(&slot.used);
                self.free.insert(tick, addr);
            }
            slot.used = tick;
        }
    }

    fn assign(&mut self, name: &str) -> Option<Ipv4Addr> {
        if let Some(&addr) = self.by_name.get(name) {
            self.touch(addr);
            return Some(addr);
        }
        let addr = if self.fresh < self.size {
            let addr = Ipv4Addr::from(self.first + self.fresh);
            self.fresh += 1;
            addr
        } else {
            let (_, addr) = self.free.pop_first()?;
            if let Some(old) = self.by_addr.remove(&addr) {
                self.by_name.remove(&old.name);
            }
            addr
        };
        let tick = self.next_tick();
        self.by_name.insert(name.to_owned(), addr);
        self.by_addr.insert(
            addr,
            Slot {
                name: name.to_owned(),
                open: 0,
                used: tick,
            },
        );
        self.free.insert(tick, addr);
        Some(addr)
    }

    fn open(&mut self, addr: Ipv4Addr) -> Option<String> {
        self.touch(addr);
        let slot = self.by_addr.get_mut(&addr)?;
        if slot.open == 0 {
            self.free.remove(&slot.used);
        }
        slot.open += 1;
        Some(slot.name.clone())
    }

    fn close(&mut self, addr: Ipv4Addr) {
        let tick = self.next_tick();
        if let Some(slot) = self.by_addr.get_mut(&addr) {
            slot.open = slot.open.saturating_sub(1);
            if slot.open == 0 {
                slot.used = tick;
                self.free.insert(tick, addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(pool: &str) -> Names {
        Names::new(pool.parse().unwrap())
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_per_name_from_the_pool_without_network_and_broadcast() {
        let n = names("198.18.0.0/15");
        assert_eq!(n.capacity(), 131_070);
        let a = n.assign("a.test").unwrap();
        assert_eq!(a, ip("198.18.0.1"));
        assert_eq!(n.assign("b.test"), Some(ip("198.18.0.2")));
        assert_eq!(n.assign("a.test"), Some(a), "asked again: the same address");
        assert!(n.holds("a.test") && !n.holds("c.test"));
        assert_eq!(n.open(a).map(|(name, _)| name), Some("a.test".to_owned()));
        assert!(n.open(ip("198.18.0.9")).is_none(), "no name holds it");
    }

    #[test]
    fn a_full_pool_recycles_the_least_recently_used_free_address() {
        // A /30: two usable addresses.
        let n = names("198.18.0.0/30");
        let a = n.assign("a.test").unwrap();
        let b = n.assign("b.test").unwrap();
        // a is used again, so b is the least recently used.
        n.assign("a.test");
        assert_eq!(n.assign("c.test"), Some(b));
        assert!(!n.holds("b.test"), "b lost its address");
        assert_eq!(n.open(b).unwrap().0, "c.test");
        // Connecting counts as a use: after a connection to c, a is the oldest.
        assert_eq!(n.assign("d.test"), Some(a));
    }

    #[test]
    fn an_address_with_an_open_connection_is_never_given_to_another_name() {
        let n = names("198.18.0.0/30");
        let a = n.assign("a.test").unwrap();
        let b = n.assign("b.test").unwrap();
        let (_, open_a) = n.open(a).unwrap();
        let (_, open_b) = n.open(b).unwrap();
        let (_, open_b2) = n.open(b).unwrap();
        assert_eq!(n.assign("c.test"), None, "every address has a connection");
        drop(open_b);
        assert_eq!(n.assign("c.test"), None, "b still has one connection");
        drop(open_b2);
        assert_eq!(n.assign("c.test"), Some(b));
        let (_, open_c) = n.open(b).unwrap();
        assert_eq!(n.assign("d.test"), None);
        drop(open_c);
        drop(open_a);
        // Both are free now; c's connection closed before a's (a close is a use).
        assert_eq!(n.assign("d.test"), Some(b));
        assert_eq!(n.open(b).unwrap().0, "d.test");
        assert_eq!(n.open(a).unwrap().0, "a.test");
    }

    #[test]
    fn tiny_pools_use_every_address() {
        assert_eq!(names("198.18.0.7/32").assign("a"), Some(ip("198.18.0.7")));
        assert_eq!(names("198.18.0.6/31").capacity(), 2);
    }
}
