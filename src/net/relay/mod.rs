//! Moving bytes between the enclave's stream and the upstream stream.
//!
//! This module owns the data path and nothing else: [`relay`] moves both directions at once,
//! passes a half-close through (when one side ends its writes, the other side's write direction
//! is shut down — only once everything read before it was written — and the opposite direction
//! keeps flowing until it ends too), stops both on the first error, and enforces the idle
//! timeout. It reports how many bytes went each way and how the relay ended, and adds to the
//! route's live byte counters as bytes move.
//!
//! **How bytes move.** Each direction waits for its source to be readable (tokio's readiness,
//! see [`side`]), then moves a burst until the source has nothing more for now:
//! - with splice(2) ([`RelayMode::Auto`], the default): socket → pipe → socket in the kernel,
//!   no copy through user space and two system calls per chunk of up to the pipe's capacity.
//!   The pipe comes from a bounded pool ([`pipes`]) at the start of a burst and goes back,
//!   empty, at its end. Splicing is for streams: a direction's bursts are copied (below) until
//!   a read fills the copy buffer, then spliced until a burst moves less than one. A small
//!   message then costs one read, one send and the wait — no EAGAIN probe, since a TCP or unix
//!   read that comes back short has emptied the receive queue (a short splice proves nothing:
//!   the pipe may have run out of slots).
//!   Where the kernel refuses to splice from a socket (EINVAL: a socket type without
//!   `splice_read`, e.g. AF_VSOCK on some kernels) that direction copies from then on; where no
//!   pipe can be had (EMFILE/ENFILE) that burst copies. Both are logged once per process, never
//!   a failed connection.
//! - by copying ([`RelayMode::Copy`], or the fallbacks): read(2) into a buffer allocated for the
//!   burst (not zeroed; it starts at [`MIN_BUFFER`] and doubles up to [`MAX_BUFFER`] while reads
//!   fill it) and send(2) it on, then the buffer is freed.
//!
//! Both directions use the two sockets through `&` at once (reading is one direction's, writing
//! the other's), so there is no `split` and no lock on every poll. Activity for the idle timeout
//! is recorded on every read and every (partial) write: a slow reader is not idle.
//!
//! **Budget per connection.** Idle (nothing moving): no buffer and no pipe — the two sockets
//! (2 descriptors), the connection's task and the kernel's socket buffers. While a direction
//! moves bytes: one pipe (2 descriptors, up to 1 MiB of pipe pages, see [`pipes`]) or one
//! buffer (up to 256 KiB). So a connection needs at most 6 descriptors (2 sockets + 2 pipes),
//! plus [`pipes::MAX_IDLE`] pooled pipes (2 descriptors each) for the whole process; the
//! start-up file-limit check counts that.

pub mod pipes;
pub mod side;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::time::Instant;
use tracing::warn;

use pipes::{splice, Pipe, CHUNK};
use side::cvt;
pub use side::Side;

/// The buffer a copying burst starts with.
pub const MIN_BUFFER: usize = 16 * 1024;
/// The largest buffer a copying burst grows to.
pub const MAX_BUFFER: usize = 256 * 1024;

/// Descriptors one relayed connection may hold at once: two sockets, two pipes.
pub const DESCRIPTORS_PER_CONNECTION: u64 = 6;
/// Descriptors the pipe pool may hold for the whole process.
pub const POOL_DESCRIPTORS: u64 = 2 * pipes::MAX_IDLE as u64;

/// How bytes are moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayMode {
    /// splice(2) where the kernel allows it, copying elsewhere.
    #[default]
    Auto,
    /// Always copy through a user-space buffer.
    Copy,
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions reached end-of-stream and were passed on.
    Completed,
    /// Nothing moved in either direction for the idle timeout.
    IdleTimeout,
    /// Reading from or writing to the client (enclave) side failed.
    ClientError(io::Error),
    /// Reading from or writing to the upstream side failed.
    UpstreamError(io::Error),
}

impl fmt::Display for RelayEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelayEnd::Completed => f.write_str("completed"),
            RelayEnd::IdleTimeout => f.write_str("idle timeout"),
            RelayEnd::ClientError(e) => write!(f, "client error: {e}"),
            RelayEnd::UpstreamError(e) => write!(f, "upstream error: {e}"),
        }
    }
}

/// What a relay did.
#[derive(Debug)]
pub struct RelayReport {
    /// Bytes written to the upstream (sent by the client).
    pub to_upstream: u64,
    /// Bytes written to the client (sent by the upstream).
    pub to_client: u64,
    pub end: RelayEnd,
}

/// Totals that a relay adds to as bytes move (the route's metrics), besides its own report.
#[derive(Debug)]
pub struct LiveBytes<'a> {
    pub to_upstream: &'a AtomicU64,
    pub to_client: &'a AtomicU64,
}

#[derive(Clone, Copy)]
enum End {
    Client,
    Upstream,
}

struct DirectionError {
    end: End,
    error: io::Error,
}

/// Time of the last byte moved, in milliseconds since the relay started.
struct Activity {
    /// An idle timeout reads it: without one, moving bytes does not read the clock.
    watched: bool,
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        if !self.watched {
            return;
        }
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// What both directions of one relay share: the two sockets, what to count, the activity.
struct Ends<'a> {
    client: &'a Side,
    upstream: &'a Side,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    live: &'a LiveBytes<'a>,
    activity: Activity,
}

/// One direction: towards the upstream (`up`) or the client. Two words, so that an idle
/// connection's task carries little for it.
struct Direction<'a> {
    ends: &'a Ends<'a>,
    up: bool,
}

/// How a burst ended.
enum Burst {
    /// The source has nothing more for now; `moved` bytes went on in this burst.
    Quiet { moved: u64 },
    /// A read filled the copy buffer at the start of a spliced direction's burst: more is
    /// waiting, for splice.
    Filled,
    /// The source ended; everything read was written.
    Eof,
    /// The kernel will not splice from this source; nothing was moved.
    SpliceRefused,
}

static SPLICE_REFUSED_LOGGED: AtomicBool = AtomicBool::new(false);
static NO_PIPE_LOGGED: AtomicBool = AtomicBool::new(false);

fn once(flag: &AtomicBool, log: impl FnOnce()) {
    if !flag.swap(true, Ordering::Relaxed) {
        log();
    }
}

/// Relays between `client` and `upstream` until both directions end, one fails, or nothing
/// moves for `idle_timeout` (when set). The sockets are their owner's to close (by dropping
/// them); borrowed, so that a connection's task holds them once.
pub async fn relay(
    client: &Side,
    upstream: &Side,
    idle_timeout: Option<Duration>,
    live: &LiveBytes<'_>,
    mode: RelayMode,
) -> RelayReport {
    let ends = Ends {
        client,
        upstream,
        to_upstream: AtomicU64::new(0),
        to_client: AtomicU64::new(0),
        live,
        activity: Activity {
            watched: idle_timeout.is_some(),
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        },
    };
    let (up, down) = (
        Direction {
            ends: &ends,
            up: true,
        },
        Direction {
            ends: &ends,
            up: false,
        },
    );
    let activity = &ends.activity;
    // The two directions' futures are built inside select! (not bound to a local first), so
    // that each idle connection's task holds them once, not twice.
    // Biased: the directions first on every wake-up, the idle timer after them.
    let end = tokio::select! {
        biased;
        result = async { tokio::try_join!(up.run(mode), down.run(mode)) } => match result {
            Ok(_) => RelayEnd::Completed,
            Err(DirectionError { end: End::Client, error }) => RelayEnd::ClientError(error),
            Err(DirectionError { end: End::Upstream, error }) => RelayEnd::UpstreamError(error),
        },
        _ = idle_watch(activity, idle_timeout) => RelayEnd::IdleTimeout,
    };
    RelayReport {
        to_upstream: ends.to_upstream.load(Ordering::Relaxed),
        to_client: ends.to_client.load(Ordering::Relaxed),
        end,
    }
}

/// [`relay`] for two accepted or connected [`crate::net::endpoint::Stream`]s (enclave-app's
/// forwarder: vsock on one side, TCP on the other), with the default mode and no live counters.
pub async fn relay_streams(
    client: crate::net::endpoint::Stream,
    upstream: crate::net::endpoint::Stream,
    idle_timeout: Option<Duration>,
) -> RelayReport {
    let failed = |end: RelayEnd| RelayReport {
        to_upstream: 0,
        to_client: 0,
        end,
    };
    let client = match Side::new(client) {
        Ok(side) => side,
        Err(e) => return failed(RelayEnd::ClientError(e)),
    };
    let upstream = match Side::new(upstream) {
        Ok(side) => side,
        Err(e) => return failed(RelayEnd::UpstreamError(e)),
    };
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let live = LiveBytes {
        to_upstream: &up,
        to_client: &down,
    };
    relay(&client, &upstream, idle_timeout, &live, RelayMode::Auto).await
}

impl<'a> Direction<'a> {
    /// The socket this direction reads.
    fn from(&self) -> &'a Side {
        if self.up {
            self.ends.client
        } else {
            self.ends.upstream
        }
    }

    /// The socket this direction writes.
    fn to(&self) -> &'a Side {
        if self.up {
            self.ends.upstream
        } else {
            self.ends.client
        }
    }

    fn activity(&self) -> &'a Activity {
        &self.ends.activity
    }

    fn reading(&self, error: io::Error) -> DirectionError {
        DirectionError {
            end: if self.up { End::Client } else { End::Upstream },
            error,
        }
    }

    fn writing(&self, error: io::Error) -> DirectionError {
        DirectionError {
            end: if self.up { End::Upstream } else { End::Client },
            error,
        }
    }

    fn count(&self, n: usize) {
        let (own, live) = if self.up {
            (&self.ends.to_upstream, self.ends.live.to_upstream)
        } else {
            (&self.ends.to_client, self.ends.live.to_client)
        };
        for total in [own, live] {
            total.fetch_add(n as u64, Ordering::Relaxed);
        }
        self.activity().touch();
    }

    /// Moves bursts until end-of-stream, then passes the half-close on.
    async fn run(&self, mode: RelayMode) -> Result<(), DirectionError> {
        let mut splicing = mode == RelayMode::Auto;
        let mut buffer_size = MIN_BUFFER;
        // With splice, a direction is "bulk" from a read that fills a copy buffer until a burst
        // moves less than one: small messages (requests, answers, keystrokes) are copied, a
        // read that comes back short ends their burst without an EAGAIN probe (see
        // `copy_burst`), and a stream is spliced.
        let mut bulk = false;
        loop {
            // Nothing is held while waiting: no pipe, no buffer.
            self.from()
                .ready(Interest::READABLE)
                .await
                .map_err(|e| self.reading(e))?;
            // Bursts are boxed: their state (a pipe or buffer, write readiness) is allocated
            // while they run, so an idle connection's task does not carry it.
            let burst = if splicing && bulk {
                match Pipe::take() {
                    Ok(pipe) => Box::pin(self.splice_burst(pipe)).await?,
                    Err(e) => {
                        once(&NO_PIPE_LOGGED, || {
                            warn!("cannot open a pipe for splice ({e}); copying instead while descriptors are short (raise LimitNOFILE=)")
                        });
                        Box::pin(self.copy_burst(&mut buffer_size, false)).await?
                    }
                }
            } else {
                Box::pin(self.copy_burst(&mut buffer_size, splicing)).await?
            };
            match burst {
                Burst::Quiet { moved } => bulk = bulk && moved >= MIN_BUFFER as u64,
                Burst::Filled => bulk = true,
                Burst::Eof => {
                    return self.to().shutdown_write().map_err(|e| self.writing(e));
                }
                Burst::SpliceRefused => {
                    once(&SPLICE_REFUSED_LOGGED, || {
                        warn!("the kernel refuses splice from this socket type; copying through a buffer for such connections")
                    });
                    splicing = false;
                    bulk = false;
                }
            }
        }
    }

    /// Socket → pipe → socket until the source would block or ends.
    async fn splice_burst(&self, pipe: Pipe) -> Result<Burst, DirectionError> {
        let mut first = true;
        let mut moved = 0u64;
        loop {
            let got = self.from().try_io(Interest::READABLE, || {
                splice(self.from().fd(), pipe.write_fd(), CHUNK)
            });
            let n = match got {
                Ok(0) => {
                    pipe.give_back();
                    return Ok(Burst::Eof);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipe.give_back();
                    return Ok(Burst::Quiet { moved });
                }
                Err(e) if first && e.raw_os_error() == Some(libc::EINVAL) => {
                    pipe.give_back();
                    return Ok(Burst::SpliceRefused);
                }
                // The pipe is empty; dropping it closes it.
                Err(e) => return Err(self.reading(e)),
            };
            first = false;
            moved += n as u64;
            self.activity().touch();
            let mut left = n;
            while left > 0 {
                let put = self.to().try_io(Interest::WRITABLE, || {
                    splice(pipe.read_fd(), self.to().fd(), left)
                });
                match put {
                    Ok(0) => return Err(self.writing(io::ErrorKind::WriteZero.into())),
                    Ok(m) => {
                        left -= m;
                        self.count(m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self
                        .to()
                        .ready(Interest::WRITABLE)
                        .await
                        .map_err(|e| self.writing(e))?,
                    // Bytes left in the pipe are lost with the connection; the pipe is closed.
                    Err(e) => return Err(self.writing(e)),
                }
            }
            // A burst from a fast source could run for ever: with the pipe empty, let tokio's
            // budget say when to give the worker to other connections.
            tokio::task::consume_budget().await;
        }
    }

    /// read(2) into a buffer of this burst, send(2) it on, until the source would block or ends
    /// (`Quiet`, `Eof`), or — when `to_splice`, the start of a spliced direction's burst — until
    /// a read fills the buffer (`Filled`: the rest is for splice).
    ///
    /// From a TCP or unix socket, a read that comes back short ends the burst without another
    /// read to see EAGAIN: the kernel returns less than asked only when the socket's receive
    /// queue is empty, and what arrives after it is a new edge (tokio's own streams rely on the
    /// same). The readiness is cleared as of before that read, so an edge during it is kept.
    async fn copy_burst(&self, size: &mut usize, to_splice: bool) -> Result<Burst, DirectionError> {
        let mut buf: Vec<u8> = Vec::with_capacity(*size);
        let short_read_drains = self.from().short_read_drains();
        let mut moved = 0u64;
        loop {
            let cap = buf.capacity();
            let fd = self.from().fd();
            let mut short = 0;
            let got = self.from().try_io(Interest::READABLE, || {
                // SAFETY: reads at most `cap` bytes into the vector's own allocation; the
                // length is set below to what the kernel wrote.
                let n = cvt(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), cap) })?;
                if short_read_drains && n > 0 && n < cap {
                    // Drained: WouldBlock has try_io clear the readiness, as of before the read.
                    short = n;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            let n = match got {
                Ok(0) => return Ok(Burst::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => short,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *size = next_buffer_size(cap, 0).unwrap_or(cap);
                    return Ok(Burst::Quiet { moved });
                }
                Err(e) => return Err(self.reading(e)),
            };
            // SAFETY: the kernel initialised the first `n <= cap` bytes.
            unsafe { buf.set_len(n) };
            self.activity().touch();
            let mut sent = 0;
            while sent < n {
                let rest = &buf[sent..];
                let put = self.to().try_io(Interest::WRITABLE, || {
                    // SAFETY: sends from a live slice; MSG_NOSIGNAL: EPIPE, not SIGPIPE.
                    cvt(unsafe {
                        libc::send(
                            self.to().fd(),
                            rest.as_ptr().cast(),
                            rest.len(),
                            libc::MSG_NOSIGNAL,
                        )
                    })
                });
                match put {
                    Ok(0) => return Err(self.writing(io::ErrorKind::WriteZero.into())),
                    Ok(m) => {
                        sent += m;
                        self.count(m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self
                        .to()
                        .ready(Interest::WRITABLE)
                        .await
                        .map_err(|e| self.writing(e))?,
                    Err(e) => return Err(self.writing(e)),
                }
            }
            moved += n as u64;
            if short > 0 {
                *size = next_buffer_size(cap, n).unwrap_or(cap);
                return Ok(Burst::Quiet { moved });
            }
            if to_splice && n == cap {
                return Ok(Burst::Filled);
            }
            buf.clear();
            if let Some(next) = next_buffer_size(cap, n) {
                // A new allocation, not zeroed: reads fill it.
                buf = Vec::with_capacity(next);
            }
            *size = buf.capacity();
            // As in the splice burst: a fast source shares the worker when the budget says.
            tokio::task::consume_budget().await;
        }
    }
}

/// The buffer size to switch to after a read of `n` bytes into `len`, if it should change: double
/// while reads fill the buffer, back to the minimum once a read uses less than an eighth of it.
fn next_buffer_size(len: usize, n: usize) -> Option<usize> {
    if n == len && len < MAX_BUFFER {
        Some((len * 2).min(MAX_BUFFER))
    } else if n < len / 8 && len > MIN_BUFFER {
        Some(MIN_BUFFER)
    } else {
        None
    }
}

/// Resolves once nothing has moved for `timeout`; never, when there is no timeout.
async fn idle_watch(activity: &Activity, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    // Boxed, and only with a timeout: a timer is a fifth of an idle connection's task.
    let mut sleep = Box::pin(tokio::time::sleep_until(activity.last() + timeout));
    loop {
        sleep.as_mut().await;
        // Activity since the timer was set moves the deadline on.
        let deadline = activity.last() + timeout;
        if Instant::now() >= deadline {
            return;
        }
        sleep.as_mut().reset(deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UnixStream};

    /// A connected TCP pair on loopback: (the relay's end, the test's end).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (b.unwrap().0, a.unwrap())
    }

    async fn run(
        client: Side,
        upstream: Side,
        idle: Option<Duration>,
        mode: RelayMode,
    ) -> RelayReport {
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        let live = LiveBytes {
            to_upstream: &a,
            to_client: &b,
        };
        let report = relay(&client, &upstream, idle, &live, mode).await;
        assert_eq!(
            (report.to_upstream, report.to_client),
            (a.load(Ordering::Relaxed), b.load(Ordering::Relaxed)),
            "the live counters saw every byte"
        );
        report
    }

    const MODES: [RelayMode; 2] = [RelayMode::Auto, RelayMode::Copy];

    #[tokio::test]
    async fn half_close_request_response_completes_on_both_paths() {
        for mode in MODES {
            let (client_inner, mut c) = UnixStream::pair().unwrap();
            let (upstream_inner, mut u) = tcp_pair().await;
            let task = tokio::spawn(run(client_inner.into(), upstream_inner.into(), None, mode));
            c.write_all(b"request").await.unwrap();
            c.shutdown().await.unwrap();
            let mut got = Vec::new();
            u.read_to_end(&mut got).await.unwrap();
            assert_eq!(
                got, b"request",
                "{mode:?}: upstream sees the request, then EOF"
            );
            u.write_all(b"response").await.unwrap();
            u.shutdown().await.unwrap();
            let mut reply = Vec::new();
            c.read_to_end(&mut reply).await.unwrap();
            assert_eq!(reply, b"response");
            let report = task.await.unwrap();
            assert!(
                matches!(report.end, RelayEnd::Completed),
                "{:?}",
                report.end
            );
            assert_eq!((report.to_upstream, report.to_client), (7, 8));
        }
    }

    /// Sizes that cross the copy buffer's (a burst that fills it turns a spliced direction
    /// bulk; one that moves less turns it back), from a small deterministic generator.
    fn sizes(count: usize) -> impl Iterator<Item = usize> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..count).map(move |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 4 {
                0 => 1 + (x >> 8) as usize % 64,
                1 => 1 + (x >> 8) as usize % 4096,
                2 => MIN_BUFFER - 8 + (x >> 8) as usize % 16,
                _ => 1 + (x >> 8) as usize % (3 * MIN_BUFFER),
            }
        })
    }

    /// Ping-pong stalls if a burst ended while bytes were still queued: nothing more arrives
    /// to wake the direction again. Messages of every size, each answered in full before the
    /// next, on both paths, from TCP and unix sockets, on a runtime whose I/O driver runs on
    /// another thread than the relay (so an edge can land between a read and its readiness
    /// being cleared).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_response_of_every_size_never_stalls_on_both_paths() {
        for mode in MODES {
            for unix in [false, true] {
                let (client_side, mut c): (Side, Box<dyn Stream>) = if unix {
                    let (a, b) = UnixStream::pair().unwrap();
                    (a.into(), Box::new(b))
                } else {
                    let (a, b) = tcp_pair().await;
                    (a.into(), Box::new(b))
                };
                let (upstream_inner, mut u) = tcp_pair().await;
                let task = tokio::spawn(run(client_side, upstream_inner.into(), None, mode));
                let echo = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = u.read(&mut buf).await.unwrap();
                        if n == 0 {
                            u.shutdown().await.unwrap();
                            return;
                        }
                        u.write_all(&buf[..n]).await.unwrap();
                    }
                });
                let exchanges = async {
                    for (i, size) in sizes(600).enumerate() {
                        let message: Vec<u8> = (0..size).map(|j| (i + j) as u8).collect();
                        c.write_all(&message).await.unwrap();
                        let mut back = vec![0u8; size];
                        c.read_exact(&mut back).await.unwrap();
                        assert!(
                            back == message,
                            "{mode:?} unix={unix}: message {i} ({size} B) came back changed"
                        );
                    }
                    c.shutdown().await.unwrap();
                    let mut rest = Vec::new();
                    c.read_to_end(&mut rest).await.unwrap();
                    assert!(rest.is_empty());
                };
                tokio::time::timeout(Duration::from_secs(60), exchanges)
                    .await
                    .unwrap_or_else(|_| {
                        panic!("{mode:?} unix={unix}: a message stalled in the relay")
                    });
                echo.await.unwrap();
                let report = task.await.unwrap();
                assert!(
                    matches!(report.end, RelayEnd::Completed),
                    "{:?}",
                    report.end
                );
            }
        }
    }

    /// A stream the test drives: either end of a TCP or unix pair.
    trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

    #[test]
    fn buffer_grows_under_bulk_and_shrinks_when_quiet() {
        assert_eq!(
            next_buffer_size(MIN_BUFFER, MIN_BUFFER),
            Some(2 * MIN_BUFFER)
        );
        assert_eq!(
            next_buffer_size(MAX_BUFFER / 2, MAX_BUFFER / 2),
            Some(MAX_BUFFER)
        );
        assert_eq!(next_buffer_size(MAX_BUFFER, MAX_BUFFER), None);
        assert_eq!(next_buffer_size(MIN_BUFFER, 100), None);
        assert_eq!(next_buffer_size(MAX_BUFFER, MAX_BUFFER / 2), None);
        assert_eq!(next_buffer_size(MAX_BUFFER, 100), Some(MIN_BUFFER));
    }

    #[tokio::test]
    async fn bulk_transfer_is_intact_both_ways_on_both_paths() {
        for mode in MODES {
            let (client_inner, c) = tcp_pair().await;
            let (upstream_inner, u) = tcp_pair().await;
            let task = tokio::spawn(run(client_inner.into(), upstream_inner.into(), None, mode));
            let up: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let down: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13 % 241) as u8).collect();
            let (mut c_rd, mut c_wr) = c.into_split();
            let (mut u_rd, mut u_wr) = u.into_split();
            let (sent_up, sent_down) = (up.clone(), down.clone());
            let writers = tokio::spawn(async move {
                let a = async {
                    c_wr.write_all(&sent_up).await.unwrap();
                    c_wr.shutdown().await.unwrap();
                };
                let b = async {
                    u_wr.write_all(&sent_down).await.unwrap();
                    u_wr.shutdown().await.unwrap();
                };
                tokio::join!(a, b);
                (c_wr, u_wr)
            });
            let (mut got_up, mut got_down) = (Vec::new(), Vec::new());
            let (r1, r2) = tokio::join!(
                u_rd.read_to_end(&mut got_up),
                c_rd.read_to_end(&mut got_down)
            );
            r1.unwrap();
            r2.unwrap();
            assert!(got_up == up, "{mode:?}: bytes to the upstream differ");
            assert!(got_down == down, "{mode:?}: bytes to the client differ");
            drop(writers.await.unwrap());
            let report = task.await.unwrap();
            assert!(
                matches!(report.end, RelayEnd::Completed),
                "{:?}",
                report.end
            );
            assert_eq!(report.to_upstream, up.len() as u64);
            assert_eq!(report.to_client, down.len() as u64);
        }
    }

    #[tokio::test]
    async fn an_error_on_either_side_ends_the_relay_and_says_which() {
        for mode in MODES {
            let (client_inner, c) = tcp_pair().await;
            let (upstream_inner, _u) = tcp_pair().await;
            let task = tokio::spawn(run(client_inner.into(), upstream_inner.into(), None, mode));
            c.set_zero_linger().unwrap();
            drop(c);
            let report = task.await.unwrap();
            assert!(
                matches!(report.end, RelayEnd::ClientError(_)),
                "{mode:?}: {:?}",
                report.end
            );

            let (client_inner, _c) = tcp_pair().await;
            let (upstream_inner, u) = tcp_pair().await;
            let task = tokio::spawn(run(client_inner.into(), upstream_inner.into(), None, mode));
            u.set_zero_linger().unwrap();
            drop(u);
            let report = task.await.unwrap();
            assert!(
                matches!(report.end, RelayEnd::UpstreamError(_)),
                "{mode:?}: {:?}",
                report.end
            );
        }
    }

    #[tokio::test]
    async fn an_idle_relay_holds_no_pipe_and_times_out() {
        let (client_inner, _c) = UnixStream::pair().unwrap();
        let (upstream_inner, _u) = tcp_pair().await;
        let report = run(
            client_inner.into(),
            upstream_inner.into(),
            Some(Duration::from_millis(300)),
            RelayMode::Auto,
        )
        .await;
        assert!(matches!(report.end, RelayEnd::IdleTimeout));
    }

    #[tokio::test]
    async fn traffic_and_a_slow_reader_postpone_the_idle_timeout() {
        for mode in MODES {
            let (client_inner, mut c) = tcp_pair().await;
            let (upstream_inner, mut u) = tcp_pair().await;
            let idle = Duration::from_millis(800);
            let task = tokio::spawn(run(
                client_inner.into(),
                upstream_inner.into(),
                Some(idle),
                mode,
            ));
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                c.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                u.read_exact(&mut b).await.unwrap();
            }
            assert!(
                !task.is_finished(),
                "{mode:?}: traffic every 400 ms must not hit an 800 ms idle timeout"
            );
            // A reader that takes 8 MiB slowly, 64 KiB every 200 ms: the relay keeps writing
            // (partial writes), so it is not idle even though each write waits.
            let bulk = vec![5u8; 8 << 20];
            let writer = tokio::spawn(async move {
                let _ = u.write_all(&bulk).await;
                u
            });
            let mut got = 0usize;
            let mut chunk = vec![0u8; 64 << 10];
            while got < (8 << 20) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                match c.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            assert_eq!(
                got,
                8 << 20,
                "{mode:?}: the slow reader got everything before any idle timeout"
            );
            let _u = writer.await.unwrap();
            tokio::time::sleep(idle * 2).await;
            let report = task.await.unwrap();
            assert!(
                matches!(report.end, RelayEnd::IdleTimeout),
                "{mode:?}: {:?}",
                report.end
            );
        }
    }
}
