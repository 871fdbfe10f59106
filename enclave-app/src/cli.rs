//! The command line: `forwarder`, `server` and `client` with the workshop's arguments, and
//! `ingress`, the enclave's end of the parent's ingress route.
//!
//! This module owns argument syntax and the checks that need nothing but the arguments (clap
//! exits with status 2 and says what to write instead). It turns arguments into each command's
//! `Options`; defaults live here, in one place.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::Ipv4Net;
use nitro_vsock_proxy::net::endpoint::Endpoint;
use reqwest::Url;

use crate::fetch::FetchSettings;

/// The address of the document the workshop's server downloads.
pub const DEFAULT_URL: &str = "https://ip-ranges.amazonaws.com/ip-ranges.json";

/// The enclave side of the Nitro Enclaves workshop's secure local channel.
#[derive(Debug, Parser)]
#[command(name = "enclave-app", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Forward each TCP connection on LOCAL_IP:LOCAL_PORT to vsock REMOTE_CID:REMOTE_PORT (the
    /// parent's nitro-vsock-proxy), both ways, half-closes included.
    Forwarder(ForwarderArgs),
    /// Answer queries on vsock port PORT with the S3 prefixes of the region asked for.
    Server(Box<ServerArgs>),
    /// Ask the server in enclave CID on PORT for QUERY's S3 prefixes and print the reply.
    Client(ClientArgs),
    /// Transparent egress: a DNS stub answering synthetic addresses for the names the parent
    /// answers, and a listener that egress.nft redirects every outbound TCP connection to, which
    /// asks the parent's connect route for the name. Unmodified apps reach what the parent
    /// allows, by name.
    Egress(Box<EgressArgs>),
    /// Bridge the parent's ingress route (vsock --listen) into a TCP server in the enclave
    /// (--to), keeping or consuming the route's PROXY header.
    Ingress(IngressArgs),
    /// Demo and tests only: an HTTPS stand-in for ip-ranges.amazonaws.com.
    #[command(name = "demo-https", hide = true)]
    DemoHttps(DemoHttpsArgs),
}

#[derive(Debug, Args)]
pub struct ForwarderArgs {
    /// The address to listen on inside the enclave, e.g. 127.0.0.1.
    pub local_ip: IpAddr,
    /// The TCP port to listen on, e.g. 443.
    pub local_port: u16,
    /// The parent's CID: 3.
    pub remote_cid: u32,
    /// The vsock port nitro-vsock-proxy listens on, e.g. 8001.
    pub remote_port: u32,
    /// Connect to this stand-in (unix:PATH or tcp:IP:PORT) instead of vsock REMOTE_CID:REMOTE_PORT.
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_stand_in)]
    pub stand_in: Option<Endpoint>,
    /// Connections forwarded at once; more are closed at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Time allowed to connect to the parent's proxy.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Close a connection after this long without traffic (default: never).
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT: stop accepting, and give open connections this long to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct IngressArgs {
    /// Where the parent's `mode: ingress` route connects: vsock:PORT (any CID), or a stand-in
    /// (unix:PATH, tcp:IP:PORT).
    #[arg(long, value_name = "ENDPOINT")]
    pub listen: Endpoint,
    /// The enclave's own server, e.g. tcp:127.0.0.1:8443.
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_stand_in)]
    pub to: Endpoint,
    /// keep: pass the route's PROXY header on to the server (which must read it); strip: read
    /// it here, log the client it names, and pass on the client's bytes only.
    #[arg(long, value_enum, default_value = "keep")]
    pub proxy_protocol: crate::ingress::HeaderMode,
    /// With --proxy-protocol strip: time a connection has to send its whole header.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Connections bridged at once; more are closed at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Time allowed to connect to the server.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Close a connection after this long without traffic (default: never).
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT: stop accepting, and give open connections this long to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The vsock port to listen on (any CID), e.g. 5005.
    pub port: u32,
    /// Listen on this stand-in (unix:PATH or tcp:IP:PORT) instead of vsock.
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_stand_in)]
    pub stand_in: Option<Endpoint>,
    /// The document to download (https only).
    #[arg(long, default_value = DEFAULT_URL, value_parser = parse_https_url)]
    pub url: Url,
    /// Trust only the CA certificates (PEM) in this file, instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Connect to IP:PORT (e.g. the forwarder) instead of resolving the URL's host, like curl's
    /// --resolve; the certificate is still checked for the URL's host. A port written in the URL
    /// takes precedence over this one.
    #[arg(long, value_name = "IP:PORT")]
    pub connect_to: Option<SocketAddr>,
    /// Download through this HTTP CONNECT proxy, e.g. http://127.0.0.1:3128 (a forwarder to the
    /// parent's `mode: connect` route); the URL's host is resolved by the parent.
    #[arg(long, value_name = "URL", value_parser = parse_proxy_url, conflicts_with = "connect_to")]
    pub proxy: Option<Url>,
    /// Answer IPv6 prefixes too (after the IPv4 ones).
    #[arg(long)]
    pub ipv6: bool,
    /// Each connection starts with a PROXY header (v1 or v2: the parent's `mode: ingress` route
    /// with `proxy_protocol:`), read within --client-timeout; the client it names is logged.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// How long a downloaded document is used before it is downloaded again.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub cache_ttl: Duration,
    /// When a refresh fails, answer from the last good copy for this long past --cache-ttl,
    /// then with an error (0s: never answer from an expired copy).
    #[arg(long, default_value = "24h", value_parser = parse_duration_or_zero)]
    pub max_stale: Duration,
    /// Time allowed to connect to the endpoint.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Time allowed for each read from the endpoint.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub read_timeout: Duration,
    /// Time allowed for a whole download.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub fetch_timeout: Duration,
    /// The largest document accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_document_size: u64,
    /// Time a client has to send its query, and to take the reply.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub client_timeout: Duration,
    /// Clients served at once; more are closed at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// On SIGTERM/SIGINT: stop accepting, and give open connections this long to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The enclave's CID (nitro-cli describe-enclaves).
    pub cid: u32,
    /// The server's vsock port, e.g. 5005.
    pub port: u32,
    /// The region, e.g. us-east-1.
    pub query: String,
    /// Connect to this stand-in (unix:PATH or tcp:IP:PORT) instead of vsock CID:PORT.
    #[arg(long, value_name = "ENDPOINT", value_parser = parse_stand_in)]
    pub stand_in: Option<Endpoint>,
    /// Time allowed to connect.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Time allowed for the whole reply (the server may have to download the document first).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The largest reply accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_reply_size: u64,
}

#[derive(Debug, Args)]
pub struct EgressArgs {
    /// Where the DNS stub listens (UDP and TCP); the enclave's /etc/resolv.conf names it.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:53")]
    pub dns_listen: SocketAddr,
    /// The parent's `mode: dns` route: vsock:CID:PORT (or a unix:PATH / tcp:IP:PORT stand-in).
    #[arg(long, value_name = "ENDPOINT", default_value = "vsock:3:8053", value_parser = parse_stand_in)]
    pub parent_dns: Endpoint,
    /// The pool of synthetic addresses handed to apps, one per name (RFC 2544 benchmarking
    /// space by default, never routed). Its size bounds how many names are in use at once.
    #[arg(long, value_name = "CIDR", default_value = "198.18.0.0/15", value_parser = parse_pool)]
    pub fake_ip: Ipv4Net,
    /// The transparent listener, where egress.nft redirects outbound TCP connections.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:15001")]
    pub listen: SocketAddr,
    /// The parent's `mode: connect` route (with `sni: require`): vsock:CID:PORT (or a stand-in).
    #[arg(long, value_name = "ENDPOINT", default_value = "vsock:3:8010", value_parser = parse_stand_in)]
    pub connect_via: Endpoint,
    /// The DNS stub answers within this, or SERVFAIL.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub dns_timeout: Duration,
    /// Time for reaching the parent's connect route and its answer to a CONNECT (the parent's
    /// own --setup-timeout is 15s); then the app's connection is reset.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub setup_timeout: Duration,
    /// Close a connection after this long without traffic (default: never).
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Redirected connections open at once; more are closed at once.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// DNS questions being answered at once; more are answered SERVFAIL at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_dns_queries: u32,
    /// On SIGTERM/SIGINT: stop accepting, and give open connections this long to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Print the enclave's network set-up for these options (the nftables ruleset, the
    /// `ip route` commands and the resolv.conf line) as a shell script, and exit.
    #[arg(long)]
    pub print_setup: bool,
}

#[derive(Debug, Args)]
pub struct DemoHttpsArgs {
    /// IP:PORT to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// DNS name of the certificate; repeatable.
    #[arg(long = "name", default_value = "ip-ranges.amazonaws.com")]
    pub names: Vec<String>,
    /// The file served.
    #[arg(long)]
    pub document: PathBuf,
    /// The path it is served at.
    #[arg(long, default_value = "/ip-ranges.json")]
    pub path: String,
    /// Where to write the CA certificate (PEM) once listening.
    #[arg(long)]
    pub ca_out: PathBuf,
}

impl ForwarderArgs {
    pub fn options(&self) -> crate::forwarder::Options {
        crate::forwarder::Options {
            listen: SocketAddr::new(self.local_ip, self.local_port),
            target: self.stand_in.clone().unwrap_or(Endpoint::Vsock {
                cid: self.remote_cid,
                port: self.remote_port,
            }),
            max_connections: self.max_connections as usize,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            drain_timeout: self.drain_timeout,
        }
    }
}

impl IngressArgs {
    pub fn options(&self) -> crate::ingress::Options {
        crate::ingress::Options {
            listen: self.listen.clone(),
            to: self.to.clone(),
            proxy_protocol: self.proxy_protocol,
            header_timeout: self.header_timeout,
            max_connections: self.max_connections as usize,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            drain_timeout: self.drain_timeout,
        }
    }
}

impl ServerArgs {
    pub fn options(&self) -> crate::server::Options {
        crate::server::Options {
            listen: self.stand_in.clone().unwrap_or(Endpoint::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: self.port,
            }),
            ipv6: self.ipv6,
            proxy_protocol: self.proxy_protocol,
            client_timeout: self.client_timeout,
            max_connections: self.max_connections as usize,
            drain_timeout: self.drain_timeout,
        }
    }

    pub fn fetch_settings(&self) -> FetchSettings {
        FetchSettings {
            url: self.url.clone(),
            ca_file: self.ca_file.clone(),
            connect_to: self.connect_to,
            proxy: self.proxy.clone(),
            connect_timeout: self.connect_timeout,
            read_timeout: self.read_timeout,
            total_timeout: self.fetch_timeout,
            max_bytes: self.max_document_size,
        }
    }
}

impl ClientArgs {
    pub fn options(&self) -> crate::client::Options {
        crate::client::Options {
            target: self.stand_in.clone().unwrap_or(Endpoint::Vsock {
                cid: self.cid,
                port: self.port,
            }),
            query: self.query.clone(),
            connect_timeout: self.connect_timeout,
            timeout: self.timeout,
            max_reply_bytes: self.max_reply_size,
        }
    }
}

impl EgressArgs {
    pub fn options(&self) -> crate::egress::Options {
        crate::egress::Options {
            dns_listen: self.dns_listen,
            parent_dns: self.parent_dns.clone(),
            fake_ip: self.fake_ip,
            listen: self.listen,
            connect_via: self.connect_via.clone(),
            dns_timeout: self.dns_timeout,
            setup_timeout: self.setup_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections as usize,
            max_dns_queries: self.max_dns_queries as usize,
            drain_timeout: self.drain_timeout,
        }
    }
}

impl DemoHttpsArgs {
    pub fn options(&self) -> crate::standin::Options {
        crate::standin::Options {
            listen: self.listen,
            names: self.names.clone(),
            document: self.document.clone(),
            path: self.path.clone(),
            ca_out: self.ca_out.clone(),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 500ms, 5s or 2m"))?;
    if d.is_zero() {
        return Err("must be longer than 0".into());
    }
    Ok(d)
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 0s, 30m or 24h"))
}

fn parse_stand_in(s: &str) -> Result<Endpoint, String> {
    if !(s.starts_with("unix:") || s.starts_with("tcp:") || s.starts_with("vsock:")) {
        return Err(format!(
            "{s:?}: a stand-in is unix:PATH or tcp:IP:PORT (or vsock:CID:PORT)"
        ));
    }
    s.parse()
}

/// A synthetic pool: IPv4, clear of loopback, between a /8 and a /30 (at least two addresses,
/// at most 16 M names).
fn parse_pool(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 network; write e.g. 198.18.0.0/15"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; write its network, {}",
            net.trunc()
        ));
    }
    if !(8..=30).contains(&net.prefix_len()) {
        return Err(format!(
            "{s:?}: the pool's prefix length must be 8 to 30 (the default is 198.18.0.0/15)"
        ));
    }
    let loopback: Ipv4Net = "127.0.0.0/8"
        .parse()
        .map_err(|_| "unreachable".to_owned())?;
    if loopback.contains(&net) || net.contains(&loopback.network()) {
        return Err(format!(
            "{s:?} overlaps loopback, which egress.nft never redirects; use e.g. 198.18.0.0/15"
        ));
    }
    Ok(net)
}

fn parse_https_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if url.scheme() != "https" || url.host_str().is_none() {
        return Err(format!(
            "{s:?}: the document must come over HTTPS, e.g. {DEFAULT_URL}"
        ));
    }
    Ok(url)
}

fn parse_proxy_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if url.scheme() != "http" || url.host_str().is_none() || url.port_or_known_default().is_none() {
        return Err(format!(
            "{s:?}: the proxy is an HTTP CONNECT proxy, e.g. http://127.0.0.1:3128"
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("enclave-app").chain(args.iter().copied()))
    }

    #[test]
    fn workshop_arguments_parse() {
        let Command::Forwarder(f) = parse(&["forwarder", "127.0.0.1", "443", "3", "8001"])
            .unwrap()
            .command
        else {
            panic!("not a forwarder");
        };
        let o = f.options();
        assert_eq!(o.listen, "127.0.0.1:443".parse().unwrap());
        assert_eq!(o.target, Endpoint::Vsock { cid: 3, port: 8001 });

        let Command::Server(s) = parse(&["server", "5005"]).unwrap().command else {
            panic!("not a server");
        };
        assert_eq!(s.options().listen, "vsock:any:5005".parse().unwrap());
        assert_eq!(s.url.as_str(), DEFAULT_URL);
        assert_eq!(s.max_stale, Duration::from_secs(24 * 3600));
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        assert_eq!(f.drain_timeout, Duration::from_secs(30));
        let Command::Server(s) = parse(&["server", "5005", "--max-stale", "0s"])
            .unwrap()
            .command
        else {
            panic!("not a server");
        };
        assert_eq!(s.max_stale, Duration::ZERO, "0s turns stale answers off");

        let Command::Client(c) = parse(&["client", "16", "5005", "us-east-1"])
            .unwrap()
            .command
        else {
            panic!("not a client");
        };
        assert_eq!(
            c.options().target,
            Endpoint::Vsock {
                cid: 16,
                port: 5005
            }
        );
        assert_eq!(c.options().query, "us-east-1");
    }

    #[test]
    fn stand_ins_replace_vsock() {
        let Command::Forwarder(f) = parse(&[
            "forwarder",
            "127.0.0.1",
            "443",
            "3",
            "8001",
            "--stand-in",
            "unix:/tmp/p.sock",
        ])
        .unwrap()
        .command
        else {
            panic!("not a forwarder");
        };
        assert_eq!(f.options().target, Endpoint::Unix("/tmp/p.sock".into()));
        assert!(parse(&["server", "5005", "--stand-in", "5006"]).is_err());
    }

    #[test]
    fn egress_defaults_are_the_issues() {
        let Command::Egress(e) = parse(&["egress"]).unwrap().command else {
            panic!("not egress");
        };
        let o = e.options();
        assert_eq!(o.dns_listen, "127.0.0.1:53".parse().unwrap());
        assert_eq!(o.parent_dns, Endpoint::Vsock { cid: 3, port: 8053 });
        assert_eq!(o.fake_ip, "198.18.0.0/15".parse().unwrap());
        assert_eq!(o.listen, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(o.connect_via, Endpoint::Vsock { cid: 3, port: 8010 });
        assert_eq!(o.dns_timeout, Duration::from_secs(2));
        assert!(!e.print_setup);
        let Command::Egress(e) = parse(&[
            "egress",
            "--parent-dns",
            "unix:/tmp/dns.sock",
            "--connect-via",
            "tcp:127.0.0.1:8010",
        ])
        .unwrap()
        .command
        else {
            panic!("not egress");
        };
        assert_eq!(
            e.options().parent_dns,
            Endpoint::Unix("/tmp/dns.sock".into())
        );
        for bad in [
            "10.0.0.1/8",
            "127.0.0.0/16",
            "0.0.0.0/0",
            "198.18.0.0/31",
            "fd00::/64",
            "x",
        ] {
            assert!(parse(&["egress", "--fake-ip", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn ingress_arguments_parse() {
        let Command::Ingress(i) = parse(&[
            "ingress",
            "--listen",
            "vsock:443",
            "--to",
            "tcp:127.0.0.1:8443",
            "--proxy-protocol",
            "strip",
        ])
        .unwrap()
        .command
        else {
            panic!("not ingress");
        };
        let o = i.options();
        assert_eq!(o.listen, "vsock:any:443".parse().unwrap());
        assert_eq!(o.to, Endpoint::Tcp("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(o.proxy_protocol, crate::ingress::HeaderMode::Strip);
        let Command::Ingress(i) = parse(&[
            "ingress",
            "--listen",
            "vsock:443",
            "--to",
            "tcp:127.0.0.1:8443",
        ])
        .unwrap()
        .command
        else {
            panic!("not ingress");
        };
        assert_eq!(i.proxy_protocol, crate::ingress::HeaderMode::Keep);
        assert!(parse(&["ingress", "--listen", "vsock:443", "--to", "8443"]).is_err());
        assert!(parse(&[
            "ingress",
            "--listen",
            "vsock:443",
            "--to",
            "tcp:127.0.0.1:1",
            "--proxy-protocol",
            "v2"
        ])
        .is_err());
        let Command::Server(s) = parse(&["server", "5005", "--proxy-protocol"])
            .unwrap()
            .command
        else {
            panic!("not a server");
        };
        assert!(s.options().proxy_protocol);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &[
                "server",
                "5005",
                "--url",
                "http://ip-ranges.amazonaws.com/x",
            ][..],
            &["server", "5005", "--client-timeout", "0s"],
            &["server", "5005", "--cache-ttl", "soon"],
            &["server", "5005", "--max-stale", "a day"],
            &["server", "5005", "--drain-timeout", "0s"],
            &["server", "5005", "--max-connections", "0"],
            &["forwarder", "localhost", "443", "3", "8001"],
            &["forwarder", "127.0.0.1", "70000", "3", "8001"],
            &["client", "16", "5005"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }
}
