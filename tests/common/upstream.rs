//! Test upstream (destination) TCP servers the proxy forwards to.
//!
//! Owns three server kinds, each bound on a caller-given address and returning an
//! [`UpstreamHandle`] (accept count, peer addresses, one [`ConnReport`] per finished
//! connection; the server task stops when the handle is dropped):
//! * [`echo_server`]: echoes bytes; on the client's half-close it finishes echoing,
//!   then shuts down its write side (request/response over half-close works);
//! * [`response_server`]: reads the request to EOF, writes a fixed reply, closes;
//! * [`sink_source_server`]: concurrently consumes everything (counting and hashing it)
//!   and sends `send` bytes of deterministic pseudo-random data ([`pattern`]), then
//!   half-closes; for bulk/bidirectional integrity tests.
//!
//! Also the helpers to produce and check such data: [`pattern`], [`PatternGen`],
//! [`sha256_hex`], and a client's two halves of a bulk transfer: [`send_pattern`] and
//! [`receive_hashed`]. A port with no listener refuses connections, so no "refusing server"
//! is needed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use super::{netns, wait_until};

/// Seed of the data [`sink_source_server`] sends (see [`pattern`]).
pub const SINK_SOURCE_SEED: u64 = 0x005E_ED0F_5EED;

/// How many received bytes a [`ConnReport`] keeps verbatim in `head`.
pub const HEAD_LIMIT: usize = 64 * 1024;

/// What happened on one upstream connection, recorded when it finished.
#[derive(Clone, Debug)]
pub struct ConnReport {
    /// The client (i.e. the proxy's outbound socket) address.
    pub peer: SocketAddr,
    /// Bytes received from the client until EOF (or the error).
    pub received: u64,
    /// SHA-256 (lower-case hex) of all received bytes.
    pub received_sha256: String,
    /// The first [`HEAD_LIMIT`] received bytes, verbatim (e.g. the request).
    pub head: Vec<u8>,
    /// Bytes the server wrote to the client.
    pub sent: u64,
    /// SHA-256 (lower-case hex) of all bytes the server wrote to the client.
    pub sent_sha256: String,
    /// The I/O error that ended the connection early, if any (e.g. a reset).
    pub error: Option<String>,
}

#[derive(Default)]
struct Stats {
    peers: Vec<SocketAddr>,
    reports: Vec<ConnReport>,
}

/// A running test upstream. Dropping it stops the accept loop and aborts all of its
/// connections.
pub struct UpstreamHandle {
    addr: SocketAddr,
    stats: Arc<Mutex<Stats>>,
    task: JoinHandle<()>,
}

impl UpstreamHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections were accepted so far.
    pub fn accepted(&self) -> usize {
        self.lock().peers.len()
    }

    /// The peer address of every accepted connection, in accept order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.lock().peers.clone()
    }

    /// Reports of the connections that have finished so far, in completion order.
    pub fn reports(&self) -> Vec<ConnReport> {
        self.lock().reports.clone()
    }

    /// Polls until at least `n` connections were accepted; returns whether that happened
    /// within `timeout`.
    pub async fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.accepted() >= n).await
    }

    /// Waits until at least `n` connections have finished and returns their reports.
    ///
    /// # Panics
    /// On timeout, with what was observed so far.
    pub async fn wait_reports(&self, n: usize, timeout: Duration) -> Vec<ConnReport> {
        if !wait_until(timeout, || self.lock().reports.len() >= n).await {
            panic!(
                "upstream {}: expected {n} finished connection(s) within {timeout:?}; \
                 accepted {}, finished: {:?}",
                self.addr,
                self.accepted(),
                self.reports()
            );
        }
        self.reports()
    }

    /// Stops the server and waits until its port is really closed (new connections are
    /// refused from then on). Open connections are aborted (reset or closed).
    ///
    /// # Panics
    /// If the port still has a listener after 2 s.
    pub async fn stop(self) {
        let addr = self.addr;
        self.task.abort();
        // `drop(self)` happens here; the abort completes asynchronously, and a concurrent
        // fork elsewhere in the test process can hold the fd for a moment: poll.
        drop(self);
        assert!(
            wait_until(Duration::from_secs(2), || !netns::tcp_listening(addr)).await,
            "upstream {addr}: still listening 2 s after stop()"
        );
    }

    /// Waits for the first connection to finish and returns its report (the usual case:
    /// one connection through the proxy).
    ///
    /// # Panics
    /// On timeout, with what was observed so far.
    pub async fn wait_result(&self, timeout: Duration) -> ConnReport {
        self.wait_reports(1, timeout).await.swap_remove(0)
    }

    fn lock(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }
}

impl Drop for UpstreamHandle {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

fn lock(stats: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

/// The per-connection behaviour of a server kind.
#[derive(Clone)]
enum Kind {
    Echo,
    Response(Arc<Vec<u8>>),
    SinkSource(usize),
}

/// Echo server: every byte received is written back; when the client half-closes, the
/// remaining data is echoed, then the server shuts down its write side and closes.
///
/// # Panics
/// If `addr` cannot be bound.
pub async fn echo_server(addr: SocketAddr) -> UpstreamHandle {
    spawn_server(addr, Kind::Echo).await
}

/// Request/response server: reads the request until the client's EOF (half-close), then
/// writes `reply` and closes. The request is available in [`ConnReport::head`].
///
/// # Panics
/// If `addr` cannot be bound.
pub async fn response_server(addr: SocketAddr, reply: Vec<u8>) -> UpstreamHandle {
    spawn_server(addr, Kind::Response(Arc::new(reply))).await
}

/// Bulk server: on each connection, concurrently reads everything to EOF (counting and
/// hashing it into the [`ConnReport`]) and sends `send` bytes of
/// `pattern(SINK_SOURCE_SEED, send)`, then shuts down its write side. The hash of what it
/// sent is [`ConnReport::sent_sha256`] (equal to `sha256_hex(&pattern(SINK_SOURCE_SEED,
/// send))`).
///
/// # Panics
/// If `addr` cannot be bound.
pub async fn sink_source_server(addr: SocketAddr, send: usize) -> UpstreamHandle {
    spawn_server(addr, Kind::SinkSource(send)).await
}

async fn spawn_server(addr: SocketAddr, kind: Kind) -> UpstreamHandle {
    let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| {
        panic!(
            "upstream: cannot bind {addr}: {e} (inside run_in_netns? for IPs other than \
             127.0.0.1 call netns::add_lo_addr first)"
        )
    });
    let addr = listener
        .local_addr()
        .expect("upstream: bound listener has no local address");
    let stats = Arc::new(Mutex::new(Stats::default()));
    let task = tokio::spawn(accept_loop(listener, kind, stats.clone()));
    UpstreamHandle { addr, stats, task }
}

async fn accept_loop(listener: TcpListener, kind: Kind, stats: Arc<Mutex<Stats>>) {
    // Owned here so that aborting this task aborts every connection task too.
    let mut conns = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("upstream: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        lock(&stats).peers.push(peer);
        let kind = kind.clone();
        let stats = stats.clone();
        conns.spawn(async move {
            let report = serve_conn(stream, peer, kind).await;
            lock(&stats).reports.push(report);
        });
        while conns.try_join_next().is_some() {}
    }
}

/// Counts and hashes one direction of a connection, keeping the first bytes verbatim.
struct Tally {
    count: u64,
    hasher: Sha256,
    head: Vec<u8>,
    head_limit: usize,
}

impl Tally {
    fn new(head_limit: usize) -> Self {
        Tally {
            count: 0,
            hasher: Sha256::new(),
            head: Vec::new(),
            head_limit,
        }
    }

    fn add(&mut self, data: &[u8]) {
        self.count += data.len() as u64;
        self.hasher.update(data);
        let room = self.head_limit.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..room.min(data.len())]);
    }

    fn sha256(self) -> String {
        hex(&self.hasher.finalize())
    }
}

async fn serve_conn(mut stream: TcpStream, peer: SocketAddr, kind: Kind) -> ConnReport {
    let mut received = Tally::new(HEAD_LIMIT);
    let mut sent = Tally::new(0);
    let mut buf = vec![0u8; 64 * 1024];
    let result: std::io::Result<()> = match kind {
        Kind::Echo => {
            async {
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    received.add(&buf[..n]);
                    stream.write_all(&buf[..n]).await?;
                    sent.add(&buf[..n]);
                }
                stream.shutdown().await
            }
            .await
        }
        Kind::Response(reply) => {
            async {
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    received.add(&buf[..n]);
                }
                stream.write_all(&reply).await?;
                sent.add(&reply);
                stream.shutdown().await
            }
            .await
        }
        Kind::SinkSource(len) => {
            let (mut rd, mut wr) = stream.split();
            let reading = async {
                loop {
                    let n = rd.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<(), std::io::Error>(());
                    }
                    received.add(&buf[..n]);
                }
            };
            let writing = async {
                let mut gen = PatternGen::new(SINK_SOURCE_SEED);
                let mut chunk = vec![0u8; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    gen.fill(&mut chunk[..n]);
                    wr.write_all(&chunk[..n]).await?;
                    sent.add(&chunk[..n]);
                    left -= n;
                }
                wr.shutdown().await
            };
            let (r, w) = tokio::join!(reading, writing);
            r.and(w)
        }
    };
    ConnReport {
        peer,
        received: received.count,
        head: std::mem::take(&mut received.head),
        received_sha256: received.sha256(),
        sent: sent.count,
        sent_sha256: sent.sha256(),
        error: result.err().map(|e| e.to_string()),
    }
}

/// Deterministic pseudo-random byte stream (SplitMix64, little-endian words), so both
/// sides of a transfer can produce or check the same data without keeping it in memory.
/// The stream does not depend on how it is cut into `fill` calls.
#[derive(Clone, Debug)]
pub struct PatternGen {
    state: u64,
    pending: [u8; 8],
    used: usize,
}

impl PatternGen {
    /// A generator producing the stream for `seed`.
    pub fn new(seed: u64) -> Self {
        PatternGen {
            state: seed,
            pending: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `out` with the next bytes of the stream.
    pub fn fill(&mut self, mut out: &mut [u8]) {
        // Finish a partly used word first.
        while self.used < 8 && !out.is_empty() {
            out[0] = self.pending[self.used];
            self.used += 1;
            out = &mut out[1..];
        }
        // Whole words (the fast path, also in unoptimised test builds).
        let mut words = out.chunks_exact_mut(8);
        for word in &mut words {
            word.copy_from_slice(&self.next_word().to_le_bytes());
        }
        // Start a new word for the tail.
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.pending = self.next_word().to_le_bytes();
            tail.copy_from_slice(&self.pending[..tail.len()]);
            self.used = tail.len();
        }
    }
}

/// The first `len` bytes of the deterministic stream for `seed` (see [`PatternGen`]).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    PatternGen::new(seed).fill(&mut data);
    data
}

/// SHA-256 of `data` as lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// `bytes` as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Chunk size of [`send_pattern`] and [`receive_hashed`].
const TRANSFER_CHUNK: usize = 256 * 1024;

/// A client's sending half of a bulk transfer: writes the first `size` bytes of the stream for
/// `seed` (see [`PatternGen`]) to `wr`, then shuts its write side down (the half-close the
/// proxy must pass on). With `pause_at: Some((n, go))` it stops once `n` bytes are sent until
/// `go` fires, so that a test can act while the transfer is in flight. Returns the SHA-256 of
/// what it sent in hex, to compare with what the far end got.
pub async fn send_pattern(
    mut wr: impl AsyncWrite + Unpin,
    seed: u64,
    size: usize,
    mut pause_at: Option<(usize, oneshot::Receiver<()>)>,
) -> String {
    let mut gen = PatternGen::new(seed);
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; TRANSFER_CHUNK];
    let mut sent = 0;
    while sent < size {
        if pause_at.as_ref().is_some_and(|(at, _)| sent >= *at) {
            if let Some((_, go)) = pause_at.take() {
                go.await.expect("the go-ahead to send the rest");
            }
        }
        let n = chunk.len().min(size - sent);
        gen.fill(&mut chunk[..n]);
        wr.write_all(&chunk[..n]).await.unwrap();
        hash.update(&chunk[..n]);
        sent += n;
    }
    wr.shutdown().await.unwrap();
    hex(&hash.finalize())
}

/// A client's receiving half of a bulk transfer: reads `rd` to its end. With `report_at:
/// Some((n, reached))` it fires `reached` once `n` bytes have come. Returns how many bytes came
/// and their SHA-256 in hex.
pub async fn receive_hashed(
    mut rd: impl AsyncRead + Unpin,
    mut report_at: Option<(usize, oneshot::Sender<()>)>,
) -> (usize, String) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; TRANSFER_CHUNK];
    let mut total = 0usize;
    loop {
        let n = rd.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        total += n;
        if report_at.as_ref().is_some_and(|(at, _)| total >= *at) {
            if let Some((_, reached)) = report_at.take() {
                let _ = reached.send(());
            }
        }
    }
    (total, hex(&hash.finalize()))
}
