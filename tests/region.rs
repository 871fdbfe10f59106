//! REMOTE_ADDR `kms.{region}.{domain}` filled from the instance metadata service (IMDSv2)
//! through the real binary, with the shipped default allowlist (`config/vsock-proxy.yaml`), as the
//! `nitro-vsock-proxy.service` unit runs it. The metadata service is a stand-in inside the test's
//! own network namespace, on 169.254.169.254:80 added to that namespace's `lo` (never the real
//! one) or on 127.0.0.1; failures exit 1 with what to check, so systemd retries.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dns::TestDns;
use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, run_to_exit, Proxy};
use common::upstream::echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const LISTEN: &str = "tcp:127.0.0.1:8001";
const TOKEN: &str = "AQAEAFakeTokenForTests==";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// What the stand-in metadata service answers.
#[derive(Clone)]
enum Imds {
    Instance {
        region: &'static str,
        domain: &'static str,
    },
    RefuseToken,
}

/// A stand-in IMDSv2: a token for `PUT /latest/api/token` with a TTL header, metadata only for
/// requests carrying that token. Records each request's head.
async fn imds(addr: SocketAddr, behaviour: Imds) -> Arc<Mutex<Vec<String>>> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let behaviour = behaviour.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                log.lock().unwrap().push(head.clone());
                let line = head.lines().next().unwrap_or_default().to_owned();
                let has = |h: &str| head.to_ascii_lowercase().contains(&h.to_ascii_lowercase());
                let token_ok = has(&format!("X-aws-ec2-metadata-token: {TOKEN}"));
                let (code, body) = match (&behaviour, line.as_str()) {
                    (Imds::RefuseToken, _) => (403, "Forbidden".to_owned()),
                    (_, "PUT /latest/api/token HTTP/1.1")
                        if has("X-aws-ec2-metadata-token-ttl-seconds: ") =>
                    {
                        (200, TOKEN.to_owned())
                    }
                    (_, _) if !token_ok => (401, "Unauthorized".to_owned()),
                    (
                        Imds::Instance { region, .. },
                        "GET /latest/meta-data/placement/region HTTP/1.1",
                    ) => (200, region.to_string()),
                    (
                        Imds::Instance { domain, .. },
                        "GET /latest/meta-data/services/domain HTTP/1.1",
                    ) => (200, domain.to_string()),
                    _ => (404, "Not Found".to_owned()),
                };
                let reply = format!(
                    "HTTP/1.1 {code} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    seen
}

#[test]
fn kms_endpoint_of_the_instance_region_with_the_shipped_allowlist() {
    run_in_netns(|| async {
        add_lo_addr(ip("169.254.169.254"));
        add_lo_addr(ip("192.0.2.10"));
        let requests = imds(
            "169.254.169.254:80".parse().unwrap(),
            Imds::Instance {
                region: "cn-north-1",
                domain: "amazonaws.com.cn",
            },
        )
        .await;
        let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
        dns.set("kms.cn-north-1.amazonaws.com.cn", &[ip("192.0.2.10")], 60);
        let up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vsock-proxy.yaml");

        // The default --imds-endpoint, 169.254.169.254:80 — the stand-in in this namespace.
        let proxy = Proxy::spawn(&[
            LISTEN,
            "kms.{region}.{domain}",
            "443",
            "--config",
            config,
            "--nameserver",
            "127.0.0.1:53",
        ]);
        proxy.wait_ready(LISTEN).await;
        assert!(
            proxy
                .logs()
                .contains("remote=kms.cn-north-1.amazonaws.com.cn"),
            "{}",
            proxy.logs()
        );
        let reply = connect(LISTEN)
            .await
            .round_trip(b"to KMS in Beijing", Duration::from_secs(10))
            .await
            .expect("no reply through the proxy");
        assert_eq!(reply, b"to KMS in Beijing");
        assert_eq!(up.accepted(), 1);

        let requests = requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 3, "{requests:#?}");
        assert!(requests[0].starts_with("PUT /latest/api/token HTTP/1.1\r\n"));
        assert!(requests[0].contains("X-aws-ec2-metadata-token-ttl-seconds: "));
        assert!(requests[1].starts_with("GET /latest/meta-data/placement/region HTTP/1.1\r\n"));
        assert!(requests[2].starts_with("GET /latest/meta-data/services/domain HTTP/1.1\r\n"));
        for r in &requests[1..] {
            assert!(
                r.contains(&format!("X-aws-ec2-metadata-token: {TOKEN}")),
                "{r}"
            );
        }

        // Without {domain}, the domain is not asked for; a region whose KMS endpoint the shipped
        // allowlist lists is accepted.
        drop(proxy);
        let requests = imds(
            "127.0.0.1:8080".parse().unwrap(),
            Imds::Instance {
                region: "eu-central-2",
                domain: "unused",
            },
        )
        .await;
        let proxy = Proxy::spawn(&[
            "tcp:127.0.0.1:8002",
            "kms-fips.{region}.amazonaws.com",
            "443",
            "--config",
            config,
            "--imds-endpoint",
            "127.0.0.1:8080",
        ]);
        proxy.wait_ready("tcp:127.0.0.1:8002").await;
        assert!(
            proxy
                .logs()
                .contains("remote=kms-fips.eu-central-2.amazonaws.com"),
            "{}",
            proxy.logs()
        );
        assert_eq!(requests.lock().unwrap().len(), 2);
    });
}

#[test]
fn metadata_failures_exit_1_and_say_what_to_check() {
    run_in_netns(|| async {
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vsock-proxy.yaml");
        let run = |endpoint: &str| {
            run_to_exit(
                &[
                    LISTEN,
                    "kms.{region}.{domain}",
                    "443",
                    "--config",
                    config,
                    "--imds-endpoint",
                    endpoint,
                ],
                Duration::from_secs(30),
            )
        };

        // Nothing listens.
        let out = run("127.0.0.1:9");
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        for needle in [
            "instance metadata service at 127.0.0.1:9",
            "kms.{region}.{domain}",
            "4 attempts",
            "PUT /latest/api/token: cannot connect",
            "HttpEndpoint=enabled",
        ] {
            assert!(
                out.stderr.contains(needle),
                "{needle:?} missing: {}",
                out.stderr
            );
        }
        assert!(!common::proxy::is_listening(LISTEN));

        // The metadata service refuses.
        let _refusing = imds("127.0.0.1:8081".parse().unwrap(), Imds::RefuseToken).await;
        let out = run("127.0.0.1:8081");
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        assert!(out.stderr.contains("HTTP 403"), "{}", out.stderr);

        // It answers something that is not a region.
        let _odd = imds(
            "127.0.0.1:8082".parse().unwrap(),
            Imds::Instance {
                region: "us east 1",
                domain: "amazonaws.com",
            },
        )
        .await;
        let out = run("127.0.0.1:8082");
        assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
        assert!(out.stderr.contains("not a region name"), "{}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    });
}
