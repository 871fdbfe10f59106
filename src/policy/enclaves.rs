//! Per-enclave policy: who a connection's peer is, which `enclaves:` entries it matches, and the
//! allowlist that gives it.
//!
//! This module owns the entries as the policy reads them ([`Enclave`], [`Match`]), a peer's
//! identity as the kernel gives it ([`PeerIdentity`]: the vsock CID an enclave cannot forge, or a
//! `tcp:` peer's source address), the table of running enclaves that `nitro-cli
//! describe-enclaves --metadata` prints ([`Table`], [`parse_describe`]), and [`PolicySet`]: the
//! top-level allowlist and each entry's, compiled once, from which one connection's
//! [`Policy`] is the top-level allowlist plus the allowlists of every entry it matches. Like the
//! decision, it does no I/O: running the command is the daemon's (see
//! [`crate::proxy::identity`]); what it printed is passed in.
//!
//! Matching fails closed: a key that needs the table (`name`, `pcr0`..`pcr2`, `debug`) holds only
//! for a vsock peer whose CID the table lists as `RUNNING` with that value, and never while the
//! table is unavailable (the command failed, timed out or printed something else).

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::allowlist::Allowlist;
use crate::policy::decision::{Policy, Rules};

/// One `match:` of an `enclaves:` entry: every given key must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    pub cid: Option<u32>,
    /// `EnclaveName`.
    pub name: Option<String>,
    /// `PCR0`, `PCR1`, `PCR2`, lowercase hex.
    pub pcrs: [Option<String>; 3],
    /// `debug: false`: Flags has no DEBUG_MODE; `true`: it has.
    pub debug: Option<bool>,
    /// For peers of `tcp:` listeners.
    pub source: Option<IpNet>,
}

impl Match {
    /// Whether a key needs the running enclaves' table (everything but `cid` and `source`).
    pub fn needs_table(&self) -> bool {
        self.name.is_some() || self.pcrs.iter().any(Option::is_some) || self.debug.is_some()
    }

    /// Whether every key given holds for `peer`, with `table` as the running enclaves.
    pub fn holds(&self, peer: &PeerIdentity, table: &Table) -> bool {
        if let Some(cid) = self.cid {
            if peer.cid != Some(cid) {
                return false;
            }
        }
        if let Some(net) = self.source {
            match peer.source {
                Some(ip) if net.contains(&ip.to_canonical()) => {}
                _ => return false,
            }
        }
        if !self.needs_table() {
            return true;
        }
        let Some(running) = peer.cid.and_then(|cid| table.get(cid)) else {
            return false;
        };
        if let Some(name) = &self.name {
            if running.name != *name {
                return false;
            }
        }
        for (wanted, got) in self.pcrs.iter().zip(&running.pcrs) {
            if let Some(wanted) = wanted {
                if !got.eq_ignore_ascii_case(wanted) {
                    return false;
                }
            }
        }
        match self.debug {
            Some(debug) => running.debug == debug,
            None => true,
        }
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys = Vec::new();
        if let Some(cid) = self.cid {
            keys.push(format!("cid {cid}"));
        }
        if let Some(name) = &self.name {
            keys.push(format!("name {name}"));
        }
        for (i, pcr) in self.pcrs.iter().enumerate() {
            if let Some(pcr) = pcr {
                let short = pcr.get(..16).unwrap_or(pcr);
                keys.push(format!("pcr{i} {short}..."));
            }
        }
        if let Some(debug) = self.debug {
            keys.push(format!("debug {debug}"));
        }
        if let Some(source) = self.source {
            keys.push(format!("source {source}"));
        }
        f.write_str(&keys.join(", "))
    }
}

/// One item of `enclaves:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enclave {
    /// The operator's label: logs, audit, metrics, routes' `enclaves:`.
    pub id: String,
    pub matcher: Match,
    pub allowlist: Allowlist,
}

/// What the kernel says about a connection's peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// A vsock peer's CID.
    pub cid: Option<u32>,
    /// A `tcp:` peer's address (IPv4-mapped written as IPv4).
    pub source: Option<IpAddr>,
}

impl PeerIdentity {
    /// From the peer as accepted: `vsock:CID:PORT`, `tcp:IP:PORT` or `unix:PATH` (no identity).
    pub fn from_peer(peer: &str) -> PeerIdentity {
        if let Some(rest) = peer.strip_prefix("vsock:") {
            let cid = rest.split(':').next().and_then(|c| c.parse().ok());
            return PeerIdentity { cid, source: None };
        }
        if let Some(rest) = peer.strip_prefix("tcp:") {
            let source = rest
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip())
                .or_else(|_| rest.parse::<IpAddr>())
                .ok()
                .map(|ip| ip.to_canonical());
            return PeerIdentity { cid: None, source };
        }
        PeerIdentity::default()
    }
}

/// A running enclave, as `nitro-cli describe-enclaves --metadata` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    pub name: String,
    pub cid: u32,
    /// PCR0, PCR1, PCR2 as printed (hex).
    pub pcrs: [String; 3],
    /// Flags has DEBUG_MODE.
    pub debug: bool,
}

/// The running enclaves by CID, or `None` while the command's output is unavailable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table(Option<HashMap<u32, Running>>);

impl Table {
    /// No table: the command failed, timed out, printed something else, or has not run.
    pub fn unavailable() -> Table {
        Table(None)
    }

    pub fn known(running: Vec<Running>) -> Table {
        Table(Some(running.into_iter().map(|r| (r.cid, r)).collect()))
    }

    pub fn get(&self, cid: u32) -> Option<&Running> {
        self.0.as_ref()?.get(&cid)
    }

    pub fn is_available(&self) -> bool {
        self.0.is_some()
    }

    /// Whether the table lists `cid` (false while unavailable).
    pub fn lists(&self, cid: u32) -> bool {
        self.get(cid).is_some()
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, HashMap::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Described {
    enclave_name: Option<String>,
    #[serde(rename = "EnclaveCID")]
    enclave_cid: u64,
    state: String,
    #[serde(default)]
    flags: String,
    #[serde(default)]
    measurements: Option<Measurements>,
}

#[derive(Deserialize)]
struct Measurements {
    #[serde(rename = "PCR0", default)]
    pcr0: String,
    #[serde(rename = "PCR1", default)]
    pcr1: String,
    #[serde(rename = "PCR2", default)]
    pcr2: String,
}

/// The running enclaves in `nitro-cli describe-enclaves --metadata`'s JSON (an array of
/// objects with `EnclaveName`, `EnclaveCID`, `State`, `Flags`, `Measurements`); only those in
/// State `RUNNING` are kept. `Err` says why the text is not that JSON.
pub fn parse_describe(text: &str) -> Result<Vec<Running>, String> {
    let described: Vec<Described> =
        serde_json::from_str(text).map_err(|e| format!("not describe-enclaves' JSON: {e}"))?;
    let mut running = Vec::new();
    for d in described {
        if d.state != "RUNNING" {
            continue;
        }
        let cid = u32::try_from(d.enclave_cid)
            .map_err(|_| format!("EnclaveCID {} is not a CID", d.enclave_cid))?;
        let m = d.measurements;
        let pcr = |f: fn(&Measurements) -> &String| m.as_ref().map(f).cloned().unwrap_or_default();
        running.push(Running {
            name: d.enclave_name.unwrap_or_default(),
            cid,
            pcrs: [pcr(|m| &m.pcr0), pcr(|m| &m.pcr1), pcr(|m| &m.pcr2)],
            debug: d.flags.split([',', '|', ' ']).any(|f| f == "DEBUG_MODE"),
        });
    }
    Ok(running)
}

/// An entry compiled.
#[derive(Clone, Debug)]
struct Compiled {
    id: String,
    matcher: Match,
    rules: Arc<Rules>,
}

/// The entries a connection matched, as indexes into the set's entries, ascending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matched(Vec<usize>);

impl Matched {
    pub fn indexes(&self) -> &[usize] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The top-level allowlist and every entry's, compiled; see the module docs. Replaced whole
/// on reload.
#[derive(Clone, Debug)]
pub struct PolicySet {
    base: Arc<Rules>,
    enclaves: Vec<Compiled>,
}

impl PolicySet {
    /// Compiles the top-level allowlist and each entry's, in time linear in their length.
    pub fn new(allowlist: Allowlist, enclaves: Vec<Enclave>) -> PolicySet {
        PolicySet {
            base: Arc::new(Rules::new(allowlist)),
            enclaves: enclaves
                .into_iter()
                .map(|e| Compiled {
                    id: e.id,
                    matcher: e.matcher,
                    rules: Arc::new(Rules::new(e.allowlist)),
                })
                .collect(),
        }
    }

    /// The top-level allowlist alone: what a connection matching no entry may reach.
    pub fn base(&self) -> Policy {
        Policy::from_parts(vec![self.base.clone()])
    }

    /// The top-level allowlist plus entry `index`'s.
    pub fn with_entry(&self, index: usize) -> Policy {
        let mut parts = vec![self.base.clone()];
        parts.extend(self.enclaves.get(index).map(|e| e.rules.clone()));
        Policy::from_parts(parts)
    }

    /// What a connection that matched `matched` may reach: the top-level allowlist plus the
    /// allowlists of every entry it matched.
    pub fn for_matched(&self, matched: &Matched) -> Policy {
        let mut parts = vec![self.base.clone()];
        parts.extend(
            matched
                .0
                .iter()
                .filter_map(|&i| self.enclaves.get(i).map(|e| e.rules.clone())),
        );
        Policy::from_parts(parts)
    }

    /// The entries `peer` matches with `table` as the running enclaves.
    pub fn matching(&self, peer: &PeerIdentity, table: &Table) -> Matched {
        Matched(
            self.enclaves
                .iter()
                .enumerate()
                .filter(|(_, e)| e.matcher.holds(peer, table))
                .map(|(i, _)| i)
                .collect(),
        )
    }

    /// The ids of `matched`, comma-separated, or `-` for none: the `enclave` field of logs.
    pub fn label(&self, matched: &Matched) -> String {
        if matched.is_empty() {
            return "-".to_owned();
        }
        self.ids(matched).collect::<Vec<_>>().join(",")
    }

    /// The ids of `matched`.
    pub fn ids<'a>(&'a self, matched: &'a Matched) -> impl Iterator<Item = &'a str> + 'a {
        matched
            .0
            .iter()
            .filter_map(|&i| self.enclaves.get(i).map(|e| e.id.as_str()))
    }

    /// Whether any of `matched` is one of `ids` (a route's `enclaves:`).
    pub fn any_of(&self, matched: &Matched, ids: &[String]) -> bool {
        self.ids(matched)
            .any(|id| ids.iter().any(|allowed| allowed == id))
    }

    /// The entries, for `--check-config` and start-up: (id, match, entry count).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Match, usize)> {
        self.enclaves
            .iter()
            .map(|e| (e.id.as_str(), &e.matcher, e.rules.entries().len()))
    }

    pub fn len(&self) -> usize {
        self.enclaves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.enclaves.is_empty()
    }

    /// Whether any entry matches by a key the running enclaves' table gives.
    pub fn needs_table(&self) -> bool {
        self.enclaves.iter().any(|e| e.matcher.needs_table())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(cid: u32, name: &str, pcr0: &str, debug: bool) -> Running {
        Running {
            name: name.into(),
            cid,
            pcrs: [pcr0.into(), "11".into(), "22".into()],
            debug,
        }
    }

    fn vsock(cid: u32) -> PeerIdentity {
        PeerIdentity {
            cid: Some(cid),
            source: None,
        }
    }

    #[test]
    fn peers_identity_comes_from_the_accepted_address() {
        assert_eq!(PeerIdentity::from_peer("vsock:16:1234"), vsock(16));
        assert_eq!(
            PeerIdentity::from_peer("tcp:[::ffff:127.0.0.5]:80").source,
            Some("127.0.0.5".parse().unwrap())
        );
        assert_eq!(
            PeerIdentity::from_peer("unix:/run/x.sock"),
            PeerIdentity::default()
        );
    }

    #[test]
    fn every_given_key_must_hold_and_table_keys_fail_closed() {
        let table = Table::known(vec![running(16, "signer", "AB", false)]);
        let m = Match {
            name: Some("signer".into()),
            pcrs: [Some("ab".into()), None, None],
            ..Match::default()
        };
        assert!(m.holds(&vsock(16), &table));
        assert!(!m.holds(&vsock(17), &table));
        assert!(!m.holds(&vsock(16), &Table::unavailable()));
        let other = Table::known(vec![running(16, "signer", "CD", false)]);
        assert!(!m.holds(&vsock(16), &other));
        let debug = Match {
            debug: Some(false),
            ..Match::default()
        };
        assert!(debug.holds(&vsock(16), &table));
        assert!(!debug.holds(
            &vsock(16),
            &Table::known(vec![running(16, "signer", "AB", true)])
        ));
        // A tcp: peer has no CID: only `source` can match it.
        let tcp = PeerIdentity::from_peer("tcp:127.0.0.5:9");
        assert!(!m.holds(&tcp, &table));
        let by_source = Match {
            source: Some("127.0.0.5/32".parse().unwrap()),
            ..Match::default()
        };
        assert!(by_source.holds(&tcp, &Table::unavailable()));
        assert!(!by_source.holds(&vsock(16), &table));
        let by_cid = Match {
            cid: Some(16),
            ..Match::default()
        };
        assert!(by_cid.holds(&vsock(16), &Table::unavailable()));
    }

    #[test]
    fn describe_enclaves_json_keeps_running_enclaves() {
        let text = r#"[
          {"EnclaveName": "signer", "EnclaveID": "i-0-enc1", "ProcessID": 7, "EnclaveCID": 16,
           "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 512, "State": "RUNNING",
           "Flags": "DEBUG_MODE",
           "Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": "aa", "PCR1": "bb", "PCR2": "cc"}},
          {"EnclaveName": "old", "EnclaveCID": 17, "State": "TERMINATING", "Flags": "NONE"}
        ]"#;
        let r = parse_describe(text).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].name, "signer");
        assert_eq!(r[0].cid, 16);
        assert!(r[0].debug);
        assert_eq!(r[0].pcrs[0], "aa");
        assert_eq!(parse_describe("[]").unwrap(), Vec::new());
        assert!(parse_describe("not json").is_err());
        assert!(parse_describe("{\"a\": 1}").is_err());
    }
}
