//! The metrics endpoint: `GET /metrics` in the Prometheus text format over HTTP/1.1 (hyper), and
//! `GET /healthz`.
//!
//! This module owns the `--metrics-listen` (or `metrics_listen:`) listener: which addresses it
//! accepts (`tcp:IP:PORT` or `unix:PATH`, never vsock: the metrics are for the parent's
//! Prometheus, not for enclaves), and the small HTTP service on it: `GET` (or `HEAD`)
//! `/metrics` answers 200 with [`crate::ops::metrics::Metrics::encode`] (Prometheus text 0.0.4),
//! or [`crate::ops::metrics::Metrics::encode_openmetrics`] when the `Accept` header asks for
//! `application/openmetrics-text`; `/healthz` answers 200 `ok` while the daemon serves and 503
//! `draining` once it stops ([`set_draining`], set by the daemon on SIGTERM); any other path 404,
//! any other method 405. A scrape is bounded: at most [`MAX_SCRAPERS`] connections at
//! once, [`HEADER_TIMEOUT`] to send the request head; a failed or slow scraper is dropped and
//! logged at debug, never affecting the proxy.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Set once the daemon stops: `/healthz` answers 503 from then on.
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Marks the daemon as draining (after SIGTERM or SIGINT): `/healthz` answers 503 from now on.
pub fn set_draining() {
    DRAINING.store(true, Ordering::Relaxed);
}

/// Whether [`set_draining`] was called.
pub fn draining() -> bool {
    DRAINING.load(Ordering::Relaxed)
}

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
        endpoint.bind_error(
            "listen for metrics",
            &e,
            "another process on that address? change --metrics-listen / metrics_listen:",
        )
    })
}

/// Serves scrapes on `listener` forever.
pub async fn serve(listener: Listener) {
    let at = listener
        .local_endpoint()
        .map(|e| e.to_string())
        .unwrap_or_default();
    info!(listen = %at, "serving metrics at GET /metrics, health at GET /healthz");
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
    let openmetrics = wants_openmetrics(request.headers().get_all(hyper::header::ACCEPT));
    Ok(respond(
        request.method(),
        request.uri().path(),
        openmetrics,
        draining(),
    ))
}

/// Whether an `Accept` header asks for OpenMetrics: any of its values names
/// `application/openmetrics-text` (Prometheus sends it first, with a higher q). Anything else,
/// `text/plain;version=0.0.4` or no header at all, gets the Prometheus text format.
fn wants_openmetrics(accept: hyper::header::GetAll<'_, hyper::header::HeaderValue>) -> bool {
    accept.iter().any(|value| {
        value
            .to_str()
            .map(|v| {
                v.to_ascii_lowercase()
                    .contains("application/openmetrics-text")
            })
            .unwrap_or(false)
    })
}

/// The response for a request line; the body of `/metrics` is the current exposition, in
/// OpenMetrics if `openmetrics`; `/healthz` says whether the daemon is `draining`.
fn respond(
    method: &Method,
    path: &str,
    openmetrics: bool,
    draining: bool,
) -> Response<Full<Bytes>> {
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
    if path != "/metrics" && path != "/healthz" {
        return reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: the metrics are at /metrics, the health check at /healthz\n".into(),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            format!("only GET {path}\n"),
        );
        if let Ok(value) = "GET, HEAD".parse() {
            response.headers_mut().insert(hyper::header::ALLOW, value);
        }
        return response;
    }
    if path == "/healthz" {
        return if draining {
            reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "draining\n".into())
        } else {
            reply(StatusCode::OK, TEXT, "ok\n".into())
        };
    }
    let metrics = crate::ops::metrics::global();
    metrics.set_log_lines_dropped(crate::ops::logging::dropped_lines());
    let (encoded, content_type) = if openmetrics {
        (
            metrics.encode_openmetrics(),
            crate::ops::metrics::OPENMETRICS_CONTENT_TYPE,
        )
    } else {
        (
            metrics.encode(),
            crate::ops::metrics::PROMETHEUS_CONTENT_TYPE,
        )
    };
    match encoded {
        Ok(body) => reply(StatusCode::OK, content_type, body),
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

    fn status(method: Method, path: &str) -> StatusCode {
        respond(&method, path, false, false).status()
    }

    #[test]
    fn only_get_metrics_and_healthz_are_served() {
        assert_eq!(status(Method::GET, "/metrics"), StatusCode::OK);
        assert_eq!(status(Method::HEAD, "/metrics"), StatusCode::OK);
        assert_eq!(status(Method::GET, "/healthz"), StatusCode::OK);
        assert_eq!(status(Method::GET, "/"), StatusCode::NOT_FOUND);
        assert_eq!(status(Method::GET, "/metrics/x"), StatusCode::NOT_FOUND);
        assert_eq!(
            status(Method::POST, "/metrics"),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            status(Method::POST, "/healthz"),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            respond(&Method::GET, "/healthz", false, true).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        let pick = |values: &[&str]| {
            let mut headers = hyper::HeaderMap::new();
            for v in values {
                headers.append(hyper::header::ACCEPT, v.parse().unwrap());
            }
            wants_openmetrics(headers.get_all(hyper::header::ACCEPT))
        };
        assert!(!pick(&[]));
        assert!(!pick(&["text/plain;version=0.0.4"]));
        assert!(!pick(&["*/*"]));
        assert!(pick(&["application/openmetrics-text;version=1.0.0"]));
        assert!(pick(&[
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4"
        ]));
        assert!(pick(&["text/plain", "Application/OpenMetrics-Text"]));
        let content_type = |openmetrics| {
            respond(&Method::GET, "/metrics", openmetrics, false).headers()
                [hyper::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned()
        };
        assert!(content_type(false).starts_with("text/plain; version=0.0.4"));
        assert!(content_type(true).starts_with("application/openmetrics-text"));
    }

    #[test]
    fn vsock_is_refused() {
        let e = check_endpoint(&"vsock:9190".parse().unwrap(), "--metrics-listen").unwrap_err();
        assert!(e.contains("cannot listen on vsock"), "{e}");
        check_endpoint(&"tcp:127.0.0.1:9190".parse().unwrap(), "--metrics-listen").unwrap();
        check_endpoint(&"unix:/run/m.sock".parse().unwrap(), "--metrics-listen").unwrap();
    }
}
