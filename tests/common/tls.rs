//! A real TLS upstream for the CONNECT and SNI route tests.
//!
//! Owns [`tls_server`]: rustls on a caller-given address with a throwaway self-signed
//! certificate for the given names. Each connection is a TLS handshake, then a request read up
//! to its blank line (or EOF), then `hello <server name>` and a close. The handle counts
//! connections accepted and keeps the server names of the handshakes completed, so a test can
//! tell which name reached it and that a refused one never even connected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A running TLS upstream; stops when dropped.
pub struct TlsServer {
    names_seen: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsServer {
    /// The server names of the handshakes completed so far ("-" for none).
    pub fn names_seen(&self) -> Vec<String> {
        self.names_seen.lock().unwrap().clone()
    }

    /// TCP connections accepted so far, whether or not their handshake completed.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn tls_server(addr: SocketAddr, names: &[&str]) -> TlsServer {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names).expect("cannot make a test certificate");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![CertificateDer::from(cert.der().to_vec())], key)
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("cannot bind the TLS upstream on {addr}: {e}"));
    let names_seen = Arc::new(Mutex::new(Vec::new()));
    let seen = names_seen.clone();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let name = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                seen.lock().unwrap().push(name.clone());
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") && request.len() < 8192 {
                    match tls.read(&mut byte).await {
                        Ok(1) => request.push(byte[0]),
                        _ => break,
                    }
                }
                let body = format!("hello {name}\n");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsServer {
        names_seen,
        accepted,
        task,
    }
}
