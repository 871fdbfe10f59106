//! `mode: dns` through the real binary: a real DNS client (`dig +tcp`) and raw pipelined
//! queries over one stream connection, the in-process test DNS server as the parent's upstream
//! (answers and TTLs changed during the test). What the allowlist allows by name is answered,
//! without the special addresses; everything else is NXDOMAIN with EDE 15; HTTPS and SVCB are
//! NODATA; malformed input is FORMERR or a closed connection; the daemon keeps serving.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::dns::TestDns;
use common::netns::run_in_netns;
use common::proxy::{connect, Conn, Proxy};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTE: &str = "tcp:127.0.0.1:8053";
const METRICS: &str = "tcp:127.0.0.1:9190";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const CONFIG: &str = "\
allowlist:
  - {address: api.test, port: 443}
  - {address: '*.s3.test', port: 443}
  - {address: rebind.test, port: 443}
  - {address: mixed.test, port: 443}
  - {address: alias.test, port: 443}
  - {address: gone.test, port: 443}
  - {address: short.test, port: 8443}
  - {address: '*.slow.test', port: 443}
  - {address: pinned.test, port: 443}
  - {address: 192.0.2.50, port: 443}
  - {address: 127.0.0.7, port: 443}
routes:
  - {listen: 'tcp:127.0.0.1:8053', mode: dns}
  - {listen: 'tcp:127.0.0.1:8054', mode: dns, idle_timeout: 1s}
";

struct Setup {
    proxy: Proxy,
    dns: TestDns,
    _dir: tempfile::TempDir,
}

/// The test DNS server on 127.0.0.1:53 with every name of the test, and the proxy using it.
async fn setup() -> Setup {
    let dns = TestDns::start("127.0.0.1:53".parse().unwrap()).await;
    dns.set("api.test", &[ip("192.0.2.10"), ip("2001:db8::10")], 60);
    dns.set("bucket.s3.test", &[ip("192.0.2.20")], 60);
    dns.set("rebind.test", &[ip("169.254.169.254")], 60);
    // Loopback, the metadata service and an ordinary address; 127.0.0.7 is named by an IP
    // entry, so it stays.
    dns.set(
        "mixed.test",
        &[
            ip("127.0.0.1"),
            ip("192.0.2.30"),
            ip("169.254.169.254"),
            ip("127.0.0.7"),
        ],
        60,
    );
    dns.set_cname("alias.test", "api.test", 60);
    dns.set("unlisted.test", &[ip("192.0.2.10")], 60);
    // An address the allowlist names by IP does not make its name allowed.
    dns.set("byip.test", &[ip("192.0.2.50")], 60);
    dns.set("short.test", &[ip("192.0.2.40")], 2);
    dns.set("pinned.test", &[ip("192.0.2.60")], 3600);
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_allowlist(&dir, CONFIG);
    let proxy = Proxy::spawn(&[
        "--config",
        &config,
        "--nameserver",
        "127.0.0.1:53",
        "--dns-timeout",
        "1s",
        "--metrics-listen",
        METRICS,
    ]);
    proxy.wait_ready(ROUTE).await;
    proxy.wait_ready(METRICS).await;
    Setup {
        proxy,
        dns,
        _dir: dir,
    }
}

/// What `dig +tcp` printed for one query to the dns route (extra `args` after the name).
async fn dig(name: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new("dig")
        .args([
            "+tcp",
            "+tries=1",
            "+time=10",
            "-p",
            "8053",
            "@127.0.0.1",
            name,
        ])
        .args(args)
        .output()
        .await
        .expect("cannot run dig (scripts/install-deps.sh installs bind9-dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dig {name} {args:?} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn status(dig: &str) -> &str {
    dig.split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig's output: {dig}"))
}

/// The answer section's records as (name, TTL, type, data).
fn answers(dig: &str) -> Vec<(String, u32, String, String)> {
    let Some(section) = dig.split(";; ANSWER SECTION:\n").nth(1) else {
        return Vec::new();
    };
    section
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_owned(),
                f[1].parse().unwrap(),
                f[3].to_owned(),
                f[4].to_owned(),
            )
        })
        .collect()
}

fn addresses(dig: &str) -> Vec<String> {
    answers(dig)
        .into_iter()
        .map(|(_, _, _, data)| data)
        .collect()
}

fn still_serving(dig: &str) {
    assert_eq!(status(dig), "NOERROR", "{dig}");
    assert_eq!(addresses(dig), ["192.0.2.10"], "{dig}");
}

#[test]
fn allowed_names_are_answered_without_special_addresses_and_the_rest_is_blocked() {
    run_in_netns(|| async {
        let s = setup().await;

        // An exact name, A and AAAA, under the query name with the upstream's TTL at most.
        let a = dig("api.test", &["A"]).await;
        assert_eq!(status(&a), "NOERROR", "{a}");
        let records = answers(&a);
        assert_eq!(records.len(), 1, "{a}");
        assert_eq!(records[0].0, "api.test.");
        assert!(records[0].1 <= 60 && records[0].1 >= 50, "{a}");
        assert_eq!(
            (records[0].2.as_str(), records[0].3.as_str()),
            ("A", "192.0.2.10")
        );
        let aaaa = dig("api.test", &["AAAA"]).await;
        assert_eq!(addresses(&aaaa), ["2001:db8::10"], "{aaaa}");

        // A wildcard; names are case-insensitive.
        let w = dig("Bucket.S3.test", &["A"]).await;
        assert_eq!(addresses(&w), ["192.0.2.20"], "{w}");

        // The metadata service as an allowlisted name's only answer: NODATA, not the address.
        let r = dig("rebind.test", &["A"]).await;
        assert_eq!(status(&r), "NOERROR", "{r}");
        assert!(answers(&r).is_empty(), "{r}");
        // Loopback and the metadata service go; an ordinary address and a loopback address an
        // IP entry names stay.
        let m = dig("mixed.test", &["A"]).await;
        assert_eq!(addresses(&m), ["192.0.2.30", "127.0.0.7"], "{m}");

        // A CNAME chain: A records under the query name.
        let c = dig("alias.test", &["A"]).await;
        let records = answers(&c);
        assert_eq!(records.len(), 1, "{c}");
        assert_eq!(
            (
                records[0].0.as_str(),
                records[0].2.as_str(),
                records[0].3.as_str()
            ),
            ("alias.test.", "A", "192.0.2.10"),
            "{c}"
        );

        // Not allowed by name: NXDOMAIN whatever its addresses, with EDE 15 when the query
        // has EDNS (dig sends an OPT record by default), plain without.
        for name in [
            "unlisted.test",
            "byip.test",
            "s3.test",
            "never.resolved.example",
        ] {
            let b = dig(name, &["A"]).await;
            assert_eq!(status(&b), "NXDOMAIN", "{b}");
            assert!(
                b.contains("EDE: 15 (Blocked): (not in the allowlist)"),
                "{b}"
            );
            assert!(answers(&b).is_empty(), "{b}");
        }
        let plain = dig("unlisted.test", &["A", "+noedns"]).await;
        assert_eq!(status(&plain), "NXDOMAIN", "{plain}");
        assert!(!plain.contains("EDE"), "{plain}");
        assert!(!plain.contains("OPT PSEUDOSECTION"), "{plain}");
        // Blocked for every type.
        for t in ["AAAA", "TXT", "HTTPS", "MX"] {
            let b = dig("unlisted.test", &[t]).await;
            assert_eq!(status(&b), "NXDOMAIN", "{t}: {b}");
        }

        // HTTPS and SVCB of an allowed name: NODATA (no ECH configurations, no alternative
        // endpoints); other types too.
        for t in ["HTTPS", "SVCB", "TXT", "MX"] {
            let n = dig("api.test", &[t]).await;
            assert_eq!(status(&n), "NOERROR", "{t}: {n}");
            assert!(answers(&n).is_empty(), "{t}: {n}");
        }

        // PTR and another class: REFUSED.
        let ptr = dig("10.2.0.192.in-addr.arpa", &["PTR"]).await;
        assert_eq!(status(&ptr), "REFUSED", "{ptr}");
        let chaos = dig("version.bind", &["CH", "TXT"]).await;
        assert_eq!(status(&chaos), "REFUSED", "{chaos}");

        // Upstream NXDOMAIN for an allowed name stays NXDOMAIN, without EDE.
        let gone = dig("gone.test", &["A"]).await;
        assert_eq!(status(&gone), "NXDOMAIN", "{gone}");
        assert!(!gone.contains("EDE"), "{gone}");

        // Blocked queries are audit events, rate-limited like other refusals.
        assert!(
            s.proxy
                .wait_for_log("reason=\"dns_blocked\"", Duration::from_secs(5))
                .await,
            "{}",
            s.proxy.logs()
        );
        assert!(
            s.proxy.logs().contains(
                "DNS query blocked: unlisted.test A is not in the allowlist (answered NXDOMAIN)"
            ),
            "{}",
            s.proxy.logs()
        );

        // Every answer is counted by its result.
        let metrics = common::metrics::scrape("http://127.0.0.1:9190/metrics", None);
        let count = |result: &str| {
            metrics[&format!(
                "nitro_vsock_proxy_dns_queries_total{{result=\"{result}\",route=\"{ROUTE}\"}}"
            )]
        };
        assert_eq!(count("blocked"), 9.0, "{metrics:#?}");
        assert_eq!(count("refused"), 2.0);
        assert_eq!(count("nxdomain"), 1.0);
        assert_eq!(count("nodata"), 5.0);
        assert_eq!(count("answered"), 5.0);
        assert_eq!(count("formerr"), 0.0);
        assert_eq!(count("servfail"), 0.0);

        still_serving(&dig("api.test", &["A"]).await);
    });
}

#[test]
fn answers_follow_the_upstream_s_changes_and_ttls_and_a_dead_upstream_is_servfail() {
    run_in_netns(|| async {
        let mut s = setup().await;
        // TTL 2 upstream: given as at most 2, and the next answer after it runs out is new.
        let first = dig("short.test", &["A"]).await;
        assert_eq!(addresses(&first), ["192.0.2.40"], "{first}");
        assert!(answers(&first)[0].1 <= 2, "{first}");
        s.dns.set("short.test", &[ip("192.0.2.41")], 2);
        // Cached until its TTL runs out.
        let cached = dig("short.test", &["A"]).await;
        assert_eq!(addresses(&cached), ["192.0.2.40"], "{cached}");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let changed = dig("short.test", &["A"]).await;
        assert_eq!(addresses(&changed), ["192.0.2.41"], "{changed}");

        // A long upstream TTL is given as at most 300 s.
        let pinned = dig("pinned.test", &["A"]).await;
        let ttl = answers(&pinned)[0].1;
        assert!((290..=300).contains(&ttl), "{pinned}");

        // The upstream changes its answer to the metadata address: the name is answered
        // NODATA once its TTL runs out.
        s.dns.set("short.test", &[ip("169.254.169.254")], 2);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let rebound = dig("short.test", &["A"]).await;
        assert_eq!(status(&rebound), "NOERROR", "{rebound}");
        assert!(answers(&rebound).is_empty(), "{rebound}");

        // No upstream at all: SERVFAIL with EDE 22 (timeout) when EDNS is on.
        s.dns.stop().await;
        let dead = dig("bucket.s3.test", &["A"]).await;
        assert_eq!(status(&dead), "SERVFAIL", "{dead}");
        assert!(dead.contains("EDE: 22 (No Reachable Authority)"), "{dead}");
        s.dns.restart().await;
        still_serving(&dig("api.test", &["A"]).await);
    });
}

// ---- raw queries over one stream connection -------------------------------------------------

fn query(id: u16, name: &str, record_type: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    if edns {
        m.set_edns(Edns::new());
    }
    m.to_vec().unwrap()
}

async fn send(conn: &mut Conn, message: &[u8]) {
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    conn.write_all(&framed).await.unwrap();
}

/// The next answer on the connection, or `None` at EOF.
async fn receive(conn: &mut Conn) -> Option<Message> {
    let mut len = [0u8; 2];
    match tokio::time::timeout(Duration::from_secs(20), conn.read_exact(&mut len)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return None,
        Err(_) => panic!("no answer within 20 s"),
    }
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    conn.read_exact(&mut body).await.unwrap();
    Some(Message::from_vec(&body).unwrap())
}

fn a_records(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn pipelined_queries_are_answered_as_they_complete_with_their_ids() {
    run_in_netns(|| async {
        let s = setup().await;
        s.dns.set("late.slow.test", &[ip("192.0.2.70")], 60);
        s.dns
            .set_delay("late.slow.test", Duration::from_millis(700));
        let mut conn = connect(ROUTE).await;
        // The slow one first, then two that are answered at once.
        send(
            &mut conn,
            &query(101, "late.slow.test.", RecordType::A, false),
        )
        .await;
        send(&mut conn, &query(102, "api.test.", RecordType::A, false)).await;
        send(
            &mut conn,
            &query(103, "unlisted.test.", RecordType::A, true),
        )
        .await;
        let mut order = Vec::new();
        let mut by_id = HashMap::new();
        for _ in 0..3 {
            let m = receive(&mut conn).await.expect("an answer");
            order.push(m.metadata.id);
            by_id.insert(m.metadata.id, m);
        }
        assert_eq!(order[2], 101, "the slow answer came last: {order:?}");
        assert_eq!(a_records(&by_id[&101]), [ip("192.0.2.70")]);
        assert_eq!(a_records(&by_id[&102]), [ip("192.0.2.10")]);
        assert_eq!(by_id[&103].metadata.response_code, ResponseCode::NXDomain);
        for m in by_id.values() {
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert_eq!(m.queries.len(), 1);
        }
        // EDE 15 rides in the OPT record of the query that had one.
        let opt = by_id[&103]
            .edns
            .as_ref()
            .expect("an OPT record in the answer");
        let ede = opt
            .options()
            .as_ref()
            .iter()
            .find_map(|(code, option)| (u16::from(*code) == 15).then_some(option.clone()))
            .expect("an Extended DNS Error option");
        let hickory_proto::rr::rdata::opt::EdnsOption::Unknown(_, ede) = ede else {
            panic!("the EDE option parsed as a known option: {ede:?}");
        };
        assert_eq!(&ede[..2], &15u16.to_be_bytes());
        assert_eq!(&ede[2..], b"not in the allowlist");
        assert!(
            by_id[&102].edns.is_none(),
            "no OPT record without one in the query"
        );
    });
}

#[test]
fn the_sixty_fifth_outstanding_query_waits_for_a_slot() {
    run_in_netns(|| async {
        let s = setup().await;
        for i in 0..64 {
            let name = format!("q{i}.slow.test");
            s.dns.set(&name, &[ip("192.0.2.80")], 60);
            s.dns.set_delay(&name, Duration::from_millis(700));
        }
        let mut conn = connect(ROUTE).await;
        for i in 0..64u16 {
            send(
                &mut conn,
                &query(i, &format!("q{i}.slow.test."), RecordType::A, false),
            )
            .await;
        }
        // The 65th is answerable at once, but 64 are outstanding: it waits for one of them.
        send(&mut conn, &query(999, "api.test.", RecordType::A, false)).await;
        let first = receive(&mut conn).await.expect("an answer");
        assert_ne!(
            first.metadata.id, 999,
            "the 65th query was answered before any of the 64 outstanding ones"
        );
        let mut seen = vec![first.metadata.id];
        while seen.len() < 65 {
            seen.push(receive(&mut conn).await.expect("an answer").metadata.id);
        }
        seen.sort_unstable();
        let mut want: Vec<u16> = (0..64).collect();
        want.push(999);
        assert_eq!(seen, want);
    });
}

#[test]
fn a_thousand_queries_over_one_connection_each_get_their_answer() {
    run_in_netns(|| async {
        let _s = setup().await;
        let conn = connect(ROUTE).await;
        let (mut rd, mut wr) = tokio::io::split(conn);
        let names = [
            "api.test.",
            "bucket.s3.test.",
            "unlisted.test.",
            "rebind.test.",
        ];
        let writer = tokio::spawn(async move {
            for id in 0..1000u16 {
                let q = query(id, names[id as usize % 4], RecordType::A, false);
                let mut framed = (q.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&q);
                wr.write_all(&framed).await.unwrap();
            }
            wr
        });
        let mut seen = vec![false; 1000];
        for _ in 0..1000 {
            let mut len = [0u8; 2];
            tokio::time::timeout(Duration::from_secs(30), rd.read_exact(&mut len))
                .await
                .expect("an answer within 30 s")
                .unwrap();
            let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
            rd.read_exact(&mut body).await.unwrap();
            let m = Message::from_vec(&body).unwrap();
            let id = m.metadata.id;
            assert!(!seen[id as usize], "two answers for id {id}");
            seen[id as usize] = true;
            let asked = m.queries[0].name().to_ascii();
            assert_eq!(
                asked,
                names[id as usize % 4],
                "id {id} answered for another name"
            );
            match id % 4 {
                0 => assert_eq!(a_records(&m), [ip("192.0.2.10")]),
                1 => assert_eq!(a_records(&m), [ip("192.0.2.20")]),
                2 => assert_eq!(m.metadata.response_code, ResponseCode::NXDomain),
                _ => {
                    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
                    assert!(m.answers.is_empty());
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
        let _wr = writer.await.unwrap();
    });
}

#[test]
fn malformed_input_is_formerr_or_closes_and_the_daemon_keeps_serving() {
    run_in_netns(|| async {
        let mut s = setup().await;

        // A readable header and garbage after it: FORMERR to that id.
        let mut conn = connect(ROUTE).await;
        let mut bad = query(4242, "api.test.", RecordType::A, false);
        bad.truncate(12);
        bad[5] = 1; // one question announced, none there
        bad.extend_from_slice(&[0xff; 7]);
        send(&mut conn, &bad).await;
        let m = receive(&mut conn).await.expect("a FORMERR answer");
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // The connection still answers after it.
        send(&mut conn, &query(7, "api.test.", RecordType::A, false)).await;
        assert_eq!(
            a_records(&receive(&mut conn).await.unwrap()),
            [ip("192.0.2.10")]
        );

        // Not even a header: the connection closes.
        let mut conn = connect(ROUTE).await;
        send(&mut conn, &[1, 2, 3, 4, 5]).await;
        assert!(
            receive(&mut conn).await.is_none(),
            "expected the connection closed"
        );

        // A query over 4 KiB: closed.
        let mut conn = connect(ROUTE).await;
        let mut big = 5000u16.to_be_bytes().to_vec();
        big.extend_from_slice(&[0u8; 5000]);
        let _ = conn.write_all(&big).await;
        assert!(
            receive(&mut conn).await.is_none(),
            "expected the connection closed"
        );

        // A response sent as a query, and two questions: FORMERR.
        let mut conn = connect(ROUTE).await;
        let mut response = Message::new(9, MessageType::Response, OpCode::Query);
        response.add_query(Query::query(
            Name::from_ascii("api.test.").unwrap(),
            RecordType::A,
        ));
        send(&mut conn, &response.to_vec().unwrap()).await;
        assert_eq!(
            receive(&mut conn).await.unwrap().metadata.response_code,
            ResponseCode::FormErr
        );
        let mut two = Message::new(10, MessageType::Query, OpCode::Query);
        two.add_query(Query::query(
            Name::from_ascii("api.test.").unwrap(),
            RecordType::A,
        ));
        two.add_query(Query::query(
            Name::from_ascii("bucket.s3.test.").unwrap(),
            RecordType::A,
        ));
        send(&mut conn, &two.to_vec().unwrap()).await;
        let m = receive(&mut conn).await.unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (10, ResponseCode::FormErr)
        );

        let metrics = common::metrics::scrape("http://127.0.0.1:9190/metrics", None);
        let formerr = metrics[&format!(
            "nitro_vsock_proxy_dns_queries_total{{result=\"formerr\",route=\"{ROUTE}\"}}"
        )];
        assert_eq!(formerr, 4.0, "{metrics:#?}");
        assert!(s.proxy.is_running(), "{}", s.proxy.logs());
        still_serving(&dig("api.test", &["A"]).await);
    });
}

#[test]
fn an_idle_connection_is_closed_and_check_config_shows_the_route() {
    run_in_netns(|| async {
        let s = setup().await;
        // The second route's idle_timeout is 1 s (the default is 30 s).
        let mut conn = connect("tcp:127.0.0.1:8054").await;
        send(&mut conn, &query(1, "api.test.", RecordType::A, false)).await;
        assert!(receive(&mut conn).await.is_some());
        let started = Instant::now();
        assert!(
            receive(&mut conn).await.is_none(),
            "expected the idle connection closed"
        );
        let idle = started.elapsed();
        assert!(idle >= Duration::from_millis(900), "closed after {idle:?}");
        assert!(
            s.proxy
                .wait_for_log("end=idle_timeout", Duration::from_secs(5))
                .await,
            "{}",
            s.proxy.logs()
        );

        let out = common::run_to_exit(
            &[
                "--config",
                &s._dir.path().join("allowlist.yaml").display().to_string(),
                "--check-config",
            ],
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(
            text.contains("route tcp:127.0.0.1:8053 -> dns (names the allowlist allows by name)"),
            "{text}"
        );
    });
}
