//! The allowlist file: AWS's `vsock-proxy.yaml` format, parsed strictly.
//!
//! This module owns turning a YAML file into an [`Allowlist`] and turning every way the file can be
//! wrong into a [`ConfigError`] that names the file, and where it applies the line, column and key,
//! so that an operator can fix it without reading our source. It does no I/O besides reading the
//! one file and knows nothing about DNS or connections; decisions live in [`crate::policy`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::host::HostPattern;

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

/// Why a configuration file could not be used. `Display` is the whole operator-facing message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path} is empty: it needs an `allowlist:` list of {{address, port}} entries")]
    Empty { path: PathBuf },
    #[error("configuration file {path}{}: {message}", location_suffix(*.line, *.column))]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
}

fn location_suffix(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(", line {l}, column {c}"),
        (Some(l), None) => format!(", line {l}"),
        _ => String::new(),
    }
}

impl ConfigError {
    /// The line the error points at, when the YAML parser knows it.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => *line,
            _ => None,
        }
    }
}

/// Reads and parses the allowlist file at `path`.
pub fn load(path: &Path) -> Result<Allowlist, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses allowlist YAML; `path` is only used in error messages.
pub fn parse(text: &str, path: &Path) -> Result<Allowlist, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::Empty {
            path: path.to_owned(),
        });
    }
    let file: FileFormat = serde_yaml::from_str(text).map_err(|e| yaml_error(e, path))?;
    let entries = match file.allowlist {
        Some(entries) if !entries.is_empty() => entries,
        _ => {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: None,
                column: None,
                message: "`allowlist` is empty: add at least one entry such as \
                          `- {address: ip-ranges.amazonaws.com, port: 443}`"
                    .into(),
            })
        }
    };
    Ok(Allowlist {
        entries: entries
            .into_iter()
            .map(|e| Entry {
                address: e.address.0,
                port: e.port.0,
            })
            .collect(),
    })
}

fn yaml_error(e: serde_yaml::Error, path: &Path) -> ConfigError {
    let location = e.location();
    let mut message = e.to_string();
    // serde_yaml appends " at line L column C"; we print the location ourselves, first.
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
    }
    if message.contains("unknown field") {
        message.push_str(" (check the spelling: the file has one key, `allowlist`, and each entry has `address` and `port`)");
    } else if message.starts_with("missing field `allowlist`") {
        message.push_str(" (the file must have a top-level `allowlist:` list)");
    }
    ConfigError::Invalid {
        path: path.to_owned(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    // `Option` so that `allowlist:` with nothing after it gets our own "is empty" message.
    allowlist: Option<Vec<EntryFormat>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFormat {
    address: AddressField,
    port: PortField,
}

struct PortField(u16);

impl<'de> Deserialize<'de> for PortField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortVisitor)
    }
}

struct PortVisitor;

fn port_from_u64<E: de::Error>(n: u64) -> Result<PortField, E> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(PortField(p)),
        _ => Err(E::custom(format!("port must be 1-65535, got {n}"))),
    }
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

struct AddressField(HostPattern);

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostName;

    fn parse_str(text: &str) -> Result<Allowlist, ConfigError> {
        parse(text, Path::new("/etc/test/proxy.yaml"))
    }

    fn err(text: &str) -> ConfigError {
        match parse_str(text) {
            Ok(a) => panic!("expected an error for {text:?}, got {a:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_aws_format_with_all_address_kinds() {
        let a = parse_str(
            "allowlist:\n\
             - {address: KMS.us-east-1.amazonaws.com., port: 443}\n\
             - address: 10.0.0.1\n  port: 8443\n\
             - {address: '2001:db8::1', port: 443}\n\
             - {address: 192.0.2.0/24, port: '443'}\n",
        )
        .unwrap();
        assert_eq!(a.entries.len(), 4);
        assert_eq!(
            a.entries[0].address,
            HostPattern::Name(HostName::parse("kms.us-east-1.amazonaws.com").unwrap())
        );
        assert_eq!(a.entries[0].port, 443);
        assert_eq!(
            a.entries[1].address,
            HostPattern::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(a.entries[1].port, 8443);
        assert_eq!(
            a.entries[2].address,
            HostPattern::Ip("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            a.entries[3].address,
            HostPattern::Cidr("192.0.2.0/24".parse().unwrap())
        );
        assert_eq!(a.entries[3].port, 443);
    }

    #[test]
    fn empty_file_names_the_file() {
        for text in ["", "  \n\n"] {
            let e = err(text);
            assert!(matches!(e, ConfigError::Empty { .. }));
            assert!(e.to_string().contains("/etc/test/proxy.yaml"), "{e}");
        }
    }

    #[test]
    fn missing_file_names_the_file_and_os_error() {
        let e = load(Path::new("/nonexistent/dir/proxy.yaml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/dir/proxy.yaml"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn not_yaml_is_an_error_with_a_line() {
        let e = err("allowlist:\n- {address: a.example, port: 443\n");
        assert!(e.line().is_some(), "{e}");
        let e = err("just a string\n");
        assert!(e.to_string().contains("proxy.yaml"), "{e}");
    }

    #[test]
    fn missing_allowlist_key() {
        let e = err("other: 1\n");
        assert!(e.to_string().contains("allowlist"), "{e}");
        let e = err("---\n");
        assert!(e.to_string().contains("allowlist"), "{e}");
    }

    #[test]
    fn empty_allowlist_is_rejected() {
        assert!(err("allowlist:\n").to_string().contains("empty"));
        assert!(err("allowlist: []\n").to_string().contains("empty"));
    }

    #[test]
    fn unknown_keys_are_caught_with_their_line() {
        let e = err("allowlst:\n- {address: a.example, port: 443}\n");
        let msg = e.to_string();
        assert!(msg.contains("unknown field `allowlst`"), "{msg}");
        assert_eq!(e.line(), Some(1));

        let e = err(
            "allowlist:\n- {address: a.example, port: 443}\n- adress: b.example\n  port: 443\n",
        );
        let msg = e.to_string();
        assert!(
            msg.contains("allowlist[1]") && msg.contains("adress"),
            "{msg}"
        );
        assert_eq!(e.line(), Some(3));
    }

    #[test]
    fn bad_ports_name_line_and_key() {
        for (port, needle) in [
            ("0", "got 0"),
            ("70000", "got 70000"),
            ("443x", "\"443x\""),
            ("-1", "got -1"),
        ] {
            let e = err(&format!(
                "allowlist:\n- address: a.example\n  port: {port}\n"
            ));
            let msg = e.to_string();
            assert_eq!(e.line(), Some(3), "{msg}");
            assert!(msg.contains("allowlist[0].port"), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
        let e = err("allowlist:\n- address: a.example\n");
        assert!(e.to_string().contains("missing field `port`"), "{e}");
    }

    #[test]
    fn bad_addresses_name_line_and_key() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0.1/8",
            "300.1.1.1",
            "-bad-.example",
            "a..b",
            "1234",
            "foo/bar",
            "10.0.0.256",
        ] {
            let e = err(&format!("allowlist:\n- port: 443\n  address: \"{bad}\"\n"));
            let msg = e.to_string();
            assert_eq!(e.line(), Some(3), "{bad}: {msg}");
            assert!(msg.contains("allowlist[0].address"), "{bad}: {msg}");
        }
        let e = err("allowlist:\n- {address: 12, port: 443}\n");
        assert!(e.to_string().contains("number"), "{e}");
    }
}
