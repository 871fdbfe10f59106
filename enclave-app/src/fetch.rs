//! Downloading the ranges document over HTTPS, with certificate verification and bounds.
//!
//! This module owns how the server talks to the remote endpoint: one reqwest client (rustls with
//! the ring provider, HTTP/1.1) that verifies the certificate against the system's CA roots (the
//! image's `ca-certificates`) or, with `--ca-file`, against those CAs only; that can be pinned to
//! one address (`--connect-to`, like curl's `--resolve`: the name in the URL is still the TLS
//! name); that ignores proxy environment variables and redirects; and that bounds the connect
//! time, each read, the whole download and the document's size. Every failure comes back as one
//! line that names the URL, the address and what to check.

use std::error::Error as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::{redirect, Certificate, Client, Url};

/// How to download the document.
#[derive(Clone, Debug)]
pub struct FetchSettings {
    /// An `https://` URL.
    pub url: Url,
    /// Trust only the CA certificates (PEM) in this file instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Connect here instead of resolving the URL's host.
    pub connect_to: Option<SocketAddr>,
    /// Tunnel through this HTTP CONNECT proxy (the parent's `mode: connect` route, through a
    /// forwarder): `http://127.0.0.1:PORT`.
    pub proxy: Option<Url>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// The whole download: connect, TLS, request and body.
    pub total_timeout: Duration,
    /// The largest document accepted, in bytes.
    pub max_bytes: u64,
}

/// A configured HTTPS client for one URL.
pub struct Fetcher {
    client: Client,
    settings: FetchSettings,
}

impl Fetcher {
    /// Builds the client. Fails when the CA file is unreadable or holds no certificate, or when
    /// the system has no CA roots (the error says to install them or pass `--ca-file`).
    pub fn new(settings: FetchSettings) -> Result<Fetcher, String> {
        // reqwest is built without a default crypto provider; ring is the one in the workspace.
        // Installing fails only if one is installed already, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = Client::builder()
            .https_only(true)
            .http1_only()
            .no_proxy()
            .redirect(redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.read_timeout)
            .timeout(settings.total_timeout)
            .user_agent(concat!("enclave-app/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &settings.ca_file {
            builder = builder.tls_certs_only(read_ca_file(path)?);
        }
        if let Some(proxy) = &settings.proxy {
            let proxy = reqwest::Proxy::https(proxy.as_str())
                .map_err(|e| format!("--proxy {proxy}: {}", chain(&e)))?;
            builder = builder.proxy(proxy);
        }
        if let (Some(addr), Some(host)) = (settings.connect_to, settings.url.host_str()) {
            builder = builder.resolve(host, addr);
        }
        let client = builder.build().map_err(|e| {
            let roots = if settings.ca_file.is_some() {
                "check --ca-file"
            } else {
                "install the system's CA certificates (Debian: apt-get install ca-certificates) or pass --ca-file"
            };
            format!("cannot set up the HTTPS client: {}; {roots}", chain(&e))
        })?;
        Ok(Fetcher { client, settings })
    }

    /// The URL, and the address when pinned, for log lines.
    pub fn describe(&self) -> String {
        match self.settings.connect_to {
            Some(addr) => format!("{} (connecting to {addr})", self.settings.url),
            None => self.settings.url.to_string(),
        }
    }

    /// Downloads the whole document, or says why not.
    pub async fn download(&self) -> Result<Vec<u8>, String> {
        let url = &self.settings.url;
        let max = self.settings.max_bytes;
        let mut response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| self.explain(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "cannot download {}: the server answered HTTP {status}, not 200 OK; check --url",
                self.describe()
            ));
        }
        if let Some(len) = response.content_length() {
            if len > max {
                return Err(self.too_large(len));
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.explain(&e))? {
            let len = (body.len() + chunk.len()) as u64;
            if len > max {
                return Err(self.too_large(len));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn too_large(&self, len: u64) -> String {
        format!(
            "cannot download {}: the document is larger than --max-document-size ({} bytes, got at least {len}); raise the limit if it has grown",
            self.describe(),
            self.settings.max_bytes
        )
    }

    /// One line: what failed, where, and what to check.
    fn explain(&self, e: &reqwest::Error) -> String {
        let detail = chain(e);
        let s = &self.settings;
        let host = s.url.host_str().unwrap_or("the host");
        let port = s.url.port_or_known_default().unwrap_or(443);
        let hint = if e.is_timeout() {
            format!(
                "no complete answer in time (connect timeout {}, read timeout {}, total {}); check that the path to {host}:{port} works",
                humantime::format_duration(s.connect_timeout),
                humantime::format_duration(s.read_timeout),
                humantime::format_duration(s.total_timeout)
            )
        } else if detail.contains("handshake eof") {
            format!(
                "the connection closed before TLS was set up: usually the forwarder could not reach nitro-vsock-proxy on the parent, or the proxy refused the address (not allowlisted). Check that the forwarder listens on {}, that nitro-vsock-proxy runs on the parent, and that its allowlist has {host}:{port}",
                s.connect_to.map_or_else(|| format!("the address {host} resolves to"), |a| a.to_string())
            )
        } else if detail.contains("certificate") || detail.contains("UnknownIssuer") {
            format!("the endpoint's certificate is not valid for {host} or not trusted; for a private CA pass --ca-file")
        } else {
            let target = match s.connect_to {
                Some(addr) => addr.to_string(),
                None => format!(
                    "the address {host} resolves to (127.0.0.1 in the enclave's /etc/hosts)"
                ),
            };
            format!(
                "check that the forwarder listens on {target}, that nitro-vsock-proxy runs on the parent, and that its allowlist has {host}:{port}"
            )
        };
        format!("cannot download {}: {detail}; {hint}", self.describe())
    }
}

/// The certificates of a PEM file, for `--ca-file`.
fn read_ca_file(path: &PathBuf) -> Result<Vec<Certificate>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read --ca-file {}: {e}", path.display()))?;
    let certs = Certificate::from_pem_bundle(&pem).map_err(|e| {
        format!(
            "--ca-file {}: not PEM certificates: {}",
            path.display(),
            chain(&e)
        )
    })?;
    if certs.is_empty() {
        return Err(format!(
            "--ca-file {}: no certificate in it (expected -----BEGIN CERTIFICATE----- blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// An error and its sources as one line, without the URL (the caller names it once) and
/// without repeating a message that its source repeats.
fn chain(e: &reqwest::Error) -> String {
    let top = e.to_string();
    let top = match top.split_once(" for url (") {
        Some((head, _)) => head.to_owned(),
        None => top,
    };
    let mut parts = vec![top];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}
