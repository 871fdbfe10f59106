//! The remote endpoint of a fixed route: `HOST:PORT`, where HOST may be a `{region}` template.
//!
//! This module owns the one type for "where a route forwards to", [`Remote`], from both places
//! it is written: the positional `REMOTE_ADDR REMOTE_PORT` and a route's `remote: HOST:PORT`
//! (`[2001:db8::1]:443` for an IPv6 literal). A remote whose host has `{region}`/`{domain}`
//! placeholders is filled once from the instance metadata service ([`crate::config::imds`]) into a
//! [`Target`], the concrete host and port the policy decides about and upstream connects to.

use std::fmt;
use std::net::IpAddr;

use crate::config::imds::InstanceInfo;
use crate::policy::host::Host;

const PLACEHOLDERS: [&str; 2] = ["region", "domain"];

/// Where a fixed route forwards to, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    host: RemoteHost,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RemoteHost {
    Fixed(Host),
    /// `kms.{region}.{domain}`: checked to make a host name for sample values.
    Template(String),
}

/// A remote with its placeholders filled: the host and port connections go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_host_port(f, &self.host.to_string(), self.port)
    }
}

fn write_host_port(f: &mut fmt::Formatter<'_>, host: &str, port: u16) -> fmt::Result {
    if host.contains(':') {
        write!(f, "[{host}]:{port}")
    } else {
        write!(f, "{host}:{port}")
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            RemoteHost::Fixed(host) => write_host_port(f, &host.to_string(), self.port),
            RemoteHost::Template(text) => write!(f, "{text}:{}", self.port),
        }
    }
}

impl Remote {
    /// REMOTE_ADDR (a host name, an IP literal or a template) and a port. `what` names the
    /// setting in error messages ("REMOTE_ADDR", "remote").
    pub fn from_host(host: &str, port: u16, what: &str) -> Result<Remote, String> {
        if port == 0 {
            return Err(format!("{what}: port 0 is not a TCP port (1-65535)"));
        }
        let host = if looks_like_template(host) {
            check_template(host, what)?;
            RemoteHost::Template(host.to_owned())
        } else {
            RemoteHost::Fixed(Host::parse(host).map_err(|e| format!("{what} {host:?}: {e}"))?)
        };
        Ok(Remote { host, port })
    }

    /// `HOST:PORT`, `[IPv6]:PORT` or `template:PORT`, as in a route's `remote:`.
    pub fn parse_host_port(s: &str) -> Result<Remote, String> {
        let s = s.trim();
        let usage = "write HOST:PORT, like kms.us-east-1.amazonaws.com:443, 192.0.2.10:443 or \
                     [2001:db8::1]:443";
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("remote {s:?}: a `[` without its `]`; {usage}"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| format!("remote {s:?} has no port; {usage}"))?;
            if ip.parse::<IpAddr>().is_err() {
                return Err(format!(
                    "remote {s:?}: {ip:?} in brackets is not an IPv6 address; {usage}"
                ));
            }
            (ip, port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| format!("remote {s:?} has no port; {usage}"))?;
            if host.contains(':') {
                return Err(format!(
                    "remote {s:?}: an IPv6 address needs brackets; {usage}"
                ));
            }
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(format!(
                    "remote {s:?}: {port:?} is not a TCP port (1-65535)"
                ))
            }
        };
        Remote::from_host(host, port, "remote")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether filling this remote needs the instance metadata service, and whether it needs
    /// `{domain}` (one more request): `None` for a fixed host.
    pub fn metadata_needed(&self) -> Option<bool> {
        match &self.host {
            RemoteHost::Fixed(_) => None,
            RemoteHost::Template(text) => Some(text.contains("{domain}")),
        }
    }

    /// The concrete target; `info` is needed (only) for a template.
    pub fn target(&self, info: Option<&InstanceInfo>) -> Result<Target, String> {
        match (&self.host, info) {
            (RemoteHost::Fixed(host), _) => Ok(Target {
                host: host.clone(),
                port: self.port,
            }),
            (RemoteHost::Template(text), Some(info)) => {
                let filled = fill(text, &info.region, &info.domain).map_err(|e| {
                    format!(
                        "{text} with region {:?} and domain {:?} from the instance metadata \
                         service is not a host name: {e}",
                        info.region, info.domain
                    )
                })?;
                Ok(Target {
                    host: filled,
                    port: self.port,
                })
            }
            (RemoteHost::Template(text), None) => Err(format!(
                "{text} needs the instance's region from the instance metadata service"
            )),
        }
    }
}

/// Whether `s` is meant as a template (it has a `{` or `}`).
fn looks_like_template(s: &str) -> bool {
    s.contains('{') || s.contains('}')
}

/// Checks the placeholders and that the result is a host name for sample values.
fn check_template(s: &str, what: &str) -> Result<(), String> {
    let bad = |problem: &str| {
        format!(
            "{what} {s:?}: {problem}; the placeholders are {{region}} (the instance's region, \
             e.g. us-east-1) and {{domain}} (amazonaws.com, or amazonaws.com.cn in China), read \
             from the instance metadata service, as in kms.{{region}}.{{domain}}"
        )
    };
    let mut found = 0;
    let mut rest = s;
    while let Some(open) = rest.find(['{', '}']) {
        if rest[open..].starts_with('}') {
            return Err(bad("a `}` without its `{`"));
        }
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(bad("a `{` without its `}`"));
        };
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(bad(&format!("unknown placeholder {{{name}}}")));
        }
        found += 1;
        rest = &after[close + 1..];
    }
    if found == 0 {
        return Err(bad("no placeholder"));
    }
    match fill(s, "us-east-1", "amazonaws.com") {
        Ok(Host::Name(_)) => Ok(()),
        Ok(Host::Ip(_)) => Err(format!(
            "{what} {s:?} with placeholders must be a host name"
        )),
        Err(e) => Err(format!("{what} {s:?} does not make a host name: {e}")),
    }
}

fn fill(template: &str, region: &str, domain: &str) -> Result<Host, String> {
    Host::parse(
        &template
            .replace("{region}", region)
            .replace("{domain}", domain),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(region: &str, domain: &str) -> InstanceInfo {
        InstanceInfo {
            region: region.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn host_port_forms() {
        for (text, shown) in [
            (
                "kms.us-east-1.amazonaws.com:443",
                "kms.us-east-1.amazonaws.com:443",
            ),
            ("API.Example.com.:8443", "api.example.com:8443"),
            ("192.0.2.10:443", "192.0.2.10:443"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("kms.{region}.{domain}:443", "kms.{region}.{domain}:443"),
        ] {
            let r = Remote::parse_host_port(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.to_string(), shown);
        }
        let v6 = Remote::parse_host_port("[2001:db8::1]:443").unwrap();
        assert_eq!(
            v6.target(None).unwrap(),
            Target {
                host: Host::Ip("2001:db8::1".parse().unwrap()),
                port: 443
            }
        );
        for (bad, needle) in [
            ("kms.example.com", "no port"),
            ("kms.example.com:0", "not a TCP port"),
            ("kms.example.com:https", "not a TCP port"),
            ("2001:db8::1:443", "needs brackets"),
            ("[2001:db8::1:443", "without its `]`"),
            ("[kms.example.com]:443", "not an IPv6 address"),
            ("10.0.0.0/8:443", "CIDR"),
            ("bad host!:443", "remote"),
            ("kms.{zone}.x:443", "unknown placeholder {zone}"),
        ] {
            let e = Remote::parse_host_port(bad).expect_err(bad);
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn templates_are_filled_from_instance_info() {
        let r = Remote::from_host("kms.{region}.{domain}", 443, "REMOTE_ADDR").unwrap();
        assert_eq!(r.metadata_needed(), Some(true));
        assert!(r.target(None).is_err());
        assert_eq!(
            r.target(Some(&info("cn-north-1", "amazonaws.com.cn")))
                .unwrap()
                .to_string(),
            "kms.cn-north-1.amazonaws.com.cn:443"
        );
        let r = Remote::from_host("kms-fips.{region}.amazonaws.com", 443, "REMOTE_ADDR").unwrap();
        assert_eq!(r.metadata_needed(), Some(false));
        let fixed = Remote::from_host("kms.us-east-1.amazonaws.com", 443, "REMOTE_ADDR").unwrap();
        assert_eq!(fixed.metadata_needed(), None);
        for bad in [
            "kms.{regoin}.amazonaws.com",
            "kms.{region.amazonaws.com",
            "kms.region}.amazonaws.com",
            "kms.{}.amazonaws.com",
            "{region}..com",
            "kms.{region}.amazonaws.com/x",
        ] {
            let e = Remote::from_host(bad, 443, "REMOTE_ADDR").expect_err(bad);
            assert!(e.contains("REMOTE_ADDR"), "{e}");
        }
    }
}
