//! Downloading the ranges document over HTTPS, with certificate verification and bounds.
//!
//! This module owns how the server talks to the remote endpoint: one reqwest client (rustls with
//! the ring provider, HTTP/1.1) that verifies the certificate against the system's CA roots (the
//! image's `ca-certificates`) or, with `--ca-file`, against those CAs only; that can be pinned to
//! one address (`--connect-to`, like curl's `--resolve`: the name in the URL is still the TLS
//! name); that ignores proxy environment variables and redirects; and that bounds the connect
//! time, each read, the whole download and the document's size. A failure is a [`FetchError`],
//! sorted by type (never by message text), and [`Fetcher::explain`] turns it into one line that
//! names the URL, the address and what to check.

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

    /// Downloads the whole document, or says why not (see [`Fetcher::explain`]).
    pub async fn download(&self) -> Result<Vec<u8>, FetchError> {
        let max = self.settings.max_bytes;
        let mut response = self
            .client
            .get(self.settings.url.clone())
            .send()
            .await
            .map_err(|e| FetchError::classify(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Http(status));
        }
        if let Some(len) = response.content_length() {
            if len > max {
                return Err(FetchError::TooLarge { got: len });
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::classify(&e))?
        {
            let len = (body.len() + chunk.len()) as u64;
            if len > max {
                return Err(FetchError::TooLarge { got: len });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// One line: what failed, where, and what to check.
    pub fn explain(&self, error: &FetchError) -> String {
        let s = &self.settings;
        let host = s.url.host_str().unwrap_or("the host");
        let port = s.url.port_or_known_default().unwrap_or(443);
        let forwarder = s.connect_to.map_or_else(
            || format!("the address {host} resolves to (127.0.0.1 in the enclave's /etc/hosts)"),
            |a| a.to_string(),
        );
        let what = match error {
            FetchError::Timeout(detail) => format!(
                "{detail}; no complete answer in time (connect timeout {}, read timeout {}, total {}); check that the path to {host}:{port} works",
                humantime::format_duration(s.connect_timeout),
                humantime::format_duration(s.read_timeout),
                humantime::format_duration(s.total_timeout)
            ),
            FetchError::ClosedBeforeTls(detail) => format!(
                "{detail}; the connection closed before TLS was set up: usually the forwarder could not reach nitro-vsock-proxy on the parent, or the proxy refused the address (not allowlisted). Check that the forwarder listens on {forwarder}, that nitro-vsock-proxy runs on the parent, and that its allowlist has {host}:{port}"
            ),
            FetchError::Certificate(detail) => format!(
                "{detail}; the endpoint's certificate is not valid for {host} or not trusted; for a private CA pass --ca-file"
            ),
            FetchError::Tls(detail) => format!(
                "{detail}; TLS with the endpoint failed: check that {host}:{port} speaks HTTPS (and, with --proxy, that the proxy route is `mode: connect`)"
            ),
            FetchError::Connect(detail) | FetchError::Other(detail) => format!(
                "{detail}; check that the forwarder listens on {forwarder}, that nitro-vsock-proxy runs on the parent, and that its allowlist has {host}:{port}"
            ),
            FetchError::Http(status) => {
                format!("the server answered HTTP {status}, not 200 OK; check --url")
            }
            FetchError::TooLarge { got } => format!(
                "the document is larger than --max-document-size ({} bytes, got at least {got}); raise the limit if it has grown",
                s.max_bytes
            ),
            FetchError::Body(detail) => format!(
                "{detail}; the connection failed while the document was arriving; the next query tries again"
            ),
        };
        format!("cannot download {}: {what}", self.describe())
    }
}

/// Why a download failed, by type (the HTTP client's error kinds, the TLS library's error, the
/// I/O error kind, the status code), never by the text of a message. Each variant that wraps a
/// lower error carries its text for the log line.
#[derive(Debug)]
pub enum FetchError {
    /// No TCP connection to the endpoint (or the forwarder): refused, unreachable, no route.
    Connect(String),
    /// The TCP connection was closed or reset before the TLS handshake finished: what the
    /// forwarder does when it cannot reach the parent's proxy, and the proxy when the address is
    /// not allowlisted.
    ClosedBeforeTls(String),
    /// The endpoint's certificate was rejected (untrusted issuer, wrong name, expired, ...).
    Certificate(String),
    /// Any other TLS failure (e.g. the endpoint does not speak TLS).
    Tls(String),
    /// The endpoint answered with a status other than success.
    Http(reqwest::StatusCode),
    /// The document is larger than `--max-document-size`: at least `got` bytes.
    TooLarge { got: u64 },
    /// The connection failed while the body was arriving.
    Body(String),
    /// A connect, read or total timeout ran out.
    Timeout(String),
    /// Anything else the HTTP client reports.
    Other(String),
}

impl FetchError {
    /// Sorts a reqwest error by what it is: its own kind flags first (timeout, body), then the
    /// errors it wraps (a rustls error means TLS; an I/O end-of-stream or reset during the
    /// connect step means the connection was closed before TLS was set up).
    pub fn classify(e: &reqwest::Error) -> FetchError {
        let detail = chain(e);
        if e.is_timeout() {
            return FetchError::Timeout(detail);
        }
        if let Some(tls) = find_in_chain::<rustls::Error>(e, |_| true) {
            return match tls {
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                    FetchError::Certificate(detail)
                }
                _ => FetchError::Tls(detail),
            };
        }
        if e.is_connect() {
            let closed = find_in_chain::<std::io::Error>(e, |io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                )
            })
            .is_some();
            return if closed {
                FetchError::ClosedBeforeTls(detail)
            } else {
                FetchError::Connect(detail)
            };
        }
        if e.is_body() || e.is_decode() {
            return FetchError::Body(detail);
        }
        FetchError::Other(detail)
    }
}

/// The first error of type `T` that `accept` takes in `e`'s chain of sources, including the
/// error an I/O error wraps (which `io::Error::source` skips: it returns the wrapped error's
/// source).
fn find_in_chain<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
    accept: impl Fn(&T) -> bool + Copy,
) -> Option<&'a T> {
    let mut next = Some(e);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<T>().filter(|t| accept(t)) {
            return Some(found);
        }
        if let Some(inner) = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(found) = find_in_chain::<T>(inner, accept) {
                return Some(found);
            }
        }
        next = current.source();
    }
    None
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

#[cfg(test)]
mod tests {
    //! Each variant from a real failure: reqwest against a local stand-in on 127.0.0.1.
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const HOST: &str = "ip-ranges.amazonaws.com";

    fn settings(addr: SocketAddr, ca_file: PathBuf) -> FetchSettings {
        FetchSettings {
            url: Url::parse(&format!("https://{HOST}/ip-ranges.json")).unwrap(),
            ca_file: Some(ca_file),
            connect_to: Some(addr),
            proxy: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(20),
            max_bytes: 100,
        }
    }

    /// A CA and a certificate for HOST signed by it; the CA's PEM written into `dir`.
    fn certificates(
        dir: &tempfile::TempDir,
        name: &str,
    ) -> (crate::standin::Certificates, PathBuf) {
        let certs = crate::standin::make_certificates(&[HOST.to_owned()]).unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, &certs.ca_pem).unwrap();
        (certs, path)
    }

    /// An HTTPS server for one connection that reads the request head and writes `response`
    /// (raw HTTP), then closes.
    async fn https_once(
        certs: crate::standin::Certificates,
        response: &'static [u8],
    ) -> SocketAddr {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs.chain, certs.key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            let _ = tls.write_all(response).await;
            let _ = tls.shutdown().await;
        });
        addr
    }

    /// A plain TCP server for one connection that does `then` with it.
    async fn tcp_once<F, Fut>(then: F) -> SocketAddr
    where
        F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((tcp, _)) = listener.accept().await {
                then(tcp).await;
            }
        });
        addr
    }

    async fn fetch(settings: FetchSettings) -> Result<Vec<u8>, FetchError> {
        Fetcher::new(settings).unwrap().download().await
    }

    #[tokio::test]
    async fn a_good_answer_is_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let (certs, ca) = certificates(&dir, "ca.pem");
        let addr = https_once(certs, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
        assert_eq!(fetch(settings(addr, ca)).await.unwrap(), b"{}");
    }

    #[tokio::test]
    async fn nothing_listening_is_connect() {
        let dir = tempfile::tempdir().unwrap();
        let (_, ca) = certificates(&dir, "ca.pem");
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = fetch(settings(addr, ca)).await.unwrap_err();
        assert!(matches!(err, FetchError::Connect(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_close_before_tls_is_closed_before_tls() {
        let dir = tempfile::tempdir().unwrap();
        let (_, ca) = certificates(&dir, "ca.pem");
        // What the forwarder does when the parent's proxy is down: accept, then close.
        let addr = tcp_once(|tcp| async move { drop(tcp) }).await;
        let fetcher = Fetcher::new(settings(addr, ca)).unwrap();
        let err = fetcher.download().await.unwrap_err();
        assert!(matches!(err, FetchError::ClosedBeforeTls(_)), "{err:?}");
        assert!(fetcher
            .explain(&err)
            .contains("nitro-vsock-proxy runs on the parent"));
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (certs, _) = certificates(&dir, "ca.pem");
        let (_, other_ca) = certificates(&dir, "other-ca.pem");
        let addr = https_once(certs, b"HTTP/1.1 200 OK\r\n\r\n").await;
        let err = fetch(settings(addr, other_ca)).await.unwrap_err();
        assert!(matches!(err, FetchError::Certificate(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_plain_text_answer_is_tls() {
        let dir = tempfile::tempdir().unwrap();
        let (_, ca) = certificates(&dir, "ca.pem");
        let addr = tcp_once(|mut tcp| async move {
            let mut hello = [0u8; 512];
            let _ = tcp.read(&mut hello).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            let _ = tcp.shutdown().await;
        })
        .await;
        let err = fetch(settings(addr, ca)).await.unwrap_err();
        assert!(matches!(err, FetchError::Tls(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_non_success_status_is_http_with_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let (certs, ca) = certificates(&dir, "ca.pem");
        let addr = https_once(
            certs,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let err = fetch(settings(addr, ca)).await.unwrap_err();
        assert!(
            matches!(err, FetchError::Http(s) if s == reqwest::StatusCode::NOT_FOUND),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_document_over_the_limit_is_too_large() {
        let dir = tempfile::tempdir().unwrap();
        let (certs, ca) = certificates(&dir, "ca.pem");
        let addr = https_once(certs, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n").await;
        let err = fetch(settings(addr, ca)).await.unwrap_err();
        assert!(matches!(err, FetchError::TooLarge { got: 1000 }), "{err:?}");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_body() {
        let dir = tempfile::tempdir().unwrap();
        let (certs, ca) = certificates(&dir, "ca.pem");
        let addr = https_once(
            certs,
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nonly ten b",
        )
        .await;
        let err = fetch(settings(addr, ca)).await.unwrap_err();
        assert!(matches!(err, FetchError::Body(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_silent_endpoint_is_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (_, ca) = certificates(&dir, "ca.pem");
        let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
        // Accepts and says nothing until the test is over.
        let addr = tcp_once(|tcp| async move {
            let _ = hold_rx.await;
            drop(tcp);
        })
        .await;
        let mut s = settings(addr, ca);
        s.total_timeout = Duration::from_millis(300);
        let err = fetch(s).await.unwrap_err();
        drop(hold_tx);
        assert!(matches!(err, FetchError::Timeout(_)), "{err:?}");
    }
}
