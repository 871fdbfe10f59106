//! The values the configuration file and the command line share: one port parser, one duration
//! parser, and the serde fields of the file (each checks its value inside its visitor, so that
//! serde_yaml reports the value's own line, column and key). The messages are the callers': the
//! file and the command line word them for where the operator wrote the value.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::config::remote::Remote;
use crate::net::endpoint::Endpoint;
use crate::policy::host::HostPattern;

/// A TCP port, 1-65535, from a number of any width: `None` when it is not one.
pub fn port_number(n: u64) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// A port written as text (`443`), 1-65535.
pub fn port_text(s: &str) -> Option<u16> {
    s.parse::<u64>().ok().and_then(port_number)
}

/// Why a duration was refused.
#[derive(Debug)]
pub enum DurationError {
    Zero,
    Invalid(humantime::DurationError),
}

/// A duration such as `30s`, `500ms` or `10m`, longer than zero.
pub fn positive_duration(s: &str) -> Result<Duration, DurationError> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err(DurationError::Zero),
        Ok(d) => Ok(d),
        Err(e) => Err(DurationError::Invalid(e)),
    }
}

pub(super) fn max_connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    d.deserialize_any(MaxConnectionsVisitor).map(Some)
}

/// Checks inside the visitor, so that serde_yaml reports the value's own line and key.
struct MaxConnectionsVisitor;

impl Visitor<'_> for MaxConnectionsVisitor {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of connections, 1-1000000")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<u32, E> {
        match u32::try_from(n) {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
            _ => Err(E::custom(format!(
                "max_connections must be 1-1000000, got {n}"
            ))),
        }
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<u32, E> {
        Err(E::custom(format!(
            "max_connections must be 1-1000000, got {n}"
        )))
    }
}

/// A listen address: the same syntax as LISTEN on the command line.
pub(super) struct ListenField(pub(super) Endpoint);

impl<'de> Deserialize<'de> for ListenField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ListenVisitor)
    }
}

struct ListenVisitor;

impl Visitor<'_> for ListenVisitor {
    type Value = ListenField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a listen address: a vsock port (8000), vsock:CID:PORT, unix:PATH or tcp:IP:PORT",
        )
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<ListenField, E> {
        self.visit_str(&n.to_string())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<ListenField, E> {
        s.parse::<Endpoint>().map(ListenField).map_err(E::custom)
    }
}

/// A route's `remote: HOST:PORT`.
pub(super) struct RemoteField(pub(super) Remote);

impl<'de> Deserialize<'de> for RemoteField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(RemoteVisitor)
    }
}

struct RemoteVisitor;

impl Visitor<'_> for RemoteVisitor {
    type Value = RemoteField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HOST:PORT, like kms.us-east-1.amazonaws.com:443")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<RemoteField, E> {
        Remote::parse_host_port(s)
            .map(RemoteField)
            .map_err(E::custom)
    }
}

/// A duration such as `10m` or `30s`, longer than zero.
pub(super) struct DurationField(pub(super) Duration);

impl<'de> Deserialize<'de> for DurationField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(DurationVisitor)
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = DurationField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as 30s or 10m")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<DurationField, E> {
        match positive_duration(s) {
            Ok(d) => Ok(DurationField(d)),
            Err(DurationError::Zero) => Err(E::custom(format!("{s:?} must be longer than zero"))),
            Err(DurationError::Invalid(e)) => {
                Err(E::custom(format!("{s:?}: {e} (write e.g. 30s, 10m, 1h)")))
            }
        }
    }
}

pub(super) struct PortField(pub(super) u16);

impl<'de> Deserialize<'de> for PortField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortVisitor)
    }
}

struct PortVisitor;

fn port_from_u64<E: de::Error>(n: u64) -> Result<PortField, E> {
    port_number(n)
        .map(PortField)
        .ok_or_else(|| E::custom(format!("port must be 1-65535, got {n}")))
}

impl Visitor<'_> for PortVisitor {
    type Value = PortField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number 1-65535")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortField, E> {
        port_from_u64(n)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortField, E> {
        match u64::try_from(n) {
            Ok(n) => port_from_u64(n),
            Err(_) => Err(E::custom(format!("port must be 1-65535, got {n}"))),
        }
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<PortField, E> {
        // A quoted number ("443") is accepted; anything else ("443x") is a typo.
        match s.trim().parse::<u64>() {
            Ok(n) => port_from_u64(n),
            Err(_) => Err(E::custom(format!(
                "port must be a number 1-65535, got {s:?}"
            ))),
        }
    }
}

pub(super) struct AddressField(pub(super) HostPattern);

impl<'de> Deserialize<'de> for AddressField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AddressVisitor)
    }
}

struct AddressVisitor;

impl Visitor<'_> for AddressVisitor {
    type Value = AddressField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a hostname, an IP address or a CIDR block")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<AddressField, E> {
        s.parse::<HostPattern>()
            .map(AddressField)
            .map_err(|e| E::custom(format!("address {s:?}: {e}")))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<AddressField, E> {
        Err(E::custom(format!(
            "address must be a hostname, an IP address or a CIDR block, got the number {n}"
        )))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<AddressField, E> {
        self.visit_u64(n.unsigned_abs())
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<AddressField, E> {
        Err(E::custom(format!(
            "address must be a hostname, an IP address or a CIDR block, got the number {n}"
        )))
    }
}
