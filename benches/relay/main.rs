//! `make bench` (`cargo bench --bench relay`): the relay's figures, through the real proxy binary
//! and over a direct connection, measured in one run on this machine, as one table with the
//! ratios and the targets.
//!
//! Everything is loopback TCP: the proxy listens on a `tcp:` stand-in for vsock and relays to an
//! upstream in this process, so every relayed byte crosses loopback twice. The figures:
//!
//! * throughput, 1 stream and 64 streams at once, upload and download, every byte counted (and
//!   a SHA-256 check of one transfer each way before anything is timed) — [`throughput`];
//! * the proxy's CPU seconds per GiB relayed (user + system, from `/proc/PID/stat`);
//! * connections per second from 32 clients (connect, one byte there and back, close), with
//!   errors counted by kind — [`echo`] — and from one client at a time (a connection's whole
//!   life when the proxy is otherwise idle); for each, the CPU time per connection of the proxy
//!   and of the whole machine (`/proc/stat`), which shows where the ceiling of conn/s / direct
//!   is on a machine whose CPUs the clients, the echo server and the proxy all share;
//! * 64-byte round trips, p50 and p99: unpinned (the median of 5 interleaved runs, since
//!   unpinned round trips here are bimodal) and with client, proxy and echo server all on CPU 0
//!   (the stable latency figure);
//! * the proxy's resident memory per idle relayed connection at 1,000 and 9,000 connections
//!   (each carried a byte end to end), and after they all closed.
//!
//! * transparent egress (issue 21): an unmodified client in an "enclave" network namespace
//!   reaching the sink and the echo server by name through `enclave-app egress` and the
//!   daemon's dns and connect routes, against a direct connection: 1-stream download GiB/s and
//!   connection set-up p50 (DNS + connect + a 1-byte echo) — [`egress`];
//! * an ingress route (`mode: ingress`, no PROXY header) against `socat TCP-LISTEN:P,fork,reuseaddr
//!   TCP:...` (the hop it replaces), the egress path and a direct connection: connections per
//!   second from 32 clients, and 64-byte round trips p50 with everything on CPU 0 (median of 5)
//!   — [`ingress_rows`];
//!
//! * the policy: `--check-config` on a generated allowlist of 100,000 CIDR entries and 10,000
//!   names (target: under 1 s), and policy decisions per second at 10 and 100,000 entries (the
//!   "direct" column holds the 10-entry figure: the ratio shows whether a decision grows with the
//!   list) — [`policy`].
//!
//! Rounds alternate direct and proxy so drift in machine load hits both alike. The machine is
//! shared and noisy: compare ratios within one run, never absolute figures across runs
//! (`shared/notes/benchmarking.md`). It takes about two and a half minutes. `BENCH_BYTES=128M`
//! changes the bytes per single-stream transfer (default 512 MiB; 64 streams move 4× that in all);
//! `BENCH_RELAY=copy` runs the proxy with `--relay copy`, to compare with splice, and
//! `BENCH_PROXY_ARGS="-w 1"` gives it more arguments. The connection, latency and idle
//! figures are measured twice, with the proxy at `RUST_LOG=warn` (no per-connection line) and
//! at `info` (as deployed: one text line per connection, written to a file);
//! `BENCH_RUST_LOG=info` (or any filter) measures at that level only, and runs every other
//! section at it too (default `warn`);
//! `BENCH_PROXY_BIN=PATH` measures another build of the proxy (e.g. the one before a change);
//! `BENCH_VERBOSE=1` prints every throughput sample; `BENCH_ONLY=latency` (or a comma-separated
//! list of throughput, connections, latency, idle, egress, ingress, policy, aws) measures only those.
//! `BENCH_AWS_PROXY=PATH` adds rows comparing with AWS's `vsock-proxy` (a build of it whose
//! listener was changed to loopback TCP; see `Proxy::start_aws`): conn/s, CPU per connection
//! and pinned round trips.
//!
//! Under `cargo test` (no `--bench` argument) it runs as a smoke test: small sizes, one round,
//! a debug build, every check made, no meaningful numbers.

mod echo;
mod egress;
mod policy;
mod proxy;
mod throughput;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy::Proxy;
use throughput::{median, Direction, GIB};

/// How much of each figure to measure.
struct Scale {
    full: bool,
    /// Bytes per single-stream transfer; the many-stream transfers move as much in all.
    bytes: u64,
    rounds: usize,
    streams: usize,
    connection_clients: usize,
    connection_time: Duration,
    connection_rounds: usize,
    round_trips: usize,
    latency_runs: usize,
    idle_steps: Vec<usize>,
}

impl Scale {
    fn from_args() -> Scale {
        // cargo passes --bench under `cargo bench`; under `cargo test --all-targets` it does not.
        let full = std::env::args().any(|a| a == "--bench");
        let bytes = match std::env::var("BENCH_BYTES") {
            Ok(s) => throughput::parse_size(&s).unwrap_or_else(|| {
                panic!("BENCH_BYTES={s:?}: expected a size like 536870912, 512M or 1G")
            }),
            Err(_) if full => throughput::DEFAULT_BYTES,
            Err(_) => throughput::SMOKE_BYTES,
        };
        if full {
            Scale {
                full,
                bytes,
                rounds: throughput::ROUNDS,
                streams: 64,
                connection_clients: 32,
                connection_time: Duration::from_secs(3),
                // Direct and one proxy per log level take turns: each first once in 3 rounds.
                connection_rounds: 3,
                round_trips: 5_000,
                latency_runs: 5,
                idle_steps: vec![1_000, 9_000],
            }
        } else {
            Scale {
                full,
                bytes,
                rounds: 1,
                streams: 8,
                connection_clients: 4,
                connection_time: Duration::from_millis(300),
                connection_rounds: 1,
                round_trips: 100,
                latency_runs: 1,
                idle_steps: vec![20, 50],
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Proxy,
}

/// The two paths in the order of round `round`: direct first in even rounds, proxy first in odd.
fn paths(round: usize) -> [Path; 2] {
    if round.is_multiple_of(2) {
        [Path::Direct, Path::Proxy]
    } else {
        [Path::Proxy, Path::Direct]
    }
}

/// What a figure should be, as issue 12 set it.
#[derive(Clone, Copy)]
enum Target {
    None,
    /// proxy / direct at least this.
    RatioAtLeast(f64),
    /// proxy at most this.
    AtMost(f64),
    /// proxy at most direct + this.
    DirectPlus(f64),
}

struct Row {
    figure: String,
    direct: Option<f64>,
    proxy: f64,
    target: Target,
}

impl Row {
    fn new(figure: impl Into<String>, direct: Option<f64>, proxy: f64, target: Target) -> Row {
        Row {
            figure: figure.into(),
            direct,
            proxy,
            target,
        }
    }

    fn target_text(&self) -> String {
        let (text, met) = match self.target {
            Target::None => return String::new(),
            Target::RatioAtLeast(r) => (
                format!("≥ {r:.2}× direct"),
                self.direct.is_some_and(|d| self.proxy / d >= r),
            ),
            Target::AtMost(v) => (format!("≤ {v}"), self.proxy <= v),
            Target::DirectPlus(v) => (
                format!("≤ direct + {v}"),
                self.direct.is_some_and(|d| self.proxy <= d + v),
            ),
        };
        format!("{text} ({})", if met { "met" } else { "missed" })
    }
}

/// What every section needs.
struct Bench {
    scale: Scale,
    /// The proxy's arguments besides the route (`BENCH_RELAY`, `BENCH_PROXY_ARGS`).
    proxy_args: Vec<String>,
    pattern: Arc<Vec<u8>>,
    nofile: u64,
    /// The proxy's `RUST_LOG` values the connection, latency and idle figures are measured at.
    log_levels: Vec<String>,
}

impl Bench {
    /// A proxy of its own to `upstream` that takes up to 10,000 connections at once.
    fn many_connections_proxy(&self, upstream: SocketAddr) -> Proxy {
        let limit = ["--max-connections".to_owned(), "10000".to_owned()];
        let args = [limit.as_slice(), self.proxy_args.as_slice()].concat();
        Proxy::start(upstream, None, &args)
            .unwrap_or_else(|e| panic!("start a proxy to {upstream}: {e}"))
    }
}

fn main() {
    let scale = Scale::from_args();
    let nofile = proxy::raise_open_file_limit();
    let mut proxy_args: Vec<String> = match std::env::var("BENCH_RELAY").as_deref() {
        Ok("copy") => vec!["--relay".into(), "copy".into()],
        Ok("auto") | Err(_) => vec![],
        Ok(other) => panic!("BENCH_RELAY={other:?}: expected auto or copy"),
    };
    // BENCH_PROXY_ARGS="-w 1": more of the proxy's options, to compare settings in one run.
    if let Ok(more) = std::env::var("BENCH_PROXY_ARGS") {
        proxy_args.extend(more.split_whitespace().map(str::to_owned));
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);
    // BENCH_RUST_LOG=info: that level only; by default both, `warn` first (and for the
    // sections that do not depend on it).
    let log_levels = match std::env::var("BENCH_RUST_LOG") {
        Ok(level) if !level.trim().is_empty() => vec![level.trim().to_owned()],
        _ => vec!["warn".to_owned(), "info".to_owned()],
    };
    proxy::set_log_level(&log_levels[0]);
    let bench = Bench {
        scale,
        proxy_args,
        pattern: Arc::new(throughput::pattern()),
        nofile,
        log_levels,
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "relay bench{}: {cpus} CPU(s), relay {}, {} per single-stream transfer, {} round(s), \
         proxy arguments {:?}, proxy RUST_LOG {} (text lines to a file)",
        if bench.scale.full {
            ""
        } else {
            " (smoke run under cargo test; numbers meaningless)"
        },
        if bench.proxy_args.iter().any(|a| a == "copy") {
            "copy"
        } else {
            "auto (splice)"
        },
        throughput::human_bytes(bench.scale.bytes),
        bench.scale.rounds,
        bench.proxy_args,
        bench.log_levels.join(" and "),
    );
    let echo_addr = echo::start_echo(None).expect("start the echo server");
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    if wanted("throughput") {
        rows.extend(throughput_rows(&bench));
    }
    // The figures a connection's logging changes, at each level: `warn` (no per-connection
    // line) and `info` (as deployed). Connections per second measure every level in the same
    // rounds (see `connection_rows`); the others one level after the other.
    if wanted("connections") {
        let (more, errors) = connection_rows(&bench, echo_addr);
        rows.extend(more);
        notes.extend(errors);
    }
    for level in &bench.log_levels {
        proxy::set_log_level(level);
        if wanted("latency") {
            rows.extend(latency_rows(&bench, echo_addr, level));
        }
        if wanted("idle") {
            rows.extend(idle_rows(&bench, echo_addr, level));
        }
    }
    proxy::set_log_level(&bench.log_levels[0]);
    if wanted("egress") {
        rows.extend(egress_rows(&bench, echo_addr));
    }
    if wanted("ingress") {
        let (more, note) = ingress_rows(&bench, echo_addr);
        rows.extend(more);
        notes.extend(note);
    }
    if wanted("policy") {
        rows.extend(policy_rows(&bench));
    }
    if wanted("aws") {
        for level in &bench.log_levels {
            proxy::set_log_level(level);
            let (more, note) = aws_rows(&bench, level);
            rows.extend(more);
            notes.extend(note);
        }
        proxy::set_log_level(&bench.log_levels[0]);
    }
    print_table(&rows);
    for note in notes {
        println!("{note}");
    }
    println!(
        "(measured in {:.0} s; [RUST_LOG=warn]: without the per-connection INFO line; \
         [RUST_LOG=info]: as deployed, one text line per connection to a file; other rows at \
         RUST_LOG={})",
        started.elapsed().as_secs_f64(),
        bench.log_levels[0]
    );
}

/// Transparent egress against a direct connection: 1-stream download and connection set-up.
fn egress_rows(bench: &Bench, echo_addr: SocketAddr) -> Vec<Row> {
    let scale = &bench.scale;
    let sink = throughput::start_sink().expect("start the sink server");
    let setups = if scale.full { 500 } else { 20 };
    let f = egress::measure(
        sink,
        echo_addr,
        scale.bytes,
        scale.rounds,
        setups,
        &bench.pattern,
    );
    vec![
        Row::new(
            "egress (enclave ns → parent), 1 stream download, GiB/s",
            Some(f.direct_gibps),
            f.egress_gibps,
            Target::None,
        ),
        Row::new(
            format!("egress set-up p50 (DNS + connect + 1 B echo, {setups}), µs"),
            Some(f.direct_setup_us),
            f.egress_setup_us,
            Target::None,
        ),
    ]
}

/// Loading a large allowlist, and a decision's cost at 10 and at 100,000 entries.
fn policy_rows(bench: &Bench) -> Vec<Row> {
    let (cidrs, names, time) = if bench.scale.full {
        (100_000, 10_000, Duration::from_secs(1))
    } else {
        (2_000, 200, Duration::from_millis(50))
    };
    let load = policy::check_config_seconds(cidrs, names);
    let small = policy::decisions_per_second(10, time);
    let large = policy::decisions_per_second(cidrs, time);
    vec![
        Row::new(
            format!("--check-config, {cidrs} CIDRs + {names} names, s"),
            None,
            load,
            Target::AtMost(1.0),
        ),
        Row::new(
            format!("policy decisions/s, {cidrs} entries (direct: 10)"),
            Some(small),
            large,
            Target::RatioAtLeast(0.5),
        ),
    ]
}

/// Throughput, 1 stream and many, each way, and the proxy's CPU per GiB (after an integrity
/// check of both paths).
fn throughput_rows(bench: &Bench) -> Vec<Row> {
    let scale = &bench.scale;
    let pattern = &bench.pattern;
    let sink = throughput::start_sink().expect("start the sink server");
    let sink_proxy =
        Proxy::start(sink, None, &bench.proxy_args).expect("start the proxy to the sink");
    let ticks_per_second = proxy::clock_ticks_per_second();
    for path in [Path::Direct, Path::Proxy] {
        let addr = pick(path, sink, sink_proxy.addr);
        for dir in [Direction::Upload, Direction::Download] {
            throughput::transfer(addr, dir, throughput::VERIFY_BYTES, pattern, true)
                .unwrap_or_else(|e| {
                    panic!("integrity check, {} {}: {e}", dir.name(), path_name(path))
                });
        }
    }
    println!(
        "integrity check (SHA-256, {} bytes each way, direct and proxy): OK",
        throughput::VERIFY_BYTES
    );
    let mut rows = Vec::new();
    // Throughput, 1 stream and many.
    let mut proxy_ticks = 0u64;
    let mut proxy_bytes = 0u64;
    for streams in [1, scale.streams] {
        // Many streams move 4× as much in all, so that each stream's share is well beyond what
        // the socket buffers absorb (else the figure measures thread start-up).
        let total = if streams == 1 {
            scale.bytes
        } else {
            4 * scale.bytes
        };
        for dir in [Direction::Upload, Direction::Download] {
            let mut rates = [Vec::new(), Vec::new()];
            for round in 0..scale.rounds {
                for path in paths(round) {
                    let addr = pick(path, sink, sink_proxy.addr);
                    let before = sink_proxy.cpu_ticks();
                    let seconds = throughput::parallel_transfer(addr, dir, streams, total, pattern)
                        .unwrap_or_else(|e| {
                            panic!(
                                "{streams} stream(s), {} {}, round {}: {e}",
                                dir.name(),
                                path_name(path),
                                round + 1
                            )
                        });
                    let ticks = sink_proxy.cpu_ticks().saturating_sub(before);
                    if path == Path::Proxy && streams == 1 {
                        proxy_ticks += ticks;
                        proxy_bytes += scale.bytes;
                    }
                    if verbose() {
                        println!(
                            "  {streams} stream(s) {} {} round {}: {seconds:.4} s, proxy CPU \
                             {:.2} cores",
                            dir.name(),
                            path_name(path),
                            round + 1,
                            ticks as f64 / ticks_per_second / seconds
                        );
                    }
                    rates[path as usize].push(total as f64 / GIB / seconds);
                }
            }
            rows.push(Row::new(
                format!(
                    "{streams} stream{} {}, GiB/s",
                    if streams == 1 { "" } else { "s" },
                    dir.name()
                ),
                Some(median(&rates[Path::Direct as usize])),
                median(&rates[Path::Proxy as usize]),
                Target::RatioAtLeast(0.60),
            ));
        }
    }
    rows.push(Row::new(
        "proxy CPU s per GiB, 1 stream",
        None,
        proxy_ticks as f64 / ticks_per_second / (proxy_bytes as f64 / GIB),
        Target::AtMost(0.30),
    ));

    rows
}

/// Connections per second from many clients, then from one at a time, with errors counted by
/// kind and what each connection cost in CPU; through one proxy per log level, all measured in
/// the same rounds.
///
/// Why in the same rounds: a level measured after another would meet the machine with the
/// other's TIME_WAIT sockets (the relayed connections of one level's rounds leave about 100,000),
/// which makes every `connect` on the machine slower, so the later level would look dearer than
/// it is. In turn, in an order that rotates every round, direct and each level meet it alike.
fn connection_rows(bench: &Bench, echo_addr: SocketAddr) -> (Vec<Row>, Vec<String>) {
    let scale = &bench.scale;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let levels = &bench.log_levels;
    let proxies: Vec<Proxy> = levels
        .iter()
        .map(|level| {
            proxy::set_log_level(level);
            bench.many_connections_proxy(echo_addr)
        })
        .collect();
    proxy::set_log_level(&levels[0]);
    for clients in [scale.connection_clients, 1] {
        let runs = ConnectionRuns::measure(scale, echo_addr, &proxies, levels, clients);
        let (what, target) = if clients == 1 {
            // One at a time: the latency of a connection's whole life when the proxy is
            // otherwise idle (each step wakes a thread), as an enclave's occasional call sees.
            ("1 client".to_owned(), Target::None)
        } else {
            (format!("{clients} clients"), Target::RatioAtLeast(0.80))
        };
        for (via, level) in levels.iter().enumerate() {
            let proxy = via + 1;
            rows.push(Row::new(
                format!("conn/s, {what}, 1-byte echo [RUST_LOG={level}]"),
                Some(median(&runs.rates[0])),
                median(&runs.rates[proxy]),
                target,
            ));
            rows.push(Row::new(
                "  connection errors (count)",
                Some(runs.errors[0] as f64),
                runs.errors[proxy] as f64,
                Target::None,
            ));
            // Where the ceiling of conn/s / direct is on a machine whose CPUs the clients, the
            // echo server and the proxy share: a relayed connection is two TCP connections, so
            // the machine does about twice the kernel's work per connection, whichever proxy
            // relays it.
            rows.push(Row::new(
                format!("  machine CPU µs per connection, all processes [RUST_LOG={level}]"),
                Some(runs.machine_cpu[0].micros()),
                runs.machine_cpu[proxy].micros(),
                Target::None,
            ));
            rows.push(Row::new(
                format!("  proxy CPU µs per connection [RUST_LOG={level}]"),
                None,
                runs.proxy_cpu[via].micros(),
                Target::None,
            ));
        }
        notes.extend(
            runs.error_kinds
                .iter()
                .map(|(kind, n)| format!("  {n} × {kind} ({what})")),
        );
    }
    (rows, notes)
}

/// Short connections from `clients` at once, directly (index 0) and through each proxy (1..,
/// the proxy started at the log level of the same index in `levels`), in turn, in an order that
/// rotates every round.
struct ConnectionRuns {
    rates: Vec<Vec<f64>>,
    errors: Vec<u64>,
    error_kinds: std::collections::BTreeMap<String, u64>,
    machine_cpu: Vec<CpuPerConnection>,
    /// Per proxy (index 0 is the first proxy).
    proxy_cpu: Vec<CpuPerConnection>,
}

impl ConnectionRuns {
    fn measure(
        scale: &Scale,
        echo_addr: SocketAddr,
        proxies: &[Proxy],
        levels: &[String],
        clients: usize,
    ) -> Self {
        let paths = proxies.len() + 1;
        let mut runs = ConnectionRuns {
            rates: vec![Vec::new(); paths],
            errors: vec![0; paths],
            error_kinds: Default::default(),
            machine_cpu: (0..paths).map(|_| CpuPerConnection::default()).collect(),
            proxy_cpu: (0..proxies.len())
                .map(|_| CpuPerConnection::default())
                .collect(),
        };
        for round in 0..scale.connection_rounds {
            for k in 0..paths {
                let path = (k + round) % paths;
                let via = path.checked_sub(1).map(|i| &proxies[i]);
                let proxy_before = via.map(Proxy::cpu_ticks);
                let machine_before = proxy::machine_busy_ticks();
                let rate = echo::connection_rate(
                    via.map_or(echo_addr, |p| p.addr),
                    clients,
                    scale.connection_time,
                );
                runs.machine_cpu[path].add(proxy::machine_busy_ticks() - machine_before, &rate);
                if let (Some(via), Some(before)) = (via, proxy_before) {
                    runs.proxy_cpu[path - 1].add(via.cpu_ticks() - before, &rate);
                }
                runs.errors[path] += rate.error_count();
                let name = if path == 0 {
                    "direct".to_owned()
                } else {
                    format!("proxy ({})", levels[path - 1])
                };
                for (kind, n) in &rate.errors {
                    *runs
                        .error_kinds
                        .entry(format!("{name} {kind}"))
                        .or_insert(0) += n;
                }
                runs.rates[path].push(rate.per_second);
            }
        }
        runs
    }
}

/// A proxy's CPU time (user and system, read from `/proc`) per connection it relayed: steadier
/// than connections per second on a shared machine, because it does not depend on how much of
/// the CPUs the clients and the echo server were given. On loopback it includes the kernel's
/// work of delivering what the proxy sends, as it does for any process.
#[derive(Default)]
struct CpuPerConnection {
    ticks: u64,
    connections: u64,
}

impl CpuPerConnection {
    fn add(&mut self, ticks: u64, rate: &echo::ConnectionRate) {
        self.ticks += ticks;
        self.connections += rate.completed;
    }

    fn micros(&self) -> f64 {
        self.ticks as f64 / proxy::clock_ticks_per_second() * 1e6 / self.connections.max(1) as f64
    }
}

/// 64-byte round trips: unpinned, then client, proxy and echo server all on CPU 0.
fn latency_rows(bench: &Bench, echo_addr: SocketAddr, level: &str) -> Vec<Row> {
    let scale = &bench.scale;
    let mut rows = Vec::new();
    let pinned_echo_addr = echo::start_echo(Some(0)).expect("start the pinned echo server");
    let echo_proxy = Proxy::start(echo_addr, None, &bench.proxy_args)
        .expect("start the proxy to the echo server");
    // 64-byte round trips: unpinned, then everything on CPU 0.
    let pinned_proxy = Proxy::start(pinned_echo_addr, Some(0), &bench.proxy_args)
        .expect("start the proxy pinned to CPU 0");
    for (label, upstream, via, pin) in [
        ("unpinned", echo_addr, &echo_proxy, None),
        ("all on CPU 0", pinned_echo_addr, &pinned_proxy, Some(0)),
    ] {
        let mut p50 = [Vec::new(), Vec::new()];
        let mut p99 = [Vec::new(), Vec::new()];
        for run in 0..scale.latency_runs {
            for path in paths(run) {
                let rtt = echo::round_trips(pick(path, upstream, via.addr), scale.round_trips, pin);
                p50[path as usize].push(rtt.p50_us);
                p99[path as usize].push(rtt.p99_us);
            }
        }
        // Pinned: at most AWS's vsock-proxy 1.0.2 on the same machine (35 µs; aim 28).
        let p50_target = if pin.is_some() {
            Target::AtMost(35.0)
        } else {
            Target::DirectPlus(10.0)
        };
        for (quantile, values, target) in [("p50", &p50, p50_target), ("p99", &p99, Target::None)] {
            rows.push(Row::new(
                format!(
                    "64 B RTT {quantile} {label}, µs (median of {}) [RUST_LOG={level}]",
                    scale.latency_runs
                ),
                Some(median(&values[Path::Direct as usize])),
                median(&values[Path::Proxy as usize]),
                target,
            ));
        }
    }

    rows
}

/// This proxy against AWS's `vsock-proxy` (`BENCH_AWS_PROXY`, see [`Proxy::start_aws`]), each
/// relaying to the same echo server, measured alternately in one run: connections per second
/// from many clients, and 64-byte round trips with client, proxy and echo server on CPU 0. The
/// "direct" column carries AWS's figure. Without `BENCH_AWS_PROXY`, a note says how to ask.
fn aws_rows(bench: &Bench, level: &str) -> (Vec<Row>, Vec<String>) {
    let scale = &bench.scale;
    let echo_addr = echo::start_echo(None).expect("start the echo server");
    let pinned_echo = echo::start_echo(Some(0)).expect("start the pinned echo server");
    let (Some(aws), Some(aws_pinned)) = (
        Proxy::start_aws(echo_addr, None),
        Proxy::start_aws(pinned_echo, Some(0)),
    ) else {
        return (
            Vec::new(),
            vec!["(no AWS rows: BENCH_AWS_PROXY=PATH names a build of AWS's vsock-proxy that listens on loopback TCP)".into()],
        );
    };
    let aws = aws.expect("start AWS's vsock-proxy");
    let aws_pinned = aws_pinned.expect("start AWS's vsock-proxy pinned");
    let ours = bench.many_connections_proxy(echo_addr);
    let ours_pinned = Proxy::start(pinned_echo, Some(0), &bench.proxy_args)
        .expect("start the proxy pinned to CPU 0");
    let (mut rates, mut p50) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut cpu = [CpuPerConnection::default(), CpuPerConnection::default()];
    let proxies = [&aws, &ours];
    for round in 0..scale.connection_rounds {
        for k in 0..2 {
            // Alternately first, so that neither always meets the machine in the same state.
            let i = (round + k) % 2;
            let ticks_before = proxies[i].cpu_ticks();
            let rate = echo::connection_rate(
                proxies[i].addr,
                scale.connection_clients,
                scale.connection_time,
            );
            cpu[i].add(proxies[i].cpu_ticks() - ticks_before, &rate);
            rates[i].push(rate.per_second);
        }
    }
    let pinned_addrs = [aws_pinned.addr, ours_pinned.addr];
    for run in 0..scale.latency_runs {
        for k in 0..2 {
            let i = (run + k) % 2;
            let rtt = echo::round_trips(pinned_addrs[i], scale.round_trips, Some(0));
            p50[i].push(rtt.p50_us);
        }
    }
    let rows = vec![
        Row::new(
            format!(
                "conn/s, {} clients: AWS vsock-proxy vs ours [RUST_LOG={level}]",
                scale.connection_clients
            ),
            Some(median(&rates[0])),
            median(&rates[1]),
            Target::RatioAtLeast(1.0),
        ),
        Row::new(
            format!("  proxy CPU µs per connection: AWS vsock-proxy vs ours [RUST_LOG={level}]"),
            Some(cpu[0].micros()),
            cpu[1].micros(),
            Target::DirectPlus(0.0),
        ),
        Row::new(
            format!(
                "64 B RTT p50 all on CPU 0, µs: AWS vsock-proxy vs ours (median of {}) [RUST_LOG={level}]",
                scale.latency_runs
            ),
            Some(median(&p50[0])),
            median(&p50[1]),
            Target::DirectPlus(0.0),
        ),
    ];
    (rows, Vec::new())
}

/// An ingress route (the network to the enclave) against the socat hop it replaces, the egress
/// path (a fixed route, the same relay the other way) and a direct connection: connections per
/// second from many clients, and 64-byte round trips with client, server and every hop on CPU 0
/// (the stable latency figure; unpinned round trips here are bimodal). Rows comparing with
/// socat or the egress route carry its figure in the "direct" column. Without socat installed,
/// its rows are left out and a note says so.
fn ingress_rows(bench: &Bench, echo_addr: SocketAddr) -> (Vec<Row>, Vec<String>) {
    let scale = &bench.scale;
    let limit = ["--max-connections".to_owned(), "10000".to_owned()];
    let args = [limit.as_slice(), bench.proxy_args.as_slice()].concat();
    let ingress = Proxy::start_ingress(echo_addr, None, &args).expect("start the ingress proxy");
    let socat = Proxy::start_socat(echo_addr, None).map(|started| started.expect("start socat"));
    // One measurement of each path per round, in rotating order so drift hits all alike.
    let mut targets = vec![echo_addr, ingress.addr];
    targets.extend(socat.as_ref().map(|s| s.addr));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..scale.connection_rounds {
        for i in 0..targets.len() {
            let i = (i + round) % targets.len();
            let rate =
                echo::connection_rate(targets[i], scale.connection_clients, scale.connection_time);
            rates[i].push(rate.per_second);
        }
    }
    drop((ingress, socat));

    let pinned_echo = echo::start_echo(Some(0)).expect("start the pinned echo server");
    let ingress = Proxy::start_ingress(pinned_echo, Some(0), &bench.proxy_args)
        .expect("start the pinned ingress proxy");
    let egress = Proxy::start(pinned_echo, Some(0), &bench.proxy_args)
        .expect("start the pinned egress proxy");
    let socat = Proxy::start_socat(pinned_echo, Some(0))
        .map(|started| started.expect("start pinned socat"));
    let mut targets = vec![pinned_echo, ingress.addr, egress.addr];
    targets.extend(socat.as_ref().map(|s| s.addr));
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for run in 0..scale.latency_runs {
        for i in 0..targets.len() {
            let i = (i + run) % targets.len();
            p50[i].push(echo::round_trips(targets[i], scale.round_trips, Some(0)).p50_us);
        }
    }

    let clients = scale.connection_clients;
    let (direct_rate, ingress_rate) = (median(&rates[0]), median(&rates[1]));
    let (direct_p50, ingress_p50, egress_p50) = (median(&p50[0]), median(&p50[1]), median(&p50[2]));
    let runs = scale.latency_runs;
    let mut rows = vec![
        Row::new(
            format!("ingress conn/s, {clients} clients, 1-byte echo"),
            Some(direct_rate),
            ingress_rate,
            Target::RatioAtLeast(0.80),
        ),
        Row::new(
            format!("ingress 64 B RTT p50 all on CPU 0, µs (median of {runs})"),
            Some(direct_p50),
            ingress_p50,
            Target::None,
        ),
        Row::new(
            "  vs the egress route (direct column: egress), µs",
            Some(egress_p50),
            ingress_p50,
            Target::DirectPlus(2.0),
        ),
    ];
    let mut notes = Vec::new();
    if socat.is_some() {
        rows.push(Row::new(
            format!("  ingress conn/s vs socat (direct column: socat), {clients} clients"),
            Some(median(&rates[2])),
            ingress_rate,
            Target::RatioAtLeast(5.0),
        ));
        rows.push(Row::new(
            "  ingress RTT p50 vs socat, CPU 0 (direct column: socat), µs",
            Some(median(&p50[3])),
            ingress_p50,
            Target::None,
        ));
    } else {
        notes.push(
            "ingress: socat is not installed (scripts/install-deps.sh installs it): no socat rows"
                .to_owned(),
        );
    }
    (rows, notes)
}

/// The proxy's memory per idle relayed connection, in a proxy of its own, and after they close.
fn idle_rows(bench: &Bench, echo_addr: SocketAddr, level: &str) -> Vec<Row> {
    let scale = &bench.scale;
    let nofile = bench.nofile;
    let mut rows = Vec::new();
    let idle_proxy = bench.many_connections_proxy(echo_addr);
    // This process holds both ends' sockets (client and echo server): two descriptors each.
    let affordable = (nofile.saturating_sub(256) / 2) as usize;
    let steps: Vec<usize> = scale
        .idle_steps
        .iter()
        .map(|&n| n.min(affordable))
        .collect();
    if steps != scale.idle_steps {
        println!(
            "note: the open-file limit ({nofile}) allows {affordable} idle connections here, not {:?}",
            scale.idle_steps
        );
    }
    let memory = echo::idle_memory(&idle_proxy, &steps);
    for &n in &steps {
        if let Some(kib) = memory.kib_per_connection(n) {
            rows.push(Row::new(
                format!("KiB per idle relayed connection, {n} open [RUST_LOG={level}]"),
                None,
                kib,
                Target::AtMost(2.5),
            ));
        }
    }
    let most = memory.steps.last().map_or(0, |s| s.1);
    let mib = |kib: u64| kib as f64 / 1024.0;
    rows.push(Row::new(
        format!("proxy RSS MiB at start [RUST_LOG={level}]"),
        None,
        mib(memory.start_kib),
        Target::None,
    ));
    rows.push(Row::new(
        format!(
            "proxy RSS MiB with {} open [RUST_LOG={level}]",
            steps.last().copied().unwrap_or(0)
        ),
        None,
        mib(most),
        Target::None,
    ));
    rows.push(Row::new(
        format!("proxy RSS MiB after they close [RUST_LOG={level}]"),
        None,
        mib(memory.after_close_kib),
        Target::AtMost((2.0 * mib(memory.start_kib) * 100.0).round() / 100.0),
    ));

    rows
}

/// `BENCH_VERBOSE=1` prints every sample.
fn verbose() -> bool {
    std::env::var_os("BENCH_VERBOSE").is_some_and(|v| !v.is_empty())
}

fn pick(path: Path, direct: SocketAddr, proxy: SocketAddr) -> SocketAddr {
    match path {
        Path::Direct => direct,
        Path::Proxy => proxy,
    }
}

fn path_name(path: Path) -> &'static str {
    match path {
        Path::Direct => "direct",
        Path::Proxy => "proxy",
    }
}

fn print_table(rows: &[Row]) {
    let width = rows
        .iter()
        .map(|r| r.figure.chars().count())
        .max()
        .unwrap_or(0);
    println!();
    println!(
        "| {:<width$} | {:>9} | {:>9} | {:>12} | target |",
        "figure", "direct", "proxy", "proxy/direct"
    );
    println!(
        "|{}|{}|{}|{}|{}|",
        "-".repeat(width + 2),
        "-".repeat(11),
        "-".repeat(11),
        "-".repeat(14),
        "-".repeat(8)
    );
    for row in rows {
        let number = |v: f64| {
            if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        let direct = row.direct.map_or("–".to_owned(), number);
        let ratio = match row.direct {
            Some(d) if d > 0.0 => format!("{:.2}", row.proxy / d),
            _ => "–".to_owned(),
        };
        println!(
            "| {:<width$} | {:>9} | {:>9} | {:>12} | {} |",
            row.figure,
            direct,
            number(row.proxy),
            ratio,
            row.target_text()
        );
    }
    println!();
}
