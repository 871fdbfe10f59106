//! The command line, compatible with AWS's `vsock-proxy`.
//!
//! This module owns argument syntax and the checks that need nothing but the arguments. It turns
//! `nitro-vsock-proxy [OPTIONS] [<LISTEN> <REMOTE_ADDR> <REMOTE_PORT>]` into [`Options`]; every
//! mistake is a usage error (exit status 2) that says what to write instead. The positional
//! route is optional: without it, the routes come from the configuration file's `routes:`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

use crate::config::fields::{self, DurationError};
use crate::config::remote::Remote;
use crate::net::endpoint::Endpoint;
pub use crate::ops::logging::LogFormat;

/// The default allowlist path, the same as AWS's.
pub const DEFAULT_CONFIG: &str = "/etc/nitro_enclaves/vsock-proxy.yaml";

/// Which decisions the audit trail (`target: "audit"` events) records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum AuditLevel {
    /// Every refused connection (rate-limited per route, peer and reason).
    #[default]
    Refused,
    /// Refused and allowed connections (allowed ones at INFO, not rate-limited).
    Allowed,
}

/// Forwards each connection on a vsock port to one TCP endpoint, if and only if the allowlist
/// allows the address it is about to connect to; checked on every connection. One daemon serves
/// the positional route and every route in the configuration file's `routes:`.
#[derive(Clone, Debug, Parser)]
#[command(name = "nitro-vsock-proxy", version, about, long_about = None)]
pub struct Options {
    /// Where enclaves connect: a vsock port (8001 = any CID), vsock:CID:PORT, or the stand-ins
    /// unix:PATH and tcp:IP:PORT. Leave out LISTEN REMOTE_ADDR REMOTE_PORT to serve only the
    /// configuration file's routes.
    #[arg(value_name = "LISTEN", value_parser = parse_listen, requires = "remote_addr")]
    pub listen: Option<Endpoint>,

    /// The remote endpoint's host name or IP address (not the enclave's CID). {region} and
    /// {domain} are filled from the EC2 instance metadata service, as in kms.{region}.{domain}.
    #[arg(value_name = "REMOTE_ADDR", value_parser = parse_remote, requires = "remote_port")]
    pub remote_addr: Option<String>,

    /// The remote endpoint's TCP port.
    #[arg(value_name = "REMOTE_PORT", value_parser = parse_port)]
    pub remote_port: Option<u16>,

    /// The YAML configuration: the allowlist and, optionally, `routes:`.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,

    /// Load the configuration (and the positional route), print the routes and the allowlist
    /// entries each relies on, check every route against the allowlist, and exit: 0 if all is
    /// well, 2 if not. With no route at all, checks the file alone (as `nginx -t`). Binds no
    /// socket; asks DNS only for routes that only DNS can vouch for.
    #[arg(long)]
    pub check_config: bool,

    /// Runtime worker threads (default: one per CPU).
    #[arg(short = 'w', long = "num_workers", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub num_workers: Option<u16>,

    /// Resolve and connect over IPv4 only.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6", action = ArgAction::SetTrue)]
    pub ipv4: bool,

    /// Resolve and connect over IPv6 only.
    #[arg(short = '6', long = "ipv6", action = ArgAction::SetTrue)]
    pub ipv6: bool,

    /// A DNS server to ask, as IP or IP:PORT; repeatable. Default: /etc/resolv.conf and /etc/hosts.
    #[arg(long = "nameserver", value_name = "IP[:PORT]", value_parser = parse_nameserver)]
    pub nameservers: Vec<SocketAddr>,

    /// Time to wait for one answer from one name server: a DNS query not answered within
    /// DURATION fails and is not asked again (default: the resolver's 5s, two attempts). One
    /// lookup may ask several name servers and both families (A and AAAA), so this does not
    /// bound a whole lookup; the whole set-up of a connection before it relays is bounded by
    /// --setup-timeout (default 15s).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub dns_timeout: Option<Duration>,

    /// Connections served at once; more are closed as soon as they arrive.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Time allowed for one TCP connect to the remote endpoint, per address.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,

    /// TCP keepalive on upstream connections (and tcp: stand-in clients), so a peer that
    /// vanished silently frees its connection: the first probe after DURATION without traffic,
    /// then one every DURATION/3 (whole seconds, at least 1s); 3 unanswered probes, or data
    /// unacknowledged as long (TCP_USER_TIMEOUT), close the connection. A dead peer is noticed
    /// after DURATION + 3 x DURATION/3: 60s by default, 4s with 1s. Healthy idle connections
    /// stay open. Whole seconds, 1s to 32767s.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_keepalive)]
    pub tcp_keepalive: Duration,

    /// Close a connection after this long without a byte in either direction (default: never).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub idle_timeout: Option<Duration>,

    /// On SIGTERM/SIGINT, how long open connections may keep running before they are closed.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Log format (default: journal when standard error is systemd's journal, text otherwise):
    /// text and json lines on standard error; journal sends native journal entries with fields
    /// (NVP_REASON, NVP_ROUTE, NVP_PEER, ...) to journald, and writes text lines with syslog
    /// priority prefixes to standard error only when journald is absent. The level comes from
    /// RUST_LOG (default: info).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Serve Prometheus metrics at GET /metrics on tcp:IP:PORT or unix:PATH (never vsock), e.g.
    /// tcp:127.0.0.1:9190. Overrides the configuration file's `metrics_listen:`. Default: off.
    #[arg(long, value_name = "ADDRESS", value_parser = parse_metrics_listen)]
    pub metrics_listen: Option<Endpoint>,

    /// Which decisions are recorded as audit events: `refused` (default) or `allowed` (refused
    /// and allowed).
    #[arg(long, value_enum, value_name = "WHAT", default_value = "refused")]
    pub audit: AuditLevel,

    /// Close any connection this long after it was accepted, however busy (default: never).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub max_lifetime: Option<Duration>,

    /// The whole time a connection may take before relaying starts: reading a CONNECT head or
    /// ClientHello, DNS, the policy and the TCP connects.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_positive_duration)]
    pub setup_timeout: Duration,

    /// Connections one peer may have open at once (default: no limit but --max-connections).
    /// A peer is an enclave's CID on vsock, the source IP address on tcp: stand-ins.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_peer: Option<u32>,

    /// How bytes are moved: `auto` (splice(2) where the kernel allows it, copying elsewhere) or
    /// `copy` (always through a user-space buffer).
    #[arg(long, value_enum, value_name = "HOW", default_value = "auto")]
    pub relay: crate::net::relay::RelayMode,

    /// On reload, keep open connections the new allowlist would deny (default: close them,
    /// counted as `revoked`).
    #[arg(long)]
    pub no_revoke_on_reload: bool,

    /// With `enclaves:` entries that match by name, pcr0-2 or debug: the command that lists the
    /// running enclaves as JSON (nitro-cli's), split on whitespace and run without a shell,
    /// killed after 5s. Run at start-up, for a connection from a CID it did not list (at most
    /// once a second) and every --enclaves-refresh.
    #[arg(long, value_name = "COMMAND", default_value = DEFAULT_ENCLAVES_COMMAND, value_parser = parse_command)]
    pub enclaves_command: String,

    /// How often --enclaves-command runs to notice enclaves started, replaced or terminated.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_positive_duration)]
    pub enclaves_refresh: Duration,

    /// The EC2 instance metadata service, asked for {region}/{domain} in REMOTE_ADDR.
    #[arg(long, value_name = "IP:PORT", default_value = crate::config::imds::DEFAULT_ENDPOINT)]
    pub imds_endpoint: SocketAddr,
}

/// nitro-cli's listing of the running enclaves, with their measurements.
pub const DEFAULT_ENCLAVES_COMMAND: &str = "nitro-cli describe-enclaves --metadata";

fn parse_command(s: &str) -> Result<String, String> {
    if s.split_whitespace().next().is_none() {
        return Err(
            "the command is empty: give a program and its arguments, like \
                    \"nitro-cli describe-enclaves --metadata\""
                .into(),
        );
    }
    Ok(s.to_owned())
}

fn parse_listen(s: &str) -> Result<Endpoint, String> {
    s.parse()
}

impl Options {
    /// The route given as LISTEN REMOTE_ADDR REMOTE_PORT, if any.
    pub fn positional_route(&self) -> Option<(Endpoint, Remote)> {
        match (&self.listen, &self.remote_addr, self.remote_port) {
            (Some(listen), Some(addr), Some(port)) => Remote::from_host(addr, port, "REMOTE_ADDR")
                .ok()
                .map(|remote| (listen.clone(), remote)),
            _ => None,
        }
    }
}

fn parse_metrics_listen(s: &str) -> Result<Endpoint, String> {
    let endpoint: Endpoint = s.parse()?;
    crate::ops::metrics_server::check_endpoint(&endpoint, "--metrics-listen")?;
    Ok(endpoint)
}

fn parse_remote(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{s:?} looks like a number: REMOTE_ADDR is the remote endpoint's host name or IP \
             address (e.g. kms.us-east-1.amazonaws.com), not the enclave's CID"
        ));
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        let host = rest.split(['/', ':']).next().unwrap_or(rest);
        return Err(format!(
            "{s:?} is a URL: give a host name, not a URL (REMOTE_ADDR {host:?}, without \
             {scheme}://; the port is REMOTE_PORT)"
        ));
    }
    // Any port will do to check the host; the real one is REMOTE_PORT.
    Remote::from_host(s, 443, "REMOTE_ADDR").map(|_| s.to_owned())
}

fn parse_port(s: &str) -> Result<u16, String> {
    fields::port_text(s).ok_or_else(|| format!("{s:?} is not a TCP port (1-65535)"))
}

fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not IP or IP:PORT (like 10.0.0.2 or 127.0.0.1:5353)"))
}

/// The kernel's limit for TCP_KEEPIDLE and TCP_KEEPINTVL, in seconds.
const MAX_KEEPALIVE_SECS: u64 = 32767;

fn parse_keepalive(s: &str) -> Result<Duration, String> {
    let d = parse_positive_duration(s)?;
    if d.subsec_nanos() != 0 || d.as_secs() > MAX_KEEPALIVE_SECS {
        return Err(format!(
            "{s:?}: the kernel counts keepalive time in whole seconds, 1s to {MAX_KEEPALIVE_SECS}s (write e.g. 30s, 2m)"
        ));
    }
    Ok(d)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    fields::positive_duration(s).map_err(|e| match e {
        DurationError::Zero => format!("{s:?}: must be longer than zero"),
        DurationError::Invalid(e) => format!("{s:?}: {e} (write e.g. 5s, 500ms, 2m)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        Options::try_parse_from(std::iter::once("nitro-vsock-proxy").chain(args.iter().copied()))
    }

    #[test]
    fn aws_command_line_is_accepted() {
        let o = parse(&[
            "8001",
            "ip-ranges.amazonaws.com",
            "443",
            "--config",
            "your-vsock-proxy.yaml",
            "-w",
            "2",
            "-4",
        ])
        .unwrap();
        let (listen, remote) = o.positional_route().unwrap();
        assert_eq!(listen, "8001".parse().unwrap());
        assert_eq!(
            remote,
            Remote::parse_host_port("ip-ranges.amazonaws.com:443").unwrap()
        );
        assert!(!o.check_config);
        assert_eq!(o.config, PathBuf::from("your-vsock-proxy.yaml"));
        assert_eq!(o.num_workers, Some(2));
        assert!(o.ipv4 && !o.ipv6);
        let o = parse(&[
            "8000",
            "kms.us-east-1.amazonaws.com",
            "443",
            "--num_workers",
            "4",
            "--ipv6",
        ])
        .unwrap();
        assert_eq!(o.config, PathBuf::from(DEFAULT_CONFIG));
        assert!(o.ipv6);
        assert_eq!(o.max_connections, 1024);
        assert_eq!(o.connect_timeout, Duration::from_secs(5));
        assert_eq!(o.tcp_keepalive, crate::proxy::upstream::DEFAULT_KEEPALIVE);
        assert_eq!(o.idle_timeout, None);
        assert_eq!(o.drain_timeout, Duration::from_secs(30));
        assert_eq!(o.log_format, None);
        assert_eq!(o.imds_endpoint, "169.254.169.254:80".parse().unwrap());
    }

    #[test]
    fn remote_templates_and_log_formats() {
        let o = parse(&[
            "8000",
            "kms.{region}.{domain}",
            "443",
            "--log-format",
            "journal",
            "--imds-endpoint",
            "127.0.0.1:8080",
        ])
        .unwrap();
        let (_, remote) = o.positional_route().unwrap();
        assert_eq!(remote.metadata_needed(), Some(true));
        assert_eq!(remote.to_string(), "kms.{region}.{domain}:443");
        assert_eq!(o.log_format, Some(LogFormat::Journal));
        assert_eq!(o.imds_endpoint, "127.0.0.1:8080".parse().unwrap());
        let e = parse(&["8000", "kms.{zone}.amazonaws.com", "443"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("unknown placeholder {zone}"), "{e}");
    }

    #[test]
    fn usage_errors() {
        for args in [
            &["8001", "19", "443"][..],
            &["8001", "host.example", "0"],
            &["8001", "host.example", "70000"],
            &["8001", "host.example", "443", "-w", "0"],
            &["8001", "host.example", "443", "-4", "-6"],
            &["8001", "host.example", "443", "--connect-timeout", "0s"],
            &["8001", "host.example", "443", "--idle-timeout", "soon"],
            &["8001", "host.example", "443", "--nameserver", "dns.example"],
            &["8001", "host.example", "443", "--max-connections", "0"],
            &["8001", "host.example", "443", "--tcp-keepalive", "0s"],
            &["8001", "host.example", "443", "--tcp-keepalive", "1500ms"],
            &["8001", "host.example", "443", "--tcp-keepalive", "10h"],
            &["nowhere", "host.example", "443"],
            &["8001", "10.0.0.0/8", "443"],
        ] {
            let e = parse(args).expect_err(&format!("{args:?} must be rejected"));
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
        let e = parse(&["8001", "19", "443"]).unwrap_err();
        assert!(e.to_string().contains("not the enclave's CID"), "{e}");
    }

    #[test]
    fn tcp_keepalive_takes_whole_seconds() {
        let o = parse(&["8001", "h.example", "443", "--tcp-keepalive", "2m"]).unwrap();
        assert_eq!(o.tcp_keepalive, Duration::from_secs(120));
        let e = parse(&["8001", "h.example", "443", "--tcp-keepalive", "500ms"]).unwrap_err();
        assert!(e.to_string().contains("whole seconds"), "{e}");
    }

    #[test]
    fn the_positional_route_is_all_or_nothing() {
        let o = parse(&["--config", "routes.yaml", "--check-config"]).unwrap();
        assert!(o.positional_route().is_none());
        assert!(o.check_config);
        for args in [&["8001"][..], &["8001", "host.example"]] {
            let e = parse(args).expect_err(&format!("{args:?} must be rejected"));
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert_eq!(
                e.kind(),
                ErrorKind::MissingRequiredArgument,
                "{args:?}: {e}"
            );
        }
    }

    #[test]
    fn version_and_help_exit_zero() {
        assert_eq!(
            parse(&["--version"]).unwrap_err().kind(),
            ErrorKind::DisplayVersion
        );
        assert_eq!(
            parse(&["--help"]).unwrap_err().kind(),
            ErrorKind::DisplayHelp
        );
    }

    #[test]
    fn nameserver_forms() {
        let o = parse(&[
            "8001",
            "h.example",
            "443",
            "--nameserver",
            "127.0.0.1:5353",
            "--nameserver",
            "10.0.0.2",
        ])
        .unwrap();
        assert_eq!(
            o.nameservers,
            vec![
                "127.0.0.1:5353".parse().unwrap(),
                "10.0.0.2:53".parse().unwrap()
            ]
        );
    }
}
