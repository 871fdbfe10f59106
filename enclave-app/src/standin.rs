//! `enclave-app demo-https` (hidden): a local HTTPS stand-in for ip-ranges.amazonaws.com.
//!
//! This module owns the remote end of the demo and of the integration tests: at start it makes a
//! throwaway CA and a server certificate for the given names (rcgen), listens on IP:PORT, writes
//! the CA certificate (PEM) to `--ca-out` once it is listening (atomically, so the file's
//! existence means "ready"), and serves one file (`--document`) at one path over HTTPS
//! (tokio-rustls and hyper, HTTP/1.1). Anything else is a 404 or 405. Each request is logged as
//! one `served` line with its status and size, so a test can count downloads. Bounded: at most
//! 64 connections, a TLS handshake and request headers within 10 s each.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use nitro_vsock_proxy::net::endpoint::{Endpoint, Stream};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::accept;

const MAX_CONNECTIONS: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the stand-in serves.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    /// DNS names of the server certificate.
    pub names: Vec<String>,
    pub document: PathBuf,
    /// The one path served, e.g. `/ip-ranges.json`.
    pub path: String,
    /// Where to write the CA certificate for the client's `--ca-file`.
    pub ca_out: PathBuf,
}

/// The certificate chain and key the stand-in presents, and the CA's PEM.
pub(crate) struct Certificates {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) ca_pem: String,
}

/// Serves until the process is stopped. Fails if the document, the certificates or the
/// listener cannot be set up.
pub async fn run(options: Options) -> Result<(), String> {
    let document = std::fs::read(&options.document)
        .map(Bytes::from)
        .map_err(|e| format!("cannot read --document {}: {e}", options.document.display()))?;
    let certs = make_certificates(&options.names)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| {
        b.with_no_client_auth()
            .with_single_cert(certs.chain, certs.key)
    })
    .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = accept::bind(&Endpoint::Tcp(options.listen)).await?;
    write_atomically(&options.ca_out, certs.ca_pem.as_bytes())?;
    info!(
        listen = %options.listen,
        names = ?options.names,
        document = %options.document.display(),
        bytes = document.len(),
        ca = %options.ca_out.display(),
        "HTTPS stand-in listening"
    );
    let path: Arc<str> = Arc::from(options.path.as_str());
    accept::serve(listener, MAX_CONNECTIONS, move |stream, _peer| {
        serve_connection(stream, acceptor.clone(), document.clone(), path.clone())
    })
    .await;
    Ok(())
}

async fn serve_connection(stream: Stream, acceptor: TlsAcceptor, document: Bytes, path: Arc<str>) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            warn!("TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            warn!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &document, &path);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    if let Err(e) = http.serve_connection(TokioIo::new(tls), service).await {
        warn!("HTTP connection failed: {e}");
    }
}

fn respond(request: &Request<Incoming>, document: &Bytes, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = if request.uri().path() != path {
        (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n"))
    } else if request.method() != Method::GET && request.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"GET only\n"),
        )
    } else {
        (StatusCode::OK, document.clone())
    };
    info!(
        method = %request.method(),
        path = request.uri().path(),
        status = status.as_u16(),
        bytes = body.len(),
        "served"
    );
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if status == StatusCode::OK {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    response
}

/// A throwaway CA and a server certificate it signed for `names`.
pub(crate) fn make_certificates(names: &[String]) -> Result<Certificates, String> {
    let fail = |what: &str, e: rcgen::Error| format!("cannot make the {what}: {e}");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA", e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "enclave-app demo CA (throwaway)");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().map_err(|e| fail("CA key", e))?;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(|e| fail("CA", e))?;

    let mut params =
        CertificateParams::new(names.to_vec()).map_err(|e| fail("server certificate", e))?;
    if let Some(first) = names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(|e| fail("server key", e))?;
    let cert = params
        .signed_by(&key, &ca)
        .map_err(|e| fail("server certificate", e))?;
    Ok(Certificates {
        chain: vec![cert.der().clone(), ca.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ca_pem: ca.pem(),
    })
}

/// Writes `data` to `path` through a temporary file and a rename, so readers never see half.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write --ca-out {}: {e}", path.display()))
}
