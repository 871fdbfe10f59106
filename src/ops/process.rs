//! The `process_*` metrics, as every Prometheus client library names them, read from `/proc` at
//! each scrape: `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_cpu_seconds_total` and `process_start_time_seconds`.
//!
//! Each scrape reads a few small procfs files (`/proc/self/stat`, `/proc/self/status`,
//! `/proc/self/limits`; `/proc/stat` once, for the boot time) and lists `/proc/self/fd`: no I/O
//! that can block for long, and every read is capped at [`MAX_READ`] bytes. A value that cannot
//! be read is left out of the scrape, never an error.

use std::io::{BufRead, BufReader, Read};
use std::sync::OnceLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The most read from one procfs file.
const MAX_READ: u64 = 64 * 1024;

/// Clock ticks per second in `/proc/*/stat`: USER_HZ, fixed at 100 in Linux's user-space ABI
/// (as Prometheus' own procfs library assumes).
const USER_HZ: f64 = 100.0;

/// The process's figures; `None` where `/proc` did not say.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub resident_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

/// Reads this process's figures from `/proc`.
pub fn read() -> ProcessStats {
    let stat = read_capped("/proc/self/stat").and_then(|text| parse_stat(&text));
    let boot = boot_time();
    ProcessStats {
        resident_memory_bytes: read_capped("/proc/self/status").and_then(|t| parse_vm_rss(&t)),
        open_fds: open_fds(),
        max_fds: read_capped("/proc/self/limits").and_then(|t| parse_max_open_files(&t)),
        cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / USER_HZ),
        start_time_seconds: stat
            .zip(boot)
            .map(|(s, boot)| boot as f64 + s.starttime as f64 / USER_HZ),
    }
}

fn read_capped(path: &str) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    file.take(MAX_READ).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The fields of `/proc/self/stat` used here, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
}

/// Parses `/proc/PID/stat`: fields 14 (utime), 15 (stime) and 22 (starttime), counted after the
/// command name, which is in parentheses and may itself hold spaces and parentheses.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    // rest starts at field 3 (state).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
    })
}

/// `VmRSS:   1234 kB` from `/proc/PID/status`, in bytes.
fn parse_vm_rss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// The soft limit of `Max open files` in `/proc/PID/limits` (`unlimited` as u64::MAX).
fn parse_max_open_files(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// `btime` from `/proc/stat`: the boot time, in seconds since the epoch.
fn parse_btime(text: impl BufRead) -> Option<u64> {
    text.lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// The boot time, read once (it does not change).
fn boot_time() -> Option<u64> {
    static BOOT: OnceLock<Option<u64>> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let file = std::fs::File::open("/proc/stat").ok()?;
        parse_btime(BufReader::new(file.take(MAX_READ)))
    })
}

/// The entries of `/proc/self/fd` (one of them the listing's own descriptor, as in the Go and
/// Python clients).
fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.filter(Result::is_ok).count() as u64)
}

/// Encodes the `process_*` metrics at each scrape.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = read();
        let mut gauge = |name: &str, help: &str, value: Option<f64>| {
            if let Some(value) = value {
                let metric = ConstGauge::new(value);
                metric.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    metric.metric_type(),
                )?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            stats.resident_memory_bytes.map(|v| v as f64),
        )?;
        gauge(
            "process_open_fds",
            "Number of open file descriptors",
            stats.open_fds.map(|v| v as f64),
        )?;
        gauge(
            "process_max_fds",
            "Maximum number of open file descriptors",
            stats.max_fds.map(|v| v as f64),
        )?;
        gauge(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            stats.start_time_seconds,
        )?;
        if let Some(cpu) = stats.cpu_seconds {
            let metric = ConstCounter::new(cpu);
            metric.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                metric.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_procfs_lines() {
        let stat = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 9000 100 200 0";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                utime: 250,
                stime: 50,
                starttime: 9000
            })
        );
        assert_eq!(parse_stat("1234 (x) S 1"), None);
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t    2048 kB\nThreads: 1\n"),
            Some(2048 * 1024)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n".as_bytes()),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_has_sane_figures() {
        let s = read();
        assert!(s.resident_memory_bytes.unwrap() > 1024 * 1024, "{s:?}");
        let open = s.open_fds.unwrap();
        assert!(open >= 3 && open <= s.max_fds.unwrap(), "{s:?}");
        assert!(s.cpu_seconds.unwrap() >= 0.0, "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = s.start_time_seconds.unwrap();
        assert!(start > now - 86400.0 * 365.0 && start <= now + 1.0, "{s:?}");
    }
}
