//! Scraping the daemon's `/metrics` as Prometheus would: curl fetches it, and Prometheus' own
//! OpenMetrics parser (python3-prometheus-client) parses it — a malformed exposition fails the
//! test instead of being read leniently.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

/// Prints each sample as `name{k="v",...} value`, labels sorted, after a strict parse.
const PARSE: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        print("%s{%s} %r" % (s.name, labels, float(s.value)))
"#;

/// The OpenMetrics `Accept` header, as Prometheus sends it (without it the daemon answers in the
/// Prometheus text format 0.0.4).
pub const ACCEPT_OPENMETRICS: &str =
    "Accept: application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4";

/// The samples of one scrape of `url` (with `--unix-socket PATH` when `unix` is given), asked for
/// in OpenMetrics.
pub fn scrape(url: &str, unix: Option<&str>) -> BTreeMap<String, f64> {
    let body = fetch_with(url, unix, 200, &[ACCEPT_OPENMETRICS]);
    let mut parse = Command::new("/usr/bin/python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run /usr/bin/python3 (scripts/install-deps.sh installs python3-prometheus-client)");
    {
        use std::io::Write;
        let mut stdin = parse.stdin.take().expect("python stdin");
        stdin
            .write_all(body.as_bytes())
            .expect("write to the parser");
    }
    let out = parse.wait_with_output().expect("the parser ran");
    assert!(
        out.status.success(),
        "the OpenMetrics parser rejected the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// GETs `url` and returns the body, asserting the HTTP status.
pub fn fetch(url: &str, unix: Option<&str>, status: u16) -> String {
    fetch_with(url, unix, status, &[])
}

/// GETs `url` with the given request `headers` (`Name: value`) and returns the body, asserting
/// the HTTP status.
pub fn fetch_with(url: &str, unix: Option<&str>, status: u16, headers: &[&str]) -> String {
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"]);
    for header in headers {
        curl.args(["-H", header]);
    }
    if let Some(path) = unix {
        curl.args(["--unix-socket", path]);
    }
    let out = curl.arg(url).output().expect("cannot run curl");
    assert!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    assert_eq!(code, status.to_string(), "GET {url}: {body}");
    body.to_owned()
}

/// The value of `name{labels}` (labels as written by [`scrape`], sorted), or 0 if absent.
pub fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(0.0)
}
