//! The workshop chain on stand-ins, inside the calling test's network namespace.
//!
//! Owns [`Chain::start`]: every piece as the real binary, wired as in the workshop with vsock
//! replaced by unix sockets:
//!
//! ```text
//! client --unix--> server --HTTPS, pinned to 127.0.0.1:443--> forwarder --unix--> nitro-vsock-proxy
//!   --DNS (TestDns on 127.0.0.1:53: ip-ranges.amazonaws.com -> 192.0.2.10)--> HTTPS stand-in 192.0.2.10:443
//! ```
//!
//! The stand-in's CA is the server's only trust root (`--ca-file`), so TLS is verified end to end.
//! The proxy runs with the shipped `config/your-vsock-proxy.yaml` unless a test gives another
//! allowlist; it can also start later ([`Setup::start_proxy`] = false, [`Chain::start_proxy`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::dns::TestDns;
use super::netns;
use super::process::{proxy_bin, run, Output, Proc, APP};

pub const NAME: &str = "ip-ranges.amazonaws.com";
pub const STAND_IN: &str = "192.0.2.10:443";
pub const FORWARDER: &str = "127.0.0.1:443";
pub const SAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/testdata/ip-ranges.sample.json"
);
pub const SHIPPED_ALLOWLIST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../config/your-vsock-proxy.yaml"
);

/// The S3 IPv4 prefixes of us-east-1 in the sample, as the server must answer them.
pub const US_EAST_1: &str = r#"["3.5.0.0/19","16.182.0.0/16","18.34.0.0/19","18.34.232.0/21","52.216.0.0/15","54.231.0.0/16","52.92.16.0/20"]"#;
/// The same with the IPv6 prefixes (`--ipv6`).
pub const US_EAST_1_V6: &str = r#"["3.5.0.0/19","16.182.0.0/16","18.34.0.0/19","18.34.232.0/21","52.216.0.0/15","54.231.0.0/16","52.92.16.0/20","2600:1fa0:80::/39","2600:1ff9:80::/40"]"#;

/// How long a client may take in these tests (far more than it needs).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// What to start.
pub struct Setup {
    /// The document the stand-in serves; `None`: the bundled sample.
    pub document: Option<Vec<u8>>,
    /// The proxy's allowlist; `None`: config/your-vsock-proxy.yaml.
    pub allowlist: Option<String>,
    /// What TestDns answers for ip-ranges.amazonaws.com, and the TTL.
    pub dns_answer: IpAddr,
    pub dns_ttl: u32,
    pub start_proxy: bool,
    /// Extra server arguments.
    pub server_args: Vec<String>,
    /// The proxy serves a `mode: connect` route and the server downloads through it
    /// (`--proxy http://FORWARDER`) instead of a fixed route (`--connect-to FORWARDER`).
    pub via_connect: bool,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            document: None,
            allowlist: None,
            dns_answer: "192.0.2.10".parse().unwrap(),
            dns_ttl: 300,
            start_proxy: true,
            server_args: Vec::new(),
            via_connect: false,
        }
    }
}

/// A running chain. Everything stops when it is dropped.
pub struct Chain {
    pub dir: tempfile::TempDir,
    pub dns: TestDns,
    pub standin: Proc,
    pub proxy: Option<Proc>,
    pub forwarder: Proc,
    pub server: Proc,
    allowlist: PathBuf,
    via_connect: bool,
}

impl Chain {
    /// Starts the chain and waits until every piece listens. Call inside `run_in_netns`.
    pub async fn start(setup: Setup) -> Chain {
        let dir = tempfile::tempdir().expect("cannot make a temporary directory");
        netns::add_lo_addr("192.0.2.10".parse().unwrap());
        let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        dns.set(NAME, &[setup.dns_answer], setup.dns_ttl);

        let document = dir.path().join("ip-ranges.json");
        match &setup.document {
            Some(doc) => std::fs::write(&document, doc).unwrap(),
            None => {
                std::fs::copy(SAMPLE, &document).unwrap();
            }
        }
        let standin = start_standin(dir.path().join("ca.pem"), STAND_IN, &document).await;

        let allowlist = dir.path().join("allowlist.yaml");
        match &setup.allowlist {
            Some(text) => std::fs::write(&allowlist, text).unwrap(),
            None => {
                std::fs::copy(SHIPPED_ALLOWLIST, &allowlist).unwrap();
            }
        }

        let proxy_sock = dir.path().join("proxy.sock");
        let mut forwarder = Proc::spawn(
            "forwarder",
            APP,
            &[
                "forwarder",
                "127.0.0.1",
                "443",
                "3",
                "8001",
                "--stand-in",
                &format!("unix:{}", proxy_sock.display()),
            ],
            &[],
        );
        let forwarder_addr: SocketAddr = FORWARDER.parse().unwrap();
        forwarder
            .wait_ready(|| netns::tcp_listening(forwarder_addr))
            .await;

        let mut server_args = setup.server_args.clone();
        if setup.via_connect {
            server_args.extend(["--proxy".to_owned(), format!("http://{FORWARDER}")]);
        }
        let server = spawn_server(dir.path(), "server", "server.sock", &server_args).await;
        let mut chain = Chain {
            dir,
            dns,
            standin,
            proxy: None,
            forwarder,
            server,
            allowlist,
            via_connect: setup.via_connect,
        };
        if setup.start_proxy {
            chain.start_proxy().await;
        }
        chain
    }

    /// A path in the chain's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The main server's stand-in address.
    pub fn server_endpoint(&self) -> String {
        format!("unix:{}", self.path("server.sock").display())
    }

    /// Starts nitro-vsock-proxy on the forwarder's target and waits until it listens.
    pub async fn start_proxy(&mut self) {
        let sock = self.path("proxy.sock");
        let listen = format!("unix:{}", sock.display());
        let mut args = vec![
            "--config".to_owned(),
            self.allowlist.display().to_string(),
            "--nameserver".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        if self.via_connect {
            // The same allowlist, with one CONNECT route instead of the positional one.
            let mut config = std::fs::read_to_string(&self.allowlist).unwrap();
            config.push_str(&format!(
                "routes:\n  - {{listen: '{listen}', mode: connect}}\n"
            ));
            let path = self.path("connect-route.yaml");
            std::fs::write(&path, config).unwrap();
            args[1] = path.display().to_string();
        } else {
            args.splice(0..0, [listen, NAME.to_owned(), "443".to_owned()]);
        }
        let mut proxy = Proc::spawn("nitro-vsock-proxy", proxy_bin(), &args, &[]);
        proxy.wait_ready(|| netns::unix_listening(&sock)).await;
        self.proxy = Some(proxy);
    }

    /// Starts a server on unix socket `sock` (in the chain's directory), trusting the stand-in's
    /// CA and pinned to the forwarder, with `extra` arguments.
    pub async fn start_server(&self, name: &str, sock: &str, extra: &[String]) -> Proc {
        spawn_server(self.dir.path(), name, sock, extra).await
    }

    /// `enclave-app client 16 5005 QUERY` against the main server.
    pub async fn client(&self, query: &str) -> Output {
        client(&self.server_endpoint(), query).await
    }

    /// How many times the stand-in served the document so far.
    pub fn downloads(&self) -> usize {
        self.standin.count_lines(&["served", "status=200"])
    }

    /// How many times the stand-in served the document, once at least `n` times were logged.
    pub async fn wait_downloads(&self, n: usize) -> usize {
        self.standin.wait_lines(&["served", "status=200"], n).await
    }
}

/// Starts a server on unix socket `sock` in `dir`, trusting `dir/ca.pem` (unless `extra` names
/// another `--ca-file`) and pinned to the forwarder.
async fn spawn_server(dir: &std::path::Path, name: &str, sock: &str, extra: &[String]) -> Proc {
    let sock = dir.join(sock);
    let mut args = vec![
        "server".to_owned(),
        "5005".to_owned(),
        "--stand-in".to_owned(),
        format!("unix:{}", sock.display()),
    ];
    if !extra.iter().any(|a| a == "--proxy") {
        args.push("--connect-to".to_owned());
        args.push(FORWARDER.to_owned());
    }
    if !extra.iter().any(|a| a == "--ca-file") {
        args.push("--ca-file".to_owned());
        args.push(dir.join("ca.pem").display().to_string());
    }
    args.extend(extra.iter().cloned());
    let mut server = Proc::spawn(name, APP, &args, &[]);
    server.wait_ready(|| netns::unix_listening(&sock)).await;
    server
}

/// Starts an HTTPS stand-in on `listen` serving `document`, its CA written to `ca`.
pub async fn start_standin(ca: PathBuf, listen: &str, document: &std::path::Path) -> Proc {
    let mut standin = Proc::spawn(
        "https-stand-in",
        APP,
        &[
            "demo-https".to_owned(),
            "--listen".to_owned(),
            listen.to_owned(),
            "--name".to_owned(),
            NAME.to_owned(),
            "--document".to_owned(),
            document.display().to_string(),
            "--ca-out".to_owned(),
            ca.display().to_string(),
        ],
        &[],
    );
    standin.wait_ready(|| ca.exists()).await;
    standin
}

/// `enclave-app client 16 5005 QUERY --stand-in ENDPOINT`.
pub async fn client(endpoint: &str, query: &str) -> Output {
    run(
        APP,
        &[
            "client",
            "16",
            "5005",
            query,
            "--stand-in",
            endpoint,
            "--timeout",
            "30s",
        ],
        CLIENT_TIMEOUT,
    )
    .await
}
