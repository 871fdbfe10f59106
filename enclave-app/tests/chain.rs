//! The whole workshop chain through the real binaries, on stand-ins (see `support::chain`):
//! answers, caching, IPv6, a query split across writes, failures of the proxy and of the
//! allowlist, the last good copy answering while refreshes fail (up to --max-stale), certificate
//! checks, concurrency, a silent client and a large reply. Each test has its own network
//! namespace.

mod support;

use std::time::Duration;

use support::chain::{self, start_standin, Chain, Setup, NAME, SAMPLE, US_EAST_1, US_EAST_1_V6};
use support::netns::run_in_netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long to wait for a log line that must come.
const WAIT: Duration = Duration::from_secs(15);

#[test]
fn the_chain_answers_s3_prefixes_from_one_download() {
    run_in_netns(|| async {
        let chain = Chain::start(Setup::default()).await;

        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert_eq!(out.stdout, format!("{US_EAST_1}\n"));

        let out = chain.client("eu-west-1").await;
        assert_eq!(
            out.stdout, "[\"3.5.64.0/21\",\"52.218.0.0/17\",\"52.92.40.0/21\"]\n",
            "{out:?}"
        );
        let out = chain.client("mars-north-1").await;
        assert_eq!(out.code(), Some(0), "an unknown region is an answer");
        assert_eq!(out.stdout, "[]\n");

        assert_eq!(
            chain.wait_downloads(1).await,
            1,
            "three queries, one download"
        );
        let proxy = chain.proxy.as_ref().unwrap();
        assert_eq!(
            proxy
                .wait_lines(&["upstream=192.0.2.10:443", "end=completed"], 1)
                .await,
            1,
            "the download went through the proxy; its log:\n{}",
            proxy.logs()
        );
        assert_eq!(chain.server.wait_lines(&["answered"], 3).await, 3);

        let v6 = chain
            .start_server("server --ipv6", "server6.sock", &["--ipv6".to_owned()])
            .await;
        let endpoint = format!("unix:{}", chain.path("server6.sock").display());
        let out = chain::client(&endpoint, "us-east-1").await;
        assert_eq!(out.stdout, format!("{US_EAST_1_V6}\n"), "{out:?}");
        drop(v6);
    });
}

#[test]
fn the_chain_answers_through_a_connect_route() {
    run_in_netns(|| async {
        let chain = Chain::start(Setup {
            via_connect: true,
            ..Setup::default()
        })
        .await;
        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert_eq!(out.stdout, format!("{US_EAST_1}\n"));
        let proxy = chain.proxy.as_ref().unwrap();
        assert!(
            proxy
                .wait_lines(
                    &[
                        "route=unix:",
                        "upstream=192.0.2.10:443",
                        "connection closed"
                    ],
                    1
                )
                .await
                >= 1,
            "{}",
            proxy.logs()
        );
    });
}

#[test]
fn a_raw_query_is_trimmed_and_answered_without_a_half_close() {
    run_in_netns(|| async {
        let chain = Chain::start(Setup::default()).await;
        let mut conn = UnixStream::connect(chain.path("server.sock"))
            .await
            .unwrap();
        // As the workshop's client: one write, and the write side stays open.
        conn.write_all(b"  us-east-1\r\n").await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut reply))
            .await
            .expect("no reply")
            .unwrap();
        assert_eq!(String::from_utf8(reply).unwrap(), US_EAST_1);
    });
}

#[test]
fn a_query_split_across_writes_is_answered_whole() {
    run_in_netns(|| async {
        let chain = Chain::start(Setup::default()).await;
        let mut conn = UnixStream::connect(chain.path("server.sock"))
            .await
            .unwrap();
        conn.write_all(b"eu-").await.unwrap();
        // Longer than the server's pause after a region-shaped name: "eu-" is not one, so the
        // server must keep waiting rather than answer for "eu-".
        tokio::time::sleep(Duration::from_secs(1)).await;
        conn.write_all(b"west-1\n").await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut reply))
            .await
            .expect("no reply")
            .unwrap();
        assert_eq!(
            String::from_utf8(reply).unwrap(),
            r#"["3.5.64.0/21","52.218.0.0/17","52.92.40.0/21"]"#
        );
        assert!(
            chain.server.wait_for_log("query=\"eu-west-1\"", WAIT).await,
            "{}",
            chain.server.logs()
        );
    });
}

#[test]
fn proxy_down_gives_an_error_reply_and_the_next_query_works_once_it_is_up() {
    run_in_netns(|| async {
        let mut chain = Chain::start(Setup {
            start_proxy: false,
            ..Setup::default()
        })
        .await;

        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        assert!(
            out.stderr
                .contains("could not answer \"us-east-1\": cannot download https://ip-ranges.amazonaws.com/ip-ranges.json"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("nitro-vsock-proxy runs on the parent"),
            "says what to check: {}",
            out.stderr
        );
        assert_eq!(
            chain.server.wait_lines(&["WARN", "cannot answer"], 1).await,
            1
        );
        assert!(
            chain
                .forwarder
                .wait_for_log("cannot reach the parent's proxy", WAIT)
                .await,
            "{}",
            chain.forwarder.logs()
        );

        chain.start_proxy().await;
        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert_eq!(out.stdout, format!("{US_EAST_1}\n"));
        assert_eq!(chain.wait_downloads(1).await, 1);
    });
}

#[test]
fn a_failed_refresh_answers_from_the_last_good_copy_until_max_stale() {
    run_in_netns(|| async {
        let mut chain = Chain::start(Setup {
            server_args: vec![
                "--cache-ttl".into(),
                "1s".into(),
                "--max-stale".into(),
                "6s".into(),
            ],
            ..Setup::default()
        })
        .await;
        let out = chain.client("us-east-1").await;
        assert_eq!(out.stdout, format!("{US_EAST_1}\n"), "{out:?}");
        let downloaded = tokio::time::Instant::now();
        assert_eq!(chain.wait_downloads(1).await, 1);

        // The document's source goes away: every refresh from now on fails.
        chain.standin.signal(libc::SIGKILL);
        chain.standin.wait_exit(WAIT).await;
        // Past the TTL (1 s), well within TTL + max-stale (7 s).
        tokio::time::sleep_until(downloaded + Duration::from_millis(1500)).await;
        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert_eq!(
            out.stdout,
            format!("{US_EAST_1}\n"),
            "answered from the last good copy"
        );
        assert_eq!(
            chain
                .server
                .wait_lines(
                    &[
                        "WARN",
                        "refreshing the ranges document failed, answering from the last good copy"
                    ],
                    1
                )
                .await,
            1,
            "{}",
            chain.server.logs()
        );

        // Past TTL + max-stale: an explicit error, not stale data.
        tokio::time::sleep_until(downloaded + Duration::from_millis(7500)).await;
        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        assert!(
            out.stderr.contains("cannot download")
                && out.stderr.contains(
                    "more than --cache-ttl 1s plus --max-stale 6s, so it is no longer served"
                ),
            "{}",
            out.stderr
        );
    });
}

#[test]
fn an_endpoint_outside_the_allowlist_gives_an_error_reply() {
    run_in_netns(|| async {
        // The proxy starts while the name resolves inside the allowed block; then DNS moves it
        // to the stand-in's address, which the allowlist does not cover.
        let chain = Chain::start(Setup {
            allowlist: Some("allowlist:\n  - {address: 198.51.100.0/24, port: 443}\n".into()),
            dns_answer: "198.51.100.10".parse().unwrap(),
            dns_ttl: 0,
            ..Setup::default()
        })
        .await;
        chain.dns.set(NAME, &["192.0.2.10".parse().unwrap()], 0);

        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(
            out.stderr.contains("could not answer \"us-east-1\""),
            "{}",
            out.stderr
        );
        let proxy = chain.proxy.as_ref().unwrap();
        assert!(
            proxy.wait_for_log("192.0.2.10 denied", WAIT).await,
            "the proxy refused the address: {}",
            proxy.logs()
        );
        assert_eq!(
            chain.server.wait_lines(&["WARN", "cannot answer"], 1).await,
            1
        );
        assert!(
            !chain.standin.logs().contains("conn{"),
            "nothing reached the stand-in: {}",
            chain.standin.logs()
        );
    });
}

#[test]
fn an_untrusted_certificate_is_refused() {
    run_in_netns(|| async {
        let chain = Chain::start(Setup::default()).await;
        // Another throwaway CA, which did not sign the stand-in's certificate.
        let other_ca = chain.path("other-ca.pem");
        let _other = start_standin(
            other_ca.clone(),
            "127.0.0.1:8443",
            std::path::Path::new(SAMPLE),
        )
        .await;
        let _server = chain
            .start_server(
                "server with the wrong CA",
                "wrong-ca.sock",
                &["--ca-file".to_owned(), other_ca.display().to_string()],
            )
            .await;
        let endpoint = format!("unix:{}", chain.path("wrong-ca.sock").display());
        let out = chain::client(&endpoint, "us-east-1").await;
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(out.stderr.contains("certificate"), "{}", out.stderr);
        assert_eq!(chain.downloads(), 0);
    });
}

#[test]
fn fifty_clients_at_once_are_all_answered() {
    run_in_netns(|| async {
        let chain = Chain::start(Setup::default()).await;
        let endpoint = chain.server_endpoint();
        let clients: Vec<_> = (0..50)
            .map(|_| {
                let endpoint = endpoint.clone();
                tokio::spawn(async move { chain::client(&endpoint, "us-east-1").await })
            })
            .collect();
        for (i, c) in clients.into_iter().enumerate() {
            let out = c.await.unwrap();
            assert_eq!(out.code(), Some(0), "client {i}: {out:?}");
            assert_eq!(out.stdout, format!("{US_EAST_1}\n"), "client {i}");
        }
        assert_eq!(chain.server.wait_lines(&["answered"], 50).await, 50);
        assert_eq!(
            chain.wait_downloads(1).await,
            1,
            "the 50 queries shared one download"
        );
    });
}

#[test]
fn a_silent_client_does_not_delay_others() {
    run_in_netns(|| async {
        // A server that waits 300 s for a query: a server serving one client at a time would
        // hold the next client past its 30 s timeout.
        let chain = Chain::start(Setup {
            server_args: vec!["--client-timeout".into(), "300s".into()],
            ..Setup::default()
        })
        .await;
        let silent = UnixStream::connect(chain.path("server.sock"))
            .await
            .unwrap();

        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(0), "{out:?}");
        assert_eq!(out.stdout, format!("{US_EAST_1}\n"));

        let mut buf = [0u8; 16];
        let pending = silent.try_read(&mut buf);
        assert!(
            matches!(&pending, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the silent client's connection is still open and unanswered: {pending:?}"
        );
    });
}

#[test]
fn a_reply_larger_than_64_kib_arrives_whole() {
    run_in_netns(|| async {
        let prefixes: Vec<String> = (0..6000)
            .map(|i| format!("3.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let mut entries: Vec<serde_json::Value> = prefixes
            .iter()
            .map(|p| serde_json::json!({"ip_prefix": p, "region": "us-east-1", "service": "S3", "network_border_group": "us-east-1"}))
            .collect();
        entries.push(serde_json::json!({"ip_prefix": "44.192.0.0/11", "region": "us-east-1", "service": "EC2", "network_border_group": "us-east-1"}));
        let document = serde_json::to_vec(&serde_json::json!({
            "syncToken": "1", "createDate": "2024-01-01-00-00-00",
            "prefixes": entries, "ipv6_prefixes": []
        }))
        .unwrap();
        let chain = Chain::start(Setup {
            document: Some(document),
            ..Setup::default()
        })
        .await;

        let out = chain.client("us-east-1").await;
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        assert!(
            out.stdout.len() > 64 * 1024,
            "reply of {} bytes",
            out.stdout.len()
        );
        let got: Vec<String> = serde_json::from_str(out.stdout.trim_end()).unwrap();
        assert!(
            got == prefixes,
            "the reply differs from the document's prefixes"
        );
    });
}

/// Sends `query` as one write on a raw connection (no half-close) and reads the reply to EOF.
async fn raw_exchange(chain: &Chain, query: &[u8]) -> String {
    let mut conn = UnixStream::connect(chain.path("server.sock"))
        .await
        .unwrap();
    if !query.is_empty() {
        conn.write_all(query).await.unwrap();
    }
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut reply))
        .await
        .expect("no reply")
        .unwrap();
    String::from_utf8(reply).unwrap()
}

#[test]
fn bad_queries_and_silence_get_an_error_reply() {
    run_in_netns(|| async {
        let chain = Chain::start(Setup {
            server_args: vec!["--client-timeout".into(), "1s".into()],
            ..Setup::default()
        })
        .await;
        let error = |reply: &str| -> String {
            let value: serde_json::Value =
                serde_json::from_str(reply).unwrap_or_else(|e| panic!("not JSON ({e}): {reply:?}"));
            value["error"].as_str().unwrap_or_default().to_owned()
        };
        let silent = raw_exchange(&chain, b"").await;
        assert!(
            error(&silent).contains("no query received within 1s"),
            "{silent}"
        );
        let long = raw_exchange(&chain, &[b'a'; 1500]).await;
        assert!(error(&long).contains("query too long"), "{long}");
        let binary = raw_exchange(&chain, b"\xff\xfe\xfd").await;
        assert!(error(&binary).contains("not UTF-8"), "{binary}");
        let blank = raw_exchange(&chain, b" \n").await;
        assert!(error(&blank).contains("empty query"), "{blank}");
        let unfinished = raw_exchange(&chain, b"eu-").await;
        assert!(
            error(&unfinished).contains("the query did not end within 1s"),
            "{unfinished}"
        );
        assert_eq!(chain.downloads(), 0, "no query, no download");
        assert_eq!(chain.server.wait_lines(&["WARN"], 5).await, 5);
    });
}

#[test]
fn a_wrong_path_and_an_oversized_document_are_reported() {
    run_in_netns(|| async {
        let chain = Chain::start(Setup::default()).await;
        let cases = [
            (
                "wrong-path.sock",
                vec![
                    "--url".to_owned(),
                    "https://ip-ranges.amazonaws.com/nothing-here.json".to_owned(),
                ],
                "the server answered HTTP 404 Not Found",
            ),
            (
                "small-limit.sock",
                vec!["--max-document-size".to_owned(), "1000".to_owned()],
                "larger than --max-document-size (1000 bytes",
            ),
        ];
        for (sock, args, expected) in cases {
            let _server = chain.start_server(sock, sock, &args).await;
            let endpoint = format!("unix:{}", chain.path(sock).display());
            let out = chain::client(&endpoint, "us-east-1").await;
            assert_eq!(out.code(), Some(1), "{out:?}");
            assert!(out.stderr.contains(expected), "{}", out.stderr);
        }
    });
}
