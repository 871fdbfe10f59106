//! The allowlist as the policy reads it: `{address, port}` entries in file order. Built by
//! [`crate::config`] from the file; decided on by [`crate::policy::decision`].

use std::fmt;

use crate::policy::host::HostPattern;

/// One `{address, port}` item of the allowlist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub address: HostPattern,
    pub port: u16,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            HostPattern::Ip(std::net::IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            other => write!(f, "{other}:{}", self.port),
        }
    }
}

/// The parsed allowlist, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    pub entries: Vec<Entry>,
}
