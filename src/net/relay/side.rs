//! One end of a relay: a connected socket with tokio's readiness, used through `&self`.
//!
//! This module owns how the relay reaches a socket's descriptor and its readiness without a
//! lock: TCP and unix sockets through tokio's own `ready`/`try_io`, a vsock socket through an
//! [`AsyncFd`] of its own (tokio-vsock exposes no readiness, so the relay takes a duplicate of
//! the descriptor and lets the `VsockStream` go). Both directions of a relay use the same
//! `&Side` at once — reading is one direction's, writing the other's — so no `split` (and no
//! lock taken on every poll) is needed.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

use crate::net::endpoint::Stream;

/// A connected socket the relay reads from and writes to.
#[derive(Debug)]
pub enum Side {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Any other socket (vsock), registered with tokio by the relay itself.
    Fd(AsyncFd<OwnedFd>),
}

impl From<TcpStream> for Side {
    fn from(s: TcpStream) -> Side {
        Side::Tcp(s)
    }
}

impl From<UnixStream> for Side {
    fn from(s: UnixStream) -> Side {
        Side::Unix(s)
    }
}

impl Side {
    /// The relay's view of an accepted or connected [`Stream`].
    pub fn new(stream: Stream) -> io::Result<Side> {
        match stream {
            Stream::Tcp(s) => Ok(Side::Tcp(s)),
            Stream::Unix(s) => Ok(Side::Unix(s)),
            Stream::Vsock(s) => {
                // A duplicate of the descriptor (same socket), so the VsockStream can be dropped
                // normally (deregistering its own readiness) while the relay registers this one.
                // SAFETY: fcntl on a descriptor `s` owns; the result is a new descriptor we own.
                let dup = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `dup` was just returned by fcntl and is owned by nothing else.
                let fd = unsafe { OwnedFd::from_raw_fd(dup) };
                drop(s);
                // SAFETY: an OwnedFd's descriptor stays open and the same until it is dropped,
                // which the AsyncFd does last.
                unsafe { AsyncFd::register(fd) }
                    .map(Side::Fd)
                    .map_err(|e| io::Error::other(e.to_string()))
            }
        }
    }

    pub fn fd(&self) -> RawFd {
        match self {
            Side::Tcp(s) => s.as_raw_fd(),
            Side::Unix(s) => s.as_raw_fd(),
            Side::Fd(a) => a.get_ref().as_raw_fd(),
        }
    }

    /// Waits until the socket may be ready for `interest`, READABLE or WRITABLE (it may still
    /// say EAGAIN). The waker goes into the socket's own reader or writer slot (tokio's
    /// `poll_read_ready`/`poll_write_ready`), so waiting costs the caller's future nothing:
    /// an idle connection's two waits would otherwise be most of its task's memory. Each
    /// direction of a relay reads one socket and writes the other, so no slot has two waiters.
    pub fn ready(&self, interest: Interest) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(move |cx| self.poll_ready(cx, interest))
    }

    fn poll_ready(&self, cx: &mut Context<'_>, interest: Interest) -> Poll<io::Result<()>> {
        let readable = interest.is_readable();
        match self {
            Side::Tcp(s) if readable => s.poll_read_ready(cx),
            Side::Tcp(s) => s.poll_write_ready(cx),
            Side::Unix(s) if readable => s.poll_read_ready(cx),
            Side::Unix(s) => s.poll_write_ready(cx),
            // Dropping the guard without clearing it keeps the readiness for `try_io`.
            Side::Fd(a) if readable => a.poll_read_ready(cx).map_ok(drop),
            Side::Fd(a) => a.poll_write_ready(cx).map_ok(drop),
        }
    }

    /// Runs a non-blocking system call on the descriptor; EAGAIN clears the readiness, so the
    /// next [`Side::ready`] waits for the kernel.
    pub fn try_io<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            Side::Tcp(s) => s.try_io(interest, f),
            Side::Unix(s) => s.try_io(interest, f),
            Side::Fd(a) => a.try_io(interest, |_| f()),
        }
    }

    /// Whether a read that returns less than asked proves the receive queue empty (TCP and unix
    /// stream sockets, whose reads take all that is queued up to the size asked; tokio's own
    /// streams rely on it). A vsock socket is read until EAGAIN.
    pub fn short_read_drains(&self) -> bool {
        matches!(self, Side::Tcp(_) | Side::Unix(_))
    }

    /// Ends our writes (the half-close a peer sees as end-of-stream).
    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on a descriptor this side owns.
        if unsafe { libc::shutdown(self.fd(), libc::SHUT_WR) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        // The peer already went away entirely: nothing left to tell it.
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            return Ok(());
        }
        Err(e)
    }
}

/// A system call's result as `io::Result`.
pub fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
