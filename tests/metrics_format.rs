//! The metrics endpoint as tools read it, through the real binary, each test in its own network
//! namespace: a scrape asking for `text/plain;version=0.0.4` passes `promtool check metrics`
//! (every metric has its help, no lint), OpenMetrics only when asked; every outcome of a route
//! (one from start-up and one a reload adds) is there at 0; the reload gauges follow a bad and a
//! good SIGHUP; `process_*` hold sane values; `max_connections` is the flag; and `/healthz`
//! answers 200 `ok`, then 503 while a drain lasts.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::metrics::{fetch, fetch_with, scrape, value, ACCEPT_OPENMETRICS};
use common::netns::{add_lo_addr, run_in_netns};
use common::proxy::{connect, Proxy};
use common::upstream::echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const METRICS_URL: &str = "http://127.0.0.1:9190/metrics";
const HEALTHZ_URL: &str = "http://127.0.0.1:9190/healthz";
const ACCEPT_TEXT: &str = "Accept: text/plain;version=0.0.4";
const ROUTE: &str = "tcp:127.0.0.1:8001";
const ADDED_ROUTE: &str = "tcp:127.0.0.1:8002";

/// The outcomes every route shows at 0 from the start.
const OUTCOMES: [&str; 12] = [
    "completed",
    "idle_timeout",
    "client_error",
    "upstream_error",
    "denied",
    "dns_failure",
    "unreachable",
    "over_limit",
    "revoked",
    "setup_timeout",
    "max_lifetime",
    "drained",
];

const YAML: &str = "\
allowlist:
- {address: 192.0.2.10, port: 443}
routes:
- {listen: 'tcp:127.0.0.1:8001', remote: '192.0.2.10:443'}
metrics_listen: 'tcp:127.0.0.1:9190'
";

const YAML_TWO_ROUTES: &str = "\
allowlist:
- {address: 192.0.2.10, port: 443}
routes:
- {listen: 'tcp:127.0.0.1:8001', remote: '192.0.2.10:443'}
- {listen: 'tcp:127.0.0.1:8002', remote: '192.0.2.10:443'}
metrics_listen: 'tcp:127.0.0.1:9190'
";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Starts the daemon on `yaml` with `extra` options; waits for the route and the metrics.
async fn start(dir: &tempfile::TempDir, yaml: &str, extra: &[&str]) -> Proxy {
    let config = common::write_allowlist(dir, yaml);
    let mut args: Vec<String> = vec!["--config".into(), config];
    args.extend(extra.iter().map(|s| s.to_string()));
    let proxy = Proxy::spawn_with_env(&args, &[("RUST_LOG", "info")]);
    proxy.wait_ready(ROUTE).await;
    proxy.wait_ready("tcp:127.0.0.1:9190").await;
    proxy
}

/// `promtool check metrics` on `body`: its exit code and everything it printed.
fn promtool(body: &str) -> (i32, String) {
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run promtool (scripts/install-deps.sh installs Debian's prometheus)");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The `Content-Type` of a GET of `url` with `headers`.
fn content_type(url: &str, headers: &[&str]) -> String {
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{content_type}",
    ]);
    for header in headers {
        curl.args(["-H", header]);
    }
    let out = curl.arg(url).output().expect("cannot run curl");
    assert!(out.status.success(), "curl {url} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn outcome_key(route: &str, outcome: &str) -> String {
    format!("nitro_vsock_proxy_connections_total{{outcome=\"{outcome}\",route=\"{route}\"}}")
}

fn assert_outcomes_at_zero(s: &BTreeMap<String, f64>, route: &str) {
    for outcome in OUTCOMES {
        assert_eq!(
            s.get(&outcome_key(route, outcome)),
            Some(&0.0),
            "{route} {outcome}: {s:#?}"
        );
    }
}

const SUCCESSFUL: &str = "nitro_vsock_proxy_config_last_reload_successful{}";
const SUCCESS_AT: &str = "nitro_vsock_proxy_config_last_reload_success_timestamp_seconds{}";

#[test]
fn a_scrape_passes_promtool_and_holds_every_series() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let started = now();
        let proxy = start(&dir, YAML, &["--max-connections", "77"]).await;

        // Prometheus text 0.0.4 when asked for it, and without an Accept header: promtool is happy.
        let text = fetch_with(METRICS_URL, None, 200, &[ACCEPT_TEXT]);
        let (code, said) = promtool(&text);
        assert_eq!(code, 0, "promtool check metrics: {said}\n{text}");
        assert!(said.trim().is_empty(), "promtool said: {said}\n{text}");
        assert!(!said.contains("no help text"), "{said}");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            content_type(METRICS_URL, &[ACCEPT_TEXT]).starts_with("text/plain; version=0.0.4"),
            "{}",
            content_type(METRICS_URL, &[ACCEPT_TEXT])
        );
        let plain = fetch(METRICS_URL, None, 200);
        assert!(!plain.contains("# EOF"), "{plain}");
        assert_eq!(promtool(&plain).0, 0, "{plain}");

        // OpenMetrics only when asked.
        let open = fetch_with(METRICS_URL, None, 200, &[ACCEPT_OPENMETRICS]);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(
            content_type(METRICS_URL, &[ACCEPT_OPENMETRICS])
                .starts_with("application/openmetrics-text"),
            "{}",
            content_type(METRICS_URL, &[ACCEPT_OPENMETRICS])
        );

        // Every outcome at 0 from the start, the limit, the start-up load, process_*.
        let s = scrape(METRICS_URL, None);
        assert_outcomes_at_zero(&s, ROUTE);
        assert_eq!(
            value(&s, "nitro_vsock_proxy_max_connections{}"),
            77.0,
            "{s:#?}"
        );
        assert_eq!(value(&s, SUCCESSFUL), 1.0, "{s:#?}");
        let loaded_at = value(&s, SUCCESS_AT);
        assert!(
            loaded_at >= started - 1.0 && loaded_at <= now() + 1.0,
            "{loaded_at} {s:#?}"
        );
        let rss = value(&s, "process_resident_memory_bytes{}");
        assert!(
            rss > 1024.0 * 1024.0 && rss < 4096.0 * 1024.0 * 1024.0,
            "{s:#?}"
        );
        let open_fds = value(&s, "process_open_fds{}");
        let max_fds = value(&s, "process_max_fds{}");
        assert!(open_fds >= 3.0 && open_fds <= max_fds, "{s:#?}");
        assert!(max_fds >= 77.0, "{s:#?}");
        assert!(s.contains_key("process_cpu_seconds_total{}"), "{s:#?}");
        let cpu = value(&s, "process_cpu_seconds_total{}");
        assert!((0.0..3600.0).contains(&cpu), "{s:#?}");
        let start_time = value(&s, "process_start_time_seconds{}");
        assert!(
            start_time >= started - 5.0 && start_time <= now() + 1.0,
            "started at {started}: {s:#?}"
        );

        // A bad reload: 0, the last good one's time kept.
        let config = dir.path().join("allowlist.yaml");
        proxy
            .reload_with(&config, "allowlist: [", "reload failed", 1)
            .await;
        let s = scrape(METRICS_URL, None);
        assert_eq!(value(&s, SUCCESSFUL), 0.0, "{s:#?}");
        assert_eq!(value(&s, SUCCESS_AT), loaded_at, "{s:#?}");
        // A good one that adds a route: 1 again, a later time, the new route's outcomes at 0.
        tokio::time::sleep(Duration::from_millis(50)).await;
        proxy
            .reload_with(&config, YAML_TWO_ROUTES, "allowlist reloaded", 1)
            .await;
        proxy.wait_ready(ADDED_ROUTE).await;
        let s = scrape(METRICS_URL, None);
        assert_eq!(value(&s, SUCCESSFUL), 1.0, "{s:#?}");
        assert!(value(&s, SUCCESS_AT) > loaded_at, "{s:#?}");
        assert_outcomes_at_zero(&s, ROUTE);
        assert_outcomes_at_zero(&s, ADDED_ROUTE);
        let text = fetch_with(METRICS_URL, None, 200, &[ACCEPT_TEXT]);
        let (code, said) = promtool(&text);
        assert_eq!(code, 0, "promtool check metrics: {said}\n{text}");
    });
}

#[test]
fn healthz_is_ok_while_serving_and_503_while_draining() {
    run_in_netns(|| async {
        add_lo_addr(ip("192.0.2.10"));
        let _up = echo_server("192.0.2.10:443".parse().unwrap()).await;
        let dir = tempfile::tempdir().unwrap();
        let mut proxy = start(&dir, YAML, &["--drain-timeout", "10m"]).await;
        assert_eq!(fetch(HEALTHZ_URL, None, 200), "ok\n");

        // An open connection keeps the drain going after SIGTERM.
        let mut conn = connect(ROUTE).await;
        conn.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut echoed))
            .await
            .expect("the echo comes back")
            .unwrap();
        assert_eq!(&echoed, b"ping");
        proxy.signal(libc::SIGTERM);
        assert!(
            proxy
                .wait_for_log("stopping", Duration::from_secs(10))
                .await,
            "{}",
            proxy.logs()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let code = Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg(HEALTHZ_URL)
                .output()
                .unwrap();
            if String::from_utf8_lossy(&code.stdout) == "503" {
                break;
            }
            assert!(Instant::now() < deadline, "no 503: {}", proxy.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(fetch(HEALTHZ_URL, None, 503), "draining\n");
        assert!(proxy.is_running(), "the drain lasts: {}", proxy.logs());
        // The metrics are still served during the drain.
        let s = scrape(METRICS_URL, None);
        assert_eq!(
            value(
                &s,
                &format!("nitro_vsock_proxy_connections_open{{route=\"{ROUTE}\"}}")
            ),
            1.0,
            "{s:#?}"
        );

        // The connection ends: the drain is over, the daemon exits 0.
        drop(conn);
        let status = proxy.wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?}: {}",
            proxy.logs()
        );
    });
}
