//! Small-message figures against an echo upstream: connections per second, 64-byte round-trip
//! latency, and the proxy's memory per idle relayed connection.
//!
//! The echo server runs in this process on one thread (a current-thread tokio runtime), optionally
//! pinned to a CPU, so 9,000 idle connections cost it no threads. Every figure here is taken the
//! same way through the proxy and directly to the echo server, in one run.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::{pin_current_thread, Proxy};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Round trips before the measured ones (connection set-up, first wake-ups, caches).
const WARMUP: usize = 200;
/// A proxy whose descriptors are not back to this many above its start after the idle
/// connections closed has leaked them.
const DESCRIPTOR_SLACK: usize = 40;
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the echo server on an ephemeral loopback port; with `pin_cpu`, on that CPU only.
pub fn start_echo(pin_cpu: Option<usize>) -> io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    thread::Builder::new().name("echo".into()).spawn(move || {
        if let Some(cpu) = pin_cpu {
            pin_current_thread(cpu).expect("pin the echo server's thread");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the echo server's runtime");
        runtime.block_on(serve_echo(listener));
    })?;
    Ok(addr)
}

async fn serve_echo(listener: std::net::TcpListener) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("the echo listener");
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: the client sees its connect hang and counts it.
                eprintln!("echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Short connections from `clients` threads for `duration`.
pub struct ConnectionRate {
    pub per_second: f64,
    /// Connections that carried their byte both ways.
    pub completed: u64,
    /// Failed connections by what failed (`connect: ConnectionRefused`, ...).
    pub errors: BTreeMap<String, u64>,
}

impl ConnectionRate {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Connect, send one byte, read it back, close — as fast as `clients` threads can, for
/// `duration`; counts completed connections and errors by kind.
pub fn connection_rate(addr: SocketAddr, clients: usize, duration: Duration) -> ConnectionRate {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            thread::spawn(move || {
                let mut done = 0u64;
                let mut errors = BTreeMap::<String, u64>::new();
                while Instant::now() < deadline {
                    match one_byte_echo(addr) {
                        Ok(()) => done += 1,
                        Err(e) => *errors.entry(e).or_default() += 1,
                    }
                }
                (done, errors)
            })
        })
        .collect();
    let mut done = 0;
    let mut errors = BTreeMap::new();
    for worker in workers {
        let (n, errs) = worker.join().expect("a connection-rate client panicked");
        done += n;
        for (kind, count) in errs {
            *errors.entry(kind).or_default() += count;
        }
    }
    ConnectionRate {
        per_second: done as f64 / start.elapsed().as_secs_f64(),
        completed: done,
        errors,
    }
}

fn one_byte_echo(addr: SocketAddr) -> Result<(), String> {
    fn fail(what: &'static str) -> impl Fn(io::Error) -> String {
        move |e| format!("{what}: {:?}", e.kind())
    }
    let mut s = TcpStream::connect(addr).map_err(fail("connect"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(fail("setsockopt"))?;
    s.write_all(&[0x5a]).map_err(fail("write"))?;
    let mut back = [0u8; 1];
    s.read_exact(&mut back).map_err(fail("read"))?;
    if back != [0x5a] {
        return Err("read: a different byte came back".into());
    }
    Ok(())
}

/// Round-trip times of one connection, in microseconds.
pub struct RoundTrips {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `count` 64-byte ping-pongs over one connection (after a warm-up), from a thread pinned to
/// `pin_cpu` if given; every reply is checked.
pub fn round_trips(addr: SocketAddr, count: usize, pin_cpu: Option<usize>) -> RoundTrips {
    let run = move || -> io::Result<RoundTrips> {
        if let Some(cpu) = pin_cpu {
            pin_current_thread(cpu)?;
        }
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut message = [0u8; 64];
        let mut back = [0u8; 64];
        let mut samples = Vec::with_capacity(count);
        for i in 0..WARMUP + count {
            message[0] = i as u8;
            let start = Instant::now();
            s.write_all(&message)?;
            s.read_exact(&mut back)?;
            let elapsed = start.elapsed();
            if back != message {
                return Err(io::Error::other("a round trip came back different"));
            }
            if i >= WARMUP {
                samples.push(elapsed.as_secs_f64() * 1e6);
            }
        }
        samples.sort_by(f64::total_cmp);
        Ok(RoundTrips {
            p50_us: samples[samples.len() / 2],
            p99_us: samples[(samples.len() * 99 / 100).min(samples.len() - 1)],
        })
    };
    thread::spawn(run)
        .join()
        .expect("the round-trip client panicked")
        .unwrap_or_else(|e| panic!("64 B round trips to {addr}: {e}"))
}

/// The proxy's resident memory as idle relayed connections are opened and closed.
pub struct IdleMemory {
    pub start_kib: u64,
    /// (connections open, RSS in KiB) at each step.
    pub steps: Vec<(usize, u64)>,
    pub after_close_kib: u64,
}

impl IdleMemory {
    /// KiB the proxy grew by per open connection at the step with `open` connections.
    pub fn kib_per_connection(&self, open: usize) -> Option<f64> {
        let (n, rss) = self.steps.iter().find(|(n, _)| *n == open)?;
        Some(rss.saturating_sub(self.start_kib) as f64 / *n as f64)
    }
}

/// Opens connections through `proxy` (to the echo server) until each step's count is open, each
/// carrying one byte there and back so it is really relayed, reads the proxy's RSS at each step;
/// then closes them all, waits until the proxy has let go of their descriptors, and reads it
/// again.
pub fn idle_memory(proxy: &Proxy, steps: &[usize]) -> IdleMemory {
    let start_kib = proxy.rss_kib();
    let start_descriptors = proxy.open_descriptors();
    let mut open = Vec::new();
    let mut measured = Vec::new();
    for &target in steps {
        while open.len() < target {
            let mut s = TcpStream::connect(proxy.addr)
                .unwrap_or_else(|e| panic!("idle connection {} to the proxy: {e}", open.len() + 1));
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("setsockopt");
            let mut back = [0u8; 1];
            s.write_all(&[7])
                .and_then(|()| s.read_exact(&mut back))
                .unwrap_or_else(|e| {
                    panic!(
                        "idle connection {}: the byte did not come back: {e}",
                        open.len() + 1
                    )
                });
            assert_eq!(back, [7], "idle connection {}: wrong byte", open.len() + 1);
            open.push(s);
        }
        // Let the proxy finish with the last connections' bytes before reading its memory.
        thread::sleep(Duration::from_millis(300));
        measured.push((target, proxy.rss_kib()));
    }
    drop(open);
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    while proxy.open_descriptors() > start_descriptors + DESCRIPTOR_SLACK {
        assert!(
            Instant::now() < deadline,
            "the proxy still holds {} descriptors {CLOSE_TIMEOUT:?} after its idle connections \
             closed ({} at the start)",
            proxy.open_descriptors(),
            start_descriptors
        );
        thread::sleep(Duration::from_millis(50));
    }
    // The proxy gives freed memory back half a second after a wave of connections ends.
    thread::sleep(Duration::from_millis(1500));
    IdleMemory {
        start_kib,
        steps: measured,
        after_close_kib: proxy.rss_kib(),
    }
}
