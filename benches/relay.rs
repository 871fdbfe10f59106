//! Single-stream relay throughput: the real proxy binary versus a direct TCP connection.
//!
//! What it measures. A sink/source server runs in this process on 127.0.0.1 (ephemeral port).
//! The real `nitro-vsock-proxy` binary (the one cargo builds for this bench) is started as
//! `nitro-vsock-proxy tcp:127.0.0.1:<port> 127.0.0.1 <sink port> --config <tmp allowlist>`, i.e.
//! with the `tcp:` stand-in for vsock, so every byte crosses loopback twice and the proxy's
//! relay loop once. One TCP connection then moves a fixed number of bytes (default 512 MiB;
//! set `BENCH_BYTES`, e.g. `BENCH_BYTES=128M`) in each direction:
//!
//! * upload: client → sink. The client writes in 256 KiB calls, half-closes, and stops the clock
//!   when the sink's reply arrives; the sink counts what it received and the count must match.
//! * download: sink → client. The sink writes in 256 KiB calls and closes; the client counts
//!   until end-of-stream and the count must match.
//!
//! Each direction is measured 3 rounds, alternating direct and via-proxy (the order flips every
//! round so slow drift in machine load hits both paths alike). Before that, a smaller transfer
//! each way is checked end to end with SHA-256, so a relay that corrupts or loses bytes fails
//! the bench instead of looking fast.
//!
//! How to read it. The table gives MiB/s per round and the median, per direction and path.
//! The machine may be shared and noisy: compare only numbers from the same run, and mostly the
//! final line `relay ratio (proxy/direct): upload X, download Y` (1.00 = the proxy costs
//! nothing; on a 2-core machine the proxy competes with the client and the sink for CPU, so
//! well below 1 is expected). "proxy CPU s/GiB" is the proxy process's user+system CPU time
//! (from /proc/<pid>/stat) per GiB it relayed, summed over the proxy rounds; "proxy cores" is
//! that CPU time over the wall time of those rounds. These are the numbers a zero-copy relay
//! (splice(2)) should lower.
//!
//! Run it with `cargo bench --bench relay`. Under `cargo test` (no `--bench` argument) it runs
//! as a quick smoke test: 4 MiB, one round, debug build, no meaningful numbers.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Bytes per write (and read) call at the client and the sink.
const IO_SIZE: usize = 256 * 1024;
const DEFAULT_BYTES: u64 = 512 * 1024 * 1024;
const SMOKE_BYTES: u64 = 4 * 1024 * 1024;
const ROUNDS: usize = 3;
/// The integrity check's size: deliberately not a multiple of any buffer size.
const VERIFY_BYTES: u64 = 8 * 1024 * 1024 + 4093;
/// No single transfer may stall longer than this (a hung relay fails instead of hanging).
const IO_TIMEOUT: Duration = Duration::from_secs(120);
const PROXY_START_TIMEOUT: Duration = Duration::from_secs(20);
const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

// The request a client sends first: one mode byte, then the length as a big-endian u64.
/// Upload: the sink counts what it gets until EOF and replies with the count.
const MODE_UPLOAD: u8 = b'U';
/// Upload, and the sink also replies with the SHA-256 of what it got.
const MODE_UPLOAD_HASHED: u8 = b'H';
/// Download: the sink sends `len` bytes of the pattern, then ends its stream.
const MODE_DOWNLOAD: u8 = b'D';
/// The sink's upload reply: count (u64 BE) + SHA-256 (zeros unless hashed).
const REPLY_LEN: usize = 8 + 32;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Upload,
    Download,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Proxy,
}

/// One measured transfer.
struct Sample {
    seconds: f64,
    /// Proxy CPU ticks spent during the transfer (proxy path only).
    proxy_ticks: u64,
}

fn main() {
    // cargo passes --bench under `cargo bench`; under `cargo test --all-targets` it does not.
    let full = std::env::args().any(|a| a == "--bench");
    let bytes = match std::env::var("BENCH_BYTES") {
        Ok(s) => parse_size(&s).unwrap_or_else(|| {
            panic!("BENCH_BYTES={s:?}: expected a size like 536870912, 512M or 1G")
        }),
        Err(_) if full => DEFAULT_BYTES,
        Err(_) => SMOKE_BYTES,
    };
    let rounds = if full { ROUNDS } else { 1 };
    let pattern = pattern();

    let sink = start_sink().expect("start the sink server");
    let proxy = Proxy::start(sink).expect("start the proxy");
    let ticks_per_second = clock_ticks_per_second();

    for path in [Path::Direct, Path::Proxy] {
        let addr = target(path, sink, &proxy);
        for dir in [Direction::Upload, Direction::Download] {
            transfer(addr, dir, VERIFY_BYTES, &pattern, true).unwrap_or_else(|e| {
                panic!("integrity check, {} {}: {e}", dir.name(), path_name(path))
            });
        }
    }

    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "relay bench{}: {} per transfer, {rounds} round(s) per path, {} KiB writes, {cpus} CPU(s), \
         proxy pid {}; integrity check (SHA-256, {} bytes each way, direct and proxy): OK",
        if full { "" } else { " (smoke run under cargo test; numbers meaningless)" },
        human_bytes(bytes),
        IO_SIZE / 1024,
        proxy.child.id(),
        VERIFY_BYTES,
    );

    let started = Instant::now();
    let mut results: Vec<(Direction, Path, Vec<Sample>)> = Vec::new();
    for dir in [Direction::Upload, Direction::Download] {
        results.push((dir, Path::Direct, Vec::new()));
        results.push((dir, Path::Proxy, Vec::new()));
    }
    for round in 0..rounds {
        for dir in [Direction::Upload, Direction::Download] {
            let order = if round % 2 == 0 {
                [Path::Direct, Path::Proxy]
            } else {
                [Path::Proxy, Path::Direct]
            };
            for path in order {
                let before = proxy.cpu_ticks();
                let seconds = transfer(target(path, sink, &proxy), dir, bytes, &pattern, false)
                    .unwrap_or_else(|e| {
                        panic!(
                            "round {}, {} {}: {e}",
                            round + 1,
                            dir.name(),
                            path_name(path)
                        )
                    });
                let proxy_ticks = proxy.cpu_ticks().saturating_sub(before);
                let slot = results
                    .iter_mut()
                    .find(|(d, p, _)| *d == dir && *p == path)
                    .expect("every direction and path has a slot");
                slot.2.push(Sample {
                    seconds,
                    proxy_ticks: if path == Path::Proxy { proxy_ticks } else { 0 },
                });
            }
        }
    }
    let measured = started.elapsed();

    println!();
    print!("{:<9} {:<7}", "direction", "path");
    for r in 1..=rounds {
        print!(" {:>9}", format!("round {r}"));
    }
    println!(
        " {:>9}  {:>15} {:>11}",
        "median", "proxy CPU s/GiB", "proxy cores"
    );
    let mut medians = Vec::new();
    for (dir, path, samples) in &results {
        let rates: Vec<f64> = samples
            .iter()
            .map(|s| bytes as f64 / MIB / s.seconds)
            .collect();
        let median = median(&rates);
        medians.push((*dir, *path, median));
        print!("{:<9} {:<7}", dir.name(), path_name(*path));
        for rate in &rates {
            print!(" {rate:>9.0}");
        }
        print!(" {median:>9.0}");
        if *path == Path::Proxy {
            let cpu: f64 = samples
                .iter()
                .map(|s| s.proxy_ticks as f64 / ticks_per_second)
                .sum();
            let wall: f64 = samples.iter().map(|s| s.seconds).sum();
            let gib = bytes as f64 * samples.len() as f64 / GIB;
            print!("  {:>15.3} {:>11.2}", cpu / gib, cpu / wall);
        }
        println!();
    }
    println!(
        "(MiB/s; measured part took {:.1} s)",
        measured.as_secs_f64()
    );
    let ratio = |dir: Direction| {
        let get = |path: Path| {
            medians
                .iter()
                .find(|(d, p, _)| *d == dir && *p == path)
                .map(|m| m.2)
                .expect("measured")
        };
        get(Path::Proxy) / get(Path::Direct)
    };
    println!();
    println!(
        "relay ratio (proxy/direct): upload {:.2}, download {:.2}",
        ratio(Direction::Upload),
        ratio(Direction::Download)
    );
    drop(proxy);
}

fn path_name(path: Path) -> &'static str {
    match path {
        Path::Direct => "direct",
        Path::Proxy => "proxy",
    }
}

fn target(path: Path, sink: SocketAddr, proxy: &Proxy) -> SocketAddr {
    match path {
        Path::Direct => sink,
        Path::Proxy => proxy.addr,
    }
}

/// `536870912`, `512M`, `512MiB`, `1G`, `64k`: binary units.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    number.checked_mul(1 << shift).filter(|&n| n > 0)
}

fn human_bytes(n: u64) -> String {
    if n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Pseudo-random bytes (xorshift64), the same at the client and the sink.
fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(IO_SIZE);
    while out.len() < IO_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(IO_SIZE);
    out
}

/// Writes `len` bytes of the repeated pattern, `IO_SIZE` per call.
fn send_pattern(w: &mut impl Write, pattern: &[u8], len: u64) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let n = left.min(pattern.len() as u64) as usize;
        w.write_all(&pattern[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn pattern_digest(pattern: &[u8], len: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(pattern.len() as u64) as usize;
        h.update(&pattern[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// Reads until end-of-stream; returns the byte count, hashing into `hasher` if given.
fn drain(r: &mut impl Read, mut hasher: Option<&mut Sha256>) -> io::Result<u64> {
    let mut buf = vec![0u8; IO_SIZE];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&buf[..n]);
        }
        total += n as u64;
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One transfer of `len` bytes over a new connection to `addr`; returns its wall time in
/// seconds. Fails unless the receiving side got exactly `len` bytes (and, with `verify`, exactly
/// the bytes sent).
fn transfer(
    addr: SocketAddr,
    dir: Direction,
    len: u64,
    pattern: &[u8],
    verify: bool,
) -> io::Result<f64> {
    let mut s = connect(addr)?;
    let mode = match (dir, verify) {
        (Direction::Upload, false) => MODE_UPLOAD,
        (Direction::Upload, true) => MODE_UPLOAD_HASHED,
        (Direction::Download, _) => MODE_DOWNLOAD,
    };
    let mut header = [0u8; 9];
    header[0] = mode;
    header[1..].copy_from_slice(&len.to_be_bytes());
    let start = Instant::now();
    s.write_all(&header)?;
    match dir {
        Direction::Upload => {
            send_pattern(&mut s, pattern, len)?;
            s.shutdown(Shutdown::Write)?;
            let mut reply = [0u8; REPLY_LEN];
            s.read_exact(&mut reply).map_err(|e| {
                io::Error::new(e.kind(), format!("no byte count from the sink: {e}"))
            })?;
            let seconds = start.elapsed().as_secs_f64();
            let got = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
            if got != len {
                return Err(io::Error::other(format!(
                    "the sink received {got} bytes, {len} were sent"
                )));
            }
            if verify && reply[8..] != pattern_digest(pattern, len) {
                return Err(io::Error::other(
                    "the sink received different bytes than were sent (SHA-256 mismatch)",
                ));
            }
            Ok(seconds)
        }
        Direction::Download => {
            s.shutdown(Shutdown::Write)?;
            let mut hasher = verify.then(Sha256::new);
            let got = drain(&mut s, hasher.as_mut())?;
            let seconds = start.elapsed().as_secs_f64();
            if got != len {
                return Err(io::Error::other(format!(
                    "the client received {got} bytes, the sink sent {len}"
                )));
            }
            if let Some(h) = hasher {
                if <[u8; 32]>::from(h.finalize()) != pattern_digest(pattern, len) {
                    return Err(io::Error::other(
                        "the client received different bytes than the sink sent (SHA-256 mismatch)",
                    ));
                }
            }
            Ok(seconds)
        }
    }
}

/// Starts the sink/source server on an ephemeral loopback port, one thread per connection.
fn start_sink() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let pattern = pattern();
    thread::Builder::new()
        .name("sink-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let pattern = pattern.clone();
                thread::spawn(move || {
                    if let Err(e) = serve_sink(conn, &pattern) {
                        eprintln!("sink: {e}");
                    }
                });
            }
        })?;
    Ok(addr)
}

fn serve_sink(mut s: TcpStream, pattern: &[u8]) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut header = [0u8; 9];
    match s.read_exact(&mut header) {
        // The readiness probe through the proxy: connected, then closed without a request.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        r => r?,
    }
    let len = u64::from_be_bytes(header[1..].try_into().expect("8 bytes"));
    match header[0] {
        MODE_UPLOAD | MODE_UPLOAD_HASHED => {
            let mut hasher = (header[0] == MODE_UPLOAD_HASHED).then(Sha256::new);
            let got = drain(&mut s, hasher.as_mut())?;
            let mut reply = [0u8; REPLY_LEN];
            reply[..8].copy_from_slice(&got.to_be_bytes());
            if let Some(h) = hasher {
                reply[8..].copy_from_slice(&h.finalize());
            }
            s.write_all(&reply)?;
            s.shutdown(Shutdown::Write)
        }
        MODE_DOWNLOAD => {
            send_pattern(&mut s, pattern, len)?;
            s.shutdown(Shutdown::Write)?;
            // Wait for the client's end so the connection closes cleanly on both sides.
            drain(&mut s, None).map(drop)
        }
        other => Err(io::Error::other(format!(
            "unknown request mode {other:#04x}"
        ))),
    }
}

/// The running proxy; killed when dropped, including while a panic unwinds.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(sink: SocketAddr) -> io::Result<Proxy> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("allowlist.yaml");
        // Loopback is denied unless an entry names the IP explicitly.
        std::fs::write(
            &config,
            format!(
                "allowlist:\n- {{address: {}, port: {}}}\n",
                sink.ip(),
                sink.port()
            ),
        )?;
        // A free port for the proxy to listen on (it could be taken in between; unlikely).
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(env!("CARGO_BIN_EXE_nitro-vsock-proxy"))
            .arg(format!("tcp:{addr}"))
            .arg(sink.ip().to_string())
            .arg(sink.port().to_string())
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut proxy = Proxy {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + PROXY_START_TIMEOUT;
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "the proxy exited at start-up ({status}); see its messages above"
                )));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(proxy);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "the proxy did not accept connections on {addr} within {PROXY_START_TIMEOUT:?}"
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The proxy's user + system CPU time so far, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // The command name (field 2) may contain spaces; the fields after its ')' are fixed.
        let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); utime is field 14, stime field 15.
        let field = |n: usize| -> u64 {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("{path}: no field {n} in {stat:?}"))
        };
        field(14) + field(15)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(ticks > 0, "sysconf(_SC_CLK_TCK) failed");
    ticks as f64
}
