//! Bulk throughput: one stream, and many at once, each way, directly and through the proxy.
//!
//! A sink/source server runs in this process on 127.0.0.1 (one thread per connection). Each
//! transfer opens a connection and moves a fixed number of bytes in one direction:
//!
//! * upload: client → sink. The client writes in 256 KiB calls, half-closes, and stops the clock
//!   when the sink's reply (its byte count) arrives; the count must match.
//! * download: sink → client. The sink writes in 256 KiB calls and closes; the client counts
//!   until end-of-stream and the count must match.
//!
//! Before anything is timed, a transfer each way is checked end to end with SHA-256, so a relay
//! that corrupts or loses bytes fails the bench instead of looking fast.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Bytes per write (and read) call at the client and the sink.
pub const IO_SIZE: usize = 256 * 1024;
pub const DEFAULT_BYTES: u64 = 512 * 1024 * 1024;
pub const SMOKE_BYTES: u64 = 4 * 1024 * 1024;
pub const ROUNDS: usize = 3;
/// The integrity check's size: deliberately not a multiple of any buffer size.
pub const VERIFY_BYTES: u64 = 8 * 1024 * 1024 + 4093;
/// No single transfer may stall longer than this (a hung relay fails instead of hanging).
const IO_TIMEOUT: Duration = Duration::from_secs(120);
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

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
pub enum Direction {
    Upload,
    Download,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }
}

/// `536870912`, `512M`, `512MiB`, `1G`, `64k`: binary units.
pub fn parse_size(s: &str) -> Option<u64> {
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

pub fn human_bytes(n: u64) -> String {
    if n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

pub fn median(values: &[f64]) -> f64 {
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
pub fn pattern() -> Vec<u8> {
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
pub fn transfer(
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
pub fn start_sink() -> io::Result<SocketAddr> {
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

/// Moves `total` bytes in `dir` over `streams` connections at once (`total / streams` each,
/// every count checked); returns the wall time from the first stream's start to the last one's
/// end. Each stream reads the clock itself: with 64 threads runnable on 2 CPUs, a coordinating
/// thread may not run for a long while after the start signal, and its clock would miss that.
pub fn parallel_transfer(
    addr: SocketAddr,
    dir: Direction,
    streams: usize,
    total: u64,
    pattern: &Arc<Vec<u8>>,
) -> io::Result<f64> {
    let per_stream = total / streams as u64;
    let start_line = Arc::new(Barrier::new(streams));
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            let start_line = Arc::clone(&start_line);
            let pattern = Arc::clone(pattern);
            thread::spawn(move || {
                start_line.wait();
                let start = Instant::now();
                transfer(addr, dir, per_stream, &pattern, false).map(|_| (start, Instant::now()))
            })
        })
        .collect();
    let mut span: Option<(Instant, Instant)> = None;
    let mut failures = Vec::new();
    for (i, worker) in workers.into_iter().enumerate() {
        match worker.join() {
            Ok(Ok((start, end))) => {
                span = Some(span.map_or((start, end), |(s, e)| (s.min(start), e.max(end))));
            }
            Ok(Err(e)) => failures.push(format!("stream {}: {e}", i + 1)),
            Err(_) => failures.push(format!("stream {}: panicked", i + 1)),
        }
    }
    match span {
        Some((start, end)) if failures.is_empty() => Ok((end - start).as_secs_f64()),
        _ => Err(io::Error::other(failures.join("; "))),
    }
}
