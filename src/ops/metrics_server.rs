//! The metrics endpoint: `GET /metrics` in the Prometheus text format over HTTP/1.1 (hyper).
//!
//! This module owns the `--metrics-listen` (or `metrics_listen:`) listener: which addresses it
//! accepts (`tcp:IP:PORT` or `unix:PATH`, never vsock: the metrics are for the parent's
//! Prometheus, not for enclaves), and the small HTTP service on it: `GET` (or `HEAD`)
//! `/metrics` answers 200 with [`crate::ops::metrics::Metrics::encode`], any other path 404, any
//! other method on `/metrics` 405. A scrape is bounded: at most [`MAX_SCRAPERS`] connections at
//! once, [`HEADER_TIMEOUT`] to send the request head; a failed or slow scraper is dropped and
//! logged at debug, never affecting the proxy.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::net::endpoint::{Endpoint, Listener};

/// Scrapers served at once; more wait in the listen backlog.
pub const MAX_SCRAPERS: usize = 8;
/// Time a scraper has to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The content type of [`crate::ops::metrics::Metrics::encode`]'s output.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Checks a metrics listen address: `tcp:` or `unix:` only.
pub fn check_endpoint(endpoint: &Endpoint, given_as: &str) -> Result<(), String> {
    match endpoint {
        Endpoint::Vsock { .. } => Err(format!(
            "{given_as} {endpoint}: the metrics endpoint cannot listen on vsock (enclaves must not \
             reach it); use tcp:127.0.0.1:9190 or unix:/run/nitro-vsock-proxy/metrics.sock"
        )),
        Endpoint::Tcp(_) | Endpoint::Unix(_) => Ok(()),
    }
}

/// Binds the metrics listener, with an error that names the address and the OS error.
pub async fn bind(endpoint: &Endpoint) -> Result<Listener, String> {
    endpoint.bind().await.map_err(|e| {
        let hint = match (e.kind(), endpoint.bind_hint(&e)) {
            (std::io::ErrorKind::AddrInUse, _) => {
                "another process on that address? change --metrics-listen / metrics_listen:"
            }
            (_, Some(hint)) => hint,
            (_, None) => return format!("cannot listen for metrics on {endpoint}: {e}"),
        };
        format!("cannot listen for metrics on {endpoint}: {e} ({hint})")
    })
}

/// Serves scrapes on `listener` forever.
pub async fn serve(listener: Listener) {
    let at = listener
        .local_endpoint()
        .map(|e| e.to_string())
        .unwrap_or_default();
    info!(listen = %at, "serving metrics at GET /metrics");
    let scrapers = Arc::new(Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok(permit) = scrapers.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(listen = %at, "metrics: accept failed: {e}");
                // EMFILE and the like: give the proxy's connections the descriptors first.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                .await;
            if let Err(e) = served {
                debug!(peer = %peer, "metrics connection ended: {e}");
            }
            drop(permit);
        });
    }
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(respond(request.method(), request.uri().path()))
}

/// The response for a request line; the body of `/metrics` is the current exposition.
fn respond(method: &Method, path: &str) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if path != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: the metrics are at /metrics\n".into(),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET /metrics\n".into(),
        );
        if let Ok(value) = "GET, HEAD".parse() {
            response.headers_mut().insert(hyper::header::ALLOW, value);
        }
        return response;
    }
    crate::ops::metrics::global().set_log_lines_dropped(crate::ops::logging::dropped_lines());
    match crate::ops::metrics::global().encode() {
        Ok(body) => reply(StatusCode::OK, CONTENT_TYPE, body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            format!("cannot encode the metrics: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(respond(&Method::GET, "/metrics").status(), StatusCode::OK);
        assert_eq!(respond(&Method::HEAD, "/metrics").status(), StatusCode::OK);
        assert_eq!(respond(&Method::GET, "/").status(), StatusCode::NOT_FOUND);
        assert_eq!(
            respond(&Method::GET, "/metrics/x").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn vsock_is_refused() {
        let e = check_endpoint(&"vsock:9190".parse().unwrap(), "--metrics-listen").unwrap_err();
        assert!(e.contains("cannot listen on vsock"), "{e}");
        check_endpoint(&"tcp:127.0.0.1:9190".parse().unwrap(), "--metrics-listen").unwrap();
        check_endpoint(&"unix:/run/m.sock".parse().unwrap(), "--metrics-listen").unwrap();
    }
}
