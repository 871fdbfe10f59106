//! The configuration file: AWS's `vsock-proxy.yaml` format plus optional `routes:`, parsed strictly.
//!
//! This module owns turning a YAML file into a [`Config`] (the [`Allowlist`] and the file's
//! [`RouteConfig`]s) and turning every way the file can be wrong into a [`ConfigError`] that names
//! the file, and where it applies the line, column and key, so that an operator can fix it without
//! reading our source. A file without `routes:` is AWS's format and means what it means to AWS.
//! It does no I/O besides reading the one file and knows nothing about DNS or connections;
//! decisions live in [`crate::policy`], what a route is in [`crate::proxy::route`].
//!
//! serde_yaml reports where a value is only when deserializing it fails, so the lines of items
//! that parsed fine (for `--check-config` and for errors found after parsing, such as two routes
//! on one listen address) come from [`crate::config::locate`], one pass over the same text.

use std::path::Path;

use std::time::Duration;

use serde::Deserialize;

use crate::config::error::ConfigError;
use crate::config::fields::{
    max_connections, AddressField, DurationField, ListenField, PortField, RemoteField,
};
use crate::config::locate::Locations;
use crate::config::read;
use crate::config::remote::Remote;
use crate::net::endpoint::Endpoint;
use crate::net::proxy_header::Version as ProxyProtocol;
use crate::policy::allowlist::{Allowlist, Entry};
use crate::policy::source::{self, Sources};

/// Where a route's connections go.
///
/// `require_sni` is `None` without `sni: require`, else what the route does with a ClientHello
/// that carries ECH: an [`Ech`] exists only on a route that checks a server name, so `ech:`
/// cannot be set where it would mean nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// `remote: HOST:PORT`, optionally with `sni: require` (the ClientHello's server name must be
    /// the remote's name).
    Fixed {
        remote: Remote,
        require_sni: Option<Ech>,
    },
    /// `mode: connect`: an HTTP CONNECT proxy; each request names its destination. With
    /// `sni: require`, the first bytes in the tunnel must be a ClientHello naming the CONNECT
    /// host.
    Connect { require_sni: Option<Ech> },
    /// `mode: sni` with `port:`: the destination is the TLS ClientHello's server name.
    Sni { port: u16, ech: Ech },
    /// `mode: dns`: DNS over the stream, answered from the allowlist (names it allows by name).
    Dns,
    /// `mode: ingress`: the network's clients to the enclave at `to`, judged by their source
    /// (`allow_from`), not by the allowlist.
    Ingress(Ingress),
}

/// An ingress route's keys: where its connections go and who may make them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ingress {
    /// `to:`, the enclave's `vsock:CID:PORT` (or a `tcp:`/`unix:` stand-in).
    pub to: Endpoint,
    /// `allow_from:` and `accept_proxy_protocol:`.
    pub sources: Sources,
    /// `proxy_protocol:`, the header written before the client's bytes.
    pub proxy_protocol: ProxyProtocol,
}

/// What a route that checks the TLS server name does with a ClientHello carrying
/// `encrypted_client_hello`, whose `server_name` is only the outer, public name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ech {
    /// Refused (`reason="ech"`): the name checked would not be the name reached. The default.
    #[default]
    Refuse,
    /// `ech: allow`: let through, the outer (public) name checked as any server name; the real
    /// destination name is hidden from the parent.
    Allow,
}

/// One item of `routes:`: a listen address and where its connections go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteConfig {
    pub listen: Endpoint,
    pub kind: RouteKind,
    /// At most this many connections on this route at once (the global limit still caps all).
    pub max_connections: Option<u32>,
    /// This route's idle timeout instead of the command line's.
    pub idle_timeout: Option<Duration>,
    /// Where the item starts in the file.
    pub line: Option<usize>,
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub allowlist: Allowlist,
    /// The line of each allowlist entry, in the same order.
    pub allowlist_lines: Vec<Option<usize>>,
    /// `routes:`, in file order; empty for AWS's format.
    pub routes: Vec<RouteConfig>,
    /// `metrics_listen:`, where to serve Prometheus metrics (`tcp:` or `unix:`), if set.
    pub metrics_listen: Option<Endpoint>,
}

/// Reads and parses the configuration file at `path`. Blocking (reads a file, parses up to
/// [`crate::config::MAX_FILE_SIZE`] of YAML): async callers run it off the runtime's workers, see
/// the daemon's start-up. Only a regular file is read (see [`read::read_text`]), so a FIFO or
/// a device named by `--config` is an error instead of a hang or an unbounded read.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read::read_text(path)?;
    parse(&text, path)
}

/// Parses configuration YAML; `path` is only used in error messages.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::Empty {
            path: path.to_owned(),
        });
    }
    let file: FileFormat = serde_yaml::from_str(text).map_err(|e| yaml_error(e, path, text))?;
    // The allowlist is what enclaves may reach; ingress routes are judged by their sources, so
    // a file of ingress routes alone needs none.
    let ingress_only = file.routes.as_ref().is_some_and(|r| {
        !r.is_empty() && r.iter().all(|r| matches!(r.mode, Some(ModeField::Ingress)))
    });
    let entries = match file.allowlist {
        Some(entries) if !entries.is_empty() => entries,
        _ if ingress_only => Vec::new(),
        _ => {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: None,
                column: None,
                message: "`allowlist` is empty: add at least one entry such as \
                          `- {address: ip-ranges.amazonaws.com, port: 443}` (only a file whose \
                          routes are all `mode: ingress` may leave it out)"
                    .into(),
            })
        }
    };
    let locations = Locations::find(text);
    let allowlist_lines = (0..entries.len())
        .map(|i| locations.line("allowlist", i))
        .collect();
    let allowlist = Allowlist {
        entries: entries
            .into_iter()
            .map(|e| Entry {
                address: e.address.0,
                port: e.port.0,
            })
            .collect(),
    };
    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, r) in file.routes.unwrap_or_default().into_iter().enumerate() {
        if let Some(first) = routes.iter().position(|seen| seen.listen == r.listen.0) {
            let (line, column) = locations.get("routes", i, Some("listen")).unzip();
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message: format!(
                    "routes[{i}].listen: {} is already the listen address of routes[{first}]{}; \
                     each route needs a listen address of its own",
                    r.listen.0,
                    routes[first]
                        .line
                        .map_or_else(String::new, |l| format!(" (line {l})"))
                ),
            });
        }
        let kind = route_kind(&r).map_err(|(key, message)| {
            let (line, column) = locations.get("routes", i, key).unzip();
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message: format!(
                    "routes[{i}]{}: {message}",
                    key.map_or_else(String::new, |k| format!(".{k}"))
                ),
            }
        })?;
        routes.push(RouteConfig {
            listen: r.listen.0,
            kind,
            max_connections: r.max_connections,
            idle_timeout: r.idle_timeout.map(|d| d.0),
            line: locations.line("routes", i),
        });
    }
    let metrics_listen = match file.metrics_listen {
        Some(ListenField(endpoint)) => {
            crate::ops::metrics_server::check_endpoint(&endpoint, "metrics_listen:").map_err(
                |message| ConfigError::Invalid {
                    path: path.to_owned(),
                    line: top_level_line(text, "metrics_listen"),
                    column: None,
                    message,
                },
            )?;
            Some(endpoint)
        }
        None => None,
    };
    Ok(Config {
        allowlist,
        allowlist_lines,
        routes,
        metrics_listen,
    })
}

/// The line (1-based) of the top-level `key:`, if it is written on a line of its own.
fn top_level_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            line.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

/// The route's kind from its keys; an error names the key that is wrong (or none: the item).
fn route_kind(r: &RouteFormat) -> Result<RouteKind, (Option<&'static str>, String)> {
    let fixed_only = |key: &'static str, mode: &str| {
        (
            Some(key),
            format!(
                "a `mode: {mode}` route takes its destination from each connection; drop `{key}`"
            ),
        )
    };
    let ech = match r.ech {
        Some(EchField::Allow) => Ech::Allow,
        None => Ech::Refuse,
    };
    // `ech:` says what to do with a ClientHello whose server name is checked: on a route that
    // checks none it would suggest a check that does not happen.
    let require_sni = |what: &str| match (&r.sni, &r.ech) {
        (Some(SniField::Require), _) => Ok(Some(ech)),
        (None, Some(_)) => Err((
            Some("ech"),
            format!(
                "`ech` applies only to a route that checks the TLS server name (`mode: sni`, \
                 or `sni: require`); {what} checks none: add `sni: require` or drop `ech`"
            ),
        )),
        (None, None) => Ok(None),
    };
    if let Some(ModeField::Ingress) = r.mode {
        return ingress(r).map(RouteKind::Ingress);
    }
    for (key, given) in [
        ("to", r.to.is_some()),
        ("allow_from", r.allow_from.is_some()),
        ("proxy_protocol", r.proxy_protocol.is_some()),
        ("accept_proxy_protocol", r.accept_proxy_protocol.is_some()),
    ] {
        if given {
            return Err((
                Some(key),
                format!(
                    "`{key}` belongs to `mode: ingress` routes (the network to the enclave); \
                     drop it, or add `mode: ingress`"
                ),
            ));
        }
    }
    match (&r.mode, &r.remote) {
        (None, None) => Err((
            None,
            "a route needs `remote: HOST:PORT`, or `mode: connect` (HTTP CONNECT), `mode: sni` \
             with `port:` (TLS server name), `mode: dns` (DNS answered from the allowlist) or \
             `mode: ingress` with `to:` and `allow_from:` (the network to the enclave)"
                .into(),
        )),
        (None, Some(remote)) => {
            if r.port.is_some() {
                return Err((
                    Some("port"),
                    "`port` belongs to `mode: sni`; a fixed route's port is in `remote: HOST:PORT`"
                        .into(),
                ));
            }
            Ok(RouteKind::Fixed {
                remote: remote.0.clone(),
                require_sni: require_sni("a fixed route without `sni: require`")?,
            })
        }
        (Some(mode), Some(_)) => Err(fixed_only("remote", mode.name())),
        (Some(ModeField::Sni), None) if r.sni.is_some() => Err((
            Some("sni"),
            "a `mode: sni` route always checks the TLS server name (it is where the connection \
             goes); drop `sni`"
                .into(),
        )),
        (Some(ModeField::Connect), None) => match r.port {
            Some(_) => Err((
                Some("port"),
                "a `mode: connect` route takes the port from each CONNECT request; drop `port`"
                    .into(),
            )),
            None => Ok(RouteKind::Connect {
                require_sni: require_sni("a `mode: connect` route without `sni: require`")?,
            }),
        },
        (Some(ModeField::Dns), None) => match r.port {
            Some(_) => Err((
                Some("port"),
                "a `mode: dns` route answers DNS queries; it connects nowhere: drop `port`".into(),
            )),
            None => Ok(RouteKind::Dns),
        },
        // Returned from before the match; kept so that every mode is spelled out here.
        (Some(ModeField::Ingress), None) => ingress(r).map(RouteKind::Ingress),
        (Some(ModeField::Sni), None) => match &r.port {
            Some(port) => Ok(RouteKind::Sni { port: port.0, ech }),
            None => Err((
                None,
                "a `mode: sni` route needs `port:`, the TCP port to connect to (usually 443)"
                    .into(),
            )),
        },
    }
}

/// An ingress route's kind from its keys; an error names the key that is wrong (or none).
fn ingress(r: &RouteFormat) -> Result<Ingress, (Option<&'static str>, String)> {
    for (key, given) in [
        ("remote", r.remote.is_some()),
        ("port", r.port.is_some()),
        ("sni", r.sni.is_some()),
        ("ech", r.ech.is_some()),
    ] {
        if given {
            return Err((
                Some(key),
                format!(
                    "a `mode: ingress` route connects only to its `to:` (the enclave); drop `{key}`"
                ),
            ));
        }
    }
    if let Endpoint::Vsock { .. } = r.listen.0 {
        return Err((
            Some("listen"),
            format!(
                "a `mode: ingress` route listens on the network side of the parent: \
                 `tcp:IP:PORT` (like tcp:0.0.0.0:443) or `unix:PATH`, not {}",
                r.listen.0
            ),
        ));
    }
    let to =
        match &r.to {
            None => return Err((
                None,
                "a `mode: ingress` route needs `to: \"vsock:CID:PORT\"`, the enclave's CID and \
                 port (like vsock:16:443)"
                    .into(),
            )),
            Some(ListenField(Endpoint::Vsock { cid, .. })) if *cid == libc::VMADDR_CID_ANY => {
                return Err((
                    Some("to"),
                    "`to` needs the enclave's CID as well as its port: vsock:CID:PORT, like \
                 vsock:16:443 (`nitro-cli describe-enclaves` shows the CID)"
                        .into(),
                ))
            }
            Some(ListenField(to)) => to.clone(),
        };
    let blocks = |key: &'static str, list: &[String]| {
        list.iter()
            .enumerate()
            .map(|(i, b)| source::parse_block(b).map_err(|e| (Some(key), format!("[{i}]: {e}"))))
            .collect::<Result<Vec<_>, _>>()
    };
    let allow_from = match &r.allow_from {
        Some(list) => blocks("allow_from", list)?,
        None => {
            return Err((
                None,
                "a `mode: ingress` route needs `allow_from:`, the client addresses that may \
                 connect (CIDR blocks, like [\"10.0.0.0/8\", \"2001:db8::/32\"]); there is no \
                 default, and `allow_from: []` admits no one"
                    .into(),
            ))
        }
    };
    let trusted = blocks(
        "accept_proxy_protocol",
        r.accept_proxy_protocol.as_deref().unwrap_or_default(),
    )?;
    let proxy_protocol = match &r.proxy_protocol {
        None => ProxyProtocol::None,
        Some(v) => v.parse().map_err(|e| (Some("proxy_protocol"), e))?,
    };
    Ok(Ingress {
        to,
        sources: Sources {
            allow_from,
            trusted,
        },
        proxy_protocol,
    })
}

/// serde_yaml's error as ours: its positions dropped from the text (we print the location once,
/// first), with a hint for the mistakes people make: a tab in the indentation, an unquoted
/// wildcard (YAML reads `*` as an alias), `allowlist:` or `routes:` written as a map.
fn yaml_error(e: serde_yaml::Error, path: &Path, text: &str) -> ConfigError {
    let location = e.location();
    let mut message = without_positions(&e.to_string());
    let line_text = location
        .as_ref()
        .and_then(|l| text.lines().nth(l.line().saturating_sub(1)))
        .unwrap_or("");
    let indentation = &line_text[..line_text.len() - line_text.trim_start().len()];
    if message.contains("unknown field") {
        message.push_str(
            " (check the spelling: the file's keys are `allowlist`, `routes` and `metrics_listen`; an allowlist \
             entry has `address` and `port`; a route has `listen`, `remote` or `mode` (`connect`, \
             `sni` with `port`, `dns`, `ingress` with `to`, `allow_from`, `proxy_protocol`, \
             `accept_proxy_protocol`), `sni: require`, `ech: allow`, `max_connections` and `idle_timeout`)",
        );
    } else if message.starts_with("missing field `allowlist`") {
        message.push_str(" (the file must have a top-level `allowlist:` list)");
    } else if message.contains("tab character") || indentation.contains('\t') {
        message.push_str(" (YAML does not allow tabs for indentation: indent with spaces)");
    } else if message.contains("alias") && line_text.contains('*') {
        let name = line_text
            .find('*')
            .map(|at| &line_text[at..])
            .and_then(|rest| {
                rest.split(|c: char| c.is_whitespace() || matches!(c, ',' | '}' | ']'))
                    .next()
            })
            .unwrap_or("*.example.com");
        message.push_str(" (quote wildcard names: '*.example.com'");
        if name != "*.example.com" && name.starts_with("*.") {
            message.push_str(&format!(", here '{name}'"));
        }
        message.push_str("; unquoted, YAML reads `*` as an alias)");
    } else if message.contains("expected a sequence")
        && (message.starts_with("allowlist:") || message.starts_with("routes:"))
    {
        message.push_str(" (expected a list: start each entry with '- ')");
    }
    ConfigError::Invalid {
        path: path.to_owned(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
    }
}

/// `message` without serde_yaml's ` at line L column C` positions (the location is printed
/// once, before the message).
fn without_positions(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(" at line ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + " at line ".len()..];
        let digits = |s: &str| s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let n = digits(after);
        match after[n..].strip_prefix(" column ") {
            Some(col) if n > 0 && digits(col) > 0 => rest = &col[digits(col)..],
            _ => {
                out.push_str(" at line ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    // `Option` so that `allowlist:` with nothing after it gets our own "is empty" message.
    allowlist: Option<Vec<EntryFormat>>,
    routes: Option<Vec<RouteFormat>>,
    metrics_listen: Option<ListenField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFormat {
    listen: ListenField,
    #[serde(default)]
    remote: Option<RemoteField>,
    #[serde(default)]
    mode: Option<ModeField>,
    #[serde(default)]
    port: Option<PortField>,
    #[serde(default)]
    sni: Option<SniField>,
    #[serde(default)]
    ech: Option<EchField>,
    #[serde(default, deserialize_with = "max_connections")]
    max_connections: Option<u32>,
    #[serde(default)]
    idle_timeout: Option<DurationField>,
    #[serde(default)]
    to: Option<ListenField>,
    #[serde(default)]
    allow_from: Option<Vec<String>>,
    #[serde(default)]
    proxy_protocol: Option<String>,
    #[serde(default)]
    accept_proxy_protocol: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeField {
    Connect,
    Sni,
    Dns,
    Ingress,
}

impl ModeField {
    fn name(&self) -> &'static str {
        match self {
            ModeField::Connect => "connect",
            ModeField::Sni => "sni",
            ModeField::Dns => "dns",
            ModeField::Ingress => "ingress",
        }
    }
}

/// `sni: require`, the only value.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum SniField {
    Require,
}

/// `ech: allow`, the only value (refusing is the default).
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum EchField {
    Allow,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFormat {
    address: AddressField,
    port: PortField,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::host::HostName;
    use crate::policy::host::HostPattern;
    use serde::de::{
        self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };
    use std::fmt;

    fn parse_str(text: &str) -> Result<Allowlist, ConfigError> {
        parse_config(text).map(|c| c.allowlist)
    }

    fn parse_config(text: &str) -> Result<Config, ConfigError> {
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
    fn positions_are_dropped_from_serde_yamls_text() {
        assert_eq!(
            without_positions("found x at line 2 column 1, while scanning y at line 1 column 14"),
            "found x, while scanning y"
        );
        assert_eq!(
            without_positions("at line 3 is not a position"),
            "at line 3 is not a position"
        );
        assert_eq!(without_positions("no position"), "no position");
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

    const ALLOW: &str = "allowlist:\n- {address: kms.example.com, port: 443}\n";

    #[test]
    fn routes_parse_with_their_lines() {
        let c = parse_config(&format!(
            "{ALLOW}routes:\n\
             - listen: 8000\n  remote: kms.example.com:443\n\
             - listen: vsock:16:8003\n  remote: '[2001:db8::1]:443'\n  max_connections: 256\n  idle_timeout: 10m\n\
             - {{listen: 'tcp:127.0.0.1:9000', remote: 'kms.{{region}}.{{domain}}:443'}}\n\
             - {{listen: unix:/run/p.sock, remote: 192.0.2.1:8443}}\n"
        ))
        .unwrap();
        assert_eq!(c.allowlist_lines, vec![Some(2)]);
        let listens: Vec<String> = c.routes.iter().map(|r| r.listen.to_string()).collect();
        assert_eq!(
            listens,
            [
                "vsock:8000",
                "vsock:16:8003",
                "tcp:127.0.0.1:9000",
                "unix:/run/p.sock"
            ]
        );
        let lines: Vec<Option<usize>> = c.routes.iter().map(|r| r.line).collect();
        assert_eq!(lines, [Some(4), Some(6), Some(10), Some(11)]);
        let remote = |i: usize| match &c.routes[i].kind {
            RouteKind::Fixed { remote, .. } => remote.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(remote(1).to_string(), "[2001:db8::1]:443");
        assert_eq!(c.routes[1].max_connections, Some(256));
        assert_eq!(c.routes[1].idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(c.routes[0].max_connections, None);
        assert_eq!(c.routes[0].idle_timeout, None);
        assert_eq!(remote(2).metadata_needed(), Some(true));
    }

    #[test]
    fn a_file_without_routes_is_aws_format() {
        let c = parse_config(ALLOW).unwrap();
        assert!(c.routes.is_empty());
        let c = parse_config(&format!("{ALLOW}routes: []\n")).unwrap();
        assert!(c.routes.is_empty());
    }

    #[test]
    fn bad_routes_name_line_column_and_key() {
        for (routes, needle, line) in [
            ("- {listen: 8000, remote: kms.example.com:443, foo: x}\n", "unknown field `foo`", 4),
            ("- listen: nowhere\n  remote: kms.example.com:443\n", "routes[0].listen", 4),
            ("- listen: 8000\n  remote: kms.example.com\n", "routes[0].remote", 5),
            ("- listen: 8000\n  remote: kms.example.com:0\n", "not a TCP port", 5),
            ("- listen: 8000\n", "a route needs `remote: HOST:PORT`", 4),
            ("- {listen: 8000, mode: connect, remote: 'a.example:443'}\n", "routes[0].remote: a `mode: connect` route", 4),
            ("- {listen: 8000, mode: sni}\n", "needs `port:`", 4),
            ("- {listen: 8000, mode: sni, port: 443, sni: require}\n", "routes[0].sni", 4),
            ("- {listen: 8000, mode: connect, port: 443}\n", "routes[0].port", 4),
            ("- {listen: 8000, remote: 'a.example:443', port: 443}\n", "`port` belongs to `mode: sni`", 4),
            ("- {listen: 8000, mode: socks}\n", "unknown variant `socks`", 4),
            ("- {listen: 8000, remote: 'a.example:443', sni: maybe}\n", "unknown variant `maybe`", 4),
            ("- listen: 8000\n  remote: a.example:443\n  idle_timeout: soon\n", "routes[0].idle_timeout", 6),
            ("- listen: 8000\n  remote: a.example:443\n  idle_timeout: 0s\n", "longer than zero", 6),
            ("- listen: 8000\n  remote: a.example:443\n  max_connections: 0\n", "routes[0].max_connections", 6),
            (
                "- {listen: 8000, remote: a.example:443}\n- {listen: 'vsock:8000', remote: b.example:443}\n",
                "routes[1].listen: vsock:8000 is already the listen address of routes[0] (line 4)",
                5,
            ),
        ] {
            let e = parse_config(&format!("{ALLOW}routes:\n{routes}")).expect_err(routes);
            let msg = e.to_string();
            assert!(msg.contains("/etc/test/proxy.yaml"), "{msg}");
            assert!(msg.contains(needle), "{routes}: {msg}");
            assert_eq!(e.line(), Some(line), "{routes}: {msg}");
            assert!(msg.contains("column"), "{msg}");
        }
    }

    #[test]
    fn locate_finds_items_and_keys_in_block_and_flow_style() {
        let text = "allowlist:\n  - {address: a.example, port: 443}\n  - address: b.example\n    port: 443\nroutes: [{listen: 1, remote: 'a.example:443'}]\n";
        let found = Locations::find(text);
        assert_eq!(found.get("allowlist", 0, None), Some((2, 5)));
        assert_eq!(found.get("allowlist", 1, Some("port")), Some((4, 11)));
        assert_eq!(found.get("routes", 0, Some("remote")), Some((5, 30)));
        assert_eq!(found.get("routes", 1, None), None);
        assert_eq!(found.get("nothing", 0, None), None);
    }

    /// The one-pass walk finds every item and key exactly where serde_yaml itself reports it.
    #[test]
    fn one_pass_locations_agree_with_serde_yaml_everywhere() {
        let texts = [
            "allowlist:\n  - {address: a.example, port: 443}\n  - address: b.example\n    port: 443\nroutes: [{listen: 1, remote: 'a.example:443'}]\n",
            "# AWS's file\nallowlist:\n- {address: kms.us-east-1.amazonaws.com, port: 443}\n-   { address: \"10.0.0.0/8\" , port: 80 }\n\n-\n  address: '*.example.com'\n  port: 443\n",
            "routes:\n  - listen: 8000\n    remote: kms.example.com:443\n    sni: require\n    max_connections: 5\n  - {listen: 'tcp:127.0.0.1:9000', mode: connect, idle_timeout: 5m}\n  - listen: 8011\n    mode: sni\n    port: 443\nallowlist:\n  - address: x.example\n    port: 1\nmetrics_listen: tcp:127.0.0.1:9100\n",
            "allowlist: [{address: a, port: 1}, {address: b, port: 2},\n  {address: c,\n   port: 3}]\n",
            "allowlist:\n  - address: >-\n      folded.example\n    port: 443\n  - address: \"quoted\\u0041.example\"\n    port: 443\n  - {port: 9, address: [nested, list]}\n",
            "---\nallowlist:\n  - &first {address: a.example, port: 1}\n  - ünïcödé: x\n    port: 2\n",
            "allowlist:\r\n  - address: crlf.example\r\n    port: 443\r\n  - address:\r\n      next-line.example\r\n    port: |\r\n      443\r\n",
            "allowlist:\n  # a comment\n  - address: !!str tagged.example   # trailing\n    port: >  # why\n      443\n  - address: multi\n      line.example\n    port:\n\n      443\n",
            "allowlist:\n- address: a\n  port: 1\n- ? address\n  : b\n  port: 2\n",
        ];
        for text in texts {
            let found = Locations::find(text);
            for section in ["allowlist", "routes"] {
                for index in 0..5 {
                    for key in [
                        None,
                        Some("address"),
                        Some("port"),
                        Some("listen"),
                        Some("remote"),
                        Some("mode"),
                        Some("sni"),
                    ] {
                        assert_eq!(
                            found.get(section, index, key),
                            locate(text, section, index, key),
                            "{section}[{index}] {key:?} in {text:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_entry_of_a_large_allowlist_gets_its_line() {
        let mut text = String::from("allowlist:\n");
        for i in 0..3000 {
            text.push_str(&format!(
                "  - {{address: 10.{}.{}.0/24, port: 443}}\n",
                i / 256,
                i % 256
            ));
        }
        let config = parse_config(&text).unwrap();
        assert_eq!(config.allowlist_lines.len(), 3000);
        assert_eq!(config.allowlist_lines[2999], Some(3001));
    }

    #[test]
    fn route_kinds() {
        let c = parse_config(&format!(
            "{ALLOW}routes:\n- {{listen: 8010, mode: connect}}\n- {{listen: 8011, mode: sni, port: 443}}\n\
             - {{listen: 8000, remote: 'kms.example.com:443', sni: require}}\n\
             - {{listen: 8012, mode: connect, sni: require}}\n"
        ))
        .unwrap();
        let kinds: Vec<&RouteKind> = c.routes.iter().map(|r| &r.kind).collect();
        assert_eq!(kinds[0], &RouteKind::Connect { require_sni: None });
        assert_eq!(
            kinds[1],
            &RouteKind::Sni {
                port: 443,
                ech: Ech::Refuse
            }
        );
        assert!(matches!(
            kinds[2],
            RouteKind::Fixed {
                require_sni: Some(Ech::Refuse),
                ..
            }
        ));
        assert_eq!(
            kinds[3],
            &RouteKind::Connect {
                require_sni: Some(Ech::Refuse)
            }
        );
    }

    #[test]
    fn ech_allow_is_accepted_on_every_route_that_checks_a_server_name() {
        let c = parse_config(&format!(
            "{ALLOW}routes:\n\
             - {{listen: 8011, mode: sni, port: 443, ech: allow}}\n\
             - {{listen: 8000, remote: 'kms.example.com:443', sni: require, ech: allow}}\n\
             - listen: 8012\n  mode: connect\n  ech: allow\n  sni: require\n"
        ))
        .unwrap();
        let kinds: Vec<&RouteKind> = c.routes.iter().map(|r| &r.kind).collect();
        assert_eq!(
            kinds[0],
            &RouteKind::Sni {
                port: 443,
                ech: Ech::Allow
            }
        );
        assert!(matches!(
            kinds[1],
            RouteKind::Fixed {
                require_sni: Some(Ech::Allow),
                ..
            }
        ));
        assert_eq!(
            kinds[2],
            &RouteKind::Connect {
                require_sni: Some(Ech::Allow)
            }
        );
    }

    #[test]
    fn ech_on_a_route_that_checks_no_server_name_names_the_key_and_line() {
        for (routes, line) in [
            (
                "- {listen: 8000, remote: 'kms.example.com:443', ech: allow}\n",
                4,
            ),
            ("- listen: 8010\n  mode: connect\n  ech: allow\n", 6),
        ] {
            let e = parse_config(&format!("{ALLOW}routes:\n{routes}")).expect_err(routes);
            let msg = e.to_string();
            assert!(msg.contains("routes[0].ech"), "{msg}");
            assert!(
                msg.contains("`ech` applies only to a route that checks"),
                "{msg}"
            );
            assert!(msg.contains("sni: require"), "{msg}");
            assert_eq!(e.line(), Some(line), "{routes}: {msg}");
        }
        // Only `allow` is a value: refusing is the default, and nothing else is meant.
        let e = parse_config(&format!(
            "{ALLOW}routes:\n- {{listen: 8011, mode: sni, port: 443, ech: refuse}}\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant `refuse`"), "{e}");
        // `sni: require` is implied on an SNI route, so still refused there.
        let e = parse_config(&format!(
            "{ALLOW}routes:\n- {{listen: 8011, mode: sni, port: 443, sni: require, ech: allow}}\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("routes[0].sni"), "{e}");
        assert!(e.to_string().contains("always checks"), "{e}");
    }

    #[test]
    fn ingress_routes_parse_and_need_no_allowlist() {
        let c = parse_config(
            "routes:\n\
             - listen: \"tcp:0.0.0.0:443\"\n  mode: ingress\n  to: \"vsock:16:443\"\n  \
             allow_from: [\"10.0.0.0/8\", \"2001:db8::/32\"]\n  proxy_protocol: v2\n  \
             accept_proxy_protocol: [\"10.0.5.0/24\"]\n\
             - {listen: 'unix:/run/in.sock', mode: ingress, to: 'tcp:127.0.0.1:8443', allow_from: []}\n",
        )
        .unwrap();
        assert!(c.allowlist.entries.is_empty());
        let RouteKind::Ingress(i) = &c.routes[0].kind else {
            panic!("{:?}", c.routes[0].kind)
        };
        assert_eq!(i.to.to_string(), "vsock:16:443");
        assert_eq!(i.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(
            source::list(&i.sources.allow_from),
            "10.0.0.0/8, 2001:db8::/32"
        );
        assert_eq!(source::list(&i.sources.trusted), "10.0.5.0/24");
        let RouteKind::Ingress(i) = &c.routes[1].kind else {
            panic!("{:?}", c.routes[1].kind)
        };
        assert!(i.sources.allow_from.is_empty());
        assert_eq!(i.proxy_protocol, ProxyProtocol::None);
        // Beside an outbound route, the allowlist is required again.
        let e = parse_config(
            "routes:\n- {listen: 'tcp:0.0.0.0:443', mode: ingress, to: 'vsock:16:443', allow_from: []}\n\
             - {listen: 8000, mode: connect}\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("`allowlist` is empty"), "{e}");
    }

    #[test]
    fn bad_ingress_routes_name_line_and_key() {
        for (routes, needle, line) in [
            (
                "- listen: 'tcp:0.0.0.0:443'\n  mode: ingress\n  to: 'vsock:16:443'\n",
                "needs `allow_from:`",
                4,
            ),
            (
                "- {listen: 'tcp:0.0.0.0:443', mode: ingress, allow_from: []}\n",
                "needs `to: \"vsock:CID:PORT\"`",
                4,
            ),
            (
                "- {listen: 'tcp:0.0.0.0:443', mode: ingress, to: 'vsock:443', allow_from: []}\n",
                "routes[0].to: `to` needs the enclave's CID",
                4,
            ),
            (
                "- {listen: 8000, mode: ingress, to: 'vsock:16:443', allow_from: []}\n",
                "routes[0].listen: a `mode: ingress` route listens on the network side",
                4,
            ),
            (
                "- listen: 'tcp:0.0.0.0:443'\n  mode: ingress\n  to: 'vsock:16:443'\n  allow_from: ['10.0.0.1/8']\n",
                "routes[0].allow_from: [0]: CIDR block \"10.0.0.1/8\" has host bits set",
                7,
            ),
            (
                "- {listen: 'tcp:0.0.0.0:443', mode: ingress, to: 'vsock:16:443', allow_from: [], proxy_protocol: v3}\n",
                "routes[0].proxy_protocol: \"v3\" is not a PROXY protocol version",
                4,
            ),
            (
                "- {listen: 'tcp:0.0.0.0:443', mode: ingress, to: 'vsock:16:443', allow_from: [], accept_proxy_protocol: [lb.example]}\n",
                "routes[0].accept_proxy_protocol: [0]: \"lb.example\" is not an IP address",
                4,
            ),
            (
                "- {listen: 'tcp:0.0.0.0:443', mode: ingress, to: 'vsock:16:443', allow_from: [], remote: 'a.example:443'}\n",
                "routes[0].remote: a `mode: ingress` route connects only to its `to:`",
                4,
            ),
            (
                "- {listen: 8000, remote: 'kms.example.com:443', allow_from: []}\n",
                "routes[0].allow_from: `allow_from` belongs to `mode: ingress` routes",
                4,
            ),
        ] {
            let e = parse_config(&format!("{ALLOW}routes:\n{routes}")).expect_err(routes);
            let msg = e.to_string();
            assert!(msg.contains("/etc/test/proxy.yaml"), "{msg}");
            assert!(msg.contains(needle), "{routes}: {msg}");
            assert_eq!(e.line(), Some(line), "{routes}: {msg}");
        }
    }

    // The seeds below are the way lines were found before [`Locations`]: serde_yaml itself,
    // made to fail at the item. They stay as the oracle that the one-pass walk must agree with.
    /// The error text [`locate`] makes serde_yaml stop at.
    const LOCATE_MARK: &str = "\u{1}nvp-locate";

    /// Where `section[index]` (or its `key`) is in `text`, as (line, column): `None` if it is not
    /// there. `text` must be the text that parsed.
    fn locate(
        text: &str,
        section: &str,
        index: usize,
        key: Option<&str>,
    ) -> Option<(usize, usize)> {
        let target = Locate {
            section,
            index,
            key,
        };
        match target.deserialize(serde_yaml::Deserializer::from_str(text)) {
            Err(e) if e.to_string().contains(LOCATE_MARK) => {
                e.location().map(|l| (l.line(), l.column()))
            }
            _ => None,
        }
    }

    #[derive(Clone, Copy)]
    struct Locate<'a> {
        section: &'a str,
        index: usize,
        key: Option<&'a str>,
    }

    impl<'de> DeserializeSeed<'de> for Locate<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(LocateTop(self))
        }
    }

    struct LocateTop<'a>(Locate<'a>);

    impl<'de> Visitor<'de> for LocateTop<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                if key == self.0.section {
                    map.next_value_seed(LocateSeq(self.0))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }

    struct LocateSeq<'a>(Locate<'a>);

    impl<'de> DeserializeSeed<'de> for LocateSeq<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for LocateSeq<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            loop {
                let more = if i == self.0.index {
                    match self.0.key {
                        None => seq.next_element_seed(StopHere)?,
                        Some(key) => seq.next_element_seed(LocateKey(key))?,
                    }
                } else {
                    seq.next_element::<IgnoredAny>()?.map(|_| ())
                };
                if more.is_none() {
                    return Ok(());
                }
                i += 1;
            }
        }
    }

    struct LocateKey<'a>(&'a str);

    impl<'de> DeserializeSeed<'de> for LocateKey<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for LocateKey<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                if key == self.0 {
                    map.next_value_seed(StopHere)?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }

    /// Fails at whatever value it is given, so that serde_yaml reports that value's location.
    struct StopHere;

    impl<'de> DeserializeSeed<'de> for StopHere {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for StopHere {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("anything")
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
            Err(E::custom(LOCATE_MARK))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
            Err(E::custom(LOCATE_MARK))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
            Err(E::custom(LOCATE_MARK))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
            Err(E::custom(LOCATE_MARK))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
            Err(E::custom(LOCATE_MARK))
        }
        fn visit_unit<E: de::Error>(self) -> Result<(), E> {
            Err(E::custom(LOCATE_MARK))
        }
        fn visit_none<E: de::Error>(self) -> Result<(), E> {
            Err(E::custom(LOCATE_MARK))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            Err(de::Error::custom(LOCATE_MARK))
        }
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            Err(de::Error::custom(LOCATE_MARK))
        }
    }
}
