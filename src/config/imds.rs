//! The instance's region and domain from the EC2 instance metadata service (IMDSv2).
//!
//! This module owns asking for the values of `{region}` and `{domain}` in a remote
//! ([`crate::config::remote`]: `kms.{region}.{domain}` becomes `kms.us-east-1.amazonaws.com`, or
//! `kms.cn-north-1.amazonaws.com.cn` in China), so a unit file can name "the KMS endpoint of this
//! instance's region" without a shell pipeline. The values come from IMDSv2 at start-up, once:
//!
//! 1. `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` → a session token;
//! 2. `GET /latest/meta-data/placement/region` and, if `{domain}` is used,
//!    `GET /latest/meta-data/services/domain`, each with `X-aws-ec2-metadata-token`.
//!
//! The client is a minimal HTTP/1.1 client over a tokio `TcpStream` (one request per connection,
//! `Connection: close`, a timeout on every request, a response size cap), enough for these three
//! requests and nothing else. The metadata service is reached at `--imds-endpoint` (default
//! `169.254.169.254:80`); tests point it at a stand-in. A failure is retried a few times, then
//! reported with what to check; the daemon exits 1 and systemd's `Restart=on-failure` tries again.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The metadata service's IPv4 address and port.
pub const DEFAULT_ENDPOINT: &str = "169.254.169.254:80";

/// The token is used for two requests right away.
const TOKEN_TTL_SECONDS: &str = "60";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Four attempts, 1 s, 2 s and 4 s apart: a metadata service that refuses at once still costs
/// a start 7 s, so that with the units' RestartSec=5s such starts stay under their start limit
/// (ten in 100 s) while a held listen port, which fails in about 2 s, reaches it.
const ATTEMPTS: u32 = 4;
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RESPONSE: usize = 16 * 1024;

/// What the metadata service said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    pub region: String,
    pub domain: String,
}

/// Asks the metadata service at `endpoint` for the region (and the domain if `with_domain`),
/// retrying a few times. `needed_by` names what needs it, for the error message.
pub async fn instance_info_with_retries(
    endpoint: SocketAddr,
    with_domain: bool,
    needed_by: &str,
) -> Result<InstanceInfo, String> {
    let mut attempt = 1;
    let mut retry_in = FIRST_RETRY_DELAY;
    loop {
        match instance_info(endpoint, with_domain).await {
            Ok(info) => return Ok(info),
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(
                    attempt,
                    retry_in = ?retry_in,
                    "instance metadata service at {endpoint}: {e}"
                );
                attempt += 1;
                tokio::time::sleep(retry_in).await;
                retry_in *= 2;
            }
            Err(e) => {
                return Err(format!(
                    "cannot read the instance's region for {needed_by} from the \
                     instance metadata service at {endpoint} ({ATTEMPTS} attempts): {e}. Is this \
                     an EC2 instance with the metadata service enabled (HttpEndpoint=enabled)? \
                     Otherwise write the region into the remote instead of the placeholders"
                ))
            }
        }
    }
}

async fn instance_info(endpoint: SocketAddr, with_domain: bool) -> Result<InstanceInfo, String> {
    let token = request(
        endpoint,
        "PUT",
        "/latest/api/token",
        ("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS),
    )
    .await?;
    let token = text(&token, "the session token")?;
    let header = ("X-aws-ec2-metadata-token", token.as_str());
    let region = request(
        endpoint,
        "GET",
        "/latest/meta-data/placement/region",
        header,
    )
    .await?;
    let region = text(&region, "the region")?;
    if !is_region(&region) {
        return Err(format!(
            "GET /latest/meta-data/placement/region answered {region:?}, which is not a region name"
        ));
    }
    let domain = if with_domain {
        let domain = request(endpoint, "GET", "/latest/meta-data/services/domain", header).await?;
        let domain = text(&domain, "the domain")?;
        if !is_domain(&domain) {
            return Err(format!(
                "GET /latest/meta-data/services/domain answered {domain:?}, which is not a domain"
            ));
        }
        domain
    } else {
        String::new()
    };
    Ok(InstanceInfo { region, domain })
}

fn text(body: &[u8], what: &str) -> Result<String, String> {
    let s = std::str::from_utf8(body)
        .map_err(|_| format!("{what} is not text"))?
        .trim();
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    Ok(s.to_owned())
}

fn is_region(s: &str) -> bool {
    (2..=40).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_domain(s: &str) -> bool {
    (1..=200).contains(&s.len())
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// One HTTP/1.1 request with an empty body; the response body if the status is 200.
async fn request(
    endpoint: SocketAddr,
    method: &str,
    path: &str,
    header: (&str, &str),
) -> Result<Vec<u8>, String> {
    let what = format!("{method} {path}");
    let exchange = async {
        let mut stream = TcpStream::connect(endpoint)
            .await
            .map_err(|e| format!("{what}: cannot connect: {e}"))?;
        let mut req = String::new();
        // Writing to a String cannot fail.
        let _ = write!(
            req,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{name}: {value}\r\n\
             Content-Length: 0\r\nConnection: close\r\nUser-Agent: nitro-vsock-proxy/{version}\r\n\r\n",
            host = endpoint.ip(),
            name = header.0,
            value = header.1,
            version = env!("CARGO_PKG_VERSION"),
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("{what}: cannot send: {e}"))?;
        let mut response = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE as u64 + 1)
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("{what}: cannot read the response: {e}"))?;
        if response.len() > MAX_RESPONSE {
            return Err(format!("{what}: response larger than {MAX_RESPONSE} bytes"));
        }
        Ok(response)
    };
    let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            format!(
                "{what}: no response within {REQUEST_TIMEOUT:?} (from a container, the \
                 instance's metadata hop limit may need to be 2)"
            )
        })??;
    let (status, body) = parse_response(&response).map_err(|e| format!("{what}: {e}"))?;
    match status {
        200 => Ok(body),
        401 => Err(format!("{what}: HTTP 401 (the session token was refused)")),
        403 => Err(format!(
            "{what}: HTTP 403 (the instance metadata service is disabled or this request is not allowed)"
        )),
        404 => Err(format!("{what}: HTTP 404 (no such metadata on this instance)")),
        other => Err(format!("{what}: HTTP {other}")),
    }
}

/// Parses an HTTP/1.x response: the status code and the body (by `Content-Length`, chunked
/// transfer coding, or up to the end of the connection).
fn parse_response(bytes: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let head_end = find(bytes, b"\r\n\r\n").ok_or("the response has no complete header")?;
    let head = std::str::from_utf8(&bytes[..head_end]).map_err(|_| "the header is not text")?;
    let body = &bytes[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("bad status line {status_line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or_else(|| format!("the body is shorter than its Content-Length {n}"))?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").ok_or("a chunk size line is cut off")?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or("a chunk is cut off")?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).ok_or("a chunk is cut off")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked() {
        assert!(is_region("us-east-1") && is_region("us-gov-west-1") && is_region("cn-north-1"));
        assert!(
            !is_region("us east") && !is_region("US-EAST-1") && !is_region("-x") && !is_region("")
        );
        assert!(is_domain("amazonaws.com") && is_domain("amazonaws.com.cn"));
        assert!(!is_domain("a..b") && !is_domain("a b") && !is_domain("evil.com/x"));
    }

    #[test]
    fn responses() {
        let ok =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nus-east-1";
        assert_eq!(parse_response(ok).unwrap(), (200, b"us-east-1".to_vec()));
        let until_close = b"HTTP/1.0 200 OK\r\n\r\neu-west-3";
        assert_eq!(parse_response(until_close).unwrap().1, b"eu-west-3");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab-c\r\n6;x=y\r\nentral\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().1, b"ab-central");
        let denied = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(denied).unwrap().0, 401);
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"[..],
            b"SMTP 220 hi\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
